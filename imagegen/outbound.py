"""Every call this function makes to another server: one exchange, bounded at the socket.

Vendors, a model hub, token and certificate endpoints, image downloads and Cloud
Storage all send through sessions made by `new_session` (or mounted with `DeadlineAdapter`).
Each call runs inside a `deadline(...)` scope: an absolute time by which it must be over,
whatever the peer does. A watchdog thread shuts the sockets of a scope down when its time
comes, so a peer that trickles a byte at a time, never ends a body, or hangs mid-handshake
cannot hold a thread past it (a per-read timeout restarts with every byte). Host names are
resolved here, within the deadline, and with a `Reach` policy every address is checked and
the connection made to the checked address (no second lookup); TLS still checks the name.

Bodies are read in large pieces, capped in size; compressed ones are decoded here, with the
decoded bytes counted (a deflate bomb stops at the cap), and encodings other than identity,
gzip and deflate are refused. `HttpExchange` words every failure for the vendor
(imagegen.backends.vendor); `fetch` is the plain form for everything else. A vendor's answer in
Server-Sent Events (a vendor's streamed images) is read the same way, each event handed on as its
blank line arrives, one event and the whole stream capped in size (`HttpExchange.send` with
`on_event`).
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import math
import re
import socket
import threading
import time
import urllib.request
import zlib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.connectionpool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError

from imagegen.backends.base import GenerationContext
from imagegen.backends.vendor import CallContext, error_for_status
from imagegen.embedded import JsonImageScan, forget_json, remember_json
from imagegen.images import MAX_IMAGE_BYTES, PngCheck, forget_check, remember_check
from imagegen.imaging import PNG_SIGNATURE
from imagegen.errors import ServerBusy, UpstreamError, UpstreamTimeout

CONNECT_TIMEOUT_SECONDS = 10.0
USER_AGENT = "imagegen/1.0"
MAX_ERROR_BODY_BYTES = 64 * 1024
# Bodies are read with reads of up to this much, each returning what the socket holds: a
# 1024x1024 PNG arrives in a few reads (every read takes the GIL back, and with a hundred
# answers arriving together that hand-over is what costs).
READ_BYTES = 4 * 1024 * 1024
# A PNG body is checked piece by piece with the same reads: a read returns what has arrived
# and never waits for more, so on a real network pieces are small and each is checked while
# the next one travels. Capping reads lower (256 KiB) only split what was already waiting
# into more reads: measured on loopback, 0.2-0.3 ms saved against 0.5-0.6 ms with 4 MiB.
MAX_REDIRECTS = 5
OK_STATUSES = (200, 201, 202)
# A call made outside any deadline scope (a library's own request) still gets one.
DEFAULT_CALL_SECONDS = 30.0
# Token, certificate and Hub answers are small JSON documents.
MAX_SMALL_BODY_BYTES = 1024 * 1024
# One event of a vendor's event stream: an image's base64 and its JSON fields.
MAX_EVENT_BYTES = MAX_IMAGE_BYTES * 4 // 3 + 64 * 1024
EVENT_STREAM = "text/event-stream"
# Whatever went wrong with an image URL, the vendor's caller reads this one text: telling a
# refused address from a refused connection or a TLS failure would make a port scanner.
DOWNLOAD_REFUSED = "an image URL this function will not fetch, or could not fetch"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


# --- deadlines, held at the socket -------------------------------------------------------------


class Deadline:
    """One call's absolute deadline (time.monotonic()) and the connections it is using."""

    def __init__(self, at: float, reach: Reach | None = None, ceiling: float = math.inf) -> None:
        self.at = at
        self.reach = reach
        self.ceiling = ceiling  # an enclosing scope's time: a pause never carries this one past it
        self.expired = False
        self._done = False
        self._paused = False
        self._connections: list[Any] = []
        self._lock = threading.Lock()

    def left(self) -> float:
        return self.at - time.monotonic()

    def watch(self, connection: Any) -> None:
        with self._lock:
            if self._done:
                return
            self._connections.append(connection)
            connection.deadline_owner = self  # a pooled connection serves one call at a time
            expired = self.expired
        if expired:
            _shut(_socket_of(connection))

    def expire(self) -> None:
        """The watchdog's call: shut every socket down, so any read or write returns at once."""
        with self._lock:
            if self._done or self._paused or time.monotonic() < self.at:
                return  # paused, or moved later by a pause: the watchdog has its new time
            self.expired = True
            # A connection this call has already given back may be serving another call now.
            sockets = [_socket_of(c) for c in self._connections if getattr(c, "deadline_owner", None) is self]
        for sock in sockets:
            _shut(sock)

    def close(self) -> None:
        with self._lock:
            self._done = True
            self._connections.clear()

    @contextmanager
    def paused(self, ceiling: float) -> Iterator[None]:
        """The clock stopped while the call waits on this instance (for an image slot), not on
        the vendor: it then has the time it had left, but never past `ceiling` (monotonic) or
        an enclosing scope's time."""
        started = time.monotonic()
        with self._lock:
            self._paused = True
        try:
            yield
        finally:
            with self._lock:
                self._paused = False
                self.at = max(self.at, min(self.at + time.monotonic() - started, ceiling, self.ceiling))
            _WATCHDOG.add(self)


def _socket_of(connection: Any) -> Any:
    return getattr(connection, "watched_sock", None) or getattr(connection, "sock", None)


def _shut(sock: Any) -> None:
    if sock is None:
        return
    try:
        # The plain socket's shutdown, also for TLS: SSLSocket.shutdown would drop its TLS
        # state under the thread that is reading. The reader then sees EOF or an error.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, TypeError):
        pass


class _Watchdog:
    """One thread for the whole process: expires each scope at its time."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, scope: Deadline) -> None:
        with self._wake:
            heapq.heappush(self._heap, (scope.at, next(self._order), scope))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="imagegen-outbound-watchdog", daemon=True)
                self._thread.start()
            if self._heap[0][2] is scope:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, _, scope = heapq.heappop(self._heap)
            scope.expire()  # a no-op for a call that is already over


_WATCHDOG = _Watchdog()
_local = threading.local()


def current_deadline() -> Deadline | None:
    return getattr(_local, "deadline", None)


@contextmanager
def deadline(seconds: float, reach: Reach | None = None) -> Iterator[Deadline]:
    """Every call made through our sessions in this block ends within `seconds` from now (or
    the enclosing block's deadline, if that comes first)."""
    outer = current_deadline()
    at = time.monotonic() + max(0.0, seconds)
    if outer is not None:
        at = min(at, outer.at)
        reach = reach or outer.reach
    scope = Deadline(at, reach, outer.at if outer is not None else math.inf)
    _local.deadline = scope
    _WATCHDOG.add(scope)
    try:
        yield scope
    finally:
        scope.close()
        _local.deadline = outer


# --- reach: which addresses a call may connect to ----------------------------------------------

Resolver = Callable[[str, int], list[tuple[int, str]]]
_LOOKUPS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="imagegen-dns")


def resolve(host: str, port: int) -> list[tuple[int, str]]:
    """(family, address) for each address of `host`: the system resolver."""
    return [
        (family, info[0])
        for family, _, _, _, info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if family in (socket.AF_INET, socket.AF_INET6)
    ]


@dataclass(frozen=True)
class Reach:
    """Where an untrusted URL (a vendor's image URL) may lead: public addresses only, or also
    this machine's loopback when the backend itself is a loopback stand-in (the tests)."""

    allow_loopback: bool = False
    resolver: Resolver = field(default=resolve)

    def refusal(self, address: str) -> str | None:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return "not an address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        if ip.is_loopback and self.allow_loopback:
            return None
        # is_global is False for loopback, link-local (169.254.169.254, the metadata server),
        # private, unique-local fc00::/7, unspecified, shared (100.64/10) and reserved ranges.
        if not ip.is_global or ip.is_multicast:
            return "a private address"
        return None


def _open_socket(connection: Any) -> socket.socket:
    """Resolve within the deadline, check every address under a Reach, connect to a checked one."""
    scope = current_deadline()
    host, port = connection._dns_host, connection.port
    left = connection.timeout if isinstance(connection.timeout, (int, float)) else CONNECT_TIMEOUT_SECONDS
    if scope is not None:
        left = min(left, scope.left())
    if left <= 0:
        raise ConnectTimeoutError(connection, "no time left to connect")
    reach = scope.reach if scope is not None and not connection.proxy else None
    resolver = reach.resolver if reach is not None else resolve
    started = time.monotonic()
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
        addresses = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
    except ValueError:
        try:
            addresses = _LOOKUPS.submit(resolver, host, port).result(timeout=left)
        except TimeoutError:
            raise ConnectTimeoutError(connection, "name lookup ran out of time") from None
        except OSError as error:
            raise NameResolutionError(host, connection, socket.gaierror(str(error))) from None
    if not addresses:
        raise NameResolutionError(host, connection, socket.gaierror("no address"))
    if reach is not None and any(reach.refusal(address) for _, address in addresses):
        raise NewConnectionError(connection, "an address this function does not reach")
    error: OSError | None = None
    for family, address in addresses:
        left -= time.monotonic() - started
        started = time.monotonic()
        if left <= 0:
            raise ConnectTimeoutError(connection, "no time left to connect")
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            for option in connection.socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(left)
            sock.connect((address, port))
            sock.settimeout(connection.timeout if isinstance(connection.timeout, (int, float)) else None)
            return sock
        except socket.timeout:
            sock.close()
            raise ConnectTimeoutError(connection, "connect timed out") from None
        except OSError as failure:
            sock.close()
            error = failure
    raise NewConnectionError(connection, f"Failed to establish a new connection: {error}")


class _Watched(urllib3.connection.HTTPConnection):
    """What the plain and the TLS connection share: the socket opened by `_open_socket`, and
    each request put under the current deadline's watchdog."""

    def _new_conn(self) -> socket.socket:
        return _open_socket(self)  # over TLS, the layer on top still checks the certificate for the name

    def connect(self) -> None:
        super().connect()
        # http.client lets go of `sock` when an answer ends by close (the answer reads on);
        # the watchdog keeps its own reference, to shut down what is really being read.
        self.watched_sock = self.sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        scope = current_deadline()
        if scope is not None:
            scope.watch(self)
        super().request(*args, **kwargs)


class _Connection(_Watched):
    pass


class _TlsConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


# What reading an answer may raise (timeouts included: requests.Timeout, urllib3's and the
# socket's are subclasses of these).
READ_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)


def _read_failure(error: BaseException, scope: Deadline | None) -> OutboundFailure:
    """What a failed read of an answer means, for the whole body's read and an event stream's:
    a timeout (the read's own, or the watchdog's that shut the socket), or a broken connection."""
    if isinstance(error, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
        return OutboundFailure("timeout")
    if scope is not None and scope.expired:
        return OutboundFailure("timeout")
    return OutboundFailure("broken", type(error).__name__)


class _Pool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


_POOLS = {"http": _Pool, "https": _TlsPool}


class DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter over our connections: every send inside a deadline scope (one of its
    own when the caller opened none), and no send once that deadline has passed."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None, **kwargs: Any):
        if current_deadline() is None:
            with deadline(_total(timeout)):
                return self._send(request, stream, timeout, **kwargs)
        return self._send(request, stream, timeout, **kwargs)

    def _send(self, request: requests.PreparedRequest, stream: bool, timeout: Any, **kwargs: Any):
        scope = current_deadline()
        assert scope is not None
        if scope.expired or scope.left() <= 0:
            raise requests.exceptions.ReadTimeout("the call's deadline has passed", request=request)
        # The caller's (connect, read) timeouts stand: connecting is bounded by the scope in
        # _open_socket, and the watchdog ends everything after it.
        return super().send(request, stream=stream, timeout=timeout, **kwargs)


def _total(timeout: Any) -> float:
    if isinstance(timeout, tuple):
        parts = [part for part in timeout if isinstance(part, (int, float))]
        return sum(parts) if parts else DEFAULT_CALL_SECONDS
    return float(timeout) if isinstance(timeout, (int, float)) else DEFAULT_CALL_SECONDS


def mount(session: requests.Session, pool_size: int = 256) -> requests.Session:
    adapter = DeadlineAdapter(pool_connections=8, pool_maxsize=pool_size)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def new_session(pool_size: int = 256) -> requests.Session:
    """A pooled session: keep-alive to the vendor saves a TLS handshake per generation.

    The pool is larger than any sensible THREADS, so no request in a burst has to reconnect.
    Proxy settings are read from the environment once here; with trust_env, requests reads
    the whole environment again on every call (about half a millisecond).
    """
    session = requests.Session()
    session.trust_env = False
    proxies = urllib.request.getproxies()
    if "no" in proxies:
        proxies["no_proxy"] = proxies.pop("no")
    session.proxies.update(proxies)
    mount(session, pool_size)
    session.headers["User-Agent"] = USER_AGENT
    return session


# --- bodies: capped in size, decoded here --------------------------------------------------------


class OutboundFailure(Exception):
    """A call that gave no usable answer. `kind`: timeout, unreachable, broken, too_large,
    encoding, refused. `cause`: a short word on what failed, with no host, port or path."""

    def __init__(self, kind: str, cause: str = "") -> None:
        super().__init__(kind, cause)
        self.kind = kind
        self.cause = cause


class _Decoder:
    """gzip or deflate, counting what comes out: never more than the cap is produced."""

    def __init__(self, encoding: str) -> None:
        self._encoding = encoding
        self._inflater: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None

    def feed(self, data: bytes, room: int) -> bytes:
        if self._inflater is None:
            # RFC 9110's deflate is the zlib format; some servers send raw deflate instead.
            zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._inflater = zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)
        try:
            out = self._inflater.decompress(data, room + 1)
        except zlib.error:
            raise OutboundFailure("broken", "undecodable body") from None
        if len(out) > room:
            raise OutboundFailure("too_large")
        return out


def _decoder_for(headers: Mapping[str, str]) -> _Decoder | None:
    encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding in ("identity", ""):
        return None
    if encoding in ("gzip", "x-gzip", "deflate"):
        return _Decoder("gzip" if encoding != "deflate" else "deflate")
    raise OutboundFailure("encoding", "an unsupported Content-Encoding")


def read_body(response: requests.Response, limit: int, truncate: bool = False) -> bytes:
    """The body, decoded, within `limit` bytes and the current deadline. Past the limit: the
    first `limit` bytes when `truncate` (an error page), else OutboundFailure too_large.

    A body that starts as a PNG is checked while it arrives (PngCheck, fed each piece as it
    comes, so the inflating overlaps the transfer), and its verdict remembered for the
    check_png the backend then makes on these very bytes, in this thread. A body that starts
    as JSON has its long base64 strings decoded, and checked when they are PNGs, the same way
    (embedded.JsonImageScan), remembered for the backend's read_json on these very bytes."""
    scope = current_deadline()
    forget_check()
    forget_json()
    decoder = _decoder_for(response.headers)
    declared = response.headers.get("Content-Length", "")
    if decoder is None and not truncate and declared.isascii() and declared.isdigit() and len(declared) < 16:
        if int(declared) > limit:
            raise OutboundFailure("too_large")
    pieces: list[bytes] = []
    size = 0
    check: PngCheck | None = None
    scan: JsonImageScan | None = None
    sock = None
    try:
        while size <= limit:
            piece = response.raw.read1(READ_BYTES, decode_content=False)
            if not piece:
                break
            if decoder is not None:
                try:
                    piece = decoder.feed(piece, limit - size)
                except OutboundFailure as failure:
                    if failure.kind == "too_large" and truncate:
                        break
                    raise
            if not size and not truncate:
                if piece.startswith(PNG_SIGNATURE):
                    check = PngCheck()
                elif piece.lstrip()[:1] in (b"{", b"["):
                    scan = JsonImageScan()
                sock = _body_socket(response)
            if check is not None:
                _ack_at_once(sock)
                check.feed(piece)
            elif scan is not None:
                if scan.checking:
                    _ack_at_once(sock)
                scan.feed(piece)
            pieces.append(piece)
            size += len(piece)
            if scope is not None and (scope.expired or scope.left() <= 0):
                raise OutboundFailure("timeout")
    except READ_ERRORS as error:
        raise _read_failure(error, scope) from None
    if scope is not None and scope.expired:
        raise OutboundFailure("timeout")  # the watchdog ended the read: what came is not all
    if size > limit:
        if not truncate:
            raise OutboundFailure("too_large")
        return b"".join(pieces)[:limit]
    body = pieces[0] if len(pieces) == 1 else b"".join(pieces)  # or b"" for none
    if check is not None:
        remember_check(body, check.finish())
    elif scan is not None and (found := scan.finish(body)) is not None:
        remember_json(body, found)
    return body


def _ack_at_once(sock: Any) -> None:
    """Acknowledge what arrives at once rather than up to 40 ms later (Linux's TCP_QUICKACK,
    which the kernel drops again by itself, hence once per piece). While the check works on one
    piece the next one waits in the socket unread, and the kernel then delays its ACK: a sender
    that holds its last partial segment until the ACK (Nagle's algorithm, no TCP_NODELAY) would
    stall the body by 40 ms; measured with such a stand-in, 68 -> 108 ms for a 1.7 MB PNG."""
    if sock is not None and _QUICKACK is not None:
        try:
            socket.socket.setsockopt(sock, socket.IPPROTO_TCP, _QUICKACK, 1)
        except (OSError, TypeError):
            pass


_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def _body_socket(response: requests.Response) -> Any:
    """The socket a body is read from: the pooled connection's, or, where urllib3 has let go of
    the connection (an answer that closes it), the one under http.client's reader. None if
    neither is there: the reads then go on without the quick ACK."""
    sock = _socket_of(getattr(response.raw, "_connection", None))
    if sock is None:
        reader = getattr(getattr(response.raw, "_fp", None), "fp", None)
        sock = getattr(getattr(reader, "raw", None), "_sock", None)
    return sock


# --- event streams: a vendor's Server-Sent Events, as they arrive ------------------------------


@dataclass(frozen=True)
class ServerEvent:
    """One Server-Sent Event: its `event:` name (None without one) and its `data:` lines joined."""

    name: str | None
    data: bytes


class EventReader:
    """Server-Sent Events parsed from pieces of a body as they come, each event once its blank
    line has arrived; an event (or a line) over `max_event` bytes is OutboundFailure too_large.
    Only what is still incomplete is kept, and no byte is scanned twice."""

    def __init__(self, max_event: int) -> None:
        self._max_event = max_event
        self._buffer = bytearray()
        self._scanned = 0
        self._name: str | None = None
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, piece: bytes) -> list[ServerEvent]:
        self._buffer += piece
        events: list[ServerEvent] = []
        start = 0
        while (end := self._buffer.find(b"\n", max(start, self._scanned))) >= 0:
            line = bytes(self._buffer[start:end])
            start = end + 1
            event = self._line(line[:-1] if line.endswith(b"\r") else line)
            if event is not None:
                events.append(event)
        del self._buffer[:start]
        self._scanned = len(self._buffer)
        if self._size + len(self._buffer) > self._max_event:
            raise OutboundFailure("too_large")
        return events

    def _line(self, line: bytes) -> ServerEvent | None:
        if not line:
            event = ServerEvent(self._name, b"\n".join(self._data)) if self._data or self._name else None
            self._name, self._data, self._size = None, [], 0
            return event
        if line.startswith(b":"):
            return None  # a comment: a keep-alive
        field, _, value = line.partition(b":")
        value = value[1:] if value.startswith(b" ") else value
        if field == b"data":
            self._data.append(value)
            self._size += len(value) + 1
        elif field == b"event":
            self._name = value.decode("utf-8", "replace")
        return None


def read_events(response: requests.Response, on_event: Callable[[ServerEvent], None], limit: int, max_event: int) -> None:
    """An event stream, decoded, each event handed to `on_event` as it completes; the whole
    within `limit` bytes and the current deadline (else OutboundFailure). `on_event`'s own
    errors pass through."""
    scope = current_deadline()
    decoder = _decoder_for(response.headers)
    reader = EventReader(max_event)
    size = 0
    while True:
        try:
            piece = response.raw.read1(READ_BYTES, decode_content=False)
            if piece and decoder is not None:
                piece = decoder.feed(piece, limit - size)
        except READ_ERRORS as error:
            raise _read_failure(error, scope) from None
        if scope is not None and scope.expired:
            raise OutboundFailure("timeout")  # the watchdog ended the read: what came is not all
        if not piece:
            return
        size += len(piece)
        if size > limit:
            raise OutboundFailure("too_large")
        for event in reader.feed(piece):
            on_event(event)
        if scope is not None and scope.left() <= 0:
            raise OutboundFailure("timeout")


def _failure_of(error: requests.RequestException) -> OutboundFailure:
    """What a requests error means, without hosts, ports or paths."""
    scope = current_deadline()
    if isinstance(error, requests.Timeout) and not isinstance(error, requests.ConnectTimeout):
        return OutboundFailure("timeout")
    if scope is not None and scope.expired:
        return OutboundFailure("timeout")
    reason = getattr(error.args[0], "reason", None) if error.args else None
    if isinstance(error, requests.ConnectTimeout):
        return OutboundFailure("unreachable", "connect timed out")
    if isinstance(reason, NewConnectionError) and "does not reach" in str(reason):
        return OutboundFailure("refused")
    if isinstance(reason, NewConnectionError):  # NameResolutionError is one too
        return OutboundFailure("unreachable", _cause(reason))
    return OutboundFailure("broken", type(error).__name__)


def fetch(
    session: requests.Session,
    method: str,
    url: str,
    seconds: float,
    *,
    limit: int = MAX_SMALL_BODY_BYTES,
    same_host_redirects: bool = False,
    **kwargs: Any,
) -> Answer:
    """One call, its body read, all within `seconds` (and any enclosing deadline). Redirects are
    followed only to the same scheme and host, and only when asked. Raises OutboundFailure."""
    kwargs.setdefault("timeout", (CONNECT_TIMEOUT_SECONDS, seconds))
    with deadline(seconds):
        origin = urlsplit(url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with session.request(method, url, stream=True, allow_redirects=False, **kwargs) as response:
                    location = response.headers.get("Location") if response.is_redirect else None
                    if location and same_host_redirects and method in ("GET", "HEAD"):
                        url = urljoin(url, location)
                        if urlsplit(url)[:2] != origin:
                            raise OutboundFailure("refused", "a redirect to another host")
                        kwargs.pop("params", None)  # the Location carries its own query
                        continue
                    return Answer(response.status_code, response.headers, read_body(response, limit))
            except requests.RequestException as error:
                raise _failure_of(error) from None
        raise OutboundFailure("refused", "too many redirects")


class DeadlinePassed(Exception):
    """Raised through google-auth when a call's deadline has passed. Not a TransportError, so
    google-auth's own retry loops let it through at once instead of trying again."""


def google_auth_transport(session: requests.Session, seconds: float = DEFAULT_CALL_SECONDS, limit: int = MAX_SMALL_BODY_BYTES):
    """google-auth's transport (token and certificate requests) over `fetch`: within the
    current deadline (or `seconds`), the answer capped at `limit` bytes."""
    from google.auth import exceptions, transport

    class _Response(transport.Response):
        def __init__(self, answer: Answer) -> None:
            self._answer = answer

        @property
        def status(self) -> int:
            return self._answer.status

        @property
        def headers(self) -> Mapping[str, str]:
            return self._answer.headers

        @property
        def data(self) -> bytes:
            return self._answer.body

    class Transport(transport.Request):
        def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
            scope = current_deadline()
            left = min(float(timeout or seconds), scope.left() if scope is not None else seconds)
            if left <= 0:
                raise DeadlinePassed()
            try:
                answer = fetch(session, method, url, left, data=body, headers=headers, limit=limit)
            except OutboundFailure as failure:
                if failure.kind == "timeout":
                    raise DeadlinePassed() from None
                raise exceptions.TransportError(f"{failure.kind} ({failure.cause or 'no detail'})") from failure
            return _Response(answer)

    return Transport()


def _take_slot(context: GenerationContext, scope: Deadline) -> bool:
    """The generation's image slot, for an answer the vendor has begun to send. The wait is
    this instance's own queue, not the vendor being slow: the try's clock stops meanwhile, so a
    burst that queues here does not time out images already paid for and fail over to a second
    paid call (nor count those as the route's failures). The request's deadline still bounds it."""
    if context.slot is None:
        return True
    left = context.request_time_left()
    with scope.paused(time.monotonic() + left):
        return context.slot.take(timeout=left)


class HttpExchange:
    def __init__(
        self,
        session: requests.Session,
        timeout_seconds: float,
        deadline_seconds: float,
        resolver: Resolver = resolve,
    ) -> None:
        self._session = session
        self._timeout_seconds = timeout_seconds
        self._deadline_seconds = deadline_seconds
        self._resolver = resolver

    def send(
        self,
        method: str,
        url: str,
        call: CallContext,
        context: GenerationContext,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        data: Any = None,
        files: Any = None,
        accept_statuses: tuple[int, ...] = OK_STATUSES,
        on_event: Callable[[ServerEvent], None] | None = None,
        events_limit: int = MAX_EVENT_BYTES,
    ) -> Answer:
        """One request to the vendor's API: the status checked, the body read within the deadline.
        With `on_event`, an accepted answer in Server-Sent Events is handed on event by event as
        it arrives (at most `events_limit` bytes in all, MAX_EVENT_BYTES in one event) and the
        Answer's body is empty; any other answer is read as without it."""
        timeout = self._request_timeout(call, context)
        with deadline(timeout) as scope:
            try:
                response = self._session.request(
                    method,
                    url,
                    headers=headers,
                    json=json,
                    data=data,
                    files=files,
                    timeout=(min(CONNECT_TIMEOUT_SECONDS, timeout), timeout),
                    stream=True,
                    allow_redirects=False,
                )
            except requests.RequestException as error:
                raise self._failed(_failure_of(error), call, urlsplit(url).hostname) from None
            with response:
                call.status = response.status_code
                call.note_request_id(response.headers.get("x-request-id") or response.headers.get("request-id"))
                ok = response.status_code in accept_statuses
                if ok and not _take_slot(context, scope):
                    raise _server_busy()
                events = ok and on_event is not None and _is_event_stream(response.headers)
                try:
                    if events:
                        assert on_event is not None
                        read_events(response, on_event, events_limit, min(events_limit, MAX_EVENT_BYTES))
                        body = b""
                    else:
                        body = read_body(response, MAX_IMAGE_BYTES if ok else MAX_ERROR_BODY_BYTES, truncate=not ok)
                except OutboundFailure as failure:
                    raise self._failed(failure, call, urlsplit(url).hostname) from None
        if not ok:
            raise error_for_status(response.status_code, response.headers, body, call)
        return Answer(response.status_code, response.headers, body)

    def download(self, url: str, call: CallContext, context: GenerationContext, allow_loopback: bool) -> bytes:
        """The image from a vendor's CDN: no credential, every redirect hop and every address
        checked, bounded in size and time. Raises BadDownload with one text for any refusal or
        failure (the backend says the answer had no usable image)."""
        reach = Reach(allow_loopback, self._resolver)
        with deadline(self._request_timeout(call, context), reach) as scope:
            for _ in range(MAX_REDIRECTS + 1):
                if download_refusal(url, allow_loopback):
                    raise BadDownload(DOWNLOAD_REFUSED)
                timeout = self._request_timeout(call, context)
                try:
                    with self._session.get(
                        url, timeout=(min(CONNECT_TIMEOUT_SECONDS, timeout), timeout), stream=True, allow_redirects=False
                    ) as response:
                        if response.is_redirect and response.headers.get("Location"):
                            url = urljoin(url, response.headers["Location"])
                            continue
                        if response.status_code != 200:
                            raise BadDownload(DOWNLOAD_REFUSED)
                        if not _take_slot(context, scope):
                            raise _server_busy()
                        return read_body(response, MAX_IMAGE_BYTES)
                except requests.RequestException as error:
                    failure = _failure_of(error)
                except OutboundFailure as caught:
                    failure = caught
                if failure.kind == "timeout":
                    raise self.timeout(call) from None
                if failure.kind == "too_large":
                    raise _too_large(call, MAX_IMAGE_BYTES) from None
                raise BadDownload(DOWNLOAD_REFUSED) from None
        raise BadDownload(DOWNLOAD_REFUSED)

    def timeout(self, call: CallContext) -> UpstreamError:
        return call.error(
            UpstreamTimeout,
            f"{call.vendor.name} did not answer in time (TIMEOUT_SECONDS={self._timeout_seconds:g}, "
            f"DEADLINE_SECONDS={self._deadline_seconds:g}). The model may be busy or starting: try again in a minute",
            retryable=True,
            fail_over=True,
        )

    def _request_timeout(self, call: CallContext, context: GenerationContext) -> float:
        timeout = min(self._timeout_seconds, context.time_left())
        if timeout <= 0:
            raise self.timeout(call)
        return timeout

    def _failed(self, failure: OutboundFailure, call: CallContext, host: str | None) -> UpstreamError:
        if failure.kind == "timeout":
            return self.timeout(call)
        if failure.kind == "too_large":
            return _too_large(call, MAX_IMAGE_BYTES)
        if failure.kind == "unreachable":
            return call.error(
                UpstreamError,
                f"Could not reach {call.vendor.name} at {host} ({failure.cause}). Check the server's network and "
                f"{call.vendor.url_variable}, then try again",
                code="upstream_unreachable",
                retryable=True,
                fail_over=True,
            )
        if failure.kind == "encoding":
            return call.error(
                UpstreamError,
                f"{call.vendor.name} answered in an encoding this function does not read. Try again",
                code="upstream_bad_response",
                retryable=True,
                fail_over=True,
            )
        return _broken_off(call, failure.cause or failure.kind)


def _is_event_stream(headers: Mapping[str, str]) -> bool:
    return (headers.get("Content-Type") or "").split(";", 1)[0].strip().lower() == EVENT_STREAM


class BadDownload(ValueError):
    """No usable image at the URL a vendor gave; the message says why."""


_NUMERIC_HOST = re.compile(r"(?:0x[0-9a-f]+|[0-9]+)(?:\.(?:0x[0-9a-f]+|[0-9]+))*", re.IGNORECASE)


def download_refusal(url: str, allow_loopback: bool) -> str | None:
    """Why this URL must not be fetched, or None. https to public hosts only; plain http only
    to this machine when the backend itself is a loopback stand-in (the tests)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        return f"{parts.scheme or 'no'} scheme"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
        if _NUMERIC_HOST.fullmatch(host):
            # 127.1, 2130706433, 0x7f.1: resolvers read these as addresses; nobody's CDN uses them.
            return "a numeric host that is not a plain IP address"
    is_loopback = host == "localhost" or (address is not None and address.is_loopback)
    if is_loopback and allow_loopback:
        return None
    if parts.scheme != "https":
        return "plain http"
    if is_loopback or (address is not None and not address.is_global):
        return "a private address"
    return None


def _cause(reason: object) -> str:
    """'connection refused', 'name not resolved': what failed, without hosts, ports or paths."""
    if isinstance(reason, urllib3.exceptions.NameResolutionError):
        return "name not resolved"
    if isinstance(reason, urllib3.exceptions.NewConnectionError) and "refused" in str(reason).lower():
        return "connection refused"
    return type(reason).__name__ if reason is not None else "no connection"


def _broken_off(call: CallContext, cause: str) -> UpstreamError:
    return call.error(
        UpstreamError,
        f"The connection to {call.vendor.name} broke before the whole answer arrived ({cause}). Try again",
        code="upstream_bad_response",
        retryable=True,
        fail_over=True,
    )


def _too_large(call: CallContext, limit: int) -> UpstreamError:
    return call.error(
        UpstreamError,
        f"{call.vendor.name} answered with an image larger than {limit // (1024 * 1024)} MiB, "
        "more than this function can return. Ask for a smaller width and height",
        code="upstream_bad_response",
    )


def _server_busy() -> ServerBusy:
    return ServerBusy(
        "This server is holding as many images in memory as it may, and the request waited until its "
        "deadline for room. Try again in a few seconds.",
        headers={"Retry-After": "5"},
    )
