"""Scripted backends for the dispatcher's tests (no HTTP): each try answers from a list."""

from __future__ import annotations

from dataclasses import dataclass, field

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.domain import GeneratedImage, Route
from imagegen.errors import UpstreamTimeout
from tests.fakes import FakeClock

HANG = "hang"  # a try that never answers: it runs until its context's deadline or the vendor timeout
VENDOR_TIMEOUT_SECONDS = 120.0


@dataclass
class ScriptedBackend:
    """A backend whose tries answer from `answers` (the last one repeats): an error to raise,
    HANG, or PNG bytes, after `seconds` on `clock` where there is one."""

    name: str
    answers: list = field(default_factory=list)
    clock: FakeClock | None = None
    seconds: float = 1.0
    default_model: str = "m"
    allowed_models: tuple[str, ...] = ("m",)
    tries: int = 0

    def identity(self) -> str:
        return self.name

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities()

    def routes(self, request, model, context) -> list[Route]:
        return [Route(self.name, model)]

    def generate(self, route, request, context: GenerationContext) -> GeneratedImage:
        self.tries += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, str) and answer == HANG:
            assert self.clock is not None, "a hanging try needs a clock"
            # As HttpExchange does: the try ends at min(TIMEOUT_SECONDS, what the context leaves).
            self.clock.now += min(VENDOR_TIMEOUT_SECONDS, context.time_left())
            raise UpstreamTimeout("no answer", retryable=True, fail_over=True)
        if isinstance(answer, Exception):
            raise answer
        if self.clock is not None:
            self.clock.now += self.seconds
        return GeneratedImage(png=answer, route=route, seed=1)
