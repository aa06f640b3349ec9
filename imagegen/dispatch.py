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
from imagegen.errors import ContentRejected, UpstreamError, UpstreamTimeout
from imagegen.retry import MIN_ATTEMPT_SECONDS, backoff_delay
from imagegen.route_health import PATIENT, RouteHealth

# A try that timed out this close to its adaptive limit was cut by it (timers fire a hair early
# or late), not by the vendor's own TIMEOUT_SECONDS.
CUT_SLACK_SECONDS = 0.05


@dataclass(frozen=True)
class Candidate:
    """A backend and the model it would use for a request."""

    backend: Backend
    model: str


class Dispatcher:
    def __init__(
        self,
        backends: Mapping[str, Backend],
        max_retries: int,
        failover_on_refusal: bool = False,
        health: RouteHealth | None = None,
    ) -> None:
        self._backends = dict(backends)  # in failover order
        self._max_retries = max_retries
        # A refused prompt goes to no other vendor unless the owner says so (FAILOVER_ON_REFUSAL).
        self._failover_on_refusal = failover_on_refusal
        # Without one (tests that build their own dispatcher), retries and failover as they were.
        self._health = health or RouteHealth(PATIENT)

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
        last route's UpstreamError.

        A route out of rotation (its circuit open) is skipped; when every route is, the one
        taken out longest ago is tried all the same.
        """
        attempts = [] if attempts is None else attempts
        plan = _Plan(request, candidates, context)
        tried: list[str] = []
        skipped: list[tuple[_Step, float]] = []
        failure: tuple[UpstreamError, str] | None = None  # the latest error, as "Also tried" would name it
        while (step := plan.pop()) is not None:
            if step.route is not None:
                admission = self._health.admit(step.label)
                if not admission.allowed:
                    skipped.append((step, admission.opened_at))
                    if plan.has_more():
                        self._announce_failover(context, step.label, plan, "circuit_open")
                    continue
            if failure is not None:
                tried.append(failure[1])
                failure = None
            if step.error is not None:  # the backend could not say where to send this
                if not step.error.fail_over or not plan.has_more():
                    raise _with_tried(step.error, tried + _skipped_names(skipped))
                tried.append(f"{step.label} ({step.error.code})")
                self._announce_failover(context, step.label, plan, "error")
                continue
            try:
                return self._with_retries(step, request, context, attempts, plan)
            except UpstreamError as error:
                if not plan.has_more() or not self._fails_over(error) or context.time_left() < MIN_ATTEMPT_SECONDS:
                    raise _with_tried(error, tried + _skipped_names(skipped))
                route = step.route
                failure = (error, f"{route.provider or route.backend} ({error.reported_status or error.code})")
                self._announce_failover(context, step.label, plan, getattr(error, "failover_why", "error"))
        if failure is None and skipped:
            # Every route is out of rotation: the one out longest is the likeliest to be back.
            step = min(skipped, key=lambda pair: pair[1])[0]
            return self._with_retries(step, request, context, attempts, None)
        if failure is None:
            raise AssertionError("validation leaves at least one candidate with one route")
        raise _with_tried(failure[0], tried + _skipped_names(skipped))

    def _announce_failover(self, context: GenerationContext, source: str, plan: _Plan, why: str) -> None:
        following = plan.peek()
        if following is not None:
            fields = {"from": source, "to": following.label}
            if why != "error":  # a plain failure keeps the event's original shape
                fields["why"] = why
            context.progress("failover", **fields)

    def _fails_over(self, error: UpstreamError) -> bool:
        """Whether the next route may help. A refusal is a vendor's judgement of the prompt:
        it goes to another vendor only when the owner allows it."""
        if isinstance(error, ContentRejected):
            return self._failover_on_refusal
        return error.fail_over

    def _with_retries(
        self,
        step: _Step,
        request: GenerationRequest,
        context: GenerationContext,
        attempts: list[Attempt],
        plan: _Plan | None,
    ) -> GeneratedImage:
        """Tries on one route until an image, an error not worth retrying, or no retries left.

        Where another route follows (`plan`), a try may be cut at the route's adaptive limit
        and a long retry wait skipped: both raise the try's error with `failover_why` set, and
        `generate` moves on."""
        backend, route = step.backend, step.route
        health = self._health
        clock = context.timing.clock
        retries = 0
        while True:
            context.check_cancelled()
            context.progress("attempt", backend=route.backend, provider=route.provider, model=route.model)
            more = plan is not None and plan.has_more()
            limit = health.try_limit(route.label)
            # The last chance (no other route, no retry left) is never cut short: a slow image
            # beats none.
            if limit is not None and not more and retries >= self._max_retries:
                limit = None
            try_context = context
            if limit is not None and clock() + limit < context.deadline:
                try_context = replace(context, deadline=clock() + limit, request_deadline=context.deadline)
            started = clock()
            try:
                image = backend.generate(route, request, try_context)
            except UpstreamError as error:
                took = clock() - started
                cut = (
                    try_context is not context
                    and isinstance(error, UpstreamTimeout)
                    and clock() >= try_context.deadline - CUT_SLACK_SECONDS
                )
                note = "adaptive_timeout" if cut else None
                if error.fail_over and not isinstance(error, ContentRejected) and health.failed(route.label):
                    note = note or "circuit_opened"
                if cut and more and self._ready(plan):
                    attempts.append(_attempt(route, error, took, note))
                    raise _because(error, "adaptive_timeout")
                if not error.retryable or retries >= self._max_retries:
                    attempts.append(_attempt(route, error, took, note))
                    raise
                delay = backoff_delay(retries + 1, error.retry_after, context.timing.random())
                if more and self._fails_over(error):
                    following = self._ready(plan)
                    if following is not None and health.fails_over_instead_of_waiting(route.label, following.label, delay):
                        attempts.append(_attempt(route, error, took, note or "failover_instead_of_wait"))
                        raise _because(error, "wait")
                attempts.append(_attempt(route, error, took, note))
                retries += 1
                if context.time_left() - delay < MIN_ATTEMPT_SECONDS:
                    raise  # no time for another try; a 429 passes its Retry-After on
                fields: dict = {"reason": error.code, "status": error.upstream_status, "waitSeconds": round(delay, 1)}
                if cut:
                    fields["cutAfterSeconds"] = round(try_context.deadline - started, 1)
                context.progress("retry", **fields)
                context.wait(delay)
                continue
            took = clock() - started
            health.succeeded(route.label, route.backend, took)
            attempts.append(Attempt(route.backend, route.provider, 200, None, _ms(took)))
            return _honest(image, request, backend)

    def _ready(self, plan: _Plan | None) -> _Step | None:
        """The next route when it can take over now: known, and in rotation (or due a probe)."""
        following = plan.peek() if plan is not None else None
        if following is None or following.error is not None:
            return None
        return following if self._health.is_ready(following.label) else None


@dataclass(frozen=True)
class _Step:
    """One route to try, or a backend that could not give its routes (`error`)."""

    backend: Backend
    route: Route | None = None
    error: UpstreamError | None = None

    @property
    def label(self) -> str:
        return self.route.label if self.route is not None else self.backend.name


class _Plan:
    """The routes of every candidate in order, asked of each backend only when reached (or
    peeked at: a failover decision needs the next route)."""

    def __init__(self, request: GenerationRequest, candidates: list[Candidate], context: GenerationContext) -> None:
        self._request = request
        self._candidates = list(candidates)
        self._context = context
        self._next_candidate = 0
        self._buffer: list[_Step] = []

    def has_more(self) -> bool:
        return bool(self._buffer) or self._next_candidate < len(self._candidates)

    def peek(self) -> _Step | None:
        self._fill()
        return self._buffer[0] if self._buffer else None

    def pop(self) -> _Step | None:
        self._fill()
        return self._buffer.pop(0) if self._buffer else None

    def _fill(self) -> None:
        while not self._buffer and self._next_candidate < len(self._candidates):
            candidate = self._candidates[self._next_candidate]
            self._next_candidate += 1
            try:
                routes = candidate.backend.routes(self._request, candidate.model, self._context)
            except UpstreamError as error:
                self._buffer.append(_Step(candidate.backend, error=error))
                continue
            self._buffer.extend(_Step(candidate.backend, route) for route in routes)


def _honest(image: GeneratedImage, request: GenerationRequest, backend: Backend) -> GeneratedImage:
    """The image with what the backend could not honour said out loud: fields it ignored, and
    no seed where a seed would not reproduce it."""
    capabilities = backend.capabilities(image.route.model)
    ignored = tuple(dict.fromkeys((*image.ignored, *ignored_fields(request, capabilities))))
    seed = image.seed if capabilities.seed else None
    return replace(image, ignored=ignored, seed=seed)


def _attempt(route: Route, error: UpstreamError, took: float, note: str | None) -> Attempt:
    return Attempt(route.backend, route.provider, error.upstream_status, error.code, _ms(took), note)


def _because(error: UpstreamError, why: str) -> UpstreamError:
    """The error, marked with why the dispatcher leaves its route before its retries are spent."""
    error.failover_why = why  # type: ignore[attr-defined]
    return error


def _skipped_names(skipped: list[tuple[_Step, float]]) -> list[str]:
    return [f"{step.label} (circuit open)" for step, _ in skipped]


def _with_tried(error: UpstreamError, tried: list[str]) -> UpstreamError:
    if tried:
        error.message = f"{error.message} Also tried: {', '.join(tried)}."
    return error


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
