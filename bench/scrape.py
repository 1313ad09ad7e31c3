"""What Prometheus scrapes cost eoid, and what they (and bad clients) do to interrupts.

    python -m bench.scrape cost --devices 16 256 1024 --scrapes 40
    python -m bench.scrape load --devices 1024 --rate 10000 --every 1.0 --rounds 2
    python -m bench.scrape flood --devices 1024 --rate 10000 --connections 1000 --rounds 3

``cost``: after a second of load (so counters and histograms hold real numbers), scrapes
the idle daemon ``--scrapes`` times back to back as Prometheus 2.42 does (its Accept header,
gzip) and prints the daemon's CPU per scrape from /proc/PID/stat (utime+stime, all
threads; less sensitive to a shared machine than wall time, but 10 ms ticks: hence many
scrapes), the wall time, samples per device, the format served and the body size.

``load``: each round runs the same paced load without and with a client scraping
``/metrics`` every ``--every`` seconds, and prints trigger->forward from eoid's histograms
and the pump's round trip (fire -> unmask received, which includes any time an interrupt
waited for the event loop).

``flood``: the same, but the client opens ``--connections`` TCP connections to the
exporter, sends nothing, and closes them all at once, over and over (``--every`` seconds
apart): half-open scrape connections, which any local user can make.
"""

from __future__ import annotations

import argparse
import gzip
import os
import selectors
import socket
import threading
import time
import urllib.request
from collections.abc import Callable

from bench.run_baseline import ensure_nofile, process_cpu_us
from bench.run_eoid import Daemon, measure, running

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
"""What Prometheus 2.42 sends (scrape.go's acceptHeader), with Accept-Encoding: gzip."""


def prometheus_scrape(port: int) -> tuple[str, bytes, bytes]:
    """One scrape as Prometheus makes it: (content type, body as sent, body unzipped)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={
        "Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=60) as r:
        body = r.read()
        kind = r.headers.get("Content-Type", "")
        plain = gzip.decompress(body) if r.headers.get("Content-Encoding") == "gzip" else body
    return kind, body, plain


def samples_in(text: bytes) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))


def cost(devices: list[int], scrapes: int) -> None:
    for n in devices:
        with running(n, "uvloop", None) as daemon:
            measure(daemon, "paced", 1.0, min(10_000, 100 * n), None)  # real numbers to print
            time.sleep(0.5)
            assert daemon.proc is not None
            pid = daemon.proc.pid
            idle0 = process_cpu_us(pid)
            time.sleep(1.0)
            idle_us = process_cpu_us(pid) - idle0
            kind, body, plain = prometheus_scrape(daemon.port)  # warm
            cpu0, wall0 = process_cpu_us(pid), time.monotonic()
            for _ in range(scrapes):
                prometheus_scrape(daemon.port)
            cpu_ms = (process_cpu_us(pid) - cpu0) / scrapes / 1e3
            wall_ms = (time.monotonic() - wall0) / scrapes * 1e3
            total = samples_in(plain)
            print(f"{n:5d} devices: {cpu_ms:7.1f} ms CPU/scrape (idle {idle_us / 1e3:.0f} ms/s), "
                  f"{wall_ms:7.1f} ms wall, {total} samples ({total / n:.1f}/device), "
                  f"{kind.split(';')[0]}, {len(body) / 1024:.0f} KiB gzip "
                  f"({len(plain) / 1024:.0f} KiB)", flush=True)


def scraping(port: int, every: float, stop: threading.Event, count: list[int]) -> None:
    while not stop.is_set():
        prometheus_scrape(port)
        count[0] += 1
        stop.wait(every)


def half_open(port: int, connections: int, every: float, stop: threading.Event,
              count: list[int]) -> None:
    """Open ``connections`` connections, wait until connected, close all at once; repeat."""
    while not stop.is_set():
        sel = selectors.DefaultSelector()
        socks = []
        for _ in range(connections):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
            sel.register(s, selectors.EVENT_WRITE)
        pending, deadline = len(socks), time.monotonic() + 5
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(0.5):
                sel.unregister(key.fileobj)
                pending -= 1
        for s in socks:
            s.close()
        sel.close()
        count[0] += 1
        stop.wait(every)


def compare(daemon: Daemon, rounds: int, duration: float, rate: int, label: str, *,
            client: Callable[[threading.Event, list[int]], None]) -> None:
    for _ in range(rounds):
        for disturbed in (False, True):
            stop, count = threading.Event(), [0]
            thread = threading.Thread(target=client, args=(stop, count))
            if disturbed:
                thread.start()
            r = measure(daemon, "paced", duration, rate, None)
            stop.set()
            if disturbed:
                thread.join()
            print(f"{label} {count[0]:3d}: trigger->forward p99/p99.9 "
                  f"{r['trigger_to_forward_p99_us']}/{r['trigger_to_forward_p999_us']} us, "
                  f"round trip p50/p99 {r['round_trip_p50_us']}/{r['round_trip_p99_us']} us,"
                  f" {r['interrupts_per_s']}/s, CPU {r['cpu_us_per_interrupt']} us/interrupt,"
                  f" lost {r['lost']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("cost", help="daemon CPU per scrape")
    p.add_argument("--devices", type=int, nargs="+", default=[16, 256, 1024])
    p.add_argument("--scrapes", type=int, default=40)
    for name, every, more in (("load", 1.0, "scrapes"), ("flood", 0.5, "floods")):
        p = sub.add_parser(name, help=f"interrupt latency with and without {more}")
        p.add_argument("--devices", type=int, default=1024)
        p.add_argument("--rate", type=int, default=10_000)
        p.add_argument("--every", type=float, default=every, help=f"seconds between {more}")
        p.add_argument("--duration", type=float, default=5.0)
        p.add_argument("--rounds", type=int, default=2)
        if name == "flood":
            p.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    if args.what == "cost":
        cost(args.devices, args.scrapes)
        return
    if args.what == "flood":
        ensure_nofile(4 * args.devices + args.connections + 256)
    with running(args.devices, "uvloop", None) as daemon:
        if args.what == "load":
            compare(daemon, args.rounds, args.duration, args.rate, "scrapes", client=
                    lambda stop, count: scraping(daemon.port, args.every, stop, count))
        else:
            compare(daemon, args.rounds, args.duration, args.rate, "floods ", client=
                    lambda stop, count: half_open(daemon.port, args.connections, args.every,
                                                  stop, count))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
