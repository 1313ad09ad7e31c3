"""The operator's commands against a live daemon: what they print and how they exit, with a
broken device file, a rejected reload, unhealthy devices and a user who may not ask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from eoid import __version__
from eoid.cli import main
from tests.helpers import Consumer, Env, environment, wait_until


@pytest.fixture
def env() -> Iterator[Env]:
    with environment(devices=1) as e:
        e.start_sim()
        e.start_daemon()
        yield e


def last_reload_gauge(env: Env) -> float:
    return env.scrape()["eoid_config_last_reload_successful"][()]


def test_a_broken_device_file_neither_hides_the_daemon_nor_gets_applied(env: Env) -> None:
    assert last_reload_gauge(env) == 1
    env.write_device("dev1", "policy: {eoi_timeout: soon}\n")
    status = env.command("status")
    assert status.returncode == 0, status.stderr  # the socket is found all the same
    assert "dev0" in status.stdout and "last reload: ok" in status.stdout
    reload = env.command("reload")
    assert reload.returncode == 78, reload
    assert "dev1.yaml:3: policy.eoi_timeout" in reload.stderr
    assert last_reload_gauge(env) == 0
    status = env.command("status")
    assert "last reload: REJECTED" in status.stdout and "dev1.yaml:3" in status.stdout
    last = json.loads(env.command("status", "--json").stdout)["daemon"]["last_reload"]
    assert not last["successful"] and "dev1.yaml:3" in last["problems"][0]
    # fixed: the gauge (and the alert on it) clears at once
    env.write_device("dev1")
    reload = env.command("reload")
    assert reload.returncode == 0, reload.stderr
    assert "added dev1" in reload.stdout
    assert last_reload_gauge(env) == 1
    assert "last reload: ok" in env.command("status").stdout


def test_a_broken_daemon_file_is_still_a_config_error(env: Env) -> None:
    env.config.write_text(env.config.read_text() + "bogus: 1\n")
    result = env.command("status")
    assert result.returncode == 78 and "bogus" in result.stderr


def test_status_exits_1_while_a_device_is_down(env: Env) -> None:
    assert env.command("status").returncode == 0
    env.procs[0].kill()  # the sim process dies: its devices go down
    env.procs[0].wait()
    wait_until(lambda: env.device("dev0")["state"] == "down", what="down")
    result = env.command("status")
    assert result.returncode == 1
    assert "needs attention: dev0: down" in result.stdout
    assert env.command("status", "--json").returncode == 1


def test_status_exits_1_while_an_interrupt_is_stuck() -> None:
    with environment(devices=1, device_yaml="policy: {eoi_timeout: 200ms, "
                     "on_eoi_timeout: warn}\n") as env:
        env.start_sim()
        env.start_daemon()
        with Consumer(env.control, "dev0") as vm:
            env.sim("raise", line="dev0")
            assert vm.wait_irq() == 1
            wait_until(lambda: env.device("dev0")["stuck"], what="stuck")
            result = env.command("status")
            assert result.returncode == 1 and "dev0: pending (stuck)" in result.stdout
            env.sim("ack", line="dev0")
            vm.send_eoi()
            wait_until(lambda: not env.device("dev0")["stuck"], what="unstuck")
            assert env.command("status").returncode == 0


def _as_nobody(*argv: str) -> tuple[int, str]:
    """``eoid ARGV`` in a forked child that dropped to uid/gid 65534: (exit code, stderr)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 99
        try:
            sys.stderr = open(w, "w", closefd=False)  # noqa: SIM115 (pytest captures fd 2)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = main(list(argv))
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return os.waitstatus_to_exitcode(status), f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_permission_errors_exit_77(env: Env) -> None:
    assert _as_nobody("status", "-c", str(env.config))[0] == 0  # the socket is 0666 here
    code, err = _as_nobody("reload", "-c", str(env.config))
    assert code == 77 and "forbidden" in err
    code, err = _as_nobody("reset", "dev0", "-c", str(env.config))
    assert code == 77 and "forbidden" in err
    env.control.chmod(0o600)
    code, err = _as_nobody("status", "--socket", str(env.control))
    assert code == 77 and "Permission denied" in err
    env.config.chmod(0o600)
    code, err = _as_nobody("status", "-c", str(env.config))
    assert code == 77 and "Permission denied" in err


def test_version_shows_the_build() -> None:
    out = subprocess.run([sys.executable, "-m", "eoid.cli", "--version"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    assert out.startswith(f"eoid {__version__}\n")
    assert "python 3." in out and "fast path: " in out and "_fastpath" in out
    assert "uvloop " in out
