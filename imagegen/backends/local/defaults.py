"""Per-model defaults: what to use for a field the request leaves out, where the pipeline's own
default is wrong for the model (a distilled "turbo" model needs 1 step and no guidance, not 50
and 7.5). `fp16_variant`: the Hub repo has fp16 weight files (`variant="fp16"`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_LOCAL_MODEL = "stabilityai/sd-turbo"


@dataclass(frozen=True)
class ModelDefaults:
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    fp16_variant: bool = False


# By Hub id. A folder matches by its last path part ("…/sd-turbo") or its Hub cache name
# ("models--stabilityai--sd-turbo"). Any other model gets its pipeline's own defaults.
KNOWN_DEFAULTS: dict[str, ModelDefaults] = {
    "stabilityai/sd-turbo": ModelDefaults(steps=1, guidance_scale=0.0, width=512, height=512, fp16_variant=True),
    "stabilityai/sdxl-turbo": ModelDefaults(steps=1, guidance_scale=0.0, width=512, height=512, fp16_variant=True),
}
NO_DEFAULTS = ModelDefaults()


def known_defaults(model: str) -> ModelDefaults:
    if model in KNOWN_DEFAULTS:
        return KNOWN_DEFAULTS[model]
    parts = Path(model).parts
    for hub_id, defaults in KNOWN_DEFAULTS.items():
        if "models--" + hub_id.replace("/", "--") in parts or (parts and parts[-1] == hub_id.split("/")[1]):
            return defaults
    return NO_DEFAULTS
