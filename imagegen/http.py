"""The Flask adapter: one request in, one answer out, whatever door it came through.

It knows HTTP and nothing of images: it gives each request an id and a `RequestRecord`, sends it
to the `Endpoint` for its path and method (a door of imagegen.doors, built by imagegen.app), turns any
`ImageGenError` into that endpoint's error shape in one place and anything unexpected into a
generic 500 that shows no internals, adds CORS and Server-Timing, and writes one structured log
line per request (an event stream writes its own when it ends, through the same `AccessLog`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import flask

from imagegen.auth import client_ip
from imagegen.config import MAX_BODY_BYTES
from imagegen.cors import cors_headers, preflight_headers
from imagegen.errors import ConfigurationError, ImageGenError, InvalidRequest, MethodNotAllowed, PayloadTooLarge
from imagegen.logs import http_request_fields, trace_fields
from imagegen.record import RequestRecord
from imagegen.streaming import EVENT_STREAM

# Cloud Run caps request bodies at 32 MiB; draining more than that is never needed.
MAX_DRAIN_BYTES = 32 * 1024 * 1024
COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
UNEXPECTED = "Something went wrong on the server. Try again; if it keeps happening, report the request id."

ErrorShape = Callable[[ImageGenError, str], dict[str, Any]]


def error_payload(error: ImageGenError, request_id: str) -> dict[str, Any]:
    """The function's own error shape: what its JSON API, documents and refusals answer."""
    payload: dict[str, Any] = {"success": False, "error": error.message, "code": error.code, "requestId": request_id}
    if error.field:
        payload["field"] = error.field
    return payload


@dataclass(frozen=True)
class Endpoint:
    """What answers one path: the methods it takes (OPTIONS is the adapter's), the function
    that answers, what a caller using another method is told ({method}: the one used), and
    its error shape."""

    methods: tuple[str, ...]
    serve: Callable[[flask.Request, RequestRecord], flask.Response]
    wrong_method: str
    error_shape: ErrorShape = error_payload
    # The Allow header of a 405; the methods themselves when None.
    allow: str | None = None


@dataclass(frozen=True)
class RequestFacts:
    """What the log line says about a request, read while the request is still there: a
    stream writes its line after the framework has moved on."""

    method: str
    path: str
    user_agent: str | None
    remote_ip: str | None
    request_size: int | None
    trace: dict[str, Any]


class AccessLog:
    """One structured line per request. The answer is ready when it is written, maybe with a
    paid image: a line that cannot be written must never cost it."""

    def __init__(self, logger: logging.Logger, trusted_proxy_hops: int, gcp_project: str | None) -> None:
        self.logger = logger
        self._hops = trusted_proxy_hops
        self._project = gcp_project

    def facts(self, request: flask.Request) -> RequestFacts:
        return RequestFacts(
            method=request.method,
            path=request.path,
            user_agent=request.headers.get("User-Agent"),
            remote_ip=client_ip(request.headers.get("X-Forwarded-For"), request.remote_addr, self._hops),
            request_size=request.content_length,
            trace=trace_fields(request.headers.get("X-Cloud-Trace-Context"), request.headers.get("traceparent"), self._project),
        )

    def write(self, facts: Callable[[], RequestFacts], status: int, response_size: int | None, record: RequestRecord) -> None:
        try:
            self._write(facts(), status, response_size, record)
        except Exception:
            pass

    def _write(self, facts: RequestFacts, status: int, response_size: int | None, record: RequestRecord) -> None:
        fields = record.fields
        if record.phases:
            fields["timingsMs"] = {**record.phases, "total": record.total_ms()}
        if record.attempts:
            fields["attempts"] = [dataclasses.asdict(attempt) for attempt in record.attempts]
        entry: dict[str, Any] = {
            "requestId": record.request_id,
            "httpRequest": http_request_fields(
                method=facts.method,
                url=facts.path,  # no query string: it could hold anything
                status=status,
                latency_seconds=record.total_ms() / 1000,
                user_agent=facts.user_agent,
                remote_ip=facts.remote_ip,
                request_size=facts.request_size,
                response_size=response_size,
            ),
            "imagegen": fields,
            **facts.trace,
        }
        severity = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 or "warning" in fields else logging.INFO
        code = f" {fields['code']}" if "code" in fields else ""
        self.logger.log(
            severity, "%s %s %s%s in %.0f ms", facts.method, facts.path, status, code, record.total_ms(), extra={"fields": entry}
        )

    def unexpected(self, method: str, path: str, record: RequestRecord) -> ImageGenError:
        """Log the exception being handled; the error the caller sees instead, no internals."""
        self.logger.exception("Unexpected error while handling %s %s", method, path, extra={"fields": {"requestId": record.request_id}})
        record.fields["code"] = "internal_error"
        return ImageGenError(UNEXPECTED)


def note_error(record: RequestRecord, error: ImageGenError) -> None:
    """What the log line keeps of an error the caller gets."""
    record.fields["code"] = error.code
    if isinstance(error, ConfigurationError):
        record.fields["error"] = error.message


class Handler:
    def __init__(
        self,
        endpoints: Mapping[str, tuple[Endpoint, ...]],
        fallback: Endpoint,
        *,
        access_log: AccessLog,
        cors_allowed_origins: tuple[str, ...],
        clock: Callable[[], float],
        suffixes: Mapping[str, tuple[Endpoint, ...]] | None = None,
    ) -> None:
        self._endpoints = dict(endpoints)
        # Paths matched by their end, longest first: a client appends "/images/generations" to
        # whatever base URL it was given, so a door answers under any prefix.
        self._suffixes = sorted((suffixes or {}).items(), key=lambda item: -len(item[0]))
        self._fallback = fallback
        self._log = access_log
        self._origins = cors_allowed_origins
        self._clock = clock

    def __call__(self, request: flask.Request) -> flask.Response:
        incoming_id = request.headers.get("X-Request-Id", "")
        record = RequestRecord(
            request_id=incoming_id if REQUEST_ID.fullmatch(incoming_id) else uuid.uuid4().hex,
            clock=self._clock,
            started=self._clock(),
        )
        origin = request.headers.get("Origin")
        response = self._route(request, record)
        response.headers.update(record.headers)
        response.headers["X-Request-Id"] = record.request_id
        if request.method == "OPTIONS":
            response.headers.update(preflight_headers(origin, self._origins))
        else:
            response.headers.update(cors_headers(origin, self._origins))
        if request.method == "POST":
            response.headers["Server-Timing"] = record.server_timing()
        if response.mimetype != EVENT_STREAM:  # a stream writes its line when it ends
            self._log.write(lambda: self._log.facts(request), response.status_code, response.content_length, record)
        return response

    def _route(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        if request.method == "OPTIONS":
            return empty_response(204)
        # A path may have an endpoint per method (the page's GET beside the API's POST); any
        # other path is the fallback's (the API answers wherever the function is mounted).
        candidates = self._endpoints.get(request.path) or self._by_suffix(request.path) or (self._fallback,)
        endpoint = next((each for each in candidates if request.method in each.methods), candidates[0])
        try:
            if request.method not in endpoint.methods:
                allow = endpoint.allow or ", ".join(endpoint.methods)
                raise MethodNotAllowed(endpoint.wrong_method.format(method=request.method), headers={"Allow": allow})
            return endpoint.serve(request, record)
        except ImageGenError as error:
            note_error(record, error)
            return error_response(error, record.request_id, endpoint.error_shape)
        except Exception:
            error = self._log.unexpected(request.method, request.path, record)
            return error_response(error, record.request_id, endpoint.error_shape)

    def _by_suffix(self, path: str) -> tuple[Endpoint, ...] | None:
        return next((endpoints for suffix, endpoints in self._suffixes if _ends_with(path, suffix)), None)


def _ends_with(path: str, suffix: str) -> bool:
    """A suffix route's match; one ending in "/*" takes any last segment ("/images/files/*")."""
    if suffix.endswith("/*"):
        folder, _, last = path.rpartition("/")
        return bool(last) and folder.endswith(suffix[:-2])
    return path.endswith(suffix)


def read_body(request: flask.Request) -> bytes:
    declared = request.content_length
    if declared is None or declared <= MAX_BODY_BYTES:
        body = _read_piece(request.stream, MAX_BODY_BYTES + 1)
        if len(body) <= MAX_BODY_BYTES:
            return body
    # Drain what is left in small pieces: the framework reads any unread body into memory
    # after we answer, and the connection stays usable for the browser's next request.
    drained = 0
    while drained < MAX_DRAIN_BYTES and (chunk := _read_piece(request.stream, 64 * 1024)):
        drained += len(chunk)
    raise PayloadTooLarge(
        f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB. Send only the prompt and options."
    )


def error_response(error: ImageGenError, request_id: str, shape: ErrorShape = error_payload) -> flask.Response:
    body = json.dumps(shape(error, request_id), ensure_ascii=False).encode()
    return response(error.status, body, {"Content-Type": "application/json", **error.headers})


def response(status: int, body: bytes | Iterator[bytes], headers: Mapping[str, str]) -> flask.Response:
    answer = flask.Response(body, status=status)
    answer.headers.update(COMMON_HEADERS)
    answer.headers.update(headers)
    return answer


def empty_response(status: int) -> flask.Response:
    """An answer without a body, and so without a Content-Type (Flask would say text/html)."""
    answer = response(status, b"", {})
    del answer.headers["Content-Type"]
    return answer


def _read_piece(stream: Any, size: int) -> bytes:
    """One read of the request body. A body the server cannot parse (a chunk size of "zz", a
    missing chunk terminator, the connection closed half-way) is the caller's 400, not a 500:
    gunicorn raises its ParseException or NoMoreData, Werkzeug's server ClientDisconnected."""
    try:
        return stream.read(size)
    except _malformed_body_errors() as error:
        raise InvalidRequest(
            "The request body could not be read: its chunked transfer encoding is malformed or it "
            f"ended before its declared length ({type(error).__name__}).",
            code="invalid_body",
        ) from None


def _malformed_body_errors() -> tuple[type[BaseException], ...]:
    from werkzeug.exceptions import ClientDisconnected

    try:
        from gunicorn.http.errors import NoMoreData, ParseException
    except ImportError:  # not under gunicorn (Windows, Flask's development server)
        return (ClientDisconnected,)
    return (ClientDisconnected, NoMoreData, ParseException)
