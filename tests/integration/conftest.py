"""The daemon-level tests run twice: with the C fast path, and in pure-Python mode
(``EOID_FASTPATH=0``, as where the extension cannot be built). The rest once, fast.
``EOID_TEST_MODES=fast`` runs only the first (./dev sanitize: the C under ASan)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

BOTH_MODES = {"test_daemon.py", "test_restart.py", "test_fastpath_daemon.py"}


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Short paths (unix sockets: 108 bytes) that other users can reach."""
    root = Path(tempfile.mkdtemp(prefix="eoid-w", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def fastpath_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The daemons a test starts inherit the mode through the environment."""
    mode: str = getattr(request, "param", "fast")
    monkeypatch.setenv("EOID_FASTPATH", "0" if mode == "python" else "1")
    return mode


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__file__
    if module and Path(module).name in BOTH_MODES and "fastpath_mode" in metafunc.fixturenames:
        modes = os.environ.get("EOID_TEST_MODES", "fast,python").split(",")
        metafunc.parametrize("fastpath_mode", modes, indirect=True)
