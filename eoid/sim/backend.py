"""The daemon's ``sim`` backend: an ``IntxDevice`` whose line lives in an ``eoid sim`` process.

It mirrors the vfio backend's shape: enable passes the trigger eventfd (and an unmask
eventfd, the analogue of VFIO's eventfd unmask) over a unix socket; the hot-path unmask
is one eventfd write.

All the devices on one sim socket share one connection (``SimConnection``), so a sim
device costs eoid four fds (its three eventfds and the unmask eventfd) and a sim process
one more: 4096 devices fit in a 20,000-fd limit. Requests name their line, events come
back naming theirs and reach the device's ``watch`` callback (a shared socket can have
one loop reader only, so ``event_fds`` is empty); an EOF is ``GONE`` for every device.

A sim is another process, so the daemon never waits for it: requests are sent without
blocking (``Outbox``), their replies arrive on the loop like any event, and each has a
deadline: it fails once the sim has been silent (answered nothing and taken no request)
for ``REQUEST_TIMEOUT`` (far below an EOI deadline) since the request was made. The sim
answers in turn, so a request queued behind many others (1024 opens at start-up) waits
while the sim keeps answering the ones before it, but a frozen sim is found out within
``REQUEST_TIMEOUT``. Either way only that sim's devices wait. Opening a line is the one
request whose answer matters before the device may start (``opening``); a later request
that fails or gets no answer takes its device down (``GONE``), and the daemon reopens it
with a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from eoid.device import DeviceEvent, DeviceInfo
from eoid.errors import DeviceError, EoidError, ProtocolError
from eoid.fdstore import FdStore, sim_fd_name
from eoid.sim.outbox import Outbox
from eoid.systemd import close_all
from eoid.wire import BATCH_MAX_FDS, recv_msg

REQUEST_TIMEOUT = 0.5  # seconds a sim may stay silent on a request (eoi_timeout: 2 s default)
READ_BATCH = 64  # messages read per wake-up, so one busy sim cannot hold the loop
BATCH_MAX_REQUESTS = 64  # requests in one ``batch`` message (each well under 512 bytes)

_LOG = structlog.get_logger("eoid.sim")


class SimRequestError(DeviceError):
    """A sim request that failed; ``reason`` is why, without the device and op."""

    def __init__(self, device: str, op: str, reason: str) -> None:
        super().__init__(device, op, reason)
        self.reason = reason


class SimConnections:
    """A daemon's connections to sim processes: one per socket path, kept while some device
    uses it, and parked in the fd store meanwhile (``sim_fd_name``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, store: FdStore | None = None,
                 adopted: dict[str, int] | None = None) -> None:
        self.loop = loop
        self._store = store
        self._adopted = {} if adopted is None else adopted  # from the store; popped on use
        self._open: dict[str, SimConnection] = {}

    def open(self, path: Path, device: SimDevice) -> SimConnection:
        """The connection to ``path`` (connected now, without waiting), with ``device`` on it;
        ``SimDevice.opening`` then asks the sim for the line."""
        conn = self._get(str(path)) or self._connect(str(path))
        conn.add(device)
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
        """Connect without blocking: a unix connect completes at once or fails (``EAGAIN``
        when the sim's accept backlog is full, e.g. while it is frozen)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
                             | socket.SOCK_NONBLOCK)
        try:
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
    is its reference count). Requests are pipelined; replies are matched by ``id``."""

    def __init__(self, owner: SimConnections, path: str, sock: socket.socket, *,
                 adopted: bool) -> None:
        self.owner = owner
        self.path = path
        self.loop = owner.loop
        self.sock: socket.socket | None = sock
        self.adopted = adopted  # from the fd store: a previous eoid opened its lines
        self.devices: dict[str, SimDevice] = {}  # line → device
        # ids unique to this process: a stored connection may still carry the replies
        # to a previous eoid's requests
        self._ids = itertools.count(os.getpid() << 32)
        # requests made in this turn of the loop, with copies of their fds (``_send_batch``)
        self._batch: list[tuple[dict[str, Any], list[int]]] = []
        # in-flight requests, oldest first: (reply, made at, device, op)
        self._pending: dict[int, tuple[asyncio.Future[dict[str, Any]], float, str, str]] = {}
        self._heard = 0.0  # loop time of the sim's last message
        self._timer: asyncio.TimerHandle | None = None  # the oldest request's deadline
        sock.setblocking(False)
        self._outbox = Outbox(sock, self.loop, self._send_failed)
        self.loop.add_reader(sock.fileno(), self._readable)

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
            self.send(device.name, "close", line=device.line)
        if not self.devices:
            self.owner.discard(self)

    def request(self, name: str, op: str, fds: tuple[int, ...] = (), **fields: Any,
                ) -> asyncio.Future[dict[str, Any]]:
        """Send device ``name``'s request now; the future holds the reply, or a
        ``DeviceError`` if the sim refuses, goes away or does not answer in time."""
        if self.sock is None:
            raise DeviceError(name, op, "the sim process closed the connection")
        ident = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = self.loop.create_future()
        self._pending[ident] = (future, self.loop.time(), name, op)  # until answered or expired
        if self._timer is None:
            self._timer = self.loop.call_later(REQUEST_TIMEOUT, self._expire)
        if not self._batch:
            self.loop.call_soon(self._send_batch)
        self._batch.append(({"op": op, "id": ident, **fields}, [os.dup(fd) for fd in fds]))
        return future

    def _send_batch(self) -> None:
        """Send the requests made since the last call: one alone as it is, several (the
        observation windows of many devices open on one tick) as ``batch`` messages of up
        to ``BATCH_MAX_FDS`` fds and ``BATCH_MAX_REQUESTS`` requests (well within a
        message's 64 KiB), which the sim answers with one ``replies`` message each: a
        message and a wake-up of either side for many switches, not one per switch."""
        batch, self._batch = self._batch, []
        while batch:
            size, fds = 0, 0
            while size < min(len(batch), BATCH_MAX_REQUESTS) \
                    and fds + len(batch[size][1]) <= BATCH_MAX_FDS:
                fds += len(batch[size][1])
                size += 1
            chunk, batch = batch[:max(size, 1)], batch[max(size, 1):]
            if self.sock is not None:  # (else shut: the requests failed with it)
                if len(chunk) == 1:
                    self._outbox.send(*chunk[0])
                else:
                    self._outbox.send(
                        {"op": "batch", "requests": [{**m, "fds": len(f)} for m, f in chunk]},
                        [fd for _, f in chunk for fd in f])
            for _, f in chunk:
                close_all(f)  # (the outbox keeps copies of what it cannot send yet)

    def send(self, name: str, op: str, fds: tuple[int, ...] = (), **fields: Any) -> None:
        """A request whose answer changes nothing for the daemon (``disable``, ``close``):
        a failure is logged, not raised."""
        def done(future: asyncio.Future[dict[str, Any]]) -> None:
            if not future.cancelled() and future.exception() is not None:
                _LOG.debug("sim request failed", device=name, op=op,
                           error=str(future.exception()))
        self.request(name, op, fds, **fields).add_done_callback(done)

    def _expire(self) -> None:
        """Fail the requests on which the sim has been silent for ``REQUEST_TIMEOUT``; look
        again at the next oldest one's deadline. Answers already in the socket count: a
        daemon that was busy itself (arming 1024 devices) has not heard them yet."""
        self._timer = None
        self._readable(limit=None)
        now = self.loop.time()
        for ident, (future, made, name, op) in list(self._pending.items()):
            if future.done():  # cancelled by its maker: its answer is not awaited
                del self._pending[ident]
                continue
            # silent: nothing heard, nothing taken (a sim that takes requests is alive)
            deadline = max(made, self._heard, self._outbox.sent_at) + REQUEST_TIMEOUT
            if deadline > now:
                self._timer = self.loop.call_at(deadline, self._expire)
                return
            del self._pending[ident]
            future.set_exception(SimRequestError(
                name, op, f"the sim process did not answer within {REQUEST_TIMEOUT}s"))

    def shut(self) -> None:
        if self.sock is None:
            return
        self._send_batch()  # what was asked before the close goes out before it
        self._outbox.close()
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.sock = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        for future, _, name, op in pending.values():
            if not future.done():
                future.set_exception(SimRequestError(name, op,
                                                     "the sim process closed the connection"))

    def _readable(self, limit: int | None = READ_BATCH) -> None:
        for _ in itertools.repeat(None) if limit is None else range(limit):
            sock = self.sock
            if sock is None:
                return
            try:
                received = recv_msg(sock)
            except (BlockingIOError, InterruptedError):
                return
            except ProtocolError:
                continue  # a message that was not one (dropped)
            except OSError:
                received = None
            if received is None:
                self._lost()
                return
            message, fds = received
            close_all(fds)
            self._heard = self.loop.time()
            if "event" in message:
                self._route(message)
                continue
            replies = message.get("replies")  # to a batch
            for reply in replies if isinstance(replies, list) else (message,):
                if isinstance(reply, dict):
                    self._answer(reply)

    def _answer(self, reply: dict[str, Any]) -> None:
        ident = reply.get("id")
        entry = self._pending.pop(ident, None) if isinstance(ident, int) else None
        if entry is None or entry[0].done():
            return  # the late answer to a request that timed out, or was cancelled
        future, _, name, op = entry
        if reply.get("ok"):
            future.set_result(reply)
        else:
            error = reply.get("error")
            text = error.get("message") if isinstance(error, dict) else error
            future.set_exception(SimRequestError(name, op, str(text)))

    def _send_failed(self, error: OSError) -> None:
        if error.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            self.loop.call_soon(self._lost)  # not from inside the sender's call
        else:
            _LOG.warning("sim socket send failed", socket=self.path, error=error.strerror)
            self.loop.call_soon(self._lost)

    def _route(self, message: dict[str, Any]) -> None:
        device = self.devices.get(str(message.get("line")))
        if device is not None:
            with contextlib.suppress(ValueError):  # an event this eoid does not know
                device.post(DeviceEvent(message["event"]))

    def _lost(self) -> None:
        """The sim process went away: every device on the connection is ``GONE``."""
        if self.sock is None:
            return
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
        self._opening: asyncio.Future[dict[str, Any]] | None = None
        self._kernel_fires: int | None = None  # ``kernel_interrupts``, as the sim last said
        self._asking = False
        self._fresh = False  # ``_kernel_fires`` came with a route's reply, not yet read
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
            self._opening = self.conn.request(name, "open", line=line)
        except (OSError, EoidError) as e:
            if hasattr(self, "conn"):
                self.conn.remove(self)
            msg = e.strerror if isinstance(e, OSError) else str(e)
            raise DeviceError(name, "open", f"simulated line {line!r} at {socket_path}: {msg}"
                              " (is `eoid sim` running?)") from e
        self.unmask_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def info(self) -> DeviceInfo:
        return self._info

    def opening(self) -> asyncio.Future[None] | None:
        """The sim's answer to ``open``: the device may start once it holds ``None``;
        a ``DeviceError`` if the line is not available. None once settled (adopted)."""
        asked = self._opening
        if asked is None:
            return None
        self._opening = None
        done: asyncio.Future[None] = self.conn.loop.create_future()

        def settle(reply: asyncio.Future[dict[str, Any]]) -> None:
            e = None if reply.cancelled() else reply.exception()  # retrieved in every case
            if done.done():
                return
            if reply.cancelled():
                done.cancel()
            elif e is not None:
                reason = e.reason if isinstance(e, SimRequestError) else str(e)
                done.set_exception(DeviceError(self.name, "open", f"simulated line "
                                               f"{self.line!r} at {self.conn.path}: {reason}"))
            else:
                done.set_result(None)
        asked.add_done_callback(settle)
        # the daemon gave up on the open (removed, shut down): so does the request
        done.add_done_callback(lambda _: asked.cancel())
        return done

    def _send(self, op: str, fds: tuple[int, ...] = (),
              on_reply: Callable[[dict[str, Any]], None] | None = None
              ) -> asyncio.Future[dict[str, Any]]:
        """A request the device needs to succeed: if it does not, the device is GONE (and
        reopened by the daemon), as a VFIO device whose ioctl fails is taken down."""
        def done(future: asyncio.Future[dict[str, Any]]) -> None:
            if future.cancelled():
                return
            if future.exception() is None:
                if on_reply is not None:
                    on_reply(future.result())
                return
            if self.conn.devices.get(self.line) is self:  # not closed meanwhile
                _LOG.warning("sim request failed; the device goes down", device=self.name,
                             op=op, error=str(future.exception()))
                self.post(DeviceEvent.GONE)
        request = self.conn.request(self.name, op, fds, line=self.line)
        request.add_done_callback(done)
        return request

    def watch(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[int], None]) -> None:
        """Deliver this device's events by calling ``on_event(fd)`` from ``loop``; it is to
        call ``read_event``. (No fd of its own to watch: the socket is shared.)"""
        self._loop, self._on_event = loop, on_event
        for _ in self._events:
            loop.call_soon(self._notify)

    def post(self, event: DeviceEvent) -> None:
        """An event for this device; it reaches ``on_event`` from the loop, never from
        inside another call."""
        self._events.append(event)
        if self._loop is not None:
            self._loop.call_soon(self._notify)

    def _notify(self) -> None:
        if self._on_event is not None and self._events:
            self._on_event(self.conn.fileno())

    def enable(self, trigger_fd: int) -> None:
        self._send("enable", fds=(trigger_fd, self.unmask_fd))

    def route(self, trigger_fd: int, unmask_fd: int | None) -> asyncio.Future[dict[str, Any]]:
        """The sim plays the kernel's path: it binds ``unmask_fd`` and swaps the trigger in
        one step of its loop (so the order within is moot), and answers with its count
        once it has: the returned future."""
        fds = (trigger_fd,) if unmask_fd is None else (trigger_fd, unmask_fd)

        def routed(reply: dict[str, Any]) -> None:
            self._note_fires(reply)
            self._fresh = unmask_fd is None  # back on the relay: the count stands still
        return self._send("route", fds, on_reply=routed)

    def kernel_interrupts(self) -> int | None:
        """The sim's count of the line's fires while routed to the kernel's path, as last
        answered; asks again (from any thread: the metrics thread calls this too) unless a
        question is in flight. Exact once the sim has answered after the last fire."""
        if self._fresh:  # answered with a route: exact until the line is on the kernel's
            self._fresh = False  # path again (a switch asks once, not twice)
        elif not self._asking:
            self._asking = True
            self.conn.loop.call_soon_threadsafe(self._ask_kernel_fires)
        return self._kernel_fires

    def _ask_kernel_fires(self) -> None:
        if self.conn.devices.get(self.line) is not self:  # closed meanwhile
            self._asking = False
            return

        def done(future: asyncio.Future[dict[str, Any]]) -> None:
            self._asking = False
            if not future.cancelled() and future.exception() is None:
                self._note_fires(future.result())
        self.conn.request(self.name, "fires", line=self.line).add_done_callback(done)

    def _note_fires(self, reply: dict[str, Any]) -> None:
        fires = reply.get("kernel_fires")
        if isinstance(fires, int) and (self._kernel_fires is None or fires > self._kernel_fires):
            self._kernel_fires = fires

    def reset(self) -> bool:
        return False  # a simulated line has no function-level reset: reopening is all

    def unmask(self) -> None:
        os.eventfd_write(self.unmask_fd, 1)

    def unmask_op(self) -> tuple[int, int, bytes]:
        return (self.unmask_fd, 0, b"")

    def mask(self) -> None:
        self._send("mask")

    def disable(self) -> None:
        self.conn.send(self.name, "disable", line=self.line)

    def close(self) -> None:
        self._on_event = None
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
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

    def fd_for_consumer(self) -> int | None:
        return None  # no device fd to share: the line lives in another process
