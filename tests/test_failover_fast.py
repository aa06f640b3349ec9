"""Leaving a misbehaving route fast (imagegen/route_health.py): failing over instead of sitting
out a long retry wait, cutting a hanging try at K × the route's p99, and taking a route that
keeps failing out of rotation (for every instance where the state is shared). Scripted
backends on the fake clock; the shared circuit on a real redis-server, from two processes.
Each test counts upstream calls: never more than the patient policy makes."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imagegen.backends.base import GenerationContext
from imagegen.dispatch import Dispatcher
from imagegen.domain import Attempt, GeneratedImage, GenerationRequest
from imagegen.errors import UpstreamError
from imagegen.route_health import PATIENT, FailoverPolicy, MemoryCircuits, RouteHealth
from tests.fakes import FakeClock
from tests.scripted import HANG, VENDOR_TIMEOUT_SECONDS, ScriptedBackend
from tests.servers import wait_until

REQUEST = GenerationRequest(prompt="p")
REPO = Path(__file__).resolve().parent.parent


def unavailable(retry_after: float | None = None) -> UpstreamError:
    return UpstreamError(
        "503", code="upstream_unavailable", upstream_status=503, retry_after=retry_after, retryable=True, fail_over=True
    )


@dataclass
class Run:
    image: GeneratedImage | None
    error: UpstreamError | None
    attempts: list[Attempt]
    events: list[tuple[str, dict]]
    seconds: float


def run(dispatcher: Dispatcher, clock: FakeClock, deadline: float = 150.0) -> Run:
    events: list[tuple[str, dict]] = []
    context = GenerationContext(
        deadline=clock.now + deadline, timing=clock.timing(), progress=lambda name, **f: events.append((name, f))
    )
    attempts: list[Attempt] = []
    started = clock.now
    image = error = None
    try:
        image = dispatcher.generate(REQUEST, dispatcher.candidates(REQUEST), context, attempts)
    except UpstreamError as caught:
        error = caught
    return Run(image, error, attempts, events, clock.now - started)


def warm(health: RouteHealth, route: str, seconds: float, count: int = 20) -> None:
    for _ in range(count):
        health.succeeded(route, route, seconds)


def two(clock: FakeClock, first: list, second: list, policy: FailoverPolicy, max_retries: int = 3, circuits=None):
    primary = ScriptedBackend("primary", clock=clock, answers=first)
    fallback = ScriptedBackend("fallback", clock=clock, answers=second)
    health = RouteHealth(policy, circuits if circuits is not None else MemoryCircuits(lambda: clock.now))
    dispatcher = Dispatcher({"primary": primary, "fallback": fallback}, max_retries, health=health)
    return primary, fallback, health, dispatcher


# --- 1. a long wait on one route, another ready: fail over at once -----------------------------


def test_a_retry_after_longer_than_the_fallbacks_usual_time_fails_over_at_once(clock: FakeClock):
    primary, fallback, health, dispatcher = two(clock, [unavailable(retry_after=1)], [b"png"], FailoverPolicy())
    warm(health, "primary", 1.0)
    warm(health, "fallback", 1.0)

    result = run(dispatcher, clock)

    assert result.image is not None and result.image.route.backend == "fallback"
    assert clock.sleeps == []  # the asked-for second was not sat out
    assert result.seconds == pytest.approx(1.0)
    assert (primary.tries, fallback.tries) == (1, 1)
    assert result.attempts[0].note == "failover_instead_of_wait"
    assert ("failover", {"from": "primary", "to": "fallback", "why": "wait"}) in result.events


def test_the_same_case_before_waited_and_retried_the_primary_with_as_many_calls(clock: FakeClock):
    """The patient policy (what every deployment did before) is slower and makes more calls."""
    primary, fallback, _, dispatcher = two(clock, [unavailable(retry_after=1)], [b"png"], PATIENT)
    result = run(dispatcher, clock)
    assert (primary.tries, fallback.tries) == (4, 1)  # three retries, each after a 1 s wait
    assert result.seconds == pytest.approx(4.0)


def test_a_wait_shorter_than_the_fallbacks_usual_time_is_sat_out(clock: FakeClock):
    primary, fallback, health, dispatcher = two(clock, [unavailable(retry_after=2), b"png"], [b"png"], FailoverPolicy())
    warm(health, "primary", 1.0)
    warm(health, "fallback", 10.0)  # a slow fallback: 2 s + 1 s here beats 10 s there

    result = run(dispatcher, clock)

    assert result.image.route.backend == "primary"
    assert clock.sleeps == [2]
    assert (primary.tries, fallback.tries) == (2, 0)


def test_a_wait_up_to_failover_wait_seconds_is_always_sat_out(clock: FakeClock):
    primary, fallback, _, dispatcher = two(
        clock, [unavailable(retry_after=1), b"png"], [b"png"], FailoverPolicy(wait_seconds=1.0)
    )
    assert run(dispatcher, clock).image.route.backend == "primary"
    assert (primary.tries, fallback.tries) == (2, 0)


# --- 2. a try far past the route's recent p99: cut, then fail over ----------------------------


def test_a_hanging_try_is_cut_at_k_times_the_routes_p99_and_fails_over(clock: FakeClock):
    policy = FailoverPolicy(timeout_factor=3.0, timeout_floor_seconds=2.0)
    primary, fallback, health, dispatcher = two(clock, [HANG], [b"png"], policy)
    warm(health, "primary", 1.0)

    result = run(dispatcher, clock)

    assert result.image.route.backend == "fallback"
    assert result.seconds == pytest.approx(3.0 + 1.0)  # cut at 3 × 1 s, then the fallback's second
    assert (primary.tries, fallback.tries) == (1, 1)
    assert result.attempts[0].code == "upstream_timeout" and result.attempts[0].note == "adaptive_timeout"
    assert ("failover", {"from": "primary", "to": "fallback", "why": "adaptive_timeout"}) in result.events


def test_the_floor_bounds_the_adaptive_limit(clock: FakeClock):
    primary, fallback, health, dispatcher = two(clock, [HANG], [b"png"], FailoverPolicy(timeout_floor_seconds=5.0))
    warm(health, "primary", 0.1)
    assert run(dispatcher, clock).seconds == pytest.approx(5.0 + 1.0)


def test_before_a_hanging_try_ran_to_the_vendor_timeout(clock: FakeClock):
    primary, fallback, health, dispatcher = two(clock, [HANG], [b"png"], PATIENT, max_retries=0)
    warm(health, "primary", 1.0)
    assert run(dispatcher, clock).seconds == pytest.approx(VENDOR_TIMEOUT_SECONDS + 1.0)


def test_with_no_record_the_vendor_timeout_alone_applies(clock: FakeClock):
    primary, fallback, health, dispatcher = two(clock, [HANG], [b"png"], FailoverPolicy(), max_retries=0)
    warm(health, "primary", 1.0, count=19)  # one short of a p99 worth cutting on
    assert run(dispatcher, clock).seconds == pytest.approx(VENDOR_TIMEOUT_SECONDS + 1.0)


def test_the_last_chance_is_never_cut(clock: FakeClock):
    """One route, no retry left: a slow image beats none."""
    only = ScriptedBackend("only", clock=clock, answers=[b"png"], seconds=10.0)
    health = RouteHealth(FailoverPolicy(), MemoryCircuits(lambda: clock.now))
    warm(health, "only", 1.0)
    result = run(Dispatcher({"only": only}, 0, health=health), clock)
    assert result.image is not None and result.seconds == pytest.approx(10.0)


def test_a_cut_try_on_the_only_route_is_retried_and_reported(clock: FakeClock):
    only = ScriptedBackend("only", clock=clock, answers=[HANG, b"png"])
    health = RouteHealth(FailoverPolicy(), MemoryCircuits(lambda: clock.now))
    warm(health, "only", 1.0)
    result = run(Dispatcher({"only": only}, 1, health=health), clock)
    assert result.image is not None and only.tries == 2
    retry = next(fields for name, fields in result.events if name == "retry")
    assert retry["cutAfterSeconds"] == 3.0 and retry["reason"] == "upstream_timeout"


# --- 3. a route that keeps failing: out of rotation, then one probe ----------------------------


def test_a_route_that_keeps_failing_is_skipped_then_probed_after_the_open_time(clock: FakeClock):
    policy = FailoverPolicy(circuit_failures=3, circuit_open_seconds=30.0)
    primary, fallback, _, dispatcher = two(clock, [unavailable()], [b"png"], policy, max_retries=0)

    for _ in range(3):
        assert run(dispatcher, clock).image.route.backend == "fallback"
    assert primary.tries == 3

    skipped = run(dispatcher, clock)
    assert skipped.image.route.backend == "fallback" and primary.tries == 3  # not tried at all
    assert ("failover", {"from": "primary", "to": "fallback", "why": "circuit_open"}) in skipped.events

    clock.now += 30.0
    probe = run(dispatcher, clock)
    assert primary.tries == 4 and probe.image.route.backend == "fallback"  # one probe; it failed
    run(dispatcher, clock)
    assert primary.tries == 4  # the failed probe reopened it

    clock.now += 30.0
    primary.answers = [b"png"]
    assert run(dispatcher, clock).image.route.backend == "primary"  # the probe succeeded: closed
    assert run(dispatcher, clock).image.route.backend == "primary"
    assert primary.tries == 6


def test_when_every_route_is_open_the_one_opened_first_is_tried(clock: FakeClock):
    policy = FailoverPolicy(circuit_failures=1, circuit_open_seconds=30.0)
    circuits = MemoryCircuits(lambda: clock.now)
    primary, fallback, _, dispatcher = two(clock, [unavailable()], [unavailable()], policy, max_retries=0, circuits=circuits)
    circuits.circuit_failed("fallback", 1, 60, 30)  # opened first
    clock.now += 1
    circuits.circuit_failed("primary", 1, 60, 30)
    fallback.answers = [b"png"]

    result = run(dispatcher, clock)

    assert result.image is not None and result.image.route.backend == "fallback"
    assert (primary.tries, fallback.tries) == (0, 1)


def test_an_open_route_is_named_in_the_final_error(clock: FakeClock):
    policy = FailoverPolicy(circuit_failures=1)
    circuits = MemoryCircuits(lambda: clock.now)
    primary, fallback, _, dispatcher = two(clock, [unavailable()], [unavailable()], policy, max_retries=0, circuits=circuits)
    circuits.circuit_failed("primary", 1, 60, 30)
    result = run(dispatcher, clock)
    assert result.error is not None and "primary (circuit open)" in result.error.message
    assert primary.tries == 0


def test_errors_that_fail_everywhere_do_not_open_a_circuit(clock: FakeClock):
    bad_request = UpstreamError("bad", code="upstream_bad_request", upstream_status=400)
    primary, fallback, health, dispatcher = two(clock, [bad_request], [b"png"], FailoverPolicy(circuit_failures=1), 0)
    run(dispatcher, clock)
    assert health.admit("primary").state == "closed"


def test_the_settings_are_read_and_checked():
    from imagegen.config import load_settings
    from imagegen.errors import ConfigurationError

    policy = load_settings(
        {
            "FAILOVER_WAIT_SECONDS": "2",
            "ADAPTIVE_TIMEOUT_FACTOR": "0",
            "ADAPTIVE_TIMEOUT_FLOOR_SECONDS": "4",
            "CIRCUIT_FAILURES": "7",
            "CIRCUIT_OPEN_SECONDS": "12",
        }
    ).failover
    assert policy == FailoverPolicy(2.0, 0.0, 4.0, 7, 12.0)
    assert load_settings({}).failover == FailoverPolicy()
    with pytest.raises(ConfigurationError):
        load_settings({"CIRCUIT_FAILURES": "-1"})


# --- the shared circuit: two processes, one redis-server --------------------------------------

WORKER = """
import sys
from imagegen.backends.base import GenerationContext
from imagegen.dispatch import Dispatcher
from imagegen.domain import GenerationRequest
from imagegen.route_health import FailoverPolicy, RouteHealth
from imagegen.state.base import RatePolicy
from imagegen.state.redis import RedisState, connect
from tests.scripted import ScriptedBackend
from tests.test_failover_fast import unavailable
from tests.fakes import FakeClock
from tests.servers import wait_until

url, namespace = sys.argv[1:]
state = RedisState(connect(url, timeout=2), RatePolicy(0, 1), failure="closed", namespace=namespace)
clock = FakeClock()
primary = ScriptedBackend("primary", clock=clock, answers=[unavailable()])
fallback = ScriptedBackend("fallback", clock=clock, answers=[b"png"])
health = RouteHealth(FailoverPolicy(circuit_failures=2, circuit_open_seconds=30), state)
dispatcher = Dispatcher({"primary": primary, "fallback": fallback}, 0, health=health)
request = GenerationRequest(prompt="p")
for _ in range(2):
    dispatcher.generate(request, dispatcher.candidates(request), GenerationContext(deadline=clock.now + 150, timing=clock.timing()))
print(primary.tries)
"""


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.redis_server import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis") / "redis.log")
    yield server.url
    server.stop()


def test_a_circuit_opened_by_one_instance_is_skipped_by_another(redis_url: str, clock: FakeClock):
    from imagegen.state.base import RatePolicy
    from imagegen.state.redis import RedisState, connect

    namespace = "t" + uuid.uuid4().hex[:10]
    other = subprocess.run(
        [sys.executable, "-c", WORKER, redis_url, namespace], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() == "2"  # the other instance failed twice on the primary: open

    state = RedisState(connect(redis_url, timeout=2), RatePolicy(0, 1), failure="closed", namespace=namespace)
    policy = FailoverPolicy(circuit_failures=2, circuit_open_seconds=30)
    primary, fallback, health, dispatcher = two(clock, [b"png"], [b"png"], policy, max_retries=0, circuits=state)

    result = run(dispatcher, clock)

    assert result.image.route.backend == "fallback" and primary.tries == 0
    assert state.circuit_check("primary", 30, claim=False).state == "open"
    state.close()


def test_the_shared_circuit_lets_one_probe_through_after_the_open_time(redis_url: str):
    from imagegen.state.base import RatePolicy
    from imagegen.state.redis import RedisState, connect

    namespace = "t" + uuid.uuid4().hex[:10]
    one, two_ = (
        RedisState(connect(redis_url, timeout=2), RatePolicy(0, 1), failure="closed", namespace=namespace) for _ in "ab"
    )
    assert one.circuit_failed("r", 1, 60, 0.001) is True  # opened, for a millisecond
    wait_until(lambda: one.circuit_check("r", 60, claim=False).state == "probe", 5, "the circuit due a probe")
    admissions = [state.circuit_check("r", 60).state for state in (two_, one, two_, one)]
    assert admissions == ["probe", "open", "open", "open"]  # one probe among all instances
    assert one.circuit_failed("r", 1, 60, 30) is True  # the probe failed: open again
    assert two_.circuit_check("r", 60).state == "open"
    one.circuit_succeeded("r")
    assert two_.circuit_check("r", 60).state == "closed"
    one.close()
    two_.close()
