"""The local backend's own settings (LOCAL_DEVICE, LOCAL_DTYPE, LOCAL_PRELOAD, LOCAL_QUEUE_MAX),
checked once when the backend is created: a bad value is a ConfigurationError naming the variable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from imagegen.env_values import parse_boolean, parse_choice, parse_number

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float16", "bfloat16", "float32")
DEFAULT_QUEUE_MAX = 8
MAX_QUEUE_MAX = 1000


@dataclass(frozen=True)
class LocalOptions:
    """The local backend's own settings, checked."""

    device: str = "auto"
    dtype: str = "auto"
    preload: bool = False
    queue_max: int = DEFAULT_QUEUE_MAX


def load_local_options(options: Mapping[str, str]) -> LocalOptions:
    """Check the raw LOCAL_* strings; a bad value raises ConfigurationError naming the variable."""
    return LocalOptions(
        device=parse_choice("LOCAL_DEVICE", _given(options, "LOCAL_DEVICE"), DEVICES, default="auto"),
        dtype=parse_choice("LOCAL_DTYPE", _given(options, "LOCAL_DTYPE"), DTYPES, default="auto"),
        preload=parse_boolean("LOCAL_PRELOAD", _given(options, "LOCAL_PRELOAD"), default=False),
        queue_max=int(
            parse_number(
                "LOCAL_QUEUE_MAX", _given(options, "LOCAL_QUEUE_MAX"), DEFAULT_QUEUE_MAX, 0, MAX_QUEUE_MAX, integer=True
            )
        ),
    )


def _given(options: Mapping[str, str], name: str) -> str | None:
    """An option as config reads it: stripped, None when unset or blank."""
    return (options.get(name) or "").strip() or None
