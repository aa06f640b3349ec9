"""The vendor stand-ins speak their vendors' wire formats (checked with plain `requests`)."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Iterator

import google.auth.transport.requests
import pytest
import requests
from google.oauth2 import service_account
from PIL import Image

from tests import fake_gemini, fake_openai, fake_replicate, fake_stability
from tests.fake_gemini import FakeGemini
from tests.fake_openai import FakeOpenAI
from tests.fake_replicate import FakeReplicate
from tests.fake_stability import FakeStability
from tests.servers import wait_until
from tests.standin import Reply

OPENAI_KEY = "sk-test-0123456789abcdef"
GEMINI_KEY = "AIzaTest0123456789"
STABILITY_KEY = "sk-stability-test-0123"
REPLICATE_TOKEN = "r8_test0123456789"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


def image_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


@pytest.fixture
def openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(OPENAI_KEY) as server:
        yield server


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(GEMINI_KEY) as server:
        yield server


@pytest.fixture
def stability() -> Iterator[FakeStability]:
    with FakeStability(STABILITY_KEY) as server:
        yield server


@pytest.fixture
def replicate() -> Iterator[FakeReplicate]:
    with FakeReplicate(REPLICATE_TOKEN) as server:
        yield server


# -- OpenAI ------------------------------------------------------------------------------------


def openai_generate(server: FakeOpenAI, key: str = OPENAI_KEY, **payload) -> requests.Response:
    body = {"model": "gpt-image-2", "prompt": "a red fox", **payload}
    return requests.post(f"{server.base_url}/images/generations", json=body,
                         headers={"Authorization": f"Bearer {key}"}, timeout=5)


def test_openai_answers_b64_png_of_the_asked_size(openai):
    answer = openai_generate(openai, size="1536x1024", quality="low")
    assert answer.status_code == 200
    assert answer.headers["x-request-id"].startswith("req_")
    body = answer.json()
    assert isinstance(body["created"], int) and body["output_format"] == "png" and body["size"] == "1536x1024"
    assert set(body["usage"]) == {"input_tokens", "input_tokens_details", "output_tokens", "total_tokens"}
    assert image_size(base64.b64decode(body["data"][0]["b64_json"])) == (1536, 1024)
    assert openai.calls()[0].json()["quality"] == "low"


def test_openai_refuses_a_wrong_key_and_a_retired_model(openai):
    answer = openai_generate(openai, key="sk-wrong-key-123456")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
    assert answer.json()["error"]["message"].startswith("Incorrect API key provided: ")
    answer = openai_generate(openai, model="gpt-image-1")
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "model_not_found"
    assert openai_generate(openai, response_format="b64_json").json()["error"]["param"] == "response_format"


def test_openai_scripted_errors_in_order(openai):
    openai.reply(fake_openai.moderation_blocked(), fake_openai.rate_limited(retry_after_ms=1500, retry_after=2))
    blocked = openai_generate(openai)
    assert blocked.status_code == 400
    assert blocked.json()["error"] == {**blocked.json()["error"], "code": "moderation_blocked",
                                       "type": "image_generation_user_error", "param": None}
    limited = openai_generate(openai)
    assert limited.status_code == 429
    assert (limited.headers["retry-after-ms"], limited.headers["retry-after"]) == ("1500", "2")
    assert openai_generate(openai).status_code == 200  # the queue is empty again


def test_a_held_request_waits_for_release(openai):
    openai.reply(Reply(hold=True))
    answers = []
    caller = threading.Thread(target=lambda: answers.append(openai_generate(openai)))
    caller.start()
    wait_until(lambda: openai.holding == 1, 5, "the request to be held")
    assert answers == []
    openai.release()
    caller.join(5)
    assert answers[0].status_code == 200


# -- Gemini API and Vertex AI ------------------------------------------------------------------


def gemini_body(**config) -> dict:
    return {"contents": [{"role": "user", "parts": [{"text": "a red fox"}]}],
            "generationConfig": {"responseModalities": ["TEXT", "IMAGE"], **config}}


def gemini_generate(server: FakeGemini, body: dict, key: str = GEMINI_KEY,
                    model: str = "gemini-2.5-flash-image") -> requests.Response:
    return requests.post(f"{server.gemini_base_url}/v1beta/models/{model}:generateContent", json=body,
                         headers={"x-goog-api-key": key}, timeout=5)


def test_gemini_answers_inline_png_with_the_asked_ratio(gemini):
    answer = gemini_generate(gemini, gemini_body(imageConfig={"aspectRatio": "16:9"}))
    assert answer.status_code == 200
    candidate = answer.json()["candidates"][0]
    assert candidate["finishReason"] == "STOP" and candidate["content"]["role"] == "model"
    text, image = candidate["content"]["parts"]
    assert "text" in text and image["inlineData"]["mimeType"] == "image/png"
    assert image_size(base64.b64decode(image["inlineData"]["data"])) == (64, 36)
    assert "usageMetadata" in answer.json() and answer.json()["modelVersion"] == "gemini-2.5-flash-image"


def test_gemini_refuses_a_bad_key_and_an_unknown_field(gemini):
    answer = gemini_generate(gemini, gemini_body(), key="AIzaWrong")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["status"], error["message"]) == ("INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.")
    assert error["details"][0]["reason"] == "API_KEY_INVALID"
    answer = gemini_generate(gemini, gemini_body(negativePrompt="blurry"))
    assert answer.status_code == 400
    assert 'Unknown name "negativePrompt"' in answer.json()["error"]["message"]
    assert gemini.calls()[-1].json()["generationConfig"]["negativePrompt"] == "blurry"


def test_gemini_scripted_refusals_and_quota(gemini):
    gemini.reply(fake_gemini.finish_reason("IMAGE_SAFETY"), fake_gemini.prompt_blocked("PROHIBITED_CONTENT"),
                 fake_gemini.resource_exhausted("26s"))
    safety = gemini_generate(gemini, gemini_body()).json()
    assert safety["candidates"][0]["finishReason"] == "IMAGE_SAFETY" and "content" not in safety["candidates"][0]
    blocked = gemini_generate(gemini, gemini_body()).json()
    assert blocked["promptFeedback"]["blockReason"] == "PROHIBITED_CONTENT" and "candidates" not in blocked
    quota = gemini_generate(gemini, gemini_body())
    assert quota.status_code == 429 and quota.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    details = {d["@type"].rsplit(".", 1)[1]: d for d in quota.json()["error"]["details"]}
    assert details["RetryInfo"]["retryDelay"] == "26s" and details["QuotaFailure"]["violations"]


def test_vertex_with_a_token_google_auth_fetched(gemini, tmp_path):
    key_path = tmp_path / "key.json"
    gemini.make_service_account_key(key_path)
    credentials = service_account.Credentials.from_service_account_file(str(key_path), scopes=[CLOUD_PLATFORM])
    credentials.refresh(google.auth.transport.requests.Request())
    assert gemini.tokens_issued == 1 and credentials.valid
    grant = gemini.requests[0]
    assert grant.path == "/token" and b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer" in grant.body

    url = (f"{gemini.vertex_base_url}/v1/projects/test-project/locations/global/publishers/google/models/"
           "gemini-2.5-flash-image:generateContent")
    answer = requests.post(url, json=gemini_body(), headers={"Authorization": f"Bearer {credentials.token}"}, timeout=5)
    assert answer.status_code == 200 and "inlineData" in answer.json()["candidates"][0]["content"]["parts"][-1]

    gemini.clock = lambda: 1e12  # long after every token expired
    expired = requests.post(url, json=gemini_body(), headers={"Authorization": f"Bearer {credentials.token}"}, timeout=5)
    assert expired.status_code == 401 and expired.json()["error"]["status"] == "UNAUTHENTICATED"


def test_google_auth_reuses_a_fresh_token_and_refreshes_a_short_one(tmp_path):
    """google-auth refreshes 3 min 45 s before expiry: a 60 s token is stale at once."""
    for lifetime, fetched in ((3600, 1), (60, 2)):
        with FakeGemini(GEMINI_KEY, token_lifetime=lifetime) as server:
            server.make_service_account_key(tmp_path / "key.json")
            credentials = service_account.Credentials.from_service_account_file(
                str(tmp_path / "key.json"), scopes=[CLOUD_PLATFORM])
            for _ in range(2):
                credentials.before_request(google.auth.transport.requests.Request(), "POST", server.url, {})
            assert server.tokens_issued == fetched


def test_token_endpoint_refuses_a_key_it_does_not_know(gemini, tmp_path):
    fake_gemini.make_service_account_key(tmp_path / "stranger.json", gemini.token_uri)  # not registered
    credentials = service_account.Credentials.from_service_account_file(
        str(tmp_path / "stranger.json"), scopes=[CLOUD_PLATFORM])
    with pytest.raises(google.auth.exceptions.RefreshError, match="invalid_grant"):
        credentials.refresh(google.auth.transport.requests.Request())
    assert gemini.tokens_issued == 0


# -- Stability ---------------------------------------------------------------------------------


def stability_generate(server: FakeStability, service: str = "core", accept: str = "image/*",
                       key: str = STABILITY_KEY, **fields) -> requests.Response:
    form = {"prompt": "a red fox", **{name: str(value) for name, value in fields.items()}}
    return requests.post(f"{server.base_url}/v2beta/stable-image/generate/{service}",
                         files={"none": ("", b"")}, data=form,
                         headers={"Authorization": f"Bearer {key}", "Accept": accept}, timeout=5)


def test_stability_answers_raw_image_and_reproduces_a_seed(stability):
    first = stability_generate(stability, aspect_ratio="16:9", seed=42)
    again = stability_generate(stability, aspect_ratio="16:9", seed=42)
    assert first.status_code == 200 and first.headers["Content-Type"] == "image/png"
    assert (first.headers["finish-reason"], first.headers["seed"]) == ("SUCCESS", "42")
    assert image_size(first.content) == (64, 36) and first.content == again.content
    assert stability.calls()[0].form == {"prompt": "a red fox", "aspect_ratio": "16:9", "seed": "42"}
    as_json = stability_generate(stability, accept="application/json")
    assert as_json.json()["finish_reason"] == "SUCCESS" and as_json.json()["seed"] > 0
    assert image_size(base64.b64decode(as_json.json()["image"])) == (64, 64)


def test_stability_refuses_json_and_a_wrong_key(stability):
    answer = requests.post(f"{stability.base_url}/v2beta/stable-image/generate/ultra", json={"prompt": "x"},
                           headers={"Authorization": f"Bearer {STABILITY_KEY}"}, timeout=5)
    assert answer.status_code == 400 and set(answer.json()) == {"id", "name", "errors"}
    denied = stability_generate(stability, key="sk-wrong")
    assert denied.status_code == 401 and denied.json()["name"] == "unauthorized"


def test_stability_content_filtered_and_moderation(stability):
    stability.reply(fake_stability.content_filtered(), fake_stability.content_moderation())
    filtered = stability_generate(stability, seed=7)
    assert filtered.status_code == 200 and filtered.headers["finish-reason"] == "CONTENT_FILTERED"
    moderated = stability_generate(stability)
    assert moderated.status_code == 403 and moderated.json()["name"] == "content_moderation"
    clear = stability_generate(stability, seed=7)
    assert clear.headers["finish-reason"] == "SUCCESS" and clear.content != filtered.content  # that one was blurred


# -- Replicate ---------------------------------------------------------------------------------


def replicate_create(server: FakeReplicate, prefer: str | None = "wait", **given) -> requests.Response:
    headers = {"Authorization": f"Bearer {REPLICATE_TOKEN}"}
    if prefer:
        headers["Prefer"] = prefer
    return requests.post(f"{server.base_url}/v1/models/black-forest-labs/flux-schnell/predictions",
                         json={"input": {"prompt": "a red fox", "output_format": "png", **given}},
                         headers=headers, timeout=5)


def replicate_get(url: str) -> dict:
    return requests.get(url, headers={"Authorization": f"Bearer {REPLICATE_TOKEN}"}, timeout=5).json()


def test_replicate_finishes_within_the_wait_and_serves_the_output(replicate):
    answer = replicate_create(replicate, aspect_ratio="3:2", num_outputs=2)
    assert answer.status_code == 201
    prediction = answer.json()
    assert prediction["status"] == "succeeded" and prediction["error"] is None
    assert set(prediction["urls"]) == {"get", "cancel", "stream", "web"}
    assert len(prediction["output"]) == 2
    image = requests.get(prediction["output"][0], timeout=5)  # no auth, like replicate.delivery
    assert image.headers["Content-Type"] == "image/png" and image_size(image.content) == (64, 43)


def test_replicate_polling_until_done(replicate):
    replicate.reply(fake_replicate.finish_later(polls=2))
    prediction = replicate_create(replicate).json()
    assert prediction["status"] == "processing" and prediction["output"] is None
    states = [replicate_get(prediction["urls"]["get"])["status"] for _ in range(3)]
    assert states == ["processing", "processing", "succeeded"]
    assert replicate_get(prediction["urls"]["get"])["output"][0].startswith(replicate.url + "/cdn/")


def test_replicate_cancel_and_nsfw_failure(replicate):
    replicate.reply(fake_replicate.never_finish(), fake_replicate.fail_nsfw())
    prediction = replicate_create(replicate).json()
    canceled = requests.post(prediction["urls"]["cancel"], headers={"Authorization": f"Bearer {REPLICATE_TOKEN}"},
                             timeout=5).json()
    assert canceled["status"] == "canceled" and replicate.canceled == [prediction["id"]]
    failed = replicate_create(replicate).json()
    assert failed["status"] == "failed" and failed["error"] == fake_replicate.NSFW_ERROR


def test_replicate_errors(replicate):
    replicate.reply(fake_replicate.throttled(retry_after=7), fake_replicate.insufficient_credit())
    throttled = replicate_create(replicate)
    assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
    assert throttled.json()["retry_after"] == 7 and throttled.json()["status"] == 429
    assert replicate_create(replicate).json()["title"] == "Insufficient credit"
    wrong = requests.post(f"{replicate.base_url}/v1/models/a/b/predictions", json={"input": {"prompt": "x"}},
                          headers={"Authorization": "Bearer r8_wrong"}, timeout=5)
    assert wrong.status_code == 401 and set(wrong.json()) == {"title", "detail", "status"}
    assert json.loads(replicate.calls()[0].body)["input"]["prompt"] == "a red fox"
