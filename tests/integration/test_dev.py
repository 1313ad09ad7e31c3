"""./dev on a fresh host: apt-get waits, boundedly, for another apt or dpkg's lock.

These hold the real lock files the way apt does (fcntl write locks), for a few seconds,
and run ./dev's own apt_get function against them: only as root on a Debian host. Nothing
is installed or changed: the commands fail on the lock, or find everything installed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FRONTEND_LOCK = Path("/var/lib/dpkg/lock-frontend")
LISTS_LOCK = Path("/var/lib/apt/lists/lock")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None or not FRONTEND_LOCK.exists(),
    reason="needs root and Debian's apt")


def apt_get(*args: str, timeout: int) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ./dev's apt_get function (cut out of the script) with APT_LOCK_TIMEOUT."""
    script = (ROOT / "dev").read_text()
    start, end = script.index("APT_LOCK_TIMEOUT=${"), script.index("\n}\n", script.index(
        "apt_get() {"))
    t0 = time.monotonic()
    result = subprocess.run(["sh", "-euc", script[start:end + 3] + ' apt_get "$@"', "sh", *args],
                            env={**os.environ, "APT_LOCK_TIMEOUT": str(timeout)},
                            capture_output=True, text=True, timeout=60, check=False)
    return result, time.monotonic() - t0


@contextmanager
def held(path: Path) -> Iterator[threading.Event]:
    """Hold ``path``'s lock as apt does until the yielded event is set (or the end)."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pytest.skip(f"{path} is held by another apt or dpkg right now")
        release = threading.Event()

        def unlock_when_set() -> None:
            release.wait()
            fcntl.lockf(fd, fcntl.LOCK_UN)

        thread = threading.Thread(target=unlock_when_set)
        thread.start()
        try:
            yield release
        finally:
            release.set()
            thread.join()
    finally:
        os.close(fd)


def test_install_waits_for_the_dpkg_lock_then_says_why_it_gave_up() -> None:
    with held(FRONTEND_LOCK):
        result, took = apt_get("install", "-y", "-qq", "coreutils", timeout=3)
    assert result.returncode != 0
    assert 2 <= took < 20  # apt polls once a second: it gives up within the last one
    assert "dpkg frontend lock" in result.stderr
    assert "another apt or dpkg held the package lock for over 3s" in result.stderr


def test_update_waits_for_the_lists_lock_then_says_why_it_gave_up() -> None:
    with held(LISTS_LOCK):
        result, took = apt_get("update", "-qq", timeout=3)
    assert result.returncode != 0
    assert took < 20  # apt's wait for the lists lock is its own: it varied from 1 s to 3 s
    assert "Could not get lock /var/lib/apt/lists/lock" in result.stderr
    assert "another apt or dpkg held the package lock for over 3s" in result.stderr


def test_install_goes_ahead_once_the_other_apt_is_done() -> None:
    with held(FRONTEND_LOCK) as release:
        threading.Timer(1.0, release.set).start()
        result, took = apt_get("install", "-y", "-qq", "coreutils", timeout=30)
    assert result.returncode == 0, result.stderr  # coreutils is installed: nothing to do
    assert took >= 1
