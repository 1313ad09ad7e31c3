"""A test twin of the kernel's VFIO: ``FakeVfio`` implements ``VfioApi`` in memory.

It models what eoid relies on, with the kernel's errnos (drivers/vfio/group.c,
container.c, device_cdev.c, pci/vfio_pci_core.c, pci/vfio_pci_intrs.c):

- groups and containers: one open file per group (``EBUSY``), viability (no device
  of the group claimed by a host driver), ``SET_CONTAINER`` → ``SET_IOMMU``
  (type1v2, type1, noiommu; ``EPERM`` without interrupt remapping) →
  ``GET_DEVICE_FD``;
- the iommufd cdev path: ``BIND_IOMMUFD`` (exclusive: ``EINVAL`` if the device is
  open elsewhere, ``EBUSY`` while its group is open), ``IOAS_ALLOC``,
  ``ATTACH_IOMMUFD_PT``; device ioctls before bind fail ``EINVAL``;
- INTx: enable/disable, auto-mask on assertion, unmask that re-fires while the
  line is still asserted, mask, loopback, guest DisINTx (``virq_disabled``), a
  trigger replaced on a live line (masked state kept), the unmask eventfd (virqfd,
  ``virqfd_poll``), the host's count of the IRQ (``host_irqs``),
  the VMM switching to MSI (unmask then fails ``EINVAL``), and ``EBUSY`` when a
  device without DisINTx needs a host IRQ someone else holds (or vice versa);
- ERR (PCIe only) and REQ triggers; a host unbind request signals REQ and
  completes when the last file of the device is closed;
- reset; config space and an ``edu``-like BAR0 (0x60 raises, 0x64 acks) so the
  same scenarios run here and against QEMU's edu device in the VM tests.

Triggers are real eventfds: the twin holds its own ``dup`` of each, as the kernel
holds a reference to the eventfd context, and signals it with ``eventfd_write``.
``FakeVfio.write_tree`` writes matching sysfs, /proc and /dev fixture trees, so
``open_vfio_device`` finds the same world through its filesystem roots.
"""

from __future__ import annotations

import errno
import os
import select
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from eoid.vfio import uapi
from eoid.vfio.uapi import (
    DeviceFlag,
    GroupFlag,
    IommuType,
    IrqIndex,
    IrqInfo,
    IrqInfoFlag,
    IrqSetFlag,
    RegionFlag,
    RegionIndex,
    RegionInfo,
    VfioDeviceInfo,
)

VFIO_DRIVERS = frozenset({"vfio-pci"})
# Drivers that do not claim DMA ownership, so they leave a group viable.
VIABLE_DRIVERS = frozenset({"vfio-pci", "pci-stub"})

EDU_ID = 0x00
EDU_LIVENESS = 0x04
EDU_IRQ_STATUS = 0x24
EDU_IRQ_RAISE = 0x60
EDU_IRQ_ACK = 0x64
_FIRST_FD = 10_000


def _oserror(code: int, what: str = "") -> OSError:
    return OSError(code, os.strerror(code) + (f": {what}" if what else ""))


@dataclass
class FakeFunction:
    """One PCI function on the fake host: its hardware and vfio-pci's state for it."""

    address: str
    group: int
    driver: str | None = "vfio-pci"
    vendor: int = 0x1234
    device_id: int = 0x11E8
    class_code: int = 0x00FF00
    interrupt_pin: int = 1
    irq: int = 10
    pcie: bool = False
    pci_2_3: bool = True  # can mask itself with PCI_COMMAND.INTX_DISABLE
    nointx: bool = False  # on vfio-pci's broken-masking list: INTx hidden
    is_vf: bool = False
    reset_works: bool = False
    msi_irqs: int = 0  # > 0: uses MSI/MSI-X (sysfs msi_irqs/)
    cdev: int | None = None  # N of /dev/vfio/devices/vfioN when the host has iommufd
    enabled: bool = True  # sysfs "enable": the kernel has routed its IRQ

    # physical state
    level: bool = False
    edu_status: int = 0
    command: int = 0x0103
    # vfio-pci state
    irq_type: str = "none"  # none | intx | msi
    masked: bool = False
    virq_disabled: bool = False
    trigger: int | None = None  # the twin's own dup of the trigger eventfd
    err_trigger: int | None = None
    req_trigger: int | None = None
    unmask_virqfd: int | None = None  # the twin's dup of the bound unmask eventfd
    virqfd_left: int = 0  # a count found at bind: acted on, left in the eventfd (virqfd.c)
    virqfd_unmasks: int = 0  # unmasks the virqfd ran
    host_irqs: int = 0  # hard interrupts the host took on the line (/proc/interrupts)
    on_irq: Callable[[FakeFunction], None] | None = field(default=None, repr=False,
                                                          compare=False)
    open_count: int = 0  # files with access to the device (vfio_df_open)
    cdev_bound: bool = False
    unbind_pending: bool = False
    requests_sent: int = 0
    resets: int = 0
    signals: int = 0  # trigger signals sent, for assertions

    # --- the hardware -------------------------------------------------------------

    def assert_line(self) -> None:
        """The device raises INTx: vfio's hard-IRQ handler auto-masks and signals."""
        self.virqfd_poll()
        self.level = True
        self._irq_handler()

    def deassert_line(self) -> None:
        self.virqfd_poll()
        self.level = False

    def _irq_handler(self) -> None:
        if self.irq_type == "intx" and self.level and not self.masked:
            self._host_irq()
            self.masked = True
            self._signal_intx()

    def _host_irq(self) -> None:
        self.host_irqs += 1
        if self.on_irq is not None:
            self.on_irq(self)

    def virqfd_poll(self) -> None:
        """Run the unmask virqfd if its eventfd was signalled (docs/intx-eoi.md §12).

        The kernel unmasks inside the signaller's ``write``, consuming the count; the twin
        does it when next asked: every hardware event and ioctl on the function starts
        here, so nothing can observe the line between the EOI and its unmask."""
        fd = self.unmask_virqfd
        if fd is None:
            return
        try:
            count = os.eventfd_read(fd)
        except BlockingIOError:
            return
        if count <= self.virqfd_left:  # only the count found at bind: no new signal
            os.eventfd_write(fd, count)
            return
        self.virqfd_left = 0
        self.virqfd_unmasks += 1
        self.intx_unmask()

    def virqfd_bind(self, fd: int) -> None:
        """``vfio_virqfd_enable``: a count already there unmasks at once but stays in the
        eventfd (only a wake-up consumes it)."""
        self.unmask_virqfd = fd
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(0):
            self.virqfd_left = os.eventfd_read(fd)
            os.eventfd_write(fd, self.virqfd_left)
            self.virqfd_unmasks += 1
            self.intx_unmask()

    def virqfd_unbind(self) -> None:
        self._drop(self.unmask_virqfd)
        self.unmask_virqfd = None
        self.virqfd_left = 0

    def _signal_intx(self) -> None:
        if not self.virq_disabled and self.trigger is not None:
            os.eventfd_write(self.trigger, 1)
            self.signals += 1

    # --- vfio-pci INTx ------------------------------------------------------------

    def intx_unmask(self) -> None:
        if self.masked and not self.virq_disabled:
            if self.level:  # still asserted: stays masked, re-signalled at once
                if not self.pci_2_3:  # re-enabled at the irqchip: the line fires again
                    self._host_irq()
                self._signal_intx()
            else:
                self.masked = False

    def intx_mask(self) -> None:
        self.masked = True

    def intx_enable(self, trigger: int | None) -> None:
        if self.irq == 0:
            raise _oserror(errno.ENODEV, "no IRQ routed to the device")
        self.irq_type = "intx"
        self.masked = self.virq_disabled
        self._set_trigger(trigger)
        self._irq_handler()  # request_irq on an asserted level line fires at once

    def intx_disable(self) -> None:
        self._set_trigger(None)
        self.virqfd_unbind()
        self.irq_type = "none"
        self.masked = False

    def _set_trigger(self, fd: int | None) -> None:
        self._drop(self.trigger)
        self.trigger = fd

    @staticmethod
    def _drop(fd: int | None) -> None:
        if fd is not None:
            os.close(fd)

    @property
    def intx_count(self) -> int:
        return 0 if (self.interrupt_pin == 0 or self.is_vf or self.nointx) else 1

    def irq_count(self, index: int) -> int:
        if index == IrqIndex.INTX:
            return self.intx_count
        if index == IrqIndex.ERR:
            return 1 if self.pcie else 0
        if index == IrqIndex.REQ:
            return 1
        return 1  # MSI / MSI-X: not modelled beyond their existence

    # --- edu BAR0 and config space ------------------------------------------------

    def bar0_read(self, offset: int) -> int:
        if offset == EDU_ID:
            return 0x010000ED
        if offset == EDU_IRQ_STATUS:
            return self.edu_status
        return 0

    def bar0_write(self, offset: int, value: int) -> None:
        self.virqfd_poll()
        if offset == EDU_IRQ_RAISE:
            self.edu_status |= value
            if self.edu_status:
                self.assert_line()
        elif offset == EDU_IRQ_ACK:
            self.edu_status &= ~value
            if not self.edu_status:
                self.deassert_line()

    def config_bytes(self, virtual: bool) -> bytearray:
        """256 bytes of config space; ``virtual`` is vfio-pci's view of it."""
        cfg = bytearray(256)
        struct.pack_into("<HH", cfg, 0, self.vendor, self.device_id)
        command = self.command
        if virtual:
            command = (command & ~uapi.PCI_COMMAND_INTX_DISABLE) | (
                uapi.PCI_COMMAND_INTX_DISABLE if self.virq_disabled else 0)
        elif self.pci_2_3 and self.masked and self.irq_type == "intx":
            command |= uapi.PCI_COMMAND_INTX_DISABLE  # vfio masks with DisINTx
        status = (uapi.PCI_STATUS_INTERRUPT if self.level else 0) | (
            uapi.PCI_STATUS_CAP_LIST if self.pcie else 0)
        struct.pack_into("<HH", cfg, uapi.PCI_COMMAND, command, status)
        cfg[0x09:0x0C] = self.class_code.to_bytes(3, "little")
        cfg[uapi.PCI_INTERRUPT_LINE] = self.irq & 0xFF
        cfg[uapi.PCI_INTERRUPT_PIN] = self.interrupt_pin
        if self.pcie:
            cfg[uapi.PCI_CAPABILITY_LIST] = 0x40
            cfg[0x40] = uapi.PCI_CAP_ID_EXP
        return cfg

    def config_write(self, offset: int, data: bytes) -> None:
        self.virqfd_poll()
        if offset == uapi.PCI_COMMAND and len(data) >= 2:
            value = int.from_bytes(data[:2], "little")
            disable = bool(value & uapi.PCI_COMMAND_INTX_DISABLE)
            self.command = (value & ~uapi.PCI_COMMAND_INTX_DISABLE) | (
                self.command & uapi.PCI_COMMAND_INTX_DISABLE)
            # the guest's DisINTx is virtual: 1 masks, 0 unmasks (vfio_pci_config.c)
            if disable and not self.virq_disabled:
                self.virq_disabled = True
                self.masked = True
            elif not disable and self.virq_disabled:
                self.virq_disabled = False
                self.intx_unmask()

    def reset(self) -> None:
        self.resets += 1
        self.edu_status = 0
        self.level = False


@dataclass
class _File:
    """An open file (what several fds may share after ``dup``)."""

    refs: int = 1


@dataclass
class _Container(_File):
    groups: list[_GroupFile] = field(default_factory=list)
    iommu: IommuType | None = None


@dataclass
class _GroupFile(_File):
    group: int = 0
    container: _Container | None = None


@dataclass
class _DeviceFile(_File):
    function: FakeFunction | None = None
    via_group: _GroupFile | None = None  # holds a reference: the group outlives its fd
    bound: bool = False  # access granted: always for the group path, after BIND for cdev


@dataclass
class _IommuFile(_File):
    ioas: list[int] = field(default_factory=list)


class FakeVfio:
    """``VfioApi`` over a modelled host; see the module docstring.

    Build the host with ``add``/``set_noiommu``, hand this object to
    ``open_vfio_device(api=...)`` and drive the hardware with the functions'
    ``assert_line``/``deassert_line`` or BAR0 writes.
    """

    def __init__(self, dev_root: Path = Path("/dev"), *, type1v2: bool = True,
                 type1: bool = True, noiommu: bool = False, iommufd: bool = False,
                 interrupt_remapping: bool = True, sparse_irq: bool = False) -> None:
        self.dev_root = dev_root
        self.sparse_irq = sparse_irq  # the host has /sys/kernel/irq/N/per_cpu_count
        self.type1v2 = type1v2
        self.type1 = type1
        self.noiommu_enabled = noiommu
        self.iommufd = iommufd
        self.interrupt_remapping = interrupt_remapping
        self.functions: dict[str, FakeFunction] = {}
        self.noiommu_groups: set[int] = set()
        self.open_groups: set[int] = set()
        self._files: dict[int, _File] = {}
        self._next_fd = _FIRST_FD
        self._next_ioas = 1
        self.calls: list[str] = []  # ioctl names, in order, for tests
        self._sysfs_root: Path | None = None
        self._proc_root: Path | None = None
        # host drivers' handlers on IRQ lines, as /proc/interrupts names them
        self.irq_handlers: dict[int, list[str]] = {}

    # --- building the host --------------------------------------------------------

    def add(self, fn: FakeFunction) -> FakeFunction:
        """Plug ``fn`` in; with iommufd it gets the next ``vfioN`` cdev."""
        if self.iommufd and fn.cdev is None:
            fn.cdev = len(self.functions)
        self.functions[fn.address] = fn
        fn.on_irq = self._on_irq
        return fn

    def _on_irq(self, fn: FakeFunction) -> None:
        """The host took an IRQ: the fixture trees show the new count at once."""
        self._write_irq_counts()

    def _write_irq_counts(self) -> None:
        if self._proc_root is not None:
            write_proc_interrupts(self._proc_root, self.functions.values(), self.irq_handlers)
        if self._sysfs_root is not None and self.sparse_irq:
            write_per_cpu_counts(self._sysfs_root, self.functions.values(), self.irq_handlers)

    def set_noiommu(self, group: int) -> None:
        """Make ``group`` a no-IOMMU group (``/dev/vfio/noiommu-N``)."""
        self.noiommu_groups.add(group)

    def group_members(self, group: int) -> list[FakeFunction]:
        return [f for f in self.functions.values() if f.group == group]

    def group_viable(self, group: int) -> bool:
        return all(f.driver in VIABLE_DRIVERS or f.driver is None
                   for f in self.group_members(group))

    # --- host events --------------------------------------------------------------

    def request_release(self, address: str) -> bool:
        """The host unbinds the device (or it is hot-unplugged).

        Returns True if the unbind completed at once (device not open); otherwise
        vfio-pci signals REQ and the unbind completes when the last file closes.
        """
        fn = self.functions[address]
        if fn.open_count == 0:
            fn.driver = None
            return True
        fn.unbind_pending = True
        fn.requests_sent += 1
        if fn.req_trigger is not None:
            os.eventfd_write(fn.req_trigger, 1)
        return False

    def report_error(self, address: str) -> None:
        """An AER error is detected: vfio-pci signals ERR."""
        fn = self.functions[address]
        if fn.err_trigger is not None:
            os.eventfd_write(fn.err_trigger, 1)

    def switch_to_msi(self, address: str) -> None:
        """The VMM disables INTx and enables MSI under eoid (docs/intx-eoi.md §5)."""
        fn = self.functions[address]
        fn.intx_disable()
        fn.irq_type = "msi"

    # --- fixture trees --------------------------------------------------------------

    def write_tree(self, sysfs_root: Path, proc_root: Path | None = None,
                   dev_root: Path | None = None) -> None:
        """Write the sysfs/proc/dev trees a real host with these devices would show."""
        write_sysfs(sysfs_root, self.functions.values(), iommufd=self.iommufd)
        self._sysfs_root = sysfs_root
        self._proc_root = proc_root
        self._write_irq_counts()
        root = self.dev_root if dev_root is None else dev_root
        vfio = root / "vfio"
        vfio.mkdir(parents=True, exist_ok=True)
        (vfio / "vfio").touch()
        for g in {f.group for f in self.functions.values() if f.driver in VFIO_DRIVERS}:
            (vfio / self._group_node(g)).touch()
        if self.iommufd:
            (root / "iommu").touch()
            (vfio / "devices").mkdir(exist_ok=True)
            for f in self.functions.values():
                if f.cdev is not None and f.driver in VFIO_DRIVERS:
                    (vfio / "devices" / f"vfio{f.cdev}").touch()

    def _group_node(self, group: int) -> str:
        return f"noiommu-{group}" if group in self.noiommu_groups else str(group)

    # --- files --------------------------------------------------------------------

    def _new_fd(self, f: _File) -> int:
        fd = self._next_fd
        self._next_fd += 1
        self._files[fd] = f
        return fd

    def _get(self, fd: int) -> _File:
        try:
            return self._files[fd]
        except KeyError:
            raise _oserror(errno.EBADF) from None

    def open(self, path: Path) -> int:
        rel = Path(path).relative_to(self.dev_root).as_posix()
        if rel == "vfio/vfio":
            return self._new_fd(_Container())
        if rel == "iommu" and self.iommufd:
            return self._new_fd(_IommuFile())
        if rel.startswith("vfio/devices/vfio") and self.iommufd:
            for fn in self.functions.values():
                if f"vfio/devices/vfio{fn.cdev}" == rel and fn.driver in VFIO_DRIVERS:
                    return self._new_fd(_DeviceFile(function=fn))
            raise _oserror(errno.ENOENT, str(path))
        name = rel.removeprefix("vfio/")
        for g in {f.group for f in self.functions.values() if f.driver in VFIO_DRIVERS}:
            if name == self._group_node(g):
                if g in self.open_groups or any(
                        f.cdev_bound for f in self.group_members(g)):
                    raise _oserror(errno.EBUSY, str(path))
                self.open_groups.add(g)
                return self._new_fd(_GroupFile(group=g))
        raise _oserror(errno.ENOENT, str(path))

    def dup(self, fd: int) -> int:
        f = self._get(fd)
        f.refs += 1
        return self._new_fd(f)

    def close(self, fd: int) -> None:
        f = self._files.pop(fd, None)
        if f is None:
            raise _oserror(errno.EBADF)
        f.refs -= 1
        if f.refs == 0:
            self._release(f)

    def _release(self, f: _File) -> None:
        if isinstance(f, _GroupFile):
            self._unset_container(f)
            self.open_groups.discard(f.group)
        elif isinstance(f, _DeviceFile) and f.function is not None and f.bound:
            fn = f.function
            fn.open_count -= 1
            if f.via_group is None:
                fn.cdev_bound = False
            if fn.open_count == 0:  # vfio_pci_core_disable
                fn.intx_disable()
                for name in ("err_trigger", "req_trigger"):
                    fn._drop(getattr(fn, name))
                    setattr(fn, name, None)
                if fn.reset_works:
                    fn.reset()
                if fn.unbind_pending:
                    fn.unbind_pending = False
                    fn.driver = None
            if f.via_group is not None:
                f.via_group.refs -= 1
                if f.via_group.refs == 0:
                    self._release(f.via_group)

    def open_fds(self) -> list[int]:
        """Fds still open in the twin (tests assert that nothing leaks)."""
        return sorted(self._files)

    # --- container and group ------------------------------------------------------

    def _container(self, fd: int) -> _Container:
        f = self._get(fd)
        if not isinstance(f, _Container):
            raise _oserror(errno.ENOTTY)
        return f

    def _group(self, fd: int) -> _GroupFile:
        f = self._get(fd)
        if not isinstance(f, _GroupFile):
            raise _oserror(errno.ENOTTY)
        return f

    def _supported(self, ext: int, container: _Container | None) -> bool:
        noiommu_container = container is not None and any(
            g.group in self.noiommu_groups for g in container.groups)
        if ext == IommuType.NOIOMMU:
            return self.noiommu_enabled and (container is None or not container.groups
                                             or noiommu_container)
        if noiommu_container:
            return False
        return (ext == IommuType.TYPE1V2 and self.type1v2) or (
            ext == IommuType.TYPE1 and (self.type1 or self.type1v2))

    def get_api_version(self, container: int) -> int:
        self.calls.append("GET_API_VERSION")
        self._container(container)
        return uapi.VFIO_API_VERSION

    def check_extension(self, fd: int, extension: int) -> bool:
        self.calls.append("CHECK_EXTENSION")
        f = self._get(fd)
        if isinstance(f, _Container):
            return self._supported(extension, f)
        if isinstance(f, _GroupFile):
            return False
        raise _oserror(errno.ENOTTY)

    def set_iommu(self, container: int, iommu: IommuType) -> None:
        self.calls.append("SET_IOMMU")
        c = self._container(container)
        if not c.groups or c.iommu is not None:
            raise _oserror(errno.EINVAL)
        if not self._supported(iommu, c):
            raise _oserror(errno.ENODEV)
        if iommu != IommuType.NOIOMMU and not self.interrupt_remapping:
            raise _oserror(errno.EPERM, "no interrupt remapping")
        c.iommu = IommuType(iommu)

    def group_get_status(self, group: int) -> GroupFlag:
        self.calls.append("GROUP_GET_STATUS")
        g = self._group(group)
        if g.container is not None:
            return GroupFlag.VIABLE | GroupFlag.CONTAINER_SET
        return GroupFlag.VIABLE if self.group_viable(g.group) else GroupFlag(0)

    def group_set_container(self, group: int, container: int) -> None:
        self.calls.append("GROUP_SET_CONTAINER")
        g = self._group(group)
        f = self._get(container)
        if not isinstance(f, _Container):
            raise _oserror(errno.EINVAL)
        if g.container is not None:
            raise _oserror(errno.EINVAL)
        noiommu = g.group in self.noiommu_groups
        if f.groups and (f.groups[0].group in self.noiommu_groups) != noiommu:
            raise _oserror(errno.EPERM)
        if f.iommu is not None and (f.iommu == IommuType.NOIOMMU) != noiommu:
            raise _oserror(errno.EPERM)
        if not self.group_viable(g.group):  # iommu_group_claim_dma_owner
            raise _oserror(errno.EBUSY, "a host driver owns DMA for the group")
        g.container = f
        f.groups.append(g)

    def group_unset_container(self, group: int) -> None:
        self.calls.append("GROUP_UNSET_CONTAINER")
        g = self._group(group)
        if g.container is None:
            raise _oserror(errno.EINVAL)
        if any(fn.open_count for fn in self.group_members(g.group)):
            raise _oserror(errno.EBUSY)
        self._unset_container(g)

    def _unset_container(self, g: _GroupFile) -> None:
        if g.container is not None:
            g.container.groups.remove(g)
            if not g.container.groups:
                g.container.iommu = None  # a container without groups is deprivileged
            g.container = None

    def group_get_device_fd(self, group: int, pci_address: str) -> int:
        self.calls.append("GROUP_GET_DEVICE_FD")
        g = self._group(group)
        if g.container is None or g.container.iommu is None:
            raise _oserror(errno.EINVAL, "group has no IOMMU set")
        fn = self.functions.get(pci_address)
        if fn is None or fn.group != g.group or fn.driver not in VFIO_DRIVERS:
            raise _oserror(errno.ENODEV, pci_address)
        fn.open_count += 1
        g.refs += 1  # "device FDs hold a group file reference" (drivers/vfio/group.c)
        return self._new_fd(_DeviceFile(function=fn, via_group=g, bound=True))

    # --- iommufd ------------------------------------------------------------------

    def ioas_alloc(self, iommufd: int) -> int:
        self.calls.append("IOAS_ALLOC")
        f = self._get(iommufd)
        if not isinstance(f, _IommuFile):
            raise _oserror(errno.ENOTTY)
        ioas = self._next_ioas
        self._next_ioas += 1
        f.ioas.append(ioas)
        return ioas

    def device_bind_iommufd(self, device: int, iommufd: int) -> int:
        self.calls.append("BIND_IOMMUFD")
        d = self._device_file(device, need_access=False)
        if d.via_group is not None or d.bound:
            raise _oserror(errno.EINVAL, "already bound")
        if not isinstance(self._files.get(iommufd), _IommuFile):
            raise _oserror(errno.EBADF)
        fn = d.function
        assert fn is not None
        if fn.group in self.open_groups:
            raise _oserror(errno.EBUSY, "group is open")
        if fn.open_count != 0:  # only the group path may open a device twice
            raise _oserror(errno.EINVAL, "device already open")
        d.bound = True
        fn.cdev_bound = True
        fn.open_count += 1
        return 1 + list(self.functions).index(fn.address)

    def device_attach_iommufd_pt(self, device: int, pt_id: int) -> None:
        self.calls.append("ATTACH_IOMMUFD_PT")
        d = self._device_file(device)
        if d.via_group is not None:
            raise _oserror(errno.EINVAL)
        if not any(isinstance(f, _IommuFile) and pt_id in f.ioas for f in self._files.values()):
            raise _oserror(errno.ENOENT, f"no IOAS {pt_id}")

    # --- device -------------------------------------------------------------------

    def _device_file(self, fd: int, need_access: bool = True) -> _DeviceFile:
        f = self._get(fd)
        if not isinstance(f, _DeviceFile) or f.function is None:
            raise _oserror(errno.ENOTTY)
        if need_access and not f.bound:
            raise _oserror(errno.EINVAL, "cdev not bound to an iommufd")
        return f

    def _fn(self, fd: int) -> FakeFunction:
        fn = self._device_file(fd).function
        assert fn is not None
        fn.virqfd_poll()  # an EOI signalled before this call has unmasked already
        return fn

    def device_get_info(self, device: int) -> VfioDeviceInfo:
        self.calls.append("DEVICE_GET_INFO")
        fn = self._fn(device)
        flags = DeviceFlag.PCI | (DeviceFlag.RESET if fn.reset_works else DeviceFlag(0))
        return VfioDeviceInfo(flags, len(RegionIndex), len(IrqIndex))

    def device_get_region_info(self, device: int, index: int) -> RegionInfo:
        self.calls.append("DEVICE_GET_REGION_INFO")
        self._fn(device)
        if index == RegionIndex.BAR0:
            return RegionInfo(index, RegionFlag.READ | RegionFlag.WRITE | RegionFlag.MMAP,
                              0x100000, uapi.region_offset(index))
        if index == RegionIndex.CONFIG:
            return RegionInfo(index, RegionFlag.READ | RegionFlag.WRITE, 256,
                              uapi.region_offset(index))
        if 0 <= index < len(RegionIndex):
            return RegionInfo(index, RegionFlag(0), 0, uapi.region_offset(index))
        raise _oserror(errno.EINVAL)

    def device_get_irq_info(self, device: int, index: int) -> IrqInfo:
        self.calls.append("DEVICE_GET_IRQ_INFO")
        fn = self._fn(device)
        if not 0 <= index < len(IrqIndex) or (index == IrqIndex.ERR and not fn.pcie):
            raise _oserror(errno.EINVAL)
        flags = IrqInfoFlag.EVENTFD
        if index == IrqIndex.INTX:
            flags |= IrqInfoFlag.MASKABLE | IrqInfoFlag.AUTOMASKED
        elif index != IrqIndex.MSIX:
            flags |= IrqInfoFlag.NORESIZE
        return IrqInfo(index, flags, fn.irq_count(index))

    def prepare_set_irqs(self, device: int, request: bytes) -> Callable[[], object]:
        def call() -> None:
            self.device_set_irqs(device, request)
        return call

    def raw_set_irqs(self, device: int, request: bytes) -> None:
        return None  # no kernel behind it: the fast path leaves unmasks to ``unmask``

    def device_set_irqs(self, device: int, request: bytes) -> None:
        fn = self._fn(device)
        try:
            self._set_irqs(fn, request)
        finally:
            self._sync_sysfs(fn)

    def _sync_sysfs(self, fn: FakeFunction) -> None:
        """Keep the fixture's sysfs ``config`` (the hardware's view) and IRQ counts current."""
        if self._sysfs_root is not None:
            config = sysfs_device_dir(self._sysfs_root, fn) / "config"
            if config.exists():
                config.write_bytes(bytes(fn.config_bytes(virtual=False)))
        self._write_irq_counts()  # an enabled line's handler shows in /proc/interrupts

    def _set_irqs(self, fn: FakeFunction, request: bytes) -> None:
        """``vfio_set_irqs_validate_and_prepare`` + ``vfio_pci_set_irqs_ioctl``."""
        argsz, flags, index, start, count = uapi.IRQ_SET.unpack_from(request)
        names = uapi.flag_names(IrqSetFlag(flags))
        self.calls.append(f"SET_IRQS({IrqIndex(index).name if index < len(IrqIndex) else index},"
                          f"{names},{start},{count})")
        data_flags = flags & uapi.DATA_MASK
        action = flags & uapi.ACTION_MASK
        if (argsz < uapi.IRQ_SET.size or flags & ~(uapi.DATA_MASK | uapi.ACTION_MASK)
                or bin(data_flags).count("1") != 1 or index >= len(IrqIndex)):
            raise _oserror(errno.EINVAL)
        if bin(action).count("1") != 1:  # no handler for that action
            raise _oserror(errno.ENOTTY)
        if count == 0 and (data_flags != IrqSetFlag.DATA_NONE
                           or action != IrqSetFlag.ACTION_TRIGGER):
            raise _oserror(errno.EINVAL)
        max_count = fn.irq_count(index)
        if start >= max_count or start + count > max_count:
            raise _oserror(errno.EINVAL)
        size = {IrqSetFlag.DATA_NONE: 0, IrqSetFlag.DATA_BOOL: 1, IrqSetFlag.DATA_EVENTFD: 4}
        need = count * size[IrqSetFlag(data_flags)]
        if argsz - uapi.IRQ_SET.size < need or len(request) < uapi.IRQ_SET.size + need:
            raise _oserror(errno.EINVAL)
        data = request[uapi.IRQ_SET.size:uapi.IRQ_SET.size + need]
        if index == IrqIndex.INTX:
            self._set_intx(fn, IrqSetFlag(action), IrqSetFlag(data_flags),
                           start=start, count=count, data=data)
        elif index in (IrqIndex.ERR, IrqIndex.REQ):
            if action != IrqSetFlag.ACTION_TRIGGER:
                raise _oserror(errno.ENOTTY)
            self._set_ctx_trigger(fn, "err_trigger" if index == IrqIndex.ERR else "req_trigger",
                                  IrqSetFlag(data_flags), count, data)
        else:
            raise _oserror(errno.ENOTTY, "MSI/MSI-X are not modelled")

    def _set_intx(self, fn: FakeFunction, action: IrqSetFlag, data_flags: IrqSetFlag, *,
                  start: int, count: int, data: bytes) -> None:
        is_intx = fn.irq_type == "intx"
        if action == IrqSetFlag.ACTION_TRIGGER:
            if is_intx and count == 0 and data_flags == IrqSetFlag.DATA_NONE:
                fn.intx_disable()
                return
            if not (is_intx or fn.irq_type == "none") or start != 0 or count != 1:
                raise _oserror(errno.EINVAL)
            if data_flags == IrqSetFlag.DATA_EVENTFD:
                fd = _s32(data)
                trigger = _take_eventfd(fd) if fd >= 0 else None
                if is_intx:
                    fn._set_trigger(trigger)
                    return
                try:
                    self._request_irq(fn)
                    fn.intx_enable(trigger)
                except OSError:
                    fn._drop(trigger)
                    raise
                return
            if not is_intx:
                raise _oserror(errno.EINVAL)
            if data_flags == IrqSetFlag.DATA_NONE or data[0]:
                fn._signal_intx()  # loopback: no masking
            return
        if not is_intx or start != 0 or count != 1:
            raise _oserror(errno.EINVAL)
        if action == IrqSetFlag.ACTION_UNMASK:
            if data_flags == IrqSetFlag.DATA_EVENTFD:
                fd = _s32(data)
                if fd < 0:
                    fn.virqfd_unbind()
                elif fn.unmask_virqfd is not None:
                    raise _oserror(errno.EBUSY)
                else:
                    fn.virqfd_bind(_take_eventfd(fd))
            elif data_flags == IrqSetFlag.DATA_NONE or data[0]:
                fn.intx_unmask()
        elif data_flags == IrqSetFlag.DATA_EVENTFD:
            raise _oserror(errno.ENOTTY)
        elif data_flags == IrqSetFlag.DATA_NONE or data[0]:
            fn.intx_mask()

    @staticmethod
    def _set_ctx_trigger(fn: FakeFunction, attr: str, data_flags: IrqSetFlag, count: int,
                         data: bytes) -> None:
        current: int | None = getattr(fn, attr)
        if count == 0:  # DATA_NONE, count 0: unregister
            fn._drop(current)
            setattr(fn, attr, None)
        elif data_flags == IrqSetFlag.DATA_EVENTFD:
            fd = _s32(data)
            new = _take_eventfd(fd) if fd >= 0 else None
            fn._drop(current)
            setattr(fn, attr, new)
        elif (data_flags == IrqSetFlag.DATA_NONE or data[0]) and current is not None:
            os.eventfd_write(current, 1)

    def _request_irq(self, fn: FakeFunction) -> None:
        """``request_irq``: shared (IRQF_SHARED) only for DisINTx-capable devices."""
        others = [f for f in self.functions.values()
                  if f is not fn and f.irq == fn.irq and f.irq_type == "intx"]
        foreign = self.irq_handlers.get(fn.irq, [])
        if (not fn.pci_2_3 and (others or foreign)) or any(not o.pci_2_3 for o in others):
            raise _oserror(errno.EBUSY, f"genirq: Flags mismatch irq {fn.irq}")

    def device_reset(self, device: int) -> None:
        self.calls.append("DEVICE_RESET")
        fn = self._fn(device)
        if not fn.reset_works:
            raise _oserror(errno.EINVAL)
        fn.reset()

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        fn = self._fn(fd)
        index, off = offset >> 40, offset & ((1 << 40) - 1)
        if index == RegionIndex.CONFIG:
            return bytes(fn.config_bytes(virtual=True)[off:off + size])
        if index == RegionIndex.BAR0:
            if not fn.command & uapi.PCI_COMMAND_MEMORY:
                raise _oserror(errno.EIO)
            return fn.bar0_read(off).to_bytes(4, "little")[:size]
        raise _oserror(errno.EINVAL)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        fn = self._fn(fd)
        index, off = offset >> 40, offset & ((1 << 40) - 1)
        if index == RegionIndex.CONFIG:
            fn.config_write(off, data)
            return len(data)
        if index == RegionIndex.BAR0:
            if not fn.command & uapi.PCI_COMMAND_MEMORY:
                raise _oserror(errno.EIO)
            fn.bar0_write(off, int.from_bytes(data, "little"))
            return len(data)
        raise _oserror(errno.EINVAL)


def _s32(data: bytes) -> int:
    return int(uapi.S32.unpack_from(data)[0])


def _take_eventfd(fd: int) -> int:
    """``eventfd_ctx_fdget``: EBADF for a bad fd, EINVAL for a non-eventfd file."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        raise _oserror(errno.EBADF) from None
    if target != "anon_inode:[eventfd]":
        raise _oserror(errno.EINVAL, "not an eventfd")
    return os.dup(fd)


# --- fixture trees ------------------------------------------------------------------------


def sysfs_device_dir(root: Path, fn: FakeFunction) -> Path:
    """Where the function's directory lives (``/sys/bus/pci/devices/X`` links to it)."""
    return root / "devices" / f"pci{fn.address[:7]}" / fn.address


def write_sysfs(root: Path, functions: Iterable[FakeFunction], *, iommufd: bool = False) -> None:
    """A minimal /sys with the files ``eoid.vfio.sysfs`` reads, for these functions."""
    bus = root / "bus" / "pci"
    (bus / "devices").mkdir(parents=True, exist_ok=True)
    (bus / "drivers").mkdir(exist_ok=True)
    (bus / "drivers_probe").touch()
    for fn in functions:
        dev = sysfs_device_dir(root, fn)
        dev.mkdir(parents=True, exist_ok=True)
        link = bus / "devices" / fn.address
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(dev, link.parent))
        (dev / "vendor").write_text(f"0x{fn.vendor:04x}\n")
        (dev / "device").write_text(f"0x{fn.device_id:04x}\n")
        (dev / "class").write_text(f"0x{fn.class_code:06x}\n")
        (dev / "irq").write_text(f"{fn.irq}\n")
        (dev / "enable").write_text("1\n" if fn.enabled else "0\n")
        (dev / "config").write_bytes(bytes(fn.config_bytes(virtual=False)))
        (dev / "driver_override").write_text("(null)\n")
        for name in ("driver", "iommu_group", "physfn"):
            if (dev / name).is_symlink():
                (dev / name).unlink()
        if fn.driver is not None:
            drv = bus / "drivers" / fn.driver
            drv.mkdir(exist_ok=True)
            (dev / "driver").symlink_to(os.path.relpath(drv, dev))
        group = root / "kernel" / "iommu_groups" / str(fn.group) / "devices"
        group.mkdir(parents=True, exist_ok=True)
        if not (group / fn.address).is_symlink():
            (group / fn.address).symlink_to(os.path.relpath(dev, group))
        (dev / "iommu_group").symlink_to(os.path.relpath(group.parent, dev))
        if fn.is_vf:
            (dev / "physfn").symlink_to(dev)
        if fn.pcie:
            (dev / "current_link_speed").write_text("2.5 GT/s PCIe\n")
        if fn.msi_irqs:
            (dev / "msi_irqs").mkdir(exist_ok=True)
            for i in range(fn.msi_irqs):
                (dev / "msi_irqs" / str(100 + i)).write_text("msi\n")
        if iommufd and fn.cdev is not None and fn.driver in VFIO_DRIVERS:
            (dev / "vfio-dev" / f"vfio{fn.cdev}").mkdir(parents=True, exist_ok=True)


def _irq_counts(functions: Iterable[FakeFunction]) -> dict[int, int]:
    """Each IRQ's count: the hard interrupts of every function on it (a shared line's
    count is all of theirs)."""
    counts: dict[int, int] = {}
    for fn in functions:
        if fn.host_irqs:
            counts[fn.irq] = counts.get(fn.irq, 0) + fn.host_irqs
    return counts


def _per_cpu(count: int) -> tuple[int, int]:
    """A count spread over two CPUs (the files are summed, so any split will do)."""
    return count - count // 2, count // 2


def write_proc_interrupts(proc_root: Path, functions: Iterable[FakeFunction],
                          extra: dict[int, list[str]] | None = None) -> None:
    """/proc/interrupts with a ``vfio-intx(BDF)`` action per enabled INTx line, and each
    IRQ's count (``host_irqs``) over two CPUs; a line that counted stays listed."""
    functions = list(functions)
    actions: dict[int, list[str]] = {k: list(v) for k, v in (extra or {}).items()}
    counts = _irq_counts(functions)
    for fn in functions:
        if fn.irq_type == "intx":
            actions.setdefault(fn.irq, []).append(f"vfio-intx({fn.address})")
    lines = ["           CPU0       CPU1"]
    for irq in sorted(set(actions) | set(counts)):
        cpu0, cpu1 = _per_cpu(counts.get(irq, 0))
        lines.append(f"{irq:4d}: {cpu0:10d} {cpu1:10d}  IR-IO-APIC   {irq}-fasteoi   "
                     + ", ".join(actions.get(irq, [])))
    lines.append(" NMI:          0          0   Non-maskable interrupts")
    proc_root.mkdir(parents=True, exist_ok=True)
    (proc_root / "interrupts").write_text("\n".join(lines) + "\n")


def write_per_cpu_counts(sysfs_root: Path, functions: Iterable[FakeFunction],
                         extra: dict[int, list[str]] | None = None) -> None:
    """``/sys/kernel/irq/N/per_cpu_count`` of each IRQ the functions (or ``extra``) use."""
    functions = list(functions)
    counts = _irq_counts(functions)
    for irq in {fn.irq for fn in functions} | set(extra or {}):
        path = sysfs_root / "kernel" / "irq" / str(irq)
        path.mkdir(parents=True, exist_ok=True)
        cpu0, cpu1 = _per_cpu(counts.get(irq, 0))
        (path / "per_cpu_count").write_text(f"{cpu0},{cpu1}\n")
