"""Prometheus metrics: written at scrape time from the daemon's plain per-device stats.

Names follow DESIGN.md §6: ``eoid_`` prefix, base units, ``_total`` counters, one
``device`` label per device (its YAML name).

eoid writes the exposition text of its own families directly (a few f-strings a sample):
prometheus_client built a Python object and formatted a string for each sample, 1.6-2.3 s
of CPU a scrape at 1024 devices. What a device exports is set by ``metrics`` in eoid.yaml:
by default its counters, state and the guest's service-time histogram (29 series); eoid's
own overheads (dispatch, unmask) are daemon-wide histograms, summed over the devices'
recorded buckets when scraped (the fast path keeps recording per device). The standard
``process_*`` metrics still come from prometheus_client (a few dozen samples).

Only the HTTP side lives in ``eoid.httpserve``: the exporter there never runs a scrape on
the event loop, and a scrape here only reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest as text_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

from eoid import __version__
from eoid.config import MetricsConfig
from eoid.httpserve import Render, Request, Response, Server
from eoid.stats import ERROR_OPS, DeviceStats, Histogram, cuts

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
GZIP_LEVEL = 1
"""zlib's fastest level: a 1024-device page in ~5 ms instead of ~60 ms at 9, ~15 % larger."""

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
    ("kernel_interrupts", "eoid_kernel_interrupts",
     "Interrupts carried by the kernel's path (datapath kernel), as the host counted them."),
)

HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("service", "eoid_interrupt_service_seconds",
     "Interrupt delivered to EOI received: the guest's service time."),
    ("unmask_latency", "eoid_unmask_latency_seconds",
     "EOI wake-up to unmask done: eoid's own overhead."),
    ("dispatch_latency", "eoid_dispatch_latency_seconds",
     "Trigger wake-up to consumer signalled: eoid's own overhead."),
)

Kind = Literal["counter", "gauge", "histogram", "info"]
_SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",), "gauge": ("",), "info": ("_info",),
    "histogram": ("_bucket", "_count", "_sum")}


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
    last_reload_successful: bool = True
    loop: asyncio.AbstractEventLoop | None = None
    retired: dict[str, Histogram] = field(default_factory=lambda: {
        attr: Histogram() for attr, _, _ in HISTOGRAMS})
    """Removed devices' observations, still in the daemon-wide histograms."""

    def retire(self, stats: DeviceStats) -> None:
        """Keep a removed device's observations in the daemon-wide histograms: their
        buckets are counters and must not go back."""
        for attr, hist in self.retired.items():
            gone: Histogram = getattr(stats, attr)
            hist.add(tuple(gone.counts), gone.sum_ns)


@dataclass(frozen=True)
class Layout:
    """Which histograms are per device and with which buckets (``metrics`` in eoid.yaml)."""

    per_device: frozenset[str]
    """Histogram attributes exported with a ``device`` label; the rest are daemon-wide."""
    buckets: dict[str, tuple[int, ...]]
    """Exported upper bounds (ns) per histogram attribute: a subset of ``BUCKETS_NS``."""

    @classmethod
    def of(cls, config: MetricsConfig) -> Layout:
        per_device = {"none": (), "service": ("service",),
                      "all": ("service", "unmask_latency", "dispatch_latency")}
        return cls(frozenset(per_device[config.per_device_histograms]),
                   {"service": tuple(config.service_buckets),
                    "unmask_latency": tuple(config.overhead_buckets),
                    "dispatch_latency": tuple(config.overhead_buckets)})


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else floatToGoString(value)  # type: ignore[no-untyped-call]


class _Writer:
    """One exposition document (text 0.0.4 or OpenMetrics 1.0.0), family by family, each
    encoded (and compressed) as soon as it is written: a scrape holds one family's text."""

    def __init__(self, openmetrics: bool, names: frozenset[str] | None,
                 sink: Callable[[bytes], None]) -> None:
        self.openmetrics = openmetrics
        self.names = names
        self.sink = sink

    def wants(self, name: str, kind: Kind) -> bool:
        return self.names is None or any(name + s in self.names for s in _SUFFIXES[kind])

    def family(self, name: str, kind: Kind, doc: str, lines: Iterable[str]) -> None:
        """Write a family's header and its sample ``lines`` (each ending in a newline), if
        ``wants`` it (else ``lines``, a generator, is never run)."""
        if not self.wants(name, kind):
            return
        if self.openmetrics:
            head, mtype = name, kind
        else:
            head = name + {"counter": "_total", "info": "_info"}.get(kind, "")
            mtype = "gauge" if kind == "info" else kind
        selected = lines
        if self.names is not None and kind == "histogram":
            names = self.names
            selected = (line for line in lines
                        if line[:line.find("{") if "{" in line else line.find(" ")] in names)
        self.sink((f"# HELP {head} {_escape(doc)}\n# TYPE {head} {mtype}\n"
                   + "".join(selected)).encode())


def _labels(device: str) -> str:
    return f'device="{_escape(device)}"'


class EoidCollector:
    """Writes eoid's families at scrape time (the scrape runs off the event loop)."""

    def __init__(self, source: MetricsSource, daemon: DaemonMetrics, layout: Layout) -> None:
        self.source = source
        self.daemon = daemon
        self.layout = layout
        self._cuts = {attr: cuts(b) for attr, b in layout.buckets.items()}
        self._les = {attr: [floatToGoString(ns / 1e9) for ns in b]  # type: ignore[no-untyped-call]
                     for attr, b in layout.buckets.items()}

    def write(self, out: _Writer) -> None:
        views = list(self.source.device_views())
        labels = [_labels(v.name) for v in views]
        for attr, name, doc in COUNTERS:
            out.family(name, "counter", doc, (
                f"{name}_total{{{lbl}}} {getattr(v.stats, attr)}\n"
                for v, lbl in zip(views, labels, strict=True)))
        out.family("eoid_errors", "counter", "Failed device or consumer operations.", (
            f'eoid_errors_total{{{lbl},op="{op}"}} {v.stats.errors[op]}\n'
            for v, lbl in zip(views, labels, strict=True) for op in ERROR_OPS))
        for attr, name, doc in HISTOGRAMS:
            if not out.wants(name, "histogram"):
                continue
            if attr in self.layout.per_device:
                out.family(name, "histogram", doc, (
                    line for v, lbl in zip(views, labels, strict=True)
                    for line in self._histogram(name, attr, lbl, getattr(v.stats, attr).counts,
                                                getattr(v.stats, attr).sum_ns)))
            else:
                hists: list[Histogram] = [self.daemon.retired[attr],
                                          *(getattr(v.stats, attr) for v in views)]
                counts = [sum(col) for col in zip(*(h.counts for h in hists), strict=True)]
                out.family(name, "histogram", doc + " All devices.", self._histogram(
                    name, attr, "", counts, sum(h.sum_ns for h in hists)))
        out.family("eoid_device_up", "gauge", "1 if the device is open and armed.", (
            f"eoid_device_up{{{lbl}}} {int(v.up)}\n" for v, lbl in zip(views, labels, strict=True)))
        out.family("eoid_consumer_attached", "gauge", "1 if a consumer is attached.", (
            f"eoid_consumer_attached{{{lbl}}} {int(v.attached)}\n"
            for v, lbl in zip(views, labels, strict=True)))
        out.family("eoid_device_state", "gauge",
                   "The device's current state, as its label (one series a device, value 1).", (
                       f'eoid_device_state{{{lbl},state="{v.state}"}} 1\n'
                       for v, lbl in zip(views, labels, strict=True)))
        out.family("eoid_device", "info", "Static facts about a device.", (
            "eoid_device_info{" + ",".join([lbl, *(f'{k}="{_escape(x)}"'
                                                  for k, x in v.info.items())]) + "} 1\n"
            for v, lbl in zip(views, labels, strict=True)))
        self._daemon(out)

    def _histogram(self, name: str, attr: str, label: str, counts: Sequence[int],
                   sum_ns: int) -> list[str]:
        cumulative = list(accumulate(counts))
        sep = label + "," if label else ""
        braces = "{" + label + "}" if label else ""
        lines = [f'{name}_bucket{{{sep}le="{le}"}} {cumulative[cut - 1]}\n'
                 for le, cut in zip(self._les[attr], self._cuts[attr], strict=True)]
        lines.append(f'{name}_bucket{{{sep}le="+Inf"}} {cumulative[-1]}\n')
        lines.append(f"{name}_count{braces} {cumulative[-1]}\n")
        lines.append(f"{name}_sum{braces} {_number(sum_ns / 1e9)}\n")
        return lines

    def _daemon(self, out: _Writer) -> None:
        out.family("eoid_build", "info", "eoid's version.",
                   [f'eoid_build_info{{version="{_escape(__version__)}"}} 1\n'])
        out.family("eoid_config_reloads", "counter", "Configuration reloads.", (
            f'eoid_config_reloads_total{{result="{r}"}} {n}\n'
            for r, n in self.daemon.reloads.items()))
        name = "eoid_config_last_reload_success_timestamp_seconds"
        out.family(name, "gauge", "When the configuration was last loaded successfully.",
                   [f"{name} {_number(self.daemon.last_reload_success)}\n"])
        name = "eoid_config_last_reload_successful"
        out.family(name, "gauge", "1 if the last configuration reload succeeded (or none was "
                   "tried since start), 0 if it was rejected.",
                   [f"{name} {int(self.daemon.last_reload_successful)}\n"])
        if out.wants("eoid_loop_lag_seconds", "gauge"):
            lag = self._loop_lag()
            if lag is not None:
                out.family("eoid_loop_lag_seconds", "gauge",
                           "How long a callback waited for the event loop, measured at scrape "
                           "time.", [f"eoid_loop_lag_seconds {_number(lag)}\n"])

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


class Registry:
    """eoid's families, then prometheus_client's process and platform collectors."""

    def __init__(self, eoid: EoidCollector) -> None:
        self.eoid = eoid
        self.others = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.others)
        PlatformCollector(registry=self.others)

    def render(self, openmetrics: bool, names: frozenset[str] | None = None) -> bytes:
        """The whole document, uncompressed (tests, tools)."""
        parts: list[bytes] = []
        self.write(openmetrics, names, parts.append)
        return b"".join(parts)

    def write(self, openmetrics: bool, names: frozenset[str] | None,
              sink: Callable[[bytes], None]) -> None:
        self.eoid.write(_Writer(openmetrics, names, sink))
        others = self.others if names is None else self.others.restricted_registry(list(names))
        if openmetrics:
            sink(openmetrics_latest(others))  # type: ignore[no-untyped-call]  # ends with the document's "# EOF"
        else:
            sink(text_latest(others))


def build_registry(source: MetricsSource, daemon: DaemonMetrics,
                   config: MetricsConfig | None = None) -> Registry:
    """A registry of our own (never the global one), so tests and restarts stay isolated."""
    return Registry(EoidCollector(source, daemon, Layout.of(config or MetricsConfig())))


def _accepts(header: str) -> dict[str, float]:
    """Media ranges of an Accept header with their q (a range without q: 1)."""
    out: dict[str, float] = {}
    for item in header.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            if p.startswith("q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        if media:
            out[media.lower()] = max(q, out.get(media.lower(), 0.0))
    return out


def negotiate(accept: str) -> bool:
    """True for OpenMetrics: only when the scraper does not take the text format (the text
    format costs the same to write and Prometheus parses it faster)."""
    if not accept.strip():
        return False
    ranges = _accepts(accept)
    if any(ranges.get(m, 0.0) > 0 for m in ("text/plain", "text/*", "*/*")):
        return False
    return ranges.get("application/openmetrics-text", 0.0) > 0


def gzip_accepted(header: str) -> bool:
    ranges = _accepts(header)
    return ranges.get("gzip", ranges.get("*", 0.0)) > 0


INDEX = (b"<html><head><title>eoid</title></head><body><h1>eoid</h1>"
         b'<p><a href="/metrics">Metrics</a></p></body></html>\n')


class Exporter:
    """``/metrics`` (and ``/healthz``, ``/``) on a bounded server of its own (see
    ``eoid.httpserve``): one I/O thread, one rendering thread, concurrent scrapes of the
    same kind share one rendering. Anything else is 404."""

    def __init__(self, registry: Registry, address: tuple[str, int]) -> None:
        self.registry = registry
        self.server = Server(address, self._route)

    def _route(self, request: Request) -> Response | Render:
        if request.method not in ("GET", "HEAD"):
            return Response(405, [("Allow", "GET, HEAD")], b"only GET and HEAD\n")
        if request.path == "/metrics":
            names = request.query.get("name[]")
            openmetrics = negotiate(request.headers.get("accept", ""))
            gzip = gzip_accepted(request.headers.get("accept-encoding", ""))
            key = (openmetrics, gzip, frozenset(names) if names else None)
            return Render(key, lambda: self._metrics(*key))
        if request.path == "/healthz":
            return Response(200, [("Content-Type", "text/plain; charset=utf-8")], b"ok\n")
        if request.path == "/":
            return Response(200, [("Content-Type", "text/html; charset=utf-8")], INDEX)
        return Response(404, [("Content-Type", "text/plain; charset=utf-8")],
                        b"not found: try /metrics\n")

    def _metrics(self, openmetrics: bool, gzip: bool, names: frozenset[str] | None) -> Response:
        headers = [("Content-Type", OPENMETRICS if openmetrics else TEXT)]
        parts: list[bytes] = []
        if gzip:
            compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
            self.registry.write(openmetrics, names, lambda b: parts.append(compressor.compress(b)))
            parts.append(compressor.flush())
            headers.append(("Content-Encoding", "gzip"))
        else:
            self.registry.write(openmetrics, names, parts.append)
        return Response(200, headers, b"".join(parts))

    @property
    def port(self) -> int:
        return self.server.port

    def close(self) -> None:
        self.server.close()

