"""The HTTP contract through functions-framework's own test client, upstream mocked by `responses`."""

import base64
import io
import json
import logging

import flask
import pytest
import requests
from PIL import Image

from imagegen.png_info import BASE64_PIECE
from tests.conftest import TEST_TOKEN
from tests.fake_router import make_png

MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
ROUTER = "https://router.huggingface.co"
URL = f"{ROUTER}/hf-inference/models/{MODEL}"


def decode_data_url(url: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix):], validate=True)


def pixels(png: bytes) -> tuple:
    with Image.open(io.BytesIO(png)) as image:
        return image.format, image.size, image.tobytes()


def test_success_returns_the_image_and_where_it_is_stored(make_app, mocked, tmp_path):
    png = make_png(256, 256)
    mocked.post(URL, body=png, content_type="image/png")
    answer = make_app().post("/api/generate-image", json={"prompt": "a red fox", "seed": 7, "width": 256, "height": 256})
    assert answer.status_code == 200 and answer.mimetype == "application/json"
    body = answer.get_json()
    assert body["success"] is True and body["model"] == MODEL and body["seed"] == 7
    assert body["provider"] == "hf-inference" and "warning" not in body
    assert body["filePath"].startswith(str(tmp_path / "images")) and body["filePath"].endswith(".png")
    with open(body["filePath"], "rb") as stored:
        assert stored.read() == decode_data_url(body["imageUrl"])
    assert pixels(decode_data_url(body["imageUrl"])) == pixels(png)  # metadata added, pixels untouched
    assert answer.headers["Cache-Control"] == "no-store"


def test_parameters_are_embedded_where_png_info_readers_find_them(make_app, mocked):
    mocked.post(URL, body=make_png(256, 320), content_type="image/png")
    request = {"prompt": "a red fox, 東京", "negativePrompt": "blurry", "steps": 30, "guidanceScale": 7.5, "seed": 42}
    body = make_app().post("/", json=request).get_json()
    with Image.open(body["filePath"]) as image:
        image.load()
        assert image.text["parameters"] == (
            "a red fox, 東京\n"
            "Negative prompt: blurry\n"
            f"Steps: 30, CFG scale: 7.5, Seed: 42, Size: 256x320, Model: {MODEL}, Backend: huggingface, Provider: hf-inference"
        )
        assert image.text["provider"] == "hf-inference"


def test_without_a_seed_the_server_chooses_and_sends_one(make_app, mocked):
    mocked.post(URL, body=make_png(), content_type="image/png")
    app = make_app()
    seeds = [app.post("/", json={"prompt": "x"}).get_json()["seed"] for _ in range(3)]
    assert all(isinstance(seed, int) and 0 <= seed < 2**31 for seed in seeds)
    assert len(set(seeds)) == 3
    sent = [json.loads(call.request.body)["parameters"]["seed"] for call in mocked.calls]
    assert sent == seeds


def test_any_path_works(make_app, mocked):
    mocked.post(URL, body=make_png(), content_type="image/png")
    assert make_app().post("/some/other/path", json={"prompt": "x"}).get_json()["success"] is True


def test_allowed_model_is_used(make_app, mocked):
    mocked.post(f"{ROUTER}/hf-inference/models/black-forest-labs/FLUX.1-schnell", body=make_png(), content_type="image/png")
    app = make_app(HF_ALLOWED_MODELS="black-forest-labs/FLUX.1-schnell")
    body = app.post("/", json={"prompt": "x", "model": "black-forest-labs/FLUX.1-schnell"}).get_json()
    assert body["model"] == "black-forest-labs/FLUX.1-schnell"


def error_of(answer, status: int, code: str) -> dict:
    assert answer.status_code == status, answer.data
    body = answer.get_json()
    assert body["success"] is False and body["code"] == code and body["error"]
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    return body


def rate_limit_fields(answer) -> tuple[str, int, int]:
    """(policy, remaining, seconds until whole) from an answer's RateLimit headers."""
    name, remaining, reset = answer.headers["RateLimit"].split(";")
    assert name == '"caller"'
    return answer.headers["RateLimit-Policy"], int(remaining.removeprefix("r=")), int(reset.removeprefix("t="))


def test_answers_carry_the_callers_rate_limit_refusals_included(make_app, mocked):
    mocked.post(URL, body=make_png(), content_type="image/png")
    app = make_app(RATE_LIMIT_BURST="2", RATE_LIMIT_PER_MINUTE="1")
    answers = [app.post("/", json={"prompt": f"fox {i}"}) for i in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    # Two in a window of 120 s; after the first one left and whole in 60 s, then none and 120 s.
    policy = '"caller";q=2;w=120'
    assert rate_limit_fields(answers[0]) == (policy, 1, 60)
    assert rate_limit_fields(answers[1])[:2] == (policy, 0) and rate_limit_fields(answers[1])[2] in (119, 120)
    refused = answers[2]
    assert refused.get_json()["code"] == "rate_limited"
    assert rate_limit_fields(refused)[:2] == (policy, 0) and int(refused.headers["Retry-After"]) in (59, 60)
    assert len(mocked.calls) == 2


def test_no_rate_limit_headers_when_the_limit_is_off(make_app, mocked):
    mocked.post(URL, body=make_png(), content_type="image/png")
    answer = make_app(RATE_LIMIT_PER_MINUTE="0").post("/", json={"prompt": "fox"})
    assert answer.status_code == 200
    assert "RateLimit" not in answer.headers and "RateLimit-Policy" not in answer.headers


def test_a_cached_answer_spends_none_of_the_rate(make_app, mocked):
    mocked.post(URL, body=make_png(), content_type="image/png")
    app = make_app(RATE_LIMIT_BURST="2", RATE_LIMIT_PER_MINUTE="1")
    first = app.post("/", json={"prompt": "a heron", "seed": 4})
    assert rate_limit_fields(first)[1] == 1
    for _ in range(3):
        repeat = app.post("/", json={"prompt": "a heron", "seed": 4})
        assert repeat.status_code == 200 and repeat.get_json()["cached"] is True
        assert "RateLimit" not in repeat.headers  # it asked nothing of the limits
    other = app.post("/", json={"prompt": "an egret"})
    assert other.status_code == 200 and rate_limit_fields(other)[1] == 0  # the second of two
    assert len(mocked.calls) == 2


@pytest.mark.parametrize(
    "kwargs, status, code",
    [
        ({"data": b"{oops", "content_type": "application/json"}, 400, "invalid_json"),
        ({"json": ["prompt"]}, 400, "invalid_body"),
        ({"json": {"negativePrompt": "x"}}, 400, "missing_field"),
        ({"json": {"prompt": "x", "negative_prompt": "y"}}, 400, "unknown_field"),
        ({"json": {"prompt": "x", "width": 100}}, 400, "invalid_field"),
        ({"json": {"prompt": "x", "model": "other/model"}}, 400, "model_not_allowed"),
        ({"data": "prompt=x", "content_type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
        ({"data": b'{"prompt": "x"}'}, 415, "unsupported_media_type"),
        ({"data": b'{"prompt": "' + b"x" * 70_000 + b'"}', "content_type": "application/json"}, 413, "payload_too_large"),
    ],
)
def test_bad_requests_never_reach_hugging_face(make_app, mocked, kwargs, status, code):
    error_of(make_app().post("/api/generate-image", **kwargs), status, code)
    assert len(mocked.calls) == 0


def test_a_body_just_under_the_limit_is_read(make_app, mocked):
    mocked.post(URL, body=make_png(), content_type="image/png")
    padding = " " * (64 * 1024 - 20)
    answer = make_app().post("/", data=('{"prompt": "x"}' + padding).encode(), content_type="application/json")
    assert answer.status_code == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "HEAD"])
def test_other_methods_are_405_with_allow(make_app, method):
    answer = make_app().open("/api/generate-image", method=method)
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "POST, OPTIONS"
    if method != "HEAD":
        assert answer.get_json()["code"] == "method_not_allowed"


def test_missing_token_is_500_naming_the_variable(make_app, mocked):
    body = error_of(make_app(HUGGING_FACE_API_KEY="").post("/", json={"prompt": "x"}), 500, "missing_api_key")
    assert "HUGGING_FACE_API_KEY" in body["error"]
    assert len(mocked.calls) == 0


def test_invalid_setting_is_500_naming_the_variable(make_app):
    body = error_of(make_app(HF_TIMEOUT_SECONDS="soon").post("/", json={"prompt": "x"}), 500, "invalid_configuration")
    assert "TIMEOUT_SECONDS" in body["error"]


@pytest.mark.parametrize(
    "status, upstream_body, headers, our_status, code",
    [
        (401, {"error": "Invalid credentials in Authorization header"}, {}, 502, "upstream_unauthorized"),
        (402, {"error": "You have exceeded your monthly included credits"}, {}, 502, "upstream_credits_exhausted"),
        (404, {"error": "Not Found"}, {}, 502, "model_not_available"),
        (410, {"error": "deprecated"}, {}, 502, "model_not_available"),
        (429, {"error": "Too many requests"}, {"Retry-After": "12"}, 429, "upstream_rate_limited"),
        (500, {"error": "boom"}, {}, 502, "upstream_unavailable"),
        (503, {"error": "loading", "estimated_time": 30}, {}, 502, "upstream_unavailable"),
    ],
)
def test_upstream_errors_become_clear_json(make_app, mocked, status, upstream_body, headers, our_status, code):
    mocked.post(URL, json=upstream_body, status=status, headers=headers)
    answer = make_app().post("/", json={"prompt": "x"})
    error_of(answer, our_status, code)
    if status == 429:
        assert answer.headers["Retry-After"] == "12"
        assert "Retry-After" in answer.headers["Access-Control-Expose-Headers"]


def test_upstream_timeout_is_504(make_app, mocked):
    mocked.post(URL, body=requests.ReadTimeout())
    error_of(make_app().post("/", json={"prompt": "x"}), 504, "upstream_timeout")


def test_a_200_html_page_is_502(make_app, mocked):
    mocked.post(URL, body="<html>maintenance</html>", content_type="text/html")
    error_of(make_app().post("/", json={"prompt": "x"}), 502, "upstream_bad_response")


def test_storage_failure_still_returns_the_image(make_app, mocked, tmp_path):
    png = make_png()
    mocked.post(URL, body=png, content_type="image/png")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    answer = make_app(IMAGE_DIR=str(blocker)).post("/", json={"prompt": "x"})
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["success"] is True and body["filePath"] is None
    assert "could not be stored" in body["warning"] and "IMAGE_DIR" in body["warning"]
    assert pixels(decode_data_url(body["imageUrl"])) == pixels(png)


def test_unexpected_errors_are_a_plain_500(make_app, mocked, monkeypatch):
    import imagegen.doors.json_api

    def explode(*args, **kwargs):
        raise RuntimeError("internal detail /srv/secret/path")

    monkeypatch.setattr(imagegen.doors.json_api, "success_body", explode)
    mocked.post(URL, body=make_png(), content_type="image/png")
    answer = make_app().post("/", json={"prompt": "x"})
    body = error_of(answer, 500, "internal_error")
    assert "secret" not in body["error"] and "Traceback" not in answer.get_data(as_text=True)


# --- CORS ---------------------------------------------------------------------------------------


def test_preflight_with_any_origin(make_app, mocked):
    answer = make_app().options(
        "/api/generate-image",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
    )
    assert answer.status_code == 204 and answer.data == b""
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert answer.headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert answer.headers["Access-Control-Allow-Headers"] == "Content-Type, Authorization, X-API-Key"
    assert int(answer.headers["Access-Control-Max-Age"]) > 0
    assert len(mocked.calls) == 0


def test_listed_origin_is_echoed_with_vary(make_app, mocked):
    app = make_app(CORS_ALLOWED_ORIGINS="https://app.example,http://localhost:3000")
    answer = app.options("/", headers={"Origin": "http://localhost:3000"})
    assert answer.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert answer.headers["Vary"] == "Origin"
    error = app.post("/", json={}, headers={"Origin": "https://app.example"})
    assert error.status_code == 400
    assert error.headers["Access-Control-Allow-Origin"] == "https://app.example"


def test_unlisted_origin_gets_no_allow_origin(make_app, mocked):
    app = make_app(CORS_ALLOWED_ORIGINS="https://app.example")
    for answer in (
        app.options("/", headers={"Origin": "https://evil.example"}),
        app.post("/", json={}, headers={"Origin": "https://evil.example"}),
    ):
        assert "Access-Control-Allow-Origin" not in answer.headers
        assert "Access-Control-Allow-Methods" not in answer.headers
        assert answer.headers["Vary"] == "Origin"


# --- secrets ----------------------------------------------------------------------------------


def test_the_token_never_appears_in_answers_or_logs(make_app, mocked, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    mocked.post(URL, json={"error": f"Invalid credentials: Bearer {TEST_TOKEN}"}, status=401)
    mocked.post(URL, body=make_png(), content_type="image/png")
    mocked.post(URL, body=requests.ConnectionError(f"could not connect with {TEST_TOKEN}"))
    app = make_app()
    answers = [app.post("/", json={"prompt": "x"}) for _ in range(3)]
    answers.append(app.post("/", json={"prompt": "x", "bogus": TEST_TOKEN}))
    assert [a.status_code for a in answers] == [502, 200, 502, 400]
    for answer in answers:
        assert TEST_TOKEN not in answer.get_data(as_text=True)
        assert TEST_TOKEN not in str(answer.headers)
    captured = capsys.readouterr()
    assert caplog.records, "the handler should log each request"
    assert TEST_TOKEN not in caplog.text + captured.out + captured.err


def test_prompts_are_not_logged(make_app, mocked, caplog):
    caplog.set_level(logging.INFO)
    mocked.post(URL, body=make_png(), content_type="image/png")
    make_app().post("/", json={"prompt": "my very private prompt"})
    assert "private" not in caplog.text
    (record,) = [r for r in caplog.records if r.name == "imagegen"]
    assert record.fields["imagegen"]["promptChars"] == len("my very private prompt")
    assert record.fields["httpRequest"]["status"] == 200


# --- the page ---------------------------------------------------------------------------------


def test_page_is_served_with_a_strict_csp(make_app):
    import hashlib
    import re

    app = make_app(HF_ALLOWED_PROVIDERS="fal-ai,together")
    for path in ("/", "/index.html"):
        answer = app.get(path)
        assert answer.status_code == 200 and answer.mimetype == "text/html"
    html = answer.get_data(as_text=True)
    policy = answer.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in policy and "default-src 'none'" in policy and "connect-src 'self'" in policy
    script = re.search(r"<script>(.*?)</script>", html, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    for block in (script, style):
        digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy
    # The page's pickers are filled from /capabilities.json: what the backends offer.
    offered = app.get("/capabilities.json").get_json()
    assert offered["providers"] == ["hf-inference", "fal-ai", "together"] and offered["backends"][0]["models"] == [MODEL]


def test_page_can_be_turned_off(make_app):
    app = make_app(SERVE_PAGE="false")
    assert app.get("/").status_code == 405
    assert app.get("/api/generate-image").status_code == 405


def test_document_paths_are_get_only(make_app, mocked):
    app = make_app()
    for path in ("/openapi.yaml", "/index.html"):
        answer = app.post(path, json={"prompt": "x"})
        assert answer.status_code == 405 and answer.headers["Allow"] == "GET, HEAD"
        assert answer.get_json()["code"] == "method_not_allowed"
    assert len(mocked.calls) == 0
    # With the page off, /index.html is just another API path.
    mocked.post(URL, body=make_png(), content_type="image/png")
    assert make_app(SERVE_PAGE="false").post("/index.html", json={"prompt": "x"}).status_code == 200


@pytest.mark.parametrize("head_length", [0, 1, 2, 3, 34, 35])
@pytest.mark.parametrize("body_length", [0, 1, 2, 3, BASE64_PIECE - 1, BASE64_PIECE + 1, 2 * BASE64_PIECE + 5])
def test_streamed_base64_equals_base64_of_the_whole(head_length, body_length):
    import os

    from imagegen.domain import Route
    from imagegen.doors.json_api import success_body
    from imagegen.service import Produced
    from imagegen.png_info import PngParts

    head, body = os.urandom(head_length), os.urandom(body_length)
    produced = Produced(PngParts(head, memoryview(body)), Route("huggingface", "m/x", "hf-inference"), 1, None)
    pieces, length = success_body(produced)
    answer = b"".join(pieces)
    assert len(answer) == length
    data_url = json.loads(answer)["imageUrl"]
    assert data_url == "data:image/png;base64," + base64.b64encode(head + body).decode()


def test_image_slots_are_given_back_on_success_and_failure(monkeypatch, make_settings, mocked):
    from imagegen.app import Parts, build_handler
    from imagegen.slots import ImageSlots

    slots = ImageSlots(1)
    app = flask.Flask("t")
    handler = build_handler(make_settings(MAX_RETRIES="0", RATE_LIMIT_PER_MINUTE="0"), Parts(slots=slots))
    app.add_url_rule("/", "h", lambda: handler(flask.request), methods=["POST"])
    client = app.test_client()
    mocked.post(URL, json={"error": "busy"}, status=503)
    mocked.post(URL, body=make_png(), content_type="image/png")
    mocked.post(URL, body=b"<html>", content_type="text/html")
    mocked.post(URL, body=make_png(), content_type="image/png")
    statuses = [client.post("/", json={"prompt": "x"}).status_code for _ in range(4)]
    assert statuses == [502, 200, 502, 200]  # with one slot, a leak would have made the next 504
    assert slots.claim().take(timeout=0)


def test_slot_is_taken_once_and_released_once():
    from imagegen.slots import ImageSlots

    slots = ImageSlots(1)
    first, second = slots.claim(), slots.claim()
    assert first.take(0) and first.take(0)
    assert not second.take(0.01)
    first.release()
    first.release()
    assert second.take(0)
    assert not slots.claim().take(0)
