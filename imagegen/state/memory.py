"""Shared state for one instance: what every deployment without STATE_URL runs.

The token bucket is `imagegen.state.ratelimit.RateLimiter`; the daily budgets are two counters that
start over at 00:00 UTC; single-flight is the in-process `SingleFlight`. `RedisState` also keeps
one of these as its fallback while Redis does not answer (STATE_FAILURE=open).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from imagegen.route_health import Admission, MemoryCircuits
from imagegen.state.single_flight import SingleFlight
from imagegen.state.ratelimit import RateLimiter
from imagegen.state.base import (
    RateDecision,
    RatePolicy,
    Reservation,
    budget_exhausted,
    seconds_until_utc_midnight,
    utc_day,
)

T = TypeVar("T")


class MemoryState:
    where = "memory"

    def __init__(
        self,
        rate: RatePolicy,
        daily_image_limit: int = 0,
        daily_image_limit_per_caller: int = 0,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limiter = RateLimiter(rate.per_minute, rate.burst, monotonic)
        self._daily_limit = daily_image_limit
        self._daily_limit_per_caller = daily_image_limit_per_caller
        self._clock = clock  # wall time: the budgets follow the UTC calendar
        self._lock = threading.Lock()
        self._day = utc_day(clock())
        self._spent = 0
        self._spent_by: dict[str, int] = {}
        self._flights: SingleFlight[Any] = SingleFlight()
        self._circuits = MemoryCircuits(monotonic)

    def take_rate(self, caller: str) -> RateDecision | None:
        return self._limiter.take(caller)

    def reserve(self, caller: str) -> Reservation:
        now = self._clock()
        day = utc_day(now)
        if not (self._daily_limit or self._daily_limit_per_caller):
            return Reservation(caller, day, counted=False, where=self.where)
        with self._lock:
            self._start_day(day)
            if self._daily_limit and self._spent >= self._daily_limit:
                raise budget_exhausted(False, self._daily_limit, seconds_until_utc_midnight(now))
            mine = self._spent_by.get(caller, 0)
            if self._daily_limit_per_caller and mine >= self._daily_limit_per_caller:
                raise budget_exhausted(True, self._daily_limit_per_caller, seconds_until_utc_midnight(now))
            self._spent += 1
            self._spent_by[caller] = mine + 1
        return Reservation(caller, day, counted=True, where=self.where)

    def refund(self, reservation: Reservation) -> None:
        if not reservation.counted:
            return
        with self._lock:
            if reservation.day != self._day:
                return  # the counters started over at midnight: nothing to give back
            self._spent = max(0, self._spent - 1)
            mine = self._spent_by.get(reservation.caller, 0)
            if mine > 1:
                self._spent_by[reservation.caller] = mine - 1
            else:
                self._spent_by.pop(reservation.caller, None)

    def single_flight(
        self,
        key: str,
        produce: Callable[[], tuple[T, str | None]],
        load: Callable[[str], T | None],
        *,
        lease_seconds: float,
        timeout: float,
    ) -> tuple[T, bool]:
        return self._flights.do(key, lambda: produce()[0], timeout)

    # Circuits (imagegen/route_health.py): which routes are out of rotation, for this instance.

    def circuit_check(self, route: str, open_seconds: float, claim: bool = True) -> Admission:
        return self._circuits.circuit_check(route, open_seconds, claim)

    def circuit_failed(self, route: str, failures: int, window_seconds: float, open_seconds: float) -> bool:
        return self._circuits.circuit_failed(route, failures, window_seconds, open_seconds)

    def circuit_succeeded(self, route: str) -> None:
        self._circuits.circuit_succeeded(route)

    def close(self) -> None:
        pass

    def _start_day(self, day: int) -> None:
        if day != self._day:
            self._day, self._spent, self._spent_by = day, 0, {}
