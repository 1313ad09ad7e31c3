"""The loop shell for one device: eventfds, the backend and a consumer around a ``Channel``.

Three eventfds per device, owned here and stable for the device's life (across consumer
reconnects, reloads and, through systemd's fd store, restarts): ``trigger`` (registered
with the backend), ``irq`` (the consumer's interrupt) and ``eoi`` (the consumer's end of
interrupt).

While the line is in a simple state (``Channel.lend``), the runner lends that state to
its ``FastPath`` on the daemon's ``Lane`` (eoid/_fastpath.c): a thread of its own, without
the GIL, then reads ``trigger`` and ``eoi`` and runs the common round trip in C (read the
trigger, forward, read the EOI, unmask, count). Whatever is not that common case, it
hands back with the fds untouched (``_on_returned``), and the event loop watches them
again for the channel. Every entry point here first takes the state back and lends it
again when done (``_owning``), so the channel and the fast path never act at once.

Without the extension (not built), or with ``EOID_FASTPATH=0``, there is no lane and every
device runs on the channel alone: slower, the same behaviour (tests run the daemon both ways).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import random
import select
from collections.abc import Callable
from os import eventfd_write
from time import monotonic_ns
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import structlog

from eoid import log

try:
    from eoid import _fastpath
except ImportError:  # built without a C compiler: the channel alone runs every device
    _fastpath = None  # type: ignore[assignment]
from eoid.channel import EOI_TIMEOUT, FORWARD, STORM_BEGIN, STORM_END, TIMER, UNMASK, Channel, State
from eoid.config import Datapath, DeviceConfig, format_duration
from eoid.consumer import Consumer
from eoid.device import DeviceEvent, IntxDevice, drain_eventfd
from eoid.errors import DeviceBusy, DeviceError, NotAllowed, NotAttached
from eoid.stats import BUCKETS_NS, DeviceStats

if TYPE_CHECKING:
    from eoid._fastpath import FastPath, Lane

EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC
TIMER_SLACK = 0.001  # uvloop timers have millisecond resolution: never wake up early
NO_TIME = (1 << 63) - 1  # _fastpath.NO_TIME: no timer
SAMPLE_GRID = 1.0
SAMPLE_SLOTS = 6
"""Sampled observation windows open on the ticks of a grid of loop time only: a period has
``SAMPLE_SLOTS`` ticks, at least ``SAMPLE_GRID`` seconds apart (``sample_opens``), and each
device's windows fall on one of them, chosen at random. The windows of the devices on one
tick then open (and, with the same ``for``, close) together: one wake-up of the loop, one
batch of routes to a sim, and the lane and its sentinel busy a few seconds a period rather
than all the time (bench/RESULTS.md, "Kernel datapath": a 1 s grid cost 7.4 % of relay
mode's CPU at 1024 devices, six slots 4.6 %). A tick switches a sixth of the devices, so no
burst stalls the loop for long. Periods are at least 1 s (``config.Observe``)."""


def sample_opens(due: float, every: int) -> float:
    """The loop time a window due at ``due`` (loop time) opens: the next tick of the grid
    of period ``every`` (ns)."""
    grid = max(SAMPLE_GRID, every * 1e-9 / SAMPLE_SLOTS)
    return math.ceil(due / grid) * grid

if _fastpath is not None:
    _fastpath.set_buckets(BUCKETS_NS)
_DEVICE_LOG = structlog.get_logger("eoid.device")

P = ParamSpec("P")
R = TypeVar("R")


def _owning(method: Callable[Concatenate[DeviceRunner, P], R]
            ) -> Callable[Concatenate[DeviceRunner, P], R]:
    """Run ``method`` with the channel's state taken back from the fast path, and lend it
    again afterwards (if the line is then in a state the fast path may run); then the loop
    reads the eventfds if nobody else does (``_sync_readers``)."""
    def owning(self: DeviceRunner, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self._reclaim()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._lend()
            self._sync_readers()
    functools.update_wrapper(owning, method)
    return owning


def fastpath_enabled() -> bool:
    """Whether devices run on the C fast path: it was built, and ``EOID_FASTPATH`` is not 0."""
    return _fastpath is not None and os.environ.get("EOID_FASTPATH", "1") != "0"


def new_lane() -> Lane | None:
    """The daemon's lane, or None in pure-Python mode (``fastpath_enabled``)."""
    return _fastpath.Lane() if fastpath_enabled() else None


def signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd a consumer shares, in pure-Python mode: only when there is room,
    so that a consumer that cleared O_NONBLOCK on its dup() and filled the count does not
    hang the loop. (``Lane.signal`` also interrupts a write raced into a full count.)"""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not poller.poll(0):
        raise BlockingIOError(11, "the eventfd is full")
    eventfd_write(fd, 1)


def _refuse(device: str, reason: str) -> Callable[[], None]:
    """What ``unmask`` becomes when there is no device to reach (down)."""
    def refuse() -> None:
        raise DeviceError(device, "unmask", reason)
    return refuse


class DeviceRunner:
    """Runs one device's INTx loop on the event loop; see the module docstring.

    ``fast=False`` keeps the fast path from ever holding the state, so every event takes
    the Python path (tests compare the two); so does ``lane=None`` (pure-Python mode)."""

    def __init__(self, config: DeviceConfig, loop: asyncio.AbstractEventLoop,
                 on_down: Callable[[DeviceRunner, str, list[str]], None],
                 eventfds: dict[str, int] | None = None, stats: DeviceStats | None = None,
                 *, lane: Lane | None, fast: bool = True) -> None:
        self.config = config
        self.name = config.name
        self.loop = loop
        self.on_down = on_down
        fds = eventfds or {k: os.eventfd(0, EFD_FLAGS) for k in ("trigger", "irq", "eoi")}
        self.trigger_fd, self.irq_fd, self.eoi_fd = fds["trigger"], fds["irq"], fds["eoi"]
        self.channel = Channel(config.policy, stats)
        self.device: IntxDevice | None = None
        self.consumer: Consumer | None = None
        self.down_reason: str | None = "not opened yet"
        self.faulted = False
        self._device_unmask: Callable[[], None] = _refuse(self.name, "the device is down")
        self._lane = lane
        self._fast: FastPath | None = None
        self._signal: Callable[[int], None] = signal_eventfd
        if lane is not None:
            self._fast = _fastpath.FastPath(self.trigger_fd, self.irq_fd, self.eoi_fd,
                                            self._on_returned)
            lane.add(self._fast)
            self._signal = lane.signal
        self._fast_allowed = fast
        self._lend_refused = False  # lend() overflowed (logged), and has not worked since
        self._policy_sent = False  # FastPath.set_policy: once, and again after a reload
        self._failing: set[str] = set()  # ops whose failure was logged, until one succeeds
        self._lane_errors = (0, 0, 0, 0)  # the fast path's errors, as last seen
        self._watching = False  # the loop reads trigger and eoi (not the lane)
        # The datapath (README, "Two datapaths"): the one the line is on now, and what an
        # operator asked for until the next reload (``eoid datapath``). The line is on the
        # kernel's path only while the device is up and healthy, a consumer is attached,
        # and no observation window is open (``_path``).
        self.datapath = Datapath.RELAY
        self.datapath_override: Datapath | None = None
        self._observing_until = 0  # monotonic ns: relayed until then (``observe``)
        self._observe_timer: asyncio.TimerHandle | None = None
        self._sample_timer: asyncio.TimerHandle | None = None
        # the device's ``kernel_interrupts`` as last added to the stats (None: not yet
        # known, e.g. adopted: its first answer is the baseline)
        self._kernel_seen: int | None = 0
        # a route the backend has not applied yet (sim): the eventfds are read after it is
        self._routing: asyncio.Future[Any] | None = None
        self.observations = 0  # observation windows opened (``eoid observe``, sampling)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0
        self._covered = 0  # the fast path's interrupt count when a timer last covered it

    @property
    def _log(self) -> Any:
        """Bound when a message is logged (rarely), not held per device (memory)."""
        return _DEVICE_LOG.bind(device=self.name)

    @property
    def up(self) -> bool:
        return self.device is not None

    @property
    def eventfds(self) -> dict[str, int]:
        return {"trigger": self.trigger_fd, "irq": self.irq_fd, "eoi": self.eoi_fd}

    @property
    def stats(self) -> DeviceStats:
        """The device's statistics: the channel's, plus (in a copy) what the fast path
        counted. It only reads, so the metrics thread may take it while the loop runs."""
        counts = self._fast.counts() if self._fast is not None else None
        live = self._kernel_window()
        if counts is None:
            if not live:
                return self.channel.stats
            stats = self.channel.stats.copy()
            stats.kernel_interrupts += live
            return stats
        stats = self.channel.stats.copy()
        stats.kernel_interrupts += live
        stats.interrupts += counts.interrupts
        stats.coalesced_interrupts += counts.coalesced
        stats.eois += counts.eois
        stats.forwards += counts.forwards
        stats.unmasks += counts.unmasks
        stats.spurious_eois += counts.spurious
        errors = stats.errors
        errors["forward"] += counts.forward_errors
        errors["unmask"] += counts.unmask_errors
        errors["fastpath"] += counts.read_errors + counts.epoll_errors
        stats.service.add(counts.service, counts.service_ns)
        stats.dispatch_latency.add(counts.dispatch, counts.dispatch_ns)
        stats.unmask_latency.add(counts.unmask, counts.unmask_ns)
        return stats

    def _kernel_window(self) -> int:
        """What the device counted on the kernel's path and the stats do not hold yet
        (``_count_kernel`` adds it on the loop; this only reads: any thread)."""
        device, seen = self.device, self._kernel_seen
        if device is None or seen is None:
            return 0
        now = device.kernel_interrupts()
        return now - seen if now is not None and now > seen else 0

    @property
    def interrupts(self) -> int:
        """``stats.interrupts`` without the snapshot (``STATUS=``, every watchdog ping)."""
        fast = self._fast
        return self.channel.stats.interrupts + (fast.interrupts if fast is not None else 0)

    @property
    def relaying(self) -> bool:
        """Open, armed and not faulted: what ``eoid_device_up`` and ``up`` in the status say."""
        return self.device is not None and not self.faulted

    @property
    def state(self) -> State:
        """The channel's state, or what overrides it for an operator: FAULTED while the
        device's error stands, ABANDONED once an interrupt has been HELD for longer than
        ``held_timeout`` (computed when asked: no timer, nothing on the hot path)."""
        if self.faulted:
            return State.FAULTED
        fast = self._fast
        state = State(fast.state) if fast is not None and fast.lent else self.channel.state
        if state is State.HELD and monotonic_ns() - self.channel.pending_since \
                >= self.config.policy.held_timeout:
            return State.ABANDONED
        return state

    # --- lifecycle ---------------------------------------------------------------------

    @_owning
    def start(self, device: IntxDevice, adopted: bool = False) -> None:
        """Arm the line. ``adopted``: the device was enabled by a previous eoid process."""
        self.device = device
        self._kernel_seen = None if adopted else 0  # counted per open (``kernel_interrupts``)
        self._device_unmask = device.unmask  # bound once
        if self._fast is not None:
            self._fast.set_unmask(*(device.unmask_op() or (-1,)))
        self.down_reason = None
        self.faulted = False
        for fd in device.event_fds():
            self.loop.add_reader(fd, self._on_device_event, fd)
        device.watch(self.loop, self._on_device_event)  # events not on an fd of its own (sim)
        self.channel.attached = self.consumer is not None
        if adopted:
            # The previous eoid may have left the line on the kernel's path: back to the
            # relay first (a no-op if it was there). While no eoid ran, the line may have
            # fired and the consumer may have sent an EOI: the channel decides from both
            # counts what is owed (docs/intx-eoi.md §9).
            try:
                routed = device.route(self.trigger_fd, None)
            except DeviceError as e:
                self.channel.stats.errors["route"] += 1
                self.stop(f"re-routing the adopted line failed: {e}")
                raise
            self._log.info("device armed", backend=device.info.backend,
                           pci_address=device.info.pci_address, adopted=True)
            self._when_routed(device, routed, self._adopt)
            return
        try:
            device.enable(self.trigger_fd)
        except DeviceError as e:
            self.channel.stats.errors["enable"] += 1
            self.stop(f"enable failed: {e}")
            raise
        now = monotonic_ns()
        self.channel.enable(now)
        self._act(self.channel.attach(now) if self.consumer else 0, now)
        self._log.info("device armed", backend=device.info.backend,
                       pci_address=device.info.pci_address, adopted=False)
        self._reroute()

    @_owning
    def restart(self, reason: str) -> None:
        """Start the open device over without closing it (``eoid reset``, a reload after a
        fault): off the kernel's path, faults cleared, the channel armed afresh (a line
        still asserted fires again). For a backend that routes synchronously (vfio): a
        VFIO group cannot be opened again while any copy of its device fd lives, and the
        consumer may hold one (``share_device_fd``), so closing and reopening would fail."""
        device = self.device
        if device is None:
            return
        self.stop(reason, release=False)
        try:
            routed = device.route(self.trigger_fd, None)
        except DeviceError as e:
            self.device = device
            self.stop(f"restart failed: {e}")
            raise
        assert routed is None, "restart needs a backend that routes synchronously"
        self.start(device)

    def _adopt(self) -> None:
        """The adopted line is on eoid's trigger: take it over from what the eventfds hold."""
        now = monotonic_ns()
        triggers, eois = drain_eventfd(self.trigger_fd), drain_eventfd(self.eoi_fd)
        self._act(self.channel.adopt(triggers, eois, now), now)
        self._reroute()

    @_owning
    def stop(self, reason: str, release: bool = True) -> None:
        """Take the device down. ``release=False`` keeps it enabled (handing over to a
        successor process through the fd store)."""
        self._device_unmask = _refuse(self.name, "the device is down")
        if self._fast is not None:
            self._fast.set_unmask(-1)
        if self.device is not None:
            self._count_kernel(self.device)
        self.datapath = Datapath.RELAY  # a device opened again starts on the relay
        self._routing = None  # (a route still in flight is for a device gone)
        device, self.device = self.device, None
        self.down_reason = reason
        self._cancel_timer()
        if device is None:
            return
        for fd in device.event_fds():
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(fd)
        if release:
            with contextlib.suppress(DeviceError, OSError):
                device.disable()
            device.close()
            self.channel.disable()
        if self.consumer is not None and release:
            self.consumer.device_event("device_down", self.name, reason)

    def close(self) -> None:
        """Forget the device for good (removed from the config or daemon shutdown)."""
        if self.device is not None:
            self.stop("removed")
        if self.consumer is not None:
            self.consumer.attached.discard(self.name)
            self.consumer = None
        self._end_sampling()
        if self._observe_timer is not None:
            self._observe_timer.cancel()
        if self._lane is not None and self._fast is not None:
            self._lane.remove(self._fast)
        for fd in (self.trigger_fd, self.irq_fd, self.eoi_fd):
            os.close(fd)
        self.trigger_fd = self.irq_fd = self.eoi_fd = -1

    @_owning
    def set_config(self, config: DeviceConfig) -> None:
        """Apply a reloaded policy or consumer list in place, without touching the line."""
        self.config = config
        self.channel.set_policy(config.policy)
        self._policy_sent = False  # reclaimed (``_owning``): sent before the next lend
        peer = self.consumer
        if peer is not None and not config.consumers.allows(peer.uid, peer.gids):
            self._detach(peer)
            peer.device_event("detached", self.name, "no longer allowed by the configuration")
        self._end_sampling()
        self._reroute()

    # --- the fast path's hand-over -------------------------------------------------------

    def _reclaim(self) -> None:
        """Take the channel's state back from the fast path, as it left it, and read the
        eventfds on the loop again."""
        fast = self._fast
        released = fast.reclaim() if fast is not None else None
        if released is None:
            return
        timer_at = released.timer_at
        self.channel.reclaim(released.state, released.pending_since,
                               None if timer_at == NO_TIME else timer_at, released.tat,
                               released.backoff, adopting=released.adopting)
        self._note_lane_errors()
        if self.device is None:
            return
        if released.owes_unmask:  # an EOI the lane acted on but could not unmask for
            self._unmask(released.owed_unmask)
        if released.carried:  # read by the lane, and left to the channel
            if released.carried_eoi:
                self._eoi(released.carried)
            else:
                self._trigger(released.carried)

    def _lend(self) -> None:
        """Lend the state to the fast path, if the device is healthy and the line is in
        one of the states it runs (``Channel.lend``). If the fast path refuses it, the
        loop keeps watching the device: it never goes unread."""
        fast = self._fast
        if fast is None or not self._fast_allowed or self.device is None or self.faulted:
            return
        lent = self.channel.lend()
        if lent is None:
            return
        state, pending_since, timer_at, tat, backoff, adopting = lent
        try:
            if not self._policy_sent:
                fast.set_policy(*self.channel.fast_policy())
                self._policy_sent = True
            fast.lend(state, pending_since, NO_TIME if timer_at is None else timer_at, tat,
                      backoff, self._timer_at if self._timer is not None else NO_TIME,
                      adopting)
        except OverflowError as e:  # values beyond int64 (a policy of centuries)
            if not self._lend_refused:  # logged once, until a lend works again
                self._lend_refused = True
                self._log.warning("the fast path cannot run this policy; the device runs on "
                                  "the event loop", error=str(e))
            return
        except OSError:  # epoll_ctl failed: counted there, logged here
            self._note_lane_errors()
            return
        except RuntimeError as e:  # the lane stopped (epoll_wait failed)
            self._fail("fastpath", e)
            return
        self._lend_refused = False
        if self._failing:
            self._recover("epoll")
            self._recover("fastpath")

    def _note_lane_errors(self) -> None:
        """Log what the fast path failed at since last seen (it cannot log: no GIL)."""
        if self._fast is None:
            return
        now = self._fast.errors
        if now == self._lane_errors:
            return
        for op, before, after in zip(("forward", "unmask", "read", "epoll"), self._lane_errors,
                                     now, strict=True):
            if after > before:
                self._fail(op, f"{after - before} failed on the fast path", count=0)
        self._lane_errors = now

    def _fail(self, op: str, error: object, count: int = 1) -> None:
        """``op`` failed: count it (``count``: as the fast path did not already) and log it,
        once until it next succeeds."""
        if op in self.channel.stats.errors:
            self.channel.stats.errors[op] += count
        if op not in self._failing:
            self._failing.add(op)
            self._log.error(f"{op} failed", error=str(error))

    def _recover(self, op: str) -> None:
        if self._failing and op in self._failing:
            self._failing.discard(op)
            self._log.info(f"{op} works again")

    def _sync_readers(self) -> None:
        """The loop reads trigger and EOI when nobody else does: the device is up, on the
        relay, not lent to the lane (which reads both), and no switch is in flight (the
        eventfds are read once the backend has applied it). On the kernel's path the
        kernel reads both: a fire that came to eoid's trigger before the swap is read once
        the swap is made (``_to_kernel``). Called when an entry point ends (``_owning``):
        a window costs the loop no reader it adds and removes again before it waits."""
        fast = self._fast
        want = (self.device is not None and self.datapath is Datapath.RELAY
                and self._routing is None and not (fast is not None and fast.lent))
        if want is self._watching:
            return
        self._watching = want
        if want:
            self.loop.add_reader(self.trigger_fd, self._on_trigger_ready)
            self.loop.add_reader(self.eoi_fd, self._on_eoi_ready)
            return
        for fd in (self.trigger_fd, self.eoi_fd):
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(fd)

    # --- events on the loop ----------------------------------------------------------------

    @_owning
    def _on_returned(self) -> None:
        """The lane met something other than the common case and handed the device back,
        with what it did not act on still in the eventfds."""
        if self.device is not None:
            self._settle()

    @_owning
    def _on_trigger_ready(self) -> None:
        self._read_trigger()

    @_owning
    def _on_eoi_ready(self) -> None:
        if self.datapath is Datapath.RELAY:  # (on the kernel's path, the count is its own)
            self._read_eoi()

    def _trigger(self, count: int) -> None:
        now = monotonic_ns()
        self._act(self.channel.trigger(count, now), now)

    def _eoi(self, count: int) -> None:
        if self.channel.adopting:
            self._read_trigger()  # the line may be unmasked: a fire must count first
        now = monotonic_ns()
        actions = self.channel.eoi(count, now)
        self._act(actions, now)
        if actions & (STORM_BEGIN | STORM_END):
            self._log_storm(actions)

    def _read_trigger(self) -> None:
        count = drain_eventfd(self.trigger_fd)
        if count:
            self._trigger(count)

    def _read_eoi(self) -> None:
        count = drain_eventfd(self.eoi_fd)
        if count:
            self._eoi(count)

    def _settle(self) -> None:
        """Handle what the eventfds hold now, before a decision that depends on it. (On
        the kernel's path the EOI count is the kernel's: reading it would lose an unmask.)"""
        self._read_trigger()
        if self.datapath is Datapath.RELAY:
            self._read_eoi()

    def _forward(self, since: int) -> None:
        stats = self.channel.stats
        try:
            self._signal(self.irq_fd)
        except OSError as e:  # EAGAIN: the consumer's count is full (it does not read it)
            self._fail("forward", e)
            return
        self._recover("forward")
        stats.forwards += 1
        stats.dispatch_latency.observe(monotonic_ns() - since)

    def _unmask(self, since: int) -> None:
        if self.faulted:
            return  # by design, not an error: the state says FAULTED until reset or reload
        stats = self.channel.stats
        try:
            self._device_unmask()
        except (DeviceError, OSError) as e:
            self._fail("unmask", e)
            return
        self._recover("unmask")
        stats.unmasks += 1
        stats.unmask_latency.observe(monotonic_ns() - since)

    # --- timers ----------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Keep one loop timer at or before ``channel.timer_at``; it re-checks when it fires.

        Rescheduling lazily keeps the per-interrupt cost at zero: at high rates the
        EOI deadline moves with every interrupt, but the timer fires once per timeout."""
        at = self.channel.timer_at
        if at is None or (self._timer is not None and self._timer_at <= at):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._set_timer(at, monotonic_ns())

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self._keep_lent():
            self._on_timer_owned()
            self._keep_lent()  # lent again, and busy: a timer covers it

    def _keep_lent(self) -> bool:
        """Leave a timer behind for the fast path while it relays, without taking the
        state back (a hand-over costs a dozen syscalls) if nothing is due. The lane
        declines an interrupt whose EOI deadline no loop timer covers, so without one the
        next interrupt, and the timer that follows it, go through Python (at 1024 devices
        and a 2 s eoi_timeout, a thousand trips a second: bench/RESULTS.md, "What
        separates the lane from C"). A timer at now + eoi_timeout covers every deadline
        from now on. Only while the lane relayed since the last one: an idle line stops
        waking the loop after one more timer."""
        fast = self._fast
        if fast is None or self._timer is not None:
            return False
        relayed = fast.interrupts
        if relayed == self._covered:  # idle since the last timer: let it go quiet
            return False
        now = monotonic_ns()
        at = fast.keep(now, min(now + self.channel.policy.eoi_timeout, NO_TIME))
        if at is None:
            return False
        self._covered = relayed
        self._set_timer(at, now)
        return True

    @_owning
    def _on_timer_owned(self) -> None:
        self._read_trigger()  # a fire not yet read must count before the channel may unmask
        now = monotonic_ns()
        actions = self.channel.timer(now)
        self._act(actions, now)
        if actions & STORM_END:  # the line stayed quiet for ``recovery``
            self._log_storm(actions)

    def _set_timer(self, at: int, now: int) -> None:
        self._timer_at = at
        self._timer = self.loop.call_later(max(0.0, (at - now) * 1e-9) + TIMER_SLACK,
                                           self._on_timer)

    def _act(self, actions: int, now: int) -> None:
        if actions & FORWARD:
            self._forward(now)
        if actions & UNMASK:
            self._unmask(now)
        if actions & EOI_TIMEOUT:  # every eoi_timeout while a guest hangs: rate-limited
            log.REPEATS.log(self._log, (self.name, "eoi_timeout"), "warning", "EOI timeout",
                            timeout=format_duration(self.channel.policy.eoi_timeout),
                            policy=str(self.channel.policy.on_eoi_timeout),
                            consumer=self.consumer.describe() if self.consumer else None)
        if actions & TIMER:
            self._schedule()

    def _log_storm(self, actions: int) -> None:
        """A storm that flaps logs its first episode, then a summary per period."""
        key = (self.name, "storm")
        if actions & STORM_BEGIN:
            log.REPEATS.log(self._log, key, "warning", "interrupt storm: deferring unmasks",
                            max_rate=self.channel.policy.storm.max_rate)
        elif log.REPEATS.logging(key):  # the episode's start was logged, not summarised
            self._log.info("interrupt storm over", throttles=self.channel.stats.storm_throttles)

    # --- the datapath -------------------------------------------------------------------

    @property
    def wanted_datapath(self) -> Datapath:
        """The datapath the configuration (or ``eoid datapath``, until a reload) asks for."""
        return self.datapath_override or self.config.datapath

    @property
    def observing(self) -> bool:
        """An observation window is open: the device is relayed until it ends."""
        return monotonic_ns() < self._observing_until

    def _path(self) -> Datapath:
        """The path the line belongs on now. The kernel's path needs a consumer to take its
        interrupts and end them (without one, relaying holds an interrupt for the next),
        and a healthy device (the kernel's unmask would go on unmasking a faulted one)."""
        if (self.wanted_datapath is Datapath.KERNEL and self.device is not None
                and not self.faulted and self.consumer is not None and not self.observing):
            return Datapath.KERNEL
        return Datapath.RELAY

    def _reroute(self) -> None:
        """Put the line on the path it belongs on (``_path``), if it is not there. Not
        while a switch is in flight: its end calls this again."""
        if self._routing is not None:
            return
        path = self._path()
        if path is not self.datapath:
            self._to_kernel() if path is Datapath.KERNEL else self._to_relay()
        self._start_sampling()

    def _to_kernel(self) -> None:
        """Relay → kernel: the consumer's eoi eventfd becomes the line's unmask, then its
        irq eventfd the trigger (``IntxDevice.route``); eoid then reads neither. A fire
        signalled on eoid's trigger before the swap is still read and forwarded."""
        device = self.device
        assert device is not None
        self._settle()  # what came before the switch is the channel's to act on
        try:
            routed = device.route(self.irq_fd, self.eoi_fd)
        except (DeviceError, OSError) as e:
            self._route_failed(device, e)
            return
        self.datapath = Datapath.KERNEL
        self._cancel_timer()
        now = monotonic_ns()
        actions = self.channel.to_kernel()
        self._act(actions, now)
        if actions & STORM_END:
            self._log_storm(actions)
        if self._kernel_seen is None:  # (else known: the count stands still on the relay)
            self._count_kernel(device)
        # Until the backend has swapped the trigger, a fire still comes to eoid's: read
        # once the swap is made (the channel forwards it). An EOI waits in the eventfd
        # for the kernel's unmask.
        self._when_routed(device, routed, self._read_trigger)

    def _to_relay(self) -> None:
        """Kernel → relay: the trigger back to eoid's eventfd, then the unmask unbound;
        once the backend has done both, the channel takes the line over from what the two
        eventfds hold (``from_kernel``). Read before, a fire or an EOI could still come
        and go on the old route after: a line left masked, with an EOI eoid calls spurious."""
        device = self.device
        assert device is not None
        try:
            routed = device.route(self.trigger_fd, None)
        except (DeviceError, OSError) as e:
            self._route_failed(device, e)
            return
        # the eventfds hold what the old route did not take: read once it is in place
        self._when_routed(device, routed, self._take_from_kernel)

    def _take_from_kernel(self) -> None:
        device = self.device
        assert device is not None
        self._count_kernel(device)
        self.datapath = Datapath.RELAY
        now = monotonic_ns()
        triggers, eois = drain_eventfd(self.trigger_fd), drain_eventfd(self.eoi_fd)
        self._act(self.channel.from_kernel(triggers, eois, now), now)

    def _when_routed(self, device: IntxDevice, routed: asyncio.Future[Any] | None,
                     then: Callable[[], None]) -> None:
        """Run ``then`` once ``device.route`` is in place (now, or on the sim's reply),
        then re-route if the wanted path changed meanwhile. A route that failed is the
        backend's ``GONE`` event: the device goes down, ``then`` never runs."""
        if routed is None:
            then()
            return
        self._routing = routed

        def done(_: asyncio.Future[Any]) -> None:
            if self._routing is routed and self.device is device:
                self._routed(routed, then)
        routed.add_done_callback(done)

    @_owning
    def _routed(self, routed: asyncio.Future[Any], then: Callable[[], None]) -> None:
        self._routing = None
        if not routed.cancelled() and routed.exception() is None:
            then()
            self._reroute()

    def _count_kernel(self, device: IntxDevice) -> None:
        """Add what the device counted on the kernel's path since last asked."""
        now = device.kernel_interrupts()
        if now is None:
            return
        if self._kernel_seen is not None and now > self._kernel_seen:
            self.channel.stats.kernel_interrupts += now - self._kernel_seen
        self._kernel_seen = now

    def _route_failed(self, device: IntxDevice, error: Exception) -> None:
        """A half-made switch leaves the line in a state nobody owns: reopen the device."""
        self._fail("route", error)
        held = list(device.held_fds())
        reason = f"datapath switch failed: {error}"
        self.stop(reason)
        self.on_down(self, reason, held)

    @_owning
    def set_datapath(self, path: Datapath | None) -> None:
        """``eoid datapath``: the path to use until the next reload (None: the configured)."""
        self.datapath_override = path
        self._end_sampling()
        self._reroute()

    @_owning
    def observe(self, duration: int, opened_at: float | None = None) -> None:
        """Relay the device for ``duration`` ns, then return it to the kernel's path (if it
        is wanted there): latencies and stuck EOIs are seen during the window.
        ``opened_at``: the loop time a sampled window opened on (``sample_opens``), so
        that the windows opened together also close together."""
        now = monotonic_ns()
        if now + duration <= self._observing_until:
            return
        self._observing_until = now + duration
        self.observations += 1
        if self._observe_timer is not None:
            self._observe_timer.cancel()
        opened = self.loop.time() if opened_at is None else opened_at
        self._observe_timer = self.loop.call_at(opened + duration * 1e-9 + TIMER_SLACK,
                                                self._observed)
        self._reroute()

    @_owning
    def _observed(self) -> None:
        self._observe_timer = None
        self._observing_until = 0
        self._reroute()

    def _start_sampling(self) -> None:
        """``observe: {every, for}``: one window a period, the first at a random phase
        (devices configured together do not all switch at once), on ``sample_opens``'s grid.
        Started while the device is wanted on the kernel's path and none is scheduled."""
        if self._sample_timer is None and self.config.observe is not None \
                and self.wanted_datapath is Datapath.KERNEL:
            every = self.config.observe.every
            self._schedule_sample(self.loop.time() + random.uniform(0, every * 1e-9), every)

    def _schedule_sample(self, due: float, every: int) -> None:
        """The window due at loop time ``due`` opens at the next tick (``sample_opens``);
        the one after is due a period after ``due`` (so the mean period stays exact)."""
        opens = sample_opens(due, every)
        self._sample_timer = self.loop.call_at(opens, self._sample, due, opens)

    def _sample(self, due: float, opened_at: float) -> None:
        observe = self.config.observe
        self._sample_timer = None
        if observe is None or self.wanted_datapath is not Datapath.KERNEL:
            return
        self._schedule_sample(due + observe.every * 1e-9, observe.every)
        if self.device is not None and self.consumer is not None:
            self.observe(observe.window, opened_at)

    def _end_sampling(self) -> None:
        if self._sample_timer is not None:
            self._sample_timer.cancel()
            self._sample_timer = None

    # --- consumers -----------------------------------------------------------------------

    @_owning
    def attach(self, peer: Consumer) -> list[int]:
        """Give ``peer`` the device's irq and eoi eventfds (dups; the caller closes them)."""
        if not self.config.consumers.allows(peer.uid, peer.gids):
            raise NotAllowed(f"uid {peer.uid} may not attach to {self.name}")
        if self.consumer is not None:
            raise DeviceBusy(f"{self.name} already has a consumer")
        if self.device is not None:
            self._settle()  # what happened before this consumer existed
        drain_eventfd(self.irq_fd)  # edges nobody read are not this consumer's to see
        self.consumer = peer
        peer.attached.add(self.name)
        now = monotonic_ns()
        if self.device is not None:
            self._act(self.channel.attach(now), now)
        else:
            self.channel.attached = True
        self._log.info("consumer attached", pid=peer.pid, uid=peer.uid)
        fds = [os.dup(self.irq_fd), os.dup(self.eoi_fd)]
        self._reroute()
        return fds

    @_owning
    def detach(self, peer: Consumer) -> None:
        self._detach(peer)

    def _detach(self, peer: Consumer) -> None:
        if self.consumer is not peer:
            raise NotAttached(f"not attached to {self.name}")
        if self.datapath is Datapath.KERNEL:  # no consumer, no kernel path: see ``_path``
            self._to_relay()
        if self.device is not None and self._routing is None:
            # the line first (the channel may unmask); an EOI written just before
            # leaving still ends the interrupt (with a switch in flight: once it is made)
            self._settle()
        self.consumer = None
        peer.attached.discard(self.name)
        self._act(self.channel.detach(), monotonic_ns())
        drain_eventfd(self.irq_fd)
        self._log.info("consumer detached", pid=peer.pid, held=self.channel.state == State.HELD)

    # --- device events -------------------------------------------------------------------

    @_owning
    def _on_device_event(self, fd: int) -> None:
        device = self.device
        if device is None:
            return
        event = device.read_event(fd)
        if event is None:
            return
        self.channel.stats.errors["device_event"] += event is DeviceEvent.ERROR
        if event is DeviceEvent.ERROR:
            self.faulted = True
            self._log.error("device reported an error; its line is not unmasked until "
                            "`eoid reset` or a reload reopens it")
            if self.consumer is not None:
                self.consumer.device_event("device_error", self.name)
            self._reroute()  # the kernel's path would go on unmasking it
            return
        reason = ("the host asked for the device back (unbind or hot-unplug)"
                  if event is DeviceEvent.REQUEST else "the device went away")
        self._log.warning("device released", reason=reason)
        held = list(device.held_fds())
        self.stop(reason)
        self.on_down(self, reason, held)

    @_owning
    def reset_device(self) -> bool:
        """Reset the device where its backend can (``VFIO_DEVICE_RESET``); False where it
        cannot. The caller then reopens it (``Daemon.reset``)."""
        return self.device is not None and self.device.reset()

    def path_status(self) -> dict[str, Any]:
        """Where the line is and why (``eoid datapath``/``observe`` replies, ``status``)."""
        path = self._path()
        moving = self._routing is not None and path is not self.datapath
        return {"device": self.name, "datapath": self.datapath.value,
                "moving_to": path.value if moving else None,
                "wanted": self.wanted_datapath.value, "observing": self.observing,
                "attached": self.consumer is not None, "up": self.relaying,
                "observations": self.observations}

    def status(self) -> dict[str, Any]:
        ch, stats = self.channel, self.stats
        total = stats.interrupts + stats.kernel_interrupts
        return {"name": self.name, "up": self.relaying, "state": self.state.name.lower(),
                "down_reason": self.down_reason, "faulted": self.faulted, "stuck": ch.stuck,
                "storm": ch.in_storm, "pci_address": self.config.pci_address,
                "backend": self.config.backend.type,
                "consumer": self.consumer.describe() if self.consumer else None,
                "counters": {k: v for k, v in stats.to_dict().items()
                             if isinstance(v, int | dict) and k not in (
                                 "service", "unmask_latency", "dispatch_latency")},
                "service_p50_seconds": stats.service.quantile(0.5),
                "service_p99_seconds": stats.service.quantile(0.99),
                "unmask_p99_seconds": stats.unmask_latency.quantile(0.99),
                "datapath": self.datapath.value, "datapath_wanted": self.wanted_datapath.value,
                "observing": self.observing, "observations": self.observations,
                "observed_ratio": stats.interrupts / total if total else None}
