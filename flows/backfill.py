"""The backfill flow: export every profile already qualified for a dataflow's segments (or
one of them), in chunks, with a progress artifact; an interrupted run resumes."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from rich.progress import Progress

from flows.common import open_config
from flows.stream import dispatch_pending
from state import dataflows as flows_state
from tasks.export import payload_spec, run_backfill, sync_mapping


@flow(name="profile-relay-backfill")
async def backfill_flow(config_path: str, dataflow: str, segment: str | None = None,
                        deliver: bool = True) -> dict[str, Any]:
    """Backfill ``dataflow`` (all its mapped segments, or ``segment``), then deliver."""
    config, db = open_config(config_path)
    flow_ = config.dataflow(dataflow)
    if segment is not None and segment not in flow_.segments:
        raise ValueError(f"segment {segment!r} is not mapped to dataflow {dataflow!r}; "
                         f"mapped: {flow_.segments}")
    logger = get_run_logger()
    sync_mapping(db, config, flow_)
    jobs = flows_state.open_backfills(db, dataflow)
    if not any(j.segment_id == segment or j.segment_id is None for j in jobs):
        flows_state.start_backfill(db, dataflow, segment, "by hand")
        jobs = flows_state.open_backfills(db, dataflow)
    else:
        logger.info("%s: resuming an interrupted backfill", dataflow)
    spec = payload_spec(db, config, flow_)
    artifact = await acreate_progress_artifact(progress=0.0,
                                               description=f"backfill of {dataflow}")
    loop = asyncio.get_running_loop()
    exported = 0
    with Progress(disable=not sys.stderr.isatty(), transient=True) as bar:
        for job in jobs:
            what = job.segment_id or "all mapped segments"
            task_id = bar.add_task(f"backfill {dataflow} ({what})", total=None)

            def progress(done: int, total: int, task_id: Any = task_id) -> None:
                bar.update(task_id, completed=done, total=total)
                asyncio.run_coroutine_threadsafe(
                    aupdate_progress_artifact(artifact, progress=100.0 * done / max(total, 1)),
                    loop)

            # in a thread, so the loop keeps publishing progress while chunks are written
            exported += await asyncio.to_thread(run_backfill, db, flow_, spec, job,
                                                on_progress=progress)
            logger.info("%s: backfill of %s queued %d export(s)", dataflow, what, exported)
    await aupdate_progress_artifact(artifact, progress=100.0)
    if deliver:
        await dispatch_pending(db, config, flow_, until_empty=True)
    return {"dataflow": dataflow, "exported": exported}
