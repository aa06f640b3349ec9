"""A bound on how many requests read, check and store an image at the same time.

When a hundred generations finish together, a hundred threads reading megabytes in 64 KiB
pieces spend more CPU fighting over the GIL than doing the work (measured: 13 ms of CPU per
request instead of 6.5 with 4 at a time), and each holds its image meanwhile. A request takes
a slot just before it reads an image body and gives it back once its answer is built; bodies
that wait stay in the kernel's socket buffers and the provider's TCP window. Sending the
answer is outside the slot, so a slow client never holds up other requests.
"""

from __future__ import annotations

import threading

# About twice the cores a function instance gets: enough to keep one busy while another waits
# on a socket or the disk. Measured on 2 cores: 4 beat 1, 2, 8, 16 and 32.
MAX_IMAGES_IN_MEMORY = 4


class ImageSlots:
    def __init__(self, count: int = MAX_IMAGES_IN_MEMORY) -> None:
        self._semaphore = threading.BoundedSemaphore(count)

    def claim(self) -> Slot:
        return Slot(self._semaphore)


class Slot:
    """One request's claim on a slot: taken at most once, released at most once."""

    def __init__(self, semaphore: threading.BoundedSemaphore) -> None:
        self._semaphore = semaphore
        self._held = False
        self._lock = threading.Lock()

    def take(self, timeout: float) -> bool:
        with self._lock:
            if not self._held:
                self._held = self._semaphore.acquire(timeout=max(0.0, timeout))
            return self._held

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._semaphore.release()
