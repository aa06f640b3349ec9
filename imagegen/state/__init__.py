"""Rate limit, daily budgets and single-flight: for this instance alone, or for all of them.

Without STATE_URL, `make_state` returns `MemoryState` (what every deployment did before).
With it, `RedisState`, which counts in Redis for every instance and falls back to memory (or
answers 503, STATE_FAILURE=closed) while Redis does not answer. redis-py is imported then only.
"""

from __future__ import annotations

import logging

from imagegen.state.base import (
    RateDecision,
    RatePolicy,
    Reservation,
    SharedState,
    rate_limit_headers,
)
from imagegen.state.settings import StateSettings, load_state_settings

__all__ = [
    "RateDecision",
    "RatePolicy",
    "Reservation",
    "SharedState",
    "StateSettings",
    "load_state_settings",
    "make_state",
    "rate_limit_headers",
]


def make_state(settings: StateSettings, *, logger: logging.Logger | None = None) -> SharedState:
    """The state for a process, built once at start. Connects to Redis on first use, not here."""
    from imagegen.state.memory import MemoryState

    memory = MemoryState(settings.rate, settings.daily_image_limit, settings.daily_image_limit_per_caller)
    if settings.url is None:
        return memory
    from imagegen.state.redis import RedisState

    return RedisState.from_settings(settings, fallback=memory, logger=logger)
