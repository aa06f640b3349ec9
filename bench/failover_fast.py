"""Time-to-image under a misbehaving primary: patient policy (before) vs the fast defaults.
In-process (functions-framework test client), OpenAI stand-in primary, Gemini stand-in fallback,
0.5 s upstream, TIMEOUT_SECONDS=4, MAX_RETRIES=2. Prints p50/p95 and upstream calls."""
import os, random, sys, time, statistics, tempfile
sys.path.insert(0, os.getcwd())
import functions_framework
from tests.standin import Reply
from tests.fake_openai import FakeOpenAI
from tests.fake_gemini import FakeGemini

N = int(os.environ.get("N", "40")); LAT = 0.5; WARM = 20
PATIENT = {"FAILOVER_WAIT_SECONDS": "3600", "ADAPTIVE_TIMEOUT_FACTOR": "0", "CIRCUIT_FAILURES": "0"}
FAST = {}

def scenario(kind, rng):
    out = []
    for _ in range(N + 25):
        r = rng.random()
        if kind == "503x30" and r < 0.3:
            out.append(Reply(status=503, body={"error": {"message": "busy", "type": "server_error", "code": None}}, headers={"Retry-After": "1"}))
        elif kind == "hang10" and r < 0.1:
            out.append(Reply(hold_seconds=30))
        elif kind == "always503":
            out.append(Reply(status=503, body={"error": {"message": "down", "type": "server_error", "code": None}}, headers={"Retry-After": "1"}))
        else:
            out.append(Reply(hold_seconds=LAT))
    return out

def run(kind, policy, seed):
    primary, fallback = FakeOpenAI("sk-test-key-000000000000"), FakeGemini("AIzaTestKey")
    primary.start(); fallback.start()
    try:
        primary.reply(*[Reply(hold_seconds=LAT)] * WARM, *scenario(kind, random.Random(seed)))
        fallback.reply(*[Reply(hold_seconds=LAT)] * (4 * N + 100))
        env = {"BACKENDS": "openai,gemini", "OPENAI_API_KEY": "sk-test-key-000000000000", "OPENAI_BASE_URL": primary.base_url,
               "GEMINI_API_KEY": "AIzaTestKey", "GEMINI_BASE_URL": f"{fallback.url}/v1beta", "TIMEOUT_SECONDS": "4",
               "MAX_RETRIES": "2", "CACHE": "false", "IMAGE_DIR": tempfile.mkdtemp(), "RATE_LIMIT_PER_MINUTE": "0", **policy}
        for k in list(os.environ):
            if k in ("FAILOVER_WAIT_SECONDS", "ADAPTIVE_TIMEOUT_FACTOR", "CIRCUIT_FAILURES"): del os.environ[k]
        os.environ.update(env)
        client = functions_framework.create_app(target="generate_image", source="main.py").test_client()
        # warm: 20 healthy images from each route so the latency record exists (as in a running service)
        for i in range(WARM):  # a running service has a record; these are neither timed nor counted
            assert client.post("/", json={"prompt": f"warm {i}"}).status_code == 200
        warm_calls = len(primary.calls()), len(fallback.calls())
        times = []
        for i in range(N):
            t = time.monotonic()
            answer = client.post("/", json={"prompt": f"fox {i}"})
            assert answer.status_code == 200, answer.get_json()
            times.append(time.monotonic() - t)
        times.sort()
        return times[len(times)//2], times[int(0.95 * len(times)) - 1], len(primary.calls()) + len(fallback.calls()) - sum(warm_calls), len(primary.calls()) - warm_calls[0]
    finally:
        primary.stop(); fallback.stop()

for kind in sys.argv[1:] or ["503x30", "hang10", "always503"]:
    for name, policy in (("before", PATIENT), ("fast", FAST)):
        p50, p95, calls, primary_calls = run(kind, policy, 7)
        print(f"{kind:10} {name:7} p50 {p50:5.2f} s  p95 {p95:5.2f} s  upstream calls {calls} (primary {primary_calls}) for {N} images", flush=True)
