"""GET /capabilities.json: what this deployment can do, for the page and any other frontend.

Read at load, it lets a page say "this server has no API key or local model configured" before
anyone presses Generate, list the backends and models it may name, and check ranges before
sending. It holds names and limits only: never a credential, a URL or a project id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from imagegen import validation
from imagegen.backends.base import Backend
from imagegen.catalog import Catalog
from imagegen.config import Settings

NOT_CONFIGURED = (
    "This server has no API key or local model configured, so it cannot generate images yet. "
    "Its owner sets one backend's credential (the README's backend table lists them), installs the local model, "
    "or runs it with BACKENDS=demo to try the page with placeholders."
)


def capabilities_document(settings: Settings, backends: Mapping[str, Backend], catalog: Catalog) -> dict[str, Any]:
    entries = []
    for name, backend in backends.items():
        capabilities = backend.capabilities(backend.default_model)
        entries.append(
            {
                "name": name,
                "defaultModel": backend.default_model,
                "models": list(backend.allowed_models),
                # Of the default model: which request fields it honours.
                "negativePrompt": capabilities.negative_prompt,
                "steps": capabilities.steps,
                "guidance": capabilities.guidance,
                "seed": capabilities.seed,
                "placeholder": capabilities.placeholder,
            }
        )
    document: dict[str, Any] = {
        "configured": bool(backends),
        "backends": entries,
        # The inference providers a request may name (a router backend's), the default first.
        "providers": [provider for offer in catalog.with_providers() for provider in offer.providers],
        "limits": {
            "maxPromptChars": settings.max_prompt_chars,
            "side": {"minimum": validation.MIN_SIDE, "maximum": validation.MAX_SIDE, "multipleOf": validation.SIDE_STEP},
            "steps": {"minimum": validation.MIN_STEPS, "maximum": validation.MAX_STEPS},
            "guidanceScale": {"minimum": validation.MIN_GUIDANCE, "maximum": validation.MAX_GUIDANCE},
            "seed": {"minimum": 0, "maximum": validation.MAX_SEED},
        },
        "authMode": settings.auth_mode,
        "stream": True,
    }
    if not backends:
        document["message"] = NOT_CONFIGURED
    return document
