"""Fixtures for the tests with a real KVM guest (``vmm.py``): skipped, with the reason,
where ``/dev/kvm`` cannot run one; ``resample_at`` says which KVM this host runs."""

from __future__ import annotations

import functools
import os
import select
import threading
import time
from pathlib import Path

import pytest

from eoid.device import drain_eventfd
from tests.kvm.vmm import Vm, kvm_unavailable

HERE = Path(__file__).parent
_RESAMPLE_AT = pytest.StashKey[str]()


@functools.cache
def unavailable() -> str | None:
    return kvm_unavailable()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs a /dev/kvm that can run a guest: {reason}")
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(skip)


def probe_resample_at() -> str:
    """When this host's KVM signals a resampling irqfd's resamplefd: ``"eoi"`` (standard
    KVM: the resampler is an IOAPIC ack notifier, run when the guest EOIs) or
    ``"injection"`` (before the guest's handler has run at all).

    One interrupt through a fresh irqfd: the handler's port write stops the vCPU after the
    injection and before the EOI; whether the resamplefd holds a count then decides."""
    irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    resample = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    in_handler: list[int] = []
    handled = threading.Event()

    def on_ack(count: int) -> None:
        select.select([resample], [], [], 0.05)  # time for a signal on its way, if any
        in_handler.append(drain_eventfd(resample))
        handled.set()

    try:
        with Vm(on_ack=on_ack) as vm:
            vm.start()
            vm.irqfd(irq, resample)
            os.eventfd_write(irq, 1)
            assert handled.wait(5), f"the probe's interrupt never reached the guest {vm.faults}"
            # after the EOI: the resample, or (had it come already) nothing more
            select.select([resample], [], [], 0.1 if in_handler[0] else 5)
            after = drain_eventfd(resample)
            vm.check()
    finally:
        os.close(irq)
        os.close(resample)
    if in_handler == [1] and after == 0:
        return "injection"
    if in_handler == [0] and after == 1:
        return "eoi"
    raise AssertionError(f"resamplefd counts: {in_handler} in the handler, {after} after EOI")


def probe_pending_unmask() -> str:
    """What this host's KVM does when the guest unmasks a pin whose GSI a resampling irqfd
    raised while it was masked: ``"resample"`` (KVM's 2023 change, docs/intx-eoi.md
    §13.4: the resamplefd is signalled and the interrupt never reaches the guest) or
    ``"inject"`` (older kernels: delivered once, resampled as any other)."""
    irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    resample = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        with Vm() as vm:
            vm.irqfd(irq, resample)
            os.eventfd_write(irq, 1)
            time.sleep(0.02)
            assert vm.ioapic()[0] & 1 << vm.gsi, "raised, pending behind the masked pin"
            vm.start()  # the guest unmasks its pin
            assert select.select([resample], [], [], 5)[0], "neither resampled nor injected"
            time.sleep(0.05)
            vm.check()
            resamples, runs = drain_eventfd(resample), list(vm.acks)
    finally:
        os.close(irq)
        os.close(resample)
    assert resamples == 1 and runs in ([], [1]), (resamples, runs)
    return "inject" if runs else "resample"


@pytest.fixture(scope="session")
def pending_unmask() -> str:
    """``"resample"`` or ``"inject"`` (see ``probe_pending_unmask``)."""
    return probe_pending_unmask()


@pytest.fixture(scope="session")
def resample_at(pytestconfig: pytest.Config) -> str:
    """``"eoi"`` or ``"injection"`` (see ``probe_resample_at``), shown in the summary."""
    found = pytestconfig.stash.get(_RESAMPLE_AT, None)
    if found is None:
        found = pytestconfig.stash[_RESAMPLE_AT] = probe_resample_at()
    return found


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    found = config.stash.get(_RESAMPLE_AT, None)
    if found is not None:
        what = {"eoi": "at the guest's EOI, as standard KVM does",
                "injection": "when it injects the interrupt, before the guest's handler runs "
                             "(not at the EOI, as standard KVM does)"}[found]
        terminalreporter.write_line(f"tests/kvm: this host's KVM signals the resamplefd {what}")
