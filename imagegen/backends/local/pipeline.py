"""The pipeline call: a request's fields as the pipeline's arguments, one run with the step
callback, and the image as PNG bytes. Same seed, prompt and settings give the same bytes: the
noise comes from a CPU `torch.Generator` seeded from the request, and the PNG carries no metadata."""

from __future__ import annotations

import io
import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from imagegen.backends.base import GenerationContext
from imagegen.backends.local.defaults import ModelDefaults, known_defaults
from imagegen.backends.local.early_stop import Stop, run_error, step_callback, stop_reason
from imagegen.backends.local.loading import Loaded, free_memory, is_out_of_memory
from imagegen.backends.local.schedulers import Schedulers
from imagegen.domain import GenerationRequest
from imagegen.errors import ImageGenError, LocalModelUnavailable, UpstreamError

logger = logging.getLogger(__name__)

# Low compression: level 1 is ~5x faster than Pillow's default 6 for ~10% more bytes.
PNG_COMPRESS_LEVEL = 1


def run_pipeline(
    loaded: Loaded, request: GenerationRequest, seed: int, context: GenerationContext
) -> tuple[Any, tuple[str, ...]]:
    """One image (a PIL image) and the request fields the pipeline could not take."""
    import torch  # already imported by the load

    pipeline, accepts = loaded.pipeline, loaded.parameters
    arguments, ignored = pipeline_arguments(request, known_defaults(loaded.model), accepts)
    # On the CPU whatever the device: the same seed gives the same noise on every machine.
    arguments["generator"] = torch.Generator(device="cpu").manual_seed(seed)
    arguments["output_type"] = "pil"
    if "callback_on_step_end" in accepts:
        size = (arguments["width"], arguments["height"]) if arguments.get("width") and arguments.get("height") else None
        arguments["callback_on_step_end"] = step_callback(
            context, arguments.get("num_inference_steps"), request.partial_images, size
        )
    stop = stop_reason(context)
    if stop is not None:
        raise run_error(stop)
    try:
        with torch.inference_mode(), _scheduler(loaded.schedulers, request.scheduler) as honoured:
            output = pipeline(**arguments)
    except Stop as stopped:
        raise run_error(stopped.reason) from None
    except ImageGenError:
        raise
    except Exception as error:
        if is_out_of_memory(error):
            free_memory()
            raise LocalModelUnavailable(
                f"The local model ({loaded.model} on {loaded.device}) ran out of memory; try a "
                "smaller image or fewer steps, or another backend.",
                retryable=True,
                fail_over=True,
            ) from None
        logger.exception("local model %s failed", loaded.model)
        raise UpstreamError(
            f"The local model ({loaded.model}) failed: {type(error).__name__}: {error}",
            code="generation_failed",
            fail_over=True,
        ) from None
    if "negative_prompt" in arguments and getattr(pipeline, "do_classifier_free_guidance", True) is False:
        # Without classifier-free guidance (guidance <= 1, as turbo models run) the negative
        # prompt has nothing to steer: say so rather than pretend.
        ignored = (*ignored, "negativePrompt")
    if not honoured:
        ignored = (*ignored, "scheduler")
    return output.images[0], ignored


def _scheduler(schedulers: Schedulers | None, name: str | None) -> AbstractContextManager[bool]:
    """The asked scheduler in the pipeline for this run (the default put back after); True
    where it was used (or none was asked)."""
    if schedulers is None:
        return nullcontext(name is None)
    return schedulers.using(name)


def pipeline_arguments(
    request: GenerationRequest, defaults: ModelDefaults, accepts: frozenset[str]
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The pipeline's keyword arguments for `request` (the model's known defaults filling the
    gaps; the pipeline's own where none), and the request fields it cannot take."""
    fields = (
        # (argument, the request's value, the model's default, the field's name in the API)
        ("prompt", request.prompt, None, "prompt"),
        ("negative_prompt", request.negative_prompt, None, "negativePrompt"),
        ("num_inference_steps", request.steps, defaults.steps, "steps"),
        ("guidance_scale", request.guidance_scale, defaults.guidance_scale, "guidanceScale"),
        ("width", request.width, defaults.width, "width"),
        ("height", request.height, defaults.height, "height"),
    )
    arguments: dict[str, Any] = {}
    ignored: list[str] = []
    for argument, asked, default, api_name in fields:
        value = asked if asked is not None else default
        if value is None:
            continue
        if argument in accepts:
            arguments[argument] = value
        elif asked is not None:
            ignored.append(api_name)
    return arguments, tuple(ignored)


def encode_png(image: Any) -> bytes:
    """PNG bytes of a PIL image, with no metadata (the service embeds its own)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()
