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
import schemathesis
from hypothesis import HealthCheck, settings
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
        },
        workdir / "function.log",
    )
    yield function
    function.stop()
    router.stop()
    log = function.log()
    assert TEST_TOKEN not in log
    # Both kinds of input were sent: valid ones made images, invalid ones were refused.
    statuses = Counter(json.loads(line)["httpRequest"]["status"] for line in log.splitlines() if '"httpRequest"' in line)
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
