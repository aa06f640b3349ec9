"""Test doubles for side effects: a clock that only moves when the code sleeps."""

from __future__ import annotations

from dataclasses import dataclass, field

from imagegen.retry import Timing


@dataclass
class FakeClock:
    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)
    jitter: float = 0.5  # what random() returns: the middle of the jitter range

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def timing(self) -> Timing:
        return Timing(clock=lambda: self.now, sleep=self.sleep, random=lambda: self.jitter)
