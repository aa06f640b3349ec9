"""What every vendor stand-in shares: a loopback HTTP server, a scripted reply queue, a log.

A stand-in subclasses `StandIn` and lists its `routes()`: (method, path regex, handler,
auth check or None, scripted?). For each request the server reads and records it, answers
404 in the vendor's shape when no route matches, runs the route's auth check (which answers
the vendor's refusal), and, on a *scripted* route (the generation call), takes the next
`Reply` from the queue:

- `Reply(body=...)` is sent as it is (a dict or list as JSON): scripted errors, refusals;
- `Reply()` (body None) lets the route build its normal answer; `plan` carries a
  vendor-specific instruction for it (Replicate's polling, Stability's CONTENT_FILTERED);
- `hold=True` keeps the request until `release()`; `hold_seconds` delays it (also cut
  short by `release()` or `stop()`), so tests can make a vendor slow without sleeping;
  `release=Event()` holds this one request until the test sets that event (or `stop()`);
- `cut_after=N` declares the whole body but sends N bytes of it, waits for `release` (if
  any) and closes: a connection that drops, or stalls, half-way through an image.

Tests read `requests` (every `ReceivedRequest`, CDN and polling included) or `calls()` (the
scripted route only). `publish()` puts bytes on the unauthenticated `/cdn/` path.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image, ImageDraw, ImageFilter

MAX_HOLD_SECONDS = 30.0  # a held request never outlives a forgetful test by more than this
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}


def make_image(width: int, height: int, seed: int | str = 0, fmt: str = "png", blur: bool = False) -> bytes:
    """A small picture drawn from `seed`: same seed, same bytes; `blur` looks filtered."""
    rng = random.Random(hashlib.sha256(str(seed).encode()).digest())
    image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        box = (x0, y0, min(width, x0 + rng.randrange(1, width + 1)), min(height, y0 + rng.randrange(1, height + 1)))
        draw.rectangle(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(radius=max(2, min(width, height) // 6)))
    out = io.BytesIO()
    image.save(out, format={"jpg": "JPEG"}.get(fmt, fmt.upper()))
    return out.getvalue()


def make_png(width: int = 64, height: int = 64, seed: int | str = 0) -> bytes:
    return make_image(width, height, seed)


def ratio_size(aspect_ratio: str, long_side: int = 64) -> tuple[int, int]:
    """A small size with this "W:H" ratio: the long side is `long_side` pixels."""
    w, h = (int(part) for part in aspect_ratio.split(":"))
    if w >= h:
        return long_side, max(1, round(long_side * h / w))
    return max(1, round(long_side * w / h)), long_side


@dataclass
class Reply:
    status: int = 200
    body: bytes | dict | list | None = None  # None: the route's normal answer
    headers: dict[str, str] = field(default_factory=dict)
    plan: Any = None  # for the route's normal answer: a vendor-specific instruction
    hold: bool = False  # wait for release() (at most MAX_HOLD_SECONDS)
    hold_seconds: float = 0.0  # wait this long first (release() or stop() cuts it short)
    release: threading.Event | None = None  # hold until the test sets it (stop() sets it too)
    cut_after: int | None = None  # send only this many bytes of the body, then close


@dataclass
class ReceivedRequest:
    method: str
    path: str  # without the query string
    query: dict[str, list[str]]
    headers: dict[str, str]  # as sent; read them with header(), which ignores case
    body: bytes
    form: dict[str, str] | None = None  # multipart/form-data fields, when the body was that
    files: dict[str, tuple[str, bytes]] | None = None  # multipart file parts: name -> (filename, data)
    scripted: bool = False  # it reached the scripted route (a generation call)

    def header(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return default

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # see Reply.cut_after
    release: threading.Event | None = None


def json_answer(payload: Any, status: int = 200, headers: dict[str, str] | None = None,
                content_type: str = "application/json") -> Answer:
    return Answer(status, json.dumps(payload).encode(), {"Content-Type": content_type, **(headers or {})})


Route = tuple[str, str, Callable[..., Answer], Callable[[ReceivedRequest], Answer | None] | None, bool]


SHUTDOWN_POLL_SECONDS = 0.05  # serve_forever's 0.5 s default makes every stop() take that long


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default 5 drops connections when 100 arrive at once


class StandIn:
    """Base of the vendor stand-ins; see the module docstring."""

    def __init__(self) -> None:
        self.requests: list[ReceivedRequest] = []
        self._replies: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._stopping = threading.Event()
        self._holding = 0
        self._held: list[threading.Event] = []  # every Reply.release waited on, set by stop()
        self._cdn: dict[str, tuple[bytes, str]] = {}
        self._ids = itertools.count(1)
        self._routes = [(method, re.compile(pattern), *rest) for method, pattern, *rest in self.routes()]
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(SHUTDOWN_POLL_SECONDS,), daemon=True)

    # -- what a subclass provides ------------------------------------------------------------

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def not_found(self, request: ReceivedRequest) -> Answer:
        return json_answer({"error": "Not Found"}, 404)

    def extra_headers(self) -> dict[str, str]:
        """Headers on every answer (request ids)."""
        return {}

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._release.set()
        with self._lock:
            held = list(self._held)
        for event in held:
            event.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- scripting -----------------------------------------------------------------------------

    def reply(self, *replies: Reply) -> None:
        """Queue the answers to the next scripted calls; an empty queue means success."""
        with self._lock:
            self._replies.extend(replies)

    def release(self) -> None:
        """Let every held request (and every later one) go."""
        self._release.set()

    @property
    def holding(self) -> int:
        """How many requests are being held right now (wait on it with servers.wait_until)."""
        with self._lock:
            return self._holding

    def calls(self) -> list[ReceivedRequest]:
        """The requests that reached a scripted route (the generation calls)."""
        with self._lock:
            return [r for r in self.requests if r.scripted]

    def publish(self, data: bytes, ext: str = "png") -> str:
        """Serve `data` without auth at a fresh /cdn/ URL, and return that URL."""
        name = f"{next(self._ids)}.{ext}"
        with self._lock:
            self._cdn[name] = (data, CONTENT_TYPES.get(ext, "application/octet-stream"))
        return f"{self.url}/cdn/{name}"

    def new_id(self) -> int:
        return next(self._ids)

    # -- the server ----------------------------------------------------------------------------

    def _next_reply(self) -> Reply:
        with self._lock:
            return self._replies.popleft() if self._replies else Reply()

    def _wait(self, reply: Reply) -> None:
        held = reply.release if reply.cut_after is None else None  # a cut answer waits mid-body
        if not (reply.hold or reply.hold_seconds or held):
            return
        with self._lock:
            self._holding += 1
        try:
            if reply.hold_seconds:
                self._release.wait(reply.hold_seconds)
            if reply.hold:
                self._release.wait(MAX_HOLD_SECONDS)
            if held is not None:
                self._wait_for(held)
        finally:
            with self._lock:
                self._holding -= 1

    def _wait_for(self, event: threading.Event) -> None:
        with self._lock:
            self._held.append(event)
            if self._stopping.is_set():
                event.set()
        event.wait(MAX_HOLD_SECONDS)

    def _answer(self, request: ReceivedRequest) -> Answer:
        if request.method == "GET" and request.path.startswith("/cdn/"):
            with self._lock:
                found = self._cdn.get(request.path.removeprefix("/cdn/"))
            if found is None:
                return Answer(404, b"Not Found", {"Content-Type": "text/plain"})
            return Answer(200, found[0], {"Content-Type": found[1]})
        for method, pattern, handler, auth, scripted in self._routes:
            match = pattern.fullmatch(request.path)
            if method != request.method or match is None:
                continue
            if auth is not None and (refusal := auth(request)) is not None:
                return refusal
            if not scripted:
                return handler(request, match, Reply())
            request.scripted = True
            reply = self._next_reply()
            self._wait(reply)
            if reply.body is None:
                answer = handler(request, match, reply)
                answer.headers.update(reply.headers)
            elif isinstance(reply.body, bytes):
                answer = Answer(reply.status, reply.body, dict(reply.headers))
            else:
                answer = json_answer(reply.body, reply.status, reply.headers,
                                     reply.headers.get("Content-Type", "application/json"))
            answer.cut_after, answer.release = reply.cut_after, reply.release
            return answer
        return self.not_found(request)

    def _handler_class(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                parts = urlsplit(self.path)
                request = ReceivedRequest(self.command, parts.path, parse_qs(parts.query),
                                          dict(self.headers.items()), body)
                content_type = request.header("Content-Type", "") or ""
                if content_type.startswith("multipart/form-data"):
                    request.form, request.files = parse_multipart(content_type, body)
                with standin._lock:
                    standin.requests.append(request)
                answer = standin._answer(request)
                try:
                    self.send_response(answer.status)
                    for name, value in {**standin.extra_headers(), **answer.headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    if answer.cut_after is None:
                        self.wfile.write(answer.body)
                        return
                    self.wfile.write(answer.body[: answer.cut_after])
                    self.wfile.flush()
                    if answer.release is not None:
                        standin._wait_for(answer.release)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                self.close_connection = True

            do_GET = do_POST = do_PUT = do_DELETE = _serve

        return Handler


def parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """multipart/form-data → (text fields, file parts), with the stdlib's MIME parser."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if not message.is_multipart():
        return fields, files
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None:
            continue
        data = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, data)
        else:
            fields[name] = data.decode("utf-8")
    return fields, files


def bearer(request: ReceivedRequest) -> str | None:
    value = request.header("Authorization") or ""
    return value[7:] if value.startswith("Bearer ") else None
