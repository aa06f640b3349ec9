"""Backends behind a dispatcher, as one object: what the backend and client tests drive."""

from __future__ import annotations

import threading

import pytest
import requests

from imagegen.backends.base import GenerationContext
from imagegen.outbound import new_session
from imagegen.backends.huggingface.backend import create
from imagegen.app import create_backends
from imagegen.config import Settings
from imagegen.dispatch import Dispatcher
from imagegen.domain import Attempt, GeneratedImage, GenerationRequest
from imagegen.errors import UpstreamError
from imagegen.retry import Timing
from imagegen.slots import Slot


class HuggingFaceClient:
    def __init__(self, settings: Settings, session: requests.Session | None = None, timing: Timing | None = None) -> None:
        backend = create(settings, settings.backend_settings["huggingface"], session or new_session())
        self.dispatcher = Dispatcher({"huggingface": backend}, settings.max_retries)
        self.timing = timing or Timing()
        self.settings = settings

    def generate(
        self, request: GenerationRequest, attempts: list[Attempt] | None = None, slot: Slot | None = None
    ) -> GeneratedImage:
        context = GenerationContext(
            deadline=self.timing.clock() + self.settings.deadline_seconds, timing=self.timing, slot=slot
        )
        return self.dispatcher.generate(request, self.dispatcher.candidates(request), context, attempts)


class BackendsClient:
    """The configured backends (BACKENDS, in failover order) behind one dispatcher, built by
    the registry as the function builds them: what backend tests and failover tests drive."""

    def __init__(self, settings: Settings, session: requests.Session | None = None, timing: Timing | None = None) -> None:
        self.backends = create_backends(settings, session or new_session())
        self.dispatcher = Dispatcher(self.backends, settings.max_retries, settings.failover_on_refusal)
        self.timing = timing or Timing()
        self.settings = settings
        self.events: list[tuple[str, dict]] = []  # every progress event, in order
        self.cancelled = threading.Event()  # set it to play a caller that went away

    def progress(self, event: str, **fields) -> None:
        self.events.append((event, fields))

    def generate(
        self,
        request: GenerationRequest,
        attempts: list[Attempt] | None = None,
        slot: Slot | None = None,
        progress=None,
        deadline_seconds: float | None = None,
    ) -> GeneratedImage:
        deadline = self.settings.deadline_seconds if deadline_seconds is None else deadline_seconds
        context = GenerationContext(
            deadline=self.timing.clock() + deadline,
            timing=self.timing,
            slot=slot,
            progress=progress or self.progress,
            cancelled=self.cancelled,
        )
        return self.dispatcher.generate(request, self.dispatcher.candidates(request), context, attempts)


def parse_request(body: bytes, settings: Settings) -> GenerationRequest:
    """Validate a body against what these settings' backends offer, as the JSON API does."""
    from imagegen.catalog import catalog_of
    from imagegen.validation import parse_generation_request

    catalog = catalog_of(create_backends(settings, new_session()))
    return parse_generation_request(body, catalog, settings.max_prompt_chars)


def handler_with_parts(settings: Settings):
    """The function's handler for these settings, with the dispatcher and shared state it
    was built with, for tests that watch them (waiters in single-flight, a backend's identity)."""
    from imagegen.app import Parts, build_handler
    from imagegen.state import make_state

    dispatcher = Dispatcher(create_backends(settings, new_session()), settings.max_retries)
    state = make_state(settings.state)
    return build_handler(settings, Parts(dispatcher=dispatcher, state=state)), dispatcher, state


# A request for Hugging Face's default model.
DEFAULT_REQUEST = GenerationRequest(prompt="a red fox", model="stabilityai/stable-diffusion-3-medium-diffusers")


def generate_error(client: HuggingFaceClient | BackendsClient, request: GenerationRequest = DEFAULT_REQUEST) -> UpstreamError:
    """The UpstreamError a generation ends in (fails the test if it ends in an image)."""
    with pytest.raises(UpstreamError) as caught:
        client.generate(request)
    return caught.value
