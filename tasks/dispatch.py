"""Dispatch: drain a dataflow's outbox over HTTP.

One classification (``destinations.outcome``) drives everything: delivered exports go to
the delivery log, retryable ones stay in the outbox with their attempt count and the time
of their next attempt, and final ones (a non-retryable 4xx, or the third failed attempt)
move to the failed-request store. The Prefect task's own ``retries=2`` is the only retry
layer: a task run sends each due export once and raises ``RetryableDelivery`` when some
are left to retry, so the retry re-sends only what is still pending.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from dataclasses import dataclass

import sqlite_utils
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from destinations.config import Destination
from destinations.outcome import Outcome
from destinations.ratelimit import TokenBucket, rate_limit_for
from destinations.sender import Sender
from state import outbox
from state.db import now_ms

MAX_ATTEMPTS = 3
ROUND_SIZE = 5_000
COMMIT_GROUP = 0.5  # share of max_in_flight whose outcomes are committed together
SEQUENCE_HEADER = "X-Relay-Sequence"
LOCK_POLL_SECONDS = 0.05  # how often a waiting dispatcher asks for the send lock again


class RetryableDelivery(Exception):
    """Some exports failed in a retryable way; the dispatch task's retry will re-send them."""

    def __init__(self, pending: int, last_error: str | None) -> None:
        self.pending = pending
        super().__init__(f"{pending} export(s) to retry; last error: {last_error}")


@dataclass
class DispatchSummary:
    sent: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    last_error: str | None = None

    def add(self, other: DispatchSummary) -> None:
        self.sent += other.sent
        self.delivered += other.delivered
        self.retried += other.retried
        self.failed += other.failed
        self.last_error = other.last_error or self.last_error


def backoff_ms(dest: Destination, attempts: int, retry_after: float | None) -> int:
    """Exponential backoff with full jitter, never shorter than Retry-After (capped)."""
    base = dest.retry_backoff_seconds * (2 ** max(0, attempts - 1))
    wait = base * (0.5 + random.random() / 2)
    if retry_after is not None:
        wait = max(wait, min(retry_after, dest.max_retry_after_seconds))
    return int(wait * 1000)


def _judge(item: outbox.Pending, outcome: Outcome, dest: Destination,
           at: int) -> tuple[str, outbox.Attempt]:
    if outcome.kind == "delivered":
        return "delivered", outbox.Attempt(item, outcome.status, None, at)
    if outcome.kind == "retryable" and item.attempts + 1 < MAX_ATTEMPTS:
        wait = backoff_ms(dest, item.attempts + 1, outcome.retry_after)
        return "retrying", outbox.Attempt(item, outcome.status, outcome.error, at, at + wait)
    return "failed", outbox.Attempt(item, outcome.status, outcome.error, at)


async def send_round(db: sqlite_utils.Database, flow_name: str, dest: Destination,
                     sender: Sender, bucket: TokenBucket,
                     items: list[outbox.Pending]) -> DispatchSummary:
    """Send each item once through a fixed pool of workers while a committer records the
    outcomes in groups as they come in.

    A semaphore of ``max_in_flight`` slots is taken before a request is sent and given
    back only once its outcome is committed: sent-but-unrecorded exports never exceed
    ``max_in_flight``, so a crash re-sends (as duplicates under the same Idempotency-Key)
    at most that many. A group is committed when it reaches ``COMMIT_GROUP`` of the slots,
    or when every slot waits for a commit."""
    results: dict[str, list[outbox.Attempt]] = {"delivered": [], "retrying": [], "failed": []}
    summary = DispatchSummary()
    queue = deque(items)
    slots = asyncio.Semaphore(dest.max_in_flight)
    pending: list[tuple[str, outbox.Attempt]] = []
    wake = asyncio.Event()
    finished = False
    group = max(1, int(dest.max_in_flight * COMMIT_GROUP))

    async def worker() -> None:
        while queue:
            item = queue.popleft()
            await slots.acquire()
            await bucket.acquire()
            outcome = await sender.send(item.body, item.idempotency_key,
                                        {SEQUENCE_HEADER: str(item.seq)})
            pending.append(_judge(item, outcome, dest, now_ms()))
            if outcome.error:
                summary.last_error = outcome.error
            if len(pending) >= group or slots.locked():
                wake.set()

    async def committer() -> None:
        while True:
            if pending and (finished or len(pending) >= group or slots.locked()):
                batch = pending[:]
                pending.clear()
                by_kind: dict[str, list[outbox.Attempt]] = {k: [] for k in results}
                for kind, attempt in batch:
                    by_kind[kind].append(attempt)
                outbox.record(db, flow_name, by_kind["delivered"], by_kind["retrying"],
                              by_kind["failed"])
                for kind, attempts in by_kind.items():
                    results[kind] += attempts
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
        await asyncio.gather(*(worker() for _ in range(min(dest.max_in_flight, len(items)))))
        finished = True
        wake.set()

    async with asyncio.TaskGroup() as tasks:  # a failing commit cancels the senders
        tasks.create_task(committer())
        tasks.create_task(send_all())
    summary.sent = len(items)
    summary.delivered = len(results["delivered"])
    summary.retried = len(results["retrying"])
    summary.failed = len(results["failed"])
    return summary


async def drain(db: sqlite_utils.Database, flow_name: str, dest: Destination,
                sender: Sender, bucket: TokenBucket,
                shards: tuple[int, int] | None = None) -> DispatchSummary:
    """Send everything due, round after round, each export at most once: a retry is the
    dispatch task's next run, never a loop in here."""
    total = DispatchSummary()
    started = now_ms()
    while items := outbox.due(db, flow_name, now_ms(), ROUND_SIZE, shards, tried_before=started):
        summary = await send_round(db, flow_name, dest, sender, bucket, items)
        total.add(summary)
    return total


async def wait_until_due(db: sqlite_utils.Database, flow_name: str, dest: Destination) -> None:
    """Honour Retry-After and backoff recorded on pending exports (capped)."""
    first = outbox.next_due(db, flow_name)
    if first is not None:
        delay = min((first - now_ms()) / 1000, dest.max_retry_after_seconds)
        if delay > 0:
            await asyncio.sleep(delay)


def _is_retryable(task_obj: object, task_run: object, state: object) -> bool:
    return isinstance(getattr(state, "data", None), RetryableDelivery)


@task(name="dispatch", retries=2, retry_delay_seconds=0, retry_jitter_factor=None,
      retry_condition_fn=_is_retryable, cache_policy=NO_CACHE)
async def dispatch_task(db: sqlite_utils.Database, flow_name: str, dest: Destination,
                        shards: tuple[int, int] | None = None,
                        wait_seconds: float = 0.0) -> dict[str, int | str | None]:
    """Drain the outbox once; raise RetryableDelivery so Prefect retries what is left.

    The wait between task retries is each export's own backoff (with Retry-After), taken
    at the start of the retry, so the delay is per export rather than fixed on the task.
    Only one process sends a dataflow at a time: when another one is sending (a stream
    run and a replay, say), this waits up to ``wait_seconds`` for it and otherwise
    returns with ``busy`` set, leaving the outbox to that sender."""
    ctx = TaskRunContext.get()
    run_count = ctx.task_run.run_count if ctx else 1
    if run_count > 1:
        await wait_until_due(db, flow_name, dest)
    lock = outbox.try_lock_sending(db, flow_name, shards)
    deadline = time.monotonic() + wait_seconds
    while lock is None and time.monotonic() < deadline:
        await asyncio.sleep(LOCK_POLL_SECONDS)
        lock = outbox.try_lock_sending(db, flow_name, shards)
    if lock is None:
        return {"sent": 0, "delivered": 0, "failed": 0, "last_error": None, "busy": 1}
    try:
        async with Sender(dest) as sender:
            bucket = TokenBucket(rate_limit_for(flow_name, dest))
            summary = await drain(db, flow_name, dest, sender, bucket, shards=shards)
    finally:
        lock.release()
    left = outbox.pending_count(db, flow_name)
    if summary.retried and left:
        raise RetryableDelivery(left, summary.last_error)
    return {"sent": summary.sent, "delivered": summary.delivered, "failed": summary.failed,
            "last_error": summary.last_error}
