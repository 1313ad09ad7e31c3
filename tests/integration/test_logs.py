"""The daemon's log as journald and an operator see it: priorities, rate-limited repeats of
a hung guest's EOI timeouts, and the log level applied on reload."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest

from tests.helpers import Consumer, Env, environment, wait_until

HUNG_GUEST = "policy: {eoi_timeout: 100ms, on_eoi_timeout: redeliver}\n"


def journal_lines(env: Env) -> list[tuple[int, dict[str, Any]]]:
    """The daemon's log lines as (syslog priority, event); every line must have both."""
    out = []
    for line in env.log("daemon").splitlines():
        assert line[0] == "<" and line[2] == ">", f"no <N> priority prefix: {line!r}"
        out.append((int(line[1]), json.loads(line[3:])))
    return out


def start_as_under_journald(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """What systemd does for StandardError=journal: JOURNAL_STREAM names the daemon's stderr."""
    path = env.root / "daemon.log"
    path.touch()
    st = os.stat(path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    env.start_daemon()


def test_a_hung_guest_logs_one_warning_then_a_summary_per_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """redeliver with a guest that never EOIs: an EOI timeout every 100 ms, for ever. The
    journal gets the first one, then one summary a second, each at warning priority."""
    with environment(devices=1, device_yaml=HUNG_GUEST) as env:
        env.write_daemon()
        env.config.write_text(env.config.read_text().replace(
            "level: debug}", "level: debug, repeat_summary: 1s}"))
        env.start_sim()  # JOURNAL_STREAM is not its stream: it must not prefix
        start_as_under_journald(env, monkeypatch)
        with Consumer(env.control, "dev0") as vm:
            env.sim("raise", line="dev0")
            assert vm.wait_irq() == 1  # ... and never an EOI

            def timeouts() -> list[dict[str, Any]]:
                return [e for p, e in journal_lines(env) if e["message"] == "EOI timeout"]

            wait_until(lambda: len(timeouts()) >= 3, 10, "a first warning and two summaries")
            counted = env.scrape()["eoid_eoi_timeouts_total"][(("device", "dev0"),)]
            got = timeouts()
        assert all(p == 4 for p, e in journal_lines(env) if e["level"] == "warning")
        assert all(p == 6 for p, e in journal_lines(env) if e["level"] == "info")
        assert "repeats" not in got[0]
        assert [e["period"] for e in got[1:]] == ["1s"] * (len(got) - 1)
        # about ten a second, each counted; the log has one line a second
        assert counted >= 15
        assert 1 + sum(e["repeats"] for e in got[1:]) <= counted
        assert len(got) <= 1 + counted / 5
        assert env.log("sim").startswith("{")


def reloads(env: Env) -> float:
    return env.scrape()["eoid_config_reloads_total"].get((("result", "success"),), 0.0)


def test_log_level_applies_on_reload_and_the_change_is_logged() -> None:
    with environment(devices=1) as env:  # level: debug
        env.start_sim()
        daemon = env.start_daemon()
        with Consumer(env.control, "dev0"):
            pass
        env.config.write_text(env.config.read_text().replace("level: debug", "level: warning"))
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: reloads(env) == 1, 10, "the reload")
        with Consumer(env.control, "dev0"):
            pass
        daemon.send_signal(signal.SIGHUP)  # the same settings: nothing to say
        wait_until(lambda: reloads(env) == 2, 10, "the second reload")
        events = env.log_events("daemon")
        changed = [e for e in events if e["message"] == "log settings changed"]
        assert [e.get("level_") for e in changed] == ["debug -> warning"]
        attached = [e for e in events if e["message"] == "consumer attached"]
        assert len(attached) == 1  # the second attach came after the level went to warning
        assert not [e for e in events if e["level"] in ("debug", "info")
                    and events.index(e) > events.index(changed[0])]
