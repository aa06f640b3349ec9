"""The `local` backend: a diffusers pipeline running in this process, no account needed.

`LOCAL_MODEL` is a Hugging Face model id (weights from the Hub cache, `HF_HOME`, downloaded on
first use when there is a network) or a folder made by `save_pretrained` / `snapshot_download`.
Nothing heavy is imported with this module: torch and diffusers are imported when the pipeline
first loads, on the first request or in `preload()`. They come from requirements-local.txt.

Three facts shape the code:
- A diffusers pipeline is not thread-safe (the scheduler keeps per-call state), so one
  generation runs at a time per process; the others wait in a bounded FIFO queue
  (`LOCAL_QUEUE_MAX`) and past it get `BackendBusy` (503, Retry-After). Waiting counts
  against the request's deadline.
- functions-framework imports main.py in gunicorn's parent process and then forks the worker.
  A thread started or CUDA initialised before the fork does not survive it, so nothing here
  touches torch at construction: the model loads on the worker side, lazily or through
  `preload_after_fork()`.
- Same seed, prompt and settings give the same bytes: the noise comes from a CPU
  `torch.Generator` seeded from the request, and the PNG is encoded without metadata.
"""

from __future__ import annotations

import gc
import inspect
import io
import logging
import math
import os
import re
import secrets
import statistics
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.config import BackendSettings, Settings
from imagegen.env_values import parse_boolean, parse_choice, parse_number
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import (
    BackendBusy,
    Cancelled,
    ConfigurationError,
    ImageGenError,
    InvalidRequest,
    UpstreamError,
    UpstreamTimeout,
)
from imagegen.retry import Timing

logger = logging.getLogger(__name__)

NAME = "local"
DEFAULT_LOCAL_MODEL = "stabilityai/sd-turbo"
REQUIREMENTS_FILE = "requirements-local.txt"
DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES = ("auto", "float16", "bfloat16", "float32")
DEFAULT_QUEUE_MAX = 8
MAX_QUEUE_MAX = 1000
# A failed load is answered again, without trying again, to requests that come within this
# many seconds: a model that runs out of memory or has no network while loading would otherwise
# make every queued request wait for the same failure. After it, the next request tries again.
LOAD_RETRY_SECONDS = 10.0
# How often a queued request looks at its cancel flag; a freed model wakes it at once.
QUEUE_POLL_SECONDS = 0.1
# Retry-After estimate: the mean of this many recent generations, times the requests ahead.
RECENT_GENERATIONS = 16
UNKNOWN_GENERATION_SECONDS = 10.0
# Low compression: level 1 is ~5x faster than Pillow's default 6 for ~10% more bytes.
PNG_COMPRESS_LEVEL = 1

# A Hub id ("owner/name"); anything else that is not an existing folder is taken for a missing
# folder, so a typo in a path is reported as such and never sent to the Hub.
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# The Hub's error classes, by name, that say the model id itself is wrong (not the network).
_WRONG_MODEL_ERRORS = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError")


@dataclass(frozen=True)
class LocalOptions:
    """The local backend's own settings, checked: LOCAL_DEVICE, LOCAL_DTYPE, LOCAL_PRELOAD,
    LOCAL_QUEUE_MAX."""

    device: str = "auto"
    dtype: str = "auto"
    preload: bool = False
    queue_max: int = DEFAULT_QUEUE_MAX


def load_local_options(options: Mapping[str, str]) -> LocalOptions:
    """Check the raw LOCAL_* strings; a bad value raises ConfigurationError naming the variable."""
    return LocalOptions(
        device=parse_choice("LOCAL_DEVICE", _given(options, "LOCAL_DEVICE"), DEVICES, default="auto"),
        dtype=parse_choice("LOCAL_DTYPE", _given(options, "LOCAL_DTYPE"), DTYPES, default="auto"),
        preload=parse_boolean("LOCAL_PRELOAD", _given(options, "LOCAL_PRELOAD"), default=False),
        queue_max=int(
            parse_number(
                "LOCAL_QUEUE_MAX", _given(options, "LOCAL_QUEUE_MAX"), DEFAULT_QUEUE_MAX, 0, MAX_QUEUE_MAX, integer=True
            )
        ),
    )


@dataclass(frozen=True)
class ModelDefaults:
    """What to use for a field the request leaves out, where the pipeline's own default is
    wrong for the model (a distilled "turbo" model needs 1 step and no guidance, not 50 and
    7.5). `fp16_variant`: the Hub repo has fp16 weight files (`variant="fp16"`)."""

    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    fp16_variant: bool = False


# By Hub id. A folder matches by its last path part ("…/sd-turbo") or its Hub cache name
# ("models--stabilityai--sd-turbo"). Any other model gets its pipeline's own defaults.
KNOWN_DEFAULTS: dict[str, ModelDefaults] = {
    "stabilityai/sd-turbo": ModelDefaults(steps=1, guidance_scale=0.0, width=512, height=512, fp16_variant=True),
    "stabilityai/sdxl-turbo": ModelDefaults(steps=1, guidance_scale=0.0, width=512, height=512, fp16_variant=True),
}
NO_DEFAULTS = ModelDefaults()


def known_defaults(model: str) -> ModelDefaults:
    if model in KNOWN_DEFAULTS:
        return KNOWN_DEFAULTS[model]
    parts = Path(model).parts
    for hub_id, defaults in KNOWN_DEFAULTS.items():
        if "models--" + hub_id.replace("/", "--") in parts or (parts and parts[-1] == hub_id.split("/")[1]):
            return defaults
    return NO_DEFAULTS


class LocalModelUnavailable(UpstreamError):
    """The local model cannot run now (out of memory, not downloadable): another backend may
    serve the request, so the dispatcher fails over."""

    status = 503
    code = "local_model_unavailable"


class _Stop(Exception):
    """Raised from the step callback to end a generation early: diffusers' `interrupt` flag
    would skip the remaining steps but still decode the latents, which is wasted work."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Loaded:
    model: str
    pipeline: Any
    device: str
    dtype: str
    parameters: frozenset[str]  # what the pipeline's __call__ accepts


@dataclass
class _LoadFailure:
    model: str
    at: float
    error: ImageGenError


class LocalBackend:
    """A diffusers pipeline in this process, one generation at a time."""

    name = NAME

    def __init__(self, settings: BackendSettings, timing: Timing | None = None) -> None:
        self.options = load_local_options(settings.options)
        self.default_model = settings.model or DEFAULT_LOCAL_MODEL
        self.allowed_models = tuple(dict.fromkeys((self.default_model, *settings.allowed_models)))
        self._timing = timing or Timing()
        # Guards everything below; generations wait on it. Made here, in the parent process
        # before the fork, but never held there, so the worker gets it free.
        self._state = threading.Condition()
        self._busy = False
        self._queue: deque[object] = deque()
        self._loaded: _Loaded | None = None
        self._load_failure: _LoadFailure | None = None
        self._recent_seconds: deque[float] = deque(maxlen=RECENT_GENERATIONS)

    # --- the Backend protocol ---------------------------------------------------------------

    def identity(self) -> str:
        """"local:" and the model (a folder as its absolute path), plus LOCAL_DEVICE and
        LOCAL_DTYPE when set: fp16 on a GPU and fp32 on a CPU give slightly different images.
        Built from the settings alone, never by asking torch: this may run before the fork."""
        identity = f"{NAME}:{_source(self.default_model)}"
        if self.options.device != "auto":
            identity += f";device={self.options.device}"
        if self.options.dtype != "auto":
            identity += f";dtype={self.options.dtype}"
        return identity

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(negative_prompt=True, steps=True, guidance=True, seed=True)

    def routes(self, request: GenerationRequest, model: str, context: GenerationContext) -> list[Route]:
        return [Route(NAME, model)]

    def generate(self, route: Route, request: GenerationRequest, context: GenerationContext) -> GeneratedImage:
        model = self._allowed(route.model)
        context.check_cancelled()
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        clock = self._timing.clock
        asked = clock()
        self._acquire(context)
        timings = {"queued": _ms(clock() - asked)}
        try:
            loaded, load_seconds = self._pipeline(model)
            if load_seconds is not None:
                timings["load"] = _ms(load_seconds)
            started = clock()
            image, ignored = self._run(loaded, request, seed, context)
            ran = clock() - started
            timings["model"] = _ms(ran)
            with self._state:
                self._recent_seconds.append(ran)
        finally:
            self._release()
        # Outside the lock: the next generation starts while this one is encoded.
        png = encode_png(image)
        return GeneratedImage(png=png, route=Route(NAME, model), seed=seed, ignored=ignored, timings_ms=timings)

    # --- loading ----------------------------------------------------------------------------

    def preload(self) -> None:
        """Load the default model now (waiting for any generation in progress). Raises what a
        request would (ConfigurationError, LocalModelUnavailable); a failure is retried by a
        later request. Call it on the worker side, never before gunicorn forks."""
        self._acquire(None)
        try:
            self._pipeline(self.default_model)
        finally:
            self._release()

    def start_preload(self) -> threading.Thread:
        """`preload()` in a background thread; a failure is logged, and retried by the first
        request. Requests that come meanwhile queue behind the load."""
        thread = threading.Thread(target=self._preload_logged, name="imagegen-local-preload", daemon=True)
        thread.start()
        return thread

    def preload_after_fork(self) -> None:
        """For LOCAL_PRELOAD=true under functions-framework: gunicorn imports main.py in its
        parent process and forks the worker from it, so load in every child forked from here
        (`os.register_at_fork`), in a background thread. Call once, at composition. Where the
        process never forks (a test client, a debug server) the first request loads instead."""
        os.register_at_fork(after_in_child=self.start_preload)

    @property
    def loaded_model(self) -> str | None:
        """The model in memory now, if any (for a health check or the startup line)."""
        loaded = self._loaded
        return loaded.model if loaded else None

    def _preload_logged(self) -> None:
        try:
            self.preload()
        except ImageGenError as error:
            logger.error("local model preload failed: %s", error.message)
        except Exception:  # a preload must never take the worker down
            logger.exception("local model preload failed")

    def _pipeline(self, model: str) -> tuple[_Loaded, float | None]:
        """The loaded pipeline for `model` (loading it, in place of any other, when needed) and
        the seconds a load took. Called with the generation slot held."""
        loaded = self._loaded
        if loaded is not None and loaded.model == model:
            return loaded, None
        clock = self._timing.clock
        failure = self._load_failure
        if failure is not None and failure.model == model and clock() - failure.at < LOAD_RETRY_SECONDS:
            raise failure.error
        if loaded is not None:
            # One model in memory at a time: a second one could need twice the GPU memory.
            self._loaded = None
            del loaded
            _free_memory()
        started = clock()
        try:
            loaded = _load_pipeline(model, self.options)
        except ImageGenError as error:
            self._load_failure = _LoadFailure(model, clock(), error)
            logger.error("local model %s failed to load: %s", model, error.message)
            raise
        seconds = clock() - started
        self._loaded, self._load_failure = loaded, None
        logger.info(
            "local model %s loaded on %s (%s) in %.1f s", model, loaded.device, loaded.dtype, seconds
        )
        return loaded, seconds

    # --- one generation at a time -----------------------------------------------------------

    def _acquire(self, context: GenerationContext | None) -> None:
        """Take the generation slot, waiting in FIFO order behind at most LOCAL_QUEUE_MAX others.
        `context` None (preload) waits without a deadline and is never refused."""
        ticket = object()
        reported = None
        while True:
            with self._state:
                if ticket not in self._queue:
                    if not self._busy and not self._queue:
                        self._busy = True
                        return
                    if context is not None and len(self._queue) >= self.options.queue_max:
                        retry_after = self._retry_after()
                        # Not retried here: a retry in this process would be a hidden queue past
                        # LOCAL_QUEUE_MAX, a server thread asleep for Retry-After and the 503
                        # late. The caller gets it now; another backend may take the request.
                        raise BackendBusy(
                            f"The local model is busy: {len(self._queue)} requests are already waiting "
                            f"(LOCAL_QUEUE_MAX={self.options.queue_max}). Try again in about {retry_after} s.",
                            retry_after=retry_after,
                            retryable=False,
                            fail_over=True,
                        )
                    self._queue.append(ticket)
                if not self._busy and self._queue[0] is ticket:
                    self._queue.popleft()
                    self._busy = True
                    self._state.notify_all()
                    return
                position = self._queue.index(ticket) + 1
                if context is not None:
                    stop = _stop_reason(context)
                    if stop is not None:
                        self._queue.remove(ticket)
                        self._state.notify_all()
                        raise _queue_error(stop)
                if position == reported:
                    wait = QUEUE_POLL_SECONDS if context is None else max(0.0, min(QUEUE_POLL_SECONDS, context.time_left()))
                    self._state.wait(wait)
                    continue
            # Outside the lock: a sink may be slow.
            reported = position
            if context is not None:
                context.progress("queued", position=position)

    def _release(self) -> None:
        with self._state:
            self._busy = False
            self._state.notify_all()

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean generation time for each
        request ahead (the waiting ones and the running one)."""
        each = statistics.fmean(self._recent_seconds) if self._recent_seconds else UNKNOWN_GENERATION_SECONDS
        return max(1, math.ceil(each * (len(self._queue) + 1)))

    # --- the pipeline call ------------------------------------------------------------------

    def _run(
        self, loaded: _Loaded, request: GenerationRequest, seed: int, context: GenerationContext
    ) -> tuple[Any, tuple[str, ...]]:
        import torch  # already imported by the load

        pipeline, accepts = loaded.pipeline, loaded.parameters
        arguments, ignored = pipeline_arguments(request, known_defaults(loaded.model), accepts)
        # On the CPU whatever the device: the same seed gives the same noise on every machine.
        arguments["generator"] = torch.Generator(device="cpu").manual_seed(seed)
        arguments["output_type"] = "pil"
        if "callback_on_step_end" in accepts:
            arguments["callback_on_step_end"] = _step_callback(context, arguments.get("num_inference_steps"))
        stop = _stop_reason(context)
        if stop is not None:
            raise _run_error(stop)
        try:
            with torch.inference_mode():
                output = pipeline(**arguments)
        except _Stop as stopped:
            raise _run_error(stopped.reason) from None
        except ImageGenError:
            raise
        except Exception as error:
            if _is_out_of_memory(error):
                _free_memory()
                raise LocalModelUnavailable(
                    f"The local model ({loaded.model} on {loaded.device}) ran out of memory; try a "
                    "smaller image or fewer steps, or another backend.",
                    retryable=True,
                    fail_over=True,
                ) from None
            logger.exception("local model %s failed", loaded.model)
            raise UpstreamError(
                f"The local model ({loaded.model}) failed: {type(error).__name__}: {error}",
                code="generation_failed",
                fail_over=True,
            ) from None
        if "negative_prompt" in arguments and getattr(pipeline, "do_classifier_free_guidance", True) is False:
            # Without classifier-free guidance (guidance <= 1, as turbo models run) the negative
            # prompt has nothing to steer: say so rather than pretend.
            ignored = (*ignored, "negativePrompt")
        return output.images[0], ignored

    # --- helpers ----------------------------------------------------------------------------

    def _allowed(self, model: str) -> str:
        # A request must never name a folder or a Hub id that this deployment did not choose.
        if model not in self.allowed_models:
            raise InvalidRequest(
                f"The local backend serves {', '.join(self.allowed_models)}; set LOCAL_ALLOWED_MODELS "
                f"to allow {model!r}.",
                field="model",
            )
        return model


def create(settings: Settings | BackendSettings, section: BackendSettings | None = None, session: object = None) -> LocalBackend:
    """The registry's constructor (settings, section, session); the local model needs only its
    section. Called once per process, in gunicorn's parent: with LOCAL_PRELOAD=true the load is
    registered to start in each forked worker, never here."""
    backend = LocalBackend(section if section is not None else settings)  # type: ignore[arg-type]
    if backend.options.preload:
        backend.preload_after_fork()
    return backend


def pipeline_arguments(
    request: GenerationRequest, defaults: ModelDefaults, accepts: frozenset[str]
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The pipeline's keyword arguments for `request` (the model's known defaults filling the
    gaps; the pipeline's own where none), and the request fields it cannot take."""
    fields = (
        # (argument, the request's value, the model's default, the field's name in the API)
        ("prompt", request.prompt, None, "prompt"),
        ("negative_prompt", request.negative_prompt, None, "negativePrompt"),
        ("num_inference_steps", request.steps, defaults.steps, "steps"),
        ("guidance_scale", request.guidance_scale, defaults.guidance_scale, "guidanceScale"),
        ("width", request.width, defaults.width, "width"),
        ("height", request.height, defaults.height, "height"),
    )
    arguments: dict[str, Any] = {}
    ignored: list[str] = []
    for argument, asked, default, api_name in fields:
        value = asked if asked is not None else default
        if value is None:
            continue
        if argument in accepts:
            arguments[argument] = value
        elif asked is not None:
            ignored.append(api_name)
    return arguments, tuple(ignored)


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image, with no metadata (the service embeds its own)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


# --- loading, with errors that name the setting ---------------------------------------------


def _load_pipeline(model: str, options: LocalOptions) -> _Loaded:
    # Before importing torch (seconds): a typo in a path is told at once.
    is_folder = os.path.isdir(model)
    if not is_folder and not HUB_ID_PATTERN.fullmatch(model):
        raise ConfigurationError(
            f"LOCAL_MODEL names the folder {model!r}, which does not exist here (or is not a "
            "folder). Set LOCAL_MODEL to a Hugging Face model id or to a folder saved with "
            "save_pretrained.",
        )
    torch, auto_pipeline = _import_runtime()
    device = _device(torch, options.device)
    dtype_name = options.dtype if options.dtype != "auto" else ("float16" if device in ("cuda", "mps") else "float32")
    dtype = getattr(torch, dtype_name)
    try:
        pipeline = None
        if known_defaults(model).fp16_variant:
            # The fp16 files are half the download (sd-turbo: 2.6 GB, not 5.2) and load as fp32
            # on a CPU just as well; a folder may hold only them. A cache or a folder that holds
            # only the full files falls through.
            try:
                pipeline = auto_pipeline.from_pretrained(model, dtype=dtype, variant="fp16")
            except Exception as error:
                if _is_out_of_memory(error):
                    raise
                logger.info("local model %s: no fp16 files (%s); loading the full ones", model, _first_line(error))
        if pipeline is None:
            pipeline = auto_pipeline.from_pretrained(model, dtype=dtype)
        pipeline = pipeline.to(device)
    except Exception as error:
        raise _load_error(model, is_folder, device, error) from None
    pipeline.set_progress_bar_config(disable=True)
    parameters = frozenset(inspect.signature(pipeline.__call__).parameters)
    return _Loaded(model=model, pipeline=pipeline, device=device, dtype=dtype_name, parameters=parameters)


def _import_runtime() -> tuple[Any, Any]:
    try:
        import torch
        from diffusers import AutoPipelineForText2Image
    except ImportError as error:
        raise ConfigurationError(
            f"The local backend needs torch and diffusers, which are not installed ({error}). "
            f"Install {REQUIREMENTS_FILE} (pip install -r {REQUIREMENTS_FILE}), or configure an "
            "API backend instead.",
        ) from None
    return torch, AutoPipelineForText2Image


def _device(torch: Any, wanted: str) -> str:
    # Only here, on the worker side: torch.cuda.is_available() initialises CUDA.
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if wanted == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (wanted == "cuda" and not cuda) or (wanted == "mps" and not mps):
        build = f"torch {torch.__version__}" + (f" for CUDA {torch.version.cuda}" if torch.version.cuda else ", a CPU build")
        raise ConfigurationError(
            f"LOCAL_DEVICE={wanted}, but {build} sees no such device here. Set LOCAL_DEVICE=auto "
            "or cpu, or install the torch build that matches this machine's driver.",
        )
    return wanted


def _load_error(model: str, is_folder: bool, device: str, error: Exception) -> ImageGenError:
    chain = _causes(error)
    if _is_out_of_memory(error):
        _free_memory()
        return LocalModelUnavailable(
            f"LOCAL_MODEL {model} does not fit in memory on {device}; it will be tried again on a "
            "later request. Use a smaller model, LOCAL_DTYPE=float16, or a bigger machine.",
            retryable=False,
            fail_over=True,
        )
    if is_folder:
        return ConfigurationError(
            f"LOCAL_MODEL={model} is a folder but not a diffusers text-to-image pipeline "
            f"({type(error).__name__}: {_first_line(error)}).",
        )
    if any(name in _WRONG_MODEL_ERRORS for name in chain):
        return ConfigurationError(
            f"LOCAL_MODEL={model}: the Hugging Face Hub has no such model, or it is gated "
            f"(accept its licence and set HF_TOKEN). ({_first_line(error)})",
        )
    if "LocalEntryNotFoundError" in chain:
        return LocalModelUnavailable(
            f"LOCAL_MODEL={model} is not in the Hugging Face cache (HF_HOME) and could not be "
            "downloaded (no network, or HF_HUB_OFFLINE is set). Download it once with network "
            "access, or set LOCAL_MODEL to a folder that holds it.",
            retryable=False,
            fail_over=True,
        )
    return LocalModelUnavailable(
        f"LOCAL_MODEL={model} failed to load: {type(error).__name__}: {_first_line(error)}",
        retryable=False,
        fail_over=True,
    )


def _causes(error: BaseException) -> list[str]:
    names, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    return names


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(name.endswith("OutOfMemoryError") for name in _causes(error))


def _free_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _source(model: str) -> str:
    return os.path.realpath(model) if os.path.isdir(model) or not HUB_ID_PATTERN.fullmatch(model) else model


# --- stopping early -------------------------------------------------------------------------


def _stop_reason(context: GenerationContext) -> str | None:
    if context.cancelled.is_set():
        return "cancelled"
    if context.time_left() <= 0:
        return "deadline"
    return None


def _step_callback(context: GenerationContext, steps: int | None):
    def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        stop = _stop_reason(context)
        if stop is not None:
            raise _Stop(stop)
        total = getattr(pipeline, "num_timesteps", None) or steps or step + 1
        done = min(step + 1, total)
        context.progress("progress", step=done, steps=total, fraction=round(done / total, 4))
        return tensors

    return on_step_end


def _queue_error(reason: str) -> ImageGenError:
    if reason == "cancelled":
        return Cancelled()
    return UpstreamTimeout(
        "The request's deadline passed while it waited for the local model (other generations "
        "were ahead of it). Try again, or raise LOCAL_QUEUE_MAX only with more time per request.",
        retryable=True,
        fail_over=True,
    )


def _run_error(reason: str) -> ImageGenError:
    if reason == "cancelled":
        return Cancelled()
    return UpstreamTimeout(
        "The request's deadline passed while the local model was generating; it was stopped. "
        "Ask for fewer steps or a smaller image.",
        retryable=False,
        fail_over=True,
    )


# --- settings -------------------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _given(options: Mapping[str, str], name: str) -> str | None:
    """An option as config reads it: stripped, None when unset or blank."""
    return (options.get(name) or "").strip() or None
