"""The PNG check refuses what no decoder can show (row filter types past 4, a second IHDR or
PLTE, an unknown critical chunk) and keeps only what we may keep: no upstream text chunk, nothing
after IEND."""

import io
import struct
import zlib

import pytest
from PIL import Image

from imagegen.images import NotAnImage, check_png, ensure_png
from imagegen.imaging import walk_chunks
from tests.standin import make_image

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def ihdr(width: int, height: int, color: int = 2, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, interlace))


def png_from_rows(width: int, height: int, rows: list[bytes], *, color: int = 2, interlace: int = 0, extra: bytes = b"") -> bytes:
    """A PNG whose inflated image data is exactly `rows` (each a filter byte and its pixels)."""
    body = zlib.compress(b"".join(rows))
    return SIGNATURE + ihdr(width, height, color, interlace) + extra + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def plain_rows(width: int, height: int, filter_type: int = 0, channels: int = 3) -> list[bytes]:
    return [bytes([filter_type]) + bytes(width * channels) for _ in range(height)]


# An 8x8 RGB image interlaced with Adam7: (columns, rows) of its seven passes, worked out by hand.
ADAM7_8x8 = [(1, 1), (1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 4)]


def adam7_rows(bad_pass: int | None = None, filter_type: int = 5) -> list[bytes]:
    rows = []
    for number, (columns, count) in enumerate(ADAM7_8x8, start=1):
        for row in range(count):
            kind = filter_type if number == bad_pass and row == count - 1 else (row % 5)
            rows.append(bytes([kind]) + bytes(3 * columns))
    return rows


def test_a_hand_made_png_is_sound_and_decodes():
    # The builders make PNGs Pillow shows: so what the check refuses below is refused for its flaw.
    for png in (png_from_rows(16, 4, plain_rows(16, 4, 4)), png_from_rows(8, 8, adam7_rows(), interlace=1)):
        assert check_png(png) is png
        with Image.open(io.BytesIO(png)) as image:
            image.load()


def test_a_filter_type_of_5_on_every_row_is_refused():
    with pytest.raises(NotAnImage, match="filter type 5"):
        check_png(png_from_rows(16, 4, plain_rows(16, 4, 5)))


def test_one_bad_row_deep_in_a_large_image_is_found():
    # 2048 rows of 6 KB: the bad row is far past the first inflated piece (256 KB).
    rows = plain_rows(2048, 2048)
    rows[1999] = b"\x07" + rows[1999][1:]
    with pytest.raises(NotAnImage, match="filter type 7"):
        check_png(png_from_rows(2048, 2048, rows))


@pytest.mark.parametrize("bad_pass", range(1, 8))
def test_a_bad_row_in_any_adam7_pass_is_found(bad_pass):
    with pytest.raises(NotAnImage, match="filter type 5"):
        check_png(png_from_rows(8, 8, adam7_rows(bad_pass), interlace=1))


def test_pixel_bytes_above_4_are_not_taken_for_filter_bytes():
    rows = [b"\x01" + bytes([200]) * 3 * 16 for _ in range(16)]
    assert check_png(png_from_rows(16, 16, rows))


@pytest.mark.parametrize(
    "extra, words",
    [
        (ihdr(16, 4), "unexpected IHDR"),
        (chunk(b"PLTE", bytes(6)) + chunk(b"PLTE", bytes(6)), "PLTE"),
        (chunk(b"ABCD", b"x"), "unexpected ABCD"),
    ],
)
def test_repeated_or_unknown_critical_chunks_are_refused(extra, words):
    with pytest.raises(NotAnImage, match=words):
        check_png(png_from_rows(16, 4, plain_rows(16, 4), extra=extra))


def test_a_palette_after_the_image_data_is_refused():
    png = png_from_rows(16, 4, plain_rows(16, 4))
    iend = png.rindex(b"IEND") - 4
    with pytest.raises(NotAnImage, match="PLTE"):
        check_png(png[:iend] + chunk(b"PLTE", bytes(6)) + png[iend:])


def test_a_palette_image_needs_its_palette():
    rows = plain_rows(16, 4, channels=1)
    with pytest.raises(NotAnImage, match="without a PLTE"):
        check_png(png_from_rows(16, 4, rows, color=3))
    assert check_png(png_from_rows(16, 4, rows, color=3, extra=chunk(b"PLTE", bytes(6))))


def test_html_after_iend_is_dropped():
    png = make_image(64, 64)
    kept = ensure_png(png + b"<html>" + b"x" * 200_000 + b"</html>")
    assert kept == png


def test_upstream_text_chunks_are_dropped_and_the_rest_kept():
    png = make_image(64, 64)
    ihdr_end = 8 + 25
    texts = (
        chunk(b"tEXt", b"provider\0evil")
        + chunk(b"zTXt", b"seed\0\0" + zlib.compress(b"1"))
        + chunk(b"iTXt", b"model\0\0\0\0\0x")
    )
    kept = ensure_png(png[:ihdr_end] + texts + chunk(b"gAMA", struct.pack(">I", 45455)) + png[ihdr_end:])
    assert [c.kind for c in walk_chunks(kept)].count(b"gAMA") == 1
    assert not {b"tEXt", b"zTXt", b"iTXt"} & {c.kind for c in walk_chunks(kept)}
    assert kept.replace(chunk(b"gAMA", struct.pack(">I", 45455)), b"") == png


def test_an_upstream_provider_text_chunk_never_reaches_the_stored_file(tmp_path):
    # #19 item 6: a cache hit reads "provider" back from the stored file, so an upstream's own
    # tEXt provider chunk would have become the answer's provider.
    from imagegen.domain import GeneratedImage, GenerationRequest, Route
    from imagegen.png_info import embed_parameters, png_text
    from imagegen.storage import ImageMetadata, LocalImageStore

    png = make_image(64, 64)
    upstream = png[:33] + chunk(b"tEXt", b"provider\0evil-provider") + png[33:] + b"<html>tail</html>"
    image = GeneratedImage(png=ensure_png(upstream), route=Route("openai", "gpt-image-1"), seed=None)
    parts = embed_parameters(image, GenerationRequest(prompt="a fox"))
    store = LocalImageStore(tmp_path, max_files=10)
    store.save(parts, "fox", ImageMetadata(model="gpt-image-1", prompt="a fox", seed=None))
    (path,) = [p for p in tmp_path.rglob("*") if p.is_file()]
    stored = path.read_bytes()
    assert b"evil-provider" not in stored and b"<html>" not in stored
    assert png_text(stored, "provider") is None and png_text(stored, "backend") == "openai"
    assert check_png(stored) is not None  # what we store is itself a sound PNG

