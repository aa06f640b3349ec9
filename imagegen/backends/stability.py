"""The `stability` backend: Stability AI's v2beta Stable Image API.

`POST {STABILITY_BASE_URL}/v2beta/stable-image/generate/{core|ultra|sd3}` with
`Authorization: Bearer $STABILITY_API_KEY`, a multipart/form-data body (`prompt`,
`negative_prompt`, `aspect_ratio`, `seed`, `output_format=png`, and for SD 3.5 `model` and
`cfg_scale`) and `Accept: image/*`. The answer's body is the image; its `finish-reason` header
says SUCCESS or CONTENT_FILTERED (a blurred image that is refused here, never returned or
stored), and its `seed` header the seed used.

`STABILITY_MODEL` picks the endpoint: `core`, `ultra`, or an SD 3.5 model name such as
`sd3.5-large` (endpoint `sd3`, sent as `model`). Width and height map to the nearest of
Stability's aspect ratios. Seeds reproduce: Stability takes 1 to 4,294,967,294 and reads 0 as
"pick one at random", so a seed outside that range is folded into it (0 becomes 4,294,967,294,
4,294,967,295 becomes 1) and the answer reports the seed Stability used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import requests

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.outbound import HttpExchange
from imagegen.backends.sizes import nearest_aspect_ratio, requested_shape
from imagegen.backends.toolkit import Unusable, b64_image, json_object, reading_answer, require_key, to_png
from imagegen.backends.vendor import CONTENT_REJECTED, CREDITS, MODEL_NOT_AVAILABLE, CallContext, Vendor
from imagegen.config import BackendSettings, Settings
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import ConfigurationError, ContentRejected
from imagegen.identity import account_fingerprint

DEFAULT_BASE_URL = "https://api.stability.ai"
ASPECT_RATIOS = ("16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
MAX_SEED = 4_294_967_294
# cfg_scale on the sd3 endpoint.
MIN_CFG_SCALE, MAX_CFG_SCALE = 1.0, 10.0
_SEED = re.compile(r"[0-9]{1,10}", re.ASCII)
_SD3_MODEL = re.compile(r"sd3[A-Za-z0-9_.-]*")
SERVICES = ("core", "ultra")
# Success is what is known to be success: finish-reason SUCCESS. Any spelling of a filter
# ("CONTENT_FILTERED", "content_filtered", "Content-Filtered") is a refusal that never fails
# over; anything else (an unknown value, none at all) is a bad answer, never a 200.
SUCCESS_REASON = "SUCCESS"
_REFUSAL_WORDS = re.compile(r"FILTER|MODERAT|SAFETY|NSFW|BLOCK|CENSOR|REFUS")


def _model_advice(call: CallContext) -> str:
    return "Set STABILITY_MODEL to core, ultra or an SD 3.5 model such as sd3.5-large, sd3.5-large-turbo or sd3.5-medium"


def _errors(body: Any) -> list[str]:
    errors = body.get("errors") if isinstance(body, dict) else None
    return [item for item in errors if isinstance(item, str)] if isinstance(errors, list) else []


def _classify(status: int, body: Any) -> str | None:
    name = body.get("name") if isinstance(body, dict) else None
    if name == "content_moderation":
        return CONTENT_REJECTED
    if status == 402 or name == "payment_required":
        return CREDITS
    if status == 400 and any(item.lstrip().lower().startswith("model:") for item in _errors(body)):
        return MODEL_NOT_AVAILABLE
    return None


VENDOR = Vendor(
    name="Stability AI",
    status_label="Stability status",
    key_advice="Check that STABILITY_API_KEY holds a valid key from https://platform.stability.ai/account/keys",
    credits_advice="Buy credits at https://platform.stability.ai/account/credits",
    url_variable="STABILITY_BASE_URL",
    model_advice=_model_advice,
    classify=_classify,
)


def endpoint_of(model: str) -> str | None:
    """The generate endpoint for a STABILITY_MODEL value, or None when it names none."""
    if model in SERVICES:
        return model
    return "sd3" if _SD3_MODEL.fullmatch(model) else None


def stability_seed(seed: int) -> int:
    """Our seed (0 to 2**32 - 1) as one Stability reproduces: 1 to MAX_SEED, the same number
    where it already is one. Stability reads 0 as "random", and 2**32 - 1 is past its range."""
    return (seed - 1) % MAX_SEED + 1


class StabilityBackend:
    name = "stability"

    def __init__(self, settings: Settings, section: BackendSettings, session: requests.Session) -> None:
        self._section = section
        self._key = section.api_key
        self._base_url = (section.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._exchange = HttpExchange(session, settings.timeout_seconds, settings.deadline_seconds)
        self.default_model = section.model
        self.allowed_models = section.allowed_models

    def identity(self) -> str:
        return f"stability {self._base_url} {account_fingerprint(self._key)}"

    def capabilities(self, model: str) -> Capabilities:
        is_sd3 = endpoint_of(model) == "sd3"
        # Stability's reference: negative_prompt "does not work with" the turbo model.
        return Capabilities(negative_prompt="turbo" not in model, steps=False, guidance=is_sd3, seed=True)

    def routes(self, request: GenerationRequest, model: str, context: GenerationContext) -> list[Route]:
        self._check_configuration(model)
        return [Route(backend=self.name, model=model)]

    def generate(self, route: Route, request: GenerationRequest, context: GenerationContext) -> GeneratedImage:
        key, endpoint = self._check_configuration(route.model)
        call = CallContext(VENDOR, self.name, route.model, key)
        capabilities = self.capabilities(route.model)
        fields: dict[str, str] = {"prompt": request.prompt, "output_format": "png"}
        shape = requested_shape(request.width, request.height)
        if shape is not None:
            fields["aspect_ratio"] = nearest_aspect_ratio(*shape, ASPECT_RATIOS)
        if request.negative_prompt and capabilities.negative_prompt:
            fields["negative_prompt"] = request.negative_prompt
        sent_seed = stability_seed(request.seed) if request.seed is not None else None
        if sent_seed is not None:
            fields["seed"] = str(sent_seed)
        if endpoint == "sd3":
            fields["model"] = route.model
            if request.guidance_scale is not None:
                # Stability's range is narrower than ours: the nearest value it takes.
                fields["cfg_scale"] = f"{min(MAX_CFG_SCALE, max(MIN_CFG_SCALE, request.guidance_scale)):g}"
        answer = self._exchange.send(
            "POST",
            f"{self._base_url}/v2beta/stable-image/generate/{endpoint}",
            call,
            context,
            # (None, value): a plain form field; files= is what makes requests send multipart.
            files={name: (None, value) for name, value in fields.items()},
            headers={"Authorization": f"Bearer {key}", "Accept": "image/*"},
        )
        with reading_answer(call):
            data, finish_reason, seed_text = _read_answer(answer.body, answer.headers)
            reason = _word(finish_reason)
            if reason != SUCCESS_REASON:
                if _REFUSAL_WORDS.search(reason):
                    # The blurred image stops here: it is never converted, returned or stored.
                    raise call.error(
                        ContentRejected,
                        f"Stability AI's safety system filtered the generated image (finish-reason {reason}). "
                        "Change the prompt and try again",
                    )
                raise Unusable(f"finish-reason {reason}" if finish_reason is not None else "no finish-reason")
            png = to_png(data, context)
        return GeneratedImage(png=png, route=route, seed=_used_seed(seed_text, sent_seed), request_id=call.request_id)

    def _check_configuration(self, model: str) -> tuple[str, str]:
        """The key and the endpoint, checked per request so that the function starts and every
        answer says what to fix."""
        key = require_key(
            self._section,
            variable="STABILITY_API_KEY",
            what="Stability AI key",
            how="a key from https://platform.stability.ai/account/keys",
        )
        endpoint = endpoint_of(model)
        if endpoint is None:
            raise ConfigurationError(
                f"Stability AI has no endpoint for the model {model[:64]!r}: set STABILITY_MODEL (and "
                "STABILITY_ALLOWED_MODELS) to core, ultra or an SD 3.5 model such as sd3.5-large.",
                code="invalid_configuration",
            )
        return key, endpoint


def _read_answer(body: bytes, headers: Mapping[str, str]) -> tuple[bytes, str | None, str | None]:
    """(image bytes, finish reason, seed text) from an image body, or from the JSON form
    `{"image", "finish_reason", "seed"}` that a proxy ignoring Accept might return."""
    content_type = headers.get("Content-Type", "").lower()
    if not content_type.startswith("application/json"):
        return body, _header(headers, "finish-reason"), _header(headers, "seed")
    answer = json_object(body)
    reason, seed = answer.get("finish_reason"), answer.get("seed")
    reason = reason if isinstance(reason, str) else None
    # A refused image is never decoded: the refusal is what the caller hears.
    data = b64_image(answer.get("image"), "image") if _word(reason) == SUCCESS_REASON else b""
    return data, reason, str(seed) if isinstance(seed, int) else None


def _word(value: str | None) -> str:
    """A finish reason safe to quote and compare: upper case, other characters as underscores."""
    return re.sub(r"[^A-Z0-9]+", "_", (value or "")[:80].upper()).strip("_")[:40] or "NONE"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    return value.strip() if isinstance(value, str) else None


def _used_seed(text: str | None, sent: int | None) -> int | None:
    """The seed Stability says it used, when that is a seed it takes; else the one we sent."""
    if text is not None and _SEED.fullmatch(text) and 1 <= int(text) <= MAX_SEED:
        return int(text)
    return sent


def create(settings: Settings, section: BackendSettings, session: requests.Session) -> StabilityBackend:
    return StabilityBackend(settings, section, session)
