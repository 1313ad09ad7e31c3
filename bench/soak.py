"""A soak: eoid under paced load for a long while, with everything that happens to a daemon.

``python -m bench.soak --devices N --rate R --duration S`` starts a real ``eoid run`` under a
stand-in for systemd's fd store (``eoid.demo.Supervisor``), N sim devices answered by
``bench.run_eoid.SimStandIn`` and one control connection attached to all of them, and feeds
their real fds to the C load generator (``bench/pump.c --level``: paced, R interrupts/s in
total). Meanwhile, on a schedule:

- consumers detach and re-attach (by the ``detach`` op, and by closing a connection);
- the configuration reloads (SIGHUP) with a changed policy (``eoi_timeout``);
- ``status`` and ``/metrics`` are asked for, each within ``--liveness-timeout``: a daemon
  that does not answer is hung, and the soak fails;
- a misbehaving consumer (``--misbehave``, on by default) attaches to one more device, clears
  O_NONBLOCK on its copy of the irq eventfd and saturates its counter, then the device fires:
  eoid must keep answering and relaying the other devices; when the consumer behaves again
  the device must work again (issue 10, finding 3);
- in the first half, the daemon is SIGKILLed and restarted with its stored fds.

At the end the load stops and drains: every fire must have completed (fire -> irq -> EOI ->
unmask; a SIGKILL or a re-attach may legitimately repeat a step, which ``--level`` counts
apart). Then a clean round (no disruption, the strict pump) reconciles each device exactly:
fired = eoid's interrupts = forwards = EOIs = unmasks, no spurious EOI, no error. The
daemon's fd count and RSS are sampled from /proc throughout; after the last restart and a
warm-up, fds must stay flat and RSS growth is reported per hour (a linear fit).

Exit status 0 only with nothing lost, every count reconciled, no fd growth and no hang.
Timings are reported, never asserted beyond the liveness bounds: the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.run_baseline import ensure_nofile, launch_pump, parse_output
from bench.run_eoid import SimStandIn, device_yaml
from eoid.control import ControlClient, wait_for_socket
from eoid.demo import Samples, Supervisor, device_counter, scrape
from eoid.errors import ProtocolError
from eoid.systemd import close_all

SATURATE = 0xFFFFFFFFFFFFFFFE  # an eventfd's largest count: one more write would block
POLICIES = ("1s", "1500ms")  # eoi_timeout, alternated by each reload
SAMPLE_EVERY = 0.5  # seconds between samples of the daemon's RSS and fds
_START_TIMEOUT = 120.0
_DRAIN = 60.0  # the pump's bound for what is in flight after its window (exits sooner)
_RECONCILED = ("interrupts", "forwards", "eois", "unmasks")


class SoakFailure(Exception):
    """Something the soak checks for went wrong (the message says what)."""


@dataclass
class Options:
    devices: int = 64
    rate: int = 2000
    duration: float = 60.0
    misbehave: bool = True
    kills: int = 2
    churn_every: float = 2.0
    reload_every: float = 5.0
    misbehave_every: float = 10.0
    probe_every: float = 1.0
    scrape_every: float = 5.0
    liveness_timeout: float = 15.0
    warmup: float | None = None
    final_seconds: float = 3.0
    fd_tolerance: int = 1
    loop: str = "uvloop"
    keep: Path | None = None

    def warmup_seconds(self) -> float:
        return self.warmup if self.warmup is not None else max(5.0, 0.1 * self.duration)


# --- the figures -----------------------------------------------------------------------


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points; None with fewer than two distinct x."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


def fd_growth(counts: Sequence[int]) -> int:
    """How far the floor of the fd count rose: the least count of the last third minus
    that of the first. The floor, not the mean: a probe's or a scrape's connection may be
    open at any sample, a leak raises every sample."""
    if len(counts) < 3:
        return 0
    third = len(counts) // 3
    return min(counts[-third:]) - min(counts[:third])


@dataclass
class Sample:
    t: float  # seconds since the soak started
    pid: int
    rss_kb: int
    fds: int


def proc_sample(pid: int, t: float) -> Sample | None:
    """The daemon's VmRSS and open fds, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return Sample(t, pid, rss, fds)


def resources(samples: Sequence[Sample], since: float, fd_tolerance: int) -> dict[str, Any]:
    """RSS and fd trends over the samples at or after ``since`` (one daemon process)."""
    window = [s for s in samples if s.t >= since]
    out: dict[str, Any] = {"samples": len(window), "from_s": round(since, 1)}
    if not window:
        return out
    rss = slope([(s.t, s.rss_kb / 1024) for s in window])
    fds = slope([(s.t, s.fds) for s in window])
    counts = [s.fds for s in window]
    growth = fd_growth(counts)
    out.update({
        "seconds": round(window[-1].t - window[0].t, 1),
        "rss_mb_first": round(window[0].rss_kb / 1024, 1),
        "rss_mb_last": round(window[-1].rss_kb / 1024, 1),
        "rss_mb_max": round(max(s.rss_kb for s in window) / 1024, 1),
        "rss_growth_mb_per_hour": None if rss is None else round(rss * 3600, 2),
        "fds_first": counts[0], "fds_last": counts[-1], "fds_min": min(counts),
        "fds_max": max(counts), "fd_floor_growth": growth,
        "fd_trend_per_hour": None if fds is None else round(fds * 3600, 1),
        "fds_flat": growth <= fd_tolerance,
    })
    return out


# --- the daemon and its surroundings ---------------------------------------------------


@dataclass
class Harness:
    """``eoid run`` under the fd-store stand-in, its sim stand-in and its consumers."""

    opts: Options
    root: Path
    port: int = 0
    sim: SimStandIn | None = None
    supervisor: Supervisor | None = None
    proc: subprocess.Popen[bytes] | None = None
    client: ControlClient | None = None
    consumer_fds: dict[str, tuple[int, int]] = field(default_factory=dict)
    policy: int = 0
    probe_op: str = "status"  # its first page: bounded work whatever the devices

    @property
    def names(self) -> list[str]:
        return [f"d{i:04d}" for i in range(self.opts.devices)]

    @property
    def bad(self) -> str:
        return "bad0"

    @property
    def config(self) -> Path:
        return self.root / "eoid.yaml"

    @property
    def control(self) -> Path:
        return self.root / "control.sock"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def write_devices(self) -> None:
        """Every device file, with the current policy (a reload changes it)."""
        timeout = POLICIES[self.policy % len(POLICIES)]
        names = self.names + ([self.bad] if self.opts.misbehave else [])
        for i, name in enumerate(names):
            text = device_yaml(i).replace("policy: {", f"policy: {{eoi_timeout: {timeout}, ")
            (self.root / "devices.d" / f"{name}.yaml").write_text(text)

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        (self.root / "devices.d").mkdir(parents=True)
        self.config.write_text(
            f"control: {{socket: {self.control}}}\n"
            f"metrics: {{listen: '127.0.0.1:{self.port}'}}\n"
            f"sim: {{socket: {self.root}/sim.sock}}\n"
            f"log: {{format: json, level: info}}\nloop: {self.opts.loop}\n")
        self.write_devices()
        # here: the stand-in's 2 fds a device, the consumers' 2, the fd store's 4 and more
        ensure_nofile(10 * (self.opts.devices + 1) + 512)
        self.sim = SimStandIn(self.root / "sim.sock")
        self.supervisor = Supervisor()
        self.spawn()
        self.status()
        self.client = ControlClient(self.control, timeout=self.opts.liveness_timeout)
        for name in self.names:
            _, fds = self.client.request("attach", device=name)
            self.consumer_fds[name] = (fds[0], fds[1])
            close_all(fds[2:])

    def spawn(self) -> float:
        """Start (or restart) the daemon with the stored fds; seconds until it is ready."""
        assert self.supervisor is not None
        started = time.monotonic()
        with (self.root / "daemon.log").open("ab") as log:
            self.proc = self.supervisor.spawn(
                [sys.executable, "-m", "eoid.cli", "run", "-c", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc
        if not wait_for_socket(self.control, _START_TIMEOUT, lambda: proc.poll() is None):
            raise SoakFailure("eoid did not start:\n" + self.log_tail())
        deadline = started + _START_TIMEOUT
        while self.supervisor.state() != "ready":
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SoakFailure("eoid did not become ready:\n" + self.log_tail())
            time.sleep(0.02)
        return time.monotonic() - started

    def kill_and_restart(self) -> float:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        return self.spawn()

    def launch_pump(self, duration: float, *, drain: float,
                    pump_args: Sequence[str] = ()) -> subprocess.Popen[str]:
        """The paced pump on every loaded device's fds (the stand-in's taken as copies,
        ``SimStandIn.line_fds``, closed once the pump has its own)."""
        assert self.sim is not None
        lines = {n: self.sim.line_fds(n) for n in self.names}
        try:
            return launch_pump([(lines[n][0], *self.consumer_fds[n], lines[n][1])
                                for n in self.names], "paced", duration, self.opts.rate,
                               drain=drain, pump_args=pump_args)
        finally:
            close_all([fd for pair in lines.values() for fd in pair])

    def status(self) -> dict[str, Any]:
        with ControlClient(self.control, timeout=self.opts.liveness_timeout) as client:
            return client.status()

    def probe_control(self) -> None:
        with ControlClient(self.control, timeout=self.opts.liveness_timeout) as client:
            client.request(self.probe_op)

    def fetch_metrics(self) -> str:
        """The /metrics page, unparsed (what the liveness bound is about)."""
        with urllib.request.urlopen(self.url, timeout=self.opts.liveness_timeout) as response:
            return str(response.read().decode())

    def scrape(self) -> Samples:
        return scrape(self.url, timeout=self.opts.liveness_timeout)

    def log_tail(self) -> str:
        path = self.root / "daemon.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def log_levels(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        path = self.root / "daemon.log"
        for line in path.read_text(errors="replace").splitlines() if path.exists() else ():
            with contextlib.suppress(ValueError, AttributeError):
                level = str(json.loads(line).get("level"))
                counts[level] = counts.get(level, 0) + 1
        return counts

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.supervisor is not None:
            self.supervisor.close()
        if self.client is not None:
            self.client.close()
        for fds in self.consumer_fds.values():
            close_all(fds)
        self.consumer_fds.clear()
        if self.sim is not None:
            self.sim.close()


# --- what happens during the soak ------------------------------------------------------


class Prober(threading.Thread):
    """Asks for status and /metrics every ``probe_every``; a probe that fails or takes
    longer than the liveness bound (except while the daemon is deliberately restarted)
    means a hung daemon. A second thread samples the daemon's RSS and fds every
    ``SAMPLE_EVERY`` (a slow probe must not thin the samples out)."""

    def __init__(self, harness: Harness, started: float) -> None:
        super().__init__(name="soak-prober", daemon=True)
        self.harness = harness
        self.started = started
        self.lock = threading.Lock()  # held while probing; a restart holds it too
        self.stopping = threading.Event()
        self.hung: str | None = None
        self.probes = 0
        self.scrapes = 0
        self.status_max = 0.0
        self.metrics_max = 0.0
        self.samples: list[Sample] = []
        self.sample_lock = threading.Lock()  # held while sampling; a restart holds it too
        self._sampler = threading.Thread(target=self._sample, name="soak-sampler", daemon=True)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No probe and no sample meanwhile (a deliberate restart)."""
        with self.lock, self.sample_lock:
            yield

    def run(self) -> None:
        self._sampler.start()
        scrape_at = 0.0
        while not self.stopping.wait(self.harness.opts.probe_every):
            with self.lock:
                scrape = time.monotonic() >= scrape_at
                if scrape:
                    scrape_at = time.monotonic() + self.harness.opts.scrape_every
                self.probe(scrape)
            if self.hung:
                break
        self._sampler.join()

    def _sample(self) -> None:
        while not self.stopping.wait(SAMPLE_EVERY):
            with self.sample_lock:
                proc = self.harness.proc
                sample = None if proc is None else proc_sample(
                    proc.pid, time.monotonic() - self.started)
            if sample is not None:
                self.samples.append(sample)

    def probe(self, scrape: bool = True) -> None:
        """Ask for status (or hello); and read /metrics if ``scrape``."""
        bound = self.harness.opts.liveness_timeout
        at = time.monotonic() - self.started
        try:
            t0 = time.monotonic()
            self.harness.probe_control()
            t1 = time.monotonic()
            if scrape:  # not parsed: parsing is the soak's time, not eoid's
                self.harness.fetch_metrics()
                self.scrapes += 1
            t2 = time.monotonic()
        except Exception as e:  # any failure to answer is the finding
            proc = self.harness.proc
            died = "" if proc is None or proc.poll() is None else \
                f" (it exited with status {proc.returncode})"
            self.hung = f"at {at:.1f}s the daemon did not answer{died}: " \
                f"{type(e).__name__}: {e}"
            return
        self.status_max = max(self.status_max, t1 - t0)
        self.metrics_max = max(self.metrics_max, t2 - t1)
        if t1 - t0 > bound or t2 - t1 > bound:
            self.hung = (f"at {at:.1f}s status took {t1 - t0:.1f}s and /metrics {t2 - t1:.1f}s "
                         f"(bound {bound:g}s)")
            return
        self.probes += 1


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _read_count(fd: int) -> int:
    return int.from_bytes(os.read(fd, 8), sys.byteorder)


class Soak:
    """The schedule, its bookkeeping and the checks at the end."""

    def __init__(self, opts: Options, root: Path) -> None:
        self.opts = opts
        self.h = Harness(opts, root)
        self.failures: list[str] = []
        self.events = {"kills": 0, "reloads": 0, "detaches": 0, "misbehaviour_episodes": 0}
        # how the interrupt that fired into the full counter came back: forwarded once the
        # consumer behaved ("irq"), or given up by eoid and re-armed on eoi_timeout ("unmask")
        self.misbehaviour_outcomes = {"irq": 0, "unmask": 0}
        self.restart_seconds: list[float] = []
        self.last_restart = 0.0
        self.started = 0.0
        self.prober: Prober | None = None
        self.pump: subprocess.Popen[str] | None = None
        self._churn = 0

    def now(self) -> float:
        return time.monotonic() - self.started

    # -- the schedule --

    def run(self) -> dict[str, Any]:
        opts, h = self.opts, self.h
        h.start()
        self.started = time.monotonic()
        self.prober = Prober(h, self.started)
        self.prober.start()
        self.pump = h.launch_pump(opts.duration, drain=_DRAIN, pump_args=("--level",))
        kill_at = [opts.duration * (i + 1) / (2 * opts.kills + 2) for i in range(opts.kills)]
        due = {"churn": opts.churn_every, "reload": opts.reload_every,
               "misbehave": opts.misbehave_every / 2}
        actions: dict[str, Callable[[], None]] = {
            "churn": self.churn, "reload": self.reload, "misbehave": self.misbehave}
        every = {"churn": opts.churn_every, "reload": opts.reload_every,
                 "misbehave": opts.misbehave_every}
        if not opts.misbehave:
            del due["misbehave"]
        try:
            while self.now() < opts.duration - 1.0 and self.ok_so_far():
                if kill_at and self.now() >= kill_at[0]:
                    kill_at.pop(0)
                    self.kill()
                    continue
                name = min(due, key=due.__getitem__)
                if due[name] > self.now():
                    time.sleep(min(0.05, due[name] - self.now()))
                    continue
                actions[name]()
                due[name] = self.now() + every[name]
        except SoakFailure as e:
            self.failures.append(str(e))
        return self.finish()

    def ok_so_far(self) -> bool:
        assert self.prober is not None and self.pump is not None
        if self.prober.hung:
            return False
        return self.pump.poll() is None

    def kill(self) -> None:
        assert self.prober is not None
        with self.prober.paused():
            self.restart_seconds.append(self.h.kill_and_restart())
        self.events["kills"] += 1
        self.last_restart = self.now()

    def churn(self) -> None:
        """Detach a few consumers and attach them again: half by the ``detach`` op, half
        through a second connection that attaches them and then just closes."""
        h = self.h
        assert h.client is not None
        count = max(2, len(h.names) // 16)
        picked = [h.names[(self._churn + i) % len(h.names)] for i in range(count)]
        self._churn += count
        by_op, by_close = picked[: count // 2], picked[count // 2:]
        with ControlClient(h.control, timeout=self.opts.liveness_timeout) as other:
            for name in picked:
                h.client.request("detach", device=name)
            for name in by_close:
                close_all(other.request("attach", device=name)[1])
        for name in picked:  # the second connection is gone: those are free again
            close_all(self._attach_again(name))
        self.events["detaches"] += len(by_op) + len(by_close)

    def _attach_again(self, name: str) -> list[int]:
        """Attach on the main connection; a device whose closed connection eoid has not
        yet noticed is ``busy`` for a moment."""
        assert self.h.client is not None
        deadline = time.monotonic() + self.opts.liveness_timeout
        while True:
            try:
                return self.h.client.request("attach", device=name)[1]
            except ProtocolError as e:
                if e.code != "busy" or time.monotonic() > deadline:
                    raise SoakFailure(f"re-attaching {name} failed: {e}") from e
                time.sleep(0.01)

    def reload(self) -> None:
        """SIGHUP with the other policy; wait for the daemon's READY=1 after RELOADING=1
        (what systemd sees; no /metrics page to format) and check that it took."""
        h = self.h
        assert h.proc is not None and h.supervisor is not None
        messages = h.supervisor.systemd.messages  # appended to by the supervisor's thread
        seen = len(messages)
        h.policy += 1
        h.write_devices()
        h.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + self.opts.liveness_timeout
        reloading = False
        while True:
            while seen < len(messages):
                m = messages[seen]
                seen += 1
                reloading = reloading or m.get("RELOADING") == "1"
                if reloading and m.get("READY") == "1":
                    if "reload failed" in (m.get("STATUS") or ""):
                        raise SoakFailure(f"a reload failed: {m.get('STATUS')}")
                    self.events["reloads"] += 1
                    return
            if time.monotonic() > deadline:
                raise SoakFailure("a reload was not applied within the liveness bound")
            time.sleep(0.02)

    def misbehave(self) -> None:
        """Issue 10, finding 3: a consumer clears O_NONBLOCK on its irq eventfd and fills
        its counter, then its device fires. eoid must keep answering meanwhile (the prober
        is the judge) and the device must work again once the consumer behaves."""
        h, bound = self.h, self.opts.liveness_timeout
        assert h.sim is not None and self.prober is not None
        with ControlClient(h.control, timeout=bound) as consumer:
            fds = [*consumer.request("attach", device=h.bad)[1], *h.sim.line_fds(h.bad)]
            irq, eoi, trigger, unmask = fds[0], fds[1], fds[-2], fds[-1]
            with contextlib.suppress(BlockingIOError):
                _read_count(unmask)  # an unmask from before the episode is not its outcome
            flags = fcntl.fcntl(irq, fcntl.F_GETFL)
            try:
                fcntl.fcntl(irq, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
                os.write(irq, SATURATE.to_bytes(8, sys.byteorder))
                os.eventfd_write(trigger, 1)
                # eoid must answer twice while the counter is full (or the prober says hung)
                probes = self.prober.probes
                deadline = time.monotonic() + 3 * bound
                while self.prober.probes < probes + 2 and not self.prober.hung:
                    if time.monotonic() > deadline:
                        raise SoakFailure("the prober stalled during a misbehaving consumer")
                    time.sleep(0.05)
            finally:
                # behave again (also on the way out: a daemon blocked on the counter is
                # freed): empty the counter, O_NONBLOCK back
                _read_count(irq)
                fcntl.fcntl(irq, fcntl.F_SETFL, flags)
            try:
                if not self.prober.hung:
                    self._round_trip(irq, eoi, trigger, unmask, fired=False)
                    self._round_trip(irq, eoi, trigger, unmask, fired=True)
            finally:
                close_all(fds)
        self.events["misbehaviour_episodes"] += 1

    def _round_trip(self, irq: int, eoi: int, trigger: int, unmask: int, *,
                    fired: bool) -> None:
        """Fire (unless the device already did), take the irq and EOI it, see the unmask.
        The interrupt that fired into the full counter may come as an irq or (if eoid gave
        it up and its eoi_timeout passed) just as the unmask."""
        bound, bad = self.opts.liveness_timeout, self.h.bad
        if fired:
            os.eventfd_write(trigger, 1)
        deadline = time.monotonic() + bound
        while True:
            if _readable(irq, 0.05):
                _read_count(irq)
                os.eventfd_write(eoi, 1)
                if not fired:
                    self.misbehaviour_outcomes["irq"] += 1
                break
            if not fired and _readable(unmask, 0):
                self.misbehaviour_outcomes["unmask"] += 1
                break
            if time.monotonic() > deadline:
                raise SoakFailure(f"{bad}: no interrupt reached its consumer after it behaved")
        if not _readable(unmask, bound):
            raise SoakFailure(f"{bad}: its line was not unmasked after the EOI")
        _read_count(unmask)

    # -- the end --

    def finish(self) -> dict[str, Any]:
        assert self.prober is not None and self.pump is not None
        h, opts = self.h, self.opts
        hung = self.prober.hung
        load: dict[str, Any] = {}
        if hung:
            self.pump.terminate()
        try:
            out, _ = self.pump.communicate(timeout=opts.duration + _DRAIN + 60)
            load = parse_output("pump", self.pump, out)
        except (subprocess.TimeoutExpired, RuntimeError) as e:
            self.pump.kill()
            self.pump.wait()
            self.failures.append(f"the load generator did not finish: {e}")
        self.prober.stopping.set()
        self.prober.join(opts.liveness_timeout * 2 + 5)
        hung = hung or self.prober.hung
        if hung:
            self.failures.append(f"hung: {hung}")
        if load and not load.get("ok"):
            self.failures.append(f"the load lost interrupts: fired {load['fired']}, "
                                 f"completed {load['completed']}, in flight "
                                 f"{load['in_flight']}, unexpected {load['unexpected']}, "
                                 f"errors {load['errors']}")
        final: dict[str, Any] = {}
        if not hung and not self.failures:
            try:
                final = self.final_round()
            except SoakFailure as e:
                self.failures.append(str(e))
        since = max(self.last_restart + opts.warmup_seconds(),
                    opts.warmup_seconds())
        res = resources(self.prober.samples, since, opts.fd_tolerance)
        if res["samples"] < 3:
            if not hung:
                self.failures.append(f"too few samples after warm-up to judge fds and RSS: "
                                     f"{res['samples']}; run longer or warm up less")
        elif not res["fds_flat"]:
            self.failures.append(f"the daemon's fds grew: floor +{res['fd_floor_growth']} "
                                 f"({res['fds_first']} -> {res['fds_last']})")
        return {
            "ok": not self.failures, "failures": self.failures,
            "devices": opts.devices, "rate": opts.rate, "duration_s": opts.duration,
            "misbehave": opts.misbehave, "loop": opts.loop,
            "events": {**self.events, "probes": self.prober.probes,
                       "scrapes": self.prober.scrapes,
                       "misbehaviour_outcomes": self.misbehaviour_outcomes,
                       "churn_every_s": opts.churn_every, "reload_every_s": opts.reload_every},
            "load": {k: load.get(k) for k in (
                "fired", "completed", "lost", "in_flight", "skipped", "refires",
                "stray_unmasks", "redelivered", "unexpected", "errors", "rate_achieved",
                "p50_us", "p99_us", "max_us")},
            "final_round": final,
            "liveness": {"bound_s": opts.liveness_timeout, "hung": hung,
                         "control_probe": h.probe_op,
                         "status_max_s": round(self.prober.status_max, 3),
                         "metrics_max_s": round(self.prober.metrics_max, 3),
                         "restart_s": [round(s, 2) for s in self.restart_seconds]},
            "resources": res,
            "daemon_log_levels": h.log_levels(),
        }

    def final_round(self) -> dict[str, Any]:
        """Quiet first (every device armed with its consumer), then a clean strict round
        whose counts must agree exactly, device by device."""
        h, opts = self.h, self.opts
        deadline = time.monotonic() + opts.liveness_timeout
        while True:
            samples = h.scrape()
            armed = samples.get("eoid_device_state", {})
            attached = samples.get("eoid_consumer_attached", {})
            loose = [n for n in h.names if not armed.get((("device", n), ("state", "armed")))
                     or not attached.get((("device", n),))]
            if not loose:
                break
            if time.monotonic() > deadline:
                raise SoakFailure(f"not armed with a consumer after the load: {loose[:8]}")
            time.sleep(0.1)
        before = h.scrape()
        pump = h.launch_pump(opts.final_seconds, drain=10.0)
        out, _ = pump.communicate(timeout=opts.final_seconds + 60)
        load = parse_output("pump", pump, out)
        after = h.scrape()
        mismatches = []
        delta: dict[str, int] = {}
        for name in h.names:
            got = {k: device_counter(after, f"eoid_{k}_total", name)
                   - device_counter(before, f"eoid_{k}_total", name)
                   for k in (*_RECONCILED, "spurious_eois", "coalesced_interrupts")}
            for k, v in got.items():
                delta[k] = delta.get(k, 0) + v
            if len({got[k] for k in _RECONCILED}) != 1 or got["spurious_eois"]:
                mismatches.append(f"{name}: {got}")
            errors = {dict(k).get("op"): v for k, v in after.get("eoid_errors_total", {}).items()
                      if dict(k).get("device") == name and v}
            if errors:
                mismatches.append(f"{name}: errors {errors}")
        if pump.returncode != 0:
            mismatches.append(f"the strict round lost interrupts: {load}")
        if delta.get("interrupts") != load["fired"]:
            mismatches.append(f"fired {load['fired']} != eoid's interrupts "
                              f"{delta.get('interrupts')}")
        if mismatches:
            raise SoakFailure("the final round does not reconcile: " + "; ".join(mismatches[:8]))
        return {"seconds": opts.final_seconds, "fired": load["fired"], **delta,
                "p50_us": load["p50_us"], "p99_us": load["p99_us"]}


def soak(opts: Options) -> dict[str, Any]:
    """Run one soak; the summary (``ok`` and ``failures`` say whether it passed)."""
    if opts.devices < 1 or opts.rate < 1 or opts.duration < 10:
        raise ValueError("need at least 1 device, a rate of 1/s and 10 s")
    with contextlib.ExitStack() as stack:
        if opts.keep is not None:
            opts.keep.mkdir(parents=True, exist_ok=True)
            root = Path(tempfile.mkdtemp(prefix="soak-", dir=opts.keep))
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="eoid-soak-",
                                                                        dir="/tmp")))
        s = Soak(opts, root)
        stack.callback(s.h.stop)
        t0 = time.monotonic()
        try:
            summary = s.run()
        except SoakFailure as e:
            summary = {"ok": False, "failures": [str(e)]}
        summary["wall_s"] = round(time.monotonic() - t0, 1)
        if opts.keep is not None:
            summary["kept"] = str(root)
        return summary


def render(summary: dict[str, Any]) -> str:
    """The human summary."""
    if "load" not in summary:
        return "soak FAILED: " + "; ".join(summary["failures"])
    load, final, ev = summary["load"], summary["final_round"], summary["events"]
    live, res = summary["liveness"], summary["resources"]
    lines = [
        f"soak: {summary['devices']} devices, {summary['rate']}/s paced, "
        f"{summary['duration_s']:g} s ({summary['wall_s']} s wall), misbehaving consumer "
        f"{'on' if summary['misbehave'] else 'off'}",
        f"  load: fired {load['fired']}, completed {load['completed']}, lost {load['lost']}, "
        f"skipped slots {load['skipped']}, {load['rate_achieved']}/s; round trip p50 "
        f"{load['p50_us']} us, p99 {load['p99_us']} us, max {load['max_us']} us",
        f"  repeated steps (legitimate after a SIGKILL or re-attach): refires "
        f"{load['refires']}, stray unmasks {load['stray_unmasks']}, redelivered "
        f"{load['redelivered']}",
        f"  events: {ev['kills']} SIGKILL+restart (ready in {live['restart_s']} s), "
        f"{ev['reloads']} reloads, {ev['detaches']} detaches, "
        f"{ev['misbehaviour_episodes']} misbehaving-consumer episodes "
        f"{ev['misbehaviour_outcomes']}, {ev['probes']} "
        f"{live['control_probe']} probes and {ev['scrapes']} /metrics scrapes (slowest "
        f"{live['status_max_s']} s / {live['metrics_max_s']} s, bound {live['bound_s']:g} s)",
    ]
    if final:
        lines.append(f"  final clean round: fired {final['fired']} = interrupts "
                     f"{final['interrupts']} = forwards {final['forwards']} = EOIs "
                     f"{final['eois']} = unmasks {final['unmasks']}; spurious "
                     f"{final['spurious_eois']}")
    if res.get("samples"):
        lines.append(
            f"  after warm-up ({res['samples']} samples from {res['from_s']} s over "
            f"{res.get('seconds')} s): RSS {res['rss_mb_first']} -> {res['rss_mb_last']} MB, "
            f"growth {res['rss_growth_mb_per_hour']} MB/h (linear fit); fds "
            f"{res['fds_first']} -> {res['fds_last']} (min {res['fds_min']}, max "
            f"{res['fds_max']}), floor growth {res['fd_floor_growth']}, trend "
            f"{res['fd_trend_per_hour']}/h")
    lines.append(f"  daemon log levels: {summary['daemon_log_levels']}")
    lines.append("soak OK" if summary["ok"] else
                 "soak FAILED:\n" + "\n".join(f"  - {f}" for f in summary["failures"]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=Options.devices)
    p.add_argument("--rate", type=int, default=Options.rate, help="interrupts/s in total")
    p.add_argument("--duration", type=float, default=Options.duration, help="seconds of load")
    p.add_argument("--misbehave", action=argparse.BooleanOptionalAction,
                   default=True, help="the consumer of issue 10 finding 3 (default: on)")
    p.add_argument("--kills", type=int, default=Options.kills,
                   help="SIGKILL+restarts, spread over the first half")
    p.add_argument("--churn-every", type=float, default=Options.churn_every)
    p.add_argument("--reload-every", type=float, default=Options.reload_every)
    p.add_argument("--misbehave-every", type=float, default=Options.misbehave_every)
    p.add_argument("--scrape-every", type=float, default=Options.scrape_every,
                   help="seconds between /metrics scrapes (status is asked every second)")
    p.add_argument("--liveness-timeout", type=float, default=Options.liveness_timeout,
                   help="seconds status and /metrics may take before the daemon counts as hung")
    p.add_argument("--warmup", type=float,
                   help="seconds after the last restart before fds/RSS must be flat "
                        "(default: 10%% of the duration, at least 5)")
    p.add_argument("--fd-tolerance", type=int, default=Options.fd_tolerance)
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--keep", type=Path, help="keep the run's directory (config, logs) here")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    a = p.parse_args(argv)
    opts = Options(devices=a.devices, rate=a.rate, duration=a.duration, misbehave=a.misbehave,
                   kills=a.kills, churn_every=a.churn_every, reload_every=a.reload_every,
                   misbehave_every=a.misbehave_every, scrape_every=a.scrape_every,
                   liveness_timeout=a.liveness_timeout,
                   warmup=a.warmup, fd_tolerance=a.fd_tolerance, loop=a.loop, keep=a.keep)
    # a SIGTERM (e.g. timeout(1)) unwinds like Ctrl-C: the daemon and the pump are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    summary = soak(opts)
    print(json.dumps(summary, indent=2) if a.json else render(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
