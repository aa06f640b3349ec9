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

from imagegen.config import setting_variables

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN_DIR = Path(sys.executable).parent
# What the function reads besides its own settings: functions-framework and gunicorn (threads,
# workers, timeouts) and the Cloud Storage client (the emulator's address).
SERVER_VARIABLES = frozenset(
    {"THREADS", "WORKERS", "CLOUD_RUN_TIMEOUT_SECONDS", "THREADED_TIMEOUT_ENABLED", "GUNICORN_CMD_ARGS", "STORAGE_EMULATOR_HOST"}
)
# Every variable that changes what a test sees: derived from what load_settings reads, so a
# setting added to the product is cleared here without anyone remembering to.
SHELL_SETTINGS = setting_variables() | SERVER_VARIABLES
# Every process the tests started (group leaders), and every other member of their groups
# that stop_group found, as (pid, start time): for the check at the end of the session.
STARTED: list[subprocess.Popen] = []
MEMBERS: set[tuple[int, int]] = set()


def child_environment(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a process a test starts: this one's, less every setting the
    developer's shell may export (a vendor key, AUTH_MODE, STATE_URL), plus `overrides`."""
    env = {key: value for key, value in os.environ.items() if key not in SHELL_SETTINGS}
    env.update(overrides or {})
    return env


def spawn(command: list[str], env: dict[str, str], **options) -> subprocess.Popen:
    """Popen in a process group of its own, so that `stop_group` reaches whatever it forks
    (gunicorn's workers, run-local's functions-framework), and recorded for the session check."""
    process = subprocess.Popen(command, env=env, start_new_session=True, **options)
    STARTED.append(process)
    return process


def stop_group(process: subprocess.Popen, first: signal.Signals = signal.SIGTERM, grace: float = 10) -> None:
    """Stop a process started by `spawn` and everything in its group: `first` to the group, a
    bounded wait for the leader, then SIGKILL to the group, which reaches a worker the leader
    left behind even when the leader did exit.

    The leader is reaped only after the SIGKILL: until then its pid, and so the group id, cannot
    be given to another process (pids wrap around quickly on a busy machine). A leader already
    reaped elsewhere is left alone for the same reason."""
    if process.returncode is not None:
        return
    if os.getpgid(process.pid) != process.pid:
        # Not started by spawn (a test's own Popen): it has no group to stop; stop it alone.
        process.send_signal(first)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace)
        return
    _signal_group(process.pid, first)
    deadline = time.monotonic() + grace
    while not _exited(process.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    MEMBERS.update(_group_members(process.pid))
    _signal_group(process.pid, signal.SIGKILL)
    process.wait(timeout=grace)


def left_running() -> list[str]:
    """What the tests started that still runs: leaders never stopped, members that outlived
    their group's SIGKILL."""
    left = [f"{process.pid}: {process.args}" for process in STARTED if process.poll() is None]
    left += [f"{pid}: group member" for pid, started in sorted(MEMBERS) if _started_at(pid) == started]
    return left


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _exited(pid: int) -> bool:
    """Whether the child `pid` has exited, without reaping it."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _started_at(pid: int) -> int | None:
    """The start time of a live (not zombie) process: with its pid, it names one process."""
    fields = _stat(pid)
    return int(fields[19]) if fields and fields[0] != "Z" else None


def _group_members(pgid: int) -> set[tuple[int, int]]:
    members = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != pgid:
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                members.add((int(entry.name), int(fields[19])))
    return members


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
        # SIGINT is gunicorn's quick shutdown; SIGTERM waits for idle keep-alive connections.
        stop_group(self.process, signal.SIGINT)


def start_process(
    command: list[str], env: dict[str, str], port: int, log_path: Path, ready_path: str, timeout: float = 30
) -> Process:
    """Start a server, wait until `ready_path` answers at all, and return it."""
    log_file = open(log_path, "wb")
    process = spawn(command, env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
    env = child_environment({**env_overrides, "PYTHONUNBUFFERED": "1"})
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
    return start_process(command, child_environment(), port, log_path, "/")

