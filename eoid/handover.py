"""The restart record: which consumer holds which device, kept in the fd store with the
consumers' connections, so that a successor (a restart, or after a crash) serves the
same consumers on the same devices (README, "Install on a host": the unit's fd store)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from eoid.consumer import Consumer
from eoid.errors import EoidError
from eoid.fdstore import FdStore
from eoid.runner import DeviceRunner

_LOG = structlog.get_logger("eoid")


class RestartRecord:
    """Consumers' connections stored as ``peer.N``, and the record naming who holds what
    (with the counters, at a handover)."""

    def __init__(self, store: FdStore, previous: Mapping[str, Any]) -> None:
        self._store = store
        self._previous = previous.get("devices", {})
        self._names: dict[Consumer, str] = {}  # consumers whose connection is stored
        self._next = 1

    def adopt_peers(self, peers: Mapping[str, socket.socket],
                    adopt: Callable[[socket.socket], Consumer]) -> None:
        """The connections a predecessor stored, served again (``adopt``) under their names."""
        for name, sock in sorted(peers.items()):
            self._names[adopt(sock)] = name
            self._next = max(self._next, int(name.split(".")[1]) + 1)

    def holder(self, device: str) -> Consumer | None:
        """The consumer that held ``device`` before the restart, if it is still connected."""
        wanted = self._previous.get(device, {}).get("peer")
        return next((peer for peer, name in self._names.items() if name == wanted), None)

    def keep(self, peer: Consumer, fd: int) -> None:
        """Store a consumer's connection (``fd``) the first time it attaches."""
        if peer not in self._names:
            self._names[peer] = name = f"peer.{self._next}"
            self._next += 1
            self._store.put(name, fd)

    def drop(self, peer: Consumer) -> bool:
        """The consumer's connection closed: no longer stored. Whether it was."""
        name = self._names.pop(peer, None)
        if name is not None:
            self._store.remove(name)
        return name is not None

    def save(self, runners: Mapping[str, DeviceRunner], with_stats: bool = False) -> None:
        """Write the record: who holds which device (and, at a handover, the counters)."""
        devices: dict[str, Any] = {}
        for name, runner in runners.items():
            consumer = runner.consumer
            entry: dict[str, Any] = {"peer": self._names.get(consumer) if consumer else None}
            if with_stats:
                entry["stats"] = runner.stats.to_dict()
            devices[name] = entry
        try:
            self._store.save_state({"pid": os.getpid(), "devices": devices})
        except EoidError as e:
            _LOG.warning("restart record not saved", error=str(e))
