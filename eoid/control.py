"""The control socket: consumers attach to devices here and receive their eventfds.

``AF_UNIX``/``SOCK_SEQPACKET``, one JSON object per message, fds by ``SCM_RIGHTS``.
Requests carry ``op`` and an optional ``id`` echoed in the reply. Replies are
``{"ok": true, …}`` or ``{"ok": false, "error": {"code", "message"}}``. The daemon may
also send unsolicited ``{"event": …}`` messages to a consumer (device down, shutdown).
Every peer is identified by ``SO_PEERCRED``; nothing a peer sends can reach a device
unless the device's ``consumers`` allow that peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from eoid.config import Access, ControlConfig
from eoid.errors import EoidError, ProtocolError
from eoid.wire import peer_credentials, recv_msg, send_msg

PROTOCOL_VERSION = 1


def peer_groups(pid: int, gid: int) -> frozenset[int]:
    """The peer's primary and supplementary groups (from /proc; SO_PEERCRED has only one)."""
    gids = {gid}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                gids.update(int(g) for g in line.split()[1:])
                break
    return frozenset(gids)


@dataclass(eq=False)
class Peer:
    """One connection on the control socket and what it holds."""

    sock: socket.socket
    pid: int
    uid: int
    gids: frozenset[int]
    attached: set[str] = field(default_factory=set)

    def describe(self) -> dict[str, int]:
        return {"pid": self.pid, "uid": self.uid}

    def notify(self, message: dict[str, Any]) -> None:
        """Best effort: a consumer that does not read its socket cannot stall the daemon."""
        with contextlib.suppress(OSError):
            send_msg(self.sock, message)


class ControlHandler(Protocol):
    """What the control server asks of the daemon."""

    def attach(self, peer: Peer, device: str) -> tuple[dict[str, Any], list[int]]: ...

    def detach(self, peer: Peer, device: str) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def reload(self) -> None: ...

    def peer_closed(self, peer: Peer) -> None: ...


class ControlServer:
    """Accepts peers and answers their requests on the event loop, never blocking it."""

    def __init__(self, config: ControlConfig, handler: ControlHandler,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.handler = handler
        self.loop = loop
        self.peers: set[Peer] = set()
        self.sock: socket.socket | None = None
        self._log = structlog.get_logger("eoid.control")

    def listen(self, inherited: socket.socket | None = None) -> socket.socket:
        """Bind the socket (or adopt one kept across a restart) and start accepting."""
        if inherited is not None:
            self.sock = inherited
        else:
            self.sock = self._bind(self.config.socket)
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)
        return self.sock

    def _bind(self, path: Path) -> socket.socket:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise EoidError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a stale socket from a daemon that died
            else:
                raise EoidError(f"another eoid is already listening on {path}")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o777)  # no window where the socket exists with looser permissions
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        if self.config.socket_group is not None:
            os.chown(path, -1, self.config.socket_group)
        os.chmod(path, self.config.socket_mode)
        sock.listen(64)
        return sock

    def close(self, handover: bool = False) -> None:
        """Stop serving. A handover leaves the socket file and tells the daemon of no
        closed peers: their connections live on in the fd store for the successor."""
        for peer in list(self.peers):
            if handover:
                self.peers.discard(peer)
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(peer.sock.fileno())
                peer.sock.close()
            else:
                self._drop(peer)
        if self.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            if not handover:
                with contextlib.suppress(FileNotFoundError):
                    self.config.socket.unlink()

    def adopt_peer(self, sock: socket.socket) -> Peer:
        """Serve a connection accepted before a restart (kept in systemd's fd store)."""
        sock.setblocking(False)
        pid, uid, gid = peer_credentials(sock)
        peer = Peer(sock, pid, uid, peer_groups(pid, gid))
        self.peers.add(peer)
        self.loop.add_reader(sock.fileno(), self._readable, peer)
        return peer

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: keep serving the others
                self._log.warning("control accept failed", error=e.strerror)
                return
            self.adopt_peer(conn)

    def _readable(self, peer: Peer) -> None:
        try:
            received = recv_msg(peer.sock, self.config.max_message_bytes)
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as e:
            self._reply(peer, None, error=e)
            return
        except OSError:
            received = None
        if received is None:
            self._drop(peer)
            return
        message, fds = received
        for fd in fds:  # no request of ours takes fds; never keep what a peer pushes at us
            os.close(fd)
        request_id = message.get("id")
        try:
            reply, out_fds = self._dispatch(peer, message)
        except ProtocolError as e:
            self._reply(peer, request_id, error=e)
            return
        except EoidError as e:
            self._reply(peer, request_id, error=ProtocolError("failed", str(e)))
            return
        try:
            self._reply(peer, request_id, reply, out_fds)
        finally:
            for fd in out_fds:
                os.close(fd)

    def _dispatch(self, peer: Peer, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op = message.get("op")
        device = message.get("device")
        if op == "hello":
            from eoid import __version__

            return {"protocol": PROTOCOL_VERSION, "version": __version__,
                    "uid": peer.uid, "pid": os.getpid()}, []
        if op in ("attach", "detach"):
            if not isinstance(device, str):
                raise ProtocolError("bad_request", f"{op} needs a 'device' string")
            if op == "attach":
                return self.handler.attach(peer, device)
            self.handler.detach(peer, device)
            return {"device": device}, []
        if op == "status":
            self._authorize(peer, self.config.status)
            return self.handler.status(), []
        if op == "reload":
            if peer.uid not in (0, os.getuid()):
                raise ProtocolError("forbidden", "only root or the daemon's user may reload")
            self.handler.reload()
            return {}, []
        raise ProtocolError("unknown_op", f"unknown op {op!r} "
                            "(expected hello, attach, detach, status, reload)")

    @staticmethod
    def _authorize(peer: Peer, access: Access | None) -> None:
        if access is not None and peer.uid != os.getuid() and not access.allows(peer.uid,
                                                                                peer.gids):
            raise ProtocolError("forbidden", f"uid {peer.uid} may not do this")

    def _reply(self, peer: Peer, request_id: Any, body: dict[str, Any] | None = None,
               fds: list[int] | None = None, error: ProtocolError | None = None) -> None:
        message: dict[str, Any]
        if error is not None:
            message = {"ok": False, "error": {"code": error.code, "message": str(error)}}
        else:
            message = {"ok": True, **(body or {})}
        if request_id is not None:
            message["id"] = request_id
        try:
            send_msg(peer.sock, message, fds or ())
        except OSError:
            self._drop(peer)

    def _drop(self, peer: Peer) -> None:
        if peer not in self.peers:
            return
        self.peers.discard(peer)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(peer.sock.fileno())
        self.handler.peer_closed(peer)
        peer.sock.close()


class ControlClient:
    """A blocking client: ``eoid status``, tests and the simulated guests use it."""

    def __init__(self, path: Path | str, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except OSError as e:
            self.sock.close()
            raise EoidError(f"cannot connect to {self.path}: {e.strerror}") from e
        self.events: deque[dict[str, Any]] = deque()
        self._next_id = 0

    def request(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """Send one request; return the reply and its fds. Raises ``ProtocolError`` on refusal."""
        self._next_id += 1
        request_id = self._next_id
        send_msg(self.sock, {"op": op, "id": request_id, **fields})
        while True:
            received = recv_msg(self.sock, 1 << 24)
            if received is None:
                raise EoidError(f"{self.path}: the daemon closed the connection")
            reply, fds = received
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != request_id:
                for fd in fds:
                    os.close(fd)
                continue
            if not reply.get("ok"):
                for fd in fds:
                    os.close(fd)
                err = reply.get("error") or {}
                raise ProtocolError(str(err.get("code", "failed")), str(err.get("message", "")))
            return reply, fds

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_socket(path: Path, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll until something listens on ``path`` (start-up of a subprocess daemon)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(str(path))
            return True
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise
        finally:
            probe.close()
        time.sleep(0.02)
    return False

