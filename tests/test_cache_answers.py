"""A cached answer equals the first answer except `cached` (#19 item 6): what the backend could
not honour is said again, and a placeholder shared by an identical request is not "cached"."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import flask

from imagegen.app import Parts, build_handler
from imagegen.backends.base import Capabilities
from imagegen.dispatch import Dispatcher
from imagegen.cache import cached_image_name
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.state import make_state
from imagegen.errors import UpstreamError
from tests.standin import make_png
from tests.servers import wait_until

SEEDED = {"prompt": "a red fox", "seed": 7, "steps": 12}


@dataclass
class StepsIgnoringBackend:
    """Makes an image but cannot honour `steps` (as several vendors cannot)."""

    name: str = "huggingface"  # a registered name: the catalog reads its settings' names
    default_model: str = "m/model"
    allowed_models: tuple[str, ...] = ("m/model",)
    calls: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    placeholder: bool = False

    def identity(self) -> str:
        return "steps-ignoring"

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(steps=False, placeholder=self.placeholder, seed=True)

    def routes(self, request, model, context) -> list[Route]:
        return [Route(self.name, model)]

    def generate(self, route, request, context) -> GeneratedImage:
        self.calls += 1
        self.release.wait(10)
        return GeneratedImage(png=make_png(64, 64), route=route, seed=request.seed)


def client_for(make_settings, backend: StepsIgnoringBackend):
    settings = make_settings(RATE_LIMIT_PER_MINUTE="0")
    handler = build_handler(settings, Parts(dispatcher=Dispatcher({backend.name: backend}, 0)))
    app = flask.Flask("t")
    app.add_url_rule("/", "h", lambda: handler(flask.request), methods=["POST"])
    return app.test_client()


def facts(answer: dict) -> dict:
    return {key: value for key, value in answer.items() if key not in ("imageUrl", "cached", "filePath")}


def test_a_cached_repeat_says_what_was_ignored_as_the_first_answer_did(make_settings):
    backend = StepsIgnoringBackend()
    backend.release.set()
    client = client_for(make_settings, backend)
    first = client.post("/", json=SEEDED).get_json()
    again = client.post("/", json=SEEDED).get_json()
    assert backend.calls == 1 and (first["cached"], again["cached"]) == (False, True)
    assert first["ignored"] == ["steps"] and "cannot use steps" in first["warning"]
    assert facts(again) == facts(first)


@dataclass
class FailingBackend(StepsIgnoringBackend):
    """A seeded backend whose try fails over, once released."""

    def generate(self, route, request, context) -> GeneratedImage:
        self.calls += 1
        self.release.wait(10)
        raise UpstreamError("busy", code="upstream_unavailable", fail_over=True)


def test_a_placeholder_shared_by_an_identical_request_in_flight_is_not_cached(make_settings):
    # The request is seeded for the first backend, so identical ones share its flight; the
    # first fails and the demo draws a placeholder, which the follower must not call cached.
    first = FailingBackend()
    demo = StepsIgnoringBackend(name="demo", placeholder=True)
    demo.release.set()
    settings = make_settings(RATE_LIMIT_PER_MINUTE="0")
    state = make_state(settings.state)
    handler = build_handler(settings, Parts(dispatcher=Dispatcher({"huggingface": first, "demo": demo}, 0), state=state))
    key = cached_image_name(GenerationRequest(prompt="a red fox", seed=7, steps=12), first.identity(), first.default_model)
    app = flask.Flask("t")
    app.add_url_rule("/", "h", lambda: handler(flask.request), methods=["POST"])
    answers = []

    def ask() -> None:
        answers.append(app.test_client().post("/", json=SEEDED).get_json())

    threads = [threading.Thread(target=ask) for _ in range(2)]
    threads[0].start()
    wait_until(lambda: first.calls == 1, 10, "the leader to reach the first backend")
    threads[1].start()
    wait_until(lambda: state._flights.waiters(key) == 1, 10, "the follower to join the leader's flight")
    first.release.set()
    for thread in threads:
        thread.join(20)
    assert [answer["backend"] for answer in answers] == ["demo", "demo"]
    assert first.calls == 1  # the follower joined the leader's flight
    assert all(answer["cached"] is False for answer in answers)
