"""The tests themselves: nothing the developer's shell exports changes what a test sees, and
nothing a test starts outlives it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from imagegen.config import ConfigurationError, load_settings, setting_variables
from tests.servers import MEMBERS, REPO_ROOT, child_environment, left_running, spawn, stop_group, wait_until

# What a developer may well have exported while working on a backend or on shared state.
SHELL = {
    "OPENAI_API_KEY": "sk-x",
    "GEMINI_API_KEY": "x",
    "AUTH_MODE": "api-key",
    "API_KEYS": "k" * 32,
    "BACKENDS": "openai",
    "STATE_URL": "redis://127.0.0.1:1",
    "HF_MAX_RETRIES": "7",
    "THREADS": "1",
}


def settings_or_error(environ) -> object:
    try:
        return load_settings(environ)
    except ConfigurationError as error:
        return str(error)


def test_the_settings_read_include_keys_modes_and_state():
    assert {"OPENAI_API_KEY", "GEMINI_API_KEY", "AUTH_MODE", "API_KEYS", "BACKENDS", "STATE_URL"} <= setting_variables()


def test_no_setting_from_the_shell_reaches_a_test():
    """Passes trivially in a clean shell; the next test runs it with SHELL exported."""
    assert not setting_variables() & set(os.environ)
    assert "THREADS" not in os.environ
    assert settings_or_error(os.environ) == settings_or_error({})


def test_the_shell_cannot_change_what_a_test_sees():
    test = f"{__file__}::test_no_setting_from_the_shell_reaches_a_test"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
        cwd=REPO_ROOT,
        env={**os.environ, **SHELL},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_a_process_a_test_starts_gets_no_setting_from_the_shell(monkeypatch):
    # As in a session-scoped fixture, which starts before the per-test clean-up.
    for name, value in SHELL.items():
        monkeypatch.setenv(name, value)
    env = child_environment({"IMAGE_DIR": "/tmp/x"})
    assert not set(SHELL) & set(env)
    assert env["IMAGE_DIR"] == "/tmp/x" and env["PATH"] == os.environ["PATH"]


# A parent that leaves a child behind which ignores SIGTERM and SIGINT, as a stuck gunicorn
# worker does once its master is gone.
STUBBORN = """
import os, signal, sys, time
if os.fork() == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(os.getpid(), flush=True)
    while True:
        time.sleep(60)
signal.signal(signal.SIGINT, signal.SIG_IGN)
while True:
    time.sleep(60)
"""


def test_stopping_a_process_stops_everything_in_its_group(tmp_path):
    out = tmp_path / "child.pid"
    with open(out, "w") as pid_file:
        process = spawn([sys.executable, "-c", STUBBORN], child_environment(), stdout=pid_file, stdin=subprocess.DEVNULL)
    wait_until(lambda: out.read_text().strip().isdigit(), 10, "the child to start")
    child = int(out.read_text())
    try:
        stop_group(process, signal.SIGINT, grace=1)
        assert process.returncode is not None
        assert child in {pid for pid, _ in MEMBERS}  # found in the group, and SIGKILLed
        wait_until(lambda: not pid_running(child), 5, "the child to be gone")
        assert not any(line.startswith(f"{child}:") for line in left_running())
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pid_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
