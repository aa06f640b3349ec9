"""What every shared-state implementation offers, and the small values it hands back.

The request pipeline asks three things of the state, in this order, and only for requests
that will reach a backend (a cached answer asks nothing):

    decision = state.take_rate(caller)        # RateLimited (429) when over the per-caller rate
    reservation = state.reserve(caller)       # BudgetExhausted (429) when a daily budget is spent
    result, shared = state.single_flight(...) # one generation per identical seeded request
    state.refund(reservation)                 # only when the generation failed upstream

`MemoryState` (memory.py) answers for this instance alone; `RedisState` (redis.py) for every
instance that shares one Redis. Both raise the same errors with the same words.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from imagegen.errors import BudgetExhausted, ImageGenError

T = TypeVar("T")

SECONDS_PER_DAY = 86_400
# The name of the per-caller policy in the RateLimit-Policy and RateLimit headers.
RATE_POLICY_NAME = "caller"


@dataclass(frozen=True)
class RateDecision:
    """The per-caller token bucket after one request: what the RateLimit header reports.

    `limit` is the bucket's size (RATE_LIMIT_BURST), `remaining` the whole requests left in it,
    `reset_seconds` the time until it is full again, and `retry_after` (only when refused)
    the time until one request is allowed.
    """

    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int | None = None


@dataclass(frozen=True)
class RatePolicy:
    """RATE_LIMIT_PER_MINUTE and RATE_LIMIT_BURST: a bucket of `burst` that refills at the rate."""

    per_minute: float
    burst: int

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    @property
    def window_seconds(self) -> int:
        """How long an empty bucket takes to fill: the window the quota of `burst` is given in."""
        return max(1, math.ceil(self.burst * 60 / self.per_minute))


@dataclass(frozen=True)
class Reservation:
    """One image counted against today's budgets; `refund` gives it back.

    `day` is the UTC day it counts against (Unix seconds // 86400): a refund after midnight
    gives nothing back, because the counters started over. `where` says which implementation
    counted it ("memory" or "redis"): a unit counted locally while Redis was down is refunded
    locally. `counted` is False when no budget is set, and then a refund does nothing.
    """

    caller: str
    day: int
    counted: bool
    where: str = "memory"
    epoch: str = ""  # the Redis budget record it was counted in: a refund to another gives nothing


class SharedState(Protocol):
    """Rate limit, daily budgets and single-flight; for this instance or for all of them."""

    def take_rate(self, caller: str) -> RateDecision | None:
        """Spend one request of `caller`'s rate: the decision (None when no limit is set), or
        `RateLimited` (429, Retry-After) carrying the refusing decision as `.decision`."""
        ...

    def reserve(self, caller: str) -> Reservation:
        """Count one image against today's budgets, or raise `BudgetExhausted` (429)."""
        ...

    def refund(self, reservation: Reservation) -> None:
        """Give a reserved image back (the generation failed upstream). Never raises."""
        ...

    def single_flight(
        self,
        key: str,
        produce: Callable[[], tuple[T, str | None]],
        load: Callable[[str], T | None],
        *,
        lease_seconds: float,
        timeout: float,
    ) -> tuple[T, bool]:
        """Run `produce` once for `key` among all callers sharing this state.

        `produce` returns the result and the name it was stored under (None when storing
        failed); the callers that waited get the winner's result, from memory on this
        instance or through `load(name)` from the image store on another. Returns (result,
        whether it was shared). `TimeoutError` when the winner has not finished in `timeout`.
        """
        ...

    def close(self) -> None: ...


# --- the words and headers, the same for every implementation ---------------------------------


def utc_day(now: float) -> int:
    return int(now // SECONDS_PER_DAY)


def seconds_until_utc_midnight(now: float) -> int:
    return max(1, math.ceil(SECONDS_PER_DAY - now % SECONDS_PER_DAY))


def budget_exhausted(per_caller: bool, limit: int, retry_after: int) -> BudgetExhausted:
    hours, minutes = divmod(math.ceil(retry_after / 60), 60)
    when = f"in {hours} h {minutes} min" if hours else f"in {minutes} min"
    if per_caller:
        what = f"Your daily image budget ({limit} images a day per caller) is spent."
    else:
        what = f"This function's daily image budget ({limit} images a day for all callers) is spent."
    return BudgetExhausted(
        f"{what} It resets at 00:00 UTC, {when}.",
        headers={"Retry-After": str(retry_after)},
    )


def budget_unknown(retry_after: int) -> BudgetExhausted:
    """Today's count was lost (Redis lost its data) and STATE_FAILURE=closed: nobody knows how
    much of the budget is left, so it is treated as spent until the day that lost it is over.
    A 429 budget_exhausted, not a 503: clients already wait for Retry-After (midnight) on it,
    where a 503's short Retry-After would have them retry for the rest of the day."""
    hours, minutes = divmod(math.ceil(retry_after / 60), 60)
    when = f"in {hours} h {minutes} min" if hours else f"in {minutes} min"
    return BudgetExhausted(
        "This function's count of today's images was lost, so its daily image budget is treated"
        f" as spent. It resets at 00:00 UTC, {when}.",
        headers={"Retry-After": str(retry_after)},
    )


def rate_limit_headers(decision: RateDecision | None, policy: RatePolicy) -> dict[str, str]:
    """The `RateLimit-Policy` and `RateLimit` fields (draft-ietf-httpapi-ratelimit-headers-10/11)
    for the per-caller limit, e.g. `"caller";q=10;w=60` and `"caller";r=3;t=42`.

    Both are Structured Field lists of one item: the policy's name as a String, then `q` (the
    quota: the bucket's size), `w` (the window: seconds an empty bucket takes to fill), `r` (the
    quota left) and `t` (seconds until it is whole again). No limit set: no headers.
    """
    if decision is None or not policy.enabled:
        return {}
    name = f'"{RATE_POLICY_NAME}"'
    return {
        "RateLimit-Policy": f"{name};q={policy.burst};w={policy.window_seconds}",
        "RateLimit": f"{name};r={max(0, decision.remaining)};t={max(0, decision.reset_seconds)}",
    }


def flight_failure(error: BaseException) -> dict[str, Any] | None:
    """What waiters on other instances are told about the winner's error: the public parts of
    an `ImageGenError`; None for anything else (they then try themselves)."""
    if not isinstance(error, ImageGenError):
        return None
    return {"status": error.status, "code": error.code, "message": error.message, "headers": error.headers}


def flight_error(failure: dict[str, Any]) -> ImageGenError:
    """The winner's error again, on a waiter: same status, code, message and headers."""
    error = ImageGenError(str(failure.get("message", "")), code=str(failure.get("code", "internal_error")))
    error.status = int(failure.get("status", 500))
    error.headers = {str(k): str(v) for k, v in dict(failure.get("headers") or {}).items()}
    return error
