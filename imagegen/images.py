"""Checking that upstream bytes are an image, and making sure what we keep is a PNG.

A PNG is checked by walking its chunks (lengths, IHDR first, IDAT, IEND last): that catches
truncated downloads and non-PNG bodies in microseconds, without decoding pixels or importing
Pillow, which only converts the JPEG or WebP answers some providers give. Chunk CRCs are not
recomputed: TLS already guards the bytes in transit, and the CRCs cost half a millisecond per
1024x1024 image, a tenth of what this function may add to a request.
"""

from __future__ import annotations

import io
import struct

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
    """Raise `NotAnImage` unless `data` is a structurally sound PNG."""
    offset = len(PNG_SIGNATURE)
    seen_idat = False
    first = True
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        end = offset + 12 + length
        if end > len(data):
            raise NotAnImage(f"a truncated PNG ({len(data)} bytes, a {kind!r} chunk runs past the end)")
        if first:
            width, height = struct.unpack_from(">II", data, offset + 8) if kind == b"IHDR" and length == 13 else (0, 0)
            if not (width and height):
                raise NotAnImage("a PNG without a valid IHDR header")
            first = False
        seen_idat |= kind == b"IDAT"
        if kind == b"IEND":
            if not seen_idat:
                raise NotAnImage("a PNG without image data")
            return
        offset = end
    raise NotAnImage(f"a truncated PNG ({len(data)} bytes, no IEND chunk)")


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
            image.load()
            converted = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise NotAnImage(f"a {kind.upper()} that cannot be decoded ({error})") from None
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue()
