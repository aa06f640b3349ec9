"""The documents served beside the API, GET only: the try-it page, the OpenAPI description and
/capabilities.json (what this deployment offers, which the page and other frontends read)."""

from __future__ import annotations

from pathlib import Path

import flask

from imagegen.http import Endpoint, response
from imagegen.page import Page
from imagegen.record import RequestRecord

OPENAPI_PATH = Path(__file__).resolve().parent.parent.parent / "openapi.yaml"
DOCUMENT_METHODS = ("GET", "HEAD")
WRONG_METHOD = "{path} is a document: use GET. Generate images with POST to the API."


def page_endpoint(path: str, page: Page) -> Endpoint:
    def serve(request: flask.Request, record: RequestRecord) -> flask.Response:
        headers = {"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": page.content_security_policy}
        return response(200, page.html, headers)

    return Endpoint(DOCUMENT_METHODS, serve, WRONG_METHOD.format(path=path))


def json_document_endpoint(path: str, body: bytes) -> Endpoint:
    def serve(request: flask.Request, record: RequestRecord) -> flask.Response:
        return response(200, body, {"Content-Type": "application/json"})

    return Endpoint(DOCUMENT_METHODS, serve, WRONG_METHOD.format(path=path))


def openapi_endpoint() -> Endpoint:
    def serve(request: flask.Request, record: RequestRecord) -> flask.Response:
        return response(200, OPENAPI_PATH.read_bytes(), {"Content-Type": "application/yaml; charset=utf-8"})

    return Endpoint(DOCUMENT_METHODS, serve, WRONG_METHOD.format(path="/openapi.yaml"))
