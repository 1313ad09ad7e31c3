"""The daemon never waits on a sim process, and a sim's guests never wait on the daemon.

Two sim processes serve half the devices each; one is frozen (SIGSTOP, not dead) while the
daemon reloads devices on both: the daemon keeps answering and the other sim's devices keep
relaying, and after SIGCONT everything comes back and reconciles. Start-up of 1024 devices
with guests takes seconds, and ``eoid demo`` starts every time.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from eoid.control import ControlClient, wait_for_socket
from tests.helpers import Env, environment, wait_until

SIMS = ("a", "b")


class TwoSims:
    """A daemon whose devices ``a0``… live in sim A and ``b0``… in sim B, each sim with its
    own config (its socket, its lines and a guest per line)."""

    def __init__(self, env: Env, per_sim: int, spare: int = 1) -> None:
        self.env = env
        self.per_sim = per_sim
        self.sims: dict[str, subprocess.Popen[bytes]] = {}
        env.write_daemon()
        for path in (env.root / "devices.d").glob("*.yaml"):
            path.unlink()
        for sim in SIMS:
            root = env.root / f"sim-{sim}"
            (root / "devices.d").mkdir(parents=True)
            (root / "eoid.yaml").write_text(
                f"control: {{socket: {env.control}}}\n"
                f"metrics: {{listen: '127.0.0.1:0'}}\n"
                f"sim: {{socket: {self.socket(sim)}}}\n"
                "log: {format: json, level: info}\n")
            for n in range(per_sim + spare):  # spare lines: devices a reload adds
                (root / "devices.d" / f"{sim}{n}.yaml").write_text(
                    f"pci_address: '0000:{0x10 + SIMS.index(sim):02x}:{n:02x}.0'\n"
                    "backend: {type: sim}\n")
            for n in range(per_sim):
                self.add(f"{sim}{n}")

    def socket(self, sim: str) -> Path:
        return self.env.root / f"{sim}.sock"

    def add(self, name: str) -> None:
        sim = name[0]
        (self.env.root / "devices.d" / f"{name}.yaml").write_text(
            f"pci_address: '0000:{0x10 + SIMS.index(sim):02x}:{int(name[1:]):02x}.0'\n"
            f"backend: {{type: sim, socket: {self.socket(sim)}}}\n"
            "policy: {eoi_timeout: 500ms}\n")

    def remove(self, name: str) -> None:
        (self.env.root / "devices.d" / f"{name}.yaml").unlink()

    def start_sim(self, sim: str, rate: float) -> None:
        proc = self.env.eoid("sim", "-c", str(self.env.root / f"sim-{sim}" / "eoid.yaml"),
                             "--rate", str(rate), "--service-time", "0", log=f"sim-{sim}.log")
        assert wait_for_socket(self.socket(sim), 20, lambda: proc.poll() is None), \
            self.env.log(f"sim-{sim}")
        self.sims[sim] = proc

    def sim(self, sim: str, op: str, **fields: Any) -> dict[str, Any]:
        from eoid.demo import sim_call

        return sim_call(self.socket(sim), op, **fields)

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.env.status()["devices"]}


def all_attached(devices: dict[str, dict[str, Any]], names: set[str]) -> bool:
    return set(devices) == names and all(d["up"] and d["consumer"] for d in devices.values())


def reconcile(two: TwoSims, names: set[str]) -> None:
    """Stop the load, let every line drain, and check that what each sim's lines fired, what
    its guests saw and what the daemon counted agree, device by device."""
    for sim in SIMS:
        two.sim(sim, "quiesce")
    lines: dict[str, dict[str, Any]] = {}

    def drained() -> bool:
        lines.clear()
        for sim in SIMS:
            lines.update(two.sim(sim, "stats")["lines"])
        devices = two.devices()
        return all(not lines[n]["asserted"] and not lines[n]["masked"]
                   and not lines[n]["guest"]["in_service"] and devices[n]["state"] == "armed"
                   for n in names)

    wait_until(drained, 20, "every line drained")
    devices = two.devices()
    for name in sorted(names):
        line, guest, daemon = lines[name], lines[name]["guest"], devices[name]["counters"]
        assert line["raised"] == line["acked"], name
        assert (line["fires"], guest["irqs"], guest["eois"], line["unmasks"]) == (
            daemon["interrupts"], daemon["forwards"], daemon["eois"], daemon["unmasks"]), name


def timed_status(env: Env) -> tuple[float, dict[str, dict[str, Any]]]:
    began = time.monotonic()
    with ControlClient(env.control, timeout=30) as client:
        devices = {d["name"]: d for d in client.request("status")[0]["devices"]}
    return time.monotonic() - began, devices


def test_a_frozen_sim_delays_only_its_own_devices() -> None:
    with environment(devices=0) as env:
        two = TwoSims(env, per_sim=3)
        for sim in SIMS:
            two.start_sim(sim, rate=200)
        env.start_daemon(wait_up=False)
        names = {f"{sim}{n}" for sim in SIMS for n in range(3)}
        wait_until(lambda: all_attached(two.devices(), names), 20, "all attached")

        # While A is frozen the daemon is told to close a2 and open a3 (on A) and b3 (on B).
        two.remove("a2")
        two.add("a3")
        two.add("b3")
        os.kill(two.sims["a"].pid, signal.SIGSTOP)
        try:
            env.procs[-1].send_signal(signal.SIGHUP)
            slowest, samples = 0.0, []
            until = time.monotonic() + 2.5
            while time.monotonic() < until:
                took, devices = timed_status(env)
                slowest = max(slowest, took)
                samples.append(sum(devices[f"b{n}"]["counters"]["interrupts"]
                                   for n in range(3)))
                time.sleep(0.05)
            assert slowest < 0.5, f"status took {slowest:.2f}s while sim A was frozen"
            assert all(later > earlier for earlier, later in itertools.pairwise(samples)), \
                f"sim B's devices stalled: {samples}"
            assert devices["b3"]["up"], "b3 (on the running sim) did not come up"
            assert "a2" not in devices and not devices["a3"]["up"]
        finally:
            os.kill(two.sims["a"].pid, signal.SIGCONT)

        names = (names - {"a2"}) | {"a3", "b3"}
        wait_until(lambda: all_attached(two.devices(), names), 20, "all back and attached")
        wait_until(lambda: two.sim("a", "stats")["lines"]["a0"]["fires"] > 0, 5, "a0 fires")
        reconcile(two, names)


def test_daemon_starts_while_a_sim_is_frozen() -> None:
    """Start-up does not wait for a frozen sim: the other sim's devices come up at once."""
    with environment(devices=0) as env:
        two = TwoSims(env, per_sim=4)
        for sim in SIMS:
            two.start_sim(sim, rate=100)
        os.kill(two.sims["a"].pid, signal.SIGSTOP)
        try:
            env.start_daemon(wait_up=False)
            bs = {f"b{n}" for n in range(4)}
            wait_until(lambda: all(d["up"] and d["consumer"] for n, d in two.devices().items()
                                   if n in bs), 5, "sim B's devices up and attached")
            took, devices = timed_status(env)
            assert took < 0.5
            assert not any(devices[f"a{n}"]["up"] for n in range(4))
        finally:
            os.kill(two.sims["a"].pid, signal.SIGCONT)
        names = {f"{sim}{n}" for sim in SIMS for n in range(4)}
        wait_until(lambda: all_attached(two.devices(), names), 40, "sim A's devices recovered")
        reconcile(two, names)


DEVICES = 1024


def test_1024_devices_with_guests_come_up_within_10s() -> None:
    with environment(devices=0) as env:
        for n in range(DEVICES):
            env.write_device(f"d{n:04d}", index=0).write_text(
                f"pci_address: '0000:{1 + n // 32:02x}:{n % 32:02x}.0'\nbackend: {{type: sim}}\n")
        env.write_daemon()
        env.config.write_text(env.config.read_text().replace("level: debug", "level: info"))
        began = time.monotonic()
        sim = env.eoid("sim", "-c", str(env.config), "--rate", "10", log="sim.log")
        daemon = env.eoid("run", "-c", str(env.config), log="daemon.log")
        assert wait_for_socket(env.control, 20, lambda: daemon.poll() is None), env.log("daemon")
        assert wait_for_socket(env.sim_socket, 20, lambda: sim.poll() is None), env.log("sim")

        def up() -> bool:  # the sim's count: a status reply for 1024 devices is too large
            summary = env.sim("summary")
            return bool(summary["enabled"] == summary["attached"] == DEVICES)

        wait_until(up, 30, f"{DEVICES} devices up and attached")
        took = time.monotonic() - began
        print(f"{DEVICES} devices with guests up and attached in {took:.2f}s")
        assert took < 10, f"{DEVICES} devices took {took:.1f}s"


# --- eoid demo ------------------------------------------------------------------------------

def demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    from tests.helpers import free_port

    return subprocess.run([sys.executable, "-m", "eoid.cli", "demo", "--json",
                           "--metrics-listen", f"127.0.0.1:{free_port()}", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("attempt", range(50))
def test_demo_starts_every_time(attempt: int) -> None:
    result = demo("--duration", "0.5", "--devices", "2", "--rate", "200")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@contextmanager
def taken_port() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_demo_that_cannot_start_says_why_in_one_line() -> None:
    with taken_port() as port:
        result = subprocess.run([sys.executable, "-m", "eoid.cli", "demo", "--json",
                                 "--duration", "1", "--metrics-listen", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("eoid demo: the daemon did not start: ") \
        and "cannot serve metrics" in lines[0], lines[0]
