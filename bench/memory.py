"""Where eoid's memory goes: RSS of a real ``eoid run`` by device count, and per-device
allocation sites.

Three modes:

- default: for each ``--devices N``, a real ``eoid run`` subprocess with N sim devices,
  each with a consumer attached (bench/run_eoid.py's ``Daemon``: the same configuration,
  sim stand-in and consumer as the benchmark). Once it is ready and attached, its
  ``VmRSS``/``RssAnon``/``RssFile`` are read from /proc and a line is fitted through
  them: the base and the bytes per device;
  Then, after ``--scrapes`` scrapes of /metrics as Prometheus makes them (OpenMetrics,
  gzip), the same again and the peak (``VmHWM``);
- ``--imports``: the RSS a fresh interpreter reaches after importing each dependency
  alone, and which of them pull in ``ssl`` (and so OpenSSL's libssl and libcrypto); then
  what each adds on top of the previous ones, in the order ``eoid run`` needs them;
- ``--tracemalloc``: the daemon built in this process on the real loop (``Daemon.startup``
  with no devices, then a reload that adds N, then a consumer attached to each; the sim
  stand-in runs in a process of its own), with tracemalloc's live allocations after
  minus before, per device, by file:line.

RssFile is file-backed pages (the interpreter, the extension modules, libcrypto): shared
with every process that maps the same files, and reclaimable. RssAnon is the process's own.

    python -m bench.memory --devices 1 256 1024 2048
    python -m bench.memory --imports
    python -m bench.memory --tracemalloc --devices 512
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.run_eoid import Daemon, device_yaml

DEFAULT_DEVICES = (1, 256, 1024, 2048)
STATUS_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
# What Prometheus (2.x/3.x) sends: OpenMetrics preferred, gzip.
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,"
              "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,"
              "*/*;q=0.2",
    "Accept-Encoding": "gzip"}
# What `eoid run` imports, one top-level dependency at a time (plus the stdlib modules
# suspected of pulling in OpenSSL), then eoid's own modules.
IMPORTS = ("asyncio", "ssl", "hashlib", "uvloop", "pydantic", "yaml", "structlog",
           "prometheus_client", "http.server", "urllib.request", "importlib.metadata",
           "eoid.config", "eoid.cli", "eoid.metrics", "eoid.daemon")
# The same, one on top of the other: each row is what that step adds to the process.
# eoid.config's row is its models (pydantic builds their validators at import).
LAYERS = ("asyncio", "uvloop", "importlib.metadata", "yaml", "pydantic", "eoid.config",
          "structlog", "prometheus_client", "eoid.cli", "eoid.daemon")


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The RSS fields of /proc/PID/status, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


def scrape(port: int) -> int:
    """One scrape as Prometheus makes it; the body's size."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers=PROMETHEUS_HEADERS)
    with urllib.request.urlopen(request, timeout=300) as response:
        return len(response.read())


def measure_daemon(devices: int, loop: str = "uvloop", scrapes: int = 3) -> dict[str, Any]:
    """RSS of a real ``eoid run`` with ``devices`` sim devices, each with a consumer:
    once ready, and after ``scrapes`` scrapes of /metrics."""
    daemon = Daemon(devices, loop)
    try:
        daemon.start(cpu=None)
        assert daemon.proc is not None
        time.sleep(0.5)  # let the start-up's transient allocations settle
        row: dict[str, Any] = {"devices": devices, "arm_seconds": daemon.arm_seconds,
                               "ready": proc_status(daemon.proc.pid)}
        if scrapes:
            begun = time.monotonic()
            row["scrape_bytes"] = [scrape(daemon.port) for _ in range(scrapes)][-1]
            row["scrape_seconds"] = round((time.monotonic() - begun) / scrapes, 3)
            row["scraped"] = proc_status(daemon.proc.pid)
        return row
    finally:
        daemon.stop()


def fit(points: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (base, slope) through (devices, bytes)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - slope * mx, slope


def run_rss(counts: Sequence[int], loop: str, at: int, scrapes: int) -> dict[str, Any]:
    rows = [measure_daemon(n, loop, scrapes) for n in counts]
    result: dict[str, Any] = {"loop": loop, "rows": rows, "fits": {}}
    if len(rows) > 1:
        for when in ("ready", "scraped"):
            for key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                if when not in rows[0]:
                    continue
                base, slope = fit([(r["devices"], r[when][key]) for r in rows])
                result["fits"][f"{when} {key}"] = {
                    "base": round(base), "per_device": round(slope),
                    f"at_{at}": round(base + slope * at)}
    return result


def print_rss(result: dict[str, Any], at: int) -> None:
    mb = 1 << 20
    print(f"eoid run ({result['loop']}), sim devices each with a consumer attached; MB:")
    print(f"{'':>8} {'ready':^23}  {'after scrapes':^33}")
    print(f"{'devices':>8} {'VmRSS':>7} {'anon':>7} {'file':>7}  {'VmRSS':>7} {'anon':>7} "
          f"{'file':>7} {'peak':>7}  {'scrape s':>8} {'arm s':>6}")
    for r in result["rows"]:
        ready, scraped = r["ready"], r.get("scraped")
        line = (f"{r['devices']:>8} {ready['VmRSS'] / mb:>7.1f} {ready['RssAnon'] / mb:>7.1f} "
                f"{ready['RssFile'] / mb:>7.1f}")
        if scraped:
            line += (f"  {scraped['VmRSS'] / mb:>7.1f} {scraped['RssAnon'] / mb:>7.1f} "
                     f"{scraped['RssFile'] / mb:>7.1f} {scraped['VmHWM'] / mb:>7.1f}  "
                     f"{r['scrape_seconds']:>8.3f}")
        print(line + f" {r['arm_seconds']:>6.3f}")
    for name, f in result["fits"].items():
        if "VmHWM" in name and name.startswith("ready"):
            continue
        print(f"{name + ':':<22} {f['base'] / mb:5.1f} MB + {f['per_device']:>6} bytes/device"
              f" -> {f[f'at_{at}'] / mb:6.1f} MB at {at} devices")


# --- import costs ------------------------------------------------------------------------

_IMPORT_PROBE = """
import importlib, json, sys
from pathlib import Path
def status():
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out
rows = [{"module": "(interpreter)", "after": status(), "modules": len(sys.modules)}]
for module in sys.argv[1:]:
    n = len(sys.modules)
    importlib.import_module(module)
    rows.append({"module": module, "after": status(), "modules": len(sys.modules) - n,
                 "ssl": "ssl" in sys.modules})
print(json.dumps(rows))
"""

_SSL_CULPRIT = """
import importlib, sys, traceback
class Finder:
    def find_spec(self, name, path, target=None):
        if name == "ssl":
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "<frozen" not in f.filename and f.filename != "<string>"]
            print(" <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}"
                              f":{f.lineno}" for f in reversed(frames[-4:])))
        return None
sys.meta_path.insert(0, Finder())
importlib.import_module(sys.argv[1])
"""


def _probe(*modules: str) -> list[dict[str, Any]]:
    """RSS of a fresh interpreter, then after importing each of ``modules`` in turn."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *modules], check=True,
                         capture_output=True, text=True).stdout
    rows: list[dict[str, Any]] = json.loads(out)
    for before, row in itertools.pairwise(rows):
        row["added"] = {k: v - before["after"][k] for k, v in row["after"].items()}
    return rows


def run_imports(alone: Sequence[str], layers: Sequence[str]) -> dict[str, Any]:
    """Each of ``alone`` imported into a fresh interpreter of its own, with what pulled in
    ssl; and ``layers`` imported one after the other into one interpreter."""
    rows = [_probe()[0]]
    for module in alone:
        row = _probe(module)[1]
        if row["ssl"] and module != "ssl":
            row["ssl_via"] = subprocess.run(
                [sys.executable, "-c", _SSL_CULPRIT, module], check=True,
                capture_output=True, text=True).stdout.strip().splitlines()[0]
        rows.append(row)
    return {"alone": rows, "layers": _probe(*layers)}


def print_imports(result: dict[str, Any]) -> None:
    mb = 1 << 20
    for title, rows in (("imported alone", result["alone"]),
                        ("one on top of the other", result["layers"])):
        print(f"{title:<22} {'VmRSS MB':>9} {'+MB':>6} {'+anon':>6} {'+file':>6} {'mods':>5}"
              + ("  ssl" if title == "imported alone" else ""))
        for r in rows:
            added = r.get("added", {"VmRSS": 0, "RssAnon": 0, "RssFile": 0})
            ssl = (f"yes, via {r['ssl_via']}" if "ssl_via" in r
                   else "yes" if r.get("ssl") else "-") if title == "imported alone" else ""
            print(f"{r['module']:<22} {r['after']['VmRSS'] / mb:>9.1f} "
                  f"{added['VmRSS'] / mb:>6.1f} {added['RssAnon'] / mb:>6.1f} "
                  f"{added['RssFile'] / mb:>6.1f} {r['modules']:>5}  {ssl}".rstrip())
        print()


# --- tracemalloc, in process ---------------------------------------------------------------


def _sim_process(path: Path) -> subprocess.Popen[bytes]:
    """The sim stand-in in a process of its own, so that its allocations are not counted."""
    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys; from pathlib import Path; "
                             "from bench.run_eoid import SimStandIn; "
                             "SimStandIn(Path(sys.argv[1])); signal.pause()", str(path)])
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError("the sim stand-in did not start")
        time.sleep(0.01)
    return proc


def trace_devices(devices: int, group: str = "lineno", frames: int = 1) -> dict[str, Any]:
    """Build the daemon in this process and find its live allocations per device by site.

    The daemon starts with no devices; then its configuration gains ``devices`` device
    files and it reloads (as on SIGHUP), and a consumer attaches to every device. The
    difference between tracemalloc snapshots taken before and after (each after a full
    collection, so garbage does not count) is what the devices cost."""
    import asyncio
    import gc
    import shutil
    import tempfile
    import tracemalloc

    import uvloop

    from bench.run_baseline import ensure_nofile
    from eoid import log
    from eoid.config import load_config
    from eoid.daemon import Daemon as EoidDaemon

    root = Path(tempfile.mkdtemp(prefix="eoid-m", dir="/tmp"))
    names = Daemon(devices, "uvloop", root=root).names()
    ensure_nofile(6 * devices + 256)  # eoid's 4 fds a device, 2 more while attaching
    (root / "none.d").mkdir()
    (root / "devices.d").mkdir()
    for i, name in enumerate(names):
        (root / "devices.d" / f"{name}.yaml").write_text(device_yaml(i))
    config = (f"control: {{socket: {root}/control.sock}}\nmetrics: {{listen: null}}\n"
              f"sim: {{socket: {root}/sim.sock}}\nlog: {{format: json, level: warning}}\n")
    (root / "eoid.yaml").write_text(config + "devices_dir: none.d\n")
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__),
              tracemalloc.Filter(False, "<frozen importlib._bootstrap*>")]
    result: dict[str, Any] = {"devices": devices}

    def snapshot() -> tracemalloc.Snapshot:
        gc.collect()
        return tracemalloc.take_snapshot().filter_traces(ignore)

    async def measure() -> None:
        daemon = EoidDaemon(load_config(root / "eoid.yaml"))
        await daemon.startup()
        (root / "eoid.yaml").write_text(config + "devices_dir: devices.d\n")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        tracemalloc.start(frames)
        try:
            before = snapshot()
            daemon.reload()
            assert daemon.control is not None and len(daemon.runners) == devices
            peer = daemon.control.adopt_peer(ours)
            for name in names:
                for fd in daemon.attach(peer, name)[1]:
                    os.close(fd)
            for _ in range(1000):  # sim devices start once the sim has answered their open
                if all(runner.up for runner in daemon.runners.values()):
                    break
                await asyncio.sleep(0.01)
            assert all(runner.up for runner in daemon.runners.values())
            stats = snapshot().compare_to(before, group)
        finally:
            tracemalloc.stop()
            daemon.shutdown()
            theirs.close()
        result["per_device"] = round(sum(s.size_diff for s in stats) / devices)
        result["sites"] = [
            {"where": " <- ".join(_short(line.strip()) for line
                                  in s.traceback.format(most_recent_first=True)
                                  if line.startswith("  File")),
             "bytes": round(s.size_diff / devices), "blocks": round(s.count_diff / devices, 2)}
            for s in stats if s.size_diff]

    log.configure("json", "warning")
    sim = _sim_process(root / "sim.sock")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(measure())
    finally:
        sim.terminate()
        sim.wait()
        shutil.rmtree(root, ignore_errors=True)
    return result


def print_trace(result: dict[str, Any], top: int) -> None:
    print(f"live Python-heap allocations per device ({result['devices']} sim devices with a "
          f"consumer, in process): {result['per_device']} bytes; top sites:")
    for site in result["sites"][:top]:
        print(f"{site['bytes']:>7} B {site['blocks']:>5.2f} blocks  {site['where']}")


def _short(frame: str) -> str:
    """``File "/…/site-packages/pydantic/main.py", line 792`` → ``pydantic/main.py:792``."""
    path, _, line = frame.removeprefix('File "').partition('", line ')
    parts = path.split("/")
    return f"{'/'.join(parts[-2:])}:{line}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=None,
                        help=f"device counts (default: {' '.join(map(str, DEFAULT_DEVICES))}; "
                        "with --tracemalloc: 512)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--scrapes", type=int, default=3,
                        help="scrapes of /metrics before the second reading (0: none)")
    parser.add_argument("--at", type=int, default=4096, help="extrapolate to this many devices")
    parser.add_argument("--imports", action="store_true", help="import costs instead")
    parser.add_argument("--tracemalloc", action="store_true",
                        help="per-device allocation sites instead (in process)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--group", choices=("lineno", "filename", "traceback"),
                        default="lineno", help="--tracemalloc: how to group the sites")
    parser.add_argument("--frames", type=int, default=1,
                        help="--tracemalloc: frames kept per allocation (with --group traceback)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.tracemalloc:
        result = trace_devices((args.devices or [512])[0], args.group, args.frames)
    elif args.imports:
        result = run_imports(IMPORTS, LAYERS)
    else:
        result = run_rss(args.devices or DEFAULT_DEVICES, args.loop, args.at, args.scrapes)
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.tracemalloc:
        print_trace(result, args.top)
    elif args.imports:
        print_imports(result)
    else:
        print_rss(result, args.at)
    return 0


if __name__ == "__main__":
    sys.exit(main())
