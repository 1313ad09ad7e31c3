"""Reset and device errors on the real vfio-pci driver, with devices behind PCIe root ports.

run-vfio-tests boots a third guest for these (marker ``pcie``): an edu behind root port
rp0 and an e1000e behind rp1 (run-in-vm ``VM_PCIE``), QEMU's monitor on the guest's
second serial port (``VM_MONITOR``). Behind a port the edu has a bus reset, so vfio-pci
offers ``VFIO_DEVICE_RESET``; the e1000e is a PCIe endpoint, so vfio-pci offers it the ERR
irq, which it signals when the kernel's AER driver runs recovery for an error that QEMU
injects (``pcie_aer_inject_error``) at the port above it.

What QEMU's models do on a reset is part of what is checked: the PCI core resets the
function (its INTx level drops), the edu model itself keeps its registers (it has no
reset handler).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from eoid.control import ControlClient
from eoid.vfio import uapi
from eoid.vfio.device import open_vfio_device
from eoid.wire import recv_msg
from tests.helpers import Consumer, Env, environment, wait_until
from tests.vm.daemon import serving
from tests.vm.e1000e import NicLine, find_e1000e
from tests.vm.edu import (
    EDU_IRQ_STATUS,
    SYS,
    Edu,
    EduLine,
    bind_vfio,
    find_edus,
    pci_status,
    wait_fd,
)
from tests.vm.qmp import GuestQmp

pytestmark = [pytest.mark.vfio, pytest.mark.pcie]

QUIET = 0.3
WAIT = 5.0
EDU_LIVENESS = 0x04  # reads back the complement of what was written
POLICY = "policy: {eoi_timeout: 60s}\n"


def port_of(address: str) -> Path:
    """The sysfs dir of the bridge above ``address``."""
    return (SYS / "bus" / "pci" / "devices" / address).resolve().parent


def qemu_port_id(address: str) -> str:
    """run-in-vm puts VM_PCIE device N behind root port ``rpN`` at slot 0x18+N."""
    slot = int(port_of(address).name.split(":")[2].split(".")[0], 16)
    return f"rp{slot - 0x18}"


@pytest.fixture(scope="module")
def ported_edu() -> str:
    found = [a for a in find_edus() if not a.startswith("0000:00:")]
    assert found, f"no edu behind a root port (run-vfio-tests boots VM_PCIE='edu ...'): " \
                  f"{find_edus()}"
    bind_vfio(found[0])
    return found[0]


@pytest.fixture(scope="module")
def nic() -> str:
    found = find_e1000e()
    assert found, "no e1000e in the guest (run-vfio-tests boots VM_PCIE='... e1000e')"
    bind_vfio(found[0])
    return found[0]


@pytest.fixture(scope="module")
def qmp() -> Iterator[GuestQmp]:
    with GuestQmp() as q:
        yield q


def reset_methods(address: str) -> list[str]:
    return (SYS / "bus" / "pci" / "devices" / address / "reset_method").read_text().split()


def test_vfio_device_reset_is_a_bus_reset_that_drops_the_assertion(
        ported_edu: str, trigger: int) -> None:
    """VFIO_DEVICE_RESET itself (no reopen): behind a root port the kernel resets the edu
    through its parent bridge's secondary bus reset; the INTx the edu was asserting is
    gone, VfioDevice.reset()'s unmask finds nothing pending, and the line works again."""
    address = ported_edu
    assert reset_methods(address) == ["bus"]
    assert (SYS / "bus" / "pci" / "devices" / address / "reset").exists()
    device = open_vfio_device("edu", address)
    try:
        assert device.supports_reset and device.info.detail["reset"] == "yes"
        assert device.info.detail["err_irq"] == "no"  # conventional PCI: no ERR irq
        edu = Edu(device)
        device.enable(trigger)
        edu.ack()
        wait_fd(trigger, QUIET)
        edu.write32(EDU_LIVENESS, 0x12345678)
        edu.raise_irq()
        assert wait_fd(trigger, WAIT) == 1
        assert pci_status(address) & uapi.PCI_STATUS_INTERRUPT  # asserted, masked
        assert device.reset()
        assert not pci_status(address) & uapi.PCI_STATUS_INTERRUPT  # the reset dropped it
        assert wait_fd(trigger, QUIET) is None  # unmasked by reset(), nothing pending
        # the edu model has no reset handler: its own registers survive the bus reset
        edu = Edu(device)
        assert edu.status() == 1
        assert edu.read32(EDU_LIVENESS) == ~0x12345678 & 0xFFFFFFFF
        edu.ack()
        edu.raise_irq()
        assert wait_fd(trigger, WAIT) == 1
        edu.ack()
        device.unmask()
        assert wait_fd(trigger, QUIET) is None
    finally:
        device.close()


@pytest.fixture(scope="module")
def daemon(ported_edu: str, nic: str) -> Iterator[Env]:
    with environment(devices=0) as env:
        devices = env.root / "devices.d"
        for name, address in (("edu", ported_edu), ("nic", nic)):
            (devices / f"{name}.yaml").write_text(
                f"pci_address: '{address}'\nbackend: {{type: vfio, share_device_fd: true}}\n"
                + POLICY)
        proc = env.eoid("run", "-c", str(env.config), log="daemon.log")
        with serving(env, proc):
            yield env


def relays_once(vm: Consumer, line: EduLine | NicLine) -> None:
    """One interrupt, delivered exactly once, re-armed by the EOI."""
    line.raise_()
    assert vm.wait_irq(WAIT) == 1
    line.ack()
    vm.send_eoi()
    assert vm.wait_irq(QUIET) == 0


def counters(env: Env, name: str) -> dict[str, int]:
    return {k: v for k, v in env.device(name)["counters"].items() if isinstance(v, int)}


@pytest.mark.timeout(300)
def test_eoid_reset_resets_the_device_through_the_daemon(daemon: Env, ported_edu: str) -> None:
    """`eoid reset` on the real driver issues a real VFIO_DEVICE_RESET: the reply says so
    (as sysfs does), the interrupt the edu held is dropped by the reset rather than
    delivered again, and the consumer, still attached, gets the next one exactly once.

    The consumer keeps its copy of the device fd throughout, so the device never closes
    in the kernel and vfio-pci's own reset-on-open cannot be what dropped the assertion."""
    with Consumer(daemon.control, "edu") as vm:
        edu = EduLine(vm.extra[0])
        edu.ack()
        relays_once(vm, edu)
        edu.raise_()
        assert vm.wait_irq(WAIT) == 1  # held: no EOI; the line stays masked and asserted
        assert pci_status(ported_edu) & uapi.PCI_STATUS_INTERRUPT
        before = counters(daemon, "edu")
        with ControlClient(daemon.control) as client:
            reply = client.request("reset", device="edu")[0]
        assert reply["reset"] is True, reply
        assert (SYS / "bus" / "pci" / "devices" / ported_edu / "reset").exists()
        assert reset_methods(ported_edu) == ["bus"]
        wait_until(lambda: daemon.device("edu")["state"] == "armed", 20, "edu re-armed")
        assert not pci_status(ported_edu) & uapi.PCI_STATUS_INTERRUPT
        assert vm.wait_irq(QUIET) == 0  # on the root bus (no reset) it would fire again
        assert os.pread(vm.extra[0], 4, edu.bar0 + EDU_IRQ_STATUS) == b"\x01\0\0\0"
        relays_once(vm, edu)
        after = counters(daemon, "edu")
        assert after["interrupts"] - before["interrupts"] == 1
        assert after["spurious_eois"] == before["spurious_eois"]
    events = [e for e in daemon.log_events("daemon") if e.get("message") == "device reset"]
    assert events and events[-1]["reset"] is True, events


def up_and_state(env: Env, device: str) -> tuple[float, list[str]]:
    samples = env.scrape()
    up = samples["eoid_device_up"][(("device", device),)]
    states = [dict(k)["state"] for k, v in samples["eoid_device_state"].items()
              if dict(k)["device"] == device and v == 1]
    return up, states


def kernel_log() -> str:
    return subprocess.run(["dmesg"], check=True, capture_output=True, text=True).stdout


def inject_error(env: Env, qmp: GuestQmp, vm: Consumer, nic: str) -> None:
    """An uncorrectable, non-fatal error (poisoned TLP) detected by the root port above
    the e1000e: the kernel's AER driver runs recovery for everything below the port and
    vfio-pci's error_detected signals the ERR eventfd."""
    port = qemu_port_id(nic)
    received = f"AER: Uncorrected (Non-Fatal) error message received from {port_of(nic).name}"
    logged = kernel_log().count(received)
    reply = qmp.hmp(f"pcie_aer_inject_error {port} POISON_TLP")
    assert reply.startswith("OK"), reply
    wait_until(lambda: env.device("nic")["state"] == "faulted", 30, "faulted")
    assert kernel_log().count(received) == logged + 1, kernel_log()[-3000:]
    seen: list[str] = []
    while not seen or seen[-1] == "device_down":  # (a reset or reload before: device_down)
        msg = recv_msg(vm.client.sock)
        assert msg is not None, seen
        seen.append(msg[0]["event"])
    assert seen[-1] == "device_error", seen


@pytest.mark.timeout(400)
def test_a_real_device_error_faults_the_device_until_reset_or_reload(
        daemon: Env, nic: str, qmp: GuestQmp) -> None:
    assert daemon.device("nic")["up"]
    errors = daemon.device("nic")["counters"]["errors"].get("device_event", 0)
    with Consumer(daemon.control, "nic") as vm:
        line = NicLine(vm.extra[0])
        line.ack()
        relays_once(vm, line)
        inject_error(daemon, qmp, vm, nic)
        status = daemon.device("nic")
        assert status["faulted"] and not status["up"]
        assert status["counters"]["errors"]["device_event"] == errors + 1
        assert up_and_state(daemon, "nic") == (0, ["faulted"])
        assert up_and_state(daemon, "edu") == (1, ["armed"])
        text = daemon.command("status")
        assert text.returncode == 1 and "faulted" in text.stdout, text.stdout
        # while faulted the line is not unmasked: one interrupt, and after its EOI none
        line.raise_()
        assert vm.wait_irq(WAIT) == 1
        line.ack()
        eois = daemon.device("nic")["counters"]["eois"]
        vm.send_eoi()
        wait_until(lambda: daemon.device("nic")["counters"]["eois"] == eois + 1, WAIT, "EOI")
        line.raise_()
        assert vm.wait_irq(QUIET * 3) == 0
        line.ack()
        assert daemon.device("nic")["state"] == "faulted"  # it lasts

        result = daemon.command("reset", "nic")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "reset and reopened" in result.stdout, result.stdout
        wait_until(lambda: daemon.device("nic")["state"] == "armed", 20, "armed after reset")
        assert up_and_state(daemon, "nic") == (1, ["armed"])
        relays_once(vm, line)
        assert daemon.command("status").returncode == 0

        # a second error, recovered by a reload this time
        inject_error(daemon, qmp, vm, nic)
        assert up_and_state(daemon, "nic") == (0, ["faulted"])
        result = daemon.command("reload")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lambda: daemon.device("nic")["state"] == "armed", 20, "armed after reload")
        relays_once(vm, line)
        assert up_and_state(daemon, "nic") == (1, ["armed"])
