"""Issue #11: the inputs an adversarial run used to get a 500, lose a paid image, or leak.

Each test names the defect it guards; each failed before its fix.
"""

from __future__ import annotations

import json

import pytest
import requests
import responses

from imagegen.errors import InvalidRequest
from imagegen.validation import parse_generation_request
from tests.fake_router import make_png
from tests.clients import parse_request

MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
URL = f"https://router.huggingface.co/hf-inference/models/{MODEL}"


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(URL, body=make_png(), content_type="image/png")
        yield rsps


# --- 1. lone UTF-16 surrogates ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"prompt": "x", "model": "\\ud800"}', "model"),
        (b'{"prompt": "x", "provider": "\\udfff"}', "provider"),
        (b'{"prompt": "x", "\\udc80": 1}', "\\udc80"),
        (b'{"prompt": "a \\ud800 fox"}', "prompt"),
        (b'{"prompt": "x", "negativePrompt": "\\ud83d"}', "negativePrompt"),
        (b'{"prompt": "x", "model": "\xed\xa0\x80"}', "model"),  # the surrogate as raw bytes
        (b'{"prompt": "\xed\xb2\x80 fox"}', "prompt"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field_before_any_upstream_call(make_app, mocked, body, field):
    answer = make_app().post("/api/generate-image", data=body, content_type="application/json")
    assert answer.status_code == 400 and answer.mimetype == "application/json"
    payload = answer.get_json()
    assert payload["code"] == "invalid_field" and payload["field"] == field
    assert len(mocked.calls) == 0
    answer.data.decode("utf-8")  # the answer itself is valid UTF-8


def test_a_proper_surrogate_pair_is_just_text(make_settings):
    request = parse_request('{"prompt": "a fox \\ud83e\\udd8a"}'.encode(), make_settings())
    assert request.prompt == "a fox \U0001f98a"


def test_echoing_a_surrogate_in_an_error_never_raises(make_settings):
    # The unknown-field and allow-list messages echo what was sent; they must stay encodable.
    for body in ('{"prompt": "x", "mod\\ud800el": 1}', '{"prompt": "x", "model": "a\\udc00b"}'):
        with pytest.raises(InvalidRequest) as caught:
            parse_request(body.encode(), make_settings())
        json.dumps({"error": caught.value.message, "field": caught.value.field}, ensure_ascii=False).encode("utf-8")


# --- 2. logging never fails a request ------------------------------------------------------

TRACE = "105445aa7843bc8bf206b12000100000"


@pytest.mark.parametrize(
    "header, span",
    [
        (f"{TRACE}/1;o=1", "0000000000000001"),
        (f"{TRACE}/18446744073709551615;o=1", "ffffffffffffffff"),  # the largest uint64
        (f"{TRACE}/18446744073709551616;o=1", None),  # one more: not a span id
        (f"{TRACE}/{'9' * 4301};o=1", None),  # past Python's int() digit limit
        (f"{TRACE}/١٢٣;o=1", None),  # Arabic-Indic digits are \d, and int() takes them
    ],
)
def test_a_cloud_trace_span_id_is_bounded(header, span):
    from imagegen.logs import trace_fields

    fields = trace_fields(header, None, "p")
    assert fields.get("logging.googleapis.com/spanId") == span


def test_a_huge_trace_span_id_still_gets_the_image_and_a_log_line(make_app, mocked, capsys):
    answer = make_app(GOOGLE_CLOUD_PROJECT="p").post(
        "/api/generate-image", json={"prompt": "x"}, headers={"X-Cloud-Trace-Context": f"{TRACE}/{'7' * 4301};o=1"}
    )
    assert answer.status_code == 200 and answer.get_json()["success"] is True
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"httpRequest"' in line]
    assert [line["httpRequest"]["status"] for line in lines] == [200]


def test_a_log_line_with_a_lone_surrogate_is_still_written_as_json(capsys):
    import logging

    from imagegen.logs import get_logger

    get_logger().log(logging.WARNING, "odd %s", "\udc80", extra={"fields": {"x": "\ud800"}})
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["message"] == "odd \udc80" and line["x"] == "\ud800"


# --- 14. whole numbers written as floats ------------------------------------------------------


def test_whole_numbers_written_as_floats_are_integers(make_settings):
    body = b'{"prompt": "x", "steps": 61.0, "height": 728.0, "width": 7.68e2, "seed": 4294967295.0}'
    request = parse_request(body, make_settings())
    assert (request.steps, request.height, request.width, request.seed) == (61, 728, 768, 4294967295)
    assert all(type(value) is int for value in (request.steps, request.height, request.width, request.seed))


@pytest.mark.parametrize(
    "field, raw",
    [("steps", "61.5"), ("steps", "NaN"), ("steps", "Infinity"), ("steps", "-Infinity"), ("steps", "true"),
     ("seed", "1e300"), ("seed", "4294967296.0"), ("height", "730.0"), ("width", "2056.0"), ("steps", "0.0")],
)
def test_other_floats_stay_refused_for_integer_fields(make_settings, field, raw):
    with pytest.raises(InvalidRequest) as caught:
        parse_request(f'{{"prompt": "x", "{field}": {raw}}}'.encode(), make_settings())
    assert caught.value.field == field


# --- 7. upstream delay hints are untrusted text ------------------------------------------------

from hypothesis import given, settings as hypothesis_settings, strategies as st  # noqa: E402

from imagegen.retry import (  # noqa: E402
    MAX_SERVER_DELAY_SECONDS,
    retry_info_delay,
    retry_after_ms,
    body_retry_after,
    server_delay_seconds,
)


@pytest.mark.parametrize(
    "header, body, expected",
    [
        ("²", b"", None),  # "²".isdigit() is True, int("²") raises
        ("١٢", b"", None),  # Arabic-Indic digits: int() takes them, a header must not
        ("9" * 5000, b"", None),  # past int()'s digit limit
        ("99999999999", b"", None),  # more digits than any sane delay
        ("9999999999", b"", MAX_SERVER_DELAY_SECONDS),
        ("Fri, 31 Dec 9999 23:59:59 GMT", b"", MAX_SERVER_DELAY_SECONDS),
        ("Mon, 99 Foo 99999999999 99:99:99 GMT", b"", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT" + " " * 5000, b"", 0),
        ("x" * 10_000, b"", None),
        (None, b'{"estimated_time": ' + b"9" * 400 + b"}", MAX_SERVER_DELAY_SECONDS),  # too big for a float
        (None, b"[" * 100_000, None),  # deeper than the JSON parser's recursion
        (None, b'{"estimated_time": 1e999}', None),
    ],
)
def test_retry_after_junk_never_raises(header, body, expected):
    assert server_delay_seconds(header, body) == expected


def test_retry_after_ms():
    assert retry_after_ms("1500") == 1.5
    assert retry_after_ms(" 250.5 ") == 0.2505
    assert retry_after_ms("9" * 13) == MAX_SERVER_DELAY_SECONDS
    for junk in (None, "", "-5", "1e3", "NaN", "inf", "²", "1,5", "9" * 5000, "1500ms"):
        assert retry_after_ms(junk) is None, junk


def gemini_body(*details) -> bytes:
    return json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": list(details)}}).encode()


RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def test_retry_info_delay():
    assert retry_info_delay(gemini_body({"@type": RETRY_INFO, "retryDelay": "26s"})) == 26
    other = {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []}
    assert retry_info_delay(gemini_body(other, {"@type": RETRY_INFO, "retryDelay": "1.5s"})) == 1.5
    assert retry_info_delay(gemini_body({"@type": RETRY_INFO, "retryDelay": "99999999999s"})) == MAX_SERVER_DELAY_SECONDS
    for junk in (
        b"", b"not json", b"[]", b'{"error": "x"}', b'{"error": {"details": {}}}', b"[" * 100_000,
        gemini_body({"@type": RETRY_INFO, "retryDelay": "26"}),
        gemini_body({"@type": RETRY_INFO, "retryDelay": "-3s"}),
        gemini_body({"@type": RETRY_INFO, "retryDelay": "²s"}),
        gemini_body({"@type": RETRY_INFO, "retryDelay": "9" * 5000 + "s"}),
        gemini_body({"@type": RETRY_INFO, "retryDelay": 26}),
        gemini_body({"@type": RETRY_INFO}),
        gemini_body({"retryDelay": "26s"}),
        gemini_body("26s", None, 3),
    ):
        assert retry_info_delay(junk) is None, junk[:80]


def test_body_retry_after():
    assert body_retry_after(b'{"title": "Too Many Requests", "status": 429, "retry_after": 7}') == 7
    assert body_retry_after(b'{"retry_after": 2.5}') == 2.5
    assert body_retry_after(b'{"retry_after": "3"}') == 3
    assert body_retry_after(b'{"retry_after": ' + b"9" * 4000 + b"}") == MAX_SERVER_DELAY_SECONDS
    assert body_retry_after(b'{"retry_after": -4}') == 0
    for junk in (b"", b"[1]", b'{"retry_after": true}', b'{"retry_after": NaN}', b'{"retry_after": "soon"}',
                 b'{"retry_after": null}', b"[" * 100_000, b'{"retry_after": "\xb2"}'):
        assert body_retry_after(junk) is None, junk[:80]


@hypothesis_settings(max_examples=300, deadline=None)
@given(header=st.one_of(st.none(), st.text(max_size=200)), body=st.binary(max_size=200))
def test_no_delay_hint_ever_raises_or_exceeds_the_ceiling(header, body):
    for delay in (server_delay_seconds(header, body), retry_after_ms(header),
                  retry_info_delay(body), body_retry_after(body)):
        assert delay is None or 0 <= delay <= MAX_SERVER_DELAY_SECONDS


# --- 5. a corrupt upstream PNG is refused ------------------------------------------------------

import io  # noqa: E402
import struct  # noqa: E402
import zlib  # noqa: E402

from PIL import Image  # noqa: E402

from imagegen.images import MAX_IMAGE_PIXELS, NotAnImage, check_png, ensure_png  # noqa: E402
from imagegen.images import _row_layout  # noqa: E402


def _inflated_size(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> int:
    layout = _row_layout(width, height, bits_per_pixel, interlaced)
    return layout[-1][1] if layout else 0

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


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


# --- 13. X-Forwarded-For is believed only where a proxy appends to it --------------------------

from imagegen.config import load_settings  # noqa: E402


@pytest.mark.parametrize(
    "env, hops",
    [
        ({}, 0),  # run locally or in a container of one's own: nothing in front
        ({"K_SERVICE": "imagegen"}, 1),  # Cloud Run / Cloud Functions gen2: its front end appends
        ({"K_SERVICE": "imagegen", "TRUSTED_PROXY_HOPS": "2"}, 2),  # an explicit value wins
        ({"TRUSTED_PROXY_HOPS": "1"}, 1),
        ({"K_SERVICE": "imagegen", "TRUSTED_PROXY_HOPS": "0"}, 0),
    ],
)
def test_trusted_proxy_hops_default_follows_where_it_runs(env, hops):
    assert load_settings(env).trusted_proxy_hops == hops


def test_locally_a_spoofed_forwarded_for_does_not_reset_the_rate_limit(make_app, mocked):
    app = make_app(RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="2")
    statuses = [
        app.post("/", json={"prompt": "x"}, headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code for n in range(5)
    ]
    assert statuses == [200, 200, 429, 429, 429]


def test_on_cloud_run_each_forwarded_caller_has_its_own_limit(make_app, mocked):
    app = make_app(RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="2", K_SERVICE="imagegen")
    statuses = [
        app.post("/", json={"prompt": "x"}, headers={"X-Forwarded-For": f"198.51.100.{n}"}).status_code for n in range(5)
    ]
    assert statuses == [200] * 5


# --- the rate limiter's clean-up is O(1) amortised --------------------------------------------

from collections import OrderedDict  # noqa: E402

import imagegen.state.ratelimit  # noqa: E402
from imagegen.state.ratelimit import RateLimiter  # noqa: E402


class CountingBuckets(OrderedDict):
    """Counts the buckets any clean-up looks at."""

    looked_at = 0

    def items(self):
        for item in super().items():
            CountingBuckets.looked_at += 1
            yield item


def test_forgetting_idle_callers_looks_at_few_buckets_per_call(monkeypatch):
    monkeypatch.setattr(imagegen.state.ratelimit, "MAX_TRACKED_CALLERS", 100)
    limiter = RateLimiter(per_minute=60, burst=1, clock=lambda: 0.0)
    limiter._buckets = CountingBuckets()
    CountingBuckets.looked_at = 0
    for caller in range(2000):  # all active at once: none may be forgotten, none need a look
        limiter.take(f"c{caller}")
    assert len(limiter._buckets) == 2000
    assert CountingBuckets.looked_at <= 2 * 2000  # a scan per call would be about 2 million


def test_idle_callers_are_forgotten_least_recently_used_first(monkeypatch):
    monkeypatch.setattr(imagegen.state.ratelimit, "MAX_TRACKED_CALLERS", 5)
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=1, clock=lambda: now[0])  # a bucket is full after 1 s
    for caller, at in (("a", 0.0), ("b", 0.5), ("c", 1.0), ("a", 1.2), ("d", 1.3), ("e", 1.4), ("f", 1.6)):
        now[0] = at
        limiter.take(caller)
    # b was idle for 1.1 s; a was used again at 1.2 s, so it sits behind c now.
    assert list(limiter._buckets) == ["c", "a", "d", "e", "f"]
    now[0] = 10.0
    limiter.take("g")
    assert list(limiter._buckets) == ["g"]


# --- the real server, over raw sockets -------------------------------------------------------

import socket  # noqa: E402
from urllib.parse import urlsplit  # noqa: E402

from tests.conftest import TEST_TOKEN  # noqa: E402


def raw_exchange(url: str, request: bytes, half_close: bool = False, timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send bytes as they are, read the answer to the end: (status, lower-cased headers, body)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((name.strip().lower(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:]))
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def function(run_function, router, tmp_path):
    return run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, IMAGE_DIR=str(tmp_path / "images"), HF_MAX_RETRIES="0"
    )


CHUNKED_HEAD = (
    b"POST /api/generate-image HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
)


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # a chunk size that is not hex
        b"3\r\nabcXX0\r\n\r\n",  # a chunk without its CRLF
        b"3;a\rb\r\nabc\r\n0\r\n\r\n",  # a bare CR in a chunk extension
        b'10\r\n{"prompt": "x"',  # the connection ends inside a chunk
    ],
    ids=["size-zz", "no-terminator", "bad-extension", "ends-early"],
)
def test_a_malformed_chunked_body_is_a_400(function, router, body):
    status, headers, answer = raw_exchange(function.url, CHUNKED_HEAD + body, half_close=True)
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(answer)["code"] == "invalid_body"
    assert not router.requests
    assert "Traceback" not in function.log()


def test_a_well_formed_chunked_body_still_works(function):
    body = json.dumps({"prompt": "a red fox"}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    status, _, answer = raw_exchange(function.url, CHUNKED_HEAD + chunked)
    assert status == 200 and json.loads(answer)["success"] is True


# --- 11. the framework's own answers are JSON ----------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "DELETE"])
@pytest.mark.parametrize("path", ["/robots.txt", "/favicon.ico"])
def test_the_frameworks_own_paths_answer_json(make_app, method, path):
    answer = make_app().open(path, method=method)
    assert answer.status_code == 404 and answer.mimetype == "application/json"
    if method != "HEAD":
        payload = answer.get_json()
        assert payload["success"] is False and payload["code"] == "not_found"
        assert payload["requestId"] == answer.headers["X-Request-Id"]


def test_a_crash_outside_the_handler_is_a_json_500_that_keeps_the_crash_marker(make_app, monkeypatch):
    import imagegen.http

    def broken_handler(*args, **kwargs):
        raise RuntimeError("a bug outside the handler's own error handling, with a secret: " + TEST_TOKEN)

    monkeypatch.setattr(imagegen.http.Handler, "__call__", broken_handler)
    answer = make_app().get("/openapi.yaml")
    assert answer.status_code == 500 and answer.mimetype == "application/json"
    assert answer.get_json()["code"] == "internal_error" and TEST_TOKEN not in answer.get_data(as_text=True)
    assert answer.headers["X-Google-Status"] == "crash"


def test_the_real_server_answers_robots_txt_as_json(function):
    status, headers, body = raw_exchange(function.url, b"GET /robots.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 404 and headers["content-type"] == "application/json"
    assert json.loads(body)["code"] == "not_found"


# --- 12. a client that sends part of a request head and stops ----------------------------------

import time  # noqa: E402


def test_stalled_request_heads_do_not_stop_the_instance(run_function, router, tmp_path):
    threads = 2
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN,
        HF_ROUTER_URL=router.url,
        IMAGE_DIR=str(tmp_path / "images"),
        THREADS=str(threads),
        REQUEST_HEAD_TIMEOUT_SECONDS="1",
    )
    parts = urlsplit(function.url)
    stalled = []
    try:
        for _ in range(3 * threads):  # every thread taken, three times over
            sock = socket.create_connection((parts.hostname, parts.port), timeout=5)
            sock.sendall(b"P")  # one byte of "POST ...", then nothing
            stalled.append(sock)
        started = time.monotonic()
        status, _, _ = raw_exchange(function.url, b"OPTIONS / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout=15)
        took = time.monotonic() - started
    finally:
        for sock in stalled:
            sock.close()
    assert status == 204
    # Three rounds of 1 s head timeouts, plus slack for a loaded machine: seconds, not forever.
    assert took < 8, took
    assert "Traceback" not in function.log()


# --- 4. Cloud Storage unreachable: storage calls fit a time budget ---------------------------

import threading  # noqa: E402

from imagegen.errors import StorageError  # noqa: E402
from imagegen.png_info import PngParts  # noqa: E402
from imagegen.storage import LOAD_BUDGET_SECONDS, GcsImageStore, ImageMetadata, LocalImageStore  # noqa: E402
from tests.servers import free_port  # noqa: E402

METADATA = ImageMetadata(model="owner/model", prompt="a red fox", seed=7)


@pytest.fixture
def silent_storage(monkeypatch):
    """A port that accepts connections and never answers: Cloud Storage as seen through a
    black-holed network. The client is pointed at it as at the emulator."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    yield url
    stop.set()
    thread.join(timeout=5)
    listener.close()
    for sock in held:
        sock.close()


@pytest.fixture
def refused_storage(monkeypatch):
    """A port nothing listens on: Cloud Storage down, or the emulator stopped."""
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    return url


def timed(call):
    started = time.monotonic()
    try:
        return call(), time.monotonic() - started
    except Exception as error:  # noqa: BLE001 - the caller looks at what was raised
        return error, time.monotonic() - started


@pytest.mark.parametrize("unreachable", ["silent_storage", "refused_storage"])
def test_a_cache_lookup_gives_up_within_its_budget(request, unreachable):
    url = request.getfixturevalue(unreachable)
    found, took = timed(lambda: GcsImageStore("images-bucket", "images/").load("seeded/x-1234"))
    assert found is None
    assert took < LOAD_BUDGET_SECONDS + 2, took  # was 72 s and more with the client's default retry
    found, took = timed(lambda: GcsImageStore("images-bucket", "images/").load("seeded/x-1234", budget_seconds=1))
    assert found is None and took < 3, took
    assert url  # the fixture pointed the client there


@pytest.mark.parametrize("unreachable", ["silent_storage", "refused_storage"])
def test_a_save_gives_up_within_the_budget_it_is_given_and_says_so_plainly(request, unreachable, capsys):
    url = request.getfixturevalue(unreachable)
    error, took = timed(
        lambda: GcsImageStore("images-bucket", "images/").save(PngParts.of(make_png()), "n", METADATA, budget_seconds=2)
    )
    assert isinstance(error, StorageError) and took < 4, (error, took)
    assert str(error) == "Cloud Storage did not answer in time"
    # The details are for the operator: in the log, not in the caller's warning.
    log = capsys.readouterr().out
    assert "images-bucket/images/n.png" in log and "Storage upload failed" in log
    port = url.rsplit(":", 1)[1]
    assert port not in str(error) and "127.0.0.1" not in str(error)


def test_a_local_write_failure_does_not_show_the_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the directory should be")
    with pytest.raises(StorageError) as caught:
        LocalImageStore(blocker, 3).save(PngParts.of(make_png()), "n", METADATA)
    assert str(tmp_path) not in str(caught.value) and "IMAGE_DIR" in str(caught.value)



# --- elsewhere: the certificate cache's max-age is untrusted text too ----------------------------

from imagegen.auth import MAX_CERTS_MAX_AGE_SECONDS, CachingCertsRequest  # noqa: E402


@pytest.mark.parametrize(
    "cache_control, kept_for",
    [
        ("public, max-age=21600", 21600),
        ("max-age=" + "9" * 400, 3600),  # more digits than any age: ignored, as if absent
        ("max-age=99999999", MAX_CERTS_MAX_AGE_SECONDS),
        ("max-age=٣٦٠٠", 3600),  # Arabic-Indic digits: \d matched them
        ("no-cache", 3600),
    ],
)
def test_a_certificate_answers_max_age_is_bounded(cache_control, kept_for):
    import types

    import requests as requests_library

    now = [1000.0]
    fetches = []
    transport = CachingCertsRequest(requests_library.Session(), clock=lambda: now[0])
    answer = types.SimpleNamespace(status=200, headers={"Cache-Control": cache_control}, data=b"{}")
    transport._inner = lambda *args, **kwargs: fetches.append(1) or answer
    assert transport("https://certs.example/") is answer
    now[0] += kept_for - 1
    transport("https://certs.example/")
    now[0] += 2
    transport("https://certs.example/")
    assert len(fetches) == 2  # kept for exactly `kept_for` seconds, then fetched again


# --- elsewhere: what runs after the upstream was paid must not raise on odd text --------------

from imagegen.cache import cache_key  # noqa: E402
from imagegen.domain import GeneratedImage, GenerationRequest, Route  # noqa: E402
from imagegen.png_info import embed_parameters, png_text  # noqa: E402

IDENTITY = "huggingface https://router.huggingface.co 0123456789abcdef hf-inference"


def test_embedding_parameters_never_raises_on_text_utf8_cannot_hold():
    # Validation refuses such a prompt now; the embedding must not depend on that.
    generation = GenerationRequest(prompt="a \ud800 fox 東京", model=MODEL, seed=1)
    image = GeneratedImage(make_png(), Route("huggingface", MODEL, "hf-inference"), seed=1)
    png = embed_parameters(image, generation).tobytes()
    check_png(png)
    assert pillow_reads(png)
    assert cache_key(generation, IDENTITY, MODEL)  # and the cache key is computed too


def test_the_cache_key_of_valid_text_is_unchanged():
    # Stored images are found by this key: for any valid text it must stay what it was.
    import hashlib

    generation = GenerationRequest(prompt="a red fox, 東京 🦊", model=MODEL, negative_prompt="blurry", seed=42)
    recipe = {
        "v": 2, "backend": IDENTITY, "provider": None, "model": MODEL, "prompt": generation.prompt,
        "negativePrompt": "blurry", "width": None, "height": None, "steps": None, "guidanceScale": None, "seed": 42,
    }
    canonical = json.dumps(recipe, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert cache_key(generation, IDENTITY, MODEL) == hashlib.sha256(canonical.encode()).hexdigest()[:40]


def test_a_log_line_that_fails_never_costs_the_answer(make_app, monkeypatch):
    import imagegen.http

    def broken_log(*args, **kwargs):
        raise RuntimeError("a bug in the log line")

    monkeypatch.setattr(imagegen.http.AccessLog, "_write", broken_log)
    answer = make_app().get("/openapi.yaml")
    assert answer.status_code == 200
