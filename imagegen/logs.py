"""One JSON line per request on stdout, which Cloud Logging reads as a structured entry; on a
terminal (LOG_FORMAT=auto, the default) or with LOG_FORMAT=text, one short readable line.

Prompts are personal data and the token is a secret: a line holds the prompt's length and a
short hash (to match repeats), never the prompt or any credential.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from typing import Any

LOGGER_NAME = "imagegen"

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


# Every string a line carries is cut here, in the formatters, whoever logged it: a request can
# bring an 8 MiB path (functions-framework sets no request-line limit), a user agent, an
# upstream's error text. With these bounds no line is more than a few KB.
MAX_FIELD_CHARS = 1024
MAX_MESSAGE_CHARS = 2048
MAX_EXCEPTION_CHARS = 8192
MAX_ITEMS = 64  # entries kept of any list or dict
_MAX_DEPTH = 8


def bounded(value: Any, limit: int = MAX_FIELD_CHARS, depth: int = 0) -> Any:
    """`value` with every string cut to `limit` characters (saying how long it was), every
    list and dict to MAX_ITEMS entries; numbers, booleans and None as they are."""
    if isinstance(value, str):
        return value if len(value) <= limit else f"{value[:limit]}...[{len(value)} chars]"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth >= _MAX_DEPTH:
        return "..."
    if isinstance(value, dict):
        items = list(value.items())
        kept = {}
        for key, item in items[:MAX_ITEMS]:
            # Most keys and values need no cut: taking them as they are here, not through a
            # call each, halves the cost of an access log line (about 60 us of 150).
            if type(key) is not str or len(key) > 64:
                key = bounded(str(key), 64)
            kind = type(item)
            if not (item is None or kind is int or kind is float or kind is bool or (kind is str and len(item) <= limit)):
                item = bounded(item, limit, depth + 1)
            kept[key] = item
        if len(items) > MAX_ITEMS:
            kept["..."] = f"{len(items) - MAX_ITEMS} more"
        return kept
    if isinstance(value, (list, tuple)):
        kept_items = [bounded(item, limit, depth + 1) for item in value[:MAX_ITEMS]]
        return kept_items + ([f"...{len(value) - MAX_ITEMS} more"] if len(value) > MAX_ITEMS else [])
    return bounded(str(value), limit)


class _BoundedFormatter(logging.Formatter):
    """The one place a record's message, fields and traceback are bounded, for both lines."""

    def parts(self, record: logging.LogRecord) -> tuple[str, dict[str, Any], str | None]:
        message = bounded(record.getMessage(), MAX_MESSAGE_CHARS)
        fields = bounded(getattr(record, "fields", None) or {})
        exception = None
        if record.exc_info:
            text = self.formatException(record.exc_info)
            if len(text) > MAX_EXCEPTION_CHARS:  # the start says where, the end says what
                text = f"{text[:1024]}\n...[{len(text)} chars]...\n{text[-(MAX_EXCEPTION_CHARS - 1024):]}"
            exception = text
        return message, fields, exception


class JsonLineFormatter(_BoundedFormatter):
    def format(self, record: logging.LogRecord) -> str:
        message, fields, exception = self.parts(record)
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": message,
            "logger": record.name,
        }
        entry.update(fields)
        if exception:
            entry["message"] += "\n" + exception
        line = json.dumps(entry, ensure_ascii=False, default=str)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate from somewhere: the escaped form is still one valid JSON line.
            line = json.dumps(entry, ensure_ascii=True, default=str)
        return line


class StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time, not what it was at start-up.

    The line is formatted before the handler's lock is taken: with a hundred requests
    finishing together, formatting under the lock made them queue for it.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    def handle(self, record: logging.LogRecord) -> bool:
        if not self.filter(record):
            return False
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return False
        with self.lock:
            try:
                self.stream.write(line)
                self.flush()
            except Exception:
                self.handleError(record)
        return True

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


class TextLineFormatter(_BoundedFormatter):
    """A line a person reads in a terminal: time, severity, what happened, and the few fields
    that say how (backend, model, seed, cache, error code, request id)."""

    def format(self, record: logging.LogRecord) -> str:
        message, fields, exception = self.parts(record)
        details = fields.get("imagegen", {})
        if not isinstance(details, dict):
            details = {}
        parts = [self.formatTime(record, "%H:%M:%S"), f"{_SEVERITY.get(record.levelno, 'DEFAULT'):<7}", message]
        if details.get("backend"):
            route = "/".join(str(details[key]) for key in ("backend", "provider") if details.get(key))
            parts.append(f"{route} {details.get('model', '')}".rstrip())
        if details.get("seed") is not None:
            parts.append(f"seed {details['seed']}")
        if details.get("cached"):
            parts.append("from cache")
        if details.get("stream"):
            parts.append("streamed")
        retries = len(details.get("attempts", ())) - 1
        if retries > 0:
            parts.append(f"{retries} more tr{'y' if retries == 1 else 'ies'}")
        if fields.get("requestId"):
            parts.append(f"[{fields['requestId'][:8]}]")
        line = "  ".join(parts)
        if details.get("error"):
            line += f"\n    {details['error']}"
        if details.get("warning"):
            line += f"\n    warning: {details['warning']}"
        if exception:
            line += "\n" + exception
        return line


LOG_FORMATS = ("auto", "json", "text")


def get_logger(log_format: str | None = None) -> logging.Logger:
    """The package logger on stdout (set up once per process). `log_format` (LOG_FORMAT) picks
    the line: json for Cloud Logging, text for a person, auto: text on a terminal."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = next((h for h in logger.handlers if isinstance(h, StdoutHandler)), None)
    if handler is None:
        handler = StdoutHandler()
        handler.setFormatter(JsonLineFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    if log_format is not None:
        text = log_format == "text" or (log_format == "auto" and _is_terminal(sys.stdout))
        handler.setFormatter(TextLineFormatter() if text else JsonLineFormatter())
    return logger


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def prompt_fingerprint(prompt: str) -> dict[str, Any]:
    digest = hashlib.sha256(prompt.encode("utf-8", "replace")).hexdigest()[:12]
    return {"promptChars": len(prompt), "promptSha256": digest}


# Span ids are unsigned 64-bit: at most 20 decimal digits. An unbounded \d+ let a caller make
# int() convert thousands of digits (and raise past Python's 4,300-digit limit).
_CLOUD_TRACE = re.compile(r"([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?(?:;o=([01]))?")
MAX_SPAN_ID = 2**64 - 1
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def trace_fields(cloud_trace: str | None, traceparent: str | None, project: str | None) -> dict[str, Any]:
    """Cloud Logging's trace fields, so the line sits under its request in the trace view.

    From X-Cloud-Trace-Context ("TRACE/SPAN;o=1", span in decimal) or W3C traceparent
    ("00-TRACE-SPAN-FLAGS", span in hex). Without the project id there is nothing to link to.
    """
    if not project:
        return {}
    try:
        return _trace_fields(cloud_trace, traceparent, project)
    except Exception:  # a log line's extras must never fail the request they describe
        return {}


def _trace_fields(cloud_trace: str | None, traceparent: str | None, project: str) -> dict[str, Any]:
    trace = span = None
    sampled = False
    if traceparent and (match := _TRACEPARENT.fullmatch(traceparent.strip())):
        trace, span, sampled = match.group(1), match.group(2), bool(int(match.group(3), 16) & 1)
    elif cloud_trace and (match := _CLOUD_TRACE.fullmatch(cloud_trace.strip())):
        trace = match.group(1).lower()
        span_id = int(match.group(2)) if match.group(2) else 0
        span = f"{span_id:016x}" if 0 < span_id <= MAX_SPAN_ID else None
        sampled = match.group(3) == "1"
    if not trace:
        return {}
    fields: dict[str, Any] = {
        "logging.googleapis.com/trace": f"projects/{project}/traces/{trace}",
        "logging.googleapis.com/trace_sampled": sampled,
    }
    if span:
        fields["logging.googleapis.com/spanId"] = span
    return fields


def http_request_fields(
    method: str,
    url: str,
    status: int,
    latency_seconds: float,
    user_agent: str | None,
    remote_ip: str,
    request_size: int | None,
    response_size: int | None,
) -> dict[str, Any]:
    """Cloud Logging's httpRequest object (LogEntry.HttpRequest)."""
    fields: dict[str, Any] = {
        "requestMethod": method,
        "requestUrl": url,
        "status": status,
        "latency": f"{latency_seconds:.6f}s",
        "remoteIp": remote_ip,
    }
    if user_agent:
        fields["userAgent"] = user_agent[:256]
    if request_size is not None:
        fields["requestSize"] = str(request_size)
    if response_size is not None:
        fields["responseSize"] = str(response_size)
    return fields
