"""V4 signed URLs of a bucket's objects, signed without a key file.

On Cloud Run the runtime service account has no private key to sign with; the IAM Credentials
API's `signBlob` signs with the account's Google-managed key instead, called with the runtime's
own token (google-auth's default credentials). The account needs
`roles/iam.serviceAccountTokenCreator` on itself. The URL is Cloud Storage's V4 form
(GOOG4-RSA-SHA256): a canonical request, the string to sign, its signature in hex:
https://cloud.google.com/storage/docs/access-control/signing-urls-manually
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import threading
from collections.abc import Callable
from urllib.parse import quote

import requests

from imagegen import outbound
from imagegen.config import ImageUrlSettings
from imagegen.errors import UpstreamError

STORAGE_HOST = "storage.googleapis.com"
SIGN_BLOB_SECONDS = 10.0
ALGORITHM = "GOOG4-RSA-SHA256"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def _encode(value: str) -> str:
    return quote(value, safe="-_.~")


def canonical_query(params: dict[str, str]) -> str:
    return "&".join(f"{_encode(key)}={_encode(value)}" for key, value in sorted(params.items()))


def string_to_sign(bucket: str, object_name: str, email: str, now: datetime.datetime, expires: int) -> tuple[str, str, str]:
    """(the string to sign, the canonical URI, the canonical query) of a GET of the object."""
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{now.strftime('%Y%m%d')}/auto/storage/goog4_request"
    uri = f"/{bucket}/{quote(object_name, safe='/~')}"
    query = canonical_query({
        "X-Goog-Algorithm": ALGORITHM,
        "X-Goog-Credential": f"{email}/{scope}",
        "X-Goog-Date": stamp,
        "X-Goog-Expires": str(expires),
        "X-Goog-SignedHeaders": "host",
    })  # fmt: skip
    canonical = "\n".join(("GET", uri, query, f"host:{STORAGE_HOST}", "", "host", "UNSIGNED-PAYLOAD"))
    text = "\n".join((ALGORITHM, stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()))
    return text, uri, query


class BucketUrlSigner:
    """Signed GET URLs of `{prefix}{file}` in a bucket, through signBlob."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        settings: ImageUrlSettings,
        session: requests.Session | None = None,
        credentials: object | None = None,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.timezone.utc),
    ) -> None:
        self._bucket = bucket
        self._prefix = prefix
        self._settings = settings
        self._session = session
        self._credentials = credentials
        self._now = now
        self._lock = threading.Lock()

    def url(self, file: str) -> str:
        email, token = self._identity()
        text, uri, query = string_to_sign(self._bucket, f"{self._prefix}{file}", email, self._now(),
                                          self._settings.expiry_seconds)  # fmt: skip
        signature = self._sign_blob(email, token, text.encode()).hex()
        return f"https://{STORAGE_HOST}{uri}?{query}&X-Goog-Signature={signature}"

    def _identity(self) -> tuple[str, str]:
        """The signing account's email and a token of the runtime's to call signBlob with."""
        with self._lock:
            if self._session is None:
                self._session = outbound.new_session(pool_size=4)
            if self._credentials is None:
                import google.auth

                self._credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
            credentials = self._credentials
            if not credentials.valid:
                credentials.refresh(outbound.google_auth_transport(self._session, SIGN_BLOB_SECONDS))
        # Compute Engine credentials learn their email from the metadata server on refresh.
        email = self._settings.service_account or getattr(credentials, "service_account_email", None)
        if not email or email == "default":
            raise UpstreamError(
                "Image URLs cannot be signed: the runtime's service account is unknown. Set IMAGE_URL_SERVICE_ACCOUNT.",
                code="upstream_unauthorized",
            )
        return email, credentials.token

    def _sign_blob(self, email: str, token: str, payload: bytes) -> bytes:
        url = f"{self._settings.sign_blob_url}/projects/-/serviceAccounts/{quote(email, safe='@.')}:signBlob"
        try:
            answer = outbound.fetch(
                self._session, "POST", url, SIGN_BLOB_SECONDS,
                data=json.dumps({"payload": base64.b64encode(payload).decode()}),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )  # fmt: skip
        except outbound.OutboundFailure as failure:
            raise UpstreamError(f"Image URLs cannot be signed: the IAM Credentials API could not be reached ({failure.kind}).",
                                code="upstream_unreachable") from None  # fmt: skip
        if answer.status in (401, 403):
            raise UpstreamError(
                "Image URLs cannot be signed: the service account may not sign (it needs "
                "roles/iam.serviceAccountTokenCreator on itself).",
                code="upstream_unauthorized",
            )
        try:
            return base64.b64decode(json.loads(answer.body)["signedBlob"], validate=True)
        except (ValueError, KeyError, TypeError):
            raise UpstreamError(f"Image URLs cannot be signed: the IAM Credentials API answered {answer.status}.",
                                code="upstream_bad_response") from None  # fmt: skip
