"""The PNG check walks chunks and CRCs; other formats become PNG through Pillow."""

import io
import struct
import zlib

import pytest
import responses
from PIL import Image

from imagegen.cache import cache_key
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.images import MAX_IMAGE_PIXELS, NotAnImage, _row_layout, check_png, ensure_png


def _inflated_size(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    layout = _row_layout(width, height, bits_per_pixel, interlaced)
    return layout[-1][1] if layout else 0
from imagegen.png_info import embed_parameters
from tests.conftest import HF_MODEL as MODEL, HF_URL as URL
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


# --- 5. a corrupt upstream PNG is refused ------------------------------------------------------

def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, offset = [], 8
    while offset < len(png):
        length, kind = struct.unpack_from(">I4s", png, offset)
        out.append((kind, png[offset + 8 : offset + 8 + length]))
        offset += 12 + length
    return out


def build(parts: list[tuple[bytes, bytes]]) -> bytes:
    return SIGNATURE + b"".join(chunk(kind, data) for kind, data in parts)


def raw_png(width, height, depth=8, color=2, interlace=0, data: bytes | None = None, palette=False) -> bytes:
    """A PNG written by hand: all-zero scanlines (filter 0) of exactly the size IHDR implies."""
    bits = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color] * depth
    size = _inflated_size(width, height, bits, bool(interlace))
    parts = [(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace))]
    if color == 3:
        parts.append((b"PLTE", b"\x00\x00\x00" * (1 << depth)))
    parts += [(b"IDAT", zlib.compress(b"\x00" * size if data is None else data)), (b"IEND", b"")]
    return build(parts)


def pillow_reads(png: bytes) -> bool:
    with Image.open(io.BytesIO(png)) as image:
        image.load()
    return True


@pytest.mark.parametrize("width, height", [(1, 1), (3, 5), (8, 8), (9, 9), (33, 17), (5, 1), (1, 7), (64, 3)])
@pytest.mark.parametrize("depth, color", [(8, 2), (16, 6), (1, 0), (4, 3), (8, 4), (2, 0)])
@pytest.mark.parametrize("interlace", [0, 1])
def test_the_inflated_size_matches_what_pillow_decodes(width, height, depth, color, interlace):
    png = raw_png(width, height, depth, color, interlace)
    assert pillow_reads(png)
    check_png(png)


def test_a_real_png_from_pillow_passes():
    out = io.BytesIO()
    Image.effect_noise((300, 200), 40).convert("RGB").save(out, format="PNG", compress_level=1)
    check_png(out.getvalue())
    out = io.BytesIO()
    Image.new("P", (37, 11)).save(out, format="PNG", optimize=True)  # split IDATs, palette
    check_png(out.getvalue())


def flip(png: bytes, kind: bytes, at: int) -> bytes:
    """Flip one byte inside the first `kind` chunk's data; its CRC is left as it was."""
    offset = png.index(kind) + 4 + at
    return png[:offset] + bytes([png[offset] ^ 0xFF]) + png[offset + 1 :]


def test_a_flipped_image_data_byte_fails_the_crc():
    with pytest.raises(NotAnImage, match="IDAT chunk .* fails its CRC"):
        check_png(flip(make_png(64, 64), b"IDAT", 40))


def test_a_flipped_header_byte_fails_the_crc():
    with pytest.raises(NotAnImage, match="IHDR chunk .* fails its CRC"):
        check_png(flip(make_png(64, 64), b"IHDR", 2))


def recrc(png: bytes, kind: bytes, change) -> bytes:
    return build([(k, change(d) if k == kind else d) for k, d in chunks(png)])


def test_image_data_that_does_not_inflate_is_refused_even_with_good_crcs():
    broken = recrc(make_png(64, 64), b"IDAT", lambda d: d[:20] + bytes(b ^ 0x55 for b in d[20:40]) + d[40:])
    with pytest.raises(NotAnImage, match="corrupt PNG"):
        check_png(broken)
    with pytest.raises(Exception):
        pillow_reads(broken)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"\x00" * (64 * (1 + 64 * 3) - 1), "inflates to 12351 bytes, its header says 12352"),  # one byte short
        (b"\x00" * (64 * (1 + 64 * 3) + 1), "larger than its header says"),
        (b"", "inflates to 0 bytes"),
    ],
)
def test_image_data_of_the_wrong_size_is_refused(data, words):
    with pytest.raises(NotAnImage, match=words):
        check_png(raw_png(64, 64, data=data))


def test_a_truncated_zlib_stream_is_refused():
    png = raw_png(64, 64)
    broken = recrc(png, b"IDAT", lambda d: d[:-6])
    with pytest.raises(NotAnImage, match="corrupt PNG"):
        check_png(broken)


def test_an_ihdr_claiming_60000_by_60000_is_refused_before_inflating():
    small = raw_png(64, 64)
    huge = recrc(small, b"IHDR", lambda d: struct.pack(">II", 60000, 60000) + d[8:])
    with pytest.raises(NotAnImage, match="60000x60000 pixels, more than the 32 megapixels"):
        check_png(huge)
    assert MAX_IMAGE_PIXELS == 32 * 1024 * 1024


def test_a_deflate_bomb_is_stopped_at_the_size_the_header_says():
    # 1 MB of zeros per 1 KB: the header says 64x64, the stream would inflate to 100 MB.
    bomb = raw_png(64, 64, data=b"\x00" * 100_000_000)
    with pytest.raises(NotAnImage, match="larger than its header says"):
        check_png(bomb)


@pytest.mark.parametrize(
    "ihdr",
    [
        struct.pack(">IIBBBBB", 8, 8, 3, 2, 0, 0, 0),  # bit depth 3
        struct.pack(">IIBBBBB", 8, 8, 8, 5, 0, 0, 0),  # colour type 5
        struct.pack(">IIBBBBB", 8, 8, 16, 3, 0, 0, 0),  # 16-bit palette
        struct.pack(">IIBBBBB", 8, 8, 8, 2, 1, 0, 0),  # compression method 1
        struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 2),  # interlace method 2
    ],
)
def test_an_impossible_header_is_refused(ihdr):
    with pytest.raises(NotAnImage, match="IHDR"):
        check_png(build([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\x00" * 1000)), (b"IEND", b"")]))


def test_image_data_chunks_must_be_consecutive():
    png = raw_png(64, 64)
    data = [d for k, d in chunks(png) if k == b"IDAT"][0]
    split = build([chunks(png)[0], (b"IDAT", data[:10]), (b"tEXt", b"a\x00b"), (b"IDAT", data[10:]), (b"IEND", b"")])
    with pytest.raises(NotAnImage, match="not consecutive"):
        check_png(split)


# --- 6. an upstream JPEG claiming a huge size --------------------------------------------------


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF0 header says width x height: a few KB that would decode to GBs."""
    out = io.BytesIO()
    Image.new("RGB", (16, 16), "teal").save(out, format="JPEG")
    data = bytearray(out.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


@pytest.mark.parametrize("side", [30000, 9000])  # past Pillow's own bomb limit, and past ours only
def test_a_jpeg_claiming_a_huge_size_is_not_an_image(side):
    with pytest.raises(NotAnImage, match="JPEG .*32 megapixels accepted"):
        ensure_png(jpeg_claiming(side, side))


def test_pillows_own_bomb_error_is_not_an_image(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's check fires first at 2x this
    with pytest.raises(NotAnImage, match="JPEG larger than"):
        ensure_png(jpeg_claiming(300, 300))


@pytest.mark.parametrize(
    "body",
    [
        flip(make_png(64, 64), b"IDAT", 40),
        recrc(make_png(64, 64), b"IHDR", lambda d: struct.pack(">II", 60000, 60000) + d[8:]),
        jpeg_claiming(30000, 30000),
    ],
    ids=["flipped-idat", "60000x60000-ihdr", "30000x30000-jpeg"],
)
def test_a_broken_upstream_image_is_a_502_not_a_success_or_a_500(make_app, body):
    with responses.RequestsMock() as mocked:
        mocked.post(URL, body=body, content_type="image/jpeg" if body.startswith(b"\xff\xd8") else "image/png")
        answer = make_app().post("/api/generate-image", json={"prompt": "x"})
    assert answer.status_code == 502 and answer.get_json()["code"] == "upstream_bad_response"


# --- elsewhere: what runs after the upstream was paid must not raise on odd text --------------
IDENTITY = "huggingface https://router.huggingface.co 0123456789abcdef hf-inference"


def test_embedding_parameters_never_raises_on_text_utf8_cannot_hold():
    # Validation refuses such a prompt now; the embedding must not depend on that.
    generation = GenerationRequest(prompt="a \ud800 fox 東京", model=MODEL, seed=1)
    image = GeneratedImage(make_png(), Route("huggingface", MODEL, "hf-inference"), seed=1)
    png = embed_parameters(image, generation).tobytes()
    check_png(png)
    assert pillow_reads(png)
    assert cache_key(generation, IDENTITY, MODEL)  # and the cache key is computed too


def test_an_unidentifiable_image_is_refused_in_words_without_an_address():
    with pytest.raises(NotAnImage) as caught:
        ensure_png(b"\xff\xd8\xff" + bytes(3000))
    assert str(caught.value) == "a JPEG that cannot be decoded (Pillow cannot identify it)"
