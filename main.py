"""The functions-framework entry point: `functions-framework --target=generate_image`."""

import os

import functions_framework

from imagegen.app import create_handler
from imagegen.malloc import keep_large_buffers, limit_malloc_arenas
from imagegen.serving import buffer_connections, connection_limits, json_error_pages, no_control_socket

limit_malloc_arenas(os.environ)
keep_large_buffers(os.environ)
# google-cloud-storage (3.17) otherwise starts a background request for bucket metadata with
# every client, which costs time and fails offline; it reads this process-wide switch itself.
os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
_handler, _settings = create_handler(os.environ)
# What the server stack answers outside the handler: JSON, not HTML; no thread held forever
# by a client that trickles its request or never reads its answer; and no gunicorn control
# socket, which nothing uses (see imagegen/serving.py).
json_error_pages(functions_framework.errorhandler)
buffer_connections(connection_limits(_settings))
no_control_socket()


@functions_framework.http
def generate_image(request):
    return _handler(request)
