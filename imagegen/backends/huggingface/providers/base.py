"""The seam between building an upstream request and sending it, and the shapes of answers."""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

import pybase64

from imagegen.images import describe_non_image
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


class BadAnswer(ValueError):
    """A 200 without an image where the provider puts one; the message says what came."""


class TaskFailed(Exception):
    """The provider says the generation failed; the message is the provider's reason."""


class NotFinished(Exception):
    """The provider gave up waiting before the image was ready."""


class Provider(Protocol):
    name: str

    def build(self, request: GenerationRequest, provider_model: str, router_url: str) -> UpstreamCall: ...

    def read_answer(self, body: bytes, content_type: str) -> Answer: ...


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


def json_object(body: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadAnswer(describe_non_image(body)) from None
    if not isinstance(answer, dict):
        raise BadAnswer("JSON that is not an object")
    return answer


def first_b64_image(answer: dict[str, Any]) -> ImageBytes:
    """`{"data": [{"b64_json": ...}]}`, the OpenAI-style shape several providers use."""
    try:
        return ImageBytes(pybase64.b64decode(answer["data"][0]["b64_json"], validate=True))
    except (KeyError, IndexError, TypeError, binascii.Error, ValueError):
        raise BadAnswer('JSON without "data"[0]["b64_json"]') from None
