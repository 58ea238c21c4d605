"""Deciding exports for one dataflow: a micro-batch of the change log, or a backfill chunk,
into the outbox. Plain functions with explicit inputs; the flows wrap them in tasks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import sqlite_utils
from prefect import task
from prefect.cache_policies import NO_CACHE

from destinations.config import Config, Dataflow
from state import dataflows as flows_state
from state.dataflows import Backfill, Export, SyncResult
from state.db import now_ms
from tasks.diff import candidates, decide
from tasks.payload import Encoder, PayloadSpec, idempotency_key

BATCH_CHANGES = 10_000
BACKFILL_CHUNK = 5_000


@dataclass(frozen=True)
class BatchResult:
    changes: int
    exports: int
    cursor: int


def mapping_hash(config: Config, flow: Dataflow) -> str:
    """What the mapping is, apart from its segments: a change bumps mappingUpdatedAt."""
    dest = config.destination(flow.destination)
    doc = {"destination": flow.destination, "attributes": flow.attributes,
           "names": dest.include_segment_names, "timestamps": dest.include_segment_timestamps}
    return hashlib.sha256(orjson.dumps(doc)).hexdigest()[:16]


def sync_mapping(db: sqlite_utils.Database, config: Config, flow: Dataflow) -> SyncResult:
    return flows_state.sync_dataflow(db, flow.name, flow.destination, flow.segments,
                                     mapping_hash(config, flow))


def payload_spec(db: sqlite_utils.Database, config: Config, flow: Dataflow) -> PayloadSpec:
    return PayloadSpec.for_dataflow(config, flow, flows_state.mapping_times(db, flow.name))


def export_batch(db: sqlite_utils.Database, flow: Dataflow, spec: PayloadSpec,
                 limit: int = BATCH_CHANGES) -> BatchResult | None:
    """Decide one micro-batch after the dataflow's cursor and queue its exports, the new
    snapshots and the advanced cursor in one transaction. None when there is nothing new."""
    start = flows_state.cursor(db, flow.name)
    rows = flows_state.read_changes(db, start, limit)
    if not rows:
        return None
    cands = candidates(rows, flow.attributes, flow.segments)
    pids = cands.get_column("profile_id").to_list()
    seen = flows_state.snapshots(db, flow.name, pids)
    decisions = decide(cands, flows_state.memberships(db, pids, flow.segments),
                       {pid: qualified for pid, (qualified, _) in seen.items()})
    # A backfill may already have queued a state at or after this change (the cursor lags
    # behind a newly mapped segment's backfill): exporting again would repeat that state,
    # or label it with an older sequence after the newer one was sent.
    chosen = {d.profile_id: d for d in decisions
              if d.export and d.seq > seen.get(d.profile_id, ("", 0))[1]}
    encoder = Encoder(spec)
    exports = []
    for pid, attrs, idmap, _, ups, _ in flows_state.payload_rows(
            db, list(chosen), encoder.segment_tails, flow.segments):
        d = chosen[pid]
        body = encoder.body(attrs, idmap, ups)
        exports.append(Export(pid, d.seq, d.reason, d.change_at,
                              idempotency_key(flow.name, pid, d.seq, body), body, d.qualified))
    exports.sort(key=lambda e: e.seq)
    picked = {e.profile_id for e in exports}
    moved = [(d.profile_id, d.qualified) for d in decisions if d.profile_id not in picked]
    flows_state.queue_exports(db, flow.name, exports, moved, cursor_from=start,
                              cursor_to=rows[-1][0])
    return BatchResult(len(rows), len(exports), rows[-1][0])


def run_backfill(db: sqlite_utils.Database, flow: Dataflow, spec: PayloadSpec, job: Backfill,
                 chunk: int = BACKFILL_CHUNK,
                 on_progress: Callable[[int, int], None] | None = None) -> int:
    """Export every profile qualified for the job's segments, in profile order, chunk by
    chunk; progress is saved with each chunk, so a crash resumes where it stopped."""
    segments = [job.segment_id] if job.segment_id else list(flow.segments)
    encoder = Encoder(spec)
    total = job.total
    if total is None:
        total = flows_state.count_qualified(db, segments) + job.done
        flows_state.set_backfill_total(db, job.id, total)
    done, after = job.done, job.after_profile
    exported = 0
    while pids := flows_state.qualified_after(db, segments, after, chunk):
        now = now_ms()
        exports = []
        for pid, attrs, idmap, seq, ups, qualified in flows_state.payload_rows(
                db, pids, encoder.segment_tails, flow.segments):
            qualified = "\n".join(sorted(qualified.split("\n"))) if qualified else ""
            body = encoder.body(attrs, idmap, ups)
            exports.append(Export(pid, seq, "backfill", now,
                                  idempotency_key(flow.name, pid, seq, body), body, qualified))
        flows_state.queue_exports(db, flow.name, exports, backfill=(job.id, pids[-1], len(pids)))
        after = pids[-1]
        done += len(pids)
        exported += len(exports)
        if on_progress:
            on_progress(done, max(total, done))
    flows_state.finish_backfill(db, job.id)
    return exported


export_batch_task = task(export_batch, name="export-batch", cache_policy=NO_CACHE)
run_backfill_task = task(run_backfill, name="backfill-chunks", cache_policy=NO_CACHE)
