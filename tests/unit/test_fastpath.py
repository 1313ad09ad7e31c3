"""The C fast path (eoid/_fastpath.c): its own rules on real eventfds, its thread, then a
stateful differential check of a runner that uses it against one that never lends it."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import eoid.runner
from eoid._fastpath import NO_TIME, FastPath, Lane
from eoid.channel import State
from eoid.config import Datapath, DeviceConfig
from eoid.control import Peer
from eoid.device import DeviceEvent, DeviceInfo, drain_eventfd
from eoid.runner import EFD_FLAGS, DeviceRunner
from eoid.stats import BUCKETS_NS
from tests.unit.test_channel import KernelLine

S = 1_000_000_000


def efd() -> int:
    return os.eventfd(0, EFD_FLAGS)


class Harness:
    """A FastPath on a lane without a thread (``poll`` runs a round), on real eventfds."""

    def __init__(self, unmask: bool = True, threaded: bool = False) -> None:
        self.trigger, self.irq, self.eoi, self.unmask = efd(), efd(), efd(), efd()
        self.returned = 0
        self.lane = Lane(threaded=threaded)
        self.fp = FastPath(self.trigger, self.irq, self.eoi, self.count_return)
        self.lane.add(self.fp)
        if unmask:
            self.fp.set_unmask(self.unmask)

    def count_return(self) -> None:
        self.returned += 1

    def take(self, state: State = State.ARMED, *, tat: int = 0, interval: int = 1,
             limit: int = 10**12, loop_timer_at: int = 0, timer_at: int = NO_TIME,
             spurious_unmasks: bool = False, adopting: bool = False) -> None:
        self.fp.set_policy(2 * S, interval, limit, limit // 2, 3, spurious_unmasks)
        self.fp.lend(state, 5, timer_at, tat, 7, loop_timer_at, adopting)

    def fire(self, n: int = 1) -> None:
        os.eventfd_write(self.trigger, n)
        self.lane.poll()

    def end(self, n: int = 1) -> None:
        os.eventfd_write(self.eoi, n)
        self.lane.poll()

    def close(self) -> None:
        self.lane.close()
        for fd in (self.trigger, self.irq, self.eoi, self.unmask):
            os.close(fd)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def test_the_c_constants_are_the_channels() -> None:
    from eoid import _fastpath, runner

    assert (_fastpath.ARMED, _fastpath.PENDING) == (State.ARMED, State.PENDING)
    assert _fastpath.NO_TIME == runner.NO_TIME == (1 << 63) - 1


def test_not_lent_the_lane_reads_nothing(h: Harness) -> None:
    h.fire(3)
    h.end(2)
    assert (drain_eventfd(h.trigger), drain_eventfd(h.eoi)) == (3, 2)  # the loop's to read
    assert h.returned == 0
    assert h.fp.counts() is None


def test_round_trip_forwards_unmasks_and_counts(h: Harness) -> None:
    h.take()
    h.fire(2)
    assert drain_eventfd(h.irq) == 1
    assert h.fp.state == State.PENDING
    h.end()
    assert drain_eventfd(h.unmask) == 1
    assert h.returned == 0
    released = h.fp.reclaim()
    assert released is not None
    assert (released.state, released.timer_at, released.backoff, released.owes_unmask) == (
        State.ARMED, NO_TIME, 3, False)
    # the EOI's time, plus one token
    assert released.pending_since < released.tat < released.pending_since + S
    counts = h.fp.counts()
    assert counts is not None
    assert (counts.interrupts, counts.coalesced, counts.eois, counts.forwards, counts.unmasks,
            counts.forward_errors, counts.spurious) == (2, 1, 1, 1, 1, 0, 0)
    assert len(counts.service) == len(BUCKETS_NS) + 1
    assert (sum(counts.service), sum(counts.dispatch), sum(counts.unmask)) == (1, 1, 1)
    assert h.fp.counts() == counts  # reading resets nothing
    assert h.fp.reclaim() is None  # not lent any more
    h.fire()
    assert drain_eventfd(h.trigger) == 1  # ... and the lane no longer reads


def test_pending_deadline_set_by_the_trigger(h: Harness) -> None:
    h.take()
    h.fire()
    released = h.fp.reclaim()
    assert released is not None
    assert released.timer_at == released.pending_since + 2 * S


def test_what_the_lane_declines_it_hands_back_unread(h: Harness) -> None:
    h.take(loop_timer_at=NO_TIME)  # no loop timer for the EOI deadline a trigger would set
    h.fire()
    assert h.returned == 1
    assert h.fp.lent and h.fp.state == State.ARMED  # unchanged, until the runner takes it
    h.fire()
    assert drain_eventfd(h.trigger) == 1  # handed back: the lane reads no more
    assert h.returned == 1
    # what it read is the runner's to handle
    assert h.fp.reclaim() == (State.ARMED, 5, NO_TIME, 0, 7, 0, False, 1, False, False)


def test_a_trigger_while_pending_is_declined(h: Harness) -> None:
    h.take(State.PENDING)
    h.fire()
    released = h.fp.reclaim()
    assert released is not None
    assert (h.returned, released.carried, released.carried_eoi) == (1, 1, False)


def test_an_adopted_line_s_trigger_is_forwarded_its_eoi_declined(h: Harness) -> None:
    """Taken over with its state unknown (back from the kernel's path, or after a restart:
    ``Channel.adopt``), the line is PENDING and adopting: a trigger means it was armed,
    and the lane forwards it as from ARMED; an EOI alone is the channel's (the runner
    reads the trigger first), so the lane declines it."""
    h.take(State.PENDING, adopting=True, timer_at=2 * S)
    h.fire()
    assert (h.returned, drain_eventfd(h.irq)) == (0, 1)
    released = h.fp.reclaim()
    assert released is not None and released.state == State.PENDING
    assert not released.adopting and released.timer_at == released.pending_since + 2 * S
    h.take(State.PENDING, adopting=True, timer_at=2 * S)
    h.end()
    released = h.fp.reclaim()
    assert released is not None
    assert (h.returned, released.carried, released.carried_eoi) == (1, 1, True)
    assert released.adopting and drain_eventfd(h.unmask) == 0
    with pytest.raises(ValueError, match="adopting"):
        h.take(State.ARMED, adopting=True)  # the channel is PENDING while adopting


def test_a_spurious_eoi_is_counted_or_declined_as_the_policy_says(h: Harness) -> None:
    h.take(State.ARMED)
    h.end(2)
    counts = h.fp.counts()
    assert counts is not None and (counts.eois, counts.spurious) == (2, 2)
    assert (h.returned, h.fp.state) == (0, State.ARMED)
    h.fp.reclaim()
    h.take(State.ARMED, spurious_unmasks=True)  # the channel decides on the unmask
    h.end()
    released = h.fp.reclaim()
    assert released is not None
    assert (h.returned, released.carried, released.carried_eoi) == (1, 1, True)


def test_a_throttled_eoi_is_declined_untouched(h: Harness) -> None:
    now = 10**15  # far ahead of any monotonic clock: the bucket is deep in debt
    h.take(State.PENDING, tat=now, interval=S, limit=S)
    h.end(2)
    assert h.returned == 1
    assert h.fp.reclaim() == (State.PENDING, 5, NO_TIME, now, 7, 0, False, 2, True, False)
    assert h.fp.counts() is None
    assert drain_eventfd(h.unmask) == 0


def owes_unmask(h: Harness) -> None:
    h.take(State.PENDING)
    h.end()
    assert h.returned == 1
    released = h.fp.reclaim()
    assert released is not None
    assert released.state == State.ARMED and released.owes_unmask  # the unmask is owed
    counts = h.fp.counts()
    assert counts is not None and counts.eois == 1 and counts.unmasks == 0  # the runner's


def test_no_raw_unmask_leaves_the_unmask_to_the_runner() -> None:
    h = Harness(unmask=False)
    try:
        owes_unmask(h)
    finally:
        h.close()


def test_a_failed_unmask_is_owed_to_the_runner(h: Harness) -> None:
    os.eventfd_write(h.unmask, 0xFFFFFFFFFFFFFFFE)  # full: the next write would block
    owes_unmask(h)


def test_a_failed_ioctl_is_owed_to_the_runner(h: Harness) -> None:
    h.fp.set_unmask(h.unmask, 0x3B6E, b"\0" * 20)  # VFIO_DEVICE_SET_IRQS on an eventfd
    owes_unmask(h)


def test_a_failed_forward_is_counted(h: Harness) -> None:
    os.eventfd_write(h.irq, 0xFFFFFFFFFFFFFFFE)
    h.take()
    h.fire()
    counts = h.fp.counts()
    assert counts is not None
    assert (counts.forwards, counts.unmasks, counts.forward_errors) == (0, 0, 1)
    assert h.fp.errors == (1, 0, 0, 0)  # what the runner reads on each reclaim
    assert h.fp.state == State.PENDING
    assert h.returned == 1  # handed back after acting: the runner logs the error


def test_only_armed_and_pending_can_be_lent(h: Harness) -> None:
    with pytest.raises(ValueError, match="ARMED and PENDING"):
        h.take(State.HELD)


def test_a_removed_device_is_left_alone(h: Harness) -> None:
    h.take()
    h.lane.remove(h.fp)
    h.fire()
    assert drain_eventfd(h.trigger) == 1
    assert not h.fp.lent
    h.lane.remove(h.fp)  # idempotent


def test_a_device_removed_while_handed_back_is_not_called_back(h: Harness) -> None:
    h.take(loop_timer_at=NO_TIME)
    os.eventfd_write(h.trigger, 1)
    h.lane.ping()  # without a thread: one round, and no dispatch()
    assert (h.fp.lent, h.returned) == (True, 0)
    h.lane.remove(h.fp)
    other = FastPath(h.trigger, h.irq, h.eoi, h.count_return)
    h.lane.add(other)  # takes the freed slot
    h.lane.dispatch()
    assert h.returned == 0
    h.lane.remove(other)


def readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_the_lane_thread_runs_round_trips_and_answers_pings() -> None:
    h = Harness(threaded=True)
    try:
        with pytest.raises(RuntimeError, match="own thread"):
            h.lane.poll()
        h.take()
        for _ in range(100):
            os.eventfd_write(h.trigger, 1)
            assert readable(h.irq)
            assert drain_eventfd(h.irq) == 1
            os.eventfd_write(h.eoi, 1)
            assert readable(h.unmask)
            assert drain_eventfd(h.unmask) == 1
        counts = h.fp.counts()
        assert counts is not None and counts.interrupts == counts.unmasks == 100
        h.fp.reclaim()
        h.take(loop_timer_at=NO_TIME)
        os.eventfd_write(h.trigger, 1)
        assert readable(h.lane.notify_fd)  # declined: the loop is told
        h.lane.dispatch()
        assert h.returned == 1
        h.lane.ping()
        for _ in range(500):
            if h.lane.pongs:
                break
            select.select([], [], [], 0.01)
        assert h.lane.pongs == 1
    finally:
        h.close()
    h.lane.close()  # idempotent


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
        self.virqfd = -1  # on the kernel's path: the consumer's eoi, bound as the unmask

    @property
    def info(self) -> DeviceInfo:
        return DeviceInfo("sim", "0000:00:01.0")

    def enable(self, trigger_fd: int) -> None:
        self.line.trigger_fd = trigger_fd

    def route(self, trigger_fd: int, unmask_fd: int | None) -> None:
        """The kernel's path as VFIO makes it (synchronously): the trigger swapped, the
        consumer's EOI eventfd bound as the unmask (``process_unmasks`` reads it)."""
        self.line.trigger_fd = trigger_fd
        self.virqfd = -1 if unmask_fd is None else unmask_fd

    def kernel_interrupts(self) -> None:
        return None

    def reset(self) -> bool:
        return False

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

    def opening(self) -> None:
        return None

    def watch(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[int], None]) -> None:
        pass

    def fd_for_consumer(self) -> None:
        return None

    def deassert(self) -> None:
        self.line.level = max(0, self.line.level - 1)

    def process_unmasks(self) -> None:
        """The kernel acts on the unmasks written since the last call (one is enough),
        and on the kernel's path on the EOIs the consumer wrote (its virqfd)."""
        if drain_eventfd(self.unmask_fd) | (self.virqfd >= 0 and drain_eventfd(self.virqfd)):
            self.line.unmask()


class Side:
    """One runner, its line and its consumer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: DeviceConfig, fast: bool,
                 raw_unmask: bool) -> None:
        self.lane = Lane(threaded=False)
        self.runner = DeviceRunner(config, loop, lambda *a: None, lane=self.lane, fast=fast)
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
        channel = self.runner.channel  # (what the lane never changes: exact while lent)
        return {"state": self.runner.state, "stats": stats, "unended": self.unended,
                "line": (line.level, line.masked, line.fires), "storm": channel.in_storm,
                "stuck": channel.stuck}

    def close(self) -> None:
        self.runner.close()
        self.device.close()
        self.lane.close()
        if self.consumer is not None:
            os.close(self.consumer[0])
            os.close(self.consumer[1])
        self.sock.close()
        self.other.close()


INT64_MAX = (1 << 63) - 1


class FastVersusPython(RuleBasedStateMachine):
    """The same events, in the same order, to a runner with the fast path and one
    without: what they count, their states and what their lines do must never differ.

    Time is injected: both runners read ``self.now`` (``eoid.runner.monotonic_ns``) and
    the thread-less lanes are polled at it, so that EOI deadlines, throttle ends, storm
    recovery and the lane's decline rule (no loop timer covering the deadline) all come
    into play, with the clock up to the int64 limit."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sides: list[Side] = []
        self.now = 0
        self._clock = eoid.runner.monotonic_ns  # type: ignore[attr-defined]
        eoid.runner.monotonic_ns = lambda: self.now  # type: ignore[attr-defined]

    @rule(raw_unmask=st.booleans(), burst=st.sampled_from([2, 1000]),
          spurious_unmasks=st.booleans(),
          clock=st.sampled_from([0, 10**15, INT64_MAX - 3600 * S, INT64_MAX - 2 * S]),
          eoi_timeout=st.sampled_from(["50ms", "60s"]),
          on_eoi_timeout=st.sampled_from(["warn", "unmask", "redeliver"]),
          backoff=st.sampled_from([("1ms", "4ms", "10ms"), ("60s", "120s", "60s")]))
    def start(self, raw_unmask: bool, burst: int, spurious_unmasks: bool = False, *,
              clock: int = 0, eoi_timeout: str = "60s", on_eoi_timeout: str = "unmask",
              backoff: tuple[str, str, str] = ("60s", "120s", "60s")) -> None:
        if self.sides:
            return
        self.now = clock
        config = DeviceConfig.model_validate({
            "name": "d", "pci_address": "0000:00:01.0", "backend": {"type": "sim"},
            "policy": {"eoi_timeout": eoi_timeout, "on_eoi_timeout": on_eoi_timeout,
                       "unmask_on_spurious": spurious_unmasks, "storm": {
                           "max_rate": 1, "burst": burst, "backoff_initial": backoff[0],
                           "backoff_max": backoff[1], "recovery": backoff[2]}}})
        self.sides = [Side(self.loop, config, fast, raw_unmask) for fast in (True, False)]

    @rule(ns=st.one_of(st.integers(0, 3 * S), st.sampled_from([61 * S, 3600 * S, INT64_MAX])))
    def time_passes(self, ns: int) -> None:
        """The clock moves on (and stops at the int64 limit)."""
        self.now = min(INT64_MAX, self.now + ns)

    # Each rule that writes to a trigger or EOI eventfd first lets the loop and the lane
    # handle what is pending: with both pending at once, which is read first is up to
    # epoll on either side, and either order is right.

    @rule()
    def device_asserts(self) -> None:
        self.events_ready()
        for side in self.sides:
            side.device.line.device_raise()

    @rule()
    def device_deasserts(self) -> None:
        for side in self.sides:
            side.device.deassert()

    @rule()
    def kernel_unmasks(self) -> None:
        self.events_ready()
        for side in self.sides:
            side.device.process_unmasks()

    @rule()
    def events_ready(self) -> None:
        """What the event loop and the lane would do with the eventfds as they are."""
        for side in self.sides:
            runner = side.runner
            for ready in (runner._on_trigger_ready, runner._on_eoi_ready):
                if runner._watching:
                    ready()
                else:
                    side.lane.poll(now=self.now)

    @rule()
    def consumer_reads_irq(self) -> None:
        for side in self.sides:
            if side.consumer is not None:
                side.unended += drain_eventfd(side.consumer[0])

    @rule(spurious=st.booleans())
    def consumer_ends(self, spurious: bool) -> None:
        self.events_ready()
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
        self.events_ready()
        self.consumer_reads_irq()
        self.consumer_ends(spurious=False)
        self.events_ready()
        self.kernel_unmasks()

    @rule(kernel=st.booleans())
    def datapath_switches(self, kernel: bool) -> None:
        """``eoid datapath``: to the kernel's path (with a consumer attached) or back to
        the relay, which takes the line over with its state unknown (adopting), as an
        observation window opens."""
        self.events_ready()
        for side in self.sides:
            side.runner.set_datapath(Datapath.KERNEL if kernel else None)

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
    def a_lent_deadline_has_a_loop_timer(self) -> None:
        """The decline rule's reason: the lane never times out an EOI itself, so it only
        takes a trigger when a loop timer fires at or before the deadline it sets."""
        for side in self.sides:
            runner = side.runner
            if runner._fast is not None and runner._fast.lent \
                    and runner._fast.state == State.PENDING:
                assert runner._timer is not None

    @invariant()
    def both_sides_agree(self) -> None:
        if self.sides:
            fast, python = (side.snapshot() for side in self.sides)
            assert fast == python

    def teardown(self) -> None:
        for side in self.sides:
            side.close()
        self.loop.close()
        eoid.runner.monotonic_ns = self._clock  # type: ignore[attr-defined]


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
        assert fast._fast is not None and fast._fast.lent  # the state is the fast path's ...
        assert fast.stats.forwards == 5  # ... and it forwarded all but the first: that one
        assert fast.interrupts == fast.stats.interrupts == 5
        assert fast.channel.stats.forwards == 1  # found no loop timer for its deadline yet
        machine.both_sides_agree()
    finally:
        machine.teardown()


def test_the_lane_takes_the_first_interrupt_back_from_the_kernel_s_path() -> None:
    """Back on the relay (an observation window opens), the line is adopting: lent all
    the same, so its first interrupt is the lane's, not the event loop's (issue 12: that
    one interrupt was most of a window's cost to the loop)."""
    machine = FastVersusPython()
    try:
        machine.start(raw_unmask=True, burst=1000)
        machine.consumer_attaches()
        machine.round_trip()
        fast = machine.sides[0].runner
        machine.datapath_switches(kernel=True)
        machine.round_trip()  # the kernel's path: nobody in eoid sees it
        assert fast.state == State.KERNEL and fast.interrupts == 1
        machine.datapath_switches(kernel=False)
        assert fast.channel.adopting and fast._fast is not None and fast._fast.lent
        assert not fast._watching  # the event loop does not read the line
        forwarded_by_the_loop = fast.channel.stats.forwards
        machine.round_trip()
        assert fast.interrupts == 2 and fast.channel.stats.forwards == forwarded_by_the_loop
        assert fast._fast.lent and fast._fast.state == State.ARMED  # EOI and unmask too
        machine.both_sides_agree()
    finally:
        machine.teardown()


@pytest.mark.parametrize("run", range(int(os.environ.get("EOID_RACE_REPEAT", "1"))))
def test_hand_overs_racing_the_lane_thread_lose_nothing(run: int) -> None:
    """A device and its guest on a thread of their own do round trips through a threaded
    lane, while the event loop keeps taking the state back and lending it again (a reload
    applied in place; a timer that reads the trigger itself and leaves no loop timer, so
    the lane hands back the next trigger): every interrupt is forwarded, ended and
    unmasked once, by whichever side held the device."""
    rounds = 2000
    loop = asyncio.new_event_loop()
    lane = Lane()
    loop.add_reader(lane.notify_fd, lane.dispatch)
    config = DeviceConfig.model_validate({
        "name": "d", "pci_address": "0000:00:01.0", "backend": {"type": "sim"},
        "policy": {"eoi_timeout": "60s", "storm": {"max_rate": 1e9, "burst": 10**6}}})
    runner = DeviceRunner(config, loop, lambda *a: None, lane=lane)
    device = FakeLine(raw_unmask=True)
    runner.start(device)
    sock, other = socket.socketpair()
    irq, eoi = runner.attach(Peer(sock, 1, 0, frozenset()))
    done: list[int] = []

    def device_and_guest() -> None:
        line = device.line
        for _ in range(rounds):
            line.device_raise()
            if not readable(irq):
                return
            drain_eventfd(irq)
            device.deassert()  # the guest services the device, then ends the interrupt
            os.eventfd_write(eoi, 1)
            if not readable(device.unmask_fd):
                return
            device.process_unmasks()
            done.append(1)

    async def hand_over_until_done(thread: threading.Thread) -> None:
        while thread.is_alive():
            runner.set_config(config)
            await asyncio.sleep(0.0005)
            runner._on_timer()
            await asyncio.sleep(0.0005)

    thread = threading.Thread(target=device_and_guest)
    thread.start()
    try:
        loop.run_until_complete(asyncio.wait_for(hand_over_until_done(thread), 60))
        thread.join()
        stats = runner.stats
        assert len(done) == rounds
        assert (stats.interrupts, stats.forwards, stats.eois, stats.unmasks) == (rounds,) * 4
        assert stats.spurious_eois == stats.coalesced_interrupts == 0
        assert runner._fast is not None
        by_lane = runner._fast.counts()
        assert by_lane is not None and by_lane.interrupts > 0  # the lane did its share ...
        assert runner.channel.stats.interrupts > 0  # ... and so did the event loop
    finally:
        runner.close()
        device.close()
        loop.remove_reader(lane.notify_fd)
        lane.close()
        loop.close()
        for fd in (irq, eoi):
            os.close(fd)
        sock.close()
        other.close()
