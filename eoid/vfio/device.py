"""``VfioDevice``: one vfio-pci function's INTx line, as an ``IntxDevice``.

How the kernel side behaves (details: vfio_pci_intrs.c): once INTx is enabled
with a trigger eventfd, every assertion of the level-triggered line makes
vfio-pci's hard-IRQ handler *mask* the line (PCI 2.3 DisINTx, or at the
interrupt controller for devices that cannot mask themselves) and signal the
trigger. The line stays masked until userspace unmasks it; unmasking while the
device still asserts signals the trigger again at once. So eoid forwards the
interrupt, waits for the guest's EOI and only then unmasks (``unmask``, one
ioctl with a prebuilt request).

On the kernel's datapath (``route`` with an unmask eventfd) eoid hands both halves to
the kernel: the consumer's irq eventfd becomes the trigger and its eoi eventfd is bound
as the unmask eventfd, which the kernel's virqfd reads (docs/intx-eoi.md §14). eoid then
sees no interrupt; ``kernel_interrupts`` counts them from the host IRQ's count
(``eoid.vfio.procirq``).

Besides INTx, eoid registers the REQ index (the host wants the device back:
unbind, hot-unplug; the unbind blocks until every fd of the device is closed)
and, for PCIe functions, ERR (an AER error was detected). Both arrive as
``DeviceEvent``s through ``event_fds``/``read_event``.

Opening picks the API: the iommufd character device (``/dev/vfio/devices/vfioN``
+ ``/dev/iommu``) when the kernel offers it, else the group/container API with
the type1v2, type1 or (for ``noiommu-N`` groups) no-IOMMU backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, TypeVar

from eoid.device import DeviceEvent, DeviceInfo
from eoid.errors import VfioError
from eoid.vfio import sysfs, uapi
from eoid.vfio.procirq import IrqCounter
from eoid.vfio.uapi import (
    DeviceFlag,
    GroupFlag,
    IommuType,
    IrqIndex,
    IrqInfoFlag,
    IrqSetFlag,
    RegionIndex,
    RegionInfo,
    VfioApi,
)

T = TypeVar("T")

INTX_FLAGS: Final = IrqInfoFlag.EVENTFD | IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED

_HINTS: Final[dict[tuple[str, int], str]] = {
    ("open container", errno.ENOENT): "no /dev/vfio/vfio: load vfio-pci (modprobe vfio-pci)",
    ("open group", errno.EBUSY):
        "the group is already open in another process (a VMM, or another eoid): a VFIO "
        "group can be open in one process only; let eoid own the device and hand the VMM "
        "its fd (backend.share_device_fd), or stop the other user; a copy of one of its "
        "device fds (a consumer's, with share_device_fd) also keeps the group open",
    ("open group", errno.EACCES): "permission denied: run eoid as root or give it the node",
    ("open group", errno.EPERM): "permission denied (no-IOMMU groups need CAP_SYS_RAWIO)",
    ("set container", errno.EBUSY):
        "a host driver owns DMA for a device of the group: bind every device of the group "
        "to vfio-pci",
    ("set iommu", errno.EPERM):
        "the platform has no interrupt remapping: enable it (intel_iommu=on / amd_iommu=on "
        "with IRQ remapping) or accept the risk with vfio_iommu_type1.allow_unsafe_interrupts=1",
    ("set iommu", errno.ENODEV): "no usable VFIO IOMMU backend: modprobe vfio_iommu_type1",
    ("bind iommufd", errno.EBUSY):
        "the device's group is open through /dev/vfio/<group> in another process",
    ("bind iommufd", errno.EINVAL): "the device is already open in another process",
    ("enable INTx", errno.ENODEV): "the device has no host IRQ routed to it (irq 0)",
    ("enable INTx", errno.EBUSY):
        "the host IRQ line is shared and the device cannot mask itself (no PCI 2.3 DisINTx): "
        "it needs an exclusive line (move it to another slot, or unbind the other devices "
        "on that IRQ)",
    ("enable INTx", errno.EINVAL):
        "INTx cannot be enabled now (MSI/MSI-X active: a VMM drives the device?)",
    ("unmask", errno.EINVAL):
        "INTx is no longer enabled (the VMM switched the device to MSI/MSI-X, or "
        "disabled INTx)",
    ("bind unmask eventfd", errno.EBUSY):
        "another unmask eventfd is bound to the line (a VMM's resamplefd, or another "
        "eoid's): one at a time",
    ("bind unmask eventfd", errno.EINVAL):
        "INTx is no longer enabled (MSI/MSI-X active: the VMM switched the device?), or "
        "the consumer's eoi fd is not an eventfd",
    ("bind unmask eventfd", errno.EBADF): "the consumer's eoi fd is closed",
    ("swap trigger", errno.EINVAL):
        "INTx is no longer enabled (MSI/MSI-X active), or the fd is not an eventfd",
    ("swap trigger", errno.EBADF): "the new trigger fd is closed",
    ("unbind unmask eventfd", errno.EINVAL):
        "INTx is no longer enabled (the VMM switched the device to MSI/MSI-X, or "
        "disabled INTx)",
}


def _hint(op: str, code: int | None) -> str:
    return _HINTS.get((op, code or 0), "ioctl failed")


class VfioDevice:
    """An opened vfio-pci function. Build it with ``open_vfio_device`` or ``adopt``.

    Owns the fds in ``held_fds`` and the ERR/REQ eventfds it creates; the
    trigger eventfd passed to ``enable`` stays the caller's.
    """

    def __init__(self, name: str, pci_address: str, api: VfioApi, fds: Mapping[str, int], *,
                 iommu: str, group: int | None, request_irqs: bool = True,
                 intx_enabled: bool | None = False,
                 sysfs_root: Path = Path("/sys"), irqs: IrqCounter | None = None) -> None:
        """Take ownership of ``fds`` (closed again if setup fails) and check the device.

        ``intx_enabled`` is None for an adopted device whose kernel state is unknown.
        ``irqs`` reads host IRQ counts (one per daemon; a private one if None).
        """
        self.name = name
        self.pci_address = pci_address
        self._api = api
        self._fds = dict(fds)
        self._fd = self._fds["device"]
        self._iommu = iommu
        self._group = group
        self._sysfs_root = sysfs_root
        self._intx_enabled = intx_enabled
        self._intx_masking = "unknown"
        self._events: dict[int, DeviceEvent] = {}
        self._regions: dict[int, RegionInfo] = {}
        self._closed = False
        self.device_flags = DeviceFlag(0)
        self.num_irqs = 0
        self.err_supported = False
        # the kernel's path (``route``, ``kernel_interrupts``): whether an unmask eventfd
        # is bound, the host IRQ's count when the current kernel window opened (None:
        # unreadable), the windows closed so far, and the last answer (never lower)
        self._irqs = irqs or IrqCounter(sysfs_root=sysfs_root)
        self._host_irq: int | None = None
        self._unmask_bound = False
        self._in_window = False
        self._window_base: int | None = None
        self._kernel_closed = 0
        self._kernel_known = True
        self._kernel_last = 0
        self._kernel_lock = threading.Lock()
        self._unmask_call: Callable[[], object] = api.prepare_set_irqs(self._fd,
                                                                        uapi.UNMASK_INTX)
        try:
            self._setup(request_irqs)
        except BaseException:
            self.close()
            raise

    # --- setup ----------------------------------------------------------------------

    def _call(self, op: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except OSError as exc:
            raise _failed(self.name, op, self.pci_address, exc) from exc

    def _setup(self, request_irqs: bool) -> None:
        api, fd = self._api, self._fd
        info = self._call("get device info", lambda: api.device_get_info(fd))
        if not info.flags & DeviceFlag.PCI:
            raise VfioError(self.name, "get device info", f"{self.pci_address} is not a PCI device")
        self.device_flags = info.flags
        self.num_irqs = info.num_irqs
        if info.num_irqs <= IrqIndex.INTX:
            raise VfioError(self.name, "get irq info", f"{self.pci_address} reports no IRQs")
        intx = self._call("get irq info", lambda: api.device_get_irq_info(fd, IrqIndex.INTX))
        if intx.count != 1:
            raise VfioError(self.name, "get irq info",
                            f"{self.pci_address}: {self._why_no_intx()}")
        if intx.flags & INTX_FLAGS != INTX_FLAGS:
            raise VfioError(self.name, "get irq info",
                            f"{self.pci_address}: INTx flags {uapi.flag_names(intx.flags)} "
                            f"lack {uapi.flag_names(INTX_FLAGS & ~intx.flags)}: eoid cannot "
                            "relay it")
        if request_irqs:
            self._register_event(IrqIndex.REQ, DeviceEvent.REQUEST)
            self.err_supported = self._register_event(IrqIndex.ERR, DeviceEvent.ERROR)

    def _why_no_intx(self) -> str:
        try:
            fn = sysfs.read_pci_function(self.pci_address, self._sysfs_root)
        except VfioError:
            return "INTx count 0"
        if fn.interrupt_pin == 0:
            return "the device has no interrupt pin (it only does MSI/MSI-X): no INTx to relay"
        if fn.is_virtfn:
            return "SR-IOV virtual functions have no INTx"
        return ("INTx hidden by a quirk (count 0): vfio-pci hides INTx of devices whose "
                "DisINTx masking is broken (e.g. Intel X710/XL710/X550), and of all devices "
                "on kernels without CONFIG_VFIO_PCI_INTX")

    def _register_event(self, index: IrqIndex, event: DeviceEvent) -> bool:
        """Register a fresh eventfd as ``index``'s trigger; False if the device has none."""
        if self.num_irqs <= index:
            return False
        try:
            info = self._api.device_get_irq_info(self._fd, index)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # ERR on conventional PCI
                return False
            raise VfioError(self.name, "get irq info", f"{self.pci_address}: {index.name}",
                            exc.errno) from exc
        if info.count < 1 or not info.flags & IrqInfoFlag.EVENTFD:
            return False
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            self._call(f"register {index.name}", lambda: self._api.device_set_irqs(
                self._fd, uapi.irq_set_eventfds(index, IrqSetFlag.ACTION_TRIGGER, [efd])))
        except VfioError:
            os.close(efd)
            raise
        self._events[efd] = event
        return True

    # --- IntxDevice -------------------------------------------------------------------

    @property
    def info(self) -> DeviceInfo:
        detail = {
            "api": "iommufd" if "iommufd" in self._fds else "group",
            "iommu": self._iommu,
            "intx_masking": self._intx_masking,
            "reset": "yes" if self.supports_reset else "no",
            "err_irq": "yes" if self.err_supported else "no",
        }
        if self._group is not None:
            detail["iommu_group"] = str(self._group)
        return DeviceInfo(backend="vfio", pci_address=self.pci_address, detail=detail)

    @property
    def supports_reset(self) -> bool:
        return bool(self.device_flags & DeviceFlag.RESET)

    @property
    def intx_masking(self) -> str:
        """How vfio-pci masks this line: ``disintx`` (PCI 2.3, the device masks itself,
        shareable host IRQ), ``irqchip`` (at the interrupt controller, needs an exclusive
        host IRQ) or ``unknown`` (INTx not enabled yet, or sysfs unreadable)."""
        return self._intx_masking

    def enable(self, trigger_fd: int) -> None:
        """Register ``trigger_fd`` and arm the line (mask → route → unmask: docs/intx-eoi.md §3).

        The final unmask picks up an assertion that happened while the line was
        masked or unrouted: if the device is asserting, the trigger fires at once.
        """
        api, fd = self._api, self._fd
        request = uapi.irq_set_eventfds(IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [trigger_fd])
        if self._intx_enabled is not False:  # swap the trigger on a live (or adopted) line
            self._mask_if_enabled()
        self._call("enable INTx", lambda: api.device_set_irqs(fd, request))
        self._intx_enabled = True
        self._call("mask", lambda: api.device_set_irqs(fd, uapi.MASK_INTX))
        self._detect_masking()
        self.unmask()

    def _mask_if_enabled(self) -> None:
        try:
            self._api.device_set_irqs(self._fd, uapi.MASK_INTX)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: INTx is not enabled
                raise VfioError(self.name, "mask", self.pci_address, exc.errno) from exc
            self._intx_enabled = False

    def _detect_masking(self) -> None:
        """With the line masked, the hardware's DisINTx bit tells how vfio-pci masks it."""
        command = sysfs.physical_command(self.pci_address, self._sysfs_root)
        if command is not None:
            self._intx_masking = ("disintx" if command & uapi.PCI_COMMAND_INTX_DISABLE
                                  else "irqchip")

    def unmask(self) -> None:
        """Re-arm the line after an EOI: one ``SET_IRQS(INTX, UNMASK)`` ioctl."""
        try:
            self._unmask_call()
        except OSError as exc:
            raise _failed(self.name, "unmask", self.pci_address, exc) from exc

    def unmask_op(self) -> tuple[int, int, bytes] | None:
        return None if self._closed else self._api.raw_set_irqs(self._fd, uapi.UNMASK_INTX)

    def mask(self) -> None:
        self._call("mask", lambda: self._api.device_set_irqs(self._fd, uapi.MASK_INTX))

    def route(self, trigger_fd: int, unmask_fd: int | None) -> None:
        """Re-route the live line for a datapath switch (``IntxDevice.route``,
        docs/intx-eoi.md §14). With ``unmask_fd``: bind it as the unmask eventfd, then make
        ``trigger_fd`` the trigger; without: trigger first, then unbind. Neither request
        masks or unmasks; a trigger swap keeps the kernel's masked state. If the swap fails
        after a bind, the bind is undone (the caller reopens the device anyway)."""
        if self._closed:
            raise VfioError(self.name, "route", f"{self.pci_address}: device closed")
        if self._intx_enabled is False:
            raise VfioError(self.name, "route", f"{self.pci_address}: INTx is not enabled")
        api, fd = self._api, self._fd
        if unmask_fd is None:
            self._close_window()
            self._call("swap trigger",
                       lambda: api.device_set_irqs(fd, uapi.intx_trigger(trigger_fd)))
            self._intx_enabled = True
            self._call("unbind unmask eventfd",
                       lambda: api.device_set_irqs(fd, uapi.UNBIND_INTX_UNMASK))
            self._unmask_bound = False
            return
        if self._unmask_bound:  # kernel → kernel: one unmask eventfd at a time
            self._call("unbind unmask eventfd",
                       lambda: api.device_set_irqs(fd, uapi.UNBIND_INTX_UNMASK))
            self._unmask_bound = False
        self._call("bind unmask eventfd",
                   lambda: api.device_set_irqs(fd, uapi.intx_unmask_eventfd(unmask_fd)))
        try:
            self._call("swap trigger",
                       lambda: api.device_set_irqs(fd, uapi.intx_trigger(trigger_fd)))
        except VfioError:
            with contextlib.suppress(OSError):
                api.device_set_irqs(fd, uapi.UNBIND_INTX_UNMASK)
            raise
        self._intx_enabled = True
        self._unmask_bound = True
        self._open_window()

    def _host_count(self) -> int | None:
        """The host IRQ's count now, not cached: a window's edges must be exact."""
        if self._host_irq is None:
            # read once the line is enabled: before, sysfs may show a provisional IRQ
            self._host_irq = sysfs.read_host_irq(self.pci_address, self._sysfs_root)
        return None if self._host_irq is None else self._irqs.count(self._host_irq, 0)

    def _open_window(self) -> None:
        """Start counting once the trigger is the consumer's: an interrupt the host took
        before that went to eoid's trigger, and eoid counts it."""
        with self._kernel_lock:
            if self._in_window:
                return  # kernel → kernel: the same window goes on
            self._in_window = True
            self._window_base = self._host_count()

    def _close_window(self) -> None:
        """Stop counting while the trigger is still the consumer's (see ``_open_window``):
        an interrupt that races a switch is counted by neither side rather than by both."""
        with self._kernel_lock:
            if not self._in_window:
                return
            self._in_window = False
            base, self._window_base = self._window_base, None
            now = self._host_count()
            if base is None or now is None:
                self._kernel_known = False
            elif now > base:
                self._kernel_closed += now - base

    def kernel_interrupts(self) -> int | None:
        """Interrupts the host took on the line while it was on the kernel's path, since
        the device was opened: the growth of the host IRQ's count over each kernel window
        (``eoid.vfio.procirq``; the open window's may be ``IrqCounter.max_age`` old).
        None once a window's count could not be read. On a shared host IRQ (DisINTx
        devices) it includes the other devices' interrupts during the windows. Never
        lower than an earlier answer."""
        with self._kernel_lock:
            if not self._kernel_known:
                return None
            total = self._kernel_closed
            if self._in_window:
                base, irq = self._window_base, self._host_irq
                now = None if base is None or irq is None else self._irqs.count(irq)
                if base is None or now is None:
                    return None
                total += max(0, now - base)
            self._kernel_last = max(self._kernel_last, total)
            return self._kernel_last

    def loopback(self) -> None:
        """Make the kernel signal the trigger as if the device fired (self-test)."""
        self._call("loopback", lambda: self._api.device_set_irqs(self._fd, uapi.LOOPBACK_INTX))

    def disable(self) -> None:
        """Unregister the trigger and free the host IRQ: ``count = 0``, not fd -1
        (docs/intx-eoi.md §4)."""
        if self._intx_enabled is False:
            return
        try:
            self._api.device_set_irqs(self._fd, uapi.DISABLE_INTX)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: disabled under us (docs/intx-eoi.md §5)
                raise VfioError(self.name, "disable INTx", self.pci_address, exc.errno) from exc
        self._close_window()  # disabling unbinds the unmask eventfd too (§4, §14)
        self._unmask_bound = False
        self._intx_enabled = False

    def close(self) -> None:
        """Disable INTx, unregister ERR/REQ, close every fd. Idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        self._unmask_call = self._closed_call
        with contextlib.suppress(VfioError, OSError):
            self.disable()
        for efd in self._events:
            with contextlib.suppress(OSError):
                index = IrqIndex.REQ if self._events[efd] is DeviceEvent.REQUEST else IrqIndex.ERR
                self._api.device_set_irqs(self._fd, uapi.disable_irq(index))
        for efd in self._events:
            with contextlib.suppress(OSError):
                os.close(efd)
        self._events.clear()
        # the device before its group, the group before its container
        for key in ("device", "group", "container", "iommufd"):
            fd = self._fds.pop(key, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    self._api.close(fd)

    def _closed_call(self) -> object:
        raise OSError(errno.EBADF, "device closed")

    @property
    def closed(self) -> bool:
        return self._closed

    def event_fds(self) -> list[int]:
        return list(self._events)

    def read_event(self, fd: int) -> DeviceEvent | None:
        event = self._events.get(fd)
        if event is None:
            return None
        try:
            os.eventfd_read(fd)
        except BlockingIOError:  # readiness already consumed
            return None
        return event

    def held_fds(self) -> dict[str, int]:
        return dict(self._fds)

    def opening(self) -> None:
        return None  # local kernel calls: open when constructed

    def watch(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[int], None]) -> None:
        pass  # every event comes on ``event_fds``

    # --- extras -------------------------------------------------------------------

    def fd_for_consumer(self) -> int:
        """A dup of the device fd for the VMM (its group can be open in one process only).

        The caller owns it; the device stays open in the kernel while it lives.
        """
        return self._call("dup device fd", lambda: self._api.dup(self._fd))

    def reset(self) -> bool:
        """``VFIO_DEVICE_RESET``, then an unmask: the line starts over armed
        (docs/intx-eoi.md §10). False where the device has none (VFIO_DEVICE_FLAGS_RESET
        unset)."""
        if not self.supports_reset:
            return False
        self._call("reset", lambda: self._api.device_reset(self._fd))
        if self._intx_enabled:
            self.unmask()
        return True

    def region(self, index: int) -> RegionInfo:
        region = self._regions.get(index)
        if region is None:
            region = self._call("get region info",
                                lambda: self._api.device_get_region_info(self._fd, index))
            self._regions[index] = region
        return region

    def read_region(self, index: int, offset: int, size: int) -> bytes:
        base = self.region(index).offset
        return self._call("read region", lambda: self._api.pread(self._fd, size, base + offset))

    def write_region(self, index: int, offset: int, data: bytes) -> None:
        base = self.region(index).offset
        self._call("write region", lambda: self._api.pwrite(self._fd, data, base + offset))

    def read_config(self, offset: int, size: int) -> int:
        """vfio-pci's virtual config space (what a guest would see)."""
        return int.from_bytes(self.read_region(RegionIndex.CONFIG, offset, size), "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.write_region(RegionIndex.CONFIG, offset, value.to_bytes(size, "little"))

    def intx_disabled_by_guest(self) -> bool:
        """The virtual DisINTx bit: while set, vfio-pci neither signals nor unmasks
        (docs/intx-eoi.md §6)."""
        return bool(self.read_config(uapi.PCI_COMMAND, 2) & uapi.PCI_COMMAND_INTX_DISABLE)

    # --- re-adoption ------------------------------------------------------------------

    @classmethod
    def adopt(cls, name: str, pci_address: str, fds: Mapping[str, int], *,
              api: VfioApi | None = None, request_irqs: bool = True,
              sysfs_root: Path = Path("/sys"), irqs: IrqCounter | None = None) -> VfioDevice:
        """Rebuild a device from the fds of ``held_fds`` (systemd's fd store, docs/intx-eoi.md §9).

        The kernel kept the device open, so INTx may still be enabled with the old
        trigger (adopt that trigger too and leave it), or ``enable`` swaps it under
        a mask and ends with an unmask. ERR/REQ get fresh eventfds. On failure the
        fds are closed: kept open they would hold the group and block a fresh open.
        """
        api = api or uapi.KernelVfio()
        if "device" not in fds:
            for fd in fds.values():
                with contextlib.suppress(OSError):
                    api.close(fd)
            raise VfioError(name, "adopt", f"{pci_address}: no device fd among {sorted(fds)}")
        group = None
        with contextlib.suppress(VfioError):
            group = sysfs.read_pci_function(pci_address, sysfs_root).iommu_group
        return cls(name, pci_address, api, fds, iommu="adopted",
                   group=group, request_irqs=request_irqs, intx_enabled=None,
                   sysfs_root=sysfs_root, irqs=irqs)


def open_vfio_device(name: str, pci_address: str, *, sysfs_root: Path = Path("/sys"),
                     dev_root: Path = Path("/dev"), api: VfioApi | None = None,
                     request_irqs: bool = True, irqs: IrqCounter | None = None) -> VfioDevice:
    """Open ``pci_address`` for INTx relay; every failure is a ``VfioError`` saying what to do.
    ``irqs``: the daemon's reader of host IRQ counts (``kernel_interrupts``)."""
    api = api or uapi.KernelVfio()
    try:
        address = sysfs.parse_pci_address(pci_address)
    except ValueError as exc:
        raise VfioError(name, "open", str(exc)) from exc
    if not sysfs.pci_device_dir(address, sysfs_root).exists():
        raise VfioError(name, "find device", sysfs.not_found(address))
    fn = sysfs.read_pci_function(address, sysfs_root)
    problem = sysfs.driver_problem(fn, sysfs_root)
    if problem:
        raise VfioError(name, "check driver", problem)
    group = fn.iommu_group
    problem = sysfs.group_problem(fn)
    if problem or group is None:  # group_problem explains a missing group too
        raise VfioError(name, "check group", problem or f"{address} has no IOMMU group")
    cdev = dev_root / "vfio" / "devices" / fn.vfio_cdev if fn.vfio_cdev else None
    if cdev is not None and cdev.exists() and (dev_root / "iommu").exists():
        return _open_cdev(name, address, group, cdev, dev_root=dev_root, api=api,
                          request_irqs=request_irqs, sysfs_root=sysfs_root, irqs=irqs)
    return _open_group(name, address, group, dev_root, api,
                       request_irqs=request_irqs, sysfs_root=sysfs_root, irqs=irqs)


def _failed(name: str, op: str, address: str, exc: OSError) -> VfioError:
    return VfioError(name, op, f"{address}: {_hint(op, exc.errno)}", exc.errno)


def _open_group(name: str, address: str, group: int, dev_root: Path, api: VfioApi, *,
                request_irqs: bool, sysfs_root: Path, irqs: IrqCounter | None) -> VfioDevice:
    node = sysfs.group_dev_node(group, dev_root)
    if node is None:
        raise VfioError(name, "open group",
                        f"{address}: no {dev_root}/vfio/{group} (nor noiommu-{group}): is "
                        "vfio-pci loaded and the device bound to it?")
    noiommu = node.name.startswith("noiommu-")
    fds: dict[str, int] = {}
    with contextlib.ExitStack() as undo:
        def opened(key: str, fd: int) -> int:
            fds[key] = fd
            undo.callback(api.close, fd)
            return fd

        op = "open container"
        try:
            container = opened("container", api.open(dev_root / "vfio" / "vfio"))
            op = "get api version"
            version = api.get_api_version(container)
            if version != uapi.VFIO_API_VERSION:
                raise VfioError(name, op, f"unknown VFIO API version {version}")
            op = "open group"
            group_fd = opened("group", api.open(node))
            op = "get group status"
            if not api.group_get_status(group_fd) & GroupFlag.VIABLE:
                raise VfioError(name, op, f"{address}: group {group} is not viable: a device "
                                "in it is bound to a host driver (see "
                                f"{sysfs_root}/kernel/iommu_groups/{group}/devices)")
            op = "set container"
            api.group_set_container(group_fd, container)
            op = "set iommu"
            iommu = _pick_iommu(name, address, api, container, noiommu)
            api.set_iommu(container, iommu)
            op = "get device fd"
            opened("device", api.group_get_device_fd(group_fd, address))
        except OSError as exc:
            raise _failed(name, op, address, exc) from exc
        undo.pop_all()  # the device owns the fds now, and closes them if it fails
    return VfioDevice(name, address, api, fds, iommu=iommu.name.lower(), group=group,
                      request_irqs=request_irqs, sysfs_root=sysfs_root, irqs=irqs)


def _pick_iommu(name: str, address: str, api: VfioApi, container: int,
                noiommu: bool) -> IommuType:
    """type1v2 (unmap semantics fixed), else type1; noiommu groups only take NOIOMMU."""
    choices = [IommuType.NOIOMMU] if noiommu else [IommuType.TYPE1V2, IommuType.TYPE1]
    for iommu in choices:
        if api.check_extension(container, iommu):
            return iommu
    raise VfioError(name, "set iommu",
                    f"{address}: the kernel offers none of {', '.join(c.name for c in choices)}"
                    + (" (no-IOMMU mode off: vfio enable_unsafe_noiommu_mode=1)" if noiommu
                       else ": modprobe vfio_iommu_type1"))


def _open_cdev(name: str, address: str, group: int, cdev: Path, *, dev_root: Path,
               api: VfioApi, request_irqs: bool, sysfs_root: Path,
               irqs: IrqCounter | None) -> VfioDevice:
    fds: dict[str, int] = {}
    with contextlib.ExitStack() as undo:
        op = "open device"
        try:
            fds["device"] = api.open(cdev)
            undo.callback(api.close, fds["device"])
            op = "open iommufd"
            fds["iommufd"] = api.open(dev_root / "iommu")
            undo.callback(api.close, fds["iommufd"])
            op = "bind iommufd"
            api.device_bind_iommufd(fds["device"], fds["iommufd"])
            # An empty I/O address space: the same DMA isolation as an empty type1
            # container. eoid never maps memory; a VMM sharing the fd attaches its own.
            op = "attach ioas"
            api.device_attach_iommufd_pt(fds["device"], api.ioas_alloc(fds["iommufd"]))
        except OSError as exc:
            raise _failed(name, op, address, exc) from exc
        undo.pop_all()  # the device owns the fds now, and closes them if it fails
    return VfioDevice(name, address, api, fds, iommu="iommufd", group=group,
                      request_irqs=request_irqs, sysfs_root=sysfs_root, irqs=irqs)
