"""`LocalBackend`: the Backend protocol over one pipeline in this process, and the model kept
loaded (one at a time; a failed load answered again for a few seconds, then retried)."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from dataclasses import dataclass

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.backends.local.defaults import DEFAULT_LOCAL_MODEL
from imagegen.backends.local.loading import Loaded, free_memory, load_pipeline, source
from imagegen.backends.local.options import LocalOptions
from imagegen.backends.local.pipeline import encode_png, run_pipeline
from imagegen.backends.local.queue import GenerationQueue
from imagegen.config import BackendSettings
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import ImageGenError, InvalidRequest
from imagegen.retry import Timing

logger = logging.getLogger(__name__)

NAME = "local"
# A failed load is answered again, without trying again, to requests that come within this
# many seconds: a model that runs out of memory or has no network while loading would otherwise
# make every queued request wait for the same failure. After it, the next request tries again.
LOAD_RETRY_SECONDS = 10.0


@dataclass
class _LoadFailure:
    model: str
    at: float
    error: ImageGenError


class LocalBackend:
    """A diffusers pipeline in this process, one generation at a time."""

    name = NAME

    def __init__(self, section: BackendSettings, options: LocalOptions, timing: Timing | None = None) -> None:
        self.options = options
        self.default_model = section.model or DEFAULT_LOCAL_MODEL
        self.allowed_models = tuple(dict.fromkeys((self.default_model, *section.allowed_models)))
        self._timing = timing or Timing()
        self._queue = GenerationQueue(options.queue_max)
        # Changed only with the queue's slot held.
        self._loaded: Loaded | None = None
        self._load_failure: _LoadFailure | None = None

    # --- the Backend protocol ---------------------------------------------------------------

    def identity(self) -> str:
        """"local:" and the model (a folder as its absolute path), plus LOCAL_DEVICE and
        LOCAL_DTYPE when set: fp16 on a GPU and fp32 on a CPU give slightly different images.
        Built from the settings alone, never by asking torch: this may run before the fork."""
        identity = f"{NAME}:{source(self.default_model)}"
        if self.options.device != "auto":
            identity += f";device={self.options.device}"
        if self.options.dtype != "auto":
            identity += f";dtype={self.options.dtype}"
        return identity

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(negative_prompt=True, steps=True, guidance=True, seed=True, scheduler=True)

    def routes(self, request: GenerationRequest, model: str, context: GenerationContext) -> list[Route]:
        return [Route(NAME, model)]

    def generate(self, route: Route, request: GenerationRequest, context: GenerationContext) -> GeneratedImage:
        model = self._allowed(route.model)
        context.check_cancelled()
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        clock = self._timing.clock
        asked = clock()
        self._queue.acquire(context)
        timings = {"queued": _ms(clock() - asked)}
        try:
            loaded, load_seconds = self._pipeline(model)
            if load_seconds is not None:
                timings["load"] = _ms(load_seconds)
            started = clock()
            image, ignored = run_pipeline(loaded, request, seed, context)
            ran = clock() - started
            timings["model"] = _ms(ran)
            self._queue.record(ran)
        finally:
            self._queue.release()
        # Outside the slot: the next generation starts while this one is encoded.
        png = encode_png(image)
        return GeneratedImage(png=png, route=Route(NAME, model), seed=seed, ignored=ignored, timings_ms=timings)

    # --- loading ----------------------------------------------------------------------------

    def preload(self) -> None:
        """Load the default model now (waiting for any generation in progress). Raises what a
        request would (ConfigurationError, LocalModelUnavailable); a failure is retried by a
        later request. Call it on the worker side, never before gunicorn forks."""
        self._queue.acquire(None)
        try:
            self._pipeline(self.default_model)
        finally:
            self._queue.release()

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

    def _pipeline(self, model: str) -> tuple[Loaded, float | None]:
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
            free_memory()
        started = clock()
        try:
            loaded = load_pipeline(model, self.options)
        except ImageGenError as error:
            self._load_failure = _LoadFailure(model, clock(), error)
            logger.error("local model %s failed to load: %s", model, error.message)
            raise
        seconds = clock() - started
        self._loaded, self._load_failure = loaded, None
        logger.info("local model %s loaded on %s (%s) in %.1f s", model, loaded.device, loaded.dtype, seconds)
        return loaded, seconds

    def _allowed(self, model: str) -> str:
        # A request must never name a folder or a Hub id that this deployment did not choose.
        if model not in self.allowed_models:
            raise InvalidRequest(
                f"The local backend serves {', '.join(self.allowed_models)}; set LOCAL_ALLOWED_MODELS "
                f"to allow {model!r}.",
                field="model",
            )
        return model


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
