"""The Hugging Face backend behind a dispatcher, as one object: what the client tests drive."""

from __future__ import annotations

import requests

from imagegen.backends.base import GenerationContext
from imagegen.backends.exchange import new_session
from imagegen.backends.huggingface.backend import create
from imagegen.config import Settings
from imagegen.dispatch import Dispatcher
from imagegen.domain import Attempt, GeneratedImage, GenerationRequest
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
        return self.dispatcher.generate(request, context, attempts)


class BackendsClient:
    """The backends named in BACKENDS, built by the registry, behind one dispatcher: what the
    per-backend tests drive (failover across backends included)."""

    def __init__(self, settings: Settings, session: requests.Session | None = None, timing: Timing | None = None) -> None:
        from imagegen.backends.registry import create_backends

        self.backends = create_backends(settings, session or new_session())
        self.dispatcher = Dispatcher(self.backends, settings.max_retries)
        self.timing = timing or Timing()
        self.settings = settings

    def generate(
        self, request: GenerationRequest, attempts: list[Attempt] | None = None, deadline_seconds: float | None = None
    ) -> GeneratedImage:
        deadline = self.settings.deadline_seconds if deadline_seconds is None else deadline_seconds
        context = GenerationContext(deadline=self.timing.clock() + deadline, timing=self.timing)
        return self.dispatcher.generate(request, context, attempts)
