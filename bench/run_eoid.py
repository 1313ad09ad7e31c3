"""Run the real eoid daemon under the C pump: the same load as the baseline, eoid's fds.

The harness stands in for ``eoid sim`` (a tiny sim server that answers the daemon's sim
connection and keeps the trigger and unmask eventfds of each line) and for the consumers
(one control connection attached to every device, keeping the irq and eoi eventfds).
Those real fds go to ``pump`` (bench/pump.c), so the load is generated in C and the
daemon is the only Python on the hot path. The daemon is a real ``eoid run`` process.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.run_baseline import (
    ensure_nofile,
    launch_pump,
    parse_output,
    placement_cpus,
    process_cpu_us,
)
from eoid.control import ControlClient, wait_for_socket
from eoid.demo import Samples, scrape
from eoid.stats import quantile
from eoid.systemd import close_all
from eoid.wire import recv_msg, send_msg

_START_TIMEOUT = 120.0
_EXIT_TIMEOUT = 30.0


class SimStandIn:
    """Answers the daemon's sim backend and keeps each line's (trigger, unmask) fds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: dict[str, tuple[int, int]] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))
        self._sock.listen(4096)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="sim-stand-in", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._sock:
                    conn, _ = sock.accept()
                    self._sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    received = recv_msg(sock)
                except OSError:  # the daemon went (it sends its last requests unanswered)
                    received = None
                if received is None:
                    self._drop(sock)
                    continue
                message, fds = received
                if message.get("op") == "enable" and len(fds) == 2:
                    close_all(self.lines.pop(str(message["line"]), ()))
                    self.lines[str(message["line"])] = (fds[0], fds[1])
                    fds = []
                close_all(fds)
                try:
                    send_msg(sock, {"ok": True, "id": message.get("id")})
                except OSError:
                    self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._sel.unregister(sock)
        sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sock.close()
        self._sel.close()
        for trigger, unmask in self.lines.values():
            os.close(trigger)
            os.close(unmask)


def device_yaml(i: int) -> str:
    """Device ``i``'s file: a sim device with storm protection off (this measures the
    relay, not the limiter)."""
    return (f"pci_address: '0000:{i // 256:02x}:{(i // 8) % 32:02x}.{i % 8}'\n"
            "backend: {type: sim}\npolicy: {storm: {max_rate: 1.0e+9, burst: 1000000}}\n")


@dataclass
class Daemon:
    """An ``eoid run`` with N sim devices, its sim stand-in and one attached consumer."""

    devices: int
    loop: str
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="eoid-b", dir="/tmp")))
    proc: subprocess.Popen[bytes] | None = None
    sim: SimStandIn | None = None
    client: ControlClient | None = None
    consumer_fds: dict[str, tuple[int, int]] = field(default_factory=dict)
    port: int = 0
    arm_seconds: float = 0.0

    def names(self) -> list[str]:
        return [f"d{i:04d}" for i in range(self.devices)]

    def start(self, cpu: int | None) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (self.root / "devices.d").mkdir()
        (self.root / "eoid.yaml").write_text(
            f"control: {{socket: {self.root}/control.sock}}\n"
            f"metrics: {{listen: '127.0.0.1:{self.port}'}}\n"
            f"sim: {{socket: {self.root}/sim.sock}}\n"
            f"log: {{format: json, level: info}}\nloop: {self.loop}\n")
        for i, name in enumerate(self.names()):
            (self.root / "devices.d" / f"{name}.yaml").write_text(device_yaml(i))
        self.sim = SimStandIn(self.root / "sim.sock")
        ensure_nofile(4 * self.devices + 256)  # the stand-in's 2 fds a device, the consumer's 2
        with (self.root / "daemon.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "eoid.cli", "run", "-c", str(self.root / "eoid.yaml")],
                stdout=log, stderr=subprocess.STDOUT)
        if cpu is not None:
            os.sched_setaffinity(self.proc.pid, {cpu})
        proc = self.proc
        if not wait_for_socket(self.root / "control.sock", _START_TIMEOUT,
                               lambda: proc.poll() is None):
            raise RuntimeError("eoid did not start:\n" + self.log()[-3000:])
        deadline = time.monotonic() + _START_TIMEOUT
        while "eoid ready" not in self.log():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("eoid did not arm its devices:\n" + self.log()[-3000:])
            time.sleep(0.02)
        ready = next(json.loads(line) for line in self.log().splitlines()
                     if '"eoid ready"' in line)
        self.arm_seconds = float(ready["arm_seconds"])
        self.client = ControlClient(self.root / "control.sock", timeout=30)
        for name in self.names():
            _, fds = self.client.request("attach", device=name)
            self.consumer_fds[name] = (fds[0], fds[1])

    def quads(self) -> list[tuple[int, int, int, int]]:
        assert self.sim is not None
        return [(self.sim.lines[n][0], self.consumer_fds[n][0], self.consumer_fds[n][1],
                 self.sim.lines[n][1]) for n in self.names()]

    def log(self) -> str:
        return (self.root / "daemon.log").read_text(errors="replace")

    def cpu_us(self) -> float:
        assert self.proc is not None
        return process_cpu_us(self.proc.pid)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def scrape(self) -> Samples:
        return scrape(f"http://127.0.0.1:{self.port}/metrics", timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.client is not None:
            self.client.close()
        for irq, eoi in self.consumer_fds.values():
            os.close(irq)
            os.close(eoi)
        self.consumer_fds.clear()
        if self.sim is not None:
            self.sim.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _histogram(samples: Samples,
               metric: str) -> list[int]:
    """Bucket counts of ``metric`` summed over devices, non-cumulative, by ``le``."""
    by_le: dict[float, float] = {}
    for labels, value in samples.get(f"{metric}_bucket", {}).items():
        le = float(dict(labels)["le"])
        by_le[le] = by_le.get(le, 0.0) + value
    cumulative = [int(v) for _, v in sorted(by_le.items())]
    return [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]


def _total(samples: Samples, metric: str) -> int:
    return int(sum(samples.get(metric, {}).values()))


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 2)


@contextlib.contextmanager
def running(devices: int, loop: str, cpu: int | None) -> Iterator[Daemon]:
    daemon = Daemon(devices, loop)
    try:
        daemon.start(cpu)
        yield daemon
    finally:
        daemon.stop()


def measure(daemon: Daemon, mode: str, duration: float, rate: int | None,
            pump_cpu: int | None, *, pump_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One load run against an armed daemon: CPU, throughput, in-daemon latencies, lost."""
    before = daemon.scrape()
    cpu0 = daemon.cpu_us()
    pump = launch_pump(daemon.quads(), mode, duration, rate, cpu=pump_cpu, pump_args=pump_args)
    out, _ = pump.communicate(timeout=duration + _EXIT_TIMEOUT)
    cpu1 = daemon.cpu_us()
    after = daemon.scrape()
    load = parse_output("pump", pump, out)
    interrupts = _total(after, "eoid_interrupts_total") - _total(before, "eoid_interrupts_total")
    unmasks = _total(after, "eoid_unmasks_total") - _total(before, "eoid_unmasks_total")
    latency = {}
    for name, metric in (("eoi_to_unmask", "eoid_unmask_latency_seconds"),
                         ("trigger_to_forward", "eoid_dispatch_latency_seconds")):
        counts = [a - b for a, b in zip(_histogram(after, metric), _histogram(before, metric),
                                        strict=True)]
        for q, label in ((0.5, "p50"), (0.99, "p99"), (0.999, "p999")):
            latency[f"{name}_{label}_us"] = _us(quantile(counts, q))
    lost = (load["fired"] - load["unmask_received"]) + abs(load["fired"] - interrupts) \
        + abs(interrupts - unmasks)
    return {
        "interrupts": interrupts,
        "interrupts_per_s": round(load["rate_achieved"], 1),
        "cpu_us_per_interrupt": round((cpu1 - cpu0) / interrupts, 3) if interrupts else None,
        **latency,
        "round_trip_p50_us": load.get("p50_us"), "round_trip_p99_us": load.get("p99_us"),
        "skipped": load.get("skipped", 0),
        "lost": lost if pump.returncode == 0 else max(lost, 1),
        "pump": load,
    }


def idle_cpu_percent(daemon: Daemon, seconds: float) -> float:
    """CPU the armed daemon uses with no interrupts at all (no polling: should be 0)."""
    time.sleep(3.0)  # past eoi_timeout (2 s): the last run's deadline timers fire once, lapse
    cpu0 = daemon.cpu_us()
    time.sleep(seconds)
    return round((daemon.cpu_us() - cpu0) / (seconds * 1e6) * 100, 3)


def run_eoid(devices: int, mode: str, duration: float, rate: int | None = None, *,
             loop: str = "uvloop", placement: str = "same") -> dict[str, Any]:
    relay_cpu, pump_cpu = placement_cpus(placement)
    with running(devices, loop, relay_cpu) as daemon:
        rss = daemon.rss_bytes()
        result = measure(daemon, mode, duration, rate, pump_cpu)
        return {"devices": devices, "loop": loop, "mode": mode, "rate": rate,
                "arm_seconds": daemon.arm_seconds, "rss_bytes": rss, **result}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.run_eoid")
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--mode", choices=("closed", "paced"), default="closed")
    parser.add_argument("--rate", type=int)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    a = parser.parse_args()
    r = run_eoid(a.devices, a.mode, a.duration, a.rate, loop=a.loop)
    r.pop("pump")
    print(json.dumps(r, indent=2))
