"""The HTTP handler: parse -> validate -> call upstream -> store -> respond.

Each step is a function that raises an `ImageGenError` where it knows something is wrong;
`Handler.__call__` turns any of them into the JSON answer in one place, and anything unexpected
into a generic 500 that shows no internals.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import flask

from imagegen.auth import Authenticator, client_ip, make_authenticator
from imagegen.config import MAX_BODY_BYTES, Settings, load_settings
from imagegen.cors import cors_headers, preflight_headers
from imagegen.errors import ConfigurationError, ImageGenError, MethodNotAllowed, PayloadTooLarge, StorageError
from imagegen.hf_client import GeneratedImage, RouterClient, new_session
from imagegen.logs import get_logger, prompt_fingerprint
from imagegen.page import PAGE_PATHS, Page, render_page
from imagegen.png_info import embed_parameters
from imagegen.ratelimit import RateLimiter
from imagegen.storage import ImageMetadata, ImageStore, image_name, make_store
from imagegen.validation import GenerationRequest, check_content_type, parse_generation_request

# Seeds the server picks stay below 2**31: some providers take only signed 32-bit seeds.
MAX_CHOSEN_SEED = 2**31 - 1
# Cloud Run caps request bodies at 32 MiB; draining more than that is never needed.
MAX_DRAIN_BYTES = 32 * 1024 * 1024
COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class Handler:
    def __init__(
        self,
        settings: Settings | ConfigurationError,
        client: RouterClient | None = None,
        store: ImageStore | None = None,
        authenticator: Authenticator | None = None,
        limiter: RateLimiter | None = None,
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        choose_seed: Callable[[], int] = lambda: secrets.randbelow(MAX_CHOSEN_SEED + 1),
    ) -> None:
        self._settings = settings
        self._logger = logger or get_logger()
        self._clock = clock
        self._choose_seed = choose_seed
        self._page: Page | None = None
        if isinstance(settings, Settings):
            self._client = client or RouterClient(settings)
            self._store = store or make_store(settings)
            self._authenticator = authenticator or make_authenticator(settings, new_session(pool_size=4))
            self._limiter = limiter or RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst, clock)
            if settings.serve_page:
                self._page = render_page(settings)

    def __call__(self, request: flask.Request) -> flask.Response:
        started = self._clock()
        origin = request.headers.get("Origin")
        allowed_origins = self._settings.cors_allowed_origins if isinstance(self._settings, Settings) else ("*",)
        log: dict[str, Any] = {"method": request.method, "path": request.path}
        if request.method == "OPTIONS":
            return _response(204, b"", preflight_headers(origin, allowed_origins))
        if request.method in ("GET", "HEAD") and request.path in PAGE_PATHS and self._page is not None:
            return _response(
                200,
                self._page.html,
                {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": self._page.content_security_policy},
            )
        try:
            response = self._generate(request, log)
        except ImageGenError as error:
            response = _error_response(error)
            log.update(code=error.code)
            if isinstance(error, ConfigurationError):
                log["error"] = error.message
        except Exception:
            self._logger.exception("Unexpected error while handling %s %s", request.method, request.path)
            response = _error_response(
                ImageGenError("Something went wrong on the server. Try again; if it keeps happening, check the function's logs.")
            )
            log.update(code="internal_error")
        response.headers.update(cors_headers(origin, allowed_origins))
        self._log(log, response.status_code, started)
        return response

    def _generate(self, request: flask.Request, log: dict[str, Any]) -> flask.Response:
        if request.method != "POST":
            raise MethodNotAllowed(
                f"Use POST with a JSON body to generate an image (got {request.method}).",
                headers={"Allow": "POST, OPTIONS"},
            )
        settings = self._settings
        if isinstance(settings, ConfigurationError):
            raise settings
        ip = client_ip(request.headers.get("X-Forwarded-For"), request.remote_addr, settings.trusted_proxy_hops)
        caller = self._authenticator.authenticate(request.headers, ip)
        log["caller"] = caller.key
        check_content_type(request.headers.get("Content-Type"))
        generation = parse_generation_request(_read_body(request), settings)
        # Counted only for requests that would reach Hugging Face: the limit guards the credits.
        self._limiter.take(caller.key)
        if generation.seed is None:
            # Always send a seed, so that every answer's seed reproduces its image.
            generation = dataclasses.replace(generation, seed=self._choose_seed())
        log.update(model=generation.model, **prompt_fingerprint(generation.prompt))
        if settings.log_prompts:
            log.update(prompt=generation.prompt, negativePrompt=generation.negative_prompt)
        image = self._client.generate(generation)
        log["provider"] = image.provider
        image = dataclasses.replace(image, png=embed_parameters(image.png, generation, image.provider))
        file_path, warning = self._store_image(image, generation)
        if warning:
            log["warning"] = warning
        return _response(200, success_body(image, generation, file_path, warning), {"Content-Type": "application/json"})

    def _store_image(self, image: GeneratedImage, generation: GenerationRequest) -> tuple[str | None, str | None]:
        metadata = ImageMetadata(model=image.model, prompt=generation.prompt, seed=generation.seed)
        try:
            return self._store.save(image.png, image_name(generation.prompt), metadata), None
        except StorageError as error:
            return None, f"The image was generated but could not be stored: {error}. It is only in this answer."

    def _log(self, fields: dict[str, Any], status: int, started: float) -> None:
        fields.update(status=status, durationMs=round((self._clock() - started) * 1000, 1))
        severity = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 or "warning" in fields else logging.INFO
        self._logger.log(
            severity,
            "%s %s -> %s%s",
            fields["method"],
            fields["path"],
            status,
            f" ({fields['code']})" if "code" in fields else "",
            extra={"fields": {"request": fields}},
        )


def build_handler(environ: Mapping[str, str]) -> Handler:
    """The handler for a process: settings are read once; a bad setting answers 500s that name it."""
    try:
        settings: Settings | ConfigurationError = load_settings(environ)
    except ConfigurationError as error:
        get_logger().error("Invalid configuration: %s", error.message)
        settings = error
    return Handler(settings)


def _read_body(request: flask.Request) -> bytes:
    declared = request.content_length
    if declared is None or declared <= MAX_BODY_BYTES:
        body = request.stream.read(MAX_BODY_BYTES + 1)
        if len(body) <= MAX_BODY_BYTES:
            return body
    # Drain what is left in small pieces: the framework reads any unread body into memory
    # after we answer, and the connection stays usable for the browser's next request.
    drained = 0
    while drained < MAX_DRAIN_BYTES and (chunk := request.stream.read(64 * 1024)):
        drained += len(chunk)
    raise PayloadTooLarge(
        f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB. Send only the prompt and options."
    )


def success_body(
    image: GeneratedImage, generation: GenerationRequest, file_path: str | None, warning: str | None
) -> bytes:
    """The success JSON, with the base64 spliced in rather than passed through json.dumps.

    The image is megabytes; base64 needs no JSON escaping, so this saves a full scan and copy.
    """
    fields: dict[str, Any] = {
        "filePath": file_path,
        "model": image.model,
        "provider": image.provider,
        "seed": generation.seed,
    }
    if warning:
        fields["warning"] = warning
    rest = json.dumps(fields, ensure_ascii=False)[1:].encode()  # '"filePath": ..., ...}'
    return b"".join(
        (b'{"success": true, "imageUrl": "data:image/png;base64,', base64.b64encode(image.png), b'", ', rest)
    )


def _error_response(error: ImageGenError) -> flask.Response:
    payload: dict[str, Any] = {"success": False, "error": error.message, "code": error.code}
    if error.field:
        payload["field"] = error.field
    body = json.dumps(payload, ensure_ascii=False).encode()
    return _response(error.status, body, {"Content-Type": "application/json", **error.headers})


def _response(status: int, body: bytes, headers: Mapping[str, str]) -> flask.Response:
    response = flask.Response(body, status=status)
    response.headers.update(COMMON_HEADERS)
    response.headers.update(headers)
    return response
