"""A stand-in for https://router.huggingface.co (and the Hub) on loopback, in their wire format.

- POST /hf-inference/models/{owner}/{name}, {"inputs", "parameters"}: raw PNG of the asked size.
- POST /fal-ai/{id}: {"images": [{"url": <this server>/cdn/N.png}]}, the PNG served there.
- POST /together/v1/images/generations, /nscale/v1/images/generations: {"data": [{"b64_json"}]}.
- POST /wavespeed/api/v3/{id}: a task; GET its urls.get path: "processing", then "completed".
- GET /api/models/{owner}/{name}?expand[]=inferenceProviderMapping: from `mappings`.
Every route but the CDN needs `Authorization: Bearer <token>` (else the router's 401 JSON).
Errors use the router's shapes (`{"error": "..."}`, `x-request-id`, `Retry-After`). Tests
script the next POST answers with `reply()` and read what arrived in `requests`.
"""

from __future__ import annotations

import base64
import io
import itertools
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
    release: threading.Event | None = None  # or until this is set (at most 30 s)
    # Declare the whole body but send only this many bytes of it, then wait for `release`
    # (if any) and close: a connection that drops, or stalls, half-way through an image.
    cut_after: int | None = None


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 drops connections when 100 arrive at once


class FakeRouter:
    def __init__(self, token: str, image: bytes | None = None, delay_seconds: float = 0.0) -> None:
        """`image`: served by hf-inference instead of a fresh PNG (benchmarks); `delay_seconds`:
        how long each generation takes."""
        self.token = token
        self.image = image
        self.delay_seconds = delay_seconds
        self.requests: list[ReceivedRequest] = []
        self._replies: deque[Reply] = deque()
        self._release = threading.Event()
        self._lock = threading.Lock()
        self.mappings: dict[str, dict] = {}  # model id -> the Hub's inferenceProviderMapping
        self._cdn: dict[str, bytes] = {}
        self._polls: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._held: list[threading.Event] = []
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeRouter:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        for event in self._held:
            event.set()
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

    def _publish(self, png: bytes) -> str:
        name = f"{next(self._ids)}.png"
        self._cdn[name] = png
        return f"{self.url}/cdn/{name}"

    def posts(self) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.method == "POST"]

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
                body = self._receive()
                if not self._authorized():
                    return
                route = self.path.split("?")[0]
                reply = router._next_reply()
                if reply.hold_seconds:
                    router._release.wait(reply.hold_seconds)
                if reply.release is not None and reply.cut_after is None:
                    router._held.append(reply.release)
                    reply.release.wait(30)
                if router.delay_seconds:
                    router._release.wait(router.delay_seconds)
                if reply.cut_after is not None:
                    self._send_cut(reply)
                    return
                if reply.body is not None:
                    self._send(reply.status, reply.body, reply.headers)
                    return
                parameters = json.loads(body)
                size = _size(parameters)
                if route.startswith("/hf-inference/models/"):
                    image = router.image or make_png(*size)
                    self._send(reply.status, image, {"Content-Type": "image/png", **reply.headers})
                elif route.startswith("/fal-ai/"):
                    self._json({"images": [{"url": router._publish(make_png(*size)), "content_type": "image/png"}]})
                elif route in ("/together/v1/images/generations", "/nscale/v1/images/generations"):
                    self._json({"data": [{"b64_json": base64.b64encode(make_png(*size)).decode()}]})
                elif route.startswith("/wavespeed/api/v3/"):
                    task = f"task{next(router._ids)}"
                    router._cdn[task] = make_png(*size)
                    self._json({"code": 200, "data": {"id": task, "status": "created", "urls": {"get": f"https://api.wavespeed.ai/api/v3/predictions/{task}/result"}}})
                else:
                    self._json({"error": "Not Found"}, 404)

            def do_GET(self) -> None:
                self._receive()
                route = self.path.split("?")[0]
                if route.startswith("/cdn/"):
                    data = router._cdn.get(route.removeprefix("/cdn/"))
                    self._send(200 if data else 404, data or b"missing", {"Content-Type": "image/png"})
                    return
                if not self._authorized():
                    return
                if route.startswith("/api/models/"):
                    model = route.removeprefix("/api/models/")
                    if model not in router.mappings:
                        self._json({"error": "Repository not found"}, 404)
                    else:
                        self._json({"id": model, "inferenceProviderMapping": router.mappings[model]})
                elif route.startswith("/wavespeed/api/v3/predictions/"):
                    task = route.split("/")[5]
                    polls = router._polls[task] = router._polls.get(task, 0) + 1
                    data = {"id": task, "status": "processing"}
                    if polls >= 2:
                        data = {"id": task, "status": "completed", "outputs": [router._publish(router._cdn[task])]}
                    self._json({"code": 200, "data": data})
                else:
                    self._json({"error": "Not Found"}, 404)

            def _receive(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with router._lock:
                    router.requests.append(ReceivedRequest(self.command, self.path, dict(self.headers.items()), body))
                return body

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {router.token}":
                    return True
                self._json({"error": "Invalid credentials in Authorization header"}, 401)
                return False

            def _json(self, answer: Any, status: int = 200) -> None:
                self._send(status, json.dumps(answer).encode(), {"Content-Type": "application/json"})

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

            def _send_cut(self, reply: Reply) -> None:
                payload = reply.body if reply.body is not None else make_png(1024, 1024)
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload[: reply.cut_after])
                    if reply.release is not None:
                        router._held.append(reply.release)
                        reply.release.wait(30)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

        return Handler


def _size(payload: dict[str, Any]) -> tuple[int, int]:
    """The size asked for, in whichever provider's shape the payload uses."""
    source = payload.get("parameters") or payload.get("input") or payload
    if isinstance(source.get("image_size"), dict):
        return source["image_size"]["width"], source["image_size"]["height"]
    if isinstance(source.get("size"), str):
        width, height = source["size"].split("x")
        return int(width), int(height)
    return source.get("width", DEFAULT_SIDE), source.get("height", DEFAULT_SIDE)
