"""A token bucket per caller, per instance: RATE_LIMIT_PER_MINUTE, RATE_LIMIT_BURST.

Each instance counts on its own, so without STATE_URL the whole deployment allows at most the
per-instance rate times --max-instances; with it, imagegen.state.redis runs the same bucket in
Redis for all of them. Idle callers are forgotten to bound memory: buckets are kept in order
of last use, so the idle ones are always at the front and forgetting them costs O(1) per call,
amortised, however many callers are tracked (a scan of every caller on every call took 1.9 ms
at 50,000, under the lock every request takes).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from imagegen.errors import RateLimited
from imagegen.state.base import RateDecision

MAX_TRACKED_CALLERS = 10_000


def rate_limited(per_minute: float, burst: float, decision: RateDecision) -> RateLimited:
    """The one wording of a refusal, whichever implementation counted."""
    wait = decision.retry_after
    error = RateLimited(
        f"Too many images requested: this function allows {per_minute:g} per minute "
        f"(bursts of {burst:g}). Try again in {wait} seconds.",
        headers={"Retry-After": str(wait)},
    )
    error.decision = decision
    return error


def bucket_decision(tokens: float, burst: float, rate: float, refused: bool) -> RateDecision:
    """The decision for a bucket left holding `tokens` (after the request's token is taken)."""
    return RateDecision(
        limit=int(burst),
        remaining=max(0, math.floor(tokens)),
        reset_seconds=max(0, math.ceil((burst - tokens) / rate)),
        retry_after=math.ceil((1 - tokens) / rate) if refused else None,
    )


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

    def take(self, caller: str) -> RateDecision | None:
        """Spend one token for `caller`: what is left (None when no limit is set), or raise
        `RateLimited` saying when one is back."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            tokens, when = self._buckets.get(caller, (self._burst, now))
            tokens = min(self._burst, tokens + (now - when) * self._rate)
            self._buckets[caller] = (tokens, now)
            self._buckets.move_to_end(caller)
            if tokens < 1:
                raise rate_limited(self._rate * 60, self._burst, bucket_decision(tokens, self._burst, self._rate, True))
            self._buckets[caller] = (tokens - 1, now)
            if len(self._buckets) > MAX_TRACKED_CALLERS:
                self._forget_idle(now)
        return bucket_decision(tokens - 1, self._burst, self._rate, False)

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
