"""Prometheus metrics: built at scrape time from the daemon's plain per-device stats.

Names follow DESIGN.md §6: ``eoid_`` prefix, base units, ``_total`` counters, one
``device`` label per device (its YAML name).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from eoid import __version__
from eoid.channel import State
from eoid.stats import BUCKETS_SECONDS, ERROR_OPS, DeviceStats, Histogram

STATES = tuple(s.name.lower() for s in State)
BUCKET_LABELS = [floatToGoString(b) for b in BUCKETS_SECONDS] + ["+Inf"]  # type: ignore[no-untyped-call]

COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("interrupts", "eoid_interrupts", "Interrupts the kernel signalled on the trigger eventfd."),
    ("eois", "eoid_eois", "EOI signals read from the EOI eventfd."),
    ("unmasks", "eoid_unmasks", "Unmasks issued to the device."),
    ("spurious_eois", "eoid_spurious_eois", "EOIs that arrived with no interrupt pending."),
    ("coalesced_interrupts", "eoid_coalesced_interrupts",
     "Interrupts read together with an earlier one (eventfd count > 1); not lost."),
    ("eoi_timeouts", "eoid_eoi_timeouts", "Interrupts whose EOI did not come within eoi_timeout."),
    ("storm_throttles", "eoid_storm_throttles", "Unmasks deferred by storm protection."),
    ("forwards", "eoid_forwards", "Interrupt signals written to the consumer's irq eventfd."),
)

HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("service", "eoid_interrupt_service_seconds",
     "Interrupt delivered to EOI received: the guest's service time."),
    ("unmask_latency", "eoid_unmask_latency_seconds",
     "EOI wake-up to unmask done: eoid's own overhead."),
    ("dispatch_latency", "eoid_dispatch_latency_seconds",
     "Trigger wake-up to consumer signalled: eoid's own overhead."),
)


@dataclass
class DeviceView:
    """What the collector reads of one device."""

    name: str
    stats: DeviceStats
    up: bool
    attached: bool
    state: str
    info: dict[str, str]


class MetricsSource(Protocol):
    def device_views(self) -> Iterable[DeviceView]: ...


@dataclass
class DaemonMetrics:
    """Daemon-wide numbers that are not per device."""

    reloads: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})
    last_reload_success: float = 0.0
    loop: asyncio.AbstractEventLoop | None = None


def _histogram(name: str, doc: str, rows: Iterable[tuple[str, Histogram]]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["device"])
    for device, hist in rows:
        cumulative = list(accumulate(hist.counts))
        family.add_metric([device], list(zip(BUCKET_LABELS, cumulative, strict=True)),
                          hist.sum_ns / 1e9)
    return family


class EoidCollector:
    """Turns plain stats into metric families at scrape time (the scrape runs off-loop)."""

    def __init__(self, source: MetricsSource, daemon: DaemonMetrics) -> None:
        self.source = source
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        views = list(self.source.device_views())
        for attr, name, doc in COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["device"])
            for v in views:
                family.add_metric([v.name], getattr(v.stats, attr))
            yield family
        errors = CounterMetricFamily("eoid_errors", "Failed device or consumer operations.",
                                     labels=["device", "op"])
        for v in views:
            for op in ERROR_OPS:
                errors.add_metric([v.name, op], v.stats.errors[op])
        yield errors
        for attr, name, doc in HISTOGRAMS:
            yield _histogram(name, doc, ((v.name, getattr(v.stats, attr)) for v in views))
        up = GaugeMetricFamily("eoid_device_up", "1 if the device is open and armed.",
                               labels=["device"])
        attached = GaugeMetricFamily("eoid_consumer_attached", "1 if a consumer is attached.",
                                     labels=["device"])
        state = GaugeMetricFamily("eoid_device_state", "1 for the device's current state.",
                                  labels=["device", "state"])
        info = InfoMetricFamily("eoid_device", "Static facts about a device.",
                                labels=["device"])
        for v in views:
            up.add_metric([v.name], int(v.up))
            attached.add_metric([v.name], int(v.attached))
            for s in STATES:
                state.add_metric([v.name, s], int(s == v.state))
            info.add_metric([v.name], v.info)
        yield from (up, attached, state, info)
        yield from self._daemon()

    def _daemon(self) -> Iterator[Metric]:
        build = InfoMetricFamily("eoid_build", "eoid's version.")
        build.add_metric([], {"version": __version__})
        yield build
        reloads = CounterMetricFamily("eoid_config_reloads", "Configuration reloads.",
                                      labels=["result"])
        for result, n in self.daemon.reloads.items():
            reloads.add_metric([result], n)
        yield reloads
        yield GaugeMetricFamily("eoid_config_last_reload_success_timestamp_seconds",
                                "When the configuration was last loaded successfully.",
                                value=self.daemon.last_reload_success)
        lag = self._loop_lag()
        if lag is not None:
            yield GaugeMetricFamily("eoid_loop_lag_seconds",
                                    "How long a callback waited for the event loop, "
                                    "measured at scrape time.", value=lag)

    def _loop_lag(self) -> float | None:
        """Ask the loop to run a no-op and time it: measured only when scraped, no polling."""
        loop = self.daemon.loop
        if loop is None or loop.is_closed():
            return None
        try:
            if asyncio.get_running_loop() is loop:
                return 0.0
        except RuntimeError:
            pass
        start = time.monotonic()
        done: concurrent.futures.Future[float] = concurrent.futures.Future()

        def ping() -> None:
            done.set_result(time.monotonic() - start)

        try:
            loop.call_soon_threadsafe(ping)
            return done.result(timeout=5.0)
        except (RuntimeError, concurrent.futures.TimeoutError):
            return 5.0  # the loop is wedged: report the bound we waited


def build_registry(source: MetricsSource, daemon: DaemonMetrics) -> CollectorRegistry:
    """A registry of our own (never the global one), so tests and restarts stay isolated."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EoidCollector(source, daemon))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class Exporter:
    """prometheus_client's threaded HTTP server for ``/metrics``."""

    def __init__(self, registry: CollectorRegistry, address: tuple[str, int]) -> None:
        self.server: Any
        self.thread: threading.Thread
        self.server, self.thread = start_http_server(address[1], address[0], registry)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

