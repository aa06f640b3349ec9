"""Never pay twice for the same image.

A request that names its seed is a recipe: on a backend whose seeds reproduce, the same
backend, endpoint, account, provider, model, prompt, negative prompt, size, steps, guidance and
seed give the same image. Its image is stored under a name made from that recipe
(content-addressed), so a repeat, on this instance or any other that shares the bucket, is
answered from storage. The backend's identity (its endpoint and a fingerprint of its account)
is part of the recipe: an image made by a stand-in, or another account, never answers for the
real one. Requests without a seed, and backends whose seeds do not reproduce, are never cached.
Identical requests in flight at the same time share one upstream call.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from imagegen.storage import prompt_slug
from imagegen.domain import GenerationRequest

T = TypeVar("T")

# Changing what goes into the key changes this, so old entries are simply never found again.
KEY_VERSION = 2
SEEDED_DIRECTORY = "seeded"


def cache_key(generation: GenerationRequest, backend_identity: str, model: str) -> str:
    """`backend_identity`: Backend.identity() of the backend that makes (or made) the image."""
    recipe = {
        "v": KEY_VERSION,
        "backend": backend_identity,
        "provider": generation.provider,
        "model": model,
        "prompt": generation.prompt,
        "negativePrompt": generation.negative_prompt,
        "width": generation.width,
        "height": generation.height,
        "steps": generation.steps,
        "guidanceScale": generation.guidance_scale,
        "seed": generation.seed,
    }
    canonical = json.dumps(recipe, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: the same bytes as UTF-8 for any valid text, and no exception for the rest.
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def cached_image_name(generation: GenerationRequest, backend_identity: str, model: str) -> str:
    """'seeded/a-red-fox-<key>': readable, and found again from the request alone."""
    return f"{SEEDED_DIRECTORY}/{prompt_slug(generation.prompt)}-{cache_key(generation, backend_identity, model)}"


@dataclass
class _Flight(Generic[T]):
    done: threading.Event = field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None
    waiters: int = 0


class SingleFlight(Generic[T]):
    """Runs `work` once per key at a time; callers that arrive meanwhile get its outcome."""

    def __init__(self) -> None:
        self._flights: dict[str, _Flight[T]] = {}
        self._lock = threading.Lock()

    def do(self, key: str, work: Callable[[], T], timeout: float) -> tuple[T, bool]:
        """(the result, whether it was shared from another caller's work)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
            else:
                flight.waiters += 1
        if not leader:
            if not flight.done.wait(timeout):
                raise TimeoutError(f"the identical request in flight did not finish within {timeout:g} s")
            if flight.error is not None:
                raise flight.error
            return flight.result, True  # type: ignore[return-value]
        try:
            flight.result = work()
            return flight.result, False
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    def waiters(self, key: str) -> int:
        with self._lock:
            flight = self._flights.get(key)
            return flight.waiters if flight else 0
