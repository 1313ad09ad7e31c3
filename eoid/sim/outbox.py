"""Sending on a non-blocking SEQPACKET socket without ever waiting for the peer.

A unix SEQPACKET peer takes only a few messages (``net.unix.max_dgram_qlen``, 10 by
default) before the sender gets ``EAGAIN``. Both ends of a sim socket pipeline requests
and replies, so neither may block nor drop: what the peer cannot take now waits here, in
order (with copies of its fds, which the caller may close at once), and goes out when
the loop sees the socket writable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from eoid.systemd import close_all
from eoid.wire import send_msg


class Outbox:
    """The ordered send queue of one socket; ``on_error`` hears of a failed send (once)."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_error: Callable[[OSError], None]) -> None:
        self.sock = sock
        self.loop = loop
        self.on_error = on_error
        self._queue: deque[tuple[dict[str, Any], list[int]]] = deque()
        self._writing = False
        self._failed = False
        self.sent_at = loop.time()  # when the peer last took a message: it is alive

    def __len__(self) -> int:
        return len(self._queue)

    def send(self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send now if nothing is waiting and the peer can take it, else queue it."""
        if self._failed:
            return
        if not self._queue:
            try:
                send_msg(self.sock, message, fds)
                self.sent_at = self.loop.time()
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                self._fail(e)
                return
        self._queue.append((message, [os.dup(fd) for fd in fds]))
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self._flush)

    def _flush(self) -> None:
        while self._queue:
            message, fds = self._queue[0]
            try:
                send_msg(self.sock, message, fds)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._fail(e)
                return
            self._queue.popleft()
            close_all(fds)
            self.sent_at = self.loop.time()
        self._stop_writing()

    def _fail(self, error: OSError) -> None:
        self._failed = True
        self.close()
        self.on_error(error)

    def _stop_writing(self) -> None:
        if self._writing:
            self._writing = False
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        """Drop what is still queued (before the socket closes)."""
        self._stop_writing()
        while self._queue:
            close_all(self._queue.popleft()[1])
