"""The doors read their fields with validation.py's readers: a value an error would echo is
safe to echo, whichever door it came through."""

from __future__ import annotations

import pytest

# A lone UTF-16 surrogate inside a list, where the door wants text: the error names the field.
NESTED_SURROGATE = b'{"prompt": "a red fox", "size": ["\\ud800"]}'


@pytest.mark.parametrize("path", ["/v1/images/generations", "/sdapi/v1/txt2img"])
def test_a_lone_surrogate_inside_a_list_is_a_400_not_a_500(make_app, path):
    client = make_app()
    body = NESTED_SURROGATE if "images" in path else NESTED_SURROGATE.replace(b'"size"', b'"width"')
    answer = client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.get_data(as_text=True)[:300]
    payload = answer.get_json()
    code = payload["error"]["code"] if "images" in path else payload["code"]
    assert code == "invalid_field"
