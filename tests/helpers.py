"""Real processes and real fds for the integration tests: a sim, a daemon, a consumer."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from eoid.control import ControlClient, wait_for_socket
from eoid.demo import Samples, scrape, sim_call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


class Env:
    """A short-pathed work dir (unix socket paths are limited to 108 bytes) with a config."""

    def __init__(self, root: Path, devices: int = 2, device_yaml: str = "",
                 daemon_yaml: str = "") -> None:
        self.root = root
        self.config = root / "eoid.yaml"
        self.control = root / "control.sock"
        self.sim_socket = root / "sim.sock"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.procs: list[subprocess.Popen[bytes]] = []
        (root / "devices.d").mkdir()
        self.write_daemon(daemon_yaml)
        for i in range(devices):
            self.write_device(f"dev{i}", device_yaml)

    def write_daemon(self, extra: str = "") -> None:
        self.config.write_text(
            f"control: {{socket: {self.control}, socket_mode: '0666'}}\n"
            f"metrics: {{listen: '127.0.0.1:{self.port}'}}\n"
            f"sim: {{socket: {self.sim_socket}}}\n"
            "log: {format: json, level: debug}\n" + extra)

    def write_device(self, name: str, extra: str = "", index: int | None = None) -> Path:
        n = index if index is not None else int("".join(c for c in name if c.isdigit()) or 0)
        path = self.root / "devices.d" / f"{name}.yaml"
        path.write_text(f"pci_address: '0000:00:{0x10 + n:02x}.0'\nbackend: {{type: sim}}\n"
                        + extra)
        return path

    def eoid(self, *args: str, log: str | None = None) -> subprocess.Popen[bytes]:
        out = os.open(self.root / log, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if log \
            else subprocess.DEVNULL
        try:
            proc = subprocess.Popen([sys.executable, "-m", "eoid.cli", *args], stdout=out,
                                    stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
        finally:
            if log:
                os.close(out)
        self.procs.append(proc)
        return proc

    def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an eoid command (``status``, ``reload``, …) against this environment's
        config to its end, as an operator would."""
        return subprocess.run([sys.executable, "-m", "eoid.cli", *args, "-c", str(self.config)],
                              capture_output=True, text=True, timeout=30, check=False)

    def start_sim(self, *args: str) -> subprocess.Popen[bytes]:
        proc = self.eoid("sim", "-c", str(self.config), "--rate", "0", "--no-guests", *args,
                         log="sim.log")
        assert wait_for_socket(self.sim_socket, 20, lambda: proc.poll() is None), self.log("sim")
        return proc

    def start_daemon(self, wait_up: bool = True) -> subprocess.Popen[bytes]:
        proc = self.eoid("run", "-c", str(self.config), log="daemon.log")
        assert wait_for_socket(self.control, 20, lambda: proc.poll() is None), \
            self.log("daemon")
        if wait_up:
            wait_until(lambda: all(d["up"] for d in self.status()["devices"]), 10,
                       "devices up")
        return proc

    def status(self) -> dict[str, Any]:
        with ControlClient(self.control) as client:
            return client.status()

    def device(self, name: str) -> dict[str, Any]:
        return next(d for d in self.status()["devices"] if d["name"] == name)

    def sim(self, op: str, **fields: Any) -> dict[str, Any]:
        return sim_call(self.sim_socket, op, **fields)

    def scrape(self) -> Samples:
        return scrape(self.url)

    def log(self, role: str) -> str:
        path = self.root / f"{role}.log"
        return path.read_text() if path.exists() else ""

    def log_events(self, role: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log(role).splitlines()
                if line.startswith("{")]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def environment(**kwargs: Any) -> Iterator[Env]:
    root = Path(tempfile.mkdtemp(prefix="eoid-t", dir="/tmp"))
    root.chmod(0o755)  # other uids must reach the socket: its own mode is what guards it
    env = Env(root, **kwargs)
    try:
        yield env
    finally:
        env.stop()
        shutil.rmtree(root, ignore_errors=True)


class Consumer:
    """A VMM's part, done by hand: attach, wait for irq, write eoi."""

    def __init__(self, control: Path, device: str) -> None:
        self.client = ControlClient(control)
        self.device = device
        try:
            self.reply, fds = self.client.request("attach", device=device)
        except BaseException:
            self.client.close()
            raise
        self.irq, self.eoi = fds[0], fds[1]
        self.extra = fds[2:]

    def wait_irq(self, timeout: float = 5.0) -> int:
        """The count read from the irq eventfd, or 0 if nothing came within ``timeout``."""
        ready, _, _ = select.select([self.irq], [], [], timeout)
        if not ready:
            return 0
        try:
            return os.eventfd_read(self.irq)
        except BlockingIOError:
            return 0

    def send_eoi(self) -> None:
        os.eventfd_write(self.eoi, 1)

    def close(self) -> None:
        for fd in (self.irq, self.eoi, *self.extra):
            os.close(fd)
        self.client.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
