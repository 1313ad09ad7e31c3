"""IrqCounter and the parsers behind it, on fixture trees (the guest's real files are
read by tests/vm/test_vfio_route.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from eoid.vfio.procirq import IrqCounter, parse_counts, parse_per_cpu
from eoid.vfio.twin import FakeFunction, FakeVfio

# Rows as kernels print them: numbered IRQs with per-CPU counts, chip, hwirq and actions;
# an IRQ with no action left (fewer fields); the arch rows (NMI, LOC...) with a
# description; ERR and MIS with a single count.
PROC_INTERRUPTS = """\
            CPU0       CPU1       CPU2       CPU3
   0:         41          0          0          0   IO-APIC   2-edge      timer
   1:          0          9          0          0   IO-APIC   1-edge      i8042
  10:        100        200        300        400   IO-APIC  10-fasteoi   vfio-intx(0000:00:10.0)
  11:          7          0          0          0   IO-APIC  11-fasteoi   virtio0, uhci_hcd:usb1
  12:          3          4
  24:          0          0          0          0  PCI-MSI 49152-edge      virtio1-config
 NMI:          0          0          0          0   Non-maskable interrupts
 LOC:      12345      23456      34567      45678   Local timer interrupts
 ERR:          0
 MIS:          0
"""


def test_parse_counts_sums_the_cpus_and_skips_the_arch_rows() -> None:
    counts = parse_counts(PROC_INTERRUPTS)
    assert counts == {0: 41, 1: 9, 10: 1000, 11: 7, 12: 7, 24: 0}
    assert parse_counts("") == {}
    assert parse_counts("           CPU0\n  5:  oops  IO-APIC\n") == {5: 0}


def test_parse_per_cpu() -> None:
    assert parse_per_cpu("0,5,3\n") == 8
    assert parse_per_cpu("17") == 17
    assert parse_per_cpu("garbage") is None


def tree(tmp_path: Path, text: str = PROC_INTERRUPTS) -> tuple[Path, Path]:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    proc.mkdir()
    sys.mkdir()
    (proc / "interrupts").write_text(text)
    return proc, sys


def test_counts_from_proc_interrupts(tmp_path: Path) -> None:
    proc, sys = tree(tmp_path)
    irqs = IrqCounter(proc, sys)
    assert irqs.source == "/proc/interrupts"  # no /sys/kernel/irq
    assert irqs.count(10) == 1000
    assert irqs.count(11) == 7
    assert irqs.count(99) is None  # no such IRQ
    assert irqs.reads == 2  # 10 read the file, 11 came with it, 99 read it again


def test_an_unreadable_file_is_none_and_not_retried_within_max_age(tmp_path: Path) -> None:
    irqs = IrqCounter(tmp_path / "proc", tmp_path / "sys")
    assert irqs.count(10) is None
    assert irqs.count(10) is None
    assert irqs.reads == 1


def test_a_burst_for_1024_devices_reads_once_and_max_age_0_reads_now(tmp_path: Path) -> None:
    proc, sys = tree(tmp_path)
    now = [0.0]
    irqs = IrqCounter(proc, sys, max_age=0.1, clock=lambda: now[0])
    for i in range(1024):  # devices share the few INTx lines a host has
        assert irqs.count((10, 11, 12)[i % 3]) in (1000, 7)
    assert irqs.reads == 1
    (proc / "interrupts").write_text(PROC_INTERRUPTS.replace("100 ", "150 "))
    assert irqs.count(10) == 1000  # cached
    assert irqs.count(10, max_age=0) == 1050  # a datapath switch asks for now
    now[0] = 0.2
    (proc / "interrupts").write_text(PROC_INTERRUPTS.replace("100 ", "160 "))
    assert irqs.count(10) == 1060  # expired
    assert irqs.reads == 3


def test_counts_from_per_cpu_count(tmp_path: Path) -> None:
    proc, sys = tree(tmp_path)
    for irq, text in ((10, "100,200,300,400,0,0,0,0\n"), (11, "bad\n")):
        (sys / "kernel" / "irq" / str(irq)).mkdir(parents=True)
        (sys / "kernel" / "irq" / str(irq) / "per_cpu_count").write_text(text)
    irqs = IrqCounter(proc, sys)
    assert irqs.source == "per_cpu_count"  # one source for life: counts must subtract
    assert irqs.count(10) == 1000  # possible CPUs, offline ones too
    assert irqs.count(11) is None
    assert irqs.count(12) is None  # not in sysfs: not looked up in /proc either
    for _ in range(100):
        irqs.count(10)
    assert irqs.reads == 3  # one file per IRQ per max_age


def test_both_sources_agree_on_the_twins_trees(tmp_path: Path) -> None:
    api = FakeVfio(tmp_path / "dev", sparse_irq=True)
    fn = api.add(FakeFunction("0000:00:10.0", 3, irq=10))
    other = api.add(FakeFunction("0000:00:11.0", 4, irq=10))  # a shared line
    api.write_tree(tmp_path / "sys", tmp_path / "proc", tmp_path / "dev")
    fn.irq_type = other.irq_type = "intx"
    for _ in range(3):
        fn.assert_line()
        fn.masked = False
    other.assert_line()
    by_proc = IrqCounter(tmp_path / "proc", tmp_path / "nosys")
    by_sysfs = IrqCounter(tmp_path / "proc", tmp_path / "sys")
    assert by_proc.count(10) == by_sysfs.count(10) == 4  # a shared line counts everyone


def test_many_threads_share_one_counter(tmp_path: Path) -> None:
    proc, sys = tree(tmp_path)
    irqs = IrqCounter(proc, sys, max_age=0)
    seen: list[int | None] = []

    def ask() -> None:
        seen.extend(irqs.count(10) for _ in range(200))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [1000] * 800


@pytest.mark.parametrize("irq", [0, -1])
def test_no_irq_numbers_below_zero_or_zero_match(tmp_path: Path, irq: int) -> None:
    proc, sys = tree(tmp_path)
    assert IrqCounter(proc, sys).count(irq) == (41 if irq == 0 else None)
