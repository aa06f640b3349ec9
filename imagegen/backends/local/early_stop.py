"""Stopping a generation early, in the queue or between steps, when its caller leaves or its
deadline passes; and the errors that say which."""

from __future__ import annotations

from typing import Any

from imagegen.backends.base import GenerationContext
from imagegen.backends.local.preview import latent_preview_png, preview_steps
from imagegen.errors import Cancelled, ImageGenError, UpstreamTimeout


class Stop(Exception):
    """Raised from the step callback to end a generation early: diffusers' `interrupt` flag
    would skip the remaining steps but still decode the latents, which is wasted work."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def stop_reason(context: GenerationContext) -> str | None:
    if context.cancelled.is_set():
        return "cancelled"
    if context.time_left() <= 0:
        return "deadline"
    return None


def step_callback(context: GenerationContext, steps: int | None, partial_images: int = 0, size: tuple[int, int] | None = None):
    """diffusers' `callback_on_step_end`: reports progress, and stops at the next step; with
    `partial_images`, that many approximate previews of the latents (local/preview.py) as
    `partial_image` events."""
    previewed = 0

    def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        nonlocal previewed
        stop = stop_reason(context)
        if stop is not None:
            raise Stop(stop)
        total = getattr(pipeline, "num_timesteps", None) or steps or step + 1
        done = min(step + 1, total)
        context.progress("progress", step=done, steps=total, fraction=round(done / total, 4))
        if previewed < partial_images and done in preview_steps(total, partial_images) and "latents" in tensors:
            png = latent_preview_png(tensors["latents"], size)
            if png is not None:
                previewed += 1
                context.progress("partial_image", png=png)
        return tensors

    return on_step_end


def queue_error(reason: str) -> ImageGenError:
    if reason == "cancelled":
        return Cancelled()
    return UpstreamTimeout(
        "The request's deadline passed while it waited for the local model (other generations "
        "were ahead of it). Try again, or raise LOCAL_QUEUE_MAX only with more time per request.",
        retryable=True,
        fail_over=True,
    )


def run_error(reason: str) -> ImageGenError:
    if reason == "cancelled":
        return Cancelled()
    return UpstreamTimeout(
        "The request's deadline passed while the local model was generating; it was stopped. "
        "Ask for fewer steps or a smaller image.",
        retryable=False,
        fail_over=True,
    )
