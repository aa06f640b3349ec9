"""One process's single-flight: identical work in flight runs once, and callers that arrive
meanwhile share its outcome. The memory state uses it alone; the Redis state in front of its
cross-instance claim."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Flight(Generic[T]):
    done: threading.Event = field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None
    waiters: int = 0


class SingleFlight(Generic[T]):
    """Runs `work` once per key at a time; callers that arrive meanwhile get its outcome."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self._lock = threading.Lock()

    def do(self, key: str, work: Callable[[], T], timeout: float) -> tuple[T, bool]:
        """(the result, whether it was shared from another caller's work)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
            else:
                flight.waiters += 1
        if not leader:
            if not flight.done.wait(timeout):
                raise TimeoutError(f"the identical request in flight did not finish within {timeout:g} s")
            if flight.error is not None:
                raise flight.error
            return flight.result, True  # type: ignore[return-value]
        try:
            flight.result = work()
            return flight.result, False
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def waiters(self, key: str) -> int:
        with self._lock:
            flight = self._flights.get(key)
            return flight.waiters if flight else 0
