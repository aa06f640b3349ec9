"""The local backend (imagegen.backends.local) against a real diffusers pipeline.

The pipeline is a tiny random-weight Stable Diffusion built offline once per session
(tests/tiny_pipeline.py), loaded through the backend's own `from_pretrained` code path and
run for real. Tests that need torch and diffusers are skipped where requirements-local.txt is
not installed; CI installs it. Waits between threads are Events with bounded timeouts, never
sleeps.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Before diffusers is imported: huggingface_hub reads it once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

from imagegen.backends.base import GenerationContext  # noqa: E402
from imagegen.backends.local import (  # noqa: E402
    LOAD_RETRY_SECONDS,
    LocalBackend,
    LocalModelUnavailable,
    LocalOptions,
    create,
    known_defaults,
    load_local_options,
    pipeline_arguments,
)
from imagegen.config import BackendSettings, load_settings  # noqa: E402
from imagegen.domain import GenerationRequest, Route  # noqa: E402
from imagegen.errors import BackendBusy, Cancelled, ConfigurationError, InvalidRequest, UpstreamTimeout  # noqa: E402
from imagegen.retry import Timing  # noqa: E402
from tests.conftest import SKIP_WITHOUT_DIFFUSERS  # noqa: E402
from tests.servers import REPO_ROOT  # noqa: E402

needs_diffusers = pytest.mark.skipif(
    SKIP_WITHOUT_DIFFUSERS, reason="torch/diffusers not installed: pip install -r requirements-local.txt"
)
WAIT = 60  # seconds any one wait may take before the test fails instead of hanging
# Small images keep the suite fast; the backend passes any size through to the pipeline.
SMALL = {"width": 64, "height": 64, "steps": 2}


def make_backend(model: str, timing: Timing | None = None, **options: str) -> LocalBackend:
    return LocalBackend(BackendSettings(name="local", model=model, options=options), load_local_options(options), timing)


class Events:
    """A progress sink that records events and can hold the generation at its first step."""

    def __init__(self, hold: bool = False) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.hold = hold
        self.holding = threading.Event()  # set when the generation is parked in a step
        self.release = threading.Event()
        self.queued = threading.Event()

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))
        if event == "queued":
            self.queued.set()
        if event == "progress" and self.hold and not self.holding.is_set():
            self.holding.set()
            assert self.release.wait(WAIT), "the test never released the generation"

    def steps(self) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event == "progress"]


def context(sink: Callable[..., None] | None = None, seconds: float = WAIT) -> GenerationContext:
    ctx = GenerationContext(deadline=time.monotonic() + seconds)
    if sink is not None:
        ctx.progress = sink
    return ctx


def generate(backend: LocalBackend, ctx: GenerationContext | None = None, **fields: Any):
    request = GenerationRequest(prompt=fields.pop("prompt", "a lighthouse at dusk"), **{**SMALL, **fields})
    return backend.generate(Route("local", backend.default_model), request, ctx or context())


class Background:
    """A generation in another thread; `result()` waits (bounded) for its image or error."""

    def __init__(self, backend: LocalBackend, ctx: GenerationContext, **fields: Any) -> None:
        self.outcome: Any = None
        self.thread = threading.Thread(target=self._run, args=(backend, ctx, fields), daemon=True)
        self.thread.start()

    def _run(self, backend: LocalBackend, ctx: GenerationContext, fields: dict[str, Any]) -> None:
        try:
            self.outcome = generate(backend, ctx, **fields)
        except BaseException as error:  # handed to the test thread
            self.outcome = error

    def result(self) -> Any:
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "the generation did not finish"
        return self.outcome


def png_size(png: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.size


# --- generation -----------------------------------------------------------------------------


@needs_diffusers
def test_png_of_the_requested_size(tiny_model: str) -> None:
    backend = make_backend(tiny_model)
    image = generate(backend, width=256, height=192, seed=7)
    assert image.png.startswith(b"\x89PNG\r\n\x1a\n")
    assert png_size(image.png) == (256, 192)
    assert image.route == Route("local", tiny_model)
    assert image.seed == 7
    assert set(image.timings_ms) == {"queued", "load", "model"}  # this request loaded the model
    assert set(generate(backend, seed=7).timings_ms) == {"queued", "model"}  # loaded once
    assert backend.loaded_model == tiny_model


@needs_diffusers
def test_same_seed_same_bytes_across_instances_and_different_seeds_differ(tiny_model: str) -> None:
    first = generate(make_backend(tiny_model), seed=1234).png
    again = generate(make_backend(tiny_model), seed=1234).png
    other = generate(make_backend(tiny_model), seed=1235).png
    assert hashlib.sha256(first).digest() == hashlib.sha256(again).digest()
    assert other != first


@needs_diffusers
def test_a_seed_is_drawn_and_reported_when_none_is_asked(tiny_model: str) -> None:
    backend = make_backend(tiny_model)
    image = generate(backend)
    assert isinstance(image.seed, int) and 0 <= image.seed < 2**32
    assert generate(backend, seed=image.seed).png == image.png


@needs_diffusers
def test_steps_guidance_and_negative_prompt_reach_the_pipeline(tiny_model: str) -> None:
    backend = make_backend(tiny_model)
    sink = Events()
    generate(backend, context(sink), steps=3, seed=1)
    assert [s["step"] for s in sink.steps()] == [1, 2, 3]
    assert sink.steps()[-1] == {"step": 3, "steps": 3, "fraction": 1.0}

    plain = generate(backend, seed=1, guidance_scale=5.0)
    assert generate(backend, seed=1, guidance_scale=5.0, prompt="another prompt").png != plain.png
    assert generate(backend, seed=1, guidance_scale=2.0).png != plain.png
    negative = generate(backend, seed=1, guidance_scale=5.0, negative_prompt="fog")
    assert negative.png != plain.png and negative.ignored == ()
    # Without classifier-free guidance a negative prompt changes nothing: the answer says so.
    unguided = generate(backend, seed=1, guidance_scale=0.0, negative_prompt="fog")
    assert unguided.ignored == ("negativePrompt",)
    assert unguided.png == generate(backend, seed=1, guidance_scale=0.0).png


# --- one at a time: the queue, cancelling, the deadline ----------------------------------------


@needs_diffusers
def test_queue_full_answers_busy_with_retry_after(tiny_model: str) -> None:
    backend = make_backend(tiny_model, LOCAL_QUEUE_MAX="1")
    generate(backend, seed=1)  # loaded, and one generation time known for the estimate
    first_sink, second_sink = Events(hold=True), Events()
    first = Background(backend, context(first_sink), seed=1)
    assert first_sink.holding.wait(WAIT)
    second = Background(backend, context(second_sink), seed=2)
    assert second_sink.queued.wait(WAIT)
    assert ("queued", {"position": 1}) in second_sink.events

    with pytest.raises(BackendBusy) as busy:
        generate(backend, seed=3)
    assert busy.value.status == 503 and busy.value.code == "backend_busy"
    assert int(busy.value.headers["Retry-After"]) >= 1
    assert "LOCAL_QUEUE_MAX=1" in busy.value.message
    assert busy.value.fail_over and not busy.value.retryable  # no hidden retry past the queue

    first_sink.release.set()
    assert first.result().seed == 1
    second_image = second.result()
    assert second_image.seed == 2 and second_image.timings_ms["queued"] > 0


@needs_diffusers
def test_cancel_mid_generation_frees_the_model_for_the_next_request(tiny_model: str) -> None:
    backend = make_backend(tiny_model)
    reference = generate(backend, seed=5).png
    first_sink = Events(hold=True)
    first_context = context(first_sink)
    first = Background(backend, first_context, seed=9, steps=50)
    assert first_sink.holding.wait(WAIT)
    second_sink = Events()
    second = Background(backend, context(second_sink), seed=5)
    assert second_sink.queued.wait(WAIT)

    first_context.cancelled.set()
    first_sink.release.set()
    assert isinstance(first.result(), Cancelled)
    assert len(first_sink.steps()) == 1  # stopped at the next step, not after 50
    # The next request gets the model, and the interrupted run left nothing behind in it.
    assert second.result().png == reference


@needs_diffusers
def test_deadline_passing_in_the_queue_is_a_timeout_naming_the_local_model(tiny_model: str) -> None:
    backend = make_backend(tiny_model)
    generate(backend, seed=1)
    holder_sink = Events(hold=True)
    holder = Background(backend, context(holder_sink), seed=1)
    assert holder_sink.holding.wait(WAIT)
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as timeout:
            generate(backend, context(seconds=0.3), seed=2)
        assert time.monotonic() - started < 5
        assert "waited for the local model" in timeout.value.message
        assert timeout.value.code == "upstream_timeout" and timeout.value.status == 504
    finally:
        holder_sink.release.set()
    assert holder.result().seed == 1
    assert generate(backend, seed=3).seed == 3  # the abandoned place in the queue is gone


@needs_diffusers
def test_deadline_passing_mid_generation_stops_it(tiny_model: str) -> None:
    backend = make_backend(tiny_model)
    generate(backend, seed=1)
    sink = Events(hold=True)
    ctx = context(sink, seconds=WAIT)
    running = Background(backend, ctx, seed=1, steps=50)
    assert sink.holding.wait(WAIT)
    ctx.deadline = time.monotonic() - 1
    sink.release.set()
    error = running.result()
    assert isinstance(error, UpstreamTimeout) and "local model" in error.message
    assert len(sink.steps()) == 1


@needs_diffusers
def test_cancelled_while_queued_leaves_the_queue(tiny_model: str) -> None:
    backend = make_backend(tiny_model)
    generate(backend, seed=1)
    holder_sink = Events(hold=True)
    holder = Background(backend, context(holder_sink), seed=1)
    assert holder_sink.holding.wait(WAIT)
    waiting_sink = Events()
    waiting_context = context(waiting_sink)
    waiting = Background(backend, waiting_context, seed=2)
    assert waiting_sink.queued.wait(WAIT)
    waiting_context.cancelled.set()
    assert isinstance(waiting.result(), Cancelled)
    holder_sink.release.set()
    assert holder.result().seed == 1


# --- loading errors -------------------------------------------------------------------------


def test_missing_model_folder_names_local_model(tmp_path: Path) -> None:
    backend = make_backend(str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigurationError) as error:
        generate(backend)
    assert error.value.status == 500
    assert "LOCAL_MODEL" in error.value.message and "no-such-model" in error.value.message


@needs_diffusers
def test_a_failed_load_is_retried_by_a_later_request(tiny_model: str, tmp_path: Path) -> None:
    now = [1000.0]
    folder = tmp_path / "arrives-later"
    backend = make_backend(str(folder), Timing(clock=lambda: now[0]))
    with pytest.raises(ConfigurationError):
        generate(backend)
    shutil.copytree(tiny_model, folder)
    with pytest.raises(ConfigurationError):  # within LOAD_RETRY_SECONDS: the same answer, no new try
        generate(backend)
    now[0] += LOAD_RETRY_SECONDS + 1
    assert generate(backend, seed=1).seed == 1


@needs_diffusers
def test_a_folder_that_is_not_a_pipeline_names_local_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as error:
        generate(make_backend(str(tmp_path)))
    assert "LOCAL_MODEL" in error.value.message and "not a diffusers" in error.value.message


@needs_diffusers
def test_a_hub_model_not_in_the_cache_offline_is_503_with_failover(tiny_model: str) -> None:
    with pytest.raises(LocalModelUnavailable) as error:
        generate(make_backend("imagegen-tests/not-in-any-cache"))
    assert error.value.status == 503 and error.value.fail_over
    assert "LOCAL_MODEL=imagegen-tests/not-in-any-cache" in error.value.message
    assert "cache" in error.value.message


def test_without_torch_or_diffusers_the_error_names_requirements_local(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `from diffusers import ...` fail
    with pytest.raises(ConfigurationError) as error:
        generate(make_backend(str(tmp_path)))
    assert "requirements-local.txt" in error.value.message and error.value.status == 500


@needs_diffusers
def test_preload_loads_before_the_first_request(tiny_model: str) -> None:
    backend = make_backend(tiny_model, LOCAL_PRELOAD="true")
    assert backend.options.preload and backend.loaded_model is None
    backend.start_preload().join(WAIT)
    assert backend.loaded_model == tiny_model
    assert "load" not in generate(backend, seed=1).timings_ms


def test_importing_the_module_imports_nothing_heavy() -> None:
    code = (
        "import sys, imagegen.backends.local as m; from imagegen.config import load_settings;"
        "s = load_settings({'BACKENDS': 'local'}); m.create(s, s.backend_settings['local'], None);"
        "heavy = [n for n in ('torch', 'diffusers', 'transformers', 'numpy') if n in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stdout + result.stderr


# --- settings and the seam ------------------------------------------------------------------


def test_options_are_checked_and_name_the_variable() -> None:
    assert load_local_options({}) == LocalOptions(device="auto", dtype="auto", preload=False, queue_max=8)
    assert load_local_options(
        {"LOCAL_DEVICE": "CPU", "LOCAL_DTYPE": "bfloat16", "LOCAL_PRELOAD": "true", "LOCAL_QUEUE_MAX": "0"}
    ) == LocalOptions(device="cpu", dtype="bfloat16", preload=True, queue_max=0)
    for name, value in [
        ("LOCAL_DEVICE", "tpu"),
        ("LOCAL_DTYPE", "int8"),
        ("LOCAL_PRELOAD", "maybe"),
        ("LOCAL_QUEUE_MAX", "-1"),
        ("LOCAL_QUEUE_MAX", "many"),
    ]:
        with pytest.raises(ConfigurationError) as error:
            load_local_options({name: value})
        assert name in error.value.message


def test_routes_identity_and_allowed_models(tmp_path: Path) -> None:
    settings = load_settings({"BACKENDS": "local", "LOCAL_ALLOWED_MODELS": "stabilityai/sdxl-turbo"})
    backend = create(settings, settings.backend_settings["local"], None)
    assert backend.name == "local" and backend.default_model == "stabilityai/sd-turbo"
    assert backend.allowed_models == ("stabilityai/sd-turbo", "stabilityai/sdxl-turbo")
    assert backend.identity() == "local:stabilityai/sd-turbo"
    request = GenerationRequest(prompt="x")
    assert backend.routes(request, "stabilityai/sd-turbo", context()) == [Route("local", "stabilityai/sd-turbo")]
    assert backend.capabilities("stabilityai/sd-turbo").seed
    with pytest.raises(InvalidRequest) as error:
        backend.generate(Route("local", "/etc"), request, context())
    assert error.value.field == "model"

    folder = make_backend(str(tmp_path), LOCAL_DEVICE="cpu", LOCAL_DTYPE="float32")
    assert folder.identity() == f"local:{os.path.realpath(tmp_path)};device=cpu;dtype=float32"


def test_turbo_models_get_their_own_defaults() -> None:
    turbo = known_defaults("stabilityai/sd-turbo")
    assert (turbo.steps, turbo.guidance_scale, turbo.width, turbo.height) == (1, 0.0, 512, 512)
    assert known_defaults("/models/sd-turbo") == turbo
    assert known_defaults("/hf/hub/models--stabilityai--sd-turbo/snapshots/abc") == turbo
    assert known_defaults("someone/other-model").steps is None

    accepts = frozenset({"prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "width", "height"})
    arguments, ignored = pipeline_arguments(GenerationRequest(prompt="p", steps=4), turbo, accepts)
    assert arguments == {"prompt": "p", "num_inference_steps": 4, "guidance_scale": 0.0, "width": 512, "height": 512}
    # A pipeline without a negative prompt (FLUX, say): the field is reported as ignored.
    arguments, ignored = pipeline_arguments(
        GenerationRequest(prompt="p", negative_prompt="n"), known_defaults("x/y"), accepts - {"negative_prompt"}
    )
    assert arguments == {"prompt": "p"} and ignored == ("negativePrompt",)


@needs_diffusers
def test_a_folder_named_for_a_turbo_model_gets_its_defaults(tiny_model: str, tmp_path: Path) -> None:
    # No fp16 files in this folder: the fp16 try falls through to the full ones.
    folder = tmp_path / "sd-turbo"
    shutil.copytree(tiny_model, folder)
    backend = make_backend(str(folder))
    sink = Events()
    request = GenerationRequest(prompt="a lighthouse", seed=3)
    image = backend.generate(Route("local", str(folder)), request, context(sink))
    assert png_size(image.png) == (512, 512)
    assert [s["steps"] for s in sink.steps()] == [1]  # one step, as sd-turbo runs


PROBE = '''
import os, sys, time
sys.path.insert(0, os.environ["IMAGEGEN_ROOT"])
import functions_framework
from imagegen.backends.base import GenerationContext
from imagegen.backends.local import create
from imagegen.config import load_settings
from imagegen.domain import GenerationRequest, Route

IMPORTED_IN = os.getpid()
settings = load_settings({"BACKENDS": "local", "LOCAL_MODEL": os.environ["LOCAL_MODEL"], "LOCAL_PRELOAD": "true"})
backend = create(settings, settings.backend_settings["local"], None)  # registers the preload after the fork
TORCH_AT_IMPORT = "torch" in sys.modules


@functions_framework.http
def probe(request):
    if request.method != "GET":
        return ""
    deadline = time.monotonic() + 60
    while backend.loaded_model is None and time.monotonic() < deadline:
        time.sleep(0.05)
    loaded = backend.loaded_model
    request = GenerationRequest(prompt="x", width=64, height=64, steps=1, seed=1)
    image = backend.generate(Route("local", backend.default_model), request, GenerationContext(deadline=time.monotonic() + 60))
    return {"pid": os.getpid(), "imported_in": IMPORTED_IN, "torch_at_import": TORCH_AT_IMPORT,
            "loaded_before_request": loaded, "timings": image.timings_ms, "png": len(image.png)}
'''


@needs_diffusers
def test_preload_after_fork_loads_in_the_functions_framework_worker(tiny_model: str, tmp_path: Path) -> None:
    """gunicorn imports the source in its parent and forks the worker: the model must load in
    the worker (after the fork), and the lock made in the parent must be free there."""
    import socket

    import requests

    from tests.servers import BIN_DIR, Process, free_port, wait_until

    source = tmp_path / "probe.py"
    source.write_text(PROBE, encoding="utf-8")
    port = free_port()
    env = {**os.environ, "IMAGEGEN_ROOT": str(REPO_ROOT), "LOCAL_MODEL": tiny_model, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(BIN_DIR / "functions-framework"), "--target=probe", f"--source={source}", "--host=127.0.0.1", f"--port={port}"]
    log_path = tmp_path / "probe.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = Process(process, f"http://127.0.0.1:{port}", log_path)

    def listening() -> bool:
        # Not an HTTP probe with a short timeout (as start_process does): the worker is busy
        # importing torch for the preload and may take seconds to answer its first request.
        if process.poll() is not None:
            raise RuntimeError(server.log())
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, WAIT, "functions-framework to listen")
        answer = requests.get(server.url + "/", timeout=WAIT * 2)
        assert answer.status_code == 200, server.log()
        body = answer.json()
    finally:
        server.stop()
    assert body["pid"] != body["imported_in"]  # the worker is a forked child
    assert body["torch_at_import"] is False
    assert body["loaded_before_request"] == tiny_model
    assert "load" not in body["timings"] and body["png"] > 0
