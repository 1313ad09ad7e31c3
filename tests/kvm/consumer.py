"""The KVM guest of ``vmm.py`` as eoid's consumer, attached the way a KVM VMM attaches.

The VMM asks eoid for the device on the control socket, receives the device's ``irq`` and
``eoi`` eventfds and registers them with ``KVM_IRQFD`` and ``KVM_IRQFD_FLAG_RESAMPLE``:
``irq`` raises the guest's GSI, and KVM signals ``eoi`` (the resamplefd) when the interrupt
ends. From then on no VMM code is in the interrupt's path: only the guest's handler's port
write comes back to the VMM, which relays it to the sim device as the device's ack.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eoid.control import ControlClient
from eoid.errors import EoidError
from eoid.wire import recv_msg, send_msg
from tests.kvm.vmm import Vm


class SimDevice:
    """One connection to the sim process, for the guest's acks: it stays open, so an ack
    costs a round trip, not a connect."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self._lock = threading.Lock()

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            send_msg(self.sock, {"op": op, **fields})
            received = recv_msg(self.sock, 1 << 24)
        if received is None or not received[0].get("ok"):
            raise EoidError(f"sim {op} failed: {received}")
        return received[0]

    def close(self) -> None:
        self.sock.close()


class KvmConsumer:
    """A KVM VMM's attachment of ``device`` for ``vm``'s GSI."""

    def __init__(self, control: Path, device: str, vm: Vm) -> None:
        self.vm = vm
        self.client = ControlClient(control)
        try:
            self.hello, _ = self.client.request("hello")
            self.reply, fds = self.client.request("attach", device=device)
        except BaseException:
            self.client.close()
            raise
        self.irq, self.eoi = fds[0], fds[1]
        for fd in fds[2:]:  # a shared VFIO device fd: this VMM has no use for it
            os.close(fd)
        try:
            vm.irqfd(self.irq, resamplefd=self.eoi)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Deassign the irqfd (KVM lowers the GSI and signals nothing), then leave."""
        if self.irq in (fd for fd, _ in self.vm.irqfds):
            self.vm.irqfd_deassign(self.irq)
        os.close(self.irq)
        os.close(self.eoi)
        self.client.close()


class KvmGuest:
    """A running guest attached to eoid for ``devices`` (all on its one GSI, as devices
    sharing a guest interrupt line), its acks relayed to their sim lines.

    The handler does not know which device interrupted, so each run acks every device, as
    a driver of a shared line checks each of its devices. ``serviced`` counts the device
    events the acks serviced (``serviced_by`` per device); ``idle_runs`` the handler runs
    that found nothing to service (an interrupt injected again for an event already
    serviced, see ``resample_at`` in conftest.py)."""

    def __init__(self, control: Path, sim_socket: Path, devices: str | Sequence[str],
                 boot: bool = True) -> None:
        """``boot=False`` attaches before the guest runs (``vm.start()`` boots it later):
        its pin is still masked, as in a VM whose driver has not loaded yet."""
        self.devices = [devices] if isinstance(devices, str) else list(devices)
        self.serviced_by = dict.fromkeys(self.devices, 0)
        self.idle_runs = 0
        self.max_handled = 0  # the most events of one device one ack serviced
        self.consumers: list[KvmConsumer] = []
        self.sim = SimDevice(sim_socket)
        self.vm = Vm(on_ack=self._ack)
        try:
            if boot:
                self.vm.start()  # the pin is programmed before anything can raise the GSI
            for device in self.devices:
                self.consumers.append(KvmConsumer(control, device, self.vm))
        except BaseException:
            self.close()
            raise

    def _ack(self, count: int) -> None:
        handled = [int(self.sim.request("ack", line=device)["handled"])
                   for device in self.devices]
        for device, n in zip(self.devices, handled, strict=True):
            self.serviced_by[device] += n
        self.idle_runs += not any(handled)
        self.max_handled = max(self.max_handled, *handled)

    @property
    def serviced(self) -> int:
        return sum(self.serviced_by.values())

    @property
    def runs(self) -> int:
        """The handler's runs: every one reached the VMM as a port write."""
        return len(self.vm.acks)

    def kill(self) -> None:
        """The VMM dies: its VM goes (KVM releases the irqfds without a resample), then
        its connections to eoid close, as the kernel closes a dead process's files."""
        self.vm.close()
        for consumer in self.consumers:
            os.close(consumer.irq)
            os.close(consumer.eoi)
            consumer.client.close()
        self.consumers.clear()
        self.sim.close()

    def close(self) -> None:
        for consumer in self.consumers:
            consumer.close()
        self.consumers.clear()
        self.vm.close()
        self.sim.close()

    def __enter__(self) -> KvmGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
