"""``python -m bench``: eoid against the best a userspace relay can do, in one run.

For each scenario the C baseline (bench/baseline.c) and eoid run under the same C load
generator (bench/pump.c), one after the other on the same pinned CPU, so the ratio of
their CPU time per interrupt is measured in one run on one machine. Closed-loop scenarios
also run the smallest possible Python relay (bench/pyrelay.py) to show the event loop's
own floor. Every run checks that nothing was lost.

    python -m bench            # the full matrix, a few minutes
    python -m bench --quick    # under a minute (CI's smoke run; asserts no timings)
    python -m bench --json     # one JSON object for machines
    python -m bench --repeat 3 # medians of three runs of the matrix
    python -m bench --datapath-only  # relay vs the kernel's path, observation windows

The datapath comparison (also part of the full run; --quick runs a small kernel-mode
smoke) runs eoid under the same paced load on each datapath, one daemon after the other:
relay, kernel, and kernel with sampled observation, and reports eoid's CPU and voluntary
context switches (wake-ups) per interrupt and what an observation window costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
from dataclasses import dataclass
from typing import Any

from bench.run_baseline import ensure_nofile, placement_cpus, run_baseline
from bench.run_eoid import idle_cpu_percent, measure, running
from eoid.config import parse_duration

# The most any one process of a run holds per device: 4. eoid holds its three eventfds and
# the sim unmask eventfd (one sim connection for all); this process the sim stand-in's
# trigger and unmask and the consumer's irq and eoi while eoid runs, or the baseline's
# four eventfds before it starts; the pump and the C relay 4 each.
FDS_PER_DEVICE = 4


@dataclass(frozen=True)
class Scenario:
    devices: int
    loop: str
    mode: str
    rate: int | None = None
    polling: bool = False
    """The pump polls on the other CPU instead of sleeping on the relay's, so the relay's
    writes wake nobody, as a real VFIO unmask ioctl or KVM irqfd write does not. On a
    shared CPU every write wakes the pump, which can preempt the relay inside it: fine
    for comparing CPU cost, but it inflates in-daemon latencies."""

    @property
    def name(self) -> str:
        load = "closed" if self.rate is None else f"paced {self.rate // 1000}k/s"
        return f"{self.devices} dev, {self.loop}, {load}" + (", polling pump" * self.polling)

    @property
    def pump_args(self) -> tuple[str, ...]:
        return ("--spin-us", str(10**9)) if self.polling else ()


def matrix(quick: bool) -> list[Scenario]:
    if quick:
        return [Scenario(1, "uvloop", "closed"), Scenario(64, "uvloop", "closed"),
                Scenario(64, "asyncio", "closed"), Scenario(64, "uvloop", "paced", 10_000),
                Scenario(64, "uvloop", "paced", 10_000, polling=True)]
    out = [Scenario(n, loop, "closed") for n in (1, 64, 1024, 4096)
           for loop in ("uvloop", "asyncio")]
    out += [Scenario(1024, "uvloop", "paced", r) for r in (10_000, 50_000, 100_000)]
    out += [Scenario(1024, "uvloop", "paced", 10_000, polling=True)]
    out += [Scenario(1024, "asyncio", "paced", 10_000)]
    return out


@dataclass(frozen=True)
class PathRun:
    """eoid on one datapath (with sampled observation ``observe`` = (every, for))."""

    devices: int
    rate: int
    datapath: str
    observe: tuple[str, str] | None = None

    @property
    def name(self) -> str:
        path = self.datapath + (f", observe {self.observe[1]}/{self.observe[0]}"
                                if self.observe else "")
        return f"{self.devices} dev, paced {self.rate // 1000}k/s, {path}"


def datapath_matrix(quick: bool, observe: list[tuple[str, str]]) -> list[list[PathRun]]:
    """Groups of runs under the same load, relay first: each group's figures are compared
    to its relay run. --quick: a smoke of the kernel's path, with and without observation
    windows switching the lines under load (checked for loss, not timed)."""
    if quick:
        return [[PathRun(64, 10_000, "relay"), PathRun(64, 10_000, "kernel"),
                 PathRun(64, 10_000, "kernel", ("1s", "100ms"))]]
    return [[PathRun(n, 10_000, "relay"), PathRun(n, 10_000, "kernel"),
             *(PathRun(n, 10_000, "kernel", o) for o in observe)] for n in (1024, 64)]


def run_datapaths(quick: bool, duration: float, observe: list[tuple[str, str]],
                  progress: bool) -> list[dict[str, Any]]:
    """Each group's runs, one daemon after the other on the same pinned CPU as the pump.
    CPU is eoid's whole process (every thread, schedstat), over the pump's run, compared
    an interrupt (a sampled run lasts a whole period, so it may be longer)."""
    relay_cpu, pump_cpu = placement_cpus("same")
    rows: list[dict[str, Any]] = []
    for group in datapath_matrix(quick, observe):
        ensure_nofile(FDS_PER_DEVICE * group[0].devices + 256)
        c = run_baseline(group[0].devices, "paced", duration, group[0].rate)
        relay_ns = kernel_ns = None  # eoid's CPU an interrupt in those two runs
        for r in group:
            # a sampled run lasts a period at least: every device's window, once
            every = parse_duration(r.observe[0]) * 1e-9 if r.observe else 0.0
            seconds = max(duration, every)
            with running(r.devices, "uvloop", relay_cpu, r.datapath, r.observe) as daemon:
                e = measure(daemon, "paced", seconds, r.rate, pump_cpu)
            total = e["interrupts"] + e["kernel_interrupts"]
            window = e["pump"]["duration"] + e["pump"]["drain_s"]
            per_irq = e["cpu_ns"] / total if total else 0.0
            relay_ns = per_irq if r.datapath == "relay" else relay_ns
            kernel_ns = per_irq if r.datapath == "kernel" and not r.observe else kernel_ns
            lane = sum(n for t, n in e["voluntary_switches_by_thread"].items() if "lane" in t)
            sentinel = sum(n for t, n in e["voluntary_switches_by_thread"].items()
                           if "sentinel" in t)
            row: dict[str, Any] = {
                "name": r.name, "devices": r.devices, "rate": r.rate, "datapath": r.datapath,
                "observe": list(r.observe) if r.observe else None,
                "interrupts_per_s": e["interrupts_per_s"], "interrupts": total,
                "relayed": e["interrupts"], "kernel_interrupts": e["kernel_interrupts"],
                "cpu_us_per_interrupt": round(e["cpu_ns"] / total / 1e3, 3) if total else None,
                "cpu_percent": round(e["cpu_ns"] / (window * 1e9) * 100, 3),
                "c_cpu_us_per_interrupt": round(c["cpu_us_per_interrupt"], 3),
                "voluntary_switches_per_interrupt": e["voluntary_switches_per_interrupt"],
                "lane_switches_per_interrupt": round(lane / total, 4) if total else None,
                "sentinel_switches_per_s": round(sentinel / window, 1),
                "other_switches": e["voluntary_switches"] - lane - sentinel,
                "windows": e["observations"],
                "seconds": seconds,
                "cpu_percent_of_relay": round(per_irq / relay_ns * 100, 2)
                if relay_ns else None,
                "cpu_us_per_window": round((per_irq - kernel_ns) * total / e["observations"]
                                           / 1e3, 1)
                if kernel_ns is not None and e["observations"] else None,
                "window_cost_percent_of_relay": round((per_irq - kernel_ns) / relay_ns * 100, 2)
                if relay_ns and kernel_ns is not None and r.observe else None,
                # as if the run had held one window a device a period exactly: the windows
                # that open in a run depend on how many ticks of the grid (README, "Two
                # datapaths") fall within it, 7 or 6 in a 61 s run of a 60 s period
                "percent_of_relay_per_period": round(
                    (kernel_ns + (per_irq - kernel_ns) * r.devices * window / every
                     / e["observations"])
                    / relay_ns * 100, 2)
                if relay_ns and kernel_ns is not None and r.observe and e["observations"]
                else None,
                "sim_requests": e["sim_requests"],
                # where a window's cost goes: the event loop's thread (switching, the sim's
                # requests and replies, timers) and the lane (relaying), and their wake-ups
                "per_window": {
                    thread.split(":")[-1] + "_" + what: round(value / e["observations"], 1)
                    for what, values in (("cpu_us", {t: n / 1e3 for t, n in
                                                      e["cpu_ns_by_thread"].items()}),
                                         ("wakeups", e["voluntary_switches_by_thread"]))
                    for thread, value in values.items() if value
                } if e["observations"] else None,
                "cpu_ns_by_thread": e["cpu_ns_by_thread"],
                "spurious_eois": e["spurious_eois"], "skipped": e["skipped"],
                "lost": e["lost"] + (0 if c["ok"] else 1),
            }
            rows.append(row)
            if progress:
                print(f"  {r.name}: {row['cpu_us_per_interrupt']} us/interrupt, "
                      f"{row['voluntary_switches_per_interrupt']} wake-ups/interrupt, "
                      f"{row['windows']} windows, lost {row['lost']}", file=sys.stderr)
    return rows


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version()}


def run(quick: bool, duration: float, progress: bool, *, datapath_only: bool = False,
        datapath_duration: float = 10.0, observe: list[tuple[str, str]] | None = None,
        ) -> dict[str, Any]:
    observe = observe if observe is not None else [("1s", "100ms"), ("60s", "1s")]
    datapaths = run_datapaths(quick, datapath_duration, observe, progress)
    if datapath_only:
        return {"machine": machine(), "duration_seconds": datapath_duration, "quick": quick,
                "scenarios": [], "datapaths": datapaths, "arm_seconds": {},
                "idle_cpu_percent": None, "skipped": []}
    scenarios = matrix(quick)
    relay_cpu, pump_cpu = placement_cpus("same")
    _, other_cpu = placement_cpus("split")
    results: list[dict[str, Any]] = []
    arm: dict[str, float] = {}
    idle: float | None = None
    groups: dict[tuple[int, str], list[Scenario]] = {}
    for s in scenarios:
        groups.setdefault((s.devices, s.loop), []).append(s)
    skipped: list[str] = []
    for (devices, loop), group in groups.items():
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = FDS_PER_DEVICE * devices + 256
        if hard != resource.RLIM_INFINITY and needed > hard:
            skipped += [f"{s.name}: needs {needed} open files, "
                        f"RLIMIT_NOFILE's hard limit here is {hard}" for s in group]
            print(f"  skipped: {skipped[-1]}", file=sys.stderr)
            continue
        ensure_nofile(needed)
        # The baselines first, so that no process holds their fds and eoid's at once.
        baselines = [run_baseline(s.devices, s.mode, duration, s.rate, pump_args=s.pump_args,
                                  placement="split" if s.polling else "same") for s in group]
        floors = [run_baseline(s.devices, s.mode, duration, relay=f"py-{s.loop}")
                  if s.mode == "closed" else None for s in group]
        with running(devices, loop, relay_cpu) as daemon:
            arm.setdefault(str(devices), daemon.arm_seconds)
            rss = daemon.rss_bytes()
            for s, c, floor in zip(group, baselines, floors, strict=True):
                e = measure(daemon, s.mode, duration, s.rate,
                            other_cpu if s.polling else pump_cpu, pump_args=s.pump_args)
                row: dict[str, Any] = {
                    "name": s.name, "devices": s.devices, "loop": s.loop, "mode": s.mode,
                    "rate": s.rate, "interrupts_per_s": e["interrupts_per_s"],
                    "cpu_us_per_interrupt": e["cpu_us_per_interrupt"],
                    "c_cpu_us_per_interrupt": round(c["cpu_us_per_interrupt"], 3),
                    "ratio_to_c": round(e["cpu_us_per_interrupt"] / c["cpu_us_per_interrupt"], 2)
                    if e["cpu_us_per_interrupt"] and c["cpu_us_per_interrupt"] else None,
                    "eoi_to_unmask_p50_us": e["eoi_to_unmask_p50_us"],
                    "eoi_to_unmask_p99_us": e["eoi_to_unmask_p99_us"],
                    "eoi_to_unmask_p999_us": e["eoi_to_unmask_p999_us"],
                    "trigger_to_forward_p50_us": e["trigger_to_forward_p50_us"],
                    "trigger_to_forward_p99_us": e["trigger_to_forward_p99_us"],
                    "trigger_to_forward_p999_us": e["trigger_to_forward_p999_us"],
                    "skipped": e["skipped"],
                    "rss_bytes": rss, "rss_bytes_per_device": None,
                    "lost": e["lost"] + (0 if c["ok"] else 1),
                }
                if floor is not None:
                    row["python_floor_cpu_us_per_interrupt"] = round(
                        floor["cpu_us_per_interrupt"], 3)
                results.append(row)
                if progress:
                    print(f"  {s.name}: {row['cpu_us_per_interrupt']} us/interrupt, "
                          f"{row['ratio_to_c']}x C, lost {row['lost']}", file=sys.stderr)
            if idle is None and (devices == 1024 or (quick and devices == 64)):
                idle = idle_cpu_percent(daemon, 3.0)
    by_loop: dict[str, list[dict[str, Any]]] = {}
    for row in results:
        by_loop.setdefault(row["loop"], []).append(row)
    for rows in by_loop.values():  # RSS per device: the slope between the smallest and largest
        small = min(rows, key=lambda r: r["devices"])
        large = max(rows, key=lambda r: r["devices"])
        if large["devices"] > small["devices"]:
            slope = (large["rss_bytes"] - small["rss_bytes"]) / (large["devices"]
                                                                 - small["devices"])
            for row in rows:
                row["rss_bytes_per_device"] = round(slope)
    return {"machine": machine(), "duration_seconds": duration, "quick": quick,
            "scenarios": results, "datapaths": datapaths, "arm_seconds": arm,
            "idle_cpu_percent": idle, "skipped": skipped}


def _median_rows(reports: list[dict[str, Any]], table: str) -> list[dict[str, Any]]:
    """One of the reports' tables, row by row: the median of every figure, lost summed."""
    rows = []
    for same in zip(*(r[table] for r in reports), strict=True):
        row = dict(same[0])
        for key, value in row.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                values = [r[key] for r in same if r[key] is not None]
                row[key] = statistics.median(values) if values else None
        row["lost"] = sum(r["lost"] for r in same)
        rows.append(row)
    return rows


def median_of(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of the same matrix merged: the median of every figure, lost summed."""
    if len(reports) == 1:
        return reports[0]
    merged = dict(reports[0], repeat=len(reports))
    merged["scenarios"] = _median_rows(reports, "scenarios")
    merged["datapaths"] = _median_rows(reports, "datapaths")
    merged["arm_seconds"] = {n: statistics.median(r["arm_seconds"][n] for r in reports)
                             for n in reports[0]["arm_seconds"]}
    idle = [r["idle_cpu_percent"] for r in reports if r["idle_cpu_percent"] is not None]
    merged["idle_cpu_percent"] = max(idle) if idle else None
    return merged


def datapath_table(rows: list[dict[str, Any]]) -> str:
    head = ("datapath run", "interrupts/s", "relayed", "eoid CPU us/irq", "C us/irq",
            "eoid CPU %", "wake-ups/irq (lane)", "sentinel /s", "windows", "us/window",
            "% of relay CPU", "% of relay CPU, a window a period", "lost")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        out.append("| " + " | ".join(str(v) for v in (
            r["name"], f"{r['interrupts_per_s']:.0f}", r["relayed"], r["cpu_us_per_interrupt"],
            r["c_cpu_us_per_interrupt"], r["cpu_percent"],
            f"{r['voluntary_switches_per_interrupt']} ({r['lane_switches_per_interrupt']})",
            r["sentinel_switches_per_s"], r["windows"], r["cpu_us_per_window"] or "-",
            r["cpu_percent_of_relay"], r["percent_of_relay_per_period"] or "-",
            r["lost"])) + " |")
    return "\n".join(out)


def table(report: dict[str, Any]) -> str:
    if not report["scenarios"]:
        return datapath_table(report["datapaths"])
    head = ("scenario", "interrupts/s", "CPU us/irq", "C us/irq", "ratio to C",
            "Python floor", "EOI->unmask p50/p99/p99.9 us", "trigger->forward p99 us",
            "RSS MB", "lost")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["scenarios"]:
        rows.append("| " + " | ".join(str(v) for v in (
            r["name"], f"{r['interrupts_per_s']:.0f}", r["cpu_us_per_interrupt"],
            r["c_cpu_us_per_interrupt"], r["ratio_to_c"],
            r.get("python_floor_cpu_us_per_interrupt", "-"),
            f"{r['eoi_to_unmask_p50_us']}/{r['eoi_to_unmask_p99_us']}/"
            f"{r['eoi_to_unmask_p999_us']}", r["trigger_to_forward_p99_us"],
            f"{r['rss_bytes'] / 2**20:.1f}", r["lost"])) + " |")
    arm = ", ".join(f"{n} devices {s:.3f} s" for n, s in report["arm_seconds"].items())
    rows += ["", f"Arm time: {arm}. Idle CPU: {report['idle_cpu_percent']} %."]
    rows += [f"Not run: {reason}." for reason in report["skipped"]]
    return "\n".join(rows) + "\n\n" + datapath_table(report["datapaths"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small matrix, under a minute")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds of load per run (default 3, --quick 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the matrix N times and report medians (lost: the sum)")
    parser.add_argument("--datapath-only", action="store_true",
                        help="only the datapath comparison (relay, kernel, observation)")
    parser.add_argument("--datapath-duration", type=float, default=None,
                        help="seconds of load per datapath run (default 10, --quick 1)")
    parser.add_argument("--observe", nargs=2, action="append", metavar=("EVERY", "FOR"),
                        help="the observation windows to compare (repeatable; default: "
                        "1s 100ms and 60s 1s)")
    args = parser.parse_args(argv)
    duration = args.duration or (1.0 if args.quick else 3.0)
    path_duration = args.datapath_duration or (1.0 if args.quick else 10.0)
    observe = [tuple(o) for o in args.observe] if args.observe else None
    report = median_of([run(args.quick, duration, progress=True,  # progress: stderr
                            datapath_only=args.datapath_only, datapath_duration=path_duration,
                            observe=observe)
                        for _ in range(max(1, args.repeat))])
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 1 if any(r["lost"] for r in report["scenarios"] + report["datapaths"]) else 0


if __name__ == "__main__":
    sys.exit(main())
