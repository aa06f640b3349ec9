"""What a generation reports while it runs, for a streamed answer and for the log line.

Producers (the service, the dispatcher, a backend) call a `ProgressSink` with an event name
and its fields; they never know who listens. Names and fields are the event-stream contract:
accepted, queued, attempt, retry, failover, progress, stored (then result or error, sent by
the web layer).
"""

from __future__ import annotations

from typing import Any, Protocol


class ProgressSink(Protocol):
    def __call__(self, event: str, **fields: Any) -> None: ...


def ignore_progress(event: str, **fields: Any) -> None:
    """The sink for callers that do not stream."""
