"""sysfs/proc reading and the probe (``eoid devices``, ``check-config --probe``), on fixtures."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import pytest
import yaml

from eoid.config import DeviceConfig
from eoid.errors import VfioError
from eoid.vfio import sysfs
from eoid.vfio.probe import devices_json, list_devices, probe_device, render_devices
from eoid.vfio.twin import FakeFunction, FakeVfio, write_proc_interrupts

EDU = "0000:00:10.0"

# /proc/interrupts from the test guest (one CPU), with two vfio-intx handlers sharing 20
GUEST_INTERRUPTS = """\
           CPU0\x20\x20\x20\x20\x20\x20\x20
  0:        123  IR-IO-APIC   2-edge      timer
  9:          0  IR-IO-APIC   9-fasteoi   acpi
 20:          7  IR-IO-APIC  20-fasteoi   vfio-intx(0000:00:10.0), vfio-intx(0000:00:14.0)
 24:          0  DMAR-MSI   0-edge      dmar0
 26:       1495  IR-PCI-MSI 16385-edge      virtio0-requests
NMI:          0   Non-maskable interrupts
ERR:          0
"""


class Tree:
    def __init__(self, tmp_path: Path, *functions: FakeFunction, **kwargs: bool) -> None:
        self.api = FakeVfio(tmp_path / "dev", **kwargs)
        for fn in functions:
            self.api.add(fn)
        self.sys = tmp_path / "sys"
        self.proc = tmp_path / "proc"
        self.dev = tmp_path / "dev"
        self.write()

    def write(self) -> None:
        self.api.write_tree(self.sys, self.proc, self.dev)

    def read(self, address: str = EDU) -> sysfs.PciFunction:
        return sysfs.read_pci_function(address, self.sys)

    def probe(self, address: str = EDU, **kwargs: bool) -> list[str]:
        return probe_device("dev0", address, sysfs_root=self.sys, proc_root=self.proc,
                            dev_root=self.dev, api=self.api, **kwargs)


# --- addresses and instructions ------------------------------------------------------------


@pytest.mark.parametrize("text", ["0000:00:10.0", "0000:AF:1f.7", " 0001:02:03.4\n"])
def test_pci_address_accepts_the_full_form(text: str) -> None:
    assert sysfs.parse_pci_address(text) == text.strip().lower()


@pytest.mark.parametrize("text", ["00:10.0", "0000:00:20.0", "0000:00:10.8", "0000:0:10.0", ""])
def test_pci_address_refuses_others(text: str) -> None:
    with pytest.raises(ValueError, match=r"DDDD:BB:DD\.F"):
        sysfs.parse_pci_address(text)


def test_bind_instructions() -> None:
    assert sysfs.bind_instructions(EDU, "e1000e") == (
        "modprobe vfio-pci; "
        f"echo vfio-pci > /sys/bus/pci/devices/{EDU}/driver_override; "
        f"echo {EDU} > /sys/bus/pci/devices/{EDU}/driver/unbind; "
        f"echo {EDU} > /sys/bus/pci/drivers_probe")
    assert "unbind" not in sysfs.bind_instructions(EDU, None)


# --- reading one function --------------------------------------------------------------------


def test_read_function_from_a_tree(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3, irq=20),
                FakeFunction("0000:00:10.1", 3, driver="snd_hda_intel", pcie=True,
                             class_code=0x040300))
    fn = tree.read()
    assert (fn.vendor, fn.device, fn.class_code) == (0x1234, 0x11E8, 0x00FF00)
    assert fn.driver == "vfio-pci"
    assert fn.bound_to_vfio
    assert fn.driver_override is None
    assert fn.iommu_group == 3
    assert fn.group_peers == (sysfs.Peer("0000:00:10.1", "snd_hda_intel"),)
    assert fn.blocking_peers == fn.group_peers
    assert (fn.interrupt_pin, fn.pin_name, fn.irq) == (1, "INTA#", 20)
    assert fn.is_pcie is False
    assert not fn.is_virtfn
    assert not fn.uses_msi
    assert fn.enabled
    assert fn.vfio_cdev is None
    other = tree.read("0000:00:10.1")
    assert other.is_pcie is True
    assert other.group_peers == (sysfs.Peer(EDU, "vfio-pci"),)
    assert other.blocking_peers == ()


def test_read_function_details(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3, msi_irqs=2, is_vf=True, enabled=False),
                iommufd=True)
    fn = tree.read()
    assert fn.uses_msi
    assert fn.is_virtfn
    assert not fn.enabled
    assert fn.vfio_cdev == "vfio0"


def test_missing_device(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3))
    with pytest.raises(VfioError, match=r"no PCI device 0000:00:11\.0"):
        tree.read("0000:00:11.0")


def _bare_device(root: Path, address: str, config: bytes | None) -> Path:
    dev = root / "bus" / "pci" / "devices" / address
    dev.mkdir(parents=True)
    if config is not None:
        (dev / "config").write_bytes(config)
    (dev / "driver_override").write_text("vfio-pci\n")
    return dev


def test_unprivileged_config_read_and_no_group(tmp_path: Path) -> None:
    config = bytearray(64)  # what a non-root reader gets
    config[0x3D] = 2
    _bare_device(tmp_path, EDU, bytes(config))
    fn = sysfs.read_pci_function(EDU, tmp_path)
    assert (fn.interrupt_pin, fn.pin_name) == (2, "INTB#")
    assert fn.is_pcie is None  # the capability list is beyond 64 bytes
    assert fn.iommu_group is None
    assert fn.group_peers == ()
    assert fn.driver is None
    assert fn.driver_override == "vfio-pci"
    assert fn.irq is None
    assert sysfs.disintx_support(fn).supported is None


def test_no_config_at_all(tmp_path: Path) -> None:
    _bare_device(tmp_path, EDU, None)
    fn = sysfs.read_pci_function(EDU, tmp_path)
    assert fn.interrupt_pin is None
    assert fn.pin_name == "?"
    assert sysfs.physical_command(EDU, tmp_path) is None


def test_capability_walk_finds_pcie_behind_another_cap_and_survives_loops(
        tmp_path: Path) -> None:
    config = bytearray(256)
    struct.pack_into("<H", config, 6, 0x10)  # status: capability list present
    config[0x34] = 0x40
    config[0x40:0x42] = bytes([0x05, 0x50])  # MSI → next at 0x50
    config[0x50:0x52] = bytes([0x10, 0x00])  # PCI Express, end
    _bare_device(tmp_path, EDU, bytes(config))
    assert sysfs.read_pci_function(EDU, tmp_path).is_pcie is True
    config[0x50:0x52] = bytes([0x01, 0x40])  # PM, pointing back at 0x40: a loop
    (tmp_path / "bus/pci/devices" / EDU / "config").write_bytes(bytes(config))
    assert sysfs.read_pci_function(EDU, tmp_path).is_pcie is False


def test_physical_command_and_disintx(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3), FakeFunction("0000:00:11.0", 4, pcie=True))
    assert sysfs.physical_command(EDU, tree.sys) == 0x0103
    assert sysfs.disintx_support(tree.read()).supported is None
    pcie = sysfs.disintx_support(tree.read("0000:00:11.0"))
    assert pcie.supported is True
    assert "PCIe" in pcie.reason


def test_group_dev_node(tmp_path: Path) -> None:
    (tmp_path / "vfio").mkdir()
    assert sysfs.group_dev_node(3, tmp_path) is None
    (tmp_path / "vfio" / "noiommu-3").touch()
    assert sysfs.group_dev_node(3, tmp_path) == tmp_path / "vfio" / "noiommu-3"
    (tmp_path / "vfio" / "3").touch()
    assert sysfs.group_dev_node(3, tmp_path) == tmp_path / "vfio" / "3"


def test_list_pci_addresses(tmp_path: Path) -> None:
    assert sysfs.list_pci_addresses(tmp_path) == []
    tree = Tree(tmp_path, FakeFunction("0000:00:11.0", 4), FakeFunction(EDU, 3))
    assert sysfs.list_pci_addresses(tree.sys) == [EDU, "0000:00:11.0"]


# --- interrupt lines ------------------------------------------------------------------------


def test_parse_proc_interrupts_from_the_guest() -> None:
    parsed = sysfs.parse_proc_interrupts(GUEST_INTERRUPTS)
    assert parsed[20] == ("vfio-intx(0000:00:10.0)", "vfio-intx(0000:00:14.0)")
    assert parsed[0] == ("timer",)
    assert parsed[26] == ("virtio0-requests",)
    assert set(parsed) == {0, 9, 20, 24, 26}
    assert sysfs.parse_proc_interrupts("") == {}


def test_parse_proc_interrupts_with_several_cpus(tmp_path: Path) -> None:
    write_proc_interrupts(tmp_path, [], {16: ["ehci_hcd:usb1", "i801_smbus"], 17: ["x"]})
    parsed = sysfs.parse_proc_interrupts((tmp_path / "interrupts").read_text())
    assert parsed == {16: ("ehci_hcd:usb1", "i801_smbus"), 17: ("x",)}


def test_host_line_exclusive_shared_and_msi(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3, irq=20),
                FakeFunction("0000:00:14.0", 5, irq=20, driver="ahci"),
                FakeFunction("0000:00:01.0", 1, irq=20, driver="virtio-pci", msi_irqs=3),
                FakeFunction("0000:00:12.0", 6, irq=20, enabled=False),
                FakeFunction("0000:00:11.0", 4, irq=21))
    tree.api.irq_handlers[20] = ["ahci[0000:00:14.0]"]
    tree.write()
    line = sysfs.host_line(tree.read(), tree.sys, tree.proc)
    assert line.assigned
    assert line.irq == 20
    assert line.handlers == ("ahci[0000:00:14.0]",)
    # not the MSI user, not the function whose IRQ is not routed yet
    assert line.wired_with == (sysfs.Peer("0000:00:14.0", "ahci"),)
    assert line.shared
    alone = sysfs.host_line(tree.read("0000:00:11.0"), tree.sys, tree.proc)
    assert (alone.assigned, alone.shared) == (True, False)
    unrouted = sysfs.host_line(tree.read("0000:00:12.0"), tree.sys, tree.proc)
    assert (unrouted.assigned, unrouted.irq, unrouted.shared) == (False, 20, False)


def test_host_line_ignores_our_own_vfio_handler(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3, irq=20))
    tree.api.functions[EDU].irq_type = "intx"
    tree.write()
    assert "vfio-intx(0000:00:10.0)" in (tree.proc / "interrupts").read_text()
    line = sysfs.host_line(tree.read(), tree.sys, tree.proc)
    assert line.handlers == ()
    assert not line.shared


def test_host_line_of_a_device_with_a_host_driver_cannot_attribute_handlers(
        tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3, irq=20, driver="e1000"))
    tree.api.irq_handlers[20] = ["eth0"]
    tree.write()
    assert sysfs.host_line(tree.read(), tree.sys, tree.proc).handlers == ()


# --- probe: list_devices / render / json ----------------------------------------------------


def _tree_for_listing(tmp_path: Path) -> Tree:
    return Tree(
        tmp_path,
        FakeFunction(EDU, 3, irq=20),
        FakeFunction("0000:00:11.0", 4, driver="e1000e", pcie=True, irq=21),  # candidate
        FakeFunction("0000:00:1c.0", 5, driver="pcieport", class_code=0x060400),  # bridge
        FakeFunction("0000:00:02.0", 2, driver="i915", interrupt_pin=0),  # no pin
        FakeFunction("0000:00:1f.3", 6, driver=None, enabled=False, irq=10),
    )


def test_list_devices_picks_vfio_and_candidates(tmp_path: Path) -> None:
    tree = _tree_for_listing(tmp_path)
    reports = list_devices(tree.sys, tree.proc, tree.dev)
    assert [r.address for r in reports] == [EDU, "0000:00:11.0", "0000:00:1f.3"]
    edu, nic, smbus = reports
    assert edu.ready
    assert edu.group_node == str(tree.dev / "vfio" / "3")
    assert edu.line.assigned
    assert not edu.line.shared
    assert not nic.ready
    assert "bound to e1000e, not vfio-pci; bind it to vfio-pci" in nic.problems[0]
    assert nic.disintx.supported is True
    assert not smbus.ready
    assert "not bound to any driver" in smbus.problems[0]
    assert any("not routed yet" in w for w in smbus.warnings)


def test_yaml_snippet_is_a_valid_device_config(tmp_path: Path) -> None:
    tree = _tree_for_listing(tmp_path)
    report = list_devices(tree.sys, tree.proc, tree.dev)[0]
    config = DeviceConfig.model_validate(yaml.safe_load(report.yaml_snippet()))
    assert config.name == "0000-00-10.0"
    assert config.pci_address == EDU
    assert config.backend.type == "vfio"
    named = DeviceConfig.model_validate(yaml.safe_load(report.yaml_snippet("nic0")))
    assert named.name == "nic0"


def test_render_and_json(tmp_path: Path) -> None:
    tree = _tree_for_listing(tmp_path)
    reports = list_devices(tree.sys, tree.proc, tree.dev)
    text = render_devices(reports)
    lines = text.splitlines()
    assert lines[0].split() == ["ADDRESS", "ID", "DRIVER", "GROUP", "PIN", "IRQ", "HOST", "LINE",
                                "DISINTX", "STATUS"]
    assert lines[1].split() == [EDU, "1234:11e8", "vfio-pci", "3", "INTA#", "20", "exclusive",
                                "unknown", "ready"]
    assert lines[3].split()[5:8] == ["10?", "not", "routed"]
    assert "  problem: 0000:00:11.0 is bound to e1000e" in text
    assert '  pci_address: "0000:00:10.0"' in text
    data = json.loads(devices_json(reports))
    assert [d["pci_address"] for d in data] == [EDU, "0000:00:11.0", "0000:00:1f.3"]
    assert data[0]["iommu_group"] == 3
    assert data[0]["interrupt_pin"] == "INTA#"
    assert data[0]["irq_assigned"] is True
    assert data[0]["ready"] is True
    assert data[1]["disintx"] is True
    assert render_devices([]).startswith("no PCI device")


# --- probe_device ---------------------------------------------------------------------------


def test_probe_of_a_good_device_opens_and_enables_it(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3))
    assert tree.probe() == []
    assert "SET_IRQS(INTX,DATA_EVENTFD|ACTION_TRIGGER,0,1)" in tree.api.calls
    assert tree.api.open_fds() == []  # let go again
    assert tree.api.functions[EDU].irq_type == "none"


def test_probe_without_opening(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3))
    assert tree.probe(open_device=False) == []
    assert tree.api.calls == []


def test_probe_of_a_device_in_use_is_not_a_problem(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3))
    group = tree.api.open(tree.dev / "vfio" / "3")  # a VMM holds the group
    assert tree.probe() == []
    tree.api.close(group)


def test_probe_finds_the_shared_line_without_disintx(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3, irq=20, pci_2_3=False),
                FakeFunction("0000:00:14.0", 5, irq=20, driver="ahci"))
    tree.api.irq_handlers[20] = ["ahci[0000:00:14.0]"]
    tree.write()
    (problem,) = tree.probe()
    assert "host IRQ 20 is shared" in problem
    assert "cannot mask itself" in problem
    assert tree.api.open_fds() == []


@pytest.mark.parametrize(("fn", "expected"), [
    (FakeFunction(EDU, 3, driver="e1000e"), "bound to e1000e, not vfio-pci; bind it to vfio-pci"),
    (FakeFunction(EDU, 3, interrupt_pin=0), "has no interrupt pin"),
    (FakeFunction(EDU, 3, is_vf=True), "virtual function"),
    (FakeFunction(EDU, 3, nointx=True), r"INTx hidden by a quirk \(count 0\)"),
])
def test_probe_problems(tmp_path: Path, fn: FakeFunction, expected: str) -> None:
    tree = Tree(tmp_path, fn)
    problems = tree.probe()
    assert len(problems) == 1, problems
    assert re.search(expected, problems[0]), problems


def test_probe_of_an_unviable_group(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction("0000:02:00.0", 7),
                FakeFunction("0000:02:00.1", 7, driver="e1000e"))
    assert tree.probe("0000:02:00.0") == [
        "group 7 also holds 0000:02:00.1, which is bound to e1000e, not vfio-pci: the whole "
        "group must be given to vfio-pci (or its other devices unbound)"]


def test_probe_of_a_missing_node_address_and_device(tmp_path: Path) -> None:
    tree = Tree(tmp_path, FakeFunction(EDU, 3))
    os.unlink(tree.dev / "vfio" / "3")
    (problem,) = tree.probe()
    assert "no " in problem
    assert "/vfio/3 node although the device is bound to vfio-pci" in problem
    assert tree.probe("0000:00:11.0") == [
        "no PCI device 0000:00:11.0 (lspci -D lists the addresses)"]
    assert "not a PCI address" in tree.probe("garbage")[0]
