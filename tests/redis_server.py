"""A throwaway redis-server on a free loopback port, and a proxy in front of it that can be
made slow or silent, for the shared-state tests and the bench."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import child_environment, free_port, spawn, stop_group, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_group(self.process)


def start_redis(log_path: Path, port: int | None = None, password: str | None = None, cluster: bool = False) -> RedisServer:
    """redis-server on 127.0.0.1, no persistence; returns once it answers PING.

    `cluster`: a cluster of this one node holding every slot; it still refuses a script whose
    keys are in different slots, which is what the tests need of it.
    """
    if not Path(REDIS_SERVER).exists() and os.environ.get("CI") != "true":
        import pytest

        pytest.skip("no redis-server (apt-get install redis-server); CI installs it")
    port = port or free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    if password:
        command += ["--requirepass", password]
    if cluster:
        command += ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
        command += ["--cluster-config-file", str(log_path.with_suffix(".nodes.conf"))]
    log_file = open(log_path, "ab")
    process = spawn(command, child_environment(), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log_file.close()
    server = RedisServer(port, process, log_path)

    def answering() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}:\n{server.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def command_answer(*words: str) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(("*%d\r\n" % len(words) + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)).encode())
            return sock.recv(4096)

    try:
        wait_until(answering, 10, f"redis-server on port {port}")
        if cluster:
            assert command_answer("CLUSTER", "ADDSLOTSRANGE", "0", "16383").startswith(b"+OK")
            wait_until(lambda: b"cluster_state:ok" in command_answer("CLUSTER", "INFO"), 10, "the cluster to be ok")
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class SlowProxy:
    """A TCP proxy on loopback to `target_port`. `delay` seconds hold every answer back;
    `silent` swallows requests and never answers (a network that lost the packets)."""

    target_port: int
    port: int = field(default_factory=free_port)
    delay: float = 0.0
    silent: bool = False

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        for sock in list(self._sockets):
            sock.close()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while not self._closing.is_set():
                ready, _, _ = select.select([client, upstream], [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        if not self.silent:
                            upstream.sendall(data)
                    else:
                        if self.delay:
                            self._closing.wait(self.delay)
                        client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            upstream.close()
