from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import functions_framework
import pytest
import responses

from imagegen.config import Settings, load_settings
from tests.fake_router import FakeRouter, make_png
from tests.fakes import FakeClock
from tests.servers import (
    REPO_ROOT,
    SHELL_SETTINGS,
    Process,
    left_running,
    start_function,
    start_storage_emulator,
)

TEST_TOKEN = "hf_TestTokenThatMustNeverLeak0123456789"
# Hugging Face's default model, and where a request for it goes with no provider named.
HF_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
HF_URL = f"https://router.huggingface.co/hf-inference/models/{HF_MODEL}"
# The local backend's libraries (requirements-local.txt); tests that run a model skip without them.
HAVE_DIFFUSERS = all(importlib.util.find_spec(name) is not None for name in ("torch", "diffusers", "transformers"))
# CI installs requirements-local.txt: there a missing library is a failure, never a skip.
SKIP_WITHOUT_DIFFUSERS = not HAVE_DIFFUSERS and os.environ.get("CI") != "true"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests start from no settings at all, whatever the developer's shell exports: every
    variable load_settings reads (and the server's own) is removed for the test. Processes a
    test starts get the same through servers.child_environment."""
    for name in SHELL_SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running() -> Iterator[None]:
    """At the end of the session, fail if any process (group) the tests started still runs,
    and stop it, so that no run leaves a server listening behind it."""
    yield
    left = left_running()
    assert not left, f"processes left running by the tests: {left}"


@pytest.fixture(autouse=True)
def no_local_model_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process, as on a deployment without requirements-local.txt: no key means no
    backend, even where torch and diffusers are installed (CI installs them). The local
    model's tests name LOCAL_MODEL or BACKENDS, or run their own function process."""
    monkeypatch.setattr("imagegen.backends.registry.local_model_installed", lambda: False)


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock for retries, backoff and deadlines: sleeping only moves it on."""
    return FakeClock()


@pytest.fixture
def mocked() -> Iterator[responses.RequestsMock]:
    """`responses` for this test, nothing registered; an unused registration is no failure."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def png_upstream(mocked: responses.RequestsMock) -> responses.RequestsMock:
    """Hugging Face's default model answers every request with a PNG (on `mocked`)."""
    mocked.post(HF_URL, body=make_png(), content_type="image/png")
    return mocked


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    server = FakeRouter(TEST_TOKEN).start()
    yield server
    server.stop()


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**env: str) -> Settings:
        base = {"HUGGING_FACE_API_KEY": TEST_TOKEN, "IMAGE_DIR": str(tmp_path / "images")}
        return load_settings({**base, **env})

    return make


@pytest.fixture
def make_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A test client for main.py exactly as functions-framework loads it, with these settings."""

    def make(**env: str):
        # Retry timing is tested with a fake clock (test_resilience); here retries would sleep.
        settings = {"HUGGING_FACE_API_KEY": TEST_TOKEN, "IMAGE_DIR": str(tmp_path / "images"), "MAX_RETRIES": "0", **env}
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        app = functions_framework.create_app(target="generate_image", source=str(REPO_ROOT / "main.py"))
        return app.test_client()

    return make


@pytest.fixture
def run_function(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    """Start the real function process (functions-framework) with these settings; `source`:
    another entry point than main.py (tests/*_main.py)."""
    started: list[Process] = []

    def run(source: str = "main.py", **env: str) -> Process:
        process = start_function(env, tmp_path / f"function-{len(started)}.log", source)
        started.append(process)
        return process

    yield run
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def storage_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    emulator = start_storage_emulator(tmp_path_factory.mktemp("gcs") / "emulator.log")
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random-weight Stable Diffusion folder (tests/tiny_pipeline.py), built once per
    session and shared by the backend tests and the end-to-end ones."""
    if SKIP_WITHOUT_DIFFUSERS:
        pytest.skip("torch/diffusers not installed: pip install -r requirements-local.txt")
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True  # in case huggingface_hub was imported first
    import torch

    # The tiny model gains nothing from a second thread, and on shared cores torch's threads
    # wait for each other at every operation: one thread made these tests several times faster
    # under load. Same bytes either way within the process, which is all the tests compare.
    torch.set_num_threads(1)
    from tests.tiny_pipeline import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd")))
