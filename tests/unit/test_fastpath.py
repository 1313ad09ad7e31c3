"""The C fast path (eoid/_fastpath.c): its own rules on real eventfds, then a stateful
differential check of a runner that uses it against one that never lends it the state."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from eoid import _fastpath
from eoid._fastpath import NO_TIME, FastPath
from eoid.channel import State
from eoid.config import DeviceConfig
from eoid.control import Peer
from eoid.device import DeviceEvent, DeviceInfo, drain_eventfd
from eoid.runner import EFD_FLAGS, DeviceRunner
from eoid.stats import BUCKETS_NS
from tests.unit.test_channel import KernelLine

S = 1_000_000_000


def efd() -> int:
    return os.eventfd(0, EFD_FLAGS)


class Harness:
    """A FastPath on real eventfds, with what it hands to Python recorded."""

    def __init__(self, unmask: bool = True) -> None:
        self.trigger, self.irq, self.eoi, self.unmask = efd(), efd(), efd(), efd()
        self.slow: list[tuple[int, int]] = []
        self.fp = FastPath(self.trigger, self.irq, self.eoi,
                           lambda kind, value: self.slow.append((kind, value)))
        if unmask:
            self.fp.set_unmask(self.unmask)

    def take(self, state: State = State.ARMED, *, tat: int = 0, interval: int = 1,
             limit: int = 10**12, loop_timer_at: int = 0, timer_at: int = NO_TIME) -> None:
        self.fp.take(state, 5, timer_at, tat, 7, 2 * S, interval, limit, limit // 2, 3,
                     loop_timer_at)

    def fire(self, n: int = 1) -> None:
        os.eventfd_write(self.trigger, n)
        self.fp.on_trigger()

    def end(self, n: int = 1) -> None:
        os.eventfd_write(self.eoi, n)
        self.fp.on_eoi()

    def close(self) -> None:
        for fd in (self.trigger, self.irq, self.eoi, self.unmask):
            os.close(fd)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def test_not_lent_everything_goes_to_python(h: Harness) -> None:
    h.fire(3)
    h.end(2)
    assert h.slow == [(_fastpath.TRIGGER, 3), (_fastpath.EOI, 2)]
    assert drain_eventfd(h.irq) == 0
    assert h.fp.counts() is None


def test_a_spurious_wake_up_reads_nothing(h: Harness) -> None:
    h.fp.on_trigger()
    h.fp.on_eoi()
    assert h.slow == []


def test_round_trip_forwards_unmasks_and_counts(h: Harness) -> None:
    h.take()
    h.fire(2)
    assert drain_eventfd(h.irq) == 1
    assert h.fp.state == State.PENDING
    h.end()
    assert drain_eventfd(h.unmask) == 1
    assert h.slow == []
    lent = h.fp.release()
    assert lent is not None
    state, pending_since, timer_at, tat, backoff = lent
    assert (state, timer_at, backoff) == (State.ARMED, NO_TIME, 3)  # a full bucket resets it
    assert pending_since < tat < pending_since + S  # the EOI's time, plus one token
    counts = h.fp.counts()
    assert counts is not None
    interrupts, coalesced, eois, forwards, unmasks, forward_errors = counts[:6]
    assert (interrupts, coalesced, eois, forwards, unmasks, forward_errors) == (2, 1, 1, 1, 1, 0)
    service, _, dispatch, _, unmask, _ = counts[6:]
    assert len(service) == len(BUCKETS_NS) + 1
    assert (sum(service), sum(dispatch), sum(unmask)) == (1, 1, 1)
    assert h.fp.counts() == counts  # reading resets nothing


def test_pending_deadline_set_by_the_trigger(h: Harness) -> None:
    h.take()
    h.fire()
    lent = h.fp.release()
    assert lent is not None
    _, pending_since, timer_at, _, _ = lent
    assert timer_at == pending_since + 2 * S


def test_a_trigger_without_a_loop_timer_for_its_deadline_goes_to_python(h: Harness) -> None:
    h.take(loop_timer_at=NO_TIME)
    h.fire()
    assert h.slow == [(_fastpath.TRIGGER, 1)]
    assert h.fp.fast and h.fp.state == State.ARMED  # unchanged: Python takes it back


def test_trigger_while_pending_and_eoi_while_armed_go_to_python(h: Harness) -> None:
    h.take(State.PENDING)
    h.fire()
    h.fp.release()
    h.take(State.ARMED)
    h.end()
    assert h.slow == [(_fastpath.TRIGGER, 1), (_fastpath.EOI, 1)]


def test_a_throttled_eoi_goes_to_python_untouched(h: Harness) -> None:
    now = 10**15  # far ahead of any monotonic clock: the bucket is deep in debt
    h.take(State.PENDING, tat=now, interval=S, limit=S)
    h.end()
    assert h.slow == [(_fastpath.EOI, 1)]
    assert h.fp.release() == (State.PENDING, 5, NO_TIME, now, 7)
    assert h.fp.counts() is None
    assert drain_eventfd(h.unmask) == 0


def test_no_raw_unmask_leaves_the_unmask_to_python() -> None:
    h = Harness(unmask=False)
    try:
        h.take(State.PENDING)
        h.end()
        assert len(h.slow) == 1 and h.slow[0][0] == _fastpath.UNMASK
        assert h.fp.state == State.ARMED
        counts = h.fp.counts()
        assert counts is not None and counts[4] == 0  # the unmask is Python's to count
    finally:
        h.close()


def test_a_failed_unmask_is_retried_by_python(h: Harness) -> None:
    os.eventfd_write(h.unmask, 0xFFFFFFFFFFFFFFFE)  # full: the next write would block
    h.take(State.PENDING)
    h.end()
    assert len(h.slow) == 1 and h.slow[0][0] == _fastpath.UNMASK


def test_a_failed_ioctl_is_retried_by_python(h: Harness) -> None:
    h.fp.set_unmask(h.unmask, 0x3B6E, b"\0" * 20)  # VFIO_DEVICE_SET_IRQS on an eventfd
    h.take(State.PENDING)
    h.end()
    assert len(h.slow) == 1 and h.slow[0][0] == _fastpath.UNMASK


def test_a_failed_forward_is_counted(h: Harness) -> None:
    os.eventfd_write(h.irq, 0xFFFFFFFFFFFFFFFE)
    h.take()
    h.fire()
    counts = h.fp.counts()
    assert counts is not None and counts[3:6] == (0, 0, 1)
    assert h.fp.state == State.PENDING


def test_only_armed_and_pending_can_be_lent(h: Harness) -> None:
    with pytest.raises(ValueError, match="ARMED and PENDING"):
        h.take(State.HELD)


# --- a runner that lends its state against one that never does --------------------------


class EventfdLine(KernelLine):
    """The kernel's INTx line of test_channel, signalling a real trigger eventfd."""

    def __init__(self, trigger_fd: int) -> None:
        super().__init__()
        self.trigger_fd = trigger_fd

    def _fire(self) -> None:
        super()._fire()
        os.eventfd_write(self.trigger_fd, 1)


class FakeLine:
    """A device on an ``EventfdLine`` whose unmask, like the sim backend's, is an eventfd
    write (raw for the fast path, or through ``unmask`` only)."""

    def __init__(self, raw_unmask: bool) -> None:
        self.unmask_fd = efd()
        self.raw_unmask = raw_unmask
        self.line = EventfdLine(-1)

    @property
    def info(self) -> DeviceInfo:
        return DeviceInfo("sim", "0000:00:01.0")

    def enable(self, trigger_fd: int) -> None:
        self.line.trigger_fd = trigger_fd

    def unmask(self) -> None:
        os.eventfd_write(self.unmask_fd, 1)

    def unmask_op(self) -> tuple[int, int, bytes] | None:
        return (self.unmask_fd, 0, b"") if self.raw_unmask else None

    def mask(self) -> None:
        self.line.masked = True

    def disable(self) -> None:
        self.line.trigger_fd = -1

    def close(self) -> None:
        if self.unmask_fd >= 0:
            os.close(self.unmask_fd)
            self.unmask_fd = -1

    def event_fds(self) -> list[int]:
        return []

    def read_event(self, fd: int) -> DeviceEvent | None:
        return None

    def held_fds(self) -> dict[str, int]:
        return {}

    def deassert(self) -> None:
        self.line.level = max(0, self.line.level - 1)

    def process_unmasks(self) -> None:
        """The kernel acts on the unmasks written since the last call (one is enough)."""
        if drain_eventfd(self.unmask_fd):
            self.line.unmask()


class Side:
    """One runner, its line and its consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: DeviceConfig, fast: bool,
                 raw_unmask: bool) -> None:
        self.runner = DeviceRunner(config, loop, lambda *a: None, fast=fast)
        self.device = FakeLine(raw_unmask)
        self.runner.start(self.device)
        self.sock, self.other = socket.socketpair()
        self.peer = Peer(self.sock, 1, 0, frozenset())
        self.consumer: tuple[int, int] | None = None
        self.unended = 0  # interrupts the consumer received and has not ended

    def snapshot(self) -> dict[str, Any]:
        stats = self.runner.stats.to_dict()
        for hist in ("service", "unmask_latency", "dispatch_latency"):
            stats[hist] = sum(stats[hist]["counts"])  # how many, not how long
        line = self.device.line
        return {"state": self.runner.state, "stats": stats, "unended": self.unended,
                "line": (line.level, line.masked, line.fires)}

    def close(self) -> None:
        self.runner.close()
        self.device.close()
        if self.consumer is not None:
            os.close(self.consumer[0])
            os.close(self.consumer[1])
        self.sock.close()
        self.other.close()


class FastVersusPython(RuleBasedStateMachine):
    """The same events, in the same order, to a runner with the fast path and one
    without: what they count, their states and what their lines do must never differ."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sides: list[Side] = []

    @rule(raw_unmask=st.booleans(), burst=st.sampled_from([2, 1000]))
    def start(self, raw_unmask: bool, burst: int) -> None:
        if self.sides:
            return
        # Nothing here may depend on how long a step takes: deadlines and the
        # backoff are far away, and with a burst of 2 the bucket refills at 1/s.
        config = DeviceConfig.model_validate({
            "name": "d", "pci_address": "0000:00:01.0", "backend": {"type": "sim"},
            "policy": {"eoi_timeout": "60s", "storm": {
                "max_rate": 1, "burst": burst, "backoff_initial": "60s",
                "backoff_max": "120s", "recovery": "60s"}}})
        self.sides = [Side(self.loop, config, fast, raw_unmask) for fast in (True, False)]

    @rule()
    def device_asserts(self) -> None:
        for side in self.sides:
            side.device.line.device_raise()

    @rule()
    def device_deasserts(self) -> None:
        for side in self.sides:
            side.device.deassert()

    @rule()
    def kernel_unmasks(self) -> None:
        for side in self.sides:
            side.device.process_unmasks()

    @rule()
    def trigger_ready(self) -> None:
        for side in self.sides:
            side.runner._fast.on_trigger()

    @rule()
    def eoi_ready(self) -> None:
        for side in self.sides:
            side.runner._fast.on_eoi()

    @rule()
    def consumer_reads_irq(self) -> None:
        for side in self.sides:
            if side.consumer is not None:
                side.unended += drain_eventfd(side.consumer[0])

    @rule(spurious=st.booleans())
    def consumer_ends(self, spurious: bool) -> None:
        for side in self.sides:
            if side.consumer is not None and (side.unended or spurious):
                side.unended = max(0, side.unended - 1)
                side.device.deassert()  # the guest acks the device, then EOIs
                os.eventfd_write(side.consumer[1], 1)

    @rule()
    def consumer_attaches(self) -> None:
        for side in self.sides:
            if side.consumer is None:
                irq, eoi = side.runner.attach(side.peer)
                side.consumer = (irq, eoi)

    @rule()
    def consumer_detaches(self) -> None:
        for side in self.sides:
            if side.consumer is not None:
                side.runner.detach(side.peer)
                os.close(side.consumer[0])
                os.close(side.consumer[1])
                side.consumer = None
                side.unended = 0

    @rule()
    def round_trip(self) -> None:
        """The common case in one step, so that examples reach storms and long runs."""
        self.device_asserts()
        self.trigger_ready()
        self.consumer_reads_irq()
        self.consumer_ends(spurious=False)
        self.eoi_ready()
        self.kernel_unmasks()

    @rule()
    def timer_fires(self) -> None:
        for side in self.sides:
            if side.runner._timer is not None:
                side.runner._timer.cancel()
                side.runner._on_timer()

    @rule()
    def status_is_read(self) -> None:
        for side in self.sides:
            side.runner.status()

    @invariant()
    def both_sides_agree(self) -> None:
        if self.sides:
            fast, python = (side.snapshot() for side in self.sides)
            assert fast == python

    def teardown(self) -> None:
        for side in self.sides:
            side.close()
        self.loop.close()


TestFastVersusPython = FastVersusPython.TestCase
TestFastVersusPython.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None)


def test_the_fast_path_runs_the_common_case() -> None:
    """Without this, the differential check could pass with the fast path never used."""
    machine = FastVersusPython()
    try:
        machine.start(raw_unmask=True, burst=1000)
        machine.consumer_attaches()
        fast = machine.sides[0].runner
        for _ in range(5):
            machine.round_trip()
        assert fast._fast.fast  # the state is the fast path's ...
        assert fast.stats.forwards == 5  # ... and it forwarded all but the first: that one
        assert fast.interrupts == fast.stats.interrupts == 5
        assert fast.channel.stats.forwards == 1  # found no loop timer for its deadline yet
        machine.both_sides_agree()
    finally:
        machine.teardown()
