"""OpenAI's own partial images through the `openai` backend, and Cloud Run's 10 MB cap on a
streamed answer, on the Images API door (`stream: true`), read by the official `openai` Python
package against the real function with the loopback OpenAI stand-in as its backend."""

from __future__ import annotations

import base64
import contextlib
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


# --- OpenAI's own partial images ------------------------------------------------------------------


def pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()


def test_the_sdk_gets_openais_partial_images_in_order_then_the_image(tmp_path: Path) -> None:
    from tests.fake_openai import partial_image

    with FakeOpenAI(VENDOR_KEY) as vendor:
        process = openai_function(vendor, tmp_path)
        try:
            stream = client_for(process).images.generate(prompt="a fox", size="1024x1024", stream=True, partial_images=2)
            events = list(stream)
            plain = client_for(process).images.generate(prompt="a plain fox", size="1024x1024")
        finally:
            process.stop()
        streamed_call, plain_call = (call.json() for call in vendor.calls())
    assert (streamed_call["stream"], streamed_call["partial_images"]) == (True, 2)
    assert "stream" not in plain_call and "partial_images" not in plain_call and plain.data[0].b64_json
    assert [event.type for event in events] == [
        "image_generation.partial_image", "image_generation.partial_image", "image_generation.completed"
    ]  # fmt: skip
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    for index, event in enumerate(events[:2]):
        assert pixels(base64.b64decode(event.b64_json)) == pixels(partial_image("a fox", index, 1024, 1024))
    assert decoded(events[-1].b64_json).size == (1024, 1024)
    assert events[-1].usage.output_tokens == 1056


def test_an_error_event_mid_stream_is_the_callers_error_event(tmp_path: Path) -> None:
    from tests.fake_openai import event_stream, partial_image

    partial = {"type": "image_generation.partial_image", "partial_image_index": 0,
               "b64_json": base64.b64encode(partial_image("a fox", 0, 1024, 1024)).decode()}
    refusal = {"type": "error", "error": {"type": "image_generation_user_error", "code": "moderation_blocked",
                                          "message": "Your request was rejected by the safety system.", "param": None}}
    with FakeOpenAI(VENDOR_KEY) as vendor:
        vendor.reply(event_stream(("image_generation.partial_image", partial), ("error", refusal)))
        process = openai_function(vendor, tmp_path)
        events = []
        try:
            with pytest.raises(openai.APIError) as raised:
                for event in client_for(process).images.generate(prompt="a fox", stream=True, partial_images=1):
                    events.append(event)
        finally:
            process.stop()
    assert [event.type for event in events] == ["image_generation.partial_image"]
    assert raised.value.code == "content_policy_violation"
    assert "safety system" in raised.value.message and VENDOR_KEY not in raised.value.message


# --- the exchange's streaming read ----------------------------------------------------------------


class EventPeer:
    """A loopback server that answers one request with an event stream, piece by piece: each
    piece waits for the test's go-ahead, so the test sees what arrived before the body ended."""

    def __init__(self, pieces: list[bytes], headers: str = "Content-Type: text/event-stream\r\n") -> None:
        import socket
        import threading

        self.pieces, self.headers = pieces, headers
        self.go = [threading.Event() for _ in pieces]
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import socket

        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn, contextlib.suppress(OSError):  # the client may have gone (the deadline test)
            conn.recv(65536)
            conn.sendall(f"HTTP/1.1 200 OK\r\n{self.headers}Connection: close\r\n\r\n".encode())
            for piece, go in zip(self.pieces, self.go):
                if not go.wait(10):
                    return
                conn.sendall(piece)
            # Close without a reset: read what the client sent after its head (its body).
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(5)
            while conn.recv(65536):
                pass

    def close(self) -> None:
        for go in self.go:
            go.set()
        self.listener.close()
        self.thread.join(10)


def exchange_call(seconds: float = 5.0):
    import time

    from imagegen.backends.base import GenerationContext
    from imagegen.backends.openai import VENDOR
    from imagegen.backends.vendor import CallContext
    from imagegen.outbound import HttpExchange, new_session

    return (HttpExchange(new_session(), timeout_seconds=seconds, deadline_seconds=seconds),
            CallContext(VENDOR, "openai", "gpt-image-2", None), GenerationContext(deadline=time.monotonic() + seconds))


def test_events_are_handed_on_as_they_arrive() -> None:
    import threading

    first, second = b'event: one\ndata: {"a": 1}\n\n', b': keep-alive\n\nevent: two\r\ndata: x\r\ndata: y\r\n\r\n'
    peer = EventPeer([first[:7], first[7:] + second[:9], second[9:]])
    exchange, call, context = exchange_call()
    seen, arrived = [], threading.Event()

    def on_event(event) -> None:
        seen.append((event.name, event.data))
        arrived.set()
        if len(seen) == 1:
            peer.go[2].set()  # the rest is sent only once the first event was handed on

    peer.go[0].set()
    peer.go[1].set()
    try:
        answer = exchange.send("POST", peer.url + "/v1/images/generations", call, context, json={}, on_event=on_event)
    finally:
        peer.close()
    assert seen == [("one", b'{"a": 1}'), ("two", b"x\ny")] and answer.body == b""


def test_an_event_stream_is_capped_in_size() -> None:
    from imagegen.errors import UpstreamError

    peer = EventPeer([b"data: " + b"x" * 5000 + b"\n\n"] * 3)
    for go in peer.go:
        go.set()
    exchange, call, context = exchange_call()
    try:
        with pytest.raises(UpstreamError) as raised:
            exchange.send("POST", peer.url + "/", call, context, json={}, on_event=lambda event: None, events_limit=12000)
    finally:
        peer.close()
    assert raised.value.code == "upstream_bad_response"


def test_an_event_stream_ends_by_its_deadline() -> None:
    import time

    from imagegen.errors import UpstreamTimeout

    peer = EventPeer([b"data: {}\n\n", b"data: {}\n\n"])  # the second never comes
    peer.go[0].set()
    exchange, call, context = exchange_call(1.5)
    started = time.monotonic()
    try:
        with pytest.raises(UpstreamTimeout):
            exchange.send("POST", peer.url + "/", call, context, json={}, on_event=lambda event: None)
    finally:
        peer.close()
    assert time.monotonic() - started < 2.5


# --- the JSON API's stream: `partial` events ------------------------------------------------------


def test_the_json_api_stream_sends_partial_events_when_asked(tmp_path: Path) -> None:
    import json

    process = start_function(
        {"BACKENDS": "demo", "DEMO_STEP_SECONDS": "0.01", "IMAGE_DIR": str(tmp_path / "images")}, tmp_path / "function.log"
    )
    try:
        ask = {"prompt": "a fox", "width": 256, "height": 256, "partialImages": 2}
        streamed = requests.post(process.url, json=ask, headers={"Accept": "text/event-stream"}, timeout=30)
        plain = requests.post(process.url, json=ask, timeout=30)
        without = requests.post(process.url, json={**ask, "partialImages": None}, headers={"Accept": "text/event-stream"}, timeout=30)
    finally:
        process.stop()
    events = [
        (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
        for block in streamed.text.strip().split("\n\n")
        if block.startswith("event: ")
    ]
    partials = [data for name, data in events if name == "partial"]
    assert [data["index"] for data in partials] == [0, 1]
    for data in partials:
        assert decoded(data["imageUrl"].removeprefix("data:image/png;base64,")).size == (256, 256)
    assert [name for name, _ in events][-1] == "result"
    assert plain.status_code == 200 and plain.json()["success"] is True
    assert "event: partial" not in without.text and "event: result" in without.text
