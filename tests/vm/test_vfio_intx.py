"""eoid's VfioDevice against the real vfio-pci driver and QEMU's edu device.

Timeouts are generous (TCG): an interrupt normally arrives in ~40 µs; "nothing
arrives" is watched for QUIET seconds.
"""

from __future__ import annotations

import errno
import os
import select
import time

import pytest

from eoid.device import DeviceEvent
from eoid.errors import VfioError
from eoid.vfio import uapi
from eoid.vfio.device import VfioDevice, open_vfio_device
from eoid.vfio.sysfs import read_pci_function
from tests.vm.edu import (
    EDU_ID,
    Edu,
    bind_vfio,
    driver_of,
    physical_command,
    unbind_in_background,
    wait_fd,
)

pytestmark = pytest.mark.vfio

WAIT = 5.0
QUIET = 0.3


def test_open_uses_type1v2_in_the_devices_iommu_group(edu: Edu) -> None:
    info = edu.device.info
    assert info.backend == "vfio"
    assert info.detail["api"] == "group"
    assert info.detail["iommu"] == "type1v2"
    assert info.detail["iommu_group"] == str(read_pci_function(edu.address).iommu_group)
    assert info.detail["err_irq"] == "no"  # edu is conventional PCI: no AER
    assert set(edu.device.held_fds()) == {"device", "group", "container"}
    assert edu.read32(EDU_ID) & 0xFFFF == 0x00ED


def test_round_trip_and_disintx_masking(edu: Edu, trigger: int) -> None:
    edu.device.enable(trigger)
    assert edu.device.intx_masking == "disintx"  # edu supports PCI 2.3 masking
    edu.raise_irq()
    assert wait_fd(trigger, WAIT) == 1
    assert edu.status() == 1
    # auto-masked by vfio-pci with the device's own INTx-disable bit
    assert physical_command(edu.address) & uapi.PCI_COMMAND_INTX_DISABLE
    edu.ack()
    edu.device.unmask()
    assert not physical_command(edu.address) & uapi.PCI_COMMAND_INTX_DISABLE
    assert wait_fd(trigger, QUIET) is None


def test_no_second_interrupt_until_unmask(edu: Edu, trigger: int) -> None:
    edu.device.enable(trigger)
    edu.raise_irq()
    assert wait_fd(trigger, WAIT) == 1
    edu.ack()
    edu.raise_irq()  # a new assertion while auto-masked
    assert wait_fd(trigger, QUIET) is None
    edu.device.unmask()
    assert wait_fd(trigger, WAIT) == 1
    edu.ack()
    edu.device.unmask()
    assert wait_fd(trigger, QUIET) is None


def test_unmask_while_still_asserted_fires_again(edu: Edu, trigger: int) -> None:
    edu.device.enable(trigger)
    edu.raise_irq()
    assert wait_fd(trigger, WAIT) == 1
    edu.device.unmask()  # not acked: the line is still asserted
    assert wait_fd(trigger, WAIT) == 1
    edu.device.unmask()
    assert wait_fd(trigger, WAIT) == 1
    edu.ack()
    edu.device.unmask()
    assert wait_fd(trigger, QUIET) is None


def test_many_round_trips_each_delivered_once(edu: Edu, trigger: int) -> None:
    edu.device.enable(trigger)
    counts = []
    for _ in range(300):
        edu.raise_irq()
        counts.append(wait_fd(trigger, WAIT))
        edu.ack()
        edu.device.unmask()
    assert counts == [1] * 300
    assert wait_fd(trigger, QUIET) is None


def test_enable_picks_up_an_interrupt_raised_before(edu: Edu, trigger: int) -> None:
    edu.raise_irq()
    edu.device.enable(trigger)
    count = wait_fd(trigger, WAIT)
    assert count is not None
    assert count >= 1  # two signals may coalesce: the enable and the final unmask
    edu.ack()
    edu.device.unmask()
    assert wait_fd(trigger, QUIET) is None


def test_disable_then_enable_again(edu: Edu, trigger: int) -> None:
    edu.device.enable(trigger)
    edu.device.disable()
    edu.raise_irq()
    assert wait_fd(trigger, QUIET) is None
    with pytest.raises(VfioError, match="no longer enabled") as exc:
        edu.device.unmask()
    assert exc.value.errno == errno.EINVAL
    edu.device.enable(trigger)
    assert wait_fd(trigger, WAIT) is not None
    edu.ack()
    edu.device.unmask()
    assert wait_fd(trigger, QUIET) is None


def test_loopback_signals_the_trigger(edu: Edu, trigger: int) -> None:
    edu.device.enable(trigger)
    edu.device.loopback()
    assert wait_fd(trigger, WAIT) == 1
    edu.raise_irq()  # loopback did not mask: a real interrupt still comes
    assert wait_fd(trigger, WAIT) == 1
    edu.ack()
    edu.device.unmask()


def test_intx_switched_off_under_us_is_einval_on_unmask(edu: Edu, trigger: int) -> None:
    """The VMM (here: another fd of the same device) disables INTx, enables MSI
    (docs/intx-eoi.md §5)."""
    edu.device.enable(trigger)
    vmm = edu.device.fd_for_consumer()
    msi = os.eventfd(0, os.EFD_NONBLOCK)
    api = uapi.KernelVfio()
    try:
        with pytest.raises(OSError, match="Invalid argument"):  # INTx still on: refused
            api.device_set_irqs(vmm, uapi.irq_set_eventfds(
                uapi.IrqIndex.MSI, uapi.IrqSetFlag.ACTION_TRIGGER, [msi]))
        api.device_set_irqs(vmm, uapi.DISABLE_INTX)
        api.device_set_irqs(vmm, uapi.irq_set_eventfds(
            uapi.IrqIndex.MSI, uapi.IrqSetFlag.ACTION_TRIGGER, [msi]))
        with pytest.raises(VfioError, match="no longer enabled") as exc:
            edu.device.unmask()
        assert (exc.value.op, exc.value.errno) == ("unmask", errno.EINVAL)
        api.device_set_irqs(vmm, uapi.disable_irq(uapi.IrqIndex.MSI))
    finally:
        os.close(msi)
        os.close(vmm)


def test_a_second_open_of_the_group_is_ebusy(edu: Edu) -> None:
    with pytest.raises(VfioError, match="open in one process only") as exc:
        open_vfio_device("again", edu.address)
    assert (exc.value.op, exc.value.errno) == ("open group", errno.EBUSY)


def test_shared_device_fd_reaches_the_same_device(edu: Edu, trigger: int) -> None:
    edu.device.enable(trigger)
    shared = edu.device.fd_for_consumer()
    try:
        bar0 = edu.device.region(uapi.RegionIndex.BAR0).offset
        os.pwrite(shared, (1).to_bytes(4, "little"), bar0 + 0x60)  # the VMM raises
        assert wait_fd(trigger, WAIT) == 1
        edu.ack()
        edu.device.unmask()
    finally:
        os.close(shared)


def test_unbind_while_held_sends_request_and_close_completes_it(
        edus: list[str], trigger: int) -> None:
    address = edus[0]
    bind_vfio(address)
    device = open_vfio_device("edu0", address)
    try:
        Edu(device)
        device.enable(trigger)
        (req,) = device.event_fds()
        started = time.monotonic()
        unbind = unbind_in_background(address)
        ready, _, _ = select.select([req], [], [], WAIT)
        assert ready == [req], "no device request within 5 s"
        assert device.read_event(req) is DeviceEvent.REQUEST
        assert time.monotonic() - started < 2.0
        time.sleep(QUIET)
        assert unbind.is_alive()  # the unbind blocks while we hold the device
        assert device.read_event(req) in (DeviceEvent.REQUEST, None)  # it keeps asking
    finally:
        device.close()
    unbind.join(WAIT)
    assert not unbind.is_alive(), "unbind still blocked after close"
    assert driver_of(address) is None
    bind_vfio(address)


def test_two_devices_are_independent(edu: Edu, edu_b: Edu) -> None:
    ta = os.eventfd(0, os.EFD_NONBLOCK)
    tb = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        edu.device.enable(ta)
        edu_b.device.enable(tb)
        edu.raise_irq()
        assert wait_fd(ta, WAIT) == 1
        assert wait_fd(tb, QUIET) is None
        edu_b.raise_irq()  # a is still masked; b has its own line state
        assert wait_fd(tb, WAIT) == 1
        assert wait_fd(ta, QUIET) is None
        edu.ack()
        edu.device.unmask()
        edu_b.device.unmask()  # b still asserted: fires again, a stays quiet
        assert wait_fd(tb, WAIT) == 1
        assert wait_fd(ta, QUIET) is None
        edu_b.ack()
        edu_b.device.unmask()
        assert wait_fd(tb, QUIET) is None
    finally:
        edu.device.close()
        edu_b.device.close()
        os.close(ta)
        os.close(tb)


def test_two_devices_sharing_one_host_irq(shared_pair: tuple[Edu, Edu]) -> None:
    """DisINTx devices share a host line; vfio-pci asks each device if it is asserting
    (docs/intx-eoi.md §7)."""
    a, c = shared_pair
    ta, tc = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        a.device.enable(ta)
        c.device.enable(tc)
        assert read_pci_function(a.address).irq == read_pci_function(c.address).irq
        assert (a.device.intx_masking, c.device.intx_masking) == ("disintx", "disintx")
        c.raise_irq()
        assert wait_fd(tc, WAIT) == 1
        assert wait_fd(ta, QUIET) is None
        a.raise_irq()  # c still masked and asserted; a is told separately
        assert wait_fd(ta, WAIT) == 1
        c.ack()
        c.device.unmask()
        assert wait_fd(tc, QUIET) is None
        a.ack()
        a.device.unmask()
        for _ in range(50):  # interleaved round trips on the shared line
            a.raise_irq()
            c.raise_irq()
            assert (wait_fd(ta, WAIT), wait_fd(tc, WAIT)) == (1, 1)
            a.ack()
            c.ack()
            a.device.unmask()
            c.device.unmask()
        assert wait_fd(ta, QUIET) is None
        assert wait_fd(tc, 0) is None
    finally:
        os.close(ta)
        os.close(tc)
        a.device.close()
        c.device.close()


def test_adopt_held_fds_like_a_restarted_daemon(edu: Edu, trigger: int) -> None:
    """The kernel state survives in the fds; a new owner picks up the pending line
    (docs/intx-eoi.md §9)."""
    old = edu.device
    old.enable(trigger)
    edu.raise_irq()
    assert wait_fd(trigger, WAIT) == 1  # delivered to the old owner, never EOIed
    for fd in old.event_fds():  # what dies with the old process
        os.close(fd)
    new_trigger = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        adopted = VfioDevice.adopt("edu0", edu.address, old.held_fds())
        edu.device = adopted  # the fixture closes this one
        adopted.enable(new_trigger)
        assert wait_fd(new_trigger, WAIT) is not None  # still asserted: re-fired
        assert wait_fd(trigger, QUIET) is None
        edu.ack()
        adopted.unmask()
        edu.raise_irq()
        assert wait_fd(new_trigger, WAIT) == 1
        edu.ack()
        adopted.unmask()
    finally:
        os.close(new_trigger)
