"""The daemon's log as journald and an operator see it: priorities, rate-limited repeats of
a hung guest's EOI timeouts, and the log level applied on reload."""

from __future__ import annotations

import json
import os
import signal
import time
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
        assert [e.get("log_level") for e in changed] == ["debug -> warning"]
        attached = [e for e in events if e["message"] == "consumer attached"]
        assert len(attached) == 1  # the second attach came after the level went to warning
        assert not [e for e in events if e["level"] in ("debug", "info")
                    and events.index(e) > events.index(changed[0])]


STORMY = ("policy: {storm: {max_rate: 200, burst: 10, backoff_initial: 1ms, "
          "backoff_max: 50ms, recovery: 200ms}}\n")


def storm_episode(env: Env, vm: Consumer) -> None:
    """A stuck line with a guest that EOIs at once, then quiet past recovery and a normal
    interrupt, which ends the episode."""
    env.sim("set", line="dev0", stuck=True)
    env.sim("raise", line="dev0")
    deadline = time.monotonic() + 5
    while not env.device("dev0")["storm"]:  # a guest that EOIs at once
        assert time.monotonic() < deadline, "no storm"
        if vm.wait_irq(0.5):
            vm.send_eoi()
    env.sim("set", line="dev0", stuck=False)
    env.sim("ack", line="dev0")
    while vm.wait_irq(0.3):
        vm.send_eoi()
    wait_until(lambda: env.device("dev0")["state"] == "armed", 5)
    env.sim("raise", line="dev0")
    assert vm.wait_irq() == 1
    env.sim("ack", line="dev0")
    vm.send_eoi()
    wait_until(lambda: not env.device("dev0")["storm"], 5, "storm over")


def test_storm_episodes_that_keep_coming_are_summarised() -> None:
    with environment(devices=1, device_yaml=STORMY) as env:
        env.config.write_text(env.config.read_text().replace(
            "level: debug}", "level: debug, repeat_summary: 3s}"))
        env.start_sim()
        env.start_daemon()
        with Consumer(env.control, "dev0") as vm:
            storm_episode(env, vm)
            storm_episode(env, vm)
            storm_episode(env, vm)

            def storms() -> list[dict[str, Any]]:
                return [e for e in env.log_events("daemon")
                        if e["message"].startswith("interrupt storm")]

            assert [e["message"] for e in storms()] == [
                "interrupt storm: deferring unmasks", "interrupt storm over"]
            wait_until(lambda: len(storms()) == 3, 10, "the period's summary")
        summary = storms()[2]
        assert (summary["message"], summary["repeats"], summary["level"]) == (
            "interrupt storm: deferring unmasks", 2, "warning")
