"""Server-Sent Events on the generation endpoint: the events, the final answer, keep-alive, the
10 MB cap, and cancel, through the Flask test client and through the real function process."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest

from imagegen import streaming
from tests.clients import HuggingFaceClient
from tests.conftest import TEST_TOKEN
from tests.contract import validate_body
from tests.fake_router import Reply
from tests.servers import wait_until

STREAM = {"Accept": "text/event-stream"}


def parse_events(raw: bytes) -> list[tuple[str, dict | None]]:
    """(event name, data) per event; comment lines come back as ("comment", None)."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block:
            continue
        if block.startswith(":"):
            events.append(("comment", None))
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def names(events) -> list[str]:
    return [name for name, _ in events]


# --- the events ---------------------------------------------------------------------------------


def test_demo_stream_sends_progress_in_order_then_the_json_answer(make_app):
    app = make_app(BACKENDS="demo", DEMO_STEP_SECONDS="0.01", CORS_ALLOWED_ORIGINS="https://app.example")
    answer = app.post("/", json={"prompt": "a fox", "width": 256, "height": 384}, headers={**STREAM, "Origin": "https://app.example"})
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/event-stream"
    assert answer.headers["Cache-Control"] == "no-store" and answer.headers["X-Accel-Buffering"] == "no"
    assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
    events = parse_events(answer.data)
    assert names(events) == ["accepted", "attempt", "progress", "progress", "progress", "progress", "result"]
    assert events[0][1] == {"requestId": answer.headers["X-Request-Id"]}
    assert events[1][1] == {"backend": "demo", "provider": None, "model": "placeholder"}
    assert [data["step"] for _, data in events[2:6]] == [1, 2, 3, 4] and events[5][1]["fraction"] == 1.0
    result = events[-1][1]
    assert (result["backend"], result["width"], result["height"], result["seed"], result["filePath"]) == ("demo", 256, 384, None, None)
    assert "placeholder" in result["warning"]
    # The plain answer is the same object.
    plain = app.post("/", json={"prompt": "a fox", "width": 256, "height": 384}).get_json()
    assert {k: v for k, v in plain.items() if k != "imageUrl"} == {k: v for k, v in result.items() if k != "imageUrl"}


def test_only_an_explicit_accept_streams(make_app):
    app = make_app(BACKENDS="demo", DEMO_STEP_SECONDS="0")
    for accept in ("*/*", "application/json", "text/*", "text/event-stream;q=0"):
        answer = app.post("/", json={"prompt": "x"}, headers={"Accept": accept})
        assert answer.mimetype == "application/json", accept
    assert app.post("/", json={"prompt": "x"}, headers={"Accept": "application/json, text/event-stream"}).mimetype == "text/event-stream"


def test_refusals_answer_plain_json_before_any_stream(make_app):
    app = make_app(BACKENDS="demo", DEMO_STEP_SECONDS="0", RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="1")
    invalid = app.post("/", json={"prompt": "x", "steps": 0}, headers=STREAM)
    assert invalid.status_code == 400 and invalid.mimetype == "application/json" and invalid.get_json()["field"] == "steps"
    assert app.post("/", json={"prompt": "x"}, headers=STREAM).mimetype == "text/event-stream"
    limited = app.post("/", json={"prompt": "x"}, headers=STREAM)
    assert limited.status_code == 429 and limited.get_json()["code"] == "rate_limited"


def test_no_backend_and_no_credentials_answer_plain_json(make_app):
    unconfigured = make_app(HUGGING_FACE_API_KEY="")
    refused = unconfigured.post("/", json={"prompt": "x"}, headers=STREAM)
    assert refused.status_code == 500 and refused.get_json()["code"] == "missing_api_key"
    locked = make_app(AUTH_MODE="api-key", API_KEYS="k" * 20, CORS_ALLOWED_ORIGINS="https://a.example")
    assert locked.post("/", json={"prompt": "x"}, headers=STREAM).status_code == 401


def test_retry_and_stored_events_then_result(make_app, router):
    router.reply_error(503, "Service Unavailable", {"Retry-After": "0"})
    app = make_app(HF_ROUTER_URL=router.url, MAX_RETRIES="1")
    answer = app.post("/", json={"prompt": "a fox", "seed": 5}, headers=STREAM)
    events = parse_events(answer.data)
    assert names(events) == ["accepted", "attempt", "retry", "attempt", "stored", "result"]
    validate_body(json.dumps(events[-1][1]), "GenerationSuccess")
    assert events[2][1] == {"reason": "upstream_unavailable", "status": 503, "waitSeconds": 0}
    assert events[1][1] == {"backend": "huggingface", "provider": "hf-inference", "model": events[1][1]["model"]}
    assert events[4][1]["filePath"] == events[5][1]["filePath"]
    # The same request again: from the cache, no upstream call, no progress to tell.
    again = parse_events(app.post("/", json={"prompt": "a fox", "seed": 5}, headers=STREAM).data)
    assert names(again) == ["accepted", "result"] and again[-1][1]["cached"] is True
    assert len(router.posts()) == 2


def test_failover_event_names_both_ends(make_app, router):
    router.reply_error(500, "boom")
    app = make_app(HF_ROUTER_URL=router.url, BACKENDS="huggingface,demo", DEMO_STEP_SECONDS="0")
    events = parse_events(app.post("/", json={"prompt": "a fox"}, headers=STREAM).data)
    assert names(events)[:4] == ["accepted", "attempt", "failover", "attempt"]
    assert events[2][1] == {"from": "huggingface/hf-inference", "to": "demo"}
    assert events[-1][0] == "result" and events[-1][1]["backend"] == "demo"


def test_an_upstream_failure_is_one_error_event_with_the_json_error_and_its_status(make_app, router):
    app = make_app(HF_ROUTER_URL=router.url)
    router.reply_error(402, "You have exceeded your monthly included credits for Inference Providers.")
    plain = app.post("/", json={"prompt": "a fox"})
    router.reply_error(402, "You have exceeded your monthly included credits for Inference Providers.")
    answer = app.post("/", json={"prompt": "a fox"}, headers=STREAM)
    events = parse_events(answer.data)
    assert names(events) == ["accepted", "attempt", "error"]
    error = events[-1][1]
    assert error.pop("status") == plain.status_code == 502
    validate_body(json.dumps(error), "Error")
    import re

    def same(payload: dict) -> dict:  # the vendor's own request id differs per call
        return {**payload, "error": re.sub(r"request id Root=\w+", "request id X", payload["error"])}

    assert same(error) == same({**plain.get_json(), "requestId": answer.headers["X-Request-Id"]})


def test_keepalive_comments_fill_silence(make_app, monkeypatch):
    monkeypatch.setattr(streaming, "KEEPALIVE_SECONDS", 0.05)
    app = make_app(BACKENDS="demo", DEMO_STEP_SECONDS="0.3")
    events = parse_events(app.post("/", json={"prompt": "slow"}, headers=STREAM).data)
    between = names(events)[names(events).index("attempt") : names(events).index("result")]
    assert "comment" in between and between.count("progress") == 4


def noisy_png(side: int) -> bytes:
    import io
    import os

    from PIL import Image

    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


def test_a_result_over_the_stream_cap_comes_without_the_image(make_app, router, monkeypatch):
    monkeypatch.setattr(streaming, "MAX_STREAM_BYTES", 20_000)  # a 128x128 noise PNG is ~49 KB
    app = make_app(HF_ROUTER_URL=router.url)
    router.reply(Reply(body=noisy_png(128), headers={"Content-Type": "image/png"}))
    answer = app.post("/", json={"prompt": "a fox", "seed": 9}, headers=STREAM)
    assert len(answer.data) <= 20_000
    result = parse_events(answer.data)[-1][1]
    assert result["success"] is True and result["imageUrl"] is None and result["width"] == 128
    assert "too large for a streamed answer" in result["warning"] and result["filePath"] in result["warning"]
    assert "seed 9" in result["warning"]
    # As the warning says: the same request without streaming gets the image, from the cache.
    plain = app.post("/", json={"prompt": "a fox", "seed": 9}).get_json()
    assert plain["imageUrl"].startswith("data:image/png;base64,") and plain["cached"] is True
    # Just under the cap, the image comes with the result.
    monkeypatch.setattr(streaming, "MAX_STREAM_BYTES", 200_000)
    whole = parse_events(app.post("/", json={"prompt": "a fox", "seed": 9}, headers=STREAM).data)[-1][1]
    assert whole["imageUrl"] == plain["imageUrl"]


def test_closing_the_stream_cancels_the_work(make_app, caplog):
    app = make_app(BACKENDS="demo", DEMO_STEP_SECONDS="1")
    caplog.set_level(logging.INFO, logger="imagegen")
    answer = app.post("/", json={"prompt": "stop me"}, headers=STREAM, buffered=False)
    chunks = iter(answer.response)
    assert next(chunks).startswith(b"event: accepted")
    assert next(chunks).startswith(b"event: attempt")
    closed = time.monotonic()
    answer.close()  # what the server does when writing to a gone caller fails

    def logged():
        return [r for r in caplog.records if r.getMessage().startswith("POST / ")]

    wait_until(lambda: logged(), 5, "the request's log line")
    # The demo had 4 s of steps left: its wait woke at once.
    assert time.monotonic() - closed < 0.9
    line = logged()[0]
    assert line.getMessage().startswith("POST / 499 cancelled")
    assert line.fields["imagegen"]["clientClosed"] is True and "backend" not in line.fields["imagegen"]


# --- the real function process ------------------------------------------------------------------


def open_stream(url: str, body: dict, accept: str = "text/event-stream") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    payload = json.dumps(body).encode()
    sock.sendall(
        f"POST / HTTP/1.1\r\nHost: {host}\r\nAccept: {accept}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before {marker!r}; got {seen[-500:]!r}")
        seen += chunk
    return seen


def log_lines(function) -> list[dict]:
    lines = []
    for line in function.log().splitlines():
        if line.startswith("{") and '"requestMethod": "POST"' in line:
            lines.append(json.loads(line))
    return lines


def test_events_arrive_as_they_happen_through_functions_framework(run_function, router, tmp_path):
    function = run_function(HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, IMAGE_DIR=str(tmp_path))
    held = threading.Event()
    router.reply(Reply(release=held))
    sock = open_stream(function.url, {"prompt": "live"})
    try:
        head = read_until(sock, b"event: attempt")  # while the upstream still holds its answer
        assert b"200 OK" in head and b"text/event-stream" in head and b"Transfer-Encoding: chunked" in head
        held.set()
        rest = read_until(sock, b"\r\n0\r\n\r\n")
        assert b"event: stored" in rest and b"event: result" in rest
    finally:
        sock.close()


def test_a_caller_leaving_during_a_retry_wait_stops_the_retry(run_function, router, tmp_path):
    function = run_function(
        HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, MAX_RETRIES="2", IMAGE_DIR=str(tmp_path)
    )
    router.reply_error(503, "Service Unavailable", {"Retry-After": "20"})
    sock = open_stream(function.url, {"prompt": "wait for me"})
    read_until(sock, b"event: retry")
    left = time.monotonic()
    sock.close()
    wait_until(lambda: log_lines(function), 10, "the stream's log line")
    assert time.monotonic() - left < 5  # not the 20 s the retry would have waited
    entry = log_lines(function)[0]
    assert entry["httpRequest"]["status"] == 499 and entry["imagegen"]["code"] == "cancelled"
    assert [a["status"] for a in entry["imagegen"]["attempts"]] == [503]
    assert len(router.posts()) == 1  # and no second attempt ever went out


def test_a_call_in_flight_still_stores_its_image_for_a_seeded_retry(run_function, router, tmp_path):
    images = tmp_path / "images"
    function = run_function(HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, IMAGE_DIR=str(images))
    held = threading.Event()
    router.reply(Reply(release=held))
    sock = open_stream(function.url, {"prompt": "paid for", "seed": 21})
    read_until(sock, b"event: attempt")
    sock.close()
    wait_until(lambda: len(router.posts()) == 1, 5, "the upstream call")
    held.set()  # the vendor answers after the caller left
    wait_until(lambda: log_lines(function), 10, "the stream's log line")
    entry = log_lines(function)[0]
    assert entry["httpRequest"]["status"] == 499 and entry["imagegen"]["clientClosed"] is True
    assert entry["imagegen"]["backend"] == "huggingface"  # the image was made...
    assert list(images.rglob("*.png"))  # ...and stored
    import requests

    again = requests.post(function.url, json={"prompt": "paid for", "seed": 21}, timeout=10).json()
    assert again["cached"] is True and len(router.posts()) == 1


def test_a_plain_request_whose_caller_leaves_runs_to_the_end(run_function, router, tmp_path):
    images = tmp_path / "images"
    function = run_function(HUGGING_FACE_API_KEY=TEST_TOKEN, HF_ROUTER_URL=router.url, IMAGE_DIR=str(images))
    held = threading.Event()
    router.reply(Reply(release=held))
    sock = open_stream(function.url, {"prompt": "nobody waits"}, accept="application/json")
    wait_until(lambda: len(router.posts()) == 1, 5, "the upstream call")
    sock.close()
    held.set()
    wait_until(lambda: log_lines(function), 10, "the request's log line")
    entry = log_lines(function)[0]
    # Nothing tells a plain request that its caller left: it finishes, stores, and logs 200.
    assert entry["httpRequest"]["status"] == 200 and list(images.rglob("*.png"))


# --- the contract -------------------------------------------------------------------------------


def test_openapi_describes_every_event_and_the_capabilities(make_app, router):
    from tests.contract import spec

    media = spec()["paths"]["/api/generate-image"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    schemas = {name: ref["$ref"].rsplit("/", 1)[1] for name, ref in media["x-event-schemas"].items()}
    assert tuple(schemas) == streaming.EVENT_NAMES

    router.reply_error(503, "Service Unavailable", {"Retry-After": "0"})
    app = make_app(HF_ROUTER_URL=router.url, MAX_RETRIES="1", BACKENDS="huggingface,demo", DEMO_STEP_SECONDS="0")
    seen = parse_events(app.post("/", json={"prompt": "a fox", "seed": 3}, headers=STREAM).data)
    router.reply_error(402, "You have exceeded your monthly included credits for Inference Providers.")
    seen += parse_events(app.post("/", json={"prompt": "a fox", "backend": "huggingface"}, headers=STREAM).data)
    router.reply_error(404, "Not Found")  # fails over to demo
    seen += [e for e in parse_events(app.post("/", json={"prompt": "a fox"}, headers=STREAM).data) if e[0] in ("failover", "progress")]
    assert {"accepted", "attempt", "retry", "stored", "result", "error", "failover", "progress"} <= set(names(seen))
    for name, data in seen:
        validate_body(json.dumps(data), schemas[name])
    validate_body(json.dumps({"position": 1}), schemas["queued"])

    for env in ({}, {"BACKENDS": "demo"}, {"HUGGING_FACE_API_KEY": "", "BACKENDS": "", "AUTH_MODE": "api-key", "API_KEYS": "k" * 20, "CORS_ALLOWED_ORIGINS": "https://a.example"}):
        answer = make_app(**env).get("/capabilities.json")
        assert answer.status_code == 200 and answer.mimetype == "application/json"
        validate_body(answer.data, "Capabilities")
        assert TEST_TOKEN not in answer.get_data(as_text=True)
    unconfigured = answer.get_json()
    assert unconfigured["configured"] is False and unconfigured["backends"] == []
    assert "no API key or local model configured" in unconfigured["message"]


def test_a_capped_result_matches_its_schema(make_app, router, monkeypatch):
    monkeypatch.setattr(streaming, "MAX_STREAM_BYTES", 20_000)
    router.reply(Reply(body=noisy_png(128), headers={"Content-Type": "image/png"}))
    result = parse_events(make_app(HF_ROUTER_URL=router.url).post("/", json={"prompt": "x"}, headers=STREAM).data)[-1][1]
    assert result["imageUrl"] is None
    validate_body(json.dumps(result), "StreamResult")


# --- the demo backend ---------------------------------------------------------------------------


def test_demo_is_never_stored_never_cached_and_checks_its_setting(make_app, tmp_path):
    app = make_app(BACKENDS="demo", DEMO_STEP_SECONDS="0")
    first = app.post("/", json={"prompt": "a fox", "seed": 7, "steps": 4}).get_json()
    again = app.post("/", json={"prompt": "a fox", "seed": 7, "steps": 4}).get_json()
    assert first["cached"] is again["cached"] is False and first["seed"] is None and first["filePath"] is None
    assert first["ignored"] == ["steps", "seed"] and "placeholder" in first["warning"]
    assert not list((tmp_path / "images").rglob("*.png"))  # nothing stored, under any name
    broken = make_app(BACKENDS="demo", DEMO_STEP_SECONDS="soon").post("/", json={"prompt": "x"})
    assert broken.status_code == 500 and "DEMO_STEP_SECONDS" in broken.get_json()["error"]


def test_demo_is_never_enabled_by_default(make_settings):
    assert "demo" not in make_settings().backends
    assert make_settings(HUGGING_FACE_API_KEY="").backends == ()


def test_a_request_waiting_on_a_cancelled_identical_one_makes_its_own(router, tmp_path):
    import flask

    from imagegen.cache import cached_image_name
    from imagegen.config import load_settings
    from imagegen.domain import GenerationRequest
    from tests.clients import handler_with_parts

    settings = load_settings(
        {"HUGGING_FACE_API_KEY": TEST_TOKEN, "HF_ROUTER_URL": router.url, "IMAGE_DIR": str(tmp_path), "MAX_RETRIES": "1"}
    )
    handler, dispatcher, state = handler_with_parts(settings)
    app = flask.Flask("t")
    app.add_url_rule("/", "h", lambda: handler(flask.request), methods=["POST"])
    seeded = {"prompt": "shared", "seed": 4, "width": 256, "height": 256}
    router.reply_error(503, "Service Unavailable", {"Retry-After": "20"})
    leader = app.test_client().post("/", json=seeded, headers=STREAM, buffered=False)
    chunks = iter(leader.response)
    while not next(chunks).startswith(b"event: retry"):
        pass
    answers = []
    follower = threading.Thread(target=lambda: answers.append(app.test_client().post("/", json=seeded)))
    follower.start()
    backend = dispatcher.backends["huggingface"]
    key = cached_image_name(GenerationRequest(prompt="shared", width=256, height=256, seed=4), backend.identity(), backend.default_model)
    wait_until(lambda: state._flights.waiters(key) == 1, 10, "the identical request to wait")
    leader.close()  # its caller leaves during the retry wait
    follower.join(20)
    assert answers[0].status_code == 200 and answers[0].get_json()["cached"] is False
    assert len(router.posts()) == 2  # the leader's 503, then the follower's own try
