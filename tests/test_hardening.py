"""Issue #11: the inputs an adversarial run used to get a 500, lose a paid image, or leak.

Each test names the defect it guards; each failed before its fix.
"""

from __future__ import annotations

import json

import pytest
import responses

from imagegen.errors import InvalidRequest
from imagegen.validation import parse_generation_request
from tests.fake_router import make_png

MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
URL = f"https://router.huggingface.co/hf-inference/models/{MODEL}"


@pytest.fixture
def mocked():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(URL, body=make_png(), content_type="image/png")
        yield rsps


# --- 1. lone UTF-16 surrogates ---------------------------------------------------------------


@pytest.mark.parametrize(
    "body, field",
    [
        (b'{"prompt": "x", "model": "\\ud800"}', "model"),
        (b'{"prompt": "x", "provider": "\\udfff"}', "provider"),
        (b'{"prompt": "x", "\\udc80": 1}', "\\udc80"),
        (b'{"prompt": "a \\ud800 fox"}', "prompt"),
        (b'{"prompt": "x", "negativePrompt": "\\ud83d"}', "negativePrompt"),
        (b'{"prompt": "x", "model": "\xed\xa0\x80"}', "model"),  # the surrogate as raw bytes
        (b'{"prompt": "\xed\xb2\x80 fox"}', "prompt"),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field_before_any_upstream_call(make_app, mocked, body, field):
    answer = make_app().post("/api/generate-image", data=body, content_type="application/json")
    assert answer.status_code == 400 and answer.mimetype == "application/json"
    payload = answer.get_json()
    assert payload["code"] == "invalid_field" and payload["field"] == field
    assert len(mocked.calls) == 0
    answer.data.decode("utf-8")  # the answer itself is valid UTF-8


def test_a_proper_surrogate_pair_is_just_text(make_settings):
    request = parse_generation_request('{"prompt": "a fox \\ud83e\\udd8a"}'.encode(), make_settings())
    assert request.prompt == "a fox \U0001f98a"


def test_echoing_a_surrogate_in_an_error_never_raises(make_settings):
    # The unknown-field and allow-list messages echo what was sent; they must stay encodable.
    for body in ('{"prompt": "x", "mod\\ud800el": 1}', '{"prompt": "x", "model": "a\\udc00b"}'):
        with pytest.raises(InvalidRequest) as caught:
            parse_generation_request(body.encode(), make_settings())
        json.dumps({"error": caught.value.message, "field": caught.value.field}, ensure_ascii=False).encode("utf-8")

