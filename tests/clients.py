"""Backends behind a dispatcher, as one object: what the backend and client tests drive."""

from __future__ import annotations

import threading

import requests

from imagegen.backends.base import GenerationContext
from imagegen.outbound import new_session
from imagegen.backends.huggingface.backend import create
from imagegen.backends.registry import create_backends
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
    """The configured backends (BACKENDS, in failover order) behind one dispatcher, built by
    the registry as the function builds them: what backend tests and failover tests drive."""

    def __init__(self, settings: Settings, session: requests.Session | None = None, timing: Timing | None = None) -> None:
        self.backends = create_backends(settings, session or new_session())
        self.dispatcher = Dispatcher(self.backends, settings.max_retries)
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
        return self.dispatcher.generate(request, context, attempts)
