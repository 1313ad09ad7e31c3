"""The kernel's datapath (``VfioDevice.route``) on the real vfio-pci driver and QEMU's edu.

With the consumer's eoi eventfd bound as the unmask eventfd and its irq eventfd as the
trigger, the kernel signals the consumer and unmasks on its EOI with no eoid call in
between (docs/intx-eoi.md §12, §14). ``kernel_interrupts`` is read from the guest's own
IRQ counts. The twin's version of these rules is tests/unit/test_vfio_device.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eoid.errors import VfioError
from eoid.vfio import sysfs, uapi
from eoid.vfio.procirq import IrqCounter
from tests.vm.edu import Edu, physical_command, wait_fd

pytestmark = pytest.mark.vfio

WAIT = 5.0
QUIET = 0.3


@dataclass
class Consumer:
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


class CountingApi(uapi.KernelVfio):
    """The real ioctls, counted: proves eoid issues none on the kernel's path."""

    def __init__(self) -> None:
        self.set_irqs = 0

    def device_set_irqs(self, device: int, request: bytes) -> None:
        self.set_irqs += 1
        super().device_set_irqs(device, request)


def masked(edu: Edu) -> bool:
    """DisINTx in the hardware's command register: how vfio-pci masks edu (§1)."""
    return bool(physical_command(edu.address) & uapi.PCI_COMMAND_INTX_DISABLE)


def test_the_kernel_signals_the_consumer_and_unmasks_on_its_eoi(
        edu: Edu, trigger: int, consumer: Consumer) -> None:
    edu.device.enable(trigger)
    edu.device.route(consumer.irq, consumer.eoi)
    api = CountingApi()
    edu.device._api = api  # from here on, any ioctl of eoid's would be counted
    for _ in range(20):
        edu.raise_irq()
        assert wait_fd(consumer.irq, WAIT) == 1
        assert masked(edu)
        edu.ack()
        consumer.eoi_now()  # the kernel's virqfd unmasks inside this write
        assert not masked(edu)
    assert wait_fd(trigger, QUIET) is None  # eoid's trigger saw nothing
    assert api.set_irqs == 0


def test_an_eoi_while_the_device_still_asserts_signals_again(
        edu: Edu, trigger: int, consumer: Consumer) -> None:
    edu.device.enable(trigger)
    edu.device.route(consumer.irq, consumer.eoi)
    edu.raise_irq()
    assert wait_fd(consumer.irq, WAIT) == 1
    consumer.eoi_now()  # not serviced: still asserted, re-signalled, stays masked (§2)
    assert wait_fd(consumer.irq, WAIT) == 1
    assert masked(edu)
    edu.ack()
    consumer.eoi_now()
    assert wait_fd(consumer.irq, QUIET) is None
    assert not masked(edu)


def test_switching_keeps_the_line_masked_and_unmasks_nothing(
        edu: Edu, trigger: int, consumer: Consumer) -> None:
    edu.device.enable(trigger)
    edu.raise_irq()
    assert wait_fd(trigger, WAIT) == 1  # relayed: forwarded, not yet ended
    edu.device.route(consumer.irq, consumer.eoi)
    assert masked(edu)
    assert wait_fd(consumer.irq, QUIET) is None  # not signalled again
    edu.device.route(trigger, None)
    edu.device.route(consumer.irq, consumer.eoi)
    assert masked(edu)
    edu.ack()
    consumer.eoi_now()  # the EOI of the interrupt relayed before the switches
    assert not masked(edu)
    edu.raise_irq()
    assert wait_fd(consumer.irq, WAIT) == 1
    assert wait_fd(trigger, QUIET) is None


def test_a_count_already_in_the_eoi_eventfd_unmasks_at_bind(
        edu: Edu, trigger: int, consumer: Consumer) -> None:
    edu.device.enable(trigger)
    edu.raise_irq()
    assert wait_fd(trigger, WAIT) == 1
    edu.ack()
    consumer.eoi_now()  # the consumer ended it while eoid was still relaying
    edu.device.route(consumer.irq, consumer.eoi)
    assert not masked(edu)


def test_after_unbinding_the_eoi_is_eoids_again(
        edu: Edu, trigger: int, consumer: Consumer) -> None:
    edu.device.enable(trigger)
    edu.device.route(consumer.irq, consumer.eoi)
    edu.device.route(trigger, None)
    edu.raise_irq()
    assert wait_fd(trigger, WAIT) == 1
    assert wait_fd(consumer.irq, QUIET) is None
    edu.ack()
    consumer.eoi_now()
    assert masked(edu)  # nobody unmasks on that eventfd any more
    assert wait_fd(consumer.eoi, WAIT) == 1  # the count is there for eoid to read
    edu.device.unmask()
    assert not masked(edu)


def test_a_second_unmask_eventfd_is_refused_with_a_hint(
        edu: Edu, trigger: int, consumer: Consumer) -> None:
    edu.device.enable(trigger)
    vmm = os.eventfd(0, os.EFD_NONBLOCK)
    fd = edu.device.held_fds()["device"]
    try:
        uapi.KernelVfio().device_set_irqs(fd, uapi.intx_unmask_eventfd(vmm))
        with pytest.raises(VfioError, match="another unmask eventfd is bound") as e:
            edu.device.route(consumer.irq, consumer.eoi)
        assert e.value.errno == errno.EBUSY
        uapi.KernelVfio().device_set_irqs(fd, uapi.UNBIND_INTX_UNMASK)
    finally:
        os.close(vmm)
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(VfioError, match="swap trigger") as e:
            edu.device.route(null, consumer.eoi)
    finally:
        os.close(null)
    assert e.value.errno == errno.EINVAL
    edu.raise_irq()  # the failed swap undid the bind and left eoid's trigger in place
    assert wait_fd(trigger, WAIT) == 1
    edu.ack()
    consumer.eoi_now()
    assert masked(edu)


def test_kernel_interrupts_counts_the_guests_irq_in_kernel_windows_only(
        edu: Edu, trigger: int, consumer: Consumer) -> None:
    edu.device.enable(trigger)
    irq = sysfs.read_host_irq(edu.address)
    assert irq is not None
    procfs = IrqCounter(sysfs_root=Path("/nonexistent"), max_age=0)
    assert procfs.source == "/proc/interrupts"
    per_cpu = IrqCounter(max_age=0)
    assert per_cpu.source == "per_cpu_count"  # Debian kernels have CONFIG_SPARSE_IRQ
    start = procfs.count(irq)
    assert start is not None and start == per_cpu.count(irq)

    def round_trips(n: int, fd: int) -> None:
        for _ in range(n):
            edu.raise_irq()
            assert wait_fd(fd, WAIT) == 1
            edu.ack()
            if fd == trigger:
                edu.device.unmask()
            else:
                consumer.eoi_now()

    round_trips(3, trigger)
    assert edu.device.kernel_interrupts() == 0
    edu.device.route(consumer.irq, consumer.eoi)
    round_trips(7, consumer.irq)
    edu.device.route(trigger, None)
    assert edu.device.kernel_interrupts() == 7
    round_trips(2, trigger)
    edu.device.route(consumer.irq, consumer.eoi)
    round_trips(5, consumer.irq)
    edu.device.route(trigger, None)
    assert edu.device.kernel_interrupts() == 12
    # the guest's two views of the line agree, and saw every one of the 17
    assert procfs.count(irq) == per_cpu.count(irq) == start + 17


@pytest.mark.nointxmask
def test_the_kernel_path_with_masking_at_the_irqchip(
        edu: Edu, trigger: int, consumer: Consumer) -> None:
    """vfio_pci.nointxmask=1: the kernel unmasks with enable_irq; an EOI while asserted
    fires the line again through the interrupt controller (and the host counts it)."""
    edu.device.enable(trigger)
    assert edu.device.intx_masking == "irqchip"
    edu.device.route(consumer.irq, consumer.eoi)
    for _ in range(10):
        edu.raise_irq()
        assert wait_fd(consumer.irq, WAIT) == 1
        edu.ack()
        consumer.eoi_now()
    edu.raise_irq()
    assert wait_fd(consumer.irq, WAIT) == 1
    consumer.eoi_now()  # still asserted: the irqchip delivers it again
    assert wait_fd(consumer.irq, WAIT) == 1
    edu.ack()
    consumer.eoi_now()
    assert wait_fd(consumer.irq, QUIET) is None
    edu.device.route(trigger, None)
    assert edu.device.kernel_interrupts() == 12
    edu.raise_irq()
    assert wait_fd(trigger, WAIT) == 1
    edu.ack()
    edu.device.unmask()
