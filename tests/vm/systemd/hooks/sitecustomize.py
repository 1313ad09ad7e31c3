"""Test-only: with EOID_TEST_WEDGE_SIGNAL set, that signal wedges the main thread.

The systemd VM tests put this directory on eoid.service's PYTHONPATH. eoid's
event loop runs in the main thread, so a Python-level handler that sleeps
there freezes the loop while every other thread (the metrics exporter) keeps
running: exactly the "wedged loop" the unit's WatchdogSec= must catch. It
touches no eoid code, so it tests the daemon as shipped.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import types


def _wedge(signum: int, frame: types.FrameType | None) -> None:
    print(f"eoid-test: signal {signum} wedged the main thread", file=sys.stderr, flush=True)
    time.sleep(3600)


_name = os.environ.get("EOID_TEST_WEDGE_SIGNAL")
if _name:
    signal.signal(signal.Signals[_name], _wedge)
