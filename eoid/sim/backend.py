"""The daemon's ``sim`` backend: an ``IntxDevice`` whose line lives in an ``eoid sim`` process.

It mirrors the vfio backend's shape: enable passes the trigger eventfd (and an unmask
eventfd, the analogue of VFIO's eventfd unmask) over a unix socket; the hot-path unmask
is one eventfd write. If the sim process goes away the socket reports EOF: ``GONE``.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections import deque
from pathlib import Path
from typing import Any

from eoid.device import DeviceEvent, DeviceInfo
from eoid.errors import DeviceError, EoidError
from eoid.wire import recv_msg, send_msg

CALL_TIMEOUT = 2.0


class SimDevice:
    """One simulated line, opened through the sim process's socket."""

    def __init__(self, name: str, line: str, socket_path: Path, pci_address: str,
                 adopt: dict[str, int] | None = None) -> None:
        self.name = name
        self.line = line
        self._info = DeviceInfo("sim", pci_address, {"line": line, "socket": str(socket_path)})
        self._events: deque[DeviceEvent] = deque()
        if adopt is not None:  # re-adopted after a restart: the sim never noticed we left
            self.sock = socket.socket(fileno=adopt["sim"])
            self.unmask_fd = adopt["unmask"]
            self.sock.settimeout(CALL_TIMEOUT)
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(CALL_TIMEOUT)
        try:
            self.sock.connect(str(socket_path))
            self._call("open", line=line)
        except (OSError, EoidError) as e:
            self.sock.close()
            msg = e.strerror if isinstance(e, OSError) else str(e)
            raise DeviceError(name, "open", f"simulated line {line!r} at {socket_path}: {msg}"
                              " (is `eoid sim` running?)") from e
        self.unmask_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def info(self) -> DeviceInfo:
        return self._info

    def _call(self, op: str, fds: list[int] | tuple[int, ...] = (), **fields: Any) -> None:
        try:
            send_msg(self.sock, {"op": op, **fields}, fds)
            while True:
                received = recv_msg(self.sock)
                if received is None:
                    raise DeviceError(self.name, op, "the sim process closed the connection")
                reply, extra = received
                for fd in extra:
                    os.close(fd)
                if "event" in reply:
                    self._queue_event(reply)
                    continue
                if not reply.get("ok"):
                    raise DeviceError(self.name, op, str(reply.get("error", {}).get("message")))
                return
        except OSError as e:
            raise DeviceError(self.name, op, "sim socket failed", e.errno) from e

    def _queue_event(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(ValueError):
            self._events.append(DeviceEvent(message["event"]))

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
        if self.unmask_fd >= 0:
            os.close(self.unmask_fd)
            self.unmask_fd = -1
        self.sock.close()

    def event_fds(self) -> list[int]:
        return [self.sock.fileno()]

    def read_event(self, fd: int) -> DeviceEvent | None:
        if self._events:
            return self._events.popleft()
        try:
            self.sock.setblocking(False)
            received = recv_msg(self.sock)
        except BlockingIOError:
            return None
        except (OSError, EoidError):
            return DeviceEvent.GONE
        finally:
            if self.sock.fileno() >= 0:
                self.sock.settimeout(CALL_TIMEOUT)
        if received is None:
            return DeviceEvent.GONE
        message, fds = received
        for extra in fds:
            os.close(extra)
        self._queue_event(message)
        return self._events.popleft() if self._events else None

    def held_fds(self) -> dict[str, int]:
        return {"sim": self.sock.fileno(), "unmask": self.unmask_fd}
