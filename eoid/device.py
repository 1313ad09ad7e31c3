"""The seam between the daemon and a device backend (vfio, sim).

A backend hands eoid one level-triggered INTx line with the kernel's VFIO
semantics: once enabled with a trigger eventfd, every assertion signals the
trigger and *auto-masks* the line; ``unmask()`` re-enables it, and if the line
is still asserted at that moment the trigger is signalled again at once.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import select
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


def drain_eventfd(fd: int) -> int:
    """Read and reset an eventfd; 0 if it held nothing. Never waits, whatever the file's
    O_NONBLOCK says: a consumer shares the file of its dup() and may clear the flag
    (preadv2 with RWF_NOWAIT; eventfd reads honour it since Linux 5.12)."""
    buf = bytearray(8)
    try:
        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    except OSError as e:  # an older kernel: poll first (eoid alone reads these counts)
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(0):
            return 0
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            return 0
    return int.from_bytes(buf, sys.byteorder)


class DeviceEvent(enum.Enum):
    """Out-of-band news from a backend, read from one of its ``event_fds``."""

    REQUEST = "request"  # the host wants the device back (unbind, hot-unplug): release it
    ERROR = "error"  # the device reported an error (PCIe AER): stop unmasking it
    GONE = "gone"  # the backend vanished (sim process died, device fd dead)


@dataclass(frozen=True)
class DeviceInfo:
    """What a device reports about itself; exported as ``eoid_device_info`` labels."""

    backend: str
    pci_address: str
    detail: dict[str, str] = field(default_factory=dict)


class IntxDevice(Protocol):
    """One opened INTx line. Every method may raise ``DeviceError``.

    A backend that talks to another process (sim) never waits for it: its requests are
    answered on the event loop, so ``opening`` settles later and a request that fails
    later is reported as a ``GONE`` event. A backend of local kernel calls (vfio) is open
    when constructed and raises from the call that failed."""

    @property
    def info(self) -> DeviceInfo: ...

    def opening(self) -> asyncio.Future[None] | None:
        """What must settle before ``enable``: None if the device is open already, else a
        future that holds None once it is, or raises ``DeviceError``. Asked once."""

    def enable(self, trigger_fd: int) -> None:
        """Register ``trigger_fd`` as the INTx trigger; the line starts unmasked."""

    def route(self, trigger_fd: int, unmask_fd: int | None) -> asyncio.Future[Any] | None:
        """Re-route a live (enabled or adopted) line for a datapath switch: its trigger
        becomes ``trigger_fd`` and ``unmask_fd`` is bound as its unmask eventfd, which the
        backend (the kernel's virqfd, or the sim playing it) reads and unmasks on; None
        unbinds it. The line's masked state is kept and nothing is unmasked. The order
        keeps every fire delivered and every EOI unmasking: with an ``unmask_fd`` it is
        bound first and the trigger swapped second; without one, the trigger is swapped
        first and the unmask eventfd unbound second (docs/intx-eoi.md §14).

        Returns None once the route is in place (vfio: kernel calls), else a future that
        completes when it is (sim: the sim process's reply; a failure is also reported as
        a ``GONE`` event). Until then the old route may still fire and unmask: the caller
        reads the eventfds only after."""

    def kernel_interrupts(self) -> int | None:
        """How many interrupts took the kernel's path (routed to a consumer's eventfds)
        since the device was opened, as its host counts them (vfio: the deltas of the
        line's row in /proc/interrupts while routed; sim: its fires meanwhile); None where
        unknown. eoid sees none of those itself. May lag (sim: as last answered)."""

    def reset(self) -> bool:
        """Reset the device, where the backend can (``VFIO_DEVICE_RESET``): True once
        done, False where it has none (``eoid reset`` then only reopens it)."""

    def unmask(self) -> None:
        """Re-enable the line after an EOI (the hot path: one syscall)."""

    def unmask_op(self) -> tuple[int, int, bytes] | None:
        """``unmask`` as one raw syscall, for the C fast path: ``(fd, request, arg)`` for
        ``ioctl(fd, request, arg)``, or ``(fd, 0, b"")`` for an eventfd write (eoid's own,
        non-blocking, held by no consumer: the fast path writes it unchecked). None when it
        is not one (the fast path then leaves each unmask to ``unmask``)."""

    def mask(self) -> None:
        """Mask the line (used around reconfiguration)."""

    def disable(self) -> None:
        """Unregister the trigger; the line no longer signals anyone."""

    def close(self) -> None:
        """Release every resource of the device. Idempotent."""

    def event_fds(self) -> list[int]:
        """File descriptors to watch for out-of-band device events."""

    def watch(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[int], None]) -> None:
        """Events that do not come on ``event_fds`` (a socket shared by many devices) are
        announced by calling ``on_event(fd)`` from ``loop``; it then calls ``read_event``.
        A backend whose events all come on ``event_fds`` does nothing."""

    def read_event(self, fd: int) -> DeviceEvent | None:
        """Consume readiness on one of ``event_fds``; None if it was nothing."""

    def held_fds(self) -> dict[str, int]:
        """Named fds that keep the device open (for systemd's fd store)."""

    def fd_for_consumer(self) -> int | None:
        """A new fd of the device for its consumer (a VMM that must not open it itself,
        VFIO's ``share_device_fd``), owned by the caller; None if the backend has none."""
