"""One generation at a time: a diffusers pipeline is not thread-safe (the scheduler keeps
per-call state), so the others wait in a bounded FIFO queue (`LOCAL_QUEUE_MAX`) and past it get
`BackendBusy` (503, Retry-After). Waiting counts against the request's deadline."""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque

from imagegen.backends.base import GenerationContext
from imagegen.backends.local.early_stop import queue_error, stop_reason
from imagegen.errors import BackendBusy

# How often a queued request looks at its cancel flag; a freed model wakes it at once.
QUEUE_POLL_SECONDS = 0.1
# Retry-After estimate: the mean of this many recent generations, times the requests ahead.
RECENT_GENERATIONS = 16
UNKNOWN_GENERATION_SECONDS = 10.0


class GenerationQueue:
    """The model's one slot and the FIFO of requests waiting for it."""

    def __init__(self, queue_max: int) -> None:
        self.queue_max = queue_max
        # Guards everything below; generations wait on it. Made in gunicorn's parent process
        # before the fork, but never held there, so the worker gets it free.
        self._state = threading.Condition()
        self._busy = False
        self._waiting: deque[object] = deque()
        self._recent_seconds: deque[float] = deque(maxlen=RECENT_GENERATIONS)

    def acquire(self, context: GenerationContext | None) -> None:
        """Take the slot, waiting in FIFO order behind at most `queue_max` others. `context`
        None (preload) waits without a deadline and is never refused."""
        ticket = object()
        reported = None
        while True:
            with self._state:
                if ticket not in self._waiting:
                    if not self._busy and not self._waiting:
                        self._busy = True
                        return
                    if context is not None and len(self._waiting) >= self.queue_max:
                        retry_after = self._retry_after()
                        # Not retried here: a retry in this process would be a hidden queue past
                        # LOCAL_QUEUE_MAX, a server thread asleep for Retry-After and the 503
                        # late. The caller gets it now; another backend may take the request.
                        raise BackendBusy(
                            f"The local model is busy: {len(self._waiting)} requests are already waiting "
                            f"(LOCAL_QUEUE_MAX={self.queue_max}). Try again in about {retry_after} s.",
                            retry_after=retry_after,
                            retryable=False,
                            fail_over=True,
                        )
                    self._waiting.append(ticket)
                if not self._busy and self._waiting[0] is ticket:
                    self._waiting.popleft()
                    self._busy = True
                    self._state.notify_all()
                    return
                position = self._waiting.index(ticket) + 1
                if context is not None:
                    stop = stop_reason(context)
                    if stop is not None:
                        self._waiting.remove(ticket)
                        self._state.notify_all()
                        raise queue_error(stop)
                if position == reported:
                    wait = QUEUE_POLL_SECONDS if context is None else max(0.0, min(QUEUE_POLL_SECONDS, context.time_left()))
                    self._state.wait(wait)
                    continue
            # Outside the lock: a sink may be slow.
            reported = position
            if context is not None:
                context.progress("queued", position=position)

    def release(self) -> None:
        with self._state:
            self._busy = False
            self._state.notify_all()

    def record(self, seconds: float) -> None:
        """One generation's time, for the Retry-After estimate."""
        with self._state:
            self._recent_seconds.append(seconds)

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the recent mean generation time for each
        request ahead (the waiting ones and the running one)."""
        each = statistics.fmean(self._recent_seconds) if self._recent_seconds else UNKNOWN_GENERATION_SECONDS
        return max(1, math.ceil(each * (len(self._waiting) + 1)))
