"""A logger of its own for a test, and the lines it wrote."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@contextmanager
def recorded(prefix: str, level: int = logging.NOTSET) -> Iterator[tuple[logging.Logger, Records]]:
    """A fresh logger named `prefix-<random>` that keeps its lines to itself; NOTSET: the root
    logger's level decides (warnings), as for a logger nobody configured."""
    logger = logging.getLogger(f"{prefix}-{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(level)
    handler = Records()
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
