"""Image downloads reach public addresses only, checked after resolving, on every hop, with one
error text whatever was refused or failed (a different text per failure is a port scanner)."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from imagegen import outbound
from imagegen.backends.base import GenerationContext
from imagegen.backends.openai import VENDOR
from imagegen.backends.vendor import CallContext
from imagegen.outbound import DOWNLOAD_REFUSED, BadDownload, HttpExchange, Reach, new_session
from tests.fake_router import make_png

PNG = make_png()


def context() -> GenerationContext:
    return GenerationContext(deadline=time.monotonic() + 5)


def call() -> CallContext:
    return CallContext(VENDOR, "openai", "gpt-image-1", None)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.8.9.10", "::1", "169.254.169.254", "fe80::1", "10.0.0.1", "172.16.0.1",
        "192.168.1.1", "fc00::1", "fd12:3456::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "0.0.0.0", "::",
        "100.64.0.1", "224.0.0.1",
    ],
)
def test_internal_addresses_are_refused(address):
    assert Reach().refusal(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.1.1", "2001:4860:4860::8888"])
def test_public_addresses_are_allowed(address):
    assert Reach().refusal(address) is None


def test_a_loopback_stand_in_may_be_reached_and_nothing_else_internal():
    reach = Reach(allow_loopback=True)
    assert reach.refusal("127.0.0.1") is None and reach.refusal("::ffff:127.0.0.1") is None
    assert reach.refusal("169.254.169.254") and reach.refusal("10.0.0.1")


class _Listener:
    """A loopback listener that counts connections: what the check must keep anyone from reaching."""

    def __enter__(self) -> "_Listener":
        self.accepted = 0
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def __exit__(self, *exc: object) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)


def resolver_to(table: dict[str, str], asked: list[str] | None = None):
    def resolve(host: str, port: int) -> list[tuple[int, str]]:
        if asked is not None:
            asked.append(host)
        if host not in table:
            raise socket.gaierror("unknown host")
        address = table[host]
        return [(socket.AF_INET6 if ":" in address else socket.AF_INET, address)]

    return resolve


def test_a_host_name_that_resolves_to_loopback_is_refused_before_connecting():
    with _Listener() as internal:
        exchange = HttpExchange(new_session(), 60, 5, resolver=resolver_to({"cdn.example": "127.0.0.1"}))
        with pytest.raises(BadDownload) as caught:
            exchange.download(f"https://cdn.example:{internal.port}/x.png", call(), context(), allow_loopback=False)
    assert str(caught.value) == DOWNLOAD_REFUSED
    assert internal.accepted == 0


def test_localhost_through_the_real_resolver_is_refused_at_the_socket_too():
    """Past the URL check (which knows the name "localhost"), the resolved address is checked."""
    with _Listener() as internal:
        with outbound.deadline(5, Reach()):
            with pytest.raises(Exception) as caught:
                new_session().get(f"https://localhost:{internal.port}/", timeout=5)
    assert "does not reach" in str(caught.value)
    assert internal.accepted == 0


@pytest.mark.parametrize("target", ["http://metadata.example/computeMetadata/v1/", "https://private.example/x.png"])
def test_a_redirect_to_a_name_that_resolves_inside_is_refused(target):
    """A loopback stand-in vendor CDN (allowed, as in the tests) redirects to a name that
    resolves to the metadata server or a private address: refused before connecting."""

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    asked: list[str] = []
    table = {"metadata.example": "169.254.169.254", "private.example": "10.1.2.3"}
    try:
        exchange = HttpExchange(new_session(), 60, 5, resolver=resolver_to(table, asked))
        with pytest.raises(BadDownload) as caught:
            exchange.download(f"http://127.0.0.1:{server.server_address[1]}/img", call(), context(), allow_loopback=True)
    finally:
        server.shutdown()
        server.server_close()
    assert str(caught.value) == DOWNLOAD_REFUSED
    # plain http to a non-loopback name is refused from the URL alone; https is resolved, then refused
    assert asked in ([], ["private.example"])


def test_every_refusal_or_failure_reads_the_same():
    """Refused address, refused connection, TLS spoken to a plain listener, an HTTP error,
    an unknown name: one text, so the answers cannot map what is listening where."""

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    plain = server.server_address[1]
    closed_sock = socket.socket()
    closed_sock.bind(("127.0.0.1", 0))
    closed = closed_sock.getsockname()[1]
    closed_sock.close()
    texts = set()
    try:
        for url, allow in [
            ("https://10.0.0.1/x.png", False),  # refused from the URL
            (f"https://cdn.example:{plain}/x.png", False),  # refused after resolving
            (f"http://127.0.0.1:{closed}/x.png", True),  # connection refused
            (f"https://127.0.0.1:{plain}/x.png", True),  # TLS to a plain listener: SSLError
            (f"http://127.0.0.1:{plain}/x.png", True),  # HTTP 404
            ("https://nowhere.example/x.png", False),  # the name does not resolve
        ]:
            exchange = HttpExchange(new_session(), 60, 5, resolver=resolver_to({"cdn.example": "127.0.0.1"}))
            with pytest.raises(BadDownload) as caught:
                exchange.download(url, call(), context(), allow_loopback=allow)
            texts.add(str(caught.value))
    finally:
        server.shutdown()
        server.server_close()
    assert texts == {DOWNLOAD_REFUSED}


def test_the_connection_goes_to_the_checked_address_with_no_second_lookup():
    seen_hosts = []

    class Image(BaseHTTPRequestHandler):
        def do_GET(self):
            seen_hosts.append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Image)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    asked: list[str] = []
    try:
        exchange = HttpExchange(new_session(), 60, 5, resolver=resolver_to({"localhost": "127.0.0.1"}, asked))
        port = server.server_address[1]
        assert exchange.download(f"http://localhost:{port}/x.png", call(), context(), allow_loopback=True) == PNG
    finally:
        server.shutdown()
        server.server_close()
    assert asked == ["localhost"]  # resolved once, by the check, and that address was used
    assert seen_hosts == [f"localhost:{port}"]  # the name still travels in the request
