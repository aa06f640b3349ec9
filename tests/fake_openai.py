"""A stand-in for the OpenAI Images API (https://api.openai.com/v1) on loopback.

- POST /v1/images/generations, `Authorization: Bearer <key>`, JSON `{model, prompt, n, size,
  quality, output_format, background, moderation, user}`. Answer 200 `{"created", "background",
  "data": [{"b64_json"}] * n, "output_format", "quality", "size", "usage": {input_tokens,
  input_tokens_details {image_tokens, text_tokens}, output_tokens, total_tokens}}` with an image
  of the asked size (`auto`: 1024x1024) in the asked format (png by default).
- `stream: true` (with `partial_images` 0-3) answers Server-Sent Events instead, as the real
  API does: per image, `partial_images` events `image_generation.partial_image` {type,
  b64_json, partial_image_index, created_at, size, quality, background, output_format} (each
  `partial_image(prompt, index, width, height)`, so a test knows what was sent), then
  `image_generation.completed` {type, b64_json, created_at, size, quality, background,
  output_format, usage}. `event_stream((name, data), ...)` scripts any other stream (an `error`
  event mid-way: `{"type": "error", "error": {...}}`).
- Checks as the real API does: a missing or wrong key → 401 (`invalid_api_key`); a model not in
  `models` (gpt-image-1 and DALL·E were shut down) → 404 `model_not_found`; `response_format`
  → 400 `unknown_parameter`; a size that is not WxH → 400 `invalid_size`; no prompt → 400.
- Errors are `{"error": {"message", "type", "param", "code"}}`; every answer carries
  `x-request-id: req_…`. Scripted errors: `moderation_blocked()`, `content_policy_violation()`,
  `insufficient_quota()`, `rate_limited(retry_after_ms=, retry_after=)`, `model_not_found()`,
  `invalid_size()`, `unverified_organization()`, `server_error(500|503)`; queue them with
  `reply(...)`. The client's base URL is `base_url` (`<server>/v1`).
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid

from tests.standin import Answer, ReceivedRequest, Reply, StandIn, bearer, json_answer, make_image

MODELS = frozenset({
    "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2", "gpt-image-2-2026-04-21",
    "gpt-image-2.5-sunburst", "gpt-image-2.5-flare", "chatgpt-image-latest",
})
PNG_SIDE_LIMIT = 3840


def _error(status: int, message: str, type_: str, code: str | None, param: str | None = None,
           headers: dict[str, str] | None = None) -> Reply:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return Reply(status, body, headers or {})


def moderation_blocked() -> Reply:
    return _error(400, "Your request was rejected by the safety system. If you believe this is an error, "
                       "contact us at help.openai.com and include the request ID.",
                  "image_generation_user_error", "moderation_blocked")


def content_policy_violation() -> Reply:
    return _error(400, "Your request was rejected as a result of our safety system. Your prompt may contain "
                       "text that is not allowed by our safety system.",
                  "invalid_request_error", "content_policy_violation")


def insufficient_quota() -> Reply:
    return _error(429, "You exceeded your current quota, please check your plan and billing details. For more "
                       "information on this error, read the docs: "
                       "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                  "insufficient_quota", "insufficient_quota")


def rate_limited(retry_after_ms: int | None = 1200, retry_after: int | None = 2) -> Reply:
    headers = {"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0"}
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    if retry_after is not None:
        headers["retry-after"] = str(retry_after)
    return _error(429, "Rate limit reached for images per minute (IPM): Limit 5, Used 5, Requested 1. "
                       "Please try again in 12s.", "requests", "rate_limit_exceeded", headers=headers)


def model_not_found(model: str = "gpt-image-1") -> Reply:
    return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                  "invalid_request_error", "model_not_found")


def invalid_size(size: str = "999x999") -> Reply:
    return _error(400, f"Invalid value: '{size}'. Supported values are: '1024x1024', '1024x1536', "
                       "'1536x1024', and 'auto'.", "invalid_request_error", "invalid_size", "size")


def unverified_organization(model: str = "gpt-image-2") -> Reply:
    return _error(403, f"Your organization must be verified to use the model `{model}`. Please go to: "
                       "https://platform.openai.com/settings/organization/general and click on Verify "
                       "Organization.", "invalid_request_error", None)


def partial_image(prompt: str, index: int, width: int, height: int, fmt: str = "png") -> bytes:
    """The stand-in's `index`th partial image for a prompt: a blurred picture of its own."""
    return make_image(width, height, f"partial/{prompt}/{index}", fmt, blur=True)


def sse_body(events: list[tuple[str, dict]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


def event_stream(*events: tuple[str, dict]) -> Reply:
    """A scripted answer in Server-Sent Events."""
    return Reply(200, sse_body(list(events)), {"Content-Type": "text/event-stream; charset=utf-8"})


def server_error(status: int = 500) -> Reply:
    if status == 503:
        return _error(503, "The server is overloaded or not ready yet.", "server_error", None)
    return _error(status, "The server had an error while processing your request. Sorry about that!",
                  "server_error", None)


class FakeOpenAI(StandIn):
    def __init__(self, api_key: str, models: frozenset[str] = MODELS) -> None:
        self.api_key = api_key
        self.models = set(models)
        super().__init__()

    @property
    def base_url(self) -> str:
        """What the client takes as its base URL (like https://api.openai.com/v1)."""
        return f"{self.url}/v1"

    def routes(self):
        return [("POST", r"/v1/images/generations", self._generate, self._authorized, True)]

    def extra_headers(self) -> dict[str, str]:
        return {"x-request-id": f"req_{uuid.uuid4().hex}", "openai-processing-ms": "1"}

    def not_found(self, request: ReceivedRequest) -> Answer:
        return json_answer({"error": {"message": f"Invalid URL ({request.method} {request.path})",
                                      "type": "invalid_request_error", "param": None, "code": None}}, 404)

    def _authorized(self, request: ReceivedRequest) -> Answer | None:
        key = bearer(request)
        if key == self.api_key:
            return None
        if not key:
            message = ("You didn't provide an API key. You need to provide your API key in an Authorization "
                       "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
            reply = _error(401, message, "invalid_request_error", None)
        else:
            shown = f"{key[:3]}*****{key[-4:]}" if len(key) > 8 else key
            reply = _error(401, f"Incorrect API key provided: {shown}. You can find your API key at "
                                "https://platform.openai.com/account/api-keys.",
                           "invalid_request_error", "invalid_api_key")
        return json_answer(reply.body, reply.status)

    def _generate(self, request: ReceivedRequest, match, reply: Reply) -> Answer:
        try:
            payload = request.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return self._send(_error(400, "We could not parse the JSON body of your request.",
                                     "invalid_request_error", None))
        model = payload.get("model", "")
        if model not in self.models:
            return self._send(model_not_found(model))
        if "response_format" in payload:
            return self._send(_error(400, "Unknown parameter: 'response_format'.", "invalid_request_error",
                                     "unknown_parameter", "response_format"))
        if not payload.get("prompt"):
            return self._send(_error(400, "Missing required parameter: 'prompt'.", "invalid_request_error",
                                     "missing_required_parameter", "prompt"))
        size = payload.get("size") or "auto"
        found = re.fullmatch(r"(\d+)x(\d+)", "1024x1024" if size == "auto" else size)
        if not found or not all(0 < int(side) <= PNG_SIDE_LIMIT for side in found.groups()):
            return self._send(invalid_size(str(size)))
        width, height = int(found[1]), int(found[2])
        fmt = payload.get("output_format", "png")
        count = int(payload.get("n") or 1)
        images = [make_image(width, height, f"{payload['prompt']}/{i}/{time.time_ns()}", fmt) for i in range(count)]
        quality = payload.get("quality", "auto")
        if payload.get("stream") is True:
            return self._stream(payload, images, fmt, "medium" if quality == "auto" else quality, width, height)
        return json_answer({
            "created": int(time.time()),
            "background": "opaque",
            "data": [{"b64_json": base64.b64encode(image).decode()} for image in images],
            "output_format": fmt,
            "quality": "medium" if quality == "auto" else quality,
            "size": f"{width}x{height}",
            "usage": {"input_tokens": 12, "input_tokens_details": {"image_tokens": 0, "text_tokens": 12},
                      "output_tokens": 1056 * count, "total_tokens": 12 + 1056 * count},
        })

    @staticmethod
    def _stream(payload: dict, images: list[bytes], fmt: str, quality: str, width: int, height: int) -> Answer:
        common = {"created_at": int(time.time()), "size": f"{width}x{height}", "quality": quality,
                  "background": "opaque", "output_format": fmt}
        partials = int(payload.get("partial_images") or 0)
        events: list[tuple[str, dict]] = []
        for image in images:
            for index in range(partials):
                partial = partial_image(payload["prompt"], index, width, height, fmt)
                events.append(("image_generation.partial_image", {
                    "type": "image_generation.partial_image", "b64_json": base64.b64encode(partial).decode(),
                    "partial_image_index": index, **common}))
            events.append(("image_generation.completed", {
                "type": "image_generation.completed", "b64_json": base64.b64encode(image).decode(), **common,
                "usage": {"input_tokens": 12, "input_tokens_details": {"image_tokens": 0, "text_tokens": 12},
                          "output_tokens": 1056, "total_tokens": 1068}}))
        return Answer(200, sse_body(events), {"Content-Type": "text/event-stream; charset=utf-8"})

    @staticmethod
    def _send(reply: Reply) -> Answer:
        return json_answer(reply.body, reply.status, reply.headers)
