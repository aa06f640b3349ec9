"""The one PNG chunk walker: the check (images.py), text chunks and size (png_info.py) all use it.

It lives in its own module, below both users, because images.py checks what png_info.py later
reads, and png_info.py already imports from images.py: a walker in either would be an import
cycle or an upward arrow. It only frames chunks (length, type, where the data lies); what a
chunk means, and whether its CRC holds, is the caller's business.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signature, then IHDR's length, type, 13 data bytes and CRC.
IHDR_END = len(PNG_SIGNATURE) + 4 + 4 + 13 + 4
TEXT_CHUNKS = frozenset((b"tEXt", b"zTXt", b"iTXt"))


class TruncatedPng(ValueError):
    """A chunk runs past the end of the bytes."""


@dataclass(frozen=True, slots=True)
class Chunk:
    kind: bytes  # b"IHDR", b"IDAT", ...
    start: int  # offset of its length field
    length: int  # of its data

    @property
    def data_start(self) -> int:
        return self.start + 8

    @property
    def data_end(self) -> int:
        return self.start + 8 + self.length

    @property
    def end(self) -> int:
        """The offset just past its CRC: where the next chunk starts."""
        return self.start + 12 + self.length


def walk_chunks(png: bytes | memoryview) -> Iterator[Chunk]:
    """The chunks after the signature, in order, up to and including IEND (what follows IEND
    is not PNG). Raises TruncatedPng for a chunk that runs past the end; stops quietly when
    fewer than 12 bytes are left (the caller decides whether a missing IEND matters)."""
    offset = len(PNG_SIGNATURE)
    size = len(png)
    while offset + 12 <= size:
        length, kind = struct.unpack_from(">I4s", png, offset)
        chunk = Chunk(kind, offset, length)
        if chunk.end > size:
            raise TruncatedPng(f"a {kind!r} chunk at byte {offset} runs past the end")
        yield chunk
        if kind == b"IEND":
            return
        offset = chunk.end


def png_dimensions(png: bytes | memoryview) -> tuple[int, int] | None:
    """Width and height from IHDR, or None when the bytes do not start with a PNG's IHDR."""
    if len(png) < 24 or bytes(png[:8]) != PNG_SIGNATURE or bytes(png[12:16]) != b"IHDR":
        return None
    width, height = struct.unpack_from(">II", png, 16)
    return width, height
