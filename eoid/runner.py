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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable
from os import eventfd_write
from time import monotonic_ns
from typing import Any, Concatenate, ParamSpec, TypeVar

import structlog

from eoid import _fastpath, log
from eoid._fastpath import NO_TIME, FastPath, Lane
from eoid.channel import EOI_TIMEOUT, FORWARD, STORM_BEGIN, STORM_END, TIMER, UNMASK, Channel, State
from eoid.config import DeviceConfig, format_duration
from eoid.consumer import Consumer
from eoid.device import DeviceEvent, IntxDevice, drain_eventfd
from eoid.errors import DeviceBusy, DeviceError, NotAllowed, NotAttached
from eoid.stats import BUCKETS_NS, DeviceStats

EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC
TIMER_SLACK = 0.001  # uvloop timers have millisecond resolution: never wake up early

_fastpath.set_buckets(BUCKETS_NS)
_DEVICE_LOG = structlog.get_logger("eoid.device")

P = ParamSpec("P")
R = TypeVar("R")


def _owning(method: Callable[Concatenate[DeviceRunner, P], R]
            ) -> Callable[Concatenate[DeviceRunner, P], R]:
    """Run ``method`` with the channel's state taken back from the fast path, and lend it
    again afterwards (if the line is then in a state the fast path may run)."""
    def owning(self: DeviceRunner, /, *args: P.args, **kwargs: P.kwargs) -> R:
        self._reclaim()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._lend()
    functools.update_wrapper(owning, method)
    return owning


def _refuse(device: str, reason: str) -> Callable[[], None]:
    """What ``unmask`` becomes when there is no device to reach (down)."""
    def refuse() -> None:
        raise DeviceError(device, "unmask", reason)
    return refuse


class DeviceRunner:
    """Runs one device's INTx loop on the event loop; see the module docstring.

    ``fast=False`` keeps the fast path from ever holding the state, so every event takes
    the Python path (tests compare the two)."""

    def __init__(self, config: DeviceConfig, loop: asyncio.AbstractEventLoop,
                 on_down: Callable[[DeviceRunner, str, list[str]], None],
                 eventfds: dict[str, int] | None = None, stats: DeviceStats | None = None,
                 *, lane: Lane, fast: bool = True) -> None:
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
        self._fast = FastPath(self.trigger_fd, self.irq_fd, self.eoi_fd, self._on_returned)
        self._fast_allowed = fast
        self._lane = lane
        lane.add(self._fast)
        self._watching = False  # the loop reads trigger and eoi (not the lane)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0

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
        counts = self._fast.counts()
        if counts is None:
            return self.channel.stats
        (interrupts, coalesced, eois, forwards, unmasks, forward_errors, spurious,
         service, service_ns, dispatch, dispatch_ns, unmask, unmask_ns) = counts
        stats = self.channel.stats.copy()
        stats.interrupts += interrupts
        stats.coalesced_interrupts += coalesced
        stats.eois += eois
        stats.forwards += forwards
        stats.unmasks += unmasks
        stats.errors["forward"] += forward_errors
        stats.spurious_eois += spurious
        stats.service.add(service, service_ns)
        stats.dispatch_latency.add(dispatch, dispatch_ns)
        stats.unmask_latency.add(unmask, unmask_ns)
        return stats

    @property
    def interrupts(self) -> int:
        """``stats.interrupts`` without the snapshot (``STATUS=``, every watchdog ping)."""
        return self.channel.stats.interrupts + self._fast.interrupts

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
        state = State(fast.state) if fast.lent else self.channel.state
        if state is State.HELD and monotonic_ns() - self.channel.pending_since \
                >= self.config.policy.held_timeout:
            return State.ABANDONED
        return state

    # --- lifecycle ---------------------------------------------------------------------

    @_owning
    def start(self, device: IntxDevice, adopted: bool = False) -> None:
        """Arm the line. ``adopted``: the device was enabled by a previous eoid process."""
        self.device = device
        self._device_unmask = device.unmask  # bound once
        self._fast.set_unmask(*(device.unmask_op() or (-1,)))
        self.down_reason = None
        self.faulted = False
        self._watch()
        for fd in device.event_fds():
            self.loop.add_reader(fd, self._on_device_event, fd)
        device.watch(self.loop, self._on_device_event)  # events not on an fd of its own (sim)
        self.channel.attached = self.consumer is not None
        now = monotonic_ns()
        if adopted:
            # While no eoid ran, the line may have fired and the consumer may have sent
            # an EOI: the channel decides from both counts what is owed (docs/intx-eoi.md §9).
            triggers, eois = drain_eventfd(self.trigger_fd), drain_eventfd(self.eoi_fd)
            self._act(self.channel.adopt(triggers, eois, now), now)
        else:
            try:
                device.enable(self.trigger_fd)
            except DeviceError as e:
                self.channel.stats.errors["enable"] += 1
                self.stop(f"enable failed: {e}")
                raise
            self.channel.enable(now)
            self._act(self.channel.attach(now) if self.consumer else 0, now)
        self._log.info("device armed", backend=device.info.backend,
                       pci_address=device.info.pci_address, adopted=adopted)

    @_owning
    def stop(self, reason: str, release: bool = True) -> None:
        """Take the device down. ``release=False`` keeps it enabled (handing over to a
        successor process through the fd store)."""
        self._device_unmask = _refuse(self.name, "the device is down")
        self._fast.set_unmask(-1)
        device, self.device = self.device, None
        self.down_reason = reason
        self._cancel_timer()
        self._unwatch()
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
        self._lane.remove(self._fast)
        for fd in (self.trigger_fd, self.irq_fd, self.eoi_fd):
            os.close(fd)
        self.trigger_fd = self.irq_fd = self.eoi_fd = -1

    @_owning
    def set_config(self, config: DeviceConfig) -> None:
        """Apply a reloaded policy or consumer list in place, without touching the line."""
        self.config = config
        self.channel.set_policy(config.policy)
        peer = self.consumer
        if peer is not None and not config.consumers.allows(peer.uid, peer.gids):
            self._detach(peer)
            peer.device_event("detached", self.name, "no longer allowed by the configuration")

    # --- the fast path's hand-over -------------------------------------------------------

    def _reclaim(self) -> None:
        """Take the channel's state back from the fast path, as it left it, and read the
        eventfds on the loop again."""
        lent = self._fast.release()
        if lent is None:
            return
        state, pending_since, timer_at, tat, backoff, owed_unmask = lent
        self.channel.take_back(state, pending_since, None if timer_at == NO_TIME else timer_at,
                               tat, backoff)
        if self.device is not None:
            self._watch()
        if owed_unmask:
            self._unmask(owed_unmask)  # an EOI the lane acted on but could not unmask for

    def _lend(self) -> None:
        """Lend the state to the fast path, if the device is healthy and the line is in
        one of the states it runs (``Channel.lend``)."""
        lent = self.channel.lend() if self.device is not None and not self.faulted \
            and self._fast_allowed else None
        if lent is None:
            return
        state, pending_since, timer_at, tat, backoff, eoi_timeout, interval, limit, half, \
            backoff_initial, unmask_on_spurious = lent
        self._unwatch()
        self._fast.take(state, pending_since, NO_TIME if timer_at is None else timer_at, tat,
                        backoff, eoi_timeout, interval, limit, half, backoff_initial,
                        unmask_on_spurious, self._timer_at if self._timer is not None
                        else NO_TIME)

    def _watch(self) -> None:
        if not self._watching:
            self.loop.add_reader(self.trigger_fd, self._on_trigger_ready)
            self.loop.add_reader(self.eoi_fd, self._on_eoi_ready)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            for fd in (self.trigger_fd, self.eoi_fd):
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(fd)
            self._watching = False

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
        """Handle what the eventfds hold now, before a decision that depends on it."""
        self._read_trigger()
        self._read_eoi()

    def _forward(self, since: int) -> None:
        stats = self.channel.stats
        try:
            eventfd_write(self.irq_fd, 1)
        except OSError:
            stats.errors["forward"] += 1
            return
        stats.forwards += 1
        stats.dispatch_latency.observe(monotonic_ns() - since)

    def _unmask(self, since: int) -> None:
        if self.faulted:
            return  # by design, not an error: the state says FAULTED until reset or reload
        stats = self.channel.stats
        try:
            self._device_unmask()
        except (DeviceError, OSError) as e:
            stats.errors["unmask"] += 1
            if stats.errors["unmask"] == 1:
                self._log.error("unmask failed", error=str(e))
            return
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
        self._timer_at = at
        delay = max(0.0, (at - monotonic_ns()) * 1e-9) + TIMER_SLACK
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @_owning
    def _on_timer(self) -> None:
        self._timer = None
        self._read_trigger()  # a fire not yet read must count before the channel may unmask
        now = monotonic_ns()
        self._act(self.channel.timer(now), now)

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
        return [os.dup(self.irq_fd), os.dup(self.eoi_fd)]

    @_owning
    def detach(self, peer: Consumer) -> None:
        self._detach(peer)

    def _detach(self, peer: Consumer) -> None:
        if self.consumer is not peer:
            raise NotAttached(f"not attached to {self.name}")
        if self.device is not None:
            # the line first (the channel may unmask); an EOI written just before
            # leaving still ends the interrupt
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
        device = self.device
        reset = getattr(device, "reset", None)
        if reset is None or not getattr(device, "supports_reset", False):
            return False
        reset()
        return True

    def status(self) -> dict[str, Any]:
        ch, stats = self.channel, self.stats
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
                "unmask_p99_seconds": stats.unmask_latency.quantile(0.99)}
