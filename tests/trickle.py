"""A hostile loopback peer: answers every connection in one of a few slow or nasty ways.

Modes:
  trickle   200, no length (ended by close), one byte every `interval` seconds
  deflate   200, Content-Encoding: deflate, no length, the compressed body trickled
  error503  503 with a declared body of 100 kB, trickled
  hang      reads the request, then says nothing
  head      the status line and headers trickled, one byte at a time
  bomb      200, Content-Encoding: deflate, 100 MB of zeros in about 100 kB, sent at once
  brotli    200, Content-Encoding: br
  front     a slow front for a real server (`upstream`, host:port): forwards each request
            whole, then trickles that server's answer back

Every slow answer stops after `give_up` seconds (the connection is then closed), so a client
without a deadline still returns, late, and a test that measures it fails instead of hanging.
Waits are on an Event, so stopping the server ends every connection at once.
"""

from __future__ import annotations

import socket
import threading
import zlib
from dataclasses import dataclass, field


@dataclass
class Trickle:
    mode: str = "trickle"
    interval: float = 0.5
    give_up: float = 8.0
    connections: int = 0
    upstream: tuple[str, int] | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> "Trickle":
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: list[threading.Thread] = []
        accepter = threading.Thread(target=self._accept, daemon=True)
        accepter.start()
        self._threads.append(accepter)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self.give_up)
            try:
                request = self._read_request(conn)
                if self.mode == "front":
                    self._drip(conn, self._forward(request))
                else:
                    self._answer(conn)
            except OSError:
                pass  # the client went away: what we wanted

    def _read_request(self, conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            piece = conn.recv(65536)
            if not piece:
                return data
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                left = int(value) - len(body)
                while left > 0:
                    piece = conn.recv(min(left, 65536))
                    if not piece:
                        break
                    body += piece
                    left -= len(piece)
        return head + b"\r\n\r\n" + body

    def _forward(self, request: bytes) -> bytes:
        """The upstream's whole answer to `request`, asked on a connection of its own."""
        assert self.upstream is not None
        head, _, body = request.partition(b"\r\n\r\n")
        lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"connection:")]
        with socket.create_connection(self.upstream, timeout=self.give_up) as upstream:
            upstream.sendall(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body)
            answer = b""
            while piece := upstream.recv(65536):
                answer += piece
        return answer

    def _answer(self, conn: socket.socket) -> None:
        if self.mode == "hang":
            self._stop.wait(self.give_up)
            return
        if self.mode == "bomb":
            body = zlib.compress(b"\0" * (100 * 1024 * 1024), 9)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Encoding: deflate\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body
            )
            return
        if self.mode == "brotli":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\r\n\x0b\x00\x80\x03")
            return
        if self.mode == "head":
            self._drip(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Slow: " + b"x" * 1000)
            return
        if self.mode == "error503":
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n")
            self._drip(conn, b"busy " * 20000)
            return
        if self.mode == "deflate":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Encoding: deflate\r\nConnection: close\r\n\r\n")
            self._drip(conn, zlib.compress(b"\x89PNG" * 10000))
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
        self._drip(conn, b"{" + b" " * 100000)

    def _drip(self, conn: socket.socket, data: bytes) -> None:
        for index in range(len(data)):
            conn.sendall(data[index : index + 1])
            if self._stop.wait(self.interval) or (index + 1) * self.interval >= self.give_up:
                return
