"""How long one ``status`` request holds the daemon's event loop, at many devices.

    python -m bench.status_stall --devices 1024 --rounds 20

The daemon runs in this process (``eoid.testing.run_server``, simulated devices, no load),
and a probe on its loop sleeps 0.5 ms over and over, recording how late each wake-up is:
the loop's stalls. Three phases, one run: ``idle`` (the probe alone: the machine's noise),
``whole`` (the baseline: what one ``status`` request did before paging, every device's
status built and encoded at once, on the loop) and ``paged`` (another process fetching every
page ``--rounds`` times, as ``eoid status`` does now). Prints the
longest stall and the 99th percentile of each phase, the loop thread's CPU time per request
(robust to a busy machine, unlike the stalls), and the ratios paged/whole. A full (gen 2)
garbage collection of the daemon's heap, ~40 ms at 1024 devices, can land in any phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from eoid import log
from eoid.config import load_config
from eoid.testing import RunningDaemon, run_server
from eoid.wire import encode

PROBE = 0.0005  # seconds the probe sleeps
CLIENT = """
import sys, time
from eoid.control import ControlClient
rounds, path = int(sys.argv[1]), sys.argv[2]
print("ready", flush=True)
sys.stdin.readline()
for _ in range(rounds):
    with ControlClient(path) as client:
        print(len(client.status()["devices"]), flush=True)
    time.sleep(0.1)
"""
"""Another process fetching every page of status ``rounds`` times, as ``eoid status`` does."""


def write_config(root: Path, devices: int) -> Path:
    (root / "devices.d").mkdir()
    (root / "eoid.yaml").write_text(
        f"control: {{socket: {root}/control.sock}}\nmetrics: {{listen: null}}\n"
        f"sim: {{socket: {root}/sim.sock}}\nlog: {{level: warning}}\n")
    for n in range(devices):
        (root / "devices.d" / f"d{n:04d}.yaml").write_text(
            f"pci_address: '0000:{1 + n // 32:02x}:{n % 32:02x}.0'\nbackend: {{type: sim}}\n")
    return root / "eoid.yaml"


class Probe:
    """Wake-up lateness on the daemon's loop, collected until ``stop``."""

    def __init__(self, served: RunningDaemon) -> None:
        self.lags: list[float] = []
        self.running = True
        self._done = asyncio.run_coroutine_threadsafe(self._run(), served.daemon.loop)

    async def _run(self) -> None:
        while self.running:
            began = time.perf_counter()
            await asyncio.sleep(PROBE)
            self.lags.append(time.perf_counter() - began - PROBE)

    def stop(self) -> list[float]:
        self.running = False
        self._done.result(5)
        return self.lags


def whole(served: RunningDaemon) -> float:
    """The reply of one unpaged ``status``, built and encoded on the loop (main before);
    the loop thread's CPU seconds for it."""
    began = time.thread_time()
    d = served.daemon
    encode({"daemon": d.daemon_status(), "devices": [d.device_status(n) for n in d.runners]})
    return time.thread_time() - began


def timed_requests(served: RunningDaemon) -> list[float]:
    """The loop thread's CPU seconds for each control message handled from now on."""
    server = served.daemon.control
    assert server is not None
    handle = server._readable
    cpu: list[float] = []

    def timed(peer: Any) -> None:
        began = time.thread_time()
        handle(peer)
        cpu.append(time.thread_time() - began)

    server._readable = timed  # type: ignore[method-assign]
    return cpu


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def summary(name: str, lags: list[float], cpu: list[float]) -> dict[str, Any]:
    ordered = sorted(lags)
    return {"phase": name, "wakeups": len(ordered), "stall_max_ms": ms(ordered[-1]),
            "stall_p99_ms": ms(ordered[int(len(ordered) * 0.99)]),
            "requests": len(cpu), "request_cpu_max_ms": ms(max(cpu, default=0)),
            "request_cpu_median_ms": ms(sorted(cpu)[len(cpu) // 2] if cpu else 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    log.configure(level="warning", stream=sys.stderr)  # 1024 devices' info lines: not here
    root = Path(tempfile.mkdtemp(prefix="eoid-st", dir="/tmp"))
    try:
        config = load_config(write_config(root, args.devices))
        with run_server(config) as served:
            deadline = time.monotonic() + 60
            while not served.call(lambda: all(r.up for r in served.daemon.runners.values())):
                if time.monotonic() > deadline:
                    raise SystemExit("the devices did not open within 60 s")
                time.sleep(0.1)
            rows = []
            probe = Probe(served)
            time.sleep(2)
            rows.append(summary("idle", probe.stop(), []))

            probe = Probe(served)
            cpu = []
            for _ in range(args.rounds):
                cpu.append(served.call(lambda: whole(served)))
                time.sleep(0.1)
            rows.append(summary("whole", probe.stop(), cpu))

            client = subprocess.Popen([sys.executable, "-c", CLIENT, str(args.rounds),
                                       str(config.daemon.control.socket)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert client.stdout is not None and client.stdin is not None
            assert client.stdout.readline() == "ready\n"  # its start-up is not measured
            cpu = served.call(lambda: timed_requests(served))
            probe = Probe(served)
            client.stdin.write("go\n")
            client.stdin.flush()
            listed = [int(n) for n in client.stdout.read().split()]
            assert client.wait() == 0 and listed == [args.devices] * args.rounds, listed
            rows.append(summary("paged", probe.stop(), cpu))
        for row in rows:
            print(json.dumps(row))
        print(json.dumps({"devices": args.devices, "rounds": args.rounds,
                          "longest_stall_paged_over_whole": round(
                              rows[2]["stall_max_ms"] / rows[1]["stall_max_ms"], 3),
                          "longest_request_cpu_paged_over_whole": round(
                              rows[2]["request_cpu_max_ms"] / rows[1]["request_cpu_max_ms"], 3),
                          "median_request_cpu_paged_over_whole": round(
                              rows[2]["request_cpu_median_ms"]
                              / rows[1]["request_cpu_median_ms"], 3)}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
