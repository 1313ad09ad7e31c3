"""How often the host took each IRQ: the count behind ``kernel_interrupts`` of a VFIO device.

On the kernel's path eoid sees no interrupt itself; the host's own count of the line is
what is left (docs/intx-eoi.md §14). The kernel keeps one counter per IRQ and CPU and shows
them two ways:

- ``/sys/kernel/irq/N/per_cpu_count`` (kernels with ``CONFIG_SPARSE_IRQ``, which every
  distribution kernel has): one IRQ's counts, comma-separated, one per possible CPU;
- ``/proc/interrupts``: a row per IRQ, one column per online CPU, then the chip, the
  hardware IRQ and the handlers' names.

Either way the IRQ's count is the sum over CPUs. One ``IrqCounter`` serves the whole
daemon: it picks one source for its life (counts from two sources do not subtract), and
keeps what it read for ``max_age`` seconds, so that a metrics scrape asking for 1024
devices reads each IRQ's file (or ``/proc/interrupts``) once, not 1024 times. A caller
that needs the count of this instant (a datapath switch) asks with ``max_age=0``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path


def parse_counts(text: str) -> dict[int, int]:
    """Numbered IRQ → its count summed over CPUs, from ``/proc/interrupts``.

    Rows not headed by a number (``NMI``, ``LOC``, ``ERR``...) are skipped; a row with
    fewer count columns than CPUs (seen for IRQs without a handler on some kernels) sums
    the counts it has.
    """
    lines = text.splitlines()
    if not lines:
        return {}
    ncpu = len(lines[0].split())
    counts: dict[int, int] = {}
    for line in lines[1:]:
        head, sep, rest = line.partition(":")
        if not sep or not head.strip().isdigit():
            continue
        total = 0
        for field in rest.split()[:ncpu]:
            if not field.isdigit():
                break
            total += int(field)
        counts[int(head)] = total
    return counts


def parse_per_cpu(text: str) -> int | None:
    """The sum of ``per_cpu_count`` (``0,5,3``); None if it is not that."""
    try:
        return sum(int(v) for v in text.strip().split(",") if v)
    except ValueError:
        return None


class IrqCounter:
    """Host IRQ counts for any number of devices, read from ``sysfs_root``/``proc_root``.

    Thread-safe: the metrics thread and the event loop both ask.
    """

    def __init__(self, proc_root: Path = Path("/proc"), sysfs_root: Path = Path("/sys"), *,
                 max_age: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.proc_root = proc_root
        self.sysfs_root = sysfs_root
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[int, tuple[float, int | None]] = {}
        self._sysfs: bool | None = None  # decided on the first read
        self.reads = 0  # files read (tests check the cache with it)

    @property
    def source(self) -> str:
        """``per_cpu_count`` or ``/proc/interrupts`` (decided on the first read)."""
        return "per_cpu_count" if self._use_sysfs() else "/proc/interrupts"

    def _use_sysfs(self) -> bool:
        if self._sysfs is None:
            self._sysfs = (self.sysfs_root / "kernel" / "irq").is_dir()
        return self._sysfs

    def count(self, irq: int, max_age: float | None = None) -> int | None:
        """How many times the host took ``irq``, summed over CPUs; None if the host has no
        such IRQ or its count cannot be read. At most ``max_age`` seconds old."""
        age = self.max_age if max_age is None else max_age
        with self._lock:
            now = self._clock()
            hit = self._cache.get(irq)
            if hit is not None and age > 0 and now - hit[0] <= age:
                return hit[1]
            if self._use_sysfs():
                value = self._read_sysfs(irq)
                self._cache[irq] = (now, value)
                return value
            counts = self._read_proc()
            if counts is None:  # unreadable: nothing known of any IRQ for now
                self._cache[irq] = (now, None)
                return None
            for n, c in counts.items():
                self._cache[n] = (now, c)
            value = counts.get(irq)
            if value is None:
                self._cache[irq] = (now, None)
            return value

    def _read_sysfs(self, irq: int) -> int | None:
        self.reads += 1
        try:
            text = (self.sysfs_root / "kernel" / "irq" / str(irq) / "per_cpu_count").read_text()
        except OSError:
            return None
        return parse_per_cpu(text)

    def _read_proc(self) -> dict[int, int] | None:
        self.reads += 1
        try:
            return parse_counts((self.proc_root / "interrupts").read_text())
        except OSError:
            return None
