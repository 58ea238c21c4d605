"""The replay flow: the failed-request store back through the outbox, then delivered with
each profile's state at send time."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact
from prefect.states import Completed, Failed, State

from config import load_config
from state import StateUnavailable, open_store
from tasks.flow_tasks import dispatch, requeue_task
from tasks.pipeline import PassResult
from tasks.report import ExportsFailed, artifact_key, report_failures


@flow(name="profile-relay-replay", flow_run_name="replay {dataflow}", timeout_seconds=3600)
async def replay_flow(config_path: str, dataflow: str, since_ms: int | None = None,
                      profiles: list[str] | None = None) -> State:
    """Re-send each failed profile with its current state, unless superseded.

    Args:
        config_path: the profile-relay YAML config.
        dataflow: the dataflow whose failed-request store is replayed.
        since_ms: only the entries that failed at or after this time (epoch milliseconds);
            empty for all of them.
        profiles: only these profiles' entries; empty for every profile.
    """
    config = load_config(config_path)
    try:
        store = open_store(config.state_target)
    except StateUnavailable as exc:  # one line naming state, not a traceback
        return Failed(message=str(exc))
    flow_ = config.dataflow(dataflow)
    logger = get_run_logger()
    plan = requeue_task(store, flow_, since_ms, profiles or None)
    logger.info("%s: replaying %d, superseded %d", dataflow, len(plan.resent),
                len(plan.superseded))
    totals = PassResult()
    await dispatch(store, config, flow_, totals, settle=True)
    still_failed = {e.profile_id for e in store.open_failures(dataflow)}
    rows = [{"profile": e.profile_id, "action": "re-sent",
             "outcome": "failed again" if e.profile_id in still_failed else "delivered",
             "previous status": e.last_status, "previous error": e.last_error or ""}
            for e in plan.resent]
    rows += [{"profile": e.profile_id, "action": "superseded",
              "outcome": "a newer state was sent or is queued", "previous status": e.last_status,
              "previous error": e.last_error or ""} for e in plan.superseded]
    await acreate_table_artifact(key=artifact_key("replay", config, dataflow), table=rows[:1000],
                                 description=f"replay of {dataflow}: {len(plan.resent)} re-sent, "
                                             f"{len(plan.superseded)} superseded")
    result = {"resent": len(plan.resent), "superseded": len(plan.superseded),
              **totals.counts()}
    if message := report_failures(logger, config, {dataflow: totals}):
        return Failed(message=message, data=ExportsFailed(message, result))
    return Completed(message=f"replayed {len(plan.resent)}", data=result)
