"""./scripts/run-local as a developer runs it: .env versus the command line, a taken port, the
startup line, and log lines for a person on a terminal and for Cloud Logging elsewhere."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from imagegen.logs import JsonLineFormatter, TextLineFormatter
from tests.servers import BIN_DIR, REPO_ROOT, free_port, start_process


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the scripts over the real package, with a .venv that is the test's own
    (already installed: its stamp matches), so the script installs nothing."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    for name in ("run-local", "_venv.sh"):
        shutil.copy2(REPO_ROOT / "scripts" / name, root / "scripts" / name)
    for name in ("imagegen", "main.py", "requirements.txt", "openapi.yaml"):
        (root / name).symlink_to(REPO_ROOT / name)
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("python", "functions-framework"):
        (venv_bin / name).symlink_to(BIN_DIR / name)
    requirements = (REPO_ROOT / "requirements.txt").read_bytes()
    stamp = hashlib.sha256(requirements + requirements).hexdigest()[:16]
    (root / ".venv" / ".installed-requirements.txt").write_text(stamp + "\n")
    return root


def script_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key in ("PATH", "HOME", "LANG", "TMPDIR")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def test_a_taken_port_is_one_clear_line_and_exit_code_2(project):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(project / "scripts" / "run-local")],
            env=script_env(PORT=str(port), BACKENDS="demo"),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"imagegen: port {port} on 127.0.0.1 is already in use (another run-local?); stop it or choose another: "
        f"PORT={port + 1} ./scripts/run-local"
    ]


def test_the_command_line_wins_over_env_file_and_the_url_is_printed(project, tmp_path):
    (project / ".env").write_text(
        "# a developer's settings\n"
        "BACKENDS=huggingface\n"
        "HUGGING_FACE_API_KEY=hf_fromDotEnv0123456789\n"
        'MAX_PROMPT_CHARS="123"\n'
        f"export IMAGE_DIR={tmp_path / 'images'}\n"
    )
    port = free_port()
    server = start_process(
        [str(project / "scripts" / "run-local")],
        script_env(PORT=str(port), BACKENDS="demo", DEMO_STEP_SECONDS="0"),
        port,
        tmp_path / "run-local.log",
        "/",
    )
    try:
        capabilities = requests.get(f"{server.url}/capabilities.json", timeout=5).json()
        assert [b["name"] for b in capabilities["backends"]] == ["demo"]  # the command line's
        assert capabilities["limits"]["maxPromptChars"] == 123  # .env still fills the rest
        answer = requests.post(server.url, json={"prompt": "a fox"}, timeout=10).json()
        assert answer["backend"] == "demo"
        log = server.log()
        assert f"imagegen: open http://127.0.0.1:{port}/ (the page; POST JSON there for the API)" in log
        # Not a terminal: the JSON line Cloud Logging reads.
        post = [line for line in log.splitlines() if '"requestMethod": "POST"' in line]
        assert json.loads(post[0])["imagegen"]["backend"] == "demo"
    finally:
        server.stop()


def record(message: str, fields: dict) -> logging.LogRecord:
    entry = logging.LogRecord("imagegen", logging.WARNING, __file__, 1, message, (), None)
    entry.fields = fields
    return entry


def test_text_lines_are_short_and_say_what_happened():
    fields = {
        "requestId": "0123456789abcdef",
        "httpRequest": {"status": 200},
        "imagegen": {
            "backend": "huggingface",
            "provider": "hf-inference",
            "model": "owner/model",
            "seed": 42,
            "cached": False,
            "attempts": [{"status": 503}, {"status": 200}],
            "warning": "The image was generated but could not be stored.",
        },
    }
    line = TextLineFormatter().format(record("POST / 200 in 812 ms", fields))
    first, second = line.split("\n")
    assert first.endswith("WARNING  POST / 200 in 812 ms  huggingface/hf-inference owner/model  seed 42  1 more try  [01234567]")
    assert len(first) < 120 and second == "    warning: The image was generated but could not be stored."
    assert json.loads(JsonLineFormatter().format(record("POST / 200 in 812 ms", fields)))["requestId"] == fields["requestId"]


def test_log_format_picks_the_formatter(monkeypatch):
    from imagegen import logs

    class Terminal:
        def isatty(self):
            return True

    handler = next(h for h in logs.get_logger().handlers if isinstance(h, logs.StdoutHandler))
    try:
        monkeypatch.setattr(sys, "stdout", Terminal())
        assert isinstance(logs.get_logger("auto") and handler.formatter, TextLineFormatter)
        assert isinstance(logs.get_logger("json") and handler.formatter, JsonLineFormatter)
        monkeypatch.setattr(sys, "stdout", sys.__stdout__)
        assert isinstance(logs.get_logger("text") and handler.formatter, TextLineFormatter)
    finally:
        handler.setFormatter(JsonLineFormatter())


def test_log_format_is_checked():
    from imagegen.config import load_settings
    from imagegen.errors import ConfigurationError

    assert load_settings({"LOG_FORMAT": "TEXT"}).log_format == "text"
    with pytest.raises(ConfigurationError, match="LOG_FORMAT is invalid: expected one of auto, json, text"):
        load_settings({"LOG_FORMAT": "yaml"})
