"""Retries, backoff, deadline and failover, timed by a fake clock (no real sleeps)."""

import base64
import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
import requests
import responses
from hypothesis import given, settings as hypothesis_settings, strategies as st

from imagegen.errors import UpstreamError
from tests.clients import HuggingFaceClient
from imagegen.retry import (
    MAX_SERVER_DELAY_SECONDS,
    backoff_delay,
    retry_info_delay,
    retry_after_ms,
    body_retry_after,
    server_delay_seconds,
)
from imagegen.domain import GenerationRequest
from tests.fake_router import make_png

ROUTER = "https://router.huggingface.co"
MODEL = "black-forest-labs/FLUX.1-schnell"
HF_URL = f"{ROUTER}/hf-inference/models/{MODEL}"
HUB_URL = f"https://huggingface.co/api/models/{MODEL}"
REQUEST = GenerationRequest(prompt="a fox", model=MODEL, provider="hf-inference")
AUTO = GenerationRequest(prompt="a fox", model=MODEL, provider="auto")


@pytest.fixture
def client_for(make_settings, clock):
    def make(**env: str) -> HuggingFaceClient:
        return HuggingFaceClient(make_settings(HF_MODEL=MODEL, **env), timing=clock.timing())

    return make


@pytest.fixture
def mocked():
    with responses.RequestsMock() as rsps:
        yield rsps


def png_reply(mocked, url=HF_URL):
    mocked.post(url, body=make_png(), content_type="image/png")


# --- retry policy -------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_a_ceiling():
    assert [backoff_delay(n, None, 0.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert [backoff_delay(n, None, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(20, None, 1.0) == 30.0
    assert backoff_delay(1, 7, 0.0) == 7  # the server's word wins


def test_server_delay_from_header_date_or_estimated_time():
    now = datetime(2026, 11, 24, 12, 0, 0, tzinfo=timezone.utc)
    assert server_delay_seconds("12", b"") == 12
    assert server_delay_seconds(format_datetime(now + timedelta(seconds=30), usegmt=True), b"", now) == 30
    assert server_delay_seconds(format_datetime(now - timedelta(seconds=30), usegmt=True), b"", now) == 0
    assert server_delay_seconds(None, b'{"error": "loading", "estimated_time": 19.2}') == 20
    assert server_delay_seconds("soon", b"not json") is None
    assert server_delay_seconds(None, b'{"estimated_time": true}') is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_retryable_statuses_are_retried_with_backoff(mocked, client_for, clock, status):
    mocked.post(HF_URL, status=status, json={"error": "busy"})
    mocked.post(HF_URL, status=status, json={"error": "busy"})
    png_reply(mocked)
    image = client_for(MAX_RETRIES="3").generate(REQUEST)
    assert image.png.startswith(b"\x89PNG")
    assert clock.sleeps == [0.75, 1.5]  # 1 s then 2 s, at the middle of the jitter range


def test_connection_errors_are_retried(mocked, client_for, clock):
    mocked.post(HF_URL, body=requests.ConnectionError("reset"))
    png_reply(mocked)
    client_for().generate(REQUEST)
    assert clock.sleeps == [0.75]


@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 410, 422])
def test_other_4xx_are_never_retried(mocked, client_for, clock, status):
    mocked.post(HF_URL, status=status, json={"error": "no"})
    with pytest.raises(UpstreamError):
        client_for(MAX_RETRIES="5").generate(REQUEST)
    assert len(mocked.calls) == 1 and clock.sleeps == []


def test_retry_after_and_estimated_time_are_honoured(mocked, client_for, clock):
    mocked.post(HF_URL, status=429, json={"error": "slow"}, headers={"Retry-After": "7"})
    mocked.post(HF_URL, status=503, json={"error": "Model is currently loading", "estimated_time": 12.5})
    png_reply(mocked)
    client_for().generate(REQUEST)
    assert clock.sleeps == [7, 13]


def test_retries_stop_after_hf_max_retries(mocked, client_for, clock):
    mocked.post(HF_URL, status=500, json={"error": "boom"})
    with pytest.raises(UpstreamError) as caught:
        client_for(MAX_RETRIES="2").generate(REQUEST)
    assert len(mocked.calls) == 3 and caught.value.code == "upstream_unavailable"


def test_rate_limit_that_outlasts_the_deadline_answers_429_with_retry_after(mocked, client_for, clock):
    mocked.post(HF_URL, status=429, json={"error": "slow"}, headers={"Retry-After": "300"})
    with pytest.raises(UpstreamError) as caught:
        client_for(DEADLINE_SECONDS="60").generate(REQUEST)
    assert (caught.value.status, caught.value.headers) == (429, {"Retry-After": "300"})
    assert clock.sleeps == [] and len(mocked.calls) == 1


def test_every_wait_fits_inside_the_deadline(mocked, client_for, clock):
    mocked.post(HF_URL, status=503, json={"error": "busy"})
    started = clock.now
    with pytest.raises(UpstreamError):
        client_for(MAX_RETRIES="10", DEADLINE_SECONDS="20").generate(REQUEST)
    # 1.5 + 3 + 6 = 10.5 s of waiting; the next 12 s wait would leave under 2 s for a try.
    assert clock.sleeps == [0.75, 1.5, 3.0, 6.0]
    assert clock.now - started < 20


def test_each_attempt_timeout_is_bounded_by_what_is_left(mocked, client_for, clock):
    seen = []

    def record(request):
        seen.append(request.req_kwargs["timeout"])
        return (503, {}, '{"error": "busy"}')

    mocked.add_callback(responses.POST, HF_URL, callback=record)
    with pytest.raises(UpstreamError):
        client_for(HF_TIMEOUT_SECONDS="120", DEADLINE_SECONDS="30", MAX_RETRIES="1").generate(REQUEST)
    assert seen[0] == (10.0, 30.0)
    assert seen[1] == (10.0, 30.0 - 0.75)


# --- failover --------------------------------------------------------------------------------


def hub_mapping(mocked, entries, shape="dict"):
    if shape == "dict":
        mapping = {p: {"status": s, "providerId": i, "task": t} for p, i, s, t in entries}
    else:
        mapping = [{"provider": p, "providerId": i, "status": s, "task": t} for p, i, s, t in entries]
    mocked.get(HUB_URL, json={"id": MODEL, "inferenceProviderMapping": mapping})


LIVE = "live"
T2I = "text-to-image"


@pytest.mark.parametrize("shape", ["dict", "list"])
def test_auto_fails_over_in_hub_order(mocked, client_for, clock, shape):
    hub_mapping(
        mocked,
        [
            ("nebius", "flux", LIVE, T2I),  # not supported here: skipped
            ("together", "flux-together", "staging", T2I),  # not live: skipped
            ("hf-inference", MODEL, LIVE, T2I),
            ("fal-ai", "fal-ai/flux/schnell", LIVE, "text-to-video"),  # wrong task: skipped
            ("together", "flux-together", LIVE, T2I) if shape == "list" else ("nscale", "flux-nscale", LIVE, T2I),
        ],
        shape,
    )
    mocked.post(HF_URL, status=410, json={"error": "The requested model is deprecated"})
    second = f"{ROUTER}/together/v1/images/generations" if shape == "list" else f"{ROUTER}/nscale/v1/images/generations"
    mocked.post(second, json={"data": [{"b64_json": base64.b64encode(make_png()).decode()}]})
    image = client_for(HF_PROVIDER="auto").generate(AUTO)
    assert image.route.provider == ("together" if shape == "list" else "nscale")
    assert [c.request.url for c in mocked.calls][1:] == [HF_URL, second]
    assert clock.sleeps == []  # a 410 fails over at once


def test_failover_after_retries_on_5xx_and_errors_name_all_tried(mocked, client_for, clock):
    hub_mapping(mocked, [("hf-inference", MODEL, LIVE, T2I), ("together", "t-flux", LIVE, T2I)])
    mocked.post(HF_URL, status=503, json={"error": "busy"})
    mocked.post(f"{ROUTER}/together/v1/images/generations", status=500, json={"error": "down"})
    with pytest.raises(UpstreamError) as caught:
        client_for(HF_PROVIDER="auto", MAX_RETRIES="1").generate(AUTO)
    urls = [c.request.url for c in mocked.calls]
    assert urls.count(HF_URL) == 2 and urls.count(f"{ROUTER}/together/v1/images/generations") == 2
    assert "provider together" in caught.value.message and "Also tried: hf-inference (HF status 503)" in caught.value.message


def test_no_failover_on_errors_another_provider_would_repeat(mocked, client_for):
    hub_mapping(mocked, [("hf-inference", MODEL, LIVE, T2I), ("together", "t-flux", LIVE, T2I)])
    mocked.post(HF_URL, status=401, json={"error": "Invalid credentials in Authorization header"})
    with pytest.raises(UpstreamError) as caught:
        client_for(HF_PROVIDER="auto").generate(AUTO)
    assert caught.value.code == "upstream_unauthorized" and len(mocked.calls) == 2


def test_auto_with_no_live_mapping_is_model_not_available(mocked, client_for):
    hub_mapping(mocked, [("hf-inference", MODEL, "staging", T2I)])
    with pytest.raises(UpstreamError) as caught:
        client_for(HF_PROVIDER="auto").generate(AUTO)
    assert caught.value.code == "model_not_available"


def test_unknown_model_on_the_hub(mocked, client_for):
    mocked.get(HUB_URL, status=404, json={"error": "Repository not found"})
    with pytest.raises(UpstreamError) as caught:
        client_for(HF_PROVIDER="auto").generate(AUTO)
    assert caught.value.code == "model_not_available" and "HF_MODEL" in caught.value.message


def test_auto_falls_back_to_hf_inference_when_the_hub_is_down(mocked, client_for):
    mocked.get(HUB_URL, body=requests.ConnectionError("hub down"))
    png_reply(mocked)
    assert client_for(HF_PROVIDER="auto").generate(AUTO).route.provider == "hf-inference"


def test_mapping_is_cached_for_its_ttl(mocked, client_for, clock):
    hub_mapping(mocked, [("hf-inference", MODEL, LIVE, T2I)])
    png_reply(mocked)
    client = client_for(HF_PROVIDER="auto", HF_MAPPING_TTL_SECONDS="600")
    for _ in range(3):
        client.generate(AUTO)
    assert sum(c.request.url.startswith(HUB_URL) for c in mocked.calls) == 1
    clock.now += 601
    client.generate(AUTO)
    assert sum(c.request.url.startswith(HUB_URL) for c in mocked.calls) == 2


def test_hf_inference_needs_no_hub_lookup(mocked, client_for):
    png_reply(mocked)
    client_for().generate(REQUEST)
    assert [c.request.url for c in mocked.calls] == [HF_URL]


# --- 7. upstream delay hints are untrusted text ------------------------------------------------


@pytest.mark.parametrize(
    "header, body, expected",
    [
        ("²", b"", None),  # "²".isdigit() is True, int("²") raises
        ("١٢", b"", None),  # Arabic-Indic digits: int() takes them, a header must not
        ("9" * 5000, b"", None),  # past int()'s digit limit
        ("99999999999", b"", None),  # more digits than any sane delay
        ("9999999999", b"", MAX_SERVER_DELAY_SECONDS),
        ("Fri, 31 Dec 9999 23:59:59 GMT", b"", MAX_SERVER_DELAY_SECONDS),
        ("Mon, 99 Foo 99999999999 99:99:99 GMT", b"", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT" + " " * 5000, b"", 0),
        ("x" * 10_000, b"", None),
        (None, b'{"estimated_time": ' + b"9" * 400 + b"}", MAX_SERVER_DELAY_SECONDS),  # too big for a float
        (None, b"[" * 100_000, None),  # deeper than the JSON parser's recursion
        (None, b'{"estimated_time": 1e999}', None),
    ],
)
def test_retry_after_junk_never_raises(header, body, expected):
    assert server_delay_seconds(header, body) == expected


def test_retry_after_ms():
    assert retry_after_ms("1500") == 1.5
    assert retry_after_ms(" 250.5 ") == 0.2505
    assert retry_after_ms("9" * 13) == MAX_SERVER_DELAY_SECONDS
    for junk in (None, "", "-5", "1e3", "NaN", "inf", "²", "1,5", "9" * 5000, "1500ms"):
        assert retry_after_ms(junk) is None, junk


def gemini_body(*details) -> bytes:
    return json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": list(details)}}).encode()


RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"


def test_retry_info_delay():
    assert retry_info_delay(gemini_body({"@type": RETRY_INFO, "retryDelay": "26s"})) == 26
    other = {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []}
    assert retry_info_delay(gemini_body(other, {"@type": RETRY_INFO, "retryDelay": "1.5s"})) == 1.5
    assert retry_info_delay(gemini_body({"@type": RETRY_INFO, "retryDelay": "99999999999s"})) == MAX_SERVER_DELAY_SECONDS
    for junk in (
        b"", b"not json", b"[]", b'{"error": "x"}', b'{"error": {"details": {}}}', b"[" * 100_000,
        gemini_body({"@type": RETRY_INFO, "retryDelay": "26"}),
        gemini_body({"@type": RETRY_INFO, "retryDelay": "-3s"}),
        gemini_body({"@type": RETRY_INFO, "retryDelay": "²s"}),
        gemini_body({"@type": RETRY_INFO, "retryDelay": "9" * 5000 + "s"}),
        gemini_body({"@type": RETRY_INFO, "retryDelay": 26}),
        gemini_body({"@type": RETRY_INFO}),
        gemini_body({"retryDelay": "26s"}),
        gemini_body("26s", None, 3),
    ):
        assert retry_info_delay(junk) is None, junk[:80]


def test_body_retry_after():
    assert body_retry_after(b'{"title": "Too Many Requests", "status": 429, "retry_after": 7}') == 7
    assert body_retry_after(b'{"retry_after": 2.5}') == 2.5
    assert body_retry_after(b'{"retry_after": "3"}') == 3
    assert body_retry_after(b'{"retry_after": ' + b"9" * 4000 + b"}") == MAX_SERVER_DELAY_SECONDS
    assert body_retry_after(b'{"retry_after": -4}') == 0
    for junk in (b"", b"[1]", b'{"retry_after": true}', b'{"retry_after": NaN}', b'{"retry_after": "soon"}',
                 b'{"retry_after": null}', b"[" * 100_000, b'{"retry_after": "\xb2"}'):
        assert body_retry_after(junk) is None, junk[:80]


@hypothesis_settings(max_examples=300, deadline=None)
@given(header=st.one_of(st.none(), st.text(max_size=200)), body=st.binary(max_size=200))
def test_no_delay_hint_ever_raises_or_exceeds_the_ceiling(header, body):
    for delay in (server_delay_seconds(header, body), retry_after_ms(header),
                  retry_info_delay(body), body_retry_after(body)):
        assert delay is None or 0 <= delay <= MAX_SERVER_DELAY_SECONDS
