"""The stream flow: one long async flow run that, every ``interval`` seconds or sooner when
changes arrive (``tasks.pipeline.wait_for_changes``), runs a pipeline pass (one dispatch
task run) for each dataflow with work, then ends itself after ``run_seconds`` so the
deployment's schedule starts the next run. Empty polls make no task
run. A run owns its dataflows through a lease in the store: a second run started while
the first is alive waits for it to end (a schedule's hand-over), or gives up after
``TAKEOVER_WAIT_SECONDS`` without doing anything."""

from __future__ import annotations

import asyncio
import time
import uuid

from prefect import flow, get_run_logger, runtime
from prefect.states import Completed, Failed, State

from config import load_config
from state import StateUnavailable, Store, open_store
from state.db import now_ms
from state.leases import owner_id
from tasks import lifecycle, pipeline
from tasks.flow_tasks import dispatch
from tasks.pipeline import PassResult
from tasks.report import ExportsFailed, publish_stream_summary, report_failures

SUMMARY_EVERY_SECONDS = 60.0
TAKEOVER_WAIT_SECONDS = 90.0
LEASE_GROUP = 0  # one process streams a dataflow on one machine: a single shard group


def _run_name() -> str:
    params = runtime.flow_run.parameters
    what = params.get("dataflow") or "all dataflows"
    how = "once" if params.get("once") else f"{params.get('run_seconds', 3600):g} s"
    return f"stream {what} {time.strftime('%H:%M:%S', time.gmtime())}Z ({how})"


@flow(name="profile-relay-stream", flow_run_name=_run_name, log_prints=False)
async def stream_flow(config_path: str, dataflow: str | None = None, interval: float = 2.0,
                      once: bool = False, run_seconds: float = 3600.0) -> State:
    """Poll the change log, decide exports and deliver them.

    Args:
        config_path: the profile-relay YAML config (absolute, or relative to the worker's
            working directory).
        dataflow: stream only this dataflow; empty for every dataflow of the config.
        interval: at most this many seconds between two passes; new changes start one
            sooner (within about 0.2 s of the last).
        once: one whole pass (new mappings backfilled, changes decided, every export
            delivered or in the failed store), then end.
        run_seconds: end the run after this long, so the schedule starts the next one.
    """
    logger = get_run_logger()
    config = load_config(config_path)
    try:
        store = open_store(config.state_target)
    except StateUnavailable as exc:  # one line naming state, not a traceback
        return Failed(message=str(exc))
    flows_ = config.select_dataflows(dataflow)
    owner = owner_id(str(runtime.flow_run.id or uuid.uuid4()))
    ttl_ms = int(max(30.0, 3 * interval) * 1000)
    if not once and not await _take_leases(store, [f.name for f in flows_], owner, ttl_ms):
        return Completed(message="another stream run owns these dataflows; nothing to do")
    totals = {f.name: PassResult() for f in flows_}
    started, started_ms = time.monotonic(), now_ms()
    last_summary = started
    # The run ends run_seconds after it was scheduled to start, not after it got the
    # lease: with run_seconds equal to the schedule's interval, each run hands over to
    # the next on the tick, and a run that waited for its predecessor does not push the
    # hand-overs later and later.
    scheduled = runtime.flow_run.scheduled_start_time
    late = max(0.0, time.time() - scheduled.timestamp()) if scheduled is not None else 0.0
    if late >= run_seconds / 2:  # started long after its tick (a worker was down): a full run
        late = 0.0
    ends_at = started + run_seconds - late
    try:
        while True:
            tick = time.monotonic()
            seen_head = store.head_seq()
            for flow_ in flows_:
                if once or pipeline.has_work(store, flow_):
                    await dispatch(store, config, flow_, totals[flow_.name], settle=once)
            lifecycle.upkeep(store, config, logger)  # removed dataflows; retention, in batches
            now = time.monotonic()
            if once or now >= ends_at:
                break
            if not once and not all(store.acquire_lease(f.name, LEASE_GROUP, owner, ttl_ms)
                                    for f in flows_):
                logger.warning("lost the lease of the stream (a newer run owns it); ending")
                break
            if now - last_summary >= SUMMARY_EVERY_SECONDS:
                await publish_stream_summary(store, config, flows_, totals, started_ms)
                last_summary = now
            await pipeline.wait_for_changes(store, seen_head, until=min(tick + interval, ends_at),
                                            earliest=tick + pipeline.MIN_PASS_GAP_SECONDS)
    finally:
        if not once:
            for flow_ in flows_:
                store.release_lease(flow_.name, LEASE_GROUP, owner)
    await publish_stream_summary(store, config, flows_, totals, started_ms)
    counts = {name: t.counts() for name, t in totals.items()}
    if message := report_failures(logger, config, totals):
        return Failed(message=message, data=ExportsFailed(message, counts))
    return Completed(message=f"streamed {len(flows_)} dataflow(s)", data=counts)


async def _take_leases(store: Store, names: list[str], owner: str, ttl_ms: int) -> bool:
    """Own every dataflow, waiting for a live run to hand over; False after the wait."""
    deadline = time.monotonic() + TAKEOVER_WAIT_SECONDS
    waited = False
    while True:
        held = [n for n in names if store.acquire_lease(n, LEASE_GROUP, owner, ttl_ms) is None]
        if not held:
            if waited:
                get_run_logger().info("took over %s from the previous stream run", ", ".join(names))
            return True
        if time.monotonic() >= deadline:
            get_run_logger().info("%s: streamed by another live run; ending without work",
                                  ", ".join(held))
            for n in set(names) - set(held):
                store.release_lease(n, LEASE_GROUP, owner)
            return False
        waited = True
        await asyncio.sleep(1.0)
