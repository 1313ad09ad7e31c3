"""Logging: journald priorities, the standard library through structlog, reserved fields,
settings applied on reload, and rate-limited repeats of an ongoing condition."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

import pytest
import structlog
import uvloop

from eoid import log
from eoid.config import LogConfig, LogFormat


@pytest.fixture
def logfile(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "eoid.log", "a+", buffering=1) as f:
        yield f
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, log._ToStructlog):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    log._Current.setup = None
    log.REPEATS.every = log.REPEAT_SUMMARY_DEFAULT


def lines(f: TextIO) -> list[str]:
    f.seek(0)
    return f.read().splitlines()


def events(f: TextIO) -> list[dict[str, Any]]:
    return [json.loads(line[line.index("{"):]) for line in lines(f)]


def as_journal(monkeypatch: pytest.MonkeyPatch, f: TextIO) -> None:
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def test_under_journald_every_line_carries_its_syslog_priority(
        logfile: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    as_journal(monkeypatch, logfile)
    log.configure("json", "debug", logfile)
    logger = structlog.get_logger("t")
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    try:
        raise ValueError("x")
    except ValueError:
        logger.exception("x")
    logger.critical("c")
    got = [(line[:3], json.loads(line[3:])["message"]) for line in lines(logfile)]
    assert got == [("<7>", "d"), ("<6>", "i"), ("<4>", "w"), ("<3>", "e"), ("<3>", "x"),
                   ("<2>", "c")]


def test_a_multi_line_console_record_is_prefixed_on_every_line(
        logfile: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    as_journal(monkeypatch, logfile)
    log.configure("console", "info", logfile)
    try:
        raise ValueError("boom")
    except ValueError:
        structlog.get_logger("t").exception("failed")
    out = lines(logfile)
    assert len(out) > 3  # the traceback
    assert all(line.startswith("<3>") for line in out), out


def test_no_prefix_when_the_stream_is_not_the_journal_stream(
        logfile: TextIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """JOURNAL_STREAM is inherited: a child whose stderr was redirected must not prefix."""
    st = os.stat(tmp_path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    log.configure("json", "info", logfile)
    structlog.get_logger("t").warning("w")
    assert lines(logfile)[0].startswith("{")


def test_stdlib_logging_goes_through_structlog_at_the_configured_level(
        logfile: TextIO, monkeypatch: pytest.MonkeyPatch) -> None:
    as_journal(monkeypatch, logfile)
    log.configure("json", "info", logfile)
    logging.getLogger("somelib").debug("not shown")
    for new_loop in (asyncio.new_event_loop, uvloop.new_event_loop):
        loop = new_loop()
        try:
            try:
                raise OSError("socket gone")
            except OSError as e:
                # what asyncio and uvloop do with an error no task handled
                loop.call_exception_handler({"message": "unhandled", "exception": e})
        finally:
            loop.close()
    out = lines(logfile)
    assert len(out) == 2, out
    for line in out:
        assert line.startswith("<3>")
        event = json.loads(line[3:])
        assert event["logger"] == "asyncio"
        assert event["level"] == "error"
        assert event["message"].startswith("unhandled")
        assert "OSError: socket gone" in event["exception"]


def test_fields_named_like_the_pipeline_keys_are_kept(logfile: TextIO) -> None:
    log.configure("json", "info", logfile)
    structlog.get_logger("t").info("daemon says", message={"event": "detached"}, level=3,
                                   timestamp="then")
    [event] = events(logfile)
    assert event["message"] == "daemon says"
    assert event["message_"] == {"event": "detached"}
    assert (event["level"], event["level_"], event["timestamp_"]) == ("info", 3, "then")


def test_reload_applies_the_level_and_says_so(logfile: TextIO) -> None:
    log.configure("json", "info", logfile)
    logger = structlog.get_logger("t")
    log.reconfigure(LogConfig(format=LogFormat.JSON, level="error"))
    logger.warning("hidden")
    log.reconfigure(LogConfig(format=LogFormat.JSON, level="debug"))
    logger.debug("shown")
    log.reconfigure(LogConfig(format=LogFormat.JSON, level="debug"))  # no change: no line
    got = [(e["message"], e["level"], e.get("log_level")) for e in events(logfile)]
    assert got == [
        ("log settings changed", "info", "info -> error"),  # before the switch: still shown
        ("log settings changed", "debug", "error -> debug"),  # after the switch
        ("shown", "debug", None),
    ]


def test_a_level_given_on_the_command_line_survives_reloads(logfile: TextIO) -> None:
    log.configure("json", "debug", logfile, pinned=["level"])
    log.reconfigure(LogConfig(format=LogFormat.JSON, level="error"))
    structlog.get_logger("t").debug("still shown")
    assert [e["message"] for e in events(logfile)] == ["still shown"]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, method: str) -> Callable[..., None]:
        return lambda event, **kw: self.calls.append((method, event, kw))


def test_repeats_of_an_ongoing_condition_are_summarised_once_a_period() -> None:
    now = [0.0]
    timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(delay: float, fn: Callable[[], None]) -> None:
        timers.append((now[0] + delay, fn))

    def run_timers() -> None:
        due = [t for t in timers if t[0] <= now[0]]
        for t in due:
            timers.remove(t)
            t[1]()

    rec = Recorder()
    repeats = log.Repeats(10.0, lambda: now[0], call_later)
    # a hung guest: an EOI timeout every 0.5 s for 25 s
    for _ in range(50):
        repeats.log(rec, ("dev0", "eoi"), "warning", "EOI timeout", n=now[0])
        now[0] += 0.5
        run_timers()
    assert [(m, e) for m, e, _ in rec.calls] == [("warning", "EOI timeout")] * 3
    assert rec.calls[0][2] == {"n": 0.0}
    assert rec.calls[1][2] == {"repeats": 19, "period": "10s", "n": 9.5}
    assert rec.calls[2][2]["repeats"] == 20
    assert repeats.logging(("dev0", "eoi")) is False  # being summarised
    assert repeats.log(rec, ("dev1", "eoi"), "warning", "EOI timeout")  # another device
    # the guest recovers: the last period's count is summarised, then the condition is over
    now[0] += 10
    run_timers()
    assert rec.calls[-1][2]["repeats"] == 10  # 20 s .. 24.5 s
    now[0] += 10
    run_timers()
    assert not timers
    assert repeats.logging(("dev0", "eoi"))
    assert repeats.log(rec, ("dev0", "eoi"), "warning", "EOI timeout")  # logged at once again


def test_repeats_summarise_on_the_running_event_loop() -> None:
    rec = Recorder()
    repeats = log.Repeats(0.05)

    async def main() -> None:
        for _ in range(5):
            repeats.log(rec, "k", "warning", "storm")
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert [kw.get("repeats") for _, _, kw in rec.calls] == [None, 4]


def test_what_is_counted_is_summarised_at_shutdown() -> None:
    timers: list[Callable[[], None]] = []
    rec = Recorder()
    repeats = log.Repeats(60.0, lambda: 0.0, lambda delay, fn: timers.append(fn))
    for n in range(4):
        repeats.log(rec, "k", "warning", "EOI timeout", n=n)
    repeats.log(rec, "quiet", "warning", "storm")
    repeats.flush()
    assert [(e, kw) for _, e, kw in rec.calls] == [
        ("EOI timeout", {"n": 0}), ("storm", {}),
        ("EOI timeout", {"repeats": 3, "period": "60s", "n": 3})]
    for fn in timers:  # the periods' ends come later: nothing more to say
        fn()
    assert len(rec.calls) == 3
    assert repeats.log(rec, "k", "warning", "EOI timeout")  # a fresh start
