"""The HTTP adapter alone: which endpoint answers a path and method, and in which error shape."""

from __future__ import annotations

import logging

import flask

from imagegen.errors import InvalidRequest
from imagegen.http import AccessLog, Endpoint, Handler, response


def answering(text: str) -> Endpoint:
    return Endpoint(("GET", "POST"), lambda request, record: response(200, text.encode(), {}), "no")


def client(handler: Handler):
    app = flask.Flask("t")
    app.add_url_rule("/", "root", lambda: handler(flask.request), methods=["GET", "POST", "PUT", "OPTIONS"])
    app.add_url_rule("/<path:rest>", "any", lambda rest: handler(flask.request), methods=["GET", "POST", "PUT", "OPTIONS"])
    return app.test_client()


def make(**suffixes: Endpoint) -> Handler:
    return Handler(
        {"/exact": (answering("exact"),)},
        answering("fallback"),
        access_log=AccessLog(logging.getLogger("test"), 0, None),
        cors_allowed_origins=("*",),
        clock=lambda: 0.0,
        suffixes={"/v1/images/generations": (answering("images"),), "/images/generations": (answering("short"),)},
    )


def test_a_suffix_route_answers_under_any_prefix_and_the_longest_suffix_wins():
    c = client(make())
    assert c.post("/v1/images/generations").get_data(as_text=True) == "images"
    assert c.post("/imagegen/v1/images/generations").get_data(as_text=True) == "images"
    assert c.post("/images/generations").get_data(as_text=True) == "short"
    assert c.post("/exact").get_data(as_text=True) == "exact"
    assert c.post("/anything/else").get_data(as_text=True) == "fallback"


def test_an_endpoint_answers_errors_in_its_own_shape():
    def refuse(request, record):
        raise InvalidRequest("nope", field="prompt")

    shaped = Endpoint(("POST",), refuse, "no", error_shape=lambda error, request_id: {"error": {"message": error.message}})
    handler = Handler(
        {},
        shaped,
        access_log=AccessLog(logging.getLogger("test"), 0, None),
        cors_allowed_origins=("*",),
        clock=lambda: 0.0,
    )
    answer = client(handler).post("/")
    assert answer.status_code == 400 and answer.get_json() == {"error": {"message": "nope"}}


def test_an_options_answer_has_no_content_type():
    answer = client(make()).options("/")
    assert answer.status_code == 204 and "Content-Type" not in answer.headers
