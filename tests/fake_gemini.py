"""A stand-in for the Gemini API, Vertex AI's generateContent and Google's OAuth token endpoint.

- POST /v1beta/models/{model}:generateContent, header `x-goog-api-key` (Gemini API;
  `gemini_base_url`). Missing key → 403 PERMISSION_DENIED; wrong key → 400 INVALID_ARGUMENT
  with an ErrorInfo `reason: API_KEY_INVALID`.
- POST /v1/projects/{p}/locations/{l}/publishers/google/models/{model}:generateContent,
  `Authorization: Bearer <access token>` (Vertex; `vertex_base_url`). The token must be one
  this server issued and not yet expired by `clock()`; else 401 UNAUTHENTICATED. A project
  other than `project` → 403 PERMISSION_DENIED.
- POST /token: the service-account JWT-bearer grant as google-auth sends it
  (`grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>`). The JWT must be
  RS256-signed by a key registered with `register_service_account()` (or made by
  `make_service_account_key()`), `aud` == `token_uri` or https://oauth2.googleapis.com/token
  (google-auth always signs the latter), `scope` with cloud-platform. Answers
  `{"access_token", "expires_in": token_lifetime, "token_type": "Bearer"}`; `tokens_issued`
  counts them. Refusals are OAuth's `{"error", "error_description"}` (400). With
  `hold_tokens` set, token requests wait for `release()` (a slow token service).
- Body `{"contents": [...], "generationConfig": {"responseModalities", "imageConfig":
  {"aspectRatio", "imageSize"}}}`; unknown fields (e.g. `negativePrompt`) → 400 "Invalid JSON
  payload received. Unknown name ...". A model not in `models` → 404 NOT_FOUND.
- Success: `{"candidates": [{"content": {"role": "model", "parts": [{"text"}?, {"inlineData":
  {"mimeType": "image/png", "data"}}]}, "finishReason": "STOP", "index": 0}], "usageMetadata",
  "modelVersion", "responseId"}`, a text part only when TEXT is among the modalities, the PNG
  small with the asked aspect ratio (64 px on its long side).
- Refusals come as HTTP 200 like the real ones: `finish_reason("IMAGE_SAFETY")` (no image),
  `prompt_blocked("SAFETY")` (no candidates), `text_only()`. Errors `{"error": {"code",
  "message", "status", "details"}}`: `resource_exhausted(retry_delay="26s")` (QuotaFailure +
  RetryInfo), `permission_denied()`, `not_found()`, `server_error(500|503|504)`.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import exceptions as auth_exceptions
from google.auth import jwt

from tests.standin import Answer, ReceivedRequest, Reply, StandIn, bearer, json_answer, make_image, ratio_size

MODELS = frozenset({"gemini-2.5-flash-image", "gemini-3-pro-image-preview"})
ASPECT_RATIOS = frozenset({"1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"})
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth signs `aud` as Google's endpoint whatever the key file's token_uri says
# (google/oauth2/service_account.py, `_make_authorization_grant_assertion`), so both are accepted.
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
# Field names the real request accepts (protobuf JSON takes camelCase and snake_case alike).
REQUEST_FIELDS = frozenset({"contents", "generationConfig", "safetySettings", "systemInstruction", "tools",
                            "toolConfig", "cachedContent", "labels"})
GENERATION_CONFIG_FIELDS = frozenset({
    "temperature", "topP", "topK", "candidateCount", "maxOutputTokens", "stopSequences", "responseModalities",
    "responseMimeType", "responseSchema", "responseJsonSchema", "seed", "presencePenalty", "frequencyPenalty",
    "responseLogprobs", "logprobs", "thinkingConfig", "imageConfig", "speechConfig", "mediaResolution",
})
IMAGE_CONFIG_FIELDS = frozenset({"aspectRatio", "imageSize", "personGeneration", "imageOutputOptions"})


def google_error(code: int, status: str, message: str, details: list[dict] | None = None) -> Reply:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return Reply(code, {"error": error})


def finish_reason(reason: str = "IMAGE_SAFETY", text: str | None = None) -> Reply:
    """A candidate that ended without an image (IMAGE_SAFETY, PROHIBITED_CONTENT, NO_IMAGE, ...)."""
    return Reply(plan={"finishReason": reason, "image": False, "text": text})


def prompt_blocked(reason: str = "SAFETY") -> Reply:
    """The prompt itself was blocked: `promptFeedback.blockReason`, no candidates at all."""
    return Reply(plan={"blockReason": reason})


def text_only(text: str = "I can't make that image, but here is a description instead.") -> Reply:
    return Reply(plan={"finishReason": "STOP", "image": False, "text": text})


def resource_exhausted(retry_delay: str = "26s", model: str = "gemini-2.5-flash-image") -> Reply:
    return google_error(429, "RESOURCE_EXHAUSTED",
                        "You exceeded your current quota, please check your plan and billing details. For more "
                        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
                        [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                          "violations": [{"quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                                          "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                                          "quotaDimensions": {"location": "global", "model": model},
                                          "quotaValue": "10"}]},
                         {"@type": "type.googleapis.com/google.rpc.Help",
                          "links": [{"description": "Learn more about Gemini API quotas",
                                     "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                         {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay}])


def permission_denied(message: str = "The caller does not have permission") -> Reply:
    return google_error(403, "PERMISSION_DENIED", message)


def not_found(model: str = "gemini-2.0-flash-exp-image-generation") -> Reply:
    return google_error(404, "NOT_FOUND", f"models/{model} is not found for API version v1beta, or is not "
                                          "supported for generateContent. Call ListModels to see the list of "
                                          "available models and their supported methods.")


def server_error(status: int = 500) -> Reply:
    name, message = {
        503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
        504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
    }.get(status, ("INTERNAL", "An internal error has occurred. Please retry or report in "
                               "https://developers.generativeai.google/guide/troubleshooting"))
    return google_error(status, name, message)


def make_service_account_key(path: Path | str, token_uri: str, project_id: str = "test-project") -> dict:
    """Write a service-account JSON key file with a fresh RSA key; return its contents."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": f"imagegen-test@{project_id}.iam.gserviceaccount.com",
        "client_id": str(secrets.randbelow(10**21)),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    }
    Path(path).write_text(json.dumps(info, indent=2))
    return info


class FakeGemini(StandIn):
    def __init__(self, api_key: str = "AIzaTestKey", project: str = "test-project", token_lifetime: int = 3600,
                 models: frozenset[str] = MODELS, clock: Callable[[], float] = time.time) -> None:
        self.api_key = api_key
        self.project = project
        self.token_lifetime = token_lifetime
        self.models = set(models)
        self.clock = clock  # swap it to expire tokens without waiting
        self.tokens_issued = 0
        self.hold_tokens = False  # token requests wait for release(): a slow token service
        self._tokens: dict[str, float] = {}  # access token -> expiry (clock seconds)
        self._service_accounts: dict[str, dict[str, str]] = {}  # client_email -> {key id: public PEM}
        self._token_lock = threading.Lock()
        super().__init__()

    # -- what tests configure ------------------------------------------------------------------

    @property
    def gemini_base_url(self) -> str:
        """Stands for https://generativelanguage.googleapis.com."""
        return self.url

    @property
    def vertex_base_url(self) -> str:
        """Stands for https://aiplatform.googleapis.com (or https://{location}-aiplatform...)."""
        return self.url

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"

    def register_service_account(self, info: dict) -> None:
        """Accept JWTs signed by this service-account key (the dict of its JSON key file)."""
        key = serialization.load_pem_private_key(info["private_key"].encode(), password=None)
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        with self._token_lock:
            self._service_accounts.setdefault(info["client_email"], {})[info["private_key_id"]] = public

    def make_service_account_key(self, path: Path | str) -> dict:
        """A key file whose token_uri is this server, already registered."""
        info = make_service_account_key(path, self.token_uri, self.project)
        self.register_service_account(info)
        return info

    def issue_token(self, lifetime: int | None = None) -> str:
        """A valid access token without the JWT dance (for tests that are not about auth)."""
        token = f"ya29.{secrets.token_urlsafe(32)}"
        with self._token_lock:
            self._tokens[token] = self.clock() + (self.token_lifetime if lifetime is None else lifetime)
            self.tokens_issued += 1
        return token

    # -- routes --------------------------------------------------------------------------------

    def routes(self):
        model = r"(?P<model>[^/:]+):generateContent"
        return [
            ("POST", r"/token", self._token, None, False),
            ("POST", rf"/v1beta/models/{model}", self._generate, self._api_key_ok, True),
            ("POST", rf"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/publishers/google/models/{model}",
             self._generate, self._token_ok, True),
        ]

    def not_found(self, request: ReceivedRequest) -> Answer:
        return self._send(google_error(404, "NOT_FOUND", "Requested entity was not found."))

    @staticmethod
    def _send(reply: Reply) -> Answer:
        return json_answer(reply.body, reply.status, reply.headers)

    def _api_key_ok(self, request: ReceivedRequest) -> Answer | None:
        key = request.header("x-goog-api-key") or (request.query.get("key") or [None])[0]
        if key == self.api_key:
            return None
        if not key:
            return self._send(permission_denied(
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API."))
        message = "API key not valid. Please pass a valid API key."
        return self._send(google_error(400, "INVALID_ARGUMENT", message, [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message},
        ]))

    def _token_ok(self, request: ReceivedRequest) -> Answer | None:
        token = bearer(request)
        with self._token_lock:
            expiry = self._tokens.get(token or "")
        if expiry is not None and self.clock() < expiry:
            return None
        reason = "ACCESS_TOKEN_EXPIRED" if expiry is not None else "CREDENTIALS_MISSING" if not token else "ACCESS_TOKEN_TYPE_UNSUPPORTED"
        return self._send(google_error(401, "UNAUTHENTICATED",
                                       "Request had invalid authentication credentials. Expected OAuth 2 access "
                                       "token, login cookie or other valid authentication credential. See "
                                       "https://developers.google.com/identity/sign-in/web/devconsole-project.",
                                       [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason,
                                         "domain": "googleapis.com",
                                         "metadata": {"service": "aiplatform.googleapis.com",
                                                      "method": "google.cloud.aiplatform.v1.PredictionService.GenerateContent"}}]))

    def _token(self, request: ReceivedRequest, match, reply: Reply) -> Answer:
        if self.hold_tokens:
            self._wait(Reply(hold=True))
        form = {name: values[0] for name, values in parse_qs(request.body.decode()).items()}

        def refuse(error: str, description: str) -> Answer:
            return json_answer({"error": error, "error_description": description}, 400)

        if form.get("grant_type") != JWT_BEARER:
            return refuse("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
        assertion = form.get("assertion", "")
        try:
            claims = jwt.decode(assertion, verify=False)
            with self._token_lock:
                keys = dict(self._service_accounts.get(claims.get("iss", ""), {}))
            if not keys:
                return refuse("invalid_grant", "Invalid grant: account not found")
            jwt.decode(assertion, certs=keys, audience=[self.token_uri, GOOGLE_TOKEN_URI], clock_skew_in_seconds=10)
        except (ValueError, auth_exceptions.GoogleAuthError):
            return refuse("invalid_grant", "Invalid JWT Signature.")
        if CLOUD_PLATFORM not in str(claims.get("scope", "")).split():
            return refuse("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = self.issue_token()
        return json_answer({"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"})

    def _generate(self, request: ReceivedRequest, match: re.Match, reply: Reply) -> Answer:
        vertex = match.groupdict().get("project") is not None
        model = match["model"]
        if vertex and match["project"] != self.project:
            return self._send(permission_denied(
                f"Permission 'aiplatform.endpoints.predict' denied on resource '//aiplatform.googleapis.com/"
                f"projects/{match['project']}/locations/{match['location']}/publishers/google/models/{model}' "
                "(or it may not exist)."))
        if model not in self.models:
            if vertex:
                return self._send(google_error(404, "NOT_FOUND",
                                               f"Publisher Model `projects/{match['project']}/locations/"
                                               f"{match['location']}/publishers/google/models/{model}` was not "
                                               "found or your project does not have access to it."))
            return self._send(not_found(model))
        try:
            payload = request.json()
        except ValueError:
            return self._send(google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."))
        if refusal := _unknown_field(payload):
            return self._send(refusal)
        config = _field(payload, "generationConfig") or {}
        image_config = _field(config, "imageConfig") or {}
        ratio = _field(image_config, "aspectRatio") or "1:1"
        if ratio not in ASPECT_RATIOS:
            return self._send(google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument."))
        modalities = _field(config, "responseModalities") or ["TEXT", "IMAGE"]
        plan = reply.plan or {}
        usage = {"promptTokenCount": 9, "candidatesTokenCount": 1290, "totalTokenCount": 1299,
                 "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 9}]}
        answer: dict[str, Any] = {"usageMetadata": usage, "modelVersion": model, "responseId": uuid.uuid4().hex[:22]}
        if vertex:
            answer["createTime"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        if "blockReason" in plan:
            answer["promptFeedback"] = {"blockReason": plan["blockReason"]}
            return json_answer(answer)
        parts: list[dict] = []
        text = plan.get("text")
        if text is None and "TEXT" in modalities and plan.get("image", True):
            text = "Here is the image you asked for."
        if text is not None:
            parts.append({"text": text})
        if plan.get("image", True):
            prompt = json.dumps(payload.get("contents"))
            png = make_image(*ratio_size(ratio), seed=f"{prompt}/{time.time_ns()}")
            parts.append({"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}})
            usage["candidatesTokensDetails"] = [{"modality": "IMAGE", "tokenCount": 1290}]
        candidate: dict[str, Any] = {"finishReason": plan.get("finishReason", "STOP"), "index": 0}
        if parts:
            candidate["content"] = {"role": "model", "parts": parts}
        answer["candidates"] = [candidate]
        return json_answer(answer)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.capitalize() for word in rest)


def _field(obj: dict, camel: str) -> Any:
    """A field by its camelCase name, also found under its snake_case name, as protobuf JSON does."""
    if not isinstance(obj, dict):
        return None
    for key, value in obj.items():
        if _camel(key) == camel:
            return value
    return None


def _unknown_field(payload: Any) -> Reply | None:
    def unknown(name: str, where: str | None) -> Reply:
        at = f" at '{where}'" if where else ""
        description = f'Invalid JSON payload received. Unknown name "{name}"{at}: Cannot find field.'
        return google_error(400, "INVALID_ARGUMENT", description, [
            {"@type": "type.googleapis.com/google.rpc.BadRequest",
             "fieldViolations": [{"field": where or "", "description": description}]}])

    if not isinstance(payload, dict):
        return google_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Expected an object.")
    for name in payload:
        if _camel(name) not in REQUEST_FIELDS:
            return unknown(name, None)
    config = _field(payload, "generationConfig") or {}
    for name in config:
        if _camel(name) not in GENERATION_CONFIG_FIELDS:
            return unknown(name, "generation_config")
    for name in _field(config, "imageConfig") or {}:
        if _camel(name) not in IMAGE_CONFIG_FIELDS:
            return unknown(name, "generation_config.image_config")
    return None
