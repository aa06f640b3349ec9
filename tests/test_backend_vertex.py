"""The `vertex` backend against the Vertex AI stand-in, with the real google-auth token flow:
a service-account key file made here whose token_uri is the stand-in's /token."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from imagegen.backends.vertex import default_base_url
from imagegen.domain import Attempt, GenerationRequest
from imagegen.errors import ConfigurationError, UpstreamError
from tests import fake_gemini
from tests.clients import BackendsClient
from tests.fake_gemini import FakeGemini, google_error
from tests.servers import free_port, wait_until

GEMINI_KEY = "AIzaSyTestKeyThatMustNeverLeak0123456789"
MODEL = "gemini-2.5-flash-image"
PROJECT = "test-project"
PATH = f"/v1/projects/{PROJECT}/locations/global/publishers/google/models/{MODEL}:generateContent"
FOX = GenerationRequest(prompt="a red fox in the snow")


@pytest.fixture(autouse=True)
def no_ambient_google_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_QUOTA_PROJECT",
                 "CLOUDSDK_CONFIG", "GCLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # never probe a metadata server from the tests


@pytest.fixture
def vertex() -> Iterator[FakeGemini]:
    with FakeGemini(GEMINI_KEY, project=PROJECT) as server:
        yield server


@pytest.fixture(scope="module")
def service_account(tmp_path_factory) -> dict:
    """One RSA key for the module (making one takes ~0.4 s); each test writes its own key file."""
    return fake_gemini.make_service_account_key(tmp_path_factory.mktemp("sa") / "key.json", "http://unused/token")


def use_key_file(path: Path, monkeypatch, token_uri: str, register_with: FakeGemini | None = None, **changes) -> dict:
    """Write a service-account key file for google-auth to find as ADC; the stand-in accepts
    its JWTs only when it is registered there."""
    info = {**changes.pop("info"), "token_uri": token_uri, **changes}
    path.write_text(json.dumps(info))
    if register_with is not None:
        register_with.register_service_account(info)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    return info


@pytest.fixture
def key_file(vertex, service_account, tmp_path, monkeypatch) -> dict:
    """A key file whose token_uri is the stand-in's /token, known to the stand-in."""
    return use_key_file(tmp_path / "service-account.json", monkeypatch, vertex.token_uri, vertex, info=service_account)


@pytest.fixture
def client_for(make_settings, vertex, clock):
    def make(**env: str) -> BackendsClient:
        settings = {"BACKENDS": "vertex", "VERTEX_PROJECT": PROJECT, "VERTEX_BASE_URL": vertex.url,
                    "MAX_RETRIES": "0", **env}
        return BackendsClient(make_settings(**{k: v for k, v in settings.items() if v is not None}),
                              timing=clock.timing())

    return make


def tokens_sent(server: FakeGemini) -> set[str]:
    return {r.header("Authorization").removeprefix("Bearer ") for r in server.calls() if r.header("Authorization")}


def failure(client: BackendsClient, server: FakeGemini, request: GenerationRequest = FOX,
            attempts: list | None = None, **kwargs) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        client.generate(request, attempts, **kwargs)
    for token in tokens_sent(server):
        assert token not in caught.value.message
    assert "ya29." not in caught.value.message and "backend vertex" in caught.value.message
    return caught.value


# -- success, wire format, the token flow ------------------------------------------------------


def test_sends_the_vertex_wire_format_with_an_adc_token(client_for, vertex, key_file):
    request = GenerationRequest(prompt="a red fox", negative_prompt="blur", width=512, height=768, seed=3)
    image = client_for().generate(request)
    assert (image.route.backend, image.route.model, image.seed, image.ignored) == ("vertex", MODEL, None, ("negativePrompt",))

    grant, sent = vertex.requests
    assert grant.path == "/token" and grant.form is None
    assert b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" in grant.body
    assert sent.path == PATH
    assert sent.header("Authorization", "").startswith("Bearer ya29.")
    assert sent.header("x-goog-api-key") is None and sent.header("x-goog-user-project") is None
    assert sent.json() == {
        "contents": [{"role": "user", "parts": [{"text": "a red fox"}]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "2:3"}},
    }


def test_one_token_serves_many_requests(client_for, vertex, key_file):
    client = client_for()
    for _ in range(3):
        client.generate(FOX)
    assert vertex.tokens_issued == 1 and len(tokens_sent(vertex)) == 1
    assert [r.path for r in vertex.requests].count("/token") == 1


def test_a_token_near_its_expiry_is_refreshed_before_use(make_settings, service_account, tmp_path, monkeypatch, clock):
    """google-auth treats a token as stale a few minutes before it expires: a 60 s one at once."""
    with FakeGemini(GEMINI_KEY, project=PROJECT, token_lifetime=60) as server:
        use_key_file(tmp_path / "key.json", monkeypatch, server.token_uri, server, info=service_account)
        client = BackendsClient(make_settings(BACKENDS="vertex", VERTEX_PROJECT=PROJECT, VERTEX_BASE_URL=server.url),
                                timing=clock.timing())
        client.generate(FOX)
        client.generate(FOX)
        assert server.tokens_issued == 2 and len(tokens_sent(server)) == 2


def test_a_token_vertex_refuses_is_dropped_and_the_retry_fetches_a_new_one(client_for, vertex, key_file, clock):
    client = client_for(MAX_RETRIES="2")
    client.generate(FOX)
    now = time.time()
    vertex.clock = lambda: now + 7200  # the stand-in's tokens expire; google-auth still thinks it fresh
    attempts: list[Attempt] = []
    client.generate(FOX, attempts)
    assert [(a.status, a.code) for a in attempts] == [(401, "upstream_unauthorized"), (200, None)]
    assert vertex.tokens_issued == 2 and len(clock.sleeps) == 1


def test_concurrent_first_requests_fetch_one_token(client_for, vertex, key_file):
    client = client_for()
    vertex.hold_tokens = True
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(client.generate(FOX))) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: vertex.holding == 1, 5, "the first token request")
    vertex.release()
    for thread in threads:
        thread.join(10)
    assert len(results) == 4 and vertex.tokens_issued == 1


def test_the_token_request_is_bounded_by_the_deadline(client_for, vertex, key_file):
    vertex.hold_tokens = True
    client = BackendsClient(client_for().settings)  # the real clock: the token service really is slow
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        client.generate(FOX, deadline_seconds=1.0)
    assert time.monotonic() - started < 5
    assert caught.value.code == "upstream_timeout" and vertex.calls() == []
    vertex.release()


def test_project_from_the_adc_and_location_from_vertex_location(client_for, vertex, key_file):
    client_for(VERTEX_PROJECT=None, VERTEX_LOCATION="us-central1").generate(FOX)
    (sent,) = vertex.calls()
    assert sent.path == f"/v1/projects/{PROJECT}/locations/us-central1/publishers/google/models/{MODEL}:generateContent"


def test_google_cloud_project_names_the_project_too(client_for, vertex, key_file):
    error = failure(client_for(VERTEX_PROJECT=None, GOOGLE_CLOUD_PROJECT="other-project"), vertex)
    assert vertex.calls()[0].path.startswith("/v1/projects/other-project/")
    assert (error.code, error.upstream_status) == ("upstream_unauthorized", 403)
    assert "roles/aiplatform.user" in error.message and "other-project" in error.message


def test_the_default_base_url_follows_the_location(make_settings):
    assert default_base_url("global") == "https://aiplatform.googleapis.com"
    assert default_base_url("europe-west4") == "https://europe-west4-aiplatform.googleapis.com"
    client = BackendsClient(make_settings(BACKENDS="vertex", VERTEX_PROJECT=PROJECT, VERTEX_LOCATION="europe-west4"))
    assert client.backends["vertex"].identity() == (
        f"vertex https://europe-west4-aiplatform.googleapis.com projects/{PROJECT}/locations/europe-west4")


def test_a_quota_project_is_sent_as_x_goog_user_project(client_for, vertex, key_file, monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_QUOTA_PROJECT", "billing-project")
    client_for().generate(FOX)
    assert vertex.calls()[0].header("x-goog-user-project") == "billing-project"


def test_google_auth_loads_only_when_the_backend_is_used():
    import subprocess
    import sys

    from tests.servers import REPO_ROOT

    probe = "import sys, imagegen.backends.vertex; print('google.auth' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


# -- credential problems -----------------------------------------------------------------------


def test_no_credentials_is_a_configuration_error_naming_what_to_set(client_for, tmp_path, monkeypatch):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigurationError) as caught:
        client_for().generate(FOX)
    assert caught.value.code == "missing_api_key"
    assert "GOOGLE_APPLICATION_CREDENTIALS" in caught.value.message and "roles/aiplatform.user" in caught.value.message


def test_no_project_anywhere_names_vertex_project(client_for, vertex, service_account, tmp_path, monkeypatch):
    info = {key: value for key, value in service_account.items() if key != "project_id"}
    use_key_file(tmp_path / "key.json", monkeypatch, vertex.token_uri, vertex, info=info)
    with pytest.raises(ConfigurationError) as caught:
        client_for(VERTEX_PROJECT=None).generate(FOX)
    assert caught.value.code == "missing_api_key" and "VERTEX_PROJECT" in caught.value.message


def test_a_bad_location_is_named(client_for, key_file):
    with pytest.raises(ConfigurationError) as caught:
        client_for(VERTEX_LOCATION="us-central1/../x").generate(FOX)
    assert caught.value.code == "invalid_configuration" and "VERTEX_LOCATION" in caught.value.message


def test_a_refused_token_request_is_unauthorized_naming_the_role(client_for, vertex, service_account, tmp_path,
                                                                 monkeypatch):
    use_key_file(tmp_path / "stranger.json", monkeypatch, vertex.token_uri, info=service_account)  # not registered
    error = failure(client_for(MAX_RETRIES="2"), vertex)
    assert (error.code, error.retryable, error.fail_over) == ("upstream_unauthorized", False, False)
    assert "roles/aiplatform.user" in error.message and "invalid_grant" in error.message
    assert vertex.tokens_issued == 0 and vertex.calls() == []


def test_an_unreachable_token_service_is_unreachable_and_fails_over(make_settings, vertex, service_account, tmp_path,
                                                                    monkeypatch, clock):
    use_key_file(tmp_path / "key.json", monkeypatch, f"http://127.0.0.1:{free_port()}/token", info=service_account)
    client = BackendsClient(make_settings(BACKENDS="vertex,gemini", VERTEX_PROJECT=PROJECT, VERTEX_BASE_URL=vertex.url,
                                          GEMINI_API_KEY=GEMINI_KEY, GEMINI_BASE_URL=f"{vertex.url}/v1beta",
                                          MAX_RETRIES="0"), timing=clock.timing())
    attempts: list[Attempt] = []
    image = client.generate(FOX, attempts)
    assert image.route.backend == "gemini"
    assert [(a.backend, a.code) for a in attempts] == [("vertex", "upstream_unreachable"), ("gemini", None)]
    alone = BackendsClient(make_settings(BACKENDS="vertex", VERTEX_PROJECT=PROJECT, VERTEX_BASE_URL=vertex.url,
                                         MAX_RETRIES="0"), timing=clock.timing())
    error = failure(alone, vertex)
    assert (error.code, error.retryable, error.fail_over) == ("upstream_unreachable", True, True)
    assert "token service" in error.message and "GOOGLE_APPLICATION_CREDENTIALS" in error.message


# -- Vertex's error bodies ---------------------------------------------------------------------


def test_an_unknown_model_names_vertex_model_and_location(client_for, vertex, key_file):
    error = failure(client_for(VERTEX_MODEL="imagen-3.0-generate-002"), vertex)
    assert (error.code, error.upstream_status) == ("model_not_available", 404)
    assert "VERTEX_MODEL" in error.message and "VERTEX_LOCATION=global" in error.message


def test_vertex_resource_exhausted_is_a_rate_limit_retried_with_backoff(client_for, vertex, key_file, clock):
    exhausted = google_error(429, "RESOURCE_EXHAUSTED", "Resource exhausted. Please try again later. Please refer to "
                             "https://cloud.google.com/vertex-ai/generative-ai/docs/error-code-429 for more details.")
    vertex.reply(exhausted)
    assert client_for(MAX_RETRIES="2").generate(FOX).png
    assert clock.sleeps == [0.75]
    vertex.reply(exhausted)
    error = failure(client_for(), vertex)
    assert (error.status, error.code, error.headers["Retry-After"]) == (429, "upstream_rate_limited", "60")


def test_a_disabled_api_is_unauthorized_with_the_fix(client_for, vertex, key_file):
    vertex.reply(google_error(403, "PERMISSION_DENIED", "Vertex AI API has not been used in project test-project before "
                              "or it is disabled.", [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                                      "reason": "SERVICE_DISABLED"}]))
    error = failure(client_for(), vertex)
    assert error.code == "upstream_unauthorized" and "aiplatform.googleapis.com" in error.message


def test_refusals_are_content_rejected(client_for, vertex, key_file):
    vertex.reply(fake_gemini.finish_reason("IMAGE_PROHIBITED_CONTENT"), fake_gemini.prompt_blocked("SAFETY"))
    client = client_for()
    assert "IMAGE_PROHIBITED_CONTENT" in failure(client, vertex).message
    error = failure(client, vertex)
    assert (error.status, error.code) == (422, "content_rejected") and "blockReason SAFETY" in error.message


# -- failover between the two ways in ----------------------------------------------------------


def test_fails_over_from_gemini_to_vertex_and_back(make_settings, vertex, key_file, clock):
    def client(order: str) -> BackendsClient:
        return BackendsClient(make_settings(BACKENDS=order, VERTEX_PROJECT=PROJECT, VERTEX_BASE_URL=vertex.url,
                                            GEMINI_API_KEY=GEMINI_KEY, GEMINI_BASE_URL=f"{vertex.url}/v1beta",
                                            MAX_RETRIES="0"), timing=clock.timing())

    vertex.reply(fake_gemini.server_error(503))  # the next generation call, whichever way it came
    attempts: list[Attempt] = []
    assert client("gemini,vertex").generate(FOX, attempts).route.backend == "vertex"
    assert [(a.backend, a.status) for a in attempts] == [("gemini", 503), ("vertex", 200)]
    assert [r.path.split("/")[1] for r in vertex.calls()] == ["v1beta", "v1"]

    vertex.reply(fake_gemini.server_error(500))
    attempts = []
    assert client("vertex,gemini").generate(FOX, attempts).route.backend == "gemini"
    assert [(a.backend, a.status) for a in attempts] == [("vertex", 500), ("gemini", 200)]


def test_a_model_gemini_does_not_serve_fails_over_to_vertex(make_settings, vertex, key_file, clock):
    client = BackendsClient(make_settings(BACKENDS="gemini,vertex", VERTEX_PROJECT=PROJECT, VERTEX_BASE_URL=vertex.url,
                                          GEMINI_API_KEY=GEMINI_KEY, GEMINI_BASE_URL=f"{vertex.url}/v1beta",
                                          GEMINI_MODEL="gemini-2.0-flash-exp-image-generation", MAX_RETRIES="0"),
                            timing=clock.timing())
    attempts: list[Attempt] = []
    image = client.generate(FOX, attempts)
    assert (image.route.backend, image.route.model) == ("vertex", MODEL)
    assert [(a.backend, a.status, a.code) for a in attempts] == [("gemini", 404, "model_not_available"), ("vertex", 200, None)]


# -- the real function process -----------------------------------------------------------------


def test_end_to_end_with_only_a_project_and_a_key_file(run_function, vertex, key_file, tmp_path):
    function = run_function(VERTEX_PROJECT=PROJECT, GOOGLE_APPLICATION_CREDENTIALS=os.environ["GOOGLE_APPLICATION_CREDENTIALS"],
                            VERTEX_BASE_URL=vertex.url, IMAGE_DIR=str(tmp_path / "out"))
    url = f"{function.url}/api/generate-image"
    answers = [requests.post(url, json={"prompt": "a lighthouse at dusk", "width": 1024, "height": 1024,
                                        "steps": 4, "guidanceScale": 3.5}, timeout=30) for _ in range(2)]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert (body["backend"], body["model"], body["provider"], body["seed"]) == ("vertex", MODEL, None, None)
        assert (body["width"], body["height"], body["ignored"]) == (64, 64, ["steps", "guidanceScale"])
        assert "vertex backend cannot use steps, guidanceScale" in body["warning"]
        assert base64.b64decode(body["imageUrl"].removeprefix("data:image/png;base64,")).startswith(b"\x89PNG")
    assert vertex.tokens_issued == 1  # one token for both requests

    vertex.reply(fake_gemini.finish_reason("IMAGE_SAFETY"))
    refused = requests.post(url, json={"prompt": "something refused"}, timeout=30)
    assert refused.status_code == 422 and "IMAGE_SAFETY" in refused.json()["error"]

    (token,) = tokens_sent(vertex)
    private_key_body = key_file["private_key"].splitlines()[1]
    for text in (*(a.text for a in answers), refused.text, function.log()):
        assert token not in text and private_key_body not in text
