"""Logging never costs a request: odd trace headers, text UTF-8 cannot hold, a failing log line."""

from __future__ import annotations

import json

import pytest


# --- 2. logging never fails a request ------------------------------------------------------

TRACE = "105445aa7843bc8bf206b12000100000"


@pytest.mark.parametrize(
    "header, span",
    [
        (f"{TRACE}/1;o=1", "0000000000000001"),
        (f"{TRACE}/18446744073709551615;o=1", "ffffffffffffffff"),  # the largest uint64
        (f"{TRACE}/18446744073709551616;o=1", None),  # one more: not a span id
        (f"{TRACE}/{'9' * 4301};o=1", None),  # past Python's int() digit limit
        (f"{TRACE}/١٢٣;o=1", None),  # Arabic-Indic digits are \d, and int() takes them
    ],
)
def test_a_cloud_trace_span_id_is_bounded(header, span):
    from imagegen.logs import trace_fields

    fields = trace_fields(header, None, "p")
    assert fields.get("logging.googleapis.com/spanId") == span


def test_a_huge_trace_span_id_still_gets_the_image_and_a_log_line(make_app, mocked, png_upstream, capsys):
    answer = make_app(GOOGLE_CLOUD_PROJECT="p").post(
        "/api/generate-image", json={"prompt": "x"}, headers={"X-Cloud-Trace-Context": f"{TRACE}/{'7' * 4301};o=1"}
    )
    assert answer.status_code == 200 and answer.get_json()["success"] is True
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"httpRequest"' in line]
    assert [line["httpRequest"]["status"] for line in lines] == [200]


def test_a_log_line_with_a_lone_surrogate_is_still_written_as_json(capsys):
    import logging

    from imagegen.logs import get_logger

    get_logger().log(logging.WARNING, "odd %s", "\udc80", extra={"fields": {"x": "\ud800"}})
    line = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert line["message"] == "odd \udc80" and line["x"] == "\ud800"


def test_a_log_line_that_fails_never_costs_the_answer(make_app, monkeypatch):
    import imagegen.http

    def broken_log(*args, **kwargs):
        raise RuntimeError("a bug in the log line")

    monkeypatch.setattr(imagegen.http.AccessLog, "_write", broken_log)
    answer = make_app().get("/openapi.yaml")
    assert answer.status_code == 200
