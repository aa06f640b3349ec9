"""OpenAI's own partial images through the `openai` backend, and Cloud Run's 10 MB cap on a
streamed answer, on the Images API door (`stream: true`), read by the official `openai` Python
package against the real function with the loopback OpenAI stand-in as its backend."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image

from tests.fake_openai import FakeOpenAI
from tests.servers import Process, start_function

API_KEY = "openai-partials-test-key-0123456789"
VENDOR_KEY = "sk-proj-OpenAIKeyThatMustNeverLeak0123456789"
# Entry point with a small stream cap (tests/small_stream_main.py).
SMALL_STREAM = "tests/small_stream_main.py"


def client_for(process: Process) -> openai.OpenAI:
    return openai.OpenAI(base_url=process.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def openai_function(vendor: FakeOpenAI, folder: Path, source: str = "main.py", **env: str) -> Process:
    settings = {
        "BACKENDS": "openai", "OPENAI_API_KEY": VENDOR_KEY, "OPENAI_BASE_URL": vendor.base_url,
        "OPENAI_MODEL": "gpt-image-2", "AUTH_MODE": "api-key", "API_KEYS": API_KEY, "MAX_RETRIES": "0",
        "CORS_ALLOWED_ORIGINS": "https://app.example.com",
        "IMAGE_DIR": str(folder / "images"), "RATE_LIMIT_PER_MINUTE": "10000", "RATE_LIMIT_BURST": "1000", **env,
    }  # fmt: skip
    return start_function(settings, folder / "function.log", source)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# --- the 10 MB cap --------------------------------------------------------------------------------


def test_an_image_past_the_stream_cap_comes_as_its_url(tmp_path: Path) -> None:
    # Images of about 7 KB of base64 each under a 10 KB cap: the first fits, the others do not.
    with FakeOpenAI(VENDOR_KEY) as vendor:
        process = openai_function(vendor, tmp_path, SMALL_STREAM, TEST_MAX_STREAM_BYTES="10000")
        try:
            events = list(client_for(process).images.generate(prompt="big foxes", n=3, size="1024x1024", stream=True))
            fetched = [requests.get(event.url, timeout=10) for event in events[1:]]
        finally:
            process.stop()
    assert [event.type for event in events] == ["image_generation.completed"] * 3
    assert decoded(events[0].b64_json).size == (1024, 1024)
    for event, answer in zip(events[1:], fetched):
        assert getattr(event, "b64_json", None) is None and event.url.startswith(process.url)
        assert "too large for a streamed answer" in event.imagegen["warning"]
        assert answer.status_code == 200 and Image.open(io.BytesIO(answer.content)).size == (1024, 1024)


def test_an_image_past_the_cap_with_no_url_is_an_error_after_the_others(tmp_path: Path) -> None:
    # The demo's placeholders are never stored, so they have no URL: about 27 KB of base64
    # each under a 40 KB cap.
    process = start_function(
        {"BACKENDS": "demo", "DEMO_STEP_SECONDS": "0.01", "AUTH_MODE": "api-key", "API_KEYS": API_KEY,
         "CORS_ALLOWED_ORIGINS": "https://app.example.com",
         "IMAGE_DIR": str(tmp_path / "images"), "TEST_MAX_STREAM_BYTES": "40000"},
        tmp_path / "function.log", SMALL_STREAM,
    )  # fmt: skip
    events = []
    try:
        with pytest.raises(openai.APIError) as raised:
            for event in client_for(process).images.generate(prompt="a fox", n=2, size="512x512", stream=True):
                events.append(event)
    finally:
        process.stop()
    assert [event.type for event in events] == ["image_generation.completed"]
    assert decoded(events[0].b64_json).size == (512, 512)
    assert raised.value.code == "stream_too_large"
    assert "Ask again without stream" in raised.value.message


def test_a_partial_image_is_sent_only_while_the_images_still_fit(tmp_path: Path) -> None:
    from imagegen.backends.demo import placeholder_png

    # Each demo partial is a placeholder as large as the image: room for one partial and the image.
    b64 = 4 * -(-len(placeholder_png(512, 512, "step 1 of 4: a fox")) // 3)
    process = start_function(
        {"BACKENDS": "demo", "DEMO_STEP_SECONDS": "0.01", "AUTH_MODE": "api-key", "API_KEYS": API_KEY,
         "CORS_ALLOWED_ORIGINS": "https://app.example.com", "IMAGE_DIR": str(tmp_path / "images"),
         "TEST_MAX_STREAM_BYTES": str(int(b64 * 2.5))},
        tmp_path / "function.log", SMALL_STREAM,
    )  # fmt: skip
    try:
        events = list(client_for(process).images.generate(prompt="a fox", size="512x512", stream=True, partial_images=3))
    finally:
        process.stop()
    assert [event.type for event in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert decoded(events[-1].b64_json).size == (512, 512)


def test_sse_length_is_what_sse_sends() -> None:
    from imagegen.doors import openai_stream

    out = io.BytesIO()
    Image.new("RGB", (64, 64)).save(out, format="PNG")
    for image in (out.getvalue(), out.getvalue()[:-1], out.getvalue()[:-2]):
        head = {"type": openai_stream.PARTIAL, "partial_image_index": 0, "created_at": 1, "note": "é"}
        parts = openai_stream.PngParts.of(image)
        sent = b"".join(openai_stream.sse(openai_stream.PARTIAL, head, parts))
        assert openai_stream.sse_length(openai_stream.PARTIAL, head, parts) == len(sent)
