"""Benchmarks: what the function adds to a generation, under load, at start, in memory, and cached.

    .venv/bin/python bench/run.py            # about 60 seconds
    .venv/bin/python bench/run.py --quick    # fewer rounds, about 40 seconds
    .venv/bin/python bench/run.py --peer litellm [--runs N] [--quick]   # side by side (bench/peer.py)

Starts the loopback stand-in router (tests/fake_router.py) serving one realistic 1024x1024 PNG
of about 1.7 MB, and the real function under functions-framework, then prints a table of
figure, target and measured value. Figures are medians of several rounds; latency compares
each request through the function with one straight to the stand-in, alternating, so machine
noise hits both alike. The Redis rows start a throwaway loopback redis-server and compare a
function counting its limits in Redis (STATE_URL) with one counting in memory, limits on in
both: per request, alternating, and for the 100-request burst. IMAGE_DIR is on tmpfs (/dev/shm) when there is one, because /tmp on
Cloud Functions is memory: on this machine's ext4 disk one write costs about 5 ms more.

The function's source is byte-compiled first (`compile_like_deploy`), as the deploy's build
does, so that a cold start here is one as deployed: without it a fresh clone (or a shell with
PYTHONDONTWRITEBYTECODE set) compiles every module again at every start, about 100 ms.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.backends import BACKENDS, measure_backend, serve_this_image  # noqa: E402
from bench.backends import measure_cold_start as measure_backend_cold_start  # noqa: E402
from bench.state import measure as measure_state_calls  # noqa: E402
from imagegen.state.base import RatePolicy  # noqa: E402
from imagegen.state.memory import MemoryState  # noqa: E402
from imagegen.state.redis import RedisState, connect  # noqa: E402
from tests.fake_router import FakeRouter  # noqa: E402
from tests.redis_server import start_redis  # noqa: E402
from tests.servers import BIN_DIR, free_port, wait_until  # noqa: E402

TOKEN = "hf_bench_token_0000000000000000"
MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
CONCURRENT_REQUESTS = 100
UPSTREAM_SECONDS = 2.0
# (workers, threads per worker): the README's two recommended deployments, 1 and 2 vCPUs.
CONFIGURATIONS = ((1, 128), (2, 64))
# Limits on, high enough never to refuse (a refusal is cheaper and would flatter the figures):
# the function then makes its two state calls (rate limit, budget) on every request.
LIMITS_ON = {"RATE_LIMIT_PER_MINUTE": "100000", "RATE_LIMIT_BURST": "100000", "DAILY_IMAGE_LIMIT": "100000000"}


def realistic_png(side: int = 1024) -> bytes:
    """Smooth noise: compresses like a diffusion model's output (about 1.7 MB at 1024x1024)."""
    rng = random.Random(42)
    small = Image.frombytes("RGB", (128, 128), rng.randbytes(128 * 128 * 3))
    out = io.BytesIO()
    small.resize((side, side), Image.BILINEAR).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Function:
    process: subprocess.Popen
    url: str
    started: float

    def pids(self) -> list[int]:
        """The functions-framework process and its gunicorn workers."""
        found = [self.process.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == self.process.pid:
                        found.append(int(entry.name))
                except (OSError, IndexError, ValueError):
                    pass
        return found

    def memory_mb(self) -> tuple[float, float]:
        """Summed RSS and PSS of the processes. RSS counts the pages the workers share with the
        process that forked them once per process; PSS splits them, so it is what they cost."""
        rss = pss = 0
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
            except OSError:
                pass
        return rss / 1024, pss / 1024

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_function(router_url: str, image_dir: str, **env: str) -> Function:
    port = free_port()
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "IMAGE_", "CACHE", "RATE_"))},
        "HUGGING_FACE_API_KEY": TOKEN,
        "HF_ROUTER_URL": router_url,
        "IMAGE_DIR": image_dir,
        "RATE_LIMIT_PER_MINUTE": "0",
        "HF_MAX_RETRIES": "0",
        **env,
    }
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(BIN_DIR / "functions-framework"), "--target=generate_image", "--source=main.py", "--host=127.0.0.1", f"--port={port}"],
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return Function(process, f"http://127.0.0.1:{port}", started)


def wait_ready(function: Function) -> None:
    def ready() -> bool:
        try:
            requests.options(function.url, timeout=1)
        except requests.ConnectionError:
            return False
        return True

    wait_until(ready, 30, "the function")


def timed_post(session: requests.Session, url: str, **kwargs) -> tuple[float, requests.Response]:
    """Milliseconds until the whole body is in, read in one call as a browser's native code would
    (requests' default 10 KB pieces would weigh on the bigger answer, not on the function)."""
    started = time.perf_counter()
    response = session.post(url, timeout=60, stream=True, **kwargs)
    response._content = response.raw.read()
    return (time.perf_counter() - started) * 1000, response


def measure_overhead(router: FakeRouter, tmp: str, rounds: int, per_round: int) -> tuple[float, float, float]:
    """Median added ms per request (function minus stand-in), and the two medians."""
    function = start_function(router.url, f"{tmp}/overhead", CACHE="false")
    wait_ready(function)
    direct, through = requests.Session(), requests.Session()
    direct_url = f"{router.url}/hf-inference/models/{MODEL}"
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": "image/png"}
    for _ in range(5):  # warm up both paths (imports, connections, page cache)
        timed_post(direct, direct_url, json={"inputs": "warm"}, headers=headers)
        timed_post(through, f"{function.url}/api/generate-image", json={"prompt": "warm"})
    added, direct_all, through_all = [], [], []
    try:
        for _ in range(rounds):
            # Alternate the two paths request by request, so a slow moment of this shared
            # machine hits both alike; a round's figure is the median of its paired differences.
            differences = []
            for _ in range(per_round):
                d, _ = timed_post(direct, direct_url, json={"inputs": "a fox", "parameters": {"seed": 1}}, headers=headers)
                t, response = timed_post(through, f"{function.url}/api/generate-image", json={"prompt": "a fox"})
                assert response.status_code == 200, response.text[:200]
                differences.append(t - d)
                direct_all.append(d)
                through_all.append(t)
            added.append(statistics.median(differences))
    finally:
        function.stop()
    return statistics.median(added), statistics.median(direct_all), statistics.median(through_all)


def measure_state_added(router: FakeRouter, tmp: str, redis_url: str, rounds: int, per_round: int) -> tuple[float, float, float]:
    """Median ms Redis adds to a request through the function: the same request to a function
    counting in memory and to one counting in Redis (limits on in both), alternating; the
    median of each round's paired differences, and the two medians."""
    memory = start_function(router.url, f"{tmp}/state-memory", CACHE="false", **LIMITS_ON)
    shared = start_function(router.url, f"{tmp}/state-redis", CACHE="false", STATE_URL=redis_url, STATE_FAILURE="closed", **LIMITS_ON)
    wait_ready(memory)
    wait_ready(shared)
    sessions = {memory.url: requests.Session(), shared.url: requests.Session()}
    for _ in range(5):
        for url, session in sessions.items():
            timed_post(session, f"{url}/api/generate-image", json={"prompt": "warm"})
    added, memory_all, shared_all = [], [], []
    try:
        for _ in range(rounds):
            differences = []
            for _ in range(per_round):
                m, first = timed_post(sessions[memory.url], f"{memory.url}/api/generate-image", json={"prompt": "a fox"})
                r, second = timed_post(sessions[shared.url], f"{shared.url}/api/generate-image", json={"prompt": "a fox"})
                assert first.status_code == second.status_code == 200, (first.text[:200], second.text[:200])
                differences.append(r - m)
                memory_all.append(m)
                shared_all.append(r)
            added.append(statistics.median(differences))
    finally:
        memory.stop()
        shared.stop()
    return statistics.median(added), statistics.median(memory_all), statistics.median(shared_all)


def measure_state_calls_alone(redis_url: str, rounds: int) -> tuple[float, float]:
    """Median ms of the two state calls (take_rate + reserve) in memory and in Redis, in this
    process, one thread: bench/state.py's measurement, without HTTP around it."""
    policy = RatePolicy(per_minute=100_000, burst=100_000)
    memory = MemoryState(policy, 100_000_000, 100_000_000)
    shared = RedisState(connect(redis_url, timeout=5), policy, 100_000_000, 100_000_000, failure="closed", namespace="bench-calls")
    try:
        measure_state_calls({"memory": memory, "redis": shared}, 200, 1)  # warm up
        timings = measure_state_calls({"memory": memory, "redis": shared}, rounds, 1)
    finally:
        shared.close()
    return statistics.median(timings["memory"]), statistics.median(timings["redis"])


def measure_concurrency(
    router: FakeRouter, tmp: str, rounds: int, workers: int, threads: int, **env: str
) -> tuple[float, int, tuple[float, float]]:
    """Wall seconds for 100 concurrent 2 s generations, how many succeeded, and peak RSS and PSS in MB."""
    router.delay_seconds = UPSTREAM_SECONDS
    function = start_function(
        router.url, f"{tmp}/concurrency-{workers}-{len(env)}", CACHE="false", THREADS=str(threads), WORKERS=str(workers), **env
    )
    wait_ready(function)
    walls, peaks, successes = [], [], []
    try:
        with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
            list(pool.map(lambda _: requests.options(function.url, timeout=10), range(CONCURRENT_REQUESTS)))
            for _ in range(rounds):
                peak = list(function.memory_mb())
                done = threading.Event()

                def sample(done: threading.Event = done, peak: list[float] = peak) -> None:
                    while not done.wait(0.02):
                        rss, pss = function.memory_mb()
                        peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)

                sampler = threading.Thread(target=sample)
                sampler.start()
                started = time.perf_counter()
                statuses = list(
                    pool.map(
                        lambda i: timed_post(requests.Session(), f"{function.url}/api/generate-image", json={"prompt": f"p{i}"})[1].status_code,
                        range(CONCURRENT_REQUESTS),
                    )
                )
                walls.append(time.perf_counter() - started)
                done.set()
                sampler.join()
                peaks.append((peak[0], peak[1]))
                successes.append(statuses.count(200))
    finally:
        function.stop()
        router.delay_seconds = 0
    return statistics.median(walls), min(successes), (max(p[0] for p in peaks), max(p[1] for p in peaks))


def measure_cold_start(router: FakeRouter, tmp: str, rounds: int, **env: str) -> float:
    """Median ms from process start to the first 200 answer to a generation."""
    times = []
    for index in range(rounds):
        function = start_function(router.url, f"{tmp}/cold{index}", CACHE="false", **env)
        try:

            def answered(function: Function = function) -> bool:
                try:
                    return requests.post(f"{function.url}/", json={"prompt": "cold"}, timeout=5).status_code == 200
                except requests.ConnectionError:
                    return False

            wait_until(answered, 30, "the first answer", interval=0.005)
            times.append((time.perf_counter() - function.started) * 1000)
        finally:
            function.stop()
    return statistics.median(times)


def measure_cache(router: FakeRouter, tmp: str, per_round: int) -> tuple[float, float, int]:
    """Median ms of a cache miss and a hit, and upstream calls made for all of them."""
    function = start_function(router.url, f"{tmp}/cache")
    wait_ready(function)
    session = requests.Session()
    before = len(router.posts())
    try:
        misses, hits = [], []
        for index in range(per_round):
            body = {"prompt": f"cached {index}", "seed": index}
            misses.append(timed_post(session, f"{function.url}/", json=body)[0])
            for _ in range(3):
                ms, response = timed_post(session, f"{function.url}/", json=body)
                assert response.json()["cached"] is True
                hits.append(ms)
    finally:
        function.stop()
    return statistics.median(misses), statistics.median(hits), len(router.posts()) - before


def measure_redis(router: FakeRouter, tmp: str, rounds: int, quick: bool) -> list[tuple[str, str, str]]:
    """The rows for shared state in Redis (STATE_URL): a throwaway loopback redis-server."""
    server = start_redis(Path(tmp) / "redis.log")
    rows = []
    try:
        memory_ms, redis_ms = measure_state_calls_alone(server.url, 2000 if quick else 5000)
        rows.append(("Redis: the two state calls alone (median, one thread)", "< 1 ms added", f"{redis_ms - memory_ms:.3f} ms ({memory_ms:.3f} -> {redis_ms:.3f} ms)"))
        added, memory, shared = measure_state_added(router, tmp, server.url, rounds, 10 if quick else 20)
        rows.append(("Redis: added per request through the function", "< 1 ms", f"{added:.2f} ms ({memory:.1f} -> {shared:.1f} ms)"))
        workers, threads = CONFIGURATIONS[0]
        for label, env in (("memory", LIMITS_ON), ("Redis", {**LIMITS_ON, "STATE_URL": server.url, "STATE_FAILURE": "closed"})):
            wall, ok, peak = measure_concurrency(router, tmp, 2 if quick else 3, workers, threads, **env)
            rows.append((f"{CONCURRENT_REQUESTS} concurrent, limits on, state in {label}, WORKERS={workers}", "<= 2.5 s, all 200", f"{wall:.2f} s, {ok}/{CONCURRENT_REQUESTS} ok, RSS {peak[0]:.0f} MB"))
    finally:
        server.stop()
    return rows


def measure_local(tmp: str, quick: bool) -> list[tuple[str, str, str]]:
    """The rows for the local model (diffusers, in process) on the tiny random-weight pipeline
    (tests/tiny_pipeline.py): the function with BACKENDS=local against the same pipeline
    called in this process, one torch thread on both sides (the figures are steadiest so on
    shared cores). A row saying so where requirements-local.txt is not installed."""
    from imagegen.backends.registry import local_model_installed

    if not local_model_installed():
        return [("Local model (diffusers)", "", "not installed: pip install -r requirements-local.txt")]
    os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers is imported: no download, ever
    import torch

    from bench import local  # noqa: I001 - after HF_HUB_OFFLINE
    from tests.tiny_pipeline import build_tiny_pipeline

    threads, size, steps = 1, 256, 2
    torch.set_num_threads(threads)
    model = str(build_tiny_pipeline(Path(tmp) / "tiny-sd"))
    direct = local.direct_caller(model, size, steps)
    function = start_function(
        "",
        f"{tmp}/local",
        HUGGING_FACE_API_KEY="",
        BACKENDS="local",
        LOCAL_MODEL=model,
        LOCAL_DEVICE="cpu",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS=str(threads),
        CACHE="false",
    )
    try:
        wait_ready(function)
        f = local.measure_through_function(
            function.url, direct, timed_post, 10 if quick else 30, 3 if quick else 5, size, steps
        )
    finally:
        function.stop()
    backend = local.local_backend(model)
    backend.preload()
    bookkeeping_us = local._bookkeeping_us(backend, steps, 500 if quick else 2000)  # noqa: SLF001
    setting = f"tiny model {size}x{size}, {steps} steps, CPU, {threads} torch thread"
    return [
        (
            f"Local model: added by the function per generation ({setting})",
            f"<= {f['allowed_ms']:.0f} ms (5% or 20 ms)",
            f"{f['added_ms']:+.1f} ms ({f['added_pct']:+.1f}%) ({f['direct_ms']:.1f} -> {f['function_ms']:.1f} ms)",
        ),
        ("Local model: of which the backend's bookkeeping (no model)", "", f"{bookkeeping_us:.0f} us"),
        (
            f"Local model: {local.CONCURRENT} concurrent through the function vs {local.CONCURRENT} sequential direct",
            ">= 0.95 throughput",
            f"{f['throughput_ratio']:.3f} ({f['sequential_8_s']:.2f} s -> {f['concurrent_8_s']:.2f} s), "
            f"{f['concurrent_ok']}/{local.CONCURRENT} ok",
        ),
    ]


def measure_all(router: FakeRouter, png: bytes, tmp: str, rounds: int, quick: bool) -> list[tuple[str, str, str]]:
    """Every row: the function's own overhead, each HTTP backend, the cache, Redis, the local model."""
    results = []
    added, direct, through = measure_overhead(router, tmp, rounds, 10 if quick else 20)
    results.append(("Added latency per request (median of round medians)", "<= 5 ms", f"{added:.1f} ms ({direct:.1f} -> {through:.1f} ms)"))
    for workers, threads in CONFIGURATIONS:
        wall, ok, peak = measure_concurrency(router, tmp, 2 if quick else 3, workers, threads)
        setting = f"WORKERS={workers}, THREADS={threads}"
        results.append((f"{CONCURRENT_REQUESTS} concurrent, {UPSTREAM_SECONDS:g} s upstream, {setting}", "<= 2.5 s, all 200", f"{wall:.2f} s, {ok}/{CONCURRENT_REQUESTS} ok"))
        results.append((f"Peak RSS during those requests, {setting}", "<= 200 MB", f"{peak[0]:.0f} MB (PSS {peak[1]:.0f} MB)"))
    cold = measure_cold_start(router, tmp, rounds)
    results.append(("Cold start: process start to first 200 (local storage)", "<= 400 ms", f"{cold:.0f} ms"))
    serve_this_image(png)
    for bench in BACKENDS:
        added, direct, through = measure_backend(
            bench, start_function, wait_ready, timed_post, tmp, rounds, 5 if quick else 10
        )
        results.append((f"Added latency, {bench.name} stand-in", "<= 5 ms", f"{added:.1f} ms ({direct:.1f} -> {through:.1f} ms)"))
        cold = measure_backend_cold_start(bench, start_function, tmp, 3 if quick else 5, wait_until)
        results.append((f"Cold start, {bench.name}", "<= 400 ms", f"{cold:.0f} ms"))
    miss, hit, calls = measure_cache(router, tmp, 5 if quick else 10)
    misses = 5 if quick else 10
    results.append(("Cache: seeded repeat answered from storage", "no upstream call", f"hit {hit:.1f} ms vs miss {miss:.1f} ms; {calls} upstream calls for {misses} misses + {3 * misses} hits"))
    results.extend(measure_redis(router, tmp, rounds, quick))
    results.extend(measure_local(tmp, quick))
    return results


def compile_like_deploy() -> None:
    """Byte-compile main.py and imagegen/ into their __pycache__ folders (ignored by git), as
    Google Cloud's Python buildpack runs `python3 -m compileall -f -q .` on a function's source
    when it builds: a deployed instance never compiles at start. Services started by the
    benches then load the compiled modules, whatever PYTHONDONTWRITEBYTECODE says."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "main.py", "imagegen"], cwd=REPO_ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--only-local", action="store_true", help="only the local model's rows")
    parser.add_argument("--peer", metavar="NAME", help="only the side-by-side with a peer: litellm (see bench/peer.py)")
    parser.add_argument("--runs", type=int, default=1, metavar="N", help="with --peer: medians of N runs")
    args = parser.parse_args()
    compile_like_deploy()
    if args.peer is not None:
        from bench import peer

        if args.peer not in peer.PEERS:
            parser.error(f"unknown peer {args.peer!r}: --peer compares with {', '.join(peer.PEERS)}")
        if args.runs < 1:
            parser.error("--runs must be 1 or more")
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
            peer.main(args.peer, args.runs, args.quick, realistic_png(), tmp)
        return
    rounds = 3 if args.quick else 7
    png = realistic_png()
    router = FakeRouter(TOKEN, image=png).start()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        try:
            if args.only_local:
                results = measure_local(tmp, args.quick)
            else:
                results = measure_all(router, png, tmp, rounds, args.quick)
        finally:
            router.stop()
    print(f"\nimagegen benchmarks: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, PNG {len(png) / 1e6:.2f} MB\n")
    widths = [max(len(row[i]) for row in [("Figure", "Target", "Measured"), *results]) for i in range(3)]
    for row in [("Figure", "Target", "Measured"), tuple("-" * w for w in widths), *results]:
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |")



if __name__ == "__main__":
    main()
