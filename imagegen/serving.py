"""What the server stack answers outside the handler, made to fit the API.

functions-framework answers `/robots.txt` and `/favicon.ico` itself (an HTML 404, any method)
and Flask turns a crash outside the handler into an HTML 500: `json_error_pages` registers JSON
answers for both, in the API's error shape, through `functions_framework.errorhandler`.

gunicorn's gthread worker, which functions-framework runs, gives a connection a thread as soon
as its first byte comes, and the thread blocks reading the head, the body, and writing the
answer: `THREADS` clients that trickle a request or never read their answer stop the instance.
functions-framework passes no gunicorn setting through, so `buffer_connections` swaps in
imagegen/connections.py's worker, which reads whole requests and sends answers in its poller
under absolute deadlines (REQUEST_HEAD_TIMEOUT_SECONDS, REQUEST_BODY_TIMEOUT_SECONDS,
RESPONSE_WRITE_TIMEOUT_SECONDS) and answers what it refuses (408, 413, 414, 431, 400, 501) as
JSON, gunicorn's own parse errors included. Cloud Run's front end forwards only complete
requests, so deployed functions rarely meet such a client; this protects `./scripts/run-local`
and any container run without that front end.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import flask
from werkzeug.exceptions import HTTPException

from imagegen.config import Settings
from imagegen.connections import ConnectionLimits
from imagegen.logs import get_logger

# functions-framework's marker for a crashed execution (its crash_handler sets it on a 500).
CRASH_HEADER = ("X-Google-Status", "crash")
_HEADERS = {
    "Content-Type": "application/json",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def json_error_pages(errorhandler: Callable[[Any], Callable]) -> None:
    """Answer the framework's own errors as JSON; `errorhandler` is `functions_framework.errorhandler`."""
    errorhandler(HTTPException)(_http_error)
    # Registered for the code, not the class: Flask looks code handlers up first, and
    # functions-framework registers its HTML crash_handler for 500.
    errorhandler(500)(_crash)


def _http_error(error: HTTPException) -> flask.Response:
    status = error.code or 500
    if status == 404:
        code = "not_found"
        message = f"Nothing is served at {flask.request.path[:200]}. Generate images with POST to /api/generate-image."
    elif status == 405:
        code = "method_not_allowed"
        message = "This method is not allowed here."
    elif status == 413:
        code = "payload_too_large"
        message = "The request body is too large."
    elif status < 500:
        code = "invalid_body"
        message = "The request could not be read."
    else:
        return _crash(error)
    return _answer(status, code, message)


def _crash(error: Exception) -> flask.Response:
    original = getattr(error, "original_exception", None) or error
    get_logger().error(
        "Unexpected error outside the handler for %s %s",
        flask.request.method,
        flask.request.path,
        exc_info=(type(original), original, original.__traceback__),
    )
    code = "internal_error"
    response = _answer(
        500, code, "Something went wrong on the server. Try again; if it keeps happening, report the request id."
    )
    response.headers[CRASH_HEADER[0]] = CRASH_HEADER[1]
    return response


def _answer(status: int, code: str, message: str) -> flask.Response:
    request_id = uuid.uuid4().hex
    body = json.dumps({"success": False, "error": message, "code": code, "requestId": request_id})
    return flask.Response(body, status=status, headers={**_HEADERS, "X-Request-Id": request_id})


def buffer_connections(limits: ConnectionLimits) -> None:
    """Make gunicorn's gthread worker the one in imagegen/connections.py, with the limits set.

    Called from main.py, which functions-framework imports in gunicorn's parent process before
    the arbiter looks the worker class up by name (`gunicorn.workers.gthread.ThreadWorker`).
    Calling it again only changes the limits. With THREADS=1 gunicorn runs its sync worker
    instead, and functions-framework's THREADED_TIMEOUT_ENABLED worker is its own subclass of
    the original: neither is covered.
    """
    try:
        from gunicorn.workers import gthread
    except ImportError:  # not under gunicorn (Windows, Flask's development server)
        return
    from imagegen.connections import BufferingThreadWorker

    BufferingThreadWorker.limits = limits
    if gthread.ThreadWorker is BufferingThreadWorker:
        return
    gthread.ThreadWorker = BufferingThreadWorker  # type: ignore[misc]
    # A write that the client stalls past its limit ends the request with a TimeoutError, which
    # gunicorn logs as a "Socket error" with a traceback: expected here.
    logging.getLogger("gunicorn.error").addFilter(_quiet_head_timeouts)


def no_control_socket() -> None:
    """Start gunicorn without its control socket (gunicorn 25.1+, for the `gunicornc` tool).

    gunicorn's master starts it once the workers are spawned: a thread running an asyncio loop
    and a socket file under $HOME/.gunicorn, through which any process of the same user can
    reload or rescale the workers. Nothing here uses it, so it is a channel and a thread for
    nothing (and asyncio's imports, about 20 ms under `-X importtime`, though a cold start
    measured on one CPU shows no difference beyond its noise). functions-framework passes no
    gunicorn setting through, so the setting's default is changed; called from main.py before
    functions-framework makes gunicorn's configuration. An older gunicorn has none.
    """
    try:
        from gunicorn import config
    except ImportError:  # not under gunicorn
        return
    setting = getattr(config, "ControlSocketDisable", None)
    if setting is not None:
        setting.default = True


def _quiet_head_timeouts(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, TimeoutError) and record.getMessage() == "Socket error processing request.")


def connection_limits(settings: Settings | None) -> ConnectionLimits:
    """The limits these settings give; the defaults for a process whose settings are wrong
    (its handler answers every request with what is wrong)."""
    if settings is None:
        return ConnectionLimits()
    return ConnectionLimits(
        head_seconds=settings.request_head_timeout_seconds,
        body_seconds=settings.request_body_timeout_seconds,
        write_seconds=settings.response_write_timeout_seconds,
    )
