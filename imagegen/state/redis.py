"""Shared state in Redis (Memorystore): limits and single-flight that hold across instances.

Imported only when STATE_URL is set, so deployments without it never load redis-py.

Each operation is one Lua script, so it is atomic without read-then-write races, and uses the
server's `TIME`, so instances with skewed clocks agree. Keys expire on their own. The keys of
one script share one hash tag (`{...}`), so they sit in one slot of a Memorystore cluster:

    {imagegen:caller:<h>}:rate                 the caller's token bucket (t: tokens, w: when)
    {imagegen:budget}:all                      today's images, all callers (d: UTC day, n: count)
    {imagegen:budget}:caller:<h>               today's images of one caller
    {imagegen:flight:<h>}:lock / :result       single-flight for one cache key

`<h>` is a hash of the caller or cache key: no caller identity is stored in Redis. The two
budget counters share one tag because one script checks both; they are small and touched once
per generated image, so one slot carries them easily.

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
from imagegen.state.ratelimit import bucket_decision, rate_limited
from imagegen.state.base import (
    SECONDS_PER_DAY,
    RateDecision,
    RatePolicy,
    Reservation,
    budget_exhausted,
    flight_error,
    flight_failure,
)
from imagegen.state.memory import MemoryState
from imagegen.state.settings import StateSettings, redact_url

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
# Budget counters outlive their day by this much, so a refund just after midnight finds the
# key and sees that its day is over (then gives nothing back).
DAY_MARGIN_SECONDS = 3600
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

# KEYS[1] all callers, KEYS[2] this caller; ARGV limit for all, limit per caller (0: none),
# margin. Counters carry their UTC day, so a counter from yesterday counts as zero at once,
# whatever its expiry. Returns {1 | 0 (all spent) | -1 (caller's spent), day, seconds to reset}.
BUDGET_SCRIPT = """
local now = tonumber(redis.call('TIME')[1])
local day = math.floor(now / 86400)
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local spent = {0, 0}
for i = 1, 2 do
  local saved = redis.call('HMGET', KEYS[i], 'd', 'n')
  if tonumber(saved[1]) == day then spent[i] = tonumber(saved[2]) or 0 end
end
local reset = (day + 1) * 86400 - now
if limits[1] > 0 and spent[1] >= limits[1] then return {0, day, reset} end
if limits[2] > 0 and spent[2] >= limits[2] then return {-1, day, reset} end
for i = 1, 2 do
  if limits[i] > 0 then
    redis.call('HSET', KEYS[i], 'd', day, 'n', spent[i] + 1)
    redis.call('EXPIREAT', KEYS[i], (day + 1) * 86400 + tonumber(ARGV[3]))
  end
end
return {1, day, reset}
"""

# KEYS as BUDGET_SCRIPT; ARGV the reservation's day. Gives back only what that day counted.
REFUND_SCRIPT = """
for i = 1, 2 do
  local saved = redis.call('HMGET', KEYS[i], 'd', 'n')
  if saved[1] == ARGV[1] and (tonumber(saved[2]) or 0) > 0 then
    redis.call('HINCRBY', KEYS[i], 'n', -1)
  end
end
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


SCRIPTS = {
    "rate": RATE_SCRIPT,
    "budget": BUDGET_SCRIPT,
    "refund": REFUND_SCRIPT,
    "join": JOIN_SCRIPT,
    "renew": RENEW_SCRIPT,
    "finish": FINISH_SCRIPT,
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
            verdict, day, reset = self._run(
                "budget",
                self._budget_keys(caller),
                [self._daily_limit, self._daily_limit_per_caller, DAY_MARGIN_SECONDS],
            )
        except _Unavailable:
            return self._fallback.reserve(caller)
        if verdict == 0:
            raise budget_exhausted(False, self._daily_limit, max(1, int(reset)))
        if verdict == -1:
            raise budget_exhausted(True, self._daily_limit_per_caller, max(1, int(reset)))
        return Reservation(caller, int(day), counted=True, where=self.where)

    def refund(self, reservation: Reservation) -> None:
        if not reservation.counted:
            return
        if reservation.where != self.where:
            self._fallback.refund(reservation)
            return
        try:
            self._run("refund", self._budget_keys(reservation.caller), [reservation.day])
        except (_Unavailable, StateUnavailable):
            pass  # the unit stays spent: the budget errs on the side of the owner's bill

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
                text = outcome.decode()
                if text.startswith("d:"):
                    loaded = load(text[2:])
                    if loaded is not None:
                        return loaded, True
                    return produce()[0], False  # the stored image is gone: make it again
                raise flight_error(json.loads(text[2:]))
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
        return result

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

    def _budget_keys(self, caller: str) -> list[str]:
        tag = "{%s:budget}" % self._namespace
        return [f"{tag}:all", f"{tag}:caller:{_digest(caller)}"]

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


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]
