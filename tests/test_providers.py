"""Each provider through the client, against `responses`: route, headers, payload, answers."""

import base64
import io
import json

import pytest
import responses
from PIL import Image

from imagegen.errors import UpstreamError
from tests.clients import HuggingFaceClient
from imagegen.domain import GenerationRequest
from tests.conftest import TEST_TOKEN
from tests.fake_router import make_png

ROUTER = "https://router.huggingface.co"
HUB = "https://huggingface.co"
MODEL = "black-forest-labs/FLUX.1-schnell"
FULL = dict(negative_prompt="blur", width=512, height=768, steps=4, guidance_scale=3.5, seed=7)
CDN = "https://cdn.provider.example/out/abc.png"


def mapping(*entries: tuple[str, str], status: str = "live") -> dict:
    return {
        "id": MODEL,
        "inferenceProviderMapping": {
            provider: {"status": status, "providerId": provider_id, "task": "text-to-image"}
            for provider, provider_id in entries
        },
    }


@pytest.fixture
def client_for(make_settings, clock):
    def make(provider: str, **env: str) -> HuggingFaceClient:
        settings = make_settings(HF_MODEL=MODEL, HF_PROVIDER=provider, MAX_RETRIES="0", **env)
        return HuggingFaceClient(settings, timing=clock.timing())

    return make


@pytest.fixture
def mocked():
    with responses.RequestsMock() as rsps:
        yield rsps


def hub(mocked, *entries, status="live"):
    mocked.get(f"{HUB}/api/models/{MODEL}", json=mapping(*entries, status=status))


def sent_json(call) -> dict:
    return json.loads(call.request.body)


def test_fal_ai(mocked, client_for):
    hub(mocked, ("fal-ai", "fal-ai/flux/schnell"))
    mocked.post(f"{ROUTER}/fal-ai/fal-ai/flux/schnell", json={"images": [{"url": CDN, "width": 512}], "seed": 7})
    png = make_png(512, 768)
    mocked.get(CDN, body=png, content_type="image/png")
    image = client_for("fal-ai").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="fal-ai", **FULL))
    lookup, generation, download = mocked.calls
    assert lookup.request.headers["Authorization"] == f"Bearer {TEST_TOKEN}"
    assert "expand%5B%5D=inferenceProviderMapping" in lookup.request.url
    assert generation.request.headers["Authorization"] == f"Bearer {TEST_TOKEN}"
    assert sent_json(generation) == {
        "prompt": "a fox",
        "negative_prompt": "blur",
        "image_size": {"width": 512, "height": 768},
        "num_inference_steps": 4,
        "guidance_scale": 3.5,
        "seed": 7,
        "output_format": "png",
    }
    assert "Authorization" not in download.request.headers  # the token never goes to a CDN
    assert image.png == png and image.route.provider == "fal-ai"


def test_replicate_model_route_with_prefer_wait(mocked, client_for):
    hub(mocked, ("replicate", "black-forest-labs/flux-schnell"))
    mocked.post(f"{ROUTER}/replicate/v1/models/black-forest-labs/flux-schnell/predictions", json={"status": "succeeded", "output": [CDN]})
    mocked.get(CDN, body=make_png(), content_type="image/png")
    client_for("replicate").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="replicate", seed=3))
    generation = mocked.calls[1]
    assert generation.request.headers["Prefer"] == "wait"
    assert sent_json(generation) == {"input": {"prompt": "a fox", "seed": 3, "output_format": "png"}}


def test_replicate_versioned_route(mocked, client_for):
    hub(mocked, ("replicate", "bytedance/sdxl-lightning-4step:5599ed30"))
    mocked.post(f"{ROUTER}/replicate/v1/predictions", json={"output": CDN})
    mocked.get(CDN, body=make_png(), content_type="image/png")
    client_for("replicate").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="replicate"))
    assert sent_json(mocked.calls[1]) == {"input": {"prompt": "a fox", "output_format": "png"}, "version": "5599ed30"}


def test_replicate_null_output_is_a_timeout(mocked, client_for):
    hub(mocked, ("replicate", "black-forest-labs/flux-schnell"))
    mocked.post(f"{ROUTER}/replicate/v1/models/black-forest-labs/flux-schnell/predictions", json={"status": "processing", "output": None})
    with pytest.raises(UpstreamError) as caught:
        client_for("replicate").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="replicate"))
    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")


def test_together(mocked, client_for):
    hub(mocked, ("together", "black-forest-labs/FLUX.1-schnell-Free"))
    png = make_png()
    mocked.post(f"{ROUTER}/together/v1/images/generations", json={"data": [{"b64_json": base64.b64encode(png).decode()}]})
    image = client_for("together").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="together", **FULL))
    assert sent_json(mocked.calls[1]) == {
        "prompt": "a fox",
        "model": "black-forest-labs/FLUX.1-schnell-Free",
        "response_format": "base64",
        "output_format": "png",
        "negative_prompt": "blur",
        "width": 512,
        "height": 768,
        "steps": 4,
        "guidance": 3.5,
        "seed": 7,
    }
    assert image.png == png


def test_nscale_sends_size_and_no_steps(mocked, client_for):
    hub(mocked, ("nscale", "BlackForestLabs/FLUX.1-schnell"))
    out = io.BytesIO()
    Image.new("RGB", (32, 16), "green").save(out, format="WEBP")
    mocked.post(f"{ROUTER}/nscale/v1/images/generations", json={"data": [{"b64_json": base64.b64encode(out.getvalue()).decode()}]})
    image = client_for("nscale").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="nscale", **FULL))
    assert sent_json(mocked.calls[1]) == {
        "response_format": "b64_json",
        "prompt": "a fox",
        "model": "BlackForestLabs/FLUX.1-schnell",
        "negative_prompt": "blur",
        "size": "512x768",
        "guidance_scale": 3.5,
        "seed": 7,
    }
    with Image.open(io.BytesIO(image.png)) as decoded:  # WebP became PNG
        assert decoded.format == "PNG" and decoded.size == (32, 16)


def wavespeed_task(status: str, **data) -> dict:
    return {"code": 200, "data": {"id": "t1", "status": status, "urls": {"get": "https://api.wavespeed.ai/api/v3/predictions/t1/result"}, **data}}


def test_wavespeed_polls_through_the_router(mocked, client_for, clock):
    hub(mocked, ("wavespeed", "wavespeed-ai/flux-schnell"))
    mocked.post(f"{ROUTER}/wavespeed/api/v3/wavespeed-ai/flux-schnell", json=wavespeed_task("created"))
    poll = f"{ROUTER}/wavespeed/api/v3/predictions/t1/result"
    mocked.get(poll, json=wavespeed_task("processing"))
    mocked.get(poll, json=wavespeed_task("completed", outputs=[CDN]))
    mocked.get(CDN, body=make_png(), content_type="image/png")
    image = client_for("wavespeed").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="wavespeed", seed=1))
    assert sent_json(mocked.calls[1]) == {"prompt": "a fox", "seed": 1}
    polls = [c for c in mocked.calls if c.request.url == poll]
    assert len(polls) == 2 and all(c.request.headers["Authorization"] == f"Bearer {TEST_TOKEN}" for c in polls)
    assert clock.sleeps == [0.5, 0.5]
    assert image.route.provider == "wavespeed"


def test_wavespeed_failed_task(mocked, client_for):
    hub(mocked, ("wavespeed", "wavespeed-ai/flux-schnell"))
    mocked.post(f"{ROUTER}/wavespeed/api/v3/wavespeed-ai/flux-schnell", json=wavespeed_task("created"))
    mocked.get(f"{ROUTER}/wavespeed/api/v3/predictions/t1/result", json=wavespeed_task("failed", error="NSFW content detected"))
    with pytest.raises(UpstreamError) as caught:
        client_for("wavespeed").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="wavespeed"))
    assert caught.value.code == "generation_failed" and "NSFW content detected" in caught.value.message


def test_wavespeed_polling_stops_at_the_deadline(mocked, client_for, clock):
    hub(mocked, ("wavespeed", "wavespeed-ai/flux-schnell"))
    mocked.post(f"{ROUTER}/wavespeed/api/v3/wavespeed-ai/flux-schnell", json=wavespeed_task("created"))
    mocked.get(f"{ROUTER}/wavespeed/api/v3/predictions/t1/result", json=wavespeed_task("processing"))
    with pytest.raises(UpstreamError) as caught:
        client_for("wavespeed", DEADLINE_SECONDS="5").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="wavespeed"))
    assert caught.value.code == "upstream_timeout"
    assert sum(clock.sleeps) <= 5


@pytest.mark.parametrize(
    "answer, words",
    [
        ({"images": []}, '"images"[0]["url"]'),
        ({"images": [{"url": "http://cdn.example/x.png"}]}, "will not fetch"),
        ({"images": [{"url": "file:///etc/passwd"}]}, "will not fetch"),
    ],
)
def test_fal_bad_answers(mocked, client_for, answer, words):
    hub(mocked, ("fal-ai", "fal-ai/flux/schnell"))
    mocked.post(f"{ROUTER}/fal-ai/fal-ai/flux/schnell", json=answer)
    with pytest.raises(UpstreamError) as caught:
        client_for("fal-ai").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="fal-ai"))
    assert caught.value.code == "upstream_bad_response" and words in caught.value.message


def test_a_cdn_failure_is_a_bad_response(mocked, client_for):
    hub(mocked, ("fal-ai", "fal-ai/flux/schnell"))
    mocked.post(f"{ROUTER}/fal-ai/fal-ai/flux/schnell", json={"images": [{"url": CDN}]})
    mocked.get(CDN, status=403, body="denied")
    with pytest.raises(UpstreamError) as caught:
        client_for("fal-ai").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="fal-ai"))
    assert caught.value.code == "upstream_bad_response" and "will not fetch, or could not fetch" in caught.value.message


def test_provider_errors_name_the_provider(mocked, client_for):
    hub(mocked, ("together", "flux-free"))
    mocked.post(f"{ROUTER}/together/v1/images/generations", status=402, json={"error": {"message": "insufficient balance"}}, headers={"x-request-id": "r-9"})
    with pytest.raises(UpstreamError) as caught:
        client_for("together").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="together"))
    message = caught.value.message
    assert caught.value.code == "upstream_credits_exhausted"
    assert all(part in message for part in ("provider together", f"model {MODEL}", "HF status 402", "request id r-9", "insufficient balance"))


def test_explicit_provider_that_does_not_serve_the_model(mocked, client_for):
    hub(mocked, ("fal-ai", "fal-ai/flux/schnell"), ("together", "x"))
    with pytest.raises(UpstreamError) as caught:
        client_for("replicate").generate(GenerationRequest(prompt="a fox", model=MODEL, provider="replicate"))
    assert caught.value.code == "model_not_available"
    assert "fal-ai, together" in caught.value.message and "auto" in caught.value.message


GENERATION_URLS = {
    "fal-ai": f"{ROUTER}/fal-ai/p/id",
    "replicate": f"{ROUTER}/replicate/v1/models/p/id/predictions",
    "together": f"{ROUTER}/together/v1/images/generations",
    "nscale": f"{ROUTER}/nscale/v1/images/generations",
    "wavespeed": f"{ROUTER}/wavespeed/api/v3/p/id",
}


@pytest.mark.parametrize("provider", sorted(GENERATION_URLS))
@pytest.mark.parametrize(
    "status, body, code",
    [
        (401, {"error": "Invalid credentials in Authorization header"}, "upstream_unauthorized"),
        (402, {"error": "You have exceeded your monthly included credits"}, "upstream_credits_exhausted"),
        (404, {"error": "Not Found"}, "model_not_available"),
        (422, {"detail": "width must be at most 1440"}, "upstream_rejected"),
        (429, {"error": "Too many requests"}, "upstream_rate_limited"),
        (503, {"error": "Service Unavailable"}, "upstream_unavailable"),
        (200, {"unexpected": True}, "upstream_bad_response"),
    ],
)
def test_each_provider_maps_each_error(mocked, client_for, provider, status, body, code):
    hub(mocked, (provider, "p/id"))
    mocked.post(GENERATION_URLS[provider], status=status, json=body)
    with pytest.raises(UpstreamError) as caught:
        client_for(provider).generate(GenerationRequest(prompt="a fox", model=MODEL, provider=provider))
    assert caught.value.code == code
    assert f"provider {provider}" in caught.value.message and f"HF status {status}" in caught.value.message
