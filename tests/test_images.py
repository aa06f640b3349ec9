"""The PNG check walks chunks and CRCs; other formats become PNG through Pillow."""

import io
import struct
import zlib

import pytest
from PIL import Image

from imagegen.images import NotAnImage, check_png, ensure_png
from tests.fake_router import make_png


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_a_real_png_passes_unchanged():
    png = make_png(300, 200)
    assert ensure_png(png) is png


def test_bytes_after_iend_are_tolerated():
    check_png(make_png() + b"trailing")


@pytest.mark.parametrize(
    "data, words",
    [
        (make_png()[:-12], "no IEND"),
        (make_png()[:60], "runs past the end"),
        (SIGNATURE + chunk(b"IDAT", b"x") + chunk(b"IEND", b""), "IHDR"),
        (SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""), "IHDR"),
        (SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", 10, 10, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""), "without image data"),
        (SIGNATURE, "no IEND"),
    ],
)
def test_broken_pngs_are_refused(data, words):
    with pytest.raises(NotAnImage) as caught:
        check_png(data)
    assert words in str(caught.value)


def test_a_chunk_with_a_wrong_length_is_caught():
    png = bytearray(make_png(64, 64))
    png[33:37] = (10**6).to_bytes(4, "big")  # the first IDAT claims a megabyte
    with pytest.raises(NotAnImage, match="runs past the end"):
        check_png(bytes(png))


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "GIF"])
def test_other_formats_become_png(fmt):
    out = io.BytesIO()
    Image.new("RGB", (48, 32), "teal").save(out, format=fmt)
    png = ensure_png(out.getvalue())
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (48, 32)


@pytest.mark.parametrize("side", [512, 1024, 2048])
def test_large_sound_pngs_pass(side):
    # The inflater may hold output back once it has taken all the input (ISA-L does, for some
    # images): the check must drain it, or a sound image would be called corrupt.
    from tests.standin import make_image

    check_png(make_image(side, side, seed="large"))
