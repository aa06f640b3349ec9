"""The seam between building an upstream request and sending it, and the shapes of answers.

Reading an answer uses the backends' toolkit (imagegen.backends.toolkit): `json_object`,
`first_b64_image`, `Unusable` for what a provider put where the image should be."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from imagegen.domain import GenerationRequest


@dataclass(frozen=True)
class UpstreamCall:
    """One HTTP request to the router, minus the token (added by the client when sending)."""

    url: str
    json: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageBytes:
    data: bytes


@dataclass(frozen=True)
class ImageUrl:
    """The image is at this URL (a provider's CDN): download it, without our token."""

    url: str


@dataclass(frozen=True)
class PendingTask:
    """Still generating: poll this path on the router (under the provider's prefix)."""

    poll_path: str


Answer = ImageBytes | ImageUrl | PendingTask


class TaskFailed(Exception):
    """The provider says the generation failed; the message is the provider's reason."""


class NotFinished(Exception):
    """The provider gave up waiting before the image was ready."""


class Provider(Protocol):
    name: str

    def build(self, request: GenerationRequest, provider_model: str, router_url: str) -> UpstreamCall: ...

    def read_answer(self, body: bytes, content_type: str) -> Answer:
        """The image, the URL or the task in a 200 answer. A shape it does not expect raises
        (toolkit.Unusable, or any shape error): the backend reads within `reading_answer`."""
        ...


class PollingProvider(Provider, Protocol):
    def read_task(self, body: bytes) -> Answer | None:
        """The result of a poll: the answer when done, None while it is still running."""
        ...


def hf_style_parameters(request: GenerationRequest) -> dict[str, Any]:
    """The parameters under Hugging Face's names, absent ones left out."""
    parameters = {
        "negative_prompt": request.negative_prompt,
        "width": request.width,
        "height": request.height,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "seed": request.seed,
    }
    return {key: value for key, value in parameters.items() if value is not None}
