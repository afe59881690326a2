"""structlog set-up: one JSON object per line on stdout, Chinese kept readable, no locals in tracebacks."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(level: str = "info", stream: str = "stdout") -> None:
    """Call once, before the first log line (structlog caches nothing here, so tests can capture).
    ``stream`` "stderr" when stdout is the command's answer (``examwatch check``)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            # Tracebacks as data, without local variables: locals can hold passwords and keys.
            structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # looked up at each line, not bound now: pytest swaps sys.stdout/stderr per test
        logger_factory=lambda *_: structlog.PrintLogger(getattr(sys, stream)),
        cache_logger_on_first_use=False,
    )
