"""Every backend this function can front, in one table: how each is configured and where its
module is. Data only: config.py reads its variables from here, and the composition root
(imagegen.app) imports the enabled modules, so a deployment pays (in cold start) only for what
it uses.

A backend is one module with a `create(settings, section, session)` function and one entry
here. The docs' backend table, `env.yaml` and `openapi.yaml` are checked against `BACKENDS` by
tests/test_docs.py.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_HUB_ID = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
_PLAIN_NAME = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,95}"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    key_variables: tuple[str, ...]  # the credential, first one set wins; () for none
    model_variable: str
    allowed_models_variable: str
    default_model: str
    model_pattern: re.Pattern[str]
    model_example: str
    url_variable: str | None = None
    default_url: str | None = None
    # Other variables the backend reads (checked by the backend when it is built), and their
    # defaults where they have one.
    options: tuple[str, ...] = ()
    option_defaults: Mapping[str, str] = field(default_factory=dict)
    # Without a key, the variable whose presence enables the backend (Vertex: its project).
    enabled_by: str | None = None
    # Enabled by default only when no other backend is (the local model).
    fallback: bool = False
    # Where a backend routes through inference providers a request may name: the variable that
    # lists them (the backend's `providers`).
    providers_variable: str | None = None

    def credential_hint(self) -> str:
        return " or ".join((*self.key_variables, *((self.enabled_by,) if self.enabled_by else ())))


def _spec(name: str, prefix: str, default_model: str, pattern: str, example: str, **kwargs) -> BackendSpec:
    return BackendSpec(
        name=name,
        module=kwargs.pop("module", f"imagegen.backends.{name}"),
        key_variables=kwargs.pop("key_variables", (f"{prefix}_API_KEY",)),
        model_variable=f"{prefix}_MODEL",
        allowed_models_variable=f"{prefix}_ALLOWED_MODELS",
        default_model=default_model,
        model_pattern=re.compile(pattern),
        model_example=example,
        url_variable=kwargs.pop("url_variable", f"{prefix}_BASE_URL"),
        **kwargs,
    )


# Older names of settings every backend shares, still read when the new name is unset: they
# were Hugging Face's when it was the only backend.
SETTING_ALIASES: Mapping[str, str] = {
    "TIMEOUT_SECONDS": "HF_TIMEOUT_SECONDS",
    "DEADLINE_SECONDS": "HF_DEADLINE_SECONDS",
    "MAX_RETRIES": "HF_MAX_RETRIES",
}

# In the default failover order.
BACKENDS: Mapping[str, BackendSpec] = {
    spec.name: spec
    for spec in (
        _spec(
            "huggingface",
            "HF",
            "stabilityai/stable-diffusion-3-medium-diffusers",
            _HUB_ID,
            "owner/model-name",
            module="imagegen.backends.huggingface.backend",
            key_variables=("HUGGING_FACE_API_KEY", "HF_TOKEN"),
            url_variable="HF_ROUTER_URL",
            default_url="https://router.huggingface.co",
            options=("HF_PROVIDER", "HF_ALLOWED_PROVIDERS", "HF_HUB_URL", "HF_MAPPING_TTL_SECONDS"),
            providers_variable="HF_ALLOWED_PROVIDERS",
            option_defaults={"HF_PROVIDER": "hf-inference", "HF_HUB_URL": "https://huggingface.co", "HF_MAPPING_TTL_SECONDS": "600"},
        ),
        _spec(
            "openai",
            "OPENAI",
            "gpt-image-2",
            _PLAIN_NAME,
            "gpt-image-2",
            default_url="https://api.openai.com/v1",
            options=("OPENAI_QUALITY",),
        ),
        _spec(
            "gemini",
            "GEMINI",
            "gemini-2.5-flash-image",
            _PLAIN_NAME,
            "gemini-2.5-flash-image",
            default_url="https://generativelanguage.googleapis.com/v1beta",
        ),
        _spec(
            "vertex",
            "VERTEX",
            "gemini-2.5-flash-image",
            _PLAIN_NAME,
            "gemini-2.5-flash-image",
            key_variables=(),
            # No default here: without VERTEX_BASE_URL the backend derives it from VERTEX_LOCATION
            # (https://aiplatform.googleapis.com for global, https://{location}-aiplatform... otherwise).
            url_variable="VERTEX_BASE_URL",
            options=("VERTEX_PROJECT", "VERTEX_LOCATION", "GOOGLE_CLOUD_PROJECT"),
            option_defaults={"VERTEX_LOCATION": "global"},
            enabled_by="VERTEX_PROJECT",
        ),
        _spec("stability", "STABILITY", "core", _PLAIN_NAME, "core, ultra or sd3.5-large", default_url="https://api.stability.ai"),
        _spec(
            "replicate",
            "REPLICATE",
            "black-forest-labs/flux-schnell",
            _HUB_ID + r"(?::[0-9a-f]{64})?",
            "owner/model-name",
            key_variables=("REPLICATE_API_TOKEN",),
            default_url="https://api.replicate.com",
        ),
        _spec(
            "local",
            "LOCAL",
            "stabilityai/sd-turbo",
            r"[^\x00-\x1f]{1,500}",
            "a Hugging Face model id or a folder",
            key_variables=(),
            url_variable=None,
            options=("LOCAL_DEVICE", "LOCAL_DTYPE", "LOCAL_PRELOAD", "LOCAL_QUEUE_MAX"),
            option_defaults={"LOCAL_DEVICE": "auto", "LOCAL_DTYPE": "auto", "LOCAL_PRELOAD": "false", "LOCAL_QUEUE_MAX": "8"},
            fallback=True,
        ),
        # Placeholders drawn here, for trying the page without an account: only when named.
        _spec(
            "demo",
            "DEMO",
            "placeholder",
            _PLAIN_NAME,
            "placeholder",
            key_variables=(),
            url_variable=None,
            options=("DEMO_STEP_SECONDS",),
            option_defaults={"DEMO_STEP_SECONDS": "0.4"},
        ),
    )
}


def local_model_installed() -> bool:
    """Whether the local model's libraries are installed (found without importing them)."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers"))
    except (ImportError, ValueError):  # a broken install, or an import hook that refuses them
        return False
