"""The malloc arena limit, counted from glibc's own report in a fresh process."""

import os
import subprocess
import sys

import pytest

from imagegen.malloc import limit_malloc_arenas
from tests.servers import REPO_ROOT

# Sixteen threads each allocate blocks too big for Python's own allocator (so they come from
# malloc) and hold them until all have, then glibc prints its arenas to stderr.
PROGRAM = """
import ctypes, sys, threading
from imagegen.malloc import limit_malloc_arenas
if sys.argv[1] == "limited":
    assert limit_malloc_arenas({})
barrier = threading.Barrier(16)
def work():
    held = [bytes(4096 + i) for i in range(64)]
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(16)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL(None).malloc_stats()
"""


def arenas_used(mode: str) -> int:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_threads_share_two_arenas_once_limited():
    assert arenas_used("unlimited") > 2  # the control: without the limit, threads spread out
    assert arenas_used("limited") <= 2


def test_an_explicit_malloc_arena_max_is_left_alone():
    assert limit_malloc_arenas({"MALLOC_ARENA_MAX": "4"}) is False
