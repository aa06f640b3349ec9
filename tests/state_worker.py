"""One "instance" for the shared-state tests: a separate process with its own RedisState.

    python -m tests.state_worker URL NAMESPACE GO_FILE OP [ARGS...]

Waits for GO_FILE to exist (so that all workers start together), does OP with a few threads,
and prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imagegen.errors import BudgetExhausted
from imagegen.errors import RateLimited
from imagegen.state.base import RatePolicy
from imagegen.state.redis import RedisState, connect


def main() -> None:
    url, namespace, go_file, op, *args = sys.argv[1:]
    client = connect(url, timeout=2)  # generous: the test is about counting, not latency
    state = RedisState(
        client,
        RatePolicy(per_minute=float(args[0]) if op == "rate" else 0, burst=int(args[1]) if op == "rate" else 1),
        daily_image_limit=int(args[0]) if op == "reserve" else 0,
        daily_image_limit_per_caller=int(args[1]) if op == "reserve" else 0,
        failure="closed",
        namespace=namespace,
        poll_seconds=0.02,
    )
    deadline = time.monotonic() + 20
    while not Path(go_file).exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.005)

    if op == "rate":  # rate PER_MINUTE BURST CALLS: how many of CALLS were allowed
        calls = int(args[2])

        def take(_: int) -> bool:
            try:
                state.take_rate("caller-a")
                return True
            except RateLimited:
                return False

        with ThreadPoolExecutor(8) as pool:
            allowed = sum(pool.map(take, range(calls)))
        print(json.dumps({"allowed": allowed}))

    elif op == "reserve":  # reserve LIMIT PER_CALLER CALLS CALLER: how many reservations held
        calls, caller = int(args[2]), args[3]

        def reserve(_: int) -> bool:
            try:
                state.reserve(caller)
                client.incr(f"{namespace}:upstream-calls")  # what the stand-in would count
                return True
            except BudgetExhausted:
                return False

        with ThreadPoolExecutor(25) as pool:
            granted = sum(pool.map(reserve, range(calls)))
        print(json.dumps({"granted": granted}))

    elif op == "flight":  # flight KEY GENERATE_SECONDS LEASE: one generation shared by all
        key, seconds, lease = args[0], float(args[1]), float(args[2])

        def produce() -> tuple[str, str]:
            client.incr(f"{namespace}:upstream-calls")
            time.sleep(seconds)
            return f"made-by-{os_pid()}", f"seeded/{key}"

        results = []

        def one() -> None:
            results.append(state.single_flight(key, produce, lambda name: f"loaded:{name}", lease_seconds=lease, timeout=20))

        threads = [threading.Thread(target=one) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(json.dumps({"results": results, "pid": os_pid()}))

    elif op == "win-and-hang":  # win-and-hang KEY LEASE: wins, says so, then never finishes
        key, lease = args[0], float(args[1])

        def hang() -> tuple[str, str]:
            print(json.dumps({"won": True}), flush=True)
            threading.Event().wait()
            raise AssertionError("unreachable")

        state.single_flight(key, hang, lambda name: None, lease_seconds=lease, timeout=60)


def os_pid() -> int:
    import os

    return os.getpid()


if __name__ == "__main__":
    main()
