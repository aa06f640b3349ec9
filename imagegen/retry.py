"""When and how long to wait before trying an upstream again.

Policy as named constants and one function per decision, honouring what the server says
(`Retry-After` in seconds or as an HTTP date, a 503's `estimated_time`, a `retry-after-ms`
header, a Google API error's `RetryInfo.retryDelay`, a JSON body's `retry_after`), all of it
untrusted text: parsed by bounded patterns and clamped. The clock, the
sleep and the randomness are passed in, so tests drive retry timing with a fake clock.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
INITIAL_RETRY_DELAY_SECONDS = 1.0
MAX_RETRY_DELAY_SECONDS = 30.0
# Starting an attempt with less time than this left is pointless: no image comes that fast.
MIN_ATTEMPT_SECONDS = 2.0


@dataclass(frozen=True)
class Timing:
    """The side effects of waiting, swappable in tests."""

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    random: Callable[[], float] = field(default=random.random)


def backoff_delay(retry_number: int, server_delay: float | None, rand: float) -> float:
    """Seconds before retry number `retry_number` (1, 2, ...).

    The server's own delay wins when it gave one; otherwise exponential backoff with jitter
    (half fixed, half random) so that many instances do not retry in lockstep.
    """
    if server_delay is not None:
        return server_delay
    ceiling = min(MAX_RETRY_DELAY_SECONDS, INITIAL_RETRY_DELAY_SECONDS * 2 ** (retry_number - 1))
    return ceiling * (0.5 + rand / 2)


def server_delay_seconds(retry_after: str | None, body: bytes, now: datetime | None = None) -> int | None:
    """Seconds the server asked us to wait, from Retry-After or a 503's estimated_time.

    Both are untrusted: only ASCII digits of bounded length count as seconds ("²".isdigit() is
    true, and int() refuses more than 4,300 digits), a date must parse, and the answer is
    clamped to `MAX_SERVER_DELAY_SECONDS`.
    """
    if retry_after:
        retry_after = retry_after.strip()
        if _SECONDS.fullmatch(retry_after):
            return min(MAX_SERVER_DELAY_SECONDS, int(retry_after))
        when = _http_date(retry_after)
        if when is not None:
            now = now or datetime.now(timezone.utc)
            return _clamp_seconds(math.ceil((when - now).total_seconds()))
    estimated = (_json_object(body) or {}).get("estimated_time")
    if _is_finite_number(estimated) and estimated > 0:
        return _clamp_seconds(math.ceil(estimated))
    return None


def retry_after_ms(value: str | None) -> float | None:
    """Seconds from a `retry-after-ms` header ("1500", "250.5"), or None for junk."""
    if not value or not _MILLISECONDS.fullmatch(value := value.strip()):
        return None
    return _clamp_seconds(float(value) / 1000)


def retry_info_delay(body: bytes) -> float | None:
    """Seconds from a Google API error's `google.rpc.RetryInfo` detail ("retryDelay": "26s").

    The body is `{"error": {"code", "message", "status", "details": [{"@type":
    "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1.5s"}, ...]}}`; the delay is
    a protobuf Duration in JSON: decimal seconds, up to nine fractional digits, then "s".
    """
    error = (_json_object(body) or {}).get("error")
    details = error.get("details") if isinstance(error, dict) else None
    if not isinstance(details, list):
        return None
    for detail in details[:_MAX_DETAILS]:
        if not isinstance(detail, dict) or not str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            continue
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and (match := _DURATION.fullmatch(delay.strip())):
            return _clamp_seconds(float(match.group(1)))
    return None


def body_retry_after(body: bytes) -> float | None:
    """Seconds from a 429 JSON body's `retry_after` (a number of seconds), or None."""
    value = (_json_object(body) or {}).get("retry_after")
    if isinstance(value, str) and _DECIMAL_SECONDS.fullmatch(value.strip()):
        value = float(value)
    return _clamp_seconds(value) if _is_finite_number(value) else None


# Upstream waits are hints: more than an hour is never worth honouring (the deadline ends
# the request long before), and clamping keeps every later calculation small.
MAX_SERVER_DELAY_SECONDS = 3600
# Error bodies are read only this far: a delay hint is never worth parsing megabytes for.
_MAX_BODY_BYTES = 256 * 1024
_MAX_DETAILS = 32
_SECONDS = re.compile(r"[0-9]{1,10}", re.ASCII)
_DECIMAL_SECONDS = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,9})?", re.ASCII)
_MILLISECONDS = re.compile(r"[0-9]{1,13}(?:\.[0-9]{1,6})?", re.ASCII)
_DURATION = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)s", re.ASCII)
_MAX_HTTP_DATE_CHARS = 64


def _clamp_seconds(value: float) -> int | float:
    return max(0, min(MAX_SERVER_DELAY_SECONDS, value))


def _is_finite_number(value: object) -> bool:
    # Not math.isfinite on an int: JSON gives ints of thousands of digits, too large for a float.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _http_date(text: str) -> datetime | None:
    """An IMF-fixdate (or the obsolete forms parsedate accepts) as an aware datetime, or None."""
    if len(text) > _MAX_HTTP_DATE_CHARS or not text.isascii():
        return None
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _json_object(body: bytes) -> dict | None:
    if not body or len(body) > _MAX_BODY_BYTES:
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
