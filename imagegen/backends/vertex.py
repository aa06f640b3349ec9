"""The `vertex` backend: Gemini image models on Vertex AI, with no secret at all.

`POST {VERTEX_BASE_URL}/v1/projects/{project}/locations/{location}/publishers/google/models/{model}:generateContent`
with `Authorization: Bearer <access token>`. The token comes from Application Default
Credentials: on Cloud Functions the function's service account (through the metadata
server), elsewhere the key file named by GOOGLE_APPLICATION_CREDENTIALS. The caller needs
the Vertex AI User role (`roles/aiplatform.user`) on the project.

google-auth is imported on first use, not when this module loads. One token serves every
request until google-auth judges it near expiry (a few minutes before); then one thread
refreshes it while the others wait, each no longer than its own deadline. The token is sent
only to Vertex AI, never logged, and scrubbed from anything echoed.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import requests

from imagegen.backends.base import GenerationContext
from imagegen.outbound import DeadlinePassed, HttpExchange, deadline, google_auth_transport
from imagegen.backends.google_genai import GenerateContentBackend, classify, message_of, model_path, retry_delay
from imagegen.backends.vendor import CallContext, Vendor, clip
from imagegen.config import BackendSettings, Settings
from imagegen.domain import Route
from imagegen.errors import ConfigurationError, UpstreamError

CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
IAM_ROLE = "roles/aiplatform.user"
DEFAULT_LOCATION = "global"
# A token request gets at most this long, and never more than the generation has left.
TOKEN_TIMEOUT_SECONDS = 10.0
_LOCATION = re.compile(r"[a-z][a-z0-9-]{0,62}")
# Project ids are lowercase letters, digits and hyphens; older domain-scoped ones add "example.com:".
_PROJECT = re.compile(r"[a-z0-9][a-z0-9.:-]{0,99}")


def default_base_url(location: str) -> str:
    return "https://aiplatform.googleapis.com" if location == "global" else f"https://{location}-aiplatform.googleapis.com"


def vendor_for(project: str, location: str) -> Vendor:
    def model_advice(call: CallContext) -> str:
        return (
            f"Set VERTEX_MODEL (or the request's model, from VERTEX_ALLOWED_MODELS) to a Gemini image model served "
            f"in VERTEX_LOCATION={location}, such as gemini-2.5-flash-image "
            "(https://cloud.google.com/vertex-ai/generative-ai/docs/models)"
        )

    return Vendor(
        name="Vertex AI",
        status_label="Vertex AI status",
        key_advice=(
            f"Grant the function's service account the Vertex AI User role ({IAM_ROLE}) on project {project}, and "
            "enable the Vertex AI API there (gcloud services enable aiplatform.googleapis.com)"
        ),
        credits_advice=(
            f"Check that billing is enabled for project {project} and look at its Vertex AI quotas "
            f"(https://console.cloud.google.com/iam-admin/quotas?project={project})"
        ),
        url_variable="VERTEX_BASE_URL (or VERTEX_LOCATION)",
        model_advice=model_advice,
        classify=classify,
        retry_delay=retry_delay,
        message_of=message_of,
    )


@dataclass(frozen=True)
class Target:
    """Where this deployment's calls go, known once the credentials are loaded."""

    project: str
    location: str
    base_url: str
    vendor: Vendor


class _Refresh:
    """One token refresh in flight: its waiters wait on `done`, each within its own deadline."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.succeeded = False


class AccessTokens:
    """Application Default Credentials and their access token: loaded on first use, refreshed
    by one thread at a time when google-auth says the token is expired or about to be."""

    def __init__(self, session: requests.Session, exchange: HttpExchange) -> None:
        self._session = session
        self._exchange = exchange
        self._lock = threading.Lock()  # held for bookkeeping only, never while a peer is asked
        self._load_lock = threading.Lock()
        self._refreshing: _Refresh | None = None
        self._credentials: Any = None
        self.adc_project: str | None = None

    def load(self) -> None:
        """Find the credentials (once); ConfigurationError when there are none."""
        with self._load_lock:
            if self._credentials is not None:
                return
            import google.auth
            from google.auth import exceptions

            try:
                credentials, project = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
            except exceptions.DefaultCredentialsError as error:
                raise ConfigurationError(
                    "The vertex backend found no Google credentials (Application Default Credentials). On Cloud "
                    "Functions it uses the function's service account (give it the role "
                    f"{IAM_ROLE}); elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file. "
                    f"google-auth said: {clip(str(error))}.",
                    code="missing_api_key",
                ) from None
            self._credentials, self.adc_project = credentials, project

    def token(self, call: CallContext, context: GenerationContext) -> tuple[str, str | None]:
        """A valid access token and the credentials' quota project (or None).

        One caller refreshes, within its own deadline; the others wait for it within theirs.
        When that refresh fails (its deadline may have been shorter), a waiter with time left
        takes its turn."""
        credentials = self._credentials
        while True:
            with self._lock:
                refresh = self._refreshing
                if refresh is None and credentials.valid:
                    return credentials.token, getattr(credentials, "quota_project_id", None)
                mine = refresh is None
                if mine:
                    refresh = self._refreshing = _Refresh()
            assert refresh is not None
            if not mine:
                if not refresh.done.wait(timeout=max(0.0, context.time_left())):
                    raise self._exchange.timeout(call)
                if refresh.succeeded and credentials.token:
                    return credentials.token, getattr(credentials, "quota_project_id", None)
                continue  # that refresh failed: this caller tries, within its own deadline
            try:
                self._refresh(credentials, call, context)
                refresh.succeeded = True
                # Not `valid` again: google-auth judges a short-lived token stale at once.
                return credentials.token, getattr(credentials, "quota_project_id", None)
            finally:
                with self._lock:
                    self._refreshing = None
                refresh.done.set()

    def forget(self, token: str) -> None:
        """Vertex refused this token: the next try fetches a new one."""
        with self._lock:
            if self._credentials is not None and self._credentials.token == token:
                self._credentials.token = None

    def _refresh(self, credentials: Any, call: CallContext, context: GenerationContext) -> None:
        from google.auth import exceptions

        call.secret = credentials.token  # an old token is scrubbed as well
        left = min(TOKEN_TIMEOUT_SECONDS, context.time_left())
        if left <= 0:
            raise self._exchange.timeout(call)
        try:
            with deadline(left):
                credentials.refresh(google_auth_transport(self._session, TOKEN_TIMEOUT_SECONDS))
        except DeadlinePassed:
            raise self._exchange.timeout(call) from None
        except exceptions.RefreshError as error:
            said = call.quote(str(error))
            if getattr(error, "retryable", False):
                raise call.error(
                    UpstreamError,
                    f"Google's token service failed to issue an access token ({said}). Try again in a minute",
                    code="upstream_unavailable",
                    retryable=True,
                    fail_over=True,
                ) from None
            raise call.error(
                UpstreamError,
                f"Google refused to issue an access token for the server's credentials ({said}). Check that the "
                "service account (the function's, or the one in GOOGLE_APPLICATION_CREDENTIALS) exists, is enabled "
                f"and has the role {IAM_ROLE}",
                code="upstream_unauthorized",
            ) from None
        except exceptions.TransportError as error:
            cause = getattr(error.__cause__, "cause", "") or type(error.__cause__ or error).__name__
            raise call.error(
                UpstreamError,
                f"Could not reach Google's token service to get an access token ({cause}). "
                "Check the server's network and GOOGLE_APPLICATION_CREDENTIALS, then try again",
                code="upstream_unreachable",
                retryable=True,
                fail_over=True,
            ) from None


class VertexBackend(GenerateContentBackend):
    name = "vertex"

    def __init__(self, settings: Settings, section: BackendSettings, session: requests.Session) -> None:
        exchange = HttpExchange(session, settings.timeout_seconds, settings.deadline_seconds)
        super().__init__(settings, section, exchange)
        options = section.options
        self._project_setting = options.get("VERTEX_PROJECT") or options.get("GOOGLE_CLOUD_PROJECT")
        self._location = options.get("VERTEX_LOCATION") or DEFAULT_LOCATION
        self._base_url_setting = section.base_url.rstrip("/") if section.base_url else None
        self._tokens = AccessTokens(session, exchange)
        self._target: Target | None = None

    def identity(self) -> str:
        project = self._target.project if self._target else self._project_setting or "adc"
        # No credential to fingerprint: the project is the account.
        return f"vertex {self._base_url()} projects/{project}/locations/{self._location}"

    def _base_url(self) -> str:
        return self._base_url_setting or default_base_url(self._location)

    def _check_ready(self) -> None:
        self._ready()

    def _ready(self) -> Target:
        if self._target is not None:
            return self._target
        if not _LOCATION.fullmatch(self._location):
            raise ConfigurationError(
                f"VERTEX_LOCATION={self._location[:64]!r} is not a Vertex AI location: use 'global' (the default) "
                "or a region such as 'us-central1'.",
                code="invalid_configuration",
            )
        self._tokens.load()
        project = self._project_setting or self._tokens.adc_project
        if not project:
            raise ConfigurationError(
                "The vertex backend does not know which Google Cloud project to use: set VERTEX_PROJECT "
                "(or GOOGLE_CLOUD_PROJECT) to the project id.",
                code="missing_api_key",
            )
        if not _PROJECT.fullmatch(project):
            raise ConfigurationError(
                f"VERTEX_PROJECT={project[:100]!r} is not a Google Cloud project id (such as 'my-project-123').",
                code="invalid_configuration",
            )
        self._target = Target(project, self._location, self._base_url(), vendor_for(project, self._location))
        return self._target

    def _prepare(self, route: Route, context: GenerationContext) -> tuple[CallContext, str, dict[str, str]]:
        target = self._ready()
        call = CallContext(target.vendor, self.name, route.model, None)
        token, quota_project = self._tokens.token(call, context)
        call.secret = token
        url = (
            f"{target.base_url}/v1/projects/{quote(target.project, safe=':')}/locations/{target.location}"
            f"/publishers/google/models/{model_path(route.model)}:generateContent"
        )
        headers = {"Authorization": f"Bearer {token}"}
        if quota_project:
            headers["x-goog-user-project"] = quota_project
        return call, url, headers

    def _send(self, url: str, call: CallContext, context: GenerationContext, headers: dict[str, str], body: dict):
        try:
            return super()._send(url, call, context, headers, body)
        except UpstreamError as error:
            if error.upstream_status == 401:
                # Revoked or expired early: drop it, so that a retry fetches a fresh one.
                self._tokens.forget(call.secret or "")
                error.retryable = True
            raise


def create(settings: Settings, section: BackendSettings, session: requests.Session) -> VertexBackend:
    return VertexBackend(settings, section, session)
