"""The `demo` backend: a labelled placeholder drawn here with Pillow, for trying the page and the
event stream without any account and without the local model's download.

Enabled only by naming it (`BACKENDS=demo`), never by default. It reports a few `progress`
steps, each a short wait through `context.wait`, so cancelling stops it at once. Its images are
never cached (Capabilities.seed is False), never stored (Capabilities.placeholder), and the
answer says `backend: "demo"` with a warning that the image is a placeholder.
"""

from __future__ import annotations

import io
import math
import textwrap

from imagegen.backends.base import Capabilities, GenerationContext
from imagegen.backends.sizes import requested_shape
from imagegen.backends.toolkit import Progress, report_progress
from imagegen.config import BackendSettings, Settings
from imagegen.domain import GeneratedImage, GenerationRequest, Route
from imagegen.errors import ConfigurationError

DEFAULT_SIDE = 512
DEMO_STEPS = 4
DEFAULT_STEP_SECONDS = 0.4
MAX_STEP_SECONDS = 30.0
MODELS = ("placeholder",)


class DemoBackend:
    name = "demo"

    def __init__(self, section: BackendSettings) -> None:
        self.default_model = section.model
        self.allowed_models = section.allowed_models
        self._step_seconds = parse_step_seconds(section.options.get("DEMO_STEP_SECONDS"))

    def identity(self) -> str:
        return "demo"

    def capabilities(self, model: str) -> Capabilities:
        return Capabilities(negative_prompt=False, steps=False, guidance=False, seed=False, placeholder=True)

    def routes(self, request: GenerationRequest, model: str, context: GenerationContext) -> list[Route]:
        return [Route(backend=self.name, model=model)]

    def generate(self, route: Route, request: GenerationRequest, context: GenerationContext) -> GeneratedImage:
        width, height = requested_shape(request.width, request.height) or (DEFAULT_SIDE, DEFAULT_SIDE)
        for step in range(1, DEMO_STEPS + 1):
            context.wait(self._step_seconds)  # raises Cancelled as soon as the caller leaves
            report_progress(context, Progress(step, DEMO_STEPS))
            if step < DEMO_STEPS and step <= request.partial_images:
                # An intermediate image for a caller that asked to see them (the placeholder, labelled).
                context.progress("partial_image", png=placeholder_png(width, height, f"step {step} of {DEMO_STEPS}: {request.prompt}"))
        return GeneratedImage(png=placeholder_png(width, height, request.prompt), route=route, seed=None)


def parse_step_seconds(raw: str | None) -> float:
    """DEMO_STEP_SECONDS, read once when the backend is built; a bad value is refused there."""
    if raw is None:
        return DEFAULT_STEP_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_STEP_SECONDS:
        raise ConfigurationError(
            f"Environment variable DEMO_STEP_SECONDS is invalid: expected a number from 0 to {MAX_STEP_SECONDS:g}, "
            f"got {raw[:32]!r}.",
            code="invalid_configuration",
        )
    return value


def placeholder_png(width: int, height: int, prompt: str) -> bytes:
    """A grey card with diagonal stripes, "DEMO" across it, the prompt, and what it is."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), (226, 228, 233))
    draw = ImageDraw.Draw(image)
    stripe = max(16, min(width, height) // 12)
    for offset in range(-height, width, stripe * 2):
        draw.polygon(
            [(offset, 0), (offset + stripe, 0), (offset + stripe + height, height), (offset + height, height)],
            fill=(214, 217, 224),
        )
    side = min(width, height)
    title = ImageFont.load_default(size=max(24, side // 5))
    body = ImageFont.load_default(size=max(12, side // 28))
    ink = (55, 65, 81)
    draw.text((width / 2, height * 0.36), "DEMO", font=title, fill=ink, anchor="mm")
    chars = max(12, int(width / (body.size * 0.55)) - 4)
    lines = textwrap.wrap(prompt, chars)[:4] or [""]
    y = height * 0.56
    for line in lines:
        draw.text((width / 2, y), line, font=body, fill=ink, anchor="mm")
        y += body.size * 1.3
    draw.text(
        (width / 2, height - body.size * 1.5), "placeholder image - no model was run", font=body, fill=(75, 85, 99), anchor="mm"
    )
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def create(settings: Settings, section: BackendSettings, session: object) -> DemoBackend:
    return DemoBackend(section)
