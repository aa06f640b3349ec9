"""Waiting for an image slot is this instance's queue, not the vendor being slow (issue #21).

In a burst, answers arrive faster than one worker checks and stores them: a request whose
answer has begun to arrive can wait for a slot longer than TIMEOUT_SECONDS. That wait must
not time out the try (the image is made and paid for; a timeout throws it away, fails over to a
second paid call and counts against the route's circuit); the request's deadline still bounds it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imagegen.backends.base import GenerationContext
from imagegen.backends.openai import VENDOR
from imagegen.backends.vendor import CallContext
from imagegen.errors import ServerBusy
from imagegen.outbound import HttpExchange, new_session
from tests.fake_router import make_png

PNG = make_png(256, 256)
TRY_SECONDS = 0.5
SLACK = 1.0


class QueuedSlot:
    """An image slot that other requests hold for `busy` seconds (the queue's pace, not a race:
    twice the try's timeout)."""

    def __init__(self, busy: float) -> None:
        self.busy = busy
        self.taken = False

    def take(self, timeout: float) -> bool:
        threading.Event().wait(min(self.busy, timeout))
        self.taken = self.busy <= timeout
        return self.taken

    def release(self) -> None:
        self.taken = False


@pytest.fixture
def vendor() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/images"
    finally:
        server.shutdown()
        server.server_close()


def call() -> CallContext:
    return CallContext(VENDOR, "openai", "gpt-image-1", None)


def test_a_wait_for_an_image_slot_longer_than_the_try_does_not_time_it_out(vendor):
    exchange = HttpExchange(new_session(), timeout_seconds=TRY_SECONDS, deadline_seconds=30)
    slot = QueuedSlot(busy=2 * TRY_SECONDS)
    context = GenerationContext(deadline=time.monotonic() + 30, slot=slot)  # type: ignore[arg-type]
    answer = exchange.send("POST", vendor, call(), context, json={})
    assert slot.taken and answer.body == PNG


def test_nor_past_the_dispatchers_shorter_limit_for_the_try(vendor):
    exchange = HttpExchange(new_session(), timeout_seconds=30, deadline_seconds=30)
    slot = QueuedSlot(busy=2 * TRY_SECONDS)
    request = GenerationContext(deadline=time.monotonic() + 30, slot=slot)  # type: ignore[arg-type]
    # What the dispatcher's adaptive cut passes a backend: a try of TRY_SECONDS.
    try_context = replace(request, deadline=time.monotonic() + TRY_SECONDS, request_deadline=request.deadline)
    answer = exchange.send("POST", vendor, call(), try_context, json={})
    assert slot.taken and answer.body == PNG


def test_the_request_deadline_still_bounds_the_wait(vendor):
    exchange = HttpExchange(new_session(), timeout_seconds=30, deadline_seconds=TRY_SECONDS)
    slot = QueuedSlot(busy=30)
    context = GenerationContext(deadline=time.monotonic() + TRY_SECONDS, slot=slot)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(ServerBusy):
        exchange.send("POST", vendor, call(), context, json={})
    assert time.monotonic() - started < TRY_SECONDS + SLACK
