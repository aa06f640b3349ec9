"""Per-backend figures for ./scripts/bench: what the function adds to each HTTP backend, and
its cold start with that backend configured.

Each backend's loopback stand-in (tests/fake_*.py) answers a realistic 1.7 MB PNG in the
vendor's own wire format (raw bytes, base64 in JSON, or a URL to download). The added latency
is the median, over rounds, of paired differences: the request sent through the function
minus the same vendor request sent straight to the stand-in (for Replicate, the prediction and
the image download), alternated request by request so that a slow moment hits both alike.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import requests

from tests import fake_gemini, fake_openai, fake_replicate, fake_stability

KEY = "sk-bench-key-0000000000000000000000"
PROMPT = "a fox"


@dataclass(frozen=True)
class BackendBench:
    name: str
    start: Callable[[], object]  # the started stand-in
    env: Callable[[object], dict[str, str]]  # the function's settings for it
    direct: Callable[[requests.Session, object], requests.Response]  # the same call, straight


def _openai_direct(session: requests.Session, server) -> requests.Response:
    return session.post(
        f"{server.base_url}/images/generations",
        json={"model": "gpt-image-2", "prompt": PROMPT, "n": 1, "output_format": "png"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )


def _gemini_direct(session: requests.Session, server) -> requests.Response:
    body = {
        "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "1:1"}},
    }
    return session.post(
        f"{server.gemini_base_url}/v1beta/models/gemini-2.5-flash-image:generateContent",
        json=body,
        headers={"x-goog-api-key": KEY},
        timeout=60,
    )


def _stability_direct(session: requests.Session, server) -> requests.Response:
    form = {"prompt": (None, PROMPT), "output_format": (None, "png"), "seed": (None, "1")}
    return session.post(
        f"{server.base_url}/v2beta/stable-image/generate/core",
        files=form,
        headers={"Authorization": f"Bearer {KEY}", "Accept": "image/*"},
        timeout=60,
    )


def _replicate_direct(session: requests.Session, server) -> requests.Response:
    created = session.post(
        f"{server.base_url}/v1/models/black-forest-labs/flux-schnell/predictions",
        json={"input": {"prompt": PROMPT, "seed": 1, "go_fast": False, "output_format": "png"}},
        headers={"Authorization": f"Bearer {KEY}", "Prefer": "wait=60"},
        timeout=60,
    )
    return session.get(created.json()["output"][0], timeout=60)


BACKENDS = (
    BackendBench(
        "openai",
        lambda: fake_openai.FakeOpenAI(KEY).start(),
        lambda s: {"BACKENDS": "openai", "OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": s.base_url},
        _openai_direct,
    ),
    BackendBench(
        "gemini",
        lambda: fake_gemini.FakeGemini(KEY).start(),
        lambda s: {"BACKENDS": "gemini", "GEMINI_API_KEY": KEY, "GEMINI_BASE_URL": f"{s.gemini_base_url}/v1beta"},
        _gemini_direct,
    ),
    BackendBench(
        "stability",
        lambda: fake_stability.FakeStability(KEY).start(),
        lambda s: {"BACKENDS": "stability", "STABILITY_API_KEY": KEY, "STABILITY_BASE_URL": s.base_url},
        _stability_direct,
    ),
    BackendBench(
        "replicate",
        lambda: fake_replicate.FakeReplicate(KEY).start(),
        lambda s: {"BACKENDS": "replicate", "REPLICATE_API_TOKEN": KEY, "REPLICATE_BASE_URL": s.base_url},
        _replicate_direct,
    ),
)


def serve_this_image(png: bytes) -> None:
    """Every stand-in answers `png` (whatever size was asked), as a real model's output would be."""
    for module in (fake_openai, fake_gemini, fake_stability, fake_replicate):
        module.make_image = lambda *args, png=png, **kwargs: png


def measure_backend(bench: BackendBench, start_function, wait_ready, timed_post, tmp: str, rounds: int, per_round: int):
    """(median added ms, direct ms, through ms) for one backend."""
    server = bench.start()
    function = start_function("http://127.0.0.1:9", f"{tmp}/{bench.name}", CACHE="false", **bench.env(server))
    try:
        wait_ready(function)
        direct, through = requests.Session(), requests.Session()
        url = f"{function.url}/api/generate-image"
        for _ in range(3):
            bench.direct(direct, server)
            timed_post(through, url, json={"prompt": PROMPT})
        added, direct_all, through_all = [], [], []
        for _ in range(rounds):
            differences = []
            for _ in range(per_round):
                started = _now()
                response = bench.direct(direct, server)
                d = (_now() - started) * 1000
                assert response.status_code in (200, 201), response.text[:200]
                t, answer = timed_post(through, url, json={"prompt": PROMPT, "seed": 1})
                assert answer.status_code == 200, answer.text[:300]
                differences.append(t - d)
                direct_all.append(d)
                through_all.append(t)
            added.append(statistics.median(differences))
        return statistics.median(added), statistics.median(direct_all), statistics.median(through_all)
    finally:
        function.stop()
        server.stop()


def measure_cold_start(bench: BackendBench, start_function, tmp: str, rounds: int, wait_until) -> float:
    server = bench.start()
    times = []
    try:
        for index in range(rounds):
            function = start_function("http://127.0.0.1:9", f"{tmp}/{bench.name}-cold{index}", CACHE="false", **bench.env(server))
            try:

                def answered(function=function) -> bool:
                    try:
                        return requests.post(f"{function.url}/", json={"prompt": "cold"}, timeout=5).status_code == 200
                    except requests.ConnectionError:
                        return False

                wait_until(answered, 30, f"the first {bench.name} answer", interval=0.005)
                times.append((_now() - function.started) * 1000)
            finally:
                function.stop()
    finally:
        server.stop()
    return statistics.median(times)


def _now() -> float:
    import time

    return time.perf_counter()
