"""Sampled observation at scale (issue 12): windows open on a shared grid of loop time
(``runner.sample_opens``: ``SAMPLE_SLOTS`` ticks a period, at least ``SAMPLE_GRID`` apart),
so the windows of many devices open and close in a few wake-ups of the loop rather than one
each. In-process daemon (``run_server``), real sim, sockets."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from eoid.config import Config
from eoid.control import ControlClient
from eoid.runner import SAMPLE_GRID, SAMPLE_SLOTS, DeviceRunner, sample_opens
from eoid.testing import run_server
from tests.integration.test_status import write_config

DEVICES = 24


@pytest.fixture
def config(workdir: Path) -> Config:
    return write_config(workdir, DEVICES,
                        device="datapath: kernel\nobserve: {every: 2s, for: 300ms}\n")


def test_sampled_windows_open_and_close_together_on_the_grid(config: Config) -> None:
    opened: list[tuple[str, float]] = []
    closed: list[tuple[str, float]] = []
    with run_server(config) as served:
        runners: list[DeviceRunner] = served.call(lambda: list(served.daemon.runners.values()))
        for r in runners:  # record the loop time of each window's ends, on the loop
            def watch(r: DeviceRunner = r) -> None:
                observe, observed = r.observe, r._observed

                def opening(duration: int, opened_at: float | None = None) -> None:
                    opened.append((r.name, r.loop.time()))
                    observe(duration, opened_at)

                def closing() -> None:
                    closed.append((r.name, r.loop.time()))
                    observed()
                r.observe, r._observed = opening, closing  # type: ignore[method-assign]
            served.call(watch)
        with ControlClient(served.control, timeout=10) as client:
            held = [client.request("attach", device=r.name)[1] for r in runners]
            time.sleep(2 * 2.0 + 1.0)  # two periods and a window
            first = served.call(lambda: [(r.name, r.datapath.value) for r in runners])
            for fds in held:
                for fd in fds:
                    os.close(fd)
    assert len({name for name, _ in opened}) == DEVICES, opened  # every device sampled
    ticks = {round(t / SAMPLE_GRID) for _, t in opened}
    for _, t in opened:  # on a tick of the grid (uvloop's clock has 1 ms steps)
        assert abs(t - round(t / SAMPLE_GRID) * SAMPLE_GRID) < 0.05, t
    # 24 devices, a 2 s period: their windows open on at most 2 ticks a period
    assert len(ticks) <= 6, sorted(ticks)
    for name, t in closed:  # each window lasted its 300 ms, so they close together too
        start = max(s for n, s in opened if n == name and s < t)
        assert 0.29 <= t - start < 0.35, (name, t - start)
        assert round(start / SAMPLE_GRID) in ticks
    assert all(path in ("kernel", "relay") for _, path in first)


@pytest.mark.parametrize("every", [60, 3600, 7])
def test_a_period_has_its_slots_and_each_device_keeps_its_own(every: int) -> None:
    """Windows due anywhere in a period open on one of ``SAMPLE_SLOTS`` ticks, as soon as
    one comes, and a device's next window (due a period later) on the same tick a period
    later: a sixth of the devices switch together, never all of them."""
    period = every * 10**9
    grid = max(SAMPLE_GRID, every / SAMPLE_SLOTS)
    rng = random.Random(every)
    start = 1_000_000.123  # a loop time far from 0
    slots = set()
    for _ in range(2000):
        due = start + rng.uniform(0, every)
        opens = sample_opens(due, period)
        assert due <= opens < due + grid + 1e-6
        slots.add(round((opens - start) / grid) % round(every / grid))
        for k in range(1, 4):  # the same tick, k periods on
            assert sample_opens(due + k * every, period) == pytest.approx(opens + k * every)
    assert len(slots) == min(SAMPLE_SLOTS, round(every / grid)), sorted(slots)
