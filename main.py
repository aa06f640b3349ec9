"""The functions-framework entry point: `functions-framework --target=generate_image`."""

import os

import functions_framework

from imagegen.http import build_handler
from imagegen.malloc import limit_malloc_arenas
from imagegen.serving import json_error_pages, buffer_connections

limit_malloc_arenas(os.environ)
# What the server stack answers outside the handler: JSON, not HTML; no thread held by a
# client that trickles its request or never reads its answer (see imagegen/serving.py).
json_error_pages(functions_framework.errorhandler)
buffer_connections(os.environ)
_handler = build_handler(os.environ)


@functions_framework.http
def generate_image(request):
    return _handler(request)
