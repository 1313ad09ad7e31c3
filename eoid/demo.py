"""``eoid demo``: simulated devices, the real daemon and simulated guests, as three processes.

It writes a configuration, starts ``eoid sim`` (devices + guests) and ``eoid run`` as
subprocesses, shows a live per-device view from the daemon's own ``/metrics``, and at the
end stops the load, lets everything drain and reconciles what the devices fired, what
the guests received and EOI'd, and what the daemon counted.

With ``--kill-daemon-every S`` the demo also plays systemd's part: it holds the daemon's
fd store on a notify socket (``eoid.testing.FakeSystemd``), SIGKILLs the daemon every S
seconds and restarts it with the stored fds (``LISTEN_FDS``), as ``Restart=on-failure``
would. Guests must never notice: no event lost, no re-attach.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from eoid.control import ControlClient, wait_for_socket
from eoid.errors import EoidError
from eoid.stats import BUCKETS_NS, human_seconds, quantile
from eoid.testing import FakeSystemd
from eoid.wire import recv_msg, send_msg

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]
HISTOGRAMS = ("eoid_interrupt_service_seconds", "eoid_unmask_latency_seconds",
              "eoid_dispatch_latency_seconds")
DRAIN_TIMEOUT = 15.0


def scrape(url: str, timeout: float = 10.0) -> Samples:
    """Every sample of a /metrics page: name → {sorted labels → value}."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode()
    except OSError as e:  # URLError, a timeout, a reset
        raise EoidError(f"cannot scrape {url}: {getattr(e, 'reason', None) or e}") from e
    out: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def device_counter(samples: Samples, name: str, device: str) -> int:
    return int(samples.get(name, {}).get((("device", device),), 0))


def bucket_counts(samples: Samples, metric: str, device: str) -> list[int]:
    """Non-cumulative bucket counts of one device's histogram, in our bucket order."""
    rows = sorted(((float(dict(k)["le"]), v) for k, v in samples.get(f"{metric}_bucket", {}).items()
                   if dict(k).get("device") == device), key=lambda r: r[0])
    cumulative = [int(v) for _, v in rows]
    return [c - p for c, p in zip(cumulative, [0, *cumulative[:-1]], strict=True)]


def sim_call(path: Path, op: str, **fields: Any) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(5)
        try:
            sock.connect(str(path))
            send_msg(sock, {"op": op, **fields})
            received = recv_msg(sock, 1 << 24)
        except OSError as e:
            raise EoidError(f"the sim did not answer {op!r} on {path}: "
                            f"{e.strerror or 'timed out'}") from e
    if received is None or not received[0].get("ok"):
        raise EoidError(f"sim {op} failed: {received}")
    return received[0]


class Supervisor:
    """Plays PID 1 for ``--kill-daemon-every``: holds the fd store and reads every
    notification as it arrives, in a thread (a notify socket left full blocks the daemon,
    as it would under a PID 1 that stopped reading)."""

    def __init__(self) -> None:
        self.systemd = FakeSystemd()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="fake-pid1", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while not self._stopping.is_set():
            select.select([self.systemd.fileno()], [], [], 0.05)
            with self._lock:
                self.systemd.drain()

    def spawn(self, argv: list[str], **popen: Any) -> subprocess.Popen[bytes]:
        """Start (or restart) the daemon with everything in the store, as PID 1 would."""
        with self._lock:
            self.systemd.drain()  # a dead daemon's last words first (e.g. FDSTOREREMOVE)
            return self.systemd.spawn(argv, start_new_session=True, **popen)

    def state(self) -> str:
        with self._lock:
            return self.systemd.state

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self.systemd.close()


class Demo:
    """The three processes and the bookkeeping between them."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.dir = workdir
        self.names = [f"dev{i:02d}" for i in range(args.devices)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.systemd = Supervisor() if args.kill_daemon_every else None
        self.restarts = 0
        self.config = workdir / "eoid.yaml"
        self.sim_socket = workdir / "sim.sock"
        self.control = workdir / "control.sock"
        host, _, port = args.metrics_listen.rpartition(":")
        self.url = f"http://{host.strip('[]') if ':' not in host else host}:{port}/metrics"

    def write_config(self) -> None:
        (self.dir / "devices.d").mkdir(parents=True, exist_ok=True)
        # the live view's per-device percentiles: every histogram per device, every bucket
        self.config.write_text(
            f"control: {{socket: {self.control}}}\n"
            f"metrics: {{listen: '{self.args.metrics_listen}', per_device_histograms: all, "
            f"service_buckets: [{', '.join(f'{ns}ns' for ns in BUCKETS_NS)}]}}\n"
            f"sim: {{socket: {self.sim_socket}}}\n"
            f"log: {{format: json, level: info}}\n"
            f"loop: {self.args.loop}\n")
        for i, name in enumerate(self.names):
            (self.dir / "devices.d" / f"{name}.yaml").write_text(
                f"pci_address: '0000:{1 + i // 32:02x}:{i % 32:02x}.0'\n"
                "backend: {type: sim}\n"
                "policy:\n  eoi_timeout: 500ms\n  on_eoi_timeout: unmask\n"
                "  storm: {max_rate: 5000, burst: 50, backoff_max: 500ms, recovery: 1s}\n")

    def _spawn(self, role: str, *argv: str) -> None:
        command = [sys.executable, "-m", "eoid.cli", *argv]
        with (self.dir / f"{role}.log").open("ab") as log:
            if role == "daemon" and self.systemd is not None:
                self.procs[role] = self.systemd.spawn(command, stdout=log,
                                                      stderr=subprocess.STDOUT)
            else:
                self.procs[role] = subprocess.Popen(command, stdout=log,
                                                    stderr=subprocess.STDOUT,
                                                    start_new_session=True)

    def kill_and_restart_daemon(self) -> None:
        """SIGKILL: no chance to clean up. The successor gets the fd store back."""
        assert self.systemd is not None
        daemon = self.procs["daemon"]
        daemon.kill()
        daemon.wait()
        self._spawn("daemon", "run", "-c", str(self.config))
        deadline = time.monotonic() + 20
        while self.systemd.state() != "ready":
            if time.monotonic() > deadline or self.procs["daemon"].poll() is not None:
                raise EoidError("the restarted daemon did not become ready: "
                                + self.last_words("daemon"))
            time.sleep(0.01)
        self.restarts += 1

    def start(self) -> None:
        a = self.args
        bad = [n for n in a.stuck_line + a.no_eoi + a.spurious_eoi if n not in self.names]
        if bad:
            raise EoidError(f"no such demo device {bad[0]!r} (devices are dev00..."
                            f"{self.names[-1]})")
        self.write_config()
        misbehave = [arg for flag, names in (("--stuck-line", a.stuck_line),
                                             ("--no-eoi", a.no_eoi),
                                             ("--spurious-eoi", a.spurious_eoi))
                     for n in names for arg in (flag, n)]
        self._spawn("sim", "sim", "-c", str(self.config), "--rate", str(a.rate),
                    "--service-time", a.service_time, *misbehave)
        self._wait(self.sim_socket, "sim")
        self._spawn("daemon", "run", "-c", str(self.config))
        try:
            self._wait(self.control, "daemon")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                status = self.status()
                if all(d["up"] and d["consumer"] for d in status["devices"]):
                    return
                time.sleep(0.05)
        except (OSError, EoidError) as e:  # a daemon that died on the way says why
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.procs["daemon"].wait(2)
            if self.procs["daemon"].poll() is not None:
                raise EoidError(f"the daemon did not start: {self.last_words('daemon')}") from e
            raise
        raise EoidError("devices did not come up with their guests attached in 20 s")

    def _wait(self, path: Path, role: str) -> None:
        proc = self.procs[role]

        def alive() -> bool:
            return proc.poll() is None

        if not wait_for_socket(path, 20, alive):
            raise EoidError(f"the {role} did not start: {self.last_words(role)}")

    def last_words(self, role: str) -> str:
        """The last thing a process said (its error, usually), on one line."""
        path = self.dir / f"{role}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        for raw in reversed(lines):
            line = raw.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and event.get("level") in ("error", "critical"):
                        return " ".join(str(event[k]) for k in ("message", "error")
                                        if k in event)
                continue
            if line:
                return line
        code = self.procs[role].poll()
        return f"it exited with status {code}" if code is not None else "no answer in 20 s"

    def status(self) -> dict[str, Any]:
        try:
            with ControlClient(self.control, timeout=15) as client:
                return client.status()
        except TimeoutError as e:
            raise EoidError("the daemon did not answer `status` within 15 s") from e

    def stop(self) -> None:
        for role in ("daemon", "sim"):
            proc = self.procs.get(role)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if role == "daemon" and self.systemd is not None:
                self.systemd.close()  # a stop, not a restart: the store goes too
                self.systemd = None

    # --- the end: drain and reconcile ------------------------------------------------

    def drain(self) -> bool:
        """Stop the load and misbehaviour; wait until every line is quiet and re-armed."""
        sim_call(self.sim_socket, "quiesce")
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            lines = sim_call(self.sim_socket, "stats")["lines"]
            devices = {d["name"]: d for d in self.status()["devices"]}
            if all(not line["asserted"] and not line["masked"] and not line["guest"]["in_service"]
                   and devices[name]["state"] == "armed" for name, line in lines.items()):
                return True
            time.sleep(0.1)
        return False

    def summary(self, drained: bool, elapsed: float) -> dict[str, Any]:
        lines = sim_call(self.sim_socket, "stats")["lines"]
        samples = scrape(self.url)
        per_device: dict[str, Any] = {}
        totals: dict[str, int] = defaultdict(int)
        mismatches: list[str] = []
        misbehaving = set(self.args.stuck_line + self.args.no_eoi + self.args.spurious_eoi)
        for name in self.names:
            line, guest = lines[name], lines[name]["guest"]
            d = {k: device_counter(samples, f"eoid_{k}_total", name) for k in (
                "interrupts", "forwards", "eois", "unmasks", "spurious_eois",
                "coalesced_interrupts", "eoi_timeouts", "storm_throttles")}
            row = {"device": {k: line[k] for k in ("raised", "acked", "fires", "unmasks")},
                   "guest": {k: guest[k] for k in ("irqs", "eois", "spurious_eois_sent",
                                                   "attaches")},
                   "daemon": d, "lost": line["raised"] - line["acked"]}
            if guest["attaches"] != 1:
                mismatches.append(f"{name}: the guest attached {guest['attaches']} times")
            for what, mine, theirs in () if self.restarts else (
                    ("device fires = daemon interrupts", line["fires"], d["interrupts"]),
                    ("daemon forwards = guest irqs", d["forwards"], guest["irqs"]),
                    ("guest EOIs = daemon EOIs", guest["eois"] + guest["spurious_eois_sent"],
                     d["eois"]),
                    ("daemon unmasks = device unmasks", d["unmasks"], line["unmasks"])):
                if mine != theirs:
                    mismatches.append(f"{name}: {what}: {mine} != {theirs}")
            if name in misbehaving:
                row["misbehaving"] = [flag for flag, names in (
                    ("stuck_line", self.args.stuck_line), ("no_eoi", self.args.no_eoi),
                    ("spurious_eoi", self.args.spurious_eoi)) if name in names]
            per_device[name] = row
            for k, v in row["device"].items():
                totals[f"device_{k}"] += v
            for k, v in row["guest"].items():
                totals[f"guest_{k}"] += v
            for k, v in d.items():
                totals[f"daemon_{k}"] += v
        service = [sum(c) for c in zip(*(bucket_counts(samples, HISTOGRAMS[0], n)
                                         for n in self.names), strict=True)]
        unmask = [sum(c) for c in zip(*(bucket_counts(samples, HISTOGRAMS[1], n)
                                        for n in self.names), strict=True)]
        lost = sum(r["lost"] for r in per_device.values())
        return {
            "duration_seconds": round(elapsed, 3), "devices": len(self.names),
            "rate_per_device": self.args.rate, "loop": self.args.loop, "drained": drained,
            "interrupts_per_second": round(totals["daemon_interrupts"] / elapsed, 1),
            "totals": dict(totals),
            "service_p50_us": _us(quantile(service, 0.5)),
            "service_p99_us": _us(quantile(service, 0.99)),
            "unmask_p50_us": _us(quantile(unmask, 0.5)),
            "unmask_p99_us": _us(quantile(unmask, 0.99)),
            "lost": lost, "mismatches": mismatches, "daemon_restarts": self.restarts,
            "note": ("daemon counters restart with each SIGKILLed process, so only events "
                     "(raised = serviced) and attachments are reconciled") if self.restarts
            else "every counter pair reconciled exactly",
            "per_device": per_device,
            "metrics_url": self.url,
        }


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def render_live(prev: Samples, cur: Samples, dt: float, status: dict[str, Any]) -> str:
    """The live table: rates and percentiles over the last interval, totals since start."""
    head = ("DEVICE", "STATE", "IRQ/s", "SERVICE p50", "p99", "UNMASK p50", "p99", "SPURIOUS",
            "TIMEOUTS", "THROTTLES")
    rows = [head]
    for d in status["devices"]:
        n = d["name"]
        rate = (device_counter(cur, "eoid_interrupts_total", n)
                - device_counter(prev, "eoid_interrupts_total", n)) / dt
        window = []
        for metric in HISTOGRAMS[:2]:
            now = bucket_counts(cur, metric, n)
            before = bucket_counts(prev, metric, n) or [0] * len(now)
            diff = [a - b for a, b in zip(now, before, strict=True)]
            window += [human_seconds(quantile(diff, 0.5)), human_seconds(quantile(diff, 0.99))]
        state = d["state"] + (" stuck" if d["stuck"] else "") + (" storm" if d["storm"] else "")
        rows.append((n, state if d["up"] else "down", f"{rate:.0f}", *window,
                     *(str(device_counter(cur, f"eoid_{k}_total", n))
                       for k in ("spurious_eois", "eoi_timeouts", "storm_throttles"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.rjust(w) if i > 1 else v.ljust(w)
                               for i, (v, w) in enumerate(zip(r, widths, strict=True)))
                     for r in rows)


def run_demo(args: argparse.Namespace) -> int:
    """The ``eoid demo`` command; returns the exit code. Whatever goes wrong ends as one
    ``EoidError`` line (the CLI prints it and exits 1), never as a traceback."""
    try:
        return _run_demo(args)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # the demo's promise: a message, not a traceback
        text = str(e) if isinstance(e, EoidError) else f"{type(e).__name__}: {e}"
        raise EoidError(" | ".join(line.strip() for line in text.splitlines()
                                   if line.strip())) from e


def _run_demo(args: argparse.Namespace) -> int:
    if args.devices < 1:
        raise EoidError("--devices must be at least 1")
    with contextlib.ExitStack() as stack:
        workdir = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="eoid-demo-")))
        workdir.mkdir(parents=True, exist_ok=True)
        demo = Demo(args, workdir)
        stack.callback(demo.stop)
        demo.start()
        live = not args.json
        if live:
            print(f"eoid demo: {args.devices} simulated devices at {args.rate:g} interrupts/s "
                  f"each; metrics on {demo.url}; Ctrl-C to stop", flush=True)
        started = time.monotonic()
        heal_at = started + args.duration / 2 if args.duration else None
        kill_every = args.kill_daemon_every
        kill_at = started + kill_every if kill_every else None
        prev, prev_t = scrape(demo.url), time.monotonic()
        try:
            while args.duration is None or time.monotonic() - started < args.duration:
                time.sleep(0.1)
                now = time.monotonic()
                if heal_at is not None and now >= heal_at:
                    sim_call(demo.sim_socket, "heal")  # the second half shows the recovery
                    heal_at = None
                if kill_at is not None and now >= kill_at:
                    demo.kill_and_restart_daemon()
                    kill_at = now + kill_every
                    prev, prev_t = scrape(demo.url), time.monotonic()
                if live and now - prev_t >= 1.0:
                    cur, now = scrape(demo.url), time.monotonic()
                    table = render_live(prev, cur, now - prev_t, demo.status())
                    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else ""
                    print(f"{clear}eoid demo, {now - started:.0f}s, metrics on {demo.url}\n"
                          f"{table}\n", flush=True)
                    prev, prev_t = cur, now
        except KeyboardInterrupt:
            pass
        elapsed = time.monotonic() - started
        drained = demo.drain()
        summary = demo.summary(drained, elapsed)
        if args.keep:
            (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print(f"lost: {summary['lost']}, mismatches: {len(summary['mismatches'])}, "
                  f"{summary['interrupts_per_second']:.0f} interrupts/s, service p99 "
                  f"{summary['service_p99_us']} us, unmask p99 {summary['unmask_p99_us']} us")
            for m in summary["mismatches"]:
                print(f"  mismatch: {m}")
        ok = summary["lost"] == 0 and not summary["mismatches"] and drained
        return 0 if ok else 1

