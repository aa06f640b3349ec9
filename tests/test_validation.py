import json

import pytest

from imagegen.errors import InvalidRequest, UnsupportedMediaType
from imagegen.validation import GenerationRequest, check_content_type
from tests.clients import parse_request

MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"


def parse(body, settings):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, settings)


def error_for(body, settings) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(body, settings)
    return caught.value


def test_minimal_request_uses_the_default_model(make_settings):
    # The model is the backend's to choose when the caller names none.
    assert parse({"prompt": "  a red fox  "}, make_settings()) == GenerationRequest(prompt="a red fox")


def test_every_field_is_carried_over(make_settings):
    settings = make_settings(HF_ALLOWED_MODELS="black-forest-labs/FLUX.1-schnell")
    request = parse(
        {
            "prompt": "a fox",
            "negativePrompt": "blurry",
            "width": 768,
            "height": 1024,
            "steps": 30,
            "guidanceScale": 7,
            "seed": 4294967295,
            "model": "black-forest-labs/FLUX.1-schnell",
        },
        settings,
    )
    assert request == GenerationRequest(
        prompt="a fox",
        model="black-forest-labs/FLUX.1-schnell",
        negative_prompt="blurry",
        width=768,
        height=1024,
        steps=30,
        guidance_scale=7.0,
        seed=4294967295,
    )


def test_null_and_empty_optional_fields_count_as_absent(make_settings):
    request = parse({"prompt": "p", "negativePrompt": "", "seed": None, "width": None, "model": None}, make_settings())
    assert request == GenerationRequest(prompt="p")


@pytest.mark.parametrize(
    "body, code, field",
    [
        (b"{not json", "invalid_json", None),
        (b"\xff\xfe", "invalid_json", None),
        (b"[" * 50_000, "invalid_json", None),
        ([1, 2], "invalid_body", None),
        ("a string", "invalid_body", None),
        ({}, "missing_field", "prompt"),
        ({"prompt": None}, "missing_field", "prompt"),
        ({"prompt": "   "}, "invalid_field", "prompt"),
        ({"prompt": 5}, "invalid_field", "prompt"),
        ({"prompt": "p", "negative_prompt": "x"}, "unknown_field", "negative_prompt"),
        ({"prompt": "p", "width": 500}, "invalid_field", "width"),
        ({"prompt": "p", "width": 248}, "invalid_field", "width"),
        ({"prompt": "p", "height": 2056}, "invalid_field", "height"),
        ({"prompt": "p", "width": 512.5}, "invalid_field", "width"),
        ({"prompt": "p", "width": "512"}, "invalid_field", "width"),
        ({"prompt": "p", "width": True}, "invalid_field", "width"),
        ({"prompt": "p", "steps": 0}, "invalid_field", "steps"),
        ({"prompt": "p", "steps": 101}, "invalid_field", "steps"),
        ({"prompt": "p", "guidanceScale": -0.1}, "invalid_field", "guidanceScale"),
        ({"prompt": "p", "guidanceScale": 30.5}, "invalid_field", "guidanceScale"),
        ({"prompt": "p", "guidanceScale": "7"}, "invalid_field", "guidanceScale"),
        ({"prompt": "p", "seed": -1}, "invalid_field", "seed"),
        ({"prompt": "p", "seed": 4294967296}, "invalid_field", "seed"),
        ({"prompt": "p", "seed": 1.5}, "invalid_field", "seed"),
        ({"prompt": "p", "negativePrompt": ["x"]}, "invalid_field", "negativePrompt"),
        ({"prompt": "p", "model": "someone/else"}, "model_not_allowed", "model"),
        ({"prompt": "p", "model": "../../evil"}, "model_not_allowed", "model"),
        ({"prompt": "p", "model": 3}, "invalid_field", "model"),
    ],
)
def test_bad_requests_name_the_problem(make_settings, body, code, field):
    error = error_for(body, make_settings())
    assert (error.status, error.code, error.field) == (400, code, field)
    if field:
        assert field in error.message


def test_nan_guidance_is_rejected(make_settings):
    error = error_for(b'{"prompt": "p", "guidanceScale": NaN}', make_settings())
    assert error.field == "guidanceScale"


def test_a_typo_gets_a_suggestion(make_settings):
    assert 'Did you mean "guidanceScale"' in error_for({"prompt": "p", "guidance_scale": 7}, make_settings()).message
    assert 'Did you mean "steps"' in error_for({"prompt": "p", "step": 7}, make_settings()).message


def test_prompt_length_is_bounded_by_max_prompt_chars(make_settings):
    settings = make_settings(MAX_PROMPT_CHARS="10")
    assert parse({"prompt": "x" * 10}, settings).prompt == "x" * 10
    error = error_for({"prompt": "x" * 11}, settings)
    assert error.field == "prompt" and "at most 10" in error.message


def test_error_messages_do_not_echo_huge_values(make_settings):
    error = error_for({"prompt": "p", "width": "9" * 5000}, make_settings())
    assert len(error.message) < 200


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/merge+json"])
def test_json_content_types_are_accepted(content_type):
    check_content_type(content_type)


@pytest.mark.parametrize("content_type", [None, "", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_other_content_types_are_415(content_type):
    with pytest.raises(UnsupportedMediaType) as caught:
        check_content_type(content_type)
    assert caught.value.status == 415 and "application/json" in caught.value.message


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
def test_a_lone_surrogate_is_a_400_naming_the_field_before_any_upstream_call(make_app, mocked, png_upstream, body, field):
    answer = make_app().post("/api/generate-image", data=body, content_type="application/json")
    assert answer.status_code == 400 and answer.mimetype == "application/json"
    payload = answer.get_json()
    assert payload["code"] == "invalid_field" and payload["field"] == field
    assert len(mocked.calls) == 0
    answer.data.decode("utf-8")  # the answer itself is valid UTF-8


def test_a_proper_surrogate_pair_is_just_text(make_settings):
    request = parse_request('{"prompt": "a fox \\ud83e\\udd8a"}'.encode(), make_settings())
    assert request.prompt == "a fox \U0001f98a"


def test_echoing_a_surrogate_in_an_error_never_raises(make_settings):
    # The unknown-field and allow-list messages echo what was sent; they must stay encodable.
    for body in ('{"prompt": "x", "mod\\ud800el": 1}', '{"prompt": "x", "model": "a\\udc00b"}'):
        with pytest.raises(InvalidRequest) as caught:
            parse_request(body.encode(), make_settings())
        json.dumps({"error": caught.value.message, "field": caught.value.field}, ensure_ascii=False).encode("utf-8")


# --- 14. whole numbers written as floats ------------------------------------------------------


def test_whole_numbers_written_as_floats_are_integers(make_settings):
    body = b'{"prompt": "x", "steps": 61.0, "height": 728.0, "width": 7.68e2, "seed": 4294967295.0}'
    request = parse_request(body, make_settings())
    assert (request.steps, request.height, request.width, request.seed) == (61, 728, 768, 4294967295)
    assert all(type(value) is int for value in (request.steps, request.height, request.width, request.seed))


@pytest.mark.parametrize(
    "field, raw",
    [("steps", "61.5"), ("steps", "NaN"), ("steps", "Infinity"), ("steps", "-Infinity"), ("steps", "true"),
     ("seed", "1e300"), ("seed", "4294967296.0"), ("height", "730.0"), ("width", "2056.0"), ("steps", "0.0")],
)
def test_other_floats_stay_refused_for_integer_fields(make_settings, field, raw):
    with pytest.raises(InvalidRequest) as caught:
        parse_request(f'{{"prompt": "x", "{field}": {raw}}}'.encode(), make_settings())
    assert caught.value.field == field
