"""A simulated PCI device with a level-triggered INTx line, behind vfio-pci's semantics.

The model follows drivers/vfio/pci/vfio_pci_intrs.c for a DisINTx-capable device:
- an assertion while unmasked signals the trigger eventfd once and masks the line
  (auto-mask); further assertions while masked signal nothing;
- an unmask while the device still asserts re-signals the trigger and stays masked;
  otherwise it unmasks; an unmask of an unmasked line is a no-op;
- enabling a trigger while the device asserts fires at once;
- ``route`` plays the kernel's path (docs/intx-eoi.md §12, §14): a trigger swapped on a live
  line keeps its masked state, and an eventfd bound as the unmask (the virqfd) is read by
  the sim, which unmasks on it; a count already there when bound unmasks at once, and one
  there when unbound unmasked before (the kernel acts on the write).
The device side is a status register of pending events: ``raise_`` adds events and
asserts the line (as QEMU's ``edu`` does), ``ack`` (the guest driver servicing the device)
clears them. ``queue`` models a device with one interrupt per event (a command
completion queue): queued events are presented one at a time, the next one as soon as
the previous one was acked.
"""

from __future__ import annotations

import os
import time

from eoid.device import drain_eventfd


class SimLine:
    """One simulated device and its INTx line as vfio-pci would present it."""

    __slots__ = ("acked", "asserted_at", "enabled", "fires", "kernel_fires", "masked", "name",
                 "pending", "queued", "raised", "stuck", "trigger_fd", "unmask_fd", "unmasks",
                 "virqfd", "virqfd_unmasks")

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending = 0  # device events not yet serviced: the line is asserted while > 0
        self.queued = 0  # events waiting to be presented (see ``queue``)
        self.stuck = False  # a broken device whose line stays asserted after service
        self.enabled = False
        self.masked = False
        self.trigger_fd = -1
        self.unmask_fd = -1
        self.asserted_at = 0  # monotonic ns of the assertion now being signalled
        self.raised = 0  # events the device generated
        self.acked = 0  # events the guest serviced
        self.fires = 0  # trigger signals (what eoid should count as interrupts)
        self.unmasks = 0  # unmask signals received
        self.virqfd = -1  # the bound unmask eventfd of the kernel's path (``route``)
        self.kernel_fires = 0  # fires while a virqfd was bound: the kernel's path's share
        self.virqfd_unmasks = 0  # EOIs the virqfd read

    @property
    def asserted(self) -> bool:
        return self.pending > 0 or self.stuck

    def raise_(self, count: int = 1) -> None:
        """Device events that all show in the status register at once (edu-like)."""
        if count > 0:
            self.raised += count
            self._assert(count)

    def queue(self, count: int) -> None:
        """Device events presented one per interrupt."""
        self.raised += count
        self.queued += count
        if not self.pending:
            self._present()

    def ack(self) -> int:
        """The guest services the device: pending events are handled, the line drops
        (and rises again at once if more events are queued)."""
        handled, self.pending = self.pending, 0
        self.acked += handled
        self._present()
        return handled

    def _present(self) -> None:
        if self.queued:
            self.queued -= 1
            self._assert(1)

    def _assert(self, count: int) -> None:
        if not self.asserted:
            self.asserted_at = time.monotonic_ns()
        self.pending += count
        if self.enabled and not self.masked:
            self._fire()

    def on_unmask(self) -> None:
        """The unmask eventfd became readable (eoid's ``ACTION_UNMASK``)."""
        count = drain_eventfd(self.unmask_fd)
        if not count:
            return
        self.unmasks += count
        self.unmask()

    def on_virqfd(self) -> None:
        """The bound unmask eventfd became readable: the consumer's EOI (the kernel's path)."""
        count = drain_eventfd(self.virqfd)
        if count:
            self.virqfd_unmasks += count
            self.unmask()

    def route(self, trigger_fd: int, virqfd: int) -> None:
        """Re-route a live line (``IntxDevice.route``): with a ``virqfd`` (>= 0), bind it
        first, then swap the trigger; without, swap first, then unbind. Takes ownership of
        both fds. The masked state is kept; a count already in the virqfd unmasks."""
        if virqfd >= 0:
            self._unbind()
            self.virqfd = virqfd
            self._swap(trigger_fd)
            self.on_virqfd()
        else:
            # The kernel's virqfd acts when the EOI is written (the eventfd's wake-up runs
            # it), so an EOI written while bound has unmasked before the unbind, whatever
            # the order it is read in here: act on it now, on the route it came on.
            if self.virqfd >= 0:
                self.on_virqfd()
            self._swap(trigger_fd)
            self._unbind()

    def _swap(self, trigger_fd: int) -> None:
        if self.trigger_fd >= 0:
            os.close(self.trigger_fd)
        self.trigger_fd = trigger_fd

    def _unbind(self) -> None:
        if self.virqfd >= 0:
            os.close(self.virqfd)
            self.virqfd = -1

    def unmask(self) -> None:
        if not (self.enabled and self.masked):
            return
        if self.asserted:
            self._fire()  # still asserted: re-signal, stay masked
        else:
            self.masked = False

    def mask(self) -> None:
        self.masked = True

    def enable(self, trigger_fd: int, unmask_fd: int) -> None:
        self.disable()
        self.trigger_fd, self.unmask_fd = trigger_fd, unmask_fd
        self.enabled, self.masked = True, False
        if self.asserted:
            self._fire()

    def disable(self) -> None:
        """Drop the trigger; closes the eventfds the daemon lent us."""
        for fd in (self.trigger_fd, self.unmask_fd, self.virqfd):
            if fd >= 0:
                os.close(fd)
        self.trigger_fd = self.unmask_fd = self.virqfd = -1
        self.enabled = self.masked = False

    def _fire(self) -> None:
        self.masked = True
        self.fires += 1
        self.kernel_fires += self.virqfd >= 0
        os.eventfd_write(self.trigger_fd, 1)

    def counters(self) -> dict[str, int | bool]:
        return {"raised": self.raised, "acked": self.acked, "fires": self.fires,
                "unmasks": self.unmasks, "kernel_fires": self.kernel_fires,
                "virqfd_unmasks": self.virqfd_unmasks, "pending": self.pending,
                "queued": self.queued,
                "asserted": self.asserted, "masked": self.masked, "enabled": self.enabled}
