"""Shared state: the memory implementation, and the Redis one against a real redis-server.

Each test gets its own key namespace on one module-wide redis-server; the tests that stop or
slow Redis start their own. "Instances" are separate RedisState objects, and separate processes
(tests/state_worker.py) where the point is that the limits hold across processes.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from imagegen.errors import BudgetExhausted, ConfigurationError, StateUnavailable, UpstreamError
from imagegen.errors import RateLimited
from imagegen.state import (
    RateDecision,
    RatePolicy,
    Reservation,
    StateSettings,
    load_state_settings,
    make_state,
    rate_limit_headers,
)
from imagegen.state.memory import MemoryState
from imagegen.state.redis import CALL_TIMEOUT_SECONDS, RedisState, connect
from tests.log_records import Records, recorded
from tests.redis_server import RedisServer, SlowProxy, start_redis
from tests.servers import REPO_ROOT, child_environment, spawn, stop_group

# One call may take the socket timeout, plus Python and scheduling on a busy test machine.
CALL_BOUND_SECONDS = CALL_TIMEOUT_SECONDS + 0.1
PASSWORD = "s3cret-Password-never-logged"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    started = start_redis(tmp_path_factory.mktemp("redis") / "redis.log")
    yield started
    started.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for this test alone: it may be stopped."""
    started = start_redis(tmp_path / "redis.log")
    yield started
    started.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def records() -> Iterator[tuple[logging.Logger, Records]]:
    with recorded("test-state") as logger_and_lines:
        yield logger_and_lines


def redis_state(url: str, namespace: str, logger: logging.Logger | None = None, **options) -> RedisState:
    rate = options.pop("rate", RatePolicy(per_minute=0, burst=1))
    return RedisState(connect(url), rate, namespace=namespace, logger=logger or logging.getLogger("test-state"), **options)


def timed(call: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    try:
        result: object = call()
    except Exception as error:  # noqa: BLE001 - the test looks at what came back
        result = error
    return result, time.perf_counter() - started


# --- settings -------------------------------------------------------------------------------


def settings_from(env: dict[str, str]) -> StateSettings:
    return load_state_settings(lambda name: env.get(name) or None, rate_limit_per_minute=10, rate_limit_burst=10)


def test_settings_default_to_memory_and_open():
    settings = settings_from({})
    assert settings.url is None and settings.failure == "open"
    assert settings.daily_image_limit == 0 and settings.daily_image_limit_per_caller == 0
    assert isinstance(make_state(settings), MemoryState)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"STATE_FAILURE": "sometimes"}, "STATE_FAILURE"),
        ({"STATE_URL": "http://10.0.0.3:6379"}, "STATE_URL"),
        ({"STATE_URL": "redis://:hunter2-secret@10.0.0.3:port/0"}, "STATE_URL"),
        ({"STATE_URL": "redis://:hunter2-secret@10.0.0.3:6379/zero"}, "STATE_URL"),
        ({"DAILY_IMAGE_LIMIT": "-1"}, "DAILY_IMAGE_LIMIT"),
        ({"DAILY_IMAGE_LIMIT_PER_CALLER": "ten"}, "DAILY_IMAGE_LIMIT_PER_CALLER"),
        ({"STATE_CLUSTER": "maybe"}, "STATE_CLUSTER"),
    ],
)
def test_a_bad_setting_names_its_variable_and_never_shows_a_password(env, variable):
    with pytest.raises(ConfigurationError) as caught:
        settings_from(env)
    assert variable in caught.value.message and "hunter2" not in caught.value.message


def test_settings_keep_the_password_out_of_repr():
    settings = settings_from({"STATE_URL": "rediss://default:hunter2-secret@10.0.0.3:6378/0", "STATE_FAILURE": "Closed"})
    assert settings.failure == "closed"
    assert "hunter2" not in repr(settings) and settings.safe_url == "rediss://***@10.0.0.3:6378/0"


def test_without_state_url_redis_is_never_imported():
    code = (
        "import sys; from imagegen.state import make_state, load_state_settings;"
        "make_state(load_state_settings(lambda n: None, rate_limit_per_minute=10, rate_limit_burst=10));"
        "assert 'redis' not in sys.modules, 'redis was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=30)


# --- headers --------------------------------------------------------------------------------


def test_rate_limit_headers_follow_the_draft_syntax():
    policy = RatePolicy(per_minute=10, burst=10)
    decision = RateDecision(limit=10, remaining=3, reset_seconds=42)
    assert rate_limit_headers(decision, policy) == {
        "RateLimit-Policy": '"caller";q=10;w=60',
        "RateLimit": '"caller";r=3;t=42',
    }
    # A bucket of 5 refilling at 2 a minute is empty-to-full in 150 s.
    assert rate_limit_headers(decision, RatePolicy(per_minute=2, burst=5))["RateLimit-Policy"] == '"caller";q=5;w=150'
    assert rate_limit_headers(None, policy) == {}
    assert rate_limit_headers(decision, RatePolicy(per_minute=0, burst=1)) == {}


# --- the rate limit: memory and Redis say the same ------------------------------------------


def rate_sequence(state, caller: str, calls: int) -> list[RateDecision]:
    decisions = []
    for _ in range(calls):
        try:
            decisions.append(state.take_rate(caller))
        except RateLimited as error:
            assert error.status == 429 and error.code == "rate_limited"
            decisions.append(("refused", error.message, error.headers, error.decision))
    return decisions


def test_redis_rate_limit_answers_like_memory(server, namespace):
    policy = RatePolicy(per_minute=6, burst=3)
    memory = MemoryState(policy, monotonic=lambda: 100.0)
    shared = redis_state(server.url, namespace, rate=policy)
    expected = rate_sequence(memory, "alice", 5)
    assert rate_sequence(shared, "alice", 5) == expected
    assert [d.remaining for d in expected[:3]] == [2, 1, 0] and expected[3][2] == {"Retry-After": "10"}
    # Another caller has a bucket of their own.
    assert shared.take_rate("bob") == RateDecision(limit=3, remaining=2, reset_seconds=10)


def test_the_rate_limit_holds_across_two_instances(server, namespace):
    policy = RatePolicy(per_minute=1, burst=5)
    one, two = (redis_state(server.url, namespace, rate=policy) for _ in range(2))
    outcomes = rate_sequence(one, "carol", 3) + rate_sequence(two, "carol", 3)
    assert [isinstance(o, RateDecision) for o in outcomes] == [True] * 5 + [False]


def run_workers(server: RedisServer, namespace: str, tmp_path: Path, op: str, *args_per_worker: list[str]) -> list[dict]:
    go = tmp_path / f"go-{uuid.uuid4().hex}"
    workers = [
        spawn(
            [sys.executable, "-m", "tests.state_worker", server.url, namespace, str(go), op, *args],
            child_environment(),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for args in args_per_worker
    ]
    try:
        go.touch()
        outputs = []
        for worker in workers:
            out, err = worker.communicate(timeout=30)
            assert worker.returncode == 0, err.decode()
            outputs.append(json.loads(out.decode().strip().splitlines()[-1]))
        return outputs
    finally:
        for worker in workers:
            stop_group(worker)


def test_the_rate_limit_holds_across_processes(server, namespace, tmp_path):
    # 4 processes x 25 calls for one caller; the bucket holds 10 and refills once in 100 s.
    outputs = run_workers(server, namespace, tmp_path, "rate", *[["0.6", "10", "25"]] * 4)
    assert sum(output["allowed"] for output in outputs) == 10


# --- daily budgets --------------------------------------------------------------------------


def test_memory_budgets_reset_at_midnight_utc():
    now = [86_400 * 20_000 + 86_400 - 90.0]  # 23:58:30 UTC
    state = MemoryState(RatePolicy(0, 1), daily_image_limit=3, daily_image_limit_per_caller=2, clock=lambda: now[0])
    state.reserve("a"), state.reserve("a")
    with pytest.raises(BudgetExhausted) as caught:
        state.reserve("a")
    assert caught.value.headers == {"Retry-After": "90"} and "per caller" in caught.value.message
    last = state.reserve("b")
    with pytest.raises(BudgetExhausted) as caught:
        state.reserve("c")
    assert caught.value.code == "budget_exhausted" and "for all callers" in caught.value.message
    state.refund(last)
    state.reserve("c")
    now[0] += 91  # 00:00:01 UTC: a new day
    state.refund(last)  # yesterday's unit: nothing to give back today
    assert [state.reserve("a").counted for _ in range(2)] == [True, True]


def test_no_budget_counts_nothing(server, namespace):
    for state in (MemoryState(RatePolicy(0, 1)), redis_state(server.url, namespace)):
        reservation = state.reserve("a")
        assert not reservation.counted
        state.refund(reservation)


def test_both_daily_budgets_hold_under_200_concurrent_reservations(server, namespace, tmp_path):
    # 4 processes x 50 threads reserve at once, one caller each: 8 a day per caller, 30 for all.
    # 4 x 8 = 32 > 30, so the global budget binds; and 30 > 4 x 7, so at least two callers
    # reach their own 8 and are refused by it: one run tests both, and neither is ever exceeded.
    outputs = run_workers(server, namespace, tmp_path, "reserve", *[["30", "8", "50", f"caller-{n}"] for n in range(4)])
    granted = [output["granted"] for output in outputs]
    assert sum(granted) == 30 and max(granted) == 8
    assert int(redis.Redis.from_url(server.url).get(f"{namespace}:upstream-calls")) == 30


def test_refund_gives_the_unit_back(server, namespace):
    state = redis_state(server.url, namespace, daily_image_limit=2)
    first, _ = state.reserve("a"), state.reserve("b")
    with pytest.raises(BudgetExhausted) as caught:
        state.reserve("c")
    assert "2 images a day for all callers" in caught.value.message
    state.refund(first)
    state.reserve("c")
    state.refund(Reservation("a", first.day - 1, counted=True, where="redis"))  # yesterday's: nothing
    with pytest.raises(BudgetExhausted):
        state.reserve("d")


def test_budgets_follow_the_servers_utc_day(server, namespace):
    state = redis_state(server.url, namespace, daily_image_limit=1, daily_image_limit_per_caller=1)
    client = redis.Redis.from_url(server.url)
    reservation = state.reserve("a")
    seconds, _ = client.time()
    day = seconds // 86_400
    assert reservation.day == day
    key = state._budget_key()
    assert client.hget(key, "d") == str(day).encode()
    assert client.hget(key, state._caller_field("a")) == b"1"
    # No expiry: a volatile-* maxmemory-policy never evicts it (yesterday's counts go at midnight).
    assert client.ttl(key) == -1
    with pytest.raises(BudgetExhausted) as caught:
        state.reserve("b")
    retry_after = int(caught.value.headers["Retry-After"])
    assert abs(retry_after - ((day + 1) * 86_400 - seconds)) <= 2
    # The same record as it stands just after midnight: yesterday's count is no count.
    client.hset(key, "d", day - 1)
    assert state.reserve("a").counted
    assert client.hget(key, "n") == b"1"


# --- single-flight --------------------------------------------------------------------------


def test_single_flight_across_processes_makes_one_upstream_call(server, namespace, tmp_path):
    outputs = run_workers(server, namespace, tmp_path, "flight", *[["fox-42", "0.5", "5"]] * 3)
    assert int(redis.Redis.from_url(server.url).get(f"{namespace}:upstream-calls")) == 1
    results = [tuple(result) for output in outputs for result in output["results"]]
    made = [r for r in results if r[0].startswith("made-by-")]
    # The winner's process: its own threads share in memory; every other process loads.
    assert len(made) == 3 and sum(1 for r in made if r[1] is False) == 1
    assert sorted(r for r in results if not r[0].startswith("made-by-")) == [("loaded:seeded/fox-42", True)] * 6


def test_a_waiter_takes_over_from_a_killed_winner(server, namespace, tmp_path):
    go = tmp_path / "go"
    go.touch()
    winner = spawn(
        [sys.executable, "-m", "tests.state_worker", server.url, namespace, str(go), "win-and-hang", "owl-7", "0.6"],
        child_environment(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert json.loads(winner.stdout.readline()) == {"won": True}
        polled = threading.Event()

        def poll_pause(seconds: float) -> None:
            polled.set()
            time.sleep(seconds)

        state = redis_state(server.url, namespace, poll_seconds=0.02, sleep=poll_pause)
        calls, outcome = [], []

        def produce() -> tuple[str, str]:
            calls.append(1)
            return "mine", "seeded/owl-7"

        waiter = threading.Thread(
            target=lambda: outcome.append(timed(lambda: state.single_flight("owl-7", produce, lambda n: None, lease_seconds=5, timeout=10)))
        )
        waiter.start()
        assert polled.wait(5)  # the waiter found the winner's lock and waits on it
        winner.send_signal(signal.SIGKILL)
        winner.wait(10)
        waiter.join(10)
    finally:
        stop_group(winner, signal.SIGKILL)
    (result, took), = outcome
    assert result == ("mine", False) and calls == [1]
    assert took < 0.6 + 1.0  # the dead winner's lease, and a little


def test_renewal_keeps_a_long_generations_lock(server, namespace):
    one = redis_state(server.url, namespace, poll_seconds=0.02)
    two = redis_state(server.url, namespace, poll_seconds=0.02)
    calls, started, results = [], threading.Event(), []

    def slow() -> tuple[str, str]:
        calls.append(1)
        started.set()
        time.sleep(1.2)  # four leases of 0.3 s: held only because it is renewed
        return "image", "seeded/slow"

    winner = threading.Thread(target=lambda: results.append(one.single_flight("slow", slow, lambda n: None, lease_seconds=0.3, timeout=10)))
    winner.start()
    assert started.wait(5)
    loser = two.single_flight("slow", slow, lambda name: f"loaded {name}", lease_seconds=0.3, timeout=10)
    winner.join(10)
    assert calls == [1] and loser == ("loaded seeded/slow", True) and results == [("image", False)]


def test_waiters_get_the_winners_error(server, namespace):
    polled = threading.Event()

    def poll_pause(seconds: float) -> None:
        polled.set()
        time.sleep(seconds)

    one = redis_state(server.url, namespace, poll_seconds=0.02)
    two = redis_state(server.url, namespace, poll_seconds=0.02, sleep=poll_pause)
    started, release = threading.Event(), threading.Event()

    def failing() -> tuple[str, str]:
        started.set()
        release.wait(5)
        raise UpstreamError("The provider is down.", code="upstream_unavailable", retry_after=30)

    errors = []

    def call(state, produce) -> None:
        try:
            state.single_flight("bad", produce, lambda n: None, lease_seconds=5, timeout=10)
        except UpstreamError as error:
            errors.append(("winner", error.status, error.code, error.message))
        except Exception as error:  # noqa: BLE001
            errors.append(("waiter", getattr(error, "status", None), getattr(error, "code", None), str(error), error.headers))

    winner = threading.Thread(target=call, args=(one, failing))
    winner.start()
    assert started.wait(5)
    waiter = threading.Thread(target=call, args=(two, failing))
    waiter.start()
    assert polled.wait(5)  # the waiter found the winner's lock and waits on it
    release.set()
    winner.join(10), waiter.join(10)
    assert sorted(errors) == [
        ("waiter", 502, "upstream_unavailable", "The provider is down.", {"Retry-After": "30"}),
        ("winner", 502, "upstream_unavailable", "The provider is down."),
    ]
    # A new request after the failure tries again instead of inheriting it.
    assert two.single_flight("bad", lambda: ("ok", "seeded/bad"), lambda n: None, lease_seconds=5, timeout=10) == ("ok", False)


# --- when Redis fails -----------------------------------------------------------------------


def every_operation(state) -> dict[str, Callable[[], object]]:
    return {
        "rate": lambda: state.take_rate("dave"),
        "reserve": lambda: state.reserve("dave"),
        "flight": lambda: state.single_flight("k", lambda: ("made", "n"), lambda n: None, lease_seconds=5, timeout=5),
    }


@pytest.mark.parametrize("failure", ["open", "closed"])
def test_redis_stopped_mid_run(own_server, namespace, failure, records):
    logger, handler = records
    state = redis_state(
        own_server.url, namespace, logger, rate=RatePolicy(60, 5), daily_image_limit=100, failure=failure
    )
    assert state.reserve("dave").where == "redis"
    own_server.stop()
    for name, call in every_operation(state).items():
        for _ in range(3):
            result, took = timed(call)
            assert took < CALL_BOUND_SECONDS, (name, took)
            if failure == "open":
                assert not isinstance(result, Exception), (name, result)
            else:
                assert isinstance(result, StateUnavailable) and result.status == 503 and result.code == "state_unavailable"
    assert len(handler.lines) == 1 and handler.lines[0].startswith("WARNING Shared state at redis://127.0.0.1:")
    assert f"STATE_FAILURE={failure}" in handler.lines[0]


@pytest.mark.parametrize("failure", ["open", "closed"])
@pytest.mark.parametrize("how", ["slow", "silent"])
def test_slow_redis_is_given_up_on_in_time(server, namespace, failure, how, records):
    logger, handler = records
    proxy = SlowProxy(server.port, delay=0.5 if how == "slow" else 0.0, silent=how == "silent")
    now = [0.0]
    try:
        state = redis_state(
            proxy.url, namespace, logger, rate=RatePolicy(60, 5), daily_image_limit=100, failure=failure, clock=lambda: now[0]
        )
        for name, call in every_operation(state).items():
            now[0] += 2  # past the pause after a failure: every operation really asks Redis
            result, took = timed(call)
            assert took < CALL_BOUND_SECONDS, (name, took)
            assert isinstance(result, StateUnavailable) if failure == "closed" else not isinstance(result, Exception)
        assert len(handler.lines) == 1 and "TimeoutError" in handler.lines[0]
    finally:
        proxy.close()


def test_the_warning_comes_at_most_once_a_minute(own_server, namespace, records):
    logger, handler = records
    now = [1000.0]
    state = redis_state(own_server.url, namespace, logger, rate=RatePolicy(6000, 1000), clock=lambda: now[0])
    own_server.stop()
    for _ in range(59):
        state.take_rate("erin")
        now[0] += 1.0  # every call past the 1 s pause asks Redis again, and fails again
    assert len(handler.lines) == 1
    now[0] += 1.5
    state.take_rate("erin")
    assert len(handler.lines) == 2


def test_a_password_never_reaches_errors_or_logs(tmp_path, namespace, records):
    logger, handler = records
    protected = start_redis(tmp_path / "redis.log", password=PASSWORD)
    try:
        good = f"redis://:{PASSWORD}@127.0.0.1:{protected.port}/0"
        settings = settings_from({"STATE_URL": good, "RATE_LIMIT_PER_MINUTE": "60"})
        assert PASSWORD not in repr(settings)
        working = RedisState.from_settings(settings, logger=logger, namespace=namespace)
        assert working.take_rate("frank") is not None and working.where == "redis" and not handler.lines

        wrong = "wrong-" + PASSWORD
        for failure in ("open", "closed"):
            bad = settings_from({"STATE_URL": f"redis://user:{wrong}@127.0.0.1:{protected.port}/0", "STATE_FAILURE": failure})
            state = RedisState.from_settings(bad, logger=logger, namespace=namespace)
            result, _ = timed(lambda: state.take_rate("frank"))
            shown = [str(result), repr(result), getattr(result, "message", ""), *handler.lines]
            assert not any(PASSWORD in text for text in shown), shown
            assert handler.lines and "redis://***@127.0.0.1:" in handler.lines[-1]
        protected.stop()
        result, _ = timed(lambda: working.take_rate("frank"))
        assert all(PASSWORD not in line for line in handler.lines)
    finally:
        protected.stop()


def test_open_mode_refunds_where_it_counted(own_server, namespace):
    state = redis_state(own_server.url, namespace, daily_image_limit=1)
    own_server.stop()
    local = state.reserve("gina")
    assert local.where == "memory"
    with pytest.raises(BudgetExhausted):
        state.reserve("gina")
    state.refund(local)
    assert state.reserve("gina").where == "memory"


def test_make_state_builds_redis_from_the_settings(server):
    state = make_state(settings_from({"STATE_URL": server.url, "DAILY_IMAGE_LIMIT": "5"}))
    try:
        assert isinstance(state, RedisState) and state.take_rate("hank").limit == 10
    finally:
        state.close()


def test_one_slow_answer_costs_only_that_call(server, namespace, records):
    logger, _ = records
    proxy = SlowProxy(server.port, delay=0.5)
    try:
        state = redis_state(proxy.url, namespace, logger, rate=RatePolicy(60, 5), failure="closed")
        result, took = timed(lambda: state.take_rate("ivan"))
        assert isinstance(result, StateUnavailable) and took < CALL_BOUND_SECONDS
        proxy.delay = 0.0
        assert isinstance(state.take_rate("ivan"), RateDecision)  # no pause after a single failure
    finally:
        proxy.close()


# --- a Redis Cluster (Memorystore for Redis Cluster, Valkey cluster mode) --------------------


def test_a_cluster_runs_every_script_in_one_slot(tmp_path, namespace):
    server = start_redis(tmp_path / "cluster.log", cluster=True)
    try:
        settings = settings_from(
            {"STATE_URL": server.url, "STATE_CLUSTER": "true", "STATE_FAILURE": "closed", "DAILY_IMAGE_LIMIT": "2"}
        )
        one, two = (RedisState.from_settings(settings, namespace=namespace, poll_seconds=0.02) for _ in range(2))
        # A script whose keys were in different slots would fail (CROSSSLOT): closed mode says so.
        assert [one.take_rate("jo").remaining, two.take_rate("jo").remaining] == [9, 8]
        first = one.reserve("jo")
        two.reserve("kim")
        with pytest.raises(BudgetExhausted):
            one.reserve("lee")
        two.refund(first)
        assert one.reserve("lee").counted
        assert two.single_flight("c", lambda: ("made", "seeded/c"), lambda n: None, lease_seconds=5, timeout=5) == ("made", False)
        assert one.single_flight("c", lambda: ("again", "x"), lambda name: f"loaded {name}", lease_seconds=5, timeout=5) == (
            "loaded seeded/c",
            True,
        )
    finally:
        server.stop()


def test_an_unreachable_cluster_at_start_is_no_crash(tmp_path, namespace, records):
    logger, handler = records
    settings = settings_from({"STATE_URL": "redis://127.0.0.1:1/0", "STATE_CLUSTER": "true"})
    state = make_state(settings, logger=logger)  # connects on first use, not here
    result, took = timed(lambda: state.take_rate("max"))
    assert isinstance(result, RateDecision) and took < CALL_BOUND_SECONDS
    assert len(handler.lines) == 1 and "STATE_FAILURE=open" in handler.lines[0]
