"""The composition root: settings in, a request handler out. The one place that builds the
parts (backends, dispatcher, store, shared state, authenticator, service) and gives each door
its endpoints on the HTTP adapter.

A process reads its settings once (`create_handler`). A setting that is wrong does not stop the
process: as functions-framework's `create_app` turns a start-up failure into a function that
raises later, the handler then answers every API request with that error (a 500 naming the
variable), which is what the caller and the log can act on.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import flask
import requests

from imagegen.auth import Authenticator, make_authenticator
from imagegen.backends.base import Backend
from imagegen.outbound import new_session
from imagegen.backends.registry import BACKENDS
from imagegen.capabilities import capabilities_document
from imagegen.catalog import catalog_of
from imagegen.config import Settings, load_settings
from imagegen.dispatch import Dispatcher
from imagegen.doors.a1111 import A1111Api
from imagegen.doors.common import DoorParts
from imagegen.doors.documents import json_document_endpoint, openapi_endpoint, page_endpoint
from imagegen.doors.json_api import JsonApi
from imagegen.doors.image_files import FILES_SUFFIX, image_url_maker
from imagegen.doors.openai_images import OpenAiImages
from imagegen.errors import ConfigurationError
from imagegen.http import AccessLog, Endpoint, Handler
from imagegen.images import configure_decoding
from imagegen.logs import get_logger
from imagegen.page import render_page
from imagegen.record import RequestRecord
from imagegen.retry import Timing
from imagegen.service import GenerationService
from imagegen.slots import ImageSlots
from imagegen.route_health import CircuitStore, RouteHealth
from imagegen.state import SharedState, make_state
from imagegen.storage import ImageStore, make_store

CAPABILITIES_PATH = "/capabilities.json"


def create_backends(settings: Settings, session: requests.Session) -> dict[str, Backend]:
    """The enabled backends, in failover order; each module imported only now."""
    return {
        name: importlib.import_module(BACKENDS[name].module).create(settings, settings.backend_settings[name], session)
        for name in settings.backends
    }


@dataclass(frozen=True)
class Parts:
    """Everything a handler is made of; tests pass their own for any of them."""

    dispatcher: Dispatcher | None = None
    store: ImageStore | None = None
    authenticator: Authenticator | None = None
    state: SharedState | None = None
    slots: ImageSlots | None = None
    logger: logging.Logger | None = None
    timing: Timing | None = None


def build_handler(settings: Settings, parts: Parts = Parts()) -> Handler:
    """The handler for these settings, every part built here unless `parts` brings it."""
    timing = parts.timing or Timing()
    logger = parts.logger or get_logger()
    state = parts.state or make_state(settings.state)
    # Circuits live in the shared state (Redis with STATE_URL), so every instance skips a failing route.
    circuits = state if isinstance(state, CircuitStore) else None
    dispatcher = parts.dispatcher or Dispatcher(
        create_backends(settings, new_session()),
        settings.max_retries,
        settings.failover_on_refusal,
        RouteHealth(settings.failover, circuits),
    )
    store = parts.store or make_store(settings)
    service = GenerationService(
        settings,
        dispatcher,
        store,
        state,
        parts.slots,
        timing,
    )
    catalog = catalog_of(dispatcher.backends)
    access_log = AccessLog(logger, settings.trusted_proxy_hops, settings.gcp_project)
    authenticator = parts.authenticator or make_authenticator(settings, new_session(pool_size=4))
    door_parts = DoorParts(
        service, authenticator, catalog, access_log, settings.max_prompt_chars, settings.trusted_proxy_hops
    )
    api = JsonApi(door_parts)
    capabilities = json.dumps(capabilities_document(settings, dispatcher.backends, catalog), ensure_ascii=False).encode()
    generate = api.endpoint()
    endpoints: dict[str, tuple[Endpoint, ...]] = {
        "/openapi.yaml": (openapi_endpoint(),),
        CAPABILITIES_PATH: (json_document_endpoint(CAPABILITIES_PATH, capabilities),),
    }
    if settings.serve_page:
        page = render_page(settings.max_prompt_chars, settings.auth_mode)
        endpoints["/"] = (generate, page_endpoint("/", page))
        endpoints["/index.html"] = (page_endpoint("/index.html", page),)
    # AUTOMATIC1111's API (/sdapi/v1/*) under any prefix, for the tools that speak it.
    a1111 = A1111Api(door_parts, clock=timing.clock)
    suffixes: dict[str, tuple[Endpoint, ...]] = {}
    # The Images API door (issue #20): its routes answer under any prefix.
    image_urls, file_endpoint = image_url_maker(settings, store)
    suffixes.update(OpenAiImages(door_parts, store, image_urls).suffix_routes())
    if file_endpoint is not None:
        suffixes[FILES_SUFFIX] = (file_endpoint,)
    suffixes.update(a1111.suffix_routes())
    return Handler(
        endpoints,
        generate,
        access_log=access_log,
        cors_allowed_origins=settings.cors_allowed_origins,
        clock=timing.clock,
        suffixes=suffixes,
    )


def failed_start_handler(error: ConfigurationError, logger: logging.Logger | None = None) -> Handler:
    """What a process whose settings are wrong answers: the error, on every API path."""

    def answer(request: flask.Request, record: RequestRecord) -> flask.Response:
        raise error

    failing = Endpoint(("POST",), answer, "Use POST with a JSON body to generate an image (got {method}).", allow="POST, OPTIONS")
    endpoints = {"/openapi.yaml": (openapi_endpoint(),), CAPABILITIES_PATH: (Endpoint(("GET", "HEAD"), answer, ""),)}
    # Nothing is known about this deployment's proxies or origins: trust no forwarded address.
    access_log = AccessLog(logger or get_logger(), trusted_proxy_hops=0, gcp_project=None)
    return Handler(endpoints, failing, access_log=access_log, cors_allowed_origins=("*",), clock=Timing().clock)


def _mib(value: int | None) -> int | None:
    return None if value is None else value * 2**20


def create_handler(environ: Mapping[str, str]) -> tuple[Handler, Settings | None]:
    """The handler for a process, and its settings (None when they are wrong)."""
    try:
        settings = load_settings(environ)
        get_logger(settings.log_format)
        configure_decoding(_mib(settings.decode_memory_mib), _mib(settings.max_decode_memory_mib))
        return build_handler(settings), settings
    except ConfigurationError as error:
        get_logger().error("Invalid configuration: %s", error.message)
        return failed_start_handler(error), None
