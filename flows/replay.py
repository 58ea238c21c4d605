"""The replay flow: the failed-request store back through the outbox, then delivered with
each profile's state at send time."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact

from config import load_config
from state import open_store
from tasks.flow_tasks import dispatch, requeue_task
from tasks.pipeline import PassResult
from tasks.report import artifact_key


@flow(name="profile-relay-replay")
async def replay_flow(config_path: str, dataflow: str) -> dict[str, Any]:
    """Re-send each failed profile with its current state, unless superseded."""
    config = load_config(config_path)
    store = open_store(config.state_path)
    flow_ = config.dataflow(dataflow)
    plan = requeue_task(store, flow_)
    get_run_logger().info("%s: replaying %d, superseded %d", dataflow, len(plan.resent),
                          len(plan.superseded))
    await dispatch(store, config, flow_, PassResult(), settle=True)
    rows = [{"profile": e.profile_id, "action": action, "previous status": e.last_status,
             "previous error": e.last_error or ""}
            for action, entries in (("re-sent", plan.resent), ("superseded", plan.superseded))
            for e in entries]
    await acreate_table_artifact(key=artifact_key("replay", dataflow), table=rows[:1000],
                                 description=f"replay of {dataflow}: {len(plan.resent)} re-sent, "
                                             f"{len(plan.superseded)} superseded")
    return {"resent": len(plan.resent), "superseded": len(plan.superseded)}
