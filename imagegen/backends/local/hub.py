"""Where a model's weights come from: a folder, the Hugging Face cache, or the Hub.

The cache is looked at first, without the network: a cached model loads with
`local_files_only=True`, so a start with no network (or a slow Hub) costs nothing. Only a model
that is not cached is fetched, after one bounded probe of the Hub (`model_info`, at most
HUB_PROBE_SECONDS): with no network that probe fails at once or times out, and the request gets
its 503 in seconds, where diffusers' own downloads retried for about 25 s, twice (fp16 files,
then the full ones). The probe's file list also says whether fp16 files exist, so a network
failure is never mistaken for "no fp16 files".

huggingface_hub is imported inside the functions here: it comes with diffusers
(requirements-local.txt), and only a local deployment needs it.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from imagegen.errors import ConfigurationError, ImageGenError, LocalModelUnavailable

# A Hub id ("owner/name"); anything else that is not an existing folder is taken for a missing
# folder, so a typo in a path is reported as such and never sent to the Hub.
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
# The whole probe, from the name lookup to the last byte of the file list: the Hub answers it
# in well under a second; a missing network fails it at once (DNS) or by this timeout.
HUB_PROBE_SECONDS = 5.0
# The Hub's error classes, by name, that say the model id itself is wrong (not the network).
WRONG_MODEL_ERRORS = ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError")
_WEIGHTS = (".safetensors", ".bin")


@dataclass(frozen=True)
class Weights:
    """How to call `from_pretrained` for a model: where from, and which files."""

    location: str  # "folder", "cache" or "hub"
    variant: str | None  # "fp16", or None for the full files
    local_files_only: bool


def is_hub_id(model: str) -> bool:
    return HUB_ID_PATTERN.fullmatch(model) is not None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub read it at import."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def cached_snapshot(model: str) -> Path | None:
    """The cached snapshot folder of a Hub id (its `main` revision), if the cache has one."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model, "model_index.json")
    return Path(found).parent if isinstance(found, str) else None


def choose_variant(files: list[str], prefer_fp16: bool) -> str | None:
    """"fp16" when there are fp16 weight files and either the model prefers them (half the
    download, and they load as float32 on a CPU just as well) or there are no full ones."""
    weights = [name for name in files if name.endswith(_WEIGHTS)]
    fp16 = any(".fp16." in Path(name).name for name in weights)
    full = any(".fp16." not in Path(name).name for name in weights)
    return "fp16" if fp16 and (prefer_fp16 or not full) else None


def folder_files(folder: Path) -> list[str]:
    """The files of a saved pipeline (its components are one folder deep)."""
    return [str(path.relative_to(folder)) for path in folder.glob("*/*") if path.is_file()]


def probe_hub(model: str, timeout: float = HUB_PROBE_SECONDS) -> list[str]:
    """The model's file names from the Hub, in one attempt bounded by `timeout` as a whole (a
    thread, since the HTTP client's timeout restarts with every byte). Raises
    ConfigurationError for a wrong or gated id, LocalModelUnavailable when the Hub cannot be
    reached."""
    outcome: dict[str, object] = {}
    done = threading.Event()

    def ask() -> None:
        try:
            from huggingface_hub import HfApi

            info = HfApi().model_info(model, timeout=timeout)
            outcome["files"] = [sibling.rfilename for sibling in info.siblings or ()]
        except Exception as error:  # handed to the caller
            outcome["error"] = error
        finally:
            done.set()

    threading.Thread(target=ask, name="imagegen-hub-probe", daemon=True).start()
    if not done.wait(timeout + 0.5):
        raise _unreachable(model, f"no answer within {timeout:g} s")
    error = outcome.get("error")
    if error is None:
        return outcome["files"]  # type: ignore[return-value]
    assert isinstance(error, Exception)
    if any(name in WRONG_MODEL_ERRORS for name in causes(error)):
        raise ConfigurationError(
            f"LOCAL_MODEL={model}: the Hugging Face Hub has no such model, or it is gated "
            f"(accept its licence and set HF_TOKEN). ({first_line(error)})",
        )
    raise _unreachable(model, f"{type(error).__name__}: {first_line(error)}")


def not_cached_offline(model: str) -> ImageGenError:
    return LocalModelUnavailable(
        f"LOCAL_MODEL={model} is not in the Hugging Face cache ({hub_cache()}) and HF_HUB_OFFLINE "
        "is set, so it is not fetched. Download it once with network access, unset "
        "HF_HUB_OFFLINE, or set LOCAL_MODEL to a folder that holds it.",
        retryable=False,
        fail_over=True,
    )


def startup_line(model: str) -> tuple[bool, str]:
    """What will happen to LOCAL_MODEL, for the line logged at start, found without the network
    and without torch; and whether it is a problem (logged as a warning)."""
    if os.path.isdir(model):
        return False, f"local model: LOCAL_MODEL={model}, a folder; it loads on first use."
    if not is_hub_id(model):
        return True, (
            f"local model: LOCAL_MODEL={model} is not a folder here, nor a Hugging Face model id: "
            "requests will answer 500 (invalid_configuration) until the folder exists."
        )
    try:
        snapshot = cached_snapshot(model)
        offline = hub_offline()
        cache = hub_cache()
    except ImportError:
        return True, f"local model: LOCAL_MODEL={model}, but huggingface_hub is not installed (requirements-local.txt)."
    if snapshot is not None:
        return False, f"local model: LOCAL_MODEL={model}, found in the Hugging Face cache ({snapshot}); it loads on first use."
    if offline:
        return True, (
            f"local model: LOCAL_MODEL={model} is not in the Hugging Face cache ({cache}) and "
            "HF_HUB_OFFLINE is set: requests will answer 503 (local_model_unavailable) until it is there."
        )
    return False, (
        f"local model: LOCAL_MODEL={model} is not in the Hugging Face cache ({cache}): the first load "
        "fetches it from the Hub if the Hub can be reached (sd-turbo: ~2.6 GB), else answers 503."
    )


def causes(error: BaseException) -> list[str]:
    """The class names of an error and of what caused it."""
    names, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        names.append(type(current).__name__)
        current = current.__cause__ or current.__context__
    return names


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def _unreachable(model: str, what: str) -> ImageGenError:
    return LocalModelUnavailable(
        f"LOCAL_MODEL={model} is not in the Hugging Face cache ({hub_cache()}) and the Hub could "
        f"not be reached to fetch it ({what}). Download it once with network access, or set "
        "LOCAL_MODEL to a folder that holds it.",
        retryable=False,
        fail_over=True,
    )
