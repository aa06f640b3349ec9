"""A generation as Server-Sent Events: what the caller sees while the image is being made.

A request with `Accept: text/event-stream` has passed validation, authentication and its rate
limit (those still answer plain JSON) when a `GenerationStream` takes over. The work runs on a
thread of its own whose progress sink queues events; the response generator sends them as they
come:

    event: accepted   {"requestId"}
    event: queued     {"position"}                       waiting for a slot or the local model
    event: attempt    {"backend", "provider", "model"}
    event: retry      {"reason", "status", "waitSeconds"}
    event: failover   {"from", "to"}
    event: progress   {"step", "steps", "fraction"}       where the backend can tell
    event: partial    {"index", "imageUrl"}               an intermediate image (`partialImages`)
    event: stored     {"filePath"}
    event: result     the non-streamed answer's JSON object
 or event: error      the non-streamed error object, plus "status"

A backend's `partial_image` progress event (its `png`, reported only when the request asked
for `partialImages`) is sent as `partial` with the image as a data URL, numbered from 0, and
only while the stream keeps room for a result of about its size after it (the 10 MB cap below);
and a comment line (": keep-alive") after KEEPALIVE_SECONDS of silence, so that proxies keep
the connection open. Exactly one `result` or `error` ends the stream.

A caller that goes away cancels the work: the generator is closed (a write failed) or the
socket is seen closed while waiting (gunicorn's socket, peeked), and the `cancelled` event the
work carries is set. The dispatcher stops at its next check (before a try, during a retry
wait, before a failover); a backend call already in flight finishes, and its image is still
stored, so a retry with the same seed is served from the cache.
"""

from __future__ import annotations

import json
import math
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pybase64

from imagegen.errors import Cancelled, ImageGenError
from imagegen.events import ProgressSink

Result = TypeVar("Result")

# A comment line after this much silence keeps proxies (and Cloud Run's front end) from
# closing an idle stream. Tests shorten it.
KEEPALIVE_SECONDS = 15.0
# How often a silent stream looks whether its caller is still there.
DISCONNECT_PROBE_SECONDS = 0.5
# Cloud Run ends a streamed answer at 10 MB (32 MB when not streamed). A result that would
# cross it is sent without the image (see `GenerationStream._result`).
MAX_STREAM_BYTES = 10_000_000
# The status logged when the caller left before the final event (nginx's "client closed").
CLIENT_CLOSED = 499

EVENT_STREAM = "text/event-stream"
# Every event a stream may carry (openapi.yaml describes each one's data).
EVENT_NAMES = ("accepted", "queued", "attempt", "retry", "failover", "progress", "partial", "stored", "result", "error")
# The progress event a backend reports an intermediate image with (its field `png`: PNG bytes).
PARTIAL_PROGRESS_EVENT = "partial_image"


def wants_event_stream(accept: Iterable[tuple[str, float]]) -> bool:
    """Whether the Accept header names text/event-stream itself: `*/*` does not count, so
    every caller that does not ask keeps the JSON answer."""
    return any(value.lower() == EVENT_STREAM and quality > 0 for value, quality in accept)


def encode_event(name: str, data: Mapping[str, Any]) -> bytes:
    # json.dumps escapes newlines inside strings, so the data is always one `data:` line.
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


KEEPALIVE = b": keep-alive\n\n"


def NEVER_GONE() -> bool:  # noqa: N802 - a constant: the probe where nothing can be watched
    return False


def disconnect_probe(environ: Mapping[str, Any]) -> Callable[[], bool]:
    """A check whether the caller has closed its connection, where the server hands us the
    socket (gunicorn, werkzeug's dev server); elsewhere it never says so and a failed write
    is what tells. Peeking reads nothing: a pipelined request stays for the server."""
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
        return NEVER_GONE

    def gone() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    return gone


@dataclass(frozen=True)
class Outcome:
    """How a stream ended, for its log line."""

    status: int  # 200, the error's status, or CLIENT_CLOSED
    code: str | None
    bytes_sent: int


class GenerationStream(Generic[Result]):
    """One streamed generation: the work on its own thread, the events as a WSGI body.

    `work(progress, cancelled)` makes the result (or raises an ImageGenError); `success_body`
    and `error_payload` are the door's own answer encoders, so the final event carries exactly
    what the non-streamed answer would; `oversized(result, length)` is the result event's object
    when that answer would carry the stream past MAX_STREAM_BYTES. `on_finish` runs once, when
    both the work and the stream are over, whichever ends last.
    """

    def __init__(
        self,
        request_id: str,
        work: Callable[[ProgressSink, threading.Event], Result],
        success_body: Callable[[Result], tuple[Iterator[bytes], int]],
        error_payload: Callable[[ImageGenError, str], dict[str, Any]],
        oversized: Callable[[Result, int], dict[str, Any]],
        client_gone: Callable[[], bool] = lambda: False,
        on_finish: Callable[[Outcome], None] = lambda outcome: None,
    ) -> None:
        self._request_id = request_id
        self._work = work
        self._success_body = success_body
        self._error_payload = error_payload
        self._oversized = oversized
        self._client_gone = client_gone
        self._on_finish = on_finish
        self.cancelled = threading.Event()
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"imagegen-stream-{request_id[:16]}", daemon=True)
        self._lock = threading.Lock()
        self._open = 2  # the work and the stream
        self._bytes_sent = 0
        self._outcome: tuple[int, str | None] = (CLIENT_CLOSED, Cancelled.code)
        self._partials = 0

    # --- the work's side -------------------------------------------------------------------

    def _progress(self, event: str, **fields: Any) -> None:
        self._events.put(("event", (event, fields)))

    def _run(self) -> None:
        try:
            produced = self._work(self._progress, self.cancelled)
        except ImageGenError as error:
            self._events.put(("error", error))
        except BaseException:  # `work` turns the unexpected into an ImageGenError; this is the rest
            self._events.put(("error", ImageGenError("Something went wrong on the server. Try again.")))
            raise
        else:
            self._events.put(("result", produced))
        finally:
            self._close_one()

    # --- the response's side ---------------------------------------------------------------

    def body(self) -> Iterator[bytes]:
        """The event stream. Closing it early (the server does when a write fails) cancels."""
        finished = False
        try:
            yield self._sent(encode_event("accepted", {"requestId": self._request_id}))
            self._thread.start()
            last_sent = time.monotonic()
            while True:
                try:
                    kind, item = self._events.get(timeout=min(DISCONNECT_PROBE_SECONDS, KEEPALIVE_SECONDS))
                except queue.Empty:
                    if self._client_gone():
                        return
                    if time.monotonic() - last_sent >= KEEPALIVE_SECONDS:
                        yield self._sent(KEEPALIVE)
                        last_sent = time.monotonic()
                    continue
                if kind == "event":
                    name, fields = item
                    event = self._partial(fields) if name == PARTIAL_PROGRESS_EVENT else encode_event(name, fields)
                    if event is not None:
                        yield self._sent(event)
                        last_sent = time.monotonic()
                    continue
                if kind == "result":
                    pieces = self._result(item)
                    self._outcome = (200, None)
                else:
                    error: ImageGenError = item
                    pieces = iter([encode_event("error", {**self._error_payload(error, self._request_id), "status": error.status})])
                    self._outcome = (error.status, error.code)
                for piece in pieces:
                    yield self._sent(piece)
                finished = True
                return
        finally:
            if not finished:
                self._outcome = (CLIENT_CLOSED, Cancelled.code)
                self.cancelled.set()
            self._close_one()

    def _partial(self, fields: Mapping[str, Any]) -> bytes | None:
        """The `partial` event of an intermediate image, or None: not an image, or no room for
        it and then a result of about its size under MAX_STREAM_BYTES."""
        png = fields.get("png")
        if not isinstance(png, bytes):
            return None
        head = b'event: partial\ndata: {"index": %d, "imageUrl": "data:image/png;base64,' % self._partials
        tail = b'"}\n\n'
        if self._bytes_sent + 2 * (len(head) + 4 * math.ceil(len(png) / 3) + len(tail)) > MAX_STREAM_BYTES:
            return None
        self._partials += 1
        return head + pybase64.b64encode(png) + tail

    def _sent(self, piece: bytes) -> bytes:
        self._bytes_sent += len(piece)
        return piece

    def _result(self, result: Result) -> Iterator[bytes]:
        """The `result` event: the answer, spliced piece by piece as the plain answer is, or
        the door's smaller stand-in where the answer would carry the stream past MAX_STREAM_BYTES."""
        head, tail = b"event: result\ndata: ", b"\n\n"
        body, length = self._success_body(result)
        if self._bytes_sent + len(head) + length + len(tail) <= MAX_STREAM_BYTES:
            return iter([head, *body, tail])
        return iter([encode_event("result", self._oversized(result, length))])

    def _close_one(self) -> None:
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            status, code = self._outcome
            self._on_finish(Outcome(status, code, self._bytes_sent))
