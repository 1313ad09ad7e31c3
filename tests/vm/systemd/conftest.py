"""Fixtures for the tests that need systemd as PID 1 (``pytest -m systemd``).

They run inside the throw-away guest of tests/vm/run-systemd-tests, whose root
is a RAM overlay of the host's: installing units, users and configuration there
changes nothing on the host. The shipped ``systemd/eoid.service`` is installed
as is, except for what a test guest must change (see ``render_unit``), and
driven with ``systemctl`` exactly as an administrator would.
"""

from __future__ import annotations

import grp
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from eoid.control import wait_for_socket
from eoid.demo import Samples, scrape, sim_call

ROOT = Path(__file__).resolve().parents[3]
UNIT = "eoid.service"
SIM_UNIT = "eoid-sim.service"
INSTALLED_EOID = "/opt/eoid/bin/eoid"
# The venv's console script, not resolved: its shebang names the venv's python.
EOID = Path(sys.executable).with_name("eoid")
CONFIG_DIR = Path("/etc/eoid")
CONFIG = CONFIG_DIR / "eoid.yaml"
RUNTIME_DIR = Path("/run/eoid")
CONTROL = RUNTIME_DIR / "control.sock"
SIM_SOCKET = Path("/run/eoid-sim/sim.sock")
METRICS = "http://127.0.0.1:9466/metrics"
HOOKS = Path(__file__).resolve().parent / "hooks"
WEDGE_SIGNAL = "SIGUSR2"
DEVICES = ("sim0", "sim1")

DAEMON_YAML = f"""\
devices_dir: devices.d
control: {{socket: {CONTROL}, socket_mode: "0660"}}
metrics: {{listen: "127.0.0.1:9466"}}
log: {{format: json, level: info}}
loop: uvloop
sim: {{socket: {SIM_SOCKET}}}
"""
DEVICE_YAML = {
    "sim0": 'pci_address: "0000:00:10.0"\nbackend: {type: sim}\n'
    "policy: {eoi_timeout: 2s, on_eoi_timeout: unmask}\n",
    "sim1": 'pci_address: "0000:00:11.0"\nbackend: {type: sim}\n'
    "policy: {eoi_timeout: 500ms, on_eoi_timeout: redeliver}\n",
}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll gently: under TCG every check (a systemctl, a scrape) costs real guest CPU."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)


def seqnum(cursor: str) -> int:
    """The sequence number in a journal cursor (``s=…;i=<hex>;b=…``): it orders entries."""
    fields = dict(part.split("=", 1) for part in cursor.split(";"))
    return int(fields["i"], 16)


def run(*args: str, check: bool = True, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result


def hidden_by_sandbox(path: Path) -> Path | None:
    """The top directory of ``path`` that eoid.service's sandbox replaces, if any."""
    for top in (Path("/root"), Path("/home"), Path("/run/user"), Path("/tmp"), Path("/var/tmp")):
        if path == top or top in path.parents:
            return top
    return None


def render_unit() -> tuple[str, str]:
    """The shipped unit pointed at this checkout's venv, and the guest's drop-in.

    The drop-in changes only what a test guest needs: where the venv and its
    interpreter live may be hidden by ProtectHome=/PrivateTmp= (a pyenv
    under /root, a CI clone under /tmp), so those exact paths are bound back
    read-only; a test hook that can wedge the loop (hooks/sitecustomize.py);
    no core dumps of the watchdog's SIGABRT (the guest has no coredump
    handler); no bytecode writes into the shared checkout.
    """
    unit = (ROOT / "systemd" / UNIT).read_text()
    assert INSTALLED_EOID in unit
    unit = unit.replace(INSTALLED_EOID, str(EOID))
    needed = {ROOT, Path(sys.prefix), Path(sys.base_prefix).resolve()}
    hidden = {p: top for p in needed if (top := hidden_by_sandbox(p)) is not None}
    lines = [
        "[Service]",
        f"Environment=PYTHONDONTWRITEBYTECODE=1 PYTHONPATH={HOOKS}",
        f"Environment=EOID_TEST_WEDGE_SIGNAL={WEDGE_SIGNAL}",
        "LimitCORE=0",
    ]
    if set(hidden.values()) & {Path("/root"), Path("/home"), Path("/run/user")}:
        lines.append("ProtectHome=tmpfs")  # still hides everything not bound below
    lines += [f"BindReadOnlyPaths={p}" for p in sorted(map(str, hidden))]
    dropin = "\n".join(lines) + "\n"
    return unit, dropin


@dataclass
class Service:
    """``systemctl`` and the journal for one unit."""

    unit: str

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("systemctl", *args, self.unit, check=check)

    def show(self, *names: str) -> dict[str, str]:
        out = run("systemctl", "show", "-p", ",".join(names), self.unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, name: str) -> str:
        return self.show(name)[name]

    @property
    def main_pid(self) -> int:
        return int(self.prop("MainPID"))

    def cursor(self) -> str:
        out = run("journalctl", "-n", "0", "--show-cursor", "-q").stdout
        return out.strip().removeprefix("-- cursor: ")

    def entries(self, after: str, *select: str) -> list[dict[str, Any]]:
        """This unit's journal entries (its own and PID 1's about it) after the cursor
        ``after``, as ``journalctl -u UNIT *select`` (e.g. ``-p warning``) selects them.

        Not ``--after-cursor``: with a filter, journalctl before systemd 255 drops the
        first matching entry when the cursor's own entry does not match the filter
        (systemd#30288, fixed by #30336), which hid a storm's only warning from
        ``-p warning``. Entries are compared by the cursor's sequence number instead."""
        start = seqnum(after)
        out = run("journalctl", "-u", self.unit, *select, "-o", "json", "--no-pager").stdout
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return [r for r in records if seqnum(r["__CURSOR"]) > start]

    def journal(self, after: str, *select: str) -> str:
        """The messages of ``entries``, one a line."""
        return "".join(f"{r.get('MESSAGE')}\n" for r in self.entries(after, *select))

    def wait_active(self, timeout: float = 60) -> None:
        wait_until(
            lambda: (self.prop("ActiveState"), self.prop("SubState")) == ("active", "running"),
            timeout,
            f"{self.unit} active/running: {self.show('ActiveState', 'SubState', 'Result')}",
        )


@dataclass
class Guest:
    """The installed eoid in a systemd guest."""

    eoid: Service
    sim: Service
    eoid_gid: int

    def write_config(self, **device_yaml: str) -> None:
        """eoid.yaml and one file per device (default: the good DEVICE_YAML)."""
        CONFIG_DIR.mkdir(exist_ok=True)
        CONFIG.write_text(DAEMON_YAML)
        devices = CONFIG_DIR / "devices.d"
        shutil.rmtree(devices, ignore_errors=True)
        devices.mkdir()
        for name, text in {**DEVICE_YAML, **device_yaml}.items():
            (devices / f"{name}.yaml").write_text(text)

    def metrics(self) -> Samples:
        return scrape(METRICS)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics().get(name, {}).get(tuple(sorted(labels.items())))

    def wait_devices_up(self, timeout: float = 30) -> None:
        def up() -> bool:
            try:
                return all(self.metric("eoid_device_up", device=d) == 1 for d in DEVICES)
            except OSError:
                return False

        wait_until(up, timeout, "every device up in /metrics")

    def sim_guest(self, device: str) -> dict[str, Any]:
        """The simulated guest's counters for ``device`` (irqs, eois, handled, attaches)."""
        guest: dict[str, Any] = sim_call(SIM_SOCKET, "stats")["lines"][device]["guest"]
        return guest

    def round_trip(self, device: str, timeout: float = 30) -> None:
        """Assert the line once and wait until the guest has serviced it and sent the EOI."""
        before = self.sim_guest(device)["eois"]
        sim_call(SIM_SOCKET, "raise", line=device)
        wait_until(
            lambda: self.sim_guest(device)["eois"] > before,
            timeout,
            f"an interrupt of {device} delivered to its guest and EOId",
        )

    def wait_consumers(self, timeout: float = 30) -> None:
        wait_until(
            lambda: all(self.metric("eoid_consumer_attached", device=d) == 1 for d in DEVICES),
            timeout,
            "the sim's guests attached to every device",
        )


@pytest.fixture(scope="session")
def guest() -> Iterator[Guest]:
    """Install eoid.service, its group and a configuration; start the simulated devices."""
    comm = Path("/proc/1/comm").read_text().strip()
    assert comm == "systemd", (
        f"PID 1 is {comm!r}: these tests need systemd as PID 1, run tests/vm/run-systemd-tests"
    )
    assert EOID.exists(), f"{EOID} missing: install eoid into the venv (pip install -e .)"
    state = run("systemctl", "is-system-running", "--wait", check=False).stdout.strip()
    assert state in {"running", "degraded"}, state

    sysusers = Path("/etc/sysusers.d")
    sysusers.mkdir(exist_ok=True)
    shutil.copy(ROOT / "systemd" / "eoid.sysusers.conf", sysusers / "eoid.conf")
    run("systemd-sysusers")
    eoid_gid = grp.getgrnam("eoid").gr_gid

    unit, dropin = render_unit()
    Path("/etc/systemd/system", UNIT).write_text(unit)
    dropin_dir = Path("/etc/systemd/system", UNIT + ".d")
    dropin_dir.mkdir(exist_ok=True)
    (dropin_dir / "test.conf").write_text(dropin)
    run("systemctl", "daemon-reload")

    g = Guest(Service(UNIT), Service(SIM_UNIT), eoid_gid)
    g.write_config()
    # The simulated devices and a simulated guest per device, which attaches
    # through the control socket like a VMM and re-attaches after restarts. No
    # load: under TCG a load generator would eat the guest's only vCPU.
    sim = ["sim", "-c", str(CONFIG), "--rate", "0"]
    run(
        "systemd-run",
        f"--unit={SIM_UNIT}",
        "--property=RuntimeDirectory=eoid-sim",
        "--setenv=PYTHONDONTWRITEBYTECODE=1",
        str(EOID),
        *sim,
    )
    assert wait_for_socket(SIM_SOCKET, 60, lambda: g.sim.prop("ActiveState") == "active"), run(
        "journalctl", "-u", SIM_UNIT, "--no-pager", check=False
    ).stdout
    yield g
    g.eoid.systemctl("stop", check=False)
    g.sim.systemctl("stop", check=False)


@pytest.fixture
def fresh(guest: Guest) -> Iterator[Guest]:
    """eoid.service just started (not restarted) with a good configuration, devices up."""
    guest.write_config()
    guest.eoid.systemctl("stop")
    guest.eoid.systemctl("reset-failed", check=False)
    guest.eoid.systemctl("start")  # returns once READY=1 arrived (Type=notify)
    guest.wait_devices_up()
    yield guest
    guest.write_config()


@pytest.fixture
def running(guest: Guest) -> Iterator[Guest]:
    """eoid.service running with a good configuration on disk and every device up.

    A service a previous test left running is reused: under TCG every start
    costs some ten seconds of Python imports.
    """
    guest.write_config()
    state = guest.eoid.show("ActiveState", "SubState")
    if (state["ActiveState"], state["SubState"]) != ("active", "running"):
        guest.eoid.systemctl("reset-failed", check=False)
        guest.eoid.systemctl("start")
    guest.wait_devices_up()
    yield guest
    guest.write_config()


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def wait_restarted(service: Service, old_pid: int, n_restarts: int, timeout: float) -> None:
    def restarted() -> bool:
        p = service.show("NRestarts", "MainPID", "ActiveState", "SubState")
        return (
            int(p["NRestarts"]) > n_restarts
            and int(p["MainPID"]) not in {0, old_pid}
            and (p["ActiveState"], p["SubState"]) == ("active", "running")
        )

    wait_until(restarted, timeout, f"{service.unit} restarted (was pid {old_pid})")
