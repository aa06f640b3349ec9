"""Slow and hostile clients against the real function under functions-framework (issue #19, 1).

Each hostile kind takes every thread (THREADS) twice over; a normal request must still be
answered within a second of how long it takes alone. The limits are set long (30 s) where
the point is that a stalled client costs no thread, and short where the point is that a
limit is absolute (it does not restart with every byte).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image

from tests.fake_openai import FakeOpenAI
from tests.servers import Process, wait_until
from tests.standin import Reply

THREADS = 4
HOSTILE = 2 * THREADS
KEY = "sk-test-slow-clients-0123456789"
PATH = "/api/generate-image"


def noisy_png(side: int = 1024) -> bytes:
    """About 3 MB of PNG that does not compress: an answer no socket buffer holds."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


@pytest.fixture
def openai() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(KEY) as server:
        yield server


@pytest.fixture
def start(run_function, openai, tmp_path) -> Callable[..., Process]:
    def run(**env: str) -> Process:
        settings = {
            "BACKENDS": "openai",
            "OPENAI_API_KEY": KEY,
            "OPENAI_BASE_URL": openai.base_url,
            "IMAGE_DIR": str(tmp_path / "images"),
            "THREADS": str(THREADS),
            "RATE_LIMIT_PER_MINUTE": "100000",
            "RATE_LIMIT_BURST": "1000",
            "REQUEST_HEAD_TIMEOUT_SECONDS": "30",
            "REQUEST_BODY_TIMEOUT_SECONDS": "30",
            "RESPONSE_WRITE_TIMEOUT_SECONDS": "30",
        }
        return run_function(**{**settings, **env})

    return run


def address(function: Process) -> tuple[str, int]:
    parts = urlsplit(function.url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def request_bytes(prompt: str, extra_headers: str = "") -> bytes:
    body = json.dumps({"prompt": prompt}).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra_headers}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def normal_request_seconds(function: Process, prompt: str) -> float:
    started = time.monotonic()
    try:
        answer = requests.post(function.url + PATH, json={"prompt": prompt}, timeout=10)
    except requests.Timeout:
        return float("inf")
    assert answer.status_code == 200, answer.text[:300]
    return time.monotonic() - started


def connect(function: Process, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(10)
    sock.connect(address(function))
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def exchange(function: Process, data: bytes, half_close: bool = False) -> tuple[int, dict[str, str], bytes]:
    with connect(function) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_answer(sock)


class Trickle:
    """Sends one byte to each socket every `interval` seconds until stopped: each read the
    server makes gets a byte, so a per-read timeout never fires."""

    def __init__(self, socks: list[socket.socket], data: bytes, interval: float = 0.5) -> None:
        self.socks, self.data, self.interval = socks, data, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for offset in range(len(self.data)):
            for sock in self.socks:
                try:
                    sock.send(self.data[offset : offset + 1])
                except OSError:
                    pass
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> Trickle:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


# --- every thread taken by hostile connections; a normal request goes through -------------------


@pytest.mark.parametrize("kind", ["head", "body"])
def test_trickled_requests_do_not_delay_a_normal_one(start, kind):
    function = start()
    alone = normal_request_seconds(function, "alone")
    whole = request_bytes("hostile", extra_headers="X-Pad: " + "p" * 200 + "\r\n")
    head, _, body = whole.partition(b"\r\n\r\n")
    socks = [connect(function) for _ in range(HOSTILE)]
    try:
        if kind == "head":
            sent, trickled = b"P", head[1:]
        else:
            sent, trickled = head + b"\r\n\r\n" + body[:1], body[1:]
        for sock in socks:
            sock.sendall(sent)
        with Trickle(socks, trickled):
            took = normal_request_seconds(function, "normal")
    finally:
        close_all(socks)
    assert took < alone + 1, (alone, took)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_clients_that_never_read_a_large_answer_do_not_delay_a_normal_one(start, openai, stream):
    function = start()
    alone = normal_request_seconds(function, "alone")
    image = base64.b64encode(noisy_png()).decode()
    big = {"created": 1, "background": "opaque", "data": [{"b64_json": image}], "output_format": "png",
           "quality": "low", "size": "1024x1024",
           "usage": {"input_tokens": 1, "input_tokens_details": {"image_tokens": 0, "text_tokens": 1},
                     "output_tokens": 1, "total_tokens": 2}}
    openai.reply(*[Reply(200, big) for _ in range(HOSTILE)])
    before = len(openai.calls())
    accept = "Accept: text/event-stream\r\n" if stream else ""
    socks = [connect(function, receive_buffer=4096) for _ in range(HOSTILE)]
    try:
        for number, sock in enumerate(socks):
            sock.sendall(request_bytes(f"hostile {number}", extra_headers=accept))
        # Every hostile request has had its image: from here its answer waits on its client.
        wait_until(lambda: len(openai.calls()) - before >= HOSTILE, 30, "the hostile generations")
        took = normal_request_seconds(function, "normal")
    finally:
        close_all(socks)
    assert took < alone + 1, (alone, took)


# --- absolute limits ----------------------------------------------------------------------------


def test_a_trickled_head_is_cut_at_an_absolute_limit(start):
    function = start(REQUEST_HEAD_TIMEOUT_SECONDS="2")
    sock = connect(function)
    head = request_bytes("slow")
    try:
        sock.sendall(head[:1])
        started = time.monotonic()
        with Trickle([sock], head[1:40], interval=0.3):
            status, headers, body = read_answer(sock)
        took = time.monotonic() - started
    finally:
        sock.close()
    # The head's 2 s, plus the worker's once-a-second sweep and a loaded machine.
    assert took < 5, took
    assert status == 408 and headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == "request_timeout"


def test_a_trickled_body_is_cut_at_an_absolute_limit(start):
    function = start(REQUEST_BODY_TIMEOUT_SECONDS="2")
    sock = connect(function)
    whole = request_bytes("slow")
    head, _, body = whole.partition(b"\r\n\r\n")
    try:
        sock.sendall(head + b"\r\n\r\n")
        started = time.monotonic()
        with Trickle([sock], body, interval=0.3):
            status, _, answer = read_answer(sock)
        took = time.monotonic() - started
    finally:
        sock.close()
    assert took < 5, took
    assert status == 408 and json.loads(answer)["code"] == "request_timeout"


def test_an_unread_answer_is_abandoned_at_its_write_limit(start, openai):
    function = start(RESPONSE_WRITE_TIMEOUT_SECONDS="2", GUNICORN_LOG_LEVEL="info")
    image = base64.b64encode(noisy_png()).decode()
    openai.reply(Reply(200, {"created": 1, "data": [{"b64_json": image}], "output_format": "png", "size": "1024x1024"}))
    sock = connect(function, receive_buffer=4096)
    try:
        sock.sendall(request_bytes("unread"))
        started = time.monotonic()
        wait_until(lambda: "left answer bytes untaken" in function.log(), 10, "the server to give up on the answer")
        took = time.monotonic() - started
        received = 0
        try:
            while chunk := sock.recv(65536):
                received += len(chunk)
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert took < 6, took  # the generation, the 2 s limit, the once-a-second sweep
    assert received < len(image), received  # cut off: the rest was dropped


# --- framing refused at once, in JSON -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n".encode(), 413, "payload_too_large"),
        (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffff\r\n".encode(), 413, "payload_too_large"),
        (f"POST {PATH} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n".encode(), 501, "unsupported_transfer_coding"),
        (b"GET /" + b"a" * (8 * 1024 * 1024) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
        (f"GET {PATH} HTTP/1.1\r\nHost: x\r\n".encode() + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n", 431, "headers_too_large"),
    ],
    ids=["content-length", "chunk-size", "xchunked", "request-line", "headers"],
)
def test_framing_beyond_the_limits_is_refused_at_once_in_json(start, data, status, code):
    function = start()
    started = time.monotonic()
    with connect(function) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before all of it was sent: the answer is already there
        answer = read_answer(sock)
    took = time.monotonic() - started
    assert answer[0] == status and answer[1]["content-type"] == "application/json", answer
    assert json.loads(answer[2])["code"] == code
    assert took < 3, took
    assert len(function.log()) < 100_000  # no 8 MiB path in the log


def test_a_body_shorter_than_its_content_length_is_invalid(start):
    function = start()
    data = f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{}}"
    status, headers, body = exchange(function, data.encode(), half_close=True)
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == "invalid_body"


def test_keep_alive_pipelining_and_expect_continue_still_work(start):
    function = start()
    with connect(function) as sock:
        sock.sendall(request_bytes("one") + request_bytes("two", extra_headers="Connection: close\r\n"))
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.count(b"HTTP/1.1 200 OK") == 2
    with requests.Session() as session:
        for number in range(3):
            answer = session.post(function.url + PATH, json={"prompt": f"kept {number}"}, timeout=10)
            assert answer.status_code == 200
    with connect(function) as sock:
        data = request_bytes("continue", extra_headers="Expect: 100-continue\r\nConnection: close\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        sock.sendall(head + b"\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        status, _, _ = read_answer(sock)
    assert status == 200
