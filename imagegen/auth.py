"""Who is calling: an API key, a Firebase or Google ID token, or (AUTH_MODE=none) an address.

Each mode returns a `Caller` whose `key` identifies it for rate limiting without holding a
secret: API keys are reduced to a short hash, tokens to their subject. A failure is one 401
with `WWW-Authenticate`, whatever was wrong, so nobody learns which key came close.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import requests

from imagegen import outbound
from imagegen.config import Settings
from imagegen.errors import Unauthorized

FIREBASE_CERTS_URL = "https://www.googleapis.com/robot/v1/metadata/x509/securetoken@system.gserviceaccount.com"
GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
CLOCK_SKEW_SECONDS = 10
DEFAULT_CERTS_MAX_AGE_SECONDS = 3600
# Google rotates its signing keys daily; a certificate answer is never kept longer than that.
MAX_CERTS_MAX_AGE_SECONDS = 86_400
CERTS_TIMEOUT_SECONDS = 10
REALM = 'Bearer realm="imagegen"'


@dataclass(frozen=True)
class Caller:
    key: str  # for rate limiting and logs: never a secret


class Authenticator(Protocol):
    def authenticate(self, headers: Mapping[str, str], client_ip: str) -> Caller: ...


def client_ip(forwarded_for: str | None, remote_addr: str | None, trusted_hops: int) -> str:
    """The caller's address as the platform saw it.

    Google's front end appends the address it saw to X-Forwarded-For, so entries a caller
    wrote themselves come first: only the `trusted_hops`-th entry from the right is believed.
    IPv6 addresses are reduced to their /64, which one subscriber usually holds whole.
    """
    candidate = remote_addr or ""
    if forwarded_for and trusted_hops > 0:
        hops = [hop.strip() for hop in forwarded_for.split(",")]
        if len(hops) >= trusted_hops:
            candidate = hops[-trusted_hops]
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        address = ipaddress.ip_address(remote_addr) if _is_ip(remote_addr) else None
    if address is None:
        return "unknown"
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _is_ip(value: str | None) -> bool:
    try:
        ipaddress.ip_address(value or "")
    except ValueError:
        return False
    return True


def _unauthorized(how: str, error: str | None = None) -> Unauthorized:
    challenge = REALM + (f', error="{error}"' if error else "")
    return Unauthorized(f"Missing or invalid credentials. {how}", headers={"WWW-Authenticate": challenge})


def _bearer(headers: Mapping[str, str]) -> str | None:
    match = re.fullmatch(r"\s*Bearer\s+(\S+)\s*", headers.get("Authorization") or "", re.I)
    return match.group(1) if match else None


class NoAuth:
    def authenticate(self, headers: Mapping[str, str], client_ip: str) -> Caller:
        return Caller(f"ip:{client_ip}")


def _basic_password(headers: Mapping[str, str]) -> str | None:
    """The password of HTTP Basic credentials (AUTOMATIC1111's clients send "user:password"),
    or the user name when the password is empty; None when there are none."""
    match = re.fullmatch(r"\s*Basic\s+([A-Za-z0-9+/=]+)\s*", headers.get("Authorization") or "", re.I)
    if not match:
        return None
    try:
        user, _, password = base64.b64decode(match.group(1), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return password or user or None


class ApiKeyAuth:
    HOW = (
        "Send your API key as 'Authorization: Bearer <key>', 'X-API-Key: <key>', or as the password "
        "of HTTP Basic credentials."
    )

    def __init__(self, keys: tuple[str, ...]) -> None:
        # Compare digests: equal length whatever the key, so compare_digest's time says nothing.
        self._digests = [hashlib.sha256(key.encode()).digest() for key in keys]

    def authenticate(self, headers: Mapping[str, str], client_ip: str) -> Caller:
        offered = headers.get("X-API-Key") or _bearer(headers) or _basic_password(headers)
        if not offered:
            raise _unauthorized(self.HOW)
        digest = hashlib.sha256(offered.strip().encode()).digest()
        matched = False
        for known in self._digests:  # every key is compared, match or not
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise _unauthorized(self.HOW, "invalid_token")
        return Caller("key:" + digest.hex()[:16])


class CachingCertsRequest:
    """A google-auth transport that keeps certificate answers for their max-age.

    A plain transport fetches Google's certificates on every verification. Fetches go through
    the outbound exchange: CERTS_TIMEOUT_SECONDS for the whole call, the answer size capped.
    """

    def __init__(self, session: requests.Session, clock: Callable[[], float] = time.monotonic) -> None:
        self._inner = outbound.google_auth_transport(session, CERTS_TIMEOUT_SECONDS)
        self._clock = clock
        self._cache: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, url: str, method: str = "GET", body=None, headers=None, timeout=None, **kwargs):
        now = self._clock()
        with self._lock:
            cached = self._cache.get(url)
        if method == "GET" and cached and cached[0] > now:
            return cached[1]
        with outbound.deadline(CERTS_TIMEOUT_SECONDS):
            response = self._inner(url, method=method, body=body, headers=headers, timeout=timeout or CERTS_TIMEOUT_SECONDS, **kwargs)
        if method == "GET" and response.status == 200:
            # Untrusted text like any header: ASCII digits of bounded length (\d takes any
            # script's digits, and thousands of them overflow `now + max_age`), clamped.
            match = re.search(r"max-age=([0-9]{1,10})\b", response.headers.get("Cache-Control", "")[:1024])
            max_age = min(int(match.group(1)), MAX_CERTS_MAX_AGE_SECONDS) if match else DEFAULT_CERTS_MAX_AGE_SECONDS
            with self._lock:
                self._cache[url] = (now + max_age, response)
        return response


class IdTokenAuth:
    """Firebase ID tokens (audience: the project id) or Google-signed ID tokens (a set audience)."""

    def __init__(self, mode: str, audience: str, certs_url: str | None, session: requests.Session) -> None:
        from google.oauth2 import id_token  # only deployments that use tokens pay the import

        self._verify = id_token.verify_token
        self._mode = mode
        self._audience = audience
        self._certs_url = certs_url or (FIREBASE_CERTS_URL if mode == "firebase" else GOOGLE_CERTS_URL)
        self._issuers = (
            (f"https://securetoken.google.com/{audience}",) if mode == "firebase" else GOOGLE_ISSUERS
        )
        self._request = CachingCertsRequest(session)
        self._how = (
            "Send the signed-in user's Firebase ID token as 'Authorization: Bearer <token>'."
            if mode == "firebase"
            else "Send a Google-signed ID token for this function as 'Authorization: Bearer <token>'."
        )

    def authenticate(self, headers: Mapping[str, str], client_ip: str) -> Caller:
        token = _bearer(headers)
        if not token:
            raise _unauthorized(self._how)
        try:
            claims = self._verify(
                token,
                self._request,
                audience=self._audience,
                certs_url=self._certs_url,
                clock_skew_in_seconds=CLOCK_SKEW_SECONDS,
            )
        except Exception:  # expired, wrong signature, wrong audience, malformed, certs down
            raise _unauthorized(self._how, "invalid_token") from None
        subject = claims.get("sub")
        if claims.get("iss") not in self._issuers or not isinstance(subject, str) or not subject:
            raise _unauthorized(self._how, "invalid_token")
        return Caller(f"sub:{subject[:128]}")


def make_authenticator(settings: Settings, session: requests.Session) -> Authenticator:
    if settings.auth_mode == "api-key":
        return ApiKeyAuth(settings.api_keys)
    if settings.auth_mode in ("firebase", "google"):
        assert settings.auth_audience  # load_settings requires it for these modes
        return IdTokenAuth(settings.auth_mode, settings.auth_audience, settings.auth_certs_url, session)
    return NoAuth()
