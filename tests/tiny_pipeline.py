"""A tiny random-weight Stable Diffusion pipeline, built offline and saved to a folder.

The way diffusers' own fast tests build theirs (`get_dummy_components`), so the local backend's
real loading and generation code runs in tests without any download: a small UNet, a 4-level
VAE (the usual factor of 8, so 256x256 makes 32x32 latents and takes ~0.1 s on a CPU), a tiny
CLIP text encoder, and a CLIP tokenizer whose vocabulary is written here. The weights come
from a fixed torch seed, so every build makes the same pipeline. About 8 MB on disk.

Run as a script to build one: `python -m tests.tiny_pipeline FOLDER`.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

WEIGHTS_SEED = 0
# The tokenizer's length (CLIP's). transformers 5 saves ~1e30 when it is not given, and
# padding to that length then fails.
MODEL_MAX_LENGTH = 77


def _byte_vocabulary() -> dict[str, int]:
    """A byte-level BPE vocabulary with no merges: every byte is a token, as in GPT-2's table,
    plus CLIP's end-of-word forms and its two special tokens. Enough to tokenize any prompt."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return {token: index for index, token in enumerate(tokens)}


def build_tiny_pipeline(folder: Path) -> Path:
    """Build the pipeline and `save_pretrained` it to `folder`; returns the folder."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = _byte_vocabulary()
    with tempfile.TemporaryDirectory() as source:
        # Read back through from_pretrained, the path a real vocabulary takes (transformers 5's
        # CLIPTokenizer(vocab_file=...) silently ignores the file).
        Path(source, "vocab.json").write_text(json.dumps(vocabulary), encoding="utf-8")
        Path(source, "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(source, model_max_length=MODEL_MAX_LENGTH)
    assert len(tokenizer.tokenize("a cat")) > 1, "the tokenizer lost its vocabulary"

    torch.manual_seed(WEIGHTS_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    torch.manual_seed(WEIGHTS_SEED)
    # Four levels: the VAE scales by 8 like a real one, so a 256-pixel image is 32 latents wide.
    vae = AutoencoderKL(
        block_out_channels=[8, 16, 32, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        norm_num_groups=8,
    )
    torch.manual_seed(WEIGHTS_SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocabulary["<|startoftext|>"],
            eos_token_id=vocabulary["<|endoftext|>"],
            pad_token_id=vocabulary["<|endoftext|>"],
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(vocabulary),
            max_position_embeddings=MODEL_MAX_LENGTH,
        )
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    print(build_tiny_pipeline(Path(sys.argv[1])))
