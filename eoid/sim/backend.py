"""The daemon's ``sim`` backend: an ``IntxDevice`` whose line lives in an ``eoid sim`` process.

It mirrors the vfio backend's shape: enable passes the trigger eventfd (and an unmask
eventfd, the analogue of VFIO's eventfd unmask) over a unix socket; the hot-path unmask
is one eventfd write.

All the devices on one sim socket share one connection (``SimConnection``), so a sim
device costs eoid four fds (its three eventfds and the unmask eventfd) and a sim process
one more: 4096 devices fit in a 20,000-fd limit. Requests name their line, events come
back naming theirs and reach the device's ``watch`` callback (a shared socket can have
one loop reader only, so ``event_fds`` is empty); an EOF is ``GONE`` for every device.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eoid.device import DeviceEvent, DeviceInfo
from eoid.errors import DeviceError, EoidError, ProtocolError
from eoid.fdstore import FdStore, sim_fd_name
from eoid.systemd import close_all
from eoid.wire import recv_msg, send_msg

CALL_TIMEOUT = 2.0


class SimConnections:
    """A daemon's connections to sim processes: one per socket path, kept while some device
    uses it, and parked in the fd store meanwhile (``sim_fd_name``)."""

    def __init__(self, store: FdStore | None = None, adopted: dict[str, int] | None = None,
                 ) -> None:
        self._store = store
        self._adopted = {} if adopted is None else adopted  # from the store; popped on use
        self._open: dict[str, SimConnection] = {}

    def open(self, path: Path, device: SimDevice) -> SimConnection:
        """The connection to ``path``, with ``device``'s line opened on it."""
        conn = self._get(str(path)) or self._connect(str(path))
        try:
            conn.add(device)
            conn.call(device.name, "open", line=device.line)
        except DeviceError:
            conn.remove(device)
            raise
        return conn

    def adopt(self, path: Path, device: SimDevice) -> SimConnection:
        """The stored connection to ``path``, on which a previous eoid opened ``device``."""
        conn = self._get(str(path))
        if conn is None or not conn.adopted:
            raise DeviceError(device.name, "adopt", f"no stored connection to {path}")
        conn.add(device)
        return conn

    def close(self) -> None:
        """Let go of every connection without telling the sims: at a handover, the fd
        store's copies keep their lines open for the next eoid."""
        for conn in list(self._open.values()):
            self.discard(conn, keep_stored=True)

    def _get(self, path: str) -> SimConnection | None:
        conn = self._open.get(path)
        fd = self._adopted.pop(sim_fd_name(path), None) if conn is None else None
        if fd is not None:
            conn = self._open[path] = SimConnection(self, path, socket.socket(fileno=fd),
                                                       adopted=True)
        return conn

    def _connect(self, path: str) -> SimConnection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CALL_TIMEOUT)
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        conn = self._open[path] = SimConnection(self, path, sock, adopted=False)
        if self._store is not None:
            self._store.put(sim_fd_name(path), sock.fileno())
        return conn

    def discard(self, conn: SimConnection, keep_stored: bool = False) -> None:
        """Close ``conn`` (and take it out of the fd store, unless ``keep_stored``)."""
        conn.shut()
        if self._open.get(conn.path) is conn:
            del self._open[conn.path]
            if self._store is not None and not keep_stored:
                self._store.remove(sim_fd_name(conn.path))


class SimConnection:
    """One SEQPACKET connection to a sim process, shared by the devices on it (``devices``
    is its reference count). Requests are answered in turn, matched by ``id``."""

    def __init__(self, owner: SimConnections, path: str, sock: socket.socket, *,
                 adopted: bool) -> None:
        self.owner = owner
        self.path = path
        self.sock: socket.socket | None = sock
        self.adopted = adopted  # from the fd store: a previous eoid opened its lines
        self.devices: dict[str, SimDevice] = {}  # line → device
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        sock.settimeout(CALL_TIMEOUT)

    def fileno(self) -> int:
        return -1 if self.sock is None else self.sock.fileno()

    def add(self, device: SimDevice) -> None:
        if self.devices.setdefault(device.line, device) is not device:
            raise DeviceError(device.name, "open", f"line {device.line!r} is already open "
                              f"by {self.devices[device.line].name}")

    def remove(self, device: SimDevice) -> None:
        """``device`` is done: free its line in the sim; the last one closes the connection."""
        if self.devices.get(device.line) is not device:
            return
        del self.devices[device.line]
        if self.sock is not None and self.devices:
            with contextlib.suppress(DeviceError):
                self.call(device.name, "close", line=device.line)
        if not self.devices:
            self.owner.discard(self)

    def call(self, name: str, op: str, fds: tuple[int, ...] = (), **fields: Any,
             ) -> dict[str, Any]:
        """Send device ``name``'s request and wait for its reply; events that come first
        are routed."""
        if self.sock is None:
            raise DeviceError(name, op, "the sim process closed the connection")
        ident = next(self._ids)
        try:
            send_msg(self.sock, {"op": op, "id": ident, **fields}, fds)
            while True:
                received = recv_msg(self.sock)
                if received is None:
                    self._lost()
                    raise DeviceError(name, op, "the sim process closed the connection")
                reply, extra = received
                close_all(extra)
                if "event" in reply:
                    self._route(reply)
                elif reply.get("id") == ident:  # else the late reply to a call that timed out
                    if not reply.get("ok"):
                        raise DeviceError(name, op, str(reply.get("error", {}).get("message")))
                    return reply
        except (TimeoutError, ProtocolError) as e:
            raise DeviceError(name, op, f"no usable reply from the sim process: {e}") from e
        except OSError as e:
            self._lost()
            raise DeviceError(name, op, "sim socket failed", e.errno) from e

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read events from ``loop`` (once: every device on the connection uses one loop)."""
        if self._loop is None and self.sock is not None:
            self._loop = loop
            loop.add_reader(self.sock.fileno(), self._readable)

    def shut(self) -> None:
        if self.sock is None:
            return
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            sock.setblocking(False)
            received = recv_msg(sock)
        except (BlockingIOError, ProtocolError):
            return  # nothing after all, or a message that was not one (dropped)
        except OSError:
            received = None
        finally:
            sock.settimeout(CALL_TIMEOUT)
        if received is None:
            self._lost()
            return
        message, fds = received
        close_all(fds)
        if "event" in message:
            self._route(message)

    def _route(self, message: dict[str, Any]) -> None:
        device = self.devices.get(str(message.get("line")))
        if device is not None:
            with contextlib.suppress(ValueError):  # an event this eoid does not know
                device.post(DeviceEvent(message["event"]))

    def _lost(self) -> None:
        """The sim process went away: every device on the connection is ``GONE``."""
        self.owner.discard(self)
        for device in list(self.devices.values()):
            device.post(DeviceEvent.GONE)


class SimDevice:
    """One simulated line, on the connection its sim process's devices share."""

    def __init__(self, name: str, line: str, socket_path: Path, pci_address: str,
                 *, connections: SimConnections, adopt: dict[str, int] | None = None) -> None:
        self.name = name
        self.line = line
        self._info = DeviceInfo("sim", pci_address, {"line": line, "socket": str(socket_path)})
        self._events: list[DeviceEvent] = []  # rarely more than one; a deque costs 600 B
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: Callable[[int], None] | None = None
        if adopt is not None:  # re-adopted after a restart: the sim never noticed we left
            self.unmask_fd = adopt.pop("unmask", -1)
            close_all(adopt.values())  # not ours (an older eoid's per-device socket)
            if self.unmask_fd < 0:
                raise DeviceError(name, "adopt", "no stored unmask eventfd")
            try:
                self.conn = connections.adopt(socket_path, self)
            except DeviceError:
                os.close(self.unmask_fd)
                raise
            return
        try:
            self.conn = connections.open(socket_path, self)
        except (OSError, EoidError) as e:
            msg = e.strerror if isinstance(e, OSError) else str(e)
            raise DeviceError(name, "open", f"simulated line {line!r} at {socket_path}: {msg}"
                              " (is `eoid sim` running?)") from e
        self.unmask_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def info(self) -> DeviceInfo:
        return self._info

    def _call(self, op: str, fds: tuple[int, ...] = ()) -> None:
        self.conn.call(self.name, op, fds, line=self.line)

    def watch(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[int], None]) -> None:
        """Deliver this device's events by calling ``on_event(fd)`` from ``loop``; it is to
        call ``read_event``. (No fd of its own to watch: the socket is shared.)"""
        self._loop, self._on_event = loop, on_event
        self.conn.watch(loop)
        for _ in self._events:
            loop.call_soon(self._notify)

    def post(self, event: DeviceEvent) -> None:
        """An event for this device; it reaches ``on_event`` from the loop, never from
        inside a call (which another device's request may be in the middle of)."""
        self._events.append(event)
        if self._loop is not None:
            self._loop.call_soon(self._notify)

    def _notify(self) -> None:
        if self._on_event is not None and self._events:
            self._on_event(self.conn.fileno())

    def enable(self, trigger_fd: int) -> None:
        self._call("enable", fds=(trigger_fd, self.unmask_fd))

    def unmask(self) -> None:
        os.eventfd_write(self.unmask_fd, 1)

    def unmask_op(self) -> tuple[int, int, bytes]:
        return (self.unmask_fd, 0, b"")

    def mask(self) -> None:
        self._call("mask")

    def disable(self) -> None:
        self._call("disable")

    def close(self) -> None:
        self._on_event = None
        self.conn.remove(self)
        if self.unmask_fd >= 0:
            os.close(self.unmask_fd)
            self.unmask_fd = -1

    def event_fds(self) -> list[int]:
        return []  # events come through ``watch``

    def read_event(self, fd: int) -> DeviceEvent | None:
        return self._events.pop(0) if self._events else None

    def held_fds(self) -> dict[str, int]:
        return {"unmask": self.unmask_fd}
