"""The AUTOMATIC1111 door: `/sdapi/v1/*` under any path prefix, for the tools that speak
AUTOMATIC1111's web UI API (Open WebUI's automatic1111 engine, SillyTavern, LibreChat's Stable
Diffusion tool, Forge and SD.Next clients).

`POST */sdapi/v1/txt2img` makes `batch_size` x `n_iter` images, each admitted on its own (rate
limit and daily budget per image) and produced in parallel within the deadline, and answers
`{"images": [base64 PNG], "parameters": {...}, "info": "<JSON string>"}`. The GET endpoints list
what this deployment offers in AUTOMATIC1111's shapes. A function has no global settings a
caller could change: `POST */sdapi/v1/options` keeps a caller's checkpoint choice on this
instance only, and `progress` / `interrupt` see this caller's generations on this instance only
(docs/tools.md says what that means with several instances).

Errors keep today's statuses, in the body AUTOMATIC1111's API sends (FastAPI's `detail`, plus
its middleware's `error`, `body` and `errors`), with this function's `code` and `requestId`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import flask
import pybase64

from imagegen.catalog import Catalog
from imagegen.domain import GenerationRequest
from imagegen.errors import Cancelled, ImageGenError, InvalidRequest
from imagegen.doors.common import DoorParts, json_body
from imagegen.doors.watch import WATCH
from imagegen.http import Endpoint, response
from imagegen.record import RequestRecord
from imagegen.service import Admission, Produced
from imagegen.streaming import disconnect_probe
from imagegen.validation import (
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_GUIDANCE,
    MIN_SIDE,
    MIN_STEPS,
    SIDE_STEP,
    invalid_field,
    is_whole,
    json_object,
    read_integer,
    read_number,
    read_text,
    reject_lone_surrogates,
)

PREFIX = "/sdapi/v1"
# One request's images at most (batch_size x n_iter): each is a paid generation.
MAX_IMAGES = 10
# The fields of AUTOMATIC1111's txt2img request this door uses. Everything else is accepted and
# named in `info.ignored` and the X-Imagegen-Ignored header.
USED_FIELDS = (
    "prompt",
    "negative_prompt",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "seed",
    "batch_size",
    "n_iter",
    "sampler_name",
    "sampler_index",
    "scheduler",
    "override_settings",
)
# Fields whose AUTOMATIC1111 meaning is what happens here anyway: never reported as ignored.
HONOURED_BY_NATURE = {
    "send_images": True,  # images are always in the answer
    "save_images": None,  # every real image is stored (IMAGE_DIR or the bucket), whatever it says
    "override_settings_restore_afterwards": None,  # nothing global is ever changed
    "do_not_save_samples": None,
    "do_not_save_grid": None,
}
# AUTOMATIC1111's samplers that /samplers lists (the ones its clients offer): its name, its
# aliases, our name for it (GenerationRequest.scheduler) and the schedule types (SCHEDULERS)
# that sampler takes here, each as the diffusers flag imagegen/backends/local/schedulers.py sets.
SAMPLERS: tuple[tuple[str, tuple[str, ...], str, tuple[str, ...]], ...] = (
    ("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_a", ("sgm_uniform",)),
    ("Euler", ("k_euler",), "euler", ("karras", "exponential", "sgm_uniform")),
    ("DPM++ 2M", ("k_dpmpp_2m",), "dpmpp_2m", ("karras", "exponential", "sgm_uniform")),
    ("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "dpmpp_2m_sde", ("karras", "exponential", "sgm_uniform")),
    ("Heun", ("k_heun",), "heun", ("karras", "exponential", "sgm_uniform")),
    ("DPM2", ("k_dpm_2",), "dpm2", ("karras", "exponential", "sgm_uniform")),
    ("DPM2 a", ("k_dpm_2_a",), "dpm2_a", ("karras", "exponential", "sgm_uniform")),
    ("LMS", ("k_lms",), "lms", ()),
    ("DDIM", ("ddim",), "ddim", ("sgm_uniform",)),
    ("PLMS", ("plms",), "pndm", ("sgm_uniform",)),
    ("UniPC", ("unipc",), "unipc", ("karras", "exponential", "sgm_uniform")),
    ("LCM", ("k_lcm",), "lcm", ()),
)
# AUTOMATIC1111's scheduler names (its 1.9 "Schedule type") and labels. "automatic" and
# "uniform" run the model's own schedule.
SCHEDULERS: tuple[tuple[str, str], ...] = (
    ("automatic", "Automatic"),
    ("uniform", "Uniform"),
    ("karras", "Karras"),
    ("exponential", "Exponential"),
    ("sgm_uniform", "SGM Uniform"),
)
MODEL_SCHEDULE = ("automatic", "uniform")
# By name or alias, and schedule by name or label, case-insensitive as AUTOMATIC1111 finds them.
_SAMPLER_BY_NAME = {
    key.lower(): (ours, schedules) for name, aliases, ours, schedules in SAMPLERS for key in (name, *aliases)
}
_SCHEDULE_BY_NAME = {key.lower(): name for name, label in SCHEDULERS for key in (name, label)}
IGNORED_HEADER = "X-Imagegen-Ignored"
MAX_IGNORED_HEADER = 1024
# A caller's checkpoint choice (POST options) is kept for this many callers on an instance.
MAX_REMEMBERED_CALLERS = 10_000
CHECKPOINT_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,64}\]\s*$")


# --- errors in AUTOMATIC1111's shape -------------------------------------------------------


def a1111_error(error: ImageGenError, request_id: str) -> dict[str, Any]:
    """What AUTOMATIC1111's API middleware answers for an exception (`error`: its type,
    `detail`, `body`, `errors`: str of it, which for FastAPI's HTTPException is "status:
    detail"), plus this function's stable `code` and the request id."""
    payload: dict[str, Any] = {
        "error": type(error).__name__,
        "detail": error.message,
        "body": "",
        "errors": f"{error.status}: {error.message}",
        "code": error.code,
        "requestId": request_id,
    }
    if error.field:
        payload["field"] = error.field
    return payload


# --- the request -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Txt2Img:
    """A txt2img request as understood: one generation to repeat `count` times."""

    generation: GenerationRequest
    batch_size: int
    n_iter: int
    sampler_name: str | None
    scheduler: str | None
    ignored: tuple[str, ...]
    checkpoint: str | None  # the sd_model_checkpoint the caller named, as written

    @property
    def count(self) -> int:
        return self.batch_size * self.n_iter


def parse_txt2img(
    body: bytes, catalog: Catalog, max_prompt_chars: int, remembered_checkpoint: str | None = None
) -> Txt2Img:
    data = json_object(body)
    reject_lone_surrogates(data)
    # Unlike the JSON API, this door has always answered an empty prompt as a missing one
    # (code missing_field): kept, as error codes are a contract.
    prompt = read_text(data, "prompt", max_prompt_chars)
    if not prompt:
        raise InvalidRequest('The field "prompt" is required and must not be empty.', code="missing_field", field="prompt")
    ignored = [name for name in data if name not in USED_FIELDS and name not in HONOURED_BY_NATURE]
    overrides = data.get("override_settings")
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise invalid_field("override_settings", "an object", overrides)
    ignored += [f"override_settings.{name}" for name in overrides if name != "sd_model_checkpoint"]
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise invalid_field("override_settings.sd_model_checkpoint", "a model name string", checkpoint)
    checkpoint = checkpoint or remembered_checkpoint
    backend, model = resolve_checkpoint(checkpoint, catalog) if checkpoint else (None, None)
    seed = read_integer(data, "seed", -1, MAX_SEED)
    batch_size = read_integer(data, "batch_size", 1, MAX_IMAGES) or 1
    n_iter = read_integer(data, "n_iter", 1, MAX_IMAGES) or 1
    if batch_size * n_iter > MAX_IMAGES:
        raise InvalidRequest(
            f"batch_size x n_iter is {batch_size * n_iter}: at most {MAX_IMAGES} images a request.",
            field="batch_size",
        )
    sampler = _name(data, "sampler_name") or _name(data, "sampler_index")
    scheduler = _name(data, "scheduler")
    ours, unusable = scheduler_of(sampler, scheduler)
    ignored += unusable
    generation = GenerationRequest(
        prompt=prompt,
        backend=backend,
        model=model,
        negative_prompt=read_text(data, "negative_prompt", max_prompt_chars) or None,
        width=_side(data, "width"),
        height=_side(data, "height"),
        steps=read_integer(data, "steps", MIN_STEPS, MAX_STEPS),
        guidance_scale=read_number(data, "cfg_scale", MIN_GUIDANCE, MAX_GUIDANCE),
        seed=None if seed in (None, -1) else seed,
        scheduler=ours,
    )
    return Txt2Img(generation, batch_size, n_iter, sampler, scheduler, tuple(ignored), checkpoint)


def scheduler_of(sampler: str | None, schedule: str | None) -> tuple[str | None, list[str]]:
    """Our scheduler name for AUTOMATIC1111's `sampler_name` and `scheduler`, and which of the
    two cannot be used (listed as ignored). A sampler name with its schedule in it, as clients
    before AUTOMATIC1111 1.9 send ("DPM++ 2M Karras"), is read as both."""
    asked_schedule = ["scheduler"] if schedule else []
    if not sampler:
        # A schedule type for the model's own sampler: that sampler is not known here.
        return None, asked_schedule
    found = _SAMPLER_BY_NAME.get(sampler.lower())
    if found is None:
        found, in_name = _split_schedule(sampler)
        if in_name is not None and _SCHEDULE_BY_NAME.get((schedule or "automatic").lower()) in MODEL_SCHEDULE:
            schedule = in_name
    if found is None:
        return None, ["sampler_name", *asked_schedule]
    ours, schedules = found
    schedule_name = _SCHEDULE_BY_NAME.get((schedule or "automatic").lower())
    if schedule_name in MODEL_SCHEDULE:
        return ours, []
    if schedule_name in schedules:
        return f"{ours}_{schedule_name}", []
    return ours, asked_schedule


def _split_schedule(sampler: str) -> tuple[tuple[str, tuple[str, ...]] | None, str | None]:
    """"DPM++ 2M Karras" as the sampler DPM++ 2M and the schedule type karras."""
    for name, label in SCHEDULERS:
        base = sampler.lower().removesuffix(" " + label.lower())
        if base != sampler.lower() and base in _SAMPLER_BY_NAME:
            return _SAMPLER_BY_NAME[base], name
    return None, None


def resolve_checkpoint(value: str, catalog: Catalog) -> tuple[str | None, str]:
    """The (backend, model) an sd_model_checkpoint names: a model some enabled backend allows
    (every backend that allows it, in failover order), or `backend/model` for one backend. A
    title AUTOMATIC1111 style ("name [hash]") is read without its hash."""
    name = CHECKPOINT_HASH.sub("", value).strip()
    if name in catalog.models:
        return None, name
    backend, _, model = name.partition("/")
    if backend in catalog.backends and model in catalog.offer(backend).models:
        return backend, model
    offered = ", ".join(checkpoint_titles(catalog)) or "none: no backend is configured"
    raise InvalidRequest(
        f"The model {value[:100]!r} is not offered here. Models: {offered}.",
        code="model_not_allowed",
        field="override_settings.sd_model_checkpoint",
    )


def _name(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise invalid_field(name, "a name of at most 64 characters", value)
    return value.strip() or None


def _side(data: Mapping[str, Any], name: str) -> int | None:
    """A side in pixels. Unlike the JSON API, which refuses it: AUTOMATIC1111 makes latents of
    side // 8, so a side that is not a multiple of 8 is rounded down to one, as there."""
    value = data.get(name)
    if value is None:
        return None
    if not is_whole(value) or not MIN_SIDE <= value <= MAX_SIDE:
        raise invalid_field(name, f"an integer from {MIN_SIDE} to {MAX_SIDE}", value)
    return int(value) - int(value) % SIDE_STEP


# --- the catalog in AUTOMATIC1111's words ---------------------------------------------------


def checkpoint_titles(catalog: Catalog) -> list[str]:
    """Every model once by its name (every backend that allows it, in failover order), then
    `backend/model` for a model more than one backend allows (that backend only)."""
    titles = list(catalog.models)
    for offer in catalog.offers:
        for model in offer.models:
            if sum(model in other.models for other in catalog.offers) > 1:
                titles.append(f"{offer.backend}/{model}")
    return titles


def _short_hash(title: str) -> tuple[str, str]:
    digest = hashlib.sha256(title.encode("utf-8")).hexdigest()
    return digest[:10], digest


def sd_models(catalog: Catalog) -> list[dict[str, Any]]:
    models = []
    for title in checkpoint_titles(catalog):
        short, full = _short_hash(title)
        backend, model = resolve_checkpoint(title, catalog)
        models.append(
            {
                "title": title,
                "model_name": model,
                "hash": short,
                "sha256": full,
                "filename": f"{backend or next(o.backend for o in catalog.offers if model in o.models)}/{model}",
                "config": None,
            }
        )
    return models


def default_checkpoint(catalog: Catalog) -> str | None:
    return catalog.offers[0].default_model if catalog.offers else None


# --- in flight on this instance: progress and interrupt ------------------------------------


@dataclass
class Job:
    """One txt2img request in flight: its images' progress and the event that stops them."""

    caller: str
    count: int
    started: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps: dict[int, tuple[int, int]] = field(default_factory=dict)  # image -> (step, steps)
    done: set[int] = field(default_factory=set)
    interrupted: bool = False

    def fraction(self) -> float:
        parts = [1.0 if index in self.done else (s / n if n else 0.0) for index, (s, n) in self.steps.items()]
        parts += [1.0 for index in self.done if index not in self.steps]
        return min(1.0, sum(parts) / self.count) if self.count else 0.0


class InFlight:
    """This instance's txt2img requests in flight, by caller. Not shared: another instance's
    jobs are invisible here (docs/tools.md)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: list[Job] = []

    def start(self, caller: str, count: int) -> Job:
        job = Job(caller, count, self._clock())
        with self._lock:
            self._jobs.append(job)
        return job

    def finish(self, job: Job) -> None:
        with self._lock:
            self._jobs.remove(job)

    def of(self, caller: str) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs if job.caller == caller]

    def interrupt(self, caller: str) -> int:
        jobs = self.of(caller)
        for job in jobs:
            job.interrupted = True
            job.cancelled.set()
        return len(jobs)

    def progress(self, caller: str) -> dict[str, Any]:
        """AUTOMATIC1111's /sdapi/v1/progress answer for this caller's jobs here."""
        jobs = self.of(caller)
        state: dict[str, Any] = {
            "skipped": False,
            "interrupted": any(job.interrupted for job in jobs),
            "stopping_generation": False,
            "job": "",
            "job_count": 0,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": 0,
            "sampling_steps": 0,
        }
        if not jobs:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        count = sum(job.count for job in jobs)
        done = sum(job.fraction() * job.count for job in jobs)
        fraction = done / count if count else 0.0
        oldest = min(job.started for job in jobs)
        elapsed = max(0.0, self._clock() - oldest)
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        current = next(((s, n) for job in jobs for i, (s, n) in job.steps.items() if i not in job.done), (0, 0))
        state.update(
            job=f"txt2img {len(jobs)}",
            job_count=count,
            job_timestamp=time.strftime("%Y%m%d%H%M%S"),
            job_no=int(sum(len(job.done) for job in jobs)),
            sampling_step=current[0],
            sampling_steps=current[1],
        )
        return {
            "progress": round(fraction, 4),
            "eta_relative": round(eta, 2),
            "state": state,
            "current_image": None,
            "textinfo": None,
        }


class RememberedCheckpoints:
    """POST /sdapi/v1/options's sd_model_checkpoint, per caller, on this instance only, the
    least recently set forgotten first."""

    def __init__(self, limit: int = MAX_REMEMBERED_CALLERS) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._choices: OrderedDict[str, str] = OrderedDict()

    def get(self, caller: str) -> str | None:
        with self._lock:
            return self._choices.get(caller)

    def set(self, caller: str, checkpoint: str) -> None:
        with self._lock:
            self._choices[caller] = checkpoint
            self._choices.move_to_end(caller)
            while len(self._choices) > self._limit:
                self._choices.popitem(last=False)


# --- the door --------------------------------------------------------------------------------


class A1111Api:
    def __init__(self, parts: DoorParts, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._parts = parts
        self.in_flight = InFlight(clock)
        self.checkpoints = RememberedCheckpoints()

    def suffix_routes(self) -> dict[str, tuple[Endpoint, ...]]:
        """The door's paths, each answered under any prefix (the adapter's suffix routes)."""

        def post(serve: Callable[[flask.Request, RequestRecord], flask.Response], what: str) -> Endpoint:
            return Endpoint(("POST",), serve, f"Use POST {what} (got {{method}}).", a1111_error, allow="POST, OPTIONS")

        def get(serve: Callable[[flask.Request, RequestRecord], flask.Response], what: str) -> Endpoint:
            return Endpoint(("GET", "HEAD"), serve, f"Use GET {what} (got {{method}}).", a1111_error, allow="GET, HEAD, OPTIONS")

        return {
            f"{PREFIX}/txt2img": (post(self.txt2img, "with a JSON body to generate images"),),
            f"{PREFIX}/sd-models": (get(self.sd_models, "to list the models"),),
            f"{PREFIX}/options": (
                get(self.get_options, "to read the options, POST to choose a checkpoint"),
                post(self.set_options, "to choose a checkpoint, GET to read the options"),
            ),
            f"{PREFIX}/samplers": (get(self.samplers, "to list the samplers"),),
            f"{PREFIX}/schedulers": (get(self.schedulers, "to list the schedulers"),),
            f"{PREFIX}/progress": (get(self.progress, "to read the progress of your generations"),),
            f"{PREFIX}/interrupt": (post(self.interrupt, "to stop your generations"),),
        }

    # --- the GET endpoints and options ---

    def sd_models(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        self._caller(request, record)
        return _json(sd_models(self._parts.catalog))

    def get_options(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        caller = self._caller(request, record)
        checkpoint = self.checkpoints.get(caller) or default_checkpoint(self._parts.catalog)
        return _json(
            {
                "sd_model_checkpoint": checkpoint,
                "sd_checkpoint_hash": _short_hash(checkpoint)[1] if checkpoint else None,
                "samples_format": "png",
            }
        )

    def set_options(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        """Only sd_model_checkpoint means something here: checked, then kept for this caller on
        this instance (the next txt2img without override_settings uses it). The rest is named
        in X-Imagegen-Ignored; nothing is global."""
        caller = self._caller(request, record)
        options = json_object(json_body(request))
        reject_lone_surrogates(options)
        checkpoint = options.get("sd_model_checkpoint")
        if checkpoint is not None:
            if not isinstance(checkpoint, str) or not checkpoint.strip():
                raise invalid_field("sd_model_checkpoint", "a model name string", checkpoint)
            resolve_checkpoint(checkpoint, self._parts.catalog)  # a 400 naming the models if not offered
            self.checkpoints.set(caller, checkpoint)
        ignored = [name for name in options if name != "sd_model_checkpoint"]
        return _json(None, {IGNORED_HEADER: ignored_header(ignored)} if ignored else {})

    def samplers(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        self._caller(request, record)
        return _json([{"name": name, "aliases": list(aliases), "options": {}} for name, aliases, _, _ in SAMPLERS])

    def schedulers(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        self._caller(request, record)
        return _json(
            [
                {"name": name, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                for name, label in SCHEDULERS
            ]
        )

    def _caller(self, request: flask.Request, record: RequestRecord) -> str:
        caller = self._parts.caller(request, record)
        record.fields["door"] = "a1111"
        return caller

    def progress(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        """This caller's txt2img requests in flight on this instance, from the progress events
        the service emits; none here reads as idle."""
        return _json(self.in_flight.progress(self._caller(request, record)))

    def interrupt(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        """Stops this caller's generations in flight on this instance; their requests answer
        with the images already made."""
        stopped = self.in_flight.interrupt(self._caller(request, record))
        record.fields["interrupted"] = stopped
        return _json({})

    # --- txt2img ---

    def txt2img(self, request: flask.Request, record: RequestRecord) -> flask.Response:
        caller = self._caller(request, record)
        with record.phase("validate"):
            asked = parse_txt2img(json_body(request), self._parts.catalog, self._parts.max_prompt_chars, self.checkpoints.get(caller))
        admissions = self._admit_all(asked, caller, record)
        job = self.in_flight.start(caller, len(admissions))
        try:
            results = self._produce_all(admissions, job, disconnect_probe(request.environ))
        finally:
            self.in_flight.finish(job)
        made = [result for result in results if isinstance(result, Produced)]
        failures = [result for result in results if isinstance(result, ImageGenError)]
        if not made and failures and not job.interrupted:
            raise failures[0]
        body, ignored = txt2img_answer(asked, admissions, results, job.interrupted)
        record.fields["images"] = len(made)
        if failures:
            record.fields["failedImages"] = len(failures)
        headers = {"Content-Type": "application/json"}
        if ignored:
            headers[IGNORED_HEADER] = ignored_header(ignored)
        return response(200, body, headers)

    def _admit_all(self, asked: Txt2Img, caller: str, record: RequestRecord) -> list[Admission]:
        """One admission per image (each counted against the rate limit and budgets); seeds s,
        s+1, ... when the caller chose s. One refused: those admitted give their units back."""
        admissions: list[Admission] = []
        base = asked.generation.seed
        try:
            for index in range(asked.count):
                generation = asked.generation if base is None else replace(asked.generation, seed=(base + index) % (MAX_SEED + 1))
                # Each image its own record: its attempts and timings stay its own; the request's
                # log line takes the first image's fields.
                own = record if index == 0 else _child(record)
                admissions.append(self._parts.service.admit(generation, caller, own))
                record.headers.update(own.headers)  # the latest RateLimit headers win
        except ImageGenError:
            for admission in admissions:
                self._parts.service.release(admission)
            raise
        return admissions

    def _produce_all(
        self, admissions: list[Admission], job: Job, client_gone: Callable[[], bool]
    ) -> list[Produced | ImageGenError]:
        """Every image in parallel, each within the deadline; an interrupt or the caller going
        away cancels those still running."""

        def one(index: int) -> Produced | ImageGenError:
            def progress(event: str, **fields: Any) -> None:
                if event == "progress":
                    job.steps[index] = (int(fields.get("step", 0)), int(fields.get("steps", 0)))

            try:
                produced = self._parts.service.produce(admissions[index], progress, job.cancelled)
            except ImageGenError as error:
                return error
            except Exception:
                return self._parts.access_log.unexpected("POST", "txt2img", admissions[index].record)
            job.done.add(index)
            return produced

        try:
            with WATCH.watching(client_gone, job.cancelled.set):
                if len(admissions) == 1:
                    return [one(0)]
                with ThreadPoolExecutor(max_workers=len(admissions), thread_name_prefix="imagegen-a1111") as pool:
                    return list(pool.map(one, range(len(admissions))))
        finally:
            if job.cancelled.is_set() and not job.interrupted:
                raise Cancelled()


def ignored_header(names: list[str]) -> str:
    """The ignored names for a header: field names are the caller's text, so any character
    a header cannot carry is written as a JSON escape, and the whole is bounded."""
    value = ", ".join(json.dumps(name)[1:-1] for name in names)
    return value if len(value) <= MAX_IGNORED_HEADER else value[: MAX_IGNORED_HEADER - 3] + "..."


def _json(value: Any, headers: Mapping[str, str] | None = None) -> flask.Response:
    return response(200, json.dumps(value, ensure_ascii=False).encode(), {"Content-Type": "application/json", **(headers or {})})


def _child(record: RequestRecord) -> RequestRecord:
    return RequestRecord(request_id=record.request_id, clock=record.clock, started=record.clock())


def txt2img_answer(
    asked: Txt2Img, admissions: list[Admission], results: list[Produced | ImageGenError], interrupted: bool
) -> tuple[bytes, list[str]]:
    """AUTOMATIC1111's answer: the images made, `parameters` (the request as understood) and
    `info` (a JSON string: seeds, prompts, the model, infotexts, and what was ignored)."""
    made = [(admission, result) for admission, result in zip(admissions, results) if isinstance(result, Produced)]
    failed = [result for result in results if isinstance(result, ImageGenError)]
    ignored = list(asked.ignored)
    backends_used = {produced.route.backend for _, produced in made}
    for _, produced in made:
        for name in produced.ignored:
            for a1111_name in _a1111_names(name, asked):
                if a1111_name not in ignored:
                    ignored.append(a1111_name)
    generation = asked.generation
    seeds = [produced.seed if produced.seed is not None else -1 for _, produced in made]
    first = made[0][1] if made else None
    width, height = first.size if first else (generation.width, generation.height)
    parameters = {
        "prompt": generation.prompt,
        "negative_prompt": generation.negative_prompt or "",
        "steps": generation.steps,
        "cfg_scale": generation.guidance_scale,
        "width": generation.width,
        "height": generation.height,
        "seed": generation.seed if generation.seed is not None else -1,
        "batch_size": asked.batch_size,
        "n_iter": asked.n_iter,
        "sampler_name": asked.sampler_name,
        "scheduler": asked.scheduler,
        "override_settings": {"sd_model_checkpoint": asked.checkpoint} if asked.checkpoint else {},
    }
    info: dict[str, Any] = {
        "prompt": generation.prompt,
        "all_prompts": [generation.prompt] * len(made),
        "negative_prompt": generation.negative_prompt or "",
        "all_negative_prompts": [generation.negative_prompt or ""] * len(made),
        "seed": seeds[0] if seeds else -1,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * len(made),
        "width": width,
        "height": height,
        "sd_model_name": first.route.model if first else None,
        "sd_model_hash": _short_hash(first.route.model)[0] if first else None,
        "sampler_name": None if "sampler_name" in ignored else asked.sampler_name,
        "scheduler": None if "scheduler" in ignored else asked.scheduler,
        "steps": generation.steps,
        "cfg_scale": generation.guidance_scale,
        "batch_size": asked.batch_size,
        "n_iter": asked.n_iter,
        "infotexts": [infotext(produced) for _, produced in made],
        "backends": sorted(backends_used),
        "ignored": ignored,
        "interrupted": interrupted,
        "failed": len(failed),
    }
    if failed:
        info["errors"] = [{"code": error.code, "message": error.message} for error in failed]
    warnings = [produced.warning for _, produced in made if produced.warning]
    if warnings:
        info["warning"] = warnings[0]
    head = b'{"images": ['
    pieces = [head]
    for index, (_, produced) in enumerate(made):
        if index:
            pieces.append(b", ")
        pieces += [b'"', pybase64.b64encode(produced.png.tobytes()), b'"']
    pieces.append(b'], "parameters": ' + json.dumps(parameters, ensure_ascii=False).encode())
    pieces.append(b', "info": ' + json.dumps(json.dumps(info, ensure_ascii=False), ensure_ascii=False).encode() + b"}")
    return b"".join(pieces), ignored


# The JSON API's field names, as AUTOMATIC1111 calls them.
A1111_NAMES = {"negativePrompt": "negative_prompt", "guidanceScale": "cfg_scale", "steps": "steps", "seed": "seed"}


def _a1111_names(name: str, asked: Txt2Img) -> list[str]:
    """A field a backend ignored, as the caller named it: our `scheduler` is AUTOMATIC1111's
    sampler_name and its scheduler together."""
    if name == "scheduler":
        return [field for field, value in (("sampler_name", asked.sampler_name), ("scheduler", asked.scheduler)) if value]
    return [A1111_NAMES.get(name, name)]


def infotext(produced: Produced) -> str:
    """AUTOMATIC1111's "parameters" text, which the service already wrote into the PNG."""
    from imagegen.png_info import png_text

    return png_text(produced.png.tobytes(), "parameters") or ""
