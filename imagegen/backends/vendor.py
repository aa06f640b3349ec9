"""How each vendor's failures are worded: one table of data per vendor, one function for all.

An HTTP backend describes its vendor with a `Vendor` (names, the variables to fix, where to
add credits, how it hints at retries, how its error bodies say "content refused" or "out of
credit"), and `error_for_status` turns any failed answer into the project's `UpstreamError`
with a message that says what happened, what to do, and what to report. Whatever comes from
upstream (messages, request ids) is scrubbed of the credential and bounded in length.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imagegen.errors import ContentRejected, UpstreamError, UpstreamRateLimited, UpstreamTimeout
from imagegen.retry import RETRYABLE_STATUSES, server_delay_seconds

MAX_UPSTREAM_MESSAGE_CHARS = 300
MAX_REQUEST_ID_CHARS = 128
MAX_MESSAGE_PARTS = 10
DEFAULT_RATE_LIMIT_RETRY_AFTER_SECONDS = 60
# Error kinds a vendor's classifier may name, beyond what the status alone says.
UNAUTHORIZED, CREDITS, RATE_LIMITED, CONTENT_REJECTED, MODEL_NOT_AVAILABLE = (
    "unauthorized",
    "credits",
    "rate_limited",
    "content_rejected",
    "model_not_available",
)


@dataclass(frozen=True)
class Vendor:
    """What a user needs to hear about one vendor when something fails."""

    name: str  # as people say it: "OpenAI"
    status_label: str  # "OpenAI status" in the message suffix
    key_advice: str  # how to fix a rejected credential, naming the variable
    credits_advice: str  # where to add credit
    url_variable: str  # the base URL setting, for "could not reach"
    model_advice: Callable[[CallContext], str]  # what to do when the model is not served
    # (status, parsed JSON body or None) -> an error kind above, or None for the status's own.
    classify: Callable[[int, Any], str | None] = lambda status, body: None
    # (headers, body) -> seconds the vendor asked us to wait, or None.
    retry_delay: Callable[[Mapping[str, str], bytes], int | None] = (
        lambda headers, body: server_delay_seconds(headers.get("Retry-After"), body)
    )
    # The human part of an error body.
    message_of: Callable[[Any], str] = field(default=lambda body: "")


@dataclass
class CallContext:
    """One try at one route: what every message about it names, so a user can report it."""

    vendor: Vendor
    backend: str
    model: str
    secret: str | None
    provider: str | None = None
    status: int | None = None
    request_id: str | None = None

    def suffix(self) -> str:
        parts = [f"provider {self.provider}" if self.provider else f"backend {self.backend}", f"model {self.model}"]
        if self.status is not None:
            parts.append(f"{self.vendor.status_label} {self.status}")
        if self.request_id:
            parts.append(f"request id {self.request_id}")
        return " (" + ", ".join(parts) + ")"

    def scrub(self, text: str) -> str:
        return scrub(text, self.secret)

    def quote(self, text: str, limit: int = MAX_UPSTREAM_MESSAGE_CHARS) -> str:
        """Upstream text fit to repeat: scrubbed first, then cut, so that a key straddling the
        cut is still whole when the scrubber looks for it."""
        return clip(self.scrub(text), limit)

    def note_request_id(self, value: str | None) -> None:
        if value:
            self.request_id = self.quote(value, MAX_REQUEST_ID_CHARS)

    def error(self, cls: type[UpstreamError], message: str, **kwargs: Any) -> UpstreamError:
        error = cls(
            self.scrub(message) + self.suffix() + ".",
            upstream_status=self.status,
            request_id=self.request_id,
            **kwargs,
        )
        error.reported_status = f"{self.vendor.status_label} {self.status}" if self.status is not None else None
        return error


def scrub(text: str, secret: str | None) -> str:
    """The text without the credential, and without anything shaped like a vendor key."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _KEY_SHAPES.sub("[redacted]", text)


# Tokens of the vendors this function talks to, wherever they turn up in echoed text.
_KEY_SHAPES = re.compile(r"\b(?:hf_[A-Za-z0-9]{8,}|sk-[A-Za-z0-9_-]{8,}|r8_[A-Za-z0-9]{8,}|AIza[0-9A-Za-z_-]{20,}|ya29\.[0-9A-Za-z_.-]+)")


def clip(text: str, limit: int = MAX_UPSTREAM_MESSAGE_CHARS) -> str:
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.rstrip(".")


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def common_message(answer: Any) -> str:
    """The human part of an error body in the shapes vendors use: {"error": str | [..] |
    {"message"}}, {"error_description"}, {"errors": [{"message"} | str]}, {"detail"}, {"title"}."""
    if not isinstance(answer, dict):
        return ""
    parts: list[str] = []
    error = answer.get("error")
    if isinstance(error, str):
        parts.append(error)
    elif isinstance(error, list):
        parts.extend(item for item in error[:MAX_MESSAGE_PARTS] if isinstance(item, str))
    elif isinstance(error, dict):
        parts.extend(str(error[key]) for key in ("message", "code") if isinstance(error.get(key), str))
    if isinstance(answer.get("error_description"), str):
        parts.append(answer["error_description"])
    errors = answer.get("errors")
    for item in errors[:MAX_MESSAGE_PARTS] if isinstance(errors, list) else ():
        if isinstance(item, dict) and isinstance(item.get("message"), str):
            parts.append(item["message"])
        elif isinstance(item, str):
            parts.append(item)
    if not parts:
        parts.extend(str(answer[key]) for key in ("detail", "message", "title") if isinstance(answer.get(key), str))
    return "; ".join(parts)


def upstream_message(body: bytes, vendor: Vendor, secret: str | None = None) -> str:
    """The human part of an error body: scrubbed of the credential, then cut to length."""
    answer = parse_json(body)
    if answer is None:
        text = body.decode("utf-8", "replace").strip()
        return "" if text.lower().startswith(("<!doctype", "<html")) else clip(scrub(text, secret))
    return clip(scrub(_tolerant("", vendor.message_of, answer) or common_message(answer), secret))


def _tolerant(default: Any, read: Callable[..., Any], *args: Any) -> Any:
    """A vendor's reader applied to an error body: a body of a shape the reader did not expect
    says nothing more (`default`); it never turns the error into a 500."""
    try:
        return read(*args)
    except (LookupError, TypeError, AttributeError, ValueError, RecursionError):
        return default


def error_for_status(status: int, headers: Mapping[str, str], body: bytes, context: CallContext) -> UpstreamError:
    """The error for a failed answer: by what the vendor's body says, else by its status."""
    vendor = context.vendor
    answer = parse_json(body)
    detail = upstream_message(body, vendor, context.secret)
    said = f": {detail}" if detail else ""
    kind = _tolerant(None, vendor.classify, status, answer)
    try:
        delay = vendor.retry_delay(headers, body)
    except Exception:  # a hint is a nicety; junk in it must never fail the request
        delay = None
    wait_hint = f" Try again in {max(1, delay)} seconds" if delay is not None else " Try again in a minute"
    if kind == CONTENT_REJECTED:
        return context.error(
            ContentRejected,
            f"{vendor.name}'s safety system refused this request{said}. Change the prompt and try again",
        )
    if kind == UNAUTHORIZED or (kind is None and status in (401, 403)):
        return context.error(
            UpstreamError, f"{vendor.name} rejected the server's credentials. {vendor.key_advice}{said}", code="upstream_unauthorized"
        )
    if kind == CREDITS or (kind is None and status == 402):
        return context.error(
            UpstreamError,
            f"The {vendor.name} account behind this server has used up its credit or quota{said}. "
            f"{vendor.credits_advice}, then try again",
            code="upstream_credits_exhausted",
        )
    if kind == MODEL_NOT_AVAILABLE or (kind is None and status in (404, 410)):
        return context.error(
            UpstreamError,
            f"The model is not available from {vendor.name}{said}. {vendor.model_advice(context)}",
            code="model_not_available",
            fail_over=True,
        )
    if kind == RATE_LIMITED or status == 429:
        error = context.error(
            UpstreamRateLimited,
            f"{vendor.name} is rate-limiting this server{said}.{wait_hint}",
            retry_after=delay,
            retryable=True,
        )
        # Our caller always learns when to come back, even when the vendor did not say.
        error.headers.setdefault("Retry-After", str(DEFAULT_RATE_LIMIT_RETRY_AFTER_SECONDS))
        return error
    if status in (408, 504):
        return context.error(
            UpstreamTimeout,
            f"{vendor.name} timed out generating the image{said}.{wait_hint}",
            retry_after=delay,
            retryable=True,
            fail_over=True,
        )
    if status >= 500:
        return context.error(
            UpstreamError,
            f"{vendor.name} had a problem generating the image{said}.{wait_hint}",
            code="upstream_unavailable",
            retry_after=delay,
            retryable=status in RETRYABLE_STATUSES,
            fail_over=True,
        )
    if 300 <= status < 400:
        return context.error(
            UpstreamError,
            f"{vendor.name} answered with a redirect (HTTP {status}), which this function does not follow. "
            f"Check {vendor.url_variable}",
            code="upstream_bad_response",
            fail_over=True,
        )
    return context.error(
        UpstreamError,
        f"{vendor.name} refused the request{said}. The model may not support one of the parameters "
        "(size, steps, guidance): try without them or with another model",
        code="upstream_rejected",
    )
