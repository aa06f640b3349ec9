"""A stand-in for Stability AI's v2beta Stable Image API (https://api.stability.ai) on loopback.

- POST /v2beta/stable-image/generate/{core|ultra|sd3}, `Authorization: Bearer <key>`,
  **multipart/form-data** only: `prompt`, `negative_prompt`, `aspect_ratio`, `seed`,
  `output_format`, sd3 also `model`, `cfg_scale`. The form is parsed and kept in
  `ReceivedRequest.form` (file parts, like the dummy one clients add, in `.files`).
- `Accept: image/*` (or none) → the raw image, `Content-Type: image/png|jpeg|webp`, headers
  `finish-reason: SUCCESS` and `seed: <n>`; `Accept: application/json` → `{"image": base64,
  "finish_reason", "seed"}`. The seed is the form's, or random when 0 or absent; the image is
  drawn from seed + prompt (same seed and prompt → same bytes), small with the asked
  `aspect_ratio` (64 px on its long side).
- Checks as the real API does: missing/wrong key → 401; a JSON or urlencoded body → 400; no
  prompt, an unknown aspect ratio or format → 400.
- Errors are `{"id", "name", "errors": [...]}`. Scripted: `content_filtered()` (HTTP 200, a
  blurred image, `finish-reason: CONTENT_FILTERED`), `payment_required()` 402,
  `content_moderation()` 403, `invalid_language()` 422, `rate_limited()` 429,
  `server_error()` 500, or any `error(status, name, message)`. `base_url` is the API host.
"""

from __future__ import annotations

import base64
import random
import uuid

from tests.standin import Answer, CONTENT_TYPES, ReceivedRequest, Reply, StandIn, bearer, json_answer, make_image, ratio_size

ASPECT_RATIOS = frozenset({"16:9", "1:1", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21"})
SD3_MODELS = frozenset({"sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash"})
MAX_SEED = 4294967294


def error(status: int, name: str, message: str) -> Reply:
    return Reply(status, {"id": uuid.uuid4().hex, "name": name, "errors": [message]})


def content_filtered() -> Reply:
    return Reply(plan="CONTENT_FILTERED")


def payment_required() -> Reply:
    return error(402, "payment_required", "You lack sufficient credits to make this request. Please purchase "
                                          "more credits at https://platform.stability.ai/account/credits and try again.")


def content_moderation() -> Reply:
    return error(403, "content_moderation", "Your request was flagged by our content moderation system, as a "
                                            "result your request was denied and you were not charged.")


def invalid_language() -> Reply:
    return error(422, "invalid_language", "English is the only supported language for this service.")


def rate_limited() -> Reply:
    return error(429, "rate_limit_exceeded", "You have exceeded the rate limit of 150 requests within a 10 "
                                             "second period, and have been timed out for 60 seconds.")


def server_error() -> Reply:
    return error(500, "internal_error", "An unexpected server error has occurred, please try again later.")


class FakeStability(StandIn):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        super().__init__()

    @property
    def base_url(self) -> str:
        """Stands for https://api.stability.ai."""
        return self.url

    def routes(self):
        return [("POST", r"/v2beta/stable-image/generate/(?P<service>core|ultra|sd3)", self._generate,
                 self._authorized, True)]

    def not_found(self, request: ReceivedRequest) -> Answer:
        return self._send(error(404, "not_found", f"{request.method} {request.path} does not exist"))

    @staticmethod
    def _send(reply: Reply) -> Answer:
        return json_answer(reply.body, reply.status, reply.headers)

    def _authorized(self, request: ReceivedRequest) -> Answer | None:
        key = bearer(request)
        if key == self.api_key:
            return None
        message = "authorization: missing required header" if not key else "Incorrect API key provided"
        return self._send(error(401, "unauthorized", message))

    def _generate(self, request: ReceivedRequest, match, reply: Reply) -> Answer:
        form = request.form
        if form is None:
            return self._send(error(400, "bad_request", "content-type: must be multipart/form-data"))
        prompt = form.get("prompt", "")
        if not prompt:
            return self._send(error(400, "bad_request", "prompt: cannot be empty"))
        ratio = form.get("aspect_ratio", "1:1")
        if ratio not in ASPECT_RATIOS:
            return self._send(error(400, "bad_request", f"aspect_ratio: must be one of {sorted(ASPECT_RATIOS)}"))
        fmt = form.get("output_format", "png")
        if fmt not in (("png", "jpeg") if match["service"] == "sd3" else ("png", "jpeg", "webp")):
            return self._send(error(400, "bad_request", f"output_format: invalid value {fmt!r}"))
        if match["service"] == "sd3" and form.get("model", "sd3.5-large") not in SD3_MODELS:
            return self._send(error(400, "bad_request", f"model: invalid value {form['model']!r}"))
        try:
            seed = int(form.get("seed") or 0)
        except ValueError:
            return self._send(error(400, "bad_request", "seed: must be an integer"))
        if not 0 <= seed <= MAX_SEED:
            return self._send(error(400, "bad_request", f"seed: must be between 0 and {MAX_SEED}"))
        seed = seed or random.randint(1, MAX_SEED)
        filtered = reply.plan == "CONTENT_FILTERED"
        finish = "CONTENT_FILTERED" if filtered else "SUCCESS"
        image = make_image(*ratio_size(ratio), seed=f"{seed}/{prompt}", fmt=fmt, blur=filtered)
        if "application/json" in (request.header("Accept") or ""):
            return json_answer({"image": base64.b64encode(image).decode(), "finish_reason": finish, "seed": seed})
        return Answer(200, image, {"Content-Type": CONTENT_TYPES[fmt], "finish-reason": finish, "seed": str(seed)})
