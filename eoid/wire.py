"""Messages on eoid's unix sockets: one JSON object per SOCK_SEQPACKET record, fds by SCM_RIGHTS.

Both the control socket (consumers, ``eoid status``) and the simulated-device socket
speak this; SEQPACKET keeps message boundaries, so there is no framing to get wrong.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from eoid.errors import ProtocolError

MAX_FDS = 8


def send_msg(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = (),
             ) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def recv_msg(sock: socket.socket, max_bytes: int = 65536,
             ) -> tuple[dict[str, Any], list[int]] | None:
    """Receive one message and any fds with it; None when the peer has closed.

    Raises ``ProtocolError`` for an oversized or malformed message; fds that came with
    such a message are closed, so a bad peer cannot leak descriptors into us.
    """
    data, fds, flags, _ = socket.recv_fds(sock, max_bytes + 1, MAX_FDS,
                                          socket.MSG_CMSG_CLOEXEC)
    if not data and not fds:
        return None
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > max_bytes:
            raise ProtocolError("too_large", f"message larger than {max_bytes} bytes")
        try:
            message = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ProtocolError("bad_json", f"not a JSON object: {e}") from e
        if not isinstance(message, dict):
            raise ProtocolError("bad_json", "not a JSON object")
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from the kernel (SO_PEERCRED), not from anything it says."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid
