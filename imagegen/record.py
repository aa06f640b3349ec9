"""What one request did, for its log line and its Server-Timing header."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from imagegen.domain import Attempt


@dataclasses.dataclass
class RequestRecord:
    request_id: str
    clock: Callable[[], float]
    started: float
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)  # name -> ms
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)  # added to the answer

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            self.phases[name] = round((self.clock() - started) * 1000, 1)

    def total_ms(self) -> float:
        return round((self.clock() - self.started) * 1000, 1)

    def server_timing(self) -> str:
        parts = [f"{name};dur={ms}" for name, ms in self.phases.items()]
        return ", ".join([*parts, f"total;dur={self.total_ms()}"])
