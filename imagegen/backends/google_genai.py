"""Gemini image models through `generateContent`: what the `gemini` and `vertex` backends share.

The two backends reach the same models two ways (an API key on the Gemini API, an OAuth
token on Vertex AI); the request body, the answer and the error bodies are the same. This
module builds the body, reads the image out of the answer (or the refusal: Google answers
most refusals with HTTP 200), and classifies Google's error bodies. Each backend adds only
its URL, its auth header and its wording (`Vendor`).

Checked in 2026-11 against Google's REST reference and SDK types (python-genai, the
Vertex AI v1 discovery document): see docs/backend-gemini.md.
"""

from __future__ import annotations

import binascii
import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import pybase64

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.outbound import HttpExchange
from imagegen.backends.sizes import nearest_aspect_ratio, requested_shape
from imagegen.backends.vendor import (
    CREDITS,
    MODEL_NOT_AVAILABLE,
    RATE_LIMITED,
    UNAUTHORIZED,
    CallContext,
    clip,
    parse_json,
)
from imagegen.config import BackendSettings, Settings
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import ContentRejected, UpstreamError
from imagegen.images import NotAnImage, ensure_png
from imagegen.retry import gemini_retry_delay, server_delay_seconds

# Every Gemini image model takes these (ImageConfig.aspect_ratio in the API reference).
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# gemini-3.1-flash-image ("Nano Banana 2") also takes very wide and very tall ones.
EXTRA_WIDE_RATIOS = ("1:4", "4:1", "1:8", "8:1")
# imageSize: the long side, roughly. Only the Gemini 3 image models take it; gemini-2.5-flash-image
# always makes about one megapixel.
IMAGE_SIZES = (("1K", 1024), ("2K", 2048), ("4K", 4096))

# No negative prompt (the API answers 400 "Unknown name"), no steps, no guidance; a seed exists
# (generationConfig.seed) but Google documents it as best effort, "deterministic output isn't
# guaranteed", so the answer's seed is null and these images are never cached.
CAPABILITIES = Capabilities(negative_prompt=False, steps=False, guidance=False, seed=False)

# finishReason values that mean the model would not make (or show) the image. With one of
# these a candidate is refused even if it carries an image: a filtered image is never returned.
REFUSAL_REASONS = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "MODEL_ARMOR", "LANGUAGE",
    "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "NO_IMAGE",
})
MAX_MODEL_TEXT_CHARS = 200

# A 429 that waiting a minute will not cure: no free quota for the model ("limit: 0"), a daily
# quota used up, or prepaid credit gone. Per-minute limits stay rate limits: Google words those
# "check your plan and billing details" too, so that phrase alone says nothing.
_OUT_OF_QUOTA = re.compile(
    r"limit: 0\b|prepay|credits? (?:are |is )?(?:depleted|exhausted)|billing (?:is )?(?:not enabled|disabled)|enable billing",
    re.I,
)
_NOT_AN_IMAGE_MODEL = re.compile(r"response modalit", re.I)


def aspect_ratios(model: str) -> tuple[str, ...]:
    return ASPECT_RATIOS + EXTRA_WIDE_RATIOS if model.startswith("gemini-3.1-flash-image") else ASPECT_RATIOS


def takes_image_size(model: str) -> bool:
    return model.startswith("gemini-3")


def image_config(request: GenerationRequest, model: str) -> dict[str, str]:
    """The nearest aspect ratio to the asked width:height (1:1 when none was asked), and for
    the models that take it the nearest imageSize to the asked long side."""
    shape = requested_shape(request.width, request.height)
    if shape is None:
        return {"aspectRatio": "1:1"}
    config = {"aspectRatio": nearest_aspect_ratio(*shape, aspect_ratios(model))}
    if takes_image_size(model):
        long_side = max(shape)
        config["imageSize"] = min(IMAGE_SIZES, key=lambda size: abs(math.log(long_side / size[1])))[0]
    return config


def request_body(request: GenerationRequest, model: str) -> dict[str, Any]:
    """generateContent's body: the prompt as the one user turn, an image as the only output.
    Nothing else is sent: the API refuses fields it does not know."""
    return {
        "contents": [{"role": "user", "parts": [{"text": request.prompt}]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": image_config(request, model)},
    }


def model_path(model: str) -> str:
    return quote(model, safe="._-")


# -- errors ------------------------------------------------------------------------------------


def _error_of(body: Any) -> dict[str, Any]:
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _details(error: Mapping[str, Any]) -> list[dict[str, Any]]:
    details = error.get("details")
    return [detail for detail in details[:32] if isinstance(detail, dict)] if isinstance(details, list) else []


def _out_of_quota(error: Mapping[str, Any]) -> bool:
    if _OUT_OF_QUOTA.search(str(error.get("message", ""))):
        return True
    for detail in _details(error):
        violations = detail.get("violations")
        for violation in violations[:32] if isinstance(violations, list) else ():
            if not isinstance(violation, dict):
                continue
            if "PerDay" in str(violation.get("quotaId", "")) or str(violation.get("quotaValue", "")) == "0":
                return True
    return False


def classify(status: int, body: Any) -> str | None:
    """A Google error body's cause, where the status alone does not say it."""
    error = _error_of(body)
    reasons = {str(detail.get("reason", "")) for detail in _details(error)}
    message = str(error.get("message", ""))
    if any(reason.startswith("API_KEY_") for reason in reasons) or "SERVICE_DISABLED" in reasons:
        return UNAUTHORIZED
    if "BILLING_DISABLED" in reasons:
        return CREDITS
    if status == 429 or error.get("status") == "RESOURCE_EXHAUSTED":
        return CREDITS if _out_of_quota(error) else RATE_LIMITED
    if status == 400 and error.get("status") == "FAILED_PRECONDITION" and _OUT_OF_QUOTA.search(message):
        return CREDITS
    if status == 400 and _NOT_AN_IMAGE_MODEL.search(message):
        return MODEL_NOT_AVAILABLE  # a text model configured: it cannot answer with an image
    return None


def retry_delay(headers: Mapping[str, str], body: bytes) -> int | None:
    """Google's hint: the RetryInfo detail's retryDelay ("26s"), else a Retry-After header."""
    delay = gemini_retry_delay(body)
    if delay is None:
        return server_delay_seconds(headers.get("Retry-After"), b"")
    return math.ceil(delay)


def message_of(body: Any) -> str:
    message = _error_of(body).get("message")
    return message if isinstance(message, str) else ""


# -- the answer --------------------------------------------------------------------------------


class BadAnswer(ValueError):
    """A 200 without a readable image or refusal; the message says what it held."""


def read_image(body: bytes, call: CallContext) -> bytes:
    """The PNG from a generateContent answer; ContentRejected for every refusal shape."""
    answer = parse_json(body)
    if not isinstance(answer, dict):
        raise BadAnswer("an answer that is not a JSON object")
    if isinstance(answer.get("responseId"), str):
        call.note_request_id(answer["responseId"])
    feedback = answer.get("promptFeedback") if isinstance(answer.get("promptFeedback"), dict) else {}
    if feedback.get("blockReason"):
        said = _said(feedback.get("blockReasonMessage"))
        raise _refused(call, f"blocked the prompt (blockReason {_word(feedback['blockReason'])}{said})")
    candidates = answer.get("candidates")
    if not isinstance(candidates, list) or not candidates or not isinstance(candidates[0], dict):
        raise BadAnswer("an answer without candidates")
    candidate = candidates[0]
    reason = _word(candidate.get("finishReason")) if candidate.get("finishReason") else None
    content = candidate.get("content") if isinstance(candidate.get("content"), dict) else {}
    parts = [part for part in content.get("parts") or [] if isinstance(part, dict) and not part.get("thought")]
    images = [part["inlineData"] for part in parts if isinstance(part.get("inlineData"), dict)]
    text = " ".join(part["text"] for part in parts if isinstance(part.get("text"), str)).strip()
    model_said = f'; the model said: "{clip(text, MAX_MODEL_TEXT_CHARS)}"' if text else ""
    if reason in REFUSAL_REASONS:
        said = _said(candidate.get("finishMessage"))
        raise _refused(call, f"refused to make the image (finishReason {reason}{said}{model_said})")
    if not images:
        finished = f"finishReason {reason}" if reason else "no finishReason"
        raise _refused(call, f"answered without an image ({finished}{model_said})")
    data = images[-1].get("data")  # the last image is the final one
    if not isinstance(data, str):
        raise BadAnswer("an image part without data")
    try:
        return ensure_png(pybase64.b64decode(data, validate=True))
    except (binascii.Error, ValueError) as error:  # NotAnImage is a ValueError
        raise BadAnswer(str(error) if isinstance(error, NotAnImage) else "image data that is not base64") from None


def _word(value: Any) -> str:
    """An enum value from the answer, safe to quote: letters, digits and underscores only."""
    return re.sub(r"[^A-Z0-9_]", "", str(value).upper())[:40] or "UNKNOWN"


def _said(message: Any) -> str:
    return f": {clip(message, MAX_MODEL_TEXT_CHARS)}" if isinstance(message, str) and message.strip() else ""


def _refused(call: CallContext, what: str) -> UpstreamError:
    return call.error(
        ContentRejected,
        f"{call.vendor.name} {what}. Change the prompt and try again",
    )


# -- one try, for either backend ---------------------------------------------------------------


class GenerateContentBackend:
    """One `generateContent` call per try. Subclasses say where to send it and how to sign it."""

    name: str

    def __init__(self, settings: Settings, section: BackendSettings, exchange: HttpExchange) -> None:
        self._exchange = exchange
        self.default_model = section.model
        self.allowed_models = section.allowed_models

    def capabilities(self, model: str) -> Capabilities:
        return CAPABILITIES

    def routes(self, request: GenerationRequest, model: str, context: GenerationContext) -> list[Route]:
        self._check_ready()
        return [Route(self.name, model)]

    def generate(self, route: Route, request: GenerationRequest, context: GenerationContext) -> GeneratedImage:
        call, url, headers = self._prepare(route, context)
        answer = self._send(url, call, context, headers, request_body(request, route.model))
        try:
            png = read_image(answer.body, call)
        except BadAnswer as error:
            raise call.error(
                UpstreamError,
                f"{call.vendor.name} answered without a usable image (got {error}). Try again; if it persists, "
                "try another model",
                code="upstream_bad_response",
                fail_over=True,
            ) from None
        return GeneratedImage(png=png, route=route, seed=None, request_id=call.request_id)

    def _send(self, url: str, call: CallContext, context: GenerationContext, headers: dict[str, str], body: dict):
        return self._exchange.send("POST", url, call, context, headers=headers, json=body)

    # -- what a subclass provides --------------------------------------------------------------

    def _check_ready(self) -> None:
        """Raise ConfigurationError when the backend lacks what it needs (its credential)."""
        raise NotImplementedError

    def _prepare(self, route: Route, context: GenerationContext) -> tuple[CallContext, str, dict[str, str]]:
        """The call's context, the URL and the auth headers for one try."""
        raise NotImplementedError
