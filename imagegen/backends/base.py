"""The one seam every image backend fits: `Backend`, what it can do, and what a try carries.

A backend turns one `Route` and a `GenerationRequest` into a `GeneratedImage`, or raises an
`UpstreamError` (imagegen.errors) that says whether retrying or failing over may help. Retries,
failover across routes and backends, and the overall deadline belong to the dispatcher, not
to backends: a backend makes exactly one try per call.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import Cancelled
from imagegen.events import ProgressSink, ignore_progress
from imagegen.retry import Timing
from imagegen.slots import Slot


@dataclass(frozen=True)
class Capabilities:
    """What a backend honours for one model. A request field it cannot honour is reported in
    the answer's "ignored" list, never silently dropped."""

    negative_prompt: bool = True
    steps: bool = True
    guidance: bool = True
    # The same seed, prompt and settings give the same image. Where False the answer's seed
    # is null and the request is never cached.
    seed: bool = True
    # The image is a stand-in made without any model (the demo backend): never stored, and
    # the answer's warning says so.
    placeholder: bool = False
    # The request's `scheduler` (a sampler by our name) can be run: the local model's diffusers
    # pipeline, which may still list it as ignored where that model cannot take it.
    scheduler: bool = False


def ignored_fields(request: GenerationRequest, capabilities: Capabilities) -> tuple[str, ...]:
    """The request's fields (as the API names them) that this backend will not use."""
    unsupported = (
        ("negativePrompt", request.negative_prompt is not None and not capabilities.negative_prompt),
        ("steps", request.steps is not None and not capabilities.steps),
        ("guidanceScale", request.guidance_scale is not None and not capabilities.guidance),
        ("scheduler", request.scheduler is not None and not capabilities.scheduler),
    )
    return tuple(name for name, ignored in unsupported if ignored)


@dataclass
class GenerationContext:
    """What one generation carries through every try: its deadline, the image slot, where
    progress goes, and whether its caller has gone away."""

    deadline: float  # on timing.clock
    timing: Timing = field(default_factory=Timing)
    slot: Slot | None = None
    progress: ProgressSink = ignore_progress
    cancelled: threading.Event = field(default_factory=threading.Event)
    # The request's own deadline where this try's is shorter (the dispatcher's adaptive cut).
    request_deadline: float | None = None

    def time_left(self) -> float:
        return self.deadline - self.timing.clock()

    def request_time_left(self) -> float:
        """What is left of the request's time, whatever this try's own limit."""
        end = self.deadline if self.request_deadline is None else max(self.deadline, self.request_deadline)
        return end - self.timing.clock()

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled()

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`, waking early (with Cancelled) when the caller goes away."""
        self.check_cancelled()
        if self.timing.sleep is time.sleep:
            self.cancelled.wait(seconds)  # real time: wakes the moment the caller leaves
        else:
            self.timing.sleep(seconds)  # a test's clock
        self.check_cancelled()


class Backend(Protocol):
    """An image API (or a local model) behind the one endpoint.

    A backend that routes through several inference providers (a router) may also have
    `providers`: the ones a request may name, its default first (see `providers_of`).
    """

    name: str
    default_model: str
    allowed_models: tuple[str, ...]

    def identity(self) -> str:
        """What tells this backend's images apart from another deployment's, for the cache key:
        its endpoint and a fingerprint of its account. Never the credential itself."""
        ...

    def capabilities(self, model: str) -> Capabilities: ...

    def routes(self, request: GenerationRequest, model: str, context: GenerationContext) -> list[Route]:
        """Where to try this model, in order; most backends have exactly one route."""
        ...

    def generate(self, route: Route, request: GenerationRequest, context: GenerationContext) -> GeneratedImage:
        """One try: the image, or an UpstreamError."""
        ...


def providers_of(backend: Backend) -> tuple[str, ...]:
    """The inference providers a request may name on this backend; () for most backends."""
    return tuple(getattr(backend, "providers", ()))
