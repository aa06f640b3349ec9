"""The `local` backend: a diffusers pipeline running in this process, no account needed.

`LOCAL_MODEL` is a Hugging Face model id (weights from the Hub cache, `HF_HOME`, downloaded on
first use when there is a network) or a folder made by `save_pretrained` / `snapshot_download`.
Nothing heavy is imported with this package: torch and diffusers are imported when the pipeline
first loads, on the first request or in `preload()`. They come from requirements-local.txt.

One module per job:
- options.py     LOCAL_DEVICE, LOCAL_DTYPE, LOCAL_PRELOAD, LOCAL_QUEUE_MAX, checked once in create()
- defaults.py    per-model defaults for fields a request leaves out (turbo models: 1 step)
- queue.py       one generation at a time, the others in a bounded FIFO (a diffusers pipeline is
                 not thread-safe)
- pipeline.py    a request as the pipeline's arguments, the call, the PNG
- hub.py         where the weights come from: a folder, the Hugging Face cache first, else the
                 Hub after one bounded probe; the start-up line saying which
- loading.py     torch and diffusers imported, device and dtype chosen, load errors named
- early_stop.py  stopping in the queue or between steps when the caller leaves or time is up
- backend.py     LocalBackend: the Backend protocol over the above

functions-framework imports main.py in gunicorn's parent process and then forks the worker. A
thread started or CUDA initialised before the fork does not survive it, so nothing here touches
torch at construction: the model loads on the worker side, lazily or through
`preload_after_fork()`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from imagegen.backends.local.backend import LOAD_RETRY_SECONDS, NAME, LocalBackend
from imagegen.backends.local.defaults import DEFAULT_LOCAL_MODEL, ModelDefaults, known_defaults
from imagegen.backends.local.hub import startup_line
from imagegen.backends.local.options import LocalOptions, load_local_options
from imagegen.backends.local.pipeline import encode_png, pipeline_arguments
from imagegen.config import BackendSettings, Settings
from imagegen.errors import LocalModelUnavailable

if TYPE_CHECKING:
    import requests

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LOCAL_MODEL",
    "LOAD_RETRY_SECONDS",
    "NAME",
    "LocalBackend",
    "LocalModelUnavailable",
    "LocalOptions",
    "ModelDefaults",
    "create",
    "encode_png",
    "known_defaults",
    "load_local_options",
    "pipeline_arguments",
]


def create(settings: Settings, section: BackendSettings, session: requests.Session | None) -> LocalBackend:
    """The registry's constructor, as every backend's. The local model needs only its section
    (no HTTP session: it sends nothing to a vendor). The LOCAL_* options are checked here, once.
    Called once per process, in gunicorn's parent: with LOCAL_PRELOAD=true the load is
    registered to start in each forked worker, never here."""
    backend = LocalBackend(section, load_local_options(section.options))
    problem, line = startup_line(backend.default_model)
    logger.log(logging.WARNING if problem else logging.INFO, line)
    if backend.options.preload:
        backend.preload_after_fork()
    return backend
