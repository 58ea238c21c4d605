"""Sending a round of exports: each due export once, bodies rendered at send time.

A fixed pool of sender coroutines pulls exports from a queue while a committer records the
outcomes in groups. A semaphore of ``max_in_flight`` slots is taken before a request is
sent and given back only once its outcome is committed, so sent-but-unrecorded exports
never exceed ``max_in_flight``: a crash re-sends (under the same Idempotency-Key) at most
that many. Whether an outcome is retried, and when, is the retry policy's call
(``destinations.retry``); this module only carries it out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import asdict, dataclass

from destinations.outcome import Outcome
from destinations.ratelimit import TokenBucket
from destinations.retry import RetryPolicy
from destinations.sender import Sender
from state import Store
from state.db import now_ms
from state.model import Attempt, Pending, StoredProfile
from tasks.body import BodySpec, idempotency_key, render

ROUND_SIZE = 5_000
COMMIT_GROUP = 0.5  # share of max_in_flight whose outcomes are committed together
SEQUENCE_HEADER = "X-Relay-Sequence"
MISSING_PROFILE = "the profile is no longer in the store"


@dataclass
class DeliverySummary:
    sent: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    last_error: str | None = None
    busy: bool = False  # another process was sending this dataflow

    def add(self, other: DeliverySummary) -> None:
        self.sent += other.sent
        self.delivered += other.delivered
        self.retrying += other.retrying
        self.failed += other.failed
        self.last_error = other.last_error or self.last_error
        self.busy = self.busy or other.busy

    def as_dict(self) -> dict[str, int | str | bool | None]:
        return asdict(self)


async def send_round(store: Store, dataflow: str, spec: BodySpec, policy: RetryPolicy,
                     sender: Sender, bucket: TokenBucket, max_in_flight: int,
                     items: list[Pending]) -> DeliverySummary:
    """Send each item once; outcomes are committed in groups as they come in (a group is
    committed at ``COMMIT_GROUP`` of the slots, or when every slot waits for a commit)."""
    profiles = store.load_profiles([i.profile_id for i in items])
    # Sending renders the profile's state now, which may be newer than the change that
    # queued a streamed export; when that state has been delivered already there is
    # nothing new to say. A backfill is sent regardless: it was asked for.
    skipped = [i for i in items if i.reason != "backfill"
               and (p := profiles.get(i.profile_id)) is not None and p.last_seq <= i.delivered_seq]
    if skipped:
        store.record_outcomes(dataflow, [], [], [], skipped)
        done = {i.profile_id for i in skipped}
        items = [i for i in items if i.profile_id not in done]
    summary = DeliverySummary(sent=len(items))
    queue = deque(items)
    slots = asyncio.Semaphore(max_in_flight)
    pending: list[tuple[str, Attempt]] = []
    wake = asyncio.Event()
    finished = False
    group = max(1, int(max_in_flight * COMMIT_GROUP))

    def judged(item: Pending, profile: StoredProfile | None, outcome: Outcome | None,
               key: str) -> tuple[str, Attempt]:
        at = now_ms()
        sent_seq = profile.last_seq if profile is not None else item.seq
        if outcome is None:
            return "failed", Attempt(item, sent_seq, key, None, MISSING_PROFILE, at)
        verdict, next_at = policy.judge(outcome, item.attempts, at)
        return verdict, Attempt(item, sent_seq, key, outcome.status, outcome.error, at, next_at)

    async def worker() -> None:
        while queue:
            item = queue.popleft()
            await slots.acquire()
            profile = profiles.get(item.profile_id)
            if profile is None:
                pending.append(judged(item, None, None, ""))
            else:
                await bucket.acquire()
                key = idempotency_key(spec, item.profile_id, profile.last_seq)
                outcome = await sender.send(render(profile, spec), key,
                                            {SEQUENCE_HEADER: str(profile.last_seq)})
                pending.append(judged(item, profile, outcome, key))
            if len(pending) >= group or slots.locked():
                wake.set()

    async def committer() -> None:
        while True:
            if pending and (finished or len(pending) >= group or slots.locked()):
                batch = pending[:]
                pending.clear()
                by_verdict: dict[str, list[Attempt]] = {"delivered": [], "retrying": [],
                                                        "failed": []}
                for verdict, attempt in batch:
                    by_verdict[verdict].append(attempt)
                    if attempt.error:
                        summary.last_error = attempt.error
                store.record_outcomes(dataflow, by_verdict["delivered"], by_verdict["retrying"],
                                      by_verdict["failed"])
                summary.delivered += len(by_verdict["delivered"])
                summary.retrying += len(by_verdict["retrying"])
                summary.failed += len(by_verdict["failed"])
                for _ in batch:
                    slots.release()
                await asyncio.sleep(0)  # let the senders run between commits
            elif finished:
                return
            else:
                await wake.wait()
                wake.clear()

    async def send_all() -> None:
        nonlocal finished
        await asyncio.gather(*(worker() for _ in range(min(max_in_flight, len(items)))))
        finished = True
        wake.set()

    async with asyncio.TaskGroup() as tasks:  # a failing commit cancels the senders
        tasks.create_task(committer())
        tasks.create_task(send_all())
    return summary


async def drain(store: Store, dataflow: str, spec: BodySpec, policy: RetryPolicy,
                sender: Sender, bucket: TokenBucket, max_in_flight: int) -> DeliverySummary:
    """Send everything due, round after round, each export at most once per drain."""
    total = DeliverySummary()
    started = now_ms()
    while items := store.claim_due(dataflow, now_ms(), ROUND_SIZE, tried_before=started):
        total.add(await send_round(store, dataflow, spec, policy, sender, bucket,
                                   max_in_flight, items))
    return total
