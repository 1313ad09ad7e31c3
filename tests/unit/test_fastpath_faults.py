"""Injected faults (a test build of eoid/_fastpath.c with -DEOID_FAULT_INJECTION): the
lane's epoll_ctl, read, write and unmask ioctl fail on demand. Whatever fails, no device is
stranded (every round trip completes, on the lane or on the event loop), no lane spins, and
every failure is counted in eoid_errors_total (the lane's epoll_ctl and reads as
op="fastpath") and logged once."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import importlib.util
import os
import select
import socket
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from structlog.testing import capture_logs

import eoid.runner
from eoid import _fastpath
from eoid.channel import State
from eoid.config import DeviceConfig
from eoid.control import Peer
from eoid.device import drain_eventfd
from eoid.runner import DeviceRunner
from eoid.stats import BUCKETS_NS, ERROR_OPS
from tests.unit.test_fastpath import FakeLine
from tests.unit.test_fastpath_edges import FULL, blocking, lane_cpu_seconds

ROOT = Path(__file__).resolve().parents[2]
FIONBIO = 0x5421  # an ioctl any fd takes: the unmask of the ioctl tests
ROUNDS = 20


@pytest.fixture(scope="session")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The extension built with fault injection: the installed one if it is such a build
    (``./dev sanitize``), else compiled here."""
    if _fastpath.FAULT_INJECTION:
        return _fastpath
    out = tmp_path_factory.mktemp("faulty") / f"_fastpath{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-g", "-Wall", "-Wextra", "-Werror",
                    "-DEOID_FAULT_INJECTION", f"-I{sysconfig.get_paths()['include']}",
                    str(ROOT / "eoid" / "_fastpath.c"), "-o", str(out)], check=True)
    spec = importlib.util.spec_from_file_location("eoid._fastpath", out)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)  # not in sys.modules: only these tests
    spec.loader.exec_module(module)
    module.set_buckets(BUCKETS_NS)
    return module


class Rig:
    """A runner on a threaded lane of the test build, its event loop (run while a device
    and its guest do round trips on a thread of their own) and a consumer."""

    def __init__(self, fp: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
        self.fp = fp
        monkeypatch.setattr(eoid.runner, "_fastpath", fp)
        self.loop = asyncio.new_event_loop()
        self.lane = fp.Lane()
        self.loop.add_reader(self.lane.notify_fd, self.lane.dispatch)
        config = DeviceConfig.model_validate({
            "name": "d", "pci_address": "0000:00:01.0", "backend": {"type": "sim"},
            "policy": {"eoi_timeout": "50ms", "on_eoi_timeout": "redeliver",
                       "storm": {"max_rate": 1e9, "burst": 10**6}}})
        self.runner = DeviceRunner(config, self.loop, lambda *a: None, lane=self.lane)
        self.device = FakeLine(raw_unmask=True)
        self.runner.start(self.device)
        self.sock, self.other = socket.socketpair()
        self.irq, self.eoi = self.runner.attach(Peer(self.sock, 1, 0, frozenset()))
        self.warm_up()

    def warm_up(self) -> None:
        """Round trips until the fast path holds the state (the first one leaves a loop
        timer behind for the EOI deadline, which the fast path needs)."""
        self.round_trips(3)
        assert self.runner._fast is not None and self.runner._fast.lent

    def round_trips(self, n: int) -> None:
        """``n`` interrupts raised, forwarded, ended and unmasked, with the event loop
        running meanwhile; fails if one does not complete within seconds."""
        done: list[int] = []

        def device_and_guest() -> None:
            line = self.device.line
            for _ in range(n):
                line.device_raise()
                if not select.select([self.irq], [], [], 5)[0]:
                    return
                drain_eventfd(self.irq)
                self.device.deassert()
                os.eventfd_write(self.eoi, 1)
                if not select.select([self.device.unmask_fd], [], [], 5)[0]:
                    return
                self.device.process_unmasks()
                done.append(1)

        async def until_done(thread: threading.Thread) -> None:
            while thread.is_alive():
                await asyncio.sleep(0.001)

        thread = threading.Thread(target=device_and_guest)
        thread.start()
        self.loop.run_until_complete(until_done(thread))
        thread.join()
        assert len(done) == n, f"stranded after {len(done)} of {n} round trips"

    def errors(self) -> dict[str, int]:
        """eoid_errors_total{op} as eoid.metrics writes it (one sample per ERROR_OPS)."""
        stats = self.runner.stats
        return {op: stats.errors[op] for op in ERROR_OPS}

    def close(self) -> None:
        self.fp.inject_fault("epoll_ctl", 0, 0)
        self.runner.close()
        self.device.close()
        self.loop.remove_reader(self.lane.notify_fd)
        self.lane.close()
        self.loop.close()
        for fd in (self.irq, self.eoi):
            os.close(fd)
        self.sock.close()
        self.other.close()


@pytest.fixture
def rig(faulty: ModuleType, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    r = Rig(faulty, monkeypatch)
    yield r
    for op in ("epoll_ctl", "read", "write", "ioctl", "race"):
        faulty.inject_fault(op, 0, 0)
    r.close()


def failures(logs: list[MutableMapping[str, Any]], op: str) -> int:
    return sum(e["event"] == f"{op} failed" for e in logs)


def settled(rig: Rig) -> None:
    """Whatever failed, the device ends up served and the lane idle."""
    rig.round_trips(ROUNDS)
    stats = rig.runner.stats
    assert stats.interrupts >= ROUNDS and stats.unmasks >= ROUNDS
    assert lane_cpu_seconds(0.3) < 0.1  # nothing spins: the lane waits, and so does the loop


@pytest.mark.parametrize("count", [1, 50])
def test_epoll_ctl_add_fails_and_the_loop_keeps_the_device(rig: Rig, count: int) -> None:
    fast = rig.runner._fast
    assert fast is not None
    fast.reclaim()  # the next lend adds the fds again: that is what fails
    rig.runner._sync_readers()
    with capture_logs() as logs:
        rig.fp.inject_fault("epoll_ctl", count, errno.ENOMEM)
        rig.round_trips(ROUNDS)
        rig.fp.inject_fault("epoll_ctl", 0, 0)
        settled(rig)
    assert failures(logs, "epoll") == 1
    assert rig.errors()["fastpath"] >= 1
    assert fast.lent  # taken again once epoll_ctl works


def test_epoll_ctl_del_fails_and_the_lane_rebuilds_its_set(rig: Rig) -> None:
    with capture_logs() as logs:
        rig.fp.inject_fault("epoll_ctl", 2, errno.EBADF)  # both fds of the next reclaim
        rig.runner.set_config(rig.runner.config)  # takes the state back, and lends it again
        settled(rig)
    assert failures(logs, "epoll") == 1
    # both DELs; and the next ADD, if it came before the lane rebuilt its set (EEXIST)
    assert rig.errors()["fastpath"] in (2, 3)


def test_a_failed_read_on_the_lane_hands_the_device_to_the_loop(rig: Rig) -> None:
    with capture_logs() as logs:
        rig.fp.inject_fault("read", 1, errno.EIO)
        settled(rig)
    assert failures(logs, "read") == 1
    assert rig.errors()["fastpath"] == 1


def test_a_failed_forward_is_redelivered_counted_and_logged(rig: Rig) -> None:
    with capture_logs() as logs:
        rig.fp.inject_fault("write", 1, errno.EIO)  # the forward of the next interrupt
        settled(rig)  # the EOI timeout redelivers it (from the loop)
    assert failures(logs, "forward") == 1
    assert rig.errors()["forward"] == 1
    assert rig.runner.stats.eoi_timeouts == 1


@pytest.mark.parametrize("quiet_first", [False, True])
def test_a_forward_that_waits_after_its_poll_is_rescued_by_the_sentinel(
        rig: Rig, quiet_first: bool) -> None:
    """The race guarded_write cannot close: a consumer that cleared O_NONBLOCK fills its
    irq count between the lane's poll() and its write(). The write waits, under the
    device's mutex; the lane's sentinel interrupts it (RESCUE_SIGNAL) after RESCUE_AFTER_NS
    (50 ms), the forward fails with EINTR, is counted and logged, and the device is served
    again once its consumer reads its count. ``quiet_first``: after a quiet second and a
    half the sentinel sleeps, and the write wakes it."""
    if quiet_first:
        time.sleep(1.5)
    blocking(rig.irq)
    os.eventfd_write(rig.irq, FULL)
    with capture_logs() as logs:
        rig.fp.inject_fault("race", 1, 0)
        start = time.monotonic()
        rig.device.line.device_raise()

        async def forward_failed() -> None:
            while rig.runner.stats.errors["forward"] == 0 and time.monotonic() - start < 10:
                await asyncio.sleep(0.001)
        rig.loop.run_until_complete(forward_failed())
        waited = time.monotonic() - start
        assert rig.runner.stats.errors["forward"] >= 1
        assert 0.04 < waited < 2, waited  # interrupted, not failed at once, not hung
        assert drain_eventfd(rig.irq) == FULL  # the consumer reads its count at last
        fcntl.fcntl(rig.irq, fcntl.F_SETFL, fcntl.fcntl(rig.irq, fcntl.F_GETFL) | os.O_NONBLOCK)

        async def redelivered() -> None:  # eoi_timeout (50 ms), policy redeliver
            while not select.select([rig.irq], [], [], 0)[0]:
                await asyncio.sleep(0.005)
        rig.loop.run_until_complete(asyncio.wait_for(redelivered(), 5))
        drain_eventfd(rig.irq)
        rig.device.deassert()
        os.eventfd_write(rig.eoi, 1)
        rig.loop.run_until_complete(asyncio.sleep(0.05))
        rig.device.process_unmasks()
        settled(rig)
    assert failures(logs, "forward") == 1


def test_a_failed_unmask_ioctl_is_done_by_the_runner(rig: Rig) -> None:
    fast = rig.runner._fast
    assert fast is not None
    rig.runner.set_config(rig.runner.config)  # (only to take the state back meanwhile)
    fast.set_unmask(rig.device.unmask_fd, FIONBIO, (1).to_bytes(4, "little"))
    with capture_logs() as logs:
        rig.fp.inject_fault("ioctl", 1, errno.EIO)
        rig.round_trips(1)  # the lane's unmask fails: the runner's, through the device, works
    fast.set_unmask(rig.device.unmask_fd)
    settled(rig)
    assert failures(logs, "unmask") == 1
    assert rig.errors()["unmask"] == 1
    assert rig.runner.state in (State.ARMED, State.PENDING)


def test_every_fault_at_once_strands_nothing(rig: Rig) -> None:
    with capture_logs() as logs:
        for op in ("epoll_ctl", "read", "write", "ioctl", "race"):
            rig.fp.inject_fault(op, 3, errno.EIO)
        rig.runner.set_config(rig.runner.config)
        rig.round_trips(ROUNDS)
        for op in ("epoll_ctl", "read", "write", "ioctl", "race"):
            rig.fp.inject_fault(op, 0, 0)
        settled(rig)
    for op in ("epoll", "read", "forward"):
        assert failures(logs, op) == 1, op
    for op in ("fastpath", "forward"):
        assert rig.errors()[op] >= 1, op


def test_the_normal_build_has_no_faults_to_inject() -> None:
    if _fastpath.FAULT_INJECTION:
        pytest.skip("this run uses the fault-injection build")
    with pytest.raises(RuntimeError, match="EOID_FAULT_INJECTION"):
        _fastpath.inject_fault("read", 1, 5)


def test_a_test_build_loads_beside_the_normal_one(faulty: ModuleType) -> None:
    assert faulty.FAULT_INJECTION == 1
    lane = faulty.Lane(threaded=False)
    try:
        assert faulty.Lane is _fastpath.Lane or not isinstance(lane, _fastpath.Lane)
    finally:
        lane.close()


def test_a_busy_line_stays_on_the_lane_when_its_eoi_timer_passes(rig: Rig) -> None:
    """The lane declines an interrupt whose EOI deadline no loop timer covers. A loop timer
    that found nothing due used to leave none behind, so every eoi_timeout a busy line's
    next interrupt went through Python (at 1024 devices, 2 s: 500 timers and 500 declined
    interrupts a second, most of eoid's CPU over C at 10k interrupts/s). The timer now
    covers the next eoi_timeout while the lane relays; an idle line stops waking the loop."""
    fast = rig.runner._fast  # (no fault is injected here)
    assert fast is not None
    on_loop = rig.runner.channel.stats.interrupts
    reclaims: list[int] = []
    reclaim = rig.runner._reclaim

    def counted() -> None:
        reclaims.append(1)
        reclaim()
    rig.runner._reclaim = counted  # type: ignore[method-assign]
    for _ in range(12):  # 240 ms: four of rig's 50 ms timeouts
        rig.round_trips(2)
        rig.loop.run_until_complete(asyncio.sleep(0.02))
    assert fast.lent
    assert rig.runner.channel.stats.interrupts == on_loop  # every one on the lane
    assert reclaims == []  # and each timer left the state there (FastPath.keep)
    rig.loop.run_until_complete(asyncio.sleep(0.15))  # idle: one more timer, then none
    assert rig.runner._timer is None
