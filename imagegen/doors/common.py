"""What every door is built from, and the first steps every door's request takes."""

from __future__ import annotations

from dataclasses import dataclass

import flask

from imagegen.auth import Authenticator, client_ip
from imagegen.catalog import Catalog
from imagegen.http import AccessLog, read_body
from imagegen.record import RequestRecord
from imagegen.service import GenerationService
from imagegen.validation import check_content_type


@dataclass(frozen=True)
class DoorParts:
    """The parts every door shares, built once in imagegen.app."""

    service: GenerationService
    authenticator: Authenticator
    catalog: Catalog
    access_log: AccessLog
    max_prompt_chars: int
    trusted_proxy_hops: int

    def caller(self, request: flask.Request, record: RequestRecord) -> str:
        """The caller's key (its rate limit and budgets), noted in the log record; raises
        Unauthorized or Forbidden for a caller this deployment does not let in."""
        ip = client_ip(request.headers.get("X-Forwarded-For"), request.remote_addr, self.trusted_proxy_hops)
        caller = self.authenticator.authenticate(request.headers, ip)
        record.fields["caller"] = caller.key
        return caller.key


def json_body(request: flask.Request) -> bytes:
    """The body of a request that must be JSON: its Content-Type checked before it is read."""
    check_content_type(request.headers.get("Content-Type"))
    return read_body(request)
