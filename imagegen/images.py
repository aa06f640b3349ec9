"""Checking that upstream bytes are an image, and making sure what we keep is a PNG.

Pillow is imported on first use, not at start-up: most answers are PNGs that only need their
chunks checked, and cold starts should not pay for the import.
"""

from __future__ import annotations

import io

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


def ensure_png(data: bytes) -> bytes:
    """Return PNG bytes for any readable image; a PNG is checked, never re-encoded."""
    kind = sniff_image_type(data)
    if kind is None:
        raise NotAnImage(describe_non_image(data))
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if kind == "png":
                # verify() walks the chunks and their CRCs without decoding pixels: cheap,
                # and it catches a truncated or corrupted download.
                image.verify()
                return data
            image.load()
            converted = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise NotAnImage(f"a {kind.upper()} that cannot be decoded ({error})") from None
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue()
