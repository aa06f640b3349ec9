"""Fuzz the running function from openapi.yaml with schemathesis, bounded in examples and time.

The real functions-framework process, the stand-in router on loopback (always answering with
an image), and every check schemathesis has: no 5xx, answers conform to the schema (status,
headers, body, content type), invalid input rejected. Plus ours: never a traceback or an HTML
error page.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import positive_data_acceptance

from tests.conftest import TEST_TOKEN
from tests.fake_router import FakeRouter
from tests.servers import REPO_ROOT, start_function

schema = schemathesis.openapi.from_path(REPO_ROOT / "openapi.yaml")
MAX_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fuzz")
    router = FakeRouter(TEST_TOKEN).start()
    function = start_function(
        {
            "HUGGING_FACE_API_KEY": TEST_TOKEN,
            "HF_ROUTER_URL": router.url,
            "IMAGE_DIR": str(workdir / "images"),
            "IMAGE_DIR_MAX_FILES": "20",
            "RATE_LIMIT_PER_MINUTE": "0",
            "GOOGLE_CLOUD_PROJECT": "fuzz-project",  # so trace headers are parsed into the log line
        },
        workdir / "function.log",
    )
    yield function
    function.stop()
    router.stop()
    log = function.log()
    assert TEST_TOKEN not in log
    # Both kinds of input were sent: valid ones made images, invalid ones were refused.
    # Log lines end at "\n" only: a fuzzed header may carry U+2028 or U+0085, which JSON keeps
    # as they are and str.splitlines() would take for line ends.
    statuses = Counter(json.loads(line)["httpRequest"]["status"] for line in log.split("\n") if '"httpRequest"' in line)
    assert statuses[200] > 0 and statuses[400] > 0, statuses
    assert not any(status >= 500 for status in statuses), statuses


@schemathesis.check
def no_traceback_or_html_error(ctx, response, case):
    text = response.text if isinstance(response.text, str) else ""
    if "Traceback (most recent call last)" in text:
        raise AssertionError("the answer shows a Python traceback")
    headers = {name.lower(): value for name, value in response.headers.items()}
    content_type = headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if response.status_code >= 400 and not content_type.startswith("application/json"):
        raise AssertionError(f"an error answered as {content_type!r}, not JSON")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_the_api(case, target):
    case.call_and_validate(
        base_url=target.url,
        additional_checks=[no_traceback_or_html_error],
        # Valid by the schema is not always allowed here: model and provider must also be on
        # the deployment's allow-lists, which openapi.yaml cannot know.
        excluded_checks=[positive_data_acceptance],
        timeout=30,
    )


# --- The classes of input issue #11 found, generated beside the spec's own cases -------------

# Lone UTF-16 surrogates, which JSON may spell and Python's json accepts.
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
odd_text = st.text(st.one_of(surrogates, st.characters(), st.sampled_from("²١٢\x00\ufeff")), max_size=30)
integral_floats = st.integers(-10, 5000).map(float) | st.sampled_from([61.0, 728.0, 1e300, -0.0, 4294967296.0])
odd_numbers = integral_floats | st.sampled_from([61.5, float("nan"), float("inf"), True]) | st.integers()
request_bodies = st.fixed_dictionaries(
    {"prompt": st.one_of(st.just("a red fox"), odd_text)},
    optional={
        "negativePrompt": odd_text,
        "model": odd_text,
        "provider": odd_text,
        "steps": odd_numbers,
        "width": odd_numbers,
        "height": odd_numbers,
        "seed": odd_numbers,
        "guidanceScale": odd_numbers,
    },
) | st.dictionaries(odd_text, st.integers(), min_size=1, max_size=2).map(lambda extra: {"prompt": "x", **extra})
# Header values from the wild: digits in other scripts, thousands of digits, junk.
digits = st.text(st.sampled_from("0123456789²١٢"), min_size=1, max_size=30) | st.just("7" * 4301)
odd_headers = st.fixed_dictionaries(
    {},
    optional={
        "X-Cloud-Trace-Context": st.builds(lambda span, o: f"105445aa7843bc8bf206b12000100000/{span};o={o}", digits, st.sampled_from("01x")),
        "traceparent": st.text(st.sampled_from("0123456789abcdef-"), max_size=60),
        "X-Forwarded-For": st.text(st.sampled_from("0123456789.,: abcdef"), max_size=60),
        "X-Request-Id": st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=140),
    },
)


def _encode(body: dict) -> bytes:
    # ensure_ascii writes a lone surrogate as its \\ud800 escape, as a JSON encoder would.
    return json.dumps(body, allow_nan=True).encode()


@given(body=request_bodies, headers=odd_headers)
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_odd_text_numbers_and_headers(body, headers, target):
    answer = requests.post(
        target.url + "/api/generate-image",
        data=_encode(body),
        # As bytes: UTF-8 header values (a header's digits in another script) go out as they are.
        headers={"Content-Type": "application/json", **{name: value.strip().encode() for name, value in headers.items()}},
        timeout=30,
    )
    assert answer.status_code < 500, answer.text[:300]
    assert answer.headers["Content-Type"].startswith("application/json")
    payload = answer.json()
    assert payload["success"] is (answer.status_code == 200)
    if answer.status_code == 400:
        assert payload["code"] in {"invalid_field", "unknown_field", "model_not_allowed", "provider_not_allowed", "invalid_json"}
