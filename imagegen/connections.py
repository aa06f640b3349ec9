"""gunicorn's gthread worker, made so that a slow client costs a socket, not a thread.

gunicorn's own gthread worker hands a connection to a thread as soon as its first byte comes;
the thread then blocks reading the head and the handler blocks reading the body, and writing
the answer blocks until the client takes it. `THREADS` clients that trickle a head, trickle a
body or never read their answer each hold a thread, and the instance stops answering.

`BufferingThreadWorker` keeps every connection in the worker's poller (non-blocking, on the
main thread) until a whole request (head and body) has arrived, under absolute deadlines per
phase, and only then hands it to a thread, with the bytes already in gunicorn's parser. A
thread's writes never block either: what the client does not take at once waits in the
connection's buffer, and the poller sends it after the thread is done. A connection that stalls
is answered with a JSON error (408, 413, 414, 431, 400, 501) where an answer is useful, then
closed; the graceful close (draining what the client still sends) runs in the poller too.

What each phase may take:
- idle: a new connection's first byte within REQUEST_HEAD_TIMEOUT_SECONDS (a kept-alive one's
  within gunicorn's keepalive, 2 s), else closed without an answer;
- head: from its first byte, REQUEST_HEAD_TIMEOUT_SECONDS for the whole head, at most
  REQUEST_LINE_LIMIT bytes of request line and HEAD_LIMIT bytes in all;
- body: from the end of the head, REQUEST_BODY_TIMEOUT_SECONDS for the whole body, at most
  MAX_BODY_BYTES (a larger Content-Length or chunk is refused as soon as it is read);
- answer: bytes the client has not taken stay at most RESPONSE_WRITE_TIMEOUT_SECONDS; a streamed
  answer's next write fails then, so its generator is closed.
"""

from __future__ import annotations

import errno
import http
import json
import selectors
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn.http import errors as parse_errors
from gunicorn.workers import gthread

from imagegen.config import (
    DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS,
    DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS,
    DEFAULT_RESPONSE_WRITE_TIMEOUT_SECONDS,
    MAX_BODY_BYTES,
)
from imagegen.errors import (
    HeadersTooLarge,
    ImageGenError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedTransferCoding,
    UriTooLong,
)

# gunicorn's default, which functions-framework turns off (limit_request_line=0).
REQUEST_LINE_LIMIT = 8190
HEAD_LIMIT = 32 * 1024
CHUNK_LINE_LIMIT = 1024
# A chunked body's bytes on the wire: the data cap plus the framing of many small chunks.
CHUNKED_WIRE_LIMIT = 2 * MAX_BODY_BYTES + 16 * 1024
RECV_BYTES = 64 * 1024
# The graceful close (RFC 9112 9.6), as gunicorn's util.close_graceful does it, but polled.
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024
# A thread should never read the socket (the request is buffered); if gunicorn's parser ever
# wants more than the scan found, it waits this long, not forever.
STRAY_READ_SECONDS = 1.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEX = frozenset(b"0123456789abcdefABCDEF")
_HEADERS = (
    ("Content-Type", "application/json"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Connection", "close"),
)


@dataclass(frozen=True)
class ConnectionLimits:
    head_seconds: float = DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS
    body_seconds: float = DEFAULT_REQUEST_BODY_TIMEOUT_SECONDS
    write_seconds: float = DEFAULT_RESPONSE_WRITE_TIMEOUT_SECONDS


def _bad_body(message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_body")


def error_answer(error: ImageGenError) -> bytes:
    """A whole HTTP answer in the API's error shape, for errors met before Flask is reached."""
    request_id = uuid.uuid4().hex
    body = json.dumps({"success": False, "error": error.message, "code": error.code, "requestId": request_id})
    try:
        reason = http.HTTPStatus(error.status).phrase
    except ValueError:
        reason = "Error"
    lines = [f"HTTP/1.1 {error.status} {reason}"]
    lines += [f"{name}: {value}" for name, value in _HEADERS]
    lines += [f"X-Request-Id: {request_id}", f"Content-Length: {len(body)}", "", body]
    return "\r\n".join(lines).encode("latin-1")


class RequestScan:
    """Where a request ends in the bytes received so far; raises the error to answer with.

    It reads only what framing needs (the head's end, Content-Length, Transfer-Encoding,
    Expect, the chunk sizes); gunicorn's parser still parses and checks everything after it.
    """

    def __init__(self) -> None:
        self.head_end: int | None = None
        self.searched = 0
        self.chunked = False
        self.length = 0
        self.expects_continue = False
        self.pos = 0  # chunked: how far the body is scanned
        self.chunk_left = 0  # chunked: data and CRLF still to come in this chunk
        self.in_trailers = False
        self.data_bytes = 0

    def feed(self, buf: bytearray) -> bool:
        if self.head_end is None and not self._scan_head(buf):
            return False
        assert self.head_end is not None
        if self.chunked:
            return self._scan_chunks(buf)
        return len(buf) - self.head_end >= self.length

    def _scan_head(self, buf: bytearray) -> bool:
        line_end = buf.find(b"\r\n", 0, REQUEST_LINE_LIMIT + 2)
        if line_end < 0:
            if len(buf) > REQUEST_LINE_LIMIT + 1:
                raise UriTooLong(f"The request line is longer than {REQUEST_LINE_LIMIT} bytes.")
            return False
        end = buf.find(b"\r\n\r\n", max(0, self.searched - 3), HEAD_LIMIT)
        if end < 0:
            if len(buf) >= HEAD_LIMIT:
                raise HeadersTooLarge(f"The request's headers are larger than {HEAD_LIMIT // 1024} KiB.")
            self.searched = len(buf)
            return False
        self.head_end = end + 4
        self._read_framing(bytes(buf[line_end + 2 : end]))
        self.pos = self.head_end
        return True

    def _read_framing(self, block: bytes) -> None:
        lengths: list[bytes] = []
        codings: list[bytes] = []
        expect = False
        for line in block.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                continue  # gunicorn's parser refuses it
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings += [coding.strip().lower() for coding in value.split(b",") if coding.strip()]
            elif name == b"expect":
                expect = value.lower() == b"100-continue"
        if codings:
            if lengths:
                raise _bad_body("A request may not have both Content-Length and Transfer-Encoding.")
            if codings != [b"chunked"]:
                raise UnsupportedTransferCoding("Only Transfer-Encoding: chunked is supported.")
            self.chunked = True
        elif lengths:
            if len(set(lengths)) > 1 or not lengths[0].isdigit():
                raise _bad_body("The Content-Length header is not a single number.")
            if len(lengths[0]) > 12 or int(lengths[0]) > MAX_BODY_BYTES:
                raise PayloadTooLarge(f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB.")
            self.length = int(lengths[0])
        self.expects_continue = expect and (self.chunked or self.length > 0)

    def _scan_chunks(self, buf: bytearray) -> bool:
        assert self.head_end is not None
        pos = self.pos
        while True:
            if self.chunk_left:
                take = min(self.chunk_left, len(buf) - pos)
                pos += take
                self.chunk_left -= take
                if self.chunk_left:
                    break
                if buf[pos - 2 : pos] != b"\r\n":
                    raise _bad_body("A chunk of the request body does not end where its size says.")
                continue
            line_end = buf.find(b"\r\n", pos, pos + CHUNK_LINE_LIMIT)
            if line_end < 0:
                if len(buf) - pos >= CHUNK_LINE_LIMIT:
                    raise _bad_body("A chunk size line of the request body is too long.")
                break
            line = bytes(buf[pos:line_end])
            pos = line_end + 2
            if self.in_trailers:
                if not line:
                    self.pos = pos
                    return True
                continue
            size_text = line.split(b";", 1)[0].strip()
            if not size_text or not set(size_text) <= _HEX:
                raise _bad_body("A chunk size of the request body is not a hexadecimal number.")
            if len(size_text) > 8 or self.data_bytes + int(size_text, 16) > MAX_BODY_BYTES:
                raise PayloadTooLarge(f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB.")
            size = int(size_text, 16)
            if size == 0:
                self.in_trailers = True
                continue
            self.data_bytes += size
            self.chunk_left = size + 2
        self.pos = pos
        if pos - self.head_end > CHUNKED_WIRE_LIMIT:
            raise PayloadTooLarge(f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB.")
        return False


class ClientSocket(socket.socket):
    """A client's socket whose writes never block: what the client does not take at once waits
    in `out` for the worker's poller. A write fails once bytes have waited `write_seconds`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.out = bytearray()
        self.out_pos = 0
        self.out_deadline: float | None = None
        self.write_seconds = DEFAULT_RESPONSE_WRITE_TIMEOUT_SECONDS
        self.read_timeout: float | None = None
        self.continue_sent = False

    def pending(self) -> bool:
        return self.out_pos < len(self.out)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._push(data)

    def send(self, data: Any, flags: int = 0) -> int:
        if self.continue_sent and bytes(data) == CONTINUE:
            self.continue_sent = False  # the poller sent it already
            return len(data)
        self._push(data)
        return len(data)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        file.seek(offset)
        data = file.read(count) if count else file.read()
        self._push(data)
        return len(data)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._fence_read(flags)
        return super().recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._fence_read(flags)
        return super().recv_into(buffer, nbytes, flags)

    def flush(self) -> bool:
        """Send what the client takes now; whether everything is sent."""
        while self.pending():
            with memoryview(self.out) as view, view[self.out_pos :] as rest:
                try:
                    sent = socket.socket.send(self, rest, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
            self.out_pos += sent
        if not self.pending():
            self.out.clear()
            self.out_pos = 0
            self.out_deadline = None
            return True
        return False

    def _push(self, data: Any) -> None:
        if self.pending() and not self.flush() and time.monotonic() > (self.out_deadline or 0):
            raise TimeoutError(f"the client took no answer bytes for {self.write_seconds:g} s")
        if not self.pending():
            try:
                sent = socket.socket.send(self, data, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
            self.out_deadline = time.monotonic() + self.write_seconds
        self.out += data

    def _fence_read(self, flags: int) -> None:
        if self.read_timeout is not None and not flags & socket.MSG_DONTWAIT:
            self.settimeout(self.read_timeout)


class BufferedConn(gthread.TConn):
    """A connection as the poller sees it: what it received so far and its current deadline."""

    sock: ClientSocket

    def __init__(self, cfg: Any, sock: ClientSocket, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.inbuf = bytearray()
        self.scan = RequestScan()
        self.deadline = 0.0
        self.on_expire: Callable[[BufferedConn], None] = lambda conn: None
        self.ready: bytes | None = None  # the buffered request, for the parser
        self.closed = False

    def init(self) -> None:
        super().init()
        if self.ready is not None and self.parser is not None:
            self.parser.unreader.unread(self.ready)
            self.ready = None


class BufferingThreadWorker(gthread.ThreadWorker):
    """gunicorn's gthread worker with whole requests read, and answers sent, by its poller."""

    limits = ConnectionLimits()
    _imagegen = True

    def init_process(self) -> None:
        # The scan enforces the line limit first; this keeps gunicorn's parser in step with it.
        self.cfg.set("limit_request_line", REQUEST_LINE_LIMIT)
        self.watched: dict[BufferedConn, None] = {}
        super().init_process()

    # --- connections in the poller ------------------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        try:
            client, address = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        sock = ClientSocket(fileno=client.detach())
        sock.write_seconds = self.limits.write_seconds
        conn = BufferedConn(self.cfg, sock, address, listener.getsockname())
        self._await_request(conn, b"", self.limits.head_seconds)

    def _await_request(self, conn: BufferedConn, leftover: bytes, idle_seconds: float) -> None:
        conn.sock.setblocking(False)
        conn.inbuf = bytearray(leftover)
        conn.scan = RequestScan()
        seconds = self.limits.head_seconds if leftover else idle_seconds
        self._watch(conn, selectors.EVENT_READ, self._on_readable, seconds, self._expire_reading)
        if leftover:
            self._advance(conn)

    def _on_readable(self, conn: BufferedConn, _fileobj: Any) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            if conn.scan.head_end is not None:
                self._refuse(conn, _bad_body("The request body ended before its declared length."))
            else:
                self._drop(conn)
            return
        if not conn.inbuf:  # the head's time starts with its first byte
            conn.deadline = time.monotonic() + self.limits.head_seconds
        conn.inbuf += data
        self._advance(conn)

    def _advance(self, conn: BufferedConn) -> None:
        had_head = conn.scan.head_end is not None
        try:
            complete = conn.scan.feed(conn.inbuf)
        except ImageGenError as error:
            self._refuse(conn, error)
            return
        if complete:
            self._unwatch(conn)
            conn.ready = bytes(conn.inbuf)
            conn.inbuf = bytearray()
            conn.data_ready = True
            self.enqueue_req(conn)
            return
        if not had_head and conn.scan.head_end is not None:
            conn.deadline = time.monotonic() + self.limits.body_seconds
            if conn.scan.expects_continue:
                try:
                    socket.socket.send(conn.sock, CONTINUE, socket.MSG_DONTWAIT)
                    conn.sock.continue_sent = True
                except OSError:
                    pass  # gunicorn sends it again when the handler reads the body

    def _expire_reading(self, conn: BufferedConn) -> None:
        if conn.inbuf and self.alive:
            phase = "body" if conn.scan.head_end is not None else "head"
            self._refuse(conn, RequestTimeout(f"The request {phase} did not arrive in time."))
        else:
            self._drop(conn)

    def _refuse(self, conn: BufferedConn, error: ImageGenError) -> None:
        self._unwatch(conn)
        self.log.info("Refused a request from %s: %s %s", conn.client, error.status, error.code)
        conn.sock.write_seconds = min(self.limits.write_seconds, LINGER_SECONDS * 2)
        try:
            conn.sock.sendall(error_answer(error))
        except OSError:
            self._drop(conn)
            return
        self._flush_then(conn, self._linger)

    def _flush_then(self, conn: BufferedConn, then: Callable[[BufferedConn], None]) -> None:
        sock = conn.sock
        sock.setblocking(False)  # a thread left a timeout on it: the poller must never wait in a call
        try:
            done = sock.flush()
        except OSError:
            self._drop(conn)
            return
        if done:
            then(conn)
            return
        deadline = sock.out_deadline or time.monotonic() + self.limits.write_seconds
        self._watch(conn, selectors.EVENT_WRITE, partial(self._on_writable, then=then), 0, self._abandon)
        conn.deadline = deadline

    def _on_writable(self, conn: BufferedConn, _fileobj: Any, then: Callable[[BufferedConn], None]) -> None:
        try:
            done = conn.sock.flush()
        except OSError:
            self._drop(conn)
            return
        if done:
            self._unwatch(conn)
            then(conn)

    def _abandon(self, conn: BufferedConn) -> None:
        self.log.info(
            "Closed the connection from %s: its client left answer bytes untaken for %g s",
            conn.client,
            conn.sock.write_seconds,
        )
        self._drop(conn)

    def _linger(self, conn: BufferedConn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        conn.inbuf = bytearray()
        conn.scan = RequestScan()
        self._watch(conn, selectors.EVENT_READ, self._on_lingering, LINGER_SECONDS, self._drop)

    def _on_lingering(self, conn: BufferedConn, _fileobj: Any) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.scan.data_bytes += len(data)  # counts what is drained, keeps none of it
        if not data or conn.scan.data_bytes > LINGER_BYTES:
            self._drop(conn)

    def _watch(
        self,
        conn: BufferedConn,
        events: int,
        callback: Callable[..., None],
        seconds: float,
        on_expire: Callable[[BufferedConn], None],
    ) -> None:
        self._unwatch(conn)
        conn.deadline = time.monotonic() + seconds
        conn.on_expire = on_expire
        self.poller.register(conn.sock, events, partial(callback, conn))
        self.watched[conn] = None

    def _unwatch(self, conn: BufferedConn) -> None:
        if conn in self.watched:
            del self.watched[conn]
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _drop(self, conn: BufferedConn) -> None:
        self._unwatch(conn)
        if not conn.closed:
            conn.closed = True
            self.nr_conns -= 1
            conn.close()

    def murder_pending(self) -> None:
        """Called by gunicorn's loop about once a second: end what ran past its deadline."""
        super().murder_pending()
        now = time.monotonic()
        for conn in list(self.watched):
            idle = conn.on_expire == self._expire_reading and not conn.inbuf
            if conn.deadline <= now or (idle and not self.alive):
                self._unwatch(conn)
                conn.on_expire(conn)

    # --- a thread per whole request ---------------------------------------------------------------

    def handle(self, conn: BufferedConn) -> Any:
        conn.sock.read_timeout = STRAY_READ_SECONDS
        try:
            return super().handle(conn)
        finally:
            conn.sock.read_timeout = None

    def finish_request(self, conn: BufferedConn, fs: Any) -> None:
        try:
            keepalive = bool(fs.result()) if not fs.cancelled() else False
        except Exception:
            keepalive = False
        if conn.closed:
            return
        if keepalive and self.alive and conn.parser is not None:
            leftover = conn.parser.unreader.take_buffered()
            self._flush_then(conn, partial(self._await_request, leftover=leftover, idle_seconds=self.cfg.keepalive))
        else:
            self._flush_then(conn, self._linger)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        """gunicorn's answer to a request its parser refuses, in the API's JSON shape."""
        error: ImageGenError
        if isinstance(exc, parse_errors.LimitRequestLine):
            error = UriTooLong(f"The request line is longer than {REQUEST_LINE_LIMIT} bytes.")
        elif isinstance(exc, parse_errors.LimitRequestHeaders):
            error = HeadersTooLarge("The request's headers are too large.")
        elif isinstance(exc, parse_errors.UnsupportedTransferCoding):
            error = UnsupportedTransferCoding("Only Transfer-Encoding: chunked is supported.")
        elif isinstance(exc, parse_errors.ParseException) and not isinstance(
            exc, (parse_errors.InvalidResponseHeader, parse_errors.InvalidResponseHeaderName)
        ):
            error = _bad_body("The request could not be read.")
        else:
            self.log.exception("Error handling request")
            error = ImageGenError(
                "Something went wrong on the server. Try again; if it keeps happening, report the request id."
            )
        if error.status < 500:
            self.log.info("Invalid request from %s: %s", addr and addr[0], str(exc)[:200])
        try:
            client.sendall(error_answer(error))
        except OSError:
            self.log.debug("Failed to send error message.")
