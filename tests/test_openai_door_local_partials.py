"""Partial images of the local model (imagegen/backends/local/preview.py): the step's latents
through SD's latent RGB factors, as `partial_image` events, only when a caller asked."""

from __future__ import annotations

import io
import os
import time
from typing import Any

import pytest
from PIL import Image

# Before diffusers is imported: huggingface_hub reads it once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

from imagegen.backends.base import GenerationContext  # noqa: E402
from imagegen.backends.local.preview import latent_preview_png, preview_steps  # noqa: E402
from imagegen.domain import GenerationRequest, Route  # noqa: E402
from tests.conftest import SKIP_WITHOUT_DIFFUSERS  # noqa: E402

needs_diffusers = pytest.mark.skipif(SKIP_WITHOUT_DIFFUSERS, reason="torch/diffusers not installed")


def test_previews_are_spread_before_the_last_step() -> None:
    assert preview_steps(8, 3) == {2, 4, 6}
    assert preview_steps(4, 1) == {2}
    assert preview_steps(2, 3) == {1}
    assert preview_steps(1, 2) == preview_steps(8, 0) == set()


@needs_diffusers
def test_a_latent_becomes_a_scaled_rgb_png_and_other_shapes_none() -> None:
    import torch

    png = latent_preview_png(torch.zeros(1, 4, 8, 8), (64, 64))
    image = Image.open(io.BytesIO(png))
    assert (image.format, image.size, image.mode) == ("PNG", (64, 64), "RGB")
    assert image.getpixel((10, 10)) == (128, 128, 128)  # zero latents: mid grey
    assert latent_preview_png(torch.zeros(1, 16, 8, 8)) is None


@needs_diffusers
@pytest.mark.parametrize("asked, expected", [(0, 0), (2, 2)])
def test_the_local_model_reports_partial_images_only_when_asked(tiny_model: str, asked: int, expected: int) -> None:
    from imagegen.backends.local import LocalBackend
    from imagegen.backends.local.options import load_local_options
    from imagegen.config import BackendSettings

    backend = LocalBackend(BackendSettings(name="local", model=tiny_model, options={}), load_local_options({}), None)
    events: list[tuple[str, dict[str, Any]]] = []
    context = GenerationContext(deadline=time.monotonic() + 120)
    context.progress = lambda event, **fields: events.append((event, fields))
    request = GenerationRequest(prompt="a fox", width=64, height=64, steps=4, partial_images=asked)
    image = backend.generate(Route("local", backend.default_model), request, context)
    partials = [fields["png"] for event, fields in events if event == "partial_image"]
    assert len(partials) == expected
    for png in partials:
        assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert Image.open(io.BytesIO(image.png)).size == (64, 64)
