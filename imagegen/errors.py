"""Errors that reach the caller.

Each error is raised once, where it is known, and carries what the HTTP handler needs to answer:
the status, a stable machine-readable `code`, and a public message a person can act on. The
handler turns any `ImageGenError` into JSON in one place; anything else becomes a generic 500.
"""

from __future__ import annotations

import math


class ImageGenError(Exception):
    status: int = 500
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.field = field
        self.headers = dict(headers or {})


# --- the caller's request -------------------------------------------------------------------


class InvalidRequest(ImageGenError):
    status = 400
    code = "invalid_field"


class MethodNotAllowed(ImageGenError):
    status = 405
    code = "method_not_allowed"


class PayloadTooLarge(ImageGenError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ImageGenError):
    status = 415
    code = "unsupported_media_type"


class Unauthorized(ImageGenError):
    status = 401
    code = "unauthorized"


class RateLimited(ImageGenError):
    status = 429
    code = "rate_limited"
    # The refusing bucket (an imagegen.state.base.RateDecision), for the RateLimit headers of
    # the 429; None if raised elsewhere.
    decision: object | None = None


class UrlSignatureInvalid(ImageGenError):
    """An image URL whose signature does not match, or whose time is up."""

    status = 403
    code = "invalid_signature"


class ImageNotFound(ImageGenError):
    """A signed image URL whose file is not (or no longer) in this instance's store."""

    status = 404
    code = "image_not_found"


class StreamTooLarge(ImageGenError):
    """An image too large for a streamed answer (Cloud Run ends one at 10 MB) that has no URL
    to send instead: only in a stream's `error` event, after the images that fit."""

    status = 413
    code = "stream_too_large"

# The connection's own errors, answered by the server before the handler runs (imagegen/connections.py).


class RequestTimeout(ImageGenError):
    status = 408
    code = "request_timeout"


class UriTooLong(ImageGenError):
    status = 414
    code = "uri_too_long"


class HeadersTooLarge(ImageGenError):
    status = 431
    code = "headers_too_large"


class UnsupportedTransferCoding(ImageGenError):
    status = 501
    code = "unsupported_transfer_coding"


# --- this deployment ------------------------------------------------------------------------


class ConfigurationError(ImageGenError):
    """A setting is missing or invalid; the message names the environment variable."""

    status = 500
    code = "invalid_configuration"


# --- the backends ---------------------------------------------------------------------------


class UpstreamError(ImageGenError):
    """A backend (an image API, a router's inference provider, the local model) failed; the code says how.

    `retryable` and `fail_over` tell the client what may help: the same provider again after
    a wait (`retry_after` seconds when the server said), or the next route: another provider
    or another backend.
    """

    status = 502
    code = "upstream_unavailable"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        upstream_status: int | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        retryable: bool = False,
        fail_over: bool = False,
    ) -> None:
        # Retry-After is whole seconds; hints like a retry-after-ms header come as fractions.
        headers = {"Retry-After": str(max(1, math.ceil(retry_after)))} if retry_after is not None else None
        super().__init__(message, code=code, headers=headers)
        self.upstream_status = upstream_status
        self.reported_status: str | None = None  # "HF status 503": how the vendor's status is named
        self.request_id = request_id
        self.retry_after = retry_after
        self.retryable = retryable
        self.fail_over = fail_over


class UpstreamRateLimited(UpstreamError):
    status = 429
    code = "upstream_rate_limited"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ContentRejected(UpstreamError):
    """The backend's safety system refused the prompt or the image; the message says why."""

    status = 422
    code = "content_rejected"


class BackendBusy(UpstreamError):
    """Every slot for a local model is taken; the caller should come back shortly."""

    status = 503
    code = "backend_busy"


class BadAnswer(UpstreamError):
    """A backend answered success without a usable image: a body of the wrong shape, JSON
    nested too deeply, image data that is not an image. Another route may do better."""

    status = 502
    code = "upstream_bad_response"


class ServerBusy(ImageGenError):
    """This instance could not take the image in (its memory slots stayed full); not upstream's fault."""

    status = 503
    code = "server_busy"


class Cancelled(ImageGenError):
    """The caller went away; nothing is answered, the work stops where it can."""

    status = 499
    code = "cancelled"

    def __init__(self, message: str = "The request was cancelled by the caller.") -> None:
        super().__init__(message)


class LocalModelUnavailable(UpstreamError):
    """The local model cannot run now (out of memory, not in the cache and not downloadable):
    another backend may serve the request, so the dispatcher fails over."""

    status = 503
    code = "local_model_unavailable"


# --- storage (never reaches the caller as an error: the image is returned with a warning) -----


class StorageError(Exception):
    """Storing the image failed. The handler still answers 200 with the image and a warning."""


# --- shared state: limits that hold across instances ------------------------------------------


class BudgetExhausted(ImageGenError):
    """A daily image budget (all callers, or this caller) is spent until 00:00 UTC."""

    status = 429
    code = "budget_exhausted"


class StateUnavailable(ImageGenError):
    """The shared state (Redis) did not answer in time and STATE_FAILURE=closed."""

    status = 503
    code = "state_unavailable"
