"""Base64 images inside a JSON answer, decoded and checked while the body arrives.

Most vendors answer an image as one long base64 string in JSON (`b64_json`, `inlineData.data`,
`bytesBase64Encoded`, `image`). Read the usual way, the whole body is parsed first (4 ms for
the bench's 1.7 MB PNG: the JSON decoder walks the 2.3 MB string a character at a time), then
decoded, then the PNG is inflated to check it (7 ms), one after the other, after the last byte.

`JsonImageScan` is fed the body's pieces as they arrive (outbound.read_body). It finds the
strings of the JSON with C-speed searches, and a string that grows long and holds only the
base64 alphabet is decoded four characters at a time as it comes; when its first bytes are a
PNG signature, the decoded bytes go on to a `PngCheck`, so the inflating overlaps the transfer.
When the body is whole, `finish` gives an `EmbeddedJson`: the body with each such string cut
out and a placeholder put in. Parsing that is cheap, and every placeholder is then replaced by
an `EmbeddedBase64` carrying its decoded bytes and the check's verdict, which the backends'
reader (`toolkit.b64_image`, the one place a backend decodes base64) takes instead of decoding
again. An image's text is a short note, not the megabytes of base64: making that str again
would copy them once more with the GIL held (1.5 ms of each image's CPU in a burst). A body
json.loads would read as UTF-16 or UTF-32 is left to the plain path. Everything else in
the parsed answer is exactly what `json.loads` of the whole body gives.

Anything unusual is left to the plain path, never guessed at: a string with an escape, padding
before its end, any character outside the alphabet, a body past `MAX_STRINGS` strings or
`MAX_ESCAPES` escapes, a placeholder that lands as an object's key. What the plain path would
refuse, it then refuses in its own words.
"""

from __future__ import annotations

import binascii
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import pybase64

from imagegen.images import CheckedPng, PngCheck, Remembered, sniff_image_type
from imagegen.imaging import PNG_SIGNATURE

# A string is decoded as it comes once it is this long: shorter ones cost more to track than
# to parse (and are no image anyone pays for).
MIN_BASE64_CHARS = 16 * 1024
# Past these, a body is read the plain way: each string and each escape costs a few steps of
# Python here, and no vendor's answer has more than a few dozen of either.
MAX_STRINGS = 10_000
MAX_ESCAPES = 10_000
# The rest of a string that has an escape in it: runs of plain characters, or an escape pair.
_ESCAPED_STRING = re.compile(rb'(?:[^"\\]+|\\[\s\S])*')
# A placeholder's text: unguessable, so no vendor string can pass for one.
_PLACEHOLDER_PREFIX = f"imagegen-embedded-{secrets.token_hex(16)}-"


class EmbeddedBase64(str):
    """A base64 string from a JSON answer, already decoded (and checked, when a PNG) while the
    body arrived. For an image its text says so (the base64 itself is not kept); any other
    string keeps its text, which may be quoted or compared as it is; `decoded` is what
    `pybase64.b64decode(text, validate=True)` gave; `check` the PngCheck verdict on those bytes,
    or None when they are not a PNG."""

    decoded: bytes
    check: CheckedPng | None


@dataclass
class _Embedded:
    start: int  # offset of the string's first character in the body (after its quote)
    end: int  # offset of its closing quote
    check: CheckedPng | None


@dataclass
class EmbeddedJson:
    """A JSON body whose long base64 strings were decoded as it arrived."""

    body: bytes
    strings: list[_Embedded] = field(default_factory=list)

    def parse(self) -> Any:
        """`json.loads(body)`, with each decoded string an EmbeddedBase64 in its place. Raises what
        json.loads raises for a body it cannot read (the cut strings were valid JSON strings,
        and placeholders are too, so the cut body is valid exactly when the body is)."""
        view = memoryview(self.body)
        pieces: list[bytes | memoryview] = []
        offset = 0
        by_placeholder: dict[str, _Embedded] = {}
        for index, string in enumerate(self.strings):
            placeholder = f"{_PLACEHOLDER_PREFIX}{index}"
            by_placeholder[placeholder] = string
            pieces += (view[offset : string.start], placeholder.encode())
            offset = string.end
        pieces.append(view[offset:])
        parsed = json.loads(b"".join(pieces))
        if _replace_placeholders(parsed, by_placeholder, self.body) != len(self.strings):
            return json.loads(self.body)  # a placeholder is a key, or gone: parse it whole
        return parsed


def _replace_placeholders(parsed: Any, by_placeholder: dict[str, _Embedded], body: bytes) -> int:
    """Put each placeholder's EmbeddedBase64 in its place; how many were found as values."""
    found = 0
    containers = [parsed] if isinstance(parsed, (dict, list)) else []
    # A top-level string is no container: JSON that is only an image is no answer anyone sends.
    while containers:
        container = containers.pop()
        slots = container.items() if isinstance(container, dict) else enumerate(container)
        for key, value in list(slots):
            if isinstance(value, (dict, list)):
                containers.append(value)
            elif isinstance(value, str) and value.startswith(_PLACEHOLDER_PREFIX) and value in by_placeholder:
                string = by_placeholder.pop(value)
                # Decoded again, whole (0.15 ms for 2.3 MB): holding the pieces decoded on the way
                # and joining them would keep the image twice in memory. It was validated then.
                with memoryview(body) as view, view[string.start : string.end] as chars:
                    decoded = pybase64.b64decode(chars, validate=True)
                    # Only an image may stand as the note: other long base64-looking text (a
                    # model's words, an error's detail) may be quoted or compared as it is.
                    note = sniff_image_type(decoded) is not None
                    text = EmbeddedBase64(
                        f"[{len(chars)} characters of base64, decoded as they arrived]" if note else str(chars, "ascii")
                    )
                text.decoded = decoded
                text.check = string.check
                container[key] = text
                found += 1
    return found


class JsonImageScan:
    """Fed a JSON body in pieces; decodes (and checks) its long base64 strings as they come."""

    def __init__(self) -> None:
        self._data = bytearray()  # the body from offset `_base` on: what is still needed
        self._base = 0
        self._position = 0  # where scanning goes on, as an offset in the body
        self._in_string = False
        self._string_start = 0
        self._escaped = False  # the current string has an escape: only its end is looked for
        self._decodable = True  # nothing in the current string has ruled it out yet
        # Body offset up to which the current string is decoded (its start until it is long
        # enough to decode): everything before it may be dropped.
        self._decoded_to = 0
        self._check: PngCheck | None = None
        self._strings = 0
        self._escapes = 0
        self._given_up = False
        self._found: list[_Embedded] = []

    @property
    def checking(self) -> bool:
        """A PNG is being inflated from the current string: worth acknowledging pieces at once."""
        return self._check is not None

    def feed(self, piece: bytes) -> None:
        if self._given_up:
            return
        self._data += piece
        end = self._base + len(self._data)
        while self._position < end and not self._given_up:
            if not self._in_string:
                self._find_string(end)
            elif self._escaped:
                if not self._skip_escaped():
                    break  # the piece ends inside an escape pair: the rest comes with the next
            else:
                self._read_plain(end)
        undecodable = self._in_string and (self._escaped or not self._decodable)
        self._drop_to(self._decoded_to if self._in_string and not undecodable else self._position)

    def finish(self, body: bytes) -> EmbeddedJson | None:
        """What was found in the whole `body` (the bytes fed, joined), or None: nothing decoded."""
        if self._given_up or not self._found or self._in_string:
            return None
        if json.detect_encoding(body[:4]) != "utf-8":
            # json.loads reads UTF-16 too, where the bytes `"A` and `AA` are text ("\u4122\u4141"):
            # what was cut there is no string, and a placeholder would put the body out of step.
            return None
        return EmbeddedJson(body, self._found)

    # -- the states --------------------------------------------------------------------------

    def _find_string(self, end: int) -> None:
        quote = self._data.find(b'"', self._position - self._base)
        if quote < 0:
            self._position = end
            return
        self._strings += 1
        if self._strings > MAX_STRINGS:
            self._give_up()
            return
        self._in_string, self._escaped, self._decodable = True, False, True
        self._string_start = self._position = self._decoded_to = self._base + quote + 1
        self._check = None

    def _read_plain(self, end: int) -> None:
        """A string with no escape so far: find its end or its first escape with memchr."""
        local = self._position - self._base
        quote = self._data.find(b'"', local)
        stop = quote if quote >= 0 else len(self._data)
        escape = self._data.find(b"\\", local, stop)
        if escape >= 0:
            self._escaped, self._decodable = True, False
            self._check = None
            self._position = self._base + escape
            return
        self._position = self._base + stop
        if quote < 0:
            if self._decodable and self._position - self._string_start >= MIN_BASE64_CHARS:
                self._decode(final=False)
            return
        if self._decodable and self._position - self._string_start >= MIN_BASE64_CHARS:
            self._decode(final=True)
            if self._decodable:
                self._keep()
        self._in_string = False
        self._check = None
        self._position += 1  # past the closing quote

    def _skip_escaped(self) -> bool:
        """Past what is here of a string with an escape; False when the data ends on a lone
        backslash, whose pair is in the next piece."""
        local = self._position - self._base
        after = _ESCAPED_STRING.match(self._data, local).end()
        self._escapes += self._data.count(b"\\", local, after)  # pairs count twice: a bound only
        if self._escapes > MAX_ESCAPES:
            self._give_up()
            return True
        self._position = self._base + after
        if after < len(self._data) and self._data[after] == ord('"'):
            self._in_string = self._escaped = False
            self._position += 1
            return True
        return after == len(self._data)  # else a lone backslash is all that is left

    # -- decoding ----------------------------------------------------------------------------

    def _decode(self, final: bool) -> None:
        """Decode the current string from `_decoded_to` up to `_position`: whole quads only,
        unless `final`. Padding may only end the string; any other character than the base64
        alphabet, or a decoder's refusal, rules the string out."""
        stop = self._position if final else self._decoded_to + (self._position - self._decoded_to) // 4 * 4
        if stop <= self._decoded_to:
            return
        first, last = self._decoded_to - self._base, stop - self._base
        text = memoryview(self._data)[first:last]
        try:
            if not final and self._data.find(b"=", first, last) >= 0:
                raise binascii.Error("padding before the end")
            decoded = pybase64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            self._decodable = False
            self._check = None
            return
        finally:
            text.release()
        if self._decoded_to == self._string_start and decoded.startswith(PNG_SIGNATURE):
            self._check = PngCheck()
        if self._check is not None:
            self._check.feed(decoded)
        self._decoded_to = stop

    def _keep(self) -> None:
        check = self._check.finish() if self._check is not None else None
        self._found.append(_Embedded(self._string_start, self._position, check))

    def _drop_to(self, offset: int) -> None:
        """Forget the body before `offset` (deleting a bytearray's front costs no copy)."""
        if offset > self._base:
            del self._data[: offset - self._base]
            self._base = offset

    def _give_up(self) -> None:
        self._given_up = True
        self._data = bytearray()
        self._found, self._check = [], None


# What the scan found in exactly a body: the backend's read_json on that object parses the cut body.
_scanned: Remembered[EmbeddedJson] = Remembered()
remember_json, forget_json, take_remembered_json = _scanned.remember, _scanned.forget, _scanned.take
