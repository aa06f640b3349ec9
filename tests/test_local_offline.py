"""The local model without a network: the cache first, then one bounded try of the Hub.

Each case runs the backend in a fresh Python (huggingface_hub reads HF_HUB_OFFLINE, HF_HOME and
HF_ENDPOINT once, at import), with an empty or prepared cache in a temporary HF_HOME and
HF_ENDPOINT pointing at a loopback stand-in: a closed port (the network refuses at once, as a
failed DNS lookup does) or a listener that accepts and never answers (a network that swallows
packets). Nothing here reaches the real Hub. The child measures the load itself; the parent
waits for it with a bounded timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SKIP_WITHOUT_DIFFUSERS
from tests.servers import REPO_ROOT, free_port

pytestmark = pytest.mark.skipif(
    SKIP_WITHOUT_DIFFUSERS, reason="torch/diffusers not installed: pip install -r requirements-local.txt"
)
WAIT = 120  # seconds the child may take before the test fails instead of hanging
# What the old code took here with no network: 46-54 s (huggingface_hub's retries, twice).
# A cached or refused model must answer within a few seconds; a silent network within the probe.
FAST = 3.0

CHILD = r"""
import json, logging, sys, time
lines = []

class Keep(logging.Handler):
    def emit(self, record):
        lines.append(f"{record.levelname} {record.getMessage()}")

logger = logging.getLogger("imagegen")
logger.addHandler(Keep())
logger.setLevel(logging.INFO)
from imagegen.backends.local import create
from imagegen.config import load_settings
try:
    from imagegen.backends.local.hub import HUB_PROBE_SECONDS
except ImportError:  # only so that this test can be run against the code before it
    HUB_PROBE_SECONDS = 5.0

settings = load_settings({"BACKENDS": "local", "LOCAL_MODEL": sys.argv[1], "LOCAL_DEVICE": "cpu"})
backend = create(settings, settings.backend_settings["local"], None)
started = time.monotonic()
outcome = {"error": None}
try:
    backend.preload()
except Exception as error:
    outcome = {"error": type(error).__name__, "status": getattr(error, "status", None),
               "code": getattr(error, "code", None), "message": getattr(error, "message", str(error)),
               "fail_over": getattr(error, "fail_over", None)}
outcome.update(seconds=time.monotonic() - started, loaded=backend.loaded_model, log=lines,
               probe_seconds=HUB_PROBE_SECONDS)
print(json.dumps(outcome))
"""


def run_child(model: str, hf_home: Path, endpoint: str, **env: str) -> dict[str, Any]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "LOCAL_"))}
    environment.update(HF_HOME=str(hf_home), HF_ENDPOINT=endpoint, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **env)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, model], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=WAIT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


class SilentHub:
    """A loopback listener that accepts connections, reads each request line and never
    answers. `paths` lists what was asked, in order."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.paths: list[str] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(connection)
            threading.Thread(target=self._read_line, args=(connection,), daemon=True).start()

    def _read_line(self, connection: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n" not in head and len(head) < 8192:
                chunk = connection.recv(1024)
                if not chunk:
                    return
                head += chunk
        except OSError:
            return
        self.paths.append(head.split(b"\r\n")[0].decode("latin-1").split(" ")[1].split("?")[0])

    def model_requests(self) -> list[str]:
        """What was asked about a model (huggingface_hub 2.x may also ask once for its "agent
        harnesses" list while building its User-Agent, bounded by its own 3 s: not counted)."""
        return [path for path in self.paths if path.startswith(("/api/models/", "/api/resolve", "/imagegen-tests/", "/stabilityai/"))]

    def close(self) -> None:
        self.sock.close()
        for connection in self.connections:
            connection.close()
        self.thread.join(5)


@pytest.fixture
def silent_hub():
    hub = SilentHub()
    yield hub
    hub.close()


def refused_endpoint() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def test_a_hub_model_not_cached_with_no_network_is_503_in_seconds_and_says_why(tmp_path: Path) -> None:
    outcome = run_child("stabilityai/sd-turbo", tmp_path, refused_endpoint())
    assert (outcome["error"], outcome["status"], outcome["code"]) == ("LocalModelUnavailable", 503, "local_model_unavailable")
    assert outcome["fail_over"] is True
    assert outcome["seconds"] < FAST, outcome
    assert "not in the Hugging Face cache" in outcome["message"] and "could not be reached" in outcome["message"]
    log = "\n".join(outcome["log"])
    assert "could not be reached" in log
    assert "fp16" not in log  # a network failure is not "no fp16 files"


def test_a_silent_network_is_bounded_by_one_probe(tmp_path: Path, silent_hub: SilentHub) -> None:
    outcome = run_child("stabilityai/sd-turbo", tmp_path, silent_hub.url)
    assert outcome["code"] == "local_model_unavailable"
    assert outcome["seconds"] < outcome["probe_seconds"] + 2, outcome
    # One attempt at the model, no retries.
    assert silent_hub.model_requests() == ["/api/models/stabilityai/sd-turbo"], silent_hub.paths
    assert "could not be reached" in outcome["message"] and "fp16" not in "\n".join(outcome["log"])


def test_offline_not_cached_is_503_at_once_and_the_start_line_promises_no_download(tmp_path: Path, silent_hub: SilentHub) -> None:
    outcome = run_child("stabilityai/sd-turbo", tmp_path, silent_hub.url, HF_HUB_OFFLINE="1")
    assert outcome["code"] == "local_model_unavailable" and outcome["seconds"] < FAST
    assert "HF_HUB_OFFLINE" in outcome["message"]
    start = outcome["log"][0]
    assert start.startswith("WARNING local model:") and "HF_HUB_OFFLINE" in start
    assert "fetch" not in start and "download" not in start
    assert silent_hub.connections == []


def test_the_start_line_says_what_will_happen(tmp_path: Path) -> None:
    missing = run_child(str(tmp_path / "models" / "sd-turbo"), tmp_path, refused_endpoint())
    start = missing["log"][0]
    assert start.startswith("WARNING") and "is not a folder here" in start and "download" not in start
    assert missing["code"] == "invalid_configuration"

    online = run_child("stabilityai/sd-turbo", tmp_path, refused_endpoint())
    assert online["log"][0].startswith("INFO") and "fetches it from the Hub if the Hub can be reached" in online["log"][0]


def cache_the_tiny_model(tiny_model: str, hf_home: Path, hub_id: str) -> None:
    """The tiny pipeline laid out as huggingface_hub's cache holds a downloaded model."""
    repo = hf_home / "hub" / ("models--" + hub_id.replace("/", "--"))
    commit = "0" * 40
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")


def test_a_cached_model_loads_without_touching_the_network(tiny_model: str, tmp_path: Path, silent_hub: SilentHub) -> None:
    cache_the_tiny_model(tiny_model, tmp_path, "imagegen-tests/tiny-sd")
    outcome = run_child("imagegen-tests/tiny-sd", tmp_path, silent_hub.url)
    assert outcome["error"] is None, outcome
    assert outcome["loaded"] == "imagegen-tests/tiny-sd"
    assert silent_hub.model_requests() == [], silent_hub.paths  # not even a HEAD for a newer revision
    assert "found in the Hugging Face cache" in outcome["log"][0]


def test_the_fp16_files_are_chosen_from_the_file_list() -> None:
    from imagegen.backends.local.hub import choose_variant

    both = ["model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert choose_variant(both, prefer_fp16=True) == "fp16"
    assert choose_variant(both, prefer_fp16=False) is None  # a model without the preference keeps the full files
    assert choose_variant(["unet/diffusion_pytorch_model.fp16.safetensors"], prefer_fp16=False) == "fp16"  # only those
    assert choose_variant(["unet/diffusion_pytorch_model.safetensors"], prefer_fp16=True) is None  # none to prefer
