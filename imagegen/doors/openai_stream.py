"""`stream: true` on the Images API door: Server-Sent Events as OpenAI's SDKs parse them.

    event: image_generation.partial_image   {"type", "b64_json", "partial_image_index", ...}
    event: image_generation.completed       {"type", "b64_json", "size", "output_format", ...}
    event: error                            {"error": {"message", "type", "param", "code"}}

Only these (and ": keep-alive" comments): the SDKs turn every `data:` into one of their event
types, so the function's own progress events (imagegen.streaming) are not sent here. Every
image is admitted before the stream begins (a refusal still answers with its status); the
images are made in parallel threads, and each `completed` event is sent as soon as its image is
ready. Partial images are what a backend reports as a `partial_image` progress event (its
`png`), at most `partial_images` per image. A caller that goes away cancels the work.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from imagegen.doors.image_files import base64_pieces
from imagegen.errors import ImageGenError
from imagegen.png_info import PngParts
from imagegen.service import Admission, GenerationService, Produced
from imagegen import streaming

PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"
# The progress event a backend reports an intermediate image with (its field `png`: PNG bytes).
PARTIAL_PROGRESS_EVENT = "partial_image"


def sse(name: str, head: dict[str, Any], image: PngParts | None = None) -> Iterator[bytes]:
    """One event; an image's base64 spliced in as `b64_json`, piece by piece."""
    if image is None:
        yield f"event: {name}\ndata: {json.dumps(head, ensure_ascii=False)}\n\n".encode()
        return
    yield f"event: {name}\ndata: ".encode() + json.dumps(head, ensure_ascii=False)[:-1].encode() + b', "b64_json": "'
    yield from base64_pieces(image)
    yield b'"}\n\n'


class ImagesStream:
    """The work of one streamed request on threads of its own, its events as a WSGI body.

    `finish(produced)` turns a made image into the fields and bytes of its `completed` event
    (the asked format); `error_object` is the door's error shape; `on_finish(status, bytes)`
    runs once, when the stream ends."""

    def __init__(
        self,
        service: GenerationService,
        admissions: list[Admission],
        partial_images: int,
        finish: Callable[[Produced], tuple[dict[str, Any], PngParts]],
        error_object: Callable[[ImageGenError], dict[str, Any]],
        client_gone: Callable[[], bool],
        on_finish: Callable[[int, int], None],
    ) -> None:
        self._service = service
        self._admissions = admissions
        self._partial_images = partial_images
        self._finish = finish
        self._error_object = error_object
        self._client_gone = client_gone
        self._on_finish = on_finish
        self.cancelled = threading.Event()
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._sent = 0

    def _work(self, index: int, admission: Admission) -> None:
        partials = 0

        def progress(event: str, **fields: Any) -> None:
            nonlocal partials
            if event == PARTIAL_PROGRESS_EVENT and partials < self._partial_images and isinstance(fields.get("png"), bytes):
                self._events.put(("partial", (index, partials, fields["png"])))
                partials += 1

        try:
            produced = self._service.produce(admission, progress, self.cancelled)
            self._events.put(("completed", self._finish(produced)))
        except ImageGenError as error:
            self._events.put(("error", error))
        except Exception:
            self._events.put(("error", ImageGenError("Something went wrong on the server. Try again.")))

    def body(self) -> Iterator[bytes]:
        threads = [
            threading.Thread(target=self._work, args=(index, admission), name=f"imagegen-oai-{index}", daemon=True)
            for index, admission in enumerate(self._admissions)
        ]
        for thread in threads:
            thread.start()
        left, made, status = len(threads), 0, streaming.CLIENT_CLOSED
        errors: list[ImageGenError] = []
        last_sent = time.monotonic()
        try:
            while left:
                try:
                    kind, item = self._events.get(timeout=min(streaming.DISCONNECT_PROBE_SECONDS, streaming.KEEPALIVE_SECONDS))
                except queue.Empty:
                    if self._client_gone():
                        return
                    if time.monotonic() - last_sent >= streaming.KEEPALIVE_SECONDS:
                        yield self._count(streaming.KEEPALIVE)
                        last_sent = time.monotonic()
                    continue
                if kind == "partial":
                    index, partial, png = item
                    head = {"type": PARTIAL, "partial_image_index": partial, "created_at": int(time.time())}
                    pieces = sse(PARTIAL, head, PngParts.of(png))
                elif kind == "completed":
                    fields, image = item
                    pieces = sse(COMPLETED, {"type": COMPLETED, **fields}, image)
                    left, made = left - 1, made + 1
                else:
                    errors.append(item)
                    left -= 1
                    if left or made:
                        continue  # the others' images still come; the count is in the log
                    pieces = sse("error", self._error_object(item))
                for piece in pieces:
                    yield self._count(piece)
                last_sent = time.monotonic()
            status = 200 if made else errors[0].status
        finally:
            if left:
                self.cancelled.set()
            self._on_finish(status, self._sent)

    def _count(self, piece: bytes) -> bytes:
        self._sent += len(piece)
        return piece
