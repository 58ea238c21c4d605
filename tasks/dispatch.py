"""Sending a round of exports: each due export once, bodies rendered at send time.

A fixed pool of sender coroutines pulls exports from a queue while a committer records the
outcomes in groups. A semaphore of ``max_in_flight`` slots is taken before a request is
sent and given back only once its outcome is committed, so sent-but-unrecorded requests
never exceed ``max_in_flight``: a crash re-sends (under the same Idempotency-Key) at most
that many. Whether an outcome is retried, and when, is the retry policy's call
(``destinations.retry``); this module only carries it out.

With batching (``batch.max_profiles`` above 1) a request carries a batch: a sender takes
the next exports of the round, renders each, and cuts the batch at ``max_profiles`` or
before ``max_bytes`` (``tasks.body.fits``). The round holds one export per profile, and
the next round is claimed only once this one's outcomes are committed, so per-profile
order holds across batches. One request is one slot, one rate-limit token, one
Idempotency-Key (``tasks.body.batch_key``) and one signature. The batch's exports share
its verdict: delivered, retried together (the same members, so the same key, as long as
their states did not change), or each put in the failed store. An export that cannot be
rendered (its template fails) goes to the failed store alone, with the error; the others
go on.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

from destinations.breaker import Breaker
from destinations.outcome import Outcome
from destinations.ratelimit import TokenBucket
from destinations.retry import RetryPolicy, Verdict
from destinations.sender import Sender
from state import Store
from state.db import now_ms
from state.model import Attempt, LeaseLost, Pending, ShardScope, StoredProfile
from tasks.body import BodySpec, TemplateError, batch_key, fits, frame, idempotency_key, render
from tasks.lifecycle import unsent_reason

ROUND_SIZE = 5_000
MAX_BATCHED_ROUND = 20_000  # exports claimed at once when batching (profiles held in memory)
COMMIT_GROUP = 0.5  # share of max_in_flight whose outcomes are committed together
# Outcomes are recorded on this thread, never on the event loop: while a group commits, the
# senders keep every other slot busy. One thread: groups commit in the order they were
# judged. Stores give each thread a connection of its own.
_WRITER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="profile-relay-outcomes")
SEQUENCE_HEADER = "X-Relay-Sequence"  # unbatched requests: the change seq of the state sent
BATCH_SIZE_HEADER = "X-Relay-Batch-Size"  # batched requests: how many exports they carry


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a round's profiles are decoded and rendered.
    Those make tens of thousands of acyclic dicts and lists that survive the round; each
    collection would walk the whole heap for nothing (it was most of the time spent
    decoding profiles). Never held across an ``await``."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def round_size(spec: BodySpec, max_in_flight: int) -> int:
    """Exports claimed per round: enough for every slot to carry a full batch, bounded."""
    if not spec.batched:
        return ROUND_SIZE
    want = min(spec.batch.max_profiles * max_in_flight, MAX_BATCHED_ROUND)
    return max(ROUND_SIZE, spec.batch.max_profiles, want)


class _DistinctMs:
    """Epoch ms, never the same twice in this process: a batch's attempt time tells its
    exports apart from another batch's when they wait for a retry (see ``_Batches``)."""

    def __init__(self) -> None:
        self.last = 0

    def __call__(self) -> int:
        self.last = max(now_ms(), self.last + 1)
        return self.last


_batch_clock = _DistinctMs()


def _still_held(scope: ShardScope | None) -> None:
    """Before a request of a shard group: its lease has not run out unrenewed. A run frozen
    (stopped, swapped out) past its lease must not send a state it claimed before the
    takeover, after the new owner sent a newer one."""
    if scope is not None and time.monotonic() > scope.valid_until:
        raise LeaseLost(f"{scope.name}: lease not renewed in time; sending nothing more")


def _unsent(item: Pending, sent_seq: int, key: str, error: str) -> tuple[str, Attempt]:
    """An export that failed for good without a request (its template could not render)."""
    return "failed", Attempt(item, sent_seq, key, None, error, now_ms())


class _Batches:
    """A round's exports, taken a batch at a time, rendered as they are taken.

    Exports waiting for a retry are batched with the ones they were sent with: a batch's
    exports share their attempt count and first attempt time (distinct per batch), so
    they are grouped on that and a retried batch carries the same members in the same
    order, and repeats its Idempotency-Key unless a member's state changed meanwhile.
    Exports never tried make one group. An export rendered but cut off by ``max_bytes``
    stays at the head of its group, rendered, for the next batch."""

    def __init__(self, items: list[Pending], profiles: dict[str, StoredProfile],
                 spec: BodySpec) -> None:
        fresh: deque = deque()
        retried: dict[tuple[int, int | None], deque] = {}
        for item in items:
            if item.attempts == 0:
                fresh.append(item)
            else:
                retried.setdefault((item.attempts, item.first_attempt_at), deque()).append(item)
        self._groups = deque(g for g in (*retried.values(), fresh) if g)
        self._profiles = profiles
        self._spec = spec

    def __bool__(self) -> bool:
        return bool(self._groups)

    def take(self) -> tuple[list[tuple[Pending, StoredProfile, str]], list[bytes],
                            list[tuple[str, Attempt]]]:
        """The next batch: its members (export, profile, key) and their rendered parts,
        and the exports that failed on the way (no profile, template error)."""
        members: list[tuple[Pending, StoredProfile, str]] = []
        parts: list[bytes] = []
        failed: list[tuple[str, Attempt]] = []
        if not self._groups:
            return members, parts, failed
        group = self._groups[0]
        spec = self._spec
        size = 0
        while group:
            head = group[0]
            if not isinstance(head, Pending):  # rendered for the last batch, which it did not fit
                item, profile, key, part = head
            else:
                item = head
                profile = self._profiles[item.profile_id]  # unsent_reason closed the rest
                key = idempotency_key(spec, item.profile_id, profile.last_seq)
                try:
                    part = render(profile, spec)
                except TemplateError as exc:
                    group.popleft()
                    failed.append(_unsent(item, profile.last_seq, key, f"template: {exc}"))
                    continue
            if not fits(size, len(parts), len(part), spec):
                group[0] = (item, profile, key, part)
                break
            group.popleft()
            members.append((item, profile, key))
            parts.append(part)
            size += len(part)
        if not group:
            self._groups.popleft()
        return members, parts, failed


@dataclass
class DeliverySummary:
    sent: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    last_error: str | None = None
    busy: bool = False  # another process was sending this dataflow
    paused: bool = False  # the circuit breaker holds delivery (at the end of the drain)
    breaker: list[str] = field(default_factory=list)  # "paused", "resumed", in order

    def add(self, other: DeliverySummary) -> None:
        self.sent += other.sent
        self.delivered += other.delivered
        self.retrying += other.retrying
        self.failed += other.failed
        self.last_error = other.last_error or self.last_error
        self.busy = self.busy or other.busy
        self.paused = other.paused
        self.breaker += other.breaker

    def as_dict(self) -> dict[str, int | str | bool | None]:
        return asdict(self)


@dataclass
class _Chunk:
    """Exports claimed together, with their profiles loaded, ready to send."""

    items: list[Pending]
    profiles: dict[str, StoredProfile]
    last_fresh_seq: int | None  # the newest never-tried export claimed; the next starts after


def _claim_chunk(store: Store, dataflow: str, spec: BodySpec, limit: int,
                 tried_before: int | None, after_seq: int | None, busy: set[str],
                 now: int | None = None) -> _Chunk | None:
    """Claim the next exports due and load their profiles; runs on the writer thread, so
    the loop keeps sending meanwhile. Exports of ``busy`` profiles (in a chunk still being
    sent) are left to a later pass: one request per profile at a time keeps deliveries in
    order. None when nothing is due.

    Closed without a request, counted per reason (``tasks.lifecycle.unsent_reason``): a
    streamed state already delivered (a backfill is sent regardless: it was asked for), a
    profile with neither identities nor mapped attributes, a profile forgotten meanwhile.
    ``now``: claim as if it were then (a probe takes the oldest export, due or not)."""
    claimed = store.claim_due(dataflow, now_ms() if now is None else now, limit,
                              tried_before=tried_before, after_seq=after_seq)
    if not claimed:
        return None
    last_fresh = max((i.seq for i in claimed if i.attempts == 0), default=after_seq)
    items = [i for i in claimed if i.profile_id not in busy]
    with paused_gc():
        profiles = store.load_profiles([i.profile_id for i in items])
    skipped: dict[str, list[Pending]] = {}
    for i in items:
        why = unsent_reason(i, profiles.get(i.profile_id), spec.attribute_paths)
        if why is not None:
            skipped.setdefault(why, []).append(i)
    for why, closed in skipped.items():
        store.record_outcomes(dataflow, [], [], [], closed, skip_reason=why)
    if skipped:
        done = {i.profile_id for closed in skipped.values() for i in closed}
        items = [i for i in items if i.profile_id not in done]
    return _Chunk(items, profiles, last_fresh)


class _Recorder:
    """Commits outcomes on the writer thread, in groups, for every chunk of a drain.

    A request takes one of ``max_in_flight`` slots before it is sent and gives it back only
    once its outcome is committed, so requests sent but not recorded never exceed
    ``max_in_flight``: a crash re-sends (under the same Idempotency-Key) at most that many.
    A group is committed at ``COMMIT_GROUP`` of the slots, when every slot waits for a
    commit, or at the end; while one commits, the senders fill the next."""

    def __init__(self, store: Store, dataflow: str, max_in_flight: int) -> None:
        self.store = store
        self.dataflow = dataflow
        self.slots = asyncio.Semaphore(max_in_flight)
        self.summary = DeliverySummary()
        # one entry per slot: a request's exports, or exports failed before any request
        self._pending: list[list[tuple[str, Attempt]]] = []
        self._group = max(1, int(max_in_flight * COMMIT_GROUP))
        self._wake = asyncio.Event()
        self._closing = False
        self._added = self._committed = 0  # entries, in the order they were added
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []

    def add(self, entry: list[tuple[str, Attempt]]) -> None:
        """The outcome of one slot's request (its slot is given back once committed)."""
        self._pending.append(entry)
        self._added += 1
        if len(self._pending) >= self._group or self.slots.locked():
            self._wake.set()

    async def flushed(self) -> None:
        """Wait until every outcome added so far is committed (sooner than its group would
        be): until then its exports still look due in the store."""
        if self._committed >= self._added:
            return
        done = asyncio.get_running_loop().create_future()
        self._flushes.append((self._added, done))
        self._wake.set()
        await done

    def close(self) -> None:
        """No more outcomes: commit what is left, then ``run`` returns."""
        self._closing = True
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        summary = self.summary
        while True:
            pending = self._pending
            if pending and (self._closing or self._flushes or len(pending) >= self._group
                            or self.slots.locked()):
                self._pending = []
                by_verdict: dict[str, list[Attempt]] = {"delivered": [], "retrying": [],
                                                        "failed": []}
                for entry in pending:
                    for verdict, attempt in entry:
                        by_verdict[verdict].append(attempt)
                        if attempt.error:
                            summary.last_error = attempt.error
                await loop.run_in_executor(
                    _WRITER, self.store.record_outcomes, self.dataflow, by_verdict["delivered"],
                    by_verdict["retrying"], by_verdict["failed"])
                summary.delivered += len(by_verdict["delivered"])
                summary.retrying += len(by_verdict["retrying"])
                summary.failed += len(by_verdict["failed"])
                for _ in pending:
                    self.slots.release()
                self._committed += len(pending)
                still = []
                for upto, done in self._flushes:
                    if upto <= self._committed:
                        if not done.done():
                            done.set_result(None)
                    else:
                        still.append((upto, done))
                self._flushes = still
            elif self._closing:
                return
            else:
                await self._wake.wait()
                self._wake.clear()


async def send_chunk(spec: BodySpec, policy: RetryPolicy, sender: Sender, bucket: TokenBucket,
                     recorder: _Recorder, max_in_flight: int, chunk: _Chunk,
                     handed_out: asyncio.Event, breaker: Breaker | None = None) -> None:
    """Send each export of the chunk once, handing the outcomes to ``recorder``; returns
    once they are committed. ``handed_out`` is set once every export was taken by a
    sender, so the next chunk can be claimed while this one's last requests are in flight
    (its profiles are left out of that claim until this returns). With a ``breaker``,
    every verdict goes through it, and once it pauses delivery no further export of the
    chunk is sent (they stay queued); a probe is a chunk of one sent while paused."""
    items, profiles = chunk.items, chunk.profiles
    probing = breaker is not None and breaker.paused

    def judge(outcome: Outcome, item: Pending, at: int) -> tuple[Verdict, int]:
        verdict, next_at = policy.judge(outcome, item.attempts, at, item.redelivery)
        if breaker is not None:
            return breaker.observe(verdict, next_at, at)
        return verdict, next_at

    def halted() -> bool:
        """The breaker tripped during this chunk: leave the rest queued."""
        return breaker is not None and not probing and breaker.paused
    slots = recorder.slots
    scope = recorder.store.scope
    recorder.summary.sent += len(items)

    def judged(item: Pending, profile: StoredProfile, outcome: Outcome,
               key: str) -> tuple[str, Attempt]:
        at = now_ms()
        verdict, next_at = judge(outcome, item, at)
        return verdict, Attempt(item, profile.last_seq, key, outcome.status, outcome.error, at,
                                next_at)

    queue = deque(items)

    async def worker() -> None:
        """One export per request."""
        while queue and not halted():
            item = queue.popleft()
            if not queue:
                handed_out.set()
            await slots.acquire()
            profile = profiles[item.profile_id]  # unsent_reason closed the rest
            key = idempotency_key(spec, item.profile_id, profile.last_seq)
            try:
                body = render(profile, spec)
            except TemplateError as exc:
                recorder.add([_unsent(item, profile.last_seq, key, f"template: {exc}")])
            else:
                await bucket.acquire()
                _still_held(scope)
                outcome = await sender.send(body, key, {SEQUENCE_HEADER: str(profile.last_seq)})
                recorder.add([judged(item, profile, outcome, key)])

    batches = _Batches(items, profiles, spec) if spec.batched else None

    async def batch_worker() -> None:
        """One batch per request."""
        assert batches is not None
        while batches and not halted():
            await slots.acquire()
            with paused_gc():
                members, parts, done = batches.take()
            if not batches:
                handed_out.set()
            if members:
                key = batch_key(spec, [k for _, _, k in members])
                body = frame(parts, spec)
                del parts
                await bucket.acquire()
                _still_held(scope)
                outcome = await sender.send(body, key, {BATCH_SIZE_HEADER: str(len(members))})
                at = _batch_clock()
                verdict, next_at = judge(outcome, members[0][0], at)
                with paused_gc():
                    done += [(verdict, Attempt(item, profile.last_seq, key, outcome.status,
                                               outcome.error, at, next_at))
                             for item, profile, _ in members]
            if not done:  # another sender took the last exports meanwhile
                slots.release()
                continue
            recorder.add(done)

    sender_task = batch_worker if batches is not None else worker
    try:
        await asyncio.gather(*(sender_task() for _ in range(min(max_in_flight, len(items)))))
    finally:
        handed_out.set()
    await recorder.flushed()


PROBE_CLAIMS = 10  # a probe looks this far for an export that is really sent
_ANY_TIME = 2**62  # a probe's claim: the oldest export, whenever it is due


async def drain(store: Store, dataflow: str, spec: BodySpec, policy: RetryPolicy,
                sender: Sender, bucket: TokenBucket, max_in_flight: int,
                breaker: Breaker | None = None) -> DeliverySummary:
    """Send everything due, chunk after chunk, each export at most once per drain. The
    next chunk is claimed and loaded (on the writer thread) as soon as every export of the
    last one was taken by a sender, and sent while the last one's requests finish, so the
    senders never wait for the store between chunks.

    With a ``breaker`` (``destinations.breaker``): while it holds delivery paused, a drain
    sends nothing but, once ``probe_seconds`` have passed, one probe (the oldest export);
    its success resumes delivery and the drain goes on. A breaker that trips mid-drain
    stops it; its state is saved in the store at the end."""
    loop = asyncio.get_running_loop()
    started = now_ms()
    if breaker is not None and breaker.paused and not breaker.probe_due(started):
        return DeliverySummary(paused=True)
    limit = round_size(spec, max_in_flight)
    recorder = _Recorder(store, dataflow, max_in_flight)
    running: dict[asyncio.Task[None], set[str]] = {}
    after_seq: int | None = None

    def start(chunk: _Chunk) -> tuple[asyncio.Task[None], asyncio.Event]:
        handed_out = asyncio.Event()
        task = asyncio.create_task(send_chunk(spec, policy, sender, bucket, recorder,
                                              max_in_flight, chunk, handed_out, breaker))
        running[task] = set(chunk.profiles)
        task.add_done_callback(running.pop)
        return task, handed_out

    async def probe() -> None:
        for _ in range(PROBE_CLAIMS):  # the first claimed may be closed unsent
            chunk = await loop.run_in_executor(_WRITER, _claim_chunk, store, dataflow, spec,
                                               1, None, None, set(), _ANY_TIME)
            if chunk is None:
                return
            if chunk.items:
                task, _ = start(chunk)
                await task
                return

    async def feed() -> None:
        nonlocal after_seq
        try:
            if breaker is not None and breaker.paused:
                await probe()
            while breaker is None or not breaker.paused:
                # ends: each export is claimed at most once per drain (tried_before)
                busy = set().union(*running.values())
                chunk = await loop.run_in_executor(_WRITER, _claim_chunk, store, dataflow,
                                                   spec, limit, started, after_seq, busy)
                if chunk is None:
                    break
                after_seq = chunk.last_fresh_seq
                if not chunk.items:
                    continue
                task, handed_out = start(chunk)
                waiter = asyncio.ensure_future(handed_out.wait())
                await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if task.done():
                    task.result()  # a failed chunk ends the drain with its error
            for task in list(running):
                await task
        finally:
            recorder.close()

    async with asyncio.TaskGroup() as tasks:  # a failing commit cancels the senders
        tasks.create_task(recorder.run())
        tasks.create_task(feed())
    summary = recorder.summary
    if breaker is not None:
        summary.paused, summary.breaker = breaker.paused, list(breaker.changes)
        if breaker.dirty:
            await loop.run_in_executor(_WRITER, store.save_breaker, dataflow, breaker.state)
    return summary
