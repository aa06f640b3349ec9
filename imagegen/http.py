"""The HTTP adapter: route -> authenticate -> parse -> the generation service -> respond.

Everything a generation does lives in imagegen.service; this module speaks HTTP. Each step
raises an `ImageGenError` where it knows something is wrong; `Handler.__call__` turns any of
them into the JSON answer in one place, and anything unexpected into a generic 500 that shows
no internals. Every answer carries an X-Request-Id and, for the API, a Server-Timing header;
every request writes one structured log line. A request with `Accept: text/event-stream` is
answered as Server-Sent Events (imagegen.streaming) once everything that can refuse it has.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import flask
import pybase64

from imagegen.auth import Authenticator, client_ip, make_authenticator
from imagegen.config import MAX_BODY_BYTES, Settings, load_settings
from imagegen.cors import cors_headers, preflight_headers
from imagegen.outbound import new_session
from imagegen.backends.registry import create_backends
from imagegen.capabilities import capabilities_document
from imagegen.dispatch import Dispatcher
from imagegen.errors import Cancelled, ConfigurationError, ImageGenError, MethodNotAllowed, PayloadTooLarge
from imagegen.events import ProgressSink
from imagegen.logs import get_logger, http_request_fields, trace_fields
from imagegen.page import Page, render_page
from imagegen.record import RequestRecord
from imagegen.retry import Timing
from imagegen.service import Admission, GenerationService, Produced
from imagegen.slots import ImageSlots
from imagegen.state import SharedState, make_state
from imagegen.storage import ImageStore, make_store
from imagegen.streaming import CLIENT_CLOSED, EVENT_STREAM, GenerationStream, Outcome, disconnect_probe, wants_event_stream
from imagegen.validation import check_content_type, parse_generation_request

# Cloud Run caps request bodies at 32 MiB; draining more than that is never needed.
MAX_DRAIN_BYTES = 32 * 1024 * 1024
COMMON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"
class Handler:
    def __init__(
        self,
        settings: Settings | ConfigurationError,
        dispatcher: Dispatcher | None = None,
        store: ImageStore | None = None,
        authenticator: Authenticator | None = None,
        state: SharedState | None = None,
        slots: ImageSlots | None = None,
        logger: logging.Logger | None = None,
        timing: Timing | None = None,
    ) -> None:
        self._settings = settings
        self._logger = logger or get_logger()
        timing = timing or Timing()
        self._clock = timing.clock
        self._page: Page | None = None
        if isinstance(settings, Settings):
            if dispatcher is None:
                dispatcher = Dispatcher(create_backends(settings, new_session()), settings.max_retries)
            self._service = GenerationService(
                settings, dispatcher, store or make_store(settings), state or make_state(settings.state), slots, timing
            )
            self._authenticator = authenticator or make_authenticator(settings, new_session(pool_size=4))
            if settings.serve_page:
                self._page = render_page(settings)
            self._capabilities = json.dumps(capabilities_document(settings, dispatcher.backends), ensure_ascii=False).encode()

    def __call__(self, request: flask.Request) -> flask.Response:
        incoming_id = request.headers.get("X-Request-Id", "")
        record = RequestRecord(
            request_id=incoming_id if REQUEST_ID.fullmatch(incoming_id) else uuid.uuid4().hex,
            clock=self._clock,
            started=self._clock(),
        )
        settings = self._settings if isinstance(self._settings, Settings) else None
        allowed_origins = settings.cors_allowed_origins if settings else ("*",)
        origin = request.headers.get("Origin")
        response = self._route(request, record)
        response.headers.update(record.headers)
        response.headers["X-Request-Id"] = record.request_id
        if request.method == "OPTIONS":
            response.headers.update(preflight_headers(origin, allowed_origins))
        else:
            response.headers.update(cors_headers(origin, allowed_origins))
        if request.method == "POST":
            response.headers["Server-Timing"] = record.server_timing()
        if response.mimetype != EVENT_STREAM:  # a stream writes its line when it ends
            self._log(lambda: _request_facts(request, settings), response.status_code, response.content_length, record)
        return response

    def _route(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        if request.method == "OPTIONS":
            return _response(204, b"", {})
        try:
            document = self._document(request)
            if document is not None:
                return document
            return self._generate(request, record)
        except ImageGenError as error:
            record.fields["code"] = error.code
            if isinstance(error, ConfigurationError):
                record.fields["error"] = error.message
            return _error_response(error, record.request_id)
        except Exception:
            record.fields["code"] = "internal_error"
            return _error_response(self._unexpected(request.method, request.path, record), record.request_id)

    def _unexpected(self, method: str, path: str, record: RequestRecord) -> ImageGenError:
        """Log the exception being handled; the error the caller sees instead, no internals."""
        self._logger.exception("Unexpected error while handling %s %s", method, path, extra={"fields": {"requestId": record.request_id}})
        return ImageGenError("Something went wrong on the server. Try again; if it keeps happening, report the request id.")

    def _document(self, request: flask.Request) -> flask.Response | None:
        """The page and the OpenAPI document: GET only. None for the API's paths."""
        if request.path == "/" and self._page is not None and request.method in ("GET", "HEAD"):
            return self._page_response()
        documents = {"/openapi.yaml": self._openapi_response, "/capabilities.json": self._capabilities_response}
        if self._page is not None:
            documents["/index.html"] = self._page_response
        if request.path not in documents:
            return None
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(
                f"{request.path} is a document: use GET. Generate images with POST to the API.",
                headers={"Allow": "GET, HEAD"},
            )
        return documents[request.path]()

    def _page_response(self) -> flask.Response:
        assert self._page is not None
        return _response(
            200,
            self._page.html,
            {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": self._page.content_security_policy},
        )

    def _capabilities_response(self) -> flask.Response:
        if isinstance(self._settings, ConfigurationError):
            raise self._settings
        return _response(200, self._capabilities, {"Content-Type": "application/json"})

    def _openapi_response(self) -> flask.Response:
        return _response(200, OPENAPI_PATH.read_bytes(), {"Content-Type": "application/yaml; charset=utf-8"})

    def _generate(self, request: flask.Request, record: RequestRecord) -> flask.Response:
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
        record.fields["caller"] = caller.key
        with record.phase("validate"):
            check_content_type(request.headers.get("Content-Type"))
            generation = parse_generation_request(_read_body(request), settings)
        admission = self._service.admit(generation, caller.key, record)
        if wants_event_stream(request.accept_mimetypes):
            return self._stream(request, admission, record)
        return _success_response(self._service.produce(admission))

    def _stream(self, request: flask.Request, admission: Admission, record: RequestRecord) -> flask.Response:
        """Server-Sent Events (imagegen.streaming): the work on its own thread, its progress
        as events, then the same answer as JSON in one `result` or `error` event."""
        settings = self._settings if isinstance(self._settings, Settings) else None
        facts = _request_facts(request, settings)
        record.fields["stream"] = True

        def work(progress: ProgressSink, cancelled: threading.Event) -> Produced:
            try:
                return self._service.produce(admission, progress, cancelled)
            except ImageGenError as error:
                record.fields["code"] = error.code
                if isinstance(error, ConfigurationError):
                    record.fields["error"] = error.message
                raise
            except Exception:
                record.fields["code"] = "internal_error"
                raise self._unexpected(facts["method"], facts["path"], record) from None

        def finished(outcome: Outcome) -> None:
            if outcome.status == CLIENT_CLOSED:
                record.fields["code"] = Cancelled.code
                record.fields["clientClosed"] = True
            self._log(lambda: facts, outcome.status, outcome.bytes_sent, record)

        stream = GenerationStream(
            record.request_id,
            work,
            success_body,
            error_payload,
            client_gone=disconnect_probe(request.environ),
            on_finish=finished,
        )
        return _response(200, stream.body(), {"Content-Type": EVENT_STREAM, "X-Accel-Buffering": "no"})

    def _log(
        self, facts: Callable[[], dict[str, Any]], status: int, response_size: int | None, record: RequestRecord
    ) -> None:
        """The request's log line. The answer is ready by now, maybe with a paid image: a line
        that cannot be written must never cost it."""
        try:
            self._write_log(facts(), status, response_size, record)
        except Exception:
            pass

    def _write_log(self, facts: dict[str, Any], status: int, response_size: int | None, record: RequestRecord) -> None:
        fields = record.fields
        if record.phases:
            fields["timingsMs"] = {**record.phases, "total": record.total_ms()}
        if record.attempts:
            fields["attempts"] = [dataclasses.asdict(attempt) for attempt in record.attempts]
        entry: dict[str, Any] = {
            "requestId": record.request_id,
            "httpRequest": http_request_fields(
                method=facts["method"],
                url=facts["path"],  # no query string: it could hold anything
                status=status,
                latency_seconds=record.total_ms() / 1000,
                user_agent=facts["user_agent"],
                remote_ip=facts["remote_ip"],
                request_size=facts["request_size"],
                response_size=response_size,
            ),
            "imagegen": fields,
            **facts["trace"],
        }
        severity = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 or "warning" in fields else logging.INFO
        code = f" {fields['code']}" if "code" in fields else ""
        self._logger.log(
            severity, "%s %s %s%s in %.0f ms", facts["method"], facts["path"], status, code, record.total_ms(), extra={"fields": entry}
        )


def _request_facts(request: flask.Request, settings: Settings | None) -> dict[str, Any]:
    """What the log line says about the request, read while the request is still there: a
    stream writes its line after the framework has moved on."""
    hops = settings.trusted_proxy_hops if settings else 0  # unknown: trust no forwarded entry
    return {
        "method": request.method,
        "path": request.path,
        "user_agent": request.headers.get("User-Agent"),
        "remote_ip": client_ip(request.headers.get("X-Forwarded-For"), request.remote_addr, hops),
        "request_size": request.content_length,
        "trace": trace_fields(
            request.headers.get("X-Cloud-Trace-Context"), request.headers.get("traceparent"), settings and settings.gcp_project
        ),
    }


def build_handler(environ: Mapping[str, str]) -> Handler:
    """The handler for a process: settings are read once; a bad setting answers 500s that name it."""
    try:
        settings: Settings | ConfigurationError = load_settings(environ)
        get_logger(settings.log_format)
    except ConfigurationError as error:
        get_logger().error("Invalid configuration: %s", error.message)
        settings = error
    return Handler(settings)


def _read_body(request: flask.Request) -> bytes:
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


# Raw bytes per base64 piece of a streamed answer: a multiple of 3, so pieces join cleanly,
# and small enough (64 KiB of base64) for malloc to reuse heap memory rather than map fresh
# pages for every piece.
BASE64_PIECE = 3 * 16 * 1024


def success_body(produced: Produced) -> tuple[Iterator[bytes], int]:
    """The success JSON as pieces and its length, the image's base64 made piece by piece.

    The image is megabytes: as one string its base64 and then the joined answer would each be
    another copy per request in flight. Base64 needs no JSON escaping, so it is spliced in.
    """
    fields = produced.answer_fields()
    head = b'{"success": true, "imageUrl": "data:image/png;base64,'
    tail = b'", ' + json.dumps(fields, ensure_ascii=False)[1:].encode()  # '"filePath": ..., ...}'
    png = produced.png
    length = len(head) + 4 * ((len(png) + 2) // 3) + len(tail)

    def pieces() -> Iterator[bytes]:
        yield head
        # The PNG's small head is topped up from the body to a multiple of 3 bytes, so only
        # the very last piece can carry base64 padding.
        cut = -len(png.head) % 3
        yield pybase64.b64encode(png.head + png.body[:cut].tobytes())
        body = png.body[cut:]
        for start in range(0, len(body), BASE64_PIECE):
            yield pybase64.b64encode(body[start : start + BASE64_PIECE])
        yield tail

    return pieces(), length


def _success_response(produced: Produced) -> flask.Response:
    body, length = success_body(produced)
    return _response(200, body, {"Content-Type": "application/json", "Content-Length": str(length)})


def error_payload(error: ImageGenError, request_id: str) -> dict[str, Any]:
    payload: dict[str, Any] = {"success": False, "error": error.message, "code": error.code, "requestId": request_id}
    if error.field:
        payload["field"] = error.field
    return payload


def _error_response(error: ImageGenError, request_id: str) -> flask.Response:
    body = json.dumps(error_payload(error, request_id), ensure_ascii=False).encode()
    return _response(error.status, body, {"Content-Type": "application/json", **error.headers})


def _response(status: int, body: bytes | Iterator[bytes], headers: Mapping[str, str]) -> flask.Response:
    response = flask.Response(body, status=status)
    response.headers.update(COMMON_HEADERS)
    response.headers.update(headers)
    return response


def _read_piece(stream: Any, size: int) -> bytes:
    """One read of the request body. A body the server cannot parse (a chunk size of "zz", a
    missing chunk terminator, the connection closed half-way) is the caller's 400, not a 500:
    gunicorn raises its ParseException or NoMoreData, Werkzeug's server ClientDisconnected."""
    try:
        return stream.read(size)
    except _malformed_body_errors() as error:
        from imagegen.errors import InvalidRequest

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
