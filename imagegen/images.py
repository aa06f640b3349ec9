"""Checking that upstream bytes are an image, and making sure what we keep is a PNG.

A PNG is checked without re-encoding it: its chunks are walked (lengths, CRCs, IHDR first,
IDAT consecutive, IEND last), IHDR's size is bounded (`MAX_IMAGE_PIXELS`), and the image data
is inflated piece by piece, never held whole, to check it is a complete zlib stream of exactly
the size IHDR implies. That catches truncated downloads, flipped bytes, non-PNG bodies and a
header that lies about the size, where Pillow's verify() checks only CRCs and re-encoding costs
hundreds of milliseconds. It is not free: about 8 ms for the bench's 1024x1024 RGB PNG on the
2-core development VM with ISA-L's inflate (17 ms with zlib's), nearly all of it inflating
3 MB (the CRCs take under 1 ms). Row filter bytes are not checked. Pillow only converts the JPEG or
WebP answers some providers give, and reads their size before decoding them.
"""

from __future__ import annotations

import io
import struct
import zlib

from isal import isal_zlib as _inflate

# Inflating a 1024x1024 PNG to check it is most of what this function adds to a request:
# Intel's ISA-L (python-isal, `_inflate`) does it in under half zlib's time (7.8 ms against
# 17.3 ms for the bench's 1.7 MB PNG on these machines), with the same results.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class NotAnImage(ValueError):
    """The bytes are not an image Pillow can read; the message says what they look like."""


def sniff_image_type(data: bytes) -> str | None:
    """The image format from its magic bytes ('png', 'jpeg', 'webp', 'gif'), or None."""
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


def describe_non_image(data: bytes) -> str:
    """A short, safe description of bytes that are not an image, for an error message."""
    head = data[:200].lstrip().lower()
    if not data:
        return "an empty body"
    if head.startswith((b"<!doctype html", b"<html")):
        return "an HTML page"
    if head.startswith((b"{", b"[")):
        return "JSON"
    return f"{len(data)} bytes that are not an image"


def check_png(data: bytes) -> None:
    """Raise `NotAnImage` unless `data` is a sound PNG of at most `MAX_IMAGE_PIXELS` pixels."""
    view = memoryview(data)
    offset = len(PNG_SIGNATURE)
    image_data: _ImageData | None = None
    previous = b""
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        end = offset + 12 + length
        if end > len(data):
            raise NotAnImage(f"a truncated PNG ({len(data)} bytes, a {kind!r} chunk runs past the end)")
        if image_data is None and (kind != b"IHDR" or length != 13):
            raise NotAnImage("a PNG without a valid IHDR header")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[offset + 4 : end - 4]) != crc:
            raise NotAnImage(f"a corrupt PNG (the {_name(kind)} chunk at byte {offset} fails its CRC)")
        if image_data is None:
            image_data = _ImageData(*struct.unpack_from(">IIBBBBB", data, offset + 8))
        elif kind == b"IDAT":
            if previous != b"IDAT" and image_data.started:
                raise NotAnImage("a corrupt PNG (its IDAT chunks are not consecutive)")
            image_data.feed(view[offset + 8 : end - 4])
        elif kind == b"IEND":
            image_data.finish()
            return
        previous = kind
        offset = end
    raise NotAnImage(f"a truncated PNG ({len(data)} bytes, no IEND chunk)")


# The largest image accepted from upstream: 32 megapixels, about twice the largest any
# supported provider makes (Gemini's "4K" at 21:9 is 6336x2688, 17 Mpx; OpenAI's largest is
# 3840x2160). It bounds the time spent inflating a PNG (a 1x1-pixel-per-byte bomb cannot make
# us inflate more than 32 Mpx x 8 bytes), and what Pillow may decode from a JPEG or WebP.
MAX_IMAGE_PIXELS = 32 * 1024 * 1024
# Inflated image data is looked at in pieces of at most this size, then dropped.
_INFLATE_PIECE_BYTES = 256 * 1024
# Bits per pixel per sample, by colour type: grey, RGB, palette, grey+alpha, RGBA.
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


class _ImageData:
    """The zlib stream of a PNG's IDAT chunks, checked against the size IHDR implies."""

    def __init__(self, width: int, height: int, depth: int, color: int, compression: int, filtering: int, interlace: int):
        if not (width and height):
            raise NotAnImage("a PNG without a valid IHDR header")
        if depth not in _BIT_DEPTHS.get(color, ()) or compression or filtering or interlace > 1:
            raise NotAnImage(f"a PNG with an invalid IHDR header (bit depth {depth}, colour type {color})")
        if width * height > MAX_IMAGE_PIXELS:
            raise NotAnImage(
                f"a PNG of {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS // 2**20} megapixels accepted"
            )
        self.expected = _inflated_size(width, height, _CHANNELS[color] * depth, interlace == 1)
        self.remaining = self.expected
        self.started = False
        self._inflater = _inflate.decompressobj()

    def feed(self, compressed: memoryview) -> None:
        self.started = True
        pending: bytes | memoryview = compressed
        try:
            while not self._inflater.eof:
                # One byte more than is left: a stream that inflates past the size is caught
                # without ever producing more than a piece.
                piece = self._inflater.decompress(pending, min(self.remaining + 1, _INFLATE_PIECE_BYTES))
                self.remaining -= len(piece)
                if self.remaining < 0:
                    raise NotAnImage("a corrupt PNG (its image data is larger than its header says)")
                pending = self._inflater.unconsumed_tail
                # ISA-L may hold inflated bytes back after taking all the input: ask again with
                # no input until nothing more comes (zlib keeps the input in unconsumed_tail).
                if not pending and not piece:
                    break
        except _inflate.error:
            raise NotAnImage("a corrupt PNG (its image data does not inflate)") from None

    def finish(self) -> None:
        if not self.started:
            raise NotAnImage("a PNG without image data")
        if not self._inflater.eof or self.remaining:
            raise NotAnImage(
                f"a corrupt PNG (its image data inflates to {self.expected - self.remaining} bytes,"
                f" its header says {self.expected})"
            )


def _inflated_size(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes of filtered scanlines: each row is one filter byte and its packed pixels."""
    if not interlaced:
        return height * (1 + (width * bits_per_pixel + 7) // 8)
    size = 0
    for x0, y0, dx, dy in _ADAM7:
        columns = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        if columns and rows:  # an empty pass has no rows at all, not even filter bytes
            size += rows * (1 + (columns * bits_per_pixel + 7) // 8)
    return size


def _name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else repr(kind)


def ensure_png(data: bytes) -> bytes:
    """Return PNG bytes for any readable image; a PNG is checked, never re-encoded."""
    kind = sniff_image_type(data)
    if kind is None:
        raise NotAnImage(describe_non_image(data))
    if kind == "png":
        check_png(data)
        return data
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            # The header's size is known before any pixel is decoded: a 30000x30000 JPEG of a
            # few kilobytes would otherwise take gigabytes to decode.
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise NotAnImage(
                    f"a {kind.upper()} of {width}x{height} pixels, more than the"
                    f" {MAX_IMAGE_PIXELS // 2**20} megapixels accepted"
                )
            image.load()
            converted = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    except NotAnImage:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, checked when it opens the file
        raise NotAnImage(f"a {kind.upper()} larger than the {MAX_IMAGE_PIXELS // 2**20} megapixels accepted") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise NotAnImage(f"a {kind.upper()} that cannot be decoded ({error})") from None
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue()
