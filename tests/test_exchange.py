"""The HTTP exchange every backend sends through, over a real loopback connection (the
stand-in router): bodies read whole and in order, and bodies that break or stall half-way."""

import io
import random
import threading

import pytest
from PIL import Image

from imagegen.domain import GenerationRequest
from imagegen.errors import UpstreamTimeout
from tests.clients import HuggingFaceClient, generate_error
from tests.conftest import HF_MODEL as MODEL
from tests.fake_router import Reply, make_png


@pytest.fixture
def live_client(make_settings, router):
    def make(**env: str) -> HuggingFaceClient:
        return HuggingFaceClient(make_settings(HF_ROUTER_URL=router.url, MAX_RETRIES="0", **env))

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
