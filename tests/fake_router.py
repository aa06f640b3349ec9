"""A stand-in for https://router.huggingface.co (and the Hub) on loopback, in their wire format.

- POST /hf-inference/models/{owner}/{name}, {"inputs", "parameters"}: raw PNG of the asked size.
- POST /fal-ai/{id}: {"images": [{"url": <this server>/cdn/N.png}]}, the PNG served there.
- POST /together/v1/images/generations, /nscale/v1/images/generations: {"data": [{"b64_json"}]}.
- POST /wavespeed/api/v3/{id}: a task; GET its urls.get path: "processing", then "completed".
- GET /api/models/{owner}/{name}?expand[]=inferenceProviderMapping: from `mappings`.
Every route but the CDN needs `Authorization: Bearer <token>` (else the router's 401 JSON).
Errors use the router's shapes (`{"error": "..."}`, `x-request-id`, `Retry-After`). Tests
script the next POST answers with `reply()` and read what arrived in `requests`: the framework
of the vendor stand-ins (tests/standin.py), its `Reply` and `ReceivedRequest`.
"""

from __future__ import annotations

import base64
import io
import json
import re
import uuid
from typing import Any

from PIL import Image

from tests.standin import Answer, ReceivedRequest, Reply, Route, StandIn, bearer, json_answer

__all__ = ["FakeRouter", "ReceivedRequest", "Reply", "make_png"]

DEFAULT_SIDE = 64  # small: the real default is 1024, but tests only need a real PNG


def make_png(width: int = DEFAULT_SIDE, height: int = DEFAULT_SIDE, color=(200, 80, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


class FakeRouter(StandIn):
    def __init__(self, token: str, image: bytes | None = None, delay_seconds: float = 0.0) -> None:
        """`image`: served by hf-inference instead of a fresh PNG (benchmarks); `delay_seconds`:
        how long each generation takes."""
        self.token = token
        self.image = image
        self.delay_seconds = delay_seconds
        self.mappings: dict[str, dict] = {}  # model id -> the Hub's inferenceProviderMapping
        self._tasks: dict[str, bytes] = {}  # WaveSpeed task -> its image, published when done
        self._polls: dict[str, int] = {}
        super().__init__()

    def routes(self) -> list[Route]:
        auth = self._authorized
        return [
            ("POST", r"/hf-inference/models/.+", self._hf_inference, auth, True),
            ("POST", r"/fal-ai/.+", self._fal, auth, True),
            ("POST", r"/(together|nscale)/v1/images/generations", self._b64_json, auth, True),
            ("POST", r"/wavespeed/api/v3/.+", self._wavespeed_task, auth, True),
            ("GET", r"/api/models/(.+)", self._mapping, auth, False),
            ("GET", r"/wavespeed/api/v3/predictions/([^/]+)/result", self._wavespeed_poll, auth, False),
        ]

    def extra_headers(self) -> dict[str, str]:
        return {"x-request-id": f"Root={uuid.uuid4().hex[:16]}"}

    def reply_error(self, status: int, error: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": error} if isinstance(error, str) else error).encode()
        self.reply(Reply(status, body, {"Content-Type": "application/json", **(headers or {})}))

    def posts(self) -> list[ReceivedRequest]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST"]

    def _wait(self, reply: Reply) -> None:
        super()._wait(reply)
        if self.delay_seconds:
            self._release.wait(self.delay_seconds)

    def _authorized(self, request: ReceivedRequest) -> Answer | None:
        if bearer(request) == self.token:
            return None
        return json_answer({"error": "Invalid credentials in Authorization header"}, 401)

    def _hf_inference(self, request: ReceivedRequest, match: re.Match, reply: Reply) -> Answer:
        if reply.cut_after is not None:  # big enough to cut: the real default size
            return Answer(reply.status, make_png(1024, 1024), {"Content-Type": "image/png"})
        image = self.image or make_png(*_size(request.json()))
        return Answer(reply.status, image, {"Content-Type": "image/png"})

    def _fal(self, request: ReceivedRequest, match: re.Match, reply: Reply) -> Answer:
        url = self.publish(make_png(*_size(request.json())))
        return json_answer({"images": [{"url": url, "content_type": "image/png"}]})

    def _b64_json(self, request: ReceivedRequest, match: re.Match, reply: Reply) -> Answer:
        return json_answer({"data": [{"b64_json": base64.b64encode(make_png(*_size(request.json()))).decode()}]})

    def _wavespeed_task(self, request: ReceivedRequest, match: re.Match, reply: Reply) -> Answer:
        task = f"task{self.new_id()}"
        self._tasks[task] = make_png(*_size(request.json()))
        get = f"https://api.wavespeed.ai/api/v3/predictions/{task}/result"
        return json_answer({"code": 200, "data": {"id": task, "status": "created", "urls": {"get": get}}})

    def _wavespeed_poll(self, request: ReceivedRequest, match: re.Match, reply: Reply) -> Answer:
        task = match.group(1)
        polls = self._polls[task] = self._polls.get(task, 0) + 1
        data: dict[str, Any] = {"id": task, "status": "processing"}
        if polls >= 2:
            data = {"id": task, "status": "completed", "outputs": [self.publish(self._tasks[task])]}
        return json_answer({"code": 200, "data": data})

    def _mapping(self, request: ReceivedRequest, match: re.Match, reply: Reply) -> Answer:
        model = match.group(1)
        if model not in self.mappings:
            return json_answer({"error": "Repository not found"}, 404)
        return json_answer({"id": model, "inferenceProviderMapping": self.mappings[model]})


def _size(payload: dict[str, Any]) -> tuple[int, int]:
    """The size asked for, in whichever provider's shape the payload uses."""
    source = payload.get("parameters") or payload.get("input") or payload
    if isinstance(source.get("image_size"), dict):
        return source["image_size"]["width"], source["image_size"]["height"]
    if isinstance(source.get("size"), str):
        width, height = source["size"].split("x")
        return int(width), int(height)
    return source.get("width", DEFAULT_SIDE), source.get("height", DEFAULT_SIDE)
