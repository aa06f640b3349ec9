"""Reading one setting's text: numbers, booleans and choices, each refusing a bad value with a
`ConfigurationError` that names the variable. config.py, the state settings and backends that
read their own variables (the local model) all use these, so every setting is refused in the
same words.

`raw` is the value as config's `get` gives it: stripped, and None when unset or empty.
"""

from __future__ import annotations

import math

from imagegen.errors import ConfigurationError

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def invalid_setting(name: str, value: str, expected: str) -> ConfigurationError:
    return ConfigurationError(
        f"Environment variable {name} is invalid: expected {expected}, got {value!r}.",
        code="invalid_configuration",
    )


def parse_number(
    name: str, raw: str | None, default: float, low: float, high: float, *, integer: bool = False
) -> float:
    if raw is None:
        return default
    kind = "an integer" if integer else "a number"
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise invalid_setting(name, raw, f"{kind} from {low:g} to {high:g}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise invalid_setting(name, raw, f"{kind} from {low:g} to {high:g}")
    return value


def parse_boolean(name: str, raw: str | None, default: bool) -> bool:
    if raw is None:
        return default
    value = raw.lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise invalid_setting(name, raw, "true or false")


def parse_choice(name: str, raw: str | None, choices: tuple[str, ...], default: str | None = None) -> str:
    """One of `choices` (compared in lower case); `default` when unset."""
    if raw is None and default is not None:
        return default
    value = (raw or "").lower()
    if value not in choices:
        raise invalid_setting(name, raw or "", "one of " + ", ".join(choices))
    return value
