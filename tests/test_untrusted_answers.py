"""Upstream answers are untrusted input: every malformed answer from every backend is a 502
bad answer that fails over (never a 500), and odd error bodies keep the error their status says.

Unit tests against `responses`, through the registry and dispatcher as the function builds them.
"""

from __future__ import annotations

import base64
import json

import pytest
import responses

from imagegen.domain import GenerationRequest
from imagegen.errors import UpstreamError
from tests.clients import BackendsClient
from tests.fake_router import make_png
from tests.fakes import FakeClock

FOX = GenerationRequest(prompt="a fox")
DEEP = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError on this
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
PNG_B64 = base64.b64encode(make_png(8, 8)).decode()

OPENAI_URL = "https://api.openai.com/v1/images/generations"
GEMINI_URL = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash-image:generateContent"
STABILITY_URL = "https://api.stability.ai/v2beta/stable-image/generate/core"
REPLICATE_URL = "https://api.replicate.com/v1/models/black-forest-labs/flux-schnell/predictions"
ROUTER = "https://router.huggingface.co"
HUB = "https://huggingface.co"
HF_MODEL = "black-forest-labs/FLUX.1-schnell"

ENV = {
    "openai": {"BACKENDS": "openai", "OPENAI_API_KEY": "sk-test0123456789abcdef"},
    "gemini": {"BACKENDS": "gemini", "GEMINI_API_KEY": "AIzaSyTestKey00000000000000000000000"},
    "stability": {"BACKENDS": "stability", "STABILITY_API_KEY": "sk-stab0123456789abcdef"},
    "replicate": {"BACKENDS": "replicate", "REPLICATE_API_TOKEN": "r8_test0123456789abcdef"},
    "huggingface": {"BACKENDS": "huggingface", "HF_MODEL": HF_MODEL, "HF_ALLOWED_MODELS": HF_MODEL},
}
# hf provider -> (its path on the router, the provider's model id)
HF_PROVIDERS = {
    "hf-inference": f"/hf-inference/models/{HF_MODEL}",
    "fal-ai": "/fal-ai/fal-ai/flux/schnell",
    "replicate": "/replicate/v1/models/black-forest-labs/flux-schnell/predictions",
    "together": "/together/v1/images/generations",
    "nscale": "/nscale/v1/images/generations",
    "wavespeed": "/wavespeed/api/v3/wavespeed-ai/flux-schnell",
}
HF_PROVIDER_IDS = {
    "fal-ai": "fal-ai/flux/schnell",
    "replicate": "black-forest-labs/flux-schnell",
    "together": "black-forest-labs/FLUX.1-schnell",
    "nscale": "black-forest-labs/FLUX.1-schnell",
    "wavespeed": "wavespeed-ai/flux-schnell",
}


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def client_for(make_settings):
    def make(backend: str, **env: str) -> BackendsClient:
        settings = make_settings(**{**ENV[backend], "MAX_RETRIES": "0", "HF_MAX_RETRIES": "0", **env})
        return BackendsClient(settings, timing=FakeClock().timing())

    return make


def bad_answer(client: BackendsClient) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        client.generate(FOX)
    error = caught.value
    assert (error.status, error.code, error.fail_over) == (502, "upstream_bad_response", True), error.message
    return error


def body_of(answer) -> bytes:
    return answer if isinstance(answer, bytes) else json.dumps(answer).encode()


def hf_client(mocked, client_for, provider: str):
    if provider != "hf-inference":
        mocked.get(
            f"{HUB}/api/models/{HF_MODEL}",
            json={"inferenceProviderMapping": {provider: {"status": "live", "providerId": HF_PROVIDER_IDS[provider], "task": "text-to-image"}}},
        )
    return client_for("huggingface", HF_PROVIDER=provider, HF_ALLOWED_PROVIDERS=provider)


# --- the shapes the adversarial run found -----------------------------------------------------


def test_gemini_parts_as_a_number(mocked, client_for):
    mocked.post(GEMINI_URL, json={"candidates": [{"content": {"parts": 1}, "finishReason": "STOP"}]})
    bad_answer(client_for("gemini"))


@pytest.mark.parametrize("answer", [
    {"candidates": [{"content": [], "finishReason": "STOP"}]},
    {"candidates": [{"content": {"parts": [{"inlineData": {"data": 5}}]}, "finishReason": "STOP"}]},
    {"candidates": [{"content": {"parts": [{"inlineData": []}]}, "finishReason": "STOP"}]},
    {"candidates": {"0": {}}},
    {"candidates": [{"content": {"parts": None}, "finishReason": "STOP"}]},
    [1, 2],
])
def test_gemini_other_shapes(mocked, client_for, answer):
    mocked.post(GEMINI_URL, json=answer)
    bad_answer(client_for("gemini"))


@pytest.mark.parametrize("provider", list(HF_PROVIDERS))
@pytest.mark.parametrize("deep", [DEEP, DEEP_OBJECT], ids=["array", "object"])
def test_deep_json_from_every_hugging_face_provider(mocked, client_for, provider, deep):
    mocked.post(f"{ROUTER}{HF_PROVIDERS[provider]}", body=deep, content_type="application/json")
    bad_answer(hf_client(mocked, client_for, provider))


def test_wavespeed_outputs_as_an_object(mocked, client_for):
    mocked.post(f"{ROUTER}{HF_PROVIDERS['wavespeed']}",
                json={"data": {"id": "t1", "status": "completed", "outputs": {"url": "https://cdn.example/x.png"}}})
    bad_answer(hf_client(mocked, client_for, "wavespeed"))


@pytest.mark.parametrize("urls", [["https://router.huggingface.co/wavespeed/api/v3/predictions/t1/result"], "x", 5])
def test_wavespeed_urls_not_an_object(mocked, client_for, urls):
    mocked.post(f"{ROUTER}{HF_PROVIDERS['wavespeed']}", json={"data": {"id": "t1", "status": "created", "urls": urls}})
    bad_answer(hf_client(mocked, client_for, "wavespeed"))


def test_wavespeed_a_deep_poll_answer(mocked, client_for):
    mocked.post(f"{ROUTER}{HF_PROVIDERS['wavespeed']}",
                json={"data": {"id": "t1", "status": "created", "urls": {"get": f"{ROUTER}/api/v3/predictions/t1/result"}}})
    mocked.get(f"{ROUTER}/wavespeed/api/v3/predictions/t1/result", body=DEEP, content_type="application/json")
    bad_answer(hf_client(mocked, client_for, "wavespeed"))


@pytest.mark.parametrize("urls", [["https://api.replicate.com/v1/predictions/abc/get"], "x", 5])
def test_replicate_urls_not_an_object(mocked, client_for, urls):
    mocked.post(REPLICATE_URL, json={"id": "abc", "status": "processing", "urls": urls, "logs": ""})
    bad_answer(client_for("replicate"))


@pytest.mark.parametrize("answer", [
    {"id": "abc", "status": "succeeded", "output": {"0": "https://x"}},
    {"id": "abc", "status": "succeeded", "output": [[1]]},
    {"id": "abc", "status": ["succeeded"]},
    {"id": "abc", "status": "processing", "urls": {"get": ["x"]}},
])
def test_replicate_other_shapes(mocked, client_for, answer):
    mocked.post(REPLICATE_URL, json=answer)
    bad_answer(client_for("replicate"))


@pytest.mark.parametrize("provider,answer", [
    ("fal-ai", {"images": "x"}),
    ("fal-ai", {"images": [{"url": ["x"]}]}),
    ("together", {"data": {"b64_json": PNG_B64}}),
    ("nscale", {"data": [{"b64_json": 5}]}),
    ("replicate", {"output": {"a": 1}}),
    ("wavespeed", {"data": {"status": "completed", "outputs": [5]}}),
    ("wavespeed", {"data": []}),
])
def test_hugging_face_provider_shapes(mocked, client_for, provider, answer):
    mocked.post(f"{ROUTER}{HF_PROVIDERS[provider]}", json=answer)
    bad_answer(hf_client(mocked, client_for, provider))


# --- a deep-JSON body from every backend --------------------------------------------------------


@pytest.mark.parametrize("deep", [DEEP, DEEP_OBJECT], ids=["array", "object"])
@pytest.mark.parametrize("backend,url", [
    ("openai", OPENAI_URL), ("gemini", GEMINI_URL), ("stability", STABILITY_URL), ("replicate", REPLICATE_URL),
])
def test_deep_json_from_every_direct_backend(mocked, client_for, backend, url, deep):
    mocked.post(url, body=deep, content_type="application/json")
    bad_answer(client_for(backend))


@pytest.mark.parametrize("answer", [
    {"data": {"b64_json": PNG_B64}}, {"data": [5]}, {"data": [{"b64_json": ["x"]}]}, [1], "text", 12,
])
def test_openai_shapes(mocked, client_for, answer):
    mocked.post(OPENAI_URL, json=answer)
    bad_answer(client_for("openai"))


@pytest.mark.parametrize("answer", [
    {"image": 5, "finish_reason": "SUCCESS"}, {"image": "@@", "finish_reason": "SUCCESS"}, [1], {"image": {"a": 1}},
])
def test_stability_shapes(mocked, client_for, answer):
    mocked.post(STABILITY_URL, json=answer)
    bad_answer(client_for("stability"))


# --- odd error bodies keep the error their status says ----------------------------------------


@pytest.mark.parametrize("backend,url,body", [
    ("openai", OPENAI_URL, {"error": {"message": "no", "moderation_details": {"categories": 5}}}),
    ("openai", OPENAI_URL, {"error": {"message": "no", "code": {"a": 1}, "type": [1]}}),
    ("replicate", REPLICATE_URL, {"title": "Bad", "detail": "no", "invalid_fields": {"a": 1}}),
    ("replicate", REPLICATE_URL, {"title": "Bad", "detail": "no", "invalid_fields": 5}),
    ("stability", STABILITY_URL, {"name": "bad_request", "errors": 5}),
    ("gemini", GEMINI_URL, {"error": {"message": "no", "details": [{"violations": 5}], "status": 5}}),
])
@pytest.mark.parametrize("deep", [False, True])
def test_odd_error_bodies_are_worded_by_status(mocked, client_for, backend, url, body, deep):
    mocked.post(url, body=DEEP if deep else body_of(body), status=400, content_type="application/json")
    with pytest.raises(UpstreamError) as caught:
        client_for(backend).generate(FOX)
    assert caught.value.status == 502 and caught.value.code == "upstream_rejected", caught.value.message


@pytest.mark.parametrize("body", [{"errors": 5}, {"errors": {"a": 1}}, {"error": {"message": 5}}, {"errors": [5, None]}])
def test_common_error_shapes_from_hugging_face(mocked, client_for, body):
    mocked.post(f"{ROUTER}{HF_PROVIDERS['hf-inference']}", json=body, status=400)
    with pytest.raises(UpstreamError) as caught:
        hf_client(mocked, client_for, "hf-inference").generate(FOX)
    assert caught.value.code == "upstream_rejected", caught.value.message


@pytest.mark.xfail(reason="the Hub lookup is in huggingface/mapping.py, owned by the exchange helper: json() there "
                          "lets RecursionError through", strict=False)
def test_deep_json_from_the_hub(mocked, client_for, make_settings):
    mocked.get(f"{HUB}/api/models/{HF_MODEL}", body=DEEP, content_type="application/json")
    mocked.post(f"{ROUTER}{HF_PROVIDERS['hf-inference']}", body=make_png(8, 8), content_type="image/png")
    with pytest.raises(UpstreamError):
        client_for("huggingface", HF_PROVIDER="fal-ai", HF_ALLOWED_PROVIDERS="fal-ai").generate(FOX)
