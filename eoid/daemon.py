"""The daemon: wires device runners, the control socket, metrics, signals and reloads.

Lifecycle: ``startup`` (bind the control socket, start the exporter, open and arm every
device) → serve until SIGTERM/SIGINT, reloading on SIGHUP → ``shutdown`` (triggers
disabled, consumers told, socket removed). A device that fails to open or goes away is
reported and retried with a backoff (``eoid.opener``); it never takes the daemon or
another device down.

Under systemd, everything a successor needs is parked in the fd store (``eoid.fdstore``)
and a stop is a *handover*: devices stay enabled and consumers stay connected, so a
restart (or a crash) loses no interrupt and no consumer notices it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import structlog

from eoid import __version__, log
from eoid.channel import State
from eoid.config import Config, Datapath, DeviceConfig, load_config
from eoid.control import ControlServer, Peer
from eoid.device import IntxDevice
from eoid.errors import ConfigError, EoidError, UnknownDevice
from eoid.fdstore import EVENTFD_ROLES, Adopted, FdStore, device_fd_name
from eoid.handover import RestartRecord
from eoid.metrics import DaemonMetrics, DeviceView, Exporter, build_registry
from eoid.opener import Opener, open_backend
from eoid.runner import DeviceRunner, new_lane
from eoid.sim.backend import SimConnections
from eoid.stats import DeviceStats
from eoid.systemd import Notifier, watchdog_interval
from eoid.vfio.procirq import IrqCounter

if TYPE_CHECKING:
    from eoid._fastpath import Lane

EXTEND_EVERY = 5.0  # seconds of start-up between EXTEND_TIMEOUT_USEC messages
GIL_SWITCH_INTERVAL = 0.0005  # seconds; see run_daemon
GC_YOUNG_THRESHOLD = 10_000  # allocations between collections of the young; see run_daemon


def _needs_reopen(old: DeviceConfig, new: DeviceConfig) -> bool:
    """Backend or address changes need a new device; policy and consumers apply in place."""
    return old.backend != new.backend or old.pci_address != new.pci_address


class Daemon:
    """One eoid process; see the module docstring."""

    def __init__(self, config: Config, notifier: Notifier | None = None,
                 adopted: Adopted | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier(None)
        self.adopted = adopted or Adopted()
        self.store = FdStore(self.notifier, self.adopted.state_fd)
        self._sims: SimConnections | None = None  # made with the loop (startup)
        self.irqs = IrqCounter()  # host IRQ counts for every VFIO device's kernel_interrupts
        self.runners: dict[str, DeviceRunner] = {}
        self.metrics = DaemonMetrics()
        self.exporter: Exporter | None = None
        self.control: ControlServer | None = None
        self.started = time.monotonic()
        self._opener: Opener | None = None  # made with the loop (startup)
        self.record = RestartRecord(self.store, self.adopted.state)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._lane: Lane | None = None
        self._pings = 0  # sent to the lane by the watchdog (see _pet_watchdog)
        self._rate_mark = (0, time.monotonic())
        self._status_note = ""  # kept in STATUS= until it no longer holds
        self.last_reload: dict[str, Any] = {"successful": True, "at": time.time(),
                                            "problems": []}
        self._log = structlog.get_logger("eoid")

    def notify(self, send: Callable[..., bool], *args: Any, **fields: Any) -> None:
        """Call one of ``Notifier``'s senders; a manager that cannot be told must not stop
        the interrupts."""
        try:
            send(*args, **fields)
        except (OSError, EoidError) as e:
            self._log.warning("sd_notify failed", error=str(e))

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the daemon is not running"
        return self._loop

    @property
    def sims(self) -> SimConnections:
        """The connections to sim processes, shared by their devices."""
        assert self._sims is not None, "the daemon is not running"
        return self._sims

    @property
    def opener(self) -> Opener:
        """Opens devices, and opens again those that went down (with a backoff)."""
        assert self._opener is not None, "the daemon is not running"
        return self._opener

    @property
    def lane(self) -> Lane | None:
        """The thread that runs every device's common round trip (eoid/_fastpath.c), or
        None in pure-Python mode (``eoid.runner.fastpath_enabled``)."""
        assert self._loop is not None, "the daemon is not running"
        return self._lane

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until asked to stop, shut down."""
        await self.startup()
        try:
            assert self._stop is not None
            await self._stop.wait()
        finally:
            self.shutdown()

    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._lane = new_lane()
        if self._lane is not None:
            self._loop.add_reader(self._lane.notify_fd, self._lane.dispatch)
        self.metrics.loop = self._loop
        self._sims = SimConnections(self._loop, self.store, self.adopted.sims)
        self._opener = Opener(self._loop, self._open_backend, self._started)
        self.control = ControlServer(self.config.daemon.control, self, self._loop)
        listener = self.control.listen(self.adopted.control)
        self.store.put("control", listener.fileno())
        self.record.adopt_peers(self.adopted.peers, self.control.adopt_peer)
        self.adopted.peers.clear()
        address = self.config.daemon.metrics.address()
        if address is not None:
            try:
                registry = build_registry(self, self.metrics, self.config.daemon.metrics)
                self.exporter = Exporter(registry, address)
            except OSError as e:
                self.control.close()
                raise EoidError(f"cannot serve metrics on {self.config.daemon.metrics.listen}: "
                                f"{e.strerror}") from e
        arming = begun = time.monotonic()
        for device in self.config.devices.values():
            self._add(device)
            if time.monotonic() - begun > EXTEND_EVERY:  # many slow devices: keep systemd patient
                self.notify(self.notifier.extend_timeout, 2 * EXTEND_EVERY)
                begun = time.monotonic()
        answers = self.opener.answers()
        if answers:  # the answers of sim processes, the loop serving meanwhile
            await asyncio.wait(answers, timeout=EXTEND_EVERY)
        arm_seconds = time.monotonic() - arming
        for name in self.adopted.close_rest():
            self.store.remove(name)
        self._save_state()
        self.metrics.last_reload_success = time.time()
        if threading.current_thread() is threading.main_thread():  # not in-process tests
            for sig, handler in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop),
                                 (signal.SIGHUP, self.reload)):
                self._loop.add_signal_handler(sig, handler)
        self.notify(self.notifier.ready, self._status())
        interval = watchdog_interval()
        if interval is not None:
            self._pet_watchdog(interval / 2)
        self._log.info("eoid ready", version=__version__, devices=len(self.runners),
                       arm_seconds=round(arm_seconds, 4), adopted=bool(self.adopted.state),
                       up=sum(r.up for r in self.runners.values()),
                       control=str(self.config.daemon.control.socket),
                       metrics=self.config.daemon.metrics.listen)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _pet_watchdog(self, every: float) -> None:
        """WATCHDOG=1 from the loop itself, while the lane answered the last ping: a wedged
        loop or lane stops petting and is restarted."""
        lane = self._lane
        if lane is None or lane.pongs >= self._pings:
            self.notify(self.notifier.notify, WATCHDOG=1, STATUS=self._status())
        else:
            self._log.error("the fast path's thread does not answer", pings=self._pings,
                            pongs=lane.pongs)
        if lane is not None and lane.alive:
            self._pings += 1
            lane.ping()
        self._watchdog = self.loop.call_later(every, self._pet_watchdog, every)

    def shutdown(self) -> None:
        """Stop serving. Under systemd with an fd store this is a handover: devices stay
        enabled and consumers connected in the store's copies, for the next eoid."""
        handover = self.store.enabled
        self.notify(self.notifier.stopping)
        self._log.info("eoid stopping", handover=handover)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._opener is not None:
            self._opener.close()
        if handover:
            self._save_state(with_stats=True)
            for runner in self.runners.values():
                runner.stop("handed over", release=False)
        elif self.control is not None:
            for peer in list(self.control.peers):
                peer.notify({"event": "shutdown"})
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
        if self._lane is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self._lane.notify_fd)
            self._lane.close()
        if self._sims is not None:
            self._sims.close()
        if self.control is not None:
            self.control.close(handover)
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None
        log.REPEATS.flush()  # counted warnings not yet summarised
        self._log.info("eoid stopped")

    # --- devices -----------------------------------------------------------------------

    def _add(self, device: DeviceConfig) -> None:
        fds = self.adopted.take_device(device.name)
        if fds is None:
            runner = DeviceRunner(device, self.loop, self._device_down, lane=self.lane)
            for role, fd in runner.eventfds.items():
                self.store.put(device_fd_name(device.name, role), fd)
        else:
            eventfds = {role: fds.pop(role) for role in EVENTFD_ROLES}
            stats = DeviceStats()
            stats.restore(self.adopted.state.get("devices", {}).get(device.name, {})
                          .get("stats", {}))
            runner = DeviceRunner(device, self.loop, self._device_down, eventfds, stats,
                                  lane=self.lane)
            holder = self.record.holder(device.name)
            if holder is not None:
                runner.consumer = holder
                holder.attached.add(device.name)
        self.runners[device.name] = runner
        if fds:
            try:
                runner.start(self._open_backend(device, fds), adopted=True)
                return
            except EoidError as e:  # the parked device is unusable: open it afresh
                self._log.warning("cannot adopt device; reopening", device=device.name,
                                  error=str(e))
        self.opener.open(runner)

    def _open_backend(self, device: DeviceConfig, adopt: dict[str, int] | None = None
                      ) -> IntxDevice:
        return open_backend(device, self.config.daemon, self.sims, adopt, irqs=self.irqs)

    def _started(self, runner: DeviceRunner, device: IntxDevice) -> None:
        for role, fd in device.held_fds().items():
            self.store.put(device_fd_name(runner.name, role), fd)

    def _device_down(self, runner: DeviceRunner, reason: str, held: list[str]) -> None:
        for role in held:
            self.store.remove(device_fd_name(runner.name, role))
        self.opener.down(runner)

    def _reopen_device(self, runner: DeviceRunner, reason: str) -> None:
        """Start a device over (its eventfds and consumer stay). An open VFIO device is
        restarted in place (``DeviceRunner.restart``: its consumer may hold a copy of the
        device fd, which keeps the group open in the kernel); others, and a VFIO device
        whose restart failed, are closed and opened afresh."""
        if runner.device is not None:
            held = list(runner.device.held_fds())
            if runner.config.backend.type == "vfio":
                try:
                    runner.restart(reason)
                    return
                except EoidError as e:
                    self._log.warning("device restart failed; opening it again",
                                      device=runner.name, error=str(e))
            if runner.device is not None:
                runner.stop(reason)
            for role in held:
                self.store.remove(device_fd_name(runner.name, role))
        self.opener.open(runner)

    def reset(self, name: str) -> dict[str, Any]:
        """``eoid reset``: reset the device where its backend can, then reopen it. Clears a
        fault, and drops an interrupt held for nobody (a device that still asserts its
        line fires again once armed). A backend that opens asynchronously (sim) may still
        be ``opening`` when this returns: ``status`` says when it is done."""
        runner = self._runner(name)
        reset = False
        if runner.device is not None:
            try:
                reset = runner.reset_device()
            except EoidError as e:
                self._log.warning("device reset failed; reopening it anyway", device=name,
                                  error=str(e))
        self._reopen_device(runner, "reset by the operator")
        self._log.info("device reset", device=name, reset=reset)
        return {"device": name, "reset": reset, "opening": self.opener.opening(name),
                "up": runner.relaying, "state": runner.state.name.lower(),
                "down_reason": runner.down_reason}

    def set_datapath(self, name: str, datapath: Datapath | None) -> dict[str, Any]:
        """``eoid datapath``: move the device, until the next reload (None: as configured)."""
        runner = self._runner(name)
        runner.set_datapath(datapath)
        self._log.info("datapath set", device=name, wanted=runner.wanted_datapath.value,
                       datapath=runner.datapath.value)
        return runner.path_status()

    def observe(self, name: str, duration_ns: int) -> dict[str, Any]:
        """``eoid observe``: relay the device for a while (README, "Two datapaths")."""
        runner = self._runner(name)
        runner.observe(duration_ns)
        return runner.path_status()

    def _remove(self, name: str) -> None:
        self.opener.forget(name)
        runner = self.runners.pop(name)
        self.metrics.retire(runner.stats)
        held = list(runner.device.held_fds()) if runner.device is not None else []
        runner.close()
        self._forget_fds(name, held)
        self._save_state()

    def _forget_fds(self, name: str, held: Iterable[str] = ()) -> None:
        for role in (*EVENTFD_ROLES, *held):
            self.store.remove(device_fd_name(name, role))

    # --- reload --------------------------------------------------------------------------

    def reload(self) -> dict[str, Any]:
        """Re-read the configuration and apply it as a diff; a bad one changes nothing.
        Returns what ``last_reload`` now says (the control socket's reply)."""
        self.notify(self.notifier.reloading)
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            self.metrics.reloads["failure"] += 1
            self.metrics.last_reload_successful = False
            self.last_reload = {"successful": False, "at": time.time(), "problems": e.problems}
            self._log.error("reload rejected; the running configuration stays",
                            problems=e.problems)
            self._status_note = f"; last reload failed: {e.problems[0]}"
            self.notify(self.notifier.ready, self._status())
            return self.last_reload
        self._status_note = ""
        changed = self._apply(new)
        self.metrics.reloads["success"] += 1
        self.metrics.last_reload_success = time.time()
        self.metrics.last_reload_successful = True
        self.last_reload = {"successful": True, "at": self.metrics.last_reload_success,
                            "problems": []}
        self._log.info("configuration reloaded", **changed)
        self.notify(self.notifier.ready, self._status())
        return {**self.last_reload, **changed}

    def _apply(self, new: Config) -> dict[str, list[str]]:
        old = self.config
        for key in ("control", "metrics", "loop"):
            if getattr(old.daemon, key) != getattr(new.daemon, key):
                self._log.warning("setting changes on restart only", setting=key)
        self.config = Config(new.path, old.daemon.model_copy(update={
            "log": new.daemon.log, "sim": new.daemon.sim, "devices_dir": new.daemon.devices_dir}),
            new.devices)
        log.reconfigure(new.daemon.log)
        removed = sorted(old.devices.keys() - new.devices.keys())
        added = sorted(new.devices.keys() - old.devices.keys())
        changed = sorted(n for n in old.devices.keys() & new.devices.keys()
                         if old.devices[n] != new.devices[n])
        for name in removed:
            self._remove(name)
        for name in changed:
            if _needs_reopen(old.devices[name], new.devices[name]):
                self._remove(name)
                self._add(new.devices[name])
            else:
                self.runners[name].set_config(new.devices[name])
        for name in added:
            self._add(new.devices[name])
        for runner in self.runners.values():  # ``eoid datapath`` holds until a reload
            if runner.datapath_override is not None:
                runner.set_datapath(None)
        for name, runner in self.runners.items():  # a reload is also "try again now"
            if name in added:
                continue
            if runner.faulted:
                self._reopen_device(runner, "reopened by a reload after a device error")
            elif runner.state is State.ABANDONED:  # as `eoid reset` does without a reset
                self._reopen_device(runner, "reopened by a reload: an interrupt was held "
                                            "for no consumer too long")
            elif not runner.up:
                self.opener.open(runner)
        return {"added": added, "removed": removed, "changed": changed}

    # --- control socket ------------------------------------------------------------------

    def attach(self, peer: Peer, device: str) -> tuple[dict[str, Any], list[int]]:
        runner = self._runner(device)
        fds = runner.attach(peer)
        self.record.keep(peer, peer.sock.fileno())  # the connection outlives a restart
        self._save_state()
        names = ["irq", "eoi"]
        backend = runner.config.backend
        if backend.type == "vfio" and backend.share_device_fd and runner.device is not None:
            share = runner.device.fd_for_consumer()
            if share is not None:
                fds.append(share)
                names.append("device")
        return {"device": device, "fds": names, "up": runner.up}, fds

    def detach(self, peer: Peer, device: str) -> None:
        self._runner(device).detach(peer)
        self._save_state()

    def peer_closed(self, peer: Peer) -> None:
        for name in list(peer.attached):
            runner = self.runners.get(name)
            if runner is not None and runner.consumer is peer:
                runner.detach(peer)
        if self.record.drop(peer):
            self._save_state()

    def _save_state(self, with_stats: bool = False) -> None:
        self.record.save(self.runners, with_stats)

    def daemon_status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "version": __version__,
                "uptime_seconds": round(time.monotonic() - self.started, 3),
                "config": str(self.config.path), "last_reload": self.last_reload}

    def device_names(self) -> list[str]:
        return list(self.runners)

    def device_status(self, device: str) -> dict[str, Any]:
        return {**self._runner(device).status(), "opening": self.opener.opening(device)}

    def _runner(self, name: str) -> DeviceRunner:
        runner = self.runners.get(name)
        if runner is None:
            raise UnknownDevice(f"no device named {name!r}")
        return runner

    # --- metrics -------------------------------------------------------------------------

    def device_views(self) -> Iterable[DeviceView]:
        for runner in list(self.runners.values()):
            info = {"pci_address": runner.config.pci_address,
                    "backend": runner.config.backend.type}
            yield DeviceView(runner.name, runner.stats, runner.relaying,
                             runner.consumer is not None,
                             runner.state.name.lower(), info)

    def _status(self) -> str:
        """``STATUS=`` for ``systemctl status``: devices up, and the interrupt rate since
        the previous status line (sent with every watchdog ping)."""
        up = sum(r.up for r in self.runners.values())
        total = sum(r.interrupts for r in self.runners.values())
        now = time.monotonic()
        last_total, last_time = self._rate_mark
        self._rate_mark = (total, now)
        rate = (total - last_total) / (now - last_time) if now > last_time else 0.0
        return f"{up}/{len(self.runners)} devices up, {rate:.0f} interrupts/s{self._status_note}"


def run_daemon(config: Config) -> None:
    """Run the daemon on the event loop the configuration asks for, under systemd or not."""
    from eoid.config import LoopKind
    from eoid.fdstore import adopt

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if config.daemon.loop is LoopKind.UVLOOP:
        import uvloop

        factory = uvloop.new_event_loop
    # A metrics scrape formats on the exporter thread; the loop waits for the GIL meanwhile
    # (5 ms at a time by default): interrupts wait at most this long for it.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    # A switch of datapath allocates objects that outlive a turn of the loop (timers, the
    # sim's futures). Collected every 700 allocations (Python's default), at 1024 sampled
    # devices the collector took a third of the event loop's CPU (bench/RESULTS.md, "Run of
    # 2026-12-03, night"); 50,000 was no cheaper. Cyclic garbage waits a little longer.
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    # Four fds a device and one a consumer: take the whole hard limit (systemd: LimitNOFILE).
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    notifier = Notifier.from_environ(unset=True)
    adopted = adopt()
    with asyncio.Runner(loop_factory=factory) as runner, \
            contextlib.suppress(asyncio.CancelledError):
        runner.run(Daemon(config, notifier, adopted).run())
