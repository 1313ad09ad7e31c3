"""Run the C baseline relay under the C pump: the floor eoid's CPU cost is compared to.

``baseline`` is a single-threaded epoll program doing exactly eoid's syscalls per
interrupt (read trigger, write irq; read eoi, write unmask), so its CPU time per
interrupt is what any userspace relay on the same eventfd contract costs at
best. ``pump`` plays the kernel, the guest and the simulated device on the other
side of the same eventfds, and measures the fire -> unmask round trip.

``launch_pump`` is the reusable half: hand it the four fds of each device, from
wherever they came (here eventfds made on the spot; for eoid, the trigger and
unmask fds its sim backend sends and the irq and eoi fds of the attach reply).

Where the two processes run decides the numbers more than anything else on a
small VM, so it is a parameter (``placement``):
- ``same`` (default): both on one CPU. Every eventfd write wakes its reader on
  the same CPU, so the relay's CPU time is its own work, not the cross-CPU
  wakeups (IPIs) and cache-line bouncing that the pump's sleeping side would
  add; the steadiest figure, and the one to compare relays by. Throughput is
  that of one CPU shared by both.
- ``split``: relay on one CPU, pump on another: more throughput, and each
  write that wakes the other side pays a cross-CPU wakeup. The pump, having a
  CPU of its own, could poll rather than sleep when its next fire is near
  (``pump_args=["--spin-us", "50"]``) to keep up at 100k/s; that is left to
  the caller so that every relay compared meets the same pump.
- ``none``: wherever the scheduler puts them (varies run to run).

    python -m bench.run_baseline --devices 64 --mode closed --duration 3
    python -m bench.run_baseline --devices 1024 --mode paced --rate 50000 --repeat 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, TextIO

from bench._cbuild import build

MODES = ("closed", "paced")
PLACEMENTS = ("same", "split", "none")
# Longer fd lists go through a memfd: one argv string may not exceed 128 KiB,
# which 4096 devices' worth of five-digit fd numbers comes close to.
_INLINE_SPEC_MAX = 32 * 1024
_READY_TIMEOUT = 30.0
_EXIT_TIMEOUT = 30.0


class FdQuad(NamedTuple):
    """One device's eventfds, named for the daemon's side of each."""

    trigger: int
    irq: int
    eoi: int
    unmask: int


def fd_spec(quads: Iterable[Sequence[int]]) -> str:
    """The ``trigger,irq,eoi,unmask;...`` list both C programs read."""
    return ";".join(",".join(str(fd) for fd in quad) for quad in quads)


def ensure_nofile(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            try:  # root may raise the hard limit too (up to fs.nr_open)
                resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
                return
            except (ValueError, OSError) as e:
                raise OSError(f"need {needed} open files but RLIMIT_NOFILE's hard limit is "
                              f"{hard}") from e
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _spawn(
    prog: str,
    args: list[str],
    quads: Sequence[Sequence[int]],
    *,
    extra_fds: Sequence[int] = (),
    stdin: int | None = None,
    cpu: int | None = None,
) -> subprocess.Popen[str]:
    spec = fd_spec(quads)
    pass_fds = [fd for quad in quads for fd in quad if fd >= 0] + list(extra_fds)
    memfd = -1
    if len(spec) <= _INLINE_SPEC_MAX:
        fd_args = ["--fds", spec]
    else:
        memfd = os.memfd_create("eoid-bench-fds", os.MFD_CLOEXEC)
        data = spec.encode()
        while data:
            data = data[os.write(memfd, data) :]
        fd_args = ["--fds-from", str(memfd)]
        pass_fds.append(memfd)
    try:
        # "py-uvloop"/"py-asyncio": the minimal Python relay (bench/pyrelay.py)
        command = ([sys.executable, "-m", "bench.pyrelay", "--loop", prog[3:]]
                   if prog.startswith("py-") else [str(build(prog))])
        proc = subprocess.Popen(
            [*command, *fd_args, *args],
            pass_fds=pass_fds,
            stdin=stdin,
            stdout=subprocess.PIPE,
            text=True,
        )
    finally:
        if memfd >= 0:
            os.close(memfd)
    if cpu is not None:
        # Pinned once started rather than in a preexec_fn (which is unsafe in a
        # threaded caller): what runs before this is set-up, not measured. A
        # child already gone is reported by its exit status.
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(proc.pid, {cpu})
    return proc


def placement_cpus(placement: str) -> tuple[int | None, int | None]:
    """The (relay, pump) CPUs for a placement (see the module docstring)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, not {placement!r}")
    if placement == "none":
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if placement == "same":
        return cpus[0], cpus[0]
    if len(cpus) < 2:
        raise ValueError("placement 'split' needs two CPUs")
    return cpus[0], cpus[1]


def _check_mode(mode: str, rate: int | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    if (mode == "paced") != (rate is not None):
        raise ValueError("rate is required with mode 'paced' and only allowed with it")


def launch_pump(
    fd_quads: Sequence[Sequence[int]],
    mode: str,
    duration: float,
    rate: int | None,
    *,
    drain: float = 1.0,
    pump_args: Sequence[str] = (),
    cpu: int | None = None,
    extra_fds: Sequence[int] = (),
) -> subprocess.Popen[str]:
    """Start the load generator on the given devices' fds; its stdout is a pipe.

    Each quad is (trigger, irq, eoi, unmask) as the relay sees them (see
    ``FdQuad``), optionally with a fifth, the virqfd bound on the kernel's path
    (-1: none); the pump writes trigger and eoi and reads irq and unmask. It
    prints one JSON line when done (``parse_output``) and exits 1 if any
    interrupt was lost. ``pump_args`` are passed on (e.g. ``--spin-us``, or
    ``--routes FD`` with that fd in ``extra_fds``); ``cpu`` pins the pump (pin
    the relay alike, see ``placement_cpus``).
    """
    _check_mode(mode, rate)
    args = ["--mode", mode, "--duration", str(duration), "--drain", str(drain)]
    if rate is not None:
        args += ["--rate", str(rate)]
    return _spawn("pump", [*args, *pump_args], fd_quads, cpu=cpu, extra_fds=extra_fds)


def parse_output(name: str, proc: subprocess.Popen[str], out: str) -> dict[str, Any]:
    """The JSON line a finished C program printed last."""
    lines = out.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{name} printed nothing (exit status {proc.returncode})")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def process_cpu_us(pid: int) -> float:
    """CPU (user + system, all threads) used by process ``pid``, in microseconds.

    For a daemon that is not our child (eoid): sample before and after a run.
    /proc's resolution is one clock tick (10 ms), fine over a run of seconds.
    """
    with open(f"/proc/{pid}/stat") as f:
        # comm, field 2, may hold spaces and ')': split after its last ')'.
        fields = f.read().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) * 1e6 / os.sysconf("SC_CLK_TCK")


def process_cpu_ns(pid: int) -> int:
    """CPU process ``pid``'s live threads have run, in nanoseconds (schedstat: exact,
    where ``process_cpu_us`` counts clock ticks; for the small figures of the kernel's
    datapath). A thread that has exited is not counted: eoid's threads live as long."""
    return sum(thread_cpu_ns(pid).values())


def _per_thread(pid: int, file: str, read: Callable[[TextIO], int | None]) -> dict[str, int]:
    """``read`` of /proc/PID/task/*/``file`` for each live thread, by ``tid:name``."""
    out: dict[str, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{task}/{file}") as f:
                value = read(f)
            if value is not None:
                out[f"{task}:{name}"] = value
    return out


def thread_cpu_ns(pid: int) -> dict[str, int]:
    """``process_cpu_ns`` by thread (``tid:name``)."""
    return _per_thread(pid, "schedstat", lambda f: int(f.read().split()[0]))


def voluntary_switches(pid: int) -> dict[str, int]:
    """Each live thread's voluntary context switches (its wake-ups after sleeping), by
    thread id and name: /proc/PID/task/*/status (/proc/PID/status is the main thread's)."""
    return _per_thread(pid, "status", lambda f: next(
        (int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches:")),
        None))


def _machine_busy_s() -> float:
    """Non-idle CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    # guest and guest_nice (from field 9 on) are already counted in user.
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _wait_ready(fd: int, proc: subprocess.Popen[str], timeout: float) -> None:
    # poll, not select: with thousands of devices this fd is above FD_SETSIZE.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise TimeoutError(f"baseline not ready after {timeout} s")
    if not os.read(fd, 1):
        raise RuntimeError(f"baseline exited before it was ready (status {proc.wait()})")


def run_baseline(
    devices: int,
    mode: str,
    duration: float,
    rate: int | None = None,
    *,
    drain: float = 1.0,
    pump_args: Sequence[str] = (),
    placement: str = "same",
    relay: str = "baseline",
) -> dict[str, Any]:
    """Relay ``devices`` devices' interrupts with the C baseline under the pump's load.

    ``relay="py-uvloop"`` or ``"py-asyncio"`` runs bench/pyrelay.py instead: the same
    syscalls from the smallest possible Python event-loop program.

    Returns both programs' JSON (``baseline``, ``pump``), ``ok`` (both exited
    0: nothing lost), ``interrupts`` and ``cpu_us_per_interrupt``: the
    baseline's CPU time in its loop divided by the interrupts it forwarded.
    """
    if devices < 1:
        raise ValueError("devices must be at least 1")
    _check_mode(mode, rate)
    relay_cpu, pump_cpu = placement_cpus(placement)
    # Each process holds all 4 fds of every device, plus a few of its own.
    ensure_nofile(4 * devices + 64)
    fds: list[int] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        for _ in range(4 * devices):
            fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        quads = [FdQuad(*fds[i : i + 4]) for i in range(0, len(fds), 4)]

        # Start the load only once the baseline has registered every fd, so
        # no latency sample includes its start-up.
        ready_r, ready_w = os.pipe()
        try:
            baseline = _spawn(
                relay,
                ["--ready-fd", str(ready_w)],
                quads,
                extra_fds=[ready_w],
                stdin=subprocess.PIPE,
                cpu=relay_cpu,
            )
            procs.append(baseline)
            os.close(ready_w)
            ready_w = -1
            _wait_ready(ready_r, baseline, _READY_TIMEOUT)
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)

        busy0 = _machine_busy_s()
        pump = launch_pump(
            quads, mode, duration, rate, drain=drain, pump_args=pump_args, cpu=pump_cpu
        )
        procs.append(pump)
        pump_out, _ = pump.communicate(timeout=duration + drain + _EXIT_TIMEOUT)
        # Closing its stdin (communicate does) is the baseline's stop signal.
        base_out, _ = baseline.communicate(timeout=_EXIT_TIMEOUT)
        busy = _machine_busy_s() - busy0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for fd in fds:
            os.close(fd)

    base = parse_output("baseline", baseline, base_out)
    load = parse_output("pump", pump, pump_out)
    interrupts: int = base["trigger_reads"]
    ours = (base["cpu_us"] + load["cpu_us"]) / 1e6
    return {
        "devices": devices,
        "mode": mode,
        "rate": rate,
        "duration": duration,
        "placement": placement,
        "ok": baseline.returncode == 0 and pump.returncode == 0,
        "interrupts": interrupts,
        "cpu_us_per_interrupt": base["cpu_us"] / interrupts if interrupts else None,
        # CPU the rest of the machine used meanwhile: a run with much of it
        # was disturbed and is worth repeating.
        "background_cpu_s": round(max(busy - ours, 0.0), 2),
        "baseline": base,
        "pump": load,
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(values: Iterable[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    return {
        "summary": {
            "runs": len(runs),
            "devices": runs[0]["devices"],
            "mode": runs[0]["mode"],
            "rate": runs[0]["rate"],
            "placement": runs[0]["placement"],
            "cpu_us_per_interrupt_median": median(r["cpu_us_per_interrupt"] for r in runs),
            "interrupts_per_s_median": median(r["pump"]["rate_achieved"] for r in runs),
            "skipped_median": median(r["pump"]["skipped"] for r in runs),
            "p50_us_median": median(r["pump"]["p50_us"] for r in runs),
            "p99_us_median": median(r["pump"]["p99_us"] for r in runs),
            "p999_us_median": median(r["pump"]["p999_us"] for r in runs),
            "background_cpu_s_max": max(r["background_cpu_s"] for r in runs),
            "ok": all(r["ok"] for r in runs),
        }
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run_baseline",
        description="CPU cost per interrupt of the C baseline relay under the C pump.",
    )
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--mode", choices=MODES, default="closed")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of load")
    parser.add_argument("--rate", type=int, help="total interrupts/s (paced mode)")
    parser.add_argument("--drain", type=float, default=1.0, help="seconds to wait for in-flight")
    parser.add_argument(
        "--placement", choices=PLACEMENTS, default="same", help="CPUs of relay and pump"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs; >1 adds a median summary")
    parser.add_argument(
        "--pump-arg", action="append", default=[], help="extra pump option (repeatable)"
    )
    args = parser.parse_args(argv)
    if (args.mode == "paced") != (args.rate is not None):
        parser.error("--rate is required with --mode paced and only allowed with it")

    runs = []
    for _ in range(args.repeat):
        result = run_baseline(
            args.devices,
            args.mode,
            args.duration,
            args.rate,
            drain=args.drain,
            pump_args=args.pump_arg,
            placement=args.placement,
        )
        print(json.dumps(result), flush=True)
        runs.append(result)
    if args.repeat > 1:
        print(json.dumps(_summary(runs)), flush=True)
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
