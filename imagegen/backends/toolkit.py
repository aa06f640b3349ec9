"""What every image backend needs besides its vendor's wire format.

A backend module holds only what is particular to its vendor (the URL, the body, where the
image sits in the answer, how refusals are spelled). The rest is here, once:

- `require_key`: the credential, or a ConfigurationError naming the variable to set.
- `reading_answer`: the one place a vendor's answer becomes untrusted input. Whatever goes
  wrong while reading it (a missing key, a list where an object should be, JSON nested
  100,000 deep, base64 that is not, bytes that are not an image) is a 502 `BadAnswer` that
  the dispatcher fails over on, never a 500. Refusals and other `ImageGenError`s pass through.
- `read_json`, `json_object`, `b64_image`, `first_b64_image`: readers that say what came
  instead of what they expected (`Unusable`), for `reading_answer` to word.
- `poll_until`: a task polled until it is done, within the generation's deadline, woken at
  once when the caller leaves (`context.wait`), reporting progress as it goes.
- `report_progress`: the documented `progress` event, {"step", "steps", "fraction"}.
- `to_png`: the image as a checked PNG, its decoding waiting for memory no longer than the
  generation has left.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pybase64

from imagegen.backends.base import GenerationContext
from imagegen.outbound import BadDownload
from imagegen.backends.vendor import CallContext
from imagegen.config import BackendSettings
from imagegen.errors import BadAnswer, ConfigurationError, ImageGenError
from imagegen.embedded import EmbeddedBase64, take_remembered_json
from imagegen.images import NotAnImage, describe_non_image, ensure_png, remember_check

State = TypeVar("State")

# What reading a malformed answer raises. LookupError: KeyError, IndexError. ValueError:
# json's decode error, binascii.Error, UnicodeDecodeError, NotAnImage, BadDownload, Unusable.
# RecursionError: json.loads (or str()) of deeply nested arrays.
SHAPE_ERRORS: tuple[type[BaseException], ...] = (LookupError, TypeError, AttributeError, ValueError, RecursionError)
MAX_WHAT_CAME_CHARS = 120


class Unusable(ValueError):
    """What a vendor's answer held instead of what a reader expected; the message says what
    came, in words safe to show (`reading_answer` turns it into a BadAnswer)."""


def require_key(section: BackendSettings, *, variable: str, what: str, how: str) -> str:
    """The section's credential, or a ConfigurationError (missing_api_key) that says which
    variable to set and where to get a value: "The server has no {what}: set {variable} to {how}."."""
    if not section.api_key:
        raise ConfigurationError(f"The server has no {what}: set {variable} to {how}.", code="missing_api_key")
    return section.api_key


@contextmanager
def reading_answer(call: CallContext, advice: str = "try another model") -> Iterator[None]:
    """Read a vendor's answer inside this block: any shape error becomes a BadAnswer (502,
    upstream_bad_response, fail over) worded for the vendor; project errors pass through."""
    try:
        yield
    except ImageGenError:
        raise
    except SHAPE_ERRORS as error:
        raise bad_answer(call, what_came(error, call), advice) from None


def bad_answer(call: CallContext, what: str, advice: str = "try another model") -> BadAnswer:
    error = call.error(
        BadAnswer,
        f"{call.vendor.name} answered without a usable image (got {what}). Try again; if it persists, {advice}",
        fail_over=True,
    )
    assert isinstance(error, BadAnswer)
    return error


def what_came(error: BaseException, call: CallContext) -> str:
    """A reader's own words (scrubbed, then cut: they may quote the answer); for anything else
    only the kind of error, never upstream text."""
    if isinstance(error, RecursionError):
        return "JSON nested too deeply"
    if isinstance(error, (Unusable, NotAnImage, BadDownload)):
        return call.quote(str(error), MAX_WHAT_CAME_CHARS)
    return f"an answer of an unexpected shape ({type(error).__name__})"


def read_json(body: bytes) -> Any:
    """The answer as JSON, or Unusable saying what it was instead. A body whose base64 images
    were decoded while it arrived (outbound.read_body) is parsed without them."""
    embedded = take_remembered_json(body)
    try:
        return embedded.parse() if embedded is not None else json.loads(body)
    except RecursionError:
        raise Unusable("JSON nested too deeply") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an integer too long to read
        raise Unusable(_not_json(body)) from None


def json_object(body: bytes) -> dict[str, Any]:
    answer = read_json(body)
    if not isinstance(answer, dict):
        raise Unusable("JSON that is not an object")
    return answer


def b64_image(value: Any, where: str) -> bytes:
    """The bytes of a base64 image found at `where` (named in the message when unusable)."""
    if not isinstance(value, str) or not value:
        raise Unusable(f"JSON without {where}")
    if isinstance(value, EmbeddedBase64):  # decoded, and checked if a PNG, while it arrived
        if value.check is not None:
            remember_check(value.decoded, value.check)
        return value.decoded
    try:
        return pybase64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Unusable(f"{where} that is not base64") from None


def first_b64_image(answer: Any) -> bytes:
    """`{"data": [{"b64_json": ...}]}`, the images-API shape several vendors use."""
    data = answer.get("data") if isinstance(answer, dict) else None
    first = data[0] if isinstance(data, list) and data else None
    return b64_image(first.get("b64_json") if isinstance(first, dict) else None, "data[0].b64_json")


def _not_json(body: bytes) -> str:
    described = describe_non_image(body)
    return "JSON that cannot be read" if described == "JSON" else described


# --- progress and polling ---------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    step: int
    steps: int


def report_progress(context: GenerationContext, progress: Progress | None) -> None:
    """The documented `progress` event; nothing when the backend cannot tell."""
    if progress is None or progress.steps <= 0:
        return
    step = max(0, min(progress.step, progress.steps))
    context.progress("progress", step=step, steps=progress.steps, fraction=round(step / progress.steps, 4))


@dataclass(frozen=True)
class PollSchedule:
    """How long to wait before each poll: `first`, growing by `growth` up to `longest`."""

    first: float
    longest: float | None = None
    growth: float = 1.0

    def intervals(self) -> Iterator[float]:
        interval = self.first
        while True:
            yield interval
            interval *= self.growth
            if self.longest is not None:
                interval = min(self.longest, interval)


def poll_until(
    state: State,
    poll: Callable[[], State],
    finished: Callable[[State], bool],
    context: GenerationContext,
    schedule: PollSchedule,
    *,
    too_late: Callable[[], Exception],
    progress_of: Callable[[State], Progress | None] = lambda state: None,
) -> State:
    """Poll until `finished(state)`: report the state's progress, wait (Cancelled at once if
    the caller leaves), poll. When the deadline would pass before the next poll, raise
    `too_late()` instead of waiting for nothing."""
    for interval in schedule.intervals():
        report_progress(context, progress_of(state))
        if context.time_left() < interval:
            raise too_late()
        context.wait(interval)
        state = poll()
        if finished(state):
            return state
    raise AssertionError("intervals() never ends")


def to_png(data: bytes, context: GenerationContext) -> bytes:
    """`ensure_png` within the generation's time: a decode that must wait for memory waits at
    most what is left of the deadline (then 503 server_busy)."""
    return ensure_png(data, wait_seconds=max(0.0, context.time_left()))
