"""The fast path at its edges (issue 10's findings): values at the int64 limits, callbacks
that raise, consumers that clear O_NONBLOCK on the fds they share with eoid, registrations
that cannot be removed, lanes that are closed twice or never, and what the runner logs."""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from eoid import _fastpath
from eoid._fastpath import NO_TIME, FastPath, Lane
from eoid.channel import State
from eoid.config import DeviceConfig
from eoid.control import Peer
from eoid.device import drain_eventfd
from eoid.runner import DeviceRunner
from eoid.stats import BUCKETS_NS
from tests.unit.test_fastpath import FakeLine, Harness, efd, readable

INT64_MAX = (1 << 63) - 1
FULL = 0xFFFFFFFFFFFFFFFE  # an eventfd count one more write would have to wait for
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


def blocking(fd: int) -> None:
    """What a consumer may do to its dup() of irq or eoi: it changes eoid's file too."""
    dup = os.dup(fd)
    fcntl.fcntl(dup, fcntl.F_SETFL, fcntl.fcntl(dup, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    os.close(dup)


def run_python(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (it may hang or crash on a broken extension)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)


# --- a runner on a thread-less lane, driven by hand ------------------------------------------

CONFIG = DeviceConfig.model_validate({
    "name": "d", "pci_address": "0000:00:01.0", "backend": {"type": "sim"},
    "policy": {"eoi_timeout": "60s", "storm": {"max_rate": 1e6, "burst": 1000}}})


class Rig:
    """A runner with a fake line and a consumer, on a thread-less lane."""

    def __init__(self, config: DeviceConfig = CONFIG, raw_unmask: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.lane = Lane(threaded=False)
        self.runner = DeviceRunner(config, self.loop, lambda *a: None, lane=self.lane)
        self.device = FakeLine(raw_unmask)
        self.runner.start(self.device)
        self.sock, self.other = socket.socketpair()
        self.irq, self.eoi = self.runner.attach(Peer(self.sock, 1, 0, frozenset()))

    def events(self) -> None:
        """What the loop and the lane do with the eventfds as they are."""
        runner = self.runner
        if runner._watching:
            runner._on_trigger_ready()
            runner._on_eoi_ready()
        else:
            self.lane.poll()

    def round_trip(self) -> None:
        line = self.device.line
        line.device_raise()
        self.events()
        assert drain_eventfd(self.irq) == 1, "not forwarded"
        self.device.deassert()
        os.eventfd_write(self.eoi, 1)
        self.events()
        self.device.process_unmasks()
        assert not line.masked, "not unmasked"

    def close(self) -> None:
        self.runner.close()
        self.device.close()
        self.lane.close()
        for fd in (self.irq, self.eoi):
            os.close(fd)
        self.sock.close()
        self.other.close()
        self.loop.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


# --- 1. a lend the fast path refuses leaves the device on the loop --------------------------


def test_a_policy_beyond_int64_runs_on_the_loop(rig: Rig) -> None:
    """``eoi_timeout: 3000000h`` is 1.08e19 ns: ``take`` cannot hold it. The device must
    stay on the event loop (before: its fds were unwatched first, then take() raised)."""
    runner = rig.runner
    runner.channel._eoi_timeout = 3_000_000 * 3600 * 10**9  # as _prefetch makes it ...
    runner._policy_sent = False  # ... and sent after a reload
    with capture_logs() as logs:
        for _ in range(3):
            rig.round_trip()
    assert runner._watching
    assert runner._fast is not None and not runner._fast.lent
    assert runner.stats.forwards == runner.stats.unmasks == 3
    assert [e["event"] for e in logs].count(
        "the fast path cannot run this policy; the device runs on the event loop") == 1


# --- 2. dispatch() calls back every device handed back ---------------------------------------


def test_dispatch_calls_back_every_device_even_when_one_raises(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lane = Lane(threaded=False)
    fds = [efd() for _ in range(6)]
    called: list[int] = []
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def returned(i: int) -> Any:
        def callback() -> None:
            called.append(i)
            raise RuntimeError(f"callback {i}")
        return callback

    paths = [FastPath(fds[3 * i], fds[3 * i + 1], fds[3 * i + 2], returned(i)) for i in (0, 1)]
    try:
        for fp in paths:
            lane.add(fp)
            fp.set_policy(10**9, 1, 10**6, 5 * 10**5, 1, False)
            fp.lend(State.ARMED, 0, NO_TIME, 0, 1, NO_TIME)  # no loop timer: declined
            os.eventfd_write(fp_trigger(fp, fds, paths), 1)
        with pytest.raises(RuntimeError, match="callback"):
            lane.poll()
        assert sorted(called) == [0, 1]  # before: the second device was never called back
        assert len(unraisable) == 1
    finally:
        lane.close()
        for fd in fds:
            os.close(fd)


def fp_trigger(fp: FastPath, fds: list[int], paths: list[FastPath]) -> int:
    return fds[3 * paths.index(fp)]


# --- 3. a consumer that clears O_NONBLOCK -----------------------------------------------------


def test_a_full_irq_count_on_a_blocking_file_costs_a_forward_error_not_the_lane() -> None:
    """The consumer clears O_NONBLOCK on its dup of irq and fills the count: the lane's
    forward must fail (counted, handed back to be logged), not wait under the mutex; the
    lane goes on serving other devices. In a subprocess: before, it hung for ever."""
    result = run_python("""
import os, select
from tests.unit.test_fastpath import Harness
from tests.unit.test_fastpath_edges import blocking, FULL
from eoid.channel import State
from eoid.device import drain_eventfd
bad = Harness(threaded=True)
good = Harness(threaded=True)
bad.take()
blocking(bad.irq)
os.eventfd_write(bad.irq, FULL)
os.eventfd_write(bad.trigger, 1)
assert select.select([bad.lane.notify_fd], [], [], 5)[0], "not handed back"
bad.lane.dispatch()
counts = bad.fp.counts()
assert counts.forward_errors == 1 and counts.forwards == 0, counts
assert bad.fp.state == State.PENDING
good.take()
os.eventfd_write(good.trigger, 1)
assert select.select([good.irq], [], [], 5)[0]
bad.lane.ping()
for _ in range(500):
    if bad.lane.pongs:
        break
    select.select([], [], [], 0.01)
assert bad.lane.pongs == 1
print("ok")
""")
    assert result.stdout.strip() == "ok", result.stderr


def test_a_blocking_irq_file_with_room_is_still_forwarded_to(h: Harness) -> None:
    """A consumer that only clears O_NONBLOCK (it reads irq with blocking reads) keeps its
    forwards: the lane checks the flag, then polls such a file for room before writing."""
    h.take()
    blocking(h.irq)
    h.fire()
    h.end()
    os.eventfd_write(h.irq, FULL - 2)  # room for one more
    h.fire()
    counts = h.fp.counts()
    assert counts is not None
    assert (counts.forwards, counts.forward_errors, counts.unmasks) == (2, 0, 1)
    assert h.returned == 0  # nothing went back to the event loop
    assert os.eventfd_read(h.irq) == FULL
    assert drain_eventfd(h.unmask) == 1


def test_reads_never_wait_whatever_the_file_flags_say() -> None:
    """A consumer cleared O_NONBLOCK on eoi and read the count itself: eoid's read of an
    empty eventfd must still return at once (before: the event loop hung in read())."""
    fd = efd()
    try:
        blocking(fd)
        done: list[int] = []
        reader = threading.Thread(target=lambda: done.append(drain_eventfd(fd)), daemon=True)
        reader.start()
        reader.join(2)
        assert done == [0]
    finally:
        os.eventfd_write(fd, 1)  # lets a hung reader go
        os.close(fd)


def test_the_lane_reads_a_blocking_eoi_the_consumer_emptied(h: Harness) -> None:
    """epoll said readable, then the consumer read its own eoi: the lane's read must not
    wait (in-process: a thread-less lane reads on this thread)."""
    h.take(State.PENDING)
    blocking(h.eoi)
    os.eventfd_write(h.eoi, 1)
    h.lane.ping()  # without a thread: one round; epoll_wait reports eoi readable ...
    assert h.fp.counts() is not None  # ... and the lane read it: a round trip
    os.eventfd_write(h.eoi, 1)
    # the consumer empties it before the lane's round: nothing to read, nothing waits
    assert drain_eventfd(h.eoi) == 1
    h.lane.ping()


def test_the_event_loop_forward_does_not_hang_on_a_full_blocking_irq(rig: Rig) -> None:
    rig.runner._fast_allowed = False  # the Python channel forwards
    blocking(rig.irq)
    os.eventfd_write(rig.irq, FULL)
    rig.device.line.device_raise()
    with capture_logs() as logs:
        finished = threading.Event()

        def loop_turn() -> None:
            rig.events()
            finished.set()

        worker = threading.Thread(target=loop_turn, daemon=True)
        worker.start()
        worker.join(5)
        if not finished.is_set():
            drain_eventfd(rig.irq)  # lets it go, so that the test can end
            worker.join(5)
            pytest.fail("the forward hung the event loop")
    assert rig.runner.stats.errors["forward"] == 1
    assert [e["event"] for e in logs] == ["forward failed"]


# --- 4. token arithmetic at the int64 limits ------------------------------------------------


def test_a_token_beyond_int64_is_declined_not_wrapped(h: Harness) -> None:
    """A bucket of 2 tokens of 4e18 ns each, holding none: the next token takes tat past
    INT64_MAX, so Python's channel throttles. Before, C wrapped tat to a negative value
    (undefined behaviour), unmasked, and never throttled again: the limiter was gone."""
    tat = time.monotonic_ns() + 8 * 10**18
    h.take(State.PENDING, tat=tat, interval=4 * 10**18, limit=8 * 10**18)
    h.end()
    assert h.returned == 1
    assert drain_eventfd(h.unmask) == 0
    released = h.fp.reclaim()
    assert released is not None and released[3] == tat and released[0] == State.PENDING


def test_a_deadline_beyond_int64_is_declined(h: Harness) -> None:
    h.fp.set_policy(INT64_MAX, 1, 10**6, 5 * 10**5, 1, False)
    h.fp.lend(State.ARMED, 0, NO_TIME, 0, 1, -(1 << 63))
    h.fire()
    assert (h.returned, drain_eventfd(h.irq)) == (1, 0)


# --- 5. registrations that cannot be removed; signals -----------------------------------------


def lane_cpu_seconds(over: float) -> float:
    start = time.process_time()
    time.sleep(over)  # measuring how busy another thread is: nothing to wait for
    return time.process_time() - start


def test_a_registration_left_behind_does_not_make_the_lane_spin() -> None:
    """The runner's eoi fd is closed while a consumer's dup keeps its file open: the
    EPOLL_CTL_DEL of reclaim() fails (EBADF) and the file stays in the epoll set. The lane
    must not spin on it (before: 100% of a CPU)."""
    h = Harness(threaded=True)
    consumer_eoi = os.dup(h.eoi)
    try:
        h.take(State.PENDING)
        os.close(h.eoi)
        h.eoi = os.open("/dev/null", os.O_RDONLY)  # the number, reused by another file
        h.fp.reclaim()
        os.eventfd_write(consumer_eoi, 1)  # readable for ever: nobody reads it
        assert lane_cpu_seconds(1.0) < 0.05
        counts = h.fp.counts()
        assert counts is not None and counts.epoll_errors >= 1
    finally:
        h.close()
        os.close(consumer_eoi)


def test_the_lane_threads_block_the_signals_python_handles() -> None:
    h = Harness(threaded=True)
    try:
        h.lane.ping()  # answered: the lane's thread is past its start
        for _ in range(500):
            if h.lane.pongs:
                break
            time.sleep(0.01)  # nothing to wait on but the counter
        blocked = {}
        for task in Path("/proc/self/task").iterdir():
            name = (task / "comm").read_text().strip()
            if name.startswith("eoid-"):
                status = (task / "status").read_text()
                mask = int(next(line.split()[1] for line in status.splitlines()
                                if line.startswith("SigBlk:")), 16)
                blocked[name] = mask
        assert set(blocked) == {"eoid-lane", "eoid-sentinel"}
        for signum in (2, 1, 15, 10, 17):  # SIGINT, SIGHUP, SIGTERM, SIGUSR1, SIGCHLD
            assert all(mask >> (signum - 1) & 1 for mask in blocked.values()), signum
        assert not blocked["eoid-lane"] >> (_fastpath.RESCUE_SIGNAL - 1) & 1
    finally:
        h.close()


def voluntary_switches(thread_name: str) -> int:
    """A thread of this process's voluntary context switches: its wake-ups."""
    for task in Path("/proc/self/task").iterdir():
        if (task / "comm").read_text().strip() == thread_name:
            status = (task / "status").read_text()
            return int(next(line.split()[1] for line in status.splitlines()
                            if line.startswith("voluntary_ctxt_switches:")))
    raise LookupError(thread_name)


def test_the_sentinel_sleeps_while_nothing_is_written_and_wakes_for_a_write() -> None:
    """An idle eoid (or one with every device on the kernel's path) does not wake 40 times
    a second: after a quiet second the sentinel sleeps until a guarded write begins."""
    h = Harness(threaded=True)
    try:
        h.take()
        time.sleep(1.5)  # a quiet second, and then some
        before = voluntary_switches("eoid-sentinel")
        time.sleep(0.5)
        assert voluntary_switches("eoid-sentinel") - before <= 1  # asleep (20 if not)
        os.eventfd_write(h.trigger, 1)  # the lane forwards it: a guarded write
        assert readable(h.irq)
        before = voluntary_switches("eoid-sentinel")
        time.sleep(0.3)
        assert voluntary_switches("eoid-sentinel") - before >= 5  # watching again
    finally:
        h.close()


# --- 6. initialisation, close and use after close ---------------------------------------------


def test_a_lane_with_fd_0_closed_cannot_be_initialised_twice_and_frees_cleanly() -> None:
    result = run_python("""
import gc, os
os.close(0)  # eoid run <&-
from eoid._fastpath import Lane
def tasks():  # the lane's threads (a sanitizer may run threads of its own)
    names = [open(f"/proc/self/task/{t}/comm").read().strip()
             for t in os.listdir("/proc/self/task")]
    return sum(n.startswith("eoid-") for n in names)
before = tasks()
lane = Lane()
assert tasks() == 2
try:
    lane.__init__()
except RuntimeError:
    pass
else:
    raise SystemExit("initialised twice")
del lane  # never closed
gc.collect()
assert tasks() == before, (tasks(), before)
print("ok")
""")
    assert result.stdout.strip() == "ok", result.stderr


def test_two_concurrent_closes_join_once() -> None:
    result = run_python("""
import threading
from eoid._fastpath import Lane
for _ in range(30):
    lane = Lane()
    closers = [threading.Thread(target=lane.close) for _ in range(2)]
    for t in closers:
        t.start()
    for t in closers:
        t.join()
print("ok")
""", timeout=60)
    assert result.stdout.strip() == "ok", result.stderr


def test_a_closed_lane_refuses_work(h: Harness) -> None:
    h.take(loop_timer_at=NO_TIME)
    os.eventfd_write(h.trigger, 1)
    h.lane.ping()  # one round: handed back, not yet dispatched
    h.lane.close()
    assert not h.fp.lent
    for call in (h.lane.ping, h.lane.dispatch, h.lane.poll):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert h.returned == 0


# --- 7. buckets, release under memory pressure ------------------------------------------------


def test_buckets_cannot_change_under_a_lane(h: Harness) -> None:
    _fastpath.set_buckets(BUCKETS_NS)  # the same: nothing written
    with pytest.raises(ValueError, match="while a lane exists"):
        _fastpath.set_buckets([b + 1 for b in BUCKETS_NS])


def test_release_keeps_the_state_and_the_owed_unmask_when_memory_runs_out() -> None:
    import _testcapi  # type: ignore[import-not-found]

    h = Harness(unmask=False)  # no raw unmask: an EOI leaves the unmask owed
    try:
        h.take(State.PENDING)
        h.end()
        fp, failed = h.fp, False
        _testcapi.set_nomemory(0)  # every allocation fails from here ...
        try:
            fp.reclaim()
        except MemoryError:
            failed = True
        finally:
            _testcapi.remove_mem_hooks()  # ... to here
        assert failed
        released = h.fp.reclaim()
        assert released is not None and released.owes_unmask
    finally:
        h.close()


# --- 8. what the runner logs ----------------------------------------------------------------


def test_a_failed_unmask_is_logged_after_a_restart_restored_a_count() -> None:
    r = Rig(raw_unmask=False)
    try:
        r.runner.channel.stats.errors["unmask"] = 5  # restored from the previous process
        fails = {"on": True}

        def unmask() -> None:
            if fails["on"]:
                raise OSError(5, "injected")
            r.device.unmask()

        r.runner._device_unmask = unmask
        with capture_logs() as logs:
            for _ in range(3):
                r.runner._unmask(time.monotonic_ns())
            fails["on"] = False
            r.runner._unmask(time.monotonic_ns())
        events = [e["event"] for e in logs]
        assert events.count("unmask failed") == 1
        assert events.count("unmask works again") == 1
        assert r.runner.stats.errors["unmask"] == 8
    finally:
        r.close()
