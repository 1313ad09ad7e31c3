"""Test helpers shipped with eoid (like ``structlog.testing``).

``FakeSystemd`` is the service manager's half of the sd_notify protocol on a
real ``AF_UNIX`` datagram socket: it receives what eoid's ``Notifier`` sends,
parses it the way PID 1 does, keeps a file descriptor store with real fds,
and can start a process with the stored fds handed back from fd 3 upward
(``LISTEN_FDS``), as systemd does on a restart. Unit tests use it in-process;
integration tests use it to run and restart ``eoid run`` as a subprocess
without needing systemd as PID 1.

``run_server`` is the daemon in-process (like uvicorn's): a ``Daemon`` on an event loop
of its own thread, with its simulated devices served by a ``SimServer`` on another, so
attach, reload and control-socket rules get tests that take milliseconds, not a
subprocess start-up.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from eoid.config import Config
    from eoid.daemon import Daemon
    from eoid.sim.server import SimServer

from eoid.systemd import LISTEN_FDS_START, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_BYTES, valid_fdname

__all__ = ["FakeSystemd", "NotifyMessage", "RunningDaemon", "fd_is_open", "run_server",
           "same_file", "same_file_by_fstat"]

T = TypeVar("T")

_UCRED_SIZE = 12  # struct ucred: pid, uid, gid (three 32-bit ints)
_SYS_KCMP = 312  # x86_64; elsewhere kcmp fails and same_file falls back to fstat
_KCMP_FILE = 0


@dataclass(frozen=True)
class NotifyMessage:
    """One datagram as PID 1 sees it.

    ``fields`` keeps the first value of each key, as systemd's lookups do.
    ``fds`` holds the received descriptors only when they went into the
    store (they are the store's, not the message's); other passed fds are
    closed on receipt, as PID 1 does, and only counted in ``n_fds``.
    """

    text: str
    fields: Mapping[str, str]
    pid: int | None
    n_fds: int
    fds: tuple[int, ...] = ()

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of ``key``, or ``default``."""
        return self.fields.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.fields


def _parse(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def same_file(a: int, b: int) -> bool:
    """Whether two fds share one open file description (how PID 1 dedups its store).

    Uses ``kcmp(KCMP_FILE)`` like systemd; where that syscall is unavailable
    (seccomp, other arches) it falls back, as systemd does, to comparing
    ``fstat`` plus the fd's ``fdinfo`` (which tells eventfds apart by id).
    """
    if a == b:
        return True
    pid = os.getpid()
    result = int(_libc().syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, a, b))
    if result >= 0:
        return result == 0
    return same_file_by_fstat(a, b)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _file_key(fd: int) -> tuple[int, int, int, str]:
    """What two fds of one open file description share (inode, and an eventfd's id): the
    store compares an fd with ``same_file`` only against those with the same key, so
    storing thousands of fds stays linear (every eventfd is the one anon inode)."""
    st = os.fstat(fd)
    info = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    eventfd = next((line for line in info if line.startswith("eventfd-id:")), "")
    return st.st_dev, st.st_ino, st.st_rdev, eventfd


def same_file_by_fstat(a: int, b: int) -> bool:
    """``same_file`` without kcmp: same inode and same ``fdinfo`` apart from the offset."""
    sa, sb = os.fstat(a), os.fstat(b)
    if (sa.st_dev, sa.st_ino, sa.st_rdev) != (sb.st_dev, sb.st_ino, sb.st_rdev):
        return False

    def fdinfo(fd: int) -> list[str]:
        lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
        return [line for line in lines if not line.startswith("pos:")]

    return fdinfo(a) == fdinfo(b)


# Runs in the child between fork and the real exec: moves the passed fds to
# 3.. and sets LISTEN_PID/WATCHDOG_PID to its own pid, which exec keeps.
# (Popen cannot know the pid beforehand, and preexec_fn is unsafe with threads.)
_SHIM = """\
import os, sys
n = int(sys.argv[1]); src = [int(x) for x in sys.argv[2:2 + n]]; argv = sys.argv[2 + n:]
for i, fd in enumerate(src):
    os.dup2(fd, 3 + i)
for fd in src:
    os.close(fd)
pid = str(os.getpid())
if n:
    os.environ["LISTEN_PID"] = pid
if "WATCHDOG_USEC" in os.environ:
    os.environ["WATCHDOG_PID"] = pid
os.execvp(argv[0], argv)
"""


class FakeSystemd:
    """PID 1's notify socket and file descriptor store, for tests.

    ``with FakeSystemd() as sd:`` binds a fresh socket (a path in a private
    temporary directory, or an ``@abstract`` name); ``sd.environ()`` is what
    to put in the daemon's environment. ``receive``/``wait_for`` read and
    apply messages: ``state``, ``status``, ``watchdog_pings`` and the store
    track what systemd would know. With ``main_pid`` set, messages from any
    other process are not applied but kept in ``rejected``
    (``NotifyAccess=main``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        abstract: bool = False,
        fdstore_max: int | None = None,
    ) -> None:
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._path: Path | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            if abstract:
                name = f"eoid-test-notify-{os.getpid()}-{os.urandom(6).hex()}"
                sock.bind(b"\0" + name.encode())
                self.notify_socket = "@" + name
            else:
                if directory is None:
                    self._tmpdir = tempfile.TemporaryDirectory(prefix="eoid-sd-")
                    directory = self._tmpdir.name
                self._path = Path(directory) / "notify.sock"
                sock.bind(str(self._path))
                self.notify_socket = str(self._path)
        except BaseException:
            sock.close()
            if self._tmpdir is not None:
                self._tmpdir.cleanup()
            raise
        self._sock = sock
        self.fdstore_max = fdstore_max
        self.main_pid: int | None = None
        self.messages: list[NotifyMessage] = []
        self.rejected: list[NotifyMessage] = []
        self.state = "starting"
        self.status: str | None = None
        self.watchdog_pings = 0
        self.last_watchdog: float | None = None
        self.extend_timeout_usec: int | None = None
        self._store: list[tuple[str, int]] = []
        self._by_key: dict[tuple[int, int, int, str], list[int]] = {}  # see ``_file_key``

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the socket and every stored fd; remove the socket file."""
        self._sock.close()
        for _, fd in self._store:
            os.close(fd)
        self._store.clear()
        self._by_key.clear()
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    def __enter__(self) -> FakeSystemd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The receiving socket, for callers that poll it themselves."""
        return self._sock.fileno()

    def environ(self, *, watchdog_usec: int | None = None) -> dict[str, str]:
        """Environment for an in-process notifier (``WATCHDOG_PID`` is this process)."""
        env = {"NOTIFY_SOCKET": self.notify_socket}
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
            env["WATCHDOG_PID"] = str(os.getpid())
        return env

    # -- receiving ----------------------------------------------------------------------

    def receive(self, timeout: float = 5.0) -> NotifyMessage:
        """Wait for the next message, apply it as PID 1 would, and return it."""
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(max(0, round(timeout * 1000))):
            raise TimeoutError(f"no notification within {timeout}s")
        return self._receive_one()

    def drain(self) -> list[NotifyMessage]:
        """Apply and return every message already queued, without waiting."""
        out = []
        while True:
            try:
                out.append(self._receive_one(flags=socket.MSG_DONTWAIT))
            except BlockingIOError:
                return out

    def wait_for(
        self,
        predicate: Callable[[NotifyMessage], bool] | None = None,
        *,
        timeout: float = 5.0,
        **fields: str,
    ) -> NotifyMessage:
        """Receive until a message matches ``predicate`` and all ``fields`` (e.g. ``READY="1"``).

        Messages before the match are applied and kept in ``messages`` too.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"no notification matching {fields or predicate} within {timeout}s; "
                    f"got {[m.text for m in self.messages[-5:]]}"
                )
            msg = self.receive(remaining)
            if all(msg.get(k) == v for k, v in fields.items()) and (
                predicate is None or predicate(msg)
            ):
                return msg

    def _receive_one(self, flags: int = 0) -> NotifyMessage:
        ancsize = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(_UCRED_SIZE)
        data, ancdata, msg_flags, _ = self._sock.recvmsg(
            MAX_MESSAGE_BYTES + 1, ancsize, flags | socket.MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        pid: int | None = None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                arr = array.array("i")
                arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
                fds.extend(arr)
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = int.from_bytes(payload[:4], sys.byteorder)
        if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE_BYTES:
            for fd in fds:
                os.close(fd)
            # PID 1 would drop it with a warning; for a test that is a bug in the sender.
            raise AssertionError(
                f"truncated notification ({len(data)} bytes, flags {msg_flags:#x})"
            )
        text = data.decode("utf-8", errors="replace")
        parsed = _parse(text)
        if self.main_pid is not None and pid != self.main_pid:
            for fd in fds:
                os.close(fd)
            rejected = NotifyMessage(text, parsed, pid, len(fds))
            self.rejected.append(rejected)
            return rejected
        msg = self._apply(text, parsed, pid, fds)
        self.messages.append(msg)
        return msg

    def _apply(
        self, text: str, fields: dict[str, str], pid: int | None, fds: list[int]
    ) -> NotifyMessage:
        if fields.get("READY") == "1":
            self.state = "ready"
        if fields.get("RELOADING") == "1":
            self.state = "reloading"
        if fields.get("STOPPING") == "1":
            self.state = "stopping"
        if "STATUS" in fields:
            self.status = fields["STATUS"]
        if fields.get("WATCHDOG") == "1":
            self.watchdog_pings += 1
            self.last_watchdog = time.monotonic()
        if "EXTEND_TIMEOUT_USEC" in fields:
            self.extend_timeout_usec = int(fields["EXTEND_TIMEOUT_USEC"])
        name = fields.get("FDNAME")
        if fields.get("FDSTOREREMOVE") == "1" and name is not None:
            self.remove(name)
        stored: tuple[int, ...] = ()
        if fields.get("FDSTORE") == "1" and fds:
            if name is None or not valid_fdname(name):
                name = "stored"  # systemd's default name (and what an invalid one becomes)
            stored = tuple(self._add(name, fds))
        else:
            for fd in fds:  # BARRIER=1's pipe, or stray fds: PID 1 closes them
                os.close(fd)
        return NotifyMessage(text, fields, pid, len(fds), stored)

    # -- the file descriptor store ----------------------------------------------------

    def _add(self, name: str, fds: list[int]) -> list[int]:
        kept = []
        for fd in fds:
            alike = self._by_key.setdefault(_file_key(fd), [])
            if any(same_file(fd, old) for old in alike):
                os.close(fd)  # re-sending a stored fd is a no-op in PID 1
                continue
            if self.fdstore_max is not None and len(self._store) >= self.fdstore_max:
                os.close(fd)  # "Too many stored file descriptors", PID 1 drops the rest
                continue
            self._store.append((name, fd))
            alike.append(fd)
            kept.append(fd)
        return kept

    def remove(self, name: str) -> None:
        """Drop and close every stored fd called ``name`` (``FDSTOREREMOVE=1``)."""
        keep = []
        for entry in self._store:
            if entry[0] == name:
                self._by_key[_file_key(entry[1])].remove(entry[1])
                os.close(entry[1])
            else:
                keep.append(entry)
        self._store = keep

    @property
    def store(self) -> list[tuple[str, int]]:
        """The stored ``(name, fd)`` pairs, in the order PID 1 would pass them on."""
        return list(self._store)

    def stored(self, name: str) -> list[int]:
        """The stored fds called ``name`` (still owned by the store)."""
        return [fd for n, fd in self._store if n == name]

    # -- starting a service -------------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        watchdog_usec: int | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` as systemd would start the main process of a notify service.

        The child gets ``NOTIFY_SOCKET``, the stored fds as 3, 4, … with
        ``LISTEN_FDS``/``LISTEN_FDNAMES``/``LISTEN_PID`` (a copy: the store
        keeps its own, as PID 1 does), and ``WATCHDOG_USEC``/``WATCHDOG_PID``
        if asked. ``main_pid`` becomes the child's pid.
        """
        child_env = dict(os.environ if env is None else env)
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"):
            child_env.pop(var, None)
        child_env["NOTIFY_SOCKET"] = self.notify_socket
        if watchdog_usec is not None:
            child_env["WATCHDOG_USEC"] = str(watchdog_usec)
        entries = self.store
        if entries:
            child_env["LISTEN_FDS"] = str(len(entries))
            child_env["LISTEN_FDNAMES"] = ":".join(name for name, _ in entries)
        # Duplicates above the target range, so moving them to 3.. never
        # overwrites one that is still to be moved.
        low = LISTEN_FDS_START + len(entries)
        dups = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low) for _, fd in entries]
        try:
            shim = [sys.executable, "-I", "-S", "-c", _SHIM, str(len(dups)), *map(str, dups)]
            proc = subprocess.Popen([*shim, *argv], env=child_env, pass_fds=dups, **popen_kwargs)
        finally:
            for fd in dups:
                os.close(fd)
        self.main_pid = proc.pid
        self.state = "starting"
        return proc


def fd_is_open(fd: int) -> bool:
    """Whether ``fd`` is open in this process (for asserting nothing leaked)."""
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as e:
        if e.errno == errno.EBADF:
            return False
        raise
    return True


# --- the daemon in-process ---------------------------------------------------------------


class _LoopThread:
    """An event loop running on a thread of its own until ``close``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the loop's thread and return its result (or raise its error)."""
        async def run() -> T:
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class RunningDaemon:
    """What ``run_server`` yields: the daemon, its loop's thread, and the sim."""

    daemon: Daemon
    _thread: _LoopThread
    sim: SimServer | None

    @property
    def control(self) -> Path:
        return self.daemon.config.daemon.control.socket

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the daemon's loop (the only thread that may touch the daemon)."""
        return self._thread.call(fn, timeout)


@contextlib.contextmanager
def run_server(config: Config, *, sim: bool = True) -> Iterator[RunningDaemon]:
    """Run ``config``'s daemon in this process until the block ends (uvicorn's
    ``run_server`` for eoid). With ``sim``, its simulated devices are served (no load,
    no guests) from a ``SimServer`` on another thread, as ``eoid sim`` would."""
    from eoid.daemon import Daemon
    from eoid.sim.server import LineSpec, SimServer

    sim_thread: _LoopThread | None = None
    server: SimServer | None = None
    if sim:
        specs = [LineSpec(d.backend.line or d.name, d.name) for d in config.devices.values()
                 if d.backend.type == "sim"]
        sim_thread = _LoopThread("eoid-test-sim")
        server = SimServer(config.daemon.sim.socket, specs, None, sim_thread.loop)
        sim_thread.call(server.start)
    thread = _LoopThread("eoid-test-daemon")
    daemon = Daemon(config)
    try:
        thread.run(daemon.startup())
    except BaseException:
        thread.close()
        if sim_thread is not None and server is not None:
            sim_thread.call(server.close)
            sim_thread.close()
        raise
    try:
        yield RunningDaemon(daemon, thread, server)
    finally:
        thread.call(daemon.shutdown)
        thread.close()
        if sim_thread is not None and server is not None:
            sim_thread.call(server.close)
            sim_thread.close()


def connect_as(path: Path | str, uid: int, gid: int, groups: Sequence[int] = (),
               count: int = 1) -> list[socket.socket]:
    """``count`` connections to the unix socket ``path`` made by a forked child running as
    ``uid``/``gid`` with supplementary ``groups`` (needs root), handed back to us: the
    kernel keeps the child's credentials on them (``SO_PEERCRED``, ``SO_PEERGROUPS``), so
    whoever sends on them is that user as far as the server can tell. The child has
    exited when this returns. Connections the server refused come back closed by it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            ours.close()
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            for _ in range(count):
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                try:
                    conn.connect(str(path))
                    socket.send_fds(theirs, [b"c"], [conn.fileno()])
                except OSError as e:
                    theirs.send(f"e{e.errno}".encode())
                finally:
                    conn.close()
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    conns: list[socket.socket] = []
    try:
        for _ in range(count):
            data, fds, _, _ = socket.recv_fds(ours, 64, 1)
            if not data:
                raise OSError(errno.EPIPE, f"the child connecting as uid {uid} failed")
            if data.startswith(b"e"):
                raise OSError(int(data[1:]), f"connect as uid {uid}: {os.strerror(int(data[1:]))}")
            conns.append(socket.socket(fileno=fds[0]))
    except BaseException:
        for conn in conns:
            conn.close()
        raise
    finally:
        ours.close()
        os.waitpid(pid, 0)
    return conns
