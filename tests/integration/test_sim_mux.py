"""Every sim device of a daemon shares one connection to its ``eoid sim`` process.

Requests name their line, events come back to the right device, a dead sim takes every
device on the connection down (and they all come back), and a restarted daemon adopts
the one stored connection.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from eoid.device import DeviceEvent
from eoid.errors import DeviceError
from eoid.fdstore import sim_fd_name
from eoid.sim.backend import BATCH_MAX_REQUESTS, REQUEST_TIMEOUT, SimConnections, SimDevice
from eoid.testing import FakeSystemd
from eoid.wire import peer_credentials, recv_msg, send_msg
from tests.helpers import Consumer, Env, environment, wait_until
from tests.integration.test_restart import Supervised

LINES = ("dev0", "dev1", "dev2")


@pytest.fixture
def sim_env() -> Iterator[Env]:
    with environment(devices=len(LINES)) as env:
        env.start_sim()
        yield env


class Backend:
    """The daemon's side in this process: the devices, their triggers and their events."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.loop = asyncio.new_event_loop()
        self.connections = SimConnections(self.loop)
        self.devices: dict[str, SimDevice] = {}
        self.triggers: dict[str, int] = {}
        self.events: dict[str, list[DeviceEvent | None]] = {}

    def open(self, line: str) -> SimDevice:
        device = SimDevice(line, line, self.env.sim_socket, "0000:00:10.0",
                           connections=self.connections)
        opening = device.opening()
        assert opening is not None
        self.loop.run_until_complete(opening)
        self.devices[line] = device
        self.events[line] = []
        device.watch(self.loop, lambda fd: self.events[line].append(device.read_event(fd)))
        self.triggers[line] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        device.enable(self.triggers[line])
        self.settle(device)
        return device

    def settle(self, device: SimDevice) -> None:
        """Wait until the sim has handled every request sent on ``device``'s connection
        (it answers them in turn), running the loop meanwhile."""
        self.loop.run_until_complete(device.conn.request(device.name, "ping"))

    def run_until(self, predicate: Callable[[], object], what: str) -> None:
        """Run the loop (which delivers the events) until ``predicate()`` holds."""
        def done() -> bool:
            self.loop.run_until_complete(asyncio.sleep(0.01))
            return bool(predicate())
        wait_until(done, 5, what)

    def close(self) -> None:
        for device in self.devices.values():
            device.close()
        for fd in self.triggers.values():
            os.close(fd)
        self.loop.close()


@pytest.fixture
def backend(sim_env: Env) -> Iterator[Backend]:
    b = Backend(sim_env)
    try:
        yield b
    finally:
        b.close()


def test_devices_share_one_connection_and_hold_no_socket_of_their_own(backend: Backend,
                                                                       ) -> None:
    devices = [backend.open(line) for line in LINES]
    assert len({id(d.conn) for d in devices}) == 1
    assert all(d.event_fds() == [] and set(d.held_fds()) == {"unmask"} for d in devices)
    backend.env.sim("raise", line="dev1")  # each line got its own trigger over the one socket
    assert os.eventfd_read(backend.triggers["dev1"]) == 1
    for line in ("dev0", "dev2"):
        with pytest.raises(BlockingIOError):
            os.eventfd_read(backend.triggers[line])


def test_events_reach_only_their_device(backend: Backend) -> None:
    for line in LINES:
        backend.open(line)
    backend.env.sim("request", line="dev2")
    backend.env.sim("error", line="dev0")
    backend.run_until(lambda: backend.events["dev0"] and backend.events["dev2"], "events")
    assert backend.events == {"dev0": [DeviceEvent.ERROR], "dev1": [],
                              "dev2": [DeviceEvent.REQUEST]}


def test_a_closed_device_frees_its_line_and_the_others_keep_theirs(backend: Backend) -> None:
    for line in LINES:
        backend.open(line)
    conn = backend.devices["dev0"].conn
    backend.devices.pop("dev0").close()
    os.close(backend.triggers.pop("dev0"))
    backend.settle(backend.devices["dev1"])
    lines = backend.env.sim("stats")["lines"]
    assert not lines["dev0"]["enabled"] and lines["dev1"]["enabled"]
    again = backend.open("dev0")  # free on the sim again: not "busy"
    assert again.conn is conn
    with pytest.raises(DeviceError, match="already open"):
        SimDevice("twin", "dev1", backend.env.sim_socket, "0000:00:11.0",
                  connections=backend.connections)


def test_a_dead_sim_is_gone_for_every_device(backend: Backend) -> None:
    for line in LINES:
        backend.open(line)
    backend.env.procs[0].kill()
    backend.env.procs[0].wait()
    backend.run_until(lambda: all(backend.events[line] for line in LINES), "GONE everywhere")
    assert all(backend.events[line] == [DeviceEvent.GONE] for line in LINES)
    with pytest.raises(DeviceError, match="closed the connection"):
        backend.devices["dev1"].mask()


def daemon_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_sim_device_costs_the_daemon_four_fds() -> None:
    with environment(devices=8) as env:
        env.start_sim()  # serves all eight lines; the daemon starts with three
        parked = env.root / "parked"
        parked.mkdir()
        for n in range(3, 8):
            (env.root / "devices.d" / f"dev{n}.yaml").rename(parked / f"dev{n}.yaml")
        daemon = env.start_daemon()
        time.sleep(0.2)  # the status connections of start_daemon are closed
        before = daemon_fds(daemon.pid)
        for n in range(3, 8):
            (parked / f"dev{n}.yaml").rename(env.root / "devices.d" / f"dev{n}.yaml")
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: sum(d["up"] for d in env.status()["devices"]) == 8, 10,
                   "8 devices up")
        wait_until(lambda: daemon_fds(daemon.pid) == before + 5 * 4, 5,
                   f"{before} + 20 fds")


def test_daemon_devices_get_their_own_events_and_all_survive_a_sim_death(sim_env: Env,
                                                                          ) -> None:
    sim_env.start_daemon()
    with ExitStack() as stack:
        vms = {line: stack.enter_context(Consumer(sim_env.control, line)) for line in LINES}
        sim_env.sim("request", line="dev1")
        wait_until(lambda: not sim_env.device("dev1")["up"], what="dev1 released")
        sim_env.sim("raise", line="dev0")
        assert vms["dev0"].wait_irq() == 1  # its neighbours never noticed
        assert sim_env.device("dev2")["up"]

        sim_env.procs[0].kill()
        sim_env.procs[0].wait()
        wait_until(lambda: not any(d["up"] for d in sim_env.status()["devices"]),
                   what="every device down")
        sim_env.start_sim()
        wait_until(lambda: all(d["up"] for d in sim_env.status()["devices"]), 15,
                   "every device recovered")
        for line in LINES:
            sim_env.sim("raise", line=line)
            assert vms[line].wait_irq() == 1


def sim_names(systemd: FakeSystemd) -> list[str]:
    systemd.drain()
    return [name for name, _ in systemd.store if name.startswith("sim.") or
            name.endswith(".sim")]


def test_restart_adopts_the_shared_connection(sim_env: Env) -> None:
    with FakeSystemd() as systemd:
        daemon = Supervised(sim_env, systemd)
        daemon.start()
        try:
            stored = sim_fd_name(str(sim_env.sim_socket))
            assert sim_names(systemd) == [stored]  # one connection for all three devices
            with Consumer(sim_env.control, "dev1") as vm:
                daemon.kill()
                sim_env.sim("raise", line="dev1")  # fires while no eoid runs
                daemon.start()
                assert vm.wait_irq() == 1
                armed = [e["adopted"] for e in sim_env.log_events("daemon")
                         if e.get("message") == "device armed"]
                assert armed[-len(LINES):] == [True] * len(LINES)  # none reopened

                # the sim dies: its connection leaves the store, the new one takes its place
                sim_env.procs[0].kill()
                sim_env.procs[0].wait()
                wait_until(lambda: sim_names(systemd) == [], what="dead connection unstored")
                sim_env.start_sim()
                wait_until(lambda: all(d["up"] for d in sim_env.status()["devices"]), 15,
                           "recovered")
                assert sim_names(systemd) == [stored]
                daemon.kill()
                daemon.start()  # and a restart adopts the new one
                sim_env.sim("raise", line="dev1")
                assert vm.wait_irq() == 1
        finally:
            daemon.stop()


def test_a_frozen_sim_fails_a_request_without_blocking_and_the_device_goes(backend: Backend,
                                                                          ) -> None:
    device = backend.open("dev0")
    sim = backend.env.procs[0]
    os.kill(sim.pid, signal.SIGSTOP)
    try:
        began = time.monotonic()
        device.mask()  # sent, not waited for
        assert time.monotonic() - began < 0.05
        backend.run_until(lambda: backend.events["dev0"], "GONE")
        took = time.monotonic() - began
        assert backend.events["dev0"] == [DeviceEvent.GONE]
        assert REQUEST_TIMEOUT <= took < REQUEST_TIMEOUT + 1.0
    finally:
        os.kill(sim.pid, signal.SIGCONT)
    other = backend.open("dev1")  # the sim answers again, on the same connection
    assert other.conn is device.conn


def test_requests_of_one_turn_travel_as_one_batch_and_are_answered_in_one(
        backend: Backend) -> None:
    """The observation windows of many devices open on one tick (``runner.SAMPLE_GRID``):
    their routes go to the sim as one message, and come back as one."""
    devices = [backend.open(line) for line in LINES]
    conn = devices[0].conn
    assert conn.sock is not None
    sent: list[tuple[dict[str, object], int]] = []
    send = conn._outbox.send

    def counting(message: dict[str, object], fds: list[int] | tuple[int, ...] = ()) -> None:
        sent.append((message, len(fds)))
        send(message, fds)
    conn._outbox.send = counting  # type: ignore[method-assign]
    consumer = {line: (os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK))
                for line in LINES}
    try:
        routed = [d.route(*consumer[d.name]) for d in devices]  # one turn of the loop
        backend.loop.run_until_complete(asyncio.gather(*routed))
        assert [(m["op"], n) for m, n in sent] == [("batch", 6)]
        assert all(r.result()["ok"] and r.result()["kernel_fires"] == 0 for r in routed)
        backend.env.sim("raise", line="dev1")  # on the kernel's path: the consumer's irq
        assert select.select([consumer["dev1"][0]], [], [], 5)[0], "no irq on the kernel path"
        assert os.eventfd_read(consumer["dev1"][0]) == 1
        back = [d.route(backend.triggers[d.name], None) for d in devices]
        backend.loop.run_until_complete(asyncio.gather(*back))
        assert back[1].result()["kernel_fires"] == 1
    finally:
        for fds in consumer.values():
            for fd in fds:
                os.close(fd)


def test_a_long_turn_is_sent_in_batches_of_bounded_size(backend: Backend) -> None:
    """1024 devices opening or closing in one turn: messages of at most 64 requests."""
    device = backend.open("dev0")
    sent: list[int] = []
    send = device.conn._outbox.send

    def counting(message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        sent.append(len(message.get("requests", [message])))
        send(message, fds)
    device.conn._outbox.send = counting  # type: ignore[method-assign]
    pings = [device.conn.request("dev0", "ping") for _ in range(200)]
    backend.loop.run_until_complete(asyncio.gather(*pings))
    assert sent == [BATCH_MAX_REQUESTS] * 3 + [200 - 3 * BATCH_MAX_REQUESTS]


def test_a_batch_that_miscounts_its_fds_is_refused_and_they_are_closed(sim_env: Env) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.connect(str(sim_env.sim_socket))
    sim_pid = peer_credentials(sock)[0]

    def eventfds() -> int:
        def link(fd: str) -> str:
            try:
                return os.readlink(f"/proc/{sim_pid}/fd/{fd}")
            except FileNotFoundError:  # closed since the listing
                return ""
        return sum("eventfd" in link(fd) for fd in os.listdir(f"/proc/{sim_pid}/fd"))
    before = eventfds()
    fds = [os.eventfd(0) for _ in range(3)]
    try:
        for requests in ([{"op": "ping", "id": 1, "fds": 1}],  # 3 fds sent
                         [{"op": "ping", "id": 1, "fds": "3"}], "no", [1, 2, 3]):
            send_msg(sock, {"op": "batch", "requests": requests}, fds)
            reply = recv_msg(sock)
            assert reply is not None
            (answer,) = reply[0]["replies"]
            assert answer["ok"] is False and answer["error"]["code"] == "bad_request"
        send_msg(sock, {"op": "ping", "id": 7})  # the connection still works
        reply = recv_msg(sock)
        assert reply is not None and reply[0]["id"] == 7 and reply[0]["ok"]
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()
    assert eventfds() == before  # the sim kept none of the 12 it was sent
