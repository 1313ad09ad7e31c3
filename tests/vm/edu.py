"""QEMU's ``edu`` PCI device inside the test guest, driven through eoid's VfioDevice.

edu BAR0 registers (32-bit): 0x00 id (0x010000ed), 0x24 interrupt status,
0x60 raise (status |= v, asserts INTx), 0x64 acknowledge (status &= ~v,
deasserts INTx once status is 0). Left with MSI disabled, edu interrupts
through INTx, which is what vfio-pci relays to eoid.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from pathlib import Path

from eoid.vfio import uapi
from eoid.vfio.device import VfioDevice

EDU_VENDOR, EDU_DEVICE = 0x1234, 0x11E8
EDU_ID, EDU_IRQ_STATUS, EDU_IRQ_RAISE, EDU_IRQ_ACK = 0x00, 0x24, 0x60, 0x64
SYS = Path("/sys")


def find_edus() -> list[str]:
    """PCI addresses of every edu device, in address order."""
    found = []
    for dev in sorted((SYS / "bus" / "pci" / "devices").iterdir()):
        vendor = int((dev / "vendor").read_text(), 16)
        device = int((dev / "device").read_text(), 16)
        if (vendor, device) == (EDU_VENDOR, EDU_DEVICE):
            found.append(dev.name)
    return found


def driver_of(address: str) -> str | None:
    link = SYS / "bus" / "pci" / "devices" / address / "driver"
    return link.readlink().name if link.is_symlink() else None


def bind_vfio(address: str) -> None:
    """Hand ``address`` to vfio-pci the way an operator would."""
    dev = SYS / "bus" / "pci" / "devices" / address
    if driver_of(address) == "vfio-pci":
        return
    (dev / "driver_override").write_text("vfio-pci")
    if driver_of(address) is not None:
        (dev / "driver" / "unbind").write_text(address)
    (SYS / "bus" / "pci" / "drivers_probe").write_text(address)
    assert driver_of(address) == "vfio-pci", f"{address} did not bind to vfio-pci"


def unbind_in_background(address: str) -> threading.Thread:
    """Unbind from vfio-pci in a thread: the write blocks while the device is open."""
    def unbind() -> None:
        (SYS / "bus" / "pci" / "drivers" / "vfio-pci" / "unbind").write_text(address)

    thread = threading.Thread(target=unbind, name=f"unbind {address}", daemon=True)
    thread.start()
    return thread


def wait_fd(fd: int, timeout: float) -> int | None:
    """Wait for an eventfd; its counter (consumed), or None on timeout."""
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return None
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return None


def physical_command(address: str) -> int:
    """PCI_COMMAND as the hardware has it (vfio-pci virtualises its own copy)."""
    with (SYS / "bus" / "pci" / "devices" / address / "config").open("rb") as f:
        f.seek(uapi.PCI_COMMAND)
        return int.from_bytes(f.read(2), "little")


def pci_status(address: str) -> int:
    """PCI_STATUS as the hardware has it: bit 3 (``PCI_STATUS_INTERRUPT``) is the INTx
    level the function asserts, masked or not."""
    with (SYS / "bus" / "pci" / "devices" / address / "config").open("rb") as f:
        f.seek(uapi.PCI_STATUS)
        return int.from_bytes(f.read(2), "little")


class FdLine:
    """A device behind a daemon's device, driven through the device fd the daemon shared
    with its consumer (``share_device_fd``), as a VMM would: memory decode on, DisINTx
    off."""

    def __init__(self, device_fd: int) -> None:
        api = uapi.KernelVfio()
        self.fd = device_fd
        self.bar0 = api.device_get_region_info(device_fd, uapi.RegionIndex.BAR0).offset
        config = api.device_get_region_info(device_fd, uapi.RegionIndex.CONFIG).offset
        command = int.from_bytes(os.pread(device_fd, 2, config + uapi.PCI_COMMAND), "little")
        os.pwrite(device_fd, ((command | uapi.PCI_COMMAND_MEMORY)
                              & ~uapi.PCI_COMMAND_INTX_DISABLE).to_bytes(2, "little"),
                  config + uapi.PCI_COMMAND)


class EduLine(FdLine):
    """The edu's interrupt through a shared device fd."""

    def raise_(self) -> None:
        os.pwrite(self.fd, struct.pack("<I", 1), self.bar0 + EDU_IRQ_RAISE)

    def ack(self) -> None:
        os.pwrite(self.fd, struct.pack("<I", 1), self.bar0 + EDU_IRQ_ACK)

    def status(self) -> int:
        return int(struct.unpack("<I", os.pread(self.fd, 4, self.bar0 + EDU_IRQ_STATUS))[0])


class Edu:
    """An opened edu: raise/ack its interrupt through BAR0 on the device fd."""

    def __init__(self, device: VfioDevice) -> None:
        self.device = device
        command = device.read_config(uapi.PCI_COMMAND, 2)
        # BAR access needs memory decode (EIO otherwise); DisINTx must be clear
        device.write_config(uapi.PCI_COMMAND, 2,
                            (command | uapi.PCI_COMMAND_MEMORY)
                            & ~uapi.PCI_COMMAND_INTX_DISABLE)

    @property
    def address(self) -> str:
        return self.device.pci_address

    def read32(self, offset: int) -> int:
        raw = self.device.read_region(uapi.RegionIndex.BAR0, offset, 4)
        return int(struct.unpack("<I", raw)[0])

    def write32(self, offset: int, value: int) -> None:
        self.device.write_region(uapi.RegionIndex.BAR0, offset, struct.pack("<I", value))

    def raise_irq(self) -> None:
        self.write32(EDU_IRQ_RAISE, 1)

    def ack(self) -> None:
        self.write32(EDU_IRQ_ACK, 1)

    def status(self) -> int:
        return self.read32(EDU_IRQ_STATUS)
