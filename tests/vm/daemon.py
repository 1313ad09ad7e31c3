"""The real daemon in a test guest, one way for every VM suite: ``serving`` waits until the
``eoid run`` it is given answers and has every device up, and, when the block ends, stops
it and checks that it exited cleanly."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator

from eoid.control import wait_for_socket
from tests.helpers import Env, wait_until

STARTUP = 90.0  # seconds: under TCG, each interpreter spends seconds importing


@contextlib.contextmanager
def serving(env: Env, proc: subprocess.Popen[bytes]) -> Iterator[Env]:
    assert wait_for_socket(env.control, STARTUP, lambda: proc.poll() is None), \
        env.log("daemon")
    wait_until(lambda: all(d["up"] for d in env.status()["devices"]), STARTUP, "devices up")
    try:
        yield env
    finally:
        env.stop()
        assert proc.returncode == 0, env.log("daemon")
