"""This function side by side with a peer: `./scripts/bench --peer litellm [--runs N]`.

The peer is LiteLLM's proxy (PEER_VERSION, pinned), installed once into its own virtual
environment, bench/.peer-venv (git-ignored; never in the project's requirements). Both services
run in one run, alternating, behind the same loopback stand-ins: an OpenAI Images API
(tests/fake_openai.py) as the primary, answering one 1024x1024 PNG, and the Gemini API
(tests/fake_gemini.py, the same PNG) as the fallback. Both have auth on, one worker process
(this function: WORKERS=1, THREADS=128; LiteLLM: one uvicorn worker), the same per-try timeout
and the same retry budget: 3 calls to the primary before the fallback. LiteLLM's router gets
`num_retries: 0` because its OpenAI image path lets the OpenAI library retry twice inside each
router attempt whatever the router says; this function gets MAX_RETRIES=2. LiteLLM's
`request_timeout` silently overrides the router's `timeout`, so both are set.

Figures (see BENCHMARKS.md for the method): added latency per request (median of round
medians of paired differences against the same request sent straight to the stand-in), a burst
of 100 with a 2 s upstream (wall time to the last answer, CPU time the service's processes used,
their peak RSS), cold start to the first image, and three misbehaving primaries (503 on 30% of
calls with `Retry-After: 1`; a 30 s hang on 10%; 503 always), each with its p95 time-to-image
and the upstream calls the service made, counted at the stand-ins.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.peer_table import Figure, Run, markdown, percentile, rows, summarize
from tests import fake_gemini, fake_openai
from tests.fake_gemini import FakeGemini
from tests.fake_openai import FakeOpenAI
from tests.servers import BIN_DIR, REPO_ROOT, child_environment, free_port, spawn, stop_group, wait_until
from tests.standin import Answer, ReceivedRequest, Reply

PEERS = ("litellm",)
PEER_VERSION = "1.108.7"  # the newest whose proxy extra installs from the package registry here
PEER_VENV = REPO_ROOT / "bench" / ".peer-venv"

VENDOR_KEY = "sk-bench-vendor-key-000000000000000"
GEMINI_KEY = "AIzaBenchKey000000000000000000000000"
CALLER_KEY = "sk-bench-caller-key-0000000000000000"  # API_KEYS here, the master key there
OPENAI_MODEL = "gpt-image-2"
GEMINI_MODEL = "gemini-2.5-flash-image"
TRY_SECONDS = 5  # one try's timeout, on both
RETRIES = 2  # retries of the primary before the fallback, on both: 3 primary calls
BURST = 100
# Healthy images each new service makes before a phase is measured: a running service's record.
WARM_IMAGES = 20
BURST_UPSTREAM_SECONDS = 2.0
STARTUP_SECONDS = 60  # LiteLLM's proxy takes several seconds to import on 2 shared cores


# -- the stand-ins ---------------------------------------------------------------------------


class PrebuiltAnswers:
    """A stand-in whose healthy answer is encoded once, then sent again as those bytes.

    Encoding the answer (the 1.70 MB PNG as base64 in JSON) took the stand-in 17 ms of its
    process's GIL per call, and that process also runs the bench's clients: in the burst it
    let answers out about 60 a second, whatever the service did, so both services mostly waited
    for it (BENCHMARKS.md). A vendor's encoding does not run on the service's machine. The bench
    asks every call in the same shape (one image, same model and size), so one answer per route
    serves all; refusals and errors still go through the stand-in's own code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._prebuilt: dict[str, Answer] = {}
        super().__init__(*args, **kwargs)

    def _generate(self, request: ReceivedRequest, match: Any, reply: Reply) -> Answer:
        answer = self._prebuilt.get(request.path)
        if answer is None:
            answer = super()._generate(request, match, reply)  # type: ignore[misc]
            if answer.status != 200 or not answer.headers.get("Content-Type", "").startswith("application/json"):
                return answer
            self._prebuilt[request.path] = answer
        return Answer(answer.status, answer.body, dict(answer.headers))


class Fallback(PrebuiltAnswers, FakeGemini):
    """The Gemini stand-in, its healthy answer prebuilt."""


class Primary(PrebuiltAnswers, FakeOpenAI):
    """The OpenAI stand-in, its answers drawn from `policy` (call number -> Reply) rather than a
    queue, so a scenario can make a share of calls fail the same way for both services."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.policy: Callable[[int], Reply] = lambda _n: Reply()
        self._count = 0

    def _next_reply(self) -> Reply:
        with self._lock:
            self._count += 1
            number = self._count
        return self.policy(number)

    def restart_count(self) -> None:
        with self._lock:
            self._count = 0

    def calls_made(self) -> int:
        return len(self.calls())


def quiet(standin):
    """The stand-in without a traceback on stderr for each keep-alive connection a stopped
    service leaves behind (the stdlib server prints every reset by peer)."""
    server = standin._server  # noqa: SLF001 - the stdlib server under tests/standin.py
    report = server.handle_error

    def handle_error(request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            report(request, client_address)

    server.handle_error = handle_error
    return standin


def error_503(retry_after: str | None = "1") -> Reply:
    reply = fake_openai.server_error(503)
    return Reply(503, reply.body, {"Retry-After": retry_after} if retry_after else {})


@dataclass
class Scenario:
    key: str
    label: str
    requests: int
    parallel: int
    policy: Callable[[threading.Event], Callable[[int], Reply]]


def every(fraction: float, number: int) -> bool:
    """Whether call `number` (1, 2, ...) is among the `fraction` that misbehave: spread evenly
    (for 0.3: calls 4, 7, 10, 14, ...), so every run and both services get exactly that share."""
    return int(number * fraction) != int((number - 1) * fraction)


def _share(fraction: float, bad: Callable[[threading.Event], Reply]):
    def make(release: threading.Event) -> Callable[[int], Reply]:
        return lambda number: bad(release) if every(fraction, number) else Reply()

    return make


SCENARIOS = (
    Scenario("flaky", "primary 503 on 30% (`Retry-After: 1`), fallback healthy: p95 time-to-image", 40, 4,
             _share(0.3, lambda _release: error_503())),
    # Reply.release holds the answer until the event is set, at most MAX_HOLD_SECONDS (30 s).
    Scenario("hangs", "primary hangs 30 s on 10%, fallback healthy: p95 time-to-image", 40, 4,
             _share(0.1, lambda release: Reply(release=release))),
    Scenario("down", "primary always 503: time to an image from the fallback (p95)", 12, 4,
             _share(1.0, lambda _release: error_503())),
)


# -- the services ----------------------------------------------------------------------------


@dataclass
class Service:
    name: str
    process: subprocess.Popen
    url: str
    started: float
    path: str
    body: Callable[[str], dict]
    headers: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {CALLER_KEY}"})

    def post(self, session: requests.Session, prompt: str) -> tuple[float, int]:
        """Milliseconds to the whole answer, and its status; the body read in one call."""
        started = time.perf_counter()
        response = session.post(self.url + self.path, json=self.body(prompt), headers=self.headers, timeout=120, stream=True)
        data = response.raw.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status_code == 200 and len(data) < 100_000:
            raise AssertionError(f"{self.name} answered 200 without an image: {data[:300]!r}")
        return elapsed, response.status_code

    def members(self) -> list[int]:
        """The service's processes: its process group (gunicorn's workers, uvicorn's, any)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _stat(int(entry.name))
                if fields and int(fields[2]) == self.process.pid:
                    found.append(int(entry.name))
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU of the processes, theirs and their reaped children's, from /proc."""
        ticks = 0
        for pid in self.members():
            fields = _stat(pid)
            if fields:
                ticks += sum(int(value) for value in fields[11:15])
        return ticks / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        total = 0
        for pid in self.members():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def stop(self) -> None:
        stop_group(self.process)


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_imagegen(primary: Primary, fallback: FakeGemini, image_dir: str) -> Service:
    port = free_port()
    env = child_environment({
        "BACKENDS": "openai,gemini",
        "OPENAI_API_KEY": VENDOR_KEY,
        "OPENAI_BASE_URL": primary.base_url,
        "OPENAI_MODEL": OPENAI_MODEL,
        "GEMINI_API_KEY": GEMINI_KEY,
        "GEMINI_BASE_URL": f"{fallback.gemini_base_url}/v1beta",
        "GEMINI_MODEL": GEMINI_MODEL,
        "AUTH_MODE": "api-key",
        "API_KEYS": CALLER_KEY,
        "CORS_ALLOWED_ORIGINS": "https://app.example.com",  # api-key mode refuses '*'
        "RATE_LIMIT_PER_MINUTE": "0",
        "CACHE": "false",
        "IMAGE_DIR": image_dir,
        "WORKERS": "1",
        "THREADS": "128",
        "MAX_RETRIES": str(RETRIES),
        "TIMEOUT_SECONDS": str(TRY_SECONDS),
        "LOG_FORMAT": "json",
    })
    started = time.perf_counter()
    process = spawn(
        [str(BIN_DIR / "functions-framework"), "--target=generate_image", "--source=main.py", "--host=127.0.0.1", f"--port={port}"],
        env, cwd=REPO_ROOT, stdout=open(Path(image_dir).parent / "imagegen.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    return Service("imagegen", process, f"http://127.0.0.1:{port}", started, "/api/generate-image", lambda p: {"prompt": p})


def litellm_config(primary_base: str, fallback_base: str) -> dict:
    """LiteLLM's proxy configuration (its config.yaml, as JSON, which YAML reads)."""
    return {
        "model_list": [
            {"model_name": "image", "litellm_params": {
                "model": f"openai/{OPENAI_MODEL}", "api_base": primary_base, "api_key": VENDOR_KEY}},
            {"model_name": "image-fallback", "litellm_params": {
                "model": f"gemini/{GEMINI_MODEL}", "api_base": fallback_base, "api_key": GEMINI_KEY}},
        ],
        "router_settings": {"num_retries": 0, "timeout": TRY_SECONDS, "fallbacks": [{"image": ["image-fallback"]}]},
        "litellm_settings": {"drop_params": True, "num_retries": 0, "request_timeout": TRY_SECONDS},
        "general_settings": {"master_key": CALLER_KEY},
    }


def start_litellm(primary: Primary, fallback: FakeGemini, tmp: str) -> Service:
    config = Path(tmp) / "litellm.yaml"
    config.write_text(json.dumps(litellm_config(primary.base_url, f"{fallback.gemini_base_url}/v1beta")))
    port = free_port()
    env = child_environment({
        # The model price map from its package, not fetched from the network at start (no
        # network here; a deployment would pin it the same way).
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOG": "ERROR",
    })
    for name in ("OPENAI_API_KEY", "GEMINI_API_KEY", "DATABASE_URL"):
        env.pop(name, None)
    started = time.perf_counter()
    process = spawn(
        [str(PEER_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "litellm.log", "ab"),  # noqa: SIM115
    )
    return Service("litellm", process, f"http://127.0.0.1:{port}", started, "/v1/images/generations",
                   lambda p: {"model": "image", "prompt": p, "n": 1})


def ensure_peer(peer: str) -> None:
    """Install the pinned peer into bench/.peer-venv, once."""
    if peer not in PEERS:
        raise SystemExit(f"unknown peer {peer!r}: the bench compares with {', '.join(PEERS)}")
    stamp = PEER_VENV / f".installed-litellm-{PEER_VERSION}"
    if stamp.exists():
        return
    print(f"installing litellm[proxy]=={PEER_VERSION} into {PEER_VENV.relative_to(REPO_ROOT)} (once, about a minute)", flush=True)
    if not (PEER_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run([str(PEER_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    f"litellm[proxy]=={PEER_VERSION}"], check=True)
    stamp.write_text(PEER_VERSION + "\n")


# -- measuring -------------------------------------------------------------------------------


def wait_image(service: Service, timeout: float) -> None:
    """Until the service answers a generation with an image (its cold start ends there)."""
    session = requests.Session()

    def answered() -> bool:
        try:
            return service.post(session, "cold")[1] == 200
        except requests.ConnectionError:
            return False

    wait_until(answered, timeout, f"{service.name}'s first image (its log is in the bench's temporary folder)", interval=0.01)


def direct_ms(session: requests.Session, primary: Primary) -> float:
    started = time.perf_counter()
    response = session.post(f"{primary.base_url}/images/generations", json={"model": OPENAI_MODEL, "prompt": "a fox", "n": 1},
                            headers={"Authorization": f"Bearer {VENDOR_KEY}"}, timeout=60, stream=True)
    response.raw.read()
    assert response.status_code == 200, response.status_code
    return (time.perf_counter() - started) * 1000


def measure_added(services: list[Service], primary: Primary, rounds: int, per_round: int) -> list[float]:
    """Each service's median (over rounds) of its round's median of (service - direct) ms. In
    each step the direct call and every service's call follow each other, in an order that
    rotates, so a slow moment hits all alike."""
    direct = requests.Session()
    sessions = [requests.Session() for _ in services]
    for _ in range(5):
        direct_ms(direct, primary)
        for service, session in zip(services, sessions, strict=True):
            service.post(session, "warm")
    medians: list[list[float]] = [[] for _ in services]
    for _ in range(rounds):
        differences: list[list[float]] = [[] for _ in services]
        for step in range(per_round):
            order = list(range(len(services) + 1))
            order = order[step % len(order):] + order[: step % len(order)]
            times: dict[int, float] = {}
            for index in order:
                if index == len(services):
                    times[index] = direct_ms(direct, primary)
                else:
                    ms, status = services[index].post(sessions[index], "a fox")
                    assert status == 200, f"{services[index].name}: {status}"
                    times[index] = ms
            for index in range(len(services)):
                differences[index].append(times[index] - times[len(services)])
        for index in range(len(services)):
            medians[index].append(statistics.median(differences[index]))
    return [statistics.median(m) for m in medians]


def measure_burst(service: Service, primary: Primary) -> tuple[float, float, float, int, list[float]]:
    """Wall seconds to the last of BURST answers (each upstream call held 2 s), CPU seconds the
    service used meanwhile, its peak RSS in MB (sampled every 20 ms), how many got an image, and
    each request's seconds."""
    primary.policy = lambda _n: Reply(hold_seconds=BURST_UPSTREAM_SECONDS)
    peak = [service.rss_mb()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], service.rss_mb())

    sampler = threading.Thread(target=sample)
    try:
        with ThreadPoolExecutor(BURST) as pool:
            cpu = service.cpu_seconds()
            sampler.start()
            started = time.perf_counter()
            answers = list(pool.map(lambda i: service.post(requests.Session(), f"burst {i}"), range(BURST)))
            wall = time.perf_counter() - started
            cpu = service.cpu_seconds() - cpu
    finally:
        done.set()
        if sampler.is_alive():
            sampler.join()
        primary.policy = lambda _n: Reply()
    return wall, cpu, peak[0], [status for _ms, status in answers].count(200), [ms / 1000 for ms, _status in answers]


def measure_scenario(service: Service, primary: Primary, fallback: FakeGemini, scenario: Scenario) -> dict:
    """p95 seconds to an image, how many got one, and the upstream calls made, per request."""
    release = threading.Event()
    before = (primary.calls_made(), len(fallback.calls()))
    primary.policy = scenario.policy(release)
    primary.restart_count()
    local = threading.local()

    def one(index: int) -> tuple[float, int]:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        return service.post(local.session, f"{scenario.key} {index}")

    try:
        with ThreadPoolExecutor(scenario.parallel) as pool:
            results = list(pool.map(one, range(scenario.requests)))
    finally:
        release.set()  # free the stand-in's held answers (their callers gave up long ago)
        primary.policy = lambda _n: Reply()
    seconds = [ms / 1000 for ms, status in results if status == 200]
    return {
        "p95": percentile(seconds, 95) if seconds else float("nan"),
        "ok": len(seconds),
        "primary": (primary.calls_made() - before[0]) / scenario.requests,
        "fallback": (len(fallback.calls()) - before[1]) / scenario.requests,
    }


FIGURES = (
    Figure("added", "added latency per request (median of rounds × pairs)", "ms"),
    Figure("burst_wall", f"burst of {BURST}, {BURST_UPSTREAM_SECONDS:g} s upstream: wall to last answer", "s", 2),
    Figure("burst_cpu", "burst: CPU used by the service", "s", 2),
    Figure("burst_rss", "burst: peak RSS", "MB", 0),
    Figure("cold", "cold start to first image", "s", 2),
    *(item for scenario in SCENARIOS for item in (
        Figure(scenario.key, scenario.label, "s", 2),
        Figure(f"{scenario.key}_calls", f"{scenario.key}: upstream calls per request (primary + fallback)", "", 2),
    )),
)


def start_both(
    primary: Primary, fallback: FakeGemini, tmp: str, label: str, healthy: Callable[[int], Reply] = lambda _n: Reply()
) -> list[Service]:
    """Both services, new, each past its first image and WARM_IMAGES healthy ones (`healthy`: the
    primary's answers while it is well, e.g. its usual latency): what a service that has been
    running sees. A new pair for every phase, so that nothing one phase taught a service (this
    function's open circuits and latency record, LiteLLM's cooldowns) carries into the next."""
    services: list[Service] = []
    try:
        services.append(start_imagegen(primary, fallback, f"{tmp}/images-{label}"))
        services.append(start_litellm(primary, fallback, tmp))
        primary.policy = healthy
        for service in services:
            wait_image(service, STARTUP_SECONDS)
            with ThreadPoolExecutor(WARM_IMAGES) as pool:
                list(pool.map(lambda index, service=service: service.post(requests.Session(), f"warm {index}"), range(WARM_IMAGES)))
        primary.policy = lambda _n: Reply()
    except BaseException:
        for service in services:
            service.stop()
        raise
    return services


def one_run(png: bytes, tmp: str, rounds: int, per_round: int, cold_rounds: int, log: Callable[[str], None]) -> tuple[Run, list[str]]:
    """Every figure for both services, alternating; and lines of detail (calls, failures)."""
    for module in (fake_openai, fake_gemini):
        module.make_image = lambda *args, **kwargs: png
    primary = quiet(Primary(VENDOR_KEY)).start()
    fallback = quiet(Fallback(GEMINI_KEY)).start()
    run: Run = {}
    notes: list[str] = []
    try:
        services = start_both(primary, fallback, tmp, "added")
        try:
            log("added latency")
            run["added"] = tuple(measure_added(services, primary, rounds, per_round))  # type: ignore[assignment]
        finally:
            for service in services:
                service.stop()
        for scenario in SCENARIOS:
            log(scenario.key)
            services = start_both(primary, fallback, tmp, scenario.key)
            try:
                found = [measure_scenario(service, primary, fallback, scenario) for service in services]
            finally:
                for service in services:
                    service.stop()
            run[scenario.key] = (found[0]["p95"], found[1]["p95"])
            run[f"{scenario.key}_calls"] = tuple(f["primary"] + f["fallback"] for f in found)  # type: ignore[assignment]
            notes.append(f"{scenario.key}: " + "; ".join(
                f"{s.name} {f['ok']}/{scenario.requests} images, {f['primary']:.2f} primary + {f['fallback']:.2f} fallback calls per request"
                for s, f in zip(services, found, strict=True)))
        log("burst")
        # The burst's upstream always takes BURST_UPSTREAM_SECONDS: that is the primary's usual latency.
        services = start_both(primary, fallback, tmp, "burst", lambda _n: Reply(hold_seconds=BURST_UPSTREAM_SECONDS))
        try:
            bursts = [measure_burst(service, primary) for service in services]
        finally:
            for service in services:
                service.stop()
        run["burst_wall"] = (bursts[0][0], bursts[1][0])
        run["burst_cpu"] = (bursts[0][1], bursts[1][1])
        run["burst_rss"] = (bursts[0][2], bursts[1][2])
        notes.append("burst: " + "; ".join(
            f"{s.name} {b[3]}/{BURST} images, each in {statistics.median(b[4]):.2f} s (median), {max(b[4]):.2f} s (slowest)"
            for s, b in zip(services, bursts, strict=True)))
        log("cold start")
        run["cold"] = tuple(measure_cold(primary, fallback, tmp, cold_rounds))  # type: ignore[assignment]
    finally:
        primary.stop()
        fallback.stop()
    return run, notes


def measure_cold(primary: Primary, fallback: FakeGemini, tmp: str, rounds: int) -> list[float]:
    """Median seconds from process start to the first image, for each service, alternating."""
    times: list[list[float]] = [[], []]
    for index in range(rounds):
        for position, start in enumerate((lambda: start_imagegen(primary, fallback, f"{tmp}/cold{index}"), lambda: start_litellm(primary, fallback, tmp))):
            service = start()
            try:
                wait_image(service, STARTUP_SECONDS)
                times[position].append(time.perf_counter() - service.started)
            finally:
                service.stop()
    return [statistics.median(t) for t in times]


def main(peer: str, runs: int, quick: bool, png: bytes, tmp: str) -> None:
    ensure_peer(peer)
    rounds, per_round, cold_rounds = (3, 10, 1) if quick else (7, 20, 3)
    load_before = os.getloadavg()
    results: list[Run] = []
    notes: list[str] = []
    for number in range(runs):
        def log(what: str, number: int = number) -> None:
            print(f"run {number + 1}/{runs}: {what}", file=sys.stderr, flush=True)

        run, run_notes = one_run(png, f"{tmp}", rounds, per_round, cold_rounds, log=log)
        results.append(run)
        notes.extend(f"run {number + 1}: {line}" for line in run_notes)
    load_after = os.getloadavg()
    print(f"\nimagegen vs LiteLLM {PEER_VERSION} proxy: {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"PNG {len(png) / 1e6:.2f} MB, {runs} run(s){' (quick)' if quick else ''}; ratio = this function / LiteLLM, per run")
    print(f"load average before {_load(load_before)}, after {_load(load_after)}\n")
    print(markdown(("figure", "this function", "LiteLLM", "ratio"), rows(results, FIGURES)))
    print()
    if runs > 1:
        for figure in FIGURES:
            ours, theirs, _ratios = summarize(results, figure.key)
            print(f"{figure.key} per run: this function {_values(ours, figure.digits)}; LiteLLM {_values(theirs, figure.digits)}")
    for line in notes:
        print(line)


def _values(values: list[float], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _load(values: tuple[float, float, float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)
