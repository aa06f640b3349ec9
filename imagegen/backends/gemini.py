"""The `gemini` backend: Gemini image models on the Gemini API, with an API key.

`POST {GEMINI_BASE_URL}/models/{model}:generateContent`, header `x-goog-api-key`. The body,
the answer and the error bodies are shared with the `vertex` backend
(imagegen.backends.google_genai); this module adds the URL, the key and the wording.
"""

from __future__ import annotations

import requests

from imagegen.backends.base import GenerationContext
from imagegen.outbound import HttpExchange
from imagegen.backends.google_genai import GenerateContentBackend, classify, message_of, model_path, retry_delay
from imagegen.backends.toolkit import require_key
from imagegen.backends.vendor import CallContext, Vendor
from imagegen.config import BackendSettings, Settings
from imagegen.domain import Route
from imagegen.identity import account_fingerprint

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
KEY_URL = "https://aistudio.google.com/apikey"


def _model_advice(call: CallContext) -> str:
    return (
        "Set GEMINI_MODEL (or the request's model, from GEMINI_ALLOWED_MODELS) to an image model the Gemini API "
        "serves, such as gemini-2.5-flash-image (https://ai.google.dev/gemini-api/docs/models)"
    )


VENDOR = Vendor(
    name="Gemini API",
    status_label="Gemini API status",
    key_advice=f"Check that GEMINI_API_KEY holds a valid Gemini API key ({KEY_URL}) whose project has the Gemini API enabled",
    credits_advice=(
        "Image models need billing on the key's project (they have little or no free quota) and daily quotas reset at "
        "midnight Pacific time: set up billing or check the quotas at https://aistudio.google.com/usage"
    ),
    url_variable="GEMINI_BASE_URL",
    model_advice=_model_advice,
    classify=classify,
    retry_delay=retry_delay,
    message_of=message_of,
)


class GeminiBackend(GenerateContentBackend):
    name = "gemini"

    def __init__(self, settings: Settings, section: BackendSettings, session: requests.Session) -> None:
        super().__init__(settings, section, HttpExchange(session, settings.timeout_seconds, settings.deadline_seconds))
        self._section = section
        self._key = section.api_key
        self._base_url = (section.base_url or DEFAULT_BASE_URL).rstrip("/")

    def identity(self) -> str:
        return f"gemini {self._base_url} {account_fingerprint(self._key)}"

    def _check_ready(self) -> None:
        self._require_key()

    def _prepare(self, route: Route, context: GenerationContext) -> tuple[CallContext, str, dict[str, str]]:
        key = self._require_key()
        call = CallContext(VENDOR, self.name, route.model, key)
        url = f"{self._base_url}/models/{model_path(route.model)}:generateContent"
        return call, url, {"x-goog-api-key": key}

    def _require_key(self) -> str:
        return require_key(self._section, variable="GEMINI_API_KEY", what="Gemini API key", how=f"a key from {KEY_URL}")


def create(settings: Settings, section: BackendSettings, session: requests.Session) -> GeminiBackend:
    return GeminiBackend(settings, section, session)
