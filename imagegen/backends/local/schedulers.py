"""The scheduler a request names (GenerationRequest.scheduler, e.g. "euler_a", "dpmpp_2m_karras")
as a diffusers scheduler built from the loaded pipeline's own (`from_config`, so its betas,
prediction type and spacing carry over), and swapped in for one run.

A name is a sampler, optionally followed by a sigma schedule: "<sampler>" or
"<sampler>_<schedule>". The mapping follows diffusers' table of AUTOMATIC1111 / k-diffusion
equivalents (docs: api/schedulers/overview). Nothing here imports diffusers at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerRecipe:
    """A diffusers scheduler class, the config it needs to be this sampler, and the sigma
    schedules its constructor takes."""

    scheduler_class: str
    config: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[str, ...] = ()


# The sigma schedules (AUTOMATIC1111's "Schedule type") as config flags; a sampler named without
# one keeps the model's own. One sigma flag at a time (diffusers refuses two), whatever the
# model's config had. sgm_uniform is diffusers' "trailing" spacing.
_NO_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
SCHEDULES: dict[str, dict[str, Any]] = {
    "karras": {**_NO_SIGMAS, "use_karras_sigmas": True},
    "exponential": {**_NO_SIGMAS, "use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
}
SIGMAS = ("karras", "exponential", "sgm_uniform")

SAMPLERS: dict[str, SamplerRecipe] = {
    "euler": SamplerRecipe("EulerDiscreteScheduler", schedules=SIGMAS),
    "euler_a": SamplerRecipe("EulerAncestralDiscreteScheduler", schedules=("sgm_uniform",)),
    "heun": SamplerRecipe("HeunDiscreteScheduler", schedules=SIGMAS),
    "dpm2": SamplerRecipe("KDPM2DiscreteScheduler", schedules=SIGMAS),
    "dpm2_a": SamplerRecipe("KDPM2AncestralDiscreteScheduler", schedules=SIGMAS),
    "lms": SamplerRecipe("LMSDiscreteScheduler"),  # needs scipy
    "dpmpp_2m": SamplerRecipe("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, SIGMAS),
    "dpmpp_2m_sde": SamplerRecipe("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, SIGMAS),
    "ddim": SamplerRecipe("DDIMScheduler", schedules=("sgm_uniform",)),
    # PLMS: Stable Diffusion's own PNDM config skips the Runge-Kutta warm-up steps.
    "pndm": SamplerRecipe("PNDMScheduler", {"skip_prk_steps": True}, ("sgm_uniform",)),
    "unipc": SamplerRecipe("UniPCMultistepScheduler", schedules=SIGMAS),
    "lcm": SamplerRecipe("LCMScheduler"),
}


def scheduler_names() -> tuple[str, ...]:
    """Every name a request may give: each sampler alone and with each schedule it takes."""
    return tuple(
        name for sampler, recipe in SAMPLERS.items() for name in (sampler, *(f"{sampler}_{s}" for s in recipe.schedules))
    )


def recipe_of(name: str) -> tuple[str, dict[str, Any]] | None:
    """The scheduler class and config overrides for `name`; None for a name not listed."""
    if name in SAMPLERS:
        recipe = SAMPLERS[name]
        return recipe.scheduler_class, dict(recipe.config)
    for schedule, flags in SCHEDULES.items():
        sampler = name.removesuffix("_" + schedule)
        if sampler != name and sampler in SAMPLERS and schedule in SAMPLERS[sampler].schedules:
            recipe = SAMPLERS[sampler]
            return recipe.scheduler_class, {**recipe.config, **flags}
    return None


class Schedulers:
    """The schedulers built for one loaded pipeline, by name, and its own (the default).

    Used with the generation slot held: one generation at a time, so swapping the pipeline's
    scheduler for a run and putting the default back after is safe."""

    def __init__(self, pipeline: Any) -> None:
        self._pipeline = pipeline
        self.default = getattr(pipeline, "scheduler", None)
        self._built: dict[str, Any | None] = {}

    def get(self, name: str) -> Any | None:
        """The scheduler for `name`, built once; None where this pipeline cannot take it (an
        unknown name, a scheduler of another family such as flow matching, a failed build)."""
        if name not in self._built:
            self._built[name] = self._build(name)
        return self._built[name]

    @contextmanager
    def using(self, name: str | None) -> Iterator[bool]:
        """Runs the body with `name`'s scheduler in the pipeline (the default when None);
        yields False where the name cannot be used here (the default runs instead)."""
        chosen = self.get(name) if name is not None else None
        if chosen is None:
            yield name is None
            return
        self._pipeline.scheduler = chosen
        try:
            yield True
        finally:
            self._pipeline.scheduler = self.default

    def _build(self, name: str) -> Any | None:
        recipe = recipe_of(name)
        if recipe is None or self.default is None:
            return None
        class_name, overrides = recipe
        import diffusers  # already imported by the load

        scheduler_class = getattr(diffusers, class_name, None)
        # Only a scheduler of the same family as the model's own: an epsilon/v-prediction
        # sampler on a flow-matching model (FLUX, SD3) makes noise, not an image.
        compatible = {type(self.default), *getattr(self.default, "compatibles", ())}
        if scheduler_class is None or scheduler_class not in compatible:
            return None
        try:
            return scheduler_class.from_config(self.default.config, **overrides)
        except Exception as error:
            # A config this scheduler rejects, or a library it needs (LMS needs scipy, which
            # requirements-local.txt leaves out): the default runs and the answer says so.
            logger.warning("local scheduler %s cannot be built: %s: %s", name, type(error).__name__, " ".join(str(error).split())[:300])
            return None
