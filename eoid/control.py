"""The control socket: consumers attach to devices here and receive their eventfds.

``AF_UNIX``/``SOCK_SEQPACKET``, one JSON object per message, fds by ``SCM_RIGHTS``.
Requests carry ``op`` and an optional ``id`` echoed in the reply. Replies are
``{"ok": true, …}`` or ``{"ok": false, "error": {"code", "message"}}``. The daemon may
also send unsolicited ``{"event": …}`` messages to a consumer (device down, shutdown).
Every peer is identified by the kernel (``SO_PEERCRED`` and ``SO_PEERGROUPS``); nothing
a peer sends can reach a device unless the device's ``consumers`` allow that peer.

Against a hostile peer (see RELIABILITY.md): every message gets exactly one reply, or
the connection is closed (a peer that does not read its replies, one over its uid's
connection limit); no fd a peer sends is kept; nothing it sends raises out of the
handler; an attach whose reply cannot be sent is undone; accept failures (out of fds)
pause the listener with a backoff instead of spinning; refusals are logged with the
peer's credentials, a bounded number per uid.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import json
import math
import os
import secrets
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from eoid.config import Access, ControlConfig, Datapath
from eoid.errors import (
    DeviceBusy,
    EoidError,
    NotAllowed,
    NotAttached,
    ProtocolError,
    Refused,
    UnknownDevice,
)
from eoid.wire import encode, peer_credentials, peer_groups, recv_msg, send_data, send_msg

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 256  # a string ``id`` longer than this is refused (it is echoed back)
MAX_ERROR_CHARS = 512  # error messages quote what the peer sent: at most this much
MAX_DEVICE_CHARS = 64  # longer than any device name the configuration accepts
ACCEPT_BATCH = 64  # connections accepted per wake-up, so accepting never starves requests
ACCEPT_BACKOFF_INITIAL = 0.05  # seconds the listener pauses after an accept failure...
ACCEPT_BACKOFF_MAX = 2.0  # ...doubling up to this while failures go on
STATUS_PAGE = 64  # devices in one status reply at most: bounded work and size per request
STATUS_REPLY_BYTES = 65536  # a status reply never exceeds this (well under a socket's buffer)
STATUS_PROBLEM_BYTES = 12288  # of which a rejected reload's problems take at most this
RELOAD_PROBLEM_BYTES = 32768  # and of a reload's reply
AUDIT_BURST = 10  # refusals logged per uid in each window; the rest are counted
AUDIT_WINDOW = 60.0  # seconds
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
CODES = ("bad_json", "bad_request", "too_large", "too_many_fds", "too_many_connections",
         "unknown_op", "unknown_device", "forbidden", "busy", "not_attached", "failed")
"""Every error code a peer can receive (the README lists each)."""
REFUSALS: dict[type[Refused], str] = {UnknownDevice: "unknown_device", NotAllowed: "forbidden",
                                      DeviceBusy: "busy", NotAttached: "not_attached"}
"""The protocol's code for each refusal the daemon's runners raise."""


@dataclass(eq=False)
class Peer:
    """One connection on the control socket and what it holds."""

    sock: socket.socket
    pid: int
    uid: int
    gids: frozenset[int]
    attached: set[str] = field(default_factory=set)
    gid: int = -1  # primary group (also in ``gids``)

    def describe(self) -> dict[str, int]:
        return {"pid": self.pid, "uid": self.uid}

    def device_event(self, event: str, device: str, reason: str | None = None) -> None:
        message = {"event": event, "device": device}
        if reason is not None:
            message["reason"] = reason
        self.notify(message)

    def notify(self, message: dict[str, Any]) -> None:
        """Best effort: a consumer that does not read its socket cannot stall the daemon."""
        with contextlib.suppress(OSError, ValueError):
            send_msg(self.sock, message)


class ControlHandler(Protocol):
    """What the control server asks of the daemon."""

    def attach(self, peer: Peer, device: str) -> tuple[dict[str, Any], list[int]]: ...

    def detach(self, peer: Peer, device: str) -> None: ...

    def daemon_status(self) -> dict[str, Any]: ...

    def device_names(self) -> list[str]: ...

    def device_status(self, device: str) -> dict[str, Any]: ...

    def reload(self) -> dict[str, Any]: ...

    def reset(self, device: str) -> dict[str, Any]: ...

    def set_datapath(self, device: str, datapath: Datapath | None) -> dict[str, Any]: ...

    def observe(self, device: str, duration_ns: int) -> dict[str, Any]: ...

    def peer_closed(self, peer: Peer) -> None: ...


def _valid_id(value: Any) -> bool:
    """An ``id`` we can echo: a JSON scalar, finite, and short (it comes back to the peer)."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -(1 << 63) <= value < (1 << 64)
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS


def _datapath(value: Any) -> Datapath | None:
    """A ``datapath`` request's path: relay, kernel, or ``configured`` (None)."""
    if value == "configured":
        return None
    if isinstance(value, str) and value in Datapath.__members__.values():
        return Datapath(value)
    raise ProtocolError("bad_request", "'datapath' must be relay, kernel or configured")


OBSERVE_MIN_NS, OBSERVE_MAX_NS = 10**7, 3600 * 10**9  # as ``observe: for:`` (10ms to 1h)


def _observe_ns(value: Any) -> int:
    """An ``observe`` request's ``seconds``, checked before it becomes a timer."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            ns = float(value) * 1e9
        except OverflowError:  # an int of hundreds of digits
            ns = math.inf
        if OBSERVE_MIN_NS <= ns <= OBSERVE_MAX_NS:  # (NaN compares false)
            return round(ns)
    raise ProtocolError("bad_request", "'seconds' must be a number from 0.01 to 3600")


def _short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _operator(peer: Peer) -> bool:
    """Root or the daemon's own user: may reload, reset, move datapaths, and see who
    holds a device."""
    return peer.uid in (0, os.getuid())


def _device_entry(status: dict[str, Any], operator: bool) -> dict[str, Any]:
    """A device in a status reply: ``attached`` for everyone, the consumer's pid and uid
    for operators only (another user's VMM is none of a peer's business), and a
    ``down_reason`` cut short, so that one entry is always far below a page's bound."""
    entry = dict(status)
    entry["attached"] = entry.get("consumer") is not None
    if not operator:
        entry.pop("consumer", None)
    if isinstance(entry.get("down_reason"), str):
        entry["down_reason"] = _short(entry["down_reason"])
    return entry


def _bounded_problems(result: dict[str, Any], budget: int) -> dict[str, Any]:
    """A rejected reload's ``problems`` within ``budget`` bytes: the first ones, each cut
    short, and ``problems_omitted`` counting the rest (the daemon's log has them all), so
    that a reply about a thousand broken files still fits one message."""
    problems = result.get("problems")
    if not isinstance(problems, list) or not problems:
        return result
    kept: list[str] = []
    for problem in problems:
        text = _short(str(problem))
        budget -= len(json.dumps(text)) + 1
        if budget < 0:
            break
        kept.append(text)
    return {**result, "problems": kept, "problems_omitted": len(problems) - len(kept)}


def _bounded_daemon(daemon: dict[str, Any]) -> dict[str, Any]:
    """The daemon's part of a status reply, its last reload's problems bounded."""
    last = daemon.get("last_reload")
    if not isinstance(last, dict):
        return daemon
    return {**daemon, "last_reload": _bounded_problems(last, STATUS_PROBLEM_BYTES)}


class Audit:
    """Refused requests, logged with who asked (uid, gid, pid from the kernel); at most
    ``AUDIT_BURST`` lines per uid every ``AUDIT_WINDOW`` seconds, then one line counting
    what was not logged, so a hostile peer cannot flood the journal."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._windows: dict[int, list[float]] = {}  # uid -> [window start, logged, dropped]

    def refused(self, *, pid: int, uid: int, gid: int, op: object, code: str,
                reason: str) -> None:
        now = time.monotonic()
        window = self._windows.get(uid)
        if window is None or now - window[0] >= AUDIT_WINDOW:
            if window is not None and window[2]:
                self._log.warning("control requests refused (not logged one by one)",
                                  uid=uid, count=int(window[2]),
                                  seconds=round(now - window[0], 1))
            if len(self._windows) > 4096:  # forget uids whose window has passed
                self._windows = {u: w for u, w in self._windows.items()
                                 if now - w[0] < AUDIT_WINDOW}
            window = self._windows[uid] = [now, 0, 0]
        if window[1] < AUDIT_BURST:
            window[1] += 1
            self._log.warning("control request refused", op=_short(repr(op), 64), code=code,
                              reason=_short(reason, 200), uid=uid, gid=gid, pid=pid)
        else:
            window[2] += 1


class ControlServer:
    """Accepts peers and answers their requests on the event loop, never blocking it.

    Each readable wake-up of a connection handles one message, completely (replies
    never wait: a peer whose socket is full is disconnected), so a connection has at
    most one request in flight and connections are served round-robin; the number of
    connections per uid is bounded (``max_connections_per_uid``, root and the daemon's
    own user excepted), so one user cannot take the socket from another."""

    def __init__(self, config: ControlConfig, handler: ControlHandler,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.handler = handler
        self.loop = loop
        self.peers: set[Peer] = set()
        self.sock: socket.socket | None = None
        self._log = structlog.get_logger("eoid.control")
        self.audit = Audit(self._log)
        self._per_uid: dict[int, int] = {}
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._accept_backoff = 0.0
        self._accept_failures = 0
        self._accept_paused_at = 0.0
        self._accept_retry: asyncio.TimerHandle | None = None

    def listen(self, inherited: socket.socket | None = None) -> socket.socket:
        """Bind the socket (or adopt one kept across a restart) and start accepting."""
        if inherited is not None:
            self.sock = inherited
            with contextlib.suppress(OSError):
                st = os.lstat(self.config.socket)
                if stat.S_ISSOCK(st.st_mode):
                    self._identity = (st.st_dev, st.st_ino)
        else:
            self.sock = self._bind(self.config.socket)
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)
        return self.sock

    # --- creating the socket ------------------------------------------------------------

    def _bind(self, path: Path) -> socket.socket:
        """Create the socket race-free: in a directory checked from ``/`` down without
        following a symlink, under a temporary name, with its mode set at bind time by the
        umask and its group by ``fchownat`` on that name, then renamed into place. Nothing
        is done by path in a directory another user could change."""
        path = path.absolute()
        dir_fd = open_private_dir(path.parent)
        try:
            return self._bind_in(dir_fd, path)
        finally:
            os.close(dir_fd)

    def _bind_in(self, dir_fd: int, path: Path) -> socket.socket:
        name = path.name
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode):
                raise EoidError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                probe.connect(str(path))
            except OSError:
                pass  # a stale socket from a daemon that died: the rename replaces it
            else:
                raise EoidError(f"another eoid is already listening on {path}")
            finally:
                probe.close()
        temp = f".{name[:40]}.{secrets.token_hex(4)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            old = os.umask(0o777 & ~self.config.socket_mode)  # the mode, at bind time
            try:
                sock.bind(str(path.parent / temp))
            finally:
                os.umask(old)
            try:
                group = self.config.socket_group
                if group is not None and group != os.getegid():
                    os.chown(temp, -1, group, dir_fd=dir_fd, follow_symlinks=False)
                os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dir_fd)
                raise
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            self._identity = (st.st_dev, st.st_ino)
            sock.listen(64)
        except OSError as e:
            sock.close()
            raise EoidError(f"cannot create {path}: {e.strerror}") from e
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self, handover: bool = False) -> None:
        """Stop serving. A handover leaves the socket file and tells the daemon of no
        closed peers: their connections live on in the fd store for the successor."""
        for peer in list(self.peers):
            if handover:
                self._forget(peer)
                peer.sock.close()
            else:
                self._drop(peer)
        if self._accept_retry is not None:
            self._accept_retry.cancel()
            self._accept_retry = None
        if self.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            if not handover:
                self._unlink()

    def _unlink(self) -> None:
        """Remove our socket file, and only ours (never a successor's at the same path)."""
        with contextlib.suppress(OSError):
            st = os.lstat(self.config.socket)
            if self._identity == (st.st_dev, st.st_ino):
                self.config.socket.unlink()

    # --- connections ---------------------------------------------------------------------

    def adopt_peer(self, sock: socket.socket) -> Peer:
        """Serve a connection (accepted now, or before a restart and kept in systemd's fd
        store). Its identity is the kernel's: SO_PEERCRED and SO_PEERGROUPS."""
        sock.setblocking(False)
        pid, uid, gid = peer_credentials(sock)
        try:
            groups = peer_groups(sock)
        except OSError:
            groups = frozenset()
        peer = Peer(sock, pid, uid, groups | {gid}, gid=gid)
        self.peers.add(peer)
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        self.loop.add_reader(sock.fileno(), self._readable, peer)
        return peer

    def _accept(self) -> None:
        assert self.sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in _RESOURCE_ERRORS:
                    self._pause_accepting(e)
                    return
                if e.errno == errno.ECONNABORTED:
                    continue  # that peer gave up before we took it
                self._pause_accepting(e)
                return
            try:
                self._admit(conn)
            except OSError:
                conn.close()
        if self._accept_failures:
            self._log.info("control socket accepting again", failures=self._accept_failures,
                           paused_seconds=round(time.monotonic() - self._accept_paused_at, 3))
            self._accept_failures = 0
            self._accept_backoff = 0.0

    def _admit(self, conn: socket.socket) -> None:
        pid, uid, gid = peer_credentials(conn)
        if uid not in (0, os.getuid()) and \
                self._per_uid.get(uid, 0) >= self.config.max_connections_per_uid:
            message = (f"uid {uid} already has {self.config.max_connections_per_uid} "
                       "connections")
            self.audit.refused(pid=pid, uid=uid, gid=gid, op="connect",
                               code="too_many_connections", reason=message)
            with contextlib.suppress(OSError):
                conn.setblocking(False)
                send_data(conn, encode({"ok": False, "error": {
                    "code": "too_many_connections", "message": message}}))
            conn.close()
            return
        self.adopt_peer(conn)

    def _pause_accepting(self, error: OSError) -> None:
        """Out of fds (or memory): stop watching the listener for a while instead of
        waking up at once to fail again; one log line per episode."""
        assert self.sock is not None
        if not self._accept_failures:
            self._accept_paused_at = time.monotonic()
            self._log.warning("control socket cannot accept; pausing the listener",
                              error=error.strerror, errno=error.errno)
        self._accept_failures += 1
        self._accept_backoff = min(max(self._accept_backoff * 2, ACCEPT_BACKOFF_INITIAL),
                                   ACCEPT_BACKOFF_MAX)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self._accept_retry = self.loop.call_later(self._accept_backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_retry = None
        if self.sock is not None:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    # --- requests --------------------------------------------------------------------------

    def _readable(self, peer: Peer) -> None:
        """Handle one message from ``peer``: exactly one reply, or the connection closes."""
        try:
            received = recv_msg(peer.sock, self.config.max_message_bytes)
        except (BlockingIOError, InterruptedError):
            return
        except ProtocolError as e:
            self._refused(peer, None, e)
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
        if not _valid_id(request_id):
            error = ProtocolError("bad_request", "'id' must be a string of at most "
                                  f"{MAX_ID_CHARS} characters, a 64-bit integer, a finite "
                                  "number, a boolean or null")
            self._refused(peer, message.get("op"), error)
            self._reply(peer, None, error=error)
            return
        attached = set(peer.attached)
        try:
            try:
                reply, out_fds = self._dispatch(peer, message)
            except Refused as e:
                raise ProtocolError(REFUSALS.get(type(e), "failed"), str(e)) from e
        except ProtocolError as e:
            self._undo_attach(peer, attached)
            self._refused(peer, message.get("op"), e)
            self._reply(peer, request_id, error=e)
            return
        except Exception as e:  # an EoidError, or a bug: the peer gets an answer anyway
            self._undo_attach(peer, attached)
            if not isinstance(e, EoidError):
                self._log.exception("control request failed", op=_short(
                    repr(message.get("op")), 64), uid=peer.uid, pid=peer.pid)
            error = ProtocolError("failed", str(e) if isinstance(e, EoidError)
                                  else "internal error (logged by the daemon)")
            self._refused(peer, message.get("op"), error)
            self._reply(peer, request_id, error=error)
            return
        try:
            if not self._reply(peer, request_id, reply, out_fds):
                self._undo_attach(peer, attached)  # the consumer never got its eventfds
        finally:
            for fd in out_fds:
                os.close(fd)

    def _undo_attach(self, peer: Peer, before: set[str]) -> None:
        """Detach whatever this request attached: a consumer without its reply (or whose
        attach failed half-way) must not hold the device."""
        for device in peer.attached - before:
            try:
                self.handler.detach(peer, device)
            except Exception:  # the peer is being dropped anyway
                self._log.exception("cannot undo an attach", device=device)

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
            if len(device) > MAX_DEVICE_CHARS:
                raise ProtocolError("unknown_device", "no device with so long a name")
            if op == "attach":
                return self.handler.attach(peer, device)
            self.handler.detach(peer, device)
            return {"device": device}, []
        if op == "status":
            self._authorize(peer, self.config.status)
            return self._status_page(peer, message), []
        if op in ("reload", "reset", "datapath", "observe"):
            if not _operator(peer):
                raise ProtocolError("forbidden", f"only root or the daemon's user may {op}")
            if op == "reload":
                return _bounded_problems(self.handler.reload(), RELOAD_PROBLEM_BYTES), []
            if not isinstance(device, str):
                raise ProtocolError("bad_request", f"{op} needs a 'device' string")
            if op == "reset":
                return self.handler.reset(device), []
            if op == "datapath":
                return self.handler.set_datapath(device, _datapath(message.get("datapath"))), []
            return self.handler.observe(device, _observe_ns(message.get("seconds"))), []
        raise ProtocolError("unknown_op", f"unknown op {_short(repr(op), 64)} (expected hello, "
                            "attach, detach, status, reload, reset, datapath, observe)")

    def _status_page(self, peer: Peer, message: dict[str, Any]) -> dict[str, Any]:
        """One page of ``status``: the devices named after ``after``, in name order, at most
        ``limit`` (and ``STATUS_PAGE``) of them and as many as fit ``STATUS_REPLY_BYTES``;
        ``next`` is the ``after`` of the next page, null at the end. Names, not offsets,
        so a reload between pages neither repeats nor skips a device that stays."""
        device, after, limit = (message.get(k) for k in ("device", "after", "limit"))
        if device is not None and not isinstance(device, str):
            raise ProtocolError("bad_request", "'device' must be a string")
        if after is not None and not isinstance(after, str):
            raise ProtocolError("bad_request", "'after' must be a device name")
        if limit is None:
            limit = STATUS_PAGE
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ProtocolError("bad_request", "'limit' must be a positive integer")
        names = sorted(self.handler.device_names())
        if device is not None:
            if len(device) > MAX_DEVICE_CHARS:
                raise ProtocolError("unknown_device", "no device with so long a name")
            page = [device]
        else:
            start = 0 if after is None else bisect.bisect_right(names, after)
            page = names[start:start + min(limit, STATUS_PAGE)]
        body: dict[str, Any] = {"daemon": _bounded_daemon(self.handler.daemon_status()),
                                "total": len(names), "devices": [], "next": None}
        size = len(encode(body)) + 2 * MAX_DEVICE_CHARS + 8 * MAX_ID_CHARS  # next, id
        operator = _operator(peer)
        for name in page:
            entry = _device_entry(self.handler.device_status(name), operator)
            size += len(encode(entry)) + 1
            if body["devices"] and size > STATUS_REPLY_BYTES:
                break
            body["devices"].append(entry)
        if device is None and body["devices"] and body["devices"][-1]["name"] != names[-1]:
            body["next"] = body["devices"][-1]["name"]
        return body

    @staticmethod
    def _authorize(peer: Peer, access: Access | None) -> None:
        if access is not None and peer.uid != os.getuid() and not access.allows(peer.uid,
                                                                                peer.gids):
            raise ProtocolError("forbidden", f"uid {peer.uid} may not do this")

    def _refused(self, peer: Peer, op: object, error: ProtocolError) -> None:
        self.audit.refused(pid=peer.pid, uid=peer.uid, gid=peer.gid, op=op, code=error.code,
                           reason=str(error))

    def _reply(self, peer: Peer, request_id: Any, body: dict[str, Any] | None = None,
               fds: list[int] | None = None, error: ProtocolError | None = None) -> bool:
        """Send one reply; False (and the peer dropped) if it could not be sent."""
        message: dict[str, Any]
        if error is not None:
            message = {"ok": False, "error": {"code": error.code,
                                              "message": _short(str(error))}}
        else:
            message = {"ok": True, **(body or {})}
        if request_id is not None:
            message["id"] = request_id
        try:
            data = encode(message)
        except (ValueError, TypeError, RecursionError) as e:  # a bug of ours: say so
            self._log.error("control reply cannot be encoded", error=str(e))
            if error is None and not fds:
                data = encode({"ok": False, "error": {"code": "failed",
                                                      "message": "reply cannot be encoded"}})
            else:
                self._drop(peer)
                return False
            try:
                send_data(peer.sock, data)
            except OSError:
                self._drop(peer)
            return False
        try:
            send_data(peer.sock, data, fds or ())
        except OSError:  # full (a peer that does not read), gone, or too big: documented close
            self._drop(peer)
            return False
        return True

    def _forget(self, peer: Peer) -> bool:
        if peer not in self.peers:
            return False
        self.peers.discard(peer)
        count = self._per_uid.get(peer.uid, 1) - 1
        if count > 0:
            self._per_uid[peer.uid] = count
        else:
            self._per_uid.pop(peer.uid, None)
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(peer.sock.fileno())
        return True

    def _drop(self, peer: Peer) -> None:
        if not self._forget(peer):
            return
        try:
            self.handler.peer_closed(peer)
        finally:
            peer.sock.close()


def open_private_dir(path: Path) -> int:
    """Open directory ``path`` (creating what is missing, mode 0755) walking from ``/``
    with ``O_NOFOLLOW``, and check each step: owned by root or by us, and not writable by
    group or others, except a sticky ancestor (``/tmp``), whose entries only their owner
    may rename. The last one must not be writable by anyone else at all, so whatever is
    created in it stays ours. Returns an ``O_PATH`` fd of the directory."""
    trusted = {0, os.geteuid()}
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    parts = path.parts[1:]
    try:
        for i, part in enumerate(("/", *parts)):
            here = Path("/", *parts[:i])
            if i:
                try:
                    new = os.open(part, flags, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    made = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                   | os.O_CLOEXEC, dir_fd=fd)
                    try:
                        os.fchmod(made, 0o755)  # whatever the umask (UMask=0077 under systemd)
                    finally:
                        os.close(made)
                    new = os.open(part, flags, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise EoidError(f"{here} is a symlink or not a directory; the control "
                                        "socket's directory may have none on its path") from e
                    raise EoidError(f"cannot open {here}: {e.strerror}") from e
                os.close(fd)
                fd = new
            st = os.fstat(fd)
            last = i == len(parts)
            writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            if st.st_uid not in trusted:
                raise EoidError(f"{here} belongs to uid {st.st_uid}, not to root or to us: "
                                "its owner could replace the control socket")
            if writable and (last or not st.st_mode & stat.S_ISVTX):
                raise EoidError(f"{here} is writable by group or others (mode "
                                f"{stat.S_IMODE(st.st_mode):04o}): they could replace the "
                                "control socket")
    except BaseException:
        os.close(fd)
        raise
    return fd


class ControlClient:
    """A blocking client: ``eoid status``, tests and the simulated guests use it."""

    def __init__(self, path: Path | str, timeout: float = 5.0,
                 trust_uids: tuple[int, ...] = ()) -> None:
        """Connect, and trust the server only if the kernel says it runs as root, as our
        own user or as one of ``trust_uids``: whoever could put a socket at ``path`` must
        not be able to answer for eoid."""
        self.path = Path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
            _, uid, _ = peer_credentials(self.sock)
        except OSError as e:
            self.sock.close()
            raise EoidError(f"cannot connect to {self.path}: {e.strerror}") from e
        if uid not in (0, os.geteuid(), *trust_uids):
            self.sock.close()
            raise EoidError(f"{self.path} is served by uid {uid}, not by root or uid "
                            f"{os.geteuid()}: not trusting it")
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

    def status(self, device: str | None = None) -> dict[str, Any]:
        """Every page of ``status`` (or one device's), merged into one reply."""
        if device is not None:
            return self.request("status", device=device)[0]
        reply, _ = self.request("status")
        devices = reply["devices"]
        while reply["next"] is not None:
            after = reply["next"]
            reply, _ = self.request("status", after=after)
            if reply["next"] is not None and reply["next"] <= after:
                raise EoidError(f"{self.path}: status pages do not advance")
            devices += reply["devices"]
        return {**reply, "devices": devices}

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

