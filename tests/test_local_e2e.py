"""The local backend end to end: the real function under functions-framework (gunicorn's parent
process imports main.py, a forked worker serves), no API key, a tiny random-weight pipeline on
disk (tests/tiny_pipeline.py), no network (HF_HUB_OFFLINE=1, an empty HF_HOME).

tests/test_local_backend.py drives the backend object itself; this file proves what only the
running function shows: the answer, the PNG's text chunks, the log line, the queue and cancel
across HTTP connections, failover in both directions, and the preload after the fork. Every
wait is bounded; where the test needs the model busy it reads the streamed `progress` event
that says so, never a sleep.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from imagegen.backends.registry import BACKENDS
from imagegen.png_info import png_text
from tests.conftest import HAVE_DIFFUSERS, SKIP_WITHOUT_DIFFUSERS, TEST_TOKEN
from tests.contract import validate_body
from tests.servers import REPO_ROOT, Process, start_function, wait_until

needs_diffusers = pytest.mark.skipif(
    SKIP_WITHOUT_DIFFUSERS, reason="torch/diffusers not installed: pip install -r requirements-local.txt"
)
WAIT = 60  # seconds any one wait may take before the test fails instead of hanging
SMALL = {"width": 256, "height": 256, "steps": 2}  # ~0.1-0.3 s on these CPUs
# A generation that cannot end while a test works around it: 128x128 latents, 100 steps, each
# step a large part of a second on one CPU thread (tens of seconds in all).
SLOW = {"width": 512, "height": 512, "steps": 100}
LIBTORCH = "libtorch_cpu.so"


def local_env(folder: Path, model: str, **env: str) -> dict[str, str]:
    """Settings for a function whose only way to an image is LOCAL_MODEL: every backend's key
    emptied (a developer's shell may export one), no network for the Hub, the CPU, one torch
    thread (the tiny model gains nothing from more, and shared cores make them wait), no rate
    limit."""
    no_keys = {
        variable: ""
        for spec in BACKENDS.values()
        for variable in (*spec.key_variables, *((spec.enabled_by,) if spec.enabled_by else ()))
    }
    return {
        **no_keys,
        "LOCAL_MODEL": model,
        "LOCAL_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(folder / "hf-home"),
        "OMP_NUM_THREADS": "1",
        "IMAGE_DIR": str(folder / "images"),
        "LOG_FORMAT": "json",
        "RATE_LIMIT_PER_MINUTE": "0",  # these tests send more than the default 10 a minute
        **env,
    }


def post(function: Process, body: dict, timeout: float = WAIT) -> requests.Response:
    return requests.post(f"{function.url}/api/generate-image", json=body, timeout=timeout)


def png_of(answer: dict) -> bytes:
    return base64.b64decode(answer["imageUrl"].removeprefix("data:image/png;base64,"), validate=True)


def pixels(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.tobytes()


def log_entry(function: Process, request_id: str) -> dict | None:
    """The request's JSON log line, once it is written."""
    for line in function.log().splitlines():
        if line.startswith("{") and request_id in line:
            entry = json.loads(line)
            if entry.get("requestId") == request_id and "httpRequest" in entry:
                return entry
    return None


def wait_for_log_entry(function: Process, request_id: str) -> dict:
    wait_until(lambda: log_entry(function, request_id) is not None, WAIT, f"the log line of request {request_id}")
    entry = log_entry(function, request_id)
    assert entry is not None
    return entry


def attempts(entry: dict) -> list[tuple[str, str | None]]:
    return [(attempt["backend"], attempt["code"]) for attempt in entry["imagegen"].get("attempts", [])]


def worker_pids(function: Process) -> list[int]:
    """gunicorn's workers: the processes forked from the functions-framework process."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == function.process.pid:
                    children.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return children


def has_torch_mapped(pid: int) -> bool:
    """Whether torch's shared library is in the process's memory: importing torch maps it."""
    return LIBTORCH in Path(f"/proc/{pid}/maps").read_text()


class EventStream:
    """A streamed generation (`Accept: text/event-stream`) read event by event; http.client
    undoes the chunked framing. `close()` is the caller going away: the socket closes, and the
    function's next write to it fails."""

    def __init__(self, function: Process, body: dict) -> None:
        host, port = function.url.removeprefix("http://").split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=WAIT)
        self.connection.request(
            "POST",
            "/api/generate-image",
            json.dumps(body),
            {"Accept": "text/event-stream", "Content-Type": "application/json"},
        )
        self.response = self.connection.getresponse()
        assert self.response.status == 200, self.response.read()[:500]
        self.seen: list[tuple[str, dict]] = []

    def next(self) -> tuple[str, dict]:
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                raise AssertionError(f"the stream ended after {self.seen}")
            text = line.decode().rstrip("\n")
            if not text:
                if fields:
                    event = (fields["event"], json.loads(fields["data"]))
                    self.seen.append(event)
                    return event
            elif not text.startswith(":"):  # a keep-alive comment
                name, value = text.split(": ", 1)
                fields[name] = value

    def until(self, wanted: str) -> dict:
        while True:
            name, data = self.next()
            if name == wanted:
                return data
            assert name not in ("result", "error") or wanted in ("result", "error"), (name, data)

    def close(self) -> None:
        self.response.close()
        self.connection.close()


@pytest.fixture(scope="module")
def local_function(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """No key, no BACKENDS: the local model is the default. No cache, so every seeded request
    is generated again; a queue of one, so a third request is refused."""
    folder = tmp_path_factory.mktemp("local-e2e")
    function = start_function(local_env(folder, tiny_model, CACHE="false", LOCAL_QUEUE_MAX="1"), folder / "function.log")
    yield function
    function.stop()


# --- an image with no account at all ----------------------------------------------------------


@needs_diffusers
def test_without_any_key_the_local_model_answers_with_a_png_that_carries_its_recipe(local_function: Process, tiny_model: str) -> None:
    from PIL import Image

    answer = post(local_function, {"prompt": "a lighthouse at dusk", "width": 384, "height": 256, "steps": 2, "seed": 1234})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    validate_body(answer.content, "GenerationSuccess")
    assert (body["backend"], body["model"], body["provider"], body["seed"]) == ("local", tiny_model, None, 1234)
    assert (body["width"], body["height"], body["cached"], body["ignored"]) == (384, 256, False, [])
    png = png_of(body)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (384, 256)
    parameters = png_text(png, "parameters")
    assert parameters is not None and "Seed: 1234" in parameters and "Size: 384x256" in parameters and "Steps: 2" in parameters
    assert (png_text(png, "backend"), png_text(png, "model"), png_text(png, "seed")) == ("local", tiny_model, "1234")
    assert Path(body["filePath"]).read_bytes() == png
    # How long it waited for the model and how long the model ran, in the answer and the log.
    timing = answer.headers["Server-Timing"]
    assert "queued;dur=" in timing and "model;dur=" in timing
    entry = wait_for_log_entry(local_function, answer.headers["X-Request-Id"])
    assert entry["httpRequest"]["status"] == 200 and entry["imagegen"]["backend"] == "local"
    assert {"queued", "model"} <= set(entry["imagegen"]["timingsMs"])
    assert attempts(entry) == [("local", None)]


@needs_diffusers
def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(local_function: Process) -> None:
    request = {"prompt": "a red fox in the snow", **SMALL, "seed": 77}
    first, second = post(local_function, request), post(local_function, request)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    # CACHE=false: both were generated (the model ran for each), and the bytes are the same.
    for answer in (first, second):
        assert answer.json()["cached"] is False
        assert "model" in wait_for_log_entry(local_function, answer.headers["X-Request-Id"])["imagegen"]["timingsMs"]
    assert png_of(first.json()) == png_of(second.json())

    other = post(local_function, {**request, "seed": 78})
    # The pixels, not the files: the PNG's text chunks name the seed, so those always differ.
    assert other.status_code == 200 and pixels(png_of(other.json())) != pixels(png_of(first.json()))

    # No seed asked: the answer says which one was drawn, and that seed makes the image again.
    drawn = post(local_function, {"prompt": "a red fox in the snow", **SMALL}).json()
    assert isinstance(drawn["seed"], int)
    again = post(local_function, {"prompt": "a red fox in the snow", **SMALL, "seed": drawn["seed"]}).json()
    assert png_of(again) == png_of(drawn)


# --- one generation at a time: the queue and cancelling -----------------------------------------


@needs_diffusers
def test_a_full_queue_answers_503_backend_busy_with_retry_after(local_function: Process) -> None:
    assert post(local_function, {"prompt": "warm", **SMALL}).status_code == 200  # loaded, a generation time known
    slow = EventStream(local_function, {"prompt": "hold the model", **SLOW, "seed": 1})
    queued = None
    try:
        slow.until("progress")  # it runs: the model is busy
        queued = EventStream(local_function, {"prompt": "wait your turn", **SMALL, "seed": 2})
        assert queued.until("queued") == {"position": 1}  # LOCAL_QUEUE_MAX=1: the queue is full

        started = time.monotonic()
        busy = post(local_function, {"prompt": "one too many", **SMALL})
        refused_in = time.monotonic() - started
        assert busy.status_code == 503, busy.text
        assert busy.headers["Content-Type"] == "application/json"
        validate_body(busy.content, "Error")
        error = busy.json()
        assert error["code"] == "backend_busy" and "LOCAL_QUEUE_MAX=1" in error["error"]
        assert int(busy.headers["Retry-After"]) >= 1
        # Refused at once, not retried in the function after Retry-After: the caller decides.
        entry = wait_for_log_entry(local_function, busy.headers["X-Request-Id"])
        assert entry["httpRequest"]["status"] == 503 and attempts(entry) == [("local", "backend_busy")]
        assert refused_in < int(busy.headers["Retry-After"]) + 5

        slow.close()  # cancels the slow one (see the next test): the queued one gets the model
        result = queued.until("result")
        assert result["backend"] == "local" and result["seed"] == 2
    finally:
        slow.close()
        if queued is not None:
            queued.close()


@needs_diffusers
def test_a_cancelled_stream_stops_the_model_at_its_next_step_and_frees_it(local_function: Process) -> None:
    assert post(local_function, {"prompt": "warm", **SMALL}).status_code == 200
    slow = EventStream(local_function, {"prompt": "cancel me", **SLOW, "seed": 3})
    try:
        name, accepted = slow.next()
        assert name == "accepted"
        first = slow.until("progress")
        first_at = time.monotonic()
        second = slow.until("progress")
        step_seconds = time.monotonic() - first_at  # what one step takes on this machine now
        assert (first["step"], second["step"], second["steps"]) == (1, 2, SLOW["steps"])
    finally:
        slow.close()
    closed = time.monotonic()

    # The next request gets the model at once, not after the 98 steps left.
    answer = post(local_function, {"prompt": "next in line", **SMALL, "seed": 4})
    served_in = time.monotonic() - closed
    assert answer.status_code == 200 and answer.json()["backend"] == "local"
    steps_left_seconds = (SLOW["steps"] - 2) * step_seconds
    assert served_in < steps_left_seconds / 4, (served_in, step_seconds)

    entry = wait_for_log_entry(local_function, accepted["requestId"])
    assert entry["httpRequest"]["status"] == 499
    assert entry["imagegen"]["code"] == "cancelled" and entry["imagegen"]["clientClosed"] is True
    # The model stopped early: it ran a few steps, nowhere near the 100 asked for.
    ran_seconds = entry["imagegen"]["timingsMs"]["upstream"] / 1000
    assert ran_seconds < SLOW["steps"] * step_seconds / 4, (ran_seconds, step_seconds)
    assert "backend" not in entry["imagegen"]  # no image was made


# --- loading errors, failover -------------------------------------------------------------------


def test_a_missing_model_folder_is_a_clear_500_and_the_worker_keeps_serving(run_function, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    function = run_function(**local_env(tmp_path, str(missing), BACKENDS="local"))
    workers = worker_pids(function)
    for streamed in (False, True):
        if streamed:
            stream = EventStream(function, {"prompt": "x", **SMALL})
            try:
                error = stream.until("error")
            finally:
                stream.close()
            assert error.pop("status") == 500
        else:
            answer = post(function, {"prompt": "x", **SMALL})
            assert answer.status_code == 500 and answer.headers["Content-Type"] == "application/json"
            validate_body(answer.content, "Error")
            error = answer.json()
        assert error["code"] == "invalid_configuration"
        assert "LOCAL_MODEL" in error["error"] and str(missing) in error["error"] and "does not exist" in error["error"]
    # The same worker answered both: nothing crashed or was restarted.
    assert worker_pids(function) == workers and len(workers) == 1
    # A typo in a path is told at once, without importing torch for it.
    assert not has_torch_mapped(workers[0])


@needs_diffusers
def test_a_local_model_that_cannot_load_fails_over_to_the_api(run_function, router, tmp_path: Path) -> None:
    function = run_function(
        **local_env(
            tmp_path,
            "imagegen-tests/not-in-any-cache",
            BACKENDS="local,huggingface",
            HUGGING_FACE_API_KEY=TEST_TOKEN,
            HF_ROUTER_URL=router.url,
            MAX_RETRIES="0",
        )
    )
    answer = post(function, {"prompt": "a fox", **SMALL, "seed": 5})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["backend"], body["provider"]) == ("huggingface", "hf-inference")
    assert len(router.posts()) == 1
    entry = wait_for_log_entry(function, answer.headers["X-Request-Id"])
    assert attempts(entry) == [("local", "local_model_unavailable"), ("huggingface", None)]


@needs_diffusers
def test_an_api_that_fails_hands_over_to_the_local_model(run_function, router, tiny_model: str, tmp_path: Path) -> None:
    router.reply_error(503, "Service Unavailable")
    function = run_function(
        **local_env(
            tmp_path,
            tiny_model,
            BACKENDS="huggingface,local",
            HUGGING_FACE_API_KEY=TEST_TOKEN,
            HF_ROUTER_URL=router.url,
            MAX_RETRIES="0",
        )
    )
    answer = post(function, {"prompt": "a fox", **SMALL, "seed": 6})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["backend"], body["model"], body["seed"]) == ("local", tiny_model, 6)
    assert png_text(png_of(body), "backend") == "local"
    assert len(router.posts()) == 1
    entry = wait_for_log_entry(function, answer.headers["X-Request-Id"])
    assert attempts(entry) == [("huggingface", "upstream_unavailable"), ("local", None)]


# --- loading at start, and the cache ------------------------------------------------------------


@pytest.fixture(scope="module")
def preloaded_function(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """LOCAL_PRELOAD=true, the cache on (the default)."""
    folder = tmp_path_factory.mktemp("local-e2e-preload")
    function = start_function(local_env(folder, tiny_model, LOCAL_PRELOAD="true"), folder / "function.log")
    yield function
    function.stop()


def model_loaded(function: Process) -> bool:
    return "loaded on cpu" in function.log()


@needs_diffusers
def test_preload_loads_in_the_worker_after_the_fork_and_the_parent_never_imports_torch(preloaded_function: Process) -> None:
    function = preloaded_function
    wait_until(lambda: model_loaded(function), WAIT, "the worker to load the model")
    (worker,) = worker_pids(function)
    assert has_torch_mapped(worker)  # the check sees torch where it is...
    assert not has_torch_mapped(function.process.pid)  # ...and gunicorn's parent never had it

    answer = post(function, {"prompt": "first light", **SMALL, "seed": 11})
    assert answer.status_code == 200, answer.text
    assert "model;dur=" in answer.headers["Server-Timing"] and "load;dur=" not in answer.headers["Server-Timing"]
    entry = wait_for_log_entry(function, answer.headers["X-Request-Id"])
    assert "load" not in entry["imagegen"]["timingsMs"] and "model" in entry["imagegen"]["timingsMs"]
    assert function.log().count("loaded on cpu") == 1


@needs_diffusers
def test_with_the_cache_on_a_repeat_is_served_without_a_new_generation(preloaded_function: Process) -> None:
    request = {"prompt": "from the cache", **SMALL, "seed": 12}
    made = post(preloaded_function, request)
    repeat = post(preloaded_function, request)
    assert made.status_code == repeat.status_code == 200, (made.text, repeat.text)
    assert (made.json()["cached"], repeat.json()["cached"]) == (False, True)
    assert png_of(repeat.json()) == png_of(made.json())
    assert repeat.json()["seed"] == 12 and repeat.json()["backend"] == "local"
    # Nothing reached the model for the repeat: no attempt, no upstream or model time.
    entry = wait_for_log_entry(preloaded_function, repeat.headers["X-Request-Id"])
    assert entry["imagegen"]["cached"] is True and attempts(entry) == []
    assert not {"upstream", "queued", "model"} & set(entry["imagegen"]["timingsMs"])
    assert "model;dur=" not in repeat.headers["Server-Timing"]


# --- nothing heavy unless configured ------------------------------------------------------------


def imported_by_main(**env: str) -> dict[str, bool]:
    """Which heavy modules `import main` (what gunicorn's parent does) pulls in, with `env`."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "IMAGE_", "LOCAL_"))}
    environment.pop("BACKENDS", None)
    environment.update(env)
    code = (
        "import json, sys, main; "
        "print(json.dumps({m: m in sys.modules for m in ('torch', 'diffusers', 'imagegen.backends.local')}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=WAIT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_an_api_key_alone_imports_neither_torch_nor_the_local_backend(tmp_path: Path) -> None:
    no_keys = {name: value for name, value in local_env(tmp_path, "unused").items() if value == ""}
    with_key = imported_by_main(**{**no_keys, "HUGGING_FACE_API_KEY": TEST_TOKEN})
    assert with_key == {"torch": False, "diffusers": False, "imagegen.backends.local": False}
    if HAVE_DIFFUSERS:
        # The same check sees the module where it is loaded: with no key, the local model is the
        # default, and its module (only its module) is imported.
        assert imported_by_main(**no_keys) == {"torch": False, "diffusers": False, "imagegen.backends.local": True}
