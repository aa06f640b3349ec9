"""The functions-framework entry point: `functions-framework --target=generate_image`."""

import os

import functions_framework

from imagegen.http import build_handler
from imagegen.malloc import limit_malloc_arenas

limit_malloc_arenas(os.environ)
_handler = build_handler(os.environ)


@functions_framework.http
def generate_image(request):
    return _handler(request)
