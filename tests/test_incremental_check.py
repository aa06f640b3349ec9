"""The PNG check fed in pieces (PngCheck, as a body arrives) says exactly what the check of the
whole bytes said before it existed, whatever the split: same refusals, same messages, same
chunks dropped. And a body read by the outbound exchange is checked while it arrives, once."""

import io
import socket
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imagegen import images, outbound
from imagegen.images import NotAnImage, PngCheck, _ImageData, _name, _without, check_png
from imagegen.imaging import Chunk, TEXT_CHUNKS, TruncatedPng, walk_chunks
from tests import test_images as ti
from tests import test_png_check as tp
from tests.fake_router import make_png
from tests.standin import make_image


def reference_check(data: bytes) -> bytes:
    """check_png as it was before PngCheck (core at cb5d565), verbatim but for its name."""
    view = memoryview(data)
    image_data = None
    palette = False
    previous = b""
    dropped: list[Chunk] = []
    try:
        for chunk in walk_chunks(view):
            kind = chunk.kind
            if image_data is None and (kind != b"IHDR" or chunk.length != 13):
                raise NotAnImage("a PNG without a valid IHDR header")
            (crc,) = struct.unpack_from(">I", data, chunk.data_end)
            if zlib.crc32(view[chunk.start + 4 : chunk.data_end]) != crc:
                raise NotAnImage(f"a corrupt PNG (the {_name(kind)} chunk at byte {chunk.start} fails its CRC)")
            if image_data is None:
                image_data = _ImageData(*struct.unpack_from(">IIBBBBB", data, chunk.data_start))
            elif kind == b"IDAT":
                if previous != b"IDAT" and image_data.started:
                    raise NotAnImage("a corrupt PNG (its IDAT chunks are not consecutive)")
                image_data.feed(view[chunk.data_start : chunk.data_end])
            elif kind == b"IEND":
                image_data.finish()
                if image_data.color == 3 and not palette:
                    raise NotAnImage("a corrupt PNG (a palette image without a PLTE chunk)")
                return _without(data, tuple(dropped), chunk.end)
            elif kind == b"PLTE":
                if palette or image_data.started or image_data.color in (0, 4):
                    raise NotAnImage("a corrupt PNG (a PLTE chunk where none may be)")
                palette = True
            elif kind in TEXT_CHUNKS:
                dropped.append(chunk)
            elif kind == b"IHDR" or not kind[0] & 0x20:
                raise NotAnImage(f"a corrupt PNG (an unexpected {_name(kind)} chunk at byte {chunk.start})")
            previous = kind
    except TruncatedPng as error:
        raise NotAnImage(f"a truncated PNG ({len(data)} bytes, {error})") from None
    raise NotAnImage(f"a truncated PNG ({len(data)} bytes, no IEND chunk)")


def outcome(check, data: bytes):
    try:
        return ("kept", bytes(check(data)))
    except NotAnImage as refusal:
        return (type(refusal).__name__, str(refusal))


def fed_in_pieces(cuts: list[int]):
    def check(data: bytes) -> bytes:
        checker = PngCheck()
        edges = [0, *sorted({cut % (len(data) + 1) for cut in cuts}), len(data)]
        view = memoryview(data)
        for begin, end in zip(edges, edges[1:]):
            checker.feed(view[begin:end])
        return checker.finish().result(data)

    return check


def _pillow_png(**save) -> bytes:
    out = io.BytesIO()
    Image.effect_noise((300, 200), 40).convert("RGB").save(out, format="PNG", compress_level=1)
    if save:
        out = io.BytesIO()
        Image.new("P", (37, 11)).save(out, format="PNG", **save)
    return out.getvalue()


def corpus() -> list[bytes]:
    """Every PNG tests/test_png_check.py and tests/test_images.py check, sound or broken."""
    pngs: list[bytes] = []
    for module in (ti, tp):  # their parametrized bytes: broken PNGs, extra chunks, image data
        for test in vars(module).values():
            for mark in getattr(test, "pytestmark", []):
                if mark.name == "parametrize":
                    for values in mark.args[1]:
                        for value in values if isinstance(values, tuple) else (values,):
                            if isinstance(value, bytes) and value.startswith(ti.SIGNATURE):
                                pngs.append(value)
    real = make_png(64, 64)
    raw = ti.raw_png(64, 64)
    idat = [d for k, d in ti.chunks(raw) if k == b"IDAT"][0]
    pngs += [
        make_png(300, 200),
        make_png() + b"trailing",
        make_png()[:-12],
        make_png()[:60],
        ti.SIGNATURE,
        ti.flip(real, b"IDAT", 40),
        ti.flip(real, b"IHDR", 2),
        ti.recrc(real, b"IDAT", lambda d: d[:20] + bytes(b ^ 0x55 for b in d[20:40]) + d[40:]),
        ti.recrc(raw, b"IDAT", lambda d: d[:-6]),
        ti.recrc(raw, b"IHDR", lambda d: struct.pack(">II", 60000, 60000) + d[8:]),
        ti.build([ti.chunks(raw)[0], (b"IDAT", idat[:10]), (b"tEXt", b"a\x00b"), (b"IDAT", idat[10:]), (b"IEND", b"")]),
        ti.build([ti.chunks(raw)[0], (b"IDAT", idat[:10]), (b"IDAT", b""), (b"IDAT", idat[10:]), (b"IEND", b"")]),
        _pillow_png(),
        _pillow_png(optimize=True),
    ]
    wrong_length = bytearray(real)
    wrong_length[33:37] = (10**6).to_bytes(4, "big")
    pngs.append(bytes(wrong_length))
    for depth, color in [(8, 2), (16, 6), (1, 0), (4, 3), (8, 4), (2, 0)]:
        for interlace in (0, 1):
            pngs.append(ti.raw_png(9, 9, depth, color, interlace))
    pngs += [
        tp.png_from_rows(16, 4, tp.plain_rows(16, 4, 4)),
        tp.png_from_rows(8, 8, tp.adam7_rows(), interlace=1),
        tp.png_from_rows(16, 4, tp.plain_rows(16, 4, 5)),
        *(tp.png_from_rows(8, 8, tp.adam7_rows(bad), interlace=1) for bad in range(1, 8)),
        tp.png_from_rows(16, 16, [b"\x01" + bytes([200]) * 3 * 16 for _ in range(16)]),
        tp.png_from_rows(16, 4, tp.plain_rows(16, 4, channels=1), color=3),
        tp.png_from_rows(16, 4, tp.plain_rows(16, 4, channels=1), color=3, extra=tp.chunk(b"PLTE", bytes(6))),
    ]
    plain = tp.png_from_rows(16, 4, tp.plain_rows(16, 4))
    for extra in (tp.ihdr(16, 4), tp.chunk(b"PLTE", bytes(6)) * 2, tp.chunk(b"ABCD", b"x")):
        pngs.append(tp.png_from_rows(16, 4, tp.plain_rows(16, 4), extra=extra))
    row_bytes = 64 * (1 + 64 * 3)
    for data in (b"\x00" * (row_bytes - 1), b"\x00" * (row_bytes + 1), b"", b"\x00" * 10_000_000):
        pngs.append(ti.raw_png(64, 64, data=data))
    for header in [(8, 8, 3, 2, 0, 0, 0), (8, 8, 8, 5, 0, 0, 0), (8, 8, 16, 3, 0, 0, 0), (8, 8, 8, 2, 1, 0, 0), (8, 8, 8, 2, 0, 0, 2)]:
        ihdr = struct.pack(">IIBBBBB", *header)
        pngs.append(ti.build([(b"IHDR", ihdr), (b"IDAT", zlib.compress(b"\x00" * 1000)), (b"IEND", b"")]))
    iend = plain.rindex(b"IEND") - 4
    pngs.append(plain[:iend] + tp.chunk(b"PLTE", bytes(6)) + plain[iend:])
    image = make_image(64, 64)
    texts = tp.chunk(b"tEXt", b"provider\0evil") + tp.chunk(b"zTXt", b"seed\0\0" + zlib.compress(b"1"))
    pngs += [
        image + b"<html>" + b"x" * 2000 + b"</html>",
        image[:33] + texts + tp.chunk(b"gAMA", struct.pack(">I", 45455)) + image[33:],
        image[:33] + tp.chunk(b"tEXt", b"provider\0evil-provider") + image[33:] + b"<html>tail</html>",
    ]
    return pngs


CORPUS = corpus()
def _bad_row_deep_inside() -> bytes:
    rows = tp.plain_rows(2048, 256)
    rows[200] = b"\x07" + rows[200][1:]
    return tp.png_from_rows(2048, 256, rows)


# Larger than one inflated piece (256 KiB): a bad row far in, and a sound 1024x1024 image.
LARGE = [_bad_row_deep_inside(), make_image(1024, 1024, seed="large")]


def test_the_corpus_has_sound_and_broken_pngs_of_every_kind():
    verdicts = {outcome(reference_check, png)[0] for png in CORPUS}
    assert verdicts == {"kept", "NotAnImage"} and len(CORPUS) > 60


@pytest.mark.parametrize("png", CORPUS + LARGE)
def test_check_png_says_what_the_whole_bytes_check_said(png):
    assert outcome(check_png, png) == outcome(reference_check, png)


@pytest.mark.parametrize("png", CORPUS)
def test_one_byte_at_a_time_says_the_same(png):
    assert outcome(fed_in_pieces(list(range(len(png)))), png) == outcome(reference_check, png)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(0, len(CORPUS) - 1),
    cuts=st.lists(st.integers(0, 2**20), max_size=12),
    damage=st.one_of(
        st.none(),
        st.tuples(st.just("truncate"), st.integers(0, 2**20)),
        st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(1, 255)),
    ),
)
def test_any_split_of_any_png_or_damaged_png_says_the_same(index, cuts, damage):
    png = CORPUS[index]
    if damage is not None and png:
        at = damage[1] % len(png)
        png = png[:at] if damage[0] == "truncate" else png[:at] + bytes([png[at] ^ damage[2]]) + png[at + 1 :]
    assert outcome(fed_in_pieces(cuts), png) == outcome(reference_check, png)


@settings(max_examples=25, deadline=None)
@given(index=st.integers(0, len(LARGE) - 1), cuts=st.lists(st.integers(0, 2**22), max_size=40))
def test_large_pngs_split_anywhere_say_the_same(index, cuts):
    assert outcome(fed_in_pieces(cuts), LARGE[index]) == outcome(reference_check, LARGE[index])


# --- the exchange checks a PNG body while it arrives ------------------------------------------


class _HalfThenRest(BaseHTTPRequestHandler):
    """Sends the first half of its PNG, waits until the test lets it go on, then the rest."""

    png = b""
    go_on = threading.Event()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        half = len(self.png) // 2
        self.wfile.write(self.png[:half])
        self.wfile.flush()
        self.go_on.wait(10)
        self.wfile.write(self.png[half:])

    def log_message(self, *args):
        pass


@pytest.fixture
def half_server():
    _HalfThenRest.png = make_image(512, 512, seed="stream")
    _HalfThenRest.go_on = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HalfThenRest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        _HalfThenRest.go_on.set()
        server.shutdown()
        server.server_close()


def test_a_png_body_is_checked_while_it_arrives_and_not_again(half_server, monkeypatch):
    fed = []
    first_piece_checked = threading.Event()
    original_feed = PngCheck.feed

    def spy(self, piece):
        original_feed(self, piece)
        fed.append(len(piece))
        first_piece_checked.set()

    monkeypatch.setattr(PngCheck, "feed", spy)
    seen = {}

    def read_then_check():  # as a backend does: in the thread that read the body
        answer = outbound.fetch(outbound.new_session(), "GET", url, 10, limit=2**24)
        seen["answer"], seen["fed"] = answer, len(fed)
        seen["kept"] = check_png(answer.body)
        seen["fed after"] = len(fed)
        check_png(bytes(bytearray(answer.body)))
        seen["fed for a copy"] = len(fed)

    url = f"http://127.0.0.1:{half_server.server_address[1]}/image.png"
    reader = threading.Thread(target=read_then_check)
    reader.start()
    try:
        # The first half is checked before the second half has even been sent.
        assert first_piece_checked.wait(10)
        assert sum(fed) <= len(_HalfThenRest.png) // 2
    finally:
        _HalfThenRest.go_on.set()
        reader.join(10)
    answer = seen["answer"]
    assert answer.body == _HalfThenRest.png and sum(fed[: seen["fed"]]) == len(answer.body)
    # check_png on those very bytes takes the verdict reached while they arrived: no second walk.
    assert seen["kept"] is answer.body and seen["fed after"] == seen["fed"]
    # Other bytes, even equal ones, are checked afresh: the verdict belongs to one object.
    assert seen["fed for a copy"] == seen["fed"] + 1


def test_a_refusal_reached_while_arriving_is_the_one_check_png_gives(half_server):
    png = make_image(256, 256, seed="broken")
    broken = ti.flip(png, b"IDAT", 100)
    _HalfThenRest.png = broken
    _HalfThenRest.go_on.set()
    url = f"http://127.0.0.1:{half_server.server_address[1]}/broken.png"
    answer = outbound.fetch(outbound.new_session(), "GET", url, 10, limit=2**24)
    assert images._checked._local.entry[0] is answer.body
    assert outcome(check_png, answer.body) == outcome(reference_check, broken)
    assert images._checked._local.entry is None  # taken once


def test_each_piece_of_a_png_body_is_acknowledged_at_once(half_server, monkeypatch):
    # While a piece is being checked the next waits unread and Linux would delay its ACK by up
    # to 40 ms: a sender without TCP_NODELAY then holds its last segment that long.
    sockets = []
    first = threading.Event()
    monkeypatch.setattr(outbound, "_ack_at_once", lambda sock: (sockets.append(sock), first.set()))
    answers = []
    url = f"http://127.0.0.1:{half_server.server_address[1]}/image.png"
    reader = threading.Thread(target=lambda: answers.append(outbound.fetch(outbound.new_session(), "GET", url, 10, limit=2**24)))
    reader.start()
    try:
        assert first.wait(10)  # the first half, while the rest is still to come
    finally:
        _HalfThenRest.go_on.set()
        reader.join(10)
    assert answers[0].body == _HalfThenRest.png
    assert isinstance(sockets[0], socket.socket), sockets
