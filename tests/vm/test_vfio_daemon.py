"""The real daemon (``eoid run``) relaying real vfio-pci INTx of QEMU edu devices.

One daemon for the module, as a subprocess, with three devices: ``edu0``
(vfio, shares its device fd with the consumer so the test can drive the edu
like a VMM would), ``edu1`` (vfio, not shared: the unbind test) and ``sim0``
(the sim backend, for the differential test). A test consumer attaches through
the control socket, reads ``irq`` and writes ``eoi`` exactly like a VMM.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from eoid.control import ControlClient, wait_for_socket
from tests.helpers import Consumer, Env, environment, wait_until
from tests.vm.daemon import STARTUP, serving
from tests.vm.edu import EduLine, bind_vfio, driver_of, unbind_in_background

pytestmark = pytest.mark.vfio

QUIET = 0.3
WAIT = 5.0
POLICY = "policy: {eoi_timeout: 60s}\n"  # no timeout policy may act during a scenario


@pytest.fixture(scope="module")
def daemon(edus: list[str]) -> Iterator[Env]:
    with environment(devices=0) as env:
        devices = env.root / "devices.d"
        (devices / "edu0.yaml").write_text(
            f"pci_address: '{edus[0]}'\nbackend: {{type: vfio, share_device_fd: true}}\n"
            + POLICY)
        (devices / "edu1.yaml").write_text(
            f"pci_address: '{edus[1]}'\nbackend: {{type: vfio}}\n" + POLICY)
        (devices / "sim0.yaml").write_text(
            "pci_address: '0000:00:1e.0'\nbackend: {type: sim}\n" + POLICY)
        # Both at once, with TCG-sized timeouts: each interpreter spends seconds importing
        # under emulation. The daemon retries sim0 by itself until the sim listens.
        sim = env.eoid("sim", "-c", str(env.config), "--rate", "0", "--no-guests",
                       log="sim.log")
        proc = env.eoid("run", "-c", str(env.config), log="daemon.log")
        assert wait_for_socket(env.sim_socket, STARTUP, lambda: sim.poll() is None), \
            env.log("sim")
        with serving(env, proc):
            yield env


class Line(Protocol):
    """A level-triggered device line the test can drive: the edu or the sim."""

    def raise_(self) -> None: ...

    def ack(self) -> None: ...


class SimLine:
    def __init__(self, env: Env, name: str) -> None:
        self.env = env
        self.name = name

    def raise_(self) -> None:
        self.env.sim("raise", line=self.name)

    def ack(self) -> None:
        self.env.sim("ack", line=self.name)


def counters(env: Env, name: str) -> dict[str, Any]:
    return dict(env.device(name)["counters"])


def test_n_interrupts_each_delivered_once_and_rearmed_by_eoi(daemon: Env) -> None:
    before = counters(daemon, "edu0")
    with Consumer(daemon.control, "edu0") as consumer:
        assert consumer.reply["fds"] == ["irq", "eoi", "device"]
        edu = EduLine(consumer.extra[0])
        got = []
        for _ in range(100):
            edu.raise_()
            got.append(consumer.wait_irq(WAIT))
            edu.ack()
            consumer.send_eoi()
        assert got == [1] * 100
        assert consumer.wait_irq(QUIET) == 0
        # no EOI, no unmask: a new assertion stays masked in the kernel
        edu.raise_()
        assert consumer.wait_irq(WAIT) == 1
        edu.ack()
        edu.raise_()
        assert consumer.wait_irq(QUIET) == 0
        consumer.send_eoi()  # the daemon unmasks: the pending assertion arrives
        assert consumer.wait_irq(WAIT) == 1
        edu.ack()
        consumer.send_eoi()
        assert consumer.wait_irq(QUIET) == 0
    after = counters(daemon, "edu0")
    assert after["interrupts"] - before["interrupts"] == 102
    assert after["eois"] - before["eois"] == 102
    assert after["unmasks"] - before["unmasks"] == 102
    assert after["spurious_eois"] == before["spurious_eois"]
    assert daemon.device("edu0")["up"]


def run_scenario(env: Env, device: str, make_line: Callable[[Consumer], Line]) -> list[object]:
    """The same steps on any backend; returns what the consumer observed, step by step."""
    seen: list[object] = []
    consumer = Consumer(env.control, device)
    try:
        line = make_line(consumer)
        line.raise_()
        seen.append(("raise", consumer.wait_irq(WAIT)))
        line.ack()
        consumer.send_eoi()
        seen.append(("ack+eoi", consumer.wait_irq(QUIET)))
        line.raise_()
        seen.append(("raise", consumer.wait_irq(WAIT)))
        consumer.send_eoi()  # EOI without servicing the device: level semantics
        seen.append(("eoi, still asserted", consumer.wait_irq(WAIT)))
        line.ack()
        consumer.send_eoi()
        seen.append(("ack+eoi", consumer.wait_irq(QUIET)))
        line.raise_()
        seen.append(("raise", consumer.wait_irq(WAIT)))
        line.ack()
        line.raise_()
        seen.append(("raise while masked", consumer.wait_irq(QUIET)))
        consumer.send_eoi()
        seen.append(("eoi", consumer.wait_irq(WAIT)))
        line.ack()
        line.raise_()
        seen.append(("raise, no eoi yet", consumer.wait_irq(QUIET)))
        consumer.close()  # the VMM goes away with an interrupt pending
        consumer = Consumer(env.control, device)
        line = make_line(consumer)
        seen.append(("re-attach", consumer.wait_irq(WAIT)))
        line.ack()
        consumer.send_eoi()
        seen.append(("ack+eoi", consumer.wait_irq(QUIET)))
    finally:
        consumer.close()
    return seen


def test_vfio_and_sim_produce_the_same_event_sequence(daemon: Env) -> None:
    counts = {name: counters(daemon, name) for name in ("edu0", "sim0")}
    vfio = run_scenario(daemon, "edu0", lambda consumer: EduLine(consumer.extra[0]))
    sim = run_scenario(daemon, "sim0", lambda consumer: SimLine(daemon, "sim0"))
    expected: list[object] = [
        ("raise", 1), ("ack+eoi", 0), ("raise", 1), ("eoi, still asserted", 1),
        ("ack+eoi", 0), ("raise", 1), ("raise while masked", 0), ("eoi", 1),
        ("raise, no eoi yet", 0), ("re-attach", 1), ("ack+eoi", 0)]
    # "raise, no eoi yet" is quiet because the previous interrupt was never EOIed
    assert vfio == sim
    assert vfio == expected
    deltas = {}
    for name in ("edu0", "sim0"):
        now = counters(daemon, name)
        deltas[name] = {k: now[k] - counts[name][k]
                        for k in ("interrupts", "eois", "unmasks", "spurious_eois")}
    assert deltas["edu0"] == deltas["sim0"]


def test_unbind_while_the_daemon_holds_the_device(daemon: Env, edus: list[str]) -> None:
    address = edus[1]
    assert daemon.device("edu1")["up"]
    with Consumer(daemon.control, "edu1"):
        started = time.monotonic()
        unbind = unbind_in_background(address)
        unbind.join(WAIT)
        assert not unbind.is_alive(), "the daemon did not release the device on REQ"
        assert time.monotonic() - started < 3.0
        assert driver_of(address) is None
        status = daemon.device("edu1")
        assert not status["up"]
        assert "asked for the device back" in status["down_reason"]
    bind_vfio(address)
    # the daemon retries a down device by itself and gets it back
    wait_until(lambda: bool(daemon.device("edu1")["up"]), 20, "edu1 up again")
    assert daemon.device("edu0")["up"]


HELD_POLICY = "policy: {eoi_timeout: 60s, held_timeout: 1s}\n"


@pytest.mark.timeout(300)  # three eoid commands (Python start-ups) under TCG
def test_reset_recovers_an_edu_holding_an_interrupt_for_nobody(
        daemon: Env, edus: list[str]) -> None:
    """`eoid reset` on the real driver: a VMM dies with an edu interrupt in flight and the
    edu keeps asserting; held for nobody past held_timeout, the device is `abandoned`
    (status exits 1). A reset (VFIO_DEVICE_RESET where vfio-pci offers one, as the
    kernel's sysfs `reset` says) and reopen re-arms it: the line fires again at once and
    the next consumer services it; then it relays as ever.

    On the root bus the edu has no reset method, so this is the reopen path only; the real
    reset and a real device error (AER) are in test_vfio_pcie.py, on devices behind PCIe
    root ports.
    """
    address = edus[0]
    config = daemon.root / "devices.d" / "edu0.yaml"
    original = config.read_text()
    config.write_text(original.replace(POLICY, HELD_POLICY))
    try:
        result = daemon.command("reload")
        assert result.returncode == 0, result.stderr
        consumer = Consumer(daemon.control, "edu0")
        EduLine(consumer.extra[0]).raise_()
        assert consumer.wait_irq(WAIT) == 1
        consumer.close()  # the VMM dies before its EOI; the edu still asserts
        wait_until(lambda: daemon.device("edu0")["state"] == "abandoned", 20, "abandoned")
        status = daemon.command("status")
        assert status.returncode == 1 and "abandoned" in status.stdout, status.stdout
        with ControlClient(daemon.control) as client:
            reply = client.request("reset", device="edu0")[0]
        # vfio-pci sets VFIO_DEVICE_FLAGS_RESET when the PCI core has a reset method,
        # which is also when sysfs shows `reset`: the edu on the root bus has none
        assert reply["reset"] == Path(f"/sys/bus/pci/devices/{address}/reset").exists(), reply
        wait_until(lambda: bool(daemon.device("edu0")["up"]), 20, "edu0 reopened")
        with Consumer(daemon.control, "edu0") as vm:
            edu = EduLine(vm.extra[0])
            if not reply["reset"]:  # nothing cleared the edu's status: it fires once armed
                assert vm.wait_irq(WAIT) == 1
                edu.ack()
                vm.send_eoi()
            assert vm.wait_irq(QUIET) == 0
            edu.raise_()
            assert vm.wait_irq(WAIT) == 1
            edu.ack()
            vm.send_eoi()
            assert vm.wait_irq(QUIET) == 0
            wait_until(lambda: daemon.device("edu0")["state"] == "armed", WAIT, "armed")
        status = daemon.command("status")
        assert status.returncode == 0, status.stdout
        print(f"edu {address}: reset={reply['reset']}, {daemon.device('edu0')['state']}")
    finally:
        config.write_text(original)
        daemon.command("reload")
