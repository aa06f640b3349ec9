"""The Hugging Face client against `responses`: the exact request, and every failure mapped."""

import base64
import io
import json
import random
import threading

import pytest
import requests
import urllib3
import responses
from PIL import Image

from imagegen.errors import ConfigurationError, UpstreamError, UpstreamRateLimited, UpstreamTimeout
from tests.clients import HuggingFaceClient
from imagegen.domain import GenerationRequest
from tests.servers import free_port
from tests.conftest import TEST_TOKEN
from tests.fake_router import Reply, make_png
from tests.fakes import FakeClock

MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
URL = f"https://router.huggingface.co/hf-inference/models/{MODEL}"
REQUEST = GenerationRequest(prompt="a red fox", model=MODEL)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def client(make_settings, clock):
    return HuggingFaceClient(make_settings(HF_MAX_RETRIES="0"), timing=clock.timing())


def generate_error(client, request=REQUEST) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        client.generate(request)
    return caught.value


@responses.activate
def test_sends_the_routers_wire_format(client):
    png = make_png()
    responses.post(URL, body=png, content_type="image/png", headers={"x-request-id": "req-1"})
    image = client.generate(
        GenerationRequest(
            prompt="a red fox",
            model=MODEL,
            negative_prompt="blurry",
            width=512,
            height=768,
            steps=20,
            guidance_scale=6.5,
            seed=42,
        )
    )
    sent = responses.calls[0].request
    assert sent.headers["Authorization"] == f"Bearer {TEST_TOKEN}"
    assert sent.headers["Accept"] == "image/png"
    assert sent.headers["Content-Type"] == "application/json"
    assert json.loads(sent.body) == {
        "inputs": "a red fox",
        "parameters": {
            "negative_prompt": "blurry",
            "width": 512,
            "height": 768,
            "num_inference_steps": 20,
            "guidance_scale": 6.5,
            "seed": 42,
        },
    }
    assert image.png == png and image.route.model == MODEL and image.route.provider == "hf-inference"
    assert image.request_id == "req-1"


@responses.activate
def test_absent_parameters_are_left_out(client):
    responses.post(URL, body=make_png(), content_type="image/png")
    client.generate(REQUEST)
    assert json.loads(responses.calls[0].request.body) == {"inputs": "a red fox"}


@responses.activate
def test_router_url_is_configurable(make_settings):
    responses.post(f"http://127.0.0.1:9/hf-inference/models/{MODEL}", body=make_png(), content_type="image/png")
    HuggingFaceClient(make_settings(HF_ROUTER_URL="http://127.0.0.1:9/")).generate(REQUEST)
    assert len(responses.calls) == 1


@responses.activate
def test_json_b64_answer_is_accepted(client):
    png = make_png()
    responses.post(URL, json={"data": [{"b64_json": base64.b64encode(png).decode()}]})
    assert client.generate(REQUEST).png == png


@responses.activate
def test_jpeg_answer_becomes_png(client):
    out = io.BytesIO()
    Image.new("RGB", (40, 24), "blue").save(out, format="JPEG")
    responses.post(URL, body=out.getvalue(), content_type="image/jpeg")
    png = client.generate(REQUEST).png
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (40, 24)


def test_no_token_is_a_configuration_error_before_any_call(make_settings):
    with responses.RequestsMock() as mocked:  # would fail on any request
        with pytest.raises(ConfigurationError) as caught:
            HuggingFaceClient(make_settings(HUGGING_FACE_API_KEY="")).generate(REQUEST)
        assert len(mocked.calls) == 0
    assert "HUGGING_FACE_API_KEY" in caught.value.message


@pytest.mark.parametrize(
    "status, body, code, http_status, words",
    [
        (401, {"error": "Invalid credentials in Authorization header"}, "upstream_unauthorized", 502, "Inference Providers"),
        (403, {"error": "This authentication method does not have sufficient permissions"}, "upstream_unauthorized", 502, "permission"),
        (402, {"error": "You have exceeded your monthly included credits for Inference Providers."}, "upstream_credits_exhausted", 502, "credits"),
        (404, {"error": "Not Found"}, "model_not_available", 502, "HF_MODEL"),
        (410, {"error": "The requested model is deprecated and no longer supported by provider hf-inference."}, "model_not_available", 502, "deprecated"),
        (400, {"error": ["Input validation error: `width` must be a multiple of 64"]}, "upstream_rejected", 502, "multiple of 64"),
        (422, {"errors": [{"message": "guidance too high"}]}, "upstream_rejected", 502, "guidance too high"),
        (500, {"error": "Internal Server Error"}, "upstream_unavailable", 502, "Try again"),
        (503, {"error": "Model X is currently loading", "estimated_time": 20.0}, "upstream_unavailable", 502, "20 seconds"),
        (504, {"error": "Gateway Timeout"}, "upstream_timeout", 504, "timed out"),
        (429, {"error": "Rate limit reached"}, "upstream_rate_limited", 429, "rate-limiting"),
    ],
)
@responses.activate
def test_upstream_errors_are_mapped(client, status, body, code, http_status, words):
    responses.post(URL, json=body, status=status, headers={"x-request-id": "Root=abc123"})
    error = generate_error(client)
    assert (error.code, error.status, error.upstream_status) == (code, http_status, status)
    assert words in error.message
    # What a user needs to report it:
    for part in ("provider hf-inference", f"model {MODEL}", f"HF status {status}", "request id Root=abc123"):
        assert part in error.message


@responses.activate
def test_503_estimated_time_becomes_retry_after(client):
    responses.post(URL, json={"error": "loading", "estimated_time": 19.2}, status=503)
    assert generate_error(client).headers == {"Retry-After": "20"}


@responses.activate
def test_429_without_retry_after_still_says_when(client):
    responses.post(URL, json={"error": "slow down"}, status=429)
    assert generate_error(client).headers == {"Retry-After": "60"}


@responses.activate
def test_429_passes_retry_after_on(client):
    responses.post(URL, json={"error": "slow down"}, status=429, headers={"Retry-After": "37"})
    error = generate_error(client)
    assert isinstance(error, UpstreamRateLimited)
    assert error.headers == {"Retry-After": "37"} and "37 seconds" in error.message


@responses.activate
def test_retry_after_as_http_date(client):
    responses.post(URL, json={"error": "slow down"}, status=429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert generate_error(client).headers == {"Retry-After": "1"}  # in the past: retry now


@responses.activate
def test_html_error_page_is_not_quoted(client):
    responses.post(URL, body="<!DOCTYPE html><html><body>Bad gateway</body></html>", status=502, content_type="text/html")
    error = generate_error(client)
    assert error.code == "upstream_unavailable" and "<html" not in error.message


@pytest.mark.parametrize(
    "body, content_type, described",
    [
        (b"<!DOCTYPE html><html>oops</html>", "text/html", "HTML page"),
        (b'{"error": "nope"}', "application/json", "JSON"),
        (b"", "image/png", "empty body"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image/png", "without a valid IHDR"),
        (make_png()[:-30], "image/png", "truncated PNG"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "image/jpeg", "JPEG that cannot be decoded"),
    ],
)
@responses.activate
def test_a_200_that_is_not_an_image_is_a_bad_response(client, body, content_type, described):
    responses.post(URL, body=body, content_type=content_type)
    error = generate_error(client)
    assert (error.code, error.status) == ("upstream_bad_response", 502)
    assert described in error.message


def test_connection_refused_is_unreachable_and_names_the_host_and_setting(make_settings):
    port = free_port()  # nothing listens there
    client = HuggingFaceClient(make_settings(HF_ROUTER_URL=f"http://127.0.0.1:{port}", HF_MAX_RETRIES="0"))
    error = generate_error(client)
    assert (error.code, error.status) == ("upstream_unreachable", 502)
    assert "127.0.0.1" in error.message and "HF_ROUTER_URL" in error.message


@responses.activate
def test_a_connection_dropped_after_it_was_made_is_not_called_unreachable(client):
    dropped = requests.ConnectionError(urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError()))
    responses.post(URL, body=dropped)
    error = generate_error(client)
    assert (error.code, error.status) == ("upstream_bad_response", 502)
    assert "Could not reach" not in error.message and "HF_ROUTER_URL" not in error.message


@responses.activate
def test_timeout(client):
    responses.post(URL, body=requests.ReadTimeout("slow"))
    error = generate_error(client)
    assert isinstance(error, UpstreamTimeout) and error.status == 504
    assert "TIMEOUT_SECONDS" in error.message and "DEADLINE_SECONDS" in error.message


@responses.activate
def test_the_token_is_scrubbed_from_echoed_errors(client):
    responses.post(URL, json={"error": f"bad token {TEST_TOKEN}"}, status=401)
    error = generate_error(client)
    assert TEST_TOKEN not in error.message and "[redacted]" in error.message


# --- Bodies over a real loopback connection (the stand-in router) ------------------------------


@pytest.fixture
def live_client(make_settings, router):
    def make(**env: str) -> HuggingFaceClient:
        return HuggingFaceClient(make_settings(HF_ROUTER_URL=router.url, HF_MAX_RETRIES="0", **env))

    return make


@pytest.mark.parametrize("side", [64, 1024])
def test_a_declared_body_arrives_whole(live_client, router, side):
    image = live_client().generate(GenerationRequest(prompt="a fox", model=MODEL, width=side, height=side))
    assert image.png == make_png(side, side)


def test_a_body_bigger_than_one_read_is_joined_in_order(live_client, router, monkeypatch):
    monkeypatch.setattr("imagegen.outbound.READ_BYTES", 1000)
    out = io.BytesIO()
    Image.frombytes("RGB", (40, 40), random.Random(7).randbytes(40 * 40 * 3)).save(out, format="PNG")
    router.image = out.getvalue()
    assert len(router.image) > 3 * 1000
    image = live_client().generate(GenerationRequest(prompt="a fox", model=MODEL, width=40, height=40))
    assert image.png == router.image


def test_a_connection_that_breaks_mid_image_is_a_clear_retryable_error(live_client, router):
    router.reply(Reply(cut_after=5000))
    error = generate_error(live_client())
    assert (error.code, error.status, error.retryable) == ("upstream_bad_response", 502, True)
    assert "broke before the whole answer arrived" in error.message


def test_a_body_that_stalls_mid_image_times_out(live_client, router):
    stalled = threading.Event()
    router.reply(Reply(cut_after=5000, release=stalled))
    try:
        error = generate_error(live_client(HF_TIMEOUT_SECONDS="1"))
    finally:
        stalled.set()
    assert isinstance(error, UpstreamTimeout) and error.status == 504


def test_an_empty_error_body_still_names_the_status(live_client, router):
    router.reply(Reply(503, b"", {"Content-Type": "text/plain"}))
    error = generate_error(live_client())
    assert error.status == 502 and "503" in error.message
