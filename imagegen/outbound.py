"""One HTTP exchange with a vendor, bounded by the request's deadline: send, read, download.

Every HTTP backend sends through `HttpExchange`: the credential is added by the backend on
the requests to its own API only (never to an image download), bodies are read within the
deadline and a size limit, and every failure becomes an `UpstreamError` worded for the
vendor (imagegen.backends.vendor). Downloads follow redirects themselves, checking every hop.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from imagegen.backends.base import GenerationContext
from imagegen.backends.vendor import CallContext, error_for_status
from imagegen.config import MAX_IMAGE_BYTES
from imagegen.errors import ServerBusy, UpstreamError, UpstreamTimeout

CONNECT_TIMEOUT_SECONDS = 10.0
USER_AGENT = "imagegen/1.0"
MAX_ERROR_BODY_BYTES = 64 * 1024
# A body of declared length is read with reads of up to this much, each returning what the
# socket holds: a 1024x1024 PNG arrives in a few reads, and the deadline is checked between
# them, so a body trickled a byte at a time cannot outlast it.
READ_BYTES = 4 * 1024 * 1024
MAX_REDIRECTS = 5
OK_STATUSES = (200, 201, 202)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def new_session(pool_size: int = 256) -> requests.Session:
    """A pooled session: keep-alive to the vendor saves a TLS handshake per generation.

    The pool is larger than any sensible THREADS, so no request in a burst has to reconnect.
    Proxy settings are read from the environment once here; with trust_env, requests reads
    the whole environment again on every call (about half a millisecond).
    """
    session = requests.Session()
    session.trust_env = False
    proxies = urllib.request.getproxies()
    if "no" in proxies:
        proxies["no_proxy"] = proxies.pop("no")
    session.proxies.update(proxies)
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=pool_size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session


class HttpExchange:
    def __init__(self, session: requests.Session, timeout_seconds: float, deadline_seconds: float) -> None:
        self._session = session
        self._timeout_seconds = timeout_seconds
        self._deadline_seconds = deadline_seconds

    def send(
        self,
        method: str,
        url: str,
        call: CallContext,
        context: GenerationContext,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: Any = None,
        files: Any = None,
        accept_statuses: tuple[int, ...] = OK_STATUSES,
    ) -> Answer:
        """One request to the vendor's API: the status checked, the body read within the deadline."""
        timeout = self._request_timeout(call, context)
        try:
            response = self._session.request(
                method,
                url,
                headers=headers,
                json=json,
                data=data,
                files=files,
                timeout=(min(CONNECT_TIMEOUT_SECONDS, timeout), timeout),
                stream=True,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise self.timeout(call) from None
        except requests.RequestException as error:
            raise _not_answered(call, error, urlsplit(url).hostname) from None
        with response:
            call.status = response.status_code
            call.note_request_id(response.headers.get("x-request-id") or response.headers.get("request-id"))
            ok = response.status_code in accept_statuses
            if ok and context.slot is not None and not context.slot.take(timeout=context.time_left()):
                raise _server_busy()
            body = self._read_body(response, MAX_IMAGE_BYTES if ok else MAX_ERROR_BODY_BYTES, context, call, is_image=ok)
        if not ok:
            raise error_for_status(response.status_code, response.headers, body, call)
        return Answer(response.status_code, response.headers, body)

    def download(self, url: str, call: CallContext, context: GenerationContext, allow_loopback: bool) -> bytes:
        """The image from a vendor's CDN: no credential, every redirect hop checked, bounded in
        size and time. Raises BadDownload (the backend says the answer had no usable image)."""
        for _ in range(MAX_REDIRECTS + 1):
            refusal = download_refusal(url, allow_loopback)
            if refusal:
                raise BadDownload(f"an image URL this function will not fetch ({refusal})")
            timeout = self._request_timeout(call, context)
            try:
                with self._session.get(
                    url, timeout=(min(CONNECT_TIMEOUT_SECONDS, timeout), timeout), stream=True, allow_redirects=False
                ) as response:
                    if response.is_redirect and response.headers.get("Location"):
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status_code != 200:
                        raise BadDownload(f"HTTP {response.status_code} when downloading the image")
                    if context.slot is not None and not context.slot.take(timeout=context.time_left()):
                        raise _server_busy()
                    return self._read_body(response, MAX_IMAGE_BYTES, context, call, is_image=True)
            except requests.Timeout:
                raise self.timeout(call) from None
            except requests.RequestException as error:
                raise BadDownload(f"no image from its URL ({type(error).__name__})") from None
        raise BadDownload(f"more than {MAX_REDIRECTS} redirects when downloading the image")

    def timeout(self, call: CallContext) -> UpstreamError:
        return call.error(
            UpstreamTimeout,
            f"{call.vendor.name} did not answer in time (TIMEOUT_SECONDS={self._timeout_seconds:g}, "
            f"DEADLINE_SECONDS={self._deadline_seconds:g}). The model may be busy or starting: try again in a minute",
            retryable=True,
            fail_over=True,
        )

    def _request_timeout(self, call: CallContext, context: GenerationContext) -> float:
        timeout = min(self._timeout_seconds, context.time_left())
        if timeout <= 0:
            raise self.timeout(call)
        return timeout

    def _read_body(
        self, response: requests.Response, limit: int, context: GenerationContext, call: CallContext, is_image: bool
    ) -> bytes:
        """The body, within `limit` bytes and the deadline."""
        declared = response.headers.get("Content-Length", "")
        expected = int(declared) if declared.isascii() and declared.isdigit() and len(declared) < 16 else None
        if "Content-Encoding" in response.headers:
            expected = None
        if expected is not None and expected > limit:
            if is_image:
                raise _too_large(call, limit)
            expected = None  # an error page: its first part is all the message we need
        try:
            if expected is not None:
                return self._read_declared(response, expected, context, call)
            return self._read_pieces(response, limit, context, call, is_image)
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise self.timeout(call) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
            raise _broken_off(call, error) from None

    def _read_declared(self, response: requests.Response, length: int, context: GenerationContext, call: CallContext) -> bytes:
        """A body of known length, in as few reads as the socket allows.

        Every read takes the GIL back, and with a hundred answers arriving together that
        hand-over, not the copying, is what costs: reading in 64 KiB pieces took about 30
        reads per image. `read1` returns whatever the socket holds (megabytes on a fast
        link), so an image takes a few reads, and the deadline is checked after each.
        """
        pieces: list[bytes] = []
        left = length
        while left > 0:
            piece = response.raw.read1(min(left, READ_BYTES), decode_content=False)
            if not piece:
                break  # the connection closed early: the image check rejects what arrived
            pieces.append(piece)
            left -= len(piece)
            if left > 0 and context.time_left() <= 0:
                raise self.timeout(call)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # or b"" for none

    def _read_pieces(
        self, response: requests.Response, limit: int, context: GenerationContext, call: CallContext, is_image: bool
    ) -> bytes:
        """A body of unknown length (or compressed): in pieces, stopping at `limit`."""
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=64 * 1024):
            if size + len(chunk) > limit:
                if is_image:
                    raise _too_large(call, limit)
                break  # an error page: its first part is all the message we need
            chunks.append(chunk)
            size += len(chunk)
            if context.time_left() <= 0:
                raise self.timeout(call)
        return b"".join(chunks)


class BadDownload(ValueError):
    """No usable image at the URL a vendor gave; the message says why."""


_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+))*", re.IGNORECASE)


def download_refusal(url: str, allow_loopback: bool) -> str | None:
    """Why this URL must not be fetched, or None. https to public hosts only; plain http only
    to this machine when the backend itself is a loopback stand-in (the tests)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        return f"{parts.scheme or 'no'} scheme"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
        if _NUMERIC_HOST.fullmatch(host):
            # 127.1, 2130706433, 0x7f.1: resolvers read these as addresses; nobody's CDN uses them.
            return "a numeric host that is not a plain IP address"
    is_loopback = host == "localhost" or (address is not None and address.is_loopback)
    if is_loopback and allow_loopback:
        return None
    if parts.scheme != "https":
        return "plain http"
    if is_loopback or (address is not None and not address.is_global):
        return "a private address"
    return None


def _not_answered(call: CallContext, error: requests.RequestException, host: str | None) -> UpstreamError:
    """No answer: either the vendor could not be reached, or the connection broke after."""
    reason = getattr(error.args[0], "reason", None) if error.args else None
    connect_failed = isinstance(error, requests.exceptions.ConnectTimeout) or isinstance(
        reason, urllib3.exceptions.NewConnectionError  # NameResolutionError is one too
    )
    if connect_failed:
        return call.error(
            UpstreamError,
            f"Could not reach {call.vendor.name} at {host} ({_cause(reason)}). Check the server's network and "
            f"{call.vendor.url_variable}, then try again",
            code="upstream_unreachable",
            retryable=True,
            fail_over=True,
        )
    return _broken_off(call, error)


def _cause(reason: object) -> str:
    """'connection refused', 'name not resolved': what failed, without hosts, ports or paths."""
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return "name not resolved"
    if isinstance(reason, urllib3.exceptions.NewConnectionError) and "refused" in str(reason).lower():
        return "connection refused"
    return type(reason).__name__ if reason is not None else "no connection"


def _broken_off(call: CallContext, error: Exception) -> UpstreamError:
    return call.error(
        UpstreamError,
        f"The connection to {call.vendor.name} broke before the whole answer arrived ({type(error).__name__}). Try again",
        code="upstream_bad_response",
        retryable=True,
        fail_over=True,
    )


def _too_large(call: CallContext, limit: int) -> UpstreamError:
    return call.error(
        UpstreamError,
        f"{call.vendor.name} answered with an image larger than {limit // (1024 * 1024)} MiB, "
        "more than this function can return. Ask for a smaller width and height",
        code="upstream_bad_response",
    )


def _server_busy() -> ServerBusy:
    return ServerBusy(
        "This server is holding as many images in memory as it may, and the request waited until its "
        "deadline for room. Try again in a few seconds.",
        headers={"Retry-After": "5"},
    )
