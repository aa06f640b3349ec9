"""Intermediate images of a local generation, for a caller that asked to see them (the Images
API door's `partial_images`): the step's latents turned into RGB by a fixed linear map, with no
VAE decode (milliseconds, not a second). The map is the well-known one for Stable Diffusion
1.x/2.x latents (4 channels; the "latent RGB factors" of ComfyUI's SD15 latent format, also
used by sd-turbo): a blurry, colour-approximate preview at 1/8 of the size, scaled up. Models
whose latents have another shape (SDXL's differ in scale, SD3/FLUX have 16 channels) give none.
"""

from __future__ import annotations

import io
from typing import Any

# Rows: the 4 latent channels; columns: their weight in R, G, B.
SD_LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


def preview_steps(total: int, wanted: int) -> set[int]:
    """The steps (1-based) after which a preview is made: `wanted` of them spread evenly
    before the last step (whose image is the result itself)."""
    if total <= 1 or wanted <= 0:
        return set()
    wanted = min(wanted, total - 1)
    return {max(1, round(total * (index + 1) / (wanted + 1))) for index in range(wanted)}


def latent_preview_png(latents: Any, size: tuple[int, int] | None = None) -> bytes | None:
    """A PNG of the first latent in a batch (a torch tensor, channels first), or None when the
    latents are not the 4-channel kind the factors are for."""
    import torch
    from PIL import Image

    if getattr(latents, "ndim", 0) != 4 or latents.shape[1] != len(SD_LATENT_RGB_FACTORS):
        return None
    factors = torch.tensor(SD_LATENT_RGB_FACTORS, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents[0].detach().float().cpu(), factors)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    image = Image.fromarray(pixels, "RGB")
    if size is not None and size != image.size:
        image = image.resize(size, Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()
