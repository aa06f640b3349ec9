"""The `stability` backend against the Stability v2beta stand-in, behind a Dispatcher:
multipart wire format, endpoints per model, aspect ratios, seeds, every error class and safety
shape, retries, failover to OpenAI and back, and the real function process."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import pytest
import requests
from PIL import Image

from imagegen.backends.stability import MAX_SEED, stability_seed
from imagegen.config import load_settings
from imagegen.domain import GenerationRequest
from imagegen.png_info import png_text
from imagegen.errors import ConfigurationError, ContentRejected, UpstreamError, UpstreamRateLimited
from tests import fake_openai, fake_stability
from tests.clients import BackendsClient
from tests.fake_openai import FakeOpenAI
from tests.fake_stability import FakeStability
from tests.standin import Reply, make_image

STABILITY_KEY = "sk-StabilityKeyThatMustNeverLeak0123456789"
OPENAI_KEY = "sk-proj-OpenAIKeyThatMustNeverLeak0123456789"
PROMPT = "a lighthouse at dusk"


@pytest.fixture
def stability() -> Iterator[FakeStability]:
    with FakeStability(STABILITY_KEY) as server:
        yield server


@pytest.fixture
def client_for(stability, clock):
    def make(**env: str) -> BackendsClient:
        base = {"BACKENDS": "stability", "STABILITY_API_KEY": STABILITY_KEY, "STABILITY_BASE_URL": stability.base_url}
        return BackendsClient(load_settings({**base, **env}), timing=clock.timing())

    return make


def image_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


def failure(client: BackendsClient, request: GenerationRequest = GenerationRequest(prompt=PROMPT, seed=1)) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        client.generate(request)
    assert STABILITY_KEY not in caught.value.message and STABILITY_KEY not in json.dumps(caught.value.headers)
    return caught.value


# --- success and the wire format ---------------------------------------------------------------


def test_sends_multipart_to_the_core_endpoint_and_reads_the_image_body(client_for, stability):
    request = GenerationRequest(
        prompt=PROMPT, negative_prompt="fog", width=1024, height=576, steps=30, guidance_scale=7.0, seed=42
    )
    image = client_for().generate(request)

    (call,) = stability.calls()
    assert (call.method, call.path) == ("POST", "/v2beta/stable-image/generate/core")
    assert call.header("Authorization") == f"Bearer {STABILITY_KEY}"
    assert call.header("Accept") == "image/*"
    assert call.header("Content-Type").startswith("multipart/form-data; boundary=")
    assert call.form == {
        "prompt": PROMPT,
        "negative_prompt": "fog",
        "aspect_ratio": "16:9",
        "seed": "42",
        "output_format": "png",
    }
    assert call.files == {}
    assert image_size(image.png) == (64, 36)  # the stand-in's small 16:9
    assert (image.route.backend, image.route.model, image.seed) == ("stability", "core", 42)
    # Core has no steps or guidance: said, not dropped silently.
    assert image.ignored == ("steps", "guidanceScale")


def test_without_width_or_height_no_aspect_ratio_is_sent(client_for, stability):
    client_for().generate(GenerationRequest(prompt=PROMPT, seed=1))
    assert "aspect_ratio" not in stability.calls()[0].form  # Stability's default, 1:1


@pytest.mark.parametrize(
    ("width", "height", "ratio"),
    [(1024, 1024, "1:1"), (1536, 1024, "3:2"), (1024, 1536, "2:3"), (2048, 880, "21:9"), (880, 2048, "9:21"),
     (1280, 1024, "5:4"), (816, 1024, "4:5"), (576, 1024, "9:16"), (2048, 256, "21:9"), (512, None, "1:1")],
)
def test_width_and_height_map_to_the_nearest_aspect_ratio(client_for, stability, width, height, ratio):
    client_for().generate(GenerationRequest(prompt=PROMPT, width=width, height=height, seed=1))
    assert stability.calls()[0].form["aspect_ratio"] == ratio


@pytest.mark.parametrize("endpoint", ["core", "ultra"])
def test_core_and_ultra_are_their_own_endpoints(client_for, stability, endpoint):
    client_for(STABILITY_MODEL=endpoint).generate(GenerationRequest(prompt=PROMPT, seed=1))
    call = stability.calls()[0]
    assert call.path == f"/v2beta/stable-image/generate/{endpoint}"
    assert "model" not in call.form and "cfg_scale" not in call.form


def test_sd3_models_go_to_the_sd3_endpoint_with_model_and_cfg_scale(client_for, stability):
    image = client_for(STABILITY_MODEL="sd3.5-large").generate(
        GenerationRequest(prompt=PROMPT, negative_prompt="fog", guidance_scale=4.5, seed=9)
    )
    call = stability.calls()[0]
    assert call.path == "/v2beta/stable-image/generate/sd3"
    assert call.form == {
        "prompt": PROMPT,
        "negative_prompt": "fog",
        "seed": "9",
        "model": "sd3.5-large",
        "cfg_scale": "4.5",
        "output_format": "png",
    }
    assert image.ignored == () and image.seed == 9


@pytest.mark.parametrize(("guidance", "sent"), [(0.0, "1"), (30.0, "10"), (7.25, "7.25")])
def test_guidance_is_kept_within_stabilitys_cfg_scale_range(client_for, stability, guidance, sent):
    client_for(STABILITY_MODEL="sd3.5-medium").generate(GenerationRequest(prompt=PROMPT, guidance_scale=guidance, seed=1))
    assert stability.calls()[0].form["cfg_scale"] == sent


def test_turbo_gets_no_negative_prompt_and_says_so(client_for, stability):
    image = client_for(STABILITY_MODEL="sd3.5-large-turbo").generate(
        GenerationRequest(prompt=PROMPT, negative_prompt="fog", seed=1)
    )
    assert "negative_prompt" not in stability.calls()[0].form
    assert image.ignored == ("negativePrompt",)


# --- seeds -------------------------------------------------------------------------------------


def test_the_same_seed_reproduces_the_same_image(client_for):
    client = client_for()
    first = client.generate(GenerationRequest(prompt=PROMPT, seed=123))
    again = client.generate(GenerationRequest(prompt=PROMPT, seed=123))
    other = client.generate(GenerationRequest(prompt=PROMPT, seed=124))
    assert first.png == again.png != other.png


@pytest.mark.parametrize(("ours", "sent"), [(0, MAX_SEED), (1, 1), (MAX_SEED, MAX_SEED), (MAX_SEED + 1, 1), (2**31, 2**31)])
def test_seeds_fold_into_stabilitys_range_and_the_answer_reports_the_one_used(client_for, stability, ours, sent):
    assert stability_seed(ours) == sent
    image = client_for().generate(GenerationRequest(prompt=PROMPT, seed=ours))
    assert stability.calls()[0].form["seed"] == str(sent)
    assert image.seed == sent
    # The reported seed makes the same image again.
    assert client_for().generate(GenerationRequest(prompt=PROMPT, seed=image.seed)).png == image.png


def test_without_a_seed_the_answer_reports_the_one_stability_picked(client_for, stability):
    image = client_for().generate(GenerationRequest(prompt=PROMPT))
    assert "seed" not in stability.calls()[0].form
    assert image.seed is not None and 1 <= image.seed <= MAX_SEED
    assert client_for().generate(GenerationRequest(prompt=PROMPT, seed=image.seed)).png == image.png


@pytest.mark.parametrize("header", ["abc", "-5", "0", "12.0", "0x10", "99999999999", str(MAX_SEED + 1), "12 ; x", "9" * 5000])
def test_an_untrustworthy_seed_header_is_ignored(client_for, stability, header):
    stability.reply(Reply(headers={"seed": header}))
    assert client_for().generate(GenerationRequest(prompt=PROMPT, seed=77)).seed == 77
    assert len(stability.calls()) == 1


def test_the_seed_header_is_the_seed_reported(client_for, stability):
    stability.reply(Reply(headers={"seed": "31337"}))
    assert client_for().generate(GenerationRequest(prompt=PROMPT, seed=77)).seed == 31337


def test_a_json_answer_is_read_too(client_for, stability):
    image = make_image(40, 40, seed=1)
    stability.reply(Reply(200, {"image": base64.b64encode(image).decode(), "finish_reason": "SUCCESS", "seed": 5}))
    generated = client_for().generate(GenerationRequest(prompt=PROMPT, seed=5))
    assert generated.png == image and generated.seed == 5


def test_a_webp_or_jpeg_body_becomes_a_png(client_for, stability):
    stability.reply(Reply(200, make_image(48, 32, fmt="webp"), {"Content-Type": "image/webp", "finish-reason": "SUCCESS"}))
    assert image_size(client_for().generate(GenerationRequest(prompt=PROMPT, seed=1)).png) == (48, 32)


# --- configuration -----------------------------------------------------------------------------


def test_a_model_without_an_endpoint_is_a_configuration_error(client_for, stability):
    with pytest.raises(ConfigurationError) as caught:
        client_for(STABILITY_MODEL="stable-diffusion-xl-1024-v1-0").generate(GenerationRequest(prompt=PROMPT))
    assert caught.value.code == "invalid_configuration" and "STABILITY_MODEL" in caught.value.message
    assert stability.requests == []


def test_a_missing_key_names_the_variable(stability):
    client = BackendsClient(load_settings({"BACKENDS": "stability", "STABILITY_BASE_URL": stability.base_url}))
    with pytest.raises(ConfigurationError) as caught:
        client.generate(GenerationRequest(prompt=PROMPT))
    assert caught.value.code == "missing_api_key" and "STABILITY_API_KEY" in caught.value.message
    assert stability.requests == []


# --- safety, in both of Stability's shapes -----------------------------------------------------


def test_a_content_filtered_image_is_refused_not_returned(client_for, stability):
    stability.reply(fake_stability.content_filtered())
    error = failure(client_for())
    assert isinstance(error, ContentRejected) and (error.status, error.code) == (422, "content_rejected")
    assert "CONTENT_FILTERED" in error.message and "Stability AI" in error.message
    assert len(stability.calls()) == 1  # never retried, never failed over


def test_a_content_filtered_json_answer_is_refused_too(client_for, stability):
    blurred = make_image(40, 40, blur=True)
    stability.reply(Reply(200, {"image": base64.b64encode(blurred).decode(), "finish_reason": "CONTENT_FILTERED", "seed": 5}))
    assert failure(client_for()).code == "content_rejected"


def test_content_moderation_is_content_rejected_with_stabilitys_reason(client_for, stability):
    stability.reply(fake_stability.content_moderation())
    error = failure(client_for())
    assert (error.status, error.code, error.upstream_status) == (422, "content_rejected", 403)
    assert "flagged by our content moderation system" in error.message


# --- other errors, by cause --------------------------------------------------------------------


def test_payment_required_is_credits(client_for, stability):
    stability.reply(fake_stability.payment_required())
    error = failure(client_for())
    assert error.code == "upstream_credits_exhausted" and "platform.stability.ai/account/credits" in error.message


def test_a_wrong_key_is_unauthorized_and_never_echoed(stability, clock):
    wrong = "sk-WrongStabilityKey0123456789abcdef"
    settings = load_settings({"BACKENDS": "stability", "STABILITY_API_KEY": wrong, "STABILITY_BASE_URL": stability.base_url})
    with pytest.raises(UpstreamError) as caught:
        BackendsClient(settings, timing=clock.timing()).generate(GenerationRequest(prompt=PROMPT))
    assert caught.value.code == "upstream_unauthorized" and "STABILITY_API_KEY" in caught.value.message
    assert wrong not in caught.value.message


@pytest.mark.parametrize(
    "reply",
    [
        fake_stability.error(400, "bad_request", "prompt: cannot be empty"),
        fake_stability.error(413, "payload_too_large", "body: payloads cannot be larger than 10MiB in size"),
        fake_stability.invalid_language(),
    ],
)
def test_refused_requests_are_upstream_rejected_with_stabilitys_message(client_for, stability, clock, reply):
    stability.reply(reply)
    error = failure(client_for())
    assert (error.status, error.code, error.retryable, error.fail_over) == (502, "upstream_rejected", False, False)
    assert reply.body["errors"][0] in error.message
    assert clock.sleeps == []


def test_an_unknown_sd3_model_is_model_not_available(client_for, stability):
    error = failure(client_for(STABILITY_MODEL="sd3.9-imaginary"))
    assert error.code == "model_not_available" and "STABILITY_MODEL" in error.message


def test_rate_limits_are_retried_after_retry_after(client_for, stability, clock):
    limited = fake_stability.rate_limited()
    limited.headers["Retry-After"] = "7"
    stability.reply(limited)
    image = client_for().generate(GenerationRequest(prompt=PROMPT, seed=1))
    assert image.seed == 1 and clock.sleeps == [7] and len(stability.calls()) == 2


def test_a_rate_limit_without_a_hint_tells_the_caller_when_to_come_back(client_for, stability):
    stability.reply(fake_stability.rate_limited())
    error = failure(client_for(MAX_RETRIES="0"))
    assert isinstance(error, UpstreamRateLimited) and error.headers["Retry-After"] == "60"
    assert "150 requests within a 10 second period" in error.message


def test_server_errors_are_retried_with_backoff(client_for, stability, clock):
    stability.reply(fake_stability.server_error(), fake_stability.server_error())
    assert client_for().generate(GenerationRequest(prompt=PROMPT, seed=1)).seed == 1
    assert clock.sleeps == [0.75, 1.5]


@pytest.mark.parametrize(
    "reply",
    [
        Reply(200, b"<!DOCTYPE html><html>Bad gateway</html>", {"Content-Type": "text/html"}),
        Reply(200, b"", {"Content-Type": "image/png"}),
        Reply(200, {"finish_reason": "SUCCESS"}),
        Reply(200, make_image(8, 8), {"Content-Type": "image/png", "finish-reason": "ERROR"}),
    ],
)
def test_an_answer_without_a_usable_image_is_a_bad_response(client_for, stability, reply):
    stability.reply(reply)
    error = failure(client_for(MAX_RETRIES="0"))
    assert (error.code, error.fail_over) == ("upstream_bad_response", True)


# --- failover across backends ------------------------------------------------------------------


def test_fails_over_from_stability_to_openai_and_back(stability, clock):
    with FakeOpenAI(OPENAI_KEY) as openai:
        env = {
            "STABILITY_API_KEY": STABILITY_KEY,
            "STABILITY_BASE_URL": stability.base_url,
            "OPENAI_API_KEY": OPENAI_KEY,
            "OPENAI_BASE_URL": openai.base_url,
            "MAX_RETRIES": "0",
        }
        stability.reply(fake_stability.server_error())
        image = BackendsClient(load_settings({**env, "BACKENDS": "stability,openai"}), timing=clock.timing()).generate(
            GenerationRequest(prompt=PROMPT, seed=4)
        )
        assert (image.route.backend, image.seed) == ("openai", None)  # OpenAI cannot reproduce a seed

        openai.reply(fake_openai.server_error(502))
        image = BackendsClient(load_settings({**env, "BACKENDS": "openai,stability"}), timing=clock.timing()).generate(
            GenerationRequest(prompt=PROMPT, seed=4)
        )
        assert (image.route.backend, image.seed) == ("stability", 4)
        assert STABILITY_KEY not in json.dumps([r.headers for r in openai.requests])


# --- the real function process -----------------------------------------------------------------


def test_the_function_answers_with_stability_and_never_keeps_a_filtered_image(run_function, stability, tmp_path):
    out = tmp_path / "out"
    function = run_function(
        BACKENDS="stability", STABILITY_API_KEY=STABILITY_KEY, STABILITY_BASE_URL=stability.base_url, IMAGE_DIR=str(out)
    )
    url = f"{function.url}/api/generate-image"
    answer = requests.post(url, json={"prompt": PROMPT, "width": 1024, "height": 576, "seed": 0, "steps": 20}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["backend"], body["model"], body["provider"]) == ("stability", "core", None)
    assert (body["seed"], body["width"], body["height"]) == (MAX_SEED, 64, 36)
    assert body["ignored"] == ["steps"] and "stability backend cannot use steps" in body["warning"]
    png = base64.b64decode(body["imageUrl"].removeprefix("data:image/png;base64,"), validate=True)
    assert image_size(png) == (64, 36)
    assert f"Seed: {MAX_SEED}, Size: 64x36, Model: core" in png_text(png, "parameters")
    stored = sorted(out.iterdir())
    assert len(stored) == 1

    stability.reply(fake_stability.content_filtered())
    refused = requests.post(url, json={"prompt": "something filtered", "seed": 5}, timeout=30)
    assert refused.status_code == 422 and refused.json()["code"] == "content_rejected"
    assert "imageUrl" not in refused.json()
    assert sorted(out.iterdir()) == stored  # the blurred image was not kept

    for text in (answer.text, refused.text, function.log()):
        assert STABILITY_KEY not in text


def test_a_cached_answer_reports_the_seed_the_fresh_one_did(make_app, stability):
    """Stability has no seed 0 (it means random): the seed sent and reported is another one,
    and an answer from the cache must report that same seed, not the request's 0."""
    app = make_app(BACKENDS="stability", STABILITY_API_KEY=STABILITY_KEY, STABILITY_BASE_URL=stability.base_url)
    fresh = app.post("/", json={"prompt": PROMPT, "seed": 0}).get_json()
    cached = app.post("/", json={"prompt": PROMPT, "seed": 0}).get_json()
    assert (fresh["cached"], cached["cached"]) == (False, True)
    assert fresh["seed"] == cached["seed"] == stability_seed(0) != 0
    assert len(stability.calls()) == 1
