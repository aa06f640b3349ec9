"""No request can make a log line bigger than a few KB: the formatters cut every string."""

import json
import logging

import pytest

from imagegen.logs import JsonLineFormatter, TextLineFormatter

PATH = "/" + "a" * (8 * 2**20)  # #19: an 8 MiB path gave a 16.8 MB line (it is logged twice)
LINE_LIMIT = 12 * 1024


def record_for(path: str) -> logging.LogRecord:
    record = logging.LogRecord("imagegen", logging.WARNING, __file__, 1, "%s %s %s", ("GET", path, 404), None)
    record.fields = {
        "httpRequest": {"requestMethod": "GET", "requestUrl": path, "userAgent": "u" * 2**20, "status": 404},
        "path": path,
        "requestId": "r" * 2**20,
        "imagegen": {"error": "e" * 2**20, "warning": "w" * 2**20, "attempts": [{"code": "x"}] * 10_000},
    }
    return record


def failing_record() -> logging.LogRecord:
    try:
        raise ValueError("bad " + PATH)
    except ValueError:
        import sys

        return logging.LogRecord("imagegen", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())


@pytest.mark.parametrize("formatter", [JsonLineFormatter(), TextLineFormatter()])
def test_an_8_mib_path_makes_a_line_of_a_few_kb(formatter):
    line = formatter.format(record_for(PATH))
    assert len(line.encode()) < LINE_LIMIT
    assert " chars]" in line  # it says how long the value was


def test_the_json_line_stays_valid_and_keeps_short_values_whole():
    entry = json.loads(JsonLineFormatter().format(record_for(PATH)))
    assert entry["httpRequest"]["status"] == 404 and entry["httpRequest"]["requestMethod"] == "GET"
    assert entry["httpRequest"]["requestUrl"].startswith("/aaa") and len(entry["path"]) < 1100
    short = json.loads(JsonLineFormatter().format(record_for("/generate")))
    assert short["path"] == "/generate" and short["message"] == "GET /generate 404"


@pytest.mark.parametrize("formatter", [JsonLineFormatter(), TextLineFormatter()])
def test_a_huge_exception_text_is_cut(formatter):
    line = formatter.format(failing_record())
    assert len(line.encode()) < LINE_LIMIT and "ValueError" in line
