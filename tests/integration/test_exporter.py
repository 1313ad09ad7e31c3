"""The exporter of a real daemon: what it serves, and that connections cannot hurt the loop."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prometheus_client.parser import text_string_to_metric_families

from eoid.control import ControlClient
from tests.helpers import Env, environment, free_port


@contextmanager
def daemon(devices: int = 2, listen: str | None = None) -> Iterator[Env]:
    with environment(devices=devices) as env:
        if listen is not None:
            env.config.write_text(env.config.read_text().replace(
                f"127.0.0.1:{env.port}", listen))
        env.start_sim()
        env.start_daemon()
        yield env


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def names(body: bytes) -> set[str]:
    return {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def test_name_filter_and_paths() -> None:
    with daemon() as env:
        status, body = get(env.port, "/metrics?name[]=eoid_interrupts_total")
        assert status == 200
        assert names(body) == {"eoid_interrupts_total"}
        assert body.count(b"\neoid_interrupts_total{") + body.startswith(
            b"eoid_interrupts_total{") == 2
        assert get(env.port, "/healthz")[0] == 200
        for path in ("/nope", "/favicon.ico", "/metrics/extra"):
            status, body = get(env.port, path)
            assert status == 404 and b"eoid_interrupts_total" not in body, path


def test_listen_colon_port_is_every_interface() -> None:
    port = free_port()
    with daemon(listen=f":{port}") as env:
        assert get(port, "/metrics")[0] == 200
        with socket.socket(socket.AF_INET6) as probe:
            try:
                probe.bind(("::1", 0))
            except OSError:
                return  # no IPv6 loopback here
        assert get(port, "/metrics", host="::1")[0] == 200
        assert env.status()["devices"]


def worst_status_latency(env: Env, seconds: float) -> float:
    """The slowest control round trip (served by the event loop) over ``seconds``."""
    worst = 0.0
    end = time.monotonic() + seconds
    with ControlClient(env.control, timeout=60) as client:
        while time.monotonic() < end:
            begun = time.monotonic()
            client.request("status")
            worst = max(worst, time.monotonic() - begun)
            time.sleep(0.01)
    return worst


def test_half_open_connections_closed_at_once_do_not_freeze_the_loop() -> None:
    with daemon() as env:
        socks = [socket.create_connection(("127.0.0.1", env.port), timeout=5)
                 for _ in range(600)]
        time.sleep(0.2)  # let the exporter take them (it did: a thread each)
        for s in socks:
            s.close()
        assert worst_status_latency(env, 2.0) < 0.5
        begun = time.monotonic()
        assert get(env.port, "/metrics")[0] == 200
        assert time.monotonic() - begun < 2.0


def test_idle_connections_do_not_block_scrapes() -> None:
    with daemon() as env, ExitStack() as idle:
        for _ in range(125):
            idle.enter_context(socket.create_connection(("127.0.0.1", env.port), timeout=5))
        begun = time.monotonic()
        assert get(env.port, "/metrics")[0] == 200
        assert time.monotonic() - begun < 2.0
        threads = len(list((env.root.parent / f"/proc/{env.procs[-1].pid}/task").iterdir()))
        assert threads < 16  # no thread per connection


def test_at_most_30_series_a_device_by_default() -> None:
    with daemon(devices=4) as env:
        samples = env.scrape()
    per_device = sum(1 for series in samples.values() for labels in series
                     if ("device", "dev2") in labels)
    assert 15 < per_device <= 30
