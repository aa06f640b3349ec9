"""A stand-in for Replicate's HTTP API (https://api.replicate.com) on loopback.

- POST /v1/models/{owner}/{name}/predictions, `Authorization: Bearer r8_…`, `Prefer: wait`
  (or `wait=N`), JSON `{"input": {...}}` → 201 and a prediction `{id, model, version, input,
  logs, output, data_removed, error, status, created_at, started_at?, completed_at?, metrics,
  urls: {get, cancel, stream, web}}`. `urls.get`/`urls.cancel` point at this server.
- POST /v1/predictions, JSON `{"version": <64 hex>, "input": {...}}` (a pinned or community
  model): the same, with `version` echoed; a malformed version answers 422 "Invalid version or
  not permitted", as Replicate does for a version it does not know.
- GET /v1/predictions/{id}: the prediction as it stands now; POST /v1/predictions/{id}/cancel
  → `status: canceled` (the id lands in `canceled`).
- GET /cdn/{n}.{webp|jpg|png}: the outputs, without auth, in the asked `output_format`
  (webp by default, as flux-schnell does); `num_outputs` of them, always a list.
- What happens is scripted per prediction with `reply(Reply(plan=Outcome(...)))` or the
  helpers: `succeed()` (default: done within `Prefer: wait`), `finish_later(polls=2)` (created
  `starting`, then `polls` GETs answer `processing`, then `succeeded`), `fail(error)` /
  `fail_nsfw()`, `never_finish()` (stays `processing`: for cancel and deadline tests),
  `end_as("canceled" | "aborted")`. `logs=` scripts the prediction's logs while it runs
  (flux prints tqdm bars such as " 50%|█████     | 2/4").
  Without `Prefer: wait` a prediction is always created `starting`.
- Errors are `{"title", "detail", "status"}` (application/problem+json): 401 (wrong key),
  `insufficient_credit()` 402, `not_found()` 404, `invalid_input(field, description)` 422,
  `throttled(retry_after=)` 429 (body `retry_after`, header `Retry-After`), `server_error()` 500.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.standin import Answer, ReceivedRequest, Reply, StandIn, bearer, json_answer, make_image, ratio_size

PROBLEM_JSON = "application/problem+json"
NSFW_ERROR = "NSFW content detected. Try running it again, or try a different prompt."
FORMATS = {"webp": "webp", "jpg": "jpeg", "png": "png"}


@dataclass
class Outcome:
    status: str = "succeeded"  # succeeded | failed | canceled | processing (never finishes)
    within_wait: bool = True  # done by the time a `Prefer: wait` request returns
    polls: int = 0  # when not within the wait: GETs answered "processing" before the end
    error: str | None = None
    output: Any = None  # None: the CDN URLs of fresh images
    logs: str | None = None  # the logs while running and after (None: a generic line)


def succeed() -> Reply:
    return Reply(plan=Outcome())


def finish_later(polls: int = 2, status: str = "succeeded", error: str | None = None, logs: str | None = None) -> Reply:
    return Reply(plan=Outcome(status, within_wait=False, polls=polls, error=error, logs=logs))


def fail(error: str = "Prediction failed.", within_wait: bool = True, polls: int = 0) -> Reply:
    return Reply(plan=Outcome("failed", within_wait, polls, error))


def fail_nsfw(within_wait: bool = True) -> Reply:
    return fail(NSFW_ERROR, within_wait)


def never_finish(logs: str | None = None) -> Reply:
    return Reply(plan=Outcome("processing", within_wait=False, logs=logs))


def end_as(status: str, within_wait: bool = True) -> Reply:
    """A prediction that ends `canceled` (someone stopped it) or `aborted` (never started)."""
    return Reply(plan=Outcome(status, within_wait))


def invalid_version() -> Reply:
    return problem(422, "Invalid version or not permitted", "The specified version does not exist (or perhaps you "
                                                            "don't have permission to use it?)")


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None, **extra: Any) -> Reply:
    return Reply(status, {"title": title, "detail": detail, "status": status, **extra},
                 {"Content-Type": PROBLEM_JSON, **(headers or {})})


def insufficient_credit() -> Reply:
    return problem(402, "Insufficient credit", "You have insufficient credit to run this model. Go to "
                                               "https://replicate.com/account/billing#billing to purchase credit. "
                                               "Once you purchase credit, please wait a few minutes before trying again.")


def not_found() -> Reply:
    return problem(404, "Not found", "The requested resource could not be found.")


def invalid_input(field_name: str = "input.num_outputs", description: str = "Must be less than or equal to 4") -> Reply:
    return problem(422, "Input validation failed", f"- {field_name}: {description}\n",
                   invalid_fields=[{"type": "invalid", "field": field_name, "description": description}])


def throttled(retry_after: int = 10) -> Reply:
    return problem(429, "Request was throttled.",
                   f"Request was throttled. Your rate limit resets in ~{retry_after}s.",
                   {"Retry-After": str(retry_after)}, retry_after=retry_after)


def server_error() -> Reply:
    return problem(500, "Internal server error", "An unexpected error occurred.")


@dataclass
class Prediction:
    id: str
    model: str
    input: dict
    outcome: Outcome
    version: str = "hidden"
    status: str = "starting"
    polls: int = 0
    output: Any = None
    error: str | None = None
    created_at: str = field(default_factory=lambda: _now())
    started_at: str | None = None
    completed_at: str | None = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


class FakeReplicate(StandIn):
    def __init__(self, token: str) -> None:
        self.token = token
        self.predictions: dict[str, Prediction] = {}
        self.canceled: list[str] = []
        self._state = threading.Lock()
        super().__init__()

    @property
    def base_url(self) -> str:
        """Stands for https://api.replicate.com (the client adds /v1/...)."""
        return self.url

    def routes(self):
        return [
            ("POST", r"/v1/models/(?P<owner>[^/]+)/(?P<name>[^/]+)/predictions", self._create, self._authorized, True),
            ("POST", r"/v1/predictions", self._create, self._authorized, True),
            ("GET", r"/v1/predictions/(?P<id>[^/]+)", self._get, self._authorized, False),
            ("POST", r"/v1/predictions/(?P<id>[^/]+)/cancel", self._cancel, self._authorized, False),
        ]

    def not_found(self, request: ReceivedRequest) -> Answer:
        return self._send(not_found())

    @staticmethod
    def _send(reply: Reply) -> Answer:
        return json_answer(reply.body, reply.status, content_type=reply.headers.get("Content-Type", PROBLEM_JSON))

    def _authorized(self, request: ReceivedRequest) -> Answer | None:
        if bearer(request) == self.token:
            return None
        return self._send(problem(401, "Unauthenticated", "You did not pass a valid authentication token"))

    def _create(self, request: ReceivedRequest, match, reply: Reply) -> Answer:
        try:
            payload = request.json()
        except ValueError:
            payload = None
        if not isinstance(payload, dict) or not isinstance(payload.get("input"), dict):
            return self._send(invalid_input("input", "Invalid type. Expected: object, given: null"))
        if not payload["input"].get("prompt"):
            return self._send(invalid_input("input.prompt", "prompt is required"))
        outcome = reply.plan if isinstance(reply.plan, Outcome) else Outcome()
        if "owner" in match.groupdict():
            prediction = Prediction(secrets.token_hex(13)[:26], f"{match['owner']}/{match['name']}", payload["input"], outcome)
        else:
            version = payload.get("version")
            if not isinstance(version, str) or not re.fullmatch(r"[0-9a-f]{64}", version):
                return self._send(invalid_version())
            prediction = Prediction(secrets.token_hex(13)[:26], "owner/community-model", payload["input"], outcome, version)
        waits = (request.header("Prefer") or "").strip().startswith("wait")
        if waits and outcome.within_wait and outcome.status != "processing":
            self._finish(prediction)
        elif waits:
            prediction.status, prediction.started_at = "processing", _now()
        with self._state:
            self.predictions[prediction.id] = prediction
            return json_answer(self._view(prediction), 201)

    def _get(self, request: ReceivedRequest, match, reply: Reply) -> Answer:
        with self._state:
            prediction = self.predictions.get(match["id"])
            if prediction is None:
                return self._send(not_found())
            if prediction.status in ("starting", "processing") and prediction.outcome.status != "processing":
                if prediction.polls >= prediction.outcome.polls:
                    self._finish(prediction)
                else:
                    prediction.polls += 1
                    prediction.status, prediction.started_at = "processing", prediction.started_at or _now()
            return json_answer(self._view(prediction))

    def _cancel(self, request: ReceivedRequest, match, reply: Reply) -> Answer:
        with self._state:
            prediction = self.predictions.get(match["id"])
            if prediction is None:
                return self._send(not_found())
            self.canceled.append(prediction.id)
            if prediction.status in ("starting", "processing"):
                prediction.status, prediction.completed_at = "canceled", _now()
        return json_answer(self._view(prediction))

    def _finish(self, prediction: Prediction) -> None:
        outcome = prediction.outcome
        prediction.started_at = prediction.started_at or _now()
        prediction.completed_at = _now()
        prediction.status = outcome.status
        if outcome.status == "succeeded":
            prediction.output = outcome.output if outcome.output is not None else self._outputs(prediction.input)
        elif outcome.status == "failed":
            prediction.error = outcome.error or "Prediction failed."

    def _outputs(self, given: dict) -> list[str]:
        ext = given.get("output_format", "webp")
        fmt = FORMATS.get(ext, "webp")
        size = ratio_size(given.get("aspect_ratio", "1:1"))
        seed = given.get("seed")
        urls = []
        for i in range(int(given.get("num_outputs", 1))):
            image = make_image(*size, seed=f"{seed}/{given['prompt']}/{i}" if seed is not None else f"{time.time_ns()}/{i}", fmt=fmt)
            urls.append(self.publish(image, ext))
        return urls

    def _view(self, prediction: Prediction) -> dict:
        done = prediction.status in ("succeeded", "failed", "canceled", "aborted")
        base = f"{self.url}/v1/predictions/{prediction.id}"
        view = {
            "id": prediction.id,
            "model": prediction.model,
            "version": prediction.version,
            "input": prediction.input,
            "logs": "" if prediction.status == "starting" else (prediction.outcome.logs or "Running prediction...\n"),
            "output": prediction.output,
            "data_removed": False,
            "error": prediction.error,
            "status": prediction.status,
            "created_at": prediction.created_at,
            "urls": {"get": base, "cancel": f"{base}/cancel",
                     "stream": f"https://stream.replicate.com/v1/files/{prediction.id}",
                     "web": f"https://replicate.com/p/{prediction.id}"},
        }
        if prediction.started_at:
            view["started_at"] = prediction.started_at
        if done:
            view["completed_at"] = prediction.completed_at
            view["metrics"] = {"predict_time": 0.61, "total_time": 0.74}
        else:
            view["metrics"] = {}
        return view
