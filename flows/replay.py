"""The replay flow: the failed-request store back through the outbox, then delivered."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact

from flows.common import open_config
from flows.report import artifact_key
from flows.stream import dispatch_pending
from tasks.export import payload_spec
from tasks.replay import requeue_failures


@flow(name="profile-relay-replay")
async def replay_flow(config_path: str, dataflow: str) -> dict[str, Any]:
    """Re-send each failed export with the profile's current state, unless superseded."""
    config, db = open_config(config_path)
    flow_ = config.dataflow(dataflow)
    plan = requeue_failures(db, dataflow, payload_spec(db, config, flow_))
    get_run_logger().info("%s: replaying %d, superseded %d", dataflow, len(plan.resent),
                          len(plan.superseded))
    await dispatch_pending(db, config, flow_, until_empty=True)
    rows = ([{"profile": e.profile_id, "action": "re-sent", "idempotency key": e.idempotency_key,
              "previous status": e.last_status, "previous error": e.last_error or ""}
             for e in plan.resent]
            + [{"profile": e.profile_id, "action": "superseded", "idempotency key": e.idempotency_key,
                "previous status": e.last_status, "previous error": e.last_error or ""}
               for e in plan.superseded])
    await acreate_table_artifact(key=artifact_key("replay", dataflow), table=rows[:1000],
                          description=f"replay of {dataflow}: {len(plan.resent)} re-sent, "
                                      f"{len(plan.superseded)} superseded")
    return {"resent": len(plan.resent), "superseded": len(plan.superseded)}
