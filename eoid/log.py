"""structlog set-up: JSON lines for journald and log shippers, or a console view for people.

Every line goes through one structlog pipeline, including the standard library's
``logging`` (asyncio, uvloop). Under systemd each line starts with its syslog priority
(``<4>`` for a warning, sd-daemon(3)), so ``journalctl -p warning`` selects by level.
The settings apply again on reload (``reconfigure``). ``REPEATS`` keeps an ongoing
condition (a hung guest, a flapping storm) from logging a line per occurrence.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass
from typing import Any, TextIO

import structlog

from eoid.config import LogConfig, LogFormat

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
# syslog priorities (sd-daemon(3)): by structlog level name
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
             "critical": 2, "fatal": 2}
# keys the pipeline writes itself: a caller's field of the same name is kept with a "_"
_RESERVED = ("message", "level", "timestamp")
_BY_NUMBER = ((logging.CRITICAL, "critical"), (logging.ERROR, "error"),
              (logging.WARNING, "warning"), (logging.INFO, "info"), (0, "debug"))
REPEAT_SUMMARY_DEFAULT = 60.0


def journal_stream(stream: TextIO) -> bool:
    """True when ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM``).

    systemd sets ``JOURNAL_STREAM=dev:inode`` of the stream it gave us; comparing it with
    the fd tells "still writing to journald" from "redirected by someone since" (a child
    inherits the variable, not necessarily the stream)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):  # no fd (StringIO), bad variable
        return False


def _keep_caller_fields(_: Any, __: str, event_dict: structlog.typing.EventDict) \
        -> structlog.typing.EventDict:
    """A caller's ``message=``, ``level=`` … would be overwritten by the pipeline: rename it."""
    for key in _RESERVED:
        if key in event_dict:
            event_dict[key + "_"] = event_dict.pop(key)
    return event_dict


class _Prioritised:
    """Wrap a renderer: prefix every output line with ``<N>``, the syslog priority."""

    def __init__(self, renderer: Callable[..., Any]) -> None:
        self.renderer = renderer

    def __call__(self, logger: Any, method: str, event_dict: structlog.typing.EventDict) -> str:
        prefix = f"<{_PRIORITY.get(str(event_dict.get('level', method)), 6)}>"
        out = str(self.renderer(logger, method, event_dict))
        return "\n".join(prefix + line for line in out.split("\n"))


class _ToStructlog(logging.Handler):
    """The standard library's records (asyncio, uvloop) through the structlog pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(record.name)
            kw: dict[str, Any] = {"logger": record.name}
            if record.exc_info:
                kw["exc_info"] = record.exc_info
            method = next(name for no, name in _BY_NUMBER if record.levelno >= no)
            getattr(log, method)(record.getMessage(), **kw)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


@dataclass
class _Setup:
    fmt: LogFormat
    level: str
    stream: TextIO
    pinned: frozenset[str]


class _Current:
    setup: _Setup | None = None  # what configure() or the last reconfigure() applied


def configure(fmt: LogFormat | str = LogFormat.AUTO, level: str = "info",
              stream: TextIO | None = None, *, repeat_summary: float = REPEAT_SUMMARY_DEFAULT,
              pinned: Collection[str] = ()) -> None:
    """Configure logging for this process. ``auto`` picks console on a terminal, else JSON.

    ``pinned`` names the settings ("format", "level") the command line fixed: a reload
    leaves them alone."""
    _Current.setup = _Setup(LogFormat(fmt), level, stream or sys.stderr, frozenset(pinned))
    REPEATS.every = repeat_summary
    _apply(_Current.setup)


def _apply(setup: _Setup) -> None:
    stream, fmt = setup.stream, setup.fmt
    if fmt is LogFormat.AUTO:
        fmt = LogFormat.CONSOLE if stream.isatty() else LogFormat.JSON
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        _keep_caller_fields,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if fmt is LogFormat.JSON:
        # journald adds its own timestamp, but shippers reading files want one; "event"
        # becomes "message", the key most log pipelines index.
        processors += [structlog.processors.format_exc_info,
                       structlog.processors.EventRenamer("message")]
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    processors.append(_Prioritised(renderer) if journal_stream(stream) else renderer)
    printer = structlog.PrintLogger(stream)  # one for all: each device binds a logger
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[setup.level]),
        logger_factory=lambda *args: printer,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _ToStructlog)]:
        root.removeHandler(handler)
    root.addHandler(_ToStructlog())
    root.setLevel(_LEVELS[setup.level])


def reconfigure(settings: LogConfig) -> None:
    """Apply the ``log`` settings of a reloaded configuration and say what changed.

    The line is logged at the more verbose of the old and new levels, while that level
    is in force, so it shows whichever way the level moved."""
    old = _Current.setup
    if old is None:
        return
    new = _Setup(old.fmt if "format" in old.pinned else settings.format,
                 old.level if "level" in old.pinned else settings.level, old.stream, old.pinned)
    REPEATS.every = settings.repeat_summary / 1e9
    if (new.fmt, new.level) == (old.fmt, old.level):
        return
    changed = {"log_format": f"{old.fmt} -> {new.fmt}"} if new.fmt != old.fmt else {}
    if new.level != old.level:
        changed["log_level"] = f"{old.level} -> {new.level}"
    verbose = min(old.level, new.level, key=_LEVELS.__getitem__)
    log = structlog.get_logger("eoid")
    if verbose == old.level:
        getattr(log, verbose)("log settings changed", **changed)
    _apply(new)
    _Current.setup = new
    if verbose != old.level:
        getattr(log, verbose)("log settings changed", **changed)


@dataclass
class _Repeat:
    window_end: float
    summary: Callable[[int, dict[str, Any]], None]  # logs "repeats=N" with the last fields
    count: int = 0
    fields: dict[str, Any] | None = None


class Repeats:
    """Rate limits for warnings about an ongoing condition (a hung guest's EOI timeouts,
    a storm that flaps): the first occurrence is logged at once; later ones within
    ``every`` seconds are counted and logged as one summary line (``repeats=N``, the
    last occurrence's fields) when that period ends, and so on while they last. A
    condition quiet for a whole period logs its next occurrence at once again.

    The metrics count every occurrence; this only keeps the journal readable."""

    def __init__(self, every: float = REPEAT_SUMMARY_DEFAULT,
                 clock: Callable[[], float] = time.monotonic,
                 call_later: Callable[[float, Callable[[], None]], object] | None = None) \
            -> None:
        self.every = every
        self._clock = clock
        self._call_later = call_later
        self._open: dict[Hashable, _Repeat] = {}

    def log(self, logger: Any, key: Hashable, method: str, event: str, **fields: Any) -> bool:
        """Log ``event`` now or count it for the summary; True if it was logged now."""
        state = self._open.get(key)
        if state is None:
            getattr(logger, method)(event, **fields)
            if self.every > 0:

                def summary(count: int, last: dict[str, Any]) -> None:
                    getattr(logger, method)(event, repeats=count, period=f"{self.every:g}s",
                                            **last)

                self._open[key] = _Repeat(self._clock() + self.every, summary)
                if not self._schedule(key):
                    del self._open[key]  # no event loop to summarise on: log each one
            return True
        state.count += 1
        state.fields = fields
        return False

    def _schedule(self, key: Hashable) -> bool:
        delay = max(0.0, self._open[key].window_end - self._clock())
        call_later = self._call_later
        if call_later is None:
            try:
                call_later = asyncio.get_running_loop().call_later
            except RuntimeError:
                return False
        call_later(delay, lambda: self._end_period(key))
        return True

    def _end_period(self, key: Hashable) -> None:
        state = self._open.get(key)
        if state is None:
            return
        if not state.count:
            del self._open[key]  # quiet for a whole period: the condition is over
            return
        state.summary(state.count, state.fields or {})
        self._open[key] = _Repeat(self._clock() + self.every, state.summary)
        self._schedule(key)

    def flush(self) -> None:
        """Log what is counted but not yet summarised (at shutdown), and start afresh."""
        states, self._open = self._open, {}
        for state in states.values():
            if state.count:
                state.summary(state.count, state.fields or {})

    def logging(self, key: Hashable) -> bool:
        """True unless ``key``'s occurrences are being summarised (its last one was not logged)."""
        state = self._open.get(key)
        return state is None or not state.count


REPEATS = Repeats()
"""The daemon's rate limits, keyed by (device, condition); ``configure`` sets the period."""
