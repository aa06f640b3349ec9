"""One JSON line per request on stdout, which Cloud Logging reads as a structured entry.

Prompts are personal data and the token is a secret: a line holds the prompt's length and a
short hash (to match repeats), never the prompt or any credential.
"""

from __future__ import annotations

import hashlib
import json
import logging
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


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": record.getMessage(),
            "logger": record.name,
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["message"] += "\n" + self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time, not what it was at start-up."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger() -> logging.Logger:
    """The package logger, writing JSON lines to stdout (set up once per process)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h.formatter, JsonLineFormatter) for h in logger.handlers):
        handler = StdoutHandler()
        handler.setFormatter(JsonLineFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


def prompt_fingerprint(prompt: str) -> dict[str, Any]:
    digest = hashlib.sha256(prompt.encode("utf-8", "replace")).hexdigest()[:12]
    return {"promptChars": len(prompt), "promptSha256": digest}
