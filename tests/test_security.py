"""Who may spend the token and how much: every auth mode, the rate limit, and secret hygiene."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time

import pytest
import responses
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

from imagegen.auth import FIREBASE_CERTS_URL, GOOGLE_CERTS_URL, client_ip
from imagegen.config import load_settings
from imagegen.errors import ConfigurationError
from imagegen.backends.huggingface.providers import PROVIDERS
from imagegen.errors import RateLimited
from imagegen.state.ratelimit import RateLimiter
from imagegen.domain import GenerationRequest
from tests.conftest import TEST_TOKEN
from tests.fake_router import make_png

MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
URL = f"https://router.huggingface.co/hf-inference/models/{MODEL}"
API_KEY = "k_live_0123456789abcdefghijklmnop"
OTHER_KEY = "k_live_zyxwvutsrqponmlkjihgfedcba98"  # valid for another deployment
PROJECT = "my-firebase-project"
ORIGIN = "https://app.example"


class SigningKey:
    """An RSA key and its self-signed certificate, made in the test, as Google publishes them."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
        now = dt.datetime.now(dt.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(self.private, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        pem = self.private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.signer = crypt.RSASigner.from_string(pem, key_id=kid)

    def token(self, **claims) -> str:
        now = int(time.time())
        payload = {"iat": now, "exp": now + 3600, "sub": "user-123", **claims}
        return jwt.encode(self.signer, payload).decode()


@pytest.fixture(scope="module")
def key():
    return SigningKey("kid-1")


@pytest.fixture(scope="module")
def impostor():
    return SigningKey("kid-1")  # same key id, different key: a forged signature


@pytest.fixture
def mocked(key):
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        for url in (FIREBASE_CERTS_URL, GOOGLE_CERTS_URL):
            rsps.get(url, json={key.kid: key.cert_pem}, headers={"Cache-Control": "public, max-age=3600"})
        rsps.post(URL, body=make_png(), content_type="image/png")
        yield rsps


def generations(mocked) -> int:
    return sum(1 for call in mocked.calls if call.request.method == "POST")


def post(app, headers=None, body=None, **kwargs):
    return app.post("/", json=body or {"prompt": "a fox"}, headers={"Origin": ORIGIN, **(headers or {})}, **kwargs)


def assert_unauthorized(answer) -> None:
    assert answer.status_code == 401
    body = answer.get_json()
    assert body["code"] == "unauthorized" and body["success"] is False
    assert answer.headers["WWW-Authenticate"].startswith('Bearer realm="imagegen"')
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN  # the browser may read why


# --- api-key -----------------------------------------------------------------------------------


@pytest.fixture
def api_key_app(make_app):
    return make_app(AUTH_MODE="api-key", API_KEYS=f"{API_KEY}, k_second_key_abcdefghijkl", CORS_ALLOWED_ORIGINS=ORIGIN)


def test_api_key_accepted_as_bearer_or_x_api_key(api_key_app, mocked):
    assert post(api_key_app, {"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert post(api_key_app, {"X-API-Key": API_KEY}).status_code == 200
    assert post(api_key_app, {"X-API-Key": "k_second_key_abcdefghijkl"}).status_code == 200
    assert generations(mocked) == 3


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {OTHER_KEY}"},
        {"Authorization": f"Bearer {API_KEY[:-1]}x"},  # one character off
        {"Authorization": f"Bearer {API_KEY}{API_KEY}"},
        {"X-API-Key": API_KEY.upper()},
    ],
)
def test_wrong_or_missing_keys_are_401_and_never_reach_upstream(api_key_app, mocked, headers):
    answer = post(api_key_app, headers)
    assert_unauthorized(answer)
    assert generations(mocked) == 0


def test_a_near_miss_and_a_far_miss_get_the_same_answer(api_key_app, mocked):
    near = post(api_key_app, {"X-API-Key": API_KEY[:-1] + "x"})
    far = post(api_key_app, {"X-API-Key": OTHER_KEY})
    without_id = [{**answer.get_json(), "requestId": None} for answer in (near, far)]
    assert without_id[0] == without_id[1] and near.headers["WWW-Authenticate"] == far.headers["WWW-Authenticate"]


def test_preflight_needs_no_credentials_and_allows_the_key_header(api_key_app, mocked):
    answer = api_key_app.options("/", headers={"Origin": ORIGIN, "Access-Control-Request-Headers": "x-api-key"})
    assert answer.status_code == 204 and "X-API-Key" in answer.headers["Access-Control-Allow-Headers"]
    assert "Access-Control-Allow-Credentials" not in answer.headers


# --- firebase and google ID tokens --------------------------------------------------------------


@pytest.fixture
def firebase_app(make_app):
    return make_app(AUTH_MODE="firebase", FIREBASE_PROJECT_ID=PROJECT, CORS_ALLOWED_ORIGINS=ORIGIN)


def firebase_token(key, **claims) -> str:
    return key.token(aud=PROJECT, iss=f"https://securetoken.google.com/{PROJECT}", **claims)


def test_firebase_token_is_accepted_and_certificates_are_cached(firebase_app, mocked, key):
    for _ in range(3):
        assert post(firebase_app, {"Authorization": f"Bearer {firebase_token(key)}"}).status_code == 200
    assert sum(call.request.url == FIREBASE_CERTS_URL for call in mocked.calls) == 1


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda key, bad: firebase_token(key, exp=int(time.time()) - 600, iat=int(time.time()) - 4000), id="expired"),
        pytest.param(lambda key, bad: firebase_token(bad), id="wrongly-signed"),
        pytest.param(lambda key, bad: key.token(aud="another-project", iss="https://securetoken.google.com/another-project"), id="other-project"),
        pytest.param(lambda key, bad: key.token(aud=PROJECT, iss="https://evil.example"), id="wrong-issuer"),
        pytest.param(lambda key, bad: firebase_token(key, sub=""), id="no-subject"),
        pytest.param(lambda key, bad: firebase_token(key)[:-4] + "AAAA", id="tampered"),
        pytest.param(lambda key, bad: "not.a.jwt", id="garbage"),
    ],
)
def test_bad_firebase_tokens_are_401(firebase_app, mocked, key, impostor, make_token):
    assert_unauthorized(post(firebase_app, {"Authorization": f"Bearer {make_token(key, impostor)}"}))
    assert generations(mocked) == 0


def test_google_id_token_with_the_configured_audience(make_app, mocked, key):
    audience = "https://us-central1-proj.cloudfunctions.net/imagegen"
    app = make_app(AUTH_MODE="google", AUTH_AUDIENCE=audience, CORS_ALLOWED_ORIGINS=ORIGIN)
    good = key.token(aud=audience, iss="https://accounts.google.com", email="svc@proj.iam.gserviceaccount.com")
    assert post(app, {"Authorization": f"Bearer {good}"}).status_code == 200
    other_audience = key.token(aud="https://other.example", iss="https://accounts.google.com")
    assert_unauthorized(post(app, {"Authorization": f"Bearer {other_audience}"}))
    firebase_issued = key.token(aud=audience, iss=f"https://securetoken.google.com/{PROJECT}")
    assert_unauthorized(post(app, {"Authorization": f"Bearer {firebase_issued}"}))


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"AUTH_MODE": "api-key", "CORS_ALLOWED_ORIGINS": ORIGIN}, "API_KEYS"),
        ({"AUTH_MODE": "api-key", "API_KEYS": "short", "CORS_ALLOWED_ORIGINS": ORIGIN}, "API_KEYS"),
        ({"AUTH_MODE": "firebase", "CORS_ALLOWED_ORIGINS": ORIGIN}, "FIREBASE_PROJECT_ID"),
        ({"AUTH_MODE": "google", "CORS_ALLOWED_ORIGINS": ORIGIN}, "AUTH_AUDIENCE"),
        ({"AUTH_MODE": "api-key", "API_KEYS": API_KEY}, "CORS_ALLOWED_ORIGINS"),
        ({"AUTH_MODE": "password"}, "AUTH_MODE"),
    ],
)
def test_auth_settings_are_checked(env, variable):
    with pytest.raises(ConfigurationError) as caught:
        load_settings(env)
    assert variable in caught.value.message
    assert "short" not in caught.value.message and API_KEY not in caught.value.message


# --- rate limiting ----------------------------------------------------------------------------


def test_token_bucket_refills_at_the_configured_rate():
    now = [0.0]
    limiter = RateLimiter(per_minute=6, burst=2, clock=lambda: now[0])
    limiter.take("a")
    limiter.take("a")
    with pytest.raises(RateLimited) as caught:
        limiter.take("a")
    assert caught.value.headers == {"Retry-After": "10"} and caught.value.status == 429
    limiter.take("b")  # callers have their own buckets
    now[0] += 10
    limiter.take("a")
    with pytest.raises(RateLimited):
        limiter.take("a")


def test_rate_limit_zero_turns_it_off():
    limiter = RateLimiter(per_minute=0, burst=1)
    for _ in range(100):
        limiter.take("a")


def test_idle_callers_are_forgotten(monkeypatch):
    import imagegen.state.ratelimit

    monkeypatch.setattr(imagegen.state.ratelimit, "MAX_TRACKED_CALLERS", 10)
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=1, clock=lambda: now[0])
    for caller in range(10):
        limiter.take(f"c{caller}")
    now[0] += 5
    limiter.take("new")
    assert len(limiter._buckets) == 1


def test_rate_limit_per_caller_through_the_handler(make_app, mocked):
    app = make_app(RATE_LIMIT_PER_MINUTE="2", RATE_LIMIT_BURST="2", K_SERVICE="imagegen")  # as on Cloud Run
    real = {"X-Forwarded-For": "203.0.113.7"}
    assert [post(app, real).status_code for _ in range(2)] == [200, 200]
    limited = post(app, real)
    assert limited.status_code == 429 and limited.get_json()["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) == 30
    # Spoofed entries before the platform's own do not make a new caller.
    for spoof in ("1.1.1.1, 203.0.113.7", "10.0.0.1, 8.8.8.8, 203.0.113.7", "garbage, 203.0.113.7"):
        assert post(app, {"X-Forwarded-For": spoof}).status_code == 429
    assert post(app, {"X-Forwarded-For": "198.51.100.1"}).status_code == 200
    assert generations(mocked) == 3


def test_invalid_requests_do_not_use_up_the_limit(make_app, mocked):
    app = make_app(RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="1")
    for _ in range(5):
        assert post(app, body={"prompt": "x", "width": 1}).status_code == 400
    assert post(app).status_code == 200


def test_api_key_callers_are_limited_per_key_not_per_address(make_app, mocked):
    app = make_app(
        AUTH_MODE="api-key", API_KEYS=f"{API_KEY},{OTHER_KEY}", CORS_ALLOWED_ORIGINS=ORIGIN, RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="1"
    )
    assert post(app, {"X-API-Key": API_KEY, "X-Forwarded-For": "203.0.113.1"}).status_code == 200
    assert post(app, {"X-API-Key": API_KEY, "X-Forwarded-For": "203.0.113.2"}).status_code == 429
    assert post(app, {"X-API-Key": OTHER_KEY, "X-Forwarded-For": "203.0.113.1"}).status_code == 200


@pytest.mark.parametrize(
    "forwarded, remote, hops, expected",
    [
        (None, "127.0.0.1", 1, "127.0.0.1"),
        ("203.0.113.7", "169.254.1.1", 1, "203.0.113.7"),
        ("6.6.6.6, 203.0.113.7", "169.254.1.1", 1, "203.0.113.7"),
        ("6.6.6.6, 203.0.113.7, 35.191.0.1", "169.254.1.1", 2, "203.0.113.7"),
        ("203.0.113.7", "169.254.1.1", 2, "169.254.1.1"),  # fewer hops than trusted: the socket
        ("not-an-ip", "169.254.1.1", 1, "169.254.1.1"),
        ("203.0.113.7", "169.254.1.1", 0, "169.254.1.1"),
        ("2001:db8:1:2:3:4:5:6", None, 1, "2001:db8:1:2::/64"),
        (None, None, 1, "unknown"),
    ],
)
def test_client_ip(forwarded, remote, hops, expected):
    assert client_ip(forwarded, remote, hops) == expected


# --- hard limits and SSRF -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    ["a/b@evil.com", "evil.com:443/x", "a/b?x=1", "a/b#x", "//evil.com/x", "a/%2e%2e", "a/b/../../c", "https://evil.com/a", "a/b\nc"],
)
def test_no_model_id_can_reach_another_host(model):
    with pytest.raises(ConfigurationError):
        load_settings({"HF_ALLOWED_MODELS": model})


@pytest.mark.parametrize("model", ["a/b", "A-b_c.d/E.f-g_h", "x/y.z", "0/0"])
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
def test_every_route_stays_on_the_router(model, provider):
    from urllib.parse import urlsplit

    settings = load_settings({"HF_ALLOWED_MODELS": model})
    call = PROVIDERS[provider].build(GenerationRequest(prompt="p", model=model), model, settings.backend_settings["huggingface"].base_url)
    parts = urlsplit(call.url)
    assert (parts.scheme, parts.netloc) == ("https", "router.huggingface.co")
    assert ".." not in parts.path.split("/")


def test_security_headers_on_every_answer(api_key_app, mocked):
    answers = [api_key_app.get("/"), post(api_key_app), post(api_key_app, {"X-API-Key": API_KEY}), api_key_app.put("/")]
    for answer in answers:
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["Cache-Control"] == "no-store"


# --- secrets never leave ------------------------------------------------------------------------


def test_no_secret_or_prompt_in_any_answer_or_log(make_app, mocked, key, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    id_token = firebase_token(key)
    prompt = "a very private prompt about my neighbour"
    apps = [
        (make_app(AUTH_MODE="api-key", API_KEYS=API_KEY, CORS_ALLOWED_ORIGINS=ORIGIN), {"X-API-Key": API_KEY}),
        (make_app(AUTH_MODE="firebase", FIREBASE_PROJECT_ID=PROJECT, CORS_ALLOWED_ORIGINS=ORIGIN), {"Authorization": f"Bearer {id_token}"}),
    ]
    bodies = []
    for app, good in apps:
        for headers in (good, {}, {"Authorization": f"Bearer {OTHER_KEY}"}):
            answer = post(app, headers, body={"prompt": prompt})
            bodies.append(answer.get_data(as_text=True) + str(answer.headers))
    captured = capsys.readouterr()
    everything = "\n".join(bodies) + caplog.text + captured.out + captured.err
    for secret in (TEST_TOKEN, API_KEY, OTHER_KEY, id_token, id_token.split(".")[2]):
        assert secret not in everything
    logs = caplog.text + captured.out
    assert prompt not in logs
    assert "promptSha256" in captured.out


def test_log_prompts_true_logs_the_prompt(make_app, mocked, capsys):
    post(make_app(LOG_PROMPTS="true"), body={"prompt": "log me please"})
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[-1]["imagegen"]["prompt"] == "log me please"
