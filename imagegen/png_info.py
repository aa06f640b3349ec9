"""The generation parameters inside the PNG, as AUTOMATIC1111's "PNG Info" tab reads them.

Text chunks are spliced in after IHDR: no decoding, no re-encoding (which costs hundreds of
milliseconds at 1024x1024), and the pixels stay byte-for-byte what the provider made.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pybase64

from imagegen.domain import GeneratedImage, GenerationRequest
from imagegen.imaging import IHDR_END, TruncatedPng, png_dimensions, walk_chunks


# Raw bytes per base64 piece of an answer (1 MiB of base64): a multiple of 3, so pieces join
# cleanly. Each piece is one send: in 64 KiB sends, pushing a 2.3 MB answer through loopback
# took 2.3 ms against 0.8 ms in one (the kernel wakes the reader once per send); added latency,
# paired, a median of -0.3 ms. Malloc takes pieces this size from its heap and reuses them
# (imagegen/malloc.py sets its mmap threshold to 32 MiB).
BASE64_PIECE = 3 * 256 * 1024


@dataclass(frozen=True)
class PngParts:
    """A PNG as a small head and a large body that is a view of the provider's bytes.

    Joining them would copy the image (and page-fault a fresh megabyte-sized buffer) once
    more per request; writers and the base64 encoder take the two parts as they are.
    """

    head: bytes
    body: memoryview

    @classmethod
    def of(cls, png: bytes) -> PngParts:
        return cls(b"", memoryview(png))

    def __iter__(self) -> Iterator[bytes | memoryview]:
        return iter((self.head, self.body))

    def __len__(self) -> int:
        return len(self.head) + len(self.body)

    def tobytes(self) -> bytes:
        return b"".join(self)

    def base64_pieces(self) -> Iterator[bytes]:
        """The PNG's base64 in pieces of at most BASE64_PIECE bytes' worth, made as they are
        sent: as one string, its base64 would be another copy of the image per answer in
        flight. The small head is topped up from the body to a multiple of 3 bytes, so only
        the very last piece can carry padding."""
        cut = -len(self.head) % 3
        yield pybase64.b64encode(self.head + self.body[:cut].tobytes())
        body = self.body[cut:]
        for start in range(0, len(body), BASE64_PIECE):
            yield pybase64.b64encode(body[start : start + BASE64_PIECE])


def png_text(png: bytes, keyword: str) -> str | None:
    """The value of a tEXt chunk before the image data (where embed_parameters puts them).

    Only ours are there: the check drops every text chunk an upstream image carried."""
    wanted = keyword.encode("latin-1") + b"\0"
    try:
        for chunk in walk_chunks(png):
            if chunk.kind == b"IDAT":
                return None
            if chunk.kind == b"tEXt":
                data = png[chunk.data_start : chunk.data_end]
                if data.startswith(wanted):
                    return bytes(data[len(wanted) :]).decode("latin-1")
    except TruncatedPng:
        return None
    return None


def png_size(png: bytes) -> tuple[int, int]:
    size = png_dimensions(png)
    if size is None:
        raise ValueError("not a PNG that starts with IHDR")
    return size


# Our sampler and sigma schedule names (GenerationRequest.scheduler, "<sampler>[_<schedule>]")
# as AUTOMATIC1111 writes them: its "Sampler" and "Schedule type".
A1111_SAMPLERS = {
    "euler_a": "Euler a",
    "euler": "Euler",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "heun": "Heun",
    "dpm2": "DPM2",
    "dpm2_a": "DPM2 a",
    "lms": "LMS",
    "ddim": "DDIM",
    "pndm": "PLMS",
    "unipc": "UniPC",
    "lcm": "LCM",
}
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "sgm_uniform": "SGM Uniform"}


def a1111_sampler(scheduler: str) -> tuple[str, str | None]:
    """AUTOMATIC1111's sampler and schedule type for one of our scheduler names; a name not
    listed as it is."""
    for schedule, label in A1111_SCHEDULES.items():
        sampler = scheduler.removesuffix("_" + schedule)
        if sampler != scheduler and sampler in A1111_SAMPLERS:
            return A1111_SAMPLERS[sampler], label
    return A1111_SAMPLERS.get(scheduler, scheduler), None


def a1111_parameters(generation: GenerationRequest, image: GeneratedImage, size: tuple[int, int]) -> str:
    """'prompt\\nNegative prompt: ...\\nSteps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7,
    Seed: 42, Size: 1024x1024, Model: ...' (the sampler only where the backend ran the one asked)."""
    lines = [generation.prompt]
    if generation.negative_prompt and "negativePrompt" not in image.ignored:
        lines.append(f"Negative prompt: {generation.negative_prompt}")
    fields: list[tuple[str, object]] = []
    if generation.steps is not None and "steps" not in image.ignored:
        fields.append(("Steps", generation.steps))
    if generation.scheduler is not None and "scheduler" not in image.ignored:
        sampler, schedule = a1111_sampler(generation.scheduler)
        fields.append(("Sampler", sampler))
        if schedule is not None:
            fields.append(("Schedule type", schedule))
    if generation.guidance_scale is not None and "guidanceScale" not in image.ignored:
        fields.append(("CFG scale", f"{generation.guidance_scale:g}"))
    if image.seed is not None:
        fields.append(("Seed", image.seed))
    fields += [("Size", f"{size[0]}x{size[1]}"), ("Model", image.route.model), ("Backend", image.route.backend)]
    if image.route.provider:
        fields.append(("Provider", image.route.provider))
    lines.append(", ".join(f"{key}: {value}" for key, value in fields))
    return "\n".join(lines)


def embed_parameters(image: GeneratedImage, generation: GenerationRequest) -> PngParts:
    """The PNG with its recipe in text chunks: A1111's "parameters", and "backend", "model",
    "provider", "seed" and "ignored", which a cached answer reads back to say what made it."""
    png = image.png
    text = {
        "parameters": a1111_parameters(generation, image, png_size(png)),
        "backend": image.route.backend,
        "model": image.route.model,
        **({"provider": image.route.provider} if image.route.provider else {}),
        **({"seed": str(image.seed)} if image.seed is not None else {}),
        # What the backend could not honour, so that a cached answer says it again.
        **({"ignored": ",".join(image.ignored)} if image.ignored else {}),
        "Software": "imagegen",
    }
    chunks = b"".join(_text_chunk(keyword, value) for keyword, value in text.items())
    return PngParts(bytes(png[:IHDR_END]) + chunks, memoryview(png)[IHDR_END:])


def _text_chunk(keyword: str, text: str) -> bytes:
    # tEXt holds Latin-1 only; anything else (most non-English prompts) goes in UTF-8 iTXt,
    # as AUTOMATIC1111 itself does.
    try:
        kind, data = b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    except UnicodeEncodeError:
        # keyword, NUL, compression flag 0, method 0, empty language tag, empty translation
        # backslashreplace: text UTF-8 cannot hold (a lone surrogate) must never cost the image
        # it describes, which was paid for by the time it is embedded.
        kind, data = b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8", "backslashreplace")
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
