"""What the local backend adds to a generation, on the tiny random-weight pipeline.

Two figures, medians of several runs, direct and backend runs interleaved so that other load
on the machine hits both alike:
- overhead: one generation through `LocalBackend.generate` (queue, step callback, progress,
  cancel checks, seed, PNG) against the same pipeline called directly in a script with the
  same arguments and the same PNG encoding. Target: at most 5% or 20 ms, whichever is larger.
- throughput: 8 requests at once through the backend (one runs, seven queue) against 8
  sequential direct calls. One pipeline cannot run two generations at once, so the target is
  parity: the queue must not cost throughput.

This script is the breakdown, at the backend level; `./scripts/bench` (bench/run.py) measures
the same two figures through the running function (`measure_through_function`): HTTP,
functions-framework, validation, the PNG's text chunks, storage and the JSON answer on top.

Usage: .venv/bin/python bench/local.py [--runs N] [--rounds N] [--size PX] [--steps N] [--threads N]
[--model FOLDER]
(requirements-local.txt installed). Builds the tiny pipeline in a temporary folder unless
--model names one. Prints a table; --json prints the figures as JSON too.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imagegen.backends.base import GenerationContext  # noqa: E402
from imagegen.backends.local import LocalBackend, create, encode_png  # noqa: E402
from imagegen.config import load_settings  # noqa: E402
from imagegen.domain import GenerationRequest, Route  # noqa: E402

CONCURRENT = 8
PROMPT = "a lighthouse at dusk, oil painting"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="single generations per side (default 15)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 8 for throughput (default 5)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--model", help="a pipeline folder (default: build the tiny one)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        # One thread is steadier where other jobs share the cores: torch's threads wait for
        # each other at every operation, and a descheduled one stalls them all.
        import torch

        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or _tiny(Path(scratch))
        figures = run(model, args.runs, args.rounds, args.size, args.steps)
    print_table(figures, args)
    if args.json:
        print(json.dumps(figures))


def _tiny(folder: Path) -> str:
    from tests.tiny_pipeline import build_tiny_pipeline

    return str(build_tiny_pipeline(folder / "tiny-sd"))


def direct_caller(model: str, size: int, steps: int) -> Callable[[int], bytes]:
    """The pipeline in `model` called as a script would, with no backend or function around
    it: seed -> PNG bytes (encoded as the backend encodes them, with no metadata)."""
    import torch
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(model, dtype=torch.float32).to("cpu")
    pipeline.set_progress_bar_config(disable=True)

    def direct(seed: int) -> bytes:
        # Under inference_mode as the backend runs it, so that the difference is the backend's
        # own work (queue, step callback, progress, seed, checks), not autograd bookkeeping.
        with torch.inference_mode():
            image = pipeline(
                PROMPT,
                num_inference_steps=steps,
                width=size,
                height=size,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
        return encode_png(image)

    return direct


def run(model: str, runs: int, rounds: int, size: int, steps: int) -> dict[str, float]:
    import torch

    backend = local_backend(model)
    backend.preload()
    direct = direct_caller(model, size, steps)

    def through_backend(seed: int) -> bytes:
        request = GenerationRequest(prompt=PROMPT, width=size, height=size, steps=steps, seed=seed)
        context = GenerationContext(deadline=time.monotonic() + 600)
        return backend.generate(Route("local", model), request, context).png

    # Same bytes both ways: the backend runs the same generation, not a cheaper one.
    assert direct(1) == through_backend(1), "the backend and the direct call made different images"
    for warm in range(2):
        direct(warm), through_backend(warm)

    direct_ms, backend_ms = [], []
    for run_number in range(runs):
        for label, call, into in (("direct", direct, direct_ms), ("backend", through_backend, backend_ms)):
            started = time.perf_counter()
            call(run_number)
            into.append((time.perf_counter() - started) * 1000)

    sequential_s, concurrent_s = [], []
    for round_number in range(rounds):
        # In a thread, as the backend's requests run: torch's CPU threads behave differently in
        # the main thread (measured: 5x slower there with 2 threads on busy shared cores).
        sequential = threading.Thread(target=lambda: [direct(seed) for seed in range(CONCURRENT)])
        started = time.perf_counter()
        sequential.start()
        sequential.join()
        sequential_s.append(time.perf_counter() - started)

        barrier = threading.Barrier(CONCURRENT)
        errors: list[BaseException] = []

        def one(seed: int) -> None:
            barrier.wait()
            try:
                through_backend(seed)
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=one, args=(seed,)) for seed in range(CONCURRENT)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        concurrent_s.append(time.perf_counter() - started)
        if errors:
            raise errors[0]

    bookkeeping_us = _bookkeeping_us(backend, steps)
    direct_median, backend_median = statistics.median(direct_ms), statistics.median(backend_ms)
    added = backend_median - direct_median
    return {
        "size": size,
        "steps": steps,
        "runs": runs,
        "rounds": rounds,
        "direct_ms": round(direct_median, 1),
        "backend_ms": round(backend_median, 1),
        "added_ms": round(added, 1),
        "added_pct": round(100 * added / direct_median, 1),
        "allowed_ms": round(max(20.0, 0.05 * direct_median), 1),
        "sequential_8_s": round(statistics.median(sequential_s), 3),
        "concurrent_8_s": round(statistics.median(concurrent_s), 3),
        "throughput_ratio": round(statistics.median(sequential_s) / statistics.median(concurrent_s), 3),
        "bookkeeping_us": round(bookkeeping_us, 1),
        "torch_threads": torch.get_num_threads(),
    }


def measure_through_function(
    url: str,
    direct: Callable[[int], bytes],
    timed_post: Callable[..., tuple[float, Any]],
    runs: int,
    rounds: int,
    size: int,
    steps: int,
) -> dict[str, float]:
    """What the function adds (HTTP, functions-framework, validation, the backend, the PNG's
    text chunks, storage, base64 JSON) to a generation, against `direct` in this process:
    the median of paired differences, each request through the function right after the same
    seed called directly; and 8 concurrent requests through the function against 8
    sequential direct calls, medians of `rounds`. The function at `url` must serve the same
    pipeline folder with CACHE=false (so every request generates)."""
    import requests

    # Direct calls on a thread of their own, as the function's generations run (torch's CPU
    # threads behave differently in the main thread).
    caller = ThreadPoolExecutor(1)
    session = requests.Session()

    def call_direct(seed: int) -> float:
        started = time.perf_counter()
        caller.submit(direct, seed).result()
        return (time.perf_counter() - started) * 1000

    def call_function(seed: int, into: requests.Session = session) -> float:
        body = {"prompt": PROMPT, "width": size, "height": size, "steps": steps, "seed": seed}
        ms, response = timed_post(into, f"{url}/api/generate-image", json=body)
        assert response.status_code == 200, response.content[:300]
        return ms

    try:
        # Same pixels both ways: the function runs the same generation, not a cheaper one.
        body = {"prompt": PROMPT, "width": size, "height": size, "steps": steps, "seed": 1}
        _, answer = timed_post(session, f"{url}/api/generate-image", json=body)  # loads the model
        assert answer.status_code == 200, answer.content[:300]
        served = base64.b64decode(json.loads(answer.content)["imageUrl"].split(",", 1)[1])
        assert _pixels(served) == _pixels(caller.submit(direct, 1).result()), "the function made a different image"
        for warm in range(3):
            call_direct(warm), call_function(warm)

        differences, direct_ms, function_ms = [], [], []
        for run_number in range(runs):
            # Each side goes first half the time: whatever the first call leaves behind (a
            # warm cache, a core busy with the other process) favours neither.
            if run_number % 2:
                f, d = call_function(run_number), call_direct(run_number)
            else:
                d, f = call_direct(run_number), call_function(run_number)
            differences.append(f - d)
            direct_ms.append(d)
            function_ms.append(f)

        sequential_s, concurrent_s, answered = [], [], []
        with ThreadPoolExecutor(CONCURRENT) as pool:
            for _ in range(rounds):
                # New connections each round: the sequential calls take longer than gunicorn's
                # keep-alive, and a POST on a connection it is closing fails (no retry).
                sessions = [requests.Session() for _ in range(CONCURRENT)]
                started = time.perf_counter()
                caller.submit(lambda: [direct(seed) for seed in range(CONCURRENT)]).result()
                sequential_s.append(time.perf_counter() - started)

                barrier = threading.Barrier(CONCURRENT)

                def one(seed: int) -> int:
                    barrier.wait()
                    body = {"prompt": PROMPT, "width": size, "height": size, "steps": steps, "seed": seed}
                    return timed_post(sessions[seed], f"{url}/api/generate-image", json=body)[1].status_code

                started = time.perf_counter()
                statuses = list(pool.map(one, range(CONCURRENT)))
                concurrent_s.append(time.perf_counter() - started)
                answered.append(statuses.count(200))
    finally:
        caller.shutdown()
    direct_median = statistics.median(direct_ms)
    added = statistics.median(differences)
    return {
        "size": size,
        "steps": steps,
        "runs": runs,
        "rounds": rounds,
        "direct_ms": round(direct_median, 1),
        "function_ms": round(statistics.median(function_ms), 1),
        "added_ms": round(added, 1),
        "added_pct": round(100 * added / direct_median, 1),
        "allowed_ms": round(max(20.0, 0.05 * direct_median), 1),
        "sequential_8_s": round(statistics.median(sequential_s), 3),
        "concurrent_8_s": round(statistics.median(concurrent_s), 3),
        "throughput_ratio": round(statistics.median(sequential_s) / statistics.median(concurrent_s), 3),
        "concurrent_ok": min(answered),
    }


def _pixels(png: bytes) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return image.tobytes()


def local_backend(model: str) -> LocalBackend:
    """The backend as the function builds it: settings read, then the registry's create()."""
    settings = load_settings({"BACKENDS": "local", "LOCAL_MODEL": model})
    return create(settings, settings.backend_settings["local"], None)


def _bookkeeping_us(backend: LocalBackend, steps: int, repeat: int = 2000) -> float:
    """The backend's own work around one generation, without the model: take and give back
    the slot, build the arguments and generator, and run the step callback `steps` times.
    Deterministic where the end-to-end figures are at the mercy of other jobs' CPU use."""
    import torch

    from imagegen.backends.local import known_defaults, pipeline_arguments
    from imagegen.backends.local.early_stop import step_callback

    request = GenerationRequest(prompt=PROMPT, width=256, height=256, steps=steps, seed=1)
    accepts = backend._loaded.parameters  # noqa: SLF001 - a bench may look inside
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            context = GenerationContext(deadline=time.monotonic() + 600)
            backend._queue.acquire(context)  # noqa: SLF001
            pipeline_arguments(request, known_defaults(backend.default_model), accepts)
            torch.Generator(device="cpu").manual_seed(1)
            callback = step_callback(context, steps)
            for step in range(steps):
                callback(None, step, 0, {})
            backend._queue.release()  # noqa: SLF001
        samples.append((time.perf_counter() - started) / repeat * 1e6)
    return statistics.median(samples)


def print_table(f: dict[str, float], args: argparse.Namespace) -> None:
    rows = [
        ("direct pipeline call + PNG (median)", "", f"{f['direct_ms']:.1f} ms"),
        ("through LocalBackend.generate (median)", "", f"{f['backend_ms']:.1f} ms"),
        (
            "added by the backend",
            f"<= {f['allowed_ms']:.1f} ms (5% or 20 ms)",
            f"{f['added_ms']:+.1f} ms ({f['added_pct']:+.1f}%)",
        ),
        ("backend bookkeeping alone, no model (median)", "<= 20 ms", f"{f['bookkeeping_us']:.1f} us"),
        ("8 sequential direct calls (median)", "", f"{f['sequential_8_s']:.3f} s"),
        ("8 concurrent requests via the backend (median)", "", f"{f['concurrent_8_s']:.3f} s"),
        ("throughput, backend / direct", ">= 0.95", f"{f['throughput_ratio']:.3f}"),
    ]
    print(
        f"local backend, tiny pipeline {f['size']}x{f['size']}, {f['steps']} steps, CPU, "
        f"{f['torch_threads']} torch threads; {f['runs']} runs, {f['rounds']} rounds of {CONCURRENT}"
    )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    header = ("figure", "target", "measured")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


if __name__ == "__main__":
    main()
