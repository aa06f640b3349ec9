"""The official `openai` npm package, run by Node, calling the Images API door of the real
function: b64 and url answers, n with a seed, formats, models, the exceptions for 400/401/429,
and streaming with partial images. The package is installed from the npm registry, pinned in
tests/openai_node/package.json, into a temporary folder."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TEST_TOKEN
from tests.fake_router import FakeRouter
from tests.servers import REPO_ROOT, child_environment, start_function

API_KEY = "openai-door-test-key-0123456789"
SCRIPTS = REPO_ROOT / "tests" / "openai_node"

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="Node and npm are needed")


@pytest.fixture(scope="module")
def node_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("openai-node")
    for name in ("package.json", "calls.mjs"):
        shutil.copy(SCRIPTS / name, folder / name)
    installed = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
        cwd=folder, env=child_environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    return folder


def test_the_openai_npm_package_calls_the_door(node_folder: Path, tmp_path: Path) -> None:
    with FakeRouter(TEST_TOKEN) as router:
        function = start_function(
            {"BACKENDS": "huggingface,demo", "HUGGING_FACE_API_KEY": TEST_TOKEN, "HF_ROUTER_URL": router.url,
             "DEMO_STEP_SECONDS": "0.01", "IMAGE_DIR": str(tmp_path / "images"), "AUTH_MODE": "api-key",
             "API_KEYS": API_KEY, "CORS_ALLOWED_ORIGINS": "https://app.example.com", "MAX_RETRIES": "0",
             "RATE_LIMIT_PER_MINUTE": "1", "RATE_LIMIT_BURST": "12"},
            tmp_path / "function.log",
        )  # fmt: skip
        try:
            ran = subprocess.run(["node", "calls.mjs", function.url + "/v1", API_KEY], cwd=node_folder,
                                 env=child_environment(), capture_output=True, text=True, timeout=120)  # fmt: skip
        finally:
            function.stop()
    assert ran.returncode == 0, ran.stderr[-3000:]
    out = json.loads(ran.stdout.strip().splitlines()[-1])
    assert out["b64"] == {"count": 1, "size": "256x256", "format": "png", "head": "iVBORw0K"}
    assert out["many"] == {"count": 2, "format": "jpeg", "seeds": [5, 6], "head": "/9j/"}
    assert out["url"] == {"status": 200, "type": "image/png", "bytes": out["url"]["bytes"]} and out["url"]["bytes"] > 0
    assert "stabilityai/stable-diffusion-3-medium-diffusers" in out["models"] and "demo/placeholder" in out["models"]
    assert (out["badRequest"]["raised"], out["badRequest"]["status"], out["badRequest"]["code"]) == ("BadRequestError", 400, "model_not_allowed")
    assert (out["unauthorized"]["raised"], out["unauthorized"]["status"]) == ("AuthenticationError", 401)
    assert (out["tooMany"]["raised"], out["tooMany"]["status"]) == ("RateLimitError", 429)
    assert int(out["tooMany"]["retryAfter"]) >= 1
    assert [(event["type"], event["index"]) for event in out["stream"]] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1), ("image_generation.completed", None)
    ]  # fmt: skip
