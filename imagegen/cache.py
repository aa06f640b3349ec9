"""Never pay twice for the same image.

A request that names its seed is a recipe: on a backend whose seeds reproduce, the same
backend, endpoint, account, provider, model, prompt, negative prompt, size, steps, guidance,
scheduler and seed give the same image. Its image is stored under a name made from that recipe
(content-addressed), so a repeat, on this instance or any other that shares the bucket, is
answered from storage. The backend's identity (its endpoint and a fingerprint of its account)
is part of the recipe: an image made by a stand-in, or another account, never answers for the
real one. Requests without a seed, and backends whose seeds do not reproduce, are never cached.
Identical requests in flight at the same time share one upstream call.
"""

from __future__ import annotations

import hashlib
import json

from imagegen.storage import prompt_slug
from imagegen.domain import GenerationRequest


# Changing what goes into the key changes this, so old entries are simply never found again.
KEY_VERSION = 2
SEEDED_DIRECTORY = "seeded"


def cache_key(generation: GenerationRequest, backend_identity: str, model: str) -> str:
    """`backend_identity`: Backend.identity() of the backend that makes (or made) the image."""
    recipe = {
        "v": KEY_VERSION,
        "backend": backend_identity,
        "provider": generation.provider,
        "model": model,
        "prompt": generation.prompt,
        "negativePrompt": generation.negative_prompt,
        "width": generation.width,
        "height": generation.height,
        "steps": generation.steps,
        "guidanceScale": generation.guidance_scale,
        "seed": generation.seed,
    }
    if generation.scheduler is not None:
        # Only when asked: every key made before schedulers could be named stays the same.
        recipe["scheduler"] = generation.scheduler
    canonical = json.dumps(recipe, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: the same bytes as UTF-8 for any valid text, and no exception for the rest.
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:40]


def cached_image_name(generation: GenerationRequest, backend_identity: str, model: str) -> str:
    """'seeded/a-red-fox-<key>': readable, and found again from the request alone."""
    return f"{SEEDED_DIRECTORY}/{prompt_slug(generation.prompt)}-{cache_key(generation, backend_identity, model)}"
