"""Gemini image models through `generateContent`: what the `gemini` and `vertex` backends share.

The two backends reach the same models two ways (an API key on the Gemini API, an OAuth
token on Vertex AI); the request body, the answer and the error bodies are the same. This
module builds the body, reads the image out of the answer (or the refusal: Google answers
most refusals with HTTP 200), and classifies Google's error bodies. Each backend adds only
its URL, its auth header and its wording (`Vendor`).

Checked in 2026-11 against Google's REST reference and SDK types (python-genai, the
Vertex AI v1 discovery document): see docs/backends/gemini.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.outbound import HttpExchange
from imagegen.backends.sizes import nearest_aspect_ratio, requested_shape
from imagegen.backends.toolkit import Unusable, b64_image, json_object, reading_answer, to_png
from imagegen.backends.vendor import (
    CREDITS,
    MODEL_NOT_AVAILABLE,
    RATE_LIMITED,
    UNAUTHORIZED,
    CallContext,
)
from imagegen.config import BackendSettings, Settings
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import ContentRejected, UpstreamError
from imagegen.retry import retry_info_delay, server_delay_seconds

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

# Success is what is known to be success: finishReason STOP, or no finishReason on a candidate
# that carries an image (the API leaves it out of some answers). Anything else is a refusal
# (422, never failed over) or, when it is not one, a bad answer (502): never a 200.
SUCCESS_REASON = "STOP"
# finishReason values that mean the model would not make (or show) the image. With one of
# these a candidate is refused even if it carries an image: a filtered image is never returned.
REFUSAL_REASONS = frozenset({
    "SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "MODEL_ARMOR", "LANGUAGE",
    "IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION", "IMAGE_OTHER", "NO_IMAGE",
})
# A value outside that list, or spelled otherwise ("image_safety", "IMAGE_SAFETY_V2"), that
# still says refusal: treated as one, so a refused prompt never goes on to the next vendor.
_REFUSAL_WORDS = re.compile(r"SAFETY|PROHIBIT|BLOCK|RECITATION|SPII|ARMOR|CSAM|POLICY|FILTER|NO_IMAGE|IMAGE_OTHER")
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
    delay = retry_info_delay(body)
    if delay is None:
        return server_delay_seconds(headers.get("Retry-After"), b"")
    return math.ceil(delay)


def message_of(body: Any) -> str:
    message = _error_of(body).get("message")
    return message if isinstance(message, str) else ""


# -- the answer --------------------------------------------------------------------------------


def read_image(body: bytes, call: CallContext, context: GenerationContext) -> bytes:
    """The PNG from a generateContent answer; ContentRejected for every refusal shape, Unusable
    (or a shape error) for anything else that is not an image. Call within `reading_answer`."""
    answer = json_object(body)
    if isinstance(answer.get("responseId"), str):
        call.note_request_id(answer["responseId"])
    feedback = answer.get("promptFeedback") or {}
    if feedback.get("blockReason"):
        said = _said(call, feedback.get("blockReasonMessage"))
        raise _refused(call, f"blocked the prompt (blockReason {_word(feedback['blockReason'])}{said})")
    candidates = answer.get("candidates")
    if not isinstance(candidates, list) or not candidates:
        raise Unusable("an answer without candidates")
    candidate = candidates[0]
    raw_reason = candidate.get("finishReason")
    if raw_reason is not None and not isinstance(raw_reason, str):
        raise Unusable("a finishReason that is not a word")
    reason = _word(raw_reason) if raw_reason is not None else None
    content = candidate.get("content") or {}
    parts = [part for part in content.get("parts") or [] if isinstance(part, dict) and not part.get("thought")]
    images = [part["inlineData"] for part in parts if part.get("inlineData") is not None]
    text = " ".join(part["text"] for part in parts if isinstance(part.get("text"), str)).strip()
    model_said = f'; the model said: "{call.quote(text, MAX_MODEL_TEXT_CHARS)}"' if text else ""
    if reason is not None and reason != SUCCESS_REASON:
        if reason in REFUSAL_REASONS or _REFUSAL_WORDS.search(reason):
            said = _said(call, candidate.get("finishMessage"))
            raise _refused(call, f"refused to make the image (finishReason {reason}{said}{model_said})")
        raise Unusable(f"finishReason {reason}")
    if not images:
        if text:  # the model answered in words only: it declined to draw
            finished = f"finishReason {reason}" if reason else "no finishReason"
            raise _refused(call, f"answered without an image ({finished}{model_said})")
        raise Unusable("a candidate without an image or text")
    # The last image is the final one.
    return to_png(b64_image(images[-1]["data"], "inlineData.data"), context)


def _word(value: Any) -> str:
    """An enum value from the answer, safe to quote and compare: upper case, any run of other
    characters than letters and digits one underscore ("image-safety" is IMAGE_SAFETY)."""
    if not isinstance(value, str):
        return "UNKNOWN"
    return re.sub(r"[^A-Z0-9]+", "_", value[:80].upper()).strip("_")[:40] or "UNKNOWN"


def _said(call: CallContext, message: Any) -> str:
    return f": {call.quote(message, MAX_MODEL_TEXT_CHARS)}" if isinstance(message, str) and message.strip() else ""


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
        with reading_answer(call):
            png = read_image(answer.body, call, context)
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
