"""Shared state in Redis (Memorystore): limits and single-flight that hold across instances.

Imported only when STATE_URL is set, so deployments without it never load redis-py.

Each operation is one Lua script, so it is atomic without read-then-write races, and uses the
server's `TIME`, so instances with skewed clocks agree. Keys expire on their own. The keys of
one script share one hash tag (`{...}`), so they sit in one slot of a Memorystore cluster:

    {imagegen:caller:<h>}:rate                 the caller's token bucket (t: tokens, w: when)
    {imagegen:budget}:all                      the budget record: today's images, all callers
                                               and each caller's, and the record's epoch
    {imagegen:flight:<h>}:lock / :result       single-flight for one cache key
    {imagegen:circuit:<h>}                     one route's circuit breaker (imagegen/route_health.py)

`<h>` is a hash of the caller or cache key: no caller identity is stored in Redis.

Redis holds data, not truth. The budget record is one hash with no expiry, so a `volatile-*`
`maxmemory-policy` (Memorystore's default is volatile-lru) never evicts it and it goes all at
once or not at all. It carries an epoch, a random token written when the record is created:
an instance that saw one epoch and then finds none, or another, knows the counts were lost (a
Redis without persistence restarted, FLUSHALL, an `allkeys-*` eviction). Today's count is then
unknown, so the record marks today untrusted (`s`, the first day whose count is whole): with
STATE_FAILURE=closed every budget-spending request is refused until 00:00 UTC; with "open" the
count starts again from zero and a WARNING says so once. This costs no extra round trip: the
instance sends the epoch it knows with the one budget script. The rate buckets and single-flight
keys keep their expiry: losing them refills a bucket or repeats a generation, nothing worse.
Whatever is read back (a flight's outcome) is checked before use: an image name against the
store's pattern, a failure against the shape of an error.

Every call is bounded (CALL_TIMEOUT_SECONDS to connect and to answer, no retries). When Redis
fails, STATE_FAILURE decides: "open" serves that call from this instance's `MemoryState` and logs
a WARNING at most once a minute; "closed" raises `StateUnavailable` (503). Redis
is left alone for RETRY_AFTER_SECONDS after a few failures in a row, so an outage costs each
request nothing, not 50 ms a call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, Union

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from urllib.parse import unquote, urlsplit

from imagegen.state.single_flight import SingleFlight
from imagegen.errors import StateUnavailable
from imagegen.logs import get_logger
from imagegen.route_health import Admission
from imagegen.state.ratelimit import bucket_decision, rate_limited
from imagegen.state.base import (
    SECONDS_PER_DAY,
    RateDecision,
    RatePolicy,
    Reservation,
    budget_exhausted,
    budget_unknown,
    flight_error,
    flight_failure,
)
from imagegen.state.memory import MemoryState
from imagegen.state.settings import StateSettings, redact_url
from imagegen.storage import is_valid_image_name

T = TypeVar("T")

# Loopback answers in about 0.1 ms and Memorystore in the same region in about 1 ms: 50 ms is
# far above a healthy answer and far below anything a person waiting for an image notices.
CALL_TIMEOUT_SECONDS = 0.05
# After this many failed calls in a row Redis is left alone for RETRY_AFTER_SECONDS: a dead
# Redis then costs a request nothing, while one slow answer (a busy machine, a network blip)
# costs only that call, not a second of fallbacks (or of 503s with STATE_FAILURE=closed).
FAILURES_BEFORE_PAUSE = 3
RETRY_AFTER_SECONDS = 1.0
WARN_EVERY_SECONDS = 60.0
# One per request talking to Redis at the same moment (--concurrency=80 requests share one
# instance, and each call holds a connection for well under a millisecond).
MAX_CONNECTIONS = 64
# How long waiters can still read a finished flight's outcome.
FLIGHT_DONE_TTL_MS = 60_000
FLIGHT_FAILED_TTL_MS = 10_000
DEFAULT_POLL_SECONDS = 0.2
UNAVAILABLE_MESSAGE = "The shared state that enforces this function's limits is not answering. Try again shortly."

# KEYS[1] the bucket; ARGV rate (tokens per second), burst. Same arithmetic as RateLimiter.
RATE_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local saved = redis.call('HMGET', KEYS[1], 't', 'w')
local tokens = tonumber(saved[1]) or burst
local when = tonumber(saved[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - when) * rate)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 't', string.format('%.6f', tokens), 'w', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {allowed, string.format('%.6f', tokens)}
"""

# KEYS[1] the budget record: a hash of e (epoch), s (first day whose count is whole), d (UTC
# day of the counts), n (images today, all callers) and c:<h> (images today, one caller); no
# expiry. ARGV limit for all, limit per caller (0: none), the caller's field, the epoch this
# instance saw last ('' none), a new epoch, '1' to refuse while today is untrusted.
# Returns {1 | 0 (all spent) | -1 (caller's spent) | -2 (today's count lost), day, seconds to
# reset, epoch, first whole day}.
BUDGET_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
local day = math.floor(now / 86400)
local reset = (day + 1) * 86400 - now
local known = ARGV[4]
local saved = redis.call('HMGET', KEYS[1], 'e', 's', 'd', 'n')
local epoch, since = saved[1], tonumber(saved[2])
if not epoch then
  -- No record: this Redis's first use, or its data is gone. An instance that saw a record knows.
  epoch = ARGV[5]
  if known == '' then since = day else since = day + 1 end
  redis.call('HSET', KEYS[1], 'e', epoch, 's', since)
  redis.call('PERSIST', KEYS[1])
elseif known ~= '' and epoch ~= known and (since or 0) <= day then
  -- Made again since this instance last looked: what was counted before it is gone.
  since = day + 1
  redis.call('HSET', KEYS[1], 's', since)
elseif not since then
  since = day + 1
  redis.call('HSET', KEYS[1], 's', since)
end
if tonumber(saved[3]) ~= day then
  -- A new day: yesterday's counts, the callers' included, go at once.
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', since, 'd', day, 'n', 0)
end
if since > day and ARGV[6] == '1' then return {-2, day, reset, epoch, since} end
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local spent = {tonumber(redis.call('HGET', KEYS[1], 'n')) or 0, 0}
if limits[2] > 0 then spent[2] = tonumber(redis.call('HGET', KEYS[1], ARGV[3])) or 0 end
if limits[1] > 0 and spent[1] >= limits[1] then return {0, day, reset, epoch, since} end
if limits[2] > 0 and spent[2] >= limits[2] then return {-1, day, reset, epoch, since} end
redis.call('HINCRBY', KEYS[1], 'n', 1)
if limits[2] > 0 then redis.call('HINCRBY', KEYS[1], ARGV[3], 1) end
return {1, day, reset, epoch, since}
"""

# KEYS as BUDGET_SCRIPT; ARGV the reservation's day, its epoch, the caller's field. Gives back
# only what that day of that record counted.
REFUND_SCRIPT = """
local saved = redis.call('HMGET', KEYS[1], 'e', 'd', 'n', ARGV[3])
if saved[1] ~= ARGV[2] or saved[2] ~= ARGV[1] then return 0 end
if (tonumber(saved[3]) or 0) > 0 then redis.call('HINCRBY', KEYS[1], 'n', -1) end
if (tonumber(saved[4]) or 0) > 0 then redis.call('HINCRBY', KEYS[1], ARGV[3], -1) end
return 1
"""

# KEYS[1] lock, KEYS[2] outcome; ARGV token, lease (ms), mode. Returns {'result', outcome},
# {'won', ''} or {'wait', ''}. A newcomer ("join") ignores an old failure and tries itself; a
# waiter ("poll") takes the failure of the flight it waited on. Whoever finds neither a lock
# nor an outcome takes the lock: that is also how a waiter takes over from a dead winner.
JOIN_SCRIPT = """
local outcome = redis.call('GET', KEYS[2])
if outcome and (ARGV[3] == 'poll' or string.sub(outcome, 1, 2) == 'd:') then
  return {'result', outcome}
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2])
  return {'won', ''}
end
return {'wait', ''}
"""

# KEYS[1] lock; ARGV token, lease (ms). 1 if the lock is still ours and was extended.
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] lock, KEYS[2] outcome; ARGV token, outcome ('' for none), ttl (ms). Records the
# outcome and releases the lock if it is still ours. A stored image is recorded even by a winner
# that lost its lock (it is true); a failure only by the lock's holder.
FINISH_SCRIPT = """
local mine = redis.call('GET', KEYS[1]) == ARGV[1]
if ARGV[2] ~= '' and (mine or string.sub(ARGV[2], 1, 2) == 'd:') then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
if mine then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS[1] one route's circuit: a hash of n (failures in the window), w (window start), o (open
# until), a (opened at), p (probe taken at), all in ms of the server's TIME; it expires on its
# own. ARGV 'check', open (ms), '1' to take a due probe: returns {state, opened at}. ARGV
# 'fail', failures, window (ms), open (ms): returns 1 when this failure opened the circuit (a
# failure while open or probing reopens it). ARGV 'ok': deletes it.
CIRCUIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'ok' then
  redis.call('DEL', KEYS[1])
  return 0
end
local saved = redis.call('HMGET', KEYS[1], 'n', 'w', 'o', 'a', 'p')
local opened = tonumber(saved[3])
if ARGV[1] == 'check' then
  if not opened then return {'closed', '0'} end
  local probe = tonumber(saved[5])
  if now < opened or (probe and now - probe < tonumber(ARGV[2])) then return {'open', saved[4]} end
  if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'p', now) end
  return {'probe', saved[4]}
end
local failures, window, open = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local n, since = tonumber(saved[1]) or 0, tonumber(saved[2]) or now
if not opened and now - since > window then n, since = 0, now end
n = n + 1
redis.call('HSET', KEYS[1], 'n', n, 'w', since)
local opens = 0
if opened or n >= failures then
  redis.call('HSET', KEYS[1], 'o', now + open, 'a', now)
  redis.call('HDEL', KEYS[1], 'p')
  opens = 1
end
redis.call('PEXPIRE', KEYS[1], window + 2 * open)
return opens
"""

SCRIPTS = {
    "rate": RATE_SCRIPT,
    "budget": BUDGET_SCRIPT,
    "refund": REFUND_SCRIPT,
    "join": JOIN_SCRIPT,
    "renew": RENEW_SCRIPT,
    "finish": FINISH_SCRIPT,
    "circuit": CIRCUIT_SCRIPT,
}
Client = Union[redis.Redis, redis.RedisCluster]
# What a call to Redis may raise when Redis is down, slow or confused: each means "unavailable".
FAILURES = (RedisError, RedisClusterException, OSError)


class _Unavailable(Exception):
    """Redis failed and STATE_FAILURE=open: the caller falls back to memory."""


def connect(url: str, timeout: float = CALL_TIMEOUT_SECONDS, *, cluster: bool = False) -> redis.Redis | redis.RedisCluster:
    """A client whose every call ends within about `timeout`: no retries, no health checks.

    Connects on first use, not here: a cold start does not wait for Redis (a cluster client
    reads the slot map at once, bounded by the same timeout; a failure then is raised here).
    """
    if cluster:
        return redis.RedisCluster.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=MAX_CONNECTIONS,
            client_name="imagegen",
        )
    pool = redis.BlockingConnectionPool.from_url(
        url,
        # Waits at most `timeout` for a free connection rather than failing at once when
        # MAX_CONNECTIONS requests talk to Redis at the same moment.
        timeout=timeout,
        max_connections=MAX_CONNECTIONS,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        client_name="imagegen",
    )
    return redis.Redis(connection_pool=pool)


class RedisState:
    where = "redis"

    def __init__(
        self,
        client: Client | Callable[[], Client],
        rate: RatePolicy,
        daily_image_limit: int = 0,
        daily_image_limit_per_caller: int = 0,
        *,
        failure: str = "open",
        fallback: MemoryState | None = None,
        safe_url: str | None = None,
        namespace: str = "imagegen",
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_seconds: float = DEFAULT_POLL_SECONDS,
        password: str | None = None,
    ) -> None:
        # A client, or how to make one on first use (a cluster client connects when it is made).
        self._connect = client if callable(client) and not isinstance(client, (redis.Redis, redis.RedisCluster)) else None
        self._client: Client | None = None if self._connect else client
        self._client_lock = threading.Lock()
        self._scripts = {name: _script(text) for name, text in SCRIPTS.items()}
        self._password = password
        self._rate = rate
        self._daily_limit = daily_image_limit
        self._daily_limit_per_caller = daily_image_limit_per_caller
        self._failure = failure
        self._fallback = fallback or MemoryState(rate, daily_image_limit, daily_image_limit_per_caller)
        self._safe_url = safe_url or (_address(client) if self._client is not None else "redis")
        self._namespace = namespace
        self._logger = logger or get_logger()
        self._clock = clock
        self._sleep = sleep
        self._poll_seconds = poll_seconds
        self._down_until = float("-inf")
        self._failures = 0  # in a row; a success starts over
        self._warned_at = float("-inf")
        self._warn_lock = threading.Lock()
        self._local: SingleFlight[Any] = SingleFlight()
        self._epoch = ""  # the budget record's epoch as last seen: its change means data was lost
        self._losses_told: set[tuple[str, int]] = set()
        self._distrust_told = False
        self._policy_checked = False

    @classmethod
    def from_settings(cls, settings: StateSettings, **options: Any) -> RedisState:
        url = settings.url
        assert url is not None
        return cls(
            lambda: connect(url, cluster=settings.cluster),
            settings.rate,
            settings.daily_image_limit,
            settings.daily_image_limit_per_caller,
            failure=settings.failure,
            safe_url=redact_url(url),
            password=urlsplit(url).password,
            **options,
        )

    # --- the rate limit ---------------------------------------------------------------------

    def take_rate(self, caller: str) -> RateDecision | None:
        if not self._rate.enabled:
            return None
        per_second = self._rate.per_minute / 60
        try:
            allowed, tokens = self._run("rate", [self._caller_key(caller) + ":rate"], [per_second, self._rate.burst])
        except _Unavailable:
            return self._fallback.take_rate(caller)
        tokens = float(tokens)
        decision = bucket_decision(tokens, self._rate.burst, per_second, refused=not allowed)
        if not allowed:
            raise rate_limited(self._rate.per_minute, self._rate.burst, decision)
        return decision

    # --- daily budgets ----------------------------------------------------------------------

    def reserve(self, caller: str) -> Reservation:
        if not (self._daily_limit or self._daily_limit_per_caller):
            return Reservation(caller, int(time.time() // SECONDS_PER_DAY), counted=False, where=self.where)
        try:
            verdict, day, reset, epoch, since = self._run(
                "budget",
                [self._budget_key()],
                [
                    self._daily_limit,
                    self._daily_limit_per_caller,
                    self._caller_field(caller),
                    self._epoch,
                    secrets.token_hex(8),
                    "1" if self._failure == "closed" else "0",
                ],
            )
        except _Unavailable:
            return self._fallback.reserve(caller)
        epoch = epoch.decode() if isinstance(epoch, bytes) else str(epoch)
        self._epoch = epoch
        retry_after = max(1, int(reset))
        if int(since) > int(day):
            self._count_lost(epoch, int(since))
        if verdict == -2:
            raise budget_unknown(retry_after)
        if verdict == 0:
            raise budget_exhausted(False, self._daily_limit, retry_after)
        if verdict == -1:
            raise budget_exhausted(True, self._daily_limit_per_caller, retry_after)
        return Reservation(caller, int(day), counted=True, where=self.where, epoch=epoch)

    def refund(self, reservation: Reservation) -> None:
        if not reservation.counted:
            return
        if reservation.where != self.where:
            self._fallback.refund(reservation)
            return
        try:
            self._run(
                "refund",
                [self._budget_key()],
                [reservation.day, reservation.epoch, self._caller_field(reservation.caller)],
            )
        except (_Unavailable, StateUnavailable):
            pass  # the unit stays spent: the budget errs on the side of the owner's bill

    def _count_lost(self, epoch: str, since: int) -> None:
        """Says once per loss that today's count is gone, and what this instance does about it."""
        with self._warn_lock:
            if (epoch, since) in self._losses_told:
                return
            self._losses_told.add((epoch, since))
        if self._failure == "closed":
            then = "refusing every image that would count against a daily budget until 00:00 UTC"
        else:
            then = "counting again from zero, so today's budget may be exceeded"
        self._logger.warning(
            "Shared state at %s lost today's daily image count (a Redis without persistence restarted, "
            "was flushed, or evicted the budget record); %s (STATE_FAILURE=%s). A hard budget needs "
            "Redis with persistence or replication (Memorystore Standard tier, RDB or AOF).",
            self._safe_url,
            then,
            self._failure,
        )

    # --- single-flight ----------------------------------------------------------------------

    def single_flight(
        self,
        key: str,
        produce: Callable[[], tuple[T, str | None]],
        load: Callable[[str], T | None],
        *,
        lease_seconds: float,
        timeout: float,
    ) -> tuple[T, bool]:
        # The in-process flight goes first: one instance puts at most one waiter per key on Redis.
        (result, shared_remotely), shared_locally = self._local.do(
            key, lambda: self._shared_flight(key, produce, load, lease_seconds, timeout), timeout
        )
        return result, shared_locally or shared_remotely

    def _shared_flight(
        self,
        key: str,
        produce: Callable[[], tuple[T, str | None]],
        load: Callable[[str], T | None],
        lease_seconds: float,
        timeout: float,
    ) -> tuple[T, bool]:
        lock, outcome_key = self._flight_keys(key)
        token = secrets.token_hex(16)
        lease_ms = max(1, int(lease_seconds * 1000))
        deadline = self._clock() + timeout
        mode = "join"
        while True:
            try:
                verdict, outcome = self._run("join", [lock, outcome_key], [token, lease_ms, mode])
            except _Unavailable:
                return produce()[0], False  # open: this instance generates on its own
            if verdict == b"won":
                return self._win(lock, outcome_key, token, lease_ms, produce), False
            if verdict == b"result":
                read = _read_outcome(outcome)
                if isinstance(read, str):
                    loaded = load(read)
                    if loaded is not None:
                        return loaded, True
                    return produce()[0], False  # the stored image is gone: make it again
                if read is None:
                    self._distrust("a single-flight outcome")
                    return produce()[0], False  # not an outcome we could have written
                raise flight_error(read)
            if self._clock() >= deadline:
                raise TimeoutError(f"the identical request in flight did not finish within {timeout:g} s")
            self._sleep(min(self._poll_seconds, max(0.0, deadline - self._clock())))
            mode = "poll"

    def _win(self, lock: str, outcome_key: str, token: str, lease_ms: int, produce: Callable[[], tuple[T, str | None]]) -> T:
        stop = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(lock, token, lease_ms, stop), name="imagegen-lease", daemon=True
        )
        renewer.start()
        outcome, ttl = "", FLIGHT_FAILED_TTL_MS
        try:
            result, name = produce()
            if name is not None:
                outcome, ttl = "d:" + name, FLIGHT_DONE_TTL_MS
            return result
        except BaseException as error:
            failure = flight_failure(error)
            if failure is not None:
                outcome = "f:" + json.dumps(failure)
            raise
        finally:
            stop.set()
            renewer.join()
            try:
                self._call("finish", [lock, outcome_key], [token, outcome, ttl])
            except FAILURES as error:
                # Waiters take over when the lease runs out; the answer here is ready regardless.
                self._warn(error)

    def _renew(self, lock: str, token: str, lease_ms: int, stop: threading.Event) -> None:
        """Extends the lease every third of it while the winner generates."""
        while not stop.wait(lease_ms / 3000):
            try:
                if not self._call("renew", [lock], [token, lease_ms]):
                    return  # the lock is someone else's now: nothing left to keep
            except FAILURES as error:
                self._warn(error)  # try again next time; the lease still has two thirds left

    # --- circuits: routes out of rotation for every instance -------------------------------
    # A circuit is advice, not a limit: when Redis does not answer, this instance's own memory
    # decides, whatever STATE_FAILURE says.

    def circuit_check(self, route: str, open_seconds: float, claim: bool = True) -> Admission:
        try:
            state, opened_at = self._run(
                "circuit", [self._circuit_key(route)], ["check", int(open_seconds * 1000), "1" if claim else "0"]
            )
        except (_Unavailable, StateUnavailable):
            return self._fallback.circuit_check(route, open_seconds, claim)
        state = state.decode() if isinstance(state, bytes) else str(state)
        if state not in ("closed", "open", "probe"):
            self._distrust("a circuit")
            return Admission("closed")
        return Admission(state, float(opened_at or 0) / 1000)

    def circuit_failed(self, route: str, failures: int, window_seconds: float, open_seconds: float) -> bool:
        try:
            return bool(
                self._run(
                    "circuit",
                    [self._circuit_key(route)],
                    ["fail", failures, int(window_seconds * 1000), int(open_seconds * 1000)],
                )
            )
        except (_Unavailable, StateUnavailable):
            return self._fallback.circuit_failed(route, failures, window_seconds, open_seconds)

    def circuit_succeeded(self, route: str) -> None:
        try:
            self._run("circuit", [self._circuit_key(route)], ["ok"])
        except (_Unavailable, StateUnavailable):
            self._fallback.circuit_succeeded(route)

    # --- Redis calls and what happens when they fail ----------------------------------------

    def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """One script on Redis, connecting first if need be; raises what Redis raised."""
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    assert self._connect is not None
                    self._client = self._connect()
                client = self._client
        return self._scripts[script](keys, args, client=client)

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """`_call` under the failure policy: the answer, or `_Unavailable` / `StateUnavailable`."""
        if self._clock() < self._down_until:
            return self._unavailable(None)
        try:
            result = self._call(script, keys, args)
        except FAILURES as error:
            self._failures += 1
            if self._failures >= FAILURES_BEFORE_PAUSE:
                self._down_until = self._clock() + RETRY_AFTER_SECONDS
            return self._unavailable(error)
        self._failures = 0
        if not self._policy_checked:
            self._check_eviction_policy()
        return result

    def _check_eviction_policy(self) -> None:
        """Once, after the first answer: says whether Redis may evict the budget record.

        It has no expiry, so `noeviction` and every `volatile-*` policy keep it; an `allkeys-*`
        policy may evict it, and then the day's count is lost (and, closed, the rest of the day
        refused). Memorystore refuses CONFIG: then this says what the instance needs.
        """
        self._policy_checked = True
        if not (self._daily_limit or self._daily_limit_per_caller):
            return
        assert self._client is not None
        try:
            answer = self._client.config_get("maxmemory-policy")
        except FAILURES as error:
            self._logger.info(
                "Shared state at %s did not say its maxmemory-policy (%s; Memorystore refuses CONFIG). "
                "The daily budgets need noeviction or a volatile-* policy (Memorystore's default, "
                "volatile-lru, is right), never allkeys-*.",
                self._safe_url,
                type(error).__name__,
            )
            return
        policies = sorted(_policies(answer))
        evicting = [policy for policy in policies if policy.startswith("allkeys")]
        if evicting:
            self._logger.warning(
                "Shared state at %s has maxmemory-policy %s, which may evict the daily budget record "
                "and lose today's count; set noeviction or volatile-lru (Memorystore: gcloud redis "
                "instances update --update-redis-config maxmemory-policy=volatile-lru).",
                self._safe_url,
                ", ".join(evicting),
            )
        elif policies:
            self._logger.info(
                "Shared state at %s has maxmemory-policy %s, which keeps the daily budget record.",
                self._safe_url,
                ", ".join(policies),
            )

    def _distrust(self, what: str) -> None:
        """Something read from Redis that this code never writes: said once, then ignored."""
        if self._distrust_told:
            return
        self._distrust_told = True
        self._logger.warning(
            "Shared state at %s held %s this function never writes; ignored (is anything else writing "
            "to this Redis?). Said once.",
            self._safe_url,
            what,
        )

    def _unavailable(self, error: BaseException | None) -> Any:
        if error is not None:
            self._warn(error)
        if self._failure == "closed":
            raise StateUnavailable(UNAVAILABLE_MESSAGE, headers={"Retry-After": "5"})
        raise _Unavailable

    def _warn(self, error: BaseException) -> None:
        now = self._clock()
        with self._warn_lock:
            if now - self._warned_at < WARN_EVERY_SECONDS:
                return
            self._warned_at = now
        then = "serving with this instance's own limits" if self._failure == "open" else "answering 503"
        self._logger.warning(
            "Shared state at %s did not answer (%s: %s); %s (STATE_FAILURE=%s). Said at most once a minute.",
            self._safe_url,
            type(error).__name__,
            self._scrub(str(error)),
            then,
            self._failure,
        )

    def _scrub(self, text: str) -> str:
        # As written in the URL (percent-encoded) and as sent to Redis.
        secrets_ = {self._password, unquote(self._password or ""), _connection_kwargs(self._client).get("password") if self._client else None}
        for secret in filter(None, secrets_):
            text = text.replace(secret, "***")
        return text

    # --- keys -------------------------------------------------------------------------------

    def _caller_key(self, caller: str) -> str:
        return "{%s:caller:%s}" % (self._namespace, _digest(caller))

    def _budget_key(self) -> str:
        return "{%s:budget}:all" % self._namespace

    @staticmethod
    def _caller_field(caller: str) -> str:
        return f"c:{_digest(caller)}"

    def _circuit_key(self, route: str) -> str:
        return "{%s:circuit:%s}" % (self._namespace, _digest(route))

    def _flight_keys(self, key: str) -> tuple[str, str]:
        tag = "{%s:flight:%s}" % (self._namespace, _digest(key))
        return f"{tag}:lock", f"{tag}:result"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _script(text: str) -> Script:
    """A script with no client of its own: every call names the client (EVALSHA, then EVAL and
    load once when the server has not seen it)."""
    return Script(None, text.encode())


def _connection_kwargs(client: redis.Redis | redis.RedisCluster) -> dict[str, Any]:
    if isinstance(client, redis.RedisCluster):
        return client.nodes_manager.connection_kwargs
    return client.connection_pool.connection_kwargs


def _address(client: redis.Redis | redis.RedisCluster) -> str:
    """redis://host:port/db of a client, for messages: never its password."""
    if isinstance(client, redis.RedisCluster):
        node = client.get_default_node()
        return f"redis://{node.host}:{node.port} (cluster)" if node else "redis (cluster)"
    kwargs = client.connection_pool.connection_kwargs
    scheme = "rediss" if client.connection_pool.connection_class is redis.SSLConnection else "redis"
    return f"{scheme}://{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"


def _policies(answer: Any) -> set[str]:
    """The maxmemory-policy values in a CONFIG GET answer: one node's dict, or a cluster's
    dict of them."""
    found: set[str] = set()
    if isinstance(answer, dict):
        for name, value in answer.items():
            if isinstance(value, dict):
                found |= _policies(value)
            elif _text(name) == "maxmemory-policy":
                found.add(_text(value))
    return found


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# The longest outcome this code writes is an error's public parts; anything far longer is not ours.
MAX_OUTCOME_BYTES = 16_384


def _read_outcome(outcome: Any) -> str | dict[str, Any] | None:
    """A flight's outcome as read back: the stored image's name (checked against the store's
    pattern, so it can never name another file), the winner's failure (checked to be the
    shape `flight_failure` writes), or None for anything else."""
    if not isinstance(outcome, bytes) or len(outcome) > MAX_OUTCOME_BYTES:
        return None
    try:
        text = outcome.decode()
    except UnicodeDecodeError:
        return None
    if text.startswith("d:"):
        return text[2:] if is_valid_image_name(text[2:]) else None
    if not text.startswith("f:"):
        return None
    try:
        failure = json.loads(text[2:])
    except ValueError:
        return None
    return failure if _is_failure(failure) else None


def _is_failure(failure: Any) -> bool:
    if not isinstance(failure, dict):
        return False
    status, code, message, headers = (failure.get(k) for k in ("status", "code", "message", "headers"))
    return (
        isinstance(status, int)
        and 400 <= status <= 599
        and isinstance(code, str)
        and re.fullmatch(r"[a-z_]{1,64}", code) is not None
        and isinstance(message, str)
        and len(message) <= 2000
        and isinstance(headers, dict)
        and all(
            isinstance(k, str) and isinstance(v, str) and _HEADER_NAME.fullmatch(k) and _HEADER_VALUE.fullmatch(v)
            for k, v in headers.items()
        )
    )


# The fields an error may carry back: a token name, and a value without control characters.
_HEADER_NAME = re.compile(r"[A-Za-z0-9-]{1,64}")
_HEADER_VALUE = re.compile(r"[\x20-\x7e]{0,256}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]
