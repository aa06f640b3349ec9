"""When and how long to wait before trying Hugging Face again.

Policy as named constants and one function per decision, honouring what the server says
(`Retry-After` in seconds or as an HTTP date, or a 503's `estimated_time`). The clock, the
sleep and the randomness are passed in, so tests drive retry timing with a fake clock.
"""

from __future__ import annotations

import json
import math
import random
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
    """Seconds the server asked us to wait, from Retry-After or a 503's estimated_time."""
    if retry_after:
        retry_after = retry_after.strip()
        if retry_after.isdigit():
            return int(retry_after)
        try:
            when = parsedate_to_datetime(retry_after)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            now = now or datetime.now(timezone.utc)
            return max(0, math.ceil((when - now).total_seconds()))
    try:
        estimated = json.loads(body).get("estimated_time")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(estimated, (int, float)) and not isinstance(estimated, bool) and math.isfinite(estimated) and estimated > 0:
        return min(3600, math.ceil(estimated))
    return None
