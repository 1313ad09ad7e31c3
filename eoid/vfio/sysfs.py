"""What sysfs and /proc say about a PCI function: IOMMU group, driver, interrupt line.

Every function takes its filesystem roots as parameters (``/sys``, ``/proc``,
``/dev`` by default) so tests run against fixture trees. Nothing here writes.

Why eoid cares: vfio-pci can only hand out a device whose whole IOMMU group is
free of host drivers ("viable"); INTx needs an interrupt pin; and a device that
cannot mask itself with PCI 2.3 DisINTx needs a host IRQ line of its own, because
vfio-pci then masks at the interrupt controller (``request_irq`` without
``IRQF_SHARED`` fails with EBUSY on a line someone else holds).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from eoid.errors import VfioError
from eoid.vfio import uapi

PCI_ADDRESS = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([01][0-9a-f])\.([0-7])$")
VFIO_DRIVER = "vfio-pci"
# Drivers that leave a group viable: they do not claim DMA ownership.
NON_DMA_DRIVERS = frozenset({VFIO_DRIVER, "pci-stub"})
PIN_NAMES = {1: "INTA#", 2: "INTB#", 3: "INTC#", 4: "INTD#"}


def parse_pci_address(text: str) -> str:
    """Validate ``DDDD:BB:DD.F`` and return it lower-cased (sysfs spelling)."""
    address = text.strip().lower()
    if not PCI_ADDRESS.match(address):
        raise ValueError(f"{text!r} is not a PCI address (DDDD:BB:DD.F, e.g. 0000:02:00.0)")
    return address


def pci_device_dir(address: str, sysfs_root: Path = Path("/sys")) -> Path:
    return sysfs_root / "bus" / "pci" / "devices" / address


def bind_instructions(address: str, driver: str | None = None,
                      sysfs_root: Path = Path("/sys")) -> str:
    """The shell commands that hand ``address`` to vfio-pci."""
    dev = pci_device_dir(address, sysfs_root)
    steps = ["modprobe vfio-pci", f"echo vfio-pci > {dev}/driver_override"]
    if driver is not None:
        steps.append(f"echo {address} > {dev}/driver/unbind")
    steps.append(f"echo {address} > {sysfs_root}/bus/pci/drivers_probe")
    return "; ".join(steps)


def not_found(address: str) -> str:
    return f"no PCI device {address} (lspci -D lists the addresses)"


def driver_problem(fn: PciFunction, sysfs_root: Path = Path("/sys")) -> str | None:
    """Why ``fn`` is not usable by eoid as bound now, with the commands that fix it."""
    if fn.bound_to_vfio:
        return None
    bound = f"bound to {fn.driver}" if fn.driver else "not bound to any driver"
    return (f"{fn.address} is {bound}, not vfio-pci; bind it to vfio-pci: "
            + bind_instructions(fn.address, fn.driver, sysfs_root))


def group_problem(fn: PciFunction) -> str | None:
    """Why ``fn``'s IOMMU group cannot be handed to VFIO, device by device."""
    if fn.iommu_group is None:
        return (f"{fn.address} has no IOMMU group: enable the IOMMU (intel_iommu=on or "
                "amd_iommu=on on the kernel command line), or load vfio with "
                "enable_unsafe_noiommu_mode=1 where the kernel has it")
    if not fn.blocking_peers:
        return None
    listed = ", ".join(f"{p.address}, which is bound to {p.driver}" for p in fn.blocking_peers)
    return (f"group {fn.iommu_group} also holds {listed}, not vfio-pci: the whole group must "
            "be given to vfio-pci (or its other devices unbound)")


@dataclass(frozen=True)
class Peer:
    """Another function sharing something (IOMMU group, IRQ line) with the one asked about."""

    address: str
    driver: str | None

    @property
    def blocks_group(self) -> bool:
        """A host driver that owns DMA makes the whole group unusable for VFIO."""
        return self.driver is not None and self.driver not in NON_DMA_DRIVERS


@dataclass(frozen=True)
class PciFunction:
    """The sysfs view of one PCI function. ``None`` means "not discoverable"."""

    address: str
    vendor: int | None
    device: int | None
    class_code: int | None
    driver: str | None
    driver_override: str | None
    iommu_group: int | None
    group_peers: tuple[Peer, ...]
    vfio_cdev: str | None  # "vfio3": /dev/vfio/devices/vfio3 (iommufd kernels)
    interrupt_pin: int | None  # 0 = none, 1..4 = INTA#..INTD#
    irq: int | None
    is_pcie: bool | None
    is_virtfn: bool
    uses_msi: bool  # MSI/MSI-X vectors are allocated right now
    enabled: bool  # pci_enable_device'd now (a driver or vfio-pci has it open)

    @property
    def bound_to_vfio(self) -> bool:
        return self.driver == VFIO_DRIVER

    @property
    def blocking_peers(self) -> tuple[Peer, ...]:
        return tuple(p for p in self.group_peers if p.blocks_group)

    @property
    def pin_name(self) -> str:
        if self.interrupt_pin is None:
            return "?"
        return PIN_NAMES.get(self.interrupt_pin, "none")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _read_int(path: Path, base: int = 10) -> int | None:
    text = _read(path)
    try:
        return None if text is None else int(text, base)
    except ValueError:
        return None


def _link_name(path: Path) -> str | None:
    try:
        return path.readlink().name
    except OSError:
        return None


def _find_capability(config: bytes, cap_id: int) -> bool:
    """Walk the standard capability list (the first 256 bytes of config space)."""
    if len(config) < 0x40 or not config[uapi.PCI_STATUS] & uapi.PCI_STATUS_CAP_LIST:
        return False
    pos, seen = config[uapi.PCI_CAPABILITY_LIST] & ~3, set()
    while 0x40 <= pos < len(config) - 1 and pos not in seen:
        seen.add(pos)
        if config[pos] == cap_id:
            return True
        pos = config[pos + 1] & ~3
    return False


def read_pci_function(address: str, sysfs_root: Path = Path("/sys")) -> PciFunction:
    """Read one function; raises ``VfioError`` if there is no such PCI device."""
    dev = pci_device_dir(address, sysfs_root)
    if not dev.exists():
        raise VfioError(address, "find device", not_found(address))
    driver = _link_name(dev / "driver")
    override = _read(dev / "driver_override")
    group_name = _link_name(dev / "iommu_group")
    group = int(group_name) if group_name is not None and group_name.isdigit() else None
    peers: list[Peer] = []
    if group_name is not None:
        members = sysfs_root / "kernel" / "iommu_groups" / group_name / "devices"
        try:
            names = sorted(p.name for p in members.iterdir())
        except OSError:
            names = []
        peers = [Peer(n, _link_name(pci_device_dir(n, sysfs_root) / "driver"))
                 for n in names if n != address]
    cdevs = sorted(p.name for p in (dev / "vfio-dev").glob("vfio*")) \
        if (dev / "vfio-dev").is_dir() else []
    try:
        # unprivileged readers get the first 64 bytes; the pin and caps pointer are there
        config = (dev / "config").read_bytes()
    except OSError:
        config = b""
    pin = config[uapi.PCI_INTERRUPT_PIN] if len(config) > uapi.PCI_INTERRUPT_PIN else None
    is_pcie: bool | None = None
    if (dev / "current_link_speed").exists():  # only PCIe functions have link attributes
        is_pcie = True
    elif len(config) >= 256:
        is_pcie = _find_capability(config, uapi.PCI_CAP_ID_EXP)
    try:
        uses_msi = any((dev / "msi_irqs").iterdir())
    except OSError:
        uses_msi = False
    return PciFunction(
        address=address,
        vendor=_read_int(dev / "vendor", 16),
        device=_read_int(dev / "device", 16),
        class_code=_read_int(dev / "class", 16),
        driver=driver,
        driver_override=None if override in (None, "(null)") else override,
        iommu_group=group,
        group_peers=tuple(peers),
        vfio_cdev=cdevs[0] if cdevs else None,
        interrupt_pin=pin,
        irq=_read_int(dev / "irq"),
        is_pcie=is_pcie,
        is_virtfn=(dev / "physfn").exists(),
        uses_msi=uses_msi,
        enabled=bool(_read_int(dev / "enable")),
    )


def read_host_irq(address: str, sysfs_root: Path = Path("/sys")) -> int | None:
    """The host IRQ of the function's INTx pin (sysfs ``irq``); None if it has none."""
    return _read_int(pci_device_dir(address, sysfs_root) / "irq") or None


def list_pci_addresses(sysfs_root: Path = Path("/sys")) -> list[str]:
    try:
        return sorted(p.name for p in (sysfs_root / "bus" / "pci" / "devices").iterdir()
                      if PCI_ADDRESS.match(p.name))
    except OSError:
        return []


def group_dev_node(group: int, dev_root: Path = Path("/dev")) -> Path | None:
    """``/dev/vfio/N`` or, for a no-IOMMU group, ``/dev/vfio/noiommu-N``; None if absent."""
    for name in (str(group), f"noiommu-{group}"):
        node = dev_root / "vfio" / name
        if node.exists():
            return node
    return None


@dataclass(frozen=True)
class DisIntx:
    """Whether the function can mask INTx itself (PCI 2.3 ``PCI_COMMAND.INTX_DISABLE``).

    Config space does not advertise it: the kernel finds out by toggling the bit,
    which a read-only tool must not do. PCIe requires it, so PCIe functions are
    taken as capable (the few with broken masking have INTx hidden by vfio-pci);
    for conventional PCI it is unknown until vfio-pci masks the line (see
    ``VfioDevice.intx_masking``).
    """

    supported: bool | None
    reason: str


def disintx_support(fn: PciFunction) -> DisIntx:
    if fn.is_pcie:
        return DisIntx(True, "PCIe requires INTx disable")
    if fn.is_pcie is None:
        return DisIntx(None, "config space unreadable")
    return DisIntx(None, "conventional PCI: not advertised; shown once eoid has the line masked")


@dataclass(frozen=True)
class HostLine:
    """The host IRQ behind a function's INTx pin and who else is on it.

    The kernel routes a function's pin to its IRQ (ACPI _PRT) when the function
    is first enabled; before that sysfs shows the firmware's provisional line
    (e.g. 10 where the real one becomes GSI 20), so nothing is claimed about
    sharing until ``assigned``.
    """

    irq: int | None
    assigned: bool
    handlers: tuple[str, ...] = ()  # other actions registered on it now (/proc/interrupts)
    wired_with: tuple[Peer, ...] = ()  # other enabled functions routed to it, not on MSI

    @property
    def shared(self) -> bool:
        return bool(self.handlers or self.wired_with)


def parse_proc_interrupts(text: str) -> dict[int, tuple[str, ...]]:
    """Numbered IRQ → its action names, from ``/proc/interrupts``.

    A line is ``N: <count per CPU> <chip> <hwirq-type> <action>[, <action>...]``.
    """
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    result: dict[int, tuple[str, ...]] = {}
    for line in lines[1:]:
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().isdigit():
            continue
        fields = rest.split(None, ncpu + 2)
        actions = fields[ncpu + 2] if len(fields) > ncpu + 2 else ""
        result[int(head)] = tuple(a.strip() for a in actions.split(",") if a.strip())
    return result


def vfio_intx_action(address: str) -> str:
    """vfio-pci's name for the INTx handler of ``address`` in /proc/interrupts."""
    return f"vfio-intx({address})"


def host_line(fn: PciFunction, sysfs_root: Path = Path("/sys"),
              proc_root: Path = Path("/proc")) -> HostLine:
    if not fn.interrupt_pin or not fn.irq or not fn.enabled:
        return HostLine(fn.irq, assigned=False)
    try:
        actions = parse_proc_interrupts((proc_root / "interrupts").read_text()).get(fn.irq, ())
    except OSError:
        actions = ()
    mine = vfio_intx_action(fn.address)
    # Only while vfio-pci holds the device is every other action someone else's;
    # a host driver's handler has a name we cannot attribute.
    handlers = tuple(a for a in actions if a != mine) if fn.bound_to_vfio else ()
    wired = []
    for other in list_pci_addresses(sysfs_root):
        if other == fn.address:
            continue
        dev = pci_device_dir(other, sysfs_root)
        if _read_int(dev / "irq") != fn.irq:
            continue
        peer = read_pci_function(other, sysfs_root)
        if peer.interrupt_pin and peer.enabled and not peer.uses_msi:
            wired.append(Peer(other, peer.driver))
    return HostLine(fn.irq, True, handlers, tuple(wired))


def physical_command(address: str, sysfs_root: Path = Path("/sys")) -> int | None:
    """PCI_COMMAND as the hardware has it (vfio-pci virtualises its own view)."""
    try:
        with (pci_device_dir(address, sysfs_root) / "config").open("rb") as f:
            f.seek(uapi.PCI_COMMAND)
            raw = f.read(2)
    except OSError:
        return None
    return int.from_bytes(raw, "little") if len(raw) == 2 else None
