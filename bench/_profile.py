"""Run ``eoid`` with its main thread (the event loop) under cProfile, on demand.

``python -m bench._profile OUT eoid-args...``: SIGUSR1 starts profiling, SIGUSR2 stops it
and writes the stats to OUT (the bench profiles the daemon during a load run only, not
its start-up). The clock is the thread's CPU time, so time the loop sleeps in epoll does
not count; what the C fast path's threads spend is not seen (they run no Python).
"""

from __future__ import annotations

import cProfile
import signal
import sys
import time
from types import FrameType


def main() -> int:
    out, argv = sys.argv[1], sys.argv[2:]
    profiler = cProfile.Profile(time.thread_time)

    def start(signum: int, frame: FrameType | None) -> None:
        profiler.enable()

    def stop(signum: int, frame: FrameType | None) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    from eoid.cli import main as eoid_main

    return eoid_main(argv)


if __name__ == "__main__":
    sys.exit(main())
