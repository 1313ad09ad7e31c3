"""The floor for a Python relay: uvloop (or asyncio) doing nothing but eoid's syscalls.

    python -m bench.pyrelay --fds "trigger,irq,eoi,unmask;..." [--loop asyncio]
    python -m bench.pyrelay --fds-from FD ...   # the same list read from FD (a memfd)

Same contract as baseline.c (stops when stdin closes, prints its CPU time as one JSON
line), so the harness can run it under the same pump: the gap between this and eoid is
what eoid's own logic (state machine, metrics, timers) costs per interrupt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    spec = parser.add_mutually_exclusive_group(required=True)
    spec.add_argument("--fds")
    spec.add_argument("--fds-from", type=int, help="read the list from this fd (too long "
                      "for one argument: many devices)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args()
    if args.fds_from is not None:
        with os.fdopen(args.fds_from, "rb") as f:
            f.seek(0)
            args.fds = f.read().decode()
    quads = [tuple(int(x) for x in q.split(",")) for q in args.fds.split(";") if q]
    loop: asyncio.AbstractEventLoop
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    read, write = os.eventfd_read, os.eventfd_write
    counts = [0]

    def relay(src: int, dst: int) -> None:
        try:
            read(src)
        except BlockingIOError:
            return
        write(dst, 1)
        counts[0] += 1

    for trigger, irq, eoi, unmask in quads:
        loop.add_reader(trigger, relay, trigger, irq)
        loop.add_reader(eoi, relay, eoi, unmask)
    done: asyncio.Future[None] = loop.create_future()

    def stdin_closed() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), stdin_closed)
    os.write(args.ready_fd, b"r")
    os.close(args.ready_fd)
    start = resource.getrusage(resource.RUSAGE_SELF)
    loop.run_until_complete(done)
    end = resource.getrusage(resource.RUSAGE_SELF)
    cpu_us = ((end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)) * 1e6
    print(json.dumps({"cpu_us": cpu_us, "trigger_reads": counts[0] // 2}))


if __name__ == "__main__":
    main()
