"""``eoid devices`` / ``check-config --probe`` against the guest's real sysfs and vfio-pci."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eoid.vfio.probe import list_devices, probe_device, render_devices
from eoid.vfio.sysfs import host_line, read_pci_function, vfio_intx_action
from tests.vm.edu import Edu, bind_vfio, driver_of

pytestmark = pytest.mark.vfio


def _sysfs_irq(address: str) -> int:
    return int(Path(f"/sys/bus/pci/devices/{address}/irq").read_text())


def test_list_devices_reports_each_edu_as_it_is(edus: list[str]) -> None:
    reports = {r.address: r for r in list_devices()}
    for address in edus:
        report = reports[address]
        fn = report.function
        group = int(Path(f"/sys/bus/pci/devices/{address}/iommu_group").readlink().name)
        assert fn.driver == "vfio-pci"
        assert fn.iommu_group == group
        assert report.group_node == f"/dev/vfio/{group}"
        assert fn.pin_name == "INTA#"
        assert fn.is_pcie is False  # edu is a conventional PCI device
        assert report.disintx.supported is None  # not discoverable from sysfs for PCI
        # nobody has it open: not enabled, so its IRQ is the firmware's provisional one
        assert not fn.enabled
        assert not report.line.assigned
        assert report.line.irq == _sysfs_irq(address)
        assert any("not routed yet" in w for w in report.warnings)
        assert report.ready
        assert report.problems == ()
        assert f'pci_address: "{address}"' in report.yaml_snippet()
    text = render_devices(list(reports.values()))
    for address in edus:
        assert address in text


def test_an_open_device_shows_its_routed_line(edu: Edu, trigger: int) -> None:
    edu.device.enable(trigger)
    report = next(r for r in list_devices() if r.address == edu.address)
    assert report.function.enabled
    assert report.line.assigned
    assert report.line.irq == _sysfs_irq(edu.address)
    line = next(x for x in Path("/proc/interrupts").read_text().splitlines()
                if x.split(":")[0].strip() == str(report.line.irq))
    assert vfio_intx_action(edu.address) in line
    assert vfio_intx_action(edu.address) not in report.line.handlers  # ours, not a sharer
    assert not any("not routed yet" in w for w in report.warnings)


def test_host_line_of_two_devices_on_one_gsi(shared_pair: tuple[Edu, Edu]) -> None:
    a, c = shared_pair
    ta, tc = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    try:
        a.device.enable(ta)
        c.device.enable(tc)
        line = host_line(read_pci_function(a.address))
        assert line.assigned
        assert line.irq == _sysfs_irq(c.address)
        assert line.handlers == (vfio_intx_action(c.address),)
        assert [p.address for p in line.wired_with] == [c.address]
        assert line.shared
        report = next(r for r in list_devices() if r.address == a.address)
        assert any("is shared" in w for w in report.warnings)
    finally:
        a.device.disable()
        c.device.disable()
        os.close(ta)
        os.close(tc)


def test_probe_of_a_free_edu_finds_nothing_wrong(edus: list[str]) -> None:
    bind_vfio(edus[1])
    assert probe_device("edu1", edus[1]) == []
    # the probe let go of it again: the group opens
    fd = os.open(f"/dev/vfio/{read_pci_function(edus[1]).iommu_group}", os.O_RDWR)
    os.close(fd)


def test_probe_of_a_held_device_is_not_a_problem(edu: Edu) -> None:
    assert probe_device("edu0", edu.address) == []


def test_probe_of_an_unbound_edu_says_how_to_bind(edus: list[str]) -> None:
    address = edus[1]
    bind_vfio(address)
    Path("/sys/bus/pci/drivers/vfio-pci/unbind").write_text(address)
    try:
        assert driver_of(address) is None
        problems = probe_device("edu1", address)
        assert len(problems) == 1
        assert "not bound to any driver" in problems[0]
        assert f"echo vfio-pci > /sys/bus/pci/devices/{address}/driver_override" in problems[0]
        report = next(r for r in list_devices() if r.address == address)
        assert not report.ready  # still listed: it could be bound
        assert report.to_dict()["ready"] is False
    finally:
        bind_vfio(address)


def test_probe_of_a_device_with_a_host_driver(edus: list[str]) -> None:
    virtio = next(a for a in sorted(os.listdir("/sys/bus/pci/devices"))
                  if driver_of(a) == "virtio-pci")
    problems = probe_device("disk", virtio)
    assert any(f"{virtio} is bound to virtio-pci, not vfio-pci; bind it to vfio-pci" in p
               for p in problems), problems
    assert probe_device("nothing", "0000:00:1e.7") == [
        "no PCI device 0000:00:1e.7 (lspci -D lists the addresses)"]
