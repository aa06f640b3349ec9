"""Request validation: raw body bytes in, a typed `GenerationRequest` out, or a 4xx error.

Nothing here talks to the network, so a request that fails here never reaches a backend.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from imagegen.catalog import Catalog
from imagegen.domain import GenerationRequest
from imagegen.errors import InvalidRequest, UnsupportedMediaType

MIN_SIDE, MAX_SIDE, SIDE_STEP = 256, 2048, 8
MIN_STEPS, MAX_STEPS = 1, 100
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 30.0
MAX_SEED = 4_294_967_295
MAX_PARTIAL_IMAGES = 3

KNOWN_FIELDS = (
    "prompt",
    "negativePrompt",
    "width",
    "height",
    "steps",
    "guidanceScale",
    "seed",
    "backend",
    "model",
    "provider",
    "partialImages",
)


def check_content_type(content_type: str | None) -> None:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    # application/json plus structured suffixes such as application/merge+json.
    if media_type != "application/json" and not re.fullmatch(r"application/[\w.+-]+\+json", media_type):
        raise UnsupportedMediaType(
            "Send the request as JSON with the header 'Content-Type: application/json'"
            f" (got {media_type or 'no Content-Type'}).",
        )


def parse_generation_request(body: bytes, catalog: Catalog, max_prompt_chars: int) -> GenerationRequest:
    """Parse and check a JSON body; every error names the field and what was expected."""
    data = json_object(body)
    reject_lone_surrogates(data)
    _reject_unknown_fields(data)
    prompt = require_prompt(data, max_prompt_chars)
    backend, model, provider = _route_fields(data, catalog)
    return GenerationRequest(
        prompt=prompt,
        backend=backend,
        model=model,
        provider=provider,
        negative_prompt=read_text(data, "negativePrompt", max_prompt_chars) or None,
        width=_side(data, "width"),
        height=_side(data, "height"),
        steps=read_integer(data, "steps", MIN_STEPS, MAX_STEPS),
        guidance_scale=read_number(data, "guidanceScale", MIN_GUIDANCE, MAX_GUIDANCE),
        seed=read_integer(data, "seed", 0, MAX_SEED),
        partial_images=read_integer(data, "partialImages", 0, MAX_PARTIAL_IMAGES) or 0,
    )


# --- field readers: the JSON API's and the doors' (imagegen.doors), in one wording ------------
# Each takes the request's object and a field name, answers the value (None or "" when absent)
# and raises InvalidRequest naming the field and what was expected.


def json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        detail = f" ({error.msg} at line {error.lineno} column {error.colno})" if isinstance(error, json.JSONDecodeError) else ""
        raise InvalidRequest(f"The request body is not valid JSON{detail}.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest(
            'The request body must be a JSON object such as {"prompt": "a red fox"}.',
            code="invalid_body",
        )
    return data


def reject_lone_surrogates(data: Mapping[str, Any]) -> None:
    """JSON may spell half a UTF-16 pair ("\\ud800", or raw bytes ED A0 80) and Python's json
    takes it, but no UTF-8 text holds one: not the answer, not a log line, not the PNG's text
    chunk. Refused here, before anything is spent on the request: in field names, in text and
    anywhere inside a nested value (AUTOMATIC1111's override_settings, or a list sent where
    text belongs, which an error message would echo)."""
    for name, value in data.items():
        if not _is_unicode(name):
            shown = _escaped(name)[:64]
            raise InvalidRequest(
                f'The field name "{shown}" is not valid Unicode text (it holds a lone UTF-16 surrogate).',
                code="invalid_field",
                field=shown,
            )
        if not _holds_unicode(value):
            raise InvalidRequest(
                f'The field "{name}" must be valid Unicode text: it holds a lone UTF-16 surrogate '
                f"(such as \\ud800) that is not part of a pair.",
                code="invalid_field",
                field=name[:64],
            )


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _holds_unicode(value: Any) -> bool:
    if isinstance(value, str):
        return _is_unicode(value)
    if isinstance(value, (dict, list)):
        return _is_unicode(json.dumps(value, ensure_ascii=False))
    return True


def _escaped(text: str) -> str:
    """`text` with anything UTF-8 cannot hold written as a backslash escape: safe to echo."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _reject_unknown_fields(data: dict[str, Any]) -> None:
    unknown = [name for name in data if name not in KNOWN_FIELDS]
    if not unknown:
        return
    name = _escaped(unknown[0])
    hint = _closest_field(name)
    suggestion = f' Did you mean "{hint}"?' if hint else ""
    raise InvalidRequest(
        f'Unknown field "{name[:64]}".{suggestion} Allowed fields: {", ".join(KNOWN_FIELDS)}.',
        code="unknown_field",
        field=name[:64],
    )


def _closest_field(name: str) -> str | None:
    camel = re.sub(r"[_-]+([a-zA-Z])", lambda m: m.group(1).upper(), name)
    for candidate in KNOWN_FIELDS:
        if candidate.lower() == camel.lower():
            return candidate
    matches = difflib.get_close_matches(name, KNOWN_FIELDS, n=1, cutoff=0.75)
    return matches[0] if matches else None


def invalid_field(name: str, expected: str, value: Any) -> InvalidRequest:
    """The error for a field that holds the wrong thing, the value shown (ASCII, shortened)."""
    shown = json.dumps(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    return InvalidRequest(
        f'The field "{name}" must be {expected} (got {shown}).', code="invalid_field", field=name
    )


def is_whole(value: Any) -> bool:
    # JSON true/false arrive as bool, which Python counts as int. Whole numbers written as
    # floats (61.0, 7e2: Python, JavaScript's JSON.stringify of a computed value, some encoders)
    # are integers too; 61.5, NaN and Infinity are not.
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def read_text(data: Mapping[str, Any], name: str, max_chars: int) -> str:
    """Text without NUL characters of at most `max_chars`, stripped; "" when absent."""
    value = data.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise invalid_field(name, "a string", value)
    if len(value) > max_chars:
        raise InvalidRequest(
            f'The field "{name}" is too long: {len(value)} characters, at most {max_chars}.',
            code="invalid_field",
            field=name,
        )
    if "\x00" in value:
        raise invalid_field(name, "text without NUL characters", value)
    return value.strip()


def require_prompt(data: Mapping[str, Any], max_chars: int) -> str:
    """The prompt, which must be there and not blank."""
    if data.get("prompt") is None:
        raise InvalidRequest('The field "prompt" is required.', code="missing_field", field="prompt")
    prompt = read_text(data, "prompt", max_chars)
    if not prompt:
        raise InvalidRequest('The field "prompt" must not be empty.', code="invalid_field", field="prompt")
    return prompt


def read_integer(data: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not is_whole(value) or not low <= value <= high:
        raise invalid_field(name, f"an integer from {low} to {high}", value)
    return int(value)


def read_number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    """A finite number from `low` to `high` (true and false are not numbers here)."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise invalid_field(name, f"a number from {low:g} to {high:g}", value)
    return float(value)


def _side(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not is_whole(value) or not MIN_SIDE <= value <= MAX_SIDE or value % SIDE_STEP:
        raise invalid_field(name, f"an integer from {MIN_SIDE} to {MAX_SIDE} that is a multiple of {SIDE_STEP}", value)
    return int(value)


def _route_fields(data: dict[str, Any], catalog: Catalog) -> tuple[str | None, str | None, str | None]:
    """The backend, model and provider the caller named (None where not), each allowed here.

    A provider is an inference provider of a backend that routes through several (a router),
    so it implies that backend. A model without a backend must be allowed by at least one
    enabled backend; only those are then tried.
    """
    backend = _allowed_choice(data, "backend", catalog.backends, "BACKENDS", code="backend_not_allowed")
    provider = data.get("provider")
    if provider is not None:
        routers = [offer for offer in catalog.with_providers() if backend in (None, offer.backend)]
        if not routers:
            names = ", ".join(offer.backend for offer in catalog.with_providers()) or "none is enabled"
            raise InvalidRequest(
                '"provider" names an inference provider, and this request does not go to a backend that '
                f"routes through providers ({names}). Leave provider out, or name such a backend.",
                code="provider_not_allowed",
                field="provider",
            )
        router = routers[0]
        backend_for_model: str | None = router.backend
        provider = _allowed_choice(
            data, "provider", router.providers, router.providers_setting or "", code="provider_not_allowed"
        )
    else:
        backend_for_model = backend
    if backend_for_model is not None:
        offer = catalog.offer(backend_for_model)
        model = _allowed_choice(data, "model", offer.models, offer.models_setting, code="model_not_allowed")
    else:
        model = _allowed_choice(data, "model", catalog.models, "<BACKEND>_ALLOWED_MODELS", code="model_not_allowed")
    return backend, model, provider


def _allowed_choice(data: dict[str, Any], name: str, allowed: tuple[str, ...], setting: str, code: str) -> str | None:
    """A field that names one of the server's allowed values (a backend, a model, a provider)."""
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise invalid_field(name, f"a {name} name string", value)
    if value not in allowed:
        raise InvalidRequest(
            f'The {name} "{_escaped(value[:100])}" is not allowed here. Allowed: {", ".join(allowed)} '
            f"(the server's {setting} setting).",
            code=code,
            field=name,
        )
    return value
