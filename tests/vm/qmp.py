"""QEMU's monitor from inside the test guest: run-in-vm's ``VM_MONITOR=1`` wires a QMP
server to the guest's second serial port, so a test can ask QEMU for what only the
hypervisor can do (``pcie_aer_inject_error``: a device error as the hardware reports it).

QMP is one JSON object per line. Until the port is raw, the guest's tty echoes what
QEMU sends (its greeting) back to QEMU, which answers with errors: the client makes the
port raw at once, drains what came, and resets QEMU's JSON parser with a control
character (qmp-spec, "Forcing the JSON parser into known-good state"). Lines that are
not JSON, events and replies to other ids are skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import termios
import time
import tty
from pathlib import Path
from typing import Any

GUEST_PORT = Path("/dev/ttyS1")


class QmpError(Exception):
    pass


class GuestQmp:
    def __init__(self, port: Path = GUEST_PORT, timeout: float = 30.0) -> None:
        self.fd = os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)  # no echo, no line discipline: the bytes go as they are
        self.timeout = timeout
        self._buf = b""
        self._ids = itertools.count(1)
        while select.select([self.fd], [], [], 0.5)[0]:  # until the echoed exchange is over
            with contextlib.suppress(BlockingIOError):
                os.read(self.fd, 65536)
        termios.tcflush(self.fd, termios.TCIOFLUSH)
        self._write(b"\x1b\xff\r\n")
        try:
            self.execute("qmp_capabilities")
        except QmpError as e:  # a previous client already left capabilities negotiation
            if "CommandNotFound" not in str(e):
                raise

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> GuestQmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run one QMP command; its ``return`` value, QmpError on an ``error`` reply."""
        ident = f"eoid-{next(self._ids)}"
        request: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            request["arguments"] = arguments
        self._write(json.dumps(request).encode() + b"\r\n")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_json(deadline)
            if reply.get("id") != ident:
                continue
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error']}")
            return reply.get("return")

    def hmp(self, line: str) -> str:
        """A human monitor command (``pcie_aer_inject_error`` has no QMP form); its output."""
        return str(self.execute("human-monitor-command", **{"command-line": line}))

    def _write(self, data: bytes) -> None:
        while data:
            select.select([], [self.fd], [], self.timeout)
            data = data[os.write(self.fd, data):]

    def _read_json(self, deadline: float) -> dict[str, Any]:
        while True:
            line, sep, rest = self._buf.partition(b"\n")
            if sep:
                self._buf = rest
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    return obj
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(f"no reply from QEMU's monitor on {GUEST_PORT} "
                               "(booted without VM_MONITOR=1?)")
            if select.select([self.fd], [], [], left)[0]:
                with contextlib.suppress(BlockingIOError):
                    self._buf += os.read(self.fd, 65536)
