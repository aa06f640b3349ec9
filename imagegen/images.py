"""Checking that upstream bytes are an image, and making sure what we keep is a PNG.

A PNG is checked without re-encoding it: its chunks are walked (lengths, CRCs, IHDR first,
IDAT consecutive, IEND last), IHDR's size is bounded (`MAX_IMAGE_PIXELS`), and the image data
is inflated piece by piece, never held whole, to check it is a complete zlib stream of exactly
the size IHDR implies. That catches truncated downloads, flipped bytes, non-PNG bodies and a
header that lies about the size, where Pillow's verify() checks only CRCs and re-encoding costs
hundreds of milliseconds. It is not free: about 6.4 ms for the bench's 1024x1024 RGB PNG on the
2-core development VM with ISA-L's inflate (17 ms with zlib's), nearly all of it inflating
3 MB (the CRCs take under 0.1 ms with ISA-L's crc32). Row filter types are checked on the
inflated pieces (a strided slice each: no measurable cost). The same check (PngCheck) is fed an
upstream body piece by piece while it arrives (outbound.read_body; for a base64 image in JSON,
embedded.JsonImageScan), so behind a real network it is done when the last byte is in; on
loopback the body arrives faster than it inflates. What is kept drops the upstream's text
chunks and whatever follows IEND. Pillow only converts the JPEG, WebP or GIF answers some providers give, within a memory
budget worked out from their header before decoding them (DecodeBudget).
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from isal import isal_zlib as _inflate

from imagegen.errors import ServerBusy
from imagegen.imaging import PNG_SIGNATURE, TEXT_CHUNKS, Chunk, TruncatedPng, png_dimensions, walk_chunks

# Inflating a 1024x1024 PNG to check it is most of what this function adds to a request:
# Intel's ISA-L (python-isal, `_inflate`) does it in under half zlib's time (6.4 ms against
# 17.3 ms for the bench's 1.7 MB PNG on these machines), with the same results. Its CRC-32
# is the same function as zlib's, 8 times faster (0.05 against 0.4 ms for that PNG's chunks).
_crc32 = _inflate.crc32
T = TypeVar("T")


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


def check_stored_png(data: bytes) -> None:
    """The structure of a PNG this function stored itself, after a full `check_png` when it was
    made: the signature, IHDR first and within the pixel limit, every chunk whole with its CRC,
    and IEND. It does not inflate (a few hundredths of a millisecond instead of the check's
    milliseconds on a cache hit); what it guards against is storage that lost or changed bytes.
    Raises NotAnImage."""
    dimensions = png_dimensions(data)
    if dimensions is None or dimensions[0] * dimensions[1] > MAX_IMAGE_PIXELS or len(data) > MAX_IMAGE_BYTES:
        raise NotAnImage("not a PNG this function stores")
    view = memoryview(data)
    try:
        for chunk in walk_chunks(view):
            crc = _crc32(view[chunk.start + 4 : chunk.data_end])
            if crc != int.from_bytes(view[chunk.data_end : chunk.end], "big"):
                raise NotAnImage(f"a {_name(chunk.kind)} chunk whose CRC does not match")
            if chunk.kind == b"IEND":
                return
    except TruncatedPng:
        raise NotAnImage("a PNG cut short") from None
    raise NotAnImage("a PNG without its end")


def check_png(data: bytes) -> bytes:
    """The PNG as we keep it, or `NotAnImage` unless `data` is a sound PNG of at most
    `MAX_IMAGE_PIXELS` pixels.

    What we keep drops the upstream's text chunks (tEXt, zTXt, iTXt: a "provider" or "seed"
    chunk must never pass for our own metadata, which embed_parameters adds later) and whatever
    follows IEND. It is `data` itself, not a copy, when there is nothing to drop.

    The walk is PngCheck's, fed the bytes at once; a body that was checked while it arrived
    (outbound.read_body) is not checked twice (see `remember_check`).
    """
    known = _take_remembered(data)
    if known is not None:
        return known.result(data)
    check = PngCheck()
    check.feed(data)
    return check.finish().result(data)


@dataclass(frozen=True)
class CheckedPng:
    """What PngCheck found: the text chunks to drop and where IEND ends, or the refusal."""

    dropped: tuple[Chunk, ...] = ()
    end: int = 0
    refusal: NotAnImage | None = None

    def result(self, data: bytes) -> bytes:
        """The PNG we keep from the `data` that was checked, or the refusal raised."""
        if self.refusal is not None:
            raise type(self.refusal)(*self.refusal.args) from None
        return _without(data, self.dropped, self.end)


class PngCheck:
    """check_png fed in pieces, as a body arrives: each chunk's CRC, the IDAT stream inflated
    and its filter bytes checked while the next piece is on its way.

    Results are exactly those of checking the bytes at once, whatever the split: a chunk's
    verdict (its header, its CRC, what it may be, then how its image data inflated) is given
    only once the whole chunk is in, in that order, because the bytes at once would call a
    chunk that runs past the end a truncated PNG before looking inside it. An inflate error
    found early is held until its chunk's CRC has been checked. Only IHDR's 13 data bytes and
    a chunk's 8-byte header are buffered; everything else is looked at once, where it lies.
    """

    def __init__(self) -> None:
        self._size = 0  # bytes fed so far
        self._skip = len(PNG_SIGNATURE)  # check_png's callers have sniffed the signature
        self._header = bytearray()  # the current chunk's length and type, until all 8 are in
        self._chunk: Chunk | None = None  # the chunk whose data and CRC are arriving
        self._left = 0  # bytes of the current chunk's data still to come
        self._crc = 0
        self._crc_bytes = bytearray()
        self._ihdr = bytearray()
        self._streaming = False  # the current chunk's data goes to the inflater as it comes
        self._held: NotAnImage | None = None  # an inflate error, raised once its chunk is whole
        self._image: _ImageData | None = None
        self._palette = False
        self._previous = b""
        self._dropped: list[Chunk] = []
        self._outcome: CheckedPng | None = None

    @property
    def done(self) -> bool:
        """IEND was reached or the PNG refused: what else comes changes nothing."""
        return self._outcome is not None

    def feed(self, piece: bytes | memoryview) -> None:
        if self._outcome is not None:
            return
        try:
            self._feed(memoryview(piece).cast("B"))
        except NotAnImage as refusal:
            self._outcome = CheckedPng(refusal=refusal)

    def finish(self) -> CheckedPng:
        """The verdict once every byte has been fed."""
        if self._outcome is None:
            start = self._chunk.start if self._chunk is not None else self._size - len(self._header)
            if self._skip or self._size - start < 12:
                reason = "no IEND chunk"
            else:
                assert self._chunk is not None
                reason = f"a {self._chunk.kind!r} chunk at byte {start} runs past the end"
            self._outcome = CheckedPng(refusal=NotAnImage(f"a truncated PNG ({self._size} bytes, {reason})"))
        return self._outcome

    def _feed(self, view: memoryview) -> None:
        position, size = 0, len(view)
        self._size += size
        base = self._size - size  # the offset of view[0] in the whole PNG
        while position < size and self._outcome is None:
            if self._skip:
                taken = min(self._skip, size - position)
                self._skip -= taken
                position += taken
            elif self._chunk is None:
                taken = min(8 - len(self._header), size - position)
                self._header += view[position : position + taken]
                position += taken
                if len(self._header) == 8:
                    self._begin(base + position - 8)
            elif self._left:
                taken = min(self._left, size - position)
                self._data(view[position : position + taken])
                self._left -= taken
                position += taken
            else:
                taken = min(4 - len(self._crc_bytes), size - position)
                self._crc_bytes += view[position : position + taken]
                position += taken
                if len(self._crc_bytes) == 4:
                    self._end()

    def _begin(self, start: int) -> None:
        length, kind = struct.unpack(">I4s", self._header)
        self._header.clear()
        self._chunk = Chunk(kind, start, length)
        self._left = length
        self._crc = _crc32(kind)
        self._crc_bytes.clear()
        # Image data is inflated as it comes only where check_png would inflate it: IDAT after
        # a sound IHDR, consecutive. Anything else is judged once the chunk is whole.
        self._streaming = (
            kind == b"IDAT" and self._image is not None and (self._previous == b"IDAT" or not self._image.started)
        )
        if self._image is None and kind == b"IHDR" and length == 13:
            self._ihdr.clear()

    def _data(self, data: memoryview) -> None:
        self._crc = _crc32(data, self._crc)
        if self._streaming:
            if self._held is None:
                try:
                    assert self._image is not None
                    self._image.feed(data)
                except NotAnImage as error:
                    self._held = error
        elif self._image is None and self._chunk is not None and self._chunk.kind == b"IHDR" and self._chunk.length == 13:
            self._ihdr += data

    def _end(self) -> None:
        chunk = self._chunk
        assert chunk is not None
        self._chunk = None
        kind = chunk.kind
        image = self._image
        if image is None and (kind != b"IHDR" or chunk.length != 13):
            raise NotAnImage("a PNG without a valid IHDR header")
        if int.from_bytes(self._crc_bytes, "big") != self._crc:
            raise NotAnImage(f"a corrupt PNG (the {_name(kind)} chunk at byte {chunk.start} fails its CRC)")
        if image is None:
            self._image = _ImageData(*struct.unpack(">IIBBBBB", self._ihdr))
        elif kind == b"IDAT":
            if not self._streaming:
                raise NotAnImage("a corrupt PNG (its IDAT chunks are not consecutive)")
            if self._held is not None:
                raise self._held
            if not chunk.length:
                image.started = True  # check_png feeds an empty IDAT too: it counts as begun
        elif kind == b"IEND":
            image.finish()
            if image.color == 3 and not self._palette:
                raise NotAnImage("a corrupt PNG (a palette image without a PLTE chunk)")
            self._outcome = CheckedPng(tuple(self._dropped), chunk.end)
            return
        elif kind == b"PLTE":
            # Decoders refuse a second palette, a palette after the pixels, or one in a grey image.
            if self._palette or image.started or image.color in (0, 4):
                raise NotAnImage("a corrupt PNG (a PLTE chunk where none may be)")
            self._palette = True
        elif kind in TEXT_CHUNKS:
            self._dropped.append(chunk)
        elif kind == b"IHDR" or not kind[0] & 0x20:
            # A second IHDR, or a critical chunk no decoder knows: the image cannot be shown.
            raise NotAnImage(f"a corrupt PNG (an unexpected {_name(kind)} chunk at byte {chunk.start})")
        self._previous = kind


def _without(data: bytes, dropped: tuple[Chunk, ...], end: int) -> bytes:
    """`data` up to `end` without the `dropped` chunks: one copy, and only when needed."""
    if not dropped and end == len(data):
        return data
    view = memoryview(data)
    pieces, offset = [], 0
    for chunk in dropped:
        pieces.append(view[offset : chunk.start])
        offset = chunk.end
    pieces.append(view[offset:end])
    return b"".join(pieces)



class Remembered(Generic[T]):
    """What was found about one body while it arrived (outbound.read_body), kept for this
    thread's next reader of that very object, which takes it instead of doing the work again.
    One per thread, matched by identity (the bytes are immutable, and the held reference keeps
    the id from being reused), taken once: every outbound read clears it, so at most one body
    per thread outlives its request, and only where a backend never read what it fetched."""

    def __init__(self) -> None:
        self._local = threading.local()

    def remember(self, body: bytes, found: T) -> None:
        self._local.entry = (body, found)

    def forget(self) -> None:
        self._local.entry = None

    def take(self, body: bytes) -> T | None:
        entry = getattr(self._local, "entry", None)
        if entry is None:
            return None
        self._local.entry = None
        return entry[1] if entry[0] is body else None


# PngCheck's verdict on exactly a body: the backend's check_png (through ensure_png) on that
# object gets it instead of a second walk.
_checked: Remembered[CheckedPng] = Remembered()
remember_check, forget_check, _take_remembered = _checked.remember, _checked.forget, _checked.take

# Cloud Functions answers at most 32 MB; base64 grows an image by 4/3, so 20 MiB still fits.
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# The largest image accepted from upstream: 32 megapixels, about twice the largest any
# supported backend makes (a "4K" image at 21:9 is 6336x2688, 17 Mpx; another's largest is
# 3840x2160). It bounds the time spent inflating a PNG (a 1x1-pixel-per-byte bomb cannot make
# us inflate more than 32 Mpx x 8 bytes), and what Pillow may decode from a JPEG or WebP.
MAX_IMAGE_PIXELS = 32 * 1024 * 1024
# Inflated image data is looked at in pieces of at most this size, then dropped.
_INFLATE_PIECE_BYTES = 256 * 1024
# Compressed data is inflated in slices of at most this size (see _ImageData.feed).
_INFLATE_INPUT_BYTES = 64 * 1024
# Bits per pixel per sample, by colour type: grey, RGB, palette, grey+alpha, RGBA.
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


class _ImageData:
    """The zlib stream of a PNG's IDAT chunks, checked against the size IHDR implies, and every
    row's filter type (0 to 4: anything else and no decoder can show the image)."""

    def __init__(self, width: int, height: int, depth: int, color: int, compression: int, filtering: int, interlace: int):
        if not (width and height):
            raise NotAnImage("a PNG without a valid IHDR header")
        if depth not in _BIT_DEPTHS.get(color, ()) or compression or filtering or interlace > 1:
            raise NotAnImage(f"a PNG with an invalid IHDR header (bit depth {depth}, colour type {color})")
        if width * height > MAX_IMAGE_PIXELS:
            raise NotAnImage(
                f"a PNG of {width}x{height} pixels, more than the {MAX_IMAGE_PIXELS // 2**20} megapixels accepted"
            )
        self.color = color
        self.rows = _row_layout(width, height, _CHANNELS[color] * depth, interlace == 1)
        self.expected = self.rows[-1][1]
        self.remaining = self.expected
        self.started = False
        self._inflater = _inflate.decompressobj()

    def feed(self, compressed: memoryview) -> None:
        self.started = True
        # In slices that inflate to less than a piece: a call that stops at the piece's size
        # hands back the rest of its input as a new bytes (unconsumed_tail), and doing that
        # for a 1.7 MB IDAT copies megabytes (7.0 -> 6.0 ms for the bench's PNG).
        for start in range(0, len(compressed), _INFLATE_INPUT_BYTES):
            self._inflate(compressed[start : start + _INFLATE_INPUT_BYTES])

    def _inflate(self, compressed: memoryview) -> None:
        pending: bytes | memoryview = compressed
        try:
            while not self._inflater.eof:
                # One byte more than is left: a stream that inflates past the size is caught
                # without ever producing more than a piece.
                piece = self._inflater.decompress(pending, min(self.remaining + 1, _INFLATE_PIECE_BYTES))
                if len(piece) > self.remaining:
                    raise NotAnImage("a corrupt PNG (its image data is larger than its header says)")
                if piece:
                    self._check_filters(piece, self.expected - self.remaining)
                self.remaining -= len(piece)
                pending = self._inflater.unconsumed_tail
                # ISA-L may hold inflated bytes back after taking all the input: ask again with
                # no input until nothing more comes (zlib keeps the input in unconsumed_tail).
                if not pending and not piece:
                    break
        except _inflate.error:
            raise NotAnImage("a corrupt PNG (its image data does not inflate)") from None

    def _check_filters(self, piece: bytes, position: int) -> None:
        """The filter bytes in `piece`, which starts `position` bytes into the inflated stream.

        One strided slice per pass (one for a plain image, up to seven for Adam7), then one
        translate that deletes the valid types: C speed, never a Python loop per row.
        """
        end = position + len(piece)
        for begin, stop, stride in self.rows:
            if stop <= position:
                continue
            if begin >= end:
                break
            first = max(begin, position)
            first += (begin - first) % stride  # the first row start at or after `first`
            last = min(stop, end)
            if first < last and piece[first - position : last - position : stride].translate(None, _FILTER_TYPES):
                bad = max(piece[first - position : last - position : stride])
                raise NotAnImage(f"a corrupt PNG (a row with filter type {bad}; only 0 to 4 exist)")

    def finish(self) -> None:
        if not self.started:
            raise NotAnImage("a PNG without image data")
        if not self._inflater.eof or self.remaining:
            raise NotAnImage(
                f"a corrupt PNG (its image data inflates to {self.expected - self.remaining} bytes,"
                f" its header says {self.expected})"
            )


_FILTER_TYPES = bytes(range(5))


def _row_layout(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> list[tuple[int, int, int]]:
    """Where rows lie in the inflated stream: (begin, end, row length) for each pass that has
    pixels (one for a plain image). Each row is one filter byte and its packed pixels."""
    passes = ((0, 0, 1, 1),) if not interlaced else _ADAM7
    layout, offset = [], 0
    for x0, y0, dx, dy in passes:
        columns = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        if columns and rows:  # an empty pass has no rows at all, not even filter bytes
            stride = 1 + (columns * bits_per_pixel + 7) // 8
            layout.append((offset, offset + rows * stride, stride))
            offset += rows * stride
    return layout


def _name(kind: bytes) -> str:
    return kind.decode("ascii") if kind.isalpha() else repr(kind)


# --- decoding memory: what Pillow may allocate, bounded before it allocates it ---------------

# Bytes per pixel that decoding and converting takes at its peak (the decoder's buffers, Pillow's
# image, a converted copy), measured as peak RSS on test-made images (docs/limits.md, "Decoding memory";
# bench/decode_memory.py) and rounded up. Pillow keeps RGB in 4 bytes a pixel, like RGBA.
_BYTES_PER_PIXEL = {
    ("jpeg", "L"): 6,  # measured 5.1-5.3
    ("jpeg", "RGB"): 8,  # 7.2-7.7
    ("jpeg", "CMYK"): 10,  # 9.2-9.6
    ("jpeg", "progressive"): 10,  # 9.3-9.7: libjpeg keeps every coefficient until the last scan
    ("webp", "lossy"): 17,  # 16.1: libwebp's canvas, its copy as bytes, Pillow's image
    ("webp", "lossless"): 24,  # 23.1-23.6: and the lossless decoder's own ARGB buffers
    ("gif", "any"): 25,  # 23.5-23.9
}
# The converted PNG while it is written (at most MAX_IMAGE_BYTES) and zlib's state.
_OUTPUT_ALLOWANCE = MAX_IMAGE_BYTES + 2 * 2**20
# Anything Pillow reads that is not in the table: the most expensive row.
_WORST_BYTES_PER_PIXEL = max(_BYTES_PER_PIXEL.values())


def decode_memory(kind: str, image, data: bytes) -> int:
    """The bytes decoding and converting `image` (opened, not yet loaded) will need at most."""
    width, height = image.size
    if kind == "jpeg":
        key = ("jpeg", "progressive" if image.info.get("progressive") or image.info.get("progression") else image.mode)
    elif kind == "webp":
        key = ("webp", "lossless" if _webp_is_lossless(data) else "lossy")
    else:
        key = ("gif", "any")
    return width * height * _BYTES_PER_PIXEL.get(key, _WORST_BYTES_PER_PIXEL) + _OUTPUT_ALLOWANCE


def _webp_is_lossless(data: bytes) -> bool:
    """A lossless bitstream (VP8L) anywhere in the first chunks; an extended file (VP8X) may
    put one after its ALPH, ICCP or ANIM chunks, so a few chunks are walked, not only the first."""
    offset = 12
    for _ in range(8):
        kind, size = data[offset : offset + 4], int.from_bytes(data[offset + 4 : offset + 8], "little")
        if kind == b"VP8L":
            return True
        if kind in (b"VP8 ", b""):
            return False
        if kind == b"ANMF":  # a frame: its bitstream follows a 16-byte frame header
            offset += 8 + 16
            continue
        offset += 8 + size + (size & 1)
    return True  # unknown layout: assume the dearer decoder


class DecodeBudget:
    """Bytes of decoding memory this instance may use at once, and the most one decode may take.

    A decode over `per_decode` is refused at once (its image is the upstream's fault: a 502 that
    fails over); one that fits waits for room until its request's time runs out, then is a 503
    server_busy (this instance's state, not the upstream's).
    """

    def __init__(self, total: int, per_decode: int | None = None) -> None:
        self.total = total
        self.per_decode = min(total, per_decode or total)
        self._free = total
        self._room = threading.Condition()

    @contextmanager
    def hold(self, need: int, wait_seconds: float, what: str) -> Iterator[None]:
        if need > self.per_decode:
            raise ImageTooLarge(
                f"{what}, which would take {need / 2**20:.0f} MiB to decode, more than the"
                f" {self.per_decode / 2**20:.0f} MiB one decode may use"
            )
        give_up = time.monotonic() + max(0.0, wait_seconds)
        with self._room:
            while self._free < need:
                left = give_up - time.monotonic()
                if left <= 0:
                    raise ServerBusy(
                        "This server is decoding as many images as its memory allows, and the request waited "
                        "until its time ran out. Try again in a moment."
                    )
                self._room.wait(left)
            self._free -= need
        try:
            yield
        finally:
            with self._room:
                self._free += need
                self._room.notify_all()

    def in_use(self) -> int:
        with self._room:
            return self.total - self._free


# What a decode waits for room when its caller gives no time left: a request that gives one
# waits for its own deadline instead.
DEFAULT_DECODE_WAIT_SECONDS = 10.0
# The instance-wide budget, unless set (DECODE_MEMORY_MIB): a quarter of the instance's memory,
# so that with 1 GiB (the README's deploy) 256 MiB decode at once: a 4096x4096 JPEG, or a
# 17 Mpx one (the largest a backend makes), alone; never the 650 MB a 16383x2000 lossless WebP would take.
DEFAULT_DECODE_SHARE = 0.25
_MIN_DEFAULT_BUDGET = 64 * 2**20
_budget: DecodeBudget | None = None
_budget_lock = threading.Lock()


def instance_memory_bytes() -> int | None:
    """The memory this instance may use: the cgroup limit where there is one (a container,
    Cloud Run), else the machine's; None when neither can be read."""
    found = []
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                value = file.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 2**60:  # "max" or a huge number: no limit
            found.append(int(value))
    try:
        found.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    return min(found) if found else None


def default_decode_budget() -> DecodeBudget:
    memory = instance_memory_bytes() or 1024 * 2**20
    return DecodeBudget(max(_MIN_DEFAULT_BUDGET, int(memory * DEFAULT_DECODE_SHARE)))


def configure_decoding(total_bytes: int | None = None, per_decode_bytes: int | None = None) -> DecodeBudget:
    """Set this instance's decoding budget (DECODE_MEMORY_MIB, MAX_DECODE_MEMORY_MIB); None
    keeps the default derived from the instance's memory. Call once at start."""
    global _budget
    default = default_decode_budget()
    budget = DecodeBudget(total_bytes or default.total, per_decode_bytes)
    with _budget_lock:
        _budget = budget
    return budget


def decode_budget() -> DecodeBudget:
    global _budget
    with _budget_lock:
        if _budget is None:
            _budget = default_decode_budget()
        return _budget


class ImageTooLarge(NotAnImage):
    """The image is sound but larger than we may keep or decode."""


def ensure_png(data: bytes, *, wait_seconds: float | None = None) -> bytes:
    """PNG bytes for any readable image, at most MAX_IMAGE_BYTES: a PNG is checked (and loses
    its text chunks and any trailing bytes), never re-encoded; a JPEG, WebP or GIF is decoded
    within this instance's decoding budget, waiting at most `wait_seconds` for room (the
    request's time left; DEFAULT_DECODE_WAIT_SECONDS when not given), then converted."""
    kind = sniff_image_type(data)
    if kind is None:
        raise NotAnImage(describe_non_image(data))
    if kind == "png":
        png = check_png(data)
        converted = ""
    else:
        png = _convert(data, kind, DEFAULT_DECODE_WAIT_SECONDS if wait_seconds is None else wait_seconds)
        converted = "converted "
    if len(png) > MAX_IMAGE_BYTES:
        raise _too_large(f"a {converted}PNG of {len(png) / 1e6:.1f} MB")
    return png


def _too_large(what: str) -> ImageTooLarge:
    return ImageTooLarge(f"{what}, larger than the {MAX_IMAGE_BYTES // 2**20} MiB an image may be")


def _convert(data: bytes, kind: str, wait_seconds: float) -> bytes:
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
            need = decode_memory(kind, image, data)
            with decode_budget().hold(need, wait_seconds, f"a {kind.upper()} of {width}x{height} pixels"):
                image.load()
                # Converting to the same mode would copy every pixel once more for nothing.
                mode = "RGBA" if "A" in image.getbands() else "RGB"
                converted = image if image.mode == mode else image.convert(mode)
                out = _BoundedBuffer(MAX_IMAGE_BYTES)
                converted.save(out, format="PNG", compress_level=6)
                return out.getvalue()
    except NotAnImage:
        raise
    except _OutputTooLarge:
        raise _too_large(f"a {kind.upper()} whose converted PNG is too large") from None
    except Image.DecompressionBombError:  # Pillow's own limit, checked when it opens the file
        raise NotAnImage(f"a {kind.upper()} larger than the {MAX_IMAGE_PIXELS // 2**20} megapixels accepted") from None
    except UnidentifiedImageError:  # its message names an object's address: say it plainly
        raise NotAnImage(f"a {kind.upper()} that cannot be decoded (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise NotAnImage(f"a {kind.upper()} that cannot be decoded ({error})") from None


class _OutputTooLarge(Exception):
    pass


class _BoundedBuffer(io.BytesIO):
    """Where the converted PNG is written: it stops the encoder once the PNG could no longer be
    kept, rather than letting a noisy 32 Mpx JPEG grow a 100 MB PNG first."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit

    def write(self, data) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self._limit:
            raise _OutputTooLarge()
        return super().write(data)
