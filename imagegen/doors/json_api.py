"""The function's own JSON API: `POST {"prompt": ...}` -> `{"success": true, "imageUrl": ...}`,
or the same answer as Server-Sent Events when the caller asks for `text/event-stream`."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import flask

from imagegen.errors import Cancelled, ImageGenError
from imagegen.events import ProgressSink
from imagegen.doors.common import DoorParts, json_body
from imagegen.doors.watch import WATCH
from imagegen.http import Endpoint, error_payload, note_error, response
from imagegen.record import RequestRecord
from imagegen.service import Admission, GenerationService, Produced
from imagegen import streaming
from imagegen.streaming import (
    CLIENT_CLOSED,
    EVENT_STREAM,
    GenerationStream,
    Outcome,
    disconnect_probe,
    wants_event_stream,
)
from imagegen.validation import parse_generation_request

class JsonApi:
    def __init__(self, parts: DoorParts) -> None:
        self._parts = parts

    def endpoint(self) -> Endpoint:
        return Endpoint(
            ("POST",), self.generate, "Use POST with a JSON body to generate an image (got {method}).", allow="POST, OPTIONS"
        )

    def generate(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        caller = self._parts.caller(request, record)
        with record.phase("validate"):
            generation = parse_generation_request(json_body(request), self._parts.catalog, self._parts.max_prompt_chars)
        if wants_event_stream(request.accept_mimetypes):
            # The cache is asked inside the stream, after `accepted`: a slow store must not
            # keep a stream silent.
            return self._stream(request, self._parts.service.admit(generation, caller, record, look_up_cache=False), record)
        generation = replace(generation, partial_images=0)  # only a stream carries them
        admission = self._parts.service.admit(generation, caller, record)
        body, length = success_body(produce_watching(self._parts.service, admission, disconnect_probe(request.environ)))
        return response(200, body, {"Content-Type": "application/json", "Content-Length": str(length)})

    def _stream(self, request: flask.Request, admission: Admission, record: RequestRecord) -> flask.Response:
        """Server-Sent Events (imagegen.streaming): the work on its own thread, its progress
        as events, then the same answer as JSON in one `result` or `error` event."""
        facts = self._parts.access_log.facts(request)
        record.fields["stream"] = True

        def work(progress: ProgressSink, cancelled: threading.Event) -> Produced:
            try:
                return self._parts.service.produce(admission, progress, cancelled)
            except ImageGenError as error:
                note_error(record, error)
                raise
            except Exception:
                raise self._parts.access_log.unexpected(facts.method, facts.path, record) from None

        def finished(outcome: Outcome) -> None:
            if outcome.status == CLIENT_CLOSED:
                record.fields["code"] = "cancelled"
                record.fields["clientClosed"] = True
            self._parts.access_log.write(lambda: facts, outcome.status, outcome.bytes_sent, record)

        stream = GenerationStream(
            record.request_id,
            work,
            success_body,
            error_payload,
            oversized_result,
            client_gone=disconnect_probe(request.environ),
            on_finish=finished,
        )
        return response(200, stream.body(), {"Content-Type": EVENT_STREAM, "X-Accel-Buffering": "no"})


def produce_watching(service: GenerationService, admission: Admission, client_gone: Callable[[], bool]) -> Produced:
    """The image for a plain (not streamed) request, cancelled when its caller goes away, as a
    stream's is: a caller that gave up must not keep holding a queue place, a slot or the
    local model. Where the server gives no socket to watch, nothing watches."""
    cancelled = threading.Event()
    try:
        with WATCH.watching(client_gone, cancelled.set):
            return service.produce(admission, cancelled=cancelled)
    except Cancelled:
        admission.record.fields["clientClosed"] = True
        raise


def answer_fields(produced: Produced) -> dict[str, Any]:
    """The answer's fields besides the image, in the order the API documents them."""
    width, height = produced.size
    facts = produced.facts()
    fields: dict[str, Any] = {
        "filePath": produced.file_path,
        "backend": facts["backend"],
        "model": facts["model"],
        "provider": facts["provider"],
        "seed": facts["seed"],
        "width": width,
        "height": height,
        "cached": facts["cached"],
        "ignored": facts["ignored"],
    }
    if "warning" in facts:
        fields["warning"] = facts["warning"]
    return fields


def success_body(produced: Produced) -> tuple[Iterator[bytes], int]:
    """The success JSON as pieces and its length, the image's base64 made piece by piece.

    The image is megabytes: as one string its base64 and then the joined answer would each be
    another copy per request in flight. Base64 needs no JSON escaping, so it is spliced in.
    """
    head = b'{"success": true, "imageUrl": "data:image/png;base64,'
    tail = b'", ' + json.dumps(answer_fields(produced), ensure_ascii=False)[1:].encode()  # '"filePath": ..., ...}'
    png = produced.png
    length = len(head) + 4 * ((len(png) + 2) // 3) + len(tail)

    def pieces() -> Iterator[bytes]:
        yield head
        yield from png.base64_pieces()
        yield tail

    return pieces(), length


def oversized_result(produced: Produced, length: int) -> dict[str, Any]:
    """The streamed `result` when the image would carry the stream past Cloud Run's cap: the
    same object with `imageUrl: null` and a warning saying where the image is and how to get it."""
    fields = answer_fields(produced)
    where = (
        f"It is stored as {produced.file_path}; ask again without 'Accept: text/event-stream' to receive it"
        if produced.file_path
        else "Ask again without 'Accept: text/event-stream' to receive it"
    )
    if produced.seed is not None:
        where += f" (with seed {produced.seed} it is served from the cache)"
    note = (
        f"The image ({length / 1_000_000:.1f} MB as base64) is too large for a streamed answer, "
        f"which Cloud Run ends at {streaming.MAX_STREAM_BYTES / 1_000_000:g} MB. {where}."
    )
    fields["warning"] = f"{fields['warning']} {note}" if fields.get("warning") else note
    return {"success": True, "imageUrl": None, **fields}
