"""imagegen.embedded under hostile or odd answers: the scanned read must be the plain read.

Found in review (issue #21): a UTF-16 body the scan cut as if it were UTF-8, and long
base64-looking text that is no image (a model's words) read back as the scan's note."""

from __future__ import annotations

import base64
import json
import random
import time

import pytest

from imagegen import embedded
from imagegen.backends import gemini, google_genai
from imagegen.backends.base import GenerationContext
from imagegen.backends.toolkit import b64_image, read_json, reading_answer, to_png
from imagegen.backends.vendor import CallContext
from imagegen.embedded import EmbeddedBase64, JsonImageScan, forget_json, remember_json
from imagegen.images import forget_check
from tests.test_embedded_images import PNG, corrupt_idat, noisy_jpeg, outcome

MIN = embedded.MIN_BASE64_CHARS
SECRET = "AIzaEmbeddedReviewSecret0123456789abcdef"


def scanned_read(body: bytes, pieces: list[bytes]):
    """read_json of `body` as outbound.read_body leaves it: the scan fed `pieces`, remembered."""
    forget_json(), forget_check()
    scan = JsonImageScan()
    for piece in pieces:
        scan.feed(piece)
    found = scan.finish(body)
    if found is not None:
        remember_json(body, found)
    try:
        return outcome(lambda: read_json(body))
    finally:
        forget_json()


def plain_read(body: bytes):
    forget_json()
    return outcome(lambda: read_json(body))


def image_outcome(value):
    forget_check()
    context = GenerationContext(deadline=time.monotonic() + 30)
    return outcome(lambda: to_png(b64_image(value, "the image"), context))


def assert_same(plain, fast) -> None:
    """Equal values, where a string the scan decoded reads as the same image (or refusal)."""
    if isinstance(fast, EmbeddedBase64):
        assert isinstance(plain, str)
        assert image_outcome(fast) == image_outcome(plain)
        if fast != plain:  # only an image may stand as the note
            assert fast.decoded[:4] in (PNG[:4], b"\xff\xd8\xff\xe0"[:4]) or fast.decoded.startswith((b"\xff\xd8\xff", b"RIFF", b"GIF8"))
        return
    assert type(fast) is type(plain)
    if isinstance(plain, dict):
        assert list(plain) == list(fast)
        for key in plain:
            assert_same(plain[key], fast[key])
    elif isinstance(plain, list):
        assert len(plain) == len(fast)
        for a, b in zip(plain, fast):
            assert_same(a, b)
    elif isinstance(plain, float) and plain != plain:
        assert fast != fast
    else:
        assert plain == fast


def compare(body: bytes, pieces: list[bytes]) -> None:
    plain, fast = plain_read(body), scanned_read(body, pieces)
    assert plain[0] == fast[0], (plain[:2], fast[:2])
    if plain[0] == "error":
        assert plain == fast
    else:
        assert_same(plain[1], fast[1])


# -- UTF-16 ------------------------------------------------------------------------------------


def test_a_utf16_body_is_read_as_json_reads_it():
    """json.loads reads UTF-16 and UTF-32 bodies; in UTF-16-LE, "\u4122" is the bytes `"A` and
    "\u4141" is `AA`: the scan saw eleven base64 strings and cut them as bytes, and the 53-byte
    placeholder of the eleventh put the rest of the body out of step: "JSON that cannot be read"."""
    fake = "\u4122" + "\u4141" * (MIN // 2 + 1) + "\u2241"
    body = json.dumps({"text": "\u2230" + fake * 11 + "\u2230"}, ensure_ascii=False).encode("utf-16-le")
    assert body.startswith(b"{")
    assert scanned_read(body, [body]) == plain_read(body) == ("ok", json.loads(body))


# -- long base64-looking text --------------------------------------------------------------------


def test_base64_looking_text_that_is_no_image_keeps_its_words():
    text = "A" * (MIN + 4)
    body = json.dumps({"text": text, "image": base64.b64encode(PNG).decode()}).encode()
    kind, answer = scanned_read(body, [body])
    assert kind == "ok" and answer["text"] == text
    assert isinstance(answer["image"], EmbeddedBase64)  # the image itself is still decoded early


def test_a_models_words_are_quoted_the_same_in_its_refusal():
    words = "Q" * (MIN + 8)
    body = json.dumps({"candidates": [{"finishReason": "STOP", "content": {"parts": [{"text": words}]}}]}).encode()

    def read():
        call = CallContext(gemini.VENDOR, "gemini", "gemini-2.5-flash-image", SECRET)
        with reading_answer(call):
            return google_genai.read_image(body, call, GenerationContext(deadline=time.monotonic() + 30))

    forget_json()
    plain = outcome(read)
    scan = JsonImageScan()
    scan.feed(body)
    remember_json(body, scan.finish(body))
    assert outcome(read) == plain
    assert "QQQQ" in plain[2]


# -- a differential fuzzer -----------------------------------------------------------------------

B64_PNG = base64.b64encode(PNG).decode()
B64_BAD_PNG = base64.b64encode(corrupt_idat(PNG)).decode()
B64_JPEG = base64.b64encode(noisy_jpeg()).decode()


def random_string(rng: random.Random) -> str:
    """The inside of a JSON string (already escaped), chosen to sit on the scan's edges."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice((B64_PNG, B64_BAD_PNG, B64_JPEG))
    if kind == 1:  # right at the threshold, every padding
        raw = rng.randbytes(MIN * 3 // 4 + rng.randrange(-3, 4))
        text = base64.b64encode(raw).decode()
        return rng.choice((text, text.rstrip("="), text + "=", text + "==", text.rstrip("=") + "A"))
    if kind == 2:  # padding or a foreign character somewhere
        text = list(B64_PNG)
        at = rng.randrange(len(text))
        text[at] = rng.choice(("=", "==", "-", "_", " ", "é", "\\/", "\\u0041", "\\\\"))
        return "".join(text)
    if kind == 3:  # an escape near the end, or `\\` runs before the quote
        return B64_PNG[: rng.randrange(MIN - 8, MIN + 8)] + "\\\\" * rng.randrange(1, 4)
    if kind == 4:
        return "\\\\" * rng.randrange(0, 5) + B64_JPEG
    if kind == 5:
        return "A" * rng.choice((MIN - 4, MIN, MIN + 4, MIN + 1))
    if kind == 6:
        return rng.choice(("", "x", 'a \\"b\\" c', "\\\\", "é ✓", "\\ud83d\\ude00"))
    if kind == 7:  # a PNG's base64 cut short
        return B64_PNG[: rng.randrange(MIN, len(B64_PNG)) // 4 * 4]
    return base64.b64encode(rng.randbytes(rng.randrange(10, MIN))).decode()


def random_value(rng: random.Random, depth: int = 0) -> str:
    kind = rng.randrange(8 if depth < 4 else 4)
    if kind == 0:
        return rng.choice(("1", "-0.5e3", "NaN", "Infinity", "-Infinity", "true", "null"))
    if kind in (1, 2, 3):
        return '"' + random_string(rng) + '"'
    if kind in (4, 5):
        return "[" + ", ".join(random_value(rng, depth + 1) for _ in range(rng.randrange(4))) + "]"
    fields = []
    for _ in range(rng.randrange(4)):
        key = random_string(rng) if rng.random() < 0.1 else rng.choice(("image", "data", "b64_json", "text"))
        fields.append(f'"{key}": {random_value(rng, depth + 1)}')
    return "{" + ",\n ".join(fields) + "}"


def random_body(rng: random.Random) -> bytes:
    body = random_value(rng).encode()
    if not body.startswith((b"{", b"[")):
        body = b"[" + body + b"]"
    damage = rng.randrange(10)
    if damage == 0:
        body = body[: rng.randrange(len(body))]
    elif damage == 1:
        at = rng.randrange(len(body))
        body = body[:at] + rng.choice((b"\xff", b'"', b"\\", b"\x00", b"}")) + body[at:]
    return body


def random_pieces(rng: random.Random, body: bytes) -> list[bytes]:
    """Cut at random places and right around quotes and backslashes."""
    marks = [i for i, byte in enumerate(body) if byte in b'"\\']
    cuts = {rng.randrange(len(body) + 1) for _ in range(rng.randrange(6))}
    cuts |= {mark + rng.choice((0, 1, 2)) for mark in rng.sample(marks, min(len(marks), 12))}
    edges = sorted({0, len(body), *(cut for cut in cuts if 0 < cut < len(body))})
    return [body[a:b] for a, b in zip(edges, edges[1:])] or [body]


@pytest.mark.parametrize("seed", range(4))
def test_random_bodies_read_the_same_both_ways(seed):
    rng = random.Random(seed)
    deadline = time.monotonic() + 1.0
    count = 0
    while time.monotonic() < deadline or count < 20:
        body = random_body(rng)
        compare(body, random_pieces(rng, body))
        count += 1


# -- memory ------------------------------------------------------------------------------------


def test_the_scan_keeps_only_what_it_still_needs():
    """Every piece ending inside a string not yet MIN_BASE64_CHARS long: nothing before that
    string was ever dropped, so the scan held a second copy of the whole body."""
    body = b"[" + b",".join([b'"' + b"A" * MIN + b'"'] * 200) + b"]"
    scan = JsonImageScan()
    held = 0
    for start in range(0, len(body), 65536):
        scan.feed(body[start : start + 65536])
        held = max(held, len(scan._data))
    assert scan.finish(body) is not None
    assert held <= MIN + 2 * 65536
