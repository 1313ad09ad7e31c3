"""VfioDevice and open_vfio_device against the kernel twin and fixture sysfs trees.

The twin is the only way to exercise the no-IOMMU and iommufd paths: no Debian
kernel enables them. The same INTx semantics are checked against the real
vfio-pci driver in tests/vm.
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eoid.device import DeviceEvent, IntxDevice
from eoid.errors import VfioError
from eoid.vfio import uapi
from eoid.vfio.device import VfioDevice, open_vfio_device
from eoid.vfio.procirq import IrqCounter
from eoid.vfio.twin import FakeFunction, FakeVfio

EDU = "0000:00:10.0"


@dataclass
class Host:
    api: FakeVfio
    sysfs: Path
    proc: Path
    dev: Path

    def open(self, address: str = EDU, name: str = "edu0", *,
             request_irqs: bool = True) -> VfioDevice:
        self.api.write_tree(self.sysfs, self.proc, self.dev)
        return open_vfio_device(name, address, sysfs_root=self.sysfs, dev_root=self.dev,
                                api=self.api, request_irqs=request_irqs,
                                irqs=IrqCounter(self.proc, self.sysfs))

    def fn(self, address: str = EDU) -> FakeFunction:
        return self.api.functions[address]


def make_host(tmp_path: Path, *functions: FakeFunction, **kwargs: bool) -> Host:
    dev = tmp_path / "dev"
    api = FakeVfio(dev, **kwargs)
    for fn in functions or (FakeFunction(EDU, 3),):
        api.add(fn)
    return Host(api, tmp_path / "sys", tmp_path / "proc", dev)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return make_host(tmp_path)


@pytest.fixture
def trigger() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


def pending(fd: int) -> int:
    """The eventfd's counter, consumed; 0 if it was not signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# --- opening ------------------------------------------------------------------------


def test_group_path_prefers_type1v2_and_holds_device_group_container(host: Host) -> None:
    device = host.open()
    assert device.info.backend == "vfio"
    assert device.info.pci_address == EDU
    assert device.info.detail["api"] == "group"
    assert device.info.detail["iommu"] == "type1v2"
    assert device.info.detail["iommu_group"] == "3"
    assert set(device.held_fds()) == {"device", "group", "container"}
    calls = host.api.calls
    assert calls.index("GROUP_SET_CONTAINER") < calls.index("SET_IOMMU") < calls.index(
        "GROUP_GET_DEVICE_FD")
    device.close()
    assert host.api.open_fds() == []


def test_type1_when_the_kernel_lacks_type1v2(tmp_path: Path) -> None:
    host = make_host(tmp_path, type1v2=False)
    device = host.open()
    assert device.info.detail["iommu"] == "type1"
    device.close()


def test_noiommu_group_uses_the_noiommu_backend(tmp_path: Path) -> None:
    host = make_host(tmp_path, noiommu=True)
    host.api.set_noiommu(3)
    device = host.open()
    assert device.info.detail["iommu"] == "noiommu"
    assert (host.dev / "vfio" / "noiommu-3").exists()
    device.close()


def test_noiommu_group_without_noiommu_mode_fails_clearly(tmp_path: Path) -> None:
    host = make_host(tmp_path, noiommu=False)
    host.api.set_noiommu(3)
    with pytest.raises(VfioError, match=r"NOIOMMU.*enable_unsafe_noiommu_mode") as exc:
        host.open()
    assert exc.value.op == "set iommu"
    assert host.api.open_fds() == []


def test_iommufd_cdev_path_binds_and_attaches(tmp_path: Path) -> None:
    host = make_host(tmp_path, iommufd=True)
    device = host.open()
    assert device.info.detail["api"] == "iommufd"
    assert set(device.held_fds()) == {"device", "iommufd"}
    assert host.api.calls[:3] == ["BIND_IOMMUFD", "IOAS_ALLOC", "ATTACH_IOMMUFD_PT"]
    assert "GROUP_SET_CONTAINER" not in host.api.calls
    device.close()
    assert host.api.open_fds() == []


def test_iommufd_second_open_is_refused_and_group_open_too(tmp_path: Path) -> None:
    host = make_host(tmp_path, iommufd=True)
    first = host.open()
    with pytest.raises(VfioError, match="already open in another process") as exc:
        host.open(name="again")
    assert (exc.value.op, exc.value.errno) == ("bind iommufd", errno.EINVAL)
    with pytest.raises(OSError, match="Device or resource busy"):
        host.api.open(host.dev / "vfio" / "3")
    first.close()
    host.open().close()
    assert host.api.open_fds() == []


def test_second_open_of_a_group_is_ebusy_and_leaks_nothing(host: Host) -> None:
    first = host.open()
    held = host.api.open_fds()
    with pytest.raises(VfioError, match="open in one process only") as exc:
        host.open(name="other")
    assert (exc.value.op, exc.value.errno) == ("open group", errno.EBUSY)
    assert isinstance(exc.value.__cause__, OSError)
    assert host.api.open_fds() == held
    first.close()


def test_not_bound_to_vfio_pci_says_how_to_bind(tmp_path: Path) -> None:
    host = make_host(tmp_path, FakeFunction(EDU, 3, driver="e1000e"))
    with pytest.raises(VfioError) as exc:
        host.open()
    message = str(exc.value)
    assert exc.value.op == "check driver"
    assert "bound to e1000e, not vfio-pci" in message
    assert f"echo vfio-pci > {host.sysfs}/bus/pci/devices/{EDU}/driver_override" in message
    assert f"echo {EDU} > {host.sysfs}/bus/pci/devices/{EDU}/driver/unbind" in message
    assert f"echo {EDU} > {host.sysfs}/bus/pci/drivers_probe" in message


def test_unbound_device_needs_no_unbind_step(tmp_path: Path) -> None:
    host = make_host(tmp_path, FakeFunction(EDU, 3, driver=None))
    with pytest.raises(VfioError, match="not bound to any driver") as exc:
        host.open()
    assert "unbind" not in str(exc.value)


def test_missing_device_and_bad_address(host: Host) -> None:
    with pytest.raises(VfioError, match=r"no PCI device 0000:07:00\.0"):
        host.open("0000:07:00.0")
    with pytest.raises(VfioError, match="not a PCI address"):
        host.open("7:00.0")


def test_group_with_a_host_driver_names_the_culprit(tmp_path: Path) -> None:
    host = make_host(tmp_path, FakeFunction("0000:02:00.0", 7),
                     FakeFunction("0000:02:00.1", 7, driver="e1000e"))
    with pytest.raises(VfioError) as exc:
        host.open("0000:02:00.0")
    assert exc.value.op == "check group"
    assert "group 7 also holds 0000:02:00.1, which is bound to e1000e, not vfio-pci" in str(
        exc.value)


def test_group_peer_on_pci_stub_keeps_the_group_viable(tmp_path: Path) -> None:
    host = make_host(tmp_path, FakeFunction("0000:02:00.0", 7),
                     FakeFunction("0000:02:00.1", 7, driver="pci-stub"))
    host.open("0000:02:00.0").close()


def test_kernel_says_unviable_even_if_sysfs_looked_fine(host: Host) -> None:
    host.api.write_tree(host.sysfs, host.proc, host.dev)
    host.api.add(FakeFunction("0000:00:10.1", 3, driver="snd_hda_intel"))  # appeared later
    with pytest.raises(VfioError, match="group 3 is not viable") as exc:
        open_vfio_device("edu0", EDU, sysfs_root=host.sysfs, dev_root=host.dev, api=host.api)
    assert exc.value.op == "get group status"
    assert host.api.open_fds() == []


def test_no_interrupt_remapping_is_eperm_with_a_hint(tmp_path: Path) -> None:
    host = make_host(tmp_path, interrupt_remapping=False)
    with pytest.raises(VfioError, match="allow_unsafe_interrupts=1") as exc:
        host.open()
    assert (exc.value.op, exc.value.errno) == ("set iommu", errno.EPERM)


@pytest.mark.parametrize(("fn", "expected"), [
    (FakeFunction(EDU, 3, nointx=True), r"INTx hidden by a quirk \(count 0\)"),
    (FakeFunction(EDU, 3, interrupt_pin=0), "no interrupt pin"),
    (FakeFunction(EDU, 3, is_vf=True), "virtual functions have no INTx"),
])
def test_no_intx_is_explained(tmp_path: Path, fn: FakeFunction, expected: str) -> None:
    host = make_host(tmp_path, fn)
    with pytest.raises(VfioError, match=expected) as exc:
        host.open()
    assert exc.value.op == "get irq info"
    assert host.api.open_fds() == []  # the half-opened device was closed again
    assert host.api.open_groups == set()


def test_missing_group_node(host: Host) -> None:
    host.api.write_tree(host.sysfs, host.proc, host.dev)
    (host.dev / "vfio" / "3").unlink()
    with pytest.raises(VfioError, match=r"no .*/vfio/3 .*is vfio-pci loaded"):
        open_vfio_device("edu0", EDU, sysfs_root=host.sysfs, dev_root=host.dev, api=host.api)


# --- INTx semantics ---------------------------------------------------------------------


def test_enable_masks_routes_then_unmasks(host: Host, trigger: int) -> None:
    device = host.open()
    host.api.calls.clear()
    device.enable(trigger)
    assert host.api.calls == [
        "SET_IRQS(INTX,DATA_EVENTFD|ACTION_TRIGGER,0,1)",
        "SET_IRQS(INTX,DATA_NONE|ACTION_MASK,0,1)",
        "SET_IRQS(INTX,DATA_NONE|ACTION_UNMASK,0,1)",
    ]
    assert host.fn().irq_type == "intx"
    assert not host.fn().masked
    device.close()


def test_auto_mask_and_unmask_semantics(host: Host, trigger: int) -> None:
    device = host.open()
    device.enable(trigger)
    fn = host.fn()
    fn.assert_line()
    assert pending(trigger) == 1
    assert fn.masked
    fn.deassert_line()
    fn.assert_line()  # a new assertion while masked: nothing
    assert pending(trigger) == 0
    device.unmask()  # still asserted: fires again, stays masked
    assert pending(trigger) == 1
    assert fn.masked
    fn.deassert_line()
    device.unmask()
    assert pending(trigger) == 0
    assert not fn.masked
    device.unmask()  # an extra EOI is harmless
    assert pending(trigger) == 0
    device.close()


def test_enable_picks_up_an_interrupt_already_asserted(host: Host, trigger: int) -> None:
    device = host.open()
    host.fn().assert_line()
    device.enable(trigger)
    assert pending(trigger) >= 1
    assert host.fn().masked
    device.close()


def test_intx_masking_is_detected(tmp_path: Path, trigger: int) -> None:
    host = make_host(tmp_path, FakeFunction(EDU, 3),
                     FakeFunction("0000:00:11.0", 4, pci_2_3=False, irq=11))
    a, b = host.open(), host.open("0000:00:11.0", name="b")
    assert a.intx_masking == "unknown"
    a.enable(trigger)
    b.enable(trigger)
    assert a.intx_masking == "disintx"
    assert b.intx_masking == "irqchip"
    assert b.info.detail["intx_masking"] == "irqchip"
    a.close()
    b.close()


def test_shared_line_without_disintx_fails_to_enable_with_advice(
        tmp_path: Path, trigger: int) -> None:
    host = make_host(tmp_path, FakeFunction(EDU, 3, pci_2_3=False, irq=20))
    host.api.irq_handlers[20] = ["ahci[0000:00:1f.2]"]
    device = host.open()
    with pytest.raises(VfioError, match="needs an exclusive line") as exc:
        device.enable(trigger)
    assert (exc.value.op, exc.value.errno) == ("enable INTx", errno.EBUSY)
    device.close()
    assert host.api.open_fds() == []


def test_unmask_after_the_vmm_switched_to_msi_is_a_countable_error(
        host: Host, trigger: int) -> None:
    device = host.open()
    device.enable(trigger)
    host.api.switch_to_msi(EDU)
    with pytest.raises(VfioError, match="no longer enabled") as exc:
        device.unmask()
    assert (exc.value.device, exc.value.op, exc.value.errno) == ("edu0", "unmask", errno.EINVAL)
    assert isinstance(exc.value.__cause__, OSError)
    device.disable()  # tolerated: already disabled under us
    device.close()


def test_disable_stops_signalling_and_is_idempotent(host: Host, trigger: int) -> None:
    device = host.open()
    device.enable(trigger)
    device.disable()
    device.disable()
    host.fn().assert_line()
    assert pending(trigger) == 0
    assert host.fn().trigger is None
    with pytest.raises(VfioError, match="no longer enabled"):
        device.unmask()
    device.enable(trigger)  # re-enable picks up the asserted line (maybe coalesced: >1)
    assert pending(trigger) >= 1
    device.close()


def test_trigger_swap_on_a_live_line_masks_first(host: Host, trigger: int) -> None:
    device = host.open()
    device.enable(trigger)
    other = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        host.api.calls.clear()
        device.enable(other)
        assert host.api.calls[0] == "SET_IRQS(INTX,DATA_NONE|ACTION_MASK,0,1)"
        assert host.api.calls[-1] == "SET_IRQS(INTX,DATA_NONE|ACTION_UNMASK,0,1)"
        host.fn().assert_line()
        assert (pending(trigger), pending(other)) == (0, 1)
    finally:
        device.close()
        os.close(other)


def test_loopback_signals_without_masking(host: Host, trigger: int) -> None:
    device = host.open()
    device.enable(trigger)
    device.loopback()
    assert pending(trigger) == 1
    assert not host.fn().masked
    device.close()


def test_guest_disintx_blocks_signal_and_unmask(host: Host, trigger: int) -> None:
    device = host.open()
    device.enable(trigger)
    command = device.read_config(uapi.PCI_COMMAND, 2)
    device.write_config(uapi.PCI_COMMAND, 2, command | uapi.PCI_COMMAND_INTX_DISABLE)
    assert device.intx_disabled_by_guest()
    host.fn().assert_line()
    device.unmask()
    assert pending(trigger) == 0
    device.write_config(uapi.PCI_COMMAND, 2, command)  # clearing it unmasks
    assert pending(trigger) == 1
    device.close()


def test_edu_bar0_round_trip(host: Host, trigger: int) -> None:
    device = host.open()
    device.enable(trigger)
    bar0 = uapi.RegionIndex.BAR0
    assert int.from_bytes(device.read_region(bar0, 0, 4), "little") == 0x010000ED
    device.write_region(bar0, 0x60, (1).to_bytes(4, "little"))
    assert pending(trigger) == 1
    device.write_region(bar0, 0x64, (1).to_bytes(4, "little"))
    device.unmask()
    assert pending(trigger) == 0
    device.close()


# --- events, fds, lifecycle ---------------------------------------------------------------


def test_request_event_and_close_completes_the_unbind(host: Host, trigger: int) -> None:
    device = host.open()
    device.enable(trigger)
    (req,) = device.event_fds()  # conventional PCI: no ERR index
    assert not device.err_supported
    assert host.api.request_release(EDU) is False
    assert select.select([req], [], [], 0)[0] == [req]
    assert device.read_event(req) is DeviceEvent.REQUEST
    assert device.read_event(req) is None  # consumed
    assert host.fn().driver == "vfio-pci"  # the unbind is blocked until we let go
    device.close()
    assert host.fn().driver is None
    assert host.api.open_fds() == []


def test_error_event_on_pcie(tmp_path: Path, trigger: int) -> None:
    host = make_host(tmp_path, FakeFunction(EDU, 3, pcie=True))
    device = host.open()
    assert device.err_supported
    assert device.info.detail["err_irq"] == "yes"
    fds = device.event_fds()
    assert len(fds) == 2
    host.api.report_error(EDU)
    events = {device.read_event(fd) for fd in fds}
    assert events == {DeviceEvent.ERROR, None}
    assert device.read_event(12345) is None
    device.close()
    assert host.fn().err_trigger is None
    assert host.fn().req_trigger is None


def test_request_irqs_can_be_turned_off(host: Host) -> None:
    device = host.open(request_irqs=False)
    assert device.event_fds() == []
    device.close()


def test_close_is_idempotent_releases_everything_and_unmask_then_fails(
        host: Host, trigger: int) -> None:
    device = host.open()
    device.enable(trigger)
    device.close()
    device.close()
    assert device.closed
    assert host.api.open_fds() == []
    assert host.fn().irq_type == "none"
    assert host.fn().trigger is None
    with pytest.raises(VfioError, match="unmask"):
        device.unmask()


def test_fd_for_consumer_keeps_the_device_open(host: Host, trigger: int) -> None:
    device = host.open()
    shared = device.fd_for_consumer()
    device.close()
    assert host.fn().open_count == 1
    # the device fd holds its group: nobody else can open the group meanwhile
    with pytest.raises(VfioError, match="open in one process only"):
        host.open(name="other")
    host.api.close(shared)
    assert host.fn().open_count == 0
    host.open(name="other").close()


def test_adopt_from_held_fds_takes_over_a_pending_interrupt(host: Host, trigger: int) -> None:
    old = host.open()
    old.enable(trigger)
    host.fn().assert_line()  # fires into the old trigger, line auto-masked
    assert pending(trigger) == 1
    fds = old.held_fds()
    # the old process is gone; its fds survived in the fd store
    new_trigger = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        device = VfioDevice.adopt("edu0", EDU, fds, api=host.api, sysfs_root=host.sysfs)
        assert device.info.detail["iommu"] == "adopted"
        device.enable(new_trigger)
        assert pending(new_trigger) == 1  # still asserted: re-fired at the final unmask
        assert pending(trigger) == 0
        assert host.api.request_release(EDU) is False
        (req,) = device.event_fds()
        assert device.read_event(req) is DeviceEvent.REQUEST
        device.close()
    finally:
        os.close(new_trigger)


def test_adopt_with_intx_disabled_enables_it(host: Host, trigger: int) -> None:
    old = host.open(request_irqs=False)
    device = VfioDevice.adopt("edu0", EDU, old.held_fds(), api=host.api,
                              request_irqs=False, sysfs_root=host.sysfs)
    device.enable(trigger)
    host.fn().assert_line()
    assert pending(trigger) == 1
    device.close()


def test_adopt_without_a_device_fd_closes_what_it_got(host: Host) -> None:
    old = host.open()
    fds = old.held_fds()
    del fds["device"]
    with pytest.raises(VfioError, match="no device fd"):
        VfioDevice.adopt("edu0", EDU, fds, api=host.api)
    assert host.api.open_fds() == [old.held_fds()["device"]]
    host.api.close(old.held_fds()["device"])
    assert host.api.open_groups == set()  # the group is free for a fresh open


def test_failed_adoption_closes_the_fds(host: Host) -> None:
    old = host.open(request_irqs=False)
    fds = old.held_fds()
    host.api.functions[EDU].nointx = True  # e.g. the device changed under us
    with pytest.raises(VfioError, match="INTx hidden"):
        VfioDevice.adopt("edu0", EDU, fds, api=host.api, sysfs_root=host.sysfs)
    assert host.api.open_fds() == []


def test_reset(tmp_path: Path, trigger: int) -> None:
    host = make_host(tmp_path, FakeFunction(EDU, 3, reset_works=True))
    device = host.open()
    device.enable(trigger)
    host.fn().assert_line()
    assert pending(trigger) == 1
    assert device.reset()  # the device deasserts; the unmask re-arms the line
    assert host.fn().resets == 1
    assert not host.fn().masked
    device.close()


def test_reset_unsupported(host: Host) -> None:
    device = host.open()
    assert not device.supports_reset
    assert not device.reset()
    assert host.fn().resets == 0
    device.close()


def test_vfio_device_is_an_intx_device(host: Host) -> None:
    device: IntxDevice = host.open()
    device.close()


# --- the kernel's datapath: route, kernel_interrupts (docs/intx-eoi.md §14) -----------------


@dataclass
class Consumer:
    """A consumer's two eventfds, as a VMM would hold them."""

    irq: int
    eoi: int

    def eoi_now(self) -> None:
        os.eventfd_write(self.eoi, 1)


@pytest.fixture
def consumer() -> Iterator[Consumer]:
    c = Consumer(*(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)))
    yield c
    os.close(c.irq)
    os.close(c.eoi)


def intx_calls(api: FakeVfio) -> list[str]:
    return [c for c in api.calls if c.startswith("SET_IRQS(INTX")]


BIND = "SET_IRQS(INTX,DATA_EVENTFD|ACTION_UNMASK,0,1)"
SWAP = "SET_IRQS(INTX,DATA_EVENTFD|ACTION_TRIGGER,0,1)"


def test_route_binds_the_unmask_first_and_swaps_the_trigger_second(
        host: Host, trigger: int, consumer: Consumer) -> None:
    device = host.open()
    device.enable(trigger)
    host.api.calls.clear()
    device.route(consumer.irq, consumer.eoi)
    assert intx_calls(host.api) == [BIND, SWAP]  # nothing masked, nothing unmasked
    host.api.calls.clear()
    device.route(trigger, None)
    assert intx_calls(host.api) == [SWAP, BIND]  # the second one is fd -1: unbind
    assert host.fn().unmask_virqfd is None
    device.close()


def test_on_the_kernel_path_the_kernel_signals_and_unmasks_without_eoid(
        host: Host, trigger: int, consumer: Consumer) -> None:
    device = host.open()
    device.enable(trigger)
    device.route(consumer.irq, consumer.eoi)
    fn = host.fn()
    host.api.calls.clear()
    for _ in range(3):
        fn.bar0_write(0x60, 1)  # raise
        assert pending(consumer.irq) == 1
        assert pending(trigger) == 0
        assert fn.masked
        fn.bar0_write(0x64, 1)  # the consumer services the device...
        consumer.eoi_now()  # ...and ends the interrupt: the virqfd unmasks
        fn.virqfd_poll()
        assert not fn.masked
    assert host.api.calls == []  # eoid issued nothing
    assert fn.virqfd_unmasks == 3
    device.close()


def test_an_eoi_while_still_asserted_re_signals_the_consumer(
        host: Host, trigger: int, consumer: Consumer) -> None:
    device = host.open()
    device.enable(trigger)
    device.route(consumer.irq, consumer.eoi)
    fn = host.fn()
    fn.bar0_write(0x60, 1)
    assert pending(consumer.irq) == 1
    consumer.eoi_now()  # not serviced: the line is still asserted (docs/intx-eoi.md §2)
    fn.virqfd_poll()
    assert fn.masked
    assert pending(consumer.irq) == 1
    device.close()


@pytest.mark.parametrize("fired", [True, False])
def test_route_keeps_the_masked_state_both_ways(
        host: Host, trigger: int, consumer: Consumer, fired: bool) -> None:
    device = host.open()
    device.enable(trigger)
    fn = host.fn()
    if fired:
        fn.assert_line()  # forwarded by eoid, not yet ended: masked
        assert pending(trigger) == 1
    device.route(consumer.irq, consumer.eoi)
    assert fn.masked is fired
    assert pending(consumer.irq) == 0  # no re-signal: nothing was unmasked
    device.route(trigger, None)
    assert fn.masked is fired
    assert pending(trigger) == 0
    if fired:  # eoid's EOI of the interrupt it forwarded before the switches
        fn.deassert_line()
        device.unmask()
        assert not fn.masked
    device.close()


def test_an_eoi_of_a_relayed_interrupt_reaches_the_kernel_after_the_switch(
        host: Host, trigger: int, consumer: Consumer) -> None:
    device = host.open()
    device.enable(trigger)
    fn = host.fn()
    fn.assert_line()  # relayed; the consumer services it on the kernel's path
    device.route(consumer.irq, consumer.eoi)
    fn.deassert_line()
    consumer.eoi_now()
    fn.virqfd_poll()
    assert not fn.masked
    device.close()


def test_a_count_already_in_the_eoi_eventfd_unmasks_at_bind_and_stays(
        host: Host, trigger: int, consumer: Consumer) -> None:
    device = host.open()
    device.enable(trigger)
    fn = host.fn()
    fn.assert_line()
    fn.deassert_line()
    consumer.eoi_now()  # the consumer ended it before the switch
    device.route(consumer.irq, consumer.eoi)
    assert not fn.masked  # vfio_virqfd_enable ran the unmask...
    fn.virqfd_poll()
    assert fn.virqfd_unmasks == 1  # ...once: the count it found is no new signal
    assert pending(consumer.eoi) == 1  # ...and left the count where it was
    device.close()


def test_after_unbinding_an_eoi_no_longer_unmasks(
        host: Host, trigger: int, consumer: Consumer) -> None:
    device = host.open()
    device.enable(trigger)
    device.route(consumer.irq, consumer.eoi)
    device.route(trigger, None)
    fn = host.fn()
    fn.assert_line()
    assert pending(trigger) == 1  # eoid's trigger again
    assert pending(consumer.irq) == 0
    fn.deassert_line()
    consumer.eoi_now()
    fn.virqfd_poll()
    assert fn.masked  # eoid reads the eoi eventfd now, and unmasks itself
    assert pending(consumer.eoi) == 1
    device.close()


def test_kernel_to_kernel_rebinds_the_new_eoi_eventfd(
        host: Host, trigger: int, consumer: Consumer) -> None:
    other = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        device = host.open()
        device.enable(trigger)
        device.route(consumer.irq, consumer.eoi)
        device.route(consumer.irq, other)  # no EBUSY: the old one is unbound first
        fn = host.fn()
        fn.assert_line()
        fn.deassert_line()
        os.eventfd_write(other, 1)
        fn.virqfd_poll()
        assert not fn.masked
        device.close()
    finally:
        os.close(other)


def test_route_failures_are_vfio_errors_with_hints(
        host: Host, trigger: int, consumer: Consumer) -> None:
    device = host.open()
    with pytest.raises(VfioError, match="INTx is not enabled"):
        device.route(consumer.irq, consumer.eoi)
    device.enable(trigger)
    closed = os.eventfd(0)
    os.close(closed)
    with pytest.raises(VfioError, match=r"bind unmask eventfd: .*eoi fd is closed") as e:
        device.route(consumer.irq, closed)
    assert e.value.errno == errno.EBADF
    # a VMM (or another eoid) bound its resamplefd already
    vmm = os.eventfd(0, os.EFD_NONBLOCK)
    fd = device.held_fds()["device"]
    host.api.device_set_irqs(fd, uapi.intx_unmask_eventfd(vmm))
    with pytest.raises(VfioError, match="another unmask eventfd is bound") as e:
        device.route(consumer.irq, consumer.eoi)
    assert e.value.errno == errno.EBUSY
    host.api.device_set_irqs(fd, uapi.UNBIND_INTX_UNMASK)
    os.close(vmm)
    # the trigger swap fails after the bind: the bind is undone
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(VfioError, match=r"swap trigger: .*not an eventfd") as e:
            device.route(null, consumer.eoi)
    finally:
        os.close(null)
    assert e.value.errno == errno.EINVAL
    assert host.fn().unmask_virqfd is None
    assert host.fn().trigger is not None  # still eoid's
    # the VMM moved the device to MSI under eoid
    host.api.switch_to_msi(EDU)
    with pytest.raises(VfioError, match="no longer enabled"):
        device.route(consumer.irq, consumer.eoi)
    device.close()
    with pytest.raises(VfioError, match="device closed"):
        device.route(trigger, None)


def test_an_adopted_line_left_on_the_kernel_path_comes_back(
        host: Host, trigger: int, consumer: Consumer) -> None:
    old = host.open()
    old.enable(trigger)
    old.route(consumer.irq, consumer.eoi)  # then the old eoid was killed
    device = VfioDevice.adopt("edu0", EDU, old.held_fds(), api=host.api,
                              sysfs_root=host.sysfs, irqs=IrqCounter(host.proc, host.sysfs))
    device.route(trigger, None)
    fn = host.fn()
    assert fn.unmask_virqfd is None
    fn.assert_line()
    assert pending(trigger) == 1
    assert pending(consumer.irq) == 0
    assert device.kernel_interrupts() == 0  # counted from this open on
    device.close()


@pytest.mark.parametrize("sparse_irq", [False, True], ids=["proc-interrupts", "per-cpu-count"])
def test_kernel_interrupts_counts_only_the_kernel_windows(
        tmp_path: Path, trigger: int, consumer: Consumer, sparse_irq: bool) -> None:
    host = make_host(tmp_path, sparse_irq=sparse_irq)
    device = host.open()
    fn = host.fn()

    def fire(n: int, fd: int) -> None:
        for _ in range(n):
            fn.assert_line()
            assert pending(fd) == 1
            fn.deassert_line()
            if fd == consumer.irq:
                consumer.eoi_now()
            else:
                device.unmask()

    device.enable(trigger)
    assert device.kernel_interrupts() == 0
    fire(3, trigger)  # relayed: eoid counts those
    assert device.kernel_interrupts() == 0
    device.route(consumer.irq, consumer.eoi)
    fire(5, consumer.irq)
    assert fn.host_irqs == 8
    device.route(trigger, None)
    assert device.kernel_interrupts() == 5
    fire(2, trigger)
    assert device.kernel_interrupts() == 5
    device.route(consumer.irq, consumer.eoi)
    fire(4, consumer.irq)
    assert device._irqs.source == ("per_cpu_count" if sparse_irq else "/proc/interrupts")
    # while routed the answer may be cached (max_age); a fresh reader sees all of it
    device._irqs.max_age = 0
    assert device.kernel_interrupts() == 9
    device.disable()  # disabling closes the window (and unbinds the unmask)
    fn.host_irqs += 10  # the line is someone else's now: not counted
    assert device.kernel_interrupts() == 9
    device.close()


def test_kernel_interrupts_is_none_when_the_host_count_cannot_be_read(
        host: Host, trigger: int, consumer: Consumer) -> None:
    host.api.write_tree(host.sysfs, host.proc, host.dev)
    nowhere = host.proc.parent / "nowhere"  # e.g. /proc not mounted in eoid's namespace
    device = open_vfio_device("edu0", EDU, sysfs_root=host.sysfs, dev_root=host.dev,
                              api=host.api, irqs=IrqCounter(nowhere, nowhere))
    device.enable(trigger)
    device.route(consumer.irq, consumer.eoi)
    assert device.kernel_interrupts() is None
    device.route(trigger, None)
    assert device.kernel_interrupts() is None  # a window went uncounted: unknown from now
    device.close()


def test_kernel_interrupts_never_goes_down(
        host: Host, trigger: int, consumer: Consumer) -> None:
    """A cached count older than the window's start must not make the answer shrink."""
    device = host.open()
    device.enable(trigger)
    fn = host.fn()
    device.route(consumer.irq, consumer.eoi)
    fn.assert_line()
    fn.deassert_line()
    consumer.eoi_now()
    device._irqs.max_age = 0
    assert device.kernel_interrupts() == 1
    device._irqs.max_age = 3600  # answers come from the cache from now on
    device.route(trigger, None)  # fresh read: 1
    device.route(consumer.irq, consumer.eoi)  # fresh read: the new window starts at 1
    assert device.kernel_interrupts() == 1
    device.close()
