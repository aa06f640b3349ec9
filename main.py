"""The functions-framework entry point: `functions-framework --target=generate_image`."""

import os

import functions_framework

from imagegen.http import build_handler
from imagegen.malloc import limit_malloc_arenas
from imagegen.serving import json_error_pages, limit_request_head_time

limit_malloc_arenas(os.environ)
# What the server stack answers outside the handler: JSON, not HTML; no thread held forever
# by a client that sends part of a request head (see imagegen/serving.py).
json_error_pages(functions_framework.errorhandler)
limit_request_head_time(os.environ)
_handler = build_handler(os.environ)


@functions_framework.http
def generate_image(request):
    return _handler(request)
