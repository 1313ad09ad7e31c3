"""What a Prometheus scrape does to interrupts: the same paced load with and without scrapes.

    python -m bench.scrape --devices 1024 --rate 10000 --every 1.0 --rounds 2

A scrape formats ~100 samples a device in prometheus_client, on the exporter thread, which
competes with the event loop for the GIL. Each round runs the load once without scrapes
and once while a client scrapes /metrics every ``--every`` seconds, against one ``eoid
run`` left free to use any CPU (as on a host), and prints both: trigger->forward from
eoid's histograms, and the pump's round trip (fire -> unmask received), which includes the
time an interrupt waited for the loop.
"""

from __future__ import annotations

import argparse
import threading
import urllib.request

from bench.run_eoid import measure, running


def scraping(port: int, every: float, stop: threading.Event, count: list[int]) -> None:
    while not stop.is_set():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
            r.read()
        count[0] += 1
        stop.wait(every)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__)
    parser.add_argument("--devices", type=int, default=1024)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--every", type=float, default=1.0, help="seconds between scrapes")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with running(args.devices, "uvloop", None) as daemon:
        for _ in range(args.rounds):
            for scrape in (False, True):
                stop, count = threading.Event(), [0]
                thread = threading.Thread(target=scraping,
                                          args=(daemon.port, args.every, stop, count))
                if scrape:
                    thread.start()
                r = measure(daemon, "paced", args.duration, args.rate, None)
                stop.set()
                if scrape:
                    thread.join()
                print(f"scrapes {count[0]:3d}: trigger->forward p99/p99.9 "
                      f"{r['trigger_to_forward_p99_us']}/{r['trigger_to_forward_p999_us']} us, "
                      f"round trip p50/p99 {r['round_trip_p50_us']}/{r['round_trip_p99_us']} us,"
                      f" CPU {r['cpu_us_per_interrupt']} us/interrupt, lost {r['lost']}",
                      flush=True)


if __name__ == "__main__":
    main()
