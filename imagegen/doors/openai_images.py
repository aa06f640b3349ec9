"""OpenAI's Images API, so that the tools people already use can call this function:
`POST */images/generations` and `GET */models` under any path prefix (clients append them to
the base URL they are given, which usually ends in `/v1`).

The request is OpenAI's (`prompt, model, n, size, quality, response_format, output_format,
output_compression, background, moderation, style, user, stream, partial_images`) plus this
function's own `seed, negative_prompt, steps, guidance_scale`; the answer is OpenAI's
`ImagesResponse`, and errors are OpenAI's `{"error": {...}}` with this function's statuses, so
the SDKs raise their usual exceptions. What a field cannot do here is never silently dropped:
every field accepted but not used is named in the `X-Imagegen-Ignored` header and in the
answer's `imagegen.ignored`.

`n` images are admitted one by one (each counts against the rate limit and the budgets) and made
in parallel threads; those that fail are counted in `imagegen.failed` and `X-Imagegen-Failed`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

import flask

from imagegen.doors.image_files import ImageFile, in_format
from imagegen.catalog import Catalog
from imagegen.domain import GenerationRequest
from imagegen.errors import ContentRejected, ImageGenError, InvalidRequest, UpstreamError
from imagegen.doors.common import DoorParts, json_body
from imagegen.http import Endpoint, note_error, response
from imagegen.record import RequestRecord
from imagegen.png_info import PngParts
from imagegen.service import Admission, Produced
from imagegen.storage import ImageMetadata, ImageStore
from imagegen.streaming import EVENT_STREAM, disconnect_probe
from imagegen.validation import (
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_GUIDANCE,
    MIN_SIDE,
    MIN_STEPS,
    SIDE_STEP,
    invalid_field,
    json_object,
    read_integer,
    read_number,
    read_text,
    reject_lone_surrogates,
    require_prompt,
)

GENERATIONS_SUFFIX = "/images/generations"
MODELS_SUFFIX = "/models"
MAX_IMAGES = 10
OUTPUT_FORMATS = ("png", "jpeg", "webp")
RESPONSE_FORMATS = ("b64_json", "url")
# Fields OpenAI's API takes that change nothing here whatever their value (each named as ignored
# when sent with a value other than its default).
NO_EFFECT_DEFAULTS: Mapping[str, tuple[Any, ...]] = {
    "quality": ("auto", "standard"),
    "background": ("auto", "opaque"),
    "moderation": ("auto",),
    "style": (),
    "user": (),
    "safety_identifier": (),
}
KNOWN_FIELDS = (
    "prompt", "model", "n", "size", "quality", "response_format", "output_format", "output_compression",
    "background", "moderation", "style", "user", "stream", "partial_images",
    "seed", "negative_prompt", "steps", "guidance_scale",
)  # fmt: skip
# An image URL for (the caller's base URL, the stored name, its extension).
ImageUrls = Callable[[str, str, str], str]
IGNORED_HEADER = "X-Imagegen-Ignored"
MAX_IGNORED_HEADER_CHARS = 1000
FAILED_HEADER = "X-Imagegen-Failed"
# OpenAI's error `type` for a status; the SDKs choose the exception from the status alone.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip


def openai_error(error: ImageGenError, request_id: str) -> dict[str, Any]:
    """OpenAI's error object. A refusal by a vendor's safety system is its
    `content_policy_violation`; every other code is this function's own (docs/api.md)."""
    code = "content_policy_violation" if isinstance(error, ContentRejected) else error.code
    kind = ERROR_TYPES.get(error.status, "server_error" if error.status >= 500 else "invalid_request_error")
    return {"error": {"message": error.message, "type": kind, "param": error.field, "code": code}}


@dataclass(frozen=True)
class ImagesRequest:
    """A checked OpenAI request: the generation (the first image's seed), and how to answer."""

    generation: GenerationRequest
    n: int = 1
    response_format: str = "b64_json"
    output_format: str = "png"
    output_compression: int | None = None
    quality: str | None = None
    background: str | None = None
    stream: bool = False
    partial_images: int = 0
    ignored: tuple[str, ...] = ()  # fields accepted that nothing uses, for every backend


@dataclass
class Batch:
    """What came of an `n`-image request: the images made, in order, and the errors."""

    made: list[Produced] = field(default_factory=list)
    errors: list[ImageGenError] = field(default_factory=list)


class OpenAiImages:
    def __init__(
        self, parts: DoorParts, store: ImageStore, image_urls: ImageUrls, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._parts = parts
        self._store = store
        self._image_urls = image_urls
        self._clock = clock

    def suffix_routes(self) -> dict[str, tuple[Endpoint, ...]]:
        """The door's endpoints, matched by how a path ends."""
        return {
            GENERATIONS_SUFFIX: (
                Endpoint(("POST",), self.generate, "Use POST with a JSON body to generate images (got {method}).",
                         openai_error, allow="POST, OPTIONS"),
            ),
            MODELS_SUFFIX: (
                Endpoint(("GET", "HEAD"), self.models, "Use GET to list the models (got {method}).", openai_error),
            ),
        }  # fmt: skip

    def models(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        self._parts.caller(request, record)
        body = json.dumps({"object": "list", "data": model_list(self._parts.catalog)}).encode()
        return response(200, body, {"Content-Type": "application/json"})

    def generate(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        caller = self._parts.caller(request, record)
        record.fields["door"] = "openai"
        with record.phase("validate"):
            asked = parse_images_request(json_body(request), self._parts.catalog, self._parts.max_prompt_chars)
        admissions = self._admit_all(asked, caller, record)
        if asked.stream:
            return self._stream(request, record, asked, admissions)
        batch = self._produce_all(admissions, disconnect_probe(request.environ))
        if not batch.made:
            raise batch.errors[0]
        ignored = ignored_fields(asked, batch.made)
        with record.phase("format"):
            items, warnings = self._items(request, asked, batch.made)
        headers = {"Content-Type": "application/json"}
        if ignored:
            headers[IGNORED_HEADER] = ignored_header(ignored)
        if batch.errors:
            headers[FAILED_HEADER] = str(len(batch.errors))
            record.fields["failed"] = len(batch.errors)
        body, length = images_body(self._answer(asked, batch, ignored, warnings), items)
        headers["Content-Length"] = str(length)
        return response(200, body, headers)

    def _stream(
        self, request: flask.Request, record: RequestRecord, asked: ImagesRequest, admissions: list[Admission]
    ) -> flask.Response:
        from imagegen.doors.openai_stream import Completed, ImagesStream

        facts = self._parts.access_log.facts(request)
        record.fields["stream"] = True
        base_url = self._base_url(request)  # read here: the stream outlives the request's context

        def finish(produced: Produced) -> Completed:
            metadata = ImageMetadata(model=produced.route.model, prompt=asked.generation.prompt, seed=produced.seed)
            image, _ = in_format(self._store, produced.png, produced.stored_name, produced.file_path, metadata,
                                 asked.output_format, asked.output_compression)  # fmt: skip
            width, height = produced.size
            fields = {
                "created_at": int(self._clock()),
                "size": f"{width}x{height}" if width and height else "auto",
                "output_format": asked.output_format,
                "quality": asked.quality or "auto",
                "background": asked.background or "opaque",
                **({"usage": produced.usage} if produced.usage else {}),
                "imagegen": {**image_facts(produced), "ignored": list(ignored_fields(asked, [produced])),
                             **({"warning": produced.warning} if produced.warning else {})},
            }  # fmt: skip
            return Completed(fields, image.data, lambda: self._stream_url(base_url, image))

        def error_object(error: ImageGenError) -> dict[str, Any]:
            note_error(record, error)
            return openai_error(error, record.request_id)

        def finished(status: int, sent: int) -> None:
            if status == 499:
                record.fields["code"] = "cancelled"
                record.fields["clientClosed"] = True
            self._parts.access_log.write(lambda: facts, status, sent, record)

        stream = ImagesStream(self._parts.service, admissions, asked.partial_images, finish, error_object,
                              disconnect_probe(request.environ), finished)  # fmt: skip
        headers = {"Content-Type": EVENT_STREAM, "X-Accel-Buffering": "no"}
        if asked.ignored:
            headers[IGNORED_HEADER] = ignored_header(asked.ignored)
        return response(200, stream.body(), headers)

    def _stream_url(self, base_url: str, image: ImageFile) -> str | None:
        """A URL of a streamed image too large for the stream, or None where it has none."""
        if image.stored_name is None:
            return None
        try:
            return self._image_urls(base_url, image.stored_name, image.ext)
        except UpstreamError:
            return None

    def _admit_all(self, asked: ImagesRequest, caller: str, record: RequestRecord) -> list[Admission]:
        """Each image admitted on its own: the limits count images, not requests. One refused
        gives back what the others took."""
        admissions: list[Admission] = []
        try:
            for index in range(asked.n):
                admissions.append(self._parts.service.admit(image_generation(asked.generation, index), caller, record))
        except BaseException:
            for admission in admissions:
                self._parts.service.release(admission)
            raise
        return admissions

    def _produce_all(self, admissions: list[Admission], client_gone: Callable[[], bool]) -> Batch:
        """Every admitted image at once, each within the service's deadline."""
        from imagegen.doors.json_api import produce_watching

        def make(admission: Admission) -> Produced | ImageGenError:
            try:
                return produce_watching(self._parts.service, admission, client_gone)
            except ImageGenError as error:
                return error

        if len(admissions) == 1:
            outcomes = [make(admissions[0])]
        else:
            with ThreadPoolExecutor(len(admissions), thread_name_prefix="imagegen-n") as pool:
                outcomes = list(pool.map(make, admissions))
        batch = Batch()
        for outcome in outcomes:
            (batch.errors if isinstance(outcome, ImageGenError) else batch.made).append(outcome)
        return batch

    def _items(
        self, request: flask.Request, asked: ImagesRequest, made: list[Produced]
    ) -> tuple[list[tuple[str, PngParts | str]], list[str]]:
        """Each image as the answer carries it, ("b64_json", bytes) or ("url", URL), in the asked
        format; and the warnings of what could not be done as asked."""
        items: list[tuple[str, PngParts | str]] = []
        warnings: list[str] = []
        for produced in made:
            metadata = ImageMetadata(model=produced.route.model, prompt=asked.generation.prompt, seed=produced.seed)
            image, warning = in_format(self._store, produced.png, produced.stored_name, produced.file_path, metadata,
                                       asked.output_format, asked.output_compression)  # fmt: skip
            if warning:
                warnings.append(warning)
            items.append(self._item(request, asked, image, warnings))
        return items, warnings

    def _item(self, request: flask.Request, asked: ImagesRequest, image: ImageFile, warnings: list[str]) -> tuple[str, PngParts | str]:
        if asked.response_format != "url":
            return "b64_json", image.data
        if image.stored_name is None:
            warnings.append("An image that is not stored has no URL: it is in the answer as b64_json.")
            return "b64_json", image.data
        try:
            return "url", self._image_urls(self._base_url(request), image.stored_name, image.ext)
        except UpstreamError as error:  # signing failed: the image is paid for, answer it anyway
            warnings.append(f"{error.message} The image is in the answer as b64_json.")
            return "b64_json", image.data

    def _base_url(self, request: flask.Request) -> str:
        """The scheme, host and path prefix the caller used: the URLs this function serves
        itself answer under the same prefix as the door."""
        scheme = request.scheme
        forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        if self._parts.trusted_proxy_hops and forwarded in ("http", "https"):
            scheme = forwarded
        return f"{scheme}://{request.host}{request.path[: -len(GENERATIONS_SUFFIX)]}"

    def _answer(self, asked: ImagesRequest, batch: Batch, ignored: tuple[str, ...], notes: list[str]) -> dict[str, Any]:
        """The answer without its images: ImagesResponse's fields, and this function's own."""
        width, height = batch.made[0].size
        extension: dict[str, Any] = {
            "ignored": list(ignored),
            "failed": len(batch.errors),
            "images": [image_facts(produced) for produced in batch.made],
        }
        if batch.errors:
            extension["errors"] = [{"code": error.code, "message": error.message} for error in batch.errors]
        warnings = list(dict.fromkeys([*(produced.warning for produced in batch.made if produced.warning), *notes]))
        if warnings:
            extension["warning"] = " ".join(warnings)
        usage = total_usage(batch.made)
        return {
            **({"usage": usage} if usage else {}),
            "created": int(self._clock()),
            "background": asked.background or "opaque",
            "output_format": asked.output_format,
            "quality": asked.quality or "auto",
            "size": f"{width}x{height}" if width and height else "auto",
            "imagegen": extension,
        }


def total_usage(made: list[Produced]) -> dict[str, int] | None:
    """The vendors' token counts summed over the images that report them (OpenAI's `usage`)."""
    reported = [produced.usage for produced in made if produced.usage]
    if not reported:
        return None
    names = dict.fromkeys(name for usage in reported for name in usage)
    return {name: sum(usage.get(name, 0) for usage in reported) for name in names}


def ignored_header(names: tuple[str, ...]) -> str:
    """The ignored fields as a header value: each name percent-encoded where it is not a plain
    token (a field name may hold any character), at most MAX_IGNORED_HEADER_CHARS in all (the
    answer's `imagegen.ignored` has them all)."""
    value = ", ".join(quote(name, safe="_-.") for name in names)
    return value if len(value) <= MAX_IGNORED_HEADER_CHARS else value[: MAX_IGNORED_HEADER_CHARS - 3].rsplit(",", 1)[0] + ", ..."


def image_generation(generation: GenerationRequest, index: int) -> GenerationRequest:
    """The i-th image's request: a caller's seed s gives s, s+1, ... (wrapping at MAX_SEED)."""
    if index == 0 or generation.seed is None:
        return generation
    return replace(generation, seed=(generation.seed + index) % (MAX_SEED + 1))


def image_facts(produced: Produced) -> dict[str, Any]:
    facts = produced.facts()
    return {
        "backend": facts["backend"],
        "model": facts["model"],
        "provider": facts["provider"],
        "seed": facts["seed"],
        "cached": facts["cached"],
        "filePath": produced.file_path,
    }


def ignored_fields(asked: ImagesRequest, made: list[Produced]) -> tuple[str, ...]:
    """Every field nothing used: the door's own list, then what each backend could not honour
    (named as this API names them)."""
    names = {"negativePrompt": "negative_prompt", "guidanceScale": "guidance_scale"}
    from_backends = (names.get(name, name) for produced in made for name in produced.ignored)
    return tuple(dict.fromkeys((*asked.ignored, *from_backends)))


def images_body(answer: dict[str, Any], items: list[tuple[str, PngParts | str]]) -> tuple[Iterator[bytes], int]:
    """The answer JSON as pieces and its length, each image's base64 spliced in piece by
    piece (megabytes each: never one string per image, nor a joined answer)."""
    head = b'{"data": ['
    tail = b"], " + json.dumps(answer, ensure_ascii=False)[1:].encode()
    parts: list[bytes | PngParts] = []
    for index, (kind, value) in enumerate(items):
        comma = b", " if index else b""
        if isinstance(value, str):
            parts.append(comma + json.dumps({kind: value}).encode())
        else:
            parts += [comma + b'{"b64_json": "', value, b'"}']
    length = len(head) + len(tail) + sum(len(p) if isinstance(p, bytes) else 4 * math.ceil(len(p) / 3) for p in parts)

    def pieces() -> Iterator[bytes]:
        yield head
        for part in parts:
            yield from [part] if isinstance(part, bytes) else part.base64_pieces()
        yield tail

    return pieces(), length


def model_list(catalog: Catalog) -> list[dict[str, Any]]:
    """OpenAI's model objects: every model an enabled backend allows, and `backend/model` for
    each, which names the backend too."""
    seen: dict[str, str] = {}
    for offer in catalog.offers:
        for model in offer.models:
            seen.setdefault(model, offer.backend)
    for offer in catalog.offers:
        for model in offer.models:
            seen.setdefault(f"{offer.backend}/{model}", offer.backend)
    return [{"id": model, "object": "model", "created": 0, "owned_by": f"imagegen-{backend}"} for model, backend in seen.items()]


# --- the request ------------------------------------------------------------------------------


def parse_images_request(body: bytes, catalog: Catalog, max_prompt_chars: int) -> ImagesRequest:
    """OpenAI's request, checked; every error names its field as OpenAI's `param`."""
    data = json_object(body)
    reject_lone_surrogates(data)
    # Unlike the JSON API, which refuses them: OpenAI's SDKs send fields this door does not
    # know, so each is accepted and named as ignored.
    ignored = [name[:64] for name in data if name not in KNOWN_FIELDS]
    prompt = require_prompt(data, max_prompt_chars)
    backend, model = _model(data.get("model"), catalog)
    width, height = _size(data.get("size"))
    for name, defaults in NO_EFFECT_DEFAULTS.items():
        value = data.get(name)
        if value is not None and value not in defaults:
            ignored.append(name)
    output_format = _choice(data, "output_format", OUTPUT_FORMATS) or "png"
    compression = read_integer(data, "output_compression", 0, 100)
    if compression is not None and output_format == "png":
        ignored.append("output_compression")
    quality = data.get("quality")
    background = data.get("background")
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise invalid_field("stream", "true or false", stream)
    partial_images = read_integer(data, "partial_images", 0, 3) or 0
    if partial_images and not stream:
        ignored.append("partial_images")  # only a stream carries them
    response_format = _choice(data, "response_format", RESPONSE_FORMATS) or "b64_json"
    if stream and response_format == "url":
        ignored.append("response_format")  # a stream carries the images themselves
    return ImagesRequest(
        generation=GenerationRequest(
            prompt=prompt,
            model=model,
            backend=backend,
            negative_prompt=read_text(data, "negative_prompt", max_prompt_chars) or None,
            width=width,
            height=height,
            steps=read_integer(data, "steps", MIN_STEPS, MAX_STEPS),
            guidance_scale=read_number(data, "guidance_scale", MIN_GUIDANCE, MAX_GUIDANCE),
            seed=read_integer(data, "seed", 0, MAX_SEED),
            partial_images=partial_images if stream else 0,
        ),
        n=read_integer(data, "n", 1, MAX_IMAGES) or 1,
        response_format=response_format,
        output_format=output_format,
        output_compression=compression if output_format != "png" else None,
        quality=quality if isinstance(quality, str) else None,
        background=background if background in ("opaque",) else None,
        stream=bool(stream),
        partial_images=partial_images if stream else 0,
        ignored=tuple(dict.fromkeys(ignored)),
    )


def _model(value: Any, catalog: Catalog) -> tuple[str | None, str | None]:
    """(backend, model): a model some enabled backend allows, `backend/model`, or a backend's
    own name for its default model; None, None when absent (the default and failover order)."""
    if value is None or value == "":
        return None, None
    if isinstance(value, str):
        if value in catalog.models:
            return None, value
        if value in catalog.backends:
            return value, catalog.offer(value).default_model
        backend, _, model = value.partition("/")
        if backend in catalog.backends and model in catalog.offer(backend).models:
            return backend, model
    offered = ", ".join(entry["id"] for entry in model_list(catalog)) or "none (no backend is configured)"
    shown = json.dumps(value, ensure_ascii=False)[:100]
    raise InvalidRequest(f"The model {shown} is not offered here. Models offered: {offered}.",
                         code="model_not_allowed", field="model")  # fmt: skip


def _size(value: Any) -> tuple[int | None, int | None]:
    """`WxH` mapped into what the backends take (a multiple of 8 from 256 to 2048 a side, the
    shape kept); `auto` or absent: the backend's default. Each backend then maps it to a size
    its model makes, and the answer's `size` is the image's."""
    if value is None or value == "auto":
        return None, None
    match = re.fullmatch(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})", value) if isinstance(value, str) else None
    if match is None:
        raise invalid_field("size", 'a size such as "1024x1024", or "auto"', value)
    width, height = int(match.group(1)), int(match.group(2))
    scale = min(1.0, MAX_SIDE / max(width, height))
    scale = max(scale, MIN_SIDE / min(width, height)) if min(width, height) * scale < MIN_SIDE else scale

    def side(length: int) -> int:
        return max(MIN_SIDE, min(MAX_SIDE, round(length * scale / SIDE_STEP) * SIDE_STEP))

    return side(width), side(height)


def _choice(data: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if value not in allowed:
        raise invalid_field(name, "one of " + ", ".join(allowed), value)
    return value
