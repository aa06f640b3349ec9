"""imagegen.embedded: base64 images in a JSON answer, decoded and checked as the body arrives.

The contract is that nothing changes but the time: whatever the body and however it is split,
the backends' readers (toolkit.read_json, b64_image, then the PNG check) give exactly what the
plain path gives (json.loads of the whole body, then decoding, then check_png), the same value
or the same refusal in the same words."""

from __future__ import annotations

import base64
import io
import json
import random
import zlib

import pytest
import responses
from PIL import Image

from imagegen import embedded
from imagegen.backends import openai as openai_backend
from imagegen.backends.toolkit import b64_image, json_object, read_json, reading_answer, to_png
from imagegen.backends.base import GenerationContext
from imagegen.backends.vendor import CallContext
from imagegen.embedded import EmbeddedBase64, JsonImageScan, forget_json, remember_json
from imagegen.errors import BadAnswer
from imagegen.images import check_png, forget_check
from imagegen.outbound import HttpExchange, new_session

SECRET = "sk-EmbeddedImagesSecret0123456789"


def noisy_png(side: int = 96, seed: int = 1) -> bytes:
    """A PNG whose base64 is well past MIN_BASE64_CHARS (noise barely compresses)."""
    rng = random.Random(seed)
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


def noisy_jpeg() -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (160, 160), random.Random(3).randbytes(160 * 160 * 3)).save(out, format="JPEG", quality=95)
    return out.getvalue()


PNG = noisy_png()
B64 = base64.b64encode(PNG).decode()
assert len(B64) > 2 * embedded.MIN_BASE64_CHARS
assert len(noisy_jpeg()) * 4 // 3 > embedded.MIN_BASE64_CHARS


def corrupt_idat(png: bytes) -> bytes:
    """The PNG with one byte of its image data changed and the chunk's CRC fixed: only the
    inflate can tell."""
    start = png.index(b"IDAT") + 4
    data_len = int.from_bytes(png[start - 8 : start - 4], "big")
    data = bytearray(png[start : start + data_len])
    data[len(data) // 2] ^= 0xFF
    crc = zlib.crc32(b"IDAT" + bytes(data)).to_bytes(4, "big")
    return png[:start] + bytes(data) + crc + png[start + data_len + 4 :]


def splits(body: bytes, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    pieces, position = [], 0
    while position < len(body):
        size = rng.choice((1, 2, 3, 7, 100, 4096, 65536))
        pieces.append(body[position : position + size])
        position += size
    return pieces


def scanned(body: bytes, pieces: list[bytes] | None = None) -> embedded.EmbeddedJson | None:
    scan = JsonImageScan()
    for piece in pieces if pieces is not None else [body]:
        scan.feed(piece)
    return scan.finish(body)


def outcome(read):
    try:
        return ("ok", read())
    except Exception as error:  # noqa: BLE001 - the error itself is what is compared
        return ("error", type(error).__name__, str(error))


def call() -> CallContext:
    return CallContext(openai_backend.VENDOR, "openai", "gpt-image-2", SECRET)


def context() -> GenerationContext:
    import time

    return GenerationContext(deadline=time.monotonic() + 30)


def read_first_image(body: bytes, where: tuple) -> bytes:
    """What a backend does: parse, find the string, decode it, check it as a PNG."""
    with reading_answer(call()):
        value = json_object(body)
        for key in where:
            value = value[key]
        return to_png(b64_image(value, "the image"), context())


def both_ways(body: bytes, where: tuple, pieces: list[bytes] | None = None):
    """(plain outcome, scanned outcome) of reading the image at `where` from `body`."""
    forget_json(), forget_check()
    plain = outcome(lambda: read_first_image(body, where))
    found = scanned(body, pieces)
    if found is not None:
        remember_json(body, found)
    fast = outcome(lambda: read_first_image(body, where))
    forget_json(), forget_check()
    return plain, fast, found


BODIES = {
    "openai": (json.dumps({"created": 1, "data": [{"b64_json": B64}], "usage": {"total_tokens": 3}}), ("data", 0, "b64_json")),
    "gemini, spaced": (json.dumps({"candidates": [{"content": {"parts": [{"text": "é ✓ \"q\" \\"}, {"inlineData": {"mimeType": "image/png", "data": B64}}]}}]}, indent=2), ("candidates", 0, "content", "parts", 1, "inlineData", "data")),
    "escapes before": ('{"note": "a \\"quoted\\" \\\\ word\\n\\u00e9", "image": "' + B64 + '", "seed": 7}', ("image",)),
    "a string ending in a backslash before": ('{"path": "C:\\\\", "image": "' + B64 + '"}', ("image",)),
    "escaped slash in the base64": ('{"image": "' + B64.replace("/", "\\/") + '"}', ("image",)),
    "padding in the middle": ('{"image": "' + B64[:20002] + "==" + B64[20004:] + '"}', ("image",)),  # "ab==" decodes alone
    "whitespace in the base64": ('{"image": "' + B64[:20000] + " " + B64[20001:] + '"}', ("image",)),
    "unpadded": ('{"image": "' + B64.rstrip("=") + "A" * (len(B64) - len(B64.rstrip("="))) + 'Q"}', ("image",)),
    "a corrupt PNG": ('{"image": "' + base64.b64encode(corrupt_idat(PNG)).decode() + '"}', ("image",)),
    "a JPEG": ('{"image": "' + base64.b64encode(noisy_jpeg()).decode() + '"}', ("image",)),
    "not an image": ('{"image": "' + base64.b64encode(bytes(30000)).decode() + '"}', ("image",)),
    "duplicate keys, the last wins": ('{"image": "' + B64 + '", "image": "' + base64.b64encode(noisy_png(seed=2)).decode() + '"}', ("image",)),
    "the base64 as a key": ('{"' + B64 + '": 1, "image": "' + B64 + '"}', ("image",)),
    "a top-level array": ('[{"image": "' + B64 + '"}]', (0, "image")),
    "truncated JSON": ('{"data": [{"b64_json": "' + B64 + '"}', ("data", 0, "b64_json")),
    "an unterminated string": ('{"data": [{"b64_json": "' + B64, ("data", 0, "b64_json")),
    "invalid UTF-8 elsewhere": ('{"x": "\udcff", "image": "' + B64 + '"}', ("image",)),
}


# The bodies whose image string the scan decodes itself; the others go the plain way.
SCANNED = {"openai", "gemini, spaced", "escapes before", "a string ending in a backslash before", "a corrupt PNG",
           "a JPEG", "not an image", "duplicate keys, the last wins", "the base64 as a key", "a top-level array",
           "truncated JSON", "invalid UTF-8 elsewhere"}


@pytest.mark.parametrize("name", BODIES)
def test_the_scanned_read_is_the_plain_read(name):
    text, where = BODIES[name]
    body = text.encode("utf-8", "surrogateescape")
    for seed in range(3):
        plain, fast, found = both_ways(body, where, splits(body, seed))
        assert fast == plain, name
        assert (found is not None) == (name in SCANNED), name


def test_a_png_answer_is_decoded_and_checked_while_it_arrives():
    body = json.dumps({"data": [{"b64_json": B64}]}).encode()
    found = scanned(body, splits(body, 9))
    assert found is not None and len(found.strings) == 1
    remember_json(body, found)
    value = read_json(body)["data"][0]["b64_json"]
    assert isinstance(value, EmbeddedBase64) and value == f"[{len(B64)} characters of base64, decoded as they arrived]"
    assert value.decoded == PNG and value.check is not None
    assert value.check.result(value.decoded) == check_png(PNG)


def test_what_the_plain_path_reads_gets_no_placeholder():
    # Short strings, strings with escapes and non-base64 strings are parsed by json.loads.
    body = ('{"short": "QUJD", "text": "' + "a b " * 10000 + '", "escaped": "' + B64.replace("/", "\\/") + '"}').encode()
    assert scanned(body) is None


def test_a_body_with_too_many_strings_is_read_the_plain_way(monkeypatch):
    monkeypatch.setattr(embedded, "MAX_STRINGS", 5)
    body = json.dumps({"a": "1", "b": "2", "c": "3", "image": B64}).encode()
    assert scanned(body) is None
    monkeypatch.setattr(embedded, "MAX_STRINGS", 50)
    assert scanned(body) is not None


def test_a_body_with_too_many_escapes_is_read_the_plain_way(monkeypatch):
    monkeypatch.setattr(embedded, "MAX_ESCAPES", 10)
    body = json.dumps({"note": "\n" * 20, "image": B64}).encode()
    assert scanned(body) is None
    monkeypatch.setattr(embedded, "MAX_ESCAPES", 100)
    assert scanned(body) is not None


def test_a_remembered_scan_answers_only_for_its_own_body():
    body = json.dumps({"image": B64}).encode()
    remember_json(body, scanned(body))
    other = bytes(bytearray(body))  # equal, but not the body that was scanned
    assert not isinstance(read_json(other)["image"], EmbeddedBase64)
    assert not isinstance(read_json(body)["image"], EmbeddedBase64)  # taken once, by the first read


@responses.activate
def test_the_exchange_scans_a_json_answer_and_the_backend_reads_it():
    body = json.dumps({"data": [{"b64_json": B64}]}).encode()
    responses.add(responses.POST, "https://vendor.example/images", body=body, content_type="application/json")
    exchange = HttpExchange(new_session(), timeout_seconds=10, deadline_seconds=30)
    answer = exchange.send("POST", "https://vendor.example/images", call(), context(), json={})
    value = read_json(answer.body)["data"][0]["b64_json"]
    assert isinstance(value, EmbeddedBase64) and value.decoded == PNG


@responses.activate
def test_a_corrupt_png_in_a_json_answer_is_the_same_bad_answer():
    body = json.dumps({"data": [{"b64_json": base64.b64encode(corrupt_idat(PNG)).decode()}]}).encode()
    responses.add(responses.POST, "https://vendor.example/images", body=body, content_type="application/json")
    exchange = HttpExchange(new_session(), timeout_seconds=10, deadline_seconds=30)
    answer = exchange.send("POST", "https://vendor.example/images", call(), context(), json={})
    with pytest.raises(BadAnswer) as caught:
        read_first_image(answer.body, ("data", 0, "b64_json"))
    assert "image data does not inflate" in caught.value.message


def test_padding_that_ends_a_piece_is_still_padding_in_the_middle():
    # Decoded piece by piece, "...ab==" then "cdef..." would each decode alone.
    text, where = BODIES["padding in the middle"]
    body = text.encode()
    cut = body.index(b"==") + 2
    plain, fast, found = both_ways(body, where, [body[:cut], body[cut:]])
    assert fast == plain and plain[0] == "error" and found is None


def test_backends_decode_base64_only_through_the_toolkit():
    # An EmbeddedBase64's text is a note, not the base64: only toolkit.b64_image may read it.
    from pathlib import Path

    backends = Path(embedded.__file__).parent / "backends"
    for path in backends.rglob("*.py"):
        if path.name != "toolkit.py":
            text = path.read_text()
            assert "b64decode" not in text and "a2b_base64" not in text, path


def scanned_within(body: bytes, pieces: list[bytes], seconds: float = 10.0) -> embedded.EmbeddedJson | None:
    """The scan run on a thread of its own, so a scan that never ends fails the test, not the suite."""
    import threading

    result: list = []
    worker = threading.Thread(target=lambda: result.append(scanned(body, pieces)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"the scan did not end (pieces of {[len(p) for p in pieces]})"
    return result[0]


def test_a_piece_that_ends_on_a_backslash_inside_an_escaped_string():
    # Found by fuzzing: a piece ending on the first backslash of a pair left the scan looping.
    body = ('{"a": "x\\\\y", "image": "' + B64 + '"}').encode()
    for cut in range(1, 16):
        found = scanned_within(body, [body[:cut], body[cut:]])
        assert found is not None and len(found.strings) == 1, cut
    plain, fast, _found = both_ways(body, ("image",), [body[:9], body[9:]])
    assert fast == plain and plain[0] == "ok"


def test_mutated_answers_split_anywhere_read_as_the_plain_path_reads_them():
    """Differential fuzzing: answers with escapes, broken quotes, stray padding and bytes, cut
    into pieces of any size, give the plain path's value or refusal."""
    rng = random.Random(21)
    templates = [
        json.dumps({"data": [{"b64_json": B64}]}),
        json.dumps({"a": "x\\y \"q\"", "image": B64, "n": [1, 2.5, None, True]}),
        json.dumps([{"image": B64}, {"image": B64[:20000]}]),
    ]
    wheres = [("data", 0, "b64_json"), ("image",), (0, "image")]
    for _ in range(300):
        index = rng.randrange(len(templates))
        body = bytearray(templates[index].encode())
        for _ in range(rng.choice((0, 1, 2, 5))):
            at = rng.randrange(len(body))
            body[at:at + rng.choice((0, 1, 3))] = rng.choice([b"\\", b'"', b'\\"', b"=", b"==", b"\\\\", b" ", b"\xff", b"A"])
        body = bytes(body)
        pieces, position = [], 0
        while position < len(body):
            size = rng.choice((1, 2, 3, 5, 64, 1000, 16384, 10**7))
            pieces.append(body[position : position + size])
            position += size
        scanned_within(body, pieces)
        plain, fast, _found = both_ways(body, wheres[index], pieces)
        assert fast == plain, body[:80]
