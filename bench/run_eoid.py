"""Run the real eoid daemon under the C pump: the same load as the baseline, eoid's fds.

The harness stands in for ``eoid sim`` (a tiny sim server that answers the daemon's sim
connection and keeps the trigger and unmask eventfds of each line) and for the consumers
(one control connection attached to every device, keeping the irq and eoi eventfds).
Those real fds go to ``pump`` (bench/pump.c), so the load is generated in C and the
daemon is the only Python on the hot path. The daemon is a real ``eoid run`` process.
"""

from __future__ import annotations

import collections
import contextlib
import json
import mmap
import os
import selectors
import shutil
import signal
import socket
import struct
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
    thread_cpu_ns,
    voluntary_switches,
)
from eoid.control import ControlClient, wait_for_socket
from eoid.demo import Samples, scrape
from eoid.stats import quantile
from eoid.systemd import close_all
from eoid.wire import BATCH_MAX_FDS, recv_msg, send_msg

_START_TIMEOUT = 120.0
_EXIT_TIMEOUT = 30.0


@dataclass
class _Line:
    """A line as the stand-in keeps it: what it signals now and what unmasks it."""

    index: int  # its counter in the kernel-fires memfd, its index in the pump's list
    trigger: int = -1  # eoid's trigger eventfd; on the kernel's path, the consumer's irq
    unmask: int = -1  # eoid's unmask eventfd (VFIO's ACTION_UNMASK, the sim's ``enable``)
    virqfd: int = -1  # on the kernel's path: the consumer's eoi, bound as the unmask


@dataclass
class _Reply:
    """A reply the stand-in owes on ``sock``, sent in turn once the pump has applied the
    route it answers (``waiting``), with the replies ready next to it (``_flush``)."""

    sock: socket.socket
    message: dict[str, Any]
    waiting: int = 0


class SimStandIn:
    """Answers the daemon's sim backend and keeps each line's fds, as ``eoid sim`` would,
    for the pump (bench/pump.c) to play the lines with.

    ``route`` (the kernel's datapath, eoid/sim/line.py) is followed as the sim follows
    it: the trigger is swapped and the virqfd bound or unbound. While a pump runs
    (``connect_pump``) each route is passed on to it and answered once the pump has
    applied it, as the sim answers once its loop has; ``fires`` is answered with the
    pump's count of the line's fires on the kernel's path (a memfd both map)."""

    def __init__(self, path: Path, names: list[str] | None = None, capacity: int = 8192,
                 ) -> None:
        """``names``: the lines, in the pump's order (others are added as they are opened,
        up to ``capacity`` in all)."""
        self.path = path
        self._by_index = list(names or [])
        self.lines = {name: _Line(i) for i, name in enumerate(self._by_index)}
        self._capacity = max(capacity, len(self._by_index))
        self._fires_fd = os.memfd_create("eoid-bench-kernel-fires", os.MFD_CLOEXEC)
        os.ftruncate(self._fires_fd, 8 * self._capacity)
        self._fires = mmap.mmap(self._fires_fd, 8 * self._capacity)
        self._lock = threading.Lock()
        self._pump: socket.socket | None = None
        # replies in the order of their requests, per connection: a route's is filled in
        # when the pump has applied it
        self._replies: dict[socket.socket, collections.deque[_Reply]] = {}
        self._routing: collections.deque[tuple[_Reply, dict[str, Any], _Line]] = \
            collections.deque()  # routes sent to the pump, in its order
        self.routes = 0
        self.to_relay = 0  # routes back to eoid's trigger (from the kernel's path)
        self.requests: collections.Counter[str] = collections.Counter()  # by op
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self._sock.bind(str(path))
        self._sock.listen(4096)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._sock, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="sim-stand-in", daemon=True)
        self._thread.start()

    def line_fds(self, name: str) -> tuple[int, int]:
        """Copies of line ``name``'s trigger and unmask eventfds, for the caller to close.
        Copies, taken under the lock: a ``route`` closes the stand-in's own fd and keeps
        the new one it was sent, and a number read from ``lines`` without the lock may
        by then name another file (the 30-minute soak of 93379a5 wrote to one such)."""
        with self._lock:
            line = self.lines[name]
            return os.dup(line.trigger), os.dup(line.unmask)

    def kernel_fires(self, name: str) -> int:
        return int(struct.unpack_from("Q", self._fires, 8 * self.lines[name].index)[0])

    def on_kernel_path(self) -> int:
        """Lines with a virqfd bound."""
        with self._lock:
            return sum(line.virqfd >= 0 for line in self.lines.values())

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with self._lock:
                    if sock is self._sock:
                        conn, _ = sock.accept()
                        self._sel.register(conn, selectors.EVENT_READ)
                        self._replies[conn] = collections.deque()
                    elif sock is self._pump:
                        self._on_pump()
                    elif sock in self._replies:
                        self._on_daemon(sock)

    def _on_daemon(self, sock: socket.socket) -> None:
        try:
            received = recv_msg(sock, max_fds=BATCH_MAX_FDS)
        except OSError:  # the daemon went (it sends its last requests unanswered)
            received = None
        if received is None:
            self._drop(sock)
            return
        message, fds = received
        batch = message.get("requests", []) if message.get("op") == "batch" else [message]
        for request in batch:  # (a batch's fds: each request's share in turn)
            n = len(fds) if request is message else request.get("fds", 0)
            entry = _Reply(sock, {})
            entry.message = self._answer(entry, request, fds[:n])
            self._replies[sock].append(entry)
            fds = fds[n:]
        close_all(fds)
        self._flush(sock)

    def _answer(self, entry: _Reply, message: dict[str, Any], fds: list[int],
                ) -> dict[str, Any]:
        reply: dict[str, Any] = {"ok": True, "id": message.get("id")}
        op, name = message.get("op"), str(message.get("line"))
        self.requests[str(op)] += 1
        line = self.lines.get(name)
        if line is None and op in ("open", "enable") and len(self.lines) < self._capacity:
            line = self.lines[name] = _Line(len(self._by_index))
            self._by_index.append(name)
        if line is not None and op == "open":
            struct.pack_into("Q", self._fires, 8 * line.index, 0)  # counted per open
        elif line is not None and op == "enable" and len(fds) == 2:
            close_all([fd for fd in (line.trigger, line.unmask, line.virqfd) if fd >= 0])
            line.trigger, line.unmask, line.virqfd = fds[0], fds[1], -1
            fds = []
        elif line is not None and op == "route" and len(fds) in (1, 2):
            self._route(line, fds, entry, reply)
            fds = []
        elif line is not None and op == "fires":
            reply["kernel_fires"] = self.kernel_fires(name)
        close_all(fds)
        return reply

    def _route(self, line: _Line, fds: list[int], entry: _Reply, reply: dict[str, Any],
               ) -> None:
        """The sim's ``route``: with a virqfd, bind it, then swap the trigger; without,
        swap, then unbind. A running pump applies it to the line it plays first."""
        self.routes += 1
        self.to_relay += len(fds) == 1
        close_all([fd for fd in (line.trigger, line.virqfd) if fd >= 0])
        line.trigger, line.virqfd = fds[0], fds[1] if len(fds) == 2 else -1
        if self._pump is not None:
            try:
                socket.send_fds(self._pump, [struct.pack("I", line.index)], fds)
            except OSError:  # the pump has exited
                self._unlink_pump()
            else:
                entry.waiting += 1  # answered on the pump's acknowledgement
                self._routing.append((entry, reply, line))
                return
        reply["kernel_fires"] = self.kernel_fires(self._by_index[line.index])

    def _on_pump(self) -> None:
        """The pump's acknowledgements of the routes it applied: every one there is, then
        one flush of the replies that are ready."""
        assert self._pump is not None
        ready: set[socket.socket] = set()
        flags = 0
        while True:
            try:
                data = self._pump.recv(4, flags)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if len(data) != 4:
                self._unlink_pump()
                break
            ready.add(self._applied(*self._routing.popleft()))
            flags = socket.MSG_DONTWAIT
        for sock in ready:
            self._flush(sock)

    def _applied(self, entry: _Reply, reply: dict[str, Any], line: _Line) -> socket.socket:
        """A route is in place: its reply says the count; the socket it goes out on."""
        reply["kernel_fires"] = self.kernel_fires(self._by_index[line.index])
        entry.waiting -= 1
        return entry.sock

    def _flush(self, sock: socket.socket) -> None:
        """Send the replies that are ready, in order: several in one ``replies`` message,
        as eoid sim answers a batch; each as soon as the pump has applied its route (a
        reply held back for the rest of its batch would leave eoid waiting past its
        request timeout while the pump is busy)."""
        queue = self._replies.get(sock)
        ready: list[dict[str, Any]] = []
        while queue and not queue[0].waiting:
            ready.append(queue.popleft().message)
        if ready:
            try:
                send_msg(sock, ready[0] if len(ready) == 1 else {"replies": ready})
            except OSError:
                self._drop(sock)

    def _unlink_pump(self) -> None:
        """The pump is gone: the routes it did not apply are the stand-in's alone."""
        if self._pump is None:
            return
        self._sel.unregister(self._pump)
        self._pump.close()
        self._pump = None
        while self._routing:
            self._flush(self._applied(*self._routing.popleft()))

    def connect_pump(self, consumer_fds: dict[str, tuple[int, int]],
                     ) -> tuple[list[tuple[int, int, int, int, int]], socket.socket, int]:
        """The pump's device list (copies of the fds: the caller closes them once the
        pump has them), its end of the routes socket, and the kernel-fires memfd."""
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with self._lock:
            self._unlink_pump()
            quads = []
            for name, line in self.lines.items():
                irq, eoi = consumer_fds[name]
                quads.append((os.dup(line.trigger), irq, eoi, os.dup(line.unmask),
                              os.dup(line.virqfd) if line.virqfd >= 0 else -1))
            self._pump = ours
            self._sel.register(ours, selectors.EVENT_READ)
        return quads, theirs, self._fires_fd

    def pump_done(self) -> None:
        with self._lock:
            self._unlink_pump()

    def _drop(self, sock: socket.socket) -> None:
        if self._replies.pop(sock, None) is None:
            return  # dropped already (an event for it came in the same batch)
        self._sel.unregister(sock)
        sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._unlink_pump()
        for key in list(self._sel.get_map().values()):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            sock.close()
        self._sel.close()
        for line in self.lines.values():
            close_all([fd for fd in (line.trigger, line.unmask, line.virqfd) if fd >= 0])
        self._fires.close()
        os.close(self._fires_fd)


def device_yaml(i: int, datapath: str = "relay", observe: tuple[str, str] | None = None) -> str:
    """Device ``i``'s file: a sim device with storm protection off (this measures the
    relay, not the limiter), on ``datapath``, sampled ``observe`` = (every, for)."""
    return (f"pci_address: '0000:{i // 256:02x}:{(i // 8) % 32:02x}.{i % 8}'\n"
            "backend: {type: sim}\npolicy: {storm: {max_rate: 1.0e+9, burst: 1000000}}\n"
            f"datapath: {datapath}\n"
            + (f"observe: {{every: {observe[0]}, for: {observe[1]}}}\n" if observe else ""))


@dataclass
class Daemon:
    """An ``eoid run`` with N sim devices, its sim stand-in and one attached consumer."""

    devices: int
    loop: str
    datapath: str = "relay"
    observe: tuple[str, str] | None = None  # (every, for): sampled observation
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="eoid-b", dir="/tmp")))
    proc: subprocess.Popen[bytes] | None = None
    sim: SimStandIn | None = None
    client: ControlClient | None = None
    consumer_fds: dict[str, tuple[int, int]] = field(default_factory=dict)
    port: int = 0
    arm_seconds: float = 0.0
    profile: Path | None = None  # where the load run's profile goes (EOID_BENCH_PROFILE)

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
            (self.root / "devices.d" / f"{name}.yaml").write_text(
                device_yaml(i, self.datapath, self.observe))
        self.sim = SimStandIn(self.root / "sim.sock", self.names())
        ensure_nofile(4 * self.devices + 256)  # the stand-in's 2 fds a device, the consumer's 2
        # EOID_BENCH_PROFILE=DIR: the daemon's event loop under cProfile (CPU time) during
        # each load run (``measure``), written to DIR/eoid-<devices>-<datapath>[-<observe>].prof
        profile = os.environ.get("EOID_BENCH_PROFILE")
        command = [sys.executable, "-m", "eoid.cli"]
        if profile:
            name = "-".join((f"eoid-{self.devices}", self.datapath, *(self.observe or ())))
            self.profile = Path(profile) / f"{name}.prof"
            command = [sys.executable, "-m", "bench._profile", str(self.profile)]
        with (self.root / "daemon.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [*command, "run", "-c", str(self.root / "eoid.yaml")],
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
        sim = self.sim
        assert sim is not None
        # attached, a device meant for the kernel's path is routed there at once
        while self.datapath == "kernel" and sim.routes < self.devices:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{sim.on_kernel_path()} of {self.devices} devices "
                                   "on the kernel's path:\n" + self.log()[-3000:])
                time.sleep(0.02)

    def counters(self) -> dict[str, int]:
        """eoid's counts summed over the devices, scraped (a status reply of 1024 devices
        is too big for one message), and the observation windows: the routes back to the
        relay the sim was asked for (the bench makes no other)."""
        samples = self.scrape()
        out = {key: _total(samples, f"eoid_{key}_total") for key in (
            "kernel_interrupts", "interrupts", "unmasks", "spurious_eois", "eoi_timeouts")}
        assert self.sim is not None
        out["observations"] = self.sim.to_relay
        return out

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
        if not os.environ.get("EOID_BENCH_KEEP"):  # (EOID_BENCH_KEEP=1: the logs stay)
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
def running(devices: int, loop: str, cpu: int | None, datapath: str = "relay",
            observe: tuple[str, str] | None = None) -> Iterator[Daemon]:
    daemon = Daemon(devices, loop, datapath, observe)
    try:
        daemon.start(cpu)
        yield daemon
    finally:
        daemon.stop()


def _settled(daemon: Daemon, kernel_fires: int, before: int) -> dict[str, int]:
    """eoid's counters once its count of kernel-path interrupts (asked of the sim, and
    exact once the sim answered after the last fire) has caught up, or after 10 s."""
    deadline = time.monotonic() + 10.0
    while True:
        counts = daemon.counters()
        if counts["kernel_interrupts"] - before >= kernel_fires or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def measure(daemon: Daemon, mode: str, duration: float, rate: int | None,
            pump_cpu: int | None, *, pump_args: tuple[str, ...] = (),
            drain: float = 1.0) -> dict[str, Any]:
    """One load run against an armed daemon: CPU, throughput, in-daemon latencies, lost.

    With sampled observation the pump models the line as vfio-pci presents a level-
    triggered one (``--level``): a switch back from the kernel's path may unmask a line
    that is not masked, which the kernel ignores. Loss is then every fire completed and
    every fire counted once, by eoid (relayed) or by the kernel's path (the pump's count).
    """
    assert daemon.proc is not None and daemon.sim is not None
    pid = daemon.proc.pid
    level = daemon.observe is not None
    before = daemon.scrape()
    counts0 = daemon.counters()  # (its scrape also asks the sim for the kernel's counts)
    requests0 = collections.Counter(daemon.sim.requests)
    quads, routes, fires_fd = daemon.sim.connect_pump(daemon.consumer_fds)
    args = (*pump_args, "--routes", str(routes.fileno()), "--kernel-fires", str(fires_fd),
            *(("--level",) if level else ()))
    if daemon.profile is not None:
        os.kill(pid, signal.SIGUSR1)
    cpu0, ns0, vol0 = daemon.cpu_us(), thread_cpu_ns(pid), voluntary_switches(pid)
    try:
        pump = launch_pump(quads, mode, duration, rate, cpu=pump_cpu, pump_args=args,
                           extra_fds=(routes.fileno(), fires_fd), drain=drain)
    finally:
        routes.close()
        close_all([fd for quad in quads for fd in (quad[0], quad[3], quad[4]) if fd >= 0])
    out, _ = pump.communicate(timeout=duration + drain + _EXIT_TIMEOUT)
    cpu1, ns1, vol1 = daemon.cpu_us(), thread_cpu_ns(pid), voluntary_switches(pid)
    if daemon.profile is not None:
        os.kill(pid, signal.SIGUSR2)
    daemon.sim.pump_done()
    requests = dict(collections.Counter(daemon.sim.requests) - requests0)  # during the run
    load = parse_output("pump", pump, out)
    counts1 = _settled(daemon, load["kernel_fired"], counts0["kernel_interrupts"])
    after = daemon.scrape()
    interrupts = _total(after, "eoid_interrupts_total") - _total(before, "eoid_interrupts_total")
    unmasks = _total(after, "eoid_unmasks_total") - _total(before, "eoid_unmasks_total")
    kernel = load["kernel_fired"]
    fires = load["fired"] + load["refires"]
    total = interrupts + kernel
    def named(tid_name: str) -> str:  # the main thread runs the event loop
        return "loop" if tid_name.startswith(f"{pid}:") else tid_name

    switches = {named(t): n - vol0.get(t, 0) for t, n in vol1.items()}
    threads_ns = {named(t): n - ns0.get(t, 0) for t, n in ns1.items()}
    cpu_ns = sum(threads_ns.values())
    latency = {}
    for name, metric in (("eoi_to_unmask", "eoid_unmask_latency_seconds"),
                         ("trigger_to_forward", "eoid_dispatch_latency_seconds")):
        counts = [a - b for a, b in zip(_histogram(after, metric), _histogram(before, metric),
                                        strict=True)]
        for q, label in ((0.5, "p50"), (0.99, "p99"), (0.999, "p999")):
            latency[f"{name}_{label}_us"] = _us(quantile(counts, q))
    if level:  # every fire completed, each counted once (by eoid or the kernel's path)
        lost = load["lost"] + abs(fires - total)  # pump's lost: fires not completed
    else:
        eoid_unmasks = load["unmask_received"] - load["virqfd_unmasks"]
        lost = (load["fired"] - load["unmask_received"]) + abs(load["fired"] - total) \
            + abs(interrupts - unmasks) + abs(eoid_unmasks - unmasks)
    # eoid's count of the kernel's path, asked of the sim, must match the pump's
    lost += abs(counts1["kernel_interrupts"] - counts0["kernel_interrupts"] - kernel)
    return {
        "interrupts": interrupts,
        "kernel_interrupts": kernel,
        "kernel_interrupts_eoid": counts1["kernel_interrupts"] - counts0["kernel_interrupts"],
        "interrupts_per_s": round(load["rate_achieved"], 1),
        "cpu_us_per_interrupt": round((cpu1 - cpu0) / total, 3) if total else None,
        "cpu_ns": cpu_ns,
        "cpu_ns_by_thread": threads_ns,
        "cpu_ns_per_interrupt": round(cpu_ns / total, 1) if total else None,
        "voluntary_switches": sum(switches.values()),
        "voluntary_switches_per_interrupt": round(sum(switches.values()) / total, 4)
        if total else None,
        "voluntary_switches_by_thread": switches,
        "observations": counts1["observations"] - counts0["observations"],
        "spurious_eois": counts1["spurious_eois"] - counts0["spurious_eois"],
        "eoi_timeouts": counts1["eoi_timeouts"] - counts0["eoi_timeouts"],
        "routes": load["routes"],
        "sim_requests": requests,
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
             loop: str = "uvloop", placement: str = "same", datapath: str = "relay",
             observe: tuple[str, str] | None = None, drain: float = 1.0) -> dict[str, Any]:
    relay_cpu, pump_cpu = placement_cpus(placement)
    with running(devices, loop, relay_cpu, datapath, observe) as daemon:
        rss = daemon.rss_bytes()
        result = measure(daemon, mode, duration, rate, pump_cpu, drain=drain)
        return {"devices": devices, "loop": loop, "mode": mode, "rate": rate,
                "datapath": datapath, "observe": list(observe) if observe else None,
                "arm_seconds": daemon.arm_seconds, "rss_bytes": rss, **result}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.run_eoid")
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--mode", choices=("closed", "paced"), default="closed")
    parser.add_argument("--rate", type=int)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--datapath", choices=("relay", "kernel"), default="relay")
    parser.add_argument("--observe", nargs=2, metavar=("EVERY", "FOR"),
                        help="sampled observation, e.g. 1s 100ms (with --datapath kernel)")
    parser.add_argument("--drain", type=float, default=1.0,
                        help="seconds the pump waits for what is in flight after the load")
    a = parser.parse_args()
    r = run_eoid(a.devices, a.mode, a.duration, a.rate, loop=a.loop, datapath=a.datapath,
                 observe=tuple(a.observe) if a.observe else None, drain=a.drain)
    r.pop("pump")
    print(json.dumps(r, indent=2))
