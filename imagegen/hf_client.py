"""Sending a provider's request through the Hugging Face router and reading the answer.

Every failure becomes an `UpstreamError` whose message says what happened, what to do, and
what a user needs to report it (provider, model, HF status, request id). The token is added
here, at the last moment, and is scrubbed from anything upstream echoes back.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import requests

from imagegen.config import MAX_IMAGE_BYTES, Settings
from imagegen.errors import UpstreamError, UpstreamRateLimited, UpstreamTimeout
from imagegen.images import NotAnImage, ensure_png
from imagegen.providers import PROVIDERS, Provider
from imagegen.validation import GenerationRequest

CONNECT_TIMEOUT_SECONDS = 10.0
USER_AGENT = "imagegen/1.0 (+https://cloud.google.com/functions)"
MAX_ERROR_BODY_BYTES = 64 * 1024
MAX_UPSTREAM_MESSAGE_CHARS = 300

PROVIDER_MODELS_URL = "https://huggingface.co/models?pipeline_tag=text-to-image&inference_provider={provider}"


@dataclass(frozen=True)
class GeneratedImage:
    png: bytes
    model: str
    provider: str
    request_id: str | None


def new_session(pool_size: int = 64) -> requests.Session:
    """A pooled session: keep-alive to the router saves a TLS handshake per generation."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    return session


class RouterClient:
    def __init__(
        self,
        settings: Settings,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._session = session or new_session()
        self._clock = clock

    def generate(self, request: GenerationRequest, provider_name: str = "hf-inference") -> GeneratedImage:
        token = self._settings.require_token()
        provider = PROVIDERS[provider_name]
        call = provider.build(request, self._settings.hf_router_url)
        context = _Context(provider.name, request.model, token)
        timeout = self._settings.hf_timeout_seconds
        deadline = self._clock() + timeout
        headers = {**call.headers, "Authorization": f"Bearer {token}"}
        try:
            response = self._session.post(
                call.url,
                json=call.json,
                headers=headers,
                timeout=(min(CONNECT_TIMEOUT_SECONDS, timeout), timeout),
                stream=True,
                allow_redirects=False,
            )
        except requests.Timeout:
            raise _timeout(context, timeout) from None
        except requests.RequestException as error:
            raise _unreachable(context, self._settings.hf_router_url, error) from None

        with response:
            context.status = response.status_code
            context.request_id = response.headers.get("x-request-id")
            limit = MAX_IMAGE_BYTES if response.status_code == 200 else MAX_ERROR_BODY_BYTES
            body = self._read_body(response, limit, deadline, context, timeout)
        if response.status_code != 200:
            raise _error_for_status(response, body, context)
        return GeneratedImage(
            png=_png_from_answer(provider, body, response.headers.get("Content-Type", ""), context),
            model=request.model,
            provider=provider.name,
            request_id=context.request_id,
        )

    def _read_body(
        self,
        response: requests.Response,
        limit: int,
        deadline: float,
        context: _Context,
        timeout: float,
    ) -> bytes:
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit and response.status_code == 200:
            raise _too_large(context, limit)
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(chunk_size=256 * 1024):
                size += len(chunk)
                if size > limit:
                    if response.status_code == 200:
                        raise _too_large(context, limit)
                    break  # an error page: its first part is all the message we need
                chunks.append(chunk)
                if self._clock() > deadline:
                    raise _timeout(context, timeout)
        except requests.Timeout:
            raise _timeout(context, timeout) from None
        except requests.RequestException as error:
            raise _unreachable(context, self._settings.hf_router_url, error) from None
        return b"".join(chunks)


@dataclass
class _Context:
    """What every upstream error message names, so a user can report it."""

    provider: str
    model: str
    token: str
    status: int | None = None
    request_id: str | None = None

    def suffix(self) -> str:
        parts = [f"provider {self.provider}", f"model {self.model}"]
        if self.status is not None:
            parts.append(f"HF status {self.status}")
        if self.request_id:
            parts.append(f"request id {self.request_id}")
        return " (" + ", ".join(parts) + ")"

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "[redacted]") if self.token else text

    def error(self, cls: type[UpstreamError], message: str, code: str | None = None, **kw) -> UpstreamError:
        return cls(
            self.scrub(message) + self.suffix() + ".",
            code=code,
            upstream_status=self.status,
            request_id=self.request_id,
            **kw,
        )


def _png_from_answer(provider: Provider, body: bytes, content_type: str, context: _Context) -> bytes:
    try:
        return ensure_png(provider.image_bytes(body, content_type.lower()))
    except NotAnImage as error:
        raise context.error(
            UpstreamError,
            f"Hugging Face answered without an image (got {error}, Content-Type "
            f"{content_type or 'none'}). Try again; if it persists, try another model",
            code="upstream_bad_response",
        ) from None


def _error_for_status(response: requests.Response, body: bytes, context: _Context) -> UpstreamError:
    status = response.status_code
    detail = _upstream_message(body)
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
    if status in (404, 410):
        return context.error(
            UpstreamError,
            f"The model is not served by the {context.provider} provider" + said + ". Choose a "
            "model that is (see "
            + PROVIDER_MODELS_URL.format(provider=context.provider)
            + ") and set HF_MODEL, or try another model",
            code="model_not_available",
        )
    retry_after = _retry_after_seconds(response.headers.get("Retry-After"), body)
    wait_hint = f" Try again in {retry_after} seconds." if retry_after else " Try again in a minute."
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    if status == 429:
        return context.error(
            UpstreamRateLimited,
            "Hugging Face is rate-limiting this server" + said + "." + wait_hint.rstrip("."),
            headers=headers,
        )
    if status in (408, 504):
        return context.error(
            UpstreamTimeout,
            "Hugging Face timed out generating the image" + said + "." + wait_hint.rstrip("."),
            headers=headers,
        )
    if status >= 500:
        return context.error(
            UpstreamError,
            "Hugging Face had a problem generating the image" + said + "." + wait_hint.rstrip("."),
            code="upstream_unavailable",
            headers=headers,
        )
    return context.error(
        UpstreamError,
        f"Hugging Face refused the request" + said + ". The model may not support one of the "
        "parameters (size, steps, guidance): try without them or with another model",
        code="upstream_rejected",
    )


def _upstream_message(body: bytes) -> str:
    """The human part of an HF error body, in any of the shapes the router uses."""
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return "" if text.lstrip().lower().startswith(("<!doctype", "<html")) else _clip(text)
    if not isinstance(answer, dict):
        return ""
    parts: list[str] = []
    error = answer.get("error")
    if isinstance(error, str):
        parts.append(error)
    elif isinstance(error, list):
        parts.extend(str(item) for item in error)
    elif isinstance(error, dict) and isinstance(error.get("message"), str):
        parts.append(error["message"])
    if isinstance(answer.get("error_description"), str):
        parts.append(answer["error_description"])
    for item in answer.get("errors") or []:
        if isinstance(item, dict) and isinstance(item.get("message"), str):
            parts.append(item["message"])
    if not parts and isinstance(answer.get("message"), str):
        parts.append(answer["message"])
    return _clip("; ".join(parts))


def _clip(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > MAX_UPSTREAM_MESSAGE_CHARS:
        text = text[: MAX_UPSTREAM_MESSAGE_CHARS - 3] + "..."
    return text.rstrip(".")


def _retry_after_seconds(header: str | None, body: bytes) -> int | None:
    """Seconds to wait, from Retry-After (seconds or an HTTP date) or a 503's estimated_time."""
    if header:
        header = header.strip()
        if header.isdigit():
            return max(1, int(header))
        try:
            when = parsedate_to_datetime(header)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            return max(1, math.ceil((when - datetime.now(timezone.utc)).total_seconds()))
    try:
        estimated = json.loads(body).get("estimated_time")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(estimated, (int, float)) and math.isfinite(estimated) and estimated > 0:
        return min(3600, math.ceil(estimated))
    return None


def _timeout(context: _Context, seconds: float) -> UpstreamError:
    return context.error(
        UpstreamTimeout,
        f"Hugging Face did not answer within {seconds:g} seconds (HF_TIMEOUT_SECONDS). "
        "The model may be busy or starting: try again in a minute",
    )


def _unreachable(context: _Context, router_url: str, error: Exception) -> UpstreamError:
    host = urlsplit(router_url).hostname
    return context.error(
        UpstreamError,
        f"Could not reach Hugging Face at {host} ({type(error).__name__}). "
        "Check the server's network and HF_ROUTER_URL, then try again",
        code="upstream_unreachable",
    )


def _too_large(context: _Context, limit: int) -> UpstreamError:
    return context.error(
        UpstreamError,
        f"Hugging Face answered with an image larger than {limit // (1024 * 1024)} MiB, "
        "more than this function can return. Ask for a smaller width and height",
        code="upstream_bad_response",
    )
