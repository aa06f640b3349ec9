"""Loading a pipeline: torch and diffusers imported only now, on the worker side; the device
and dtype chosen; every failure an error that names the setting to fix."""

from __future__ import annotations

import gc
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagegen.backends.local.defaults import known_defaults
from imagegen.backends.local.hub import (
    WRONG_MODEL_ERRORS,
    Weights,
    cached_snapshot,
    causes,
    choose_variant,
    first_line,
    folder_files,
    hub_offline,
    is_hub_id,
    not_cached_offline,
    probe_hub,
)
from imagegen.backends.local.options import LocalOptions
from imagegen.backends.local.schedulers import Schedulers
from imagegen.errors import ConfigurationError, ImageGenError, LocalModelUnavailable

logger = logging.getLogger(__name__)

REQUIREMENTS_FILE = "requirements-local.txt"


@dataclass
class Loaded:
    model: str
    pipeline: Any
    device: str
    dtype: str
    parameters: frozenset[str]  # what the pipeline's __call__ accepts
    schedulers: Schedulers | None = None  # the ones a request may name, built on first use


def load_pipeline(model: str, options: LocalOptions) -> Loaded:
    # Before importing torch (seconds): a typo in a path is told at once.
    is_folder = os.path.isdir(model)
    if not is_folder and not is_hub_id(model):
        raise ConfigurationError(
            f"LOCAL_MODEL names the folder {model!r}, which does not exist here (or is not a "
            "folder). Set LOCAL_MODEL to a Hugging Face model id or to a folder saved with "
            "save_pretrained.",
        )
    # Also before torch: a model that is neither cached nor reachable is told in seconds.
    prefer_fp16 = known_defaults(model).fp16_variant
    weights = _weights(model, is_folder, prefer_fp16)
    torch, auto_pipeline = _import_runtime()
    device = _device(torch, options.device)
    dtype_name = options.dtype if options.dtype != "auto" else ("float16" if device in ("cuda", "mps") else "float32")
    dtype = getattr(torch, dtype_name)
    try:
        try:
            pipeline = _from_pretrained(auto_pipeline, model, dtype, weights)
        except Exception as error:
            if weights.location != "cache" or is_out_of_memory(error) or hub_offline():
                raise
            # A cache that holds only part of the model (an interrupted download): fetch the rest.
            logger.warning("local model %s: the cached copy is incomplete (%s); fetching it", model, first_line(error))
            weights = Weights("hub", choose_variant(probe_hub(model), prefer_fp16), local_files_only=False)
            pipeline = _from_pretrained(auto_pipeline, model, dtype, weights)
        pipeline = pipeline.to(device)
    except ImageGenError:
        raise
    except Exception as error:
        raise _load_error(model, is_folder, device, error) from None
    pipeline.set_progress_bar_config(disable=True)
    parameters = frozenset(inspect.signature(pipeline.__call__).parameters)
    return Loaded(
        model=model,
        pipeline=pipeline,
        device=device,
        dtype=dtype_name,
        parameters=parameters,
        schedulers=Schedulers(pipeline),
    )


def _weights(model: str, is_folder: bool, prefer_fp16: bool) -> Weights:
    """Where the files come from, decided from the files themselves: the folder, else the
    cache (no network at all), else the Hub after one bounded probe."""
    if is_folder:
        return Weights("folder", choose_variant(folder_files(Path(model)), prefer_fp16), local_files_only=False)
    snapshot = cached_snapshot(model)
    if snapshot is not None:
        return Weights("cache", choose_variant(folder_files(snapshot), prefer_fp16), local_files_only=True)
    if hub_offline():
        raise not_cached_offline(model)
    weights = Weights("hub", choose_variant(probe_hub(model), prefer_fp16), local_files_only=False)
    logger.info(
        "local model %s: not in the Hugging Face cache; fetching its %s files from the Hub",
        model,
        weights.variant or "full",
    )
    return weights


def _from_pretrained(auto_pipeline: Any, model: str, dtype: Any, weights: Weights) -> Any:
    arguments: dict[str, Any] = {"dtype": dtype}
    if weights.variant is not None:
        arguments["variant"] = weights.variant
    if weights.local_files_only:
        arguments["local_files_only"] = True
    return auto_pipeline.from_pretrained(model, **arguments)


def source(model: str) -> str:
    """The model as the cache key names it: a folder as its absolute path, a Hub id as is."""
    return os.path.realpath(model) if os.path.isdir(model) or not is_hub_id(model) else model


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or any(name.endswith("OutOfMemoryError") for name in causes(error))


def free_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    chain = causes(error)
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
    if any(name in WRONG_MODEL_ERRORS for name in chain):
        return ConfigurationError(
            f"LOCAL_MODEL={model}: the Hugging Face Hub has no such model, or it is gated "
            f"(accept its licence and set HF_TOKEN). ({first_line(error)})",
        )
    if "LocalEntryNotFoundError" in chain:
        return LocalModelUnavailable(
            f"LOCAL_MODEL={model}: the Hugging Face cache holds only part of it and it could not be "
            f"fetched ({first_line(error)}). Download it once with network access, or set "
            "LOCAL_MODEL to a folder that holds it.",
            retryable=False,
            fail_over=True,
        )
    return LocalModelUnavailable(
        f"LOCAL_MODEL={model} failed to load: {type(error).__name__}: {first_line(error)}",
        retryable=False,
        fail_over=True,
    )
