"""The path for devices that cannot mask themselves: vfio-pci masks at the interrupt
controller and needs the host IRQ exclusively (docs/intx-eoi.md §7).

The guest for these tests loads vfio-pci with ``nointxmask=1``, which makes vfio-pci
treat every device as lacking PCI 2.3 DisINTx. edu devices at slots 0x10 and 0x14
share one GSI, so the second one cannot get its line.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from eoid.errors import VfioError
from eoid.vfio import uapi
from eoid.vfio.probe import probe_device
from tests.vm.edu import Edu, physical_command, wait_fd

pytestmark = [pytest.mark.vfio, pytest.mark.nointxmask]

WAIT = 5.0
QUIET = 0.3


@pytest.fixture
def triggers() -> Iterator[tuple[int, int]]:
    a, b = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    yield a, b
    os.close(a)
    os.close(b)


def test_nointxmask_is_in_effect() -> None:
    assert Path("/sys/module/vfio_pci/parameters/nointxmask").read_text().strip() == "Y"


def test_irqchip_masking_round_trips(edu: Edu, trigger: int) -> None:
    edu.device.enable(trigger)
    assert edu.device.intx_masking == "irqchip"
    edu.raise_irq()
    assert wait_fd(trigger, WAIT) == 1
    # masked at the interrupt controller: the device's own INTx-disable stays clear
    assert not physical_command(edu.address) & uapi.PCI_COMMAND_INTX_DISABLE
    edu.device.unmask()  # still asserted: the irqchip delivers it again
    assert wait_fd(trigger, WAIT) == 1
    edu.ack()
    edu.device.unmask()
    assert wait_fd(trigger, QUIET) is None
    counts = []
    for _ in range(100):
        edu.raise_irq()
        counts.append(wait_fd(trigger, WAIT))
        edu.ack()
        edu.device.unmask()
    assert counts == [1] * 100
    assert wait_fd(trigger, QUIET) is None


def test_a_shared_line_is_refused_without_disintx(shared_pair: tuple[Edu, Edu],
                                                  triggers: tuple[int, int]) -> None:
    a, c = shared_pair
    ta, tc = triggers
    a.device.enable(ta)
    with pytest.raises(VfioError, match="needs an exclusive line") as exc:
        c.device.enable(tc)
    assert (exc.value.op, exc.value.errno) == ("enable INTx", errno.EBUSY)
    c.device.close()
    (problem,) = probe_device("edu2", c.address)
    irq = int(Path(f"/sys/bus/pci/devices/{c.address}/irq").read_text())
    assert f"host IRQ {irq} is shared and {c.address} cannot mask itself" in problem
    a.raise_irq()  # the holder of the line is unaffected
    assert wait_fd(ta, WAIT) == 1
    a.ack()
    a.device.unmask()
    a.device.disable()  # the line is free again
    assert probe_device("edu2", c.address) == []
