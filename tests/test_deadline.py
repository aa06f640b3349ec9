"""One deadline for the whole request (#19 item 1): the time spent before a backend is asked
(the cache lookup, waiting on an identical request) comes out of DEADLINE_SECONDS, so every
answer comes within the deadline and a moment."""

from __future__ import annotations

from dataclasses import dataclass, field

from imagegen.backends.base import Capabilities
from imagegen.dispatch import Dispatcher
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.record import RequestRecord
from imagegen.service import GenerationService
from imagegen.state import make_state
from tests.standin import make_png


@dataclass
class SlowStore:
    """A store whose lookups take `seconds` of the fake clock and find nothing."""

    clock: object
    seconds: float
    saved: list = field(default_factory=list)

    def load(self, name):
        self.clock.now += self.seconds
        return None

    def save(self, png, name, metadata, budget_seconds=None):
        self.saved.append(budget_seconds)
        return f"/tmp/{name}"


@dataclass
class TimeTakingBackend:
    name: str = "huggingface"
    default_model: str = "m/model"
    allowed_models: tuple[str, ...] = ("m/model",)
    time_left: list = field(default_factory=list)

    def identity(self) -> str:
        return "time-taking"

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities()

    def routes(self, request, model, context):
        return [Route(self.name, model)]

    def generate(self, route, request, context) -> GeneratedImage:
        self.time_left.append(context.time_left())
        return GeneratedImage(png=make_png(), route=route, seed=request.seed)


def test_the_cache_lookup_spends_the_same_deadline(make_settings, clock):
    settings = make_settings(DEADLINE_SECONDS="12", RATE_LIMIT_PER_MINUTE="0")
    backend = TimeTakingBackend()
    store = SlowStore(clock, seconds=10)
    service = GenerationService(settings, Dispatcher({backend.name: backend}, 0), store, make_state(settings.state), timing=clock.timing())
    record = RequestRecord("r", clock=lambda: clock.now, started=clock.now)
    service.produce(service.admit(GenerationRequest(prompt="a fox", seed=3), "caller", record))
    assert backend.time_left == [2]  # 12 s, less the 10 s the lookup took


def test_a_save_after_the_deadline_gets_only_a_moment(make_settings, clock):
    settings = make_settings(DEADLINE_SECONDS="5", RATE_LIMIT_PER_MINUTE="0")
    backend = TimeTakingBackend()
    store = SlowStore(clock, seconds=6)  # the lookup alone spends the deadline
    service = GenerationService(settings, Dispatcher({backend.name: backend}, 0), store, make_state(settings.state), timing=clock.timing())
    record = RequestRecord("r", clock=lambda: clock.now, started=clock.now)
    service.produce(service.admit(GenerationRequest(prompt="a fox", seed=3), "caller", record))
    assert store.saved and store.saved[0] <= 0.5
