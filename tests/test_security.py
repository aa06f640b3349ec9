"""Who may spend the token and how much: every auth mode, the rate limit, and secret hygiene."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections import OrderedDict

import pytest
import responses
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

import imagegen.state.ratelimit
from imagegen.auth import FIREBASE_CERTS_URL, GOOGLE_CERTS_URL, MAX_CERTS_MAX_AGE_SECONDS, CachingCertsRequest, client_ip
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


# --- 13. X-Forwarded-For is believed only where a proxy appends to it --------------------------

@pytest.mark.parametrize(
    "env, hops",
    [
        ({}, 0),  # run locally or in a container of one's own: nothing in front
        ({"K_SERVICE": "imagegen"}, 1),  # Cloud Run / Cloud Functions gen2: its front end appends
        ({"K_SERVICE": "imagegen", "TRUSTED_PROXY_HOPS": "2"}, 2),  # an explicit value wins
        ({"TRUSTED_PROXY_HOPS": "1"}, 1),
        ({"K_SERVICE": "imagegen", "TRUSTED_PROXY_HOPS": "0"}, 0),
    ],
)
def test_trusted_proxy_hops_default_follows_where_it_runs(env, hops):
    assert load_settings(env).trusted_proxy_hops == hops


def test_locally_a_spoofed_forwarded_for_does_not_reset_the_rate_limit(make_app, mocked):
    app = make_app(RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="2")
    statuses = [
        app.post("/", json={"prompt": "x"}, headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code for n in range(5)
    ]
    assert statuses == [200, 200, 429, 429, 429]


def test_on_cloud_run_each_forwarded_caller_has_its_own_limit(make_app, mocked):
    app = make_app(RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="2", K_SERVICE="imagegen")
    statuses = [
        app.post("/", json={"prompt": "x"}, headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code for n in range(5)
    ]
    assert statuses == [200] * 5


# --- the rate limiter's clean-up is O(1) amortised --------------------------------------------

class CountingBuckets(OrderedDict):
    """Counts the buckets any clean-up looks at."""

    looked_at = 0

    def items(self):
        for item in super().items():
            CountingBuckets.looked_at += 1
            yield item


def test_forgetting_idle_callers_looks_at_few_buckets_per_call(monkeypatch):
    monkeypatch.setattr(imagegen.state.ratelimit, "MAX_TRACKED_CALLERS", 100)
    limiter = RateLimiter(per_minute=60, burst=1, clock=lambda: 0.0)
    limiter._buckets = CountingBuckets()
    CountingBuckets.looked_at = 0
    for caller in range(2000):  # all active at once: none may be forgotten, none need a look
        limiter.take(f"c{caller}")
    assert len(limiter._buckets) == 2000
    assert CountingBuckets.looked_at <= 2 * 2000  # a scan per call would be about 2 million


def test_idle_callers_are_forgotten_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(imagegen.state.ratelimit, "MAX_TRACKED_CALLERS", 5)
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=1, clock=lambda: now[0])  # a bucket is full after 1 s
    for caller, at in (("a", 0.0), ("b", 0.5), ("c", 1.0), ("a", 1.2), ("d", 1.3), ("e", 1.4), ("f", 1.6)):
        now[0] = at
        limiter.take(caller)
    # b was idle for 1.1 s; a was used again at 1.2 s, so it sits behind c now.
    assert list(limiter._buckets) == ["c", "a", "d", "e", "f"]
    now[0] = 10.0
    limiter.take("g")
    assert list(limiter._buckets) == ["g"]


# --- elsewhere: the certificate cache's max-age is untrusted text too ----------------------------

@pytest.mark.parametrize(
    "cache_control, kept_for",
    [
        ("public, max-age=21600", 21600),
        ("max-age=" + "9" * 400, 3600),  # more digits than any age: ignored, as if absent
        ("max-age=99999999", MAX_CERTS_MAX_AGE_SECONDS),
        ("max-age=٣٦٠٠", 3600),  # Arabic-Indic digits: \d matched them
        ("no-cache", 3600),
    ],
)
def test_a_certificate_answers_max_age_is_bounded(cache_control, kept_for):
    import types

    import requests as requests_library

    now = [1000.0]
    fetches = []
    transport = CachingCertsRequest(requests_library.Session(), clock=lambda: now[0])
    answer = types.SimpleNamespace(status=200, headers={"Cache-Control": cache_control}, data=b"{}")
    transport._inner = lambda *args, **kwargs: fetches.append(1) or answer
    assert transport("https://certs.example/") is answer
    now[0] += kept_for - 1
    transport("https://certs.example/")
    now[0] += 2
    transport("https://certs.example/")
    assert len(fetches) == 2  # kept for exactly `kept_for` seconds, then fetched again
