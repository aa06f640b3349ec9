"""Inference providers behind the Hugging Face router.

A provider knows three things: the route, the payload, and how to read the answer. Building a
request (`UpstreamCall`) is separate from sending it (`imagegen.hf_client`), so each provider is
tested without a network. Adding a provider is one module and one entry in `PROVIDERS`.
"""

from __future__ import annotations

from imagegen.providers.base import Provider, UpstreamCall
from imagegen.providers.hf_inference import HFInference

PROVIDERS: dict[str, Provider] = {provider.name: provider for provider in (HFInference(),)}

__all__ = ["PROVIDERS", "Provider", "UpstreamCall"]
