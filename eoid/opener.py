"""Opening devices: each device's backend opened as its file says, and opened again with
a backoff after it could not be or went down. The daemon says when; this owns how, so
that no device waits on another and none is given up on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from eoid.config import DaemonConfig, DeviceConfig
from eoid.device import IntxDevice
from eoid.errors import EoidError
from eoid.runner import DeviceRunner
from eoid.sim.backend import SimConnections, SimDevice
from eoid.vfio.procirq import IrqCounter

REOPEN_INITIAL = 1.0  # seconds before the first retry, doubled each time up to REOPEN_MAX
REOPEN_MAX = 30.0

_LOG = structlog.get_logger("eoid")


def open_backend(device: DeviceConfig, daemon: DaemonConfig, sims: SimConnections,
                 adopt: dict[str, int] | None = None, *,
                 irqs: IrqCounter | None = None) -> IntxDevice:
    """Open a device's backend as its YAML file says, or rebuild it from the fds a
    previous eoid parked in the fd store (``adopt``). ``irqs``: the daemon's one reader
    of host IRQ counts, shared by its VFIO devices."""
    backend = device.backend
    if backend.type == "sim":
        return SimDevice(device.name, backend.line or device.name,
                         backend.socket or daemon.sim.socket, device.pci_address,
                         connections=sims, adopt=adopt)
    from eoid.vfio.device import VfioDevice, open_vfio_device

    if adopt is not None:
        return VfioDevice.adopt(device.name, device.pci_address, adopt,
                                request_irqs=backend.register_request_irqs, irqs=irqs)
    return open_vfio_device(device.name, device.pci_address,
                            request_irqs=backend.register_request_irqs, irqs=irqs)


class Opener:
    """Opens devices for their runners. ``open_device`` opens a runner's backend;
    ``started`` is told of each device a runner started on (its fds go to the fd store)."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 open_device: Callable[[DeviceConfig], IntxDevice],
                 started: Callable[[DeviceRunner, IntxDevice], None]) -> None:
        self._loop = loop
        self._open_device = open_device
        self._started = started
        self._retries: dict[str, asyncio.TimerHandle] = {}  # down devices' next attempt
        # devices whose backend has yet to confirm the open (a sim process's answer)
        self._opening: dict[str, tuple[asyncio.Future[None], IntxDevice]] = {}
        self._backoff: dict[str, float] = {}

    def open(self, runner: DeviceRunner, retry: bool = False) -> None:
        """Open the device's backend and start the runner on it. A backend that waits for
        another process (sim) starts when that answer arrives: the loop serves everyone
        else meanwhile."""
        pending = self._retries.pop(runner.name, None)
        if pending is not None:
            pending.cancel()
        if runner.name in self._opening:
            return  # an attempt is on its way
        try:
            device = self._open_device(runner.config)
        except EoidError as e:
            self._not_available(runner, str(e))
            return
        opening = device.opening()
        if opening is None:
            self._start(runner, device, retry)
            return
        self._opening[runner.name] = (opening, device)
        opening.add_done_callback(lambda _: self._opened(runner, device, opening, retry))

    def opening(self, name: str) -> bool:
        """An open of the device is waiting for its backend's answer."""
        return name in self._opening

    def answers(self) -> list[asyncio.Future[None]]:
        """The opens still waiting for an answer (start-up waits for them, a while)."""
        return [opening for opening, _ in self._opening.values()]

    def down(self, runner: DeviceRunner) -> None:
        """The runner's device went down: try again after the device's backoff."""
        delay = min(self._backoff.get(runner.name, REOPEN_INITIAL / 2) * 2, REOPEN_MAX)
        self._backoff[runner.name] = delay
        self._retries[runner.name] = self._loop.call_later(delay, self._retry, runner)

    def forget(self, name: str) -> None:
        """The device is removed: no retry, no open in flight, a fresh backoff."""
        pending = self._retries.pop(name, None)
        if pending is not None:
            pending.cancel()
        opening = self._opening.pop(name, None)
        if opening is not None:
            opening[0].cancel()
            opening[1].close()  # now: the line may be opened again at once (a reload)
        self._backoff.pop(name, None)

    def close(self) -> None:
        for name in {*self._retries, *self._opening}:
            self.forget(name)

    def _opened(self, runner: DeviceRunner, device: IntxDevice, opening: asyncio.Future[None],
                retry: bool) -> None:
        current = self._opening.get(runner.name)
        if current is None or current[0] is not opening or opening.cancelled():
            device.close()  # removed, replaced or shut down meanwhile
            return
        del self._opening[runner.name]
        error = opening.exception()
        if error is not None:
            device.close()
            self._not_available(runner, str(error))
            return
        self._start(runner, device, retry)

    def _start(self, runner: DeviceRunner, device: IntxDevice, retry: bool) -> None:
        try:
            runner.start(device)
        except EoidError as e:  # the runner has closed the device
            self._not_available(runner, str(e))
            return
        self._backoff.pop(runner.name, None)
        self._started(runner, device)
        if retry:
            _LOG.info("device recovered", device=runner.name)

    def _not_available(self, runner: DeviceRunner, reason: str) -> None:
        runner.down_reason = reason
        _LOG.warning("device not available", device=runner.name, error=reason)
        self.down(runner)

    def _retry(self, runner: DeviceRunner) -> None:
        self._retries.pop(runner.name, None)
        if not runner.up:
            self.open(runner, retry=True)
