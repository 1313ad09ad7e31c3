"""What an observation window costs the daemon's event loop, with no load.

    python -m bench.window_cost --devices 512 --group 170 --rounds 20

The daemon runs in this process (``eoid.testing.run_server``, simulated devices, on
asyncio's loop: uvloop's cannot shut down off the main thread), every device on the
kernel's path with a consumer attached. Each round opens a 50 ms window on ``--group``
devices at once (as a tick of the sampling grid does), waits until they are all back on
the kernel's path, and divides the loop thread's CPU time (schedstat) over the round by
the windows. No interrupts fire: this is the price of the two switches alone, without the
relaying a window does or a cache cooled by other work. Prints the median, lowest and
highest of the rounds.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.status_stall import write_config
from eoid import log
from eoid.config import Datapath, load_config
from eoid.control import ControlClient
from eoid.daemon import GC_YOUNG_THRESHOLD
from eoid.runner import DeviceRunner
from eoid.testing import RunningDaemon, run_server

WINDOW_NS = 50_000_000


def open_windows(runners: list[DeviceRunner]) -> None:
    for r in runners:
        r.observe(WINDOW_NS)


def thread_cpu_ns(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def wait_on_kernel_path(served: RunningDaemon, runners: list[DeviceRunner]) -> None:
    """Until every runner is on the kernel's path with no switch in flight (its sim reply
    handled too). Asked on the loop every 20 ms: about 2 us a window of the figure."""
    deadline = time.monotonic() + 30
    while not served.call(lambda: all(r.datapath is Datapath.KERNEL and r._routing is None
                                      for r in runners)):
        if time.monotonic() > deadline:
            raise RuntimeError("the devices did not return to the kernel's path")
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.window_cost")
    parser.add_argument("--devices", type=int, default=512)
    parser.add_argument("--group", type=int, default=170)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    log.configure(level="warning", stream=sys.stderr)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])  # as run_daemon does
    root = Path(tempfile.mkdtemp(prefix="eoid-window-cost-"))
    try:
        config_path = write_config(root, args.devices)
        for f in (root / "devices.d").iterdir():
            f.write_text(f.read_text() + "datapath: kernel\n")
        with run_server(load_config(config_path)) as served:
            runners: list[DeviceRunner] = served.call(
                lambda: list(served.daemon.runners.values()))
            with ControlClient(served.control, timeout=30) as client:
                held = [client.request("attach", device=r.name)[1] for r in runners]
                wait_on_kernel_path(served, runners)
                tid = served.call(threading.get_native_id)
                costs = []
                for k in range(args.rounds):
                    first = (k * args.group) % len(runners)
                    group = runners[first:first + args.group]
                    before = thread_cpu_ns(tid)
                    served.call(functools.partial(open_windows, group))
                    time.sleep(WINDOW_NS * 2e-9)
                    wait_on_kernel_path(served, group)
                    costs.append((thread_cpu_ns(tid) - before) / len(group) / 1e3)
                for fds in held:
                    for fd in fds:
                        os.close(fd)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.rounds} rounds of {args.group} windows on {args.devices} devices: the loop's "
          f"CPU a window {statistics.median(costs):.1f} us median, {min(costs):.1f} lowest, "
          f"{max(costs):.1f} highest")


if __name__ == "__main__":
    main()
