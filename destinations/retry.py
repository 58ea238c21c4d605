"""The one retry policy: whether an outcome is tried again, and when.

Every export gets at most ``MAX_ATTEMPTS`` attempts: the first, and the two retries that
the dispatch task's ``retries=2`` stands for. After a retryable outcome (connection error,
timeout, 408, 429, 5xx: see ``destinations.outcome.classify_status``) the next attempt is
due after an exponential backoff with equal jitter (half the step fixed, half random), or
after the endpoint's ``Retry-After`` when that is longer (capped). The outbox keeps that
time on the export; the dispatcher only sends what is due. An export that failed for good
goes to the failed store, and comes back from it on the destination's ``redeliver_after``
schedule (each redelivery with its three attempts).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from config import Destination
from destinations.outcome import Outcome

MAX_ATTEMPTS = 3
DISPATCH_RETRIES = MAX_ATTEMPTS - 1

Verdict = Literal["delivered", "retrying", "failed"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    backoff_seconds: float = 1.0
    max_retry_after_seconds: float = 60.0
    max_attempts: int = MAX_ATTEMPTS
    # seconds after which an export that failed for good is tried again (its n-th
    # redelivery after the n-th delay); after the last it waits for a replay by hand
    redeliver_after: tuple[float, ...] = ()

    @classmethod
    def for_destination(cls, dest: Destination) -> RetryPolicy:
        return cls(dest.retry_backoff_seconds, dest.max_retry_after_seconds,
                   redeliver_after=tuple(dest.redeliver_after))

    def redelivery_at(self, redelivery: int, now: int) -> int:
        """When an export that failed for good after ``redelivery`` redeliveries is
        redelivered (epoch ms), or 0 when the schedule is spent."""
        if redelivery >= len(self.redeliver_after):
            return 0
        return now + int(self.redeliver_after[redelivery] * 1000)

    def backoff_ms(self, attempt: int, retry_after: float | None) -> int:
        """Wait before attempt ``attempt + 1``: base * 2^(attempt-1), equal jitter, never
        shorter than Retry-After (itself capped at ``max_retry_after_seconds``)."""
        step = self.backoff_seconds * (2 ** max(0, attempt - 1))
        wait = step * (0.5 + random.random() / 2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after_seconds))
        return int(wait * 1000)

    def judge(self, outcome: Outcome, attempts_before: int, now: int,
              redelivery: int = 0) -> tuple[Verdict, int]:
        """The verdict on an attempt, and when the next one is due: the retry, or for an
        export that failed for good its redelivery from the failed store (0: none)."""
        if outcome.kind == "delivered":
            return "delivered", 0
        attempt = attempts_before + 1
        if outcome.kind == "retryable" and attempt < self.max_attempts:
            return "retrying", now + self.backoff_ms(attempt, outcome.retry_after)
        return "failed", self.redelivery_at(redelivery, now)

    def task_retry_delays(self) -> list[float]:
        """The shortest wait before each retry of the dispatch task (the jitter-free half
        of the backoff), so Prefect's "retry in N s" says what happens; the rest of each
        export's own wait (jitter, Retry-After) is taken when the retry starts."""
        return [self.backoff_seconds * (2 ** (n - 1)) / 2 for n in range(1, self.max_attempts)]
