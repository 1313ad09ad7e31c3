"""eoid against the C baseline at one device count, closed loop and paced, paired run by run.

    python -m bench.pair --devices 1024 --repeat 3
    python -m bench.pair --devices 1024 --repeat 3 --json > out.jsonl

Each round runs the C baseline (bench/baseline.c) closed and paced, then one ``eoid run``
under the same two loads, as ``python -m bench`` does for one row group, and prints each
scenario's ratio to C for that round and, at the end, the medians. Per-thread CPU
(the event loop, the fast path's lane and its sentinel, the rest) says where eoid's time
goes. This is the quick way to compare two builds of eoid/_fastpath.c (see "What separates
the lane from C" in bench/RESULTS.md): rounds of the full matrix take minutes, these
seconds. The machine is shared and noisy: compare ratios from the same round, and
medians of several.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from bench.run_baseline import ensure_nofile, placement_cpus, run_baseline
from bench.run_eoid import measure, running


def _thread_us(by_thread: dict[str, int], interrupts: int) -> dict[str, float]:
    """CPU us per interrupt by kind of thread (lane, sentinel, loop: the event loop, other)."""
    out: dict[str, float] = {}
    for name, ns in by_thread.items():
        kind = next((k for k in ("lane", "sentinel", "loop") if k in name), "other")
        out[kind] = out.get(kind, 0.0) + ns / 1e3 / max(interrupts, 1)
    return {k: round(v, 3) for k, v in sorted(out.items())}


def one_round(devices: int, duration: float, rate: int) -> list[dict[str, Any]]:
    scenarios: list[tuple[str, int | None]] = [("closed", None), ("paced", rate)]
    relay_cpu, pump_cpu = placement_cpus("same")
    ensure_nofile(4 * devices + 256)
    baselines = [run_baseline(devices, mode, duration, r) for mode, r in scenarios]
    rows = []
    with running(devices, "uvloop", relay_cpu) as daemon:
        for (mode, r), c in zip(scenarios, baselines, strict=True):
            e = measure(daemon, mode, duration, r, pump_cpu)
            total = e["interrupts"] + e["kernel_interrupts"]
            eoid_us, c_us = e["cpu_us_per_interrupt"], c["cpu_us_per_interrupt"]
            rows.append({
                "devices": devices, "mode": mode, "rate": r,
                "eoid_us": eoid_us, "c_us": round(c_us, 3),
                "ratio": round(eoid_us / c_us, 3) if eoid_us and c_us else None,
                "eoid_ns_per_irq": e["cpu_ns_per_interrupt"],
                "threads_us": _thread_us(e["cpu_ns_by_thread"], total),
                "wakeups_per_irq": e["voluntary_switches_per_interrupt"],
                "c_events_per_wakeup": round(c["baseline"]["events"]
                                             / max(c["baseline"]["wakeups"], 1), 2),
                "interrupts_per_s": e["interrupts_per_s"],
                "unmask_p99_us": e["eoi_to_unmask_p99_us"],
                "forward_p99_us": e["trigger_to_forward_p99_us"],
                "lost": e["lost"] + (0 if c["ok"] else 1),
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pair", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--devices", type=int, default=1024)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of load a run")
    parser.add_argument("--rate", type=int, default=10_000, help="the paced run's rate")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (medians over them)")
    parser.add_argument("--label", default="", help="a name for this build, in the output")
    parser.add_argument("--json", action="store_true", help="one JSON line a row")
    args = parser.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for i in range(args.repeat):
        for row in one_round(args.devices, args.duration, args.rate):
            row.update(label=args.label, round=i)
            rows.append(row)
            print(json.dumps(row) if args.json else
                  f"{args.label} round {i} {row['mode']}: eoid {row['eoid_us']} us, "
                  f"C {row['c_us']} us, {row['ratio']}x, threads {row['threads_us']}, "
                  f"lost {row['lost']}", flush=True)
    for mode in ("closed", "paced"):
        ratios = [r["ratio"] for r in rows if r["mode"] == mode and r["ratio"] is not None]
        if ratios:
            print(f"{args.label} median {mode}: {statistics.median(ratios)}x C "
                  f"(rounds: {', '.join(str(x) for x in ratios)})", file=sys.stderr)
    return 1 if any(r["lost"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
