"""The loop shell for one device: eventfds, the backend and a consumer around a ``Channel``.

Three eventfds per device, owned here and stable for the device's life (across consumer
reconnects, reloads and, through systemd's fd store, restarts): ``trigger`` (registered
with the backend), ``irq`` (the consumer's interrupt) and ``eoi`` (the consumer's end of
interrupt). Callbacks are bound once per device; the hot path reads a counter, asks the
channel, performs one syscall and records a latency in plain arrays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from bisect import bisect_left
from collections.abc import Callable
from os import eventfd_read, eventfd_write
from time import monotonic_ns
from typing import Any

import structlog

from eoid.channel import EOI_TIMEOUT, FORWARD, STORM_BEGIN, STORM_END, TIMER, UNMASK, Channel, State
from eoid.config import DeviceConfig, format_duration
from eoid.control import Peer
from eoid.device import DeviceEvent, IntxDevice, drain_eventfd
from eoid.errors import DeviceError, ProtocolError
from eoid.stats import BUCKETS_NS, DeviceStats

EFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC
TIMER_SLACK = 0.001  # uvloop timers have millisecond resolution: never wake up early


def _refuse(device: str, reason: str) -> Callable[[], None]:
    """What ``unmask`` becomes when it must not reach the device (down, or faulted)."""
    def refuse() -> None:
        raise DeviceError(device, "unmask", reason)
    return refuse


class DeviceRunner:
    """Runs one device's INTx loop on the event loop; see the module docstring."""

    def __init__(self, config: DeviceConfig, loop: asyncio.AbstractEventLoop,
                 on_down: Callable[[DeviceRunner, str, list[str]], None],
                 eventfds: dict[str, int] | None = None, stats: DeviceStats | None = None) -> None:
        self.config = config
        self.name = config.name
        self.loop = loop
        self.on_down = on_down
        fds = eventfds or {k: os.eventfd(0, EFD_FLAGS) for k in ("trigger", "irq", "eoi")}
        self.trigger_fd, self.irq_fd, self.eoi_fd = fds["trigger"], fds["irq"], fds["eoi"]
        self.channel = Channel(config.policy, stats)
        self.stats = self.channel.stats
        self.device: IntxDevice | None = None
        self.consumer: Peer | None = None
        self.down_reason: str | None = "not opened yet"
        self.faulted = False
        self._device_unmask: Callable[[], None] = _refuse(self.name, "the device is down")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0
        self._log = structlog.get_logger("eoid.device").bind(device=self.name)

    @property
    def up(self) -> bool:
        return self.device is not None

    @property
    def eventfds(self) -> dict[str, int]:
        return {"trigger": self.trigger_fd, "irq": self.irq_fd, "eoi": self.eoi_fd}

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, device: IntxDevice, adopted: bool = False) -> None:
        """Arm the line. ``adopted``: the device was enabled by a previous eoid process."""
        self.device = device
        self._device_unmask = device.unmask  # bound once: called per interrupt
        self.down_reason = None
        self.faulted = False
        self.loop.add_reader(self.trigger_fd, self._on_trigger)
        self.loop.add_reader(self.eoi_fd, self._on_eoi)
        for fd in device.event_fds():
            self.loop.add_reader(fd, self._on_device_event, fd)
        self.channel.attached = self.consumer is not None
        now = monotonic_ns()
        if adopted:
            # While no eoid ran, the line may have fired and the consumer may have sent
            # an EOI: the channel decides from both counts what is owed (E15).
            triggers, eois = drain_eventfd(self.trigger_fd), drain_eventfd(self.eoi_fd)
            self._act(self.channel.adopt(triggers, eois, now), now)
        else:
            try:
                device.enable(self.trigger_fd)
            except DeviceError as e:
                self.stats.errors["enable"] += 1
                self.stop(f"enable failed: {e}")
                raise
            self.channel.enable(now)
            self._act(self.channel.attach(now) if self.consumer else 0, now)
        self._log.info("device armed", backend=device.info.backend,
                       pci_address=device.info.pci_address, adopted=adopted)

    def stop(self, reason: str, release: bool = True) -> None:
        """Take the device down. ``release=False`` keeps it enabled (handing over to a
        successor process through the fd store)."""
        self._device_unmask = _refuse(self.name, "the device is down")
        device, self.device = self.device, None
        self.down_reason = reason
        self._cancel_timer()
        for fd in (self.trigger_fd, self.eoi_fd):
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(fd)
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
            self.consumer.notify({"event": "device_down", "device": self.name, "reason": reason})

    def close(self) -> None:
        """Forget the device for good (removed from the config or daemon shutdown)."""
        if self.device is not None:
            self.stop("removed")
        if self.consumer is not None:
            self.consumer.attached.discard(self.name)
            self.consumer = None
        for fd in (self.trigger_fd, self.irq_fd, self.eoi_fd):
            os.close(fd)
        self.trigger_fd = self.irq_fd = self.eoi_fd = -1

    def set_config(self, config: DeviceConfig) -> None:
        """Apply a reloaded policy or consumer list in place, without touching the line."""
        self.config = config
        self.channel.set_policy(config.policy)
        peer = self.consumer
        if peer is not None and not config.consumers.allows(peer.uid, peer.gids):
            self.detach(peer)
            peer.notify({"event": "detached", "device": self.name,
                         "reason": "no longer allowed by the configuration"})

    # --- the hot path --------------------------------------------------------------------

    # Histograms are observed inline (``counts[bisect_left(...)] += 1``) rather than
    # through ``Histogram.observe``, and the two handlers inline their common case
    # (forward, unmask): every call frame is a measurable part of this path (see
    # bench/RESULTS.md). ``_forward`` and ``_unmask`` serve the rare paths.

    def _on_trigger(self) -> None:
        try:
            count = eventfd_read(self.trigger_fd)
        except BlockingIOError:
            return  # a spurious wake-up: the count was already consumed
        now = monotonic_ns()
        channel = self.channel
        actions = channel.trigger(count, now)
        if actions & FORWARD:
            stats = self.stats
            try:
                eventfd_write(self.irq_fd, 1)
            except OSError:
                stats.errors["forward"] += 1
            else:
                stats.forwards += 1
                elapsed = monotonic_ns() - now
                hist = stats.dispatch_latency
                hist.counts[bisect_left(BUCKETS_NS, elapsed)] += 1
                hist.sum_ns += elapsed
        if actions & TIMER and channel.timer_at is not None and (
                self._timer is None or self._timer_at > channel.timer_at):
            self._schedule()  # only when the loop timer would fire too late

    def _forward(self, since: int) -> None:
        stats = self.stats
        try:
            eventfd_write(self.irq_fd, 1)
        except OSError:
            stats.errors["forward"] += 1
            return
        stats.forwards += 1
        elapsed = monotonic_ns() - since
        hist = stats.dispatch_latency
        hist.counts[bisect_left(BUCKETS_NS, elapsed)] += 1
        hist.sum_ns += elapsed

    def _on_eoi(self) -> None:
        try:
            count = eventfd_read(self.eoi_fd)
        except BlockingIOError:
            return
        channel = self.channel
        if channel.adopting:
            self._on_trigger()  # the line may be unmasked: a fire must count first
        now = monotonic_ns()
        actions = channel.eoi(count, now)
        if actions & UNMASK:
            stats = self.stats
            try:
                self._device_unmask()
            except (DeviceError, OSError) as e:
                self._unmask_failed(e)
            else:
                stats.unmasks += 1
                elapsed = monotonic_ns() - now
                hist = stats.unmask_latency
                hist.counts[bisect_left(BUCKETS_NS, elapsed)] += 1
                hist.sum_ns += elapsed
        if actions & (STORM_BEGIN | STORM_END):
            self._log_storm(actions)
        if actions & TIMER and self.channel.timer_at is not None:
            self._schedule()

    def _unmask(self, since: int) -> None:
        stats = self.stats
        try:
            self._device_unmask()
        except (DeviceError, OSError) as e:
            self._unmask_failed(e)
            return
        stats.unmasks += 1
        elapsed = monotonic_ns() - since
        hist = stats.unmask_latency
        hist.counts[bisect_left(BUCKETS_NS, elapsed)] += 1
        hist.sum_ns += elapsed

    def _unmask_failed(self, error: Exception) -> None:
        self.stats.errors["unmask"] += 1
        if self.stats.errors["unmask"] == 1:
            self._log.error("unmask failed", error=str(error))

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

    def _on_timer(self) -> None:
        self._timer = None
        self._on_trigger()  # a fire not yet read must count before the channel may unmask
        now = monotonic_ns()
        self._act(self.channel.timer(now), now)

    def _act(self, actions: int, now: int) -> None:
        if actions & FORWARD:
            self._forward(now)
        if actions & UNMASK:
            self._unmask(now)
        if actions & EOI_TIMEOUT:
            self._log.warning("EOI timeout", timeout=format_duration(
                self.channel.policy.eoi_timeout), policy=str(self.channel.policy.on_eoi_timeout),
                consumer=self.consumer.describe() if self.consumer else None)
        if actions & TIMER:
            self._schedule()

    def _log_storm(self, actions: int) -> None:
        if actions & STORM_BEGIN:
            self._log.warning("interrupt storm: deferring unmasks",
                              max_rate=self.channel.policy.storm.max_rate)
        else:
            self._log.info("interrupt storm over", throttles=self.stats.storm_throttles)

    # --- consumers -----------------------------------------------------------------------

    def attach(self, peer: Peer) -> list[int]:
        """Give ``peer`` the device's irq and eoi eventfds (dups; the caller closes them)."""
        if not self.config.consumers.allows(peer.uid, peer.gids):
            raise ProtocolError("forbidden", f"uid {peer.uid} may not attach to {self.name}")
        if self.consumer is not None:
            raise ProtocolError("busy", f"{self.name} already has a consumer "
                                f"(pid {self.consumer.pid})")
        if self.device is not None:
            self._on_trigger()  # settle what happened before this consumer existed
            self._on_eoi()
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

    def detach(self, peer: Peer) -> None:
        if self.consumer is not peer:
            raise ProtocolError("not_attached", f"not attached to {self.name}")
        if self.device is not None:
            self._on_trigger()  # settle the line before the channel decides (it may unmask)
            self._on_eoi()  # an EOI written just before leaving still ends the interrupt
        self.consumer = None
        peer.attached.discard(self.name)
        self._act(self.channel.detach(), monotonic_ns())
        drain_eventfd(self.irq_fd)
        self._log.info("consumer detached", pid=peer.pid, held=self.channel.state == State.HELD)

    # --- device events -------------------------------------------------------------------

    def _on_device_event(self, fd: int) -> None:
        device = self.device
        if device is None:
            return
        event = device.read_event(fd)
        if event is None:
            return
        self.stats.errors["device_event"] += event is DeviceEvent.ERROR
        if event is DeviceEvent.ERROR:
            self.faulted = True
            self._device_unmask = _refuse(self.name, "the device reported an error")
            self._log.error("device reported an error; unmasking stopped until it is reopened")
            if self.consumer is not None:
                self.consumer.notify({"event": "device_error", "device": self.name})
            return
        reason = ("the host asked for the device back (unbind or hot-unplug)"
                  if event is DeviceEvent.REQUEST else "the device went away")
        self._log.warning("device released", reason=reason)
        held = list(device.held_fds())
        self.stop(reason)
        self.on_down(self, reason, held)

    def status(self) -> dict[str, Any]:
        ch = self.channel
        return {"name": self.name, "up": self.up, "state": ch.state.name.lower(),
                "down_reason": self.down_reason, "faulted": self.faulted, "stuck": ch.stuck,
                "storm": ch.in_storm, "pci_address": self.config.pci_address,
                "backend": self.config.backend.type,
                "consumer": self.consumer.describe() if self.consumer else None,
                "counters": {k: v for k, v in self.stats.to_dict().items()
                             if isinstance(v, int | dict) and k not in (
                                 "service", "unmask_latency", "dispatch_latency")},
                "service_p50_seconds": self.stats.service.quantile(0.5),
                "service_p99_seconds": self.stats.service.quantile(0.99),
                "unmask_p99_seconds": self.stats.unmask_latency.quantile(0.99)}
