"""Loading a pipeline: torch and diffusers imported only now, on the worker side; the device
and dtype chosen; every failure an error that names the setting to fix."""

from __future__ import annotations

import gc
import inspect
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from imagegen.backends.local.defaults import known_defaults
from imagegen.backends.local.options import LocalOptions
from imagegen.errors import ConfigurationError, ImageGenError, LocalModelUnavailable

logger = logging.getLogger(__name__)

REQUIREMENTS_FILE = "requirements-local.txt"
# A Hub id ("owner/name"); anything else that is not an existing folder is taken for a missing
# folder, so a typo in a path is reported as such and never sent to the Hub.
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# The Hub's error classes, by name, that say the model id itself is wrong (not the network).
_WRONG_MODEL_ERRORS = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError", "EntryNotFoundError")


@dataclass
class Loaded:
    model: str
    pipeline: Any
    device: str
    dtype: str
    parameters: frozenset[str]  # what the pipeline's __call__ accepts


def load_pipeline(model: str, options: LocalOptions) -> Loaded:
    # Before importing torch (seconds): a typo in a path is told at once.
    is_folder = os.path.isdir(model)
    if not is_folder and not HUB_ID_PATTERN.fullmatch(model):
        raise ConfigurationError(
            f"LOCAL_MODEL names the folder {model!r}, which does not exist here (or is not a "
            "folder). Set LOCAL_MODEL to a Hugging Face model id or to a folder saved with "
            "save_pretrained.",
        )
    torch, auto_pipeline = _import_runtime()
    device = _device(torch, options.device)
    dtype_name = options.dtype if options.dtype != "auto" else ("float16" if device in ("cuda", "mps") else "float32")
    dtype = getattr(torch, dtype_name)
    try:
        pipeline = None
        if known_defaults(model).fp16_variant:
            # The fp16 files are half the download (sd-turbo: 2.6 GB, not 5.2) and load as fp32
            # on a CPU just as well; a folder may hold only them. A cache or a folder that holds
            # only the full files falls through.
            try:
                pipeline = auto_pipeline.from_pretrained(model, dtype=dtype, variant="fp16")
            except Exception as error:
                if is_out_of_memory(error):
                    raise
                logger.info("local model %s: no fp16 files (%s); loading the full ones", model, first_line(error))
        if pipeline is None:
            pipeline = auto_pipeline.from_pretrained(model, dtype=dtype)
        pipeline = pipeline.to(device)
    except Exception as error:
        raise _load_error(model, is_folder, device, error) from None
    pipeline.set_progress_bar_config(disable=True)
    parameters = frozenset(inspect.signature(pipeline.__call__).parameters)
    return Loaded(model=model, pipeline=pipeline, device=device, dtype=dtype_name, parameters=parameters)


def source(model: str) -> str:
    """The model as the cache key names it: a folder as its absolute path, a Hub id as is."""
    return os.path.realpath(model) if os.path.isdir(model) or not HUB_ID_PATTERN.fullmatch(model) else model


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(name.endswith("OutOfMemoryError") for name in _causes(error))


def free_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _import_runtime() -> tuple[Any, Any]:
    try:
        import torch
        from diffusers import AutoPipelineForText2Image
    except ImportError as error:
        raise ConfigurationError(
            f"The local backend needs torch and diffusers, which are not installed ({error}). "
            f"Install {REQUIREMENTS_FILE} (pip install -r {REQUIREMENTS_FILE}), or configure an "
            "API backend instead.",
        ) from None
    return torch, AutoPipelineForText2Image


def _device(torch: Any, wanted: str) -> str:
    # Only here, on the worker side: torch.cuda.is_available() initialises CUDA.
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if wanted == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (wanted == "cuda" and not cuda) or (wanted == "mps" and not mps):
        build = f"torch {torch.__version__}" + (f" for CUDA {torch.version.cuda}" if torch.version.cuda else ", a CPU build")
        raise ConfigurationError(
            f"LOCAL_DEVICE={wanted}, but {build} sees no such device here. Set LOCAL_DEVICE=auto "
            "or cpu, or install the torch build that matches this machine's driver.",
        )
    return wanted


def _load_error(model: str, is_folder: bool, device: str, error: Exception) -> ImageGenError:
    chain = _causes(error)
    if is_out_of_memory(error):
        free_memory()
        return LocalModelUnavailable(
            f"LOCAL_MODEL {model} does not fit in memory on {device}; it will be tried again on a "
            "later request. Use a smaller model, LOCAL_DTYPE=float16, or a bigger machine.",
            retryable=False,
            fail_over=True,
        )
    if is_folder:
        return ConfigurationError(
            f"LOCAL_MODEL={model} is a folder but not a diffusers text-to-image pipeline "
            f"({type(error).__name__}: {first_line(error)}).",
        )
    if any(name in _WRONG_MODEL_ERRORS for name in chain):
        return ConfigurationError(
            f"LOCAL_MODEL={model}: the Hugging Face Hub has no such model, or it is gated "
            f"(accept its licence and set HF_TOKEN). ({first_line(error)})",
        )
    if "LocalEntryNotFoundError" in chain:
        return LocalModelUnavailable(
            f"LOCAL_MODEL={model} is not in the Hugging Face cache (HF_HOME) and could not be "
            "downloaded (no network, or HF_HUB_OFFLINE is set). Download it once with network "
            "access, or set LOCAL_MODEL to a folder that holds it.",
            retryable=False,
            fail_over=True,
        )
    return LocalModelUnavailable(
        f"LOCAL_MODEL={model} failed to load: {type(error).__name__}: {first_line(error)}",
        retryable=False,
        fail_over=True,
    )


def _causes(error: BaseException) -> list[str]:
    names, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    return names
