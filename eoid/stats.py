"""Per-device counters and histograms kept in plain Python objects.

The hot path only does integer arithmetic on these; ``eoid.metrics`` turns them into
Prometheus metrics at scrape time. (A prometheus_client call per interrupt costs more
than the rest of the interrupt's handling.)
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

BUCKETS_SECONDS: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
"""Upper bounds from 1 µs to 10 s; an implicit +Inf bucket follows."""

BUCKETS_NS: tuple[int, ...] = tuple(round(b * 1e9) for b in BUCKETS_SECONDS)

SERVICE_BUCKETS_NS: tuple[int, ...] = (
    10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 10_000_000, 100_000_000)
"""Exported buckets of the guest's service time (10 µs to 100 ms): guests EOI in tens to
hundreds of µs; ms mean a busy or slow guest; past 100 ms it is hung (``eoi_timeout``).
Eight bounds keep a device at 29 series (see README, Metrics)."""


def check_buckets(bounds_ns: Sequence[int]) -> tuple[int, ...]:
    """``bounds_ns`` if they can be exported exactly from the recorded buckets: ascending,
    each one of ``BUCKETS_NS`` (the hot path records into those; an exported bucket is a
    sum of recorded ones)."""
    bounds = tuple(bounds_ns)
    if not bounds:
        raise ValueError("at least one bucket")
    if list(bounds) != sorted(set(bounds)):
        raise ValueError("buckets must be ascending, without repeats")
    unknown = [b for b in bounds if b not in BUCKETS_NS]
    if unknown:
        raise ValueError(f"{unknown[0]} ns is not a recorded bucket; choose from 1us 2.5us 5us "
                         "10us 25us 50us 100us 250us 500us 1ms 2.5ms 5ms 10ms 25ms 50ms 100ms "
                         "250ms 500ms 1s 2.5s 5s 10s")
    return bounds


def cuts(bounds_ns: Sequence[int]) -> tuple[int, ...]:
    """For each exported bound, how many recorded buckets (from the first) it sums."""
    return tuple(BUCKETS_NS.index(b) + 1 for b in bounds_ns)


class Histogram:
    """Non-cumulative bucket counts in nanoseconds; cumulated only when exported."""

    __slots__ = ("counts", "sum_ns")

    def __init__(self) -> None:
        # inline 64-bit counts: a list would hold an int object for every count above 256
        self.counts = array("Q", bytes(8 * (len(BUCKETS_NS) + 1)))
        self.sum_ns = 0

    def observe(self, ns: int) -> None:
        self.counts[bisect_left(BUCKETS_NS, ns)] += 1
        self.sum_ns += ns

    def add(self, counts: tuple[int, ...], sum_ns: int) -> None:
        """Fold in observations counted elsewhere (the fast path's own buckets)."""
        for i, n in enumerate(counts):
            if n:
                self.counts[i] += n
        self.sum_ns += sum_ns

    def copy(self) -> Histogram:
        other = Histogram.__new__(Histogram)
        other.counts = array("Q", self.counts)
        other.sum_ns = self.sum_ns
        return other

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """Estimate a quantile in seconds, interpolating inside a bucket as Prometheus does."""
        return quantile(self.counts, q)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "sum_ns": self.sum_ns}

    def restore(self, data: dict[str, Any]) -> None:
        counts = data.get("counts", [])
        if len(counts) == len(self.counts):
            self.counts[:] = array("Q", (int(c) for c in counts))
            self.sum_ns = int(data.get("sum_ns", 0))


def quantile(counts: Sequence[int], q: float,
             bounds: Sequence[float] = BUCKETS_SECONDS) -> float | None:
    """``histogram_quantile`` over non-cumulative ``counts`` (seconds) of buckets with
    upper ``bounds`` and a last +Inf bucket; None when empty."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i == len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / c
        seen += c
    return bounds[-1]


def human_seconds(seconds: float | None) -> str:
    """``0.000123`` → ``123us``, ``0.25`` → ``250.0ms``, None → ``-`` (tables)."""
    if seconds is None:
        return "-"
    return f"{seconds * 1e6:.0f}us" if seconds < 0.01 else f"{seconds * 1e3:.1f}ms"


ERROR_OPS = ("enable", "unmask", "forward", "device_event", "fastpath", "route")
"""fastpath: the lane's own syscalls on a device's fds (epoll_ctl, reads), failed; route:
a datapath switch (or the re-routing of an adopted line) failed. (A failed mask or disable
is not counted: the device is being closed, or reopened, anyway.)"""

COUNTERS = ("interrupts", "eois", "unmasks", "spurious_eois", "coalesced_interrupts",
            "eoi_timeouts", "storm_throttles", "forwards", "kernel_interrupts")


class DeviceStats:
    """Everything counted about one device, by the state machine and by the loop shell."""

    __slots__ = (*COUNTERS, "errors", "service", "unmask_latency", "dispatch_latency")

    def __init__(self) -> None:
        self.interrupts = 0  # trigger counts read (one per assertion the kernel reported)
        self.eois = 0
        self.unmasks = 0  # unmasks issued successfully
        self.spurious_eois = 0
        self.coalesced_interrupts = 0
        self.eoi_timeouts = 0
        self.storm_throttles = 0
        self.forwards = 0  # signals written to the consumer's irq eventfd
        # interrupts that took the kernel's path (datapath kernel), as the host counted
        # them: eoid sees none of those itself
        self.kernel_interrupts = 0
        self.errors = dict.fromkeys(ERROR_OPS, 0)
        self.service = Histogram()  # trigger → EOI: the guest's service time
        self.unmask_latency = Histogram()  # EOI wake-up → unmask done: our overhead
        self.dispatch_latency = Histogram()  # trigger wake-up → consumer signalled

    def copy(self) -> DeviceStats:
        """A snapshot (each scrape takes one a device: no to_dict round trip)."""
        other = DeviceStats.__new__(DeviceStats)
        for name in COUNTERS:
            setattr(other, name, getattr(self, name))
        other.errors = dict(self.errors)
        other.service = self.service.copy()
        other.unmask_latency = self.unmask_latency.copy()
        other.dispatch_latency = self.dispatch_latency.copy()
        return other

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able snapshot (status replies, the restart state record)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in COUNTERS}
        out["errors"] = dict(self.errors)
        out["service"] = self.service.to_dict()
        out["unmask_latency"] = self.unmask_latency.to_dict()
        out["dispatch_latency"] = self.dispatch_latency.to_dict()
        return out

    def restore(self, data: dict[str, Any]) -> None:
        """Continue counting from a snapshot, so counters never go backwards on restart."""
        for name in COUNTERS:
            setattr(self, name, int(data.get(name, 0)))
        for op, n in data.get("errors", {}).items():
            if op in self.errors:
                self.errors[op] = int(n)
        self.service.restore(data.get("service", {}))
        self.unmask_latency.restore(data.get("unmask_latency", {}))
        self.dispatch_latency.restore(data.get("dispatch_latency", {}))
