"""A token bucket per caller, per instance: RATE_LIMIT_PER_MINUTE, RATE_LIMIT_BURST.

Each instance counts on its own, so the whole deployment allows at most the per-instance
rate times --max-instances (the README says so). Idle callers are forgotten to bound memory.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from imagegen.errors import ImageGenError

MAX_TRACKED_CALLERS = 10_000


class RateLimited(ImageGenError):
    status = 429
    code = "rate_limited"


class RateLimiter:
    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0  # tokens per second
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, when)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self._rate > 0

    def take(self, caller: str) -> None:
        """Spend one token for `caller`, or raise `RateLimited` saying when one is back."""
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            tokens, when = self._buckets.get(caller, (self._burst, now))
            tokens = min(self._burst, tokens + (now - when) * self._rate)
            if tokens < 1:
                self._buckets[caller] = (tokens, now)
                wait = math.ceil((1 - tokens) / self._rate)
                raise RateLimited(
                    f"Too many images requested: this function allows {self._rate * 60:g} per minute "
                    f"(bursts of {self._burst:g}). Try again in {wait} seconds.",
                    headers={"Retry-After": str(wait)},
                )
            self._buckets[caller] = (tokens - 1, now)
            if len(self._buckets) > MAX_TRACKED_CALLERS:
                self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        full_after = self._burst / self._rate
        for caller, (_, when) in list(self._buckets.items()):
            if now - when >= full_after:  # their bucket is full again: same as never seen
                del self._buckets[caller]
