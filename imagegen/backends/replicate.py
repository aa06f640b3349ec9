"""The `replicate` backend: Replicate's own HTTP API with the user's REPLICATE_API_TOKEN.

Not the Hugging Face provider of the same name (that one goes through the router with a
Hugging Face token). One call to `generate` is one prediction:

- `POST {REPLICATE_BASE_URL}/v1/models/{owner}/{name}/predictions` for an official model, or
  `POST /v1/predictions` with `"version"` when REPLICATE_MODEL pins one (`owner/name:version`);
  `Authorization: Bearer`, `Prefer: wait=N` (Replicate holds the answer up to N <= 60 s; N is
  bounded by the time this request has left), `Cancel-After` (Replicate stops the prediction
  by itself if this process dies before it can), body `{"input": {...}}`.
- A prediction not done in that time (`starting`/`processing`) is polled at its `urls.get`,
  only on the API's own host, reporting progress (flux prints tqdm bars: "NN%|").
- `succeeded`: `output` is a URL or a list of URLs on Replicate's CDN, downloaded without
  the token. `failed`: `error` says why; safety refusals ("NSFW content detected", "flagged
  as sensitive") become 422 content_rejected. `canceled`/`aborted`: said plainly.
- The caller going away or the deadline passing while polling cancels the prediction
  (`POST urls.cancel`, best effort) so the account stops paying for it.

What goes in `input` depends on the model, whose schema this function cannot see. Known
models (`KNOWN_MODELS`) get their own field names and ranges; any other model gets `prompt`,
`seed`, `width` and `height` only, and its seed is reported as not reproducible.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.outbound import HttpExchange
from imagegen.backends.sizes import free_size, nearest_aspect_ratio, requested_shape
from imagegen.backends.toolkit import (
    PollSchedule,
    Progress,
    Unusable,
    json_object,
    poll_until,
    reading_answer,
    require_key,
    to_png,
)
from imagegen.backends.vendor import CONTENT_REJECTED, MODEL_NOT_AVAILABLE, CallContext, Vendor
from imagegen.config import BackendSettings, Settings, base_url_is_loopback
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import ContentRejected, UpstreamError, UpstreamTimeout
from imagegen.identity import account_fingerprint
from imagegen.retry import body_retry_after, server_delay_seconds

DEFAULT_BASE_URL = "https://api.replicate.com"
# Replicate holds a `Prefer: wait` request at most this long.
MAX_WAIT_SECONDS = 60
# Ask Replicate to answer this much before our own read timeout, so that a prediction still
# running comes back with its id (which we can poll or cancel) rather than as a timeout.
WAIT_MARGIN_SECONDS = 2
# Replicate's clients poll every 0.5 s; we start there and slow down to 2 s for long runs.
POLLING = PollSchedule(first=0.5, longest=2.0, growth=1.5)
RUNNING = ("starting", "processing")
# Cancelling is a courtesy to the account's bill: it must never hold the answer up long.
CANCEL_TIMEOUT_SECONDS = 3.0
# A backstop for when this process dies mid-prediction (Replicate's `Cancel-After`).
MIN_CANCEL_AFTER_SECONDS = 5
MAX_LOG_TAIL_CHARS = 4096

FLUX_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
# Safety refusals as failed predictions say them: flux's checker, BFL's API (E005), others.
_SAFETY = re.compile(
    r"nsfw|flagged as sensitive|\(E005\)|content polic|safety (?:checker|filter|system)|content moderation",
    re.IGNORECASE,
)
# A tqdm bar as flux prints it: " 75%|███████▌  | 3/4 [00:01<00:00]"; the count may be missing.
_BAR = re.compile(r"(?P<percent>\d{1,3})%\|(?:[^|\r\n]{0,200}\|\s*(?P<step>\d{1,9})/(?P<steps>\d{1,9}))?")
_PREDICTION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


# --- what each known model takes ------------------------------------------------------------


@dataclass(frozen=True)
class ModelInputs:
    """How one model's `input` is written, and what it honours.

    `steps`/`guidance` are (input name, low, high); a request value outside the range is not
    sent (the model's default is used) and is reported in the answer's "ignored".
    """

    capabilities: Capabilities
    size: Callable[[int, int], dict[str, Any]]  # requested width, height -> input fields
    steps: tuple[str, int, int] | None = None
    guidance: tuple[str, float, float] | None = None
    negative_prompt: str | None = None
    # Sent with every prediction (e.g. the output format).
    fixed: Mapping[str, Any] | None = None
    # Sent with a seed: what makes the seed reproduce (flux's fp8 fast path does not).
    with_seed: Mapping[str, Any] | None = None


def _flux_ratio(width: int, height: int) -> dict[str, Any]:
    # flux-schnell/dev make about 1 or 0.25 megapixels; 0.5 MP is the midpoint on a log scale.
    megapixels = "0.25" if width * height < 512 * 1024 else "1"
    return {"aspect_ratio": nearest_aspect_ratio(width, height, FLUX_RATIOS), "megapixels": megapixels}


def _flux_pro_size(width: int, height: int) -> dict[str, Any]:
    # `aspect_ratio: custom` takes width and height from 256 to 1440; multiples of 32 satisfy
    # every published version (older ones round to 32, newer to 16).
    w, h = free_size(width, height, step=32, max_long=1440, max_short=1440, max_ratio=1440 / 256)
    return {"aspect_ratio": "custom", "width": max(256, w), "height": max(256, h)}


def _exact_size(width: int, height: int) -> dict[str, Any]:
    return {"width": width, "height": height}


_FLUX_FAST_PATH_OFF = {"go_fast": False}

KNOWN_MODELS: Mapping[str, ModelInputs] = {
    "black-forest-labs/flux-schnell": ModelInputs(
        Capabilities(negative_prompt=False, steps=True, guidance=False, seed=True),
        _flux_ratio,
        steps=("num_inference_steps", 1, 4),
        fixed={"num_outputs": 1, "output_format": "png"},
        with_seed=_FLUX_FAST_PATH_OFF,
    ),
    "black-forest-labs/flux-dev": ModelInputs(
        Capabilities(negative_prompt=False, steps=True, guidance=True, seed=True),
        _flux_ratio,
        steps=("num_inference_steps", 1, 50),
        guidance=("guidance", 0, 10),
        fixed={"num_outputs": 1, "output_format": "png"},
        with_seed=_FLUX_FAST_PATH_OFF,
    ),
    "black-forest-labs/flux-1.1-pro": ModelInputs(
        Capabilities(negative_prompt=False, steps=False, guidance=False, seed=True),
        _flux_pro_size,
        fixed={"output_format": "png"},
    ),
    "stability-ai/sdxl": ModelInputs(
        Capabilities(negative_prompt=True, steps=True, guidance=True, seed=True),
        _exact_size,
        steps=("num_inference_steps", 1, 500),
        guidance=("guidance_scale", 1, 50),
        negative_prompt="negative_prompt",
        fixed={"num_outputs": 1},
    ),
}
# Any other model: its schema is unknown, so only the fields nearly every text-to-image
# model on Replicate names this way are sent, and a seed is not promised to reproduce.
UNKNOWN_MODEL = ModelInputs(Capabilities(negative_prompt=False, steps=False, guidance=False, seed=False), _exact_size)


def model_inputs(model: str) -> ModelInputs:
    return KNOWN_MODELS.get(model.split(":", 1)[0], UNKNOWN_MODEL)


def build_input(request: GenerationRequest, model: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The prediction's `input` for this model, and the request fields it leaves out
    because they are outside the model's range."""
    spec = model_inputs(model)
    given: dict[str, Any] = {"prompt": request.prompt}
    dropped: list[str] = []
    shape = requested_shape(request.width, request.height)
    if shape is not None:
        given.update(spec.size(*shape))
    if request.negative_prompt is not None and spec.negative_prompt:
        given[spec.negative_prompt] = request.negative_prompt
    for value, field, api_name in ((request.steps, spec.steps, "steps"), (request.guidance_scale, spec.guidance, "guidanceScale")):
        if value is None or field is None:
            continue
        name, low, high = field
        if low <= value <= high:
            given[name] = value
        else:
            dropped.append(api_name)
    if request.seed is not None:
        given["seed"] = request.seed
        given.update(spec.with_seed or {})
    given.update(spec.fixed or {})
    return given, tuple(dropped)


# --- how Replicate's errors are worded ------------------------------------------------------


def _model_advice(call: CallContext) -> str:
    return (
        "Set REPLICATE_MODEL to a model this token can run: an official model as owner/name (such as "
        "black-forest-labs/flux-schnell, see https://replicate.com/collections/official), any other "
        "model as owner/name:version"
    )


def _problem_text(body: Any) -> str:
    """Replicate's problem+json `{"title", "detail", "status", "invalid_fields"?}` as one line."""
    if not isinstance(body, dict):
        return ""
    title = body.get("title") if isinstance(body.get("title"), str) else ""
    detail = body.get("detail") if isinstance(body.get("detail"), str) else ""
    fields = [
        f"{item['field']}: {item['description']}"
        for item in (body.get("invalid_fields") or [])[:10]
        if isinstance(item, dict) and isinstance(item.get("field"), str) and isinstance(item.get("description"), str)
    ]
    if fields:
        detail = "; ".join(fields)
    if title and detail and not detail.lower().startswith(title.lower().rstrip(".")):
        return f"{title}: {detail}"
    return detail or title


def _classify(status: int, body: Any) -> str | None:
    text = _problem_text(body)
    if _SAFETY.search(text):
        return CONTENT_REJECTED
    # A pinned version that does not exist (or that this token may not run) is a 422.
    if status == 422 and re.search(r"invalid version|version.*not permitted", text, re.IGNORECASE):
        return MODEL_NOT_AVAILABLE
    return None


def _retry_delay(headers: Mapping[str, str], body: bytes) -> int | None:
    # The body's `retry_after` is Replicate's own word; Retry-After is the same in a header.
    delay = body_retry_after(body)
    if delay is None:
        delay = server_delay_seconds(headers.get("Retry-After"), b"")
    return None if delay is None else math.ceil(delay)


VENDOR = Vendor(
    name="Replicate",
    status_label="Replicate status",
    key_advice="Check that REPLICATE_API_TOKEN holds a valid API token from https://replicate.com/account/api-tokens",
    credits_advice="Add credit at https://replicate.com/account/billing (new credit can take a few minutes to count)",
    url_variable="REPLICATE_BASE_URL",
    model_advice=_model_advice,
    classify=_classify,
    retry_delay=_retry_delay,
    message_of=_problem_text,
)


# --- the backend ----------------------------------------------------------------------------


class ReplicateBackend:
    name = "replicate"

    def __init__(self, settings: Settings, section: BackendSettings, session: requests.Session) -> None:
        self._settings = settings
        self._section = section
        self._token = section.api_key
        self._base_url = (section.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._origin = _origin(self._base_url)
        self._session = session
        self._exchange = HttpExchange(session, settings.timeout_seconds, settings.deadline_seconds)
        self._loopback = base_url_is_loopback(self._base_url)
        self.default_model = section.model
        self.allowed_models = section.allowed_models

    def identity(self) -> str:
        # A pinned version makes different images than the model's latest: part of the key.
        pinned = " ".join(model for model in self.allowed_models if ":" in model)
        return f"replicate {self._base_url} {account_fingerprint(self._token)} {pinned}".rstrip()

    def capabilities(self, model: str) -> Capabilities:
        return model_inputs(model).capabilities

    def routes(self, request: GenerationRequest, model: str, context: GenerationContext) -> list[Route]:
        self._require_token()
        return [Route(backend=self.name, model=model)]

    def generate(self, route: Route, request: GenerationRequest, context: GenerationContext) -> GeneratedImage:
        token = self._require_token()
        call = CallContext(VENDOR, self.name, route.model, token)
        given, dropped = build_input(request, route.model)
        url, body = self._create_request(route.model, given)
        wait = self._wait_seconds(context)
        headers = {
            **_auth(token),
            "Prefer": f"wait={wait}",
            "Cancel-After": f"{max(MIN_CANCEL_AFTER_SECONDS, math.ceil(context.time_left()))}s",
        }
        answer = self._exchange.send("POST", url, call, context, headers=headers, json=body)
        with reading_answer(call):
            prediction = _prediction(answer.body)
            call.note_request_id(prediction["id"])
            if prediction.get("status") in RUNNING:
                prediction = self._poll(prediction, call, context, token)
            output_url = self._finished(prediction, call)
            png = to_png(self._exchange.download(output_url, call, context, allow_loopback=self._loopback), context)
        return GeneratedImage(png=png, route=route, seed=request.seed, ignored=dropped, request_id=call.request_id)

    # -- one prediction --------------------------------------------------------------------------

    def _create_request(self, model: str, given: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        name, _, version = model.partition(":")
        if version:
            return f"{self._base_url}/v1/predictions", {"version": version, "input": given}
        return f"{self._base_url}/v1/models/{quote(name, safe='/')}/predictions", {"input": given}

    def _wait_seconds(self, context: GenerationContext) -> int:
        """How long Replicate may hold the answer: up to 60 s, ending before our read timeout."""
        budget = min(self._settings.timeout_seconds, context.time_left()) - WAIT_MARGIN_SECONDS
        return max(1, min(MAX_WAIT_SECONDS, math.floor(budget)))

    def _poll(self, prediction: dict, call: CallContext, context: GenerationContext, token: str) -> dict:
        """The prediction once it is done, polled at its `urls.get` within the deadline.

        Leaving early for any reason (the caller gone, the deadline, a failed poll) cancels it:
        a retry would start a new prediction, and nobody would collect this one.
        """
        urls = prediction.get("urls")
        urls = urls if isinstance(urls, dict) else {}
        poll_url = urls.get("get")
        if not isinstance(poll_url, str) or _origin(poll_url) != self._origin:
            self._cancel(urls, token)
            raise Unusable("a running prediction whose urls.get is not on the API's host")

        def poll() -> dict:
            return _prediction(self._exchange.send("GET", poll_url, call, context, headers=_auth(token)).body)

        def too_late() -> UpstreamError:
            return call.error(
                UpstreamTimeout,
                f"Replicate did not finish the image within the deadline (DEADLINE_SECONDS="
                f"{self._settings.deadline_seconds:g}); the prediction was canceled so that it stops "
                "costing credit. Try again in a minute, or raise DEADLINE_SECONDS for a slow model",
                fail_over=True,
            )

        try:
            return poll_until(
                prediction,
                poll,
                lambda state: state.get("status") not in RUNNING,
                context,
                POLLING,
                too_late=too_late,
                progress_of=progress_of,
            )
        except Exception:  # the caller gone, the deadline, a failed or unreadable poll
            self._cancel(urls, token)
            raise

    def _cancel(self, urls: Mapping[str, Any], token: str) -> None:
        """Ask Replicate to stop the prediction: bounded, never raising, never off its host."""
        cancel_url = urls.get("cancel")
        if not isinstance(cancel_url, str) or _origin(cancel_url) != self._origin:
            return
        try:
            self._session.post(cancel_url, headers=_auth(token), timeout=CANCEL_TIMEOUT_SECONDS, allow_redirects=False).close()
        except requests.RequestException:
            pass

    def _finished(self, prediction: dict, call: CallContext) -> str:
        """The output URL of a finished prediction, or the error its status says."""
        status = prediction.get("status")
        if status == "succeeded":
            output = prediction.get("output")
            if isinstance(output, list) and output:
                output = output[0]
            if not isinstance(output, str):
                raise Unusable('a succeeded prediction whose "output" is not an image URL')
            return output
        if status == "failed":
            reason = call.quote(str(prediction.get("error") or "no reason given"))
            if _SAFETY.search(reason):
                raise call.error(ContentRejected, f"Replicate's safety checker refused this image: {reason}. Change the prompt and try again")
            raise call.error(
                UpstreamError,
                f"The model could not generate this image on Replicate: {reason}. Try another prompt or model",
                code="generation_failed",
            )
        if status == "canceled":
            raise call.error(
                UpstreamError,
                "The prediction was canceled on Replicate before it finished (from the dashboard, the API or its "
                "Cancel-After deadline). Try again",
                code="generation_failed",
            )
        if status == "aborted":
            raise call.error(
                UpstreamError,
                "Replicate aborted the prediction before it started (no capacity before its deadline). Try again in a minute",
                code="upstream_unavailable",
                retryable=True,
                fail_over=True,
            )
        raise Unusable(f"a prediction with status {call.quote(str(status), 40)!r}")

    def _require_token(self) -> str:
        return require_key(
            self._section,
            variable="REPLICATE_API_TOKEN",
            what="Replicate token",
            how="an API token from https://replicate.com/account/api-tokens",
        )


def _prediction(body: bytes) -> dict:
    prediction = json_object(body)
    if not isinstance(prediction.get("id"), str) or not _PREDICTION_ID.fullmatch(prediction["id"]):
        raise Unusable("a prediction without an id")
    return prediction


def progress_of(prediction: dict) -> Progress | None:
    """Where the prediction stands, from the last tqdm bar in its logs: its "k/n" steps when
    the bar has them, else its percentage as a step of 100. None when the logs do not say."""
    logs = prediction.get("logs")
    if not isinstance(logs, str):
        return None
    bars = list(_BAR.finditer(logs[-MAX_LOG_TAIL_CHARS:]))
    if not bars:
        return None
    last = bars[-1]
    if last.group("steps") and 0 <= int(last.group("step")) <= int(last.group("steps")) > 0:
        return Progress(int(last.group("step")), int(last.group("steps")))
    return Progress(min(100, int(last.group("percent"))), 100)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        return ("", "", None)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    return (parts.scheme, (parts.hostname or "").lower(), port or default)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create(settings: Settings, section: BackendSettings, session: requests.Session) -> ReplicateBackend:
    return ReplicateBackend(settings, section, session)
