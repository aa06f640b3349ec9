"""`stream: true` on the Images API door, read by the official `openai` Python package's
streaming (Stream of image_generation.* events), against the real function and the demo backend
(which shows labelled intermediate placeholders when partial images are asked)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests
from PIL import Image

from tests.servers import Process, start_function

API_KEY = "openai-door-test-key-0123456789"


@pytest.fixture(scope="module")
def function(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("openai-stream")
    process = start_function(
        {"BACKENDS": "demo", "DEMO_STEP_SECONDS": "0.01", "AUTH_MODE": "api-key", "API_KEYS": API_KEY,
         "CORS_ALLOWED_ORIGINS": "https://app.example.com", "IMAGE_DIR": str(folder / "images"),
         "RATE_LIMIT_PER_MINUTE": "10000", "RATE_LIMIT_BURST": "1000"},
        folder / "function.log",
    )  # fmt: skip
    yield process
    process.stop()


def client_for(process: Process) -> openai.OpenAI:
    return openai.OpenAI(base_url=process.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_the_sdk_streams_partial_images_then_the_image(function: Process) -> None:
    stream = client_for(function).images.generate(prompt="a streamed fox", size="256x256", stream=True, partial_images=2)
    events = list(stream)
    assert [event.type for event in events] == [
        "image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"
    ]  # fmt: skip
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    for event in events:
        assert Image.open(io.BytesIO(base64.b64decode(event.b64_json))).size == (256, 256)
    assert (events[-1].size, events[-1].output_format) == ("256x256", "png")


def test_n_streamed_images_each_complete_in_the_asked_format(function: Process) -> None:
    events = list(client_for(function).images.generate(prompt="foxes", n=2, stream=True, output_format="webp", size="256x256"))
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    assert all(Image.open(io.BytesIO(base64.b64decode(e.b64_json))).format == "WEBP" for e in events)


def test_without_partial_images_only_the_image_comes(function: Process) -> None:
    events = list(client_for(function).images.generate(prompt="a fox", stream=True, size="256x256"))
    assert [event.type for event in events] == ["image_generation.completed"]


def test_a_refusal_before_the_stream_is_a_plain_error(function: Process) -> None:
    with pytest.raises(openai.BadRequestError):
        client_for(function).images.generate(prompt="a fox", stream=True, model="nope")


def test_the_stream_is_event_stream_with_only_openai_events(function: Process) -> None:
    answer = requests.post(function.url + "/v1/images/generations", json={"prompt": "a fox", "stream": True, "partial_images": 1},
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)  # fmt: skip
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    names = [line.split(": ", 1)[1] for line in answer.text.splitlines() if line.startswith("event: ")]
    assert names == ["image_generation.partial_image", "image_generation.completed"]
