"""A stand-in for https://router.huggingface.co on loopback, speaking its wire format.

POST /hf-inference/models/{owner}/{name} with `Authorization: Bearer <token>` and a JSON body
{"inputs": prompt, "parameters": {...}}; the answer is raw PNG bytes of the requested size, or
the router's JSON error shapes (`{"error": "..."}` with `x-request-id`, `Retry-After`). Tests
script answers with `reply()`, and read what arrived in `requests`.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

DEFAULT_SIDE = 64  # small: the real default is 1024, but tests only need a real PNG


def make_png(width: int = DEFAULT_SIDE, height: int = DEFAULT_SIDE, color=(200, 80, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Reply:
    status: int = 200
    body: bytes | None = None  # None: a PNG of the requested size
    headers: dict[str, str] = field(default_factory=dict)
    hold_seconds: float = 0.0  # wait this long (or until released) before answering


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeRouter:
    def __init__(self, token: str) -> None:
        self.token = token
        self.requests: list[ReceivedRequest] = []
        self._replies: deque[Reply] = deque()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeRouter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def reply(self, *replies: Reply) -> None:
        """Queue the next answers; when the queue is empty, requests get a PNG."""
        with self._lock:
            self._replies.extend(replies)

    def reply_error(self, status: int, error: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": error} if isinstance(error, str) else error).encode()
        self.reply(Reply(status, body, {"Content-Type": "application/json", **(headers or {})}))

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._replies.popleft() if self._replies else Reply()

    def _handler_class(self):
        router = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                received = ReceivedRequest("POST", self.path, dict(self.headers.items()), body)
                with router._lock:
                    router.requests.append(received)
                if self.headers.get("Authorization") != f"Bearer {router.token}":
                    self._send(401, json.dumps({"error": "Invalid credentials in Authorization header"}).encode(),
                               {"Content-Type": "application/json"})
                    return
                if not self.path.startswith("/hf-inference/models/"):
                    self._send(404, b'{"error":"Not Found"}', {"Content-Type": "application/json"})
                    return
                reply = router._next_reply()
                if reply.hold_seconds:
                    router._release.wait(reply.hold_seconds)
                payload = reply.body
                headers = dict(reply.headers)
                if payload is None:
                    parameters = json.loads(body).get("parameters", {})
                    payload = make_png(parameters.get("width", DEFAULT_SIDE), parameters.get("height", DEFAULT_SIDE))
                    headers.setdefault("Content-Type", "image/png")
                self._send(reply.status, payload, headers)

            def _send(self, status: int, payload: bytes, headers: dict[str, str]) -> None:
                try:
                    self.send_response(status)
                    self.send_header("x-request-id", f"Root={uuid.uuid4().hex[:16]}")
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

        return Handler
