"""Stress for the sanitizers (./dev sanitize runs it under TSan): many devices on one
threaded lane, each with a device-and-guest thread doing round trips, while the event loop
keeps taking states back and lending them again, a metrics thread reads every device's
counts, and the watchdog pings the lane. Nothing may be lost; TSan must see no race."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading

from eoid._fastpath import Lane
from eoid.config import DeviceConfig
from eoid.control import Peer
from eoid.device import drain_eventfd
from eoid.runner import DeviceRunner
from tests.unit.test_fastpath import FakeLine

DEVICES = 8
ROUNDS = 300


def test_many_devices_threads_and_hand_overs_lose_nothing() -> None:
    loop = asyncio.new_event_loop()
    lane = Lane()
    loop.add_reader(lane.notify_fd, lane.dispatch)
    sides = []
    for i in range(DEVICES):
        config = DeviceConfig.model_validate({
            "name": f"d{i}", "pci_address": f"0000:00:{i + 1:02x}.0",
            "backend": {"type": "sim"},
            "policy": {"eoi_timeout": "60s", "storm": {"max_rate": 1e9, "burst": 10**6}}})
        runner = DeviceRunner(config, loop, lambda *a: None, lane=lane)
        device = FakeLine(raw_unmask=True)
        runner.start(device)
        sock, other = socket.socketpair()
        irq, eoi = runner.attach(Peer(sock, 1, 0, frozenset()))
        sides.append((runner, device, irq, eoi, sock, other))
    done = [0] * DEVICES
    stop = threading.Event()

    def device_and_guest(i: int) -> None:
        _, device, irq, eoi, _, _ = sides[i]
        for _ in range(ROUNDS):
            device.line.device_raise()
            if not select.select([irq], [], [], 10)[0]:
                return
            drain_eventfd(irq)
            device.deassert()
            os.eventfd_write(eoi, 1)
            if not select.select([device.unmask_fd], [], [], 10)[0]:
                return
            device.process_unmasks()
            done[i] += 1

    def metrics() -> None:
        while not stop.is_set():
            for runner, *_ in sides:
                runner.stats  # noqa: B018 (counts() under the lane's mutex, off the loop)
            lane.pongs  # noqa: B018
            stop.wait(0.001)

    async def hand_over(threads: list[threading.Thread]) -> None:
        n = 0
        while any(t.is_alive() for t in threads):
            runner = sides[n % DEVICES][0]
            runner.set_config(runner.config)  # release, then take
            if n % 7 == 0:
                runner._on_timer()  # reads the trigger itself: the next one is handed back
            lane.ping()
            n += 1
            await asyncio.sleep(0.0002)

    guests = [threading.Thread(target=device_and_guest, args=(i,)) for i in range(DEVICES)]
    reader = threading.Thread(target=metrics)
    for t in (*guests, reader):
        t.start()
    try:
        loop.run_until_complete(asyncio.wait_for(hand_over(guests), 120))
    finally:
        stop.set()
        for t in (*guests, reader):
            t.join()
    try:
        assert done == [ROUNDS] * DEVICES
        for runner, *_ in sides:
            stats = runner.stats
            assert (stats.interrupts, stats.forwards, stats.eois, stats.unmasks) == (ROUNDS,) * 4
        assert lane.pongs > 0
    finally:
        for runner, device, irq, eoi, sock, other in sides:
            runner.close()
            device.close()
            for fd in (irq, eoi):
                os.close(fd)
            sock.close()
            other.close()
        loop.remove_reader(lane.notify_fd)
        lane.close()
        loop.close()
