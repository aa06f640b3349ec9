"""A bound on how many requests hold an image in memory (read, check, store) at the same time.

A request takes a slot just before it reads an image body and gives it back once the image
is stored; bodies that wait stay in the kernel's socket buffers and the provider's TCP
window. Sending the answer is outside the slot, so a slow client never holds up others.

The bound is for memory. Now that a body arrives in a few reads (imagegen/outbound.py), a
hundred threads reading at once no longer fight over the GIL: the 100-request burst takes the same
time with 2 or 100 slots. Its peak RSS does not: about 115 MB with 4 slots, 150 MB with 8
(one worker, bench/run.py).
"""

from __future__ import annotations

import threading

# Over a real network a body takes tens of milliseconds to arrive, so 4 slots still take in
# dozens of images a second; generations that finish in the same instant are rare.
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
