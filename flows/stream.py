"""The stream flow: one long async flow run that polls the change log every few seconds,
decides exports per dataflow and dispatches them, then ends itself after ``run_seconds``
so a schedule starts the next run. Task runs only for work: none for empty polls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import sqlite_utils
from prefect import flow, get_run_logger

from destinations.config import Config, Dataflow
from flows.common import open_config, select_dataflows
from flows.report import publish_stream_summary
from state import dataflows as flows_state
from state import outbox
from tasks.dispatch import RetryableDelivery, dispatch_task
from tasks.export import (
    BATCH_CHANGES,
    export_batch_task,
    payload_spec,
    run_backfill_task,
    sync_mapping,
)

MAX_BATCHES_PER_PASS = 20
SUMMARY_EVERY_SECONDS = 60.0
DELIVERY_LOG_KEEP_MS = 7 * 24 * 3_600_000  # status reads the last hour; keep a week
SENDER_WAIT_SECONDS = 60.0


async def dispatch_pending(db: sqlite_utils.Database, config: Config, flow_: Dataflow,
                           until_empty: bool) -> None:
    """Run the dispatch task when the outbox has work. ``until_empty`` (``--once``): keep
    going until every export is delivered or in the failed store."""
    dest = config.destination(flow_.destination)
    for _ in range(20):
        first = outbox.next_due(db, flow_.name)
        if first is None:
            return
        wait = (first - time.time() * 1000) / 1000
        if wait > 0:
            if not until_empty:
                return  # only exports waiting for their backoff: no task run
            await asyncio.sleep(min(wait, dest.max_retry_after_seconds))
        try:
            # --once and replay wait for a concurrent sender (it releases the outbox after
            # each of its passes); a streaming pass leaves the work to it and moves on.
            await dispatch_task(db, flow_.name, dest,
                                wait_seconds=SENDER_WAIT_SECONDS if until_empty else 0.0)
        except RetryableDelivery as exc:  # retries spent; the exports wait in the outbox
            get_run_logger().warning("%s: %s", flow_.name, exc)
        if not until_empty:
            return


async def stream_pass(db: sqlite_utils.Database, config: Config, flow_: Dataflow,
                      once: bool = False) -> dict[str, int]:
    """One pass over one dataflow: mappings, backfills, micro-batches, dispatch."""
    logger = get_run_logger()
    sync = sync_mapping(db, config, flow_)
    if sync.created:
        logger.info("%s: new dataflow, backfilling its segments", flow_.name)
    elif sync.new_segments:
        logger.info("%s: newly mapped %s, backfilling", flow_.name, ", ".join(sync.new_segments))
    spec = payload_spec(db, config, flow_)
    counts = {"changes": 0, "exports": 0, "backfilled": 0}
    for job in flows_state.open_backfills(db, flow_.name):
        counts["backfilled"] += run_backfill_task(db, flow_, spec, job)
    for _ in range(MAX_BATCHES_PER_PASS):
        if flows_state.max_seq(db) <= flows_state.cursor(db, flow_.name):
            break  # an empty poll: no task run
        try:
            result = export_batch_task(db, flow_, spec, BATCH_CHANGES)
        except flows_state.CursorMoved:
            logger.warning("%s: another stream run moved the cursor; re-reading", flow_.name)
            continue
        if result is None:
            break
        counts["changes"] += result.changes
        counts["exports"] += result.exports
        logger.info("%s: %d change(s) -> %d export(s), cursor %d", flow_.name,
                    result.changes, result.exports, result.cursor)
    await dispatch_pending(db, config, flow_, until_empty=once)
    return counts


@flow(name="profile-relay-stream", log_prints=False)
async def stream_flow(config_path: str, dataflow: str | None = None, interval: float = 2.0,
                      once: bool = False, run_seconds: float = 3600.0) -> dict[str, Any]:
    """Poll, detect, export and deliver, every ``interval`` seconds, for ``run_seconds``."""
    config, db = open_config(config_path)
    flows_ = select_dataflows(config, dataflow)
    started = time.monotonic()
    last_summary = started
    totals: dict[str, dict[str, int]] = {f.name: {"changes": 0, "exports": 0, "backfilled": 0}
                                         for f in flows_}
    while True:
        tick = time.monotonic()
        for flow_ in flows_:
            for key, value in (await stream_pass(db, config, flow_, once)).items():
                totals[flow_.name][key] += value
        now = time.monotonic()
        if once or now - started >= run_seconds:
            break
        if now - last_summary >= SUMMARY_EVERY_SECONDS:
            await publish_stream_summary(db, config, flows_, started)
            outbox.prune_deliveries(db, int(time.time() * 1000) - DELIVERY_LOG_KEEP_MS)
            last_summary = now
        await asyncio.sleep(max(0.0, interval - (now - tick)))
    await publish_stream_summary(db, config, flows_, started)
    return totals
