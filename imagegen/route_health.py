"""What the dispatcher knows about each route's recent health, and the three decisions it
takes from it (docs/operations.md, "Failover: how fast and at what cost"):

1. Fail over at once instead of sitting out a retry wait, when another route is ready and
   would likely answer sooner than this one after the wait (FAILOVER_WAIT_SECONDS).
2. Cut a try that runs far past what the route usually takes: max(floor, factor × its recent
   p99), not only at TIMEOUT_SECONDS (ADAPTIVE_TIMEOUT_FACTOR, ADAPTIVE_TIMEOUT_FLOOR_SECONDS).
3. Skip a route that keeps failing for a while, then let one request probe it (a circuit
   breaker: CIRCUIT_FAILURES, CIRCUIT_OPEN_SECONDS), shared across instances through the
   shared state where STATE_URL is set.

Latencies are this instance's own (a bounded ring per route): they only ever shorten a wait or
a try, so an instance that has seen little simply behaves as before.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

# The ring of recent successful tries kept per route: enough for a p99 to mean something,
# small enough that sorting it per request costs microseconds.
LATENCY_SAMPLES = 100
# A p99 of fewer samples is the slowest one seen: no basis for cutting anyone's try.
MIN_SAMPLES_FOR_TIMEOUT = 20
# A median needs a few samples before it says what a route "usually" takes.
MIN_SAMPLES_FOR_USUAL = 5
# Failures further apart than this do not add up to open a circuit.
CIRCUIT_WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class FailoverPolicy:
    """The settings behind the three decisions; see imagegen/config.py for the defaults."""

    wait_seconds: float = 0.5  # FAILOVER_WAIT_SECONDS
    timeout_factor: float = 3.0  # ADAPTIVE_TIMEOUT_FACTOR; 0: only TIMEOUT_SECONDS
    timeout_floor_seconds: float = 2.0  # ADAPTIVE_TIMEOUT_FLOOR_SECONDS
    circuit_failures: int = 5  # CIRCUIT_FAILURES; 0: never out of rotation
    circuit_open_seconds: float = 30.0  # CIRCUIT_OPEN_SECONDS


# What a policy that changes nothing looks like: retries and failover exactly as before.
PATIENT = FailoverPolicy(wait_seconds=float("inf"), timeout_factor=0.0, circuit_failures=0)


@dataclass(frozen=True)
class Admission:
    """Whether a route may be tried now: "closed" (yes), "probe" (yes, the one try after its
    open time; others skip it meanwhile) or "open" (skip). `opened_at` orders open routes when
    every one is open (on the circuit store's clock)."""

    state: str
    opened_at: float = 0.0

    @property
    def allowed(self) -> bool:
        return self.state != "open"


CLOSED = Admission("closed")


@runtime_checkable
class CircuitStore(Protocol):
    """Where circuits live: this instance's memory, or Redis for every instance."""

    def circuit_check(self, route: str, open_seconds: float, claim: bool = True) -> Admission:
        """The route's circuit now; with `claim`, a due probe is taken (others then skip it)."""
        ...

    def circuit_failed(self, route: str, failures: int, window_seconds: float, open_seconds: float) -> bool:
        """Counts one failure; True when this one opened (or reopened) the circuit."""
        ...

    def circuit_succeeded(self, route: str) -> None: ...


class MemoryCircuits:
    """Circuits for this instance alone."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # route -> [failures, window start, open until (None: closed), opened at, probe taken at]
        self._circuits: dict[str, list] = {}

    def circuit_check(self, route: str, open_seconds: float, claim: bool = True) -> Admission:
        now = self._clock()
        with self._lock:
            circuit = self._circuits.get(route)
            if circuit is None or circuit[2] is None:
                return CLOSED
            _, _, open_until, opened_at, probe_at = circuit
            if now < open_until or (probe_at is not None and now - probe_at < open_seconds):
                return Admission("open", opened_at)
            if claim:
                circuit[4] = now  # this caller probes; the others skip until it reports back
            return Admission("probe", opened_at)

    def circuit_failed(self, route: str, failures: int, window_seconds: float, open_seconds: float) -> bool:
        now = self._clock()
        with self._lock:
            circuit = self._circuits.setdefault(route, [0, now, None, 0.0, None])
            if circuit[2] is None and now - circuit[1] > window_seconds:
                circuit[0], circuit[1] = 0, now
            circuit[0] += 1
            if circuit[2] is not None or circuit[0] >= failures:
                circuit[2], circuit[3], circuit[4] = now + open_seconds, now, None
                return True
            return False

    def circuit_succeeded(self, route: str) -> None:
        with self._lock:
            self._circuits.pop(route, None)


class LatencyRecord:
    """The last LATENCY_SAMPLES successful tries per route, in seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, deque[float]] = {}

    def add(self, route: str, seconds: float) -> None:
        with self._lock:
            self._samples.setdefault(route, deque(maxlen=LATENCY_SAMPLES)).append(seconds)

    def quantile(self, route: str, q: float, min_samples: int) -> float | None:
        with self._lock:
            samples = sorted(self._samples.get(route, ()))
        if len(samples) < min_samples:
            return None
        return samples[min(len(samples) - 1, int(q * len(samples)))]


class RouteHealth:
    """The policy, the latency record and the circuits, behind the dispatcher's questions.

    Routes are named by their label (a backend's name, or "backend/provider"); a route's latency is also
    filed under its backend's name, so that a backend whose routes are not known yet (the next
    candidate) can be judged by how it did before.
    """

    def __init__(self, policy: FailoverPolicy = FailoverPolicy(), circuits: CircuitStore | None = None) -> None:
        self.policy = policy
        self._circuits = circuits if circuits is not None else MemoryCircuits()
        self._latency = LatencyRecord()

    def usual_seconds(self, route: str) -> float | None:
        """The route's recent median time to an image, once there are a few samples."""
        return self._latency.quantile(route, 0.5, MIN_SAMPLES_FOR_USUAL)

    def try_limit(self, route: str) -> float | None:
        """How long a try on this route may run before it is cut: factor × recent p99, at
        least the floor; None while that is off or there are too few samples."""
        if self.policy.timeout_factor <= 0:
            return None
        p99 = self._latency.quantile(route, 0.99, MIN_SAMPLES_FOR_TIMEOUT)
        if p99 is None:
            return None
        return max(self.policy.timeout_floor_seconds, self.policy.timeout_factor * p99)

    def fails_over_instead_of_waiting(self, route: str, following: str, wait: float) -> bool:
        """Whether to leave `route` now rather than wait `wait` seconds and retry it, when
        `following` is ready. A wait up to FAILOVER_WAIT_SECONDS is always sat out; a longer
        one goes to `following` unless that usually takes longer than the wait plus this
        route's own usual time (a route with no record yet is given the benefit of the doubt:
        leaving costs no extra call, the retry would have been one too)."""
        if wait <= self.policy.wait_seconds:
            return False
        theirs = self.usual_seconds(following)
        if theirs is None:
            return True
        return wait + (self.usual_seconds(route) or 0.0) > theirs

    def admit(self, route: str) -> Admission:
        if self.policy.circuit_failures <= 0:
            return CLOSED
        return self._circuits.circuit_check(route, self.policy.circuit_open_seconds)

    def is_ready(self, route: str) -> bool:
        """Whether the route could be tried now (without taking its probe)."""
        if self.policy.circuit_failures <= 0:
            return True
        return self._circuits.circuit_check(route, self.policy.circuit_open_seconds, claim=False).allowed

    def succeeded(self, route: str, backend: str, seconds: float) -> None:
        self._latency.add(route, seconds)
        if backend != route:
            self._latency.add(backend, seconds)
        if self.policy.circuit_failures > 0:
            self._circuits.circuit_succeeded(route)

    def failed(self, route: str) -> bool:
        """Counts a failure that another route might not have had; True when that took the
        route out of rotation."""
        if self.policy.circuit_failures <= 0:
            return False
        return self._circuits.circuit_failed(
            route, self.policy.circuit_failures, CIRCUIT_WINDOW_SECONDS, self.policy.circuit_open_seconds
        )
