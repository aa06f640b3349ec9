"""Starting and stopping real servers on loopback for the tests, with bounded waits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` seconds.

    An exception from `condition` ends the wait at once: it means waiting cannot help.
    """
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Process:
    process: subprocess.Popen
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            # SIGINT is gunicorn's quick shutdown; SIGTERM waits for idle keep-alive connections.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_process(
    command: list[str], env: dict[str, str], port: int, log_path: Path, ready_path: str, timeout: float = 30
) -> Process:
    """Start a server, wait until `ready_path` answers at all, and return it."""
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        command, env=env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    log_file.close()
    server = Process(process, f"http://127.0.0.1:{port}", log_path)

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}:\n{server.log()}")
        try:
            requests.options(server.url + ready_path, timeout=1)
        except (requests.ConnectionError, requests.Timeout):
            # A timeout too: a worker that loads a local model at start (LOCAL_PRELOAD) can
            # take longer than the probe's second to answer its first request.
            return False
        return True

    try:
        wait_until(answering, timeout, f"{command[0]} on port {port}")
    except BaseException:
        server.stop()
        raise
    return server


def start_function(env_overrides: dict[str, str], log_path: Path, source: str = "main.py") -> Process:
    """The real function under `functions-framework`, as a user runs it locally (`source`: the
    entry point, relative to the repository)."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "IMAGE_", "CORS_"))}
    env.pop("HUGGING_FACE_API_KEY", None)
    env.update(env_overrides)
    env["PYTHONUNBUFFERED"] = "1"
    command = [
        str(BIN_DIR / "functions-framework"),
        "--target=generate_image",
        f"--source={source}",
        "--host=127.0.0.1",
        f"--port={port}",
    ]
    return start_process(command, env, port, log_path, "/")


def start_storage_emulator(log_path: Path) -> Process:
    port = free_port()
    command = [
        str(BIN_DIR / "gcp-storage-emulator"),
        "start",
        "--host=127.0.0.1",
        f"--port={port}",
        "--in-memory",
    ]
    return start_process(command, dict(os.environ), port, log_path, "/")

