"""Read-only figures for `status` and the Prefect artifacts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import sqlite_utils

from state.db import now_ms
from state.outbox import skipped_counts


@dataclass
class DataflowStats:
    dataflow: str
    known: bool
    cursor: int
    lag_changes: int
    lag_seconds: float
    pending: int
    retrying: int
    decided: int
    delivered: int
    failed: int
    superseded: int
    requeued: int
    latency_p50_ms: int | None
    latency_p95_ms: int | None
    delivered_per_s: float
    last_error: str | None
    skipped: dict[str, int] = field(default_factory=dict)  # closed unsent, by reason (all time)

    def as_dict(self) -> dict:
        return asdict(self)


def _percentile(sorted_values: list[int], q: float) -> int | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def dataflow_stats(db: sqlite_utils.Database, dataflow: str, since_ms: int | None = None) -> DataflowStats:
    """Figures for one dataflow; counts of deliveries and latency since ``since_ms``
    (default: the last hour)."""
    conn = db.conn
    now = now_ms()
    since = since_ms if since_ms is not None else now - 3_600_000
    row = conn.execute("SELECT cursor FROM dataflows WHERE name = ?", (dataflow,)).fetchone()
    cursor = row[0] if row else 0
    head, head_at = conn.execute(
        "SELECT coalesce(max(seq), 0), max(committed_at) FROM changes").fetchone()
    oldest_unread = conn.execute("SELECT min(committed_at) FROM changes WHERE seq > ?",
                                 (cursor,)).fetchone()[0]
    pending, retrying = conn.execute(
        "SELECT count(*), coalesce(sum(attempts > 0), 0) FROM outbox WHERE dataflow = ?",
        (dataflow,)).fetchone()
    latencies = [v for (v,) in conn.execute(
        "SELECT latency_ms FROM deliveries WHERE dataflow = ? AND delivered_at >= ? "
        "ORDER BY latency_ms", (dataflow, since))]
    window = conn.execute(
        "SELECT min(delivered_at), max(delivered_at) FROM deliveries WHERE dataflow = ? "
        "AND delivered_at >= ?", (dataflow, since)).fetchone()
    failures = dict(conn.execute(
        "SELECT state, count(*) FROM failed_requests WHERE dataflow = ? GROUP BY state",
        (dataflow,)).fetchall())
    last_error = conn.execute(
        "SELECT last_error FROM (SELECT last_error, last_attempt_at FROM outbox WHERE dataflow = ? "
        "AND last_error IS NOT NULL UNION ALL SELECT last_error, last_attempt_at FROM "
        "failed_requests WHERE dataflow = ? AND last_error IS NOT NULL) "
        "ORDER BY last_attempt_at DESC LIMIT 1", (dataflow, dataflow)).fetchone()
    span = ((window[1] - window[0]) / 1000) if window[0] is not None else 0
    decided = conn.execute(
        "SELECT (SELECT count(*) FROM deliveries WHERE dataflow = ? AND delivered_at >= ?) + "
        "(SELECT count(*) FROM outbox WHERE dataflow = ?) + "
        "(SELECT count(*) FROM failed_requests WHERE dataflow = ? AND last_attempt_at >= ?)",
        (dataflow, since, dataflow, dataflow, since)).fetchone()[0]
    return DataflowStats(
        dataflow=dataflow,
        known=row is not None,
        cursor=cursor,
        lag_changes=max(0, head - cursor),
        lag_seconds=round(max(0, now - oldest_unread) / 1000, 3) if oldest_unread and head_at else 0.0,
        pending=pending,
        retrying=retrying,
        decided=decided,
        delivered=len(latencies),
        failed=failures.get("failed", 0),
        superseded=failures.get("superseded", 0),
        requeued=failures.get("requeued", 0),
        latency_p50_ms=_percentile(latencies, 0.50),
        latency_p95_ms=_percentile(latencies, 0.95),
        delivered_per_s=round(len(latencies) / span, 1) if span > 0 else float(len(latencies)),
        last_error=last_error[0] if last_error else None,
        skipped=skipped_counts(db, dataflow),
    )
