"""``eoid devices`` and ``eoid check-config --probe``: what would happen with a device.

``list_devices`` reads sysfs/proc only and shows every PCI function bound to
vfio-pci or that could be (it has an IOMMU group and an interrupt pin), with
a ready device YAML snippet. ``probe_device`` explains what would fail when
eoid opens a configured device; by default it also opens the device and enables
INTx for a moment, the only way to learn whether the host line can be taken.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eoid.errors import VfioError
from eoid.vfio import sysfs
from eoid.vfio.device import open_vfio_device
from eoid.vfio.uapi import VfioApi

BRIDGE_CLASS = 0x06  # PCI base class of host/PCI bridges and root ports
# open failures that only mean "someone (eoid itself, a VMM) holds the device now"
_IN_USE = {("open group", errno.EBUSY), ("bind iommufd", errno.EBUSY),
           ("bind iommufd", errno.EINVAL)}


@dataclass(frozen=True)
class DeviceReport:
    """One PCI function as ``eoid devices`` shows it."""

    function: sysfs.PciFunction
    group_node: str | None
    disintx: sysfs.DisIntx
    line: sysfs.HostLine
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    @property
    def address(self) -> str:
        return self.function.address

    @property
    def ready(self) -> bool:
        return not self.problems

    @property
    def suggested_name(self) -> str:
        """A valid device name derived from the address (``0000-02-00.0``)."""
        return self.address.replace(":", "-")

    def yaml_snippet(self, name: str | None = None) -> str:
        fn = self.function
        ids = f"{fn.vendor or 0:04x}:{fn.device or 0:04x}"
        return "\n".join([
            f"# devices.d/{name or self.suggested_name}.yaml  ({ids}, {fn.pin_name}, "
            f"IOMMU group {fn.iommu_group})",
            f"name: {name or self.suggested_name}",
            f'pci_address: "{self.address}"',
            "backend:",
            "  type: vfio",
            "consumers:",
            "  uids: []  # who may attach besides root, e.g. [qemu]",
        ]) + "\n"

    def to_dict(self) -> dict[str, Any]:
        fn = self.function
        return {
            "pci_address": self.address,
            "vendor": None if fn.vendor is None else f"{fn.vendor:04x}",
            "device": None if fn.device is None else f"{fn.device:04x}",
            "class": None if fn.class_code is None else f"{fn.class_code:06x}",
            "driver": fn.driver,
            "iommu_group": fn.iommu_group,
            "group_node": self.group_node,
            "group_peers": [{"pci_address": p.address, "driver": p.driver}
                            for p in fn.group_peers],
            "vfio_cdev": fn.vfio_cdev,
            "interrupt_pin": fn.pin_name,
            "irq": self.line.irq,
            "irq_assigned": self.line.assigned,
            "line_shared": self.line.shared,
            "line_handlers": list(self.line.handlers),
            "line_wired_with": [{"pci_address": p.address, "driver": p.driver}
                                for p in self.line.wired_with],
            "disintx": self.disintx.supported,
            "disintx_reason": self.disintx.reason,
            "is_pcie": fn.is_pcie,
            "ready": self.ready,
            "problems": list(self.problems),
            "warnings": list(self.warnings),
            "yaml": self.yaml_snippet(),
        }


def _assess(fn: sysfs.PciFunction, dev_root: Path, sysfs_root: Path,
            proc_root: Path) -> DeviceReport:
    """Problems (would fail) and warnings (might fail later) from sysfs alone."""
    problems: list[str] = []
    warnings: list[str] = []
    problems.extend(p for p in (sysfs.driver_problem(fn, sysfs_root), sysfs.group_problem(fn))
                    if p)
    node = None
    if fn.iommu_group is not None:
        found = sysfs.group_dev_node(fn.iommu_group, dev_root)
        node = None if found is None else str(found)
        if found is None and fn.bound_to_vfio:
            problems.append(f"no {dev_root}/vfio/{fn.iommu_group} node although the device "
                            "is bound to vfio-pci (is /dev populated? in a container, pass "
                            "/dev/vfio through)")
    if fn.interrupt_pin == 0:
        problems.append(f"{fn.address} has no interrupt pin: no INTx to relay")
    elif fn.is_virtfn:
        problems.append(f"{fn.address} is an SR-IOV virtual function: VFs have no INTx")
    disintx = sysfs.disintx_support(fn)
    line = sysfs.host_line(fn, sysfs_root, proc_root)
    if fn.interrupt_pin and not line.assigned:
        warnings.append(f"the host IRQ is not routed yet (sysfs shows {line.irq}, provisional):"
                        " it is known once the device is enabled, e.g. opened by eoid")
    if line.shared and disintx.supported is not True:
        others = ", ".join([*line.handlers, *(p.address for p in line.wired_with)])
        warnings.append(
            f"host IRQ {line.irq} is shared ({others}) and DisINTx support is "
            f"{'absent' if disintx.supported is False else 'unknown'}: a device that cannot "
            "mask itself needs an exclusive line (vfio-pci then fails with EBUSY)")
    return DeviceReport(fn, node, disintx, line, tuple(problems), tuple(warnings))


def list_devices(sysfs_root: Path = Path("/sys"), proc_root: Path = Path("/proc"),
                 dev_root: Path = Path("/dev")) -> list[DeviceReport]:
    """Functions bound to vfio-pci, and those that could be (IOMMU group + INTx pin)."""
    reports = []
    for address in sysfs.list_pci_addresses(sysfs_root):
        fn = sysfs.read_pci_function(address, sysfs_root)
        candidate = (fn.iommu_group is not None and bool(fn.interrupt_pin)
                     and (fn.class_code is None or fn.class_code >> 16 != BRIDGE_CLASS))
        if fn.bound_to_vfio or candidate:
            reports.append(_assess(fn, dev_root, sysfs_root, proc_root))
    return reports


def render_devices(reports: list[DeviceReport]) -> str:
    """A table, then each device's problems and YAML snippet."""
    if not reports:
        return ("no PCI device is bound to vfio-pci or could be (none has both an IOMMU group "
                "and an interrupt pin)\n")
    header = ("ADDRESS", "ID", "DRIVER", "GROUP", "PIN", "IRQ", "HOST LINE", "DISINTX",
              "STATUS")
    rows = [header]
    for r in reports:
        fn = r.function
        if r.line.irq is None:
            line = "-"
        elif not r.line.assigned:
            line = "not routed yet"
        elif r.line.shared:
            line = f"shared ({len(r.line.handlers) + len(r.line.wired_with)})"
        else:
            line = "exclusive"
        rows.append((
            r.address,
            f"{fn.vendor or 0:04x}:{fn.device or 0:04x}",
            fn.driver or "-",
            "-" if fn.iommu_group is None else str(fn.iommu_group),
            fn.pin_name,
            "-" if r.line.irq is None else f"{r.line.irq}{'' if r.line.assigned else '?'}",
            line,
            {True: "yes", False: "no", None: "unknown"}[r.disintx.supported],
            "ready" if r.ready else "not ready",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
           for row in rows]
    for r in reports:
        out.append("")
        out.append(f"{r.address}:")
        out.extend(f"  problem: {p}" for p in r.problems)
        out.extend(f"  warning: {w}" for w in r.warnings)
        out.extend("  " + s for s in r.yaml_snippet().splitlines())
    return "\n".join(out) + "\n"


def devices_json(reports: list[DeviceReport]) -> str:
    return json.dumps([r.to_dict() for r in reports], indent=2)


def probe_device(name: str, pci_address: str, *, sysfs_root: Path = Path("/sys"),
                 proc_root: Path = Path("/proc"), dev_root: Path = Path("/dev"),
                 api: VfioApi | None = None, open_device: bool = True) -> list[str]:
    """What would fail if eoid opened ``pci_address`` now; empty if nothing would.

    With ``open_device`` (the default) the device is opened and INTx enabled with
    a scratch eventfd, then closed again (vfio-pci resets a resettable device on
    close). A device some other process holds is not a problem: it is skipped.
    """
    try:
        address = sysfs.parse_pci_address(pci_address)
    except ValueError as exc:
        return [str(exc)]
    if not sysfs.pci_device_dir(address, sysfs_root).exists():
        return [sysfs.not_found(address)]
    report = _assess(sysfs.read_pci_function(address, sysfs_root), dev_root, sysfs_root,
                     proc_root)
    if report.problems or not open_device:
        return list(report.problems)
    return _try_open(name, address, sysfs_root=sysfs_root, dev_root=dev_root, api=api)


def _try_open(name: str, address: str, *, sysfs_root: Path, dev_root: Path,
              api: VfioApi | None) -> list[str]:
    try:
        device = open_vfio_device(name, address, sysfs_root=sysfs_root, dev_root=dev_root,
                                  api=api, request_irqs=False)
    except VfioError as exc:
        if (exc.op, exc.errno) in _IN_USE:
            return []
        return [str(exc)]
    trigger = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        device.enable(trigger)
    except VfioError as exc:
        if exc.op == "enable INTx" and exc.errno == errno.EBUSY:
            # opening enabled the device, so sysfs now shows the routed IRQ
            irq = sysfs.read_pci_function(address, sysfs_root).irq
            return [f"host IRQ {irq} is shared and {address} cannot mask itself "
                    "(no PCI 2.3 DisINTx): vfio-pci needs the line exclusively; move the "
                    "device or unbind the other devices on that IRQ"]
        return [str(exc)]
    finally:
        with contextlib.suppress(VfioError):
            device.disable()
        device.close()
        os.close(trigger)
    return []
