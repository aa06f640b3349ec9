"""What shared state in Redis adds to a request: one rate-limit call and one budget reservation.

    .venv/bin/python bench/state.py            # about 5 seconds
    .venv/bin/python bench/state.py --rounds 20000

Starts a throwaway redis-server on loopback (no persistence), then times the two calls a
generating request makes (take_rate + reserve) with MemoryState and with RedisState,
alternating, with one thread and then 8 at once, and prints a table of medians, 99th
percentiles and how many requests the 50 ms bound per call would have cut short. Memorystore in the same region adds its network round trips (about two) on top.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from imagegen.state.base import RatePolicy  # noqa: E402
from imagegen.state.memory import MemoryState  # noqa: E402
from imagegen.state.redis import CALL_TIMEOUT_SECONDS, RedisState, connect  # noqa: E402
from tests.redis_server import start_redis  # noqa: E402

TARGET_ADDED_MS = 1.0
# Limits high enough that no call is refused: a refusal is cheaper and would flatter the figures.
POLICY = RatePolicy(per_minute=100_000, burst=100_000)
DAILY = 100_000_000


def one_request(state, caller: str) -> float:
    started = time.perf_counter()
    state.take_rate(caller)
    state.reserve(caller)
    return (time.perf_counter() - started) * 1000


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def measure(states: dict[str, object], rounds: int, threads: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {name: [] for name in states}
    lock = threading.Lock()

    def worker(index: int) -> None:
        caller = f"caller-{index % 50}"
        for name, state in states.items():  # alternate, so machine noise hits both alike
            took = one_request(state, caller)
            with lock:
                timings[name].append(took)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(rounds)))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        server = start_redis(Path(scratch) / "redis.log")
        try:
            memory = MemoryState(POLICY, DAILY, DAILY)
            shared = RedisState(
                # A generous bound here: the bench measures the whole distribution, and counts
                # the requests that the real 50 ms bound would have cut short.
                connect(server.url, timeout=5),
                POLICY,
                DAILY,
                DAILY,
                failure="closed",
                namespace="bench" + uuid.uuid4().hex[:6],
            )
            measure({"memory": memory, "redis": shared}, 200, 1)  # warm up: connections, script cache
            rows = []
            for threads in options.threads:
                timings = measure({"memory": memory, "redis": shared}, options.rounds, threads)
                added = statistics.median(timings["redis"]) - statistics.median(timings["memory"])
                # Either call past CALL_TIMEOUT_SECONDS would have fallen back (or been a 503).
                missed = sum(1 for took in timings["redis"] if took > 2 * CALL_TIMEOUT_SECONDS * 1000)
                rows.append((threads, timings, added, missed))
            shared.close()
        finally:
            server.stop()

    load = os.getloadavg()[0]
    print(f"rate limit + budget reservation per request, {options.rounds} requests, loopback redis-server")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.1f} at the end")
    print(f"{'threads':>7}  {'memory median':>13}  {'redis median':>12}  {'redis p99':>9}  {'over 100 ms':>11}  {'added (median)':>14}  target")
    for threads, timings, added, missed in rows:
        verdict = "ok" if added < TARGET_ADDED_MS else "MISSED"
        print(
            f"{threads:>7}  {statistics.median(timings['memory']):>10.3f} ms  {statistics.median(timings['redis']):>9.3f} ms"
            f"  {percentile(timings['redis'], 0.99):>6.3f} ms  {missed:>11}  {added:>11.3f} ms  < {TARGET_ADDED_MS:g} ms {verdict}"
        )


if __name__ == "__main__":
    main()
