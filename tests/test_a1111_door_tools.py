"""The AUTOMATIC1111 door's other endpoints as its clients call them, with AUTH_MODE=api-key and
HTTP Basic credentials (Open WebUI's AUTOMATIC1111_API_AUTH "user:password"): sd-models,
options (GET, and POST keeping a caller's checkpoint on this instance), samplers, schedulers,
progress and interrupt. The real function under functions-framework, BACKENDS=demo."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator

import pytest
import requests

from imagegen.auth import ApiKeyAuth
from tests.servers import Process, start_function, wait_until

WAIT = 30
KEY = "a1111-test-key-0123456789"
BASIC = ("open-webui", KEY)  # requests sends it as 'Authorization: Basic ...'


@pytest.fixture(scope="module")
def function(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("a1111-tools")
    process = start_function(
        {
            "BACKENDS": "demo",
            # Slow enough that a test sees a generation in flight, yet each step a short wait
            # that a cancel ends at once.
            "DEMO_STEP_SECONDS": "5",
            "DEMO_ALLOWED_MODELS": "placeholder,sketch",
            "AUTH_MODE": "api-key",
            "API_KEYS": f"{KEY},other-key-0123456789",
            "CORS_ALLOWED_ORIGINS": "https://example.test",
            "IMAGE_DIR": str(folder / "images"),
            "RATE_LIMIT_PER_MINUTE": "0",
        },
        folder / "function.log",
    )
    yield process
    process.stop()


def test_basic_credentials_carry_the_api_key_as_their_password() -> None:
    auth = ApiKeyAuth((KEY,))
    header = "Basic " + base64.b64encode(f"anyone:{KEY}".encode()).decode()
    assert auth.authenticate({"Authorization": header}, "127.0.0.1").key.startswith("key:")
    # The same caller as the Bearer form: limits and remembered choices are the key's.
    assert auth.authenticate({"Authorization": header}, "x") == auth.authenticate({"Authorization": f"Bearer {KEY}"}, "y")


def test_without_credentials_or_with_a_wrong_password_the_answer_is_401_in_a1111s_shape(function: Process) -> None:
    for auth in (None, ("open-webui", "wrong-password")):
        answer = requests.get(f"{function.url}/sdapi/v1/sd-models", auth=auth, timeout=WAIT)
        assert answer.status_code == 401
        assert answer.json()["code"] == "unauthorized" and "detail" in answer.json()
        assert "WWW-Authenticate" in answer.headers


def test_sd_models_lists_the_catalog(function: Process) -> None:
    answer = requests.get(f"{function.url}/sdapi/v1/sd-models", auth=BASIC, timeout=WAIT)
    assert answer.status_code == 200, answer.text
    models = answer.json()
    assert [model["title"] for model in models] == ["placeholder", "sketch"]
    for model in models:
        assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert model["filename"] == f"demo/{model['model_name']}"


def test_options_keep_the_callers_checkpoint_on_this_instance(function: Process) -> None:
    # Open WebUI: GET options, change sd_model_checkpoint, POST the whole object back.
    options = requests.get(f"{function.url}/sdapi/v1/options", auth=BASIC, timeout=WAIT).json()
    assert options["sd_model_checkpoint"] == "placeholder"
    options["sd_model_checkpoint"] = "sketch"
    saved = requests.post(f"{function.url}/sdapi/v1/options", json=options, auth=BASIC, timeout=WAIT)
    assert saved.status_code == 200 and saved.json() is None
    assert "samples_format" in saved.headers["X-Imagegen-Ignored"]
    assert requests.get(f"{function.url}/sdapi/v1/options", auth=BASIC, timeout=WAIT).json()["sd_model_checkpoint"] == "sketch"
    # Another caller (another key) still sees the default.
    other = ("u", "other-key-0123456789")
    assert requests.get(f"{function.url}/sdapi/v1/options", auth=other, timeout=WAIT).json()["sd_model_checkpoint"] == "placeholder"
    refused = requests.post(f"{function.url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, auth=BASIC, timeout=WAIT)
    assert refused.status_code == 400 and refused.json()["code"] == "model_not_allowed"


def test_samplers_and_schedulers_in_a1111s_shapes(function: Process) -> None:
    samplers = requests.get(f"{function.url}/sdapi/v1/samplers", auth=BASIC, timeout=WAIT).json()
    assert {"name", "aliases", "options"} <= set(samplers[0])
    assert "Euler a" in [sampler["name"] for sampler in samplers]
    schedulers = requests.get(f"{function.url}/sdapi/v1/schedulers", auth=BASIC, timeout=WAIT).json()
    assert {"name", "label"} <= set(schedulers[0])
    assert "karras" in [scheduler["name"] for scheduler in schedulers]


def test_progress_and_interrupt_see_this_callers_generation_in_flight(function: Process) -> None:
    idle = requests.get(f"{function.url}/sdapi/v1/progress", auth=BASIC, timeout=WAIT).json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    answers: list[requests.Response] = []
    body = {"prompt": "a slow fox", "batch_size": 2, "override_settings": {"sd_model_checkpoint": "placeholder"}}
    worker = threading.Thread(
        target=lambda: answers.append(requests.post(f"{function.url}/sdapi/v1/txt2img", json=body, auth=BASIC, timeout=WAIT))
    )
    worker.start()
    try:

        def in_flight() -> bool:
            return requests.get(f"{function.url}/sdapi/v1/progress", auth=BASIC, timeout=WAIT).json()["state"]["job_count"] == 2

        wait_until(in_flight, WAIT, "the generation in flight")
        # Another caller sees nothing of it, and cannot stop it.
        other = ("u", "other-key-0123456789")
        assert requests.get(f"{function.url}/sdapi/v1/progress", auth=other, timeout=WAIT).json()["state"]["job_count"] == 0
        stopped = requests.post(f"{function.url}/sdapi/v1/interrupt", auth=BASIC, timeout=WAIT)
        assert stopped.status_code == 200
    finally:
        worker.join(WAIT)
    assert answers and answers[0].status_code == 200, answers[0].text if answers else "no answer"
    # A1111 answers an interrupted request with what was made: here nothing, 4 steps of 5 s each.
    info = json.loads(answers[0].json()["info"])
    assert answers[0].json()["images"] == [] and info["interrupted"] is True
    assert requests.get(f"{function.url}/sdapi/v1/progress", auth=BASIC, timeout=WAIT).json()["state"]["job_count"] == 0
