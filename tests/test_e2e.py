"""The real function under functions-framework, talking to the stand-in router on loopback."""

import base64
import io
import time
import uuid

import pytest
import requests
from PIL import Image

from tests.conftest import TEST_TOKEN
from tests.fake_router import Reply

MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"


def post(function, body, **kwargs):
    return requests.post(f"{function.url}/api/generate-image", json=body, timeout=30, **kwargs)


def png_from(answer_body: dict) -> bytes:
    return base64.b64decode(answer_body["imageUrl"].removeprefix("data:image/png;base64,"), validate=True)


def test_generates_stores_and_returns_the_image(run_function, router, tmp_path):
    function = run_function(HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, IMAGE_DIR=str(tmp_path / "out"))
    answer = post(
        function,
        {"prompt": "a lighthouse at dusk", "negativePrompt": "fog", "width": 512, "height": 256, "steps": 4, "guidanceScale": 3.5, "seed": 99},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    png = png_from(body)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (512, 256)
    assert body["filePath"].startswith(str(tmp_path / "out")) and "a-lighthouse-at-dusk" in body["filePath"]
    with open(body["filePath"], "rb") as stored:
        assert stored.read() == png
    with Image.open(body["filePath"]) as image:
        image.load()
        assert "Seed: 99, Size: 512x256" in image.text["parameters"]
    assert (body["model"], body["seed"], body["provider"]) == (MODEL, 99, "hf-inference")

    (sent,) = router.requests
    assert sent.path == f"/hf-inference/models/{MODEL}"
    assert sent.headers["Authorization"] == f"Bearer {TEST_TOKEN}"
    assert sent.headers["Accept"] == "image/png"
    assert sent.json() == {
        "inputs": "a lighthouse at dusk",
        "parameters": {"negative_prompt": "fog", "width": 512, "height": 256, "num_inference_steps": 4, "guidance_scale": 3.5, "seed": 99},
    }


def test_errors_and_cors_through_the_real_server(run_function, router, tmp_path):
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN,
        HF_ROUTER_URL=router.url,
        IMAGE_DIR=str(tmp_path / "out"),
        CORS_ALLOWED_ORIGINS="http://localhost:5173",
        MAX_RETRIES="0",
    )
    origin = {"Origin": "http://localhost:5173"}
    preflight = requests.options(f"{function.url}/api/generate-image", headers={**origin, "Access-Control-Request-Method": "POST"}, timeout=10)
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"

    router.reply_error(429, "Rate limit reached", {"Retry-After": "8"})
    limited = post(function, {"prompt": "x"}, headers=origin)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "8"
    assert limited.json()["code"] == "upstream_rate_limited"
    assert limited.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"

    router.reply_error(410, "The requested model is deprecated and no longer supported by provider hf-inference.")
    gone = post(function, {"prompt": "x"})
    assert gone.status_code == 502 and gone.json()["code"] == "model_not_available"
    assert "deprecated" in gone.json()["error"]

    router.reply(Reply(200, b"<!DOCTYPE html><html>We'll be right back</html>", {"Content-Type": "text/html"}))
    assert post(function, {"prompt": "x"}).json()["code"] == "upstream_bad_response"

    bad = requests.post(f"{function.url}/api/generate-image", data="prompt=x", timeout=10)
    assert bad.status_code == 415 and bad.json()["code"] == "unsupported_media_type"
    assert requests.get(f"{function.url}/api/generate-image", timeout=10).status_code == 405
    assert len(router.requests) == 3  # the 415 and the 405 never reached upstream

    log = function.log()
    assert TEST_TOKEN not in log
    assert "Traceback" not in log


def test_a_busy_router_is_retried_after_its_retry_after(run_function, router, tmp_path):
    function = run_function(HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, IMAGE_DIR=str(tmp_path))
    router.reply_error(503, {"error": "Model is currently loading", "estimated_time": 1.0})
    answer = post(function, {"prompt": "x", "seed": 1})
    assert answer.status_code == 200 and len(router.requests) == 2
    assert router.requests[0].json() == router.requests[1].json()


def test_wrong_token_is_reported_as_such(run_function, router, tmp_path):
    function = run_function(HUGGING_FACE_API_KEY="hf_wrong", HF_ROUTER_URL=router.url, IMAGE_DIR=str(tmp_path))
    answer = post(function, {"prompt": "x"})
    assert answer.status_code == 502 and answer.json()["code"] == "upstream_unauthorized"
    assert "hf_wrong" not in answer.text + function.log()


def test_upstream_timeout_is_504_within_the_limit(run_function, router, tmp_path):
    function = run_function(HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, HF_TIMEOUT_SECONDS="1", MAX_RETRIES="0", IMAGE_DIR=str(tmp_path))
    router.reply(Reply(hold_seconds=20))
    started = time.monotonic()
    answer = post(function, {"prompt": "x"})
    assert answer.status_code == 504 and answer.json()["code"] == "upstream_timeout"
    assert time.monotonic() - started < 10


def test_unreachable_router_is_502(run_function, tmp_path):
    from tests.servers import free_port

    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=f"http://127.0.0.1:{free_port()}", MAX_RETRIES="0", IMAGE_DIR=str(tmp_path)
    )
    answer = post(function, {"prompt": "x"})
    assert answer.status_code == 502 and answer.json()["code"] == "upstream_unreachable"


def test_starts_without_a_token_and_says_which_variable(run_function, router, tmp_path):
    # As deployed without requirements-local.txt: otherwise no key means the local model.
    function = run_function(source="tests/no_local_main.py", HF_ROUTER_URL=router.url, IMAGE_DIR=str(tmp_path))
    answer = post(function, {"prompt": "x"})
    assert answer.status_code == 500 and "HUGGING_FACE_API_KEY" in answer.json()["error"]
    assert router.requests == []


def test_stores_in_cloud_storage_when_a_bucket_is_set(run_function, router, storage_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_emulator.url)
    from google.cloud import storage

    bucket = storage.Client().create_bucket(f"e2e-{uuid.uuid4().hex[:12]}")
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN,
        HF_ROUTER_URL=router.url,
        IMAGE_BUCKET=bucket.name,
        IMAGE_PREFIX="generated/",
        STORAGE_EMULATOR_HOST=storage_emulator.url,
    )
    body = post(function, {"prompt": "a red fox", "seed": 5}).json()
    assert body["filePath"].startswith(f"gs://{bucket.name}/generated/") and body["filePath"].endswith(".png")
    blob = bucket.get_blob(body["filePath"].removeprefix(f"gs://{bucket.name}/"))
    assert blob.download_as_bytes() == png_from(body)
    assert blob.content_type == "image/png" and blob.metadata["seed"] == "5" and blob.metadata["model"] == MODEL


def test_a_failing_bucket_still_returns_the_image(run_function, router, storage_emulator):
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN,
        HF_ROUTER_URL=router.url,
        IMAGE_BUCKET="bucket-that-does-not-exist",
        STORAGE_EMULATOR_HOST=storage_emulator.url,
    )
    answer = post(function, {"prompt": "x"})
    assert answer.status_code == 200
    body = answer.json()
    assert body["filePath"] is None and "the IMAGE_BUCKET bucket does not exist" in body["warning"]
    # The bucket and object are named for the operator, in the log, not to the caller.
    assert "gs://bucket-that-does-not-exist/" in function.log()
    assert len(png_from(body)) > 0


def test_cold_start_imports_neither_the_gcs_client_nor_pillow():
    """Both cost start-up time; they load on first use (a bucket, a non-PNG or a PNG check)."""
    import subprocess
    import sys

    from tests.servers import REPO_ROOT

    probe = "import sys, main; print(sorted(m for m in ('google.cloud.storage', 'PIL') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"  # after any start-up line the function logs


def test_gunicorn_is_configured_without_its_control_socket():
    """gunicorn's control socket (a thread and an asyncio loop in the master, a socket file that
    can reload or rescale the workers) stays off: main.py changes the setting's default before
    functions-framework makes gunicorn's configuration, here as functions-framework makes it."""
    import subprocess
    import sys

    from tests.servers import REPO_ROOT

    probe = (
        "import main\n"
        "from functions_framework._http.gunicorn import GunicornApplication\n"
        "config = GunicornApplication(main.generate_image, '127.0.0.1', 8080, False).cfg\n"
        "print(getattr(config, 'control_socket_disable', 'no such setting'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "True"


# --- providers through the real process ---------------------------------------------------------

FLUX = "black-forest-labs/FLUX.1-schnell"


def live(provider: str, provider_id: str) -> dict:
    return {"provider": provider, "providerId": provider_id, "status": "live", "task": "text-to-image"}


def test_auto_fails_over_from_hf_inference_to_fal_ai(run_function, router, tmp_path):
    router.mappings[FLUX] = [live("hf-inference", FLUX), live("fal-ai", "fal-ai/flux/schnell")]
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN,
        HF_ROUTER_URL=router.url,
        HF_HUB_URL=router.url,
        HF_MODEL=FLUX,
        HF_PROVIDER="auto",
        IMAGE_DIR=str(tmp_path),
    )
    router.reply_error(410, "The requested model is deprecated and no longer supported by provider hf-inference.")
    answer = post(function, {"prompt": "a fox", "width": 320, "height": 256, "seed": 3})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["provider"] == "fal-ai"
    with Image.open(io.BytesIO(png_from(body))) as image:
        assert image.size == (320, 256)
        assert "Provider: fal-ai" in image.text["parameters"]
    paths = [(r.method, r.path.split("?")[0]) for r in router.requests]
    assert paths[:3] == [("GET", f"/api/models/{FLUX}"), ("POST", f"/hf-inference/models/{FLUX}"), ("POST", "/fal-ai/fal-ai/flux/schnell")]
    cdn = [r for r in router.requests if r.path.startswith("/cdn/")]
    assert len(cdn) == 1 and "Authorization" not in cdn[0].headers
    # A second request uses the cached mapping: no new Hub lookup.
    post(function, {"prompt": "again"})
    assert sum(r.path.startswith("/api/models/") for r in router.requests) == 1


@pytest.mark.parametrize("provider", ["wavespeed", "together", "nscale"])
def test_chosen_provider_per_request(run_function, router, tmp_path, provider):
    router.mappings[FLUX] = [live(provider, f"{provider}/flux")]
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN,
        HF_ROUTER_URL=router.url,
        HF_HUB_URL=router.url,
        HF_MODEL=FLUX,
        HF_ALLOWED_PROVIDERS=provider,
        IMAGE_DIR=str(tmp_path),
    )
    answer = post(function, {"prompt": "a fox", "provider": provider, "width": 256, "height": 264})
    assert answer.status_code == 200, answer.text
    assert answer.json()["provider"] == provider
    with Image.open(io.BytesIO(png_from(answer.json()))) as image:
        assert image.size == (256, 264)
    refused = post(function, {"prompt": "a fox", "provider": "fal-ai"})
    assert refused.status_code == 400 and refused.json()["code"] == "provider_not_allowed"
