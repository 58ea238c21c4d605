"""The backfill flow: queue every profile already qualified for a dataflow's segments (or
one of them), in chunks, with a progress artifact; an interrupted run resumes. Then the
dispatch task delivers what it queued."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from prefect.states import Completed, Failed, State
from rich.progress import Progress

from config import load_config
from state import StateUnavailable, open_store
from tasks import pipeline
from tasks.flow_tasks import backfill_task, dispatch
from tasks.pipeline import PassResult
from tasks.report import ExportsFailed, artifact_key, report_failures


@flow(name="profile-relay-backfill", flow_run_name="backfill {dataflow} ({segment})",
      timeout_seconds=6 * 3600)
async def backfill_flow(config_path: str, dataflow: str, segment: str | None = None,
                        deliver: bool = True) -> State:
    """Export every profile already qualified for a dataflow, then deliver.

    Args:
        config_path: the profile-relay YAML config.
        dataflow: the dataflow to backfill (a name from the config's dataflows).
        segment: only this mapped segment; empty for every segment mapped to the dataflow.
        deliver: deliver what the backfill queued before the run ends.
    """
    config = load_config(config_path)
    try:
        store = open_store(config.state_target)
    except StateUnavailable as exc:  # one line naming state, not a traceback
        return Failed(message=str(exc))
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
    for job in jobs:
        if job.done:
            logger.info("%s: resuming the interrupted backfill of %s at %d of %s profile(s)",
                        dataflow, job.segment_id or "all mapped segments", job.done, job.total)
    artifact = await acreate_progress_artifact(
        progress=0.0, key=artifact_key("backfill", config, dataflow),
        description=f"backfill of {dataflow} ({segment or 'all mapped segments'})")
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
    totals = PassResult()
    if deliver:
        await dispatch(store, config, flow_, totals, settle=True)
    result = {"dataflow": dataflow, "exported": exported, **totals.counts()}
    if message := report_failures(logger, config, {dataflow: totals}):
        return Failed(message=message, data=ExportsFailed(message, result))
    return Completed(message=f"backfilled {exported} profile(s)", data=result)
