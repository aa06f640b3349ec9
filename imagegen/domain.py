"""The shapes every layer shares: what was asked, where it is sent, what came back.

Parsers build a `GenerationRequest`; the dispatcher turns it into `Route`s, one per place that
could make the image; a backend answers one route with a `GeneratedImage`; every try is an
`Attempt` in the request's log line. Nothing here knows about HTTP, Flask or a vendor.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request. `model`, `backend` and `provider` are None when the caller let the
    server choose (each backend's default model, every configured backend in order)."""

    prompt: str
    model: str | None = None
    backend: str | None = None
    provider: str | None = None  # an inference provider of a router backend, or "auto"
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    # How many intermediate images a streamed caller wants to see (the Images API door's
    # partial_images): a backend that can show them reports each as a `partial_image` progress
    # event with its `png`. Not part of the recipe: the image is the same either way.
    partial_images: int = 0
    # The sampler to run, as a stable name of ours: "<sampler>" or "<sampler>_<sigma schedule>"
    # ("euler_a", "dpmpp_2m_karras"; imagegen/backends/local/schedulers.py lists them). None:
    # the model's own. A backend that cannot take it lists "scheduler" as ignored.
    scheduler: str | None = None


@dataclass(frozen=True)
class Route:
    """One place to send a generation: a backend, its model, and for a router backend the
    inference provider and the model's id there."""

    backend: str
    model: str
    provider: str | None = None
    provider_model: str | None = None

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.provider}" if self.provider else self.backend


@dataclass(frozen=True)
class GeneratedImage:
    """An image a backend made, as PNG bytes, and what made it.

    `seed` is the seed that reproduces it, or None where the backend cannot reproduce one;
    `ignored` names the request fields the backend could not honour.
    """

    png: bytes
    route: Route
    seed: int | None
    ignored: tuple[str, ...] = ()
    request_id: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # e.g. queued, model
    # What the vendor reports it counted for this image (input, output, total tokens), when it does.
    usage: dict[str, int] | None = None


@dataclass(frozen=True)
class Attempt:
    """One try at one route, for the request's log line."""

    backend: str
    provider: str | None
    status: int | None  # the vendor's HTTP status, None when no answer came
    code: str | None  # our error code; None when the try produced the image
    ms: float
    # What the dispatcher made of the try (imagegen/route_health.py): "adaptive_timeout" (cut
    # at the route's adaptive limit), "failover_instead_of_wait", "circuit_opened"; else None.
    note: str | None = None
