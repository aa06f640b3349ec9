"""Shared state is data, not truth (issue 19, item 5).

A Redis that loses its data (restarted without persistence, flushed, or evicting keys under
memory pressure) must not hand out a second day's budget: with STATE_FAILURE=closed the day that
lost its count is refused, with "open" it goes on and says so once. And what is read back from
Redis (a single-flight outcome) is checked before use: a name that is not one the store makes
never becomes a path, whatever Redis holds.

Every test starts its own redis-server (it is restarted, flushed or starved of memory) and
stops it; the end-to-end tests start real functions under functions-framework and stop them.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis
import requests

from imagegen.errors import BudgetExhausted, StateUnavailable
from imagegen.state import RatePolicy, Reservation
from imagegen.state.memory import MemoryState
from imagegen.state.redis import RedisState, connect
from imagegen.storage import LocalImageStore, is_valid_image_name
from tests.conftest import TEST_TOKEN
from tests.fake_router import FakeRouter, make_png
from tests.log_records import Records, recorded
from tests.redis_server import RedisServer, start_redis
from tests.servers import Process, start_function

LIMIT = 10
PASSWORD = "truth-Redis-Password-never-shown"
HOSTILE = "../../secret/creds"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    started = start_redis(tmp_path / "redis.log")
    yield started
    started.stop()


@pytest.fixture
def records() -> Iterator[tuple[logging.Logger, Records]]:
    with recorded("test-state-truth", logging.INFO) as logger_and_lines:
        yield logger_and_lines


def instance(url: str, logger: logging.Logger | None = None, **options) -> RedisState:
    """One function instance's state: its own client, the default namespace."""
    options.setdefault("daily_image_limit", LIMIT)
    options.setdefault("failure", "closed")
    return RedisState(connect(url), RatePolicy(per_minute=0, burst=1), logger=logger or logging.getLogger("t"), **options)


def try_reserve(state: RedisState, caller: str = "dave") -> Reservation | Exception:
    try:
        return state.reserve(caller)
    except (BudgetExhausted, StateUnavailable) as error:
        return error


def restart_without_persistence(server: RedisServer) -> RedisServer:
    """The same port, an empty Redis: a Memorystore Basic instance after a restart."""
    server.stop()
    return start_redis(server.log_path, port=server.port)


def counted(results: list[Reservation | Exception]) -> int:
    return sum(1 for r in results if isinstance(r, Reservation) and r.counted)


# --- lost counts --------------------------------------------------------------------------------


def test_a_restart_without_persistence_never_hands_out_a_second_budget(server):
    url = server.url
    one, two = instance(url), instance(url)
    results = [try_reserve((one, two)[i % 2]) for i in range(6)]
    assert counted(results) == 6

    restarted = restart_without_persistence(server)
    try:
        # A third instance that never saw the record, and the two that did, all asking at once.
        three = instance(url)
        with ThreadPoolExecutor(8) as pool:
            results += list(pool.map(lambda i: try_reserve((one, two, three)[i % 3]), range(30)))
        assert counted(results) <= LIMIT
        # Once an instance that knew the record has asked, every instance refuses for the day.
        later = [try_reserve(state) for state in (one, two, three, instance(url)) for _ in range(3)]
        refused = [r for r in later if isinstance(r, BudgetExhausted)]
        assert len(refused) == len(later)
        assert all("count of today's images was lost" in r.message for r in refused)
        assert all(r.status == 429 and r.code == "budget_exhausted" for r in refused)
        record = redis.Redis.from_url(url).hgetall("{imagegen:budget}:all")
        assert int(record[b"s"]) == int(record[b"d"]) + 1  # trusted again from tomorrow
    finally:
        restarted.stop()


def test_a_flushed_redis_refuses_until_midnight_when_closed(server, records):
    logger, handler = records
    state = instance(server.url, logger)
    assert counted([try_reserve(state) for _ in range(4)]) == 4
    client = redis.Redis.from_url(server.url)
    client.flushall()
    refused = [try_reserve(state) for _ in range(LIMIT)]
    assert all(isinstance(r, BudgetExhausted) for r in refused), refused
    seconds, _ = client.time()
    midnight = 86_400 - seconds % 86_400
    assert abs(int(refused[0].headers["Retry-After"]) - midnight) <= 2
    assert "00:00 UTC" in refused[0].message
    lost = [line for line in handler.lines if "lost today's daily image count" in line]
    assert len(lost) == 1 and lost[0].startswith("WARNING") and "STATE_FAILURE=closed" in lost[0]


def test_a_flushed_redis_counts_from_zero_with_one_warning_when_open(server, records):
    logger, handler = records
    state = instance(server.url, logger, failure="open")
    assert counted([try_reserve(state) for _ in range(4)]) == 4
    redis.Redis.from_url(server.url).flushall()
    assert counted([try_reserve(state) for _ in range(LIMIT + 2)]) == LIMIT
    lost = [line for line in handler.lines if "lost today's daily image count" in line]
    assert len(lost) == 1 and "STATE_FAILURE=open" in lost[0] and "counting again from zero" in lost[0]


def test_the_per_caller_budget_is_not_handed_out_twice_either(server):
    state = instance(server.url, daily_image_limit=0, daily_image_limit_per_caller=3)
    assert counted([try_reserve(state, "erin") for _ in range(3)]) == 3
    redis.Redis.from_url(server.url).flushall()
    assert counted([try_reserve(state, caller) for caller in ("erin", "frank") for _ in range(3)]) == 0


def test_a_refund_to_a_record_made_again_gives_nothing(server):
    url = server.url
    state = instance(url, failure="open")
    old = state.reserve("dave")
    redis.Redis.from_url(url).flushall()
    spent = [state.reserve("dave") for _ in range(3)]
    state.refund(old)  # counted in the lost record, not in this one
    assert redis.Redis.from_url(url).hget("{imagegen:budget}:all", "n") == b"3"
    state.refund(spent[0])
    assert redis.Redis.from_url(url).hget("{imagegen:budget}:all", "n") == b"2"


def test_a_first_start_on_an_empty_redis_counts_from_zero(server):
    # No instance ever saw a record: nothing was lost, the budget starts whole.
    state = instance(server.url)
    assert counted([try_reserve(state) for _ in range(LIMIT + 3)]) == LIMIT


def fill(client: redis.Redis, rounds: int, tag: str) -> None:
    """Keys with an expiry, as a busy cache sharing this Redis writes them."""
    for i in range(rounds):  # one at a time: a pipeline's query buffer counts against maxmemory
        client.set(f"filler:{tag}:{i}", b"x" * 20_000, ex=3600)


def test_eviction_under_volatile_lru_never_resets_the_budget(server):
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "volatile-lru")
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 1_000_000)
    state = instance(server.url, daily_image_limit_per_caller=LIMIT)
    results = []
    for i in range(3 * LIMIT):
        results.append(try_reserve(state))
        fill(client, 100, str(i))  # 2 MB a round into 1 MB: the volatile keys are evicted
    assert int(client.info("stats")["evicted_keys"]) > 100
    assert counted(results) == LIMIT
    assert all(isinstance(r, BudgetExhausted) and "10 images a day" in r.message for r in results[LIMIT:])


def test_an_allkeys_policy_is_named_and_its_eviction_refused(server, records):
    logger, handler = records
    client = redis.Redis.from_url(server.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    state = instance(server.url, logger)
    assert counted([try_reserve(state) for _ in range(3)]) == 3
    (warning,) = [line for line in handler.lines if "maxmemory-policy" in line]
    assert warning.startswith("WARNING") and "allkeys-lru" in warning and "volatile-lru" in warning
    client.delete("{imagegen:budget}:all")  # what allkeys-lru does to it under memory pressure
    assert counted([try_reserve(state) for _ in range(LIMIT)]) == 0


def test_a_redis_that_refuses_config_is_told_what_it_needs(server, records, monkeypatch):
    logger, handler = records
    state = instance(server.url, logger)

    def refuse(*args, **kwargs):
        raise redis.ResponseError("unknown command 'CONFIG'")  # Memorystore blocks CONFIG

    monkeypatch.setattr(redis.Redis, "config_get", refuse)
    assert counted([try_reserve(state) for _ in range(2)]) == 2
    (line,) = [line for line in handler.lines if "maxmemory-policy" in line]
    assert line.startswith("INFO") and "noeviction or a volatile-* policy" in line


def test_the_budget_record_has_no_expiry_and_is_one_key(server):
    state = instance(server.url, daily_image_limit_per_caller=5)
    state.reserve("dave")
    client = redis.Redis.from_url(server.url)
    assert client.ttl("{imagegen:budget}:all") == -1
    assert [k for k in client.keys("*budget*")] == [b"{imagegen:budget}:all"]


# --- what is read back is checked ----------------------------------------------------------------


def plant_outcome(url: str, state: RedisState, key: str, outcome: str) -> None:
    """The outcome, and a lock held by someone else: a newcomer waits and then reads it, as a
    waiter does (a newcomer alone takes only a stored image's name)."""
    lock, outcome_key = state._flight_keys(key)
    client = redis.Redis.from_url(url)
    client.set(outcome_key, outcome, px=60_000)
    client.set(lock, "someone-else", px=60_000)


@pytest.mark.parametrize(
    "outcome",
    [
        f"d:{HOSTILE}",
        "d:seeded/../../secret/creds",
        "d:/etc/passwd",
        "d:a\nb",
        "f:not json",
        'f:{"status": 200, "code": "ok", "message": "", "headers": {}}',
        'f:{"status": 503, "code": "x", "message": "m", "headers": {"Set-Cookie": "a=b\\r\\nX: y"}}',
        "q:anything",
    ],
)
def test_a_hostile_flight_outcome_in_redis_gives_a_fresh_image(server, tmp_path, outcome, records):
    logger, handler = records
    secret = tmp_path / "secret" / "creds.png"
    secret.parent.mkdir()
    secret.write_bytes(make_png(8, 8))
    store = LocalImageStore(tmp_path / "a" / "images", 100)
    state = instance(server.url, logger, poll_seconds=0.01)
    plant_outcome(server.url, state, "fox-7", outcome)
    asked: list[str] = []

    def load(name: str) -> bytes | None:
        asked.append(name)
        hit = store.load(name)
        return hit[0] if hit else None

    result, shared = state.single_flight("fox-7", lambda: (b"fresh", None), load, lease_seconds=5, timeout=5)
    assert (result, shared) == (b"fresh", False)
    assert asked == []
    assert any("never writes" in line for line in handler.lines)


def test_the_store_never_reads_or_writes_outside_itself(tmp_path):
    secret = tmp_path / "secret" / "creds.png"
    secret.parent.mkdir()
    secret.write_bytes(make_png(8, 8))
    store = LocalImageStore(tmp_path / "a" / "images", 100)
    for name in (HOSTILE, "seeded/../../../secret/creds", str(secret.with_suffix("")), "a/b/c", ".x", ""):
        assert not is_valid_image_name(name)
        assert store.load(name) is None
    assert is_valid_image_name("seeded/a-red-fox-" + "0" * 40)
    assert is_valid_image_name("20261124T211900123456Z-a-red-fox-3f9a1c2b")


def test_the_memory_state_never_loads_a_name():
    # In one instance the winner's result is handed over in memory: no name to trust.
    state = MemoryState(RatePolicy(0, 1))

    def load(name: str) -> bytes:
        raise AssertionError(f"loaded {name!r}")

    assert state.single_flight("k", lambda: (b"fresh", HOSTILE), load, lease_seconds=5, timeout=5) == (b"fresh", False)


# --- end to end: real functions, real Redis ------------------------------------------------------


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    started = FakeRouter(TEST_TOKEN).start()
    yield started
    started.stop()


@pytest.fixture
def functions(tmp_path: Path, router: FakeRouter) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(url: str, **env: str) -> Process:
        settings = {
            "HUGGING_FACE_API_KEY": TEST_TOKEN,
            "HF_ROUTER_URL": router.url,
            "IMAGE_DIR": str(tmp_path / "a" / "images"),
            "STATE_URL": url,
            "MAX_RETRIES": "0",
            "RATE_LIMIT_PER_MINUTE": "0",
            **env,
        }
        process = start_function(settings, tmp_path / f"function-{len(started)}.log")
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def post(function: Process, body: dict) -> requests.Response:
    return requests.post(f"{function.url}/api/generate-image", json=body, timeout=30)


def test_e2e_a_restarted_redis_never_lets_the_limit_be_exceeded(server, functions, router):
    restarted: list[RedisServer] = []
    function = functions(server.url, DAILY_IMAGE_LIMIT=str(LIMIT), STATE_FAILURE="closed")
    answers = [post(function, {"prompt": f"owl {i}"}) for i in range(6)]
    restarted.append(restart_without_persistence(server))
    try:
        answers += [post(function, {"prompt": f"owl {i}"}) for i in range(6, 20)]
    finally:
        restarted[0].stop()
    made = [a for a in answers if a.status_code == 200]
    assert len(made) <= LIMIT
    assert len(router.posts()) == len(made)
    refused = answers[6:]
    assert {(a.status_code, a.json()["code"]) for a in refused} == {(429, "budget_exhausted")}
    assert "lost today's daily image count" in function.log()


def test_e2e_a_hostile_name_in_redis_never_answers_with_that_file(server, functions, router, tmp_path):
    secret = tmp_path / "secret" / "creds.png"
    secret.parent.mkdir()
    secret.write_bytes(make_png(16, 16, color=(1, 2, 3)))  # a sound PNG: only the name check stops it
    function = functions(server.url)
    body = {"prompt": "a red fox", "seed": 7}
    first = post(function, body)
    assert first.status_code == 200 and first.json()["cached"] is False
    client = redis.Redis.from_url(server.url)
    (outcome_key,) = client.keys("{imagegen:flight:*}:result")
    client.set(outcome_key, f"d:{HOSTILE}", px=60_000)
    for stored in (tmp_path / "a" / "images").rglob("*.png"):
        stored.unlink()  # no cache hit: the request goes to the flight and reads the outcome

    second = post(function, body)
    assert second.status_code == 200
    assert second.json()["cached"] is False
    assert base64.b64encode(secret.read_bytes()).decode() not in second.text
    assert str(secret) not in second.text and "secret" not in json.dumps(second.json().get("filePath", ""))
    assert len(router.posts()) == 2  # a fresh image
