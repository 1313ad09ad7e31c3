"""Restart without loss: what eoid parks in systemd's fd store, and how it takes it back.

Kernel state lives as long as some process holds the fds: a device fd keeps INTx enabled
and auto-masking, an eventfd keeps its counter, a connected socket keeps its peer. So
eoid hands systemd (``FDSTORE=1``) a copy of everything a successor needs, under names:

- ``control``: the listening control socket;
- ``peer.N``: each consumer's connection (the consumer never sees it close);
- ``d.<device>.<role>``: each device's ``trigger``/``irq``/``eoi`` eventfds and the fds
  its backend holds (``device``/``group``/``container`` for vfio, ``unmask`` for sim);
- ``sim.<hash>``: the connection to an ``eoid sim`` process, which all the sim devices on
  its socket share (stored once: PID 1 keeps one copy of an fd, under its first name);
- ``state``: a memfd with a small versioned JSON record (which peer holds which device,
  the counters at the last graceful stop).

A restarted eoid gets them back through ``LISTEN_FDS``/``LISTEN_FDNAMES``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import structlog

from eoid.errors import EoidError
from eoid.systemd import Notifier, SystemdError, close_all, listen_fds

STATE_VERSION = 1
EVENTFD_ROLES = ("trigger", "irq", "eoi")


def device_fd_name(device: str, role: str) -> str:
    return f"d.{device}.{role}"


def sim_fd_name(socket_path: str) -> str:
    """The name of the connection to the sim at ``socket_path``: a hash, since a path may
    hold what an fd name may not (``:``, non-ASCII) and be longer."""
    return "sim." + hashlib.sha256(socket_path.encode()).hexdigest()[:16]


@dataclass
class Adopted:
    """What a previous eoid left us: sorted by purpose, all fds ours to keep or close."""

    control: socket.socket | None = None
    peers: dict[str, socket.socket] = field(default_factory=dict)
    devices: dict[str, dict[str, int]] = field(default_factory=dict)  # device → role → fd
    sims: dict[str, int] = field(default_factory=dict)  # sim_fd_name → fd, claimed on use
    state: dict[str, Any] = field(default_factory=dict)
    state_fd: int | None = None

    def take_device(self, name: str) -> dict[str, int] | None:
        """The device's fds if they are complete enough to adopt, else None (fds closed)."""
        fds = self.devices.pop(name, None)
        if fds is None:
            return None
        if all(role in fds for role in EVENTFD_ROLES):
            return fds
        close_all(fds.values())
        return None

    def close_rest(self) -> list[str]:
        """Close whatever nobody adopted (devices removed from the config meanwhile, sim
        connections no device uses any more); the store names to remove."""
        names = [device_fd_name(device, role) for device, fds in sorted(self.devices.items())
                 for role in sorted(fds)] + sorted(self.sims)
        for fds in self.devices.values():
            close_all(fds.values())
        self.devices.clear()
        close_all(self.sims.values())
        self.sims.clear()
        for sock in self.peers.values():
            sock.close()
        self.peers.clear()
        return names


def adopt(environ: dict[str, str] | None = None) -> Adopted:
    """Sort the fds systemd passed us (``LISTEN_FDS``) by their names."""
    adopted = Adopted()
    for name, fds in listen_fds(environ).items():
        if name == "control" and adopted.control is None:
            adopted.control = socket.socket(fileno=fds.pop(0))
        elif name.startswith("peer.") and len(fds) == 1:
            adopted.peers[name] = socket.socket(fileno=fds.pop())
        elif name == "state" and len(fds) == 1:
            adopted.state_fd = fds.pop()
            adopted.state = _read_state(adopted.state_fd)
        elif name.startswith("sim.") and len(fds) == 1:
            adopted.sims[name] = fds.pop()
        elif name.startswith("d.") and "." in name[2:] and len(fds) == 1:
            device, _, role = name[2:].rpartition(".")
            adopted.devices.setdefault(device, {})[role] = fds.pop()
        close_all(fds)  # duplicates or names we do not know: not ours to keep
    return adopted


def _read_state(fd: int) -> dict[str, Any]:
    try:
        size = os.fstat(fd).st_size
        data = json.loads(os.pread(fd, size, 0)) if size else {}
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return {}  # a record we do not understand is worth less than a fresh start
    return data


class FdStore:
    """Keeps systemd's fd store in step with what eoid holds; a no-op without systemd."""

    def __init__(self, notifier: Notifier, state_fd: int | None = None) -> None:
        self.notifier = notifier
        self.enabled = notifier.enabled
        self._log = structlog.get_logger("eoid.fdstore")
        self._state_fd = state_fd
        if self.enabled and state_fd is None:
            self._state_fd = os.memfd_create("eoid-state", os.MFD_CLOEXEC)
            self.put("state", self._state_fd)

    def put(self, name: str, fd: int) -> None:
        """Park a copy of ``fd``; storing the same fd again is harmless (PID 1 dedups)."""
        if not self.enabled:
            return
        try:
            self.notifier.fdstore(name, [fd])
        except (OSError, SystemdError) as e:  # without the store we still run, just lossy
            self._log.warning("fd store refused an fd", name=name, error=str(e))

    def remove(self, name: str) -> None:
        if not self.enabled:
            return
        try:
            self.notifier.fdstore_remove(name)
        except (OSError, SystemdError) as e:
            self._log.warning("fd store remove failed", name=name, error=str(e))

    def save_state(self, state: dict[str, Any]) -> None:
        """Rewrite the state record in place (PID 1 holds the same memfd)."""
        if self._state_fd is None:
            return
        data = json.dumps({"version": STATE_VERSION, **state}, separators=(",", ":")).encode()
        try:
            os.ftruncate(self._state_fd, 0)
            os.pwrite(self._state_fd, data, 0)
        except OSError as e:
            raise EoidError(f"cannot write the restart state record: {e.strerror}") from e
