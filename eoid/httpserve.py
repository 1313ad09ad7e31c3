"""A small HTTP/1.1 server that cannot hurt the event loop: for ``/metrics``.

prometheus_client's server ran a thread per connection with no limit and no read timeout:
600 connections opened and closed at once woke 600 threads that fought the event loop for
the GIL for about a minute, and 125 idle ones exhausted the unit's ``TasksMax``. Here:

* one I/O thread multiplexes every connection (``selectors``), non-blocking;
* at most ``max_connections`` are open; at the limit, the oldest one that has not sent its
  request within ``GRACE`` is dropped for a newcomer (idle connections cannot keep a scrape
  out), and while none has, new connections wait in the kernel's backlog (a flood of fresh
  ones cannot push a scrape out either);
* a request must arrive within ``read_timeout`` and its response leave within
  ``write_timeout``; requests are at most ``MAX_REQUEST`` bytes; every response closes its
  connection (Prometheus reconnects for each scrape; nothing stays open between scrapes);
* expensive answers (``Render``) run on one worker thread, one at a time, and requests
  that want the same answer (the same ``key``) while one is being made share it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

MAX_REQUEST = 8192
"""Bytes of request line and headers; a scrape's are a few hundred."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    """Lower-cased names."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass(frozen=True)
class Render:
    """An answer to make on the worker thread; requests with equal ``key`` share one."""

    key: Hashable
    make: Callable[[], Response]


Route = Callable[[Request], Response | Render]


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float
    accepted: float
    inbox: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None
    head: bool = False


def parse_request(data: bytes) -> Request | None:
    """The request in ``data`` (up to its blank line), None if malformed."""
    try:
        lines = data.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/1."):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    url = urlsplit(target)
    return Request(method, url.path, parse_qs(url.query), headers)


def encode_response(response: Response, head: bool = False) -> bytes:
    reason = HTTPStatus(response.status).phrase
    lines = [f"HTTP/1.1 {response.status} {reason}", *(f"{k}: {v}" for k, v in response.headers),
             f"Content-Length: {len(response.body)}", "Connection: close", "", ""]
    data = "\r\n".join(lines).encode("latin-1")
    return data if head else data + response.body


def _plain(status: int, text: str) -> Response:
    return Response(status, [("Content-Type", "text/plain; charset=utf-8")], text.encode())


def bind(address: tuple[str, int], backlog: int = 1024) -> socket.socket:
    """A listening socket: ``("", port)`` is every interface, IPv6 and IPv4 (as
    node_exporter's ``:port``), or IPv4 only where IPv6 is off."""
    host, port = address
    candidates: list[tuple[socket.AddressFamily, tuple[object, ...]]]
    if host == "":
        candidates = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    else:
        candidates = [(family, addr[:2]) for family, _, _, _, addr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)]
    error: OSError = OSError(errno.EADDRNOTAVAIL, f"no address for {host!r}")
    for family, addr in candidates:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as e:
            error = e
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and host == "":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


class Server:
    """Serves ``route`` on ``address`` from two threads of its own (see the module doc)."""

    GRACE = 0.5
    """Seconds a connection may take to send its request before, at the limit, it makes
    room for another (a scrape sends it at once)."""

    def __init__(self, address: tuple[str, int], route: Route, *, max_connections: int = 64,
                 read_timeout: float = 10.0, write_timeout: float = 30.0) -> None:
        self.route = route
        self.max_connections = max_connections
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.listener = bind(address)
        self.renders = 0
        """Answers made on the worker (tests: shared scrapes make one)."""
        self._sel = selectors.DefaultSelector()
        self._reading: collections.OrderedDict[_Conn, None] = collections.OrderedDict()
        self._writing: collections.OrderedDict[_Conn, None] = collections.OrderedDict()
        self._waiting: dict[Hashable, list[_Conn]] = {}
        self._todo: queue.SimpleQueue[Render | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Hashable, Response]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stop = False
        self._paused = False
        self._sel.register(self.listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._io = threading.Thread(target=self._serve, name="metrics-io", daemon=True)
        self._worker = threading.Thread(target=self._work, name="metrics-render", daemon=True)
        self._worker.start()
        self._io.start()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._reading) + len(self._writing) + sum(map(len, self._waiting.values()))

    def close(self) -> None:
        self._stop = True
        self._wake()
        self._io.join(timeout=5)
        self._todo.put(None)
        self._worker.join(timeout=1)  # a render may wait on the stopping loop: don't hang
        for conn in [*self._reading, *self._writing, *(c for w in self._waiting.values()
                                                         for c in w)]:
            conn.sock.close()
        self._sel.close()
        self.listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    # --- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        while (render := self._todo.get()) is not None:
            try:
                response = render.make()
            except Exception as e:  # a scrape must not kill the exporter
                response = _plain(500, f"error: {e}\n")
            self.renders += 1
            self._done.put((render.key, response))
            self._wake()

    # --- the I/O thread --------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop:
            now = time.monotonic()
            deadlines = [next(iter(d)).deadline for d in (self._reading, self._writing) if d]
            if self._paused and self._reading:  # when the oldest request may make room
                deadlines.append(next(iter(self._reading)).accepted + self.GRACE)
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            for key, mask in self._sel.select(timeout):
                fileobj = key.fileobj
                if fileobj is self.listener:
                    self._accept()
                elif fileobj == self._wake_r:
                    self._finished()
                elif mask & selectors.EVENT_READ:
                    self._read(key.data)
                else:
                    self._write(key.data)
            self._expire(time.monotonic())
            if self._paused and self._room(time.monotonic()):
                self._paused = False
                self._sel.register(self.listener, selectors.EVENT_READ, None)

    def _room(self, now: float) -> bool:
        """Whether a connection may be accepted, dropping the oldest connection that has
        not sent its request within ``GRACE`` if that makes room."""
        if self.open_connections < self.max_connections:
            return True
        oldest = next(iter(self._reading), None)
        if oldest is None or now - oldest.accepted < self.GRACE:
            return False
        self._drop(oldest)
        return True

    def _accept(self) -> None:
        for _ in range(256):  # then let the others have a turn
            if not self._room(time.monotonic()):
                # full of fresh connections: new ones wait in the kernel's backlog (a
                # scrape is not dropped for a flood; it is taken in its turn)
                self._paused = True
                self._sel.unregister(self.listener)
                return
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ECONNABORTED, EMFILE...: try again on the next event
                return
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Conn(sock, now + self.read_timeout, now)
            self._reading[conn] = None
            # the request (or the client's close) is often there already: then the
            # connection is answered or gone without a round through the selector
            if self._read(conn) and conn in self._reading:
                self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> bool:
        """Read what ``conn`` sent; False once it is closed or answered."""
        try:
            data = conn.sock.recv(MAX_REQUEST + 1 - len(conn.inbox))
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return False
        conn.inbox += data
        end = conn.inbox.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbox) > MAX_REQUEST:
                self._respond(conn, _plain(431, "request too large\n"))
                return False
            return True
        request = parse_request(bytes(conn.inbox[:end]))
        if request is None:
            self._respond(conn, _plain(400, "bad request\n"))
            return False
        conn.head = request.method == "HEAD"
        try:
            answer = self.route(request)
        except Exception as e:
            answer = _plain(500, f"error: {e}\n")
        if isinstance(answer, Response):
            self._respond(conn, answer)
            return False
        del self._reading[conn]
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        waiting = self._waiting.get(answer.key)
        if waiting is not None:
            waiting.append(conn)  # the answer being made serves this request too
        else:
            self._waiting[answer.key] = [conn]
            self._todo.put(answer)
        return False

    def _finished(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        while not self._done.empty():
            key, response = self._done.get()
            for conn in self._waiting.pop(key, []):
                self._respond(conn, response)

    def _respond(self, conn: _Conn, response: Response) -> None:
        self._reading.pop(conn, None)
        conn.out = memoryview(encode_response(response, conn.head))
        conn.deadline = time.monotonic() + self.write_timeout
        self._writing[conn] = None
        self._write(conn)
        if conn in self._writing:  # the rest when the socket takes it
            try:
                self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
            except KeyError:
                self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        self._reading.pop(conn, None)
        self._writing.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _expire(self, now: float) -> None:
        for pending in (self._reading, self._writing):
            while pending:
                conn = next(iter(pending))
                if conn.deadline > now:
                    break
                self._drop(conn)
