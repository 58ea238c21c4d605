"""The backfill flow: queue every profile already qualified for a dataflow's segments (or
one of them), in chunks, with a progress artifact; an interrupted run resumes. Then the
dispatch task delivers what it queued."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from rich.progress import Progress

from config import load_config
from state import open_store
from tasks import pipeline
from tasks.flow_tasks import backfill_task, dispatch
from tasks.pipeline import PassResult


@flow(name="profile-relay-backfill")
async def backfill_flow(config_path: str, dataflow: str, segment: str | None = None,
                        deliver: bool = True) -> dict[str, Any]:
    """Backfill ``dataflow`` (all its mapped segments, or ``segment``), then deliver."""
    config = load_config(config_path)
    store = open_store(config.state_path)
    flow_ = config.dataflow(dataflow)
    if segment is not None and segment not in flow_.segments:
        raise ValueError(f"segment {segment!r} is not mapped to dataflow {dataflow!r}; "
                         f"mapped: {flow_.segments}")
    logger = get_run_logger()
    pipeline.sync(store, config, flow_, logger)
    jobs = store.open_backfills(dataflow)
    if not any(j.segment_id == segment or j.segment_id is None for j in jobs):
        store.start_backfill(dataflow, segment, "by hand")
        jobs = store.open_backfills(dataflow)
    else:
        logger.info("%s: resuming an interrupted backfill", dataflow)
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

            exported += await backfill_task(store, flow_, job, on_progress=progress)
            logger.info("%s: backfill of %s queued %d export(s)", dataflow, what, exported)
    await aupdate_progress_artifact(artifact, progress=100.0)
    if deliver:
        await dispatch(store, config, flow_, PassResult(), settle=True)
    return {"dataflow": dataflow, "exported": exported}
