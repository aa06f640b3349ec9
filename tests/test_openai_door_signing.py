"""V4 signed URLs of a bucket's objects, signed through a loopback stand-in for the IAM
Credentials API's signBlob that signs with an RSA key made here; the signature is checked with
its public key against a canonical request rebuilt from the URL alone."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlsplit

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from imagegen import outbound
from imagegen.config import ImageUrlSettings
from imagegen.errors import UpstreamError
from imagegen.signing import BucketUrlSigner

EMAIL = "imagegen@my-project.iam.gserviceaccount.com"
TOKEN = "ya29.runtime-token-for-the-test"
NOW = datetime.datetime(2026, 12, 7, 1, 2, 3, tzinfo=datetime.timezone.utc)


class Credentials:
    valid = True
    token = TOKEN
    service_account_email = EMAIL


class SignBlob:
    """POST /v1/projects/-/serviceAccounts/{email}:signBlob {"payload"} -> {"keyId", "signedBlob"}."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.calls: list[tuple[str, str, bytes]] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                payload = base64.b64decode(json.loads(self.rfile.read(int(self.headers["Content-Length"])))["payload"])
                outer.calls.append((self.path, self.headers.get("Authorization", ""), payload))
                if outer.status != 200:
                    body = json.dumps({"error": {"code": outer.status, "status": "PERMISSION_DENIED"}}).encode()
                else:
                    signed = outer.key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
                    body = json.dumps({"keyId": "k1", "signedBlob": base64.b64encode(signed).decode()}).encode()
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SignBlob:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def sign_blob() -> Iterator[SignBlob]:
    with SignBlob() as server:
        yield server


def signer_for(sign_blob: SignBlob, expiry: int = 900) -> BucketUrlSigner:
    settings = ImageUrlSettings(expiry_seconds=expiry, sign_blob_url=sign_blob.url)
    return BucketUrlSigner("my-images", "images/", settings, outbound.new_session(4), Credentials(), now=lambda: NOW)


def test_the_url_is_v4_signed_by_the_service_account_through_sign_blob(sign_blob: SignBlob) -> None:
    url = signer_for(sign_blob).url("seeded/a-fox-0123.jpeg")
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "storage.googleapis.com", "/my-images/images/seeded/a-fox-0123.jpeg")
    query = dict(parse_qsl(parts.query))
    assert query["X-Goog-Credential"] == f"{EMAIL}/20261207/auto/storage/goog4_request"
    assert (query["X-Goog-Date"], query["X-Goog-Expires"], query["X-Goog-Algorithm"]) == ("20261207T010203Z", "900", "GOOG4-RSA-SHA256")
    # The canonical request and string to sign, rebuilt from the URL as Cloud Storage does.
    signed = sorted((key, value) for key, value in query.items() if key != "X-Goog-Signature")
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in signed)
    canonical = f"GET\n{parts.path}\n{canonical_query}\nhost:storage.googleapis.com\n\nhost\nUNSIGNED-PAYLOAD"
    to_sign = f"GOOG4-RSA-SHA256\n20261207T010203Z\n20261207/auto/storage/goog4_request\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    sign_blob.key.public_key().verify(bytes.fromhex(query["X-Goog-Signature"]), to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())
    path, authorization, payload = sign_blob.calls[0]
    assert path == f"/v1/projects/-/serviceAccounts/{EMAIL}:signBlob"
    assert authorization == f"Bearer {TOKEN}" and payload == to_sign.encode()


def test_a_refused_signature_names_the_role(sign_blob: SignBlob) -> None:
    sign_blob.status = 403
    with pytest.raises(UpstreamError) as caught:
        signer_for(sign_blob).url("a.png")
    assert "roles/iam.serviceAccountTokenCreator" in caught.value.message and TOKEN not in caught.value.message
