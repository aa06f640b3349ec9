"""The functions-framework entry point: `functions-framework --target=generate_image`."""

import os

import functions_framework

from imagegen.app import create_handler
from imagegen.config import DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS
from imagegen.malloc import limit_malloc_arenas
from imagegen.serving import json_error_pages, limit_request_head_time

limit_malloc_arenas(os.environ)
# google-cloud-storage (3.17) otherwise starts a background request for bucket metadata with
# every client, which costs time and fails offline; it reads this process-wide switch itself.
os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
_handler, _settings = create_handler(os.environ)
# What the server stack answers outside the handler: JSON, not HTML; no thread held forever
# by a client that sends part of a request head (see imagegen/serving.py).
json_error_pages(functions_framework.errorhandler)
limit_request_head_time(_settings.request_head_timeout_seconds if _settings else DEFAULT_REQUEST_HEAD_TIMEOUT_SECONDS)


@functions_framework.http
def generate_image(request):
    return _handler(request)
