"""The `openai` backend against the OpenAI Images stand-in, behind a Dispatcher: wire format,
size mapping, every error class, retries on OpenAI's hints, failover to Stability and back,
and the real function process."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator

import pytest
import requests
from PIL import Image

from imagegen.config import load_settings
from imagegen.domain import GenerationRequest
from imagegen.errors import ConfigurationError, ContentRejected, UpstreamError, UpstreamRateLimited
from tests import fake_openai, fake_stability
from tests.clients import BackendsClient
from tests.fake_openai import FakeOpenAI
from tests.fake_stability import FakeStability
from tests.standin import Reply, make_image

OPENAI_KEY = "sk-proj-OpenAIKeyThatMustNeverLeak0123456789"
STABILITY_KEY = "sk-StabilityKeyThatMustNeverLeak0123456789"
PROMPT = "a lighthouse at dusk"


@pytest.fixture
def openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(OPENAI_KEY) as server:
        yield server


@pytest.fixture
def stability() -> Iterator[FakeStability]:
    with FakeStability(STABILITY_KEY) as server:
        yield server


@pytest.fixture
def client_for(openai, clock, tmp_path):
    def make(**env: str) -> BackendsClient:
        base = {
            "BACKENDS": "openai",
            "OPENAI_API_KEY": OPENAI_KEY,
            "OPENAI_BASE_URL": openai.base_url,
            "IMAGE_DIR": str(tmp_path / "images"),
        }
        return BackendsClient(load_settings({**base, **env}), timing=clock.timing())

    return make


def image_size(png: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return image.size


def failure(client: BackendsClient, request: GenerationRequest = GenerationRequest(prompt=PROMPT)) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        client.generate(request)
    assert OPENAI_KEY not in caught.value.message and OPENAI_KEY not in json.dumps(caught.value.headers)
    return caught.value


# --- success and the wire format ---------------------------------------------------------------


def test_sends_openais_wire_format_and_reads_b64_json(client_for, openai):
    request = GenerationRequest(
        prompt=PROMPT, width=1024, height=576, negative_prompt="fog", steps=30, guidance_scale=7.0, seed=5
    )
    image = client_for().generate(request)

    (call,) = openai.calls()
    assert (call.method, call.path) == ("POST", "/v1/images/generations")
    assert call.header("Authorization") == f"Bearer {OPENAI_KEY}"
    assert call.header("Content-Type") == "application/json"
    # 1024x576 is below gpt-image-2's 655,360-pixel minimum: the nearest 16:9-ish size above it.
    assert call.json() == {"model": "gpt-image-2", "prompt": PROMPT, "n": 1, "output_format": "png", "size": "1088x608"}
    assert image_size(image.png) == (1088, 608)
    assert (image.route.backend, image.route.model, image.route.provider) == ("openai", "gpt-image-2", None)
    # OpenAI takes no seed, negative prompt, steps or guidance: said, not dropped silently.
    assert image.seed is None
    assert image.ignored == ("negativePrompt", "steps", "guidanceScale")
    assert image.request_id and image.request_id.startswith("req_")


def test_without_width_or_height_no_size_is_sent(client_for, openai):
    image = client_for().generate(GenerationRequest(prompt=PROMPT))
    assert "size" not in openai.calls()[0].json()  # the API's default, auto
    assert image_size(image.png) == (1024, 1024)
    assert image.ignored == ()


@pytest.mark.parametrize(
    ("model", "width", "height", "size"),
    [
        ("gpt-image-2", 1024, 1024, "1024x1024"),
        ("gpt-image-2", 256, 256, "816x816"),  # grown to the minimum pixel count
        ("gpt-image-2", 2048, 512, "2048x688"),  # 4:1 narrowed to 3:1
        ("gpt-image-2", 2048, 2048, "2048x2048"),
        ("gpt-image-2", 1000, 1000, "992x992"),  # sides are multiples of 16
        ("gpt-image-2.5-flare", 1536, 864, "1536x864"),  # later generations take free sizes too
        ("gpt-image-1.5", 1024, 576, "1536x1024"),
        ("gpt-image-1-mini", 600, 1000, "1024x1536"),
        ("gpt-image-1-mini", 512, 512, "1024x1024"),
        ("chatgpt-image-latest", 2048, 1024, "1536x1024"),  # unknown sizes: the three every model takes
    ],
)
def test_width_and_height_map_to_the_nearest_size_the_model_takes(client_for, openai, model, width, height, size):
    image = client_for(OPENAI_MODEL=model).generate(GenerationRequest(prompt=PROMPT, width=width, height=height))
    assert openai.calls()[0].json()["size"] == size
    assert image_size(image.png) == tuple(int(side) for side in size.split("x"))


def test_quality_is_sent_only_when_configured(client_for, openai):
    client_for(OPENAI_QUALITY="Low").generate(GenerationRequest(prompt=PROMPT))
    assert openai.calls()[0].json()["quality"] == "low"
    with pytest.raises(ConfigurationError, match="OPENAI_QUALITY"):
        client_for(OPENAI_QUALITY="very-high").generate(GenerationRequest(prompt=PROMPT))


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-image-1", "dall-e-3", "dall-e-2"])
def test_a_retired_model_is_a_configuration_error_naming_openai_model(client_for, openai, model):
    with pytest.raises(ConfigurationError) as caught:
        client_for(OPENAI_MODEL=model).generate(GenerationRequest(prompt=PROMPT))
    assert "OPENAI_MODEL" in caught.value.message and model in caught.value.message
    assert caught.value.code == "invalid_configuration"
    assert openai.calls() == []


def test_a_missing_key_names_the_variable(openai, tmp_path):
    client = BackendsClient(load_settings({"BACKENDS": "openai", "OPENAI_BASE_URL": openai.base_url}))
    with pytest.raises(ConfigurationError) as caught:
        client.generate(GenerationRequest(prompt=PROMPT))
    assert caught.value.code == "missing_api_key" and "OPENAI_API_KEY" in caught.value.message
    assert openai.requests == []


# --- errors, by cause --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (fake_openai.moderation_blocked(), "rejected by the safety system"),
        (fake_openai.content_policy_violation(), "Your prompt may contain text that is not allowed"),
    ],
)
def test_safety_refusals_are_content_rejected_with_openais_reason(client_for, openai, reply, said):
    openai.reply(reply)
    error = failure(client_for())
    assert isinstance(error, ContentRejected) and (error.status, error.code) == (422, "content_rejected")
    assert said in error.message and "OpenAI" in error.message
    assert len(openai.calls()) == 1  # never retried


def test_moderation_details_reach_the_message(client_for, openai):
    blocked = fake_openai.moderation_blocked()
    blocked.body["error"]["moderation_details"] = {"moderation_stage": "input", "categories": ["harassment"]}
    openai.reply(blocked)
    error = failure(client_for())
    assert error.code == "content_rejected" and "categories harassment; stage input" in error.message


def test_insufficient_quota_is_credits_not_a_rate_limit(client_for, openai, clock):
    openai.reply(fake_openai.insufficient_quota())
    error = failure(client_for())
    assert (error.status, error.code) == (502, "upstream_credits_exhausted")
    assert "platform.openai.com/settings/organization/billing" in error.message
    assert len(openai.calls()) == 1 and clock.sleeps == []


def test_a_wrong_key_is_unauthorized_and_never_echoed(openai, clock, tmp_path):
    wrong = "sk-proj-WrongKeyThatMustNeverLeak987654321"
    settings = load_settings({"BACKENDS": "openai", "OPENAI_API_KEY": wrong, "OPENAI_BASE_URL": openai.base_url})
    with pytest.raises(UpstreamError) as caught:
        BackendsClient(settings, timing=clock.timing()).generate(GenerationRequest(prompt=PROMPT))
    error = caught.value
    assert (error.status, error.code) == (502, "upstream_unauthorized")
    # OpenAI echoes a masked key ("sk-*****4321"); nothing of it that could identify it remains.
    assert "OPENAI_API_KEY" in error.message and wrong not in error.message and "sk-proj" not in error.message


def test_an_unverified_organisation_says_where_to_verify(client_for, openai):
    openai.reply(fake_openai.unverified_organization())
    error = failure(client_for())
    assert (error.code, error.upstream_status) == ("upstream_unauthorized", 403)
    assert "platform.openai.com/settings/organization/general" in error.message and "verif" in error.message
    assert "OPENAI_API_KEY" in error.message


def test_model_not_found_names_openai_model_and_fails_over(client_for, openai):
    openai.reply(fake_openai.model_not_found("gpt-image-2"))
    error = failure(client_for())
    assert (error.code, error.fail_over) == ("model_not_available", True)
    assert "OPENAI_MODEL" in error.message and "does not exist" in error.message


def test_invalid_size_is_upstream_rejected(client_for, openai):
    openai.reply(fake_openai.invalid_size("1088x608"))
    error = failure(client_for(), GenerationRequest(prompt=PROMPT, width=1024, height=576))
    assert (error.status, error.code, error.retryable) == (502, "upstream_rejected", False)
    assert "Invalid value: '1088x608'" in error.message


@pytest.mark.parametrize(("ms", "seconds", "slept"), [(1500, 2, 1.5), (None, 3, 3), (250, None, 0.25)])
def test_rate_limits_are_retried_after_openais_hint(client_for, openai, clock, ms, seconds, slept):
    openai.reply(fake_openai.rate_limited(retry_after_ms=ms, retry_after=seconds))
    image = client_for().generate(GenerationRequest(prompt=PROMPT))
    assert image.png.startswith(b"\x89PNG")
    assert clock.sleeps == [slept] and len(openai.calls()) == 2


def test_a_rate_limit_that_outlasts_the_retries_passes_the_hint_on(client_for, openai, clock):
    openai.reply(*[fake_openai.rate_limited(retry_after_ms=1500, retry_after=2)] * 2)
    error = failure(client_for(MAX_RETRIES="1"))
    assert isinstance(error, UpstreamRateLimited) and (error.status, error.code) == (429, "upstream_rate_limited")
    assert error.headers["Retry-After"] == "2"  # 1.5 s, in whole seconds
    assert clock.sleeps == [1.5]


def test_server_errors_are_retried_with_backoff(client_for, openai, clock):
    openai.reply(fake_openai.server_error(500), fake_openai.server_error(503))
    image = client_for().generate(GenerationRequest(prompt=PROMPT))
    assert image.png.startswith(b"\x89PNG")
    assert clock.sleeps == [0.75, 1.5] and len(openai.calls()) == 3


@pytest.mark.parametrize(
    "body",
    [
        {"data": []},
        {"data": [{"url": "https://example.com/x.png"}]},
        {"data": [{"b64_json": "not base64!"}]},
        {"data": [{"b64_json": base64.b64encode(b"<html>oops</html>").decode()}]},
        b"<!DOCTYPE html><html>Bad gateway</html>",
    ],
)
def test_an_answer_without_a_usable_image_is_a_bad_response(client_for, openai, body):
    openai.reply(Reply(200, body, {"Content-Type": "text/html"} if isinstance(body, bytes) else {}))
    error = failure(client_for(MAX_RETRIES="0"))
    assert (error.code, error.fail_over) == ("upstream_bad_response", True)


def test_a_jpeg_answer_becomes_a_png(client_for, openai):
    jpeg = make_image(64, 48, fmt="jpeg")
    openai.reply(Reply(200, {"data": [{"b64_json": base64.b64encode(jpeg).decode()}]}))
    image = client_for().generate(GenerationRequest(prompt=PROMPT))
    assert image_size(image.png) == (64, 48)


# --- failover across backends ------------------------------------------------------------------


def test_fails_over_from_openai_to_stability_on_a_5xx_and_back(openai, stability, clock):
    settings = load_settings(
        {
            "BACKENDS": "openai,stability",
            "OPENAI_API_KEY": OPENAI_KEY,
            "OPENAI_BASE_URL": openai.base_url,
            "STABILITY_API_KEY": STABILITY_KEY,
            "STABILITY_BASE_URL": stability.base_url,
            "MAX_RETRIES": "1",
        }
    )
    client = BackendsClient(settings, timing=clock.timing())
    events: list[tuple[str, dict]] = []
    openai.reply(fake_openai.server_error(500), fake_openai.server_error(503))
    image = client.generate(GenerationRequest(prompt=PROMPT, seed=7), progress=lambda event, **f: events.append((event, f)))
    assert (image.route.backend, image.route.model, image.seed) == ("stability", "core", 7)
    assert len(openai.calls()) == 2 and len(stability.calls()) == 1
    assert ("failover", {"from": "openai", "to": "stability"}) in events
    assert stability.calls()[0].header("Authorization") == f"Bearer {STABILITY_KEY}"
    assert OPENAI_KEY not in json.dumps(stability.calls()[0].headers)

    # And back: Stability failing over to OpenAI (stability first).
    reverse = BackendsClient(load_settings({**_env(openai, stability), "BACKENDS": "stability,openai", "MAX_RETRIES": "0"}), timing=clock.timing())
    stability.reply(fake_stability.server_error())
    image = reverse.generate(GenerationRequest(prompt=PROMPT, seed=7))
    assert (image.route.backend, image.seed) == ("openai", None)


def test_a_safety_refusal_does_not_fail_over(openai, stability, clock):
    client = BackendsClient(load_settings({**_env(openai, stability), "BACKENDS": "openai,stability"}), timing=clock.timing())
    openai.reply(fake_openai.moderation_blocked())
    with pytest.raises(ContentRejected):
        client.generate(GenerationRequest(prompt=PROMPT))
    assert stability.calls() == []


def test_the_last_error_after_a_failover_lists_what_was_tried(openai, stability, clock):
    client = BackendsClient(
        load_settings({**_env(openai, stability), "BACKENDS": "openai,stability", "MAX_RETRIES": "0"}), timing=clock.timing()
    )
    openai.reply(fake_openai.server_error(503))
    stability.reply(fake_stability.payment_required())
    with pytest.raises(UpstreamError) as caught:
        client.generate(GenerationRequest(prompt=PROMPT))
    assert caught.value.code == "upstream_credits_exhausted"
    assert "Also tried: openai (OpenAI status 503)" in caught.value.message
    assert OPENAI_KEY not in caught.value.message and STABILITY_KEY not in caught.value.message


def _env(openai: FakeOpenAI, stability: FakeStability) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": openai.base_url,
        "STABILITY_API_KEY": STABILITY_KEY,
        "STABILITY_BASE_URL": stability.base_url,
    }


# --- the real function process -----------------------------------------------------------------


def test_the_function_answers_with_openai(run_function, openai, tmp_path):
    function = run_function(
        BACKENDS="openai", OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=openai.base_url, IMAGE_DIR=str(tmp_path / "out")
    )
    answer = requests.post(
        f"{function.url}/api/generate-image",
        json={"prompt": PROMPT, "width": 1536, "height": 1024, "seed": 3, "negativePrompt": "fog"},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["backend"], body["model"], body["provider"]) == ("openai", "gpt-image-2", None)
    assert (body["seed"], body["width"], body["height"]) == (None, 1536, 1024)
    assert body["ignored"] == ["negativePrompt", "seed"]
    assert "openai backend cannot use negativePrompt, seed" in body["warning"]
    png = base64.b64decode(body["imageUrl"].removeprefix("data:image/png;base64,"), validate=True)
    assert image_size(png) == (1536, 1024)
    assert openai.calls()[0].json()["size"] == "1536x1024"

    openai.reply(fake_openai.moderation_blocked())
    refused = requests.post(f"{function.url}/api/generate-image", json={"prompt": PROMPT}, timeout=30)
    assert refused.status_code == 422 and refused.json()["code"] == "content_rejected"

    for text in (answer.text, refused.text, function.log()):
        assert OPENAI_KEY not in text
