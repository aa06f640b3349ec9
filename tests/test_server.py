"""The server around the handler: functions-framework's own answers, and the real
gunicorn process over raw sockets (chunked bodies, request heads that stall)."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import pytest

from tests.conftest import TEST_TOKEN


# --- the real server, over raw sockets -------------------------------------------------------

def raw_exchange(url: str, request: bytes, half_close: bool = False, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send bytes as they are, read the answer to the end: (status, lower-cased headers, body)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def function(run_function, router, tmp_path):
    return run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, IMAGE_DIR=str(tmp_path / "images"), MAX_RETRIES="0"
    )


CHUNKED_HEAD = (
    b"POST /api/generate-image HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # a chunk size that is not hex
        b"3\r\nabcXX0\r\n\r\n",  # a chunk without its CRLF
        b"3;a\rb\r\nabc\r\n0\r\n\r\n",  # a bare CR in a chunk extension
        b'10\r\n{"prompt": "x"',  # the connection ends inside a chunk
    ],
    ids=["size-zz", "no-terminator", "bad-extension", "ends-early"],
)
def test_a_malformed_chunked_body_is_a_400(function, router, body):
    status, headers, answer = raw_exchange(function.url, CHUNKED_HEAD + body, half_close=True)
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(answer)["code"] == "invalid_body"
    assert not router.requests
    assert "Traceback" not in function.log()


def test_a_well_formed_chunked_body_still_works(function):
    body = json.dumps({"prompt": "a red fox"}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    status, _, answer = raw_exchange(function.url, CHUNKED_HEAD + chunked)
    assert status == 200 and json.loads(answer)["success"] is True


# --- 11. the framework's own answers are JSON ----------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "DELETE"])
@pytest.mark.parametrize("path", ["/robots.txt", "/favicon.ico"])
def test_the_frameworks_own_paths_answer_json(make_app, method, path):
    answer = make_app().open(path, method=method)
    assert answer.status_code == 404 and answer.mimetype == "application/json"
    if method != "HEAD":
        payload = answer.get_json()
        assert payload["success"] is False and payload["code"] == "not_found"
        assert payload["requestId"] == answer.headers["X-Request-Id"]


def test_a_crash_outside_the_handler_is_a_json_500_that_keeps_the_crash_marker(make_app, monkeypatch):
    import imagegen.http

    def broken_handler(*args, **kwargs):
        raise RuntimeError("a bug outside the handler's own error handling, with a secret: " + TEST_TOKEN)

    monkeypatch.setattr(imagegen.http.Handler, "__call__", broken_handler)
    answer = make_app().get("/openapi.yaml")
    assert answer.status_code == 500 and answer.mimetype == "application/json"
    assert answer.get_json()["code"] == "internal_error" and TEST_TOKEN not in answer.get_data(as_text=True)
    assert answer.headers["X-Google-Status"] == "crash"


def test_the_real_server_answers_robots_txt_as_json(function):
    status, headers, body = raw_exchange(function.url, b"GET /robots.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == "not_found"


# --- 12. a client that sends part of a request head and stops ----------------------------------
def test_stalled_request_heads_do_not_stop_the_instance(run_function, router, tmp_path):
    threads = 2
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN,
        HF_ROUTER_URL=router.url,
        IMAGE_DIR=str(tmp_path / "images"),
        THREADS=str(threads),
        REQUEST_HEAD_TIMEOUT_SECONDS="1",
    )
    parts = urlsplit(function.url)
    stalled = []
    try:
        for _ in range(3 * threads):  # every thread taken, three times over
            sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
            sock.sendall(b"P")  # one byte of "POST ...", then nothing
            stalled.append(sock)
        started = time.monotonic()
        status, _, _ = raw_exchange(function.url, b"OPTIONS / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=15)
        took = time.monotonic() - started
    finally:
        for sock in stalled:
            sock.close()
    assert status == 204
    # Three rounds of 1 s head timeouts, plus slack for a loaded machine: seconds, not forever.
    assert took < 8, took
    assert "Traceback" not in function.log()
