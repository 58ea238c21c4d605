"""The stream flow: one long async flow run that polls every ``interval`` seconds and runs
a pipeline pass (as a dispatch task) for each dataflow with work, then ends itself after
``run_seconds`` so a schedule starts the next run. Empty polls make no task run."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prefect import flow

from config import load_config
from state import open_store
from state.db import now_ms
from tasks import pipeline
from tasks.flow_tasks import dispatch
from tasks.pipeline import PassResult
from tasks.report import publish_stream_summary

SUMMARY_EVERY_SECONDS = 60.0
DELIVERY_LOG_KEEP_MS = 7 * 24 * 3_600_000  # status reads the last hour; keep a week


@flow(name="profile-relay-stream", log_prints=False)
async def stream_flow(config_path: str, dataflow: str | None = None, interval: float = 2.0,
                      once: bool = False, run_seconds: float = 3600.0) -> dict[str, Any]:
    """Poll, decide and deliver every ``interval`` seconds, for ``run_seconds``; ``once``:
    one whole pass, until every export is delivered or in the failed store."""
    config = load_config(config_path)
    store = open_store(config.state_path)
    flows_ = config.select_dataflows(dataflow)
    totals = {f.name: PassResult() for f in flows_}
    started = last_summary = time.monotonic()
    while True:
        tick = time.monotonic()
        for flow_ in flows_:
            if once or pipeline.has_work(store, flow_):
                await dispatch(store, config, flow_, totals[flow_.name], settle=once)
        now = time.monotonic()
        if once or now - started >= run_seconds:
            break
        if now - last_summary >= SUMMARY_EVERY_SECONDS:
            await publish_stream_summary(store, config, flows_, started)
            store.prune_deliveries(now_ms() - DELIVERY_LOG_KEEP_MS)
            last_summary = now
        await asyncio.sleep(max(0.0, interval - (now - tick)))
    await publish_stream_summary(store, config, flows_, started)
    return {name: t.counts() for name, t in totals.items()}
