"""The seam between building an upstream request and sending it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from imagegen.validation import GenerationRequest


@dataclass(frozen=True)
class UpstreamCall:
    """One HTTP request to the router, minus the token (added by the client when sending)."""

    url: str
    json: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class Provider(Protocol):
    name: str

    def build(self, request: GenerationRequest, router_url: str) -> UpstreamCall: ...

    def image_bytes(self, body: bytes, content_type: str) -> bytes:
        """The image from a 200 answer; raises `NotAnImage` when there is none."""
        ...
