"""Every outbound call ends by its deadline, whatever the peer does (tests/trickle.py).

Each test gives a call a deadline of a second or two against a peer that would hold it for
`give_up` (8 s), and checks the call returned within its deadline + 1 s, with the right error.
"""

from __future__ import annotations

import threading
import time
import zlib

import pytest

from imagegen import outbound
from imagegen.auth import IdTokenAuth, Unauthorized
from imagegen.backends.base import GenerationContext
from imagegen.backends.huggingface.mapping import ProviderMapping
from imagegen.backends.openai import VENDOR
from imagegen.backends.vendor import CallContext
from imagegen.backends.vertex import AccessTokens
from imagegen.errors import StorageError, UpstreamError, UpstreamTimeout
from imagegen.outbound import HttpExchange, OutboundFailure, new_session
from imagegen.png_info import PngParts
from imagegen.storage import GcsImageStore, ImageMetadata
from tests.fake_router import make_png
from tests.trickle import Trickle

DEADLINE = 1.5
SLACK = 1.0


def context(seconds: float = DEADLINE) -> GenerationContext:
    return GenerationContext(deadline=time.monotonic() + seconds)


def call() -> CallContext:
    return CallContext(VENDOR, "openai", "gpt-image-1", None)


def timed(action):
    started = time.monotonic()
    try:
        return action(), time.monotonic() - started
    except Exception as error:  # noqa: BLE001 - the test looks at what it was
        return error, time.monotonic() - started


@pytest.fixture
def exchange():
    return HttpExchange(new_session(), timeout_seconds=60, deadline_seconds=DEADLINE)


@pytest.mark.parametrize("mode", ["trickle", "deflate", "error503", "head", "hang"])
def test_a_vendor_call_ends_by_its_deadline(exchange, mode):
    with Trickle(mode) as peer:
        outcome, took = timed(lambda: exchange.send("POST", peer.url + "/v1/images", call(), context(), json={}))
    assert isinstance(outcome, UpstreamTimeout), outcome
    assert took < DEADLINE + SLACK, took


@pytest.mark.parametrize("mode", ["trickle", "deflate", "hang"])
def test_an_image_download_ends_by_its_deadline(exchange, mode):
    with Trickle(mode) as peer:
        outcome, took = timed(lambda: exchange.download(peer.url + "/x.png", call(), context(), allow_loopback=True))
    assert isinstance(outcome, UpstreamTimeout), outcome
    assert took < DEADLINE + SLACK, took


def test_a_deflate_bomb_stops_at_the_image_cap(exchange):
    with Trickle("bomb") as peer:
        outcome, took = timed(lambda: exchange.send("POST", peer.url, call(), context(5), json={}))
    assert isinstance(outcome, UpstreamError) and "larger than" in outcome.message, outcome
    assert took < 5


def test_an_unknown_content_encoding_is_refused(exchange):
    with Trickle("brotli") as peer:
        outcome, _ = timed(lambda: exchange.send("POST", peer.url, call(), context(5), json={}))
    assert isinstance(outcome, UpstreamError) and outcome.code == "upstream_bad_response", outcome
    assert "encoding" in outcome.message


def test_a_deflated_answer_is_decoded_zlib_or_raw():
    assert outbound._Decoder("deflate").feed(zlib.compress(b"abc" * 1000), 10_000) == b"abc" * 1000
    raw = zlib.compressobj(wbits=-15)
    packed = raw.compress(b"xyz" * 1000) + raw.flush()
    assert outbound._Decoder("deflate").feed(packed, 10_000) == b"xyz" * 1000
    with pytest.raises(OutboundFailure) as caught:
        outbound._Decoder("deflate").feed(packed, 100)
    assert caught.value.kind == "too_large"


def test_fetch_without_a_peer_answer_is_a_timeout():
    with Trickle("trickle") as peer:
        outcome, took = timed(lambda: outbound.fetch(new_session(), "GET", peer.url, DEADLINE))
    assert isinstance(outcome, OutboundFailure) and outcome.kind == "timeout", outcome
    assert took < DEADLINE + SLACK


def test_a_pooled_connection_is_not_cut_by_an_earlier_calls_deadline():
    """A finished call's deadline passes while its pooled connection serves the next call:
    the watchdog must leave that connection alone."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    connections = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self):
            connections.append(1)
            super().setup()

        def do_GET(self):
            if self.path == "/slow":
                threading.Event().wait(0.8)  # the peer's pace, not a test race: well under 5 s
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        session = new_session()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert outbound.fetch(session, "GET", url + "/fast", 0.3).body == b"ok"
        assert outbound.fetch(session, "GET", url + "/slow", 5).body == b"ok"
    finally:
        server.shutdown()
        server.server_close()
    assert len(connections) == 1  # the second call did reuse the first one's connection


# --- the other callers: Hub, token endpoint, certificates, storage -------------------------


@pytest.mark.parametrize("mode", ["trickle", "hang"])
def test_the_hub_lookup_ends_by_the_request_deadline(make_settings, mode):
    with Trickle(mode) as hub:
        mapping = ProviderMapping(hub.url, 600, new_session())
        outcome, took = timed(lambda: mapping.routes("owner/model", "auto", "hf_x", time.monotonic, DEADLINE))
    # `auto` falls back to hf-inference when the Hub cannot be asked.
    assert [route.provider for route in outcome] == ["hf-inference"], outcome
    assert took < DEADLINE + SLACK, took


def test_the_hub_lookup_follows_no_redirect_to_another_host(make_settings):
    import responses

    with responses.RequestsMock() as mocked:
        mocked.get("https://hub.example/api/models/owner/model", status=307, headers={"Location": "https://evil.example/x"})
        mapping = ProviderMapping("https://hub.example", 600, new_session())
        with pytest.raises(UpstreamError) as caught:
            mapping.routes("owner/model", "fal-ai", "hf_secret", time.monotonic, 5)
        assert [c.request.url.split("?")[0] for c in mocked.calls] == ["https://hub.example/api/models/owner/model"]
    assert caught.value.code == "upstream_unavailable"


class _HangingCredentials:
    """google-auth credentials whose refresh asks a token endpoint (the trickle peer)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.token: str | None = None
        self.valid = False
        self.refreshes = 0

    def refresh(self, request) -> None:
        self.refreshes += 1
        response = request(self.url, method="POST", body=b"grant_type=x")
        self.token, self.valid = response.data.decode()[:10], True


@pytest.mark.parametrize("mode", ["trickle", "hang"])
def test_a_hanging_token_endpoint_holds_no_waiter_past_its_deadline(mode):
    with Trickle(mode) as endpoint:
        tokens = AccessTokens(new_session(), HttpExchange(new_session(), 60, DEADLINE))
        tokens._credentials = _HangingCredentials(endpoint.url + "/token")
        results: dict[str, tuple[object, float]] = {}

        def ask(name: str, seconds: float) -> None:
            results[name] = timed(lambda: tokens.token(call(), context(seconds)))

        first = threading.Thread(target=ask, args=("long", 3.0))
        first.start()
        # The second caller arrives while the first one's refresh is in flight.
        deadline = time.monotonic() + 5
        while tokens._refreshing is None and time.monotonic() < deadline:
            time.sleep(0.01)
        ask("short", 1.0)
        first.join(timeout=10)
    short, short_took = results["short"]
    long, long_took = results["long"]
    assert isinstance(short, UpstreamTimeout) and short_took < 1.0 + SLACK, results
    assert isinstance(long, UpstreamTimeout) and long_took < 3.0 + SLACK, results


def test_a_trickling_certificate_endpoint_is_a_prompt_401(monkeypatch):
    monkeypatch.setattr("imagegen.auth.CERTS_TIMEOUT_SECONDS", DEADLINE)
    with Trickle("trickle") as certs:
        auth = IdTokenAuth("google", "https://fn.example", certs.url + "/certs", new_session())
        outcome, took = timed(lambda: auth.authenticate({"Authorization": "Bearer a.b.c"}, "1.2.3.4"))
    assert isinstance(outcome, Unauthorized), outcome
    assert took < DEADLINE + SLACK, took


@pytest.mark.parametrize("mode", ["trickle", "hang"])
def test_a_slow_cloud_storage_is_cut_at_the_storage_budget(monkeypatch, mode):
    with Trickle(mode) as gcs:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        store = GcsImageStore("b-images", "images/")
        png = PngParts.of(make_png())
        saved, save_took = timed(lambda: store.save(png, "n", ImageMetadata("m", "a fox", 1), budget_seconds=DEADLINE))
        loaded, load_took = timed(lambda: store.load("n", budget_seconds=DEADLINE))
    assert isinstance(saved, StorageError) and save_took < DEADLINE + SLACK, (saved, save_took)
    assert loaded is None and load_took < DEADLINE + SLACK, load_took


def test_a_slow_front_for_the_real_emulator_is_cut_at_the_budget(storage_emulator, monkeypatch):
    from urllib.parse import urlsplit

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_emulator.url)
    from google.cloud import storage

    bucket = storage.Client().create_bucket("outbound-slow-front")
    GcsImageStore(bucket.name, "").save(PngParts.of(make_png()), "n", ImageMetadata("m", "a fox", 1), budget_seconds=5)
    emulator = urlsplit(storage_emulator.url)
    with Trickle("front", interval=0.05, upstream=(emulator.hostname, emulator.port)) as front:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", front.url)
        store = GcsImageStore(bucket.name, "")
        png = PngParts.of(make_png())
        saved, save_took = timed(lambda: store.save(png, "m", ImageMetadata("m", "a fox", 1), budget_seconds=DEADLINE))
        loaded, load_took = timed(lambda: store.load("n", budget_seconds=DEADLINE))
    assert isinstance(saved, StorageError) and save_took < DEADLINE + SLACK, (saved, save_took)
    assert loaded is None and load_took < DEADLINE + SLACK, (loaded, load_took)


def test_cloud_storage_still_works_through_the_exchange(storage_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_emulator.url)
    from google.cloud import storage

    bucket = storage.Client().create_bucket("outbound-test")
    store = GcsImageStore(bucket.name, "")
    png = make_png()
    assert store.save(PngParts.of(png), "n", ImageMetadata("m", "a fox", 1), budget_seconds=5) == "gs://outbound-test/n.png"
    assert store.load("n", budget_seconds=5) == (png, "gs://outbound-test/n.png")
    assert isinstance(store._bucket.client._http.adapters["http://"], outbound.DeadlineAdapter)
