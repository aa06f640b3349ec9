import re
"""openapi.yaml is the contract: valid, served, and equal to what the code does (both ways)."""

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate

from imagegen import validation
from imagegen.backends.huggingface.backend import KNOWN_PROVIDERS
from imagegen.config import DEFAULT_MAX_PROMPT_CHARS, load_settings
from imagegen.cors import ALLOWED_HEADERS
from imagegen.errors import InvalidRequest
from imagegen.backends.huggingface.providers import PROVIDERS
from imagegen.backends.registry import BACKENDS
from tests.conftest import TEST_TOKEN
from tests.contract import schema, spec, validate_body
from tests.fake_router import make_png
from tests.servers import REPO_ROOT
from tests.test_docs import codes_in_source
from tests.clients import parse_request

MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
URL = f"https://router.huggingface.co/hf-inference/models/{MODEL}"


def test_openapi_document_is_valid_3_1():
    assert spec()["openapi"].startswith("3.1")
    validate(spec())


def test_it_is_served(make_app):
    answer = make_app().get("/openapi.yaml")
    assert answer.status_code == 200 and answer.mimetype == "application/yaml"
    assert answer.data == (REPO_ROOT / "openapi.yaml").read_bytes()


def test_request_schema_matches_validation():
    request = schema("GenerationRequest")
    properties = request["properties"]
    assert tuple(properties) == validation.KNOWN_FIELDS and request["additionalProperties"] is False
    assert request["required"] == ["prompt"]
    side = schema("Side")
    assert (side["minimum"], side["maximum"], side["multipleOf"]) == (validation.MIN_SIDE, validation.MAX_SIDE, validation.SIDE_STEP)
    assert (properties["steps"]["minimum"], properties["steps"]["maximum"]) == (validation.MIN_STEPS, validation.MAX_STEPS)
    guidance = properties["guidanceScale"]
    assert (guidance["minimum"], guidance["maximum"]) == (validation.MIN_GUIDANCE, validation.MAX_GUIDANCE)
    assert (properties["seed"]["minimum"], properties["seed"]["maximum"]) == (0, validation.MAX_SEED)
    assert properties["prompt"]["maxLength"] == properties["negativePrompt"]["maxLength"] == DEFAULT_MAX_PROMPT_CHARS
    assert properties["provider"]["enum"] == [*KNOWN_PROVIDERS, None]
    # A backend is named by a pattern, not a list: adding one changes no document but its own page.
    assert all(re.fullmatch(properties["backend"]["pattern"].strip("^$"), name) for name in BACKENDS)


def test_answer_schemas_match_the_code():
    assert set(schema("Error")["properties"]["code"]["enum"]) == codes_in_source()
    success = schema("GenerationSuccess")["properties"]
    assert set(success["provider"]["enum"]) == {*PROVIDERS, None}
    assert all(re.fullmatch(success["backend"]["pattern"].strip("^$"), name) for name in BACKENDS)
    preflight = spec()["paths"]["/api/generate-image"]["options"]["responses"]["204"]["headers"]
    assert preflight["Access-Control-Allow-Headers"]["schema"]["const"] == ALLOWED_HEADERS


def test_real_answers_conform(make_app, mocked):
    app = make_app(RATE_LIMIT_PER_MINUTE="1", RATE_LIMIT_BURST="1")
    mocked.post(URL, body=make_png(), content_type="image/png")
    ok = app.post("/", json={"prompt": "a fox", "width": 256, "height": 256})
    validate_body(ok.data, "GenerationSuccess")
    for answer in (
        app.post("/", json={"prompt": "x", "width": 3}),
        app.post("/", data="{", content_type="application/json"),
        app.post("/", data="x", content_type="text/plain"),
        app.get("/api/generate-image"),
        app.post("/", json={"prompt": "a fox"}),  # rate limited
    ):
        assert answer.status_code >= 400
        validate_body(answer.data, "Error")
    locked = make_app(AUTH_MODE="api-key", API_KEYS="k" * 20, CORS_ALLOWED_ORIGINS="https://a.example")
    validate_body(locked.post("/", json={"prompt": "x"}).data, "Error")


# --- any JSON gives a valid request or a 400 that names the problem ----------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
field_values = st.none() | st.booleans() | st.integers(-10, 5000) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40) | json_values
request_like = st.fixed_dictionaries({}, optional={name: field_values for name in validation.KNOWN_FIELDS})
SETTINGS = load_settings({"HUGGING_FACE_API_KEY": TEST_TOKEN})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, request_like, request_like.map(lambda d: {**d, "prompt": "a fox"})))
def test_any_json_is_a_request_or_a_400_naming_the_field(value):
    body = json.dumps(value).encode()
    try:
        request = parse_request(body, SETTINGS)
    except InvalidRequest as error:
        assert error.status == 400 and error.message
        if isinstance(value, dict) and value:
            assert error.field is not None and (error.field in value or error.field == "prompt")
            assert error.field in error.message
        return
    assert isinstance(value, dict) and request.prompt == value["prompt"].strip() and request.prompt
    # What passed validation is what the schema allows.
    validate_body(json.dumps(value), "GenerationRequest")


# --- request ids, Server-Timing and the log line ----------------------------------------------


def log_entries(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def test_request_id_is_echoed_when_sane_and_made_otherwise(make_app, mocked):
    app = make_app()
    assert app.post("/", json={}, headers={"X-Request-Id": "front-123:abc"}).headers["X-Request-Id"] == "front-123:abc"
    for bad in ("", "has space", "x" * 129, "<script>"):
        made = app.post("/", json={}, headers={"X-Request-Id": bad}).headers["X-Request-Id"]
        assert made != bad and len(made) == 32
    answer = app.post("/", json={})
    assert answer.get_json()["requestId"] == answer.headers["X-Request-Id"]


def test_server_timing_and_one_cloud_logging_line(make_app, mocked, capsys):
    mocked.post(URL, status=503, json={"error": "loading"})
    mocked.post(URL, body=make_png(), content_type="image/png")
    app = make_app(MAX_RETRIES="1", GOOGLE_CLOUD_PROJECT="my-proj", DEADLINE_SECONDS="30")
    capsys.readouterr()
    answer = app.post(
        "/api/generate-image?secret=1",
        json={"prompt": "a fox"},
        headers={"X-Cloud-Trace-Context": "105445aa7843bc8bf206b12000100000/1;o=1", "User-Agent": "ua/1", "X-Request-Id": "r1"},
    )
    assert answer.status_code == 200
    timing = answer.headers["Server-Timing"]
    assert [part.split(";")[0] for part in timing.split(", ")] == ["validate", "upstream", "storage", "total"]
    (entry,) = log_entries(capsys)
    assert entry["severity"] == "INFO" and entry["requestId"] == "r1"
    assert entry["logging.googleapis.com/trace"] == "projects/my-proj/traces/105445aa7843bc8bf206b12000100000"
    assert entry["logging.googleapis.com/spanId"] == "0000000000000001" and entry["logging.googleapis.com/trace_sampled"] is True
    http = entry["httpRequest"]
    assert http["requestMethod"] == "POST" and http["status"] == 200 and http["userAgent"] == "ua/1"
    assert http["requestUrl"] == "/api/generate-image" and http["latency"].endswith("s")
    fields = entry["imagegen"]
    assert fields["provider"] == "hf-inference" and fields["model"] == MODEL and isinstance(fields["seed"], int)
    assert set(fields["timingsMs"]) == {"validate", "upstream", "storage", "total"}
    assert [(a["provider"], a["status"], a["code"]) for a in fields["attempts"]] == [
        ("hf-inference", 503, "upstream_unavailable"),
        ("hf-inference", 200, None),
    ]
    assert all(a["ms"] >= 0 for a in fields["attempts"])


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}, ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)),
        ({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"}, ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", False)),
        ({"X-Cloud-Trace-Context": "105445AA7843BC8BF206B12000100000"}, ("105445aa7843bc8bf206b12000100000", None, False)),
        ({"X-Cloud-Trace-Context": "nonsense"}, None),
        ({}, None),
    ],
)
def test_trace_headers(make_app, mocked, capsys, headers, expected):
    app = make_app(GOOGLE_CLOUD_PROJECT="p")
    capsys.readouterr()
    app.post("/", json={}, headers=headers)
    (entry,) = log_entries(capsys)
    if expected is None:
        assert "logging.googleapis.com/trace" not in entry
        return
    trace, span, sampled = expected
    assert entry["logging.googleapis.com/trace"] == f"projects/p/traces/{trace}"
    assert entry.get("logging.googleapis.com/spanId") == span
    assert entry["logging.googleapis.com/trace_sampled"] is sampled


def test_severity_follows_the_outcome(make_app, mocked, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    mocked.post(URL, body=make_png(), content_type="image/png")
    capsys.readouterr()
    make_app().post("/", json={"prompt": "ok"})
    make_app().post("/", json={"prompt": "x", "width": 1})
    make_app(IMAGE_DIR=str(blocker)).post("/", json={"prompt": "stored nowhere"})
    make_app(HUGGING_FACE_API_KEY="").post("/", json={"prompt": "no key"})
    severities = [entry["severity"] for entry in log_entries(capsys) if "httpRequest" in entry]
    assert severities == ["INFO", "WARNING", "WARNING", "ERROR"]


def test_an_unexpected_error_is_logged_with_its_traceback_but_answered_plainly(make_app, mocked, caplog, monkeypatch):
    import imagegen.doors.json_api

    monkeypatch.setattr(imagegen.doors.json_api, "success_body", lambda *a: 1 / 0)
    mocked.post(URL, body=make_png(), content_type="image/png")
    caplog.set_level(logging.ERROR)
    answer = make_app().post("/", json={"prompt": "x"})
    assert answer.status_code == 500 and "ZeroDivisionError" not in answer.get_data(as_text=True)
    assert "ZeroDivisionError" in caplog.text
