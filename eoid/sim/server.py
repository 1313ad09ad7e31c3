"""``eoid sim``: simulated devices (and, optionally, simulated guests) in one process.

The process serves its lines on a unix socket to the daemon's sim backend, generates
load on them, and can attach a simulated guest to each device through the daemon's
control socket exactly as a VMM would. A guest services its device (acks it, which
drops the line) and then writes the EOI; that is the same order a real driver uses.
Tools talk to the same socket: ``stats`` (``summary``: its counts only, for any number
of lines), ``quiesce``, ``raise``, ``request``, ``set`` and ``ping``.

One daemon connection serves any number of lines: ``open``, ``enable``, ``mask``,
``disable`` and ``close`` name their ``line``, events (``{"event": "request", "line": …}``)
name theirs, and a reply echoes the request's ``id``. A connection that closes takes
its lines down, as closing a VFIO device fd does. The requests a daemon makes in one turn
of its loop come as one ``batch`` (``{"op": "batch", "requests": [{…, "fds": n}, …]}``,
the fds of each in turn, at most ``BATCH_MAX_FDS``) and are answered in one message,
``{"replies": [...]}``: observation windows opening together cost one message each way.

Nothing here waits on the daemon: requests are read as they come and answered through
an ``Outbox`` (a daemon that reads slowly gets its replies later, not never), and a
guest attaches on a non-blocking socket whose answer the loop awaits, so a daemon busy
starting up (or frozen) delays no other line and no other guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import random
import resource
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from eoid.device import drain_eventfd
from eoid.errors import EoidError, ProtocolError
from eoid.sim.line import SimLine
from eoid.sim.outbox import Outbox
from eoid.stats import Histogram
from eoid.systemd import close_all
from eoid.wire import BATCH_MAX_FDS, recv_msg, send_msg

TICK = 0.001  # load generator resolution: events due are raised in one batch per tick
TICK_PER_LINE = 10e-6  # ...but longer with many lines: a tick visits them all (1024: 10 ms)
# A guest waits this long for the answer to its attach (a daemon arming 1024 devices on a
# busy host may take seconds; waiting costs nothing, giving up and retrying would churn).
ATTACH_TIMEOUT = 60.0
RETRY_FIRST, RETRY_MAX = 0.02, 1.0  # a guest's attach backoff, with jitter
# Attaches in flight at once: 1024 guests connecting together would overflow the control
# socket's backlog and spin on EAGAIN; in turns they keep it short.
ATTACHING = 32
READ_BATCH = 64  # requests read per wake-up, so one busy connection cannot hold the loop


@dataclass
class Misbehaviour:
    """What a chosen device or guest does wrong, so an operator can see eoid's answer."""

    stuck_line: bool = False  # the line stays asserted however often it is serviced
    no_eoi: bool = False  # the guest services the device but never sends the EOI
    spurious_eoi: float = 0.0  # EOIs per second sent with nothing pending


@dataclass
class LineSpec:
    name: str  # the simulated line
    device: str  # the eoid device (YAML name) whose consumer the guest is
    rate: float = 0.0  # device events per second
    service_ns: int = 0  # the guest's service time
    misbehaviour: Misbehaviour = field(default_factory=Misbehaviour)


class SimGuest:
    """A guest driver for one device, attached through eoid's control socket."""

    def __init__(self, line: SimLine, spec: LineSpec, control: Path,
                 loop: asyncio.AbstractEventLoop, turns: asyncio.Semaphore | None = None,
                 ) -> None:
        self.line = line
        self.spec = spec
        self.turns = turns or asyncio.Semaphore(1)  # attaches in flight, shared by guests
        self.control = control
        self.loop = loop
        self.sock: socket.socket | None = None  # the attached control connection
        self.irq_fd = -1
        self.eoi_fd = -1
        self.in_service = False
        self.owed_eoi = False
        self.irqs = 0  # irq signals received (sum of counts)
        self.eois = 0  # EOIs written for serviced interrupts
        self.spurious_sent = 0
        self.handled = 0
        self.attaches = 0
        self.latency = Histogram()  # device assertion → guest sees the irq
        self._log = structlog.get_logger("eoid.sim.guest").bind(device=spec.device)
        self._spurious: asyncio.TimerHandle | None = None

    async def run(self) -> None:
        """Attach, and re-attach whenever the daemon goes away (with a short backoff)."""
        delay = RETRY_FIRST
        while True:
            if self.sock is None:
                try:
                    async with self.turns:
                        await self._attach()
                    delay = RETRY_FIRST
                except (EoidError, OSError) as e:
                    self._log.debug("attach failed", error=str(e))
                    await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                    delay = min(delay * 2, RETRY_MAX)
                    continue
            await asyncio.sleep(0.5)

    async def _attach(self) -> None:
        """``attach`` on a non-blocking socket: the loop keeps serving every other line and
        guest while the daemon answers (a unix connect completes at once or fails)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
                             | socket.SOCK_NONBLOCK)
        try:
            sock.connect(str(self.control))
            send_msg(sock, {"op": "attach", "id": 1, "device": self.spec.device})
            async with asyncio.timeout(ATTACH_TIMEOUT):
                reply, fds = await self._reply(sock)
        except BaseException:
            sock.close()
            raise
        if not reply.get("ok") or len(fds) < 2:
            close_all(fds)
            sock.close()
            raise EoidError(f"attach refused: {reply.get('error')}")
        self._close_fds()
        self.irq_fd, self.eoi_fd = fds[0], fds[1]
        close_all(fds[2:])
        self.sock = sock
        self.attaches += 1
        self.loop.add_reader(self.irq_fd, self._on_irq)
        self.loop.add_reader(sock.fileno(), self._on_control)
        if self.spec.misbehaviour.spurious_eoi and self._spurious is None:
            self._spurious = self.loop.call_later(1 / self.spec.misbehaviour.spurious_eoi,
                                                  self._send_spurious)
        self._on_irq()  # an irq may already be waiting

    async def _reply(self, sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
        """The reply to our request (events before it are logged), as the loop sees it."""
        while True:
            try:
                received = recv_msg(sock, 1 << 20)
            except (BlockingIOError, InterruptedError):
                await self._readable(sock)
                continue
            if received is None:
                raise EoidError("the daemon closed the connection")
            message, fds = received
            if "event" not in message:
                return message, fds
            close_all(fds)
            self._log.info("daemon says", message=message)

    async def _readable(self, sock: socket.socket) -> None:
        ready: asyncio.Future[None] = self.loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)
        self.loop.add_reader(sock.fileno(), wake)
        try:
            await ready
        finally:
            self.loop.remove_reader(sock.fileno())

    def _on_control(self) -> None:
        sock = self.sock
        assert sock is not None
        try:
            received = recv_msg(sock, 1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ProtocolError):
            received = None
        if received is None:  # the daemon is gone: keep our eventfds until it is back
            self.loop.remove_reader(sock.fileno())
            sock.close()
            self.sock = None
            return
        message, fds = received
        close_all(fds)
        self._log.info("daemon says", message=message)

    def _on_irq(self) -> None:
        count = drain_eventfd(self.irq_fd)
        if not count:
            return
        self.irqs += count
        if self.line.asserted_at:
            self.latency.observe(time.monotonic_ns() - self.line.asserted_at)
        if self.in_service:
            return
        self.in_service = True
        if self.spec.service_ns:
            self.loop.call_later(self.spec.service_ns / 1e9, self._service_done)
        else:
            self._service_done()

    def _service_done(self) -> None:
        self.in_service = False
        self.handled += self.line.ack()
        if self.spec.misbehaviour.no_eoi:
            self.owed_eoi = True
            return
        self._send_eoi()

    def _send_eoi(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self.eoi_fd, 1)
            self.eois += 1

    def _send_spurious(self) -> None:
        rate = self.spec.misbehaviour.spurious_eoi
        if not rate:
            self._spurious = None
            return
        if not self.in_service and self.eoi_fd >= 0 and not self.line.masked:
            os.eventfd_write(self.eoi_fd, 1)
            self.spurious_sent += 1
        self._spurious = self.loop.call_later(1 / rate, self._send_spurious)

    def heal(self) -> None:
        """Stop misbehaving; an EOI still owed is sent now."""
        self.spec.misbehaviour = Misbehaviour()
        if self.owed_eoi:
            self.owed_eoi = False
            self._send_eoi()

    def counters(self) -> dict[str, Any]:
        p50, p99 = self.latency.quantile(0.5), self.latency.quantile(0.99)
        return {"irqs": self.irqs, "eois": self.eois, "spurious_eois_sent": self.spurious_sent,
                "handled": self.handled, "attaches": self.attaches,
                "in_service": self.in_service or self.owed_eoi,
                "attached": self.sock is not None,
                "assert_to_irq_p50_us": None if p50 is None else round(p50 * 1e6, 1),
                "assert_to_irq_p99_us": None if p99 is None else round(p99 * 1e6, 1)}

    def _close_fds(self) -> None:
        for fd in (self.irq_fd, self.eoi_fd):
            if fd >= 0:
                with contextlib.suppress(ValueError, OSError):
                    self.loop.remove_reader(fd)
                os.close(fd)
        self.irq_fd = self.eoi_fd = -1


class SimServer:
    """Serves simulated lines to the daemon, runs their load and their guests."""

    def __init__(self, socket_path: Path, specs: list[LineSpec], control: Path | None,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.path = socket_path
        self.loop = loop
        self.specs = {s.name: s for s in specs}
        self.lines = {s.name: SimLine(s.name) for s in specs}
        self.owners: dict[str, socket.socket] = {}  # line → the daemon connection using it
        turns = asyncio.Semaphore(ATTACHING)
        self.guests = {s.name: SimGuest(self.lines[s.name], s, control, loop, turns)
                       for s in specs} if control else {}
        self.loading = True
        self.started = time.monotonic()
        self._origin: dict[str, tuple[float, int]] = {}  # line → (load start, events raised)
        self._conns: dict[socket.socket, set[str]] = {}  # connection → the lines it opened
        self._outboxes: dict[socket.socket, Outbox] = {}  # connection → what it has yet to read
        self._sock: socket.socket | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._log = structlog.get_logger("eoid.sim")
        for name, spec in self.specs.items():
            self.lines[name].stuck = spec.misbehaviour.stuck_line

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(str(self.path))
        sock.listen(256)
        sock.setblocking(False)
        self._sock = sock
        self.loop.add_reader(sock.fileno(), self._accept)
        self._ticking = False
        self._start_ticking()
        for guest in self.guests.values():
            self._tasks.append(self.loop.create_task(guest.run()))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for conn in list(self._conns):
            self._drop(conn)
        if self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    # --- load ------------------------------------------------------------------------------

    def _tick(self) -> None:
        """Raise the events due on each line since its load began.

        A line's load begins once it is enabled (and its guest attached), so nothing piles
        up while the daemon starts; it pauses while the line is down."""
        now = time.monotonic()
        for name, line in self.lines.items():
            rate = self.specs[name].rate
            guest = self.guests.get(name)
            if not (self.loading and rate and line.enabled
                    and (guest is None or guest.sock is not None)):
                self._origin.pop(name, None)
                continue
            origin, done = self._origin.setdefault(name, (now, 0))
            due = math.floor(rate * (now - origin)) - done
            if due > 0:
                self._origin[name] = (origin, done + due)
                line.queue(due)
        self._ticking = False
        self._start_ticking()

    def _start_ticking(self) -> None:
        """Tick only while some line has a rate: an idle sim uses no CPU."""
        if not self._ticking and self.loading and any(s.rate for s in self.specs.values()):
            self._ticking = True
            self.loop.call_later(max(TICK, TICK_PER_LINE * len(self.lines)), self._tick)

    # --- the socket ------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE: the connection waits in the backlog
                self._log.warning("accept failed", error=e.strerror)
                return
            conn.setblocking(False)
            self._conns[conn] = set()
            self._outboxes[conn] = Outbox(conn, self.loop, functools.partial(self._failed, conn))
            self.loop.add_reader(conn.fileno(), self._readable, conn)

    def _failed(self, conn: socket.socket, error: OSError) -> None:
        """A reply could not be sent: the connection is dead (or broken); drop it."""
        self.loop.call_soon(self._drop, conn)

    def _drop(self, conn: socket.socket) -> None:
        if conn not in self._conns:
            return
        for name in self._conns.pop(conn):
            self._release(name)
        self._outboxes.pop(conn).close()
        self.loop.remove_reader(conn.fileno())
        conn.close()

    def _release(self, name: str) -> None:
        """Like closing a VFIO device fd: INTx is torn down and the line is free again."""
        del self.owners[name]
        self._disable(self.lines[name])

    def _disable(self, line: SimLine) -> None:
        for fd in (line.unmask_fd, line.virqfd):
            if fd >= 0:
                self.loop.remove_reader(fd)
        line.disable()

    def _readable(self, conn: socket.socket) -> None:
        for _ in range(READ_BATCH):
            if conn not in self._conns:
                return
            try:
                received = recv_msg(conn, max_fds=BATCH_MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except (OSError, ProtocolError):
                received = None
            if received is None:
                self._drop(conn)
                return
            message, fds = received
            if message.get("op") == "batch":
                self._outboxes[conn].send({"replies": self._batch(conn, message, fds)})
            else:
                self._outboxes[conn].send(self._answer(conn, message, fds))

    def _batch(self, conn: socket.socket, message: dict[str, Any], fds: list[int],
               ) -> list[dict[str, Any]]:
        """A daemon's requests of one turn of its loop, each with ``fds`` of the message's
        fds in turn (``SimConnection._send_batch``): answered in turn, in one message."""
        requests = message.get("requests")
        if not isinstance(requests, list) or not all(
                isinstance(r, dict) and type(r.get("fds")) is int and r["fds"] >= 0
                for r in requests) or sum(r["fds"] for r in requests) != len(fds):
            close_all(fds)
            return [{"ok": False, "error": {"code": "bad_request", "message":
                                            "a batch is a list of requests and their fds"}}]
        replies, at = [], 0
        for request in requests:
            replies.append(self._answer(conn, request, fds[at:at + request["fds"]]))
            at += request["fds"]
        return replies

    def _answer(self, conn: socket.socket, message: dict[str, Any], fds: list[int],
                ) -> dict[str, Any]:
        try:
            reply = self._handle(conn, message, fds)
        except ProtocolError as e:
            reply = {"ok": False, "error": {"code": e.code, "message": str(e)}}
        if "id" in message:
            reply["id"] = message["id"]
        return reply

    def _handle(self, conn: socket.socket, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Answer one request; the fds that came with it are ours to keep or close."""
        op = msg.get("op")
        if op == "enable":
            try:
                line = self._owned(conn, msg)
                if len(fds) != 2:
                    raise ProtocolError("bad_request", "enable needs a trigger and an unmask fd")
            except ProtocolError:
                close_all(fds)
                raise
            self._disable(line)
            line.enable(fds[0], fds[1])
            self.loop.add_reader(line.unmask_fd, line.on_unmask)
            return {"ok": True}
        if op == "route":  # the datapath switch: a trigger, and the unmask eventfd or none
            try:
                line = self._owned(conn, msg)
                if not line.enabled or len(fds) not in (1, 2):
                    raise ProtocolError("bad_request", "route needs an enabled line, a "
                                        "trigger fd and at most an unmask fd")
            except ProtocolError:
                close_all(fds)
                raise
            if line.virqfd >= 0:
                self.loop.remove_reader(line.virqfd)
            line.route(fds[0], fds[1] if len(fds) == 2 else -1)
            if line.virqfd >= 0:
                self.loop.add_reader(line.virqfd, line.on_virqfd)
            return {"ok": True, "kernel_fires": line.kernel_fires}
        close_all(fds)
        if op == "fires":  # what /proc/interrupts tells of a real line, on the kernel's path
            return {"ok": True, "kernel_fires": self._owned(conn, msg).kernel_fires}
        if op == "open":
            name = str(msg.get("line"))
            if name not in self.lines:
                raise ProtocolError("unknown_line", f"no simulated line {name!r}")
            if self.owners.setdefault(name, conn) is not conn:
                raise ProtocolError("busy", f"line {name!r} is already open")
            self._conns[conn].add(name)
            self.lines[name].kernel_fires = 0  # counted per open, as VFIO's device is
            return {"ok": True, "line": name}
        if op in ("mask", "disable", "close"):
            line = self._owned(conn, msg)
            if op == "mask":
                line.mask()
            elif op == "disable":
                self._disable(line)
            else:
                self._conns[conn].discard(line.name)
                self._release(line.name)
            return {"ok": True}
        return self._tool(msg)

    def _owned(self, conn: socket.socket, msg: dict[str, Any]) -> SimLine:
        name = str(msg.get("line"))
        if self.owners.get(name) is not conn:
            raise ProtocolError("not_open", f"line {name!r} is not open on this connection")
        return self.lines[name]

    def _tool(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "ping":  # answered in turn: all earlier requests on the connection are done
            return {"ok": True}
        if op == "summary":  # what ``stats`` says, counted: fits one message at any size
            return {"ok": True, "lines": len(self.lines),
                    "enabled": sum(line.enabled for line in self.lines.values()),
                    "attached": sum(g.sock is not None for g in self.guests.values())}
        if op == "stats":
            for sim_line in self.lines.values():  # unmasks already signalled count too: a
                if sim_line.unmask_fd >= 0:  # reader may hold them, not yet run this turn
                    sim_line.on_unmask()
                if sim_line.virqfd >= 0:
                    sim_line.on_virqfd()
            return {"ok": True, "elapsed": time.monotonic() - self.started,
                    "loading": self.loading, "lines": self.stats()}
        if op in ("heal", "quiesce"):  # stop misbehaving; quiesce also stops the load
            self.loading = self.loading and op == "heal"
            for sim_line in self.lines.values():
                sim_line.stuck = False
            for guest in self.guests.values():
                guest.heal()
            return {"ok": True}
        line = self.lines.get(str(msg.get("line")))
        if line is None:
            raise ProtocolError("unknown_line", f"no simulated line {msg.get('line')!r}")
        if op == "raise":
            line.raise_(int(msg.get("count", 1)))
        elif op == "ack":
            return {"ok": True, "handled": line.ack()}
        elif op == "set":
            spec = self.specs[line.name]
            if "rate" in msg:
                self._origin.pop(line.name, None)
                spec.rate = float(msg["rate"])
                self._start_ticking()
            if "stuck" in msg:
                line.stuck = bool(msg["stuck"])
                if not line.stuck:
                    line.unmask()  # nothing to do unless eoid unmasks anyway
        elif op in ("request", "error"):
            owner = self.owners.get(line.name)
            if owner is None:
                raise ProtocolError("not_open", f"line {line.name!r} is not open")
            self._outboxes[owner].send({"event": op, "line": line.name})
        else:
            raise ProtocolError("unknown_op", f"unknown op {op!r}")
        return {"ok": True, "line": line.counters()}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, line in self.lines.items():
            out[name] = line.counters()
            if name in self.guests:
                out[name]["guest"] = self.guests[name].counters()
        return out


async def serve(socket_path: Path, specs: list[LineSpec], control: Path | None) -> None:
    """Run the sim process until SIGTERM or SIGINT."""
    # Five fds a line with a guest (trigger, unmask, irq, eoi, its control connection):
    # take the whole hard limit, as the daemon does.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    server = SimServer(socket_path, specs, control, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server.start()
    structlog.get_logger("eoid.sim").info("simulated devices ready", socket=str(socket_path),
                                          lines=len(specs))
    try:
        await stop.wait()
    finally:
        server.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
