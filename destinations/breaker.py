"""The circuit breaker: a dataflow whose endpoint keeps failing stops sending.

After ``pause_after_failures`` exports in a row failed for good, delivery pauses: new
exports stay queued (none goes to the failed store while paused), one probe request is
sent every ``probe_seconds``, and the first success resumes delivery. The breaker sees
every verdict of the retry policy as it is made; its state lives in the store, so a pause
outlasts the run that tripped it.
"""

from __future__ import annotations

from config import Destination
from destinations.retry import Verdict
from state.model import BreakerState


class Breaker:
    """One dataflow's breaker during a drain. ``changes`` lists what happened
    ("paused", "resumed"), in order, for the caller to log and announce."""

    def __init__(self, state: BreakerState, pause_after: int, probe_seconds: float) -> None:
        self.state = state
        self.pause_after = pause_after
        self.probe_ms = int(probe_seconds * 1000)
        self.changes: list[str] = []
        self.dirty = False  # state changed since it was loaded

    @classmethod
    def for_destination(cls, state: BreakerState, dest: Destination) -> Breaker:
        return cls(state, dest.pause_after_failures, dest.probe_seconds)

    @property
    def paused(self) -> bool:
        return self.state.paused

    def probe_due(self, now: int) -> bool:
        return self.paused and (self.state.next_probe_at or 0) <= now

    def observe(self, verdict: Verdict, next_at: int, now: int) -> tuple[Verdict, int]:
        """Count a verdict; returns the verdict to record. While paused, an export that
        failed is kept queued, not put in the failed store, and the next probe is due
        ``probe_seconds`` after it."""
        state = self.state
        if verdict == "delivered":
            if state.failures_in_row or state.paused:
                self.dirty = True
            state.failures_in_row = 0
            if state.paused:
                state.paused_at = state.next_probe_at = None
                self.changes.append("resumed")
            return verdict, next_at
        if state.paused:  # a probe, or a request in flight when the breaker tripped
            state.next_probe_at = now + self.probe_ms
            self.dirty = True
            # kept queued, due as soon as delivery resumes (only probes go out till then)
            return "retrying", next_at if verdict == "retrying" else now
        if verdict == "failed":
            state.failures_in_row += 1
            self.dirty = True
            if state.failures_in_row >= self.pause_after:
                state.paused_at = now
                state.next_probe_at = now + self.probe_ms
                self.changes.append("paused")
        return verdict, next_at
