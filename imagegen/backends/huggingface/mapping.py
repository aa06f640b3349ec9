"""Which providers serve a model, and under which id, from the Hub's provider mapping.

GET {hub}/api/models/{model}?expand[]=inferenceProviderMapping answers the live mappings in
the account's order of preference. The answer is cached per model for HF_MAPPING_TTL_SECONDS:
the Hub allows 1,000 requests per 5 minutes, and a lookup per generation would add latency.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import requests

from imagegen import outbound
from imagegen.domain import Route
from imagegen.errors import UpstreamError
from imagegen.backends.huggingface.providers import PROVIDERS

LOOKUP_TIMEOUT_SECONDS = 10.0
# A model's page with its mappings is a few KiB.
MAX_ANSWER_BYTES = 1024 * 1024
TASK = "text-to-image"


class HubUnavailable(Exception):
    """The Hub could not be asked; `auto` then falls back to hf-inference."""


class ProviderMapping:
    def __init__(self, hub_url: str, ttl_seconds: float, session: requests.Session) -> None:
        self._hub_url = hub_url
        self._ttl_seconds = ttl_seconds
        self._session = session
        self._cache: dict[str, tuple[float, tuple[tuple[str, str], ...]]] = {}
        self._lock = threading.Lock()

    def routes(
        self, model: str, provider: str, token: str, clock: Callable[[], float], time_left: float | None = None
    ) -> list[Route]:
        """Where to try, in order. hf-inference needs no lookup: its id is the model id.
        A lookup gets LOOKUP_TIMEOUT_SECONDS, and never more than the request has left."""
        if provider == "hf-inference":
            return [_route("hf-inference", model, model)]
        seconds = LOOKUP_TIMEOUT_SECONDS if time_left is None else min(LOOKUP_TIMEOUT_SECONDS, time_left)
        try:
            served = self._served_by(model, token, clock(), seconds)
        except HubUnavailable:
            if provider == "auto":
                return [_route("hf-inference", model, model)]
            raise UpstreamError(
                f"Could not ask the Hugging Face Hub which id {provider} uses for model {model}. "
                "Try again in a minute",
                code="upstream_unavailable",
            ) from None
        if provider == "auto":
            if not served:
                raise _not_served(model, "any supported provider")
            return [_route(name, model, provider_model) for name, provider_model in served]
        chosen = [_route(name, model, provider_model) for name, provider_model in served if name == provider]
        if not chosen:
            raise _not_served(model, f"the {provider} provider", served)
        return chosen

    def _served_by(self, model: str, token: str, now: float, seconds: float) -> tuple[tuple[str, str], ...]:
        """(provider, the model's id there) for each live provider, in the Hub's order."""
        with self._lock:
            cached = self._cache.get(model)
        if cached and cached[0] > now:
            return cached[1]
        routes = self._look_up(model, token, seconds)
        with self._lock:
            self._cache[model] = (now + self._ttl_seconds, routes)
        return routes

    def _look_up(self, model: str, token: str, seconds: float) -> tuple[tuple[str, str], ...]:
        url = f"{self._hub_url}/api/models/{quote(model, safe='/')}"
        if seconds <= 0:
            raise HubUnavailable()
        try:
            # Through the exchange: an absolute deadline, a size cap, and redirects (a renamed
            # model) followed only on the Hub itself, where the token may go.
            response = outbound.fetch(
                self._session,
                "GET",
                url,
                seconds,
                limit=MAX_ANSWER_BYTES,
                same_host_redirects=True,
                params={"expand[]": "inferenceProviderMapping"},
                headers={"Authorization": f"Bearer {token}"},
            )
        except outbound.OutboundFailure:
            raise HubUnavailable() from None
        if response.status in (401, 403):
            raise UpstreamError(
                "The Hugging Face Hub rejected the server's token. Check that HUGGING_FACE_API_KEY "
                f"holds a valid token (Hub status {response.status})",
                code="upstream_unauthorized",
                upstream_status=response.status,
            )
        if response.status == 404:
            raise UpstreamError(
                f"There is no model {model} on the Hugging Face Hub (or it is private to another "
                "account). Check HF_MODEL and HF_ALLOWED_MODELS",
                code="model_not_available",
                upstream_status=404,
            )
        if response.status != 200:
            raise HubUnavailable()
        try:
            return tuple(_live_routes(json.loads(response.body).get("inferenceProviderMapping")))
        except (ValueError, AttributeError, RecursionError):
            raise HubUnavailable() from None


def _live_routes(mapping: Any) -> list[tuple[str, str]]:
    """Live text-to-image mappings we can call, in the Hub's order.

    The Hub has answered both {"provider": {...}} and [{"provider": ..., ...}]; take either.
    """
    if isinstance(mapping, dict):
        entries = [{"provider": name, **info} for name, info in mapping.items() if isinstance(info, dict)]
    elif isinstance(mapping, list):
        entries = [entry for entry in mapping if isinstance(entry, dict)]
    else:
        entries = []
    routes = []
    for entry in entries:
        provider, provider_id = entry.get("provider"), entry.get("providerId")
        if (
            provider in PROVIDERS
            and entry.get("status") == "live"
            and entry.get("task") == TASK
            and isinstance(provider_id, str)
            and provider_id
        ):
            routes.append((provider, provider_id))
    return routes


def _route(provider: str, model: str, provider_model: str) -> Route:
    return Route("huggingface", model, provider, provider_model)


def _not_served(model: str, where: str, served: tuple[tuple[str, str], ...] = ()) -> UpstreamError:
    others = ", ".join(provider for provider, _ in served)
    hint = f" It is served by: {others}; set HF_PROVIDER (or the request's provider) to one of them, or to auto." if others else " Choose another model."
    return UpstreamError(
        f"The model {model} is not served for text-to-image by {where}, according to the "
        f"Hugging Face Hub.{hint}".rstrip("."),
        code="model_not_available",
    )
