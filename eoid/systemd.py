"""The service manager's side channels, written by hand (no libsystemd).

systemd talks to a ``Type=notify`` service through three environment-borne
protocols, all implemented here:

* **sd_notify**: ``NOTIFY_SOCKET`` names an ``AF_UNIX`` datagram socket (a
  path, or an abstract name written with a leading ``@``). Each datagram is
  newline-separated ``KEY=VALUE`` assignments, optionally carrying file
  descriptors (``SCM_RIGHTS``). eoid uses it for readiness, reload and stop
  states, a status line, watchdog pings and the *file descriptor store*: the
  eventfds and device fds it parks in PID 1 so that a restarted eoid re-adopts
  them and consumers never notice (DESIGN.md section 7).
* **watchdog**: ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) say how often PID 1
  wants ``WATCHDOG=1`` before it kills us as wedged.
* **fd passing at start**: ``LISTEN_PID``/``LISTEN_FDS``/``LISTEN_FDNAMES``
  hand back, from fd 3 upward, what the previous instance stored.

Nothing here keeps module-level state: a ``Notifier`` is built once by the
daemon and passed to whoever needs it.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import re
import select
import socket
import time
from collections.abc import Iterable, Mapping, MutableMapping, Sequence

from eoid.errors import EoidError

__all__ = [
    "FDNAME_MAX",
    "LISTEN_FDS_START",
    "MAX_FDS_PER_MESSAGE",
    "MAX_MESSAGE_BYTES",
    "Notifier",
    "SystemdError",
    "close_all",
    "listen_fds",
    "monotonic_usec",
    "valid_fdname",
    "watchdog_interval",
]

LISTEN_FDS_START = 3
"""The first fd systemd passes (``SD_LISTEN_FDS_START``)."""

MAX_FDS_PER_MESSAGE = 253
"""The kernel's ``SCM_MAX_FD``: more fds in one datagram fail with EINVAL."""

MAX_MESSAGE_BYTES = 4096
"""PID 1 reads notifications into a ``PIPE_BUF``-sized buffer and drops
longer ones as truncated, so we refuse to send them."""

FDNAME_MAX = 255
"""Longest name PID 1 accepts in ``FDNAME=`` (``fdname_is_valid``)."""

_KEY_RE = re.compile(r"[A-Z_][A-Z0-9_]*")


class SystemdError(EoidError):
    """The environment systemd gave us is malformed, or a notification is invalid."""


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock ``MONOTONIC_USEC=`` is read against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def valid_fdname(name: str) -> bool:
    """Whether PID 1 accepts ``name`` in ``FDNAME=``.

    It must survive being joined with ``:`` into ``LISTEN_FDNAMES``, so no
    colons, and only printable ASCII (systemd's ``fdname_is_valid``).
    """
    return 0 < len(name) <= FDNAME_MAX and all(" " <= c <= "~" and c != ":" for c in name)


def _socket_address(value: str) -> str | bytes:
    """Turn a ``NOTIFY_SOCKET`` value into something ``socket.connect`` takes.

    ``@name`` is Linux's abstract namespace: the kernel wants a leading NUL
    byte instead, and the name is not NUL-terminated.
    """
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise SystemdError(f"NOTIFY_SOCKET={value!r}: neither an absolute path nor an @abstract name")


def _format(fields: Mapping[str, object]) -> str:
    """Serialise ``KEY=VALUE`` fields; a newline in a value would forge another field."""
    lines = []
    for name, value in fields.items():
        key = name.upper()
        if not _KEY_RE.fullmatch(key):
            raise SystemdError(f"invalid notify field name {key!r}")
        text = str(int(value)) if isinstance(value, bool) else str(value)
        if "\n" in text:
            raise SystemdError(f"{key}= value must be a single line: {text!r}")
        lines.append(f"{key}={text}")
    return "\n".join(lines)


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op when there is none.

    Build it with :meth:`from_environ`. When ``NOTIFY_SOCKET`` is unset (eoid
    run by hand, or in tests) every method returns False and sends nothing, so
    the daemon never has to ask whether it runs under systemd.

    Sends are blocking with a short timeout: PID 1 drains its notify socket
    quickly, and a notification that cannot be delivered within ``timeout``
    raises ``OSError`` rather than stalling the interrupt loop forever.
    """

    def __init__(self, address: str | None, *, timeout: float = 2.0) -> None:
        self._address = None if address is None else _socket_address(address)
        self._display = address
        self._timeout = timeout
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(
        cls,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset: bool = False,
        timeout: float = 2.0,
    ) -> Notifier:
        """Read ``NOTIFY_SOCKET``; with ``unset``, drop it so children do not inherit it."""
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET") or None
        if unset:
            env.pop("NOTIFY_SOCKET", None)
        return cls(value, timeout=timeout)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to talk to."""
        return self._address is not None

    @property
    def address(self) -> str | None:
        """The ``NOTIFY_SOCKET`` value this notifier sends to (for logs)."""
        return self._display

    def close(self) -> None:
        """Close the sending socket; a later send opens a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, state: str, fds: Sequence[int] = ()) -> bool:
        """Send one raw notification (``KEY=VALUE`` lines), passing ``fds`` along.

        Returns False when there is no service manager. Raises ``SystemdError``
        for a message PID 1 would drop (too long, too many fds) and ``OSError``
        when the socket refuses it.
        """
        if self._address is None:
            return False
        data = state.encode()
        if len(data) > MAX_MESSAGE_BYTES:
            raise SystemdError(f"notification of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        if len(fds) > MAX_FDS_PER_MESSAGE:
            raise SystemdError(f"{len(fds)} fds in one notification (max {MAX_FDS_PER_MESSAGE})")
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self._timeout)
            self._sock = sock
        # sendmsg rather than socket.send_fds, which ignores its address argument
        # (CPython 3.11); SCM_RIGHTS duplicates the fds into the receiver.
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self._sock.sendmsg([data], ancillary, 0, self._address)
        return True

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` fields; keys are upper-cased, True becomes ``1``."""
        return self.send(_format(fields))

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: startup or a reload finished (with an optional status line)."""
        return self.notify(READY=1, **({"STATUS": status} if status is not None else {}))

    def status(self, text: str) -> bool:
        """``STATUS=``: the one-line summary shown by ``systemctl status``."""
        return self.notify(STATUS=text)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``; send it first thing on SIGHUP.

        On systemd 252 (``Type=notify`` + ``ExecReload=kill -HUP``) the
        reload job waits for ``READY=1`` only if this arrives before the kill
        command exits; 253+ (``Type=notify-reload``) requires the timestamp.
        """
        fields: dict[str, object] = {"RELOADING": 1, "MONOTONIC_USEC": monotonic_usec()}
        if status is not None:
            fields["STATUS"] = status
        return self.notify(**fields)

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: we are shutting down on our own account or by request."""
        return self.notify(STOPPING=1, **({"STATUS": status} if status is not None else {}))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the loop is alive; send at about half the interval."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more before a start/stop times out."""
        return self.notify(EXTEND_TIMEOUT_USEC=max(0, round(seconds * 1_000_000)))

    def fdstore(self, name: str, fds: Sequence[int]) -> bool:
        """``FDSTORE=1`` + ``FDNAME=``: park ``fds`` in PID 1 under ``name``.

        PID 1 keeps a duplicate of each fd (re-sending one already stored is
        harmless: it is deduplicated) and hands them back, in order and under
        this name, through ``LISTEN_FDNAMES`` to the next instance. Lists
        longer than one datagram carries are sent in several messages.
        """
        if not valid_fdname(name):
            raise SystemdError(f"invalid fd store name {name!r}")
        if not fds:
            return self.enabled
        sent = False
        for i in range(0, len(fds), MAX_FDS_PER_MESSAGE):
            chunk = fds[i : i + MAX_FDS_PER_MESSAGE]
            sent = self.send(_format({"FDSTORE": 1, "FDNAME": name}), fds=chunk)
        return sent

    def fdstore_remove(self, name: str) -> bool:
        """``FDSTOREREMOVE=1`` + ``FDNAME=``: PID 1 closes every fd stored as ``name``."""
        if not valid_fdname(name):
            raise SystemdError(f"invalid fd store name {name!r}")
        return self.notify(FDSTOREREMOVE=1, FDNAME=name)

    def barrier(self, timeout: float = 5.0) -> bool:
        """``BARRIER=1``: wait until PID 1 has processed every earlier message.

        PID 1 closes the pipe end we send along after handling everything
        queued before it, so its read end sees EOF. Useful before exiting
        right after ``STOPPING=1`` or a final fd store update. Returns False
        without a service manager; raises ``TimeoutError`` if PID 1 is late.
        """
        if not self.enabled:
            return False
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                self.send("BARRIER=1", fds=[wfd])
            finally:
                os.close(wfd)
            poller = select.poll()
            poller.register(rfd, select.POLLHUP | select.POLLIN)
            if not poller.poll(max(0, round(timeout * 1000))):
                raise TimeoutError(f"no BARRIER=1 acknowledgement within {timeout}s")
        finally:
            os.close(rfd)
        return True


def watchdog_interval(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """The watchdog period in seconds, or None if no watchdog is meant for us.

    ``WATCHDOG_PID``, when set, names the process the watchdog is for: a
    child that inherited our environment must not think it is watched.
    """
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID")
    if pid_text:
        try:
            watched = int(pid_text)
        except ValueError as e:
            raise SystemdError(f"WATCHDOG_PID={pid_text!r} is not a pid") from e
        if watched != (os.getpid() if pid is None else pid):
            return None
    try:
        usec = int(usec_text)
    except ValueError as e:
        raise SystemdError(f"WATCHDOG_USEC={usec_text!r} is not an integer") from e
    if usec <= 0:
        raise SystemdError(f"WATCHDOG_USEC={usec_text!r} must be positive")
    return usec / 1_000_000


_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    *,
    unset: bool = True,
    pid: int | None = None,
) -> dict[str, list[int]]:
    """Take the fds systemd passed us (fd 3 upward), grouped by name, in order.

    Returns ``{}`` when nothing was passed or it was meant for another
    process (``LISTEN_PID``). Each fd is made close-on-exec, because systemd
    hands them over inheritable and eoid must not leak device fds into
    processes it spawns. The variables are removed afterwards (``unset``) so
    a child cannot mistake them for its own. Fds without a name (no
    ``LISTEN_FDNAMES``) are grouped as ``"unknown"``, as libsystemd does.
    """
    env = os.environ if environ is None else environ
    try:
        pid_text = env.get("LISTEN_PID")
        count_text = env.get("LISTEN_FDS")
        names_text = env.get("LISTEN_FDNAMES")
        if not pid_text or not count_text:
            return {}
        try:
            target = int(pid_text)
            count = int(count_text)
        except ValueError as e:
            raise SystemdError(
                f"LISTEN_PID={pid_text!r} LISTEN_FDS={count_text!r}: not integers"
            ) from e
        if target != (os.getpid() if pid is None else pid):
            return {}
        if count < 0:
            raise SystemdError(f"LISTEN_FDS={count} is negative")
        if count == 0:
            return {}
        names = names_text.split(":") if names_text is not None else ["unknown"] * count
        if len(names) != count:
            raise SystemdError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}")
        result: dict[str, list[int]] = {}
        for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names, strict=True):
            _set_cloexec(fd)
            result.setdefault(name, []).append(fd)
        return result
    finally:
        if unset:
            for var in _LISTEN_VARS:
                env.pop(var, None)


def _set_cloexec(fd: int) -> None:
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as e:
        if e.errno == errno.EBADF:
            raise SystemdError(f"LISTEN_FDS promised fd {fd}, but it is not open") from e
        raise
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


def close_all(fds: Iterable[int]) -> None:
    """Close every fd, ignoring ones already closed (cleanup of unused passed fds)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError as e:
            if e.errno != errno.EBADF:
                raise
