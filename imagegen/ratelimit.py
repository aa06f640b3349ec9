"""A token bucket per caller, per instance: RATE_LIMIT_PER_MINUTE, RATE_LIMIT_BURST.

Each instance counts on its own, so the whole deployment allows at most the per-instance
rate times --max-instances (the README says so). Idle callers are forgotten to bound memory:
buckets are kept in order of last use, so the idle ones are always at the front and forgetting
them costs O(1) per call, amortised, however many callers are tracked (a scan of every caller
on every call took 1.9 ms at 50,000, under the lock every request takes).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
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
        # caller -> (tokens, when), least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
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
            self._buckets[caller] = (tokens, now)
            self._buckets.move_to_end(caller)
            if tokens < 1:
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
        """Drop callers whose bucket is full again (same as never seen), oldest first.

        The front is the least recently used: once it is not idle, no one behind it is. Each
        caller is dropped at most once per time it was added, so the work is O(1) amortised.
        """
        full_after = self._burst / self._rate
        while self._buckets:
            caller, (_, when) = next(iter(self._buckets.items()))
            if now - when < full_after:
                return
            del self._buckets[caller]
