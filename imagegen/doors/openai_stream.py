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

Cloud Run ends a streamed answer at 10 MB (streaming.MAX_STREAM_BYTES), and `n` images may
cross it: the JSON API's rule holds here too. A partial image is left out (it is only a
preview) unless the stream keeps room after it for every image still to come, each counted at
the preview's size; a `completed` event that would comes without
`b64_json`, with the stored image's `url` and a warning instead; and an image with no URL to
give is an `error` event (`stream_too_large`, saying to ask without `stream`), sent after every
other image, since the SDKs stop reading at an error.
"""

from __future__ import annotations

import json
import queue
import threading
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from imagegen.errors import ImageGenError, StreamTooLarge
from imagegen.png_info import PngParts
from imagegen.service import Admission, GenerationService, Produced
from imagegen import streaming

PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"
# The progress event a backend reports an intermediate image with (its field `png`: PNG bytes).
PARTIAL_PROGRESS_EVENT = "partial_image"


def no_url() -> str | None:
    return None


@dataclass(frozen=True)
class Completed:
    """A made image as its `completed` event carries it: the event's fields, the image in the
    asked format, and `url()`, a URL of the stored image (None when there is none), asked only
    when the image is too large for the stream."""

    fields: dict[str, Any]
    image: PngParts
    url: Callable[[], str | None] = no_url


def sse_length(name: str, head: dict[str, Any], image: PngParts) -> int:
    """How many bytes `sse(name, head, image)` sends, without encoding the image."""
    framing = len(f"event: {name}\ndata: ".encode()) + len(b', "b64_json": "') + len(b'"}\n\n')
    return framing + len(json.dumps(head, ensure_ascii=False)[:-1].encode()) + 4 * math.ceil(len(image) / 3)


def sse(name: str, head: dict[str, Any], image: PngParts | None = None) -> Iterator[bytes]:
    """One event; an image's base64 spliced in as `b64_json`, piece by piece."""
    if image is None:
        yield f"event: {name}\ndata: {json.dumps(head, ensure_ascii=False)}\n\n".encode()
        return
    yield f"event: {name}\ndata: ".encode() + json.dumps(head, ensure_ascii=False)[:-1].encode() + b', "b64_json": "'
    yield from image.base64_pieces()
    yield b'"}\n\n'


class ImagesStream:
    """The work of one streamed request on threads of its own, its events as a WSGI body.

    `finish(produced)` turns a made image into its `completed` event (the asked format);
    `error_object` is the door's error shape; `on_finish(status, bytes)` runs once, when the
    stream ends."""

    def __init__(
        self,
        service: GenerationService,
        admissions: list[Admission],
        partial_images: int,
        finish: Callable[[Produced], Completed],
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
        too_large: list[StreamTooLarge] = []  # sent last: the SDKs stop reading at an error
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
                    if not self._fits(sse_length(PARTIAL, head, PngParts.of(png)) * (1 + left)):
                        continue  # a preview must leave room for the images still to come (about its size each)
                    pieces = sse(PARTIAL, head, PngParts.of(png))
                elif kind == "completed":
                    left -= 1
                    pieces = self._completed(item, too_large)
                    if pieces is None:
                        continue
                    made += 1
                else:
                    errors.append(item)
                    left -= 1
                    if left or made or too_large:
                        continue  # the others' images still come; the count is in the log
                    pieces = sse("error", self._error_object(item))
                for piece in pieces:
                    yield self._count(piece)
                last_sent = time.monotonic()
            if too_large:
                for piece in sse("error", self._error_object(too_large[0])):
                    yield self._count(piece)
            status = 200 if made else (too_large or errors)[0].status
        finally:
            if left:
                self.cancelled.set()
            self._on_finish(status, self._sent)

    def _fits(self, length: int) -> bool:
        return self._sent + length <= streaming.MAX_STREAM_BYTES

    def _completed(self, completed: Completed, too_large: list[StreamTooLarge]) -> Iterator[bytes] | None:
        """The image's `completed` event; where its base64 would carry the stream past the cap,
        the event with its URL instead, or None (an error is noted) when it has none."""
        head = {"type": COMPLETED, **completed.fields}
        length = sse_length(COMPLETED, head, completed.image)
        if self._fits(length):
            return sse(COMPLETED, head, completed.image)
        note = (
            f"The image ({length / 1_000_000:.1f} MB as base64) is too large for a streamed answer, which "
            f"Cloud Run ends at {streaming.MAX_STREAM_BYTES / 1_000_000:g} MB"
        )
        url = completed.url()
        if url is None:
            where = completed.fields.get("imagegen", {}).get("filePath")
            stored = f" It is stored as {where}." if where else ""
            too_large.append(StreamTooLarge(
                f"{note}, and it has no URL to give instead.{stored} Ask again without stream (or with fewer "
                "images, or a smaller size) to receive it."
            ))  # fmt: skip
            return None
        extension = dict(head.get("imagegen") or {})
        warning = f"{note}: it is at `url` instead of in `b64_json`."
        extension["warning"] = f"{extension['warning']} {warning}" if extension.get("warning") else warning
        return sse(COMPLETED, {**head, "url": url, "imagegen": extension})

    def _count(self, piece: bytes) -> bytes:
        self._sent += len(piece)
        return piece
