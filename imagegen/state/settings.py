"""The shared-state section of the settings: STATE_URL, STATE_FAILURE, STATE_CLUSTER and the
daily budgets.

`config.load_settings` calls `load_state_settings(get, ...)` with its own `get` (empty values
count as unset), so these variables are read once, with the rest, and a bad value names itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from imagegen.env_values import invalid_setting, parse_boolean, parse_choice, parse_number
from imagegen.state.base import RatePolicy

FAILURE_MODES = ("open", "closed")
STATE_SCHEMES = ("redis", "rediss")
MAX_DAILY_LIMIT = 100_000_000


@dataclass(frozen=True)
class StateSettings:
    """`url` None: this instance counts alone (memory). `failure`: what a request gets while
    Redis does not answer: "open" serves with this instance's own limits, "closed" a 503."""

    rate: RatePolicy
    url: str | None = field(default=None, repr=False)  # may hold a password: never printed
    failure: str = "open"
    cluster: bool = False  # a Redis Cluster (Memorystore for Redis Cluster, Valkey cluster mode)
    daily_image_limit: int = 0  # 0: no limit
    daily_image_limit_per_caller: int = 0  # 0: no limit

    @property
    def safe_url(self) -> str | None:
        """The URL without its password, for messages and logs."""
        return redact_url(self.url) if self.url else None


def load_state_settings(
    get: Callable[[str], str | None], *, rate_limit_per_minute: float, rate_limit_burst: int
) -> StateSettings:
    url = get("STATE_URL")
    if url is not None:
        _check_url(url)
    return StateSettings(
        rate=RatePolicy(per_minute=rate_limit_per_minute, burst=rate_limit_burst),
        url=url,
        failure=parse_choice("STATE_FAILURE", get("STATE_FAILURE"), FAILURE_MODES, default="open"),
        cluster=parse_boolean("STATE_CLUSTER", get("STATE_CLUSTER"), default=False),
        daily_image_limit=_limit("DAILY_IMAGE_LIMIT", get("DAILY_IMAGE_LIMIT")),
        daily_image_limit_per_caller=_limit("DAILY_IMAGE_LIMIT_PER_CALLER", get("DAILY_IMAGE_LIMIT_PER_CALLER")),
    )


def redact_url(url: str) -> str:
    """redis://:secret@10.0.0.3:6379/0 -> redis://***@10.0.0.3:6379/0; the query is dropped too."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unreadable STATE_URL)"
    if ":" in host:
        host = f"[{host}]"
    credentials = "***@" if parts.username or parts.password else ""
    return urlunsplit((parts.scheme, f"{credentials}{host}{port}", parts.path, "", ""))


def _check_url(url: str) -> None:
    expected = "a redis:// or rediss:// URL such as redis://10.0.0.3:6379/0"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise invalid_setting("STATE_URL", redact_url(url), expected) from None
    database = parts.path.lstrip("/")
    if parts.scheme not in STATE_SCHEMES or not parts.hostname or (database and not database.isdigit()):
        raise invalid_setting("STATE_URL", redact_url(url), expected)


def _limit(name: str, raw: str | None) -> int:
    return int(parse_number(name, raw, 0, 0, MAX_DAILY_LIMIT, integer=True))
