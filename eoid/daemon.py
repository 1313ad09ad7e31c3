"""The daemon: wires device runners, the control socket, metrics, signals and reloads.

Lifecycle: ``startup`` (bind the control socket, start the exporter, open and arm every
device) → serve until SIGTERM/SIGINT, reloading on SIGHUP → ``shutdown`` (triggers
disabled, consumers told, socket removed). A device that fails to open or goes away is
reported and retried with a backoff; it never takes the daemon or another device down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from eoid import __version__
from eoid.config import Config, DaemonConfig, DeviceConfig, load_config
from eoid.control import ControlServer, Peer
from eoid.device import IntxDevice
from eoid.errors import ConfigError, DeviceError, EoidError, ProtocolError
from eoid.metrics import DaemonMetrics, DeviceView, Exporter, build_registry
from eoid.runner import DeviceRunner

REOPEN_INITIAL = 1.0
REOPEN_MAX = 30.0

Notify = Callable[[str], None]


def open_backend(device: DeviceConfig, daemon: DaemonConfig) -> IntxDevice:
    """Open a device's backend as its YAML file says."""
    backend = device.backend
    if backend.type == "sim":
        from eoid.sim.backend import SimDevice

        return SimDevice(device.name, backend.line or device.name,
                         backend.socket or daemon.sim.socket, device.pci_address)
    from eoid.vfio.device import open_vfio_device

    return open_vfio_device(device.name, device.pci_address,
                            request_irqs=backend.register_request_irqs)


def _needs_reopen(old: DeviceConfig, new: DeviceConfig) -> bool:
    """Backend or address changes need a new device; policy and consumers apply in place."""
    return old.backend != new.backend or old.pci_address != new.pci_address


class Daemon:
    """One eoid process; see the module docstring."""

    def __init__(self, config: Config, notify: Notify | None = None,
                 open_device: Callable[[DeviceConfig, DaemonConfig], IntxDevice] = open_backend,
                 ) -> None:
        self.config = config
        self.notify: Notify = notify or (lambda _state: None)
        self.open_device = open_device
        self.runners: dict[str, DeviceRunner] = {}
        self.metrics = DaemonMetrics()
        self.exporter: Exporter | None = None
        self.control: ControlServer | None = None
        self.started = time.monotonic()
        self._reopen: dict[str, asyncio.TimerHandle] = {}  # down devices' next open attempt
        self._backoff: dict[str, float] = {}
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = structlog.get_logger("eoid")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the daemon is not running"
        return self._loop

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
        self.metrics.loop = self._loop
        self.control = ControlServer(self.config.daemon.control, self, self._loop)
        self.control.listen()
        address = self.config.daemon.metrics.address()
        if address is not None:
            try:
                self.exporter = Exporter(build_registry(self, self.metrics), address)
            except OSError as e:
                self.control.close()
                raise EoidError(f"cannot serve metrics on {self.config.daemon.metrics.listen}: "
                                f"{e.strerror}") from e
        for device in self.config.devices.values():
            self._add(device)
        self.metrics.last_reload_success = time.time()
        for sig, handler in ((signal.SIGTERM, self.stop), (signal.SIGINT, self.stop),
                             (signal.SIGHUP, self.reload)):
            self._loop.add_signal_handler(sig, handler)
        self.notify("READY=1\n" + self._status_line())
        self._log.info("eoid ready", version=__version__, devices=len(self.runners),
                       up=sum(r.up for r in self.runners.values()),
                       control=str(self.config.daemon.control.socket),
                       metrics=self.config.daemon.metrics.listen)

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def shutdown(self) -> None:
        self.notify("STOPPING=1")
        self._log.info("eoid stopping")
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        for handle in self._reopen.values():
            handle.cancel()
        self._reopen.clear()
        if self.control is not None:
            for peer in list(self.control.peers):
                peer.notify({"event": "shutdown"})
        for runner in self.runners.values():
            runner.close()
        self.runners.clear()
        if self.control is not None:
            self.control.close()
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None
        self._log.info("eoid stopped")

    # --- devices -----------------------------------------------------------------------

    def _add(self, device: DeviceConfig) -> None:
        runner = DeviceRunner(device, self.loop, self._device_down)
        self.runners[device.name] = runner
        self._open(runner)

    def _open(self, runner: DeviceRunner) -> bool:
        pending = self._reopen.pop(runner.name, None)
        if pending is not None:
            pending.cancel()
        try:
            runner.start(self.open_device(runner.config, self.config.daemon))
        except EoidError as e:
            runner.down_reason = str(e)
            self._log.warning("device not available", device=runner.name, error=str(e))
            self._schedule_reopen(runner)
            return False
        self._backoff.pop(runner.name, None)
        return True

    def _device_down(self, runner: DeviceRunner, reason: str) -> None:
        self._schedule_reopen(runner)

    def _schedule_reopen(self, runner: DeviceRunner) -> None:
        delay = min(self._backoff.get(runner.name, REOPEN_INITIAL / 2) * 2, REOPEN_MAX)
        self._backoff[runner.name] = delay
        self._reopen[runner.name] = self.loop.call_later(delay, self._retry, runner.name)

    def _retry(self, name: str) -> None:
        self._reopen.pop(name, None)
        runner = self.runners.get(name)
        if runner is not None and not runner.up and self._open(runner):
            self._log.info("device recovered", device=name)

    def _remove(self, name: str) -> None:
        pending = self._reopen.pop(name, None)
        if pending is not None:
            pending.cancel()
        self._backoff.pop(name, None)
        self.runners.pop(name).close()

    # --- reload --------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the configuration and apply it as a diff; a bad one changes nothing."""
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            new = load_config(self.config.path)
        except ConfigError as e:
            self.metrics.reloads["failure"] += 1
            self._log.error("reload rejected; the running configuration stays",
                            problems=e.problems)
            self.notify(f"READY=1\nSTATUS=reload failed: {e.problems[0]}")
            return
        changed = self._apply(new)
        self.metrics.reloads["success"] += 1
        self.metrics.last_reload_success = time.time()
        self._log.info("configuration reloaded", **changed)
        self.notify("READY=1\n" + self._status_line())

    def _apply(self, new: Config) -> dict[str, list[str]]:
        old = self.config
        for key in ("control", "metrics", "loop"):
            if getattr(old.daemon, key) != getattr(new.daemon, key):
                self._log.warning("setting changes on restart only", setting=key)
        self.config = Config(new.path, old.daemon.model_copy(update={
            "log": new.daemon.log, "sim": new.daemon.sim, "devices_dir": new.daemon.devices_dir}),
            new.devices)
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
        for name, runner in self.runners.items():  # a reload is also "try again now"
            if not runner.up and name not in added:
                self._open(runner)
        return {"added": added, "removed": removed, "changed": changed}

    # --- control socket ------------------------------------------------------------------

    def attach(self, peer: Peer, device: str) -> tuple[dict[str, Any], list[int]]:
        runner = self._runner(device)
        fds = runner.attach(peer)
        names = ["irq", "eoi"]
        backend = runner.config.backend
        if backend.type == "vfio" and backend.share_device_fd and runner.device is not None:
            share = getattr(runner.device, "fd_for_consumer", None)
            if share is not None:
                fds.append(share())
                names.append("device")
        return {"device": device, "fds": names, "up": runner.up}, fds

    def detach(self, peer: Peer, device: str) -> None:
        self._runner(device).detach(peer)

    def peer_closed(self, peer: Peer) -> None:
        for name in list(peer.attached):
            runner = self.runners.get(name)
            if runner is not None and runner.consumer is peer:
                runner.detach(peer)

    def status(self) -> dict[str, Any]:
        return {"daemon": {"pid": os.getpid(), "version": __version__,
                           "uptime_seconds": round(time.monotonic() - self.started, 3),
                           "config": str(self.config.path)},
                "devices": [r.status() for r in self.runners.values()]}

    def _runner(self, name: str) -> DeviceRunner:
        runner = self.runners.get(name)
        if runner is None:
            raise ProtocolError("unknown_device", f"no device named {name!r}")
        return runner

    # --- metrics -------------------------------------------------------------------------

    def device_views(self) -> Iterable[DeviceView]:
        for runner in list(self.runners.values()):
            info = {"pci_address": runner.config.pci_address,
                    "backend": runner.config.backend.type}
            yield DeviceView(runner.name, runner.stats, runner.up, runner.consumer is not None,
                             runner.channel.state.name.lower(), info)

    def _status_line(self) -> str:
        up = sum(r.up for r in self.runners.values())
        return f"STATUS={up}/{len(self.runners)} devices up"


def run_daemon(config: Config, notify: Notify | None = None) -> None:
    """Run the daemon on the event loop the configuration asks for."""
    from eoid.config import LoopKind

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if config.daemon.loop is LoopKind.UVLOOP:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner, \
            contextlib.suppress(asyncio.CancelledError):
        runner.run(Daemon(config, notify).run())


__all__ = ["Daemon", "DeviceError", "run_daemon"]
