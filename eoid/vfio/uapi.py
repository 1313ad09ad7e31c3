"""Every raw VFIO ioctl eoid uses, in one typed module (values: <linux/vfio.h>).

``VfioApi`` is the seam between eoid and the kernel: ``KernelVfio`` issues the
real ``ioctl(2)`` calls, ``eoid.vfio.twin.FakeVfio`` models the kernel's
semantics for tests. Both raise ``OSError`` carrying the kernel's errno, exactly
as the syscalls do; the device layer (``eoid.vfio.device``) turns that into a
``VfioError`` naming the device and the operation.

All VFIO ioctls are ``_IO(';', 100 + n)``: ``_IO`` encodes neither size nor
direction, so each number is ``0x3B00 | (100 + n)`` and the kernel trusts the
``argsz`` field at the start of each struct instead.
"""

from __future__ import annotations

import enum
import fcntl
import functools
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

VFIO_TYPE: Final = ord(";")
VFIO_BASE: Final = 100


def _io(nr: int) -> int:
    """``_IO(VFIO_TYPE, nr)``: no size, no direction bits."""
    return (VFIO_TYPE << 8) | nr


VFIO_GET_API_VERSION: Final = _io(VFIO_BASE + 0)
VFIO_CHECK_EXTENSION: Final = _io(VFIO_BASE + 1)
VFIO_SET_IOMMU: Final = _io(VFIO_BASE + 2)
VFIO_GROUP_GET_STATUS: Final = _io(VFIO_BASE + 3)
VFIO_GROUP_SET_CONTAINER: Final = _io(VFIO_BASE + 4)
VFIO_GROUP_UNSET_CONTAINER: Final = _io(VFIO_BASE + 5)
VFIO_GROUP_GET_DEVICE_FD: Final = _io(VFIO_BASE + 6)
VFIO_DEVICE_GET_INFO: Final = _io(VFIO_BASE + 7)
VFIO_DEVICE_GET_REGION_INFO: Final = _io(VFIO_BASE + 8)
VFIO_DEVICE_GET_IRQ_INFO: Final = _io(VFIO_BASE + 9)
VFIO_DEVICE_SET_IRQS: Final = _io(VFIO_BASE + 10)
VFIO_DEVICE_RESET: Final = _io(VFIO_BASE + 11)
VFIO_DEVICE_BIND_IOMMUFD: Final = _io(VFIO_BASE + 18)
VFIO_DEVICE_ATTACH_IOMMUFD_PT: Final = _io(VFIO_BASE + 19)
VFIO_DEVICE_DETACH_IOMMUFD_PT: Final = _io(VFIO_BASE + 20)

# <linux/iommufd.h>: same ';' type, commands from 0x80.
IOMMU_IOAS_ALLOC: Final = _io(0x81)

VFIO_API_VERSION: Final = 0


class IommuType(enum.IntEnum):
    """``VFIO_SET_IOMMU`` / ``VFIO_CHECK_EXTENSION`` argument."""

    TYPE1 = 1
    TYPE1V2 = 3
    NOIOMMU = 8


class GroupFlag(enum.IntFlag):
    VIABLE = 1 << 0  # no device of the group is claimed by a host driver
    CONTAINER_SET = 1 << 1


class DeviceFlag(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1
    PLATFORM = 1 << 2
    AMBA = 1 << 3
    CCW = 1 << 4
    AP = 1 << 5
    FSL_MC = 1 << 6
    CAPS = 1 << 7
    CDX = 1 << 8


class RegionFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(enum.IntFlag):
    """Exactly one DATA_* and one ACTION_* bit per ``VFIO_DEVICE_SET_IRQS``."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


def flag_names(flags: enum.IntFlag) -> str:
    """``EVENTFD|MASKABLE`` (an IntFlag's ``str`` is just the number on 3.11)."""
    return "|".join(f.name or "" for f in type(flags) if f & flags) or "0"


DATA_MASK: Final = IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.DATA_EVENTFD
ACTION_MASK: Final = IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK | IrqSetFlag.ACTION_TRIGGER


class IrqIndex(enum.IntEnum):
    """vfio-pci interrupt indexes (``VFIO_PCI_NUM_IRQS`` = 5)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class RegionIndex(enum.IntEnum):
    """vfio-pci region indexes (``VFIO_PCI_NUM_REGIONS`` = 9)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


# PCI config space registers eoid reads for diagnostics (through the VFIO config
# region they are vfio-pci's *virtual* view; through sysfs, the hardware's).
PCI_COMMAND: Final = 0x04
PCI_COMMAND_MEMORY: Final = 0x2
PCI_COMMAND_MASTER: Final = 0x4
PCI_COMMAND_INTX_DISABLE: Final = 0x400
PCI_STATUS: Final = 0x06
PCI_STATUS_INTERRUPT: Final = 0x08
PCI_STATUS_CAP_LIST: Final = 0x10
PCI_CAPABILITY_LIST: Final = 0x34
PCI_INTERRUPT_LINE: Final = 0x3C
PCI_INTERRUPT_PIN: Final = 0x3D
PCI_CAP_ID_EXP: Final = 0x10

# Struct layouts: native endian, no padding ("=").
GROUP_STATUS: Final = struct.Struct("=II")  # argsz, flags
# argsz, flags, num_regions, num_irqs, cap_offset, pad (16 bytes on old kernels: argsz says)
DEVICE_INFO: Final = struct.Struct("=IIIIII")
REGION_INFO: Final = struct.Struct("=IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
IRQ_INFO: Final = struct.Struct("=IIII")  # argsz, flags, index, count
IRQ_SET: Final = struct.Struct("=IIIII")  # argsz, flags, index, start, count; then data[]
BIND_IOMMUFD: Final = struct.Struct("=IIiIQ")  # argsz, flags, iommufd, out_devid, token_uuid_ptr
ATTACH_IOMMUFD_PT: Final = struct.Struct("=IIII")  # argsz, flags, pt_id, pasid
IOAS_ALLOC: Final = struct.Struct("=III")  # size, flags, out_ioas_id
S32: Final = struct.Struct("=i")


def region_offset(index: int) -> int:
    """vfio-pci places region ``index`` at ``index << 40`` in the device fd."""
    return index << 40


def irq_set(
    index: int, flags: IrqSetFlag, start: int = 0, count: int = 1, data: bytes = b""
) -> bytes:
    """A complete ``vfio_irq_set`` request (header + data)."""
    return IRQ_SET.pack(IRQ_SET.size + len(data), flags, index, start, count) + data


def irq_set_eventfds(index: int, action: IrqSetFlag, fds: Sequence[int]) -> bytes:
    """``DATA_EVENTFD`` request binding ``fds`` (``-1`` unbinds) to ``index``."""
    data = struct.pack(f"={len(fds)}i", *fds)
    return irq_set(index, IrqSetFlag.DATA_EVENTFD | action, 0, len(fds), data)


# Prebuilt constant requests. UNMASK_INTX is the hot path: one ioctl per EOI,
# built once so that nothing is packed per interrupt.
UNMASK_INTX: Final = irq_set(IrqIndex.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK)
MASK_INTX: Final = irq_set(IrqIndex.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK)
DISABLE_INTX: Final = irq_set(
    IrqIndex.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, count=0
)
LOOPBACK_INTX: Final = irq_set(IrqIndex.INTX, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER)


def intx_trigger(fd: int) -> bytes:
    """Register ``fd`` as the INTx trigger. On a line that is not enabled this enables it;
    on an enabled one it only replaces the eventfd and keeps the masked state
    (docs/intx-eoi.md §3, §14). eoid never passes -1 here: that leaves INTx enabled with
    nobody told (§4)."""
    return irq_set_eventfds(IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [fd])


def intx_unmask_eventfd(fd: int) -> bytes:
    """Bind ``fd`` as the INTx unmask eventfd: the kernel's virqfd unmasks the line each
    time it is signalled, with no process woken (docs/intx-eoi.md §12, §14). ``-1``
    unbinds; one can be bound at a time (``EBUSY``); INTx must be enabled (``EINVAL``)."""
    return irq_set_eventfds(IrqIndex.INTX, IrqSetFlag.ACTION_UNMASK, [fd])


UNBIND_INTX_UNMASK: Final = intx_unmask_eventfd(-1)


def disable_irq(index: int) -> bytes:
    """Unregister the trigger of ``index`` (``DATA_NONE|ACTION_TRIGGER``, count 0)."""
    return irq_set(index, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, count=0)


def loopback_irq(index: int) -> bytes:
    """Ask the kernel to signal ``index``'s trigger as if the device fired."""
    return irq_set(index, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER)


@dataclass(frozen=True)
class VfioDeviceInfo:
    """``struct vfio_device_info``."""

    flags: DeviceFlag
    num_regions: int
    num_irqs: int


@dataclass(frozen=True)
class RegionInfo:
    """``struct vfio_region_info``: where a BAR/config space sits in the device fd."""

    index: int
    flags: RegionFlag
    size: int
    offset: int


@dataclass(frozen=True)
class IrqInfo:
    """``struct vfio_irq_info``."""

    index: int
    flags: IrqInfoFlag
    count: int


class VfioApi(Protocol):
    """The syscalls eoid makes on VFIO files. Failures raise ``OSError``."""

    def open(self, path: Path) -> int:
        """Open a VFIO/iommufd character device read-write, close-on-exec."""
        ...

    def close(self, fd: int) -> None: ...

    def dup(self, fd: int) -> int:
        """Another reference to the same open file (the kernel object lives on)."""
        ...

    def get_api_version(self, container: int) -> int: ...

    def check_extension(self, fd: int, extension: int) -> bool: ...

    def set_iommu(self, container: int, iommu: IommuType) -> None: ...

    def group_get_status(self, group: int) -> GroupFlag: ...

    def group_set_container(self, group: int, container: int) -> None: ...

    def group_unset_container(self, group: int) -> None: ...

    def group_get_device_fd(self, group: int, pci_address: str) -> int: ...

    def device_get_info(self, device: int) -> VfioDeviceInfo: ...

    def device_get_region_info(self, device: int, index: int) -> RegionInfo: ...

    def device_get_irq_info(self, device: int, index: int) -> IrqInfo: ...

    def device_set_irqs(self, device: int, request: bytes) -> None:
        """``VFIO_DEVICE_SET_IRQS`` with a request built by ``irq_set``."""
        ...

    def prepare_set_irqs(self, device: int, request: bytes) -> Callable[[], object]:
        """A ready-bound ``SET_IRQS`` call: the hot path pays one call, no packing."""
        ...

    def raw_set_irqs(self, device: int, request: bytes) -> tuple[int, int, bytes] | None:
        """``SET_IRQS`` as ``(fd, ioctl request, arg)`` for the C fast path to issue
        itself; None where it is no real ioctl (the twin)."""
        ...

    def device_reset(self, device: int) -> None: ...

    def device_bind_iommufd(self, device: int, iommufd: int) -> int:
        """Bind a cdev device fd to an iommufd; returns the device id."""
        ...

    def device_attach_iommufd_pt(self, device: int, pt_id: int) -> None: ...

    def ioas_alloc(self, iommufd: int) -> int:
        """Allocate an (empty) I/O address space; returns its id."""
        ...

    def pread(self, fd: int, size: int, offset: int) -> bytes: ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...


class KernelVfio:
    """``VfioApi`` on the real kernel, via ``fcntl.ioctl``.

    ``fcntl.ioctl`` returns the syscall's value only for an int argument or a
    *mutable* buffer with ``mutate_flag=True``; with ``bytes`` it returns the
    copied-back buffer. Calls whose result is the return value
    (``GROUP_GET_DEVICE_FD``) therefore use a ``bytearray``.
    """

    def open(self, path: Path) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def close(self, fd: int) -> None:
        os.close(fd)

    def dup(self, fd: int) -> int:
        return os.dup(fd)

    def get_api_version(self, container: int) -> int:
        return fcntl.ioctl(container, VFIO_GET_API_VERSION, 0)

    def check_extension(self, fd: int, extension: int) -> bool:
        return fcntl.ioctl(fd, VFIO_CHECK_EXTENSION, extension) > 0

    def set_iommu(self, container: int, iommu: IommuType) -> None:
        fcntl.ioctl(container, VFIO_SET_IOMMU, int(iommu))

    def group_get_status(self, group: int) -> GroupFlag:
        buf = bytearray(GROUP_STATUS.pack(GROUP_STATUS.size, 0))
        fcntl.ioctl(group, VFIO_GROUP_GET_STATUS, buf, True)
        return GroupFlag(GROUP_STATUS.unpack(buf)[1])

    def group_set_container(self, group: int, container: int) -> None:
        fcntl.ioctl(group, VFIO_GROUP_SET_CONTAINER, S32.pack(container))

    def group_unset_container(self, group: int) -> None:
        fcntl.ioctl(group, VFIO_GROUP_UNSET_CONTAINER, 0)

    def group_get_device_fd(self, group: int, pci_address: str) -> int:
        name = bytearray(pci_address.encode() + b"\0")
        return int(fcntl.ioctl(group, VFIO_GROUP_GET_DEVICE_FD, name, True))

    def device_get_info(self, device: int) -> VfioDeviceInfo:
        buf = bytearray(DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0, 0, 0))
        fcntl.ioctl(device, VFIO_DEVICE_GET_INFO, buf, True)
        _, flags, regions, irqs, _, _ = DEVICE_INFO.unpack(buf)
        return VfioDeviceInfo(DeviceFlag(flags), regions, irqs)

    def device_get_region_info(self, device: int, index: int) -> RegionInfo:
        buf = bytearray(REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
        fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, buf, True)
        _, flags, _, _, size, offset = REGION_INFO.unpack(buf)
        return RegionInfo(index, RegionFlag(flags), size, offset)

    def device_get_irq_info(self, device: int, index: int) -> IrqInfo:
        buf = bytearray(IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        fcntl.ioctl(device, VFIO_DEVICE_GET_IRQ_INFO, buf, True)
        _, flags, _, count = IRQ_INFO.unpack(buf)
        return IrqInfo(index, IrqInfoFlag(flags), count)

    def device_set_irqs(self, device: int, request: bytes) -> None:
        fcntl.ioctl(device, VFIO_DEVICE_SET_IRQS, request)

    def prepare_set_irqs(self, device: int, request: bytes) -> Callable[[], object]:
        return functools.partial(fcntl.ioctl, device, VFIO_DEVICE_SET_IRQS, request)

    def raw_set_irqs(self, device: int, request: bytes) -> tuple[int, int, bytes]:
        return (device, VFIO_DEVICE_SET_IRQS, request)

    def device_reset(self, device: int) -> None:
        fcntl.ioctl(device, VFIO_DEVICE_RESET, 0)

    def device_bind_iommufd(self, device: int, iommufd: int) -> int:
        buf = bytearray(BIND_IOMMUFD.pack(BIND_IOMMUFD.size, 0, iommufd, 0, 0))
        fcntl.ioctl(device, VFIO_DEVICE_BIND_IOMMUFD, buf, True)
        return int(BIND_IOMMUFD.unpack(buf)[3])

    def device_attach_iommufd_pt(self, device: int, pt_id: int) -> None:
        buf = bytearray(ATTACH_IOMMUFD_PT.pack(ATTACH_IOMMUFD_PT.size, 0, pt_id, 0))
        fcntl.ioctl(device, VFIO_DEVICE_ATTACH_IOMMUFD_PT, buf, True)

    def ioas_alloc(self, iommufd: int) -> int:
        buf = bytearray(IOAS_ALLOC.pack(IOAS_ALLOC.size, 0, 0))
        fcntl.ioctl(iommufd, IOMMU_IOAS_ALLOC, buf, True)
        return int(IOAS_ALLOC.unpack(buf)[2])

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)
