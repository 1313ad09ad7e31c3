"""The exporter in-process: what it serves, its bounds, and the series it writes.

A fake source stands in for the daemon; the server and its sockets are real."""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from pydantic import ValidationError

from eoid.config import MetricsConfig
from eoid.httpserve import Render, Request, Response, Server
from eoid.metrics import DaemonMetrics, DeviceView, Exporter, build_registry
from eoid.stats import BUCKETS_NS, DeviceStats

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


class Devices:
    def __init__(self, n: int) -> None:
        self.views = []
        for i in range(n):
            stats = DeviceStats()
            stats.interrupts = 10 + i
            stats.errors["unmask"] = i
            for ns in (20_000, 30_000, 2_000_000):
                stats.service.observe(ns)
            stats.dispatch_latency.observe(3_000 + i)
            stats.unmask_latency.observe(4_000)
            self.views.append(DeviceView(f"dev{i}", stats, True, i % 2 == 0,
                                         "armed" if i else "pending",
                                         {"pci_address": f"0000:00:{i:02x}.0",
                                          "backend": "sim"}))

    def device_views(self) -> Iterable[DeviceView]:
        return self.views


@contextmanager
def exporter(devices: int = 3, **config: Any) -> Iterator[Exporter]:
    registry = build_registry(Devices(devices), DaemonMetrics(), MetricsConfig(**config))
    exp = Exporter(registry, ("127.0.0.1", 0))
    try:
        yield exp
    finally:
        exp.close()


def get(port: int, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def samples(body: bytes) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in parse_text(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


# -- what is served ------------------------------------------------------------------------


def test_only_metrics_and_a_health_path_are_served() -> None:
    with exporter() as exp:
        status, headers, body = get(exp.port, "/metrics")
        assert status == 200 and b"eoid_interrupts_total" in body
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        assert get(exp.port, "/healthz")[:3:2] == (200, b"ok\n")
        status, _, body = get(exp.port, "/")
        assert status == 200 and b'href="/metrics"' in body
        for path in ("/favicon.ico", "/anything", "/metrics/x", "/metricsx"):
            status, _, body = get(exp.port, path)
            assert status == 404, path
            assert b"eoid_" not in body
        assert get(exp.port, "/metrics", method="POST")[0] == 405
        status, headers, body = get(exp.port, "/metrics", method="HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 1000


def test_name_filter_returns_the_named_series() -> None:
    with exporter() as exp:
        status, _, body = get(exp.port, "/metrics?name[]=eoid_interrupts_total")
        assert status == 200
        got = samples(body)
        assert set(got) == {"eoid_interrupts_total"}
        assert sorted(v for _, v in got["eoid_interrupts_total"]) == [10, 11, 12]
        query = ("/metrics?name[]=eoid_interrupt_service_seconds_count"
                 "&name[]=eoid_device_up&name[]=process_open_fds")
        got = samples(get(exp.port, query)[2])
        assert set(got) == {"eoid_interrupt_service_seconds_count", "eoid_device_up",
                            "process_open_fds"}
        assert len(got["eoid_interrupt_service_seconds_count"]) == 3


def test_prometheus_gets_the_text_format_gzipped_and_openmetrics_when_it_asks_only_that() -> None:
    with exporter() as exp:
        status, headers, body = get(exp.port, "/metrics", {"Accept": PROMETHEUS_ACCEPT,
                                                            "Accept-Encoding": "gzip"})
        assert status == 200 and headers["content-encoding"] == "gzip"
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        text = gzip.decompress(body).decode()
        assert len(list(parse_text(text))) > 20
        _, headers, body = get(exp.port, "/metrics",
                               {"Accept": "application/openmetrics-text;version=1.0.0"})
        assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
        text = body.decode()
        assert text.endswith("# EOF\n") and text.count("# EOF") == 1
        families = {f.name: f for f in parse_openmetrics(text)}  # type: ignore[no-untyped-call]
        assert families["eoid_interrupts"].type == "counter"
        assert families["eoid_device"].type == "info"
        assert families["eoid_interrupt_service_seconds"].type == "histogram"


# -- bounds ------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_idle_connections_take_no_thread_and_do_not_block_scrapes() -> None:
    with exporter() as exp, ExitStack() as idle:
        threads = threading.active_count()
        for _ in range(125):
            idle.enter_context(connect(exp.port))
        begun = time.monotonic()
        assert get(exp.port, "/metrics")[0] == 200
        assert time.monotonic() - begun < 2.0
        assert threading.active_count() == threads


def test_half_open_connections_closed_at_once_cost_nothing_lasting() -> None:
    with exporter() as exp:
        threads = threading.active_count()
        socks = [connect(exp.port) for _ in range(600)]
        for s in socks:
            s.close()
        assert threading.active_count() == threads
        begun = time.monotonic()
        assert get(exp.port, "/metrics")[0] == 200
        assert time.monotonic() - begun < 2.0
        deadline = time.monotonic() + 5
        while exp.server.open_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exp.server.open_connections == 0


def route(request: Request) -> Response | Render:
    return Response(200, [], b"fast\n")


def test_a_request_that_never_finishes_is_closed_after_the_read_timeout() -> None:
    server = Server(("127.0.0.1", 0), route, read_timeout=0.3)
    try:
        with connect(server.port) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            begun = time.monotonic()
            assert s.recv(100) == b""  # closed by the server
            assert 0.2 < time.monotonic() - begun < 3
    finally:
        server.close()


def test_connections_are_bounded_and_the_oldest_unfinished_request_makes_room() -> None:
    server = Server(("127.0.0.1", 0), route, max_connections=8)
    try:
        with ExitStack() as stack:
            first = stack.enter_context(connect(server.port))
            for _ in range(20):
                stack.enter_context(connect(server.port))
            assert get(server.port, "/")[2] == b"fast\n"
            first.settimeout(5)
            assert first.recv(100) == b""  # dropped to make room
            assert server.open_connections <= 8
    finally:
        server.close()


def test_oversized_and_malformed_requests_are_refused() -> None:
    server = Server(("127.0.0.1", 0), route)
    try:
        with connect(server.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 431 ")
        with connect(server.port) as s:
            s.sendall(b"nonsense\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    finally:
        server.close()


def test_concurrent_scrapes_share_one_rendering() -> None:
    release = threading.Event()
    started = threading.Event()

    def slow() -> Response:
        started.set()
        release.wait(10)
        return Response(200, [], b"rendered\n")

    server = Server(("127.0.0.1", 0), lambda r: Render("metrics", slow))
    try:
        results: list[bytes] = []
        first = threading.Thread(target=lambda: results.append(get(server.port, "/")[2]))
        first.start()
        assert started.wait(5)
        others = [threading.Thread(target=lambda: results.append(get(server.port, "/")[2]))
                  for _ in range(5)]
        for t in others:
            t.start()
        deadline = time.monotonic() + 5
        while server.open_connections < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        for t in (first, *others):
            t.join(10)
        assert results == [b"rendered\n"] * 6
        assert server.renders == 1
    finally:
        server.close()


def test_listen_on_every_interface_as_node_exporter_does() -> None:
    config = MetricsConfig(listen=":0")
    assert config.address() == ("", 0)
    server = Server(config.address() or ("", 0), route)
    try:
        hosts = ["127.0.0.1"]
        if socket.has_ipv6 and server.listener.family == socket.AF_INET6:
            hosts.append("::1")
        for host in hosts:
            with socket.create_connection((host, server.port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 200 ")
    finally:
        server.close()
    assert MetricsConfig(listen="[::1]:9466").address() == ("::1", 9466)


# -- series ------------------------------------------------------------------------------


def per_device(body: bytes, device: str) -> int:
    return sum(1 for _, series in samples(body).items() for labels, _ in series
               if labels.get("device") == device)


def test_defaults_export_at_most_30_series_a_device_and_overheads_daemon_wide() -> None:
    with exporter(devices=4) as exp:
        body = get(exp.port, "/metrics")[2]
    assert per_device(body, "dev1") <= 30
    got = samples(body)
    service = [labels["le"] for labels, _ in got["eoid_interrupt_service_seconds_bucket"]
               if labels["device"] == "dev1"]
    assert service == ["1e-05", "2.5e-05", "5e-05", "0.0001", "0.00025", "0.001", "0.01", "0.1",
                       "+Inf"]
    for name in ("eoid_dispatch_latency_seconds", "eoid_unmask_latency_seconds"):
        counts = got[f"{name}_count"]
        assert counts == [({}, 4.0)], name  # one daemon-wide series: the 4 devices' sum
        assert len(got[f"{name}_bucket"]) == len(BUCKETS_NS) + 1
    assert sum(v for _, v in got["eoid_dispatch_latency_seconds_sum"]) == \
        pytest.approx((3_000 * 4 + 6) / 1e9)
    # cumulative and exact: 20 us and 30 us are <= 50 us, 2 ms is in (1 ms, 10 ms]
    by_le = {labels["le"]: v for labels, v in got["eoid_interrupt_service_seconds_bucket"]
             if labels["device"] == "dev1"}
    assert (by_le["2.5e-05"], by_le["5e-05"], by_le["0.001"], by_le["0.01"]) == (1, 2, 2, 3)
    states = [(labels, v) for labels, v in got["eoid_device_state"] if labels["device"] == "dev0"]
    assert states == [({"device": "dev0", "state": "pending"}, 1.0)]


@pytest.mark.parametrize(("mode", "per_device_names"), [
    ("none", set()),
    ("service", {"eoid_interrupt_service_seconds"}),
    ("all", {"eoid_interrupt_service_seconds", "eoid_unmask_latency_seconds",
             "eoid_dispatch_latency_seconds"})])
def test_per_device_histograms_setting(mode: str, per_device_names: set[str]) -> None:
    with exporter(per_device_histograms=mode, overhead_buckets=["1us", "1ms"]) as exp:
        got = samples(get(exp.port, "/metrics")[2])
    for name in ("eoid_interrupt_service_seconds", "eoid_unmask_latency_seconds",
                 "eoid_dispatch_latency_seconds"):
        devices = {labels.get("device") for labels, _ in got[f"{name}_count"]}
        assert devices == ({"dev0", "dev1", "dev2"} if name in per_device_names else {None})
    les = {labels["le"] for labels, _ in got["eoid_unmask_latency_seconds_bucket"]}
    assert les == {"1e-06", "0.001", "+Inf"}


@pytest.mark.parametrize("buckets", [[], ["3us"], ["10us", "5us"], ["1ms", "1ms"]])
def test_bucket_lists_must_be_recorded_bounds_in_order(buckets: list[str]) -> None:
    with pytest.raises(ValidationError):
        MetricsConfig.model_validate({"service_buckets": buckets})


def test_daemon_wide_histograms_keep_removed_devices_observations() -> None:
    devices, daemon = Devices(3), DaemonMetrics()
    registry = build_registry(devices, daemon, MetricsConfig())

    def dispatch_count() -> float:
        got = samples(registry.render(False, frozenset({"eoid_dispatch_latency_seconds_count"})))
        return got["eoid_dispatch_latency_seconds_count"][0][1]

    assert dispatch_count() == 3
    daemon.retire(devices.views.pop().stats)  # what the daemon does when it removes a device
    assert dispatch_count() == 3  # a counter: it does not go back
