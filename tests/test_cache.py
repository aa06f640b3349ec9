"""The cache and single-flight, checked by counting upstream calls, never by timing."""

from __future__ import annotations

import base64
import json
import threading
import uuid

import flask
import pytest
import requests
import responses

from imagegen.cache import cache_key, cached_image_name
from imagegen.state.single_flight import SingleFlight
from imagegen.config import load_settings
from tests.clients import handler_with_parts
from imagegen.domain import GenerationRequest
from tests.conftest import TEST_TOKEN
from tests.fake_router import Reply, make_png
from tests.servers import wait_until

MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
URL = f"https://router.huggingface.co/hf-inference/models/{MODEL}"
IDENTITY = "huggingface https://router.huggingface.co 0123456789abcdef hf-inference"
SEEDED = {"prompt": "a red fox", "seed": 42, "width": 256, "height": 256}


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(URL, body=make_png(256, 256), content_type="image/png")
        yield rsps


def upstream_calls(mocked) -> int:
    return sum(1 for call in mocked.calls if call.request.method == "POST")


def image_of(answer) -> bytes:
    return base64.b64decode(answer.get_json()["imageUrl"].split(",", 1)[1])


def test_a_seeded_repeat_is_answered_from_storage(make_app, mocked):
    app = make_app()
    first, second = app.post("/", json=SEEDED), app.post("/", json=SEEDED)
    assert upstream_calls(mocked) == 1
    assert (first.get_json()["cached"], second.get_json()["cached"]) == (False, True)
    assert image_of(first) == image_of(second)
    assert first.get_json()["filePath"] == second.get_json()["filePath"]
    assert "/seeded/a-red-fox-" in second.get_json()["filePath"]
    assert second.get_json()["provider"] == "hf-inference" and second.get_json()["seed"] == 42


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a red fox!"},
        {"negativePrompt": "blur"},
        {"width": 264},
        {"height": 264},
        {"steps": 5},
        {"guidanceScale": 2},
        {"seed": 43},
        {"model": "black-forest-labs/FLUX.1-schnell"},
    ],
)
def test_any_difference_in_the_recipe_is_a_miss(make_app, mocked, change):
    mocked.post("https://router.huggingface.co/hf-inference/models/black-forest-labs/FLUX.1-schnell", body=make_png(), content_type="image/png")
    app = make_app(HF_ALLOWED_MODELS="black-forest-labs/FLUX.1-schnell")
    app.post("/", json=SEEDED)
    assert app.post("/", json={**SEEDED, **change}).get_json()["cached"] is False
    assert upstream_calls(mocked) == 2


def test_requests_without_a_seed_are_never_cached(make_app, mocked):
    app = make_app()
    answers = [app.post("/", json={"prompt": "a red fox"}).get_json() for _ in range(2)]
    assert upstream_calls(mocked) == 2 and not any(answer["cached"] for answer in answers)


def test_cache_false_turns_it_off(make_app, mocked):
    app = make_app(CACHE="false")
    assert [app.post("/", json=SEEDED).get_json()["cached"] for _ in range(2)] == [False, False]
    assert upstream_calls(mocked) == 2


def test_cache_hits_do_not_use_up_the_rate_limit(make_app, mocked):
    app = make_app(RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="1")
    assert [app.post("/", json=SEEDED).status_code for _ in range(4)] == [200, 200, 200, 200]
    assert app.post("/", json={**SEEDED, "seed": 1}).status_code == 429


def test_the_key_covers_the_provider_too():
    base = GenerationRequest(prompt="p", seed=1)
    assert cache_key(base, "hf", "a/b") != cache_key(GenerationRequest(prompt="p", seed=1, provider="auto"), "hf", "a/b")
    assert cached_image_name(base, "hf", "a/b").startswith("seeded/p-") and len(cache_key(base, "hf", "a/b")) == 40


def test_the_key_covers_the_backend_its_endpoint_and_account():
    base = GenerationRequest(prompt="p", seed=1)
    keys = {
        cache_key(base, identity, "a/b")
        for identity in ("huggingface https://router.huggingface.co acct1", "huggingface http://127.0.0.1:9 acct1", "huggingface https://router.huggingface.co acct2", "openai https://api.openai.com/v1 acct1")
    }
    assert len(keys) == 4


# --- single-flight -------------------------------------------------------------------------


def test_single_flight_shares_one_outcome():
    flights: SingleFlight[int] = SingleFlight()
    release, calls, results = threading.Event(), [], []

    def work() -> int:
        calls.append(1)
        release.wait(10)
        return 7

    threads = [threading.Thread(target=lambda: results.append(flights.do("k", work, timeout=10))) for _ in range(5)]
    threads[0].start()
    wait_until(lambda: len(calls) == 1, 5, "the leader to start")
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: flights.waiters("k") == 4, 5, "the followers to wait")
    release.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and sorted(results) == [(7, False)] + [(7, True)] * 4


def test_single_flight_passes_the_leaders_error_on_and_forgets_it():
    flights: SingleFlight[int] = SingleFlight()
    started, release = threading.Event(), threading.Event()
    errors = []

    def failing() -> int:
        started.set()
        release.wait(10)
        raise ValueError("upstream said no")

    def call() -> None:
        try:
            flights.do("k", failing, timeout=10)
        except ValueError as error:
            errors.append(str(error))

    leader = threading.Thread(target=call)
    leader.start()
    started.wait(5)
    follower = threading.Thread(target=call)
    follower.start()
    wait_until(lambda: flights.waiters("k") == 1, 5, "the follower to wait")
    release.set()
    leader.join(10)
    follower.join(10)
    assert errors == ["upstream said no"] * 2
    assert flights.do("k", lambda: 1, timeout=1) == (1, False)  # the failure was not kept


def test_identical_requests_in_flight_make_one_upstream_call(make_settings, router, tmp_path):
    settings = load_settings({"HUGGING_FACE_API_KEY": TEST_TOKEN, "HF_ROUTER_URL": router.url, "IMAGE_DIR": str(tmp_path), "RATE_LIMIT_PER_MINUTE": "0"})
    handler, dispatcher, state = handler_with_parts(settings)
    app = flask.Flask("t")
    app.add_url_rule("/", "h", lambda: handler(flask.request), methods=["POST"])
    held = threading.Event()
    router.reply(Reply(release=held))
    answers = []

    def call() -> None:
        with app.test_client() as client:
            answer = client.post("/", json=SEEDED)
            answers.append((answer.status_code, answer.get_json()["cached"], image_of(answer)))

    threads = [threading.Thread(target=call) for _ in range(5)]
    threads[0].start()
    wait_until(lambda: len(router.posts()) == 1, 10, "the first request to reach the router")
    for thread in threads[1:]:
        thread.start()
    backend = dispatcher.backends["huggingface"]
    key = cached_image_name(GenerationRequest(prompt="a red fox", width=256, height=256, seed=42), backend.identity(), MODEL)
    wait_until(lambda: state._flights.waiters(key) == 4, 10, "the identical requests to wait")
    held.set()
    for thread in threads:
        thread.join(20)
    assert len(router.posts()) == 1
    assert sorted(cached for _, cached, _ in answers) == [False, True, True, True, True]
    assert {status for status, _, _ in answers} == {200} and len({image for _, _, image in answers}) == 1


# --- across instances, through a shared bucket ------------------------------------------------


def test_two_instances_share_the_cache_through_the_bucket(run_function, router, storage_emulator, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", storage_emulator.url)
    from google.cloud import storage

    bucket = storage.Client().create_bucket(f"cache-{uuid.uuid4().hex[:12]}")
    env = {
        "HUGGING_FACE_API_KEY": TEST_TOKEN,
        "HF_ROUTER_URL": router.url,
        "IMAGE_BUCKET": bucket.name,
        "STORAGE_EMULATOR_HOST": storage_emulator.url,
    }
    first, second = run_function(**env), run_function(**env)
    made = requests.post(f"{first.url}/", json=SEEDED, timeout=30).json()
    reused = requests.post(f"{second.url}/", json=SEEDED, timeout=30).json()
    assert len(router.posts()) == 1
    assert (made["cached"], reused["cached"]) == (False, True)
    assert made["filePath"] == reused["filePath"] and made["filePath"].startswith(f"gs://{bucket.name}/images/seeded/")
    assert made["imageUrl"] == reused["imageUrl"]


def test_a_follower_that_waits_too_long_gets_a_504(make_settings, monkeypatch, mocked):
    import imagegen.http
    import imagegen.service

    monkeypatch.setattr(imagegen.service, "SINGLE_FLIGHT_GRACE_SECONDS", 0)
    handler, _, state = handler_with_parts(make_settings(DEADLINE_SECONDS="1", RATE_LIMIT_PER_MINUTE="0"))
    monkeypatch.setattr(state._flights, "do", lambda *a, **k: (_ for _ in ()).throw(TimeoutError()))
    app = flask.Flask("t")
    app.add_url_rule("/", "h", lambda: handler(flask.request), methods=["POST"])
    answer = app.test_client().post("/", json=SEEDED)
    assert answer.status_code == 504 and answer.get_json()["code"] == "upstream_timeout"


def test_the_cache_key_of_valid_text_is_unchanged():
    # Stored images are found by this key: for any valid text it must stay what it was.
    import hashlib

    generation = GenerationRequest(prompt="a red fox, 東京 🦊", model=MODEL, negative_prompt="blurry", seed=42)
    recipe = {
        "v": 2, "backend": IDENTITY, "provider": None, "model": MODEL, "prompt": generation.prompt,
        "negativePrompt": "blurry", "width": None, "height": None, "steps": None, "guidanceScale": None, "seed": 42,
    }
    canonical = json.dumps(recipe, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert cache_key(generation, IDENTITY, MODEL) == hashlib.sha256(canonical.encode()).hexdigest()[:40]
