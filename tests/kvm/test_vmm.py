"""The minimal VMM itself, against the host's KVM: the guest boots and programs its pin,
takes level-triggered interrupts as an IOAPIC delivers them, and a resampling irqfd works
as docs/intx-eoi.md §13 says (with this host's difference detected, not assumed)."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Iterator

import pytest

from eoid.device import drain_eventfd
from tests.kvm.conftest import probe_pending_unmask
from tests.kvm.vmm import COUNTER, ENTRY_LEVEL, ENTRY_MASKED, ENTRY_REMOTE_IRR, Vm

GSI_BIT = 1 << 20  # the IOAPIC's irr bit of the VM's default GSI


@pytest.fixture
def eventfds() -> Iterator[tuple[int, int]]:
    """An irqfd and its resamplefd, as a VMM makes them."""
    irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    resample = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield irq, resample
    os.close(irq)
    os.close(resample)


def wait_runs(vm: Vm, n: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while len(vm.acks) < n and time.monotonic() < deadline:
        time.sleep(0.001)
    vm.check()
    assert len(vm.acks) >= n, f"{len(vm.acks)} handler runs, waited for {n}"


def test_the_guest_boots_and_programs_its_pin_level_triggered_and_unmasked() -> None:
    with Vm(gsi=20, vector=0x40) as vm:
        _, before = vm.ioapic()
        assert before & ENTRY_MASKED  # the pin's reset state
        vm.start()
        irr, entry = vm.ioapic()
        assert entry & 0xFF == 0x40
        assert entry & ENTRY_LEVEL
        assert not entry & (ENTRY_MASKED | ENTRY_REMOTE_IRR)
        assert entry >> 56 == 0  # to APIC 0, the vCPU's
        assert not irr & GSI_BIT
        assert (vm.acks, vm.handled) == ([], 0)


@pytest.mark.parametrize("serviced_at", [1, 3])
def test_a_level_interrupt_is_taken_again_after_each_eoi_until_the_line_drops(
        serviced_at: int, resample_at: str) -> None:
    """IOAPIC level semantics: the pin is in service (remote IRR) in the handler; an EOI
    with the line still high delivers it again; a line lowered in the handler ends it. A
    KVM that acknowledges the pin at injection (``resample_at``) has delivered it once more
    already by then: one more run, which finds the pin idle."""
    seen: list[int] = []

    def on_ack(count: int) -> None:
        seen.append(vm.ioapic()[1])
        if count == serviced_at:
            vm.irq_line(0)  # the device is serviced on this run

    with Vm(on_ack=on_ack) as vm:
        vm.start()
        for round_ in range(1, 11):  # and the same again, each time the line rises
            vm.irq_line(1)
            runs = serviced_at + (resample_at == "injection")
            wait_runs(vm, runs)
            time.sleep(0.02)  # one more run would have come by now
            assert vm.acks == list(range(1, runs + 1)), round_
            assert all(entry & ENTRY_REMOTE_IRR for entry in seen[:serviced_at])
            assert not any(entry & ENTRY_REMOTE_IRR for entry in seen[serviced_at:])
            irr, entry = vm.ioapic()
            assert not irr & GSI_BIT
            assert not entry & ENTRY_REMOTE_IRR  # the last EOI ended it
            vm.acks.clear()
            seen.clear()
            vm.mem[COUNTER:COUNTER + 4] = bytes(4)  # the handler's count starts over
        vm.check()


def test_a_resampling_irqfd_injects_each_signal_and_resamples_each_interrupt(
        eventfds: tuple[int, int]) -> None:
    """What eoid's relay relies on, on any KVM: one signal after each resample is one
    interrupt in the guest and one count on the resamplefd."""
    irq, resample = eventfds
    with Vm() as vm:
        vm.start()
        vm.irqfd(irq, resample)
        for n in range(1, 51):
            os.eventfd_write(irq, 1)
            assert select.select([resample], [], [], 5)[0], f"no resample for interrupt {n}"
            assert drain_eventfd(resample) == 1
            wait_runs(vm, n)
        time.sleep(0.05)
        assert vm.acks == list(range(1, 51))
        assert drain_eventfd(resample) == 0
        assert drain_eventfd(irq) == 0  # KVM took every count (§13.6)


def test_when_the_resamplefd_fires_decides_what_a_second_signal_does(
        eventfds: tuple[int, int], resample_at: str) -> None:
    """Signalled again while the guest is in its handler: standard KVM (resample at EOI)
    still holds the GSI raised, so the second signal injects nothing (§13.3); a KVM that
    resamples at injection has lowered it already, so the guest takes the interrupt again
    after its EOI."""
    irq, resample = eventfds
    in_handler: list[tuple[int, int]] = []

    def on_ack(count: int) -> None:
        if count == 1:
            in_handler.append(vm.ioapic())
            os.eventfd_write(irq, 1)

    with Vm(on_ack=on_ack) as vm:
        vm.start()
        vm.irqfd(irq, resample)
        os.eventfd_write(irq, 1)
        wait_runs(vm, 1)
        time.sleep(0.1)
        vm.check()
        (irr, entry), = in_handler
        if resample_at == "eoi":
            assert irr & GSI_BIT and entry & ENTRY_REMOTE_IRR
            assert vm.acks == [1]
        else:
            assert not irr & GSI_BIT and not entry & ENTRY_REMOTE_IRR
            assert vm.acks == [1, 2]
        assert not vm.ioapic()[0] & GSI_BIT or resample_at == "eoi"


def test_unmasking_a_pending_pin_ends_or_delivers_the_interrupt_once() -> None:
    """An irqfd signalled while the guest's pin is still masked (before it booted):
    kernels with KVM's 2023 change resample instead of injecting when the guest unmasks
    the pin (§13.4); older ones inject it. Either way exactly one resample, never two runs
    (``probe_pending_unmask`` asserts it)."""
    found = probe_pending_unmask()
    print(f"unmasking a pending pin: {found}")
    assert found in ("resample", "inject")


def test_a_halted_guest_stops_at_once() -> None:
    with Vm() as vm:
        vm.start()
        time.sleep(0.05)  # halted, blocked in KVM_RUN
        started = time.monotonic()
        vm.stop()
        assert time.monotonic() - started < 1
        assert vm.stopped.is_set()
        assert not any(t.name == "vcpu0" for t in threading.enumerate())
        vm.check()
