"""QEMU's ``e1000e`` (Intel 82574L) inside the test guest: a PCIe endpoint, so vfio-pci
offers it the ERR irq that the conventional-PCI edu lacks. No driver binds it in the
guest; eoid relays its INTx like the edu's.

BAR0 registers (32-bit) used here: 0xC0 ICR (interrupt causes; a read clears them
while MSI-X is off), 0xC8 ICS (set causes), 0xD0 IMS (enable causes), 0xD8 IMC
(disable causes). INTx is asserted while ICR & IMS is non-zero.
"""

from __future__ import annotations

import os
import struct

from tests.vm.edu import SYS, FdLine

E1000E_VENDOR, E1000E_DEVICE = 0x8086, 0x10D3
ICR, ICS, IMS, IMC = 0xC0, 0xC8, 0xD0, 0xD8
CAUSE = 0x10  # RXDMT0: a cause nothing else raises on a NIC without traffic


def find_e1000e() -> list[str]:
    return [dev.name for dev in sorted((SYS / "bus" / "pci" / "devices").iterdir())
            if (int((dev / "vendor").read_text(), 16), int((dev / "device").read_text(), 16))
            == (E1000E_VENDOR, E1000E_DEVICE)]


class NicLine(FdLine):
    """The e1000e behind a daemon's device, driven through the consumer's device fd."""

    def _write(self, offset: int, value: int) -> None:
        os.pwrite(self.fd, struct.pack("<I", value), self.bar0 + offset)

    def _read(self, offset: int) -> int:
        return int(struct.unpack("<I", os.pread(self.fd, 4, self.bar0 + offset))[0])

    def raise_(self) -> None:
        self._write(ICS, CAUSE)
        self._write(IMS, CAUSE)

    def ack(self) -> None:
        self._write(IMC, CAUSE)
        self._read(ICR)
