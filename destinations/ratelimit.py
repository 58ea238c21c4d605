"""In-process request rate limiting per dataflow.

Prefect's global rate limits cost 10 to 150 ms a call through its server, far
too slow at 10,000 requests/s, so each dataflow's sender pulls from a token bucket here.
"""

from __future__ import annotations

import asyncio

from config import MAX_RATE_LIMIT, Destination


class TokenBucket:
    """An async token bucket that holds ``rate`` acquisitions a second.

    Waiters reserve their slot by taking the balance below zero and sleep once until that
    slot's time, so there is no per-token polling and no lock, and the schedule is kept on
    the loop clock: late wake-ups do not accumulate into a lower rate. ``burst`` (default
    1 % of a second's worth, at least 1) is how many may pass at once after an idle spell.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate / 100)
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        self._tokens = self.burst
        self._last: float | None = None

    async def acquire(self) -> None:
        """Wait until one more request may start."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._last is None:
            self._last = now
        tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens = tokens - 1
        if tokens >= 1:
            return
        try:
            await asyncio.sleep((1 - tokens) / self.rate)
        except asyncio.CancelledError:
            self._tokens += 1  # hand the reserved slot back
            raise


def rate_limit_for(dataflow_name: str, dest: Destination, share: float = 1.0) -> float:
    """The requests/s a dataflow may send: THE one place its limit is read.

    ``share`` is this process's part of the dataflow's limit (1.0 on one machine; a worker
    owning some of the shards would get its fraction). ``dataflow_name`` is the seam for
    per-dataflow limits; today every dataflow to a destination gets the destination's.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    return min(float(dest.rate_limit), float(MAX_RATE_LIMIT)) * share
