"""AUTOMATIC1111's sampler_name and scheduler (issue #20) run on the local model: mapped onto our
scheduler names (GenerationRequest.scheduler), swapped into the diffusers pipeline for one run,
named in the PNG's parameters text, part of the cache key, and listed as ignored where they
cannot be used."""

from __future__ import annotations

import base64
import importlib.util
import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest
import requests

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported

from imagegen.backends.base import Capabilities, ignored_fields  # noqa: E402
from imagegen.backends.local.schedulers import SAMPLERS as RECIPES  # noqa: E402
from imagegen.backends.local.schedulers import SCHEDULES, recipe_of, scheduler_names  # noqa: E402
from imagegen.cache import cache_key  # noqa: E402
from imagegen.domain import GeneratedImage, GenerationRequest, Route  # noqa: E402
from imagegen.doors.a1111 import SAMPLERS, SCHEDULERS, scheduler_of  # noqa: E402
from imagegen.png_info import A1111_SAMPLERS, a1111_parameters  # noqa: E402
from tests.servers import start_function  # noqa: E402
from tests.test_local_backend import context, make_backend, needs_diffusers  # noqa: E402
from tests.test_local_e2e import local_env, pixels  # noqa: E402

WAIT = 60
SMALL = {"width": 64, "height": 64, "steps": 3, "seed": 7}


# --- the mapping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampler", "schedule", "ours", "ignored"),
    [
        ("Euler a", None, "euler_a", []),
        ("k_euler_ancestral", "automatic", "euler_a", []),
        ("DPM++ 2M", "karras", "dpmpp_2m_karras", []),
        ("dpm++ 2m", "Karras", "dpmpp_2m_karras", []),  # a label, any case
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras", []),  # clients before AUTOMATIC1111 1.9
        ("DPM++ 2M SDE Karras", "automatic", "dpmpp_2m_sde_karras", []),
        ("Euler", "SGM Uniform", "euler_sgm_uniform", []),
        ("UniPC", "uniform", "unipc", []),
        ("PLMS", None, "pndm", []),
        ("Euler a", "karras", "euler_a", ["scheduler"]),  # diffusers' Euler a takes no Karras sigmas
        ("LMS", "exponential", "lms", ["scheduler"]),
        ("Euler", "beta", "euler", ["scheduler"]),
        ("DPM adaptive", None, None, ["sampler_name"]),
        ("DPM adaptive", "karras", None, ["sampler_name", "scheduler"]),
        (None, "karras", None, ["scheduler"]),
        (None, None, None, []),
    ],
)
def test_a1111_sampler_and_schedule_map_onto_our_names(
    sampler: str | None, schedule: str | None, ours: str | None, ignored: list[str]
) -> None:
    assert scheduler_of(sampler, schedule) == (ours, ignored)


def test_every_name_the_door_makes_has_a_recipe_and_an_a1111_label() -> None:
    schedule_names = {name for name, _ in SCHEDULERS}
    made = set()
    for name, _, ours, schedules in SAMPLERS:
        assert A1111_SAMPLERS[ours] == name
        assert set(schedules) <= schedule_names and set(schedules) == set(RECIPES[ours].schedules)
        made |= {ours, *(f"{ours}_{schedule}" for schedule in schedules)}
    assert made == set(scheduler_names())
    assert all(recipe_of(name) is not None for name in made)
    assert recipe_of("dpmpp_2m_karras") == ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **SCHEDULES["karras"]})
    assert recipe_of("euler_a_karras") is None and recipe_of("nonsense") is None


def test_only_the_local_backend_takes_a_scheduler() -> None:
    request = GenerationRequest(prompt="a cat", scheduler="euler_a")
    assert ignored_fields(request, Capabilities()) == ("scheduler",)
    assert ignored_fields(request, Capabilities(scheduler=True)) == ()
    assert make_backend("some/model").capabilities("some/model").scheduler is True


def test_the_parameters_text_names_the_sampler_that_ran() -> None:
    request = GenerationRequest(prompt="a cat", steps=20, seed=1, scheduler="dpmpp_2m_karras")
    image = GeneratedImage(png=b"", route=Route("local", "m"), seed=1)
    text = a1111_parameters(request, image, (512, 512))
    assert "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, Seed: 1" in text
    # Not run as asked: not named.
    assert "Sampler" not in a1111_parameters(request, GeneratedImage(b"", Route("x", "m"), 1, ("scheduler",)), (512, 512))


def test_the_cache_key_tells_schedulers_apart_and_keeps_old_keys() -> None:
    request = GenerationRequest(prompt="a red fox", seed=7, steps=2)
    keys = {
        cache_key(GenerationRequest(prompt="a red fox", seed=7, steps=2, scheduler=name), "local:/x", "m")
        for name in ("euler", "euler_a", "dpmpp_2m_karras")
    }
    assert len(keys | {cache_key(request, "local:/x", "m")}) == 4
    # A request naming no scheduler keeps the key it had before schedulers could be named.
    assert cache_key(request, "local:/x", "m") == "976440f27a7974d16dee3d19724f276d343b4145"


# --- on the tiny pipeline ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def backend(tiny_model: str):
    backend = make_backend(tiny_model)
    backend.preload()
    pipeline = backend._loaded.pipeline
    used: list[str] = []

    class Recording(type(pipeline)):  # the scheduler each run used, seen from inside the call
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            used.append(type(self.scheduler).__name__)
            return super().__call__(*args, **kwargs)

    pipeline.__class__ = Recording
    backend.used = used
    return backend


def run(backend: Any, scheduler: str | None) -> GeneratedImage:
    request = GenerationRequest(prompt="a lighthouse at dusk", scheduler=scheduler, **SMALL)
    return backend.generate(Route("local", backend.default_model), request, context())


@needs_diffusers
def test_euler_a_runs_with_euler_ancestral_then_the_default_is_back(backend: Any) -> None:
    default = backend._loaded.pipeline.scheduler
    image = run(backend, "euler_a")
    assert backend.used[-1] == "EulerAncestralDiscreteScheduler" and image.ignored == ()
    assert backend._loaded.pipeline.scheduler is default
    run(backend, None)
    assert backend.used[-1] == type(default).__name__ == "EulerDiscreteScheduler"


@needs_diffusers
def test_another_scheduler_other_pixels_the_same_one_the_same_pixels(backend: Any) -> None:
    euler_a, dpmpp = run(backend, "euler_a"), run(backend, "dpmpp_2m_karras")
    assert backend.used[-1] == "DPMSolverMultistepScheduler"
    assert backend._loaded.pipeline.scheduler.config.use_karras_sigmas is False  # the default untouched
    assert pixels(euler_a.png) != pixels(dpmpp.png)
    assert pixels(run(backend, "euler_a").png) == pixels(euler_a.png)
    assert pixels(run(backend, "dpmpp_2m_karras").png) == pixels(dpmpp.png)


@needs_diffusers
def test_every_name_builds_on_a_stable_diffusion_pipeline_but_lcm(backend: Any) -> None:
    import diffusers

    schedulers = backend._loaded.schedulers
    for name in scheduler_names():
        class_name, flags = recipe_of(name)
        assert set(flags) <= set(inspect.signature(getattr(diffusers, class_name).__init__).parameters), name
        built = schedulers.get(name)
        if name == "lcm":  # another family: LCM needs a distilled model
            assert built is None
            continue
        if name == "lms" and importlib.util.find_spec("scipy") is None:  # LMS needs scipy
            assert built is None
            continue
        assert type(built).__name__ == class_name, name
        for flag, value in flags.items():
            assert built.config[flag] == value, (name, flag)


@needs_diffusers
def test_a_scheduler_the_pipeline_cannot_take_is_listed_as_ignored(backend: Any) -> None:
    default = backend._loaded.pipeline.scheduler
    for name in ("nonsense", "lcm"):
        image = run(backend, name)
        assert image.ignored == ("scheduler",)
        assert backend.used[-1] == "EulerDiscreteScheduler" and backend._loaded.pipeline.scheduler is default


# --- through the door -------------------------------------------------------------------------


@needs_diffusers
def test_the_door_runs_the_sampler_asked_and_the_cache_keeps_them_apart(tiny_model: str, tmp_path: Path) -> None:
    function = start_function(local_env(tmp_path, tiny_model), tmp_path / "function.log")
    try:

        def txt2img(**fields: Any) -> tuple[bytes, dict[str, Any]]:
            body = {"prompt": "a red fox", "seed": 7, "width": 256, "height": 256, "steps": 3, **fields}
            answer = requests.post(f"{function.url}/sdapi/v1/txt2img", json=body, timeout=WAIT)
            assert answer.status_code == 200, answer.text
            return pixels(base64.b64decode(answer.json()["images"][0])), json.loads(answer.json()["info"])

        euler_a, info = txt2img(sampler_name="Euler a")
        assert info["ignored"] == [] and info["sampler_name"] == "Euler a"
        assert "Sampler: Euler a" in info["infotexts"][0]
        # Same seed, another sampler: its own image, never the cached Euler a one.
        dpmpp, info = txt2img(sampler_name="DPM++ 2M", scheduler="karras")
        assert info["ignored"] == [] and "Sampler: DPM++ 2M, Schedule type: Karras" in info["infotexts"][0]
        assert dpmpp != euler_a
        assert txt2img(sampler_name="Euler a")[0] == euler_a  # from the cache, the same pixels
        default, info = txt2img()
        assert default not in (euler_a, dpmpp) and "Sampler" not in info["infotexts"][0]
        # Unknown here: listed as ignored, and the model's own sampler runs.
        unknown, info = txt2img(sampler_name="DPM adaptive", scheduler="karras")
        assert info["ignored"] == ["sampler_name", "scheduler"] and info["sampler_name"] is None
        assert unknown == default
    finally:
        function.stop()
