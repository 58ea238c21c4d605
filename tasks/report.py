"""Prefect artifacts: the stream summary table, backfill progress, replay results.

Keys are stable so each lands on the same Artifacts page entry run after run."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from prefect.artifacts import acreate_table_artifact

from config import Config, Dataflow
from state import Store
from state.db import now_ms


def artifact_key(*parts: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


async def publish_stream_summary(store: Store, config: Config,
                                 flows_: Sequence[Dataflow], started_monotonic: float) -> None:
    since = now_ms() - int((time.monotonic() - started_monotonic) * 1000)
    rows = []
    for flow_ in flows_:
        s = store.stats(flow_.name, since_ms=since)
        rows.append({
            "dataflow": flow_.name, "decided": s.decided, "delivered": s.delivered,
            "failed": s.failed, "retrying": s.retrying, "pending": s.pending,
            "latency p50 ms": s.latency_p50_ms, "latency p95 ms": s.latency_p95_ms,
            "requests/s": s.delivered_per_s, "lag (changes)": s.lag_changes,
            "last error": s.last_error or "",
        })
    await acreate_table_artifact(
        key=artifact_key("stream-summary", *[f.name for f in flows_]) if len(flows_) < 4
        else "stream-summary", table=rows,
        description="profile-relay stream: figures for this run, per dataflow")
