"""The `gemini` backend against the Gemini API stand-in: wire format, sizes, every error and
refusal shape, retries on Google's RetryInfo, failover, and the real function process."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import pytest
import requests
from PIL import Image

from imagegen.backends.google_genai import image_config
from imagegen.domain import Attempt, GenerationRequest
from imagegen.errors import ConfigurationError, UpstreamError
from tests import fake_gemini
from tests.clients import BackendsClient
from tests.fake_gemini import FakeGemini, google_error
from tests.standin import Reply, make_image

KEY = "AIzaSyTestKeyThatMustNeverLeak0123456789"
MODEL = "gemini-2.5-flash-image"
FOX = GenerationRequest(prompt="a red fox in the snow")


@pytest.fixture
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini(KEY) as server:
        yield server


@pytest.fixture
def client_for(make_settings, gemini, clock):
    def make(**env: str) -> BackendsClient:
        settings = {"BACKENDS": "gemini", "GEMINI_API_KEY": KEY, "GEMINI_BASE_URL": f"{gemini.url}/v1beta",
                    "MAX_RETRIES": "0", **env}
        return BackendsClient(make_settings(**settings), timing=clock.timing())

    return make


def failure(client: BackendsClient, request: GenerationRequest = FOX, attempts: list | None = None) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        client.generate(request, attempts)
    assert KEY not in caught.value.message and KEY not in str(caught.value.headers)
    assert "backend gemini" in caught.value.message
    return caught.value


def size_of(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


def answer_with(*parts: dict, finish: str = "STOP") -> Reply:
    return Reply(body={"candidates": [{"content": {"role": "model", "parts": list(parts)}, "finishReason": finish,
                                       "index": 0}], "modelVersion": MODEL, "responseId": "resp-1"})


def inline(data: bytes, mime: str = "image/png", **extra) -> dict:
    return {"inlineData": {"mimeType": mime, "data": base64.b64encode(data).decode()}, **extra}


# -- success and the wire format ---------------------------------------------------------------


def test_sends_the_gemini_wire_format_and_reads_the_inline_image(client_for, gemini):
    request = GenerationRequest(prompt="a red fox", negative_prompt="blur", width=1024, height=576, steps=4,
                                guidance_scale=3.5, seed=7)
    image = client_for().generate(request)
    assert size_of(image.png) == (64, 36)  # the stand-in draws 16:9 at 64 px wide
    assert (image.route.backend, image.route.model, image.route.provider) == ("gemini", MODEL, None)
    assert image.seed is None  # Google's seed is best effort: never claimed to reproduce
    assert image.ignored == ("negativePrompt", "steps", "guidanceScale")

    (sent,) = gemini.calls()
    assert sent.path == f"/v1beta/models/{MODEL}:generateContent"
    assert sent.header("x-goog-api-key") == KEY
    assert sent.header("Authorization") is None and not sent.query  # the key only in its header
    assert sent.header("Content-Type") == "application/json"
    assert sent.json() == {
        "contents": [{"role": "user", "parts": [{"text": "a red fox"}]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "16:9"}},
    }


@pytest.mark.parametrize(
    ("model", "width", "height", "expected"),
    [
        (MODEL, None, None, {"aspectRatio": "1:1"}),
        (MODEL, 512, None, {"aspectRatio": "1:1"}),
        (MODEL, 512, 768, {"aspectRatio": "2:3"}),
        (MODEL, 768, 1024, {"aspectRatio": "3:4"}),
        (MODEL, 1024, 816, {"aspectRatio": "5:4"}),
        (MODEL, 816, 1024, {"aspectRatio": "4:5"}),
        (MODEL, 2048, 880, {"aspectRatio": "21:9"}),
        (MODEL, 2048, 256, {"aspectRatio": "21:9"}),  # the widest 2.5 makes
        (MODEL, 576, 1024, {"aspectRatio": "9:16"}),
        ("gemini-3.1-flash-image-preview", 2048, 256, {"aspectRatio": "8:1", "imageSize": "2K"}),
        ("gemini-3.1-flash-image-preview", 256, 1024, {"aspectRatio": "1:4", "imageSize": "1K"}),
        ("gemini-3-pro-image-preview", 2048, 256, {"aspectRatio": "21:9", "imageSize": "2K"}),
        ("gemini-3-pro-image-preview", 1024, 1024, {"aspectRatio": "1:1", "imageSize": "1K"}),
        ("gemini-3-pro-image-preview", 1536, 1536, {"aspectRatio": "1:1", "imageSize": "2K"}),
    ],
)
def test_width_and_height_map_to_the_nearest_ratio_and_size(model, width, height, expected):
    assert image_config(GenerationRequest(prompt="x", width=width, height=height), model) == expected


def test_a_gemini_3_model_gets_an_image_size_the_api_accepts(client_for, gemini):
    pro = "gemini-3-pro-image-preview"
    image = client_for(GEMINI_MODEL=pro).generate(GenerationRequest(prompt="x", width=2048, height=1536))
    assert size_of(image.png) == (64, 48) and image.route.model == pro
    assert gemini.calls()[0].json()["generationConfig"]["imageConfig"] == {"aspectRatio": "4:3", "imageSize": "2K"}


def test_a_jpeg_beside_text_is_converted_and_thought_images_are_skipped(client_for, gemini):
    thought = make_image(32, 32, seed="draft", fmt="jpeg")
    final = make_image(48, 32, seed="final", fmt="jpeg")
    gemini.reply(answer_with({"text": "Here you go."}, inline(thought, "image/jpeg", thought=True),
                             inline(final, "image/jpeg")))
    image = client_for().generate(FOX)
    assert size_of(image.png) == (48, 32)
    assert image.request_id == "resp-1"  # the answer's responseId: what Google support asks for


@pytest.mark.parametrize("body", [
    b"<html>oops</html>",
    {"candidates": []},
    {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png", "data": "@@not base64@@"}}]}}]},
    {"candidates": [{"content": {"parts": [{"inlineData": {"mimeType": "image/png",
                                                           "data": base64.b64encode(b"not an image").decode()}}]}}]},
])
def test_an_answer_without_a_usable_image_is_a_bad_response(client_for, gemini, body):
    gemini.reply(Reply(body=body, headers={"Content-Type": "application/json"}))
    error = failure(client_for())
    assert (error.status, error.code, error.fail_over) == (502, "upstream_bad_response", True)


# -- refusals: HTTP 200 with a reason ----------------------------------------------------------

REFUSALS = ["IMAGE_SAFETY", "IMAGE_PROHIBITED_CONTENT", "PROHIBITED_CONTENT", "SAFETY", "NO_IMAGE",
            "IMAGE_RECITATION", "IMAGE_OTHER", "RECITATION", "BLOCKLIST", "SPII"]


@pytest.mark.parametrize("reason", REFUSALS)
def test_every_finish_reason_refusal_is_content_rejected_with_its_reason(client_for, gemini, reason):
    gemini.reply(fake_gemini.finish_reason(reason, text="I can't draw that."))
    error = failure(client_for(MAX_RETRIES="3"))
    assert (error.status, error.code, error.retryable, error.fail_over) == (422, "content_rejected", False, False)
    assert f"finishReason {reason}" in error.message and "I can't draw that" in error.message
    assert len(gemini.calls()) == 1


@pytest.mark.parametrize("reason", ["SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "OTHER"])
def test_a_blocked_prompt_is_content_rejected_with_the_block_reason(client_for, gemini, reason):
    gemini.reply(fake_gemini.prompt_blocked(reason))
    error = failure(client_for())
    assert error.code == "content_rejected" and f"blockReason {reason}" in error.message


def test_a_text_only_answer_is_content_rejected_with_the_models_words(client_for, gemini):
    gemini.reply(fake_gemini.text_only("I would rather describe a fox than draw one. " * 20))
    error = failure(client_for())
    assert error.code == "content_rejected" and "without an image" in error.message
    assert "I would rather describe a fox" in error.message and len(error.message) < 600


def test_an_image_flagged_by_a_safety_reason_is_never_returned(client_for, gemini):
    gemini.reply(answer_with(inline(make_image(32, 32)), finish="IMAGE_SAFETY"))
    error = failure(client_for())
    assert error.code == "content_rejected" and "IMAGE_SAFETY" in error.message


def test_a_refusal_does_not_fail_over(make_settings, gemini, router, clock):
    gemini.reply(fake_gemini.finish_reason("IMAGE_SAFETY"))
    client = BackendsClient(make_settings(BACKENDS="gemini,huggingface", GEMINI_API_KEY=KEY,
                                          GEMINI_BASE_URL=f"{gemini.url}/v1beta", HF_ROUTER_URL=router.url),
                            timing=clock.timing())
    assert failure(client).code == "content_rejected"
    assert router.requests == []


# -- errors by cause ---------------------------------------------------------------------------


def test_a_wrong_key_is_unauthorized_and_names_the_variable(client_for):
    error = failure(client_for(GEMINI_API_KEY="AIzaSyWrongKey0000000000000000000000"))
    assert (error.status, error.code, error.upstream_status) == (502, "upstream_unauthorized", 400)
    assert "GEMINI_API_KEY" in error.message and "API key not valid" in error.message
    assert "AIzaSyWrongKey" not in error.message


def test_permission_denied_is_unauthorized(client_for, gemini):
    gemini.reply(fake_gemini.permission_denied())
    error = failure(client_for())
    assert (error.code, error.upstream_status, error.fail_over) == ("upstream_unauthorized", 403, False)


def test_no_key_is_a_configuration_error_naming_the_variable(make_settings):
    client = BackendsClient(make_settings(BACKENDS="gemini"))
    with pytest.raises(ConfigurationError) as caught:
        client.generate(FOX)
    assert caught.value.code == "missing_api_key" and "GEMINI_API_KEY" in caught.value.message


def test_an_unknown_model_names_gemini_model(client_for, gemini):
    error = failure(client_for(GEMINI_MODEL="gemini-2.0-flash-exp-image-generation"))
    assert (error.code, error.upstream_status, error.fail_over) == ("model_not_available", 404, True)
    assert "GEMINI_MODEL" in error.message and "gemini-2.0-flash-exp-image-generation" in error.message


def test_a_text_only_model_is_not_available_for_images(client_for, gemini):
    gemini.reply(google_error(400, "INVALID_ARGUMENT", "Model does not support the requested response modalities: image"))
    error = failure(client_for())
    assert error.code == "model_not_available" and "GEMINI_MODEL" in error.message


def test_a_per_minute_quota_is_a_rate_limit_retried_after_googles_retry_delay(client_for, gemini, clock):
    gemini.reply(fake_gemini.resource_exhausted("26s"), fake_gemini.resource_exhausted("1.5s"))
    image = client_for(MAX_RETRIES="3").generate(FOX)
    assert image.png and clock.sleeps == [26, 2]  # RetryInfo.retryDelay, rounded up


def test_a_rate_limit_past_the_deadline_passes_googles_delay_on(client_for, gemini, clock):
    gemini.reply(fake_gemini.resource_exhausted("300s"))
    attempts: list[Attempt] = []
    error = failure(client_for(MAX_RETRIES="3", DEADLINE_SECONDS="60"), attempts=attempts)
    assert (error.status, error.code, error.headers["Retry-After"]) == (429, "upstream_rate_limited", "300")
    assert "Try again in 300 seconds" in error.message and clock.sleeps == []
    assert [(a.backend, a.status, a.code) for a in attempts] == [("gemini", 429, "upstream_rate_limited")]


@pytest.mark.parametrize("reply", [
    google_error(429, "RESOURCE_EXHAUSTED",
                 "You exceeded your current quota, please check your plan and billing details. * Quota exceeded for "
                 "metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 0, "
                 "model: gemini-2.5-flash-image\nPlease retry in 28.02s.",
                 [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "28s"}]),
    google_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota, please check your plan and billing details.",
                 [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                   "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel", "quotaValue": "100"}]}]),
    google_error(429, "RESOURCE_EXHAUSTED", "Your prepayment credits are depleted. Please go to AI Studio to manage "
                                            "your project and billing."),
    google_error(403, "PERMISSION_DENIED", "This API method requires billing to be enabled.",
                 [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "BILLING_DISABLED"}]),
], ids=["no-free-tier", "daily-quota", "prepaid-credit", "billing-disabled"])
def test_quota_that_waiting_will_not_cure_is_credits_exhausted(client_for, gemini, clock, reply):
    gemini.reply(reply)
    error = failure(client_for(MAX_RETRIES="3"))
    assert (error.status, error.code, error.retryable) == (502, "upstream_credits_exhausted", False)
    assert "billing" in error.message and clock.sleeps == [] and len(gemini.calls()) == 1


@pytest.mark.parametrize(("status", "code"), [(500, "upstream_unavailable"), (503, "upstream_unavailable"),
                                              (504, "upstream_timeout")])
def test_server_errors_are_retried_then_reported(client_for, gemini, clock, status, code):
    gemini.reply(fake_gemini.server_error(status), fake_gemini.server_error(status))
    assert client_for(MAX_RETRIES="3").generate(FOX).png
    assert clock.sleeps == [0.75, 1.5]
    gemini.reply(*[fake_gemini.server_error(status)] * 2)
    error = failure(client_for(MAX_RETRIES="1"))
    assert (error.code, error.retryable, error.fail_over) == (code, True, True)


def test_an_unreachable_api_names_gemini_base_url(make_settings):
    client = BackendsClient(make_settings(BACKENDS="gemini", GEMINI_API_KEY=KEY, MAX_RETRIES="0",
                                          GEMINI_BASE_URL="http://127.0.0.1:9/v1beta"))
    error = failure(client)
    assert error.code == "upstream_unreachable" and "GEMINI_BASE_URL" in error.message


# -- failover ----------------------------------------------------------------------------------


def test_fails_over_from_gemini_to_hugging_face_and_back(make_settings, gemini, router, clock):
    def client(order: str) -> BackendsClient:
        return BackendsClient(make_settings(BACKENDS=order, GEMINI_API_KEY=KEY, GEMINI_BASE_URL=f"{gemini.url}/v1beta",
                                            HF_ROUTER_URL=router.url, MAX_RETRIES="0"), timing=clock.timing())

    gemini.reply(fake_gemini.server_error(503))
    attempts: list[Attempt] = []
    image = client("gemini,huggingface").generate(FOX, attempts)
    assert image.route.backend == "huggingface" and len(router.posts()) == 1
    assert [(a.backend, a.status) for a in attempts] == [("gemini", 503), ("huggingface", 200)]

    router.reply_error(503, {"error": "overloaded"})
    attempts = []
    image = client("huggingface,gemini").generate(FOX, attempts)
    assert image.route.backend == "gemini" and image.seed is None
    assert [(a.backend, a.status) for a in attempts] == [("huggingface", 503), ("gemini", 200)]


# -- the real function process -----------------------------------------------------------------


def test_end_to_end_through_the_function_process(run_function, gemini, tmp_path):
    function = run_function(BACKENDS="gemini", GEMINI_API_KEY=KEY, GEMINI_BASE_URL=f"{gemini.url}/v1beta",
                            IMAGE_DIR=str(tmp_path / "out"))
    url = f"{function.url}/api/generate-image"
    answer = requests.post(url, json={"prompt": "a lighthouse at dusk", "width": 1024, "height": 576,
                                      "negativePrompt": "fog", "steps": 4, "seed": 99}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["backend"], body["model"], body["provider"], body["seed"]) == ("gemini", MODEL, None, None)
    assert (body["width"], body["height"], body["cached"]) == (64, 36, False)
    assert body["ignored"] == ["negativePrompt", "steps", "seed"]
    assert "gemini backend cannot use negativePrompt, steps, seed" in body["warning"]
    png = base64.b64decode(body["imageUrl"].removeprefix("data:image/png;base64,"))
    assert size_of(png) == (64, 36)
    assert gemini.calls()[0].json()["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9"}

    gemini.reply(fake_gemini.finish_reason("IMAGE_SAFETY"), fake_gemini.resource_exhausted("26s"))
    refused = requests.post(url, json={"prompt": "something refused"}, timeout=30)
    assert refused.status_code == 422 and refused.json()["code"] == "content_rejected"
    assert "IMAGE_SAFETY" in refused.json()["error"]

    for text in (answer.text, refused.text, function.log()):
        assert KEY not in text

