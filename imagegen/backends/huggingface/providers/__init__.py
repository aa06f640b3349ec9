"""Inference providers behind the Hugging Face router.

A provider knows three things: the route, the payload, and how to read the answer. Building a
request (`UpstreamCall`) is separate from sending it (`imagegen.hf_client`), so each provider is
tested without a network. Adding a provider is one module and one entry in `PROVIDERS`.
"""

from __future__ import annotations

from imagegen.backends.huggingface.providers.base import Provider
from imagegen.backends.huggingface.providers.fal_ai import FalAI
from imagegen.backends.huggingface.providers.hf_inference import HFInference
from imagegen.backends.huggingface.providers.nscale import Nscale
from imagegen.backends.huggingface.providers.replicate import Replicate
from imagegen.backends.huggingface.providers.together import Together
from imagegen.backends.huggingface.providers.wavespeed import WaveSpeed

PROVIDERS: dict[str, Provider] = {
    provider.name: provider for provider in (HFInference(), FalAI(), Replicate(), Together(), Nscale(), WaveSpeed())
}
