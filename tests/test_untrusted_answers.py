"""Upstream answers are untrusted input: every malformed answer from every backend is a 502
bad answer that fails over (never a 500); odd error bodies keep the error their status says;
refusals go by allow-list (known success, any refusal spelling 422, anything else 502); and a
key quoted by upstream is scrubbed before the quote is cut.

Unit tests against `responses`, through the registry and dispatcher as the function builds them.
"""

from __future__ import annotations

import base64
import json

import pytest
import responses

from imagegen.backends import openai as openai_backend
from imagegen.backends.vendor import MAX_UPSTREAM_MESSAGE_CHARS, CallContext, error_for_status
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


def test_deep_json_from_the_hub(mocked, client_for, make_settings):
    mocked.get(f"{HUB}/api/models/{HF_MODEL}", body=DEEP, content_type="application/json")
    mocked.post(f"{ROUTER}{HF_PROVIDERS['hf-inference']}", body=make_png(8, 8), content_type="image/png")
    with pytest.raises(UpstreamError):
        client_for("huggingface", HF_PROVIDER="fal-ai", HF_ALLOWED_PROVIDERS="fal-ai").generate(FOX)


# --- refusals by allow-list --------------------------------------------------------------------


def gemini_answer(reason, image: bool = True, text: str | None = None) -> dict:
    parts = ([{"text": text}] if text else []) + ([{"inlineData": {"mimeType": "image/png", "data": PNG_B64}}] if image else [])
    candidate = {"content": {"role": "model", "parts": parts}, "index": 0}
    if reason is not None:
        candidate["finishReason"] = reason
    return {"candidates": [candidate]}


@pytest.mark.parametrize("reason", ["STOP", None])
def test_gemini_success_is_stop_or_no_reason_with_an_image(mocked, client_for, reason):
    mocked.post(GEMINI_URL, json=gemini_answer(reason))
    assert client_for("gemini").generate(FOX).png.startswith(b"\x89PNG")


@pytest.mark.parametrize("reason", [
    "image_safety", "Image-Safety", "IMAGE_SAFETY_V2", "PROHIBITED_CONTENT_IMAGE", "safety", "blocked", "IMAGE_OTHER",
])
def test_gemini_any_refusal_spelling_with_an_image_is_content_rejected(mocked, client_for, reason):
    mocked.post(GEMINI_URL, json=gemini_answer(reason))
    with pytest.raises(UpstreamError) as caught:
        client_for("gemini").generate(FOX)
    assert (caught.value.status, caught.value.code, caught.value.fail_over) == (422, "content_rejected", False)


@pytest.mark.parametrize("reason", ["MAX_TOKENS", "OTHER", "FINISH_REASON_UNSPECIFIED", "SOMETHING_NEW", "", 7, {"a": 1}])
def test_gemini_an_unknown_reason_with_an_image_is_a_bad_answer_never_a_200(mocked, client_for, reason):
    mocked.post(GEMINI_URL, json=gemini_answer(reason))
    bad_answer(client_for("gemini"))


def test_gemini_stop_without_image_or_text_is_a_bad_answer(mocked, client_for):
    mocked.post(GEMINI_URL, json=gemini_answer("STOP", image=False))
    bad_answer(client_for("gemini"))


def stability_image(reason: str | None) -> dict:
    headers = {"seed": "5"} if reason is None else {"finish-reason": reason, "seed": "5"}
    return {"body": make_png(8, 8), "content_type": "image/png", "headers": headers}


@pytest.mark.parametrize("reason", ["CONTENT_FILTERED", "content_filtered", "Content-Filtered", "CONTENT_MODERATED", "NSFW"])
@pytest.mark.parametrize("as_json", [False, True])
def test_stability_any_filter_spelling_is_content_rejected(mocked, client_for, reason, as_json):
    if as_json:
        mocked.post(STABILITY_URL, json={"image": PNG_B64, "finish_reason": reason, "seed": 5})
    else:
        mocked.post(STABILITY_URL, **stability_image(reason))
    with pytest.raises(UpstreamError) as caught:
        client_for("stability").generate(FOX)
    assert (caught.value.status, caught.value.code, caught.value.fail_over) == (422, "content_rejected", False)


def test_stability_a_refusal_without_its_image_is_still_a_refusal(mocked, client_for):
    mocked.post(STABILITY_URL, json={"finish_reason": "content_filtered"})
    with pytest.raises(UpstreamError) as caught:
        client_for("stability").generate(FOX)
    assert caught.value.code == "content_rejected"


@pytest.mark.parametrize("reason", ["ERROR", "PARTIAL", "", None])
def test_stability_anything_but_success_is_a_bad_answer(mocked, client_for, reason):
    mocked.post(STABILITY_URL, **stability_image(reason))
    bad_answer(client_for("stability"))


@pytest.mark.parametrize("reason", ["SUCCESS", "success"])
def test_stability_success(mocked, client_for, reason):
    mocked.post(STABILITY_URL, **stability_image(reason))
    assert client_for("stability").generate(FOX).seed == 5


# --- a key at the cut: scrubbed before the message is cut ----------------------------------------


# One of each format the scrubber knows; none contains "x", the filler.
KEYS = {
    "hugging face": "hf_" + "AbCdEfGhIjKlMnOpQrStUvWyZ0123456789",
    "openai": "sk-proj-" + "Q7b9KmZ2" * 6,
    "stability": "sk-" + "R4nD0mStab1l1tyK3yAbCdEfGhIjKlMnOp",
    "replicate": "r8_" + "Zy9Wv8Ut7Sr6Qp5On4Ml3Kj2Ih1Gf0EdCbA",
    "gemini": "AIza" + "SyB3nT4uV5wY6zA7bC8dE9fG0hI1jK2lM3n",
    "google oauth": "ya29." + "a0AfB_byC" + "D3eF4gH5iJ6kL7mN8oP9qR0sT1uV2wY3zA4bC5dE6fG7hI8jK9lM0nO1pQ2",
}
CUT = MAX_UPSTREAM_MESSAGE_CHARS


def echo(offset: int, key: str) -> str:
    """Upstream text that quotes `key` at `offset`, after a space as vendors write it."""
    return "x" * (offset - 1) + " " + key + " and more text after it"


def leaked(key: str, text: str, run: int = 6) -> list[str]:
    """Runs of `run` characters of the key (after its prefix) that appear in `text`."""
    body = key[4:]
    return [body[i : i + run] for i in range(len(body) - run + 1) if body[i : i + run] in text]


@pytest.mark.parametrize("kind", list(KEYS))
@pytest.mark.parametrize("known", [False, True], ids=["by-shape", "the-secret"])
def test_a_key_at_every_offset_around_the_cut_never_leaks(kind, known):
    key = KEYS[kind]
    for offset in range(CUT - len(key) - 5, CUT + 5):
        message = echo(offset, key) * 3
        for body in (json.dumps({"error": {"message": message}}).encode(), message.encode()):
            call = CallContext(openai_backend.VENDOR, "openai", "gpt-image-2", key if known else None)
            error = error_for_status(400, {}, body, call)
            assert leaked(key, error.message) == [], (offset, error.message)


@pytest.mark.parametrize("kind", list(KEYS))
def test_a_key_at_the_cut_of_a_failed_prediction_never_leaks(mocked, client_for, kind):
    key = KEYS[kind]
    for offset in (CUT - len(key) // 2 - 3, CUT - 10, CUT - 4):
        mocked.reset()
        mocked.post(REPLICATE_URL, json={"id": "abc", "status": "failed", "error": echo(offset, key)})
        with pytest.raises(UpstreamError) as caught:
            client_for("replicate").generate(FOX)
        assert caught.value.code == "generation_failed" and leaked(key, caught.value.message) == [], (offset, caught.value.message)


@pytest.mark.parametrize("kind", list(KEYS))
def test_a_key_at_the_cut_of_geminis_words_never_leaks(mocked, client_for, kind):
    key = KEYS[kind]
    for offset in range(200 - len(key), 200 + 2, 3):
        answer = gemini_answer("SAFETY", image=False, text=echo(offset, key))
        answer["candidates"][0]["finishMessage"] = echo(offset, key)
        mocked.reset()
        mocked.post(GEMINI_URL, json=answer)
        with pytest.raises(UpstreamError) as caught:
            client_for("gemini").generate(FOX)
        assert caught.value.code == "content_rejected" and leaked(key, caught.value.message) == [], (offset, caught.value.message)
