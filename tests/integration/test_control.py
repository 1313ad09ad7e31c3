"""The control socket against a hostile peer (issue 9), on the in-process daemon
(``eoid.testing.run_server``) with real sockets, fds and simulated devices."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from eoid.config import Config, load_config
from eoid.control import CODES, REFUSALS, ControlClient, wait_for_socket
from eoid.errors import EoidError, ProtocolError
from eoid.testing import RunningDaemon, connect_as, run_server
from eoid.wire import recv_msg, send_msg

ROOT = Path(__file__).resolve().parents[2]
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other users")


def write_config(root: Path, devices: int = 2, control: str = "", device: str = "") -> Config:
    (root / "devices.d").mkdir(exist_ok=True)
    (root / "eoid.yaml").write_text(
        f"control: {{socket: {root}/control.sock, socket_mode: '0666'{control}}}\n"
        f"metrics: {{listen: null}}\nsim: {{socket: {root}/sim.sock}}\nloop: asyncio\n")
    for i in range(devices):
        (root / "devices.d" / f"dev{i}.yaml").write_text(
            f"pci_address: '0000:00:{0x10 + i:02x}.0'\nbackend: {{type: sim}}\n{device}")
    return load_config(root / "eoid.yaml")


@pytest.fixture
def served(workdir: Path) -> Iterator[RunningDaemon]:
    with run_server(write_config(workdir)) as running:
        yield running


def raw(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(5)
    sock.connect(str(path))
    return sock


def reply(sock: socket.socket) -> dict[str, Any]:
    """The next reply (not an event); fds that came with it are closed."""
    while True:
        received = recv_msg(sock, 1 << 20)
        assert received is not None, "the daemon closed the connection instead of replying"
        message, fds = received
        for fd in fds:
            os.close(fd)
        if "event" not in message:
            return message


def closed_by_peer(fd: int, timeout: float = 5.0) -> bool:
    """Whether the other end of pipe ``fd`` (its write end) has been closed everywhere."""
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.read(fd, 1) == b""


def consumer_of(served: RunningDaemon, device: str) -> Any:
    return served.call(lambda: served.daemon.runners[device].consumer)


def send_with_pipes(sock: socket.socket, data: bytes, count: int) -> list[int]:
    """Send ``data`` with the write ends of ``count`` pipes; return the read ends."""
    pipes = [os.pipe() for _ in range(count)]
    try:
        socket.send_fds(sock, [data], [w for _, w in pipes])
    finally:
        for _, w in pipes:
            os.close(w)
    return [r for r, _ in pipes]


# --- finding 1: decode errors --------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    b'{"op": "hello", "id": ' + b"9" * 4301 + b"}",  # ValueError: int too long to convert
    b'{"op": "hello", "id": ' + b"[" * 20000 + b"]" * 20000 + b"}",  # RecursionError
    b'{"op": "hello", "id": NaN}', b'{"op": "hello", "id": -Infinity}',
    b"\xff\xfe not utf-8", b"[1, 2]", b"",
])
def test_every_malformed_message_gets_one_reply_and_its_fds_are_closed(
        served: RunningDaemon, payload: bytes) -> None:
    with raw(served.control) as sock:
        reads = send_with_pipes(sock, payload, 8)
        try:
            answer = reply(sock)
            assert answer["ok"] is False and "id" not in answer
            assert answer["error"]["code"] in ("bad_json", "bad_request")
            assert all(closed_by_peer(r) for r in reads), "the daemon kept fds it was sent"
        finally:
            for r in reads:
                os.close(r)
        send_msg(sock, {"op": "hello", "id": 2})  # the connection still works
        assert reply(sock)["id"] == 2


def test_nan_ids_are_never_echoed_as_non_json(served: RunningDaemon) -> None:
    with raw(served.control) as sock:
        sock.send(b'{"op": "hello", "id": NaN}')
        data = sock.recv(65536)

        def strict(name: str) -> None:
            raise AssertionError(f"{name} in a reply: not JSON")
        answer = json.loads(data, parse_constant=strict)
        assert answer["error"]["code"] == "bad_json"


def test_an_empty_datagram_is_refused_not_taken_as_a_close(served: RunningDaemon) -> None:
    with raw(served.control) as sock:
        send_msg(sock, {"op": "attach", "device": "dev0", "id": 1})
        assert reply(sock)["ok"]
        sock.send(b"")
        answer = reply(sock)
        assert answer["error"]["code"] == "bad_request"
        assert consumer_of(served, "dev0") is not None  # still attached


def test_too_many_fds_have_their_own_error_and_none_is_kept(served: RunningDaemon) -> None:
    with raw(served.control) as sock:
        reads = send_with_pipes(sock, b'{"op": "hello", "id": 7}', 20)
        try:
            answer = reply(sock)
            assert answer["error"]["code"] == "too_many_fds"
            assert all(closed_by_peer(r) for r in reads)
        finally:
            for r in reads:
                os.close(r)


# --- finding 2: an attach whose reply cannot go out ------------------------------------------


@pytest.mark.parametrize("depth", [900, 960, 975, 985])
def test_an_attach_with_an_id_too_deep_to_echo_is_refused_and_holds_nothing(
        served: RunningDaemon, depth: int) -> None:
    with raw(served.control) as sock:
        sock.send(b'{"op": "attach", "device": "dev0", "id": ' + b"[" * depth + b"]" * depth
                  + b"}")
        answer = reply(sock)
        assert answer["ok"] is False and answer["error"]["code"] in ("bad_request", "bad_json")
        assert consumer_of(served, "dev0") is None


def test_an_attach_whose_reply_cannot_be_sent_is_rolled_back(
        served: RunningDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    from eoid.wire import send_data as real

    def full(sock: socket.socket, data: bytes, fds: Any = ()) -> None:
        if fds:  # the attach reply, with its eventfds: the peer's queue is full
            raise BlockingIOError(11, "Resource temporarily unavailable")
        real(sock, data, fds)
    monkeypatch.setattr("eoid.control.send_data", full)
    with raw(served.control) as sock:
        send_msg(sock, {"op": "attach", "device": "dev0", "id": 1})
        assert recv_msg(sock) is None  # the documented close
    assert consumer_of(served, "dev0") is None
    monkeypatch.setattr("eoid.control.send_data", real)
    with ControlClient(served.control) as client:
        reply_, fds = client.request("attach", device="dev0")
        for fd in fds:
            os.close(fd)
        assert reply_["ok"]


# --- finding 8 and the audit trail -----------------------------------------------------------


def test_busy_does_not_reveal_the_holder(served: RunningDaemon) -> None:
    with ControlClient(served.control) as first, ControlClient(served.control) as second:
        for fd in first.request("attach", device="dev0")[1]:
            os.close(fd)
        with pytest.raises(ProtocolError) as busy:
            second.request("attach", device="dev0")
        assert busy.value.code == "busy"
        assert "pid" not in str(busy.value) and str(os.getpid()) not in str(busy.value)


def test_the_runners_refusals_become_the_protocols_codes(served: RunningDaemon) -> None:
    """The runner raises domain errors (eoid.errors); only eoid.control names codes."""
    with ControlClient(served.control) as client:
        for fields, code in (({"device": "dev0"}, "not_attached"),
                             ({"device": "nope"}, "unknown_device")):
            with pytest.raises(ProtocolError) as refused:
                client.request("detach", **fields)
            assert refused.value.code == code


def test_the_readme_lists_every_error_code() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The control protocol"):]
    section = section[:section.index("\n## ", 3)]
    raised = set(re.findall(r'ProtocolError\(\s*"(\w+)"', "".join(
        (ROOT / "eoid" / f).read_text() for f in ("control.py", "wire.py", "daemon.py",
                                                  "runner.py"))))
    assert raised <= set(CODES) and set(REFUSALS.values()) <= set(CODES)
    for code in CODES:
        assert f"`{code}`" in section, f"{code} missing from the README's control protocol"


@needs_root
def test_refusals_are_logged_with_the_peers_credentials_and_rate_limited(
        served: RunningDaemon) -> None:
    with structlog.testing.capture_logs() as logs:
        (conn,) = connect_as(served.control, NOBODY, NOBODY)
        with conn:
            conn.settimeout(5)
            for op in ("attach", "detach", "reload"):
                send_msg(conn, {"op": op, "device": "dev0"})
                assert reply(conn)["ok"] is False
            for _ in range(100):
                send_msg(conn, {"op": "attach", "device": "dev0"})
                assert reply(conn)["error"]["code"] == "forbidden"
    refused = [e for e in logs if e["event"] == "control request refused"]
    first = refused[0]
    assert (first["op"], first["code"], first["uid"], first["gid"]) == (
        "'attach'", "forbidden", NOBODY, NOBODY)
    assert first["pid"] > 0 and "may not attach" in first["reason"]
    assert [e["op"] for e in refused[:3]] == ["'attach'", "'detach'", "'reload'"]
    assert len(refused) <= 10  # a peer cannot flood the log


# --- finding 5: groups from the kernel -------------------------------------------------------


@needs_root
def test_supplementary_groups_come_from_the_kernel_not_proc(workdir: Path) -> None:
    """The peers have exited (their /proc entries are gone) before the daemon accepts."""
    config = write_config(workdir, device="consumers: {gids: [4242]}\n")
    with run_server(config) as served:
        gate = threading.Event()
        served._thread.loop.call_soon_threadsafe(gate.wait, 10)  # hold the loop
        try:
            (member,) = connect_as(served.control, NOBODY, NOBODY, groups=[4242])
            (other,) = connect_as(served.control, NOBODY, NOBODY, groups=[4343])
        finally:
            gate.set()
        with member, other:
            member.settimeout(5)
            other.settimeout(5)
            send_msg(member, {"op": "attach", "device": "dev0", "id": 1})
            assert reply(member)["ok"] is True
            send_msg(other, {"op": "attach", "device": "dev1", "id": 1})
            assert reply(other)["error"]["code"] == "forbidden"


# --- bounds ----------------------------------------------------------------------------------


@needs_root
def test_connections_per_uid_are_bounded_and_others_still_get_in(workdir: Path) -> None:
    with run_server(write_config(workdir, control=", max_connections_per_uid: 3")) as served:
        conns = connect_as(served.control, NOBODY, NOBODY, count=5)
        try:
            for conn in conns:
                conn.settimeout(5)
            for conn in conns[:3]:
                send_msg(conn, {"op": "hello", "id": 1})
                assert reply(conn)["ok"]
            for conn in conns[3:]:
                answer = recv_msg(conn)
                assert answer is not None
                assert answer[0]["error"]["code"] == "too_many_connections"
                assert recv_msg(conn) is None  # and closed
            (another,) = connect_as(served.control, 1000, 1000)  # another user gets in
            with another:
                another.settimeout(5)
                send_msg(another, {"op": "hello", "id": 1})
                assert reply(another)["ok"]
        finally:
            for conn in conns:
                conn.close()
        conns[0].close()
        (again,) = connect_as(served.control, NOBODY, NOBODY)  # a slot is free again
        with again:
            again.settimeout(5)
            send_msg(again, {"op": "hello", "id": 1})
            assert reply(again)["ok"]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_accept_failures_pause_the_listener_instead_of_spinning(workdir: Path) -> None:
    """Out of fds, the daemon neither spins nor floods its log, and serves again once
    connections go away (finding 3)."""
    write_config(workdir, devices=0)
    log = workdir / "daemon.log"
    limit = 48

    with open(log, "wb") as out:
        proc = subprocess.Popen(["prlimit", f"--nofile={limit}", sys.executable, "-m",
                                 "eoid.cli", "run", "-c", str(workdir / "eoid.yaml")],
                                stdout=out, stderr=subprocess.STDOUT)
    conns: list[socket.socket] = []
    try:
        assert wait_for_socket(workdir / "control.sock", 20, lambda: proc.poll() is None)
        for _ in range(limit + 20):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conn.setblocking(False)
            try:
                conn.connect(str(workdir / "control.sock"))
            except BlockingIOError:
                conn.close()
                break
            conns.append(conn)
        deadline = time.monotonic() + 10
        while "cannot accept" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "cannot accept" in log.read_text()
        before, lines = _cpu_seconds(proc.pid), log.read_text().count("\n")
        time.sleep(1.0)
        assert _cpu_seconds(proc.pid) - before < 0.2, "the daemon spins on accept"
        assert log.read_text().count("\n") - lines <= 2, "the daemon floods its log"
        for conn in conns:
            conn.close()
        conns.clear()
        deadline = time.monotonic() + 10
        while True:
            try:
                with ControlClient(workdir / "control.sock", timeout=2) as client:
                    assert client.request("status")[0]["ok"]
                break
            except (EoidError, OSError):
                assert time.monotonic() < deadline, "the daemon does not serve again"
                time.sleep(0.1)
        assert log.read_text().count("cannot accept") == 1  # once per episode
        assert "accepting again" in log.read_text()
        assert proc.poll() is None
    finally:
        for conn in conns:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# --- finding 4: creating the socket, and trusting it ----------------------------------------


class _NoHandler:
    def attach(self, peer: Any, device: str) -> tuple[dict[str, Any], list[int]]:
        raise AssertionError

    def detach(self, peer: Any, device: str) -> None:
        raise AssertionError

    def daemon_status(self) -> dict[str, Any]:
        return {}

    def device_names(self) -> list[str]:
        return []

    def device_status(self, device: str) -> dict[str, Any]:
        raise AssertionError

    def reload(self) -> dict[str, Any]:
        return {}

    def reset(self, device: str) -> dict[str, Any]:
        raise AssertionError

    def set_datapath(self, device: str, datapath: Any) -> dict[str, Any]:
        raise AssertionError

    def observe(self, device: str, duration_ns: int) -> dict[str, Any]:
        raise AssertionError

    def peer_closed(self, peer: Any) -> None:
        pass


def _listen(socket_path: Path, **control: Any) -> Any:
    import asyncio

    from eoid.config import ControlConfig
    from eoid.control import ControlServer

    loop = asyncio.new_event_loop()
    server = ControlServer(ControlConfig(socket=socket_path, **control), _NoHandler(), loop)
    try:
        server.listen()
    except BaseException:
        loop.close()
        raise
    return server, loop


def _close(server: Any, loop: Any) -> None:
    server.close()
    loop.close()


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o1777])
def test_a_directory_others_can_write_is_refused(workdir: Path, mode: int) -> None:
    run = workdir / "run"
    run.mkdir()
    run.chmod(mode)
    with pytest.raises(EoidError, match="writable by group or others"):
        _listen(run / "control.sock")
    assert not (run / "control.sock").exists()


@needs_root
def test_a_directory_owned_by_another_user_is_refused(workdir: Path) -> None:
    run = workdir / "run"
    run.mkdir(mode=0o755)
    os.chown(run, NOBODY, NOBODY)
    with pytest.raises(EoidError, match="belongs to uid 65534"):
        _listen(run / "control.sock")


def test_no_symlink_on_the_way(workdir: Path) -> None:
    (workdir / "real").mkdir(mode=0o755)
    (workdir / "link").symlink_to(workdir / "real")
    with pytest.raises(EoidError, match="symlink"):
        _listen(workdir / "link" / "control.sock")
    target = workdir / "real" / "file"
    target.write_text("x")
    target.chmod(0o600)
    (workdir / "real" / "control.sock").symlink_to(target)
    with pytest.raises(EoidError, match="not a socket"):
        _listen(workdir / "real" / "control.sock")
    assert target.stat().st_mode & 0o777 == 0o600  # never followed


def test_a_missing_directory_is_created_safely_and_the_mode_is_set_at_bind(
        workdir: Path) -> None:
    path = workdir / "a" / "b" / "control.sock"
    old = os.umask(0o077)  # systemd's UMask=0077
    try:
        server, loop = _listen(path, socket_mode="0640", socket_group=os.getegid())
    finally:
        os.umask(old)
    try:
        assert path.parent.stat().st_mode & 0o7777 == 0o755
        st = path.lstat()
        assert (st.st_mode & 0o7777, st.st_gid) == (0o640, os.getegid())
        assert [p.name for p in path.parent.iterdir()] == ["control.sock"]  # no temp left
    finally:
        _close(server, loop)
    assert not path.exists()


def test_a_stale_socket_is_replaced_and_a_successors_is_never_removed(workdir: Path) -> None:
    path = workdir / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on
    server, loop = _listen(path)
    path.unlink()  # ...and a successor's socket takes the path
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    successor.bind(str(path))
    try:
        _close(server, loop)
        assert path.exists(), "the old daemon removed its successor's socket"
    finally:
        successor.close()


@needs_root
def test_clients_do_not_trust_a_socket_served_by_another_user(workdir: Path) -> None:
    """An impostor (uid 65534) listening where eoid's socket should be: ``eoid status``
    (root) refuses to take its answer."""
    theirs = workdir / "theirs"  # a directory the impostor can write
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    path = theirs / "control.sock"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(ready_r)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            listener.bind(str(path))
            listener.listen(1)
            os.write(ready_w, b"r")
            listener.settimeout(20)
            for _ in range(2):  # ControlClient, then eoid status
                conn, _ = listener.accept()
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    send_msg(conn, {"ok": True, "id": 1, "daemon": {"pid": 1}, "devices": []})
                conn.close()
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        os.chmod(path, 0o777)  # as root, only so this test's client may connect
        with pytest.raises(EoidError, match="served by uid 65534"):
            ControlClient(path).request("status")
        result = subprocess.run([sys.executable, "-m", "eoid.cli", "status", "--socket",
                                 str(path)], capture_output=True, text=True, timeout=30,
                                check=False)
        assert result.returncode != 0 and "not trusting" in result.stderr + result.stdout
    finally:
        os.close(ready_r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
