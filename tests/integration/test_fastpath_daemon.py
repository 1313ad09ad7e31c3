"""The daemon with the fast path and without (tests/integration/conftest.py runs these
both ways), against consumers that misbehave through the public control protocol."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Consumer, Env, environment, wait_until

FULL = 0xFFFFFFFFFFFFFFFE  # an eventfd count one more write would have to wait for


@pytest.fixture
def env() -> Iterator[Env]:
    with environment(devices=2) as e:
        e.start_sim()
        e.start_daemon()
        yield e


def threads(env: Env) -> set[str]:
    pid = env.procs[-1].pid
    return {(task / "comm").read_text().strip()
            for task in Path(f"/proc/{pid}/task").iterdir()}


def counter(env: Env, name: str, device: str, **labels: str) -> float:
    key = tuple(sorted({"device": device, **labels}.items()))
    return env.scrape()[name].get(key, 0.0)


def round_trips(env: Env, vm: Consumer, line: str, n: int) -> None:
    for _ in range(n):
        env.sim("raise", line=line)
        assert vm.wait_irq() == 1
        env.sim("ack", line=line)
        vm.send_eoi()


def test_the_daemon_runs_in_the_mode_asked(env: Env, fastpath_mode: str) -> None:
    assert ("eoid-lane" in threads(env)) == (fastpath_mode == "fast")
    with Consumer(env.control, "dev0") as vm:
        round_trips(env, vm, "dev0", 20)
    # the last EOI may still be on its way through the lane when the consumer leaves
    wait_until(lambda: counter(env, "eoid_unmasks_total", "dev0") == 20, 5, "20 unmasks")


def test_a_consumer_that_clears_o_nonblock_and_fills_its_irq_stalls_only_its_device(
        env: Env) -> None:
    """Its dup of irq shares eoid's file and flags. Before, the next forward blocked for
    ever (on the lane, under its mutex: then the event loop, the metrics and shutdown)."""
    with Consumer(env.control, "dev0") as bad, Consumer(env.control, "dev1") as good:
        for fd in (bad.irq, bad.eoi):
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        os.eventfd_write(bad.irq, FULL)
        round_trips(env, good, "dev1", 5)  # the lane holds dev1 by now
        env.sim("raise", line="dev0")
        wait_until(lambda: counter(env, "eoid_errors_total", "dev0", op="forward") >= 1,
                   what="the forward to the full irq counted as an error")
        round_trips(env, good, "dev1", 20)
        assert env.device("dev1")["state"] in ("armed", "pending")
        assert counter(env, "eoid_unmasks_total", "dev1") == 25
    failed = [e for e in env.log_events("daemon")
              if e.get("message") == "forward failed" and e.get("device") == "dev0"]
    assert len(failed) == 1
