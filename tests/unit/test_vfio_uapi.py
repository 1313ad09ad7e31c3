"""The raw VFIO layer: ioctl numbers and layouts, the real syscalls' error path, and the
kernel twin's semantics (each checked against the kernel's documented behaviour)."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from eoid.vfio import uapi
from eoid.vfio.twin import FakeFunction, FakeVfio
from eoid.vfio.uapi import IommuType, IrqIndex, IrqSetFlag, KernelVfio, VfioApi

EDU = "0000:00:10.0"


# --- numbers and layouts (<linux/vfio.h>, <linux/iommufd.h>) -----------------------------


@pytest.mark.parametrize(("value", "expected"), [
    (uapi.VFIO_GET_API_VERSION, 0x3B64),
    (uapi.VFIO_CHECK_EXTENSION, 0x3B65),
    (uapi.VFIO_SET_IOMMU, 0x3B66),
    (uapi.VFIO_GROUP_GET_STATUS, 0x3B67),
    (uapi.VFIO_GROUP_SET_CONTAINER, 0x3B68),
    (uapi.VFIO_GROUP_UNSET_CONTAINER, 0x3B69),
    (uapi.VFIO_GROUP_GET_DEVICE_FD, 0x3B6A),
    (uapi.VFIO_DEVICE_GET_INFO, 0x3B6B),
    (uapi.VFIO_DEVICE_GET_REGION_INFO, 0x3B6C),
    (uapi.VFIO_DEVICE_GET_IRQ_INFO, 0x3B6D),
    (uapi.VFIO_DEVICE_SET_IRQS, 0x3B6E),
    (uapi.VFIO_DEVICE_RESET, 0x3B6F),
    (uapi.VFIO_DEVICE_BIND_IOMMUFD, 0x3B76),
    (uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3B77),
    (uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, 0x3B78),
    (uapi.IOMMU_IOAS_ALLOC, 0x3B81),
    (IommuType.TYPE1, 1), (IommuType.TYPE1V2, 3), (IommuType.NOIOMMU, 8),
    (IrqIndex.INTX, 0), (IrqIndex.ERR, 3), (IrqIndex.REQ, 4),
    (uapi.RegionIndex.CONFIG, 7),
])
def test_ioctl_numbers_and_constants(value: int, expected: int) -> None:
    assert value == expected


def test_struct_sizes() -> None:
    sizes = {s: s.size for s in (uapi.GROUP_STATUS, uapi.DEVICE_INFO, uapi.REGION_INFO,
                                 uapi.IRQ_INFO, uapi.IRQ_SET, uapi.BIND_IOMMUFD,
                                 uapi.ATTACH_IOMMUFD_PT, uapi.IOAS_ALLOC)}
    assert list(sizes.values()) == [8, 24, 32, 16, 20, 24, 16, 12]


def test_the_hot_path_unmask_is_the_constant_20_byte_request() -> None:
    assert struct.pack("=IIIII", 20, 0x11, 0, 0, 1) == uapi.UNMASK_INTX
    assert struct.pack("=IIIII", 20, 0x09, 0, 0, 1) == uapi.MASK_INTX
    assert struct.pack("=IIIII", 20, 0x21, 0, 0, 0) == uapi.DISABLE_INTX
    assert struct.pack("=IIIII", 20, 0x21, 0, 0, 1) == uapi.LOOPBACK_INTX
    assert uapi.disable_irq(IrqIndex.REQ) == struct.pack("=IIIII", 20, 0x21, 4, 0, 0)


def test_eventfd_request_layout() -> None:
    request = uapi.irq_set_eventfds(IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [7])
    assert request == struct.pack("=IIIIIi", 24, 0x24, 0, 0, 1, 7)
    unbind = uapi.irq_set_eventfds(IrqIndex.ERR, IrqSetFlag.ACTION_TRIGGER, [-1])
    assert struct.unpack("=IIIIIi", unbind)[2:] == (3, 0, 1, -1)


def test_kernel_datapath_requests() -> None:
    """docs/intx-eoi.md §14: the unmask eventfd (ACTION_UNMASK|DATA_EVENTFD = 0x14) and the
    trigger (ACTION_TRIGGER|DATA_EVENTFD = 0x24), INTx, start 0, count 1."""
    assert uapi.intx_unmask_eventfd(9) == struct.pack("=IIIIIi", 24, 0x14, 0, 0, 1, 9)
    assert struct.pack("=IIIIIi", 24, 0x14, 0, 0, 1, -1) == uapi.UNBIND_INTX_UNMASK
    assert uapi.intx_trigger(9) == struct.pack("=IIIIIi", 24, 0x24, 0, 0, 1, 9)


def test_region_offsets_and_flag_names() -> None:
    assert uapi.region_offset(uapi.RegionIndex.CONFIG) == 0x70000000000
    assert uapi.flag_names(uapi.IrqInfoFlag(7)) == "EVENTFD|MASKABLE|AUTOMASKED"
    assert uapi.flag_names(uapi.IrqInfoFlag(0)) == "0"


# --- the real syscalls: failures are OSError with the kernel's errno ------------------------


def test_kernel_api_raises_oserror_on_a_non_vfio_fd(tmp_path: Path) -> None:
    api: VfioApi = KernelVfio()
    with pytest.raises(FileNotFoundError):
        api.open(tmp_path / "vfio")
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        for call in (lambda: api.get_api_version(fd),
                     lambda: api.group_get_status(fd),
                     lambda: api.group_get_device_fd(fd, EDU),
                     lambda: api.device_get_irq_info(fd, 0),
                     lambda: api.device_set_irqs(fd, uapi.UNMASK_INTX),
                     api.prepare_set_irqs(fd, uapi.UNMASK_INTX)):
            with pytest.raises(OSError, match="Inappropriate ioctl") as exc:
                call()
            assert exc.value.errno == errno.ENOTTY
        dup = api.dup(fd)
        assert dup != fd
        api.close(dup)
        assert api.pwrite(fd, b"x", 0) == 1
        assert api.pread(fd, 4, 0) == b""
    finally:
        os.close(fd)


# --- the twin models the kernel -------------------------------------------------------------


@pytest.fixture
def twin(tmp_path: Path) -> FakeVfio:
    api = FakeVfio(tmp_path)
    api.add(FakeFunction(EDU, 3))
    api.add(FakeFunction("0000:00:11.0", 4, pcie=True))
    return api


def _device(api: FakeVfio, tmp_path: Path, address: str = EDU, group: str = "3") -> int:
    container = api.open(tmp_path / "vfio" / "vfio")
    g = api.open(tmp_path / "vfio" / group)
    api.group_set_container(g, container)
    api.set_iommu(container, IommuType.TYPE1V2)
    return api.group_get_device_fd(g, address)


@pytest.fixture
def device(twin: FakeVfio, tmp_path: Path) -> int:
    return _device(twin, tmp_path)


def _errno(call: object, *args: object) -> int:
    """The errno ``call(*args)`` fails with (the kernel's answer is the errno itself)."""
    assert callable(call)
    try:
        call(*args)
    except OSError as exc:
        return exc.errno or 0
    raise AssertionError(f"{call} succeeded")


def test_container_and_group_order(twin: FakeVfio, tmp_path: Path) -> None:
    container = twin.open(tmp_path / "vfio" / "vfio")
    assert twin.get_api_version(container) == 0
    assert twin.check_extension(container, IommuType.TYPE1V2)
    assert not twin.check_extension(container, IommuType.NOIOMMU)
    assert _errno(twin.set_iommu, container, IommuType.TYPE1V2) == errno.EINVAL  # no group
    group = twin.open(tmp_path / "vfio" / "3")
    assert _errno(twin.open, tmp_path / "vfio" / "3") == errno.EBUSY
    assert twin.group_get_status(group) == uapi.GroupFlag.VIABLE
    assert _errno(twin.group_get_device_fd, group, EDU) == errno.EINVAL  # no IOMMU yet
    twin.group_set_container(group, container)
    assert _errno(twin.group_set_container, group, container) == errno.EINVAL
    twin.set_iommu(container, IommuType.TYPE1V2)
    assert _errno(twin.set_iommu, container, IommuType.TYPE1V2) == errno.EINVAL  # already
    assert twin.group_get_status(group) == uapi.GroupFlag.VIABLE | uapi.GroupFlag.CONTAINER_SET
    assert _errno(twin.group_get_device_fd, group, "0000:00:11.0") == errno.ENODEV  # group 4
    fd = twin.group_get_device_fd(group, EDU)
    assert _errno(twin.group_unset_container, group) == errno.EBUSY  # device open
    twin.close(fd)
    twin.group_unset_container(group)
    assert _errno(twin.get_api_version, group) == errno.ENOTTY
    assert _errno(twin.get_api_version, 3) == errno.EBADF
    twin.close(group)
    twin.close(container)
    assert twin.open_fds() == []


def test_unviable_group_cannot_join_a_container(twin: FakeVfio, tmp_path: Path) -> None:
    twin.add(FakeFunction("0000:00:10.1", 3, driver="e1000e"))
    container = twin.open(tmp_path / "vfio" / "vfio")
    group = twin.open(tmp_path / "vfio" / "3")
    assert twin.group_get_status(group) == uapi.GroupFlag(0)
    assert _errno(twin.group_set_container, group, container) == errno.EBUSY


def test_noiommu_containers_take_only_noiommu(tmp_path: Path) -> None:
    api = FakeVfio(tmp_path, noiommu=True)
    api.add(FakeFunction(EDU, 3))
    api.set_noiommu(3)
    container = api.open(tmp_path / "vfio" / "vfio")
    group = api.open(tmp_path / "vfio" / "noiommu-3")
    api.group_set_container(group, container)
    assert not api.check_extension(container, IommuType.TYPE1V2)
    assert _errno(api.set_iommu, container, IommuType.TYPE1V2) == errno.ENODEV
    api.set_iommu(container, IommuType.NOIOMMU)
    api.close(api.group_get_device_fd(group, EDU))


def test_irq_info(twin: FakeVfio, device: int, tmp_path: Path) -> None:
    intx = twin.device_get_irq_info(device, IrqIndex.INTX)
    assert (intx.count, uapi.flag_names(intx.flags)) == (1, "EVENTFD|MASKABLE|AUTOMASKED")
    assert _errno(twin.device_get_irq_info, device, IrqIndex.ERR) == errno.EINVAL  # not PCIe
    assert twin.device_get_irq_info(device, IrqIndex.REQ).count == 1
    assert _errno(twin.device_get_irq_info, device, 5) == errno.EINVAL
    pcie = _device(twin, tmp_path, "0000:00:11.0", "4")
    assert twin.device_get_irq_info(pcie, IrqIndex.ERR).count == 1


@pytest.mark.parametrize(("request_", "code"), [
    (uapi.irq_set(0, IrqSetFlag.DATA_NONE | IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_UNMASK),
     errno.EINVAL),  # two data types
    (uapi.irq_set(0, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_MASK | IrqSetFlag.ACTION_UNMASK),
     errno.ENOTTY),  # two actions
    (uapi.irq_set(0, IrqSetFlag.DATA_NONE | IrqSetFlag(1 << 6) | IrqSetFlag.ACTION_UNMASK),
     errno.EINVAL),  # unknown flag
    (uapi.irq_set(0, IrqSetFlag.DATA_EVENTFD | IrqSetFlag.ACTION_TRIGGER, count=1),
     errno.EINVAL),  # eventfd data missing
    (uapi.irq_set(0, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER, start=1),
     errno.EINVAL),  # INTx has one vector
    (uapi.irq_set(0, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK, count=0),
     errno.EINVAL),  # count 0 only for DATA_NONE|TRIGGER
    (uapi.irq_set(3, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER), errno.EINVAL),  # ERR
    (uapi.irq_set(9, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_TRIGGER), errno.EINVAL),
    (uapi.UNMASK_INTX, errno.EINVAL),  # INTx not enabled
    (uapi.MASK_INTX, errno.EINVAL),
    (uapi.DISABLE_INTX, errno.EINVAL),
    (uapi.LOOPBACK_INTX, errno.EINVAL),
    (uapi.irq_set(4, IrqSetFlag.DATA_NONE | IrqSetFlag.ACTION_UNMASK), errno.ENOTTY),  # REQ
])
def test_set_irqs_validation(twin: FakeVfio, device: int, request_: bytes, code: int) -> None:
    assert _errno(twin.device_set_irqs, device, request_) == code


def test_set_irqs_eventfd_checks(twin: FakeVfio, device: int) -> None:
    trigger = uapi.irq_set_eventfds(IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [999_999])
    assert _errno(twin.device_set_irqs, device, trigger) == errno.EBADF
    null = os.open("/dev/null", os.O_RDONLY)
    efd, ufd, ufd2 = (os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3))
    try:
        not_eventfd = uapi.irq_set_eventfds(IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [null])
        assert _errno(twin.device_set_irqs, device, not_eventfd) == errno.EINVAL
        twin.device_set_irqs(device, uapi.irq_set_eventfds(
            IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [efd]))
        os.close(efd)  # the kernel holds its own reference: still signalled
        fn = twin.functions[EDU]
        fn.assert_line()
        assert fn.trigger is not None
        assert os.eventfd_read(fn.trigger) == 1
        mask_eventfd = uapi.irq_set_eventfds(IrqIndex.INTX, IrqSetFlag.ACTION_MASK, [ufd])
        assert _errno(twin.device_set_irqs, device, mask_eventfd) == errno.ENOTTY
        virqfd = uapi.irq_set_eventfds(IrqIndex.INTX, IrqSetFlag.ACTION_UNMASK, [ufd])
        twin.device_set_irqs(device, virqfd)
        assert _errno(twin.device_set_irqs, device, uapi.irq_set_eventfds(
            IrqIndex.INTX, IrqSetFlag.ACTION_UNMASK, [ufd2])) == errno.EBUSY  # docs/intx-eoi.md §12
        twin.device_set_irqs(device, uapi.irq_set_eventfds(
            IrqIndex.INTX, IrqSetFlag.ACTION_UNMASK, [-1]))
        twin.device_set_irqs(device, uapi.DISABLE_INTX)
        assert fn.trigger is None
        assert fn.unmask_virqfd is None
    finally:
        for fd in (null, ufd, ufd2):
            os.close(fd)


def test_trigger_minus_one_leaves_intx_enabled_but_silent(twin: FakeVfio, device: int) -> None:
    """docs/intx-eoi.md §4: the handler still auto-masks, nobody is told."""
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        twin.device_set_irqs(device, uapi.irq_set_eventfds(
            IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [efd]))
        twin.device_set_irqs(device, uapi.irq_set_eventfds(
            IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [-1]))
        fn = twin.functions[EDU]
        fn.assert_line()
        assert fn.irq_type == "intx"
        assert fn.masked
        assert fn.signals == 0
    finally:
        os.close(efd)


def test_bool_data_and_request_loopback(twin: FakeVfio, device: int) -> None:
    efd, req = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        twin.device_set_irqs(device, uapi.irq_set_eventfds(
            IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [efd]))
        twin.device_set_irqs(device, uapi.irq_set(
            IrqIndex.INTX, IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER, data=b"\0"))
        twin.device_set_irqs(device, uapi.irq_set(
            IrqIndex.INTX, IrqSetFlag.DATA_BOOL | IrqSetFlag.ACTION_TRIGGER, data=b"\1"))
        assert os.eventfd_read(efd) == 1
        twin.device_set_irqs(device, uapi.irq_set_eventfds(
            IrqIndex.REQ, IrqSetFlag.ACTION_TRIGGER, [req]))
        twin.device_set_irqs(device, uapi.loopback_irq(IrqIndex.REQ))
        assert os.eventfd_read(req) == 1
        twin.device_set_irqs(device, uapi.disable_irq(IrqIndex.REQ))
        assert twin.functions[EDU].req_trigger is None
    finally:
        os.close(efd)
        os.close(req)


def test_cdev_needs_bind_before_device_ioctls(tmp_path: Path) -> None:
    api = FakeVfio(tmp_path, iommufd=True)
    api.add(FakeFunction(EDU, 3))
    fd = api.open(tmp_path / "vfio" / "devices" / "vfio0")
    iommufd = api.open(tmp_path / "iommu")
    assert _errno(api.device_get_info, fd) == errno.EINVAL
    assert api.device_bind_iommufd(fd, iommufd) == 1
    assert _errno(api.device_bind_iommufd, fd, iommufd) == errno.EINVAL
    assert _errno(api.device_attach_iommufd_pt, fd, 42) == errno.ENOENT
    api.device_attach_iommufd_pt(fd, api.ioas_alloc(iommufd))
    assert api.device_get_info(fd).num_irqs == 5
    assert _errno(api.open, tmp_path / "vfio" / "devices" / "vfio9") == errno.ENOENT
    api.close(fd)
    api.close(iommufd)


def test_shared_host_irq_needs_disintx(tmp_path: Path) -> None:
    """docs/intx-eoi.md §7: request_irq is shared only for DisINTx devices; otherwise EBUSY."""
    api = FakeVfio(tmp_path)
    api.add(FakeFunction(EDU, 3, irq=20))
    api.add(FakeFunction("0000:00:14.0", 5, irq=20))
    api.add(FakeFunction("0000:00:18.0", 6, irq=20, pci_2_3=False))
    a = _device(api, tmp_path, EDU, "3")
    c = _device(api, tmp_path, "0000:00:14.0", "5")
    x = _device(api, tmp_path, "0000:00:18.0", "6")
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
    try:
        for dev, efd in ((a, fds[0]), (c, fds[1])):
            api.device_set_irqs(dev, uapi.irq_set_eventfds(
                IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [efd]))
        enable_x = uapi.irq_set_eventfds(IrqIndex.INTX, IrqSetFlag.ACTION_TRIGGER, [fds[2]])
        assert _errno(api.device_set_irqs, x, enable_x) == errno.EBUSY
        assert api.functions["0000:00:18.0"].irq_type == "none"
    finally:
        for fd in fds:
            os.close(fd)
