"""The relay's pipeline for one dataflow, as plain functions with explicit inputs.

One pass: bring the dataflow's mapping in line with the config (a new dataflow or a newly
mapped segment opens a backfill), run the open backfills, decide the exports of the
change log after the dataflow's cursor, and deliver what is due. The flows, the demo, the
tests and the benchmarks all run these functions; the flows only wrap them in Prefect
tasks. Nothing here knows Prefect or SQL.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson

from config import Config, Dataflow
from destinations.breaker import Breaker
from destinations.ratelimit import TokenBucket, rate_limit_for
from destinations.retry import RetryPolicy
from destinations.sender import Sender
from state import CursorMoved, Store
from state.db import now_ms
from state.model import QUALIFIED, REMAP_BACKFILL, Backfill, Export, FailedEntry, SyncResult
from tasks.body import BodySpec
from tasks.diff import candidates, decide
from tasks.dispatch import DeliverySummary, drain
from tasks.lifecycle import public_endpoint

BATCH_CHANGES = 10_000
BACKFILL_CHUNK = 50_000  # profiles per backfill transaction (bench/diff.py: about 2x the rate of 5,000)
MAX_BATCHES_PER_PASS = 20  # then deliver, so a long backlog does not hold up sending
LOCK_POLL_SECONDS = 0.05
FILL_POLL_SECONDS = 0.05  # while a stream pass waits to fill a batch (batch.max_wait_ms)
WAKE_POLL_SECONDS = 0.05  # while a stream waits between passes, how often it looks for changes
MIN_PASS_GAP_SECONDS = 0.2  # new changes start a pass at once, but passes start no closer
REDELIVERIES_PER_PASS = 10_000

log = logging.getLogger("profile_relay")


@dataclass
class PassResult:
    changes: int = 0
    exports: int = 0
    backfilled: int = 0
    redelivered: int = 0  # from the failed store, on the destination's schedule
    delivery: DeliverySummary = field(default_factory=DeliverySummary)

    def add(self, other: PassResult) -> None:
        self.changes += other.changes
        self.exports += other.exports
        self.backfilled += other.backfilled
        self.redelivered += other.redelivered
        self.delivery.add(other.delivery)

    def counts(self) -> dict[str, int]:
        d = self.delivery
        return {"changes": self.changes, "exports": self.exports, "backfilled": self.backfilled,
                "redelivered": self.redelivered, "delivered": d.delivered,
                "retrying": d.retrying, "failed": d.failed}


@dataclass(frozen=True)
class BatchResult:
    changes: int
    exports: int
    cursor: int


@dataclass(frozen=True)
class ReplayPlan:
    resent: list[FailedEntry]
    superseded: list[FailedEntry]


# -- mapping ----------------------------------------------------------------------------------

def mapping_hash(config: Config, flow: Dataflow) -> str:
    """What the mapping is, apart from its segments: a change bumps mappingUpdatedAt."""
    dest = config.destination(flow.destination)
    doc = {"destination": flow.destination, "attributes": flow.attributes,
           "names": dest.include_segment_names, "timestamps": dest.include_segment_timestamps}
    return hashlib.sha256(orjson.dumps(doc)).hexdigest()[:16]


def sync(store: Store, config: Config, flow: Dataflow,
         logger: logging.Logger | logging.LoggerAdapter = log) -> SyncResult:
    endpoint = public_endpoint(config.destination(flow.destination).endpoint)
    result = store.sync_dataflow(flow.name, flow.destination, flow.segments,
                                 mapping_hash(config, flow), endpoint)
    if result.resumed:
        cursor = store.cursor(flow.name)
        logger.info("%s: back in the config: resuming where it stopped (cursor %d, %d change(s) "
                    "to catch up)", flow.name, cursor, max(0, store.head_seq() - cursor))
    if result.moved_from is not None:
        logger.warning("%s: destination changed from %s (%s) to %s (%s); nothing is re-sent: "
                       "`profile-relay backfill --dataflow %s` sends every qualified profile "
                       "to it", flow.name, result.moved_from[0], result.moved_from[1] or "-",
                       flow.destination, endpoint, flow.name)
    if result.created:
        logger.info("%s: new dataflow, backfilling its segments", flow.name)
    elif result.new_segments:
        fresh = [s for s in result.new_segments if s not in result.remapped]
        if fresh:
            logger.info("%s: newly mapped %s, backfilling", flow.name, ", ".join(fresh))
        if result.remapped:
            logger.info("%s: mapped again %s, backfilling, with the exits that happened while "
                        "unmapped", flow.name, ", ".join(result.remapped))
    return result


def _tracked(qualified: str, keep: set[str]) -> str:
    """The segments of a stored snapshot that are in ``keep``, newline separated."""
    if not qualified:
        return ""
    return "\n".join(s for s in qualified.split("\n") if s in keep)


def _joined(qualified: str, more: Sequence[str]) -> str:
    """A snapshot: the mapped segments qualified now, then the unmapped ones the receiver
    last saw qualified (exported states show every segment)."""
    extra = [s for s in more if s]
    return "\n".join([qualified, *extra]) if qualified and extra else qualified or "\n".join(extra)


def body_spec(store: Store, config: Config, flow: Dataflow) -> BodySpec:
    return BodySpec.for_dataflow(config, flow, store.mapping_times(flow.name))


# -- deciding exports --------------------------------------------------------------------------

def decide_batch(store: Store, flow: Dataflow, limit: int = BATCH_CHANGES) -> BatchResult | None:
    """Decide one micro-batch after the dataflow's cursor and queue its exports, the new
    snapshots and the advanced cursor in one transaction. None when there is nothing new."""
    start = store.cursor(flow.name)
    read_at = now_ms()
    rows = store.read_changes(start, limit)
    if not rows:
        return None
    cands = candidates(rows, flow.attributes, flow.segments)
    pids = cands.get_column("profile_id").to_list()
    seen = store.snapshots(flow.name, pids)
    # Snapshots also keep the segments this dataflow mapped once and unmapped since, as the
    # receiver last saw them (see ``_joined``); flips are judged on the mapped ones only.
    mapped = set(flow.segments)
    unmapped = store.unmapped_segments(flow.name)
    members = store.memberships(pids, [*flow.segments, *unmapped])
    held: dict[str, list[str]] = {}
    if unmapped:
        for pid, seg, status in members:
            if seg not in mapped and status in QUALIFIED:
                held.setdefault(pid, []).append(seg)
        members = [m for m in members if m[1] in mapped]
    only_mapped: dict[str, str] = {}  # few distinct snapshots: filter each once
    for qualified, _ in seen.values():
        if qualified not in only_mapped:
            only_mapped[qualified] = _tracked(qualified, mapped)
    decisions = decide(cands, members, {pid: only_mapped[qualified]
                                        for pid, (qualified, _) in seen.items()})
    # A backfill may already have queued a state at or after this change (the cursor lags
    # behind a newly mapped segment's backfill): exporting again would repeat that state.
    exports = [Export(d.profile_id, d.seq, d.reason, d.change_at,
                      _joined(d.qualified, held[d.profile_id]) if d.profile_id in held
                      else d.qualified)
               for d in decisions if d.export and d.seq > seen.get(d.profile_id, ("", 0))[1]]
    picked = {e.profile_id for e in exports}
    unmapped_set = set(unmapped)
    moved = [(d.profile_id, _joined(d.qualified, _tracked(
                 seen.get(d.profile_id, ("", 0))[0], unmapped_set).split("\n"))
              if unmapped else d.qualified)
             for d in decisions if d.profile_id not in picked]
    store.enqueue_exports(flow.name, exports, moved, cursor_from=start, cursor_to=rows[-1][0],
                          read_at=read_at)
    return BatchResult(len(rows), len(exports), rows[-1][0])


def backfill(store: Store, flow: Dataflow, job: Backfill, chunk: int = BACKFILL_CHUNK,
             on_progress: Callable[[int, int], None] | None = None) -> int:
    """Queue every profile qualified for the job's segments, in profile order, chunk by
    chunk; progress is saved with each chunk, so a crash resumes where it stopped."""
    segments = [job.segment_id] if job.segment_id else list(flow.segments)
    tracked = [*flow.segments, *store.unmapped_segments(flow.name)]
    total = job.total
    if total is None:
        total = store.count_qualified(segments) + job.done
        store.set_backfill_total(job.id, total)
    done, after = job.done, job.after_profile
    exported = 0
    # each chunk is queued by the store in one set-based transaction (outbox, snapshots,
    # progress): no profile passes through here
    while step := store.queue_backfill(flow.name, job.id, segments, tracked, after, chunk):
        after, queued = step
        done += queued
        exported += queued
        if on_progress:
            on_progress(done, max(total, done))
    # A segment mapped again: then the exits this dataflow has not seen, profiles its
    # receiver last saw qualified for it that left it while it was unmapped.
    after = ""
    while job.reason == REMAP_BACKFILL and (
            pids := store.stale_qualified(flow.name, segments, after, chunk)):
        now = now_ms()
        exports = [Export(pid, seq, "backfill", now, qualified)
                   for pid, seq, qualified in store.backfill_rows(pids, tracked)]
        store.enqueue_exports(flow.name, exports, read_at=now)
        after = pids[-1]
        exported += len(exports)
    store.finish_backfill(job.id)
    return exported


def decide_pass(store: Store, config: Config, flow: Dataflow, result: PassResult,
                logger: logging.Logger | logging.LoggerAdapter = log) -> None:
    """Sync the mapping, run open backfills, decide the change log after the cursor."""
    sync(store, config, flow, logger)
    for job in store.open_backfills(flow.name):
        result.backfilled += backfill(store, flow, job)
    for _ in range(MAX_BATCHES_PER_PASS):
        if store.head_seq() <= store.cursor(flow.name):
            break
        try:
            batch = decide_batch(store, flow)
        except CursorMoved:
            logger.warning("%s: another stream run moved the cursor; re-reading", flow.name)
            continue
        if batch is None:
            break
        result.changes += batch.changes
        result.exports += batch.exports
        logger.info("%s: %d change(s) -> %d export(s), cursor %d", flow.name, batch.changes,
                    batch.exports, batch.cursor)


def replay(store: Store, flow: Dataflow, since: int | None = None,
           profiles: Sequence[str] | None = None) -> ReplayPlan:
    """Put the failed store back in the outbox (or its entries failed since ``since``, or
    those of ``profiles``): each profile once, sent with its state at send time (so never
    an older state after a newer one); see ``Store.requeue_failures``."""
    entries = store.open_failures(flow.name, since=since, profiles=profiles)
    resent, superseded = store.requeue_failures(flow.name, entries)
    return ReplayPlan(resent, superseded)


def redeliver(store: Store, flow: Dataflow, now: int | None = None,
              logger: logging.Logger | logging.LoggerAdapter = log) -> int:
    """Put the failed-store entries whose redelivery is due back in the outbox (the
    destination's ``redeliver_after`` schedule), as a replay would; returns how many.
    Never while the dataflow's delivery is paused: they wait for it to resume."""
    if store.breaker(flow.name).paused:
        return 0
    due = store.due_redeliveries(flow.name, now_ms() if now is None else now,
                                 REDELIVERIES_PER_PASS)
    if not due:
        return 0
    resent, superseded = store.requeue_failures(flow.name, due, redelivery=True)
    logger.info("%s: redelivering %d export(s) from the failed store (%d superseded by a "
                "newer state)", flow.name, len(resent), len(superseded))
    return len(resent)


# -- delivering ----------------------------------------------------------------------------------

async def wait_for_changes(store: Store, seen_head: int, until: float,
                           earliest: float = 0.0) -> bool:
    """Sleep until ``until`` (``time.monotonic()``), or until the change log has grown past
    ``seen_head``, but not before ``earliest``; True when it has grown. A change committed while the stream sleeps
    is decided within about ``WAKE_POLL_SECONDS`` instead of waiting out the poll
    interval; one cheap read of the log's head per look, whatever the number of
    dataflows."""
    while (left := until - time.monotonic()) > 0:
        if time.monotonic() >= earliest and store.head_seq() > seen_head:
            return True
        await asyncio.sleep(min(WAKE_POLL_SECONDS, left))
    return False


def has_work(store: Store, flow: Dataflow) -> bool:
    """Whether a pass would do anything now: new changes, an open backfill, or an export
    due. An empty poll, or exports only waiting for their backoff, is not work."""
    try:
        behind = store.head_seq() > store.cursor(flow.name)
    except KeyError:  # a dataflow that has never run
        return True
    if behind or store.open_backfills(flow.name):
        return True
    now = now_ms()
    breaker = store.breaker(flow.name)
    if breaker.paused:  # only a probe can be due
        return (breaker.next_probe_at or 0) <= now and store.next_due(flow.name) is not None
    due = store.next_due(flow.name)
    return (due is not None and due <= now) or bool(store.due_redeliveries(flow.name, now, 1))


async def deliver(store: Store, config: Config, flow: Dataflow, *, wait_due: bool = False,
                  lock_wait: float = 0.0) -> DeliverySummary:
    """One attempt for each export due now. ``wait_due``: when nothing is due yet, first
    wait for the earliest export's next attempt (its backoff or Retry-After). One process
    sends a dataflow at a time: while another one does, wait up to ``lock_wait`` seconds,
    then leave the outbox to it (``busy``)."""
    dest = config.destination(flow.destination)
    policy = RetryPolicy.for_destination(dest)
    # paused: the next probe is probe_seconds away, and the drain knows when
    if wait_due and not store.breaker(flow.name).paused:
        due = store.next_due(flow.name)
        if due is not None and due > now_ms():
            await asyncio.sleep((due - now_ms()) / 1000)
    lock = store.lock_sending(flow.name)
    deadline = time.monotonic() + lock_wait
    while lock is None and time.monotonic() < deadline:
        await asyncio.sleep(LOCK_POLL_SECONDS)
        lock = store.lock_sending(flow.name)
    if lock is None:
        return DeliverySummary(busy=True)
    try:
        spec = body_spec(store, config, flow)
        breaker = Breaker.for_destination(store.breaker(flow.name), dest)
        async with Sender(dest) as sender:
            share = store.scope.share if store.scope is not None else 1.0
            bucket = TokenBucket(rate_limit_for(flow.name, dest, share))
            return await drain(store, flow.name, spec, policy, sender, bucket, dest.max_in_flight,
                               breaker)
    finally:
        lock.release()


async def fill_batch(store: Store, config: Config, flow: Dataflow, result: PassResult,
                     logger: logging.Logger | logging.LoggerAdapter = log) -> None:
    """With batching, while fewer exports than ``batch.max_profiles`` are due, keep
    deciding new changes for up to ``batch.max_wait_ms``, so a quiet moment sends one fuller
    batch rather than a few small ones. Nothing waits when nothing is due."""
    batch = config.destination(flow.destination).batch
    if not batch.enabled or batch.max_wait_ms <= 0:
        return
    deadline = time.monotonic() + batch.max_wait_ms / 1000
    for _ in range(int(batch.max_wait_ms / 1000 / FILL_POLL_SECONDS) + 1):
        left = deadline - time.monotonic()
        if left <= 0 or not 0 < store.pending_count(flow.name) < batch.max_profiles:
            return
        due = store.next_due(flow.name)
        if due is None or due > now_ms():
            return
        await asyncio.sleep(min(FILL_POLL_SECONDS, left))
        for _ in range(MAX_BATCHES_PER_PASS):
            try:
                decided = decide_batch(store, flow)
            except CursorMoved:
                return
            if decided is None:
                break
            result.changes += decided.changes
            result.exports += decided.exports
            logger.info("%s: %d change(s) -> %d export(s), cursor %d (filling a batch)",
                        flow.name, decided.changes, decided.exports, decided.cursor)


async def run_pass(store: Store, config: Config, flow: Dataflow, *, wait_due: bool = False,
                   lock_wait: float = 0.0, fill_wait: bool = False,
                   logger: logging.Logger | logging.LoggerAdapter = log) -> PassResult:
    """One whole pass: decide, then one attempt for each export due. ``fill_wait`` (a
    streaming pass): first wait up to ``batch.max_wait_ms`` to fill a batch."""
    result = PassResult()
    decide_pass(store, config, flow, result, logger)
    result.redelivered = redeliver(store, flow, logger=logger)
    if fill_wait:
        await fill_batch(store, config, flow, result, logger)
    result.delivery = await deliver(store, config, flow, wait_due=wait_due, lock_wait=lock_wait)
    return result


def settled(store: Store, flow: Dataflow) -> bool:
    """Every decided export is delivered or in the failed store."""
    return store.pending_count(flow.name) == 0


async def run_until_settled(store: Store, config: Config, flow: Dataflow,
                            lock_wait: float = 60.0,
                            logger: logging.Logger | logging.LoggerAdapter = log) -> PassResult:
    """Passes until the outbox is empty, waiting for each retry's due time in between.
    Ends: every export has at most ``MAX_ATTEMPTS`` attempts."""
    total = PassResult()
    while True:
        result = await run_pass(store, config, flow, wait_due=True, lock_wait=lock_wait,
                                logger=logger)
        total.add(result)
        if settled(store, flow) or result.delivery.busy or result.delivery.paused:
            return total
