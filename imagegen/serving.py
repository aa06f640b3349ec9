"""What the server stack answers outside the handler, made to fit the API.

functions-framework answers `/robots.txt` and `/favicon.ico` itself (an HTML 404, any method)
and Flask turns a crash outside the handler into an HTML 500: `json_error_pages` registers JSON
answers for both, in the API's error shape, through `functions_framework.errorhandler`.

gunicorn's gthread worker, which functions-framework runs, waits up to 5 s for a connection's
first byte, but once one byte has come it reads the rest of the request head with no time
limit: a client that sends one byte and stops holds a worker thread for good, and `THREADS`
such clients stop the instance. functions-framework passes no gunicorn setting through, so
`limit_request_head_time` puts a socket timeout on reading each request's head (lifted again
before the handler runs: bodies and answers are the handler's business). A head that does not
arrive in time closes the connection at once (gunicorn's graceful close would linger 2 s on
its main thread, waiting for a client that is not sending). Cloud Run's front end forwards only complete requests,
so deployed functions never see such a client; this protects `./scripts/run-local` and any
container run without that front end.

gunicorn's own answers to requests it cannot parse (a 400 for a bad request line, a 431 for
oversized headers) are written before Flask is reached and stay HTML: see the README.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import flask
from werkzeug.exceptions import HTTPException

from imagegen.config import DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS
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


def limit_request_head_time(seconds: float) -> None:
    """Give each request head `seconds` (REQUEST_HEAD_TIMEOUT_SECONDS) to arrive in gunicorn's gthread worker.

    Called from main.py, which functions-framework imports in gunicorn's parent process before
    the worker is forked, so the worker inherits the patched classes. Calling it again only
    changes the limit.
    """
    try:
        from gunicorn.workers import gthread
    except ImportError:  # not under gunicorn (Windows, Flask's development server)
        return
    _HeadTimeout.seconds = seconds
    if getattr(gthread.TConn.init, "_imagegen_head_timeout", False):
        return
    conn_init, conn_close = gthread.TConn.init, gthread.TConn.close
    handle_request = gthread.ThreadWorker.handle_request

    def init(conn) -> None:
        # handle() calls init() before reading every request head on a connection, kept-alive
        # ones included (it returns early for those), right after making the socket blocking.
        conn_init(conn)
        conn.sock.settimeout(_HeadTimeout.seconds)
        conn.imagegen_head_deadline = time.monotonic() + _HeadTimeout.seconds

    def handle_request_without_timeout(worker, req, conn):
        conn.imagegen_head_deadline = None
        conn.sock.settimeout(None)  # the head is in; gunicorn blocks from here on as before
        return handle_request(worker, req, conn)

    def close(conn, graceful: bool = False) -> None:
        # A graceful close lingers up to 2 s for the peer to close too, on gunicorn's main
        # thread: for a client that stalled sending its head, that is 2 s of no accepting.
        deadline = getattr(conn, "imagegen_head_deadline", None)
        if graceful and deadline is not None and time.monotonic() >= deadline:
            graceful = False
        conn_close(conn, graceful)

    init._imagegen_head_timeout = True  # type: ignore[attr-defined]
    gthread.TConn.init = init
    gthread.TConn.close = close
    gthread.ThreadWorker.handle_request = handle_request_without_timeout
    # gunicorn logs a timed-out head as a "Socket error" with a traceback: expected here.
    logging.getLogger("gunicorn.error").addFilter(_quiet_head_timeouts)


class _HeadTimeout:
    seconds: float = DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS


def _quiet_head_timeouts(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (isinstance(exc, TimeoutError) and record.getMessage() == "Socket error processing request.")
