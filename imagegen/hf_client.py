"""Getting an image out of the Hugging Face router, as dependably as it can be done.

`RouterClient.generate` reads top to bottom: find where the model is served (routes), try each
route in order with retries (`_with_retries`), each try one request (`_attempt`) plus, for some
providers, polling and a download. All of it runs inside one deadline, HF_DEADLINE_SECONDS.

Every failure becomes an `UpstreamError` whose message says what happened, what to do, and what
a user needs to report it (provider, model, HF status, request id). The token is added at the
last moment, only on requests to the router and the Hub, and is scrubbed from anything echoed.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import urllib3

from imagegen.config import MAX_IMAGE_BYTES, Settings
from imagegen.errors import UpstreamError, UpstreamRateLimited, UpstreamTimeout
from imagegen.images import NotAnImage, ensure_png
from imagegen.provider_mapping import ProviderMapping, Route
from imagegen.providers import PROVIDERS
from imagegen.providers.base import (
    Answer,
    BadAnswer,
    ImageUrl,
    NotFinished,
    PendingTask,
    PollingProvider,
    Provider,
    TaskFailed,
)
from imagegen.retry import MIN_ATTEMPT_SECONDS, RETRYABLE_STATUSES, Timing, backoff_delay, server_delay_seconds
from imagegen.slots import Slot
from imagegen.validation import GenerationRequest

CONNECT_TIMEOUT_SECONDS = 10.0
USER_AGENT = "imagegen/1.0"
MAX_ERROR_BODY_BYTES = 64 * 1024
# Bodies of declared length are read this much at a time, the deadline checked in between:
# a 1024x1024 PNG (1.5 to 3 MB) arrives in one read.
DECLARED_READ_BYTES = 4 * 1024 * 1024
MAX_UPSTREAM_MESSAGE_CHARS = 300
POLL_INTERVAL_SECONDS = 0.5
DEFAULT_RATE_LIMIT_RETRY_AFTER_SECONDS = 60

PROVIDER_MODELS_URL = "https://huggingface.co/models?pipeline_tag=text-to-image&inference_provider={provider}"


@dataclass(frozen=True)
class Attempt:
    """One try at one provider, for the request's log line."""

    provider: str
    status: int | None  # HF's HTTP status, None when no answer came
    code: str | None  # our error code; None when the try produced the image
    ms: float


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    model: str
    provider: str
    request_id: str | None


def new_session(pool_size: int = 256) -> requests.Session:
    """A pooled session: keep-alive to the router saves a TLS handshake per generation.

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


class RouterClient:
    def __init__(self, settings: Settings, session: requests.Session | None = None, timing: Timing | None = None) -> None:
        self._settings = settings
        self._session = session or new_session()
        self._timing = timing or Timing()
        self._mapping = ProviderMapping(settings, self._session, self._timing.clock)

    def generate(
        self, request: GenerationRequest, attempts: list[Attempt] | None = None, slot: Slot | None = None
    ) -> GeneratedImage:
        """The image, or the `UpstreamError` of the last try; `attempts` receives every try.

        `slot` is taken before an answer's body is read (see imagegen.slots); the caller
        releases it once the image is no longer needed.
        """
        attempts = [] if attempts is None else attempts
        token = self._settings.require_token()
        deadline = self._timing.clock() + self._settings.hf_deadline_seconds
        routes = self._mapping.routes(request.model, request.provider, token)
        tried: list[str] = []
        for index, route in enumerate(routes):
            try:
                return self._with_retries(route, request, token, deadline, attempts, slot)
            except UpstreamError as error:
                is_last = index == len(routes) - 1
                if is_last or not error.fail_over or self._time_left(deadline) < MIN_ATTEMPT_SECONDS:
                    if tried:
                        error.message = f"{error.message} Also tried: {', '.join(tried)}."
                    raise
                tried.append(f"{route.provider} (HF status {error.upstream_status or error.code})")
        raise AssertionError("routes() returns at least one route")

    def _with_retries(
        self,
        route: Route,
        request: GenerationRequest,
        token: str,
        deadline: float,
        attempts: list[Attempt],
        slot: Slot | None,
    ) -> GeneratedImage:
        retries = 0
        while True:
            started = self._timing.clock()
            try:
                image = self._attempt(route, request, token, deadline, slot)
                attempts.append(Attempt(route.provider, 200, None, self._elapsed_ms(started)))
                return image
            except UpstreamError as error:
                attempts.append(Attempt(route.provider, error.upstream_status, error.code, self._elapsed_ms(started)))
                if not error.retryable or retries >= self._settings.hf_max_retries:
                    raise
                retries += 1
                delay = backoff_delay(retries, error.retry_after, self._timing.random())
                if self._time_left(deadline) - delay < MIN_ATTEMPT_SECONDS:
                    raise  # no time for another try; 429 passes its Retry-After on
                self._timing.sleep(delay)

    def _attempt(
        self, route: Route, request: GenerationRequest, token: str, deadline: float, slot: Slot | None
    ) -> GeneratedImage:
        provider = PROVIDERS[route.provider]
        context = _Context(provider.name, request.model, token, slot)
        call = provider.build(request, route.provider_model, self._settings.hf_router_url)
        response, body = self._send("POST", call.url, context, deadline, json=call.json, headers={**call.headers, **context.auth()})
        try:
            answer = provider.read_answer(body, response.headers.get("Content-Type", "").lower())
            if isinstance(answer, PendingTask):
                answer = self._poll(provider, answer, context, deadline)
            data = self._download(answer.url, context, deadline) if isinstance(answer, ImageUrl) else answer.data
            png = ensure_png(data)
        except (BadAnswer, NotAnImage) as error:
            raise context.error(
                UpstreamError,
                f"Hugging Face answered without a usable image (got {error}). Try again; if it "
                "persists, try another model or provider",
                code="upstream_bad_response",
            ) from None
        except TaskFailed as error:
            raise context.error(
                UpstreamError,
                f"The provider could not generate this image: {_clip(str(error))}. Try another "
                "prompt or model",
                code="generation_failed",
            ) from None
        except NotFinished:
            raise context.error(
                UpstreamTimeout,
                "The provider did not finish the image in time. Try again in a minute",
                fail_over=True,
            ) from None
        return GeneratedImage(png=png, model=request.model, provider=provider.name, request_id=context.request_id)

    def _send(
        self, method: str, url: str, context: _Context, deadline: float, **kwargs
    ) -> tuple[requests.Response, bytes]:
        """One request to the router: the status checked, the body read within the deadline."""
        timeout = min(self._settings.hf_timeout_seconds, self._time_left(deadline))
        if timeout <= 0:
            raise _timeout(context, self._settings)
        try:
            response = self._session.request(
                method,
                url,
                timeout=(min(CONNECT_TIMEOUT_SECONDS, timeout), timeout),
                stream=True,
                allow_redirects=False,
                **kwargs,
            )
        except requests.Timeout:
            raise _timeout(context, self._settings) from None
        except requests.RequestException as error:
            raise _unreachable(context, self._settings.hf_router_url, error) from None
        with response:
            context.status = response.status_code
            context.request_id = response.headers.get("x-request-id") or context.request_id
            ok = response.status_code in (200, 201, 202)
            if ok and context.slot is not None and not context.slot.take(timeout=self._time_left(deadline)):
                raise _timeout(context, self._settings)
            body = self._read_body(response, MAX_IMAGE_BYTES if ok else MAX_ERROR_BODY_BYTES, deadline, context, ok)
        if not ok:
            raise _error_for_status(response, body, context)
        return response, body

    def _poll(self, provider: Provider, task: PendingTask, context: _Context, deadline: float) -> Answer:
        if not hasattr(provider, "read_task"):
            raise BadAnswer("a pending task from a provider that answers at once")
        polling: PollingProvider = provider  # type: ignore[assignment]
        url = f"{self._settings.hf_router_url}/{provider.name}{task.poll_path}"
        while True:
            if self._time_left(deadline) < POLL_INTERVAL_SECONDS:
                raise _timeout(context, self._settings)
            self._timing.sleep(POLL_INTERVAL_SECONDS)
            _, body = self._send("GET", url, context, deadline, headers=context.auth())
            answer = polling.read_task(body)
            if answer is not None:
                return answer

    def _download(self, url: str, context: _Context, deadline: float) -> bytes:
        """The image from a provider's CDN: https only, no token, bounded in size and time."""
        if not _downloadable(url):
            raise BadAnswer(f"an image URL this function will not fetch ({urlsplit(url).scheme or 'no'} scheme)")
        timeout = min(self._settings.hf_timeout_seconds, self._time_left(deadline))
        try:
            with self._session.get(url, timeout=(min(CONNECT_TIMEOUT_SECONDS, timeout), timeout), stream=True) as response:
                if response.status_code != 200:
                    raise BadAnswer(f"HTTP {response.status_code} when downloading the image")
                return self._read_body(response, MAX_IMAGE_BYTES, deadline, context, True)
        except requests.Timeout:
            raise _timeout(context, self._settings) from None
        except requests.RequestException as error:
            raise BadAnswer(f"no image from its URL ({type(error).__name__})") from None

    def _read_body(
        self, response: requests.Response, limit: int, deadline: float, context: _Context, is_image: bool
    ) -> bytes:
        """The body, within `limit` bytes and the deadline."""
        declared = response.headers.get("Content-Length", "")
        expected = int(declared) if declared.isdigit() and "Content-Encoding" not in response.headers else None
        if expected is not None and expected > limit:
            if is_image:
                raise _too_large(context, limit)
            expected = None  # an error page: its first part is all the message we need
        try:
            if expected is not None:
                return self._read_declared(response, expected, deadline, context)
            return self._read_pieces(response, limit, deadline, context, is_image)
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise _timeout(context, self._settings) from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
            raise _broken_off(context, error) from None

    def _read_declared(self, response: requests.Response, length: int, deadline: float, context: _Context) -> bytes:
        """A body of known length, as the socket delivers it: a whole image in one read.

        Every read takes the GIL back, and with a hundred answers arriving together that
        hand-over, not the copying, is what costs: reading in 64 KiB pieces took about 30
        reads per image, and thread switching became about 40% of the worker's CPU. One read
        also puts the bytes straight into the object that is returned: no buffer to clear,
        and below DECLARED_READ_BYTES nothing to join.
        """
        pieces: list[bytes] = []
        left = length
        while left > 0:
            piece = response.raw.read(min(left, DECLARED_READ_BYTES), decode_content=False)
            if not piece:
                break  # the connection closed early: the image check rejects what arrived
            pieces.append(piece)
            left -= len(piece)
            if left > 0 and self._timing.clock() > deadline:
                raise _timeout(context, self._settings)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # or b"" for none

    def _read_pieces(
        self, response: requests.Response, limit: int, deadline: float, context: _Context, is_image: bool
    ) -> bytes:
        """A body of unknown length (or compressed): in pieces, stopping at `limit`."""
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=64 * 1024):
            if size + len(chunk) > limit:
                if is_image:
                    raise _too_large(context, limit)
                break  # an error page: its first part is all the message we need
            chunks.append(chunk)
            size += len(chunk)
            if self._timing.clock() > deadline:
                raise _timeout(context, self._settings)
        return b"".join(chunks)

    def _elapsed_ms(self, started: float) -> float:
        return round((self._timing.clock() - started) * 1000, 1)

    def _time_left(self, deadline: float) -> float:
        return deadline - self._timing.clock()


@dataclass
class _Context:
    """What every upstream error message names, so a user can report it."""

    provider: str
    model: str
    token: str
    slot: Slot | None = None
    status: int | None = None
    request_id: str | None = None

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def suffix(self) -> str:
        parts = [f"provider {self.provider}", f"model {self.model}"]
        if self.status is not None:
            parts.append(f"HF status {self.status}")
        if self.request_id:
            parts.append(f"request id {self.request_id}")
        return " (" + ", ".join(parts) + ")"

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "[redacted]") if self.token else text

    def error(self, cls: type[UpstreamError], message: str, **kwargs) -> UpstreamError:
        return cls(
            self.scrub(message) + self.suffix() + ".",
            upstream_status=self.status,
            request_id=self.request_id,
            **kwargs,
        )


def _downloadable(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return True
    # Plain http only to this machine: the tests' stand-in provider CDN.
    if parts.scheme == "http" and parts.hostname:
        if parts.hostname == "localhost":
            return True
        try:
            return ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            return False
    return False


def _error_for_status(response: requests.Response, body: bytes, context: _Context) -> UpstreamError:
    status = response.status_code
    detail = context.scrub(_upstream_message(body))
    said = f": {detail}" if detail else ""
    if status in (401, 403):
        return context.error(
            UpstreamError,
            "Hugging Face rejected the server's token. Check that HUGGING_FACE_API_KEY holds a "
            "valid token with the 'Make calls to Inference Providers' permission" + said,
            code="upstream_unauthorized",
        )
    if status == 402:
        return context.error(
            UpstreamError,
            "The Hugging Face account behind this server has used up its Inference Providers "
            "credits. Add credits or a PRO plan at https://huggingface.co/settings/billing, "
            "then try again" + said,
            code="upstream_credits_exhausted",
        )
    if status in (404, 410) or (status == 400 and "model_not_supported" in detail.lower().replace(" ", "_")):
        return context.error(
            UpstreamError,
            f"The model is not served by the {context.provider} provider{said}. Set HF_PROVIDER=auto "
            f"to use any provider that serves it, or set HF_MODEL to a model that {context.provider} "
            f"serves ({PROVIDER_MODELS_URL.format(provider=context.provider)})",
            code="model_not_available",
            fail_over=True,
        )
    delay = server_delay_seconds(response.headers.get("Retry-After"), body)
    wait_hint = f" Try again in {max(1, delay)} seconds" if delay is not None else " Try again in a minute"
    retryable = status in RETRYABLE_STATUSES
    if status == 429:
        error = context.error(
            UpstreamRateLimited,
            "Hugging Face is rate-limiting this server" + said + "." + wait_hint,
            retry_after=delay,
            retryable=True,
        )
        # Our caller always learns when to come back, even when Hugging Face did not say.
        error.headers.setdefault("Retry-After", str(DEFAULT_RATE_LIMIT_RETRY_AFTER_SECONDS))
        return error
    if status in (408, 504):
        return context.error(
            UpstreamTimeout,
            "Hugging Face timed out generating the image" + said + "." + wait_hint,
            retry_after=delay,
            retryable=True,
            fail_over=True,
        )
    if status >= 500:
        return context.error(
            UpstreamError,
            "Hugging Face had a problem generating the image" + said + "." + wait_hint,
            code="upstream_unavailable",
            retry_after=delay,
            retryable=retryable,
            fail_over=True,
        )
    return context.error(
        UpstreamError,
        "Hugging Face refused the request" + said + ". The model may not support one of the "
        "parameters (size, steps, guidance): try without them or with another model",
        code="upstream_rejected",
    )


def _upstream_message(body: bytes) -> str:
    """The human part of an HF error body, in any of the shapes the router uses."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return "" if text.lower().startswith(("<!doctype", "<html")) else _clip(text)
    if not isinstance(answer, dict):
        return ""
    parts: list[str] = []
    error = answer.get("error")
    if isinstance(error, str):
        parts.append(error)
    elif isinstance(error, list):
        parts.extend(str(item) for item in error)
    elif isinstance(error, dict):
        parts.extend(str(error[key]) for key in ("message", "code") if isinstance(error.get(key), str))
    if isinstance(answer.get("error_description"), str):
        parts.append(answer["error_description"])
    for item in answer.get("errors") or []:
        if isinstance(item, dict) and isinstance(item.get("message"), str):
            parts.append(item["message"])
    if not parts:
        parts.extend(str(answer[key]) for key in ("message", "detail") if isinstance(answer.get(key), str))
    return _clip("; ".join(parts))


def _clip(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > MAX_UPSTREAM_MESSAGE_CHARS:
        text = text[: MAX_UPSTREAM_MESSAGE_CHARS - 3] + "..."
    return text.rstrip(".")


def _timeout(context: _Context, settings: Settings) -> UpstreamError:
    return context.error(
        UpstreamTimeout,
        f"Hugging Face did not answer in time (HF_TIMEOUT_SECONDS={settings.hf_timeout_seconds:g}, "
        f"HF_DEADLINE_SECONDS={settings.hf_deadline_seconds:g}). The model may be busy or starting: "
        "try again in a minute",
        retryable=True,
        fail_over=True,
    )


def _unreachable(context: _Context, router_url: str, error: Exception) -> UpstreamError:
    host = urlsplit(router_url).hostname
    return context.error(
        UpstreamError,
        f"Could not reach Hugging Face at {host} ({type(error).__name__}). "
        "Check the server's network and HF_ROUTER_URL, then try again",
        code="upstream_unreachable",
        retryable=True,
    )


def _broken_off(context: _Context, error: Exception) -> UpstreamError:
    return context.error(
        UpstreamError,
        f"The connection to Hugging Face broke while the answer was arriving ({type(error).__name__}). "
        "Try again",
        code="upstream_bad_response",
        retryable=True,
    )


def _too_large(context: _Context, limit: int) -> UpstreamError:
    return context.error(
        UpstreamError,
        f"Hugging Face answered with an image larger than {limit // (1024 * 1024)} MiB, "
        "more than this function can return. Ask for a smaller width and height",
        code="upstream_bad_response",
    )
