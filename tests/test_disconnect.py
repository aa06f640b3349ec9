"""A plain (not streamed) request whose caller goes away is noticed, as a stream's is: the work
stops, and what it held (a queue place, a slot, the local model) is free for the next caller."""

from __future__ import annotations

import json
import socket
import time
from urllib.parse import urlsplit

import requests

from tests.servers import wait_until


def log_entry(log: str, request_id: str) -> dict | None:
    for line in log.splitlines():
        if line.startswith("{") and request_id in line:
            entry = json.loads(line)
            if entry.get("requestId") == request_id and "httpRequest" in entry:
                return entry
    return None


def test_a_plain_request_whose_caller_leaves_is_cancelled(run_function):
    # Four demo steps of 5 s: 20 s of work, unless the server notices the caller has gone.
    function = run_function(BACKENDS="demo", DEMO_STEP_SECONDS="5", RATE_LIMIT_PER_MINUTE="0")
    parts = urlsplit(function.url)
    body = b'{"prompt": "nobody will wait for this"}'
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-Id: leaving-caller\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
    left = time.monotonic()
    wait_until(lambda: log_entry(function.log(), "leaving-caller") is not None, 10, "the abandoned request's log line")
    entry = log_entry(function.log(), "leaving-caller")
    noticed_in = time.monotonic() - left
    assert entry["httpRequest"]["status"] == 499 and entry["imagegen"]["code"] == "cancelled"
    assert entry["imagegen"]["clientClosed"] is True
    assert noticed_in < 5, noticed_in  # not after the 20 s the work would have taken
    # And the function goes on answering.
    assert requests.get(function.url + "/capabilities.json", timeout=10).status_code == 200
