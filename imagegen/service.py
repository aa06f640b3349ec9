"""Making one image, whatever asked for it: cache → limits → seed → single-flight → dispatch →
embed → store.

A door (imagegen.doors: the JSON API and its event stream) authenticates and parses; everything
a generation does after that is here, free of Flask and of any answer's shape, so every door runs
the same code and reports the same progress. The result is a `Produced`: each door shapes its own
answer from it. A paid-for image is never lost: if storing fails it is still returned.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Callable
from typing import Any

from imagegen.backends.base import GenerationContext
from imagegen.cache import cached_image_name
from imagegen.config import Settings
from imagegen.dispatch import Candidate, Dispatcher
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import Cancelled, StorageError, UpstreamTimeout
from imagegen.events import ProgressSink, ignore_progress
from imagegen.images import NotAnImage, check_png, check_stored_png, sniff_image_type
from imagegen.logs import prompt_fingerprint
from imagegen.png_info import PngParts, embed_parameters, png_size, png_text
from imagegen.errors import RateLimited
from imagegen.record import RequestRecord
from imagegen.retry import Timing
from imagegen.slots import ImageSlots
from imagegen.state import Reservation, SharedState, rate_limit_headers
from imagegen.storage import ImageMetadata, ImageStore, image_name

# Seeds the server picks stay below 2**31: some providers take only signed 32-bit seeds.
MAX_CHOSEN_SEED = 2**31 - 1
# Followers of an identical request in flight wait for it until their own deadline, and this
# much more: every answer comes within DEADLINE_SECONDS and a moment.
SINGLE_FLIGHT_GRACE_SECONDS = 0.5
# How long a winner's claim on a seeded request holds across instances without renewal: it is
# renewed while the image is made, and a waiter takes over this long after a winner died.
SINGLE_FLIGHT_LEASE_SECONDS = 30
# The least time a save is given when the deadline is already spent: short, so that the answer
# (which carries the image either way) still comes within the deadline and a moment.
MIN_STORE_SECONDS = 0.5
PLACEHOLDER_WARNING = (
    "This is a placeholder from the demo backend, drawn on the server without any model; it is not stored. "
    "Configure a real backend to generate images."
)
# How many cancelled flights a follower rejoins before giving up.
MAX_FLIGHTS_JOINED = 3


@dataclasses.dataclass(frozen=True)
class Produced:
    """An image ready to answer with: the PNG, what made it, and where it is stored."""

    png: PngParts
    route: Route
    seed: int | None  # None: the backend cannot reproduce it from a seed
    file_path: str | None
    cached: bool = False
    ignored: tuple[str, ...] = ()
    warning: str | None = None
    stored_name: str | None = None  # the store's name for it; None when storing failed
    placeholder: bool = False  # drawn without a model (the demo): never stored, never "cached"
    usage: dict[str, int] | None = None  # as the vendor reported it (GeneratedImage.usage)

    @property
    def size(self) -> tuple[int | None, int | None]:
        """The image's width and height, read from the PNG that is returned."""
        start = bytes(self.png.head[:24]) + bytes(self.png.body[: max(0, 24 - len(self.png.head))])
        return png_size(start) if len(start) == 24 and start[12:16] == b"IHDR" else (None, None)

    def facts(self) -> dict[str, Any]:
        """What made the image, as the API and the log line both name it."""
        fields: dict[str, Any] = {
            "backend": self.route.backend,
            "model": self.route.model,
            "provider": self.route.provider,
            "seed": self.seed,
            "cached": self.cached,
            "ignored": list(self.ignored),
        }
        if self.warning:
            fields["warning"] = self.warning
        return fields


@dataclasses.dataclass(frozen=True)
class Admission:
    """A request past every check that can refuse it: what `GenerationService.produce` makes."""

    generation: GenerationRequest  # with the seed the server chose, if the caller chose none
    caller_seed: int | None
    candidates: list[Candidate]
    cache_names: list[tuple[str, str]]
    record: RequestRecord
    hit: Produced | None = None  # answered from the cache: nothing left to make
    reservation: Reservation | None = None  # the unit of the daily budget it holds
    looked_up: bool = True  # False: the cache is still to be asked (a stream's)
    # When the request's time is up (timing.clock), counted from its admission: the cache
    # lookups and the wait for a slot spend the same DEADLINE_SECONDS as the backends.
    deadline: float = float("inf")


class GenerationService:
    def __init__(
        self,
        settings: Settings,
        dispatcher: Dispatcher,
        store: ImageStore,
        state: SharedState,
        slots: ImageSlots | None = None,
        timing: Timing | None = None,
        choose_seed: Callable[[], int] = lambda: secrets.randbelow(MAX_CHOSEN_SEED + 1),
    ) -> None:
        self._settings = settings
        self._dispatcher = dispatcher
        self._store = store
        self._state = state
        self._slots = slots or ImageSlots()
        self._timing = timing or Timing()
        self._choose_seed = choose_seed

    def admit(
        self, generation: GenerationRequest, caller: str, record: RequestRecord, *, look_up_cache: bool = True
    ) -> Admission:
        """Everything that can refuse a request before any work starts: no backend configured,
        the caller's rate, the daily budgets. A streamed answer calls this before its stream
        begins, so these errors still answer with their own status. A cache hit is answered
        here, spending nothing; a stream, which must say `accepted` at once, leaves the lookup
        to `produce` (`look_up_cache=False`): there a hit gives its budget unit back."""
        self._settings.require_backends()
        deadline = self._timing.clock() + self._settings.deadline_seconds
        record.fields.update(prompt_fingerprint(generation.prompt))
        if self._settings.log_prompts:
            record.fields.update(prompt=generation.prompt, negativePrompt=generation.negative_prompt)
        candidates = self._dispatcher.candidates(generation)
        # Only a seed the caller chose makes a request a recipe worth caching.
        cache_names = self._cache_names(generation, candidates) if generation.seed is not None else []
        if cache_names and look_up_cache:
            hit = self._cached(cache_names, generation.seed, record)
            if hit is not None:
                return Admission(generation, generation.seed, candidates, cache_names, record, hit=hit, deadline=deadline)
        # Counted only for requests that would reach a backend: the limits guard the spending.
        self._take_rate(caller, record)
        reservation = self._state.reserve(caller)
        caller_seed = generation.seed
        if generation.seed is None:
            # Always send a seed, so that every answer's seed reproduces its image where it can.
            generation = dataclasses.replace(generation, seed=self._choose_seed())
        record.fields["seed"] = generation.seed
        return Admission(
            generation,
            caller_seed,
            candidates,
            cache_names,
            record,
            reservation=reservation,
            looked_up=look_up_cache,
            deadline=deadline,
        )

    def produce(
        self, admission: Admission, progress: ProgressSink = ignore_progress, cancelled: threading.Event | None = None
    ) -> Produced:
        """The image for an admitted request: from the cache, another identical request in
        flight, or the backends. `cancelled` set by the caller stops the work where it can.
        A request that makes no image gives its budget unit back, whatever the error, and so
        does one answered with another request's image."""
        if admission.hit is not None:
            return admission.hit
        if not admission.looked_up and admission.cache_names:
            hit = self._cached(admission.cache_names, admission.caller_seed, admission.record)
            if hit is not None:
                self._refund(admission)
                return hit
        context = GenerationContext(
            deadline=admission.deadline,
            timing=self._timing,
            progress=progress,
            cancelled=cancelled or threading.Event(),
        )
        try:
            if admission.cache_names:
                produced = self._produce_once(admission, context)
            else:
                produced = self._produce(admission, context)
        except BaseException:
            self._refund(admission)  # no image: the unit goes back
            raise
        if produced.cached:
            self._refund(admission)  # another request's image: this one cost nothing
        admission.record.fields.update(produced.facts())
        return produced

    def release(self, admission: Admission) -> None:
        """Give back what an admission holds when it will never be produced (a door that
        admitted several images and then had one refused)."""
        self._refund(admission)

    def _refund(self, admission: Admission) -> None:
        if admission.reservation is not None:
            self._state.refund(admission.reservation)

    def _take_rate(self, caller: str, record: RequestRecord) -> None:
        """The per-caller rate; its RateLimit headers go on the answer, refusals included."""
        policy = self._settings.state.rate
        try:
            decision = self._state.take_rate(caller)
        except RateLimited as error:
            error.headers.update(rate_limit_headers(error.decision, policy))
            raise
        record.headers.update(rate_limit_headers(decision, policy))

    def _produce_once(self, admission: Admission, context: GenerationContext) -> Produced:
        """Through single-flight: identical requests in flight, on this instance or (with
        STATE_URL) any other, share one upstream call."""
        generation = admission.generation
        backend, key = admission.cache_names[0]

        def produce() -> tuple[Produced, str | None]:
            produced = self._produce(admission, context)
            return produced, produced.stored_name

        for _ in range(MAX_FLIGHTS_JOINED):
            try:
                produced, shared = self._state.single_flight(
                    key,
                    produce,
                    # A name read back from shared state: its bytes get the full check.
                    lambda name: self._load(name, backend, generation.seed, check=check_png),
                    lease_seconds=SINGLE_FLIGHT_LEASE_SECONDS,
                    timeout=max(0.0, context.time_left()) + SINGLE_FLIGHT_GRACE_SECONDS,
                )
            except TimeoutError:
                raise UpstreamTimeout(
                    "An identical request is still being generated and did not finish in time. Try again in a minute."
                ) from None
            except Cancelled:
                if context.cancelled.is_set():
                    raise
                # The request we joined lost its caller, not us: try again, leading this time.
                continue
            # Another request's image is a cached one, except a placeholder: drawn, not made.
            return dataclasses.replace(produced, cached=True) if shared and not produced.placeholder else produced
        raise UpstreamTimeout("Identical requests in flight kept being cancelled by their callers. Try again.")

    def _cache_names(self, generation: GenerationRequest, candidates: list[Candidate]) -> list[tuple[str, str]]:
        """(backend, stored name) for each candidate whose seeds reproduce, in order; never a
        placeholder's, which is neither stored nor shared."""
        if not self._settings.cache:
            return []
        return [
            (c.backend.name, cached_image_name(generation, c.backend.identity(), c.model))
            for c in candidates
            if (capabilities := c.backend.capabilities(c.model)).seed and not capabilities.placeholder
        ]

    def _cached(self, cache_names: list[tuple[str, str]], seed: int | None, record: RequestRecord) -> Produced | None:
        with record.phase("cache"):
            for backend, name in cache_names:
                hit = self._load(name, backend, seed)
                if hit is not None:
                    record.fields.update(hit.facts())
                    return hit
        return None

    def _load(
        self, name: str, backend: str, seed: int | None, check: Callable[[bytes], object] = check_stored_png
    ) -> Produced | None:
        """A stored image as an answer, with what made it read from its text chunks. What
        storage holds is data, not truth: only a sound PNG becomes an answer. Under a name this
        service computed, the PNG it stored after a full check needs only its structure checked
        (every chunk's CRC); under a name read from shared state, `check` is the full check."""
        hit = self._store.load(name)
        if hit is None:
            return None
        png, file_path = hit
        try:
            if sniff_image_type(png) != "png":
                raise NotAnImage("not a PNG")
            check(png)
        except NotAnImage:
            return None  # generate instead
        route = Route(
            backend=png_text(png, "backend") or backend,
            model=png_text(png, "model") or "",
            provider=png_text(png, "provider"),
        )
        # The seed the backend reports using (one maps 0 to another) wins over the request's.
        stored_seed = png_text(png, "seed")
        if stored_seed and stored_seed.isascii() and stored_seed.isdigit() and len(stored_seed) <= 10:
            seed = int(stored_seed)
        ignored = tuple(name for name in (png_text(png, "ignored") or "").split(",") if name in IGNORABLE_FIELDS)
        return Produced(
            PngParts.of(png),
            route,
            seed,
            file_path,
            cached=True,
            ignored=ignored,
            warning=ignored_warning(route.backend, ignored),
            stored_name=name,
        )

    def _produce(self, admission: Admission, context: GenerationContext) -> Produced:
        """Generate, embed the parameters, store: the image and where it went."""
        generation, caller_seed, record = admission.generation, admission.caller_seed, admission.record
        context.slot = self._slots.claim()
        try:
            with record.phase("upstream"):
                image = self._dispatcher.generate(generation, admission.candidates, context, record.attempts)
            with record.phase("storage"):
                png = embed_parameters(image, generation)
                name = self._name_for(generation, image, caller_seed)
                metadata = ImageMetadata(model=image.route.model, prompt=generation.prompt, seed=image.seed)
                warnings = []
                file_path = None
                placeholder = self._dispatcher.backends[image.route.backend].capabilities(image.route.model).placeholder
                if placeholder:
                    warnings.append(PLACEHOLDER_WARNING)
                else:
                    try:
                        # The image is paid for: storing it gets what is left of the deadline,
                        # and at least a moment when nothing is (it is in the answer either way).
                        budget = max(MIN_STORE_SECONDS, context.time_left())
                        file_path = self._store.save(png, name, metadata, budget_seconds=budget)
                        context.progress("stored", filePath=file_path)
                    except StorageError as error:
                        warnings.append(f"The image was generated but could not be stored: {error}. It is only in this answer.")
        finally:
            # Sending is left out on purpose: a slow client must not hold up other requests.
            context.slot.release()
        ignored = image.ignored
        if caller_seed is not None and image.seed is None:
            ignored = (*ignored, "seed")
        if ignored:
            warnings.insert(0, ignored_warning(image.route.backend, ignored))
        for name_, ms in image.timings_ms.items():
            record.phases[name_] = ms
        return Produced(
            png,
            image.route,
            image.seed,
            file_path,
            ignored=ignored,
            warning=" ".join(warnings) or None,
            stored_name=name if file_path else None,
            placeholder=placeholder,
            usage=image.usage,
        )

    def _name_for(self, generation: GenerationRequest, image: GeneratedImage, caller_seed: int | None) -> str:
        if caller_seed is not None and image.seed is not None and self._settings.cache:
            backend = self._dispatcher.backends[image.route.backend]
            return cached_image_name(generation, backend.identity(), image.route.model)
        return image_name(generation.prompt)


# The request fields a backend may be unable to honour, as the API names them: all a stored
# "ignored" chunk may hold.
IGNORABLE_FIELDS = ("negativePrompt", "steps", "guidanceScale", "seed", "width", "height")


def ignored_warning(backend: str, ignored: tuple[str, ...]) -> str | None:
    """The answer's warning about what the backend did not use; None when it used everything."""
    return f"The {backend} backend cannot use {', '.join(ignored)}: ignored." if ignored else None
