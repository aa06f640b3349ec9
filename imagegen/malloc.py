"""glibc's malloc, tuned for a process that handles megabyte images in many threads.

Fewer malloc arenas: the same work in about 20 MB less memory per worker process.

glibc hands threads malloc arenas of their own, up to eight per core. With 80 to 128 threads
each briefly holding megabytes (an image, pieces of its base64), freed memory ends up spread
over many arenas that each keep their high-water mark.
Two arenas cost no measurable time here (bench/run.py) and lower peak RSS during the
100-request burst from about 135 to 115 MB with one worker, and 195 to 170 MB with two.

Large buffers kept for reuse: a request for a 1.7 MB PNG allocates about 10 MB in buffers of
0.1 to 4 MB (the body as it arrives, the decoded image, inflated rows, the answer's base64).
By default glibc maps each such buffer fresh from the kernel and hands it back when freed, or
trims the heap soon after, so every request faults its pages in again: 1,800 to 2,400 minor
faults per request, 2.3 to 5 ms of its latency on these VMs (bench/peer.py's primary stand-in,
paired runs). Below MMAP_THRESHOLD_BYTES they now come from the heap, and freed memory goes
back to the kernel only once TRIM_THRESHOLD_BYTES lie free at its top: about 10 faults per
request, and the 100-request burst's peak RSS within its runs' spread.

Called from main.py at import, which functions-framework does in its first process before
it forks the workers, so they inherit the settings. An explicit MALLOC_ARENA_MAX,
MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ wins.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping

ARENAS = 2
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # the largest glibc takes on 64-bit
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024
# From glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def limit_malloc_arenas(environ: Mapping[str, str], arenas: int = ARENAS) -> bool:
    """True when the limit is now in force; False where it cannot be set (not glibc) or is set already."""
    if "MALLOC_ARENA_MAX" in environ:
        return False  # glibc has read it at start
    try:
        # The process's own symbols include its C library's; no library search (ctypes.util's
        # find_library runs ldconfig, 15 ms of cold start).
        return ctypes.CDLL(None).mallopt(_M_ARENA_MAX, arenas) == 1
    except (OSError, AttributeError):  # a C library without mallopt (musl, macOS)
        return False


def keep_large_buffers(environ: Mapping[str, str]) -> bool:
    """True when buffers under MMAP_THRESHOLD_BYTES now come from (and go back to) the heap;
    False where that cannot be set (not glibc) or either variable is set already."""
    if "MALLOC_MMAP_THRESHOLD_" in environ or "MALLOC_TRIM_THRESHOLD_" in environ:
        return False  # glibc has read them at start
    try:
        libc = ctypes.CDLL(None)
        return (
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
        )
    except (OSError, AttributeError):
        return False
