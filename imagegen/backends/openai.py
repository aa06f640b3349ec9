"""The `openai` backend: OpenAI's Images API with GPT image models.

`POST {OPENAI_BASE_URL}/images/generations` with `Authorization: Bearer $OPENAI_API_KEY` and
JSON `{model, prompt, n: 1, output_format: "png", size?, quality?}`; the answer is
`{"data": [{"b64_json"}]}` (GPT image models always answer base64 and reject
`response_format`). There is no seed, negative prompt, steps or guidance.

Sizes: `gpt-image-2` and later generations take any WxH with both sides multiples of 16, long
side at most 3840, short side at most 2160, ratio at most 3:1 and at least 655,360 pixels; the
`gpt-image-1` generation (1.5, 1-mini) and any model this module does not recognise get the
three sizes every GPT image model takes. Without a width or height no size is sent: the
API's default, `auto`, lets the model pick the shape that suits the prompt.

Partial images: when a streamed caller asks for them (GenerationRequest.partial_images) and the
model is a GPT image model, the call adds `stream: true, partial_images: N` and OpenAI answers
Server-Sent Events: `image_generation.partial_image` (`b64_json`, `partial_image_index`), then
`image_generation.completed` (`b64_json`, `usage`), or `error` (`{"error": {...}}`). They are
read through the exchange as they arrive; each partial image is reported as a `partial_image`
progress event (its `png`), which the Images API door sends on. A partial image that cannot be
read is skipped (it is only a preview); the completed image is checked as any answer is.
"""

from __future__ import annotations

import re
import json
from collections.abc import Mapping
from typing import Any

import requests

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.outbound import MAX_EVENT_BYTES, HttpExchange, ServerEvent
from imagegen.backends.sizes import free_size, nearest_size, requested_shape
from imagegen.backends.toolkit import (
    SHAPE_ERRORS,
    Unusable,
    b64_image,
    first_b64_image,
    json_object,
    reading_answer,
    require_key,
    to_png,
)
from imagegen.backends.vendor import CONTENT_REJECTED, CREDITS, MODEL_NOT_AVAILABLE, CallContext, Vendor, error_for_status
from imagegen.config import BackendSettings, Settings
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import ConfigurationError, ImageGenError, UpstreamError
from imagegen.identity import account_fingerprint
from imagegen.retry import retry_after_ms, server_delay_seconds

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Every GPT image model takes these; the gpt-image-1 generation takes nothing else.
FIXED_SIZES = ((1024, 1024), (1536, 1024), (1024, 1536))
# gpt-image-2 and later: the documented limits of a free size.
FREE_SIZE_STEP, FREE_SIZE_MAX_LONG, FREE_SIZE_MAX_SHORT = 16, 3840, 2160
FREE_SIZE_MAX_RATIO, FREE_SIZE_MIN_PIXELS = 3.0, 655_360
# "gpt-image-2", "gpt-image-2.5-flare", "gpt-image-2-2026-04-21": the generation number.
_GENERATION = re.compile(r"gpt-image-(\d+)(?![\d])")
# Shut down: gpt-image-1 (and its snapshots) on 2026-10-23, DALL·E 2 and 3 on 2026-05-12.
_RETIRED = re.compile(r"gpt-image-1(?:-\d{4}-\d{2}-\d{2})?|dall-e-[23](?:-.*)?", re.IGNORECASE)
_QUALITY = re.compile(r"[a-z]{1,16}")
_UNVERIFIED_ORGANIZATION = re.compile(r"organi[sz]ation must be verified", re.IGNORECASE)
VERIFY_URL = "https://platform.openai.com/settings/organization/general"
# OpenAI's streamed image events, and the most partial images it gives per image.
PARTIAL_EVENT, COMPLETED_EVENT = "image_generation.partial_image", "image_generation.completed"
MAX_PARTIAL_IMAGES = 3
# The progress event the doors take an intermediate image from (imagegen/doors/openai_stream.py).
PARTIAL_PROGRESS = "partial_image"


def _model_advice(call: CallContext) -> str:
    return (
        "Set OPENAI_MODEL to a current GPT image model such as gpt-image-2 (gpt-image-1 was shut down on "
        "2026-10-23, DALL·E 2 and 3 in May 2026), or check that the project behind OPENAI_API_KEY may use it"
    )


def _error_of(body: Any) -> Mapping[str, Any]:
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


def _classify(status: int, body: Any) -> str | None:
    error = _error_of(body)
    code, kind = error.get("code"), error.get("type")
    if status == 400 and code in ("moderation_blocked", "content_policy_violation"):
        return CONTENT_REJECTED
    if status == 429 and "insufficient_quota" in (code, kind):
        return CREDITS
    if code == "model_not_found":
        return MODEL_NOT_AVAILABLE
    return None


def _message(body: Any) -> str:
    """OpenAI's message, plus the coarse categories of a moderation block when it gives them."""
    error = _error_of(body)
    message = error.get("message") if isinstance(error.get("message"), str) else ""
    details = error.get("moderation_details")
    if isinstance(details, dict):
        categories = [c for c in details.get("categories") or [] if isinstance(c, str)][:8]
        stage = details.get("moderation_stage")
        said = [f"categories {', '.join(categories)}"] if categories else []
        said += [f"stage {stage}"] if isinstance(stage, str) else []
        if said:
            message = f"{message} ({'; '.join(said)})"
    return message


def _retry_delay(headers: Mapping[str, str], body: bytes) -> float | None:
    """`retry-after-ms` first, then `retry-after`, as OpenAI's own SDK reads them."""
    delay = retry_after_ms(headers.get("retry-after-ms"))
    return delay if delay is not None else server_delay_seconds(headers.get("retry-after"), b"")


VENDOR = Vendor(
    name="OpenAI",
    status_label="OpenAI status",
    key_advice="Check that OPENAI_API_KEY holds a valid key from https://platform.openai.com/api-keys",
    credits_advice="Add credit, or raise the project's budget, at https://platform.openai.com/settings/organization/billing",
    url_variable="OPENAI_BASE_URL",
    model_advice=_model_advice,
    classify=_classify,
    retry_delay=_retry_delay,
    message_of=_message,
)


def streams_partial_images(model: str) -> bool:
    """GPT image models stream partial images; anything else this backend is pointed at may not."""
    return model.lower().startswith("gpt-image-")


def takes_free_size(model: str) -> bool:
    """gpt-image-2 and every later generation; the gpt-image-1 generation and unknown names
    (chatgpt-image-latest) get the three sizes every GPT image model takes."""
    found = _GENERATION.match(model)
    return found is not None and int(found.group(1)) >= 2


def openai_size(model: str, width: int | None, height: int | None) -> str | None:
    """The `size` to send: the nearest this model takes, or None (the API's `auto`)."""
    shape = requested_shape(width, height)
    if shape is None:
        return None
    if takes_free_size(model):
        w, h = free_size(
            *shape,
            step=FREE_SIZE_STEP,
            max_long=FREE_SIZE_MAX_LONG,
            max_short=FREE_SIZE_MAX_SHORT,
            max_ratio=FREE_SIZE_MAX_RATIO,
            min_pixels=FREE_SIZE_MIN_PIXELS,
        )
    else:
        w, h = nearest_size(*shape, FIXED_SIZES)
    return f"{w}x{h}"


class OpenAIBackend:
    name = "openai"

    def __init__(self, settings: Settings, section: BackendSettings, session: requests.Session) -> None:
        self._section = section
        self._key = section.api_key
        self._base_url = (section.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._exchange = HttpExchange(session, settings.timeout_seconds, settings.deadline_seconds)
        self._quality = parse_quality(section.options.get("OPENAI_QUALITY"))
        self.default_model = section.model
        self.allowed_models = section.allowed_models

    def identity(self) -> str:
        return f"openai {self._base_url} {account_fingerprint(self._key)} quality={self._quality or 'auto'}"

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(negative_prompt=False, steps=False, guidance=False, seed=False)

    def routes(self, request: GenerationRequest, model: str, context: GenerationContext) -> list[Route]:
        self._check_configuration(model)
        return [Route(backend=self.name, model=model)]

    def generate(self, route: Route, request: GenerationRequest, context: GenerationContext) -> GeneratedImage:
        key = self._check_configuration(route.model)
        call = CallContext(VENDOR, self.name, route.model, key)
        payload: dict[str, Any] = {"model": route.model, "prompt": request.prompt, "n": 1, "output_format": "png"}
        size = openai_size(route.model, request.width, request.height)
        if size is not None:
            payload["size"] = size
        if self._quality:
            payload["quality"] = self._quality
        partials = min(request.partial_images, MAX_PARTIAL_IMAGES) if streams_partial_images(route.model) else 0
        completed: list[dict[str, Any]] = []
        if partials:
            payload.update(stream=True, partial_images=partials)

        def on_event(event: ServerEvent) -> None:
            with reading_answer(call):
                data = json_object(event.data)
                if event.name == "error" or data.get("type") == "error" or "error" in data:
                    raise _stream_error(data, call)
                kind = data.get("type") or event.name
                if kind == PARTIAL_EVENT:
                    _report_partial(data, context)
                elif kind == COMPLETED_EVENT and not completed:
                    completed.append(data)

        try:
            answer = self._exchange.send(
                "POST",
                f"{self._base_url}/images/generations",
                call,
                context,
                json=payload,
                headers={"Authorization": f"Bearer {key}"},
                on_event=on_event if partials else None,
                events_limit=(partials + 1) * MAX_EVENT_BYTES,
            )
        except UpstreamError as error:
            if error.upstream_status == 403 and _UNVERIFIED_ORGANIZATION.search(error.message):
                raise call.error(
                    UpstreamError,
                    f"OpenAI lets only verified organisations use {route.model}. Verify the organisation that "
                    f"owns OPENAI_API_KEY at {VERIFY_URL} (it can take a few minutes to apply), or set "
                    "OPENAI_MODEL to a model it may use",
                    code="upstream_unauthorized",
                ) from None
            raise
        with reading_answer(call):
            if partials and not answer.body:  # the answer came as events
                if not completed:
                    raise Unusable("an event stream that ended without image_generation.completed")
                body = completed[0]
                png = to_png(b64_image(body.get("b64_json"), "image_generation.completed's b64_json"), context)
            else:
                body = json_object(answer.body)
                png = to_png(first_b64_image(body), context)
        return GeneratedImage(png=png, route=route, seed=None, request_id=call.request_id, usage=token_usage(body.get("usage")))

    def _check_configuration(self, model: str) -> str:
        """The key, once the settings are known to be usable. Checked per request rather than
        at start-up, so that the function starts and every answer says what to fix."""
        key = require_key(
            self._section, variable="OPENAI_API_KEY", what="OpenAI API key", how="a key from https://platform.openai.com/api-keys"
        )
        if _RETIRED.fullmatch(model):
            raise ConfigurationError(
                f"OpenAI has shut down the model {model} (gpt-image-1 on 2026-10-23, DALL·E 2 and 3 in May 2026): "
                "set OPENAI_MODEL (and OPENAI_ALLOWED_MODELS) to a current GPT image model such as gpt-image-2.",
                code="invalid_configuration",
            )
        return key


def _report_partial(data: Mapping[str, Any], context: GenerationContext) -> None:
    """A partial image as a `partial_image` progress event; one that cannot be read is skipped."""
    try:
        png = to_png(b64_image(data.get("b64_json"), "b64_json"), context)
    except (*SHAPE_ERRORS, ImageGenError):
        return
    context.progress(PARTIAL_PROGRESS, png=png)


def _stream_error(data: Mapping[str, Any], call: CallContext) -> UpstreamError:
    """An `error` event in OpenAI's stream, worded as the same error answered with a status
    would be: a refusal by the safety system as such, anything else as OpenAI's server error."""
    error = _error_of(data)
    refused = error.get("code") in ("moderation_blocked", "content_policy_violation")
    return error_for_status(400 if refused else 500, {}, json.dumps({"error": error}).encode(), call)


def token_usage(value: Any) -> dict[str, int] | None:
    """The answer's `usage` token counts (what a caller of the Images API door sees), whole
    numbers only: what a vendor answers is data, not truth."""
    if not isinstance(value, dict):
        return None
    counts = {
        name: count
        for name in ("input_tokens", "output_tokens", "total_tokens")
        if isinstance(count := value.get(name), int) and not isinstance(count, bool) and 0 <= count < 10**12
    }
    return counts or None


def parse_quality(raw: str | None) -> str | None:
    """OPENAI_QUALITY, read once when the backend is built: None (the API's `auto`) or a word."""
    quality = raw.strip().lower() if raw else None
    if quality is not None and not _QUALITY.fullmatch(quality):
        raise ConfigurationError(
            f"Environment variable OPENAI_QUALITY is invalid: expected low, medium, high or auto, got {quality[:32]!r}.",
            code="invalid_configuration",
        )
    return quality


def create(settings: Settings, section: BackendSettings, session: requests.Session) -> OpenAIBackend:
    return OpenAIBackend(settings, section, session)
