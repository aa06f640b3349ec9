"""Which backends to try for a request, and trying them: retries per route, failover across
routes and backends, all inside one deadline.

The rules are the ones that held across a router's inference providers, now across backends: retry
what the error says is retryable (honouring the vendor's own delay), fail over on what another
route may fix (model not served, 5xx, timeouts after retries, unreachable), never on what
would fail everywhere (bad request, bad credentials, no credit, content refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from imagegen.backends.base import Backend, GenerationContext, ignored_fields, providers_of
from imagegen.domain import Attempt, GeneratedImage, GenerationRequest, Route
from imagegen.errors import ContentRejected, UpstreamError
from imagegen.retry import MIN_ATTEMPT_SECONDS, backoff_delay


@dataclass(frozen=True)
class Candidate:
    """A backend and the model it would use for a request."""

    backend: Backend
    model: str


class Dispatcher:
    def __init__(self, backends: Mapping[str, Backend], max_retries: int, failover_on_refusal: bool = False) -> None:
        self._backends = dict(backends)  # in failover order
        self._max_retries = max_retries
        # A refused prompt goes to no other vendor unless the owner says so (FAILOVER_ON_REFUSAL).
        self._failover_on_refusal = failover_on_refusal

    @property
    def backends(self) -> Mapping[str, Backend]:
        return self._backends

    def candidates(self, request: GenerationRequest) -> list[Candidate]:
        """The backends that may answer this request, in order (validation has checked that
        a named backend, model or provider is allowed)."""
        if request.backend:
            backend = self._backends[request.backend]
            return [Candidate(backend, request.model or backend.default_model)]
        if request.provider:
            backend = next(b for b in self._backends.values() if request.provider in providers_of(b))
            return [Candidate(backend, request.model or backend.default_model)]
        if request.model:
            return [Candidate(b, request.model) for b in self._backends.values() if request.model in b.allowed_models]
        return [Candidate(b, b.default_model) for b in self._backends.values()]

    def generate(
        self,
        request: GenerationRequest,
        candidates: list[Candidate],
        context: GenerationContext,
        attempts: list[Attempt] | None = None,
    ) -> GeneratedImage:
        """The image from the first of `candidates` (see `candidates`) that makes one, or the
        last route's UpstreamError."""
        attempts = [] if attempts is None else attempts
        tried: list[str] = []
        for index, candidate in enumerate(candidates):
            is_last_backend = index == len(candidates) - 1
            try:
                routes = candidate.backend.routes(request, candidate.model, context)
            except UpstreamError as error:
                if is_last_backend or not error.fail_over:
                    raise _with_tried(error, tried)
                tried.append(f"{candidate.backend.name} ({error.code})")
                context.progress("failover", **{"from": candidate.backend.name, "to": candidates[index + 1].backend.name})
                continue
            for position, route in enumerate(routes):
                try:
                    return self._with_retries(candidate.backend, route, request, context, attempts)
                except UpstreamError as error:
                    is_last = is_last_backend and position == len(routes) - 1
                    if is_last or not self._fails_over(error) or context.time_left() < MIN_ATTEMPT_SECONDS:
                        raise _with_tried(error, tried)
                    tried.append(f"{route.provider or route.backend} ({error.reported_status or error.code})")
                    following = routes[position + 1].label if position + 1 < len(routes) else candidates[index + 1].backend.name
                    context.progress("failover", **{"from": route.label, "to": following})
        raise AssertionError("validation leaves at least one candidate with one route")

    def _fails_over(self, error: UpstreamError) -> bool:
        """Whether the next route may help. A refusal is a vendor's judgement of the prompt:
        it goes to another vendor only when the owner allows it."""
        if isinstance(error, ContentRejected):
            return self._failover_on_refusal
        return error.fail_over

    def _with_retries(
        self,
        backend: Backend,
        route: Route,
        request: GenerationRequest,
        context: GenerationContext,
        attempts: list[Attempt],
    ) -> GeneratedImage:
        retries = 0
        clock = context.timing.clock
        while True:
            context.check_cancelled()
            context.progress("attempt", backend=route.backend, provider=route.provider, model=route.model)
            started = clock()
            try:
                image = backend.generate(route, request, context)
            except UpstreamError as error:
                attempts.append(Attempt(route.backend, route.provider, error.upstream_status, error.code, _ms(clock() - started)))
                if not error.retryable or retries >= self._max_retries:
                    raise
                retries += 1
                delay = backoff_delay(retries, error.retry_after, context.timing.random())
                if context.time_left() - delay < MIN_ATTEMPT_SECONDS:
                    raise  # no time for another try; a 429 passes its Retry-After on
                context.progress("retry", reason=error.code, status=error.upstream_status, waitSeconds=round(delay, 1))
                context.wait(delay)
                continue
            attempts.append(Attempt(route.backend, route.provider, 200, None, _ms(clock() - started)))
            return _honest(image, request, backend)


def _honest(image: GeneratedImage, request: GenerationRequest, backend: Backend) -> GeneratedImage:
    """The image with what the backend could not honour said out loud: fields it ignored, and
    no seed where a seed would not reproduce it."""
    capabilities = backend.capabilities(image.route.model)
    ignored = tuple(dict.fromkeys((*image.ignored, *ignored_fields(request, capabilities))))
    seed = image.seed if capabilities.seed else None
    return replace(image, ignored=ignored, seed=seed)


def _with_tried(error: UpstreamError, tried: list[str]) -> UpstreamError:
    if tried:
        error.message = f"{error.message} Also tried: {', '.join(tried)}."
    return error


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
