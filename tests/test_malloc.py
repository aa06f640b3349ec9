"""The malloc settings, each checked in a fresh process: the arena limit from glibc's own
report, large buffers kept for reuse from the page faults the process takes."""

import os
import subprocess
import sys

import pytest

from imagegen.malloc import keep_large_buffers, limit_malloc_arenas
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


# A request's pattern: about 10 MB of buffers made, touched and freed, again and again.
REUSE = """
import resource, sys
from imagegen.malloc import keep_large_buffers
if sys.argv[1] == "kept":
    assert keep_large_buffers({})
SIZES = (2_300_000, 1_700_000, 262_144, 4_194_304, 2_300_000)
held = [bytearray(size) for size in SIZES]  # the first time, the heap grows: those faults are due
del held
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    held = [bytearray(size) for size in SIZES]
    del held
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_for(mode: str) -> int:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", REUSE, mode], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_buffers_are_reused_rather_than_faulted_in_again():
    assert faults_for("default") > 10_000  # the control: each buffer's pages fault in anew
    assert faults_for("kept") < 200


def test_explicit_malloc_thresholds_are_left_alone():
    assert keep_large_buffers({"MALLOC_MMAP_THRESHOLD_": "131072"}) is False
    assert keep_large_buffers({"MALLOC_TRIM_THRESHOLD_": "131072"}) is False
