"""structlog set-up: JSON lines for journald and log shippers, or a console view for people."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from eoid.config import LogFormat

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(fmt: LogFormat | str = LogFormat.AUTO, level: str = "info",
              stream: TextIO | None = None) -> None:
    """Configure structlog once per process. ``auto`` picks console on a terminal, else JSON."""
    stream = stream or sys.stderr
    fmt = LogFormat(fmt)
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.CONSOLE if stream.isatty() else LogFormat.JSON
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt is LogFormat.JSON:
        # journald adds its own timestamp, but shippers reading files want one; "event"
        # becomes "message", the key most log pipelines index.
        processors += [structlog.processors.format_exc_info,
                       structlog.processors.EventRenamer("message"),
                       structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
    printer = structlog.PrintLogger(stream)  # one for all: each device binds a logger
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *args: printer,
        cache_logger_on_first_use=False,
    )
