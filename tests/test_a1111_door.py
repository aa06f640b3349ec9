"""The AUTOMATIC1111 door end to end: the real function under functions-framework with
BACKENDS=demo, called with the request and answer shapes Open WebUI's automatic1111 engine and
SillyTavern use (`/sdapi/v1/*` under the base URL the user gave them)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
import requests

from tests.servers import Process, start_function

WAIT = 30
# Open WebUI's automatic1111 engine (backend/open_webui/routers/images.py): batch_size is its n.
OPEN_WEBUI_BODY = {"prompt": "a red fox", "batch_size": 2, "width": 512, "height": 512, "steps": 20, "negative_prompt": "blurry"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    folder = tmp_path_factory.mktemp("a1111-demo")
    function = start_function(
        {"BACKENDS": "demo", "DEMO_STEP_SECONDS": "0", "IMAGE_DIR": str(folder / "images"), "RATE_LIMIT_PER_MINUTE": "0"},
        folder / "function.log",
    )
    yield function
    function.stop()


def png_of(image: str) -> bytes:
    assert not image.startswith("data:"), "AUTOMATIC1111 answers base64 without a data: prefix"
    png = base64.b64decode(image, validate=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return png


def test_open_webui_txt2img_gets_its_images_parameters_and_info(demo: Process) -> None:
    answer = requests.post(f"{demo.url}/sdapi/v1/txt2img", json=OPEN_WEBUI_BODY, timeout=WAIT)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"images", "parameters", "info"}
    assert len(body["images"]) == 2
    for image in body["images"]:
        png_of(image)
    assert body["parameters"]["prompt"] == "a red fox"
    assert body["parameters"]["batch_size"] == 2
    info = json.loads(body["info"])
    assert info["prompt"] == "a red fox" and info["all_prompts"] == ["a red fox"] * 2
    assert info["negative_prompt"] == "blurry"
    assert (info["width"], info["height"]) == (512, 512)
    assert info["sd_model_name"] == "placeholder"
    assert len(info["all_seeds"]) == 2 and info["seed"] == info["all_seeds"][0]
    assert len(info["infotexts"]) == 2 and info["infotexts"][0].startswith("a red fox\n")
    # The demo backend cannot use a negative prompt or steps: said, not hidden.
    assert "negative_prompt" in info["ignored"] and "steps" in info["ignored"]


def test_the_door_answers_under_any_prefix(demo: Process) -> None:
    answer = requests.post(f"{demo.url}/api/generate-image/sdapi/v1/txt2img", json={"prompt": "a cat"}, timeout=WAIT)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 1


def test_unknown_fields_and_settings_are_accepted_and_listed_as_ignored(demo: Process) -> None:
    body = {
        "prompt": "a cat",
        "restore_faces": True,
        "enable_hr": False,
        "sampler_name": "Euler a",
        "send_images": True,
        "override_settings": {"CLIP_stop_at_last_layers": 2},
    }
    answer = requests.post(f"{demo.url}/sdapi/v1/txt2img", json=body, timeout=WAIT)
    assert answer.status_code == 200, answer.text
    ignored = json.loads(answer.json()["info"])["ignored"]
    for name in ("restore_faces", "enable_hr", "override_settings.CLIP_stop_at_last_layers", "sampler_name"):
        assert name in ignored
    assert "send_images" not in ignored
    assert "restore_faces" in answer.headers["X-Imagegen-Ignored"]


def test_batch_size_times_n_iter_images(demo: Process) -> None:
    answer = requests.post(f"{demo.url}/sdapi/v1/txt2img", json={"prompt": "a cat", "batch_size": 2, "n_iter": 2}, timeout=WAIT)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 4
    too_many = requests.post(f"{demo.url}/sdapi/v1/txt2img", json={"prompt": "a cat", "batch_size": 4, "n_iter": 3}, timeout=WAIT)
    assert too_many.status_code == 400


def test_errors_come_in_automatic1111s_shape_with_todays_statuses(demo: Process) -> None:
    missing = requests.post(f"{demo.url}/sdapi/v1/txt2img", json={"steps": 20}, timeout=WAIT)
    assert missing.status_code == 400
    body = missing.json()
    assert {"error", "detail", "body", "errors"} <= set(body)
    assert "prompt" in body["detail"] and body["errors"].startswith("400: ")
    assert body["code"] == "missing_field" and body["requestId"] == missing.headers["X-Request-Id"]

    unknown_model = requests.post(
        f"{demo.url}/sdapi/v1/txt2img",
        json={"prompt": "a cat", "override_settings": {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors [31e35c80fc]"}},
        timeout=WAIT,
    )
    assert unknown_model.status_code == 400
    assert unknown_model.json()["code"] == "model_not_allowed"
    assert "placeholder" in unknown_model.json()["detail"]

    wrong_method = requests.get(f"{demo.url}/sdapi/v1/txt2img", timeout=WAIT)
    assert wrong_method.status_code == 405 and "detail" in wrong_method.json()


def test_the_checkpoint_picks_the_model_by_name_or_backend_slash_model(demo: Process) -> None:
    for checkpoint in ("placeholder", "demo/placeholder", "placeholder [0123456789]"):
        body = {"prompt": "a cat", "override_settings": {"sd_model_checkpoint": checkpoint}}
        answer = requests.post(f"{demo.url}/sdapi/v1/txt2img", json=body, timeout=WAIT)
        assert answer.status_code == 200, (checkpoint, answer.text)
        assert json.loads(answer.json()["info"])["sd_model_name"] == "placeholder"


def test_the_json_api_is_unchanged_beside_the_door(demo: Process) -> None:
    answer = requests.post(f"{demo.url}/api/generate-image", json={"prompt": "a cat"}, timeout=WAIT)
    assert answer.status_code == 200
    assert answer.json()["success"] is True


def test_ignored_field_names_any_text_reach_the_header_escaped_and_bounded(demo: Process) -> None:
    # Found by the fuzzer: a field name a header cannot carry made a 500.
    body = {"prompt": "a cat", "r\u00e9glage \U0001d47b\n": 1, **{f"field{i}": i for i in range(300)}}
    answer = requests.post(f"{demo.url}/sdapi/v1/txt2img", json=body, timeout=WAIT)
    assert answer.status_code == 200, answer.text
    header = answer.headers["X-Imagegen-Ignored"]
    assert header.isascii() and len(header) <= 1024 and header.startswith("r\\u00e9glage \\ud835\\udc7b\\n")
    assert "r\u00e9glage \U0001d47b\n" in json.loads(answer.json()["info"])["ignored"]
