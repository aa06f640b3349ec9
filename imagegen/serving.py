"""What the server stack answers outside the handler, made to fit the API.

functions-framework answers `/robots.txt` and `/favicon.ico` itself (an HTML 404, any method)
and Flask turns a crash outside the handler into an HTML 500: `json_error_pages` registers JSON
answers for both, in the API's error shape, through `functions_framework.errorhandler`.

gunicorn's own answers to requests it cannot parse (a 400 for a bad request line, a 431 for
oversized headers) are written before Flask is reached and stay HTML: see the README.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import flask
from werkzeug.exceptions import HTTPException

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
