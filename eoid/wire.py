"""Messages on eoid's unix sockets: one JSON object per SOCK_SEQPACKET record, fds by SCM_RIGHTS.

Both the control socket (consumers, ``eoid status``) and the simulated-device socket
speak this; SEQPACKET keeps message boundaries, so there is no framing to get wrong.

Whatever arrives, a receiver either gets a message or a ``ProtocolError`` with a code,
and never keeps an fd it did not ask for: every fd that came with a refused message is
closed here, whatever the reason (oversize, too many fds, bad JSON, an integer too long
to convert, nesting too deep for the parser, NaN, an empty record).
"""

from __future__ import annotations

import array
import errno
import json
import os
import select
import socket
import struct
from typing import Any, NoReturn

from eoid.errors import ProtocolError

MAX_FDS = 8
"""The most fds one message may carry; a message with more is refused (``too_many_fds``)
and the kernel discards the fds that did not fit."""
BATCH_MAX_FDS = 64
"""The most fds one message to a sim may carry: a batch of requests (``eoid.sim.backend``)."""
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; Python 3.11 lacks the name
NGROUPS_MAX = 65536
_MSG_CTRUNC, _MSG_TRUNC = int(socket.MSG_CTRUNC), int(socket.MSG_TRUNC)  # (IntFlag ops are slow)


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def encode(message: dict[str, Any]) -> bytes:
    """Strict JSON (no NaN or Infinity): what we send must parse anywhere."""
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode()


def send_data(sock: socket.socket, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def send_msg(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = (),
             ) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    send_data(sock, data, fds)


def decode(data: bytes) -> dict[str, Any]:
    """Parse one message, or raise ``ProtocolError``. Every way ``json.loads`` can fail
    is one: a decode error, a ``ValueError`` (an integer of more than 4300 digits, NaN
    or Infinity) or a ``RecursionError`` (nesting deeper than the parser's stack)."""
    try:
        message = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError("bad_json", "not a JSON object: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProtocolError("bad_json", f"not a JSON object: {str(e)[:200]}") from None
    if not isinstance(message, dict):
        raise ProtocolError("bad_json", "not a JSON object")
    return message


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has shut down or closed: SEQPACKET returns 0 bytes both for an
    empty record and at the end, and only the socket's state tells them apart."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
               for _, ev in poller.poll(0))


def recv_msg(sock: socket.socket, max_bytes: int = 65536, max_fds: int = MAX_FDS,
             ) -> tuple[dict[str, Any], list[int]] | None:
    """Receive one message and any fds with it; None when the peer has closed.

    Raises ``ProtocolError`` for an oversized, malformed or empty message, or one with
    more than ``max_fds`` fds; fds that came with such a message are closed, so a bad
    peer cannot leak descriptors into us.
    """
    data, ancdata, flags, _ = sock.recvmsg(max_bytes + 1, socket.CMSG_SPACE(max_fds * 4),
                                           socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    try:
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if flags & _MSG_CTRUNC:
            raise ProtocolError("too_many_fds", f"a message may carry at most {max_fds} fds")
        if flags & _MSG_TRUNC or len(data) > max_bytes:
            raise ProtocolError("too_large", f"message larger than {max_bytes} bytes")
        if not data and not fds:
            if _closed_by_peer(sock):
                return None
            raise ProtocolError("bad_request", "empty message")
        return decode(data), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED), not from anything it says."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups when it connected, from the kernel
    (``SO_PEERGROUPS``): nothing from /proc, which a sandbox may hide and a pid may reuse."""
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < NGROUPS_MAX * 4:  # more groups than room
                size *= 4
                continue
            raise
        gids = array.array("I")
        gids.frombytes(raw[:len(raw) - len(raw) % gids.itemsize])
        return frozenset(gids)
