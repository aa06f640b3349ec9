"""Decoding is bounded by memory before it starts: per decode (from the header) and for the
whole instance (a budget in bytes that concurrent decodes share); and what conversion makes is
bounded by the size an image may be."""

import io
import random
import threading
import time

import pytest
from PIL import Image

from imagegen import images
from imagegen.errors import ServerBusy
from imagegen.images import DecodeBudget, ImageTooLarge, NotAnImage, ensure_png


@pytest.fixture
def budget(monkeypatch):
    """The budget a 1 GiB instance gets by default (a quarter of it)."""
    chosen = DecodeBudget(256 * 2**20)
    monkeypatch.setattr(images, "_budget", chosen)
    return chosen


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def test_a_tiny_lossless_webp_of_16383x2000_is_refused_before_decoding(budget, monkeypatch):
    # #19: 1.3 KB that cost about 500 MB to decode. It is under the 32 Mpx limit.
    data = encoded(Image.new("RGB", (16383, 2000), "teal"), "WEBP", lossless=True, method=0)
    assert len(data) < 10_000
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(self))
    with pytest.raises(ImageTooLarge, match=r"16383x2000 .* MiB to decode, more than the 256 MiB"):
        ensure_png(data)
    assert not loaded and budget.in_use() == 0


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF"])
def test_images_that_fit_are_converted_and_give_their_memory_back(budget, fmt):
    png = ensure_png(encoded(Image.new("RGB", (640, 480), "navy"), fmt))
    assert png.startswith(b"\x89PNG") and budget.in_use() == 0


def test_the_estimate_follows_format_and_mode():
    def need(data):
        kind = images.sniff_image_type(data)
        with Image.open(io.BytesIO(data)) as image:
            return images.decode_memory(kind, image, data) - images._OUTPUT_ALLOWANCE

    picture = Image.new("RGB", (100, 100), "red")
    assert need(encoded(picture.convert("L"), "JPEG")) < need(encoded(picture, "JPEG"))
    assert need(encoded(picture, "JPEG")) < need(encoded(picture, "JPEG", progressive=True))
    assert need(encoded(picture, "WEBP", quality=80)) < need(encoded(picture, "WEBP", lossless=True))
    assert need(encoded(picture, "WEBP", lossless=True)) == 100 * 100 * 24


def test_a_decode_waits_for_room_then_gives_up_with_server_busy(monkeypatch):
    budget = DecodeBudget(40 * 2**20)
    monkeypatch.setattr(images, "_budget", budget)
    data = encoded(Image.new("RGB", (64, 64), "olive"), "JPEG")
    started = time.monotonic()
    with budget.hold(30 * 2**20, 0, "another image"):
        with pytest.raises(ServerBusy) as caught:
            ensure_png(data, wait_seconds=0.2)
    assert caught.value.status == 503 and caught.value.code == "server_busy"
    assert 0.2 <= time.monotonic() - started < 5


def test_a_waiting_decode_goes_ahead_when_room_is_given_back(monkeypatch):
    budget = DecodeBudget(40 * 2**20)
    monkeypatch.setattr(images, "_budget", budget)
    data = encoded(Image.new("RGB", (64, 64), "olive"), "JPEG")
    holding, release, results = threading.Event(), threading.Event(), []

    def hold_then_release():
        with budget.hold(30 * 2**20, 0, "another image"):
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold_then_release)
    holder.start()
    assert holding.wait(10)
    waiter = threading.Thread(target=lambda: results.append(ensure_png(data, wait_seconds=20)))
    waiter.start()
    release.set()
    holder.join(10)
    waiter.join(20)
    assert results and results[0].startswith(b"\x89PNG") and budget.in_use() == 0


def test_a_converted_png_over_the_image_limit_is_refused(monkeypatch):
    # #19: a 6.1 MB noisy JPEG became a 38.9 MB PNG. Scaled down: the limit is made small.
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 100_000)
    noise = Image.frombytes("RGB", (256, 256), random.Random(3).randbytes(256 * 256 * 3))
    data = encoded(noise, "JPEG", quality=95)
    assert len(data) < 100_000
    with pytest.raises(ImageTooLarge, match="converted PNG is too large, larger than the") as caught:
        ensure_png(data)
    assert isinstance(caught.value, NotAnImage)  # so every backend answers 502 bad answer, and fails over


def test_a_png_over_the_image_limit_is_refused(monkeypatch):
    noise = Image.frombytes("RGB", (256, 256), random.Random(4).randbytes(256 * 256 * 3))
    png = encoded(noise, "PNG")
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", len(png) - 1)
    with pytest.raises(ImageTooLarge, match="larger than the"):
        ensure_png(png)


def test_the_default_budget_is_a_quarter_of_the_instance_memory(monkeypatch):
    monkeypatch.setattr(images, "instance_memory_bytes", lambda: 2**30)
    assert images.default_decode_budget().total == 256 * 2**20
    configured = images.configure_decoding(None, 100 * 2**20)
    try:
        assert (configured.total, configured.per_decode) == (256 * 2**20, 100 * 2**20)
    finally:
        monkeypatch.setattr(images, "_budget", None)
