"""``status`` at any scale, and who sees whom (issue 9): a status reply is one page of
bounded size and work, the client fetches pages until done, and a consumer's pid and uid
are shown only to root and the daemon's user. Real daemon, sim, sockets and peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from eoid.config import Config, load_config
from eoid.control import STATUS_PAGE, STATUS_REPLY_BYTES, ControlClient, wait_for_socket
from eoid.errors import ProtocolError
from eoid.testing import RunningDaemon, connect_as, run_server
from eoid.wire import recv_msg, send_msg
from tests.helpers import Env, environment, wait_until

NOBODY = 65534
DEVICES = 1024
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other users")


def pci(n: int) -> str:
    return f"0000:{1 + n // 32:02x}:{n % 32:02x}.0"


def write_config(root: Path, devices: int, device: str = "", control: str = "") -> Config:
    (root / "devices.d").mkdir(exist_ok=True)
    (root / "eoid.yaml").write_text(
        f"control: {{socket: {root}/control.sock, socket_mode: '0666'{control}}}\n"
        f"metrics: {{listen: null}}\nsim: {{socket: {root}/sim.sock}}\nloop: asyncio\n"
        "log: {level: warning}\n")
    for n in range(devices):
        (root / "devices.d" / f"d{n:04d}.yaml").write_text(
            f"pci_address: '{pci(n)}'\nbackend: {{type: sim}}\n{device}")
    return load_config(root / "eoid.yaml")


def ask(sock: Any, **message: Any) -> tuple[dict[str, Any], int]:
    """One request on a raw connection: the reply and its size on the wire."""
    send_msg(sock, message)
    while True:
        data, _, _, _ = sock.recvmsg(1 << 24)
        reply = json.loads(data)
        if "event" not in reply:
            return reply, len(data)


# --- paging --------------------------------------------------------------------------------


def test_status_of_1024_devices_comes_in_bounded_pages(workdir: Path) -> None:
    with run_server(write_config(workdir, DEVICES)) as served:
        wait_until(lambda: served.call(lambda: all(r.up for r in served.daemon.runners.values())),
                   30, "every device open")
        with ControlClient(served.control) as client:
            sock = client.sock
            names: list[str] = []
            after: str | None = None
            pages = 0
            while True:
                reply, size = ask(sock, op="status", id=pages,
                                  **({"after": after} if after is not None else {}))
                assert reply["ok"] and reply["id"] == pages
                assert size <= STATUS_REPLY_BYTES
                assert 0 < len(reply["devices"]) <= STATUS_PAGE
                assert reply["total"] == DEVICES and reply["daemon"]["pid"] == os.getpid()
                names += [d["name"] for d in reply["devices"]]
                pages += 1
                after = reply["next"]
                if after is None:
                    break
                assert after == names[-1]
            assert names == sorted(f"d{n:04d}" for n in range(DEVICES))  # each once, in order
            assert pages >= DEVICES // STATUS_PAGE

            # what the client's helper and `eoid status` use: every page, merged
            merged = client.status()
            assert [d["name"] for d in merged["devices"]] == names
            assert all(d["up"] for d in merged["devices"])

            # a smaller page, one device, and what a request may not say
            small, _ = ask(sock, op="status", limit=3, after="d0100")
            assert [d["name"] for d in small["devices"]] == ["d0101", "d0102", "d0103"]
            assert small["next"] == "d0103"
            one = client.status(device="d0500")
            assert [d["name"] for d in one["devices"]] == ["d0500"]
            with pytest.raises(ProtocolError) as unknown:
                client.request("status", device="nope")
            assert unknown.value.code == "unknown_device"
            for bad in ({"limit": 0}, {"limit": True}, {"limit": "5"}, {"after": 5},
                        {"device": ["d0001"]}):
                reply, _ = ask(sock, op="status", **bad)
                assert reply["error"]["code"] == "bad_request", bad
            last, _ = ask(sock, op="status", after="d1023")
            assert last["ok"] and last["devices"] == [] and last["next"] is None


def test_a_page_stays_within_its_bytes_whatever_the_devices_say(workdir: Path) -> None:
    """A rejected reload with many long problems, and devices down with long reasons: every
    page still fits its bound (problems and reasons are cut, and said to be)."""
    config = write_config(workdir, 70)
    with run_server(config, sim=False) as served:  # no sim: every device is down
        for n in range(70):
            (workdir / "devices.d" / f"d{n:04d}.yaml").write_text(
                f"pci_address: '{pci(n)}'\nbackend: {{type: sim}}\npolicy: "
                f"{{eoi_timeout: {'x' * 2000}}}\n")
        with ControlClient(served.control) as client:
            assert client.request("reload")[0]["successful"] is False
            after: str | None = None
            seen = 0
            while True:
                reply, size = ask(client.sock, op="status",
                                  **({"after": after} if after is not None else {}))
                assert reply["ok"] and size <= STATUS_REPLY_BYTES
                last = reply["daemon"]["last_reload"]
                assert last["successful"] is False and last["problems"]
                assert last["problems_omitted"] + len(last["problems"]) == 70
                seen += len(reply["devices"])
                after = reply["next"]
                if after is None:
                    break
            assert seen == 70


def test_a_reload_rejected_for_1024_broken_files_gets_its_reply(workdir: Path) -> None:
    """About 280 KB of problems: more than one message can carry. The reply lists the first
    ones and counts the rest, and `eoid reload` exits 78 saying so."""
    with run_server(write_config(workdir, DEVICES), sim=False) as served:
        for n in range(DEVICES):
            (workdir / "devices.d" / f"d{n:04d}.yaml").write_text(
                f"pci_address: '{pci(n)}'\nbackend: {{type: sim}}\n"
                f"policy: {{eoi_timeout: {'x' * 2000}}}\nbogus{'y' * 1000}: 1\n")
        with ControlClient(served.control) as client:
            send_msg(client.sock, {"op": "reload", "id": 1})
            data, _, _, _ = client.sock.recvmsg(1 << 24)
            reply = json.loads(data)
            assert reply["ok"] and reply["successful"] is False
            assert reply["problems"] and len(data) <= STATUS_REPLY_BYTES
            assert len(reply["problems"]) + reply["problems_omitted"] == 2 * DEVICES
        result = subprocess.run([sys.executable, "-m", "eoid.cli", "reload", "--socket",
                                 str(served.control)], capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 78, result.stderr[-2000:]
        assert "more (all of them are in the daemon's log" in result.stderr


# --- the command line at 1024 devices ------------------------------------------------------


@pytest.fixture
def big() -> Iterator[Env]:
    with environment(devices=0) as env:
        for n in range(DEVICES):
            env.write_device(f"d{n:04d}", index=0).write_text(
                f"pci_address: '{pci(n)}'\nbackend: {{type: sim}}\n")
        env.config.write_text(env.config.read_text().replace("level: debug", "level: info"))
        sim = env.eoid("sim", "-c", str(env.config), "--rate", "10", log="sim.log")
        daemon = env.eoid("run", "-c", str(env.config), log="daemon.log")
        assert wait_for_socket(env.control, 20, lambda: daemon.poll() is None), env.log("daemon")
        assert wait_for_socket(env.sim_socket, 20, lambda: sim.poll() is None), env.log("sim")

        def up() -> bool:
            summary = env.sim("summary")
            return bool(summary["enabled"] == summary["attached"] == DEVICES)

        wait_until(up, 60, f"{DEVICES} devices up and attached")
        yield env


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    """An eoid command run by uid 65534 (a forked child: that user cannot reach this
    interpreter on disk), its output captured."""
    from eoid.cli import main

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 99
            try:
                sys.stdout = open(out.fileno(), "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(err.fileno(), "w", closefd=False)  # noqa: SIM115
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                code = main(list(argv))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status), out.read(),
                                           err.read())


def test_eoid_status_lists_1024_devices(big: Env) -> None:
    names = [f"d{n:04d}" for n in range(DEVICES)]
    began = time.monotonic()
    text = big.command("status")
    took = time.monotonic() - began
    assert text.returncode == 0, text.stderr[-2000:]
    rows = [line.split()[0] for line in text.stdout.splitlines() if line.startswith("d")]
    assert rows == names
    assert "needs attention" not in text.stdout
    print(f"eoid status at {DEVICES} devices: {took:.2f}s")

    raw = big.command("status", "--json")
    assert raw.returncode == 0, raw.stderr[-2000:]
    reply = json.loads(raw.stdout)
    assert [d["name"] for d in reply["devices"]] == names
    assert reply["total"] == DEVICES and reply["daemon"]["version"]
    assert all(d["up"] and d["attached"] and d["consumer"]["pid"] > 0 for d in reply["devices"])

    # a device in trouble among 1024 is found and named, on whichever page it is
    big.sim("error", line="d0999")
    wait_until(lambda: big.command("status").returncode == 1, 10, "d0999 faulted")
    text = big.command("status")
    assert "needs attention: d0999: faulted" in text.stdout


@needs_root
def test_eoid_status_as_another_user_lists_1024_devices_without_consumers(big: Env) -> None:
    result = as_nobody("status", "--json", "-c", str(big.config))
    assert result.returncode == 0, result.stderr[-2000:]
    reply = json.loads(result.stdout)
    assert len(reply["devices"]) == DEVICES
    assert all(d["attached"] and "consumer" not in d for d in reply["devices"])


# --- consumer identity: operators only ----------------------------------------------------


@pytest.fixture
def served(workdir: Path) -> Iterator[RunningDaemon]:
    with run_server(write_config(workdir, 2, device="consumers: {uids: [65534]}\n")) as running:
        yield running


def other_users_status(path: Path, **fields: Any) -> dict[str, Any]:
    (conn,) = connect_as(path, NOBODY, NOBODY)
    with conn:
        conn.settimeout(5)
        send_msg(conn, {"op": "status", "id": 1, **fields})
        received = recv_msg(conn, 1 << 20)
        assert received is not None
        return received[0]


@needs_root
def test_only_operators_see_who_holds_a_device(served: RunningDaemon) -> None:
    with ControlClient(served.control) as vm:
        for fd in vm.request("attach", device="d0000")[1]:
            os.close(fd)
        mine = {d["name"]: d for d in vm.status()["devices"]}  # root: an operator
        assert mine["d0000"]["consumer"] == {"pid": os.getpid(), "uid": 0}
        assert mine["d0000"]["attached"] is True
        assert mine["d0001"]["consumer"] is None and mine["d0001"]["attached"] is False

        for fields in ({}, {"device": "d0000"}):
            theirs = other_users_status(served.control, **fields)
            assert theirs["ok"], theirs
            device = theirs["devices"][0]
            assert device["name"] == "d0000" and device["attached"] is True
            assert "consumer" not in device
            text = json.dumps(theirs["devices"])
            assert '"pid"' not in text and '"uid"' not in text

        # and `busy` says the device is taken, not by whom, to a peer who may attach
        (conn,) = connect_as(served.control, NOBODY, NOBODY)
        with conn:
            conn.settimeout(5)
            send_msg(conn, {"op": "attach", "device": "d0000", "id": 1})
            received = recv_msg(conn, 1 << 20)
            assert received is not None
            error = received[0]["error"]
            assert error["code"] == "busy"
            assert str(os.getpid()) not in error["message"] and "uid" not in error["message"]


@needs_root
def test_the_status_command_shows_consumers_to_operators_only(workdir: Path) -> None:
    with environment(devices=1) as env:
        env.start_sim()
        env.start_daemon()
        with ControlClient(env.control) as vm:
            for fd in vm.request("attach", device="dev0")[1]:
                os.close(fd)
            mine = env.command("status")
            assert mine.returncode == 0 and f"pid {os.getpid()}" in mine.stdout
            theirs = as_nobody("status", "-c", str(env.config))
            assert theirs.returncode == 0, theirs.stderr
            row = next(line for line in theirs.stdout.splitlines() if line.startswith("dev0"))
            assert "attached" in row and str(os.getpid()) not in theirs.stdout


@needs_root
def test_status_for_a_peer_outside_control_status_is_refused_and_logged(workdir: Path) -> None:
    with run_server(write_config(workdir, 2, control=", status: {uids: [0]}")) as served, \
            structlog.testing.capture_logs() as logs:
        reply = other_users_status(served.control)
        assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
        assert "devices" not in reply
        with ControlClient(served.control) as root:  # root is in the list
            assert len(root.status()["devices"]) == 2
    refused = [e for e in logs if e["event"] == "control request refused"]
    assert [(e["op"], e["code"], e["uid"], e["gid"]) for e in refused] == [
        ("'status'", "forbidden", NOBODY, NOBODY)]
    assert refused[0]["pid"] > 0
