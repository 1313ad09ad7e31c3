"""The benchmark's parts work and check for loss (no timing is asserted: CI is noisy)."""

from __future__ import annotations

import os

from bench.memory import run_imports, run_rss, trace_devices
from bench.run_baseline import launch_pump, parse_output, run_baseline
from bench.run_eoid import run_eoid


def test_pump_reports_loss_when_nobody_relays() -> None:
    fds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(4)]
    try:
        pump = launch_pump([fds], "closed", 0.2, None, drain=0.2)
        out, _ = pump.communicate(timeout=30)
    finally:
        for fd in fds:
            os.close(fd)
    assert pump.returncode == 1
    result = parse_output("pump", pump, out)
    assert result["fired"] > result["unmask_received"]


def test_c_baseline_and_python_floor_relay_everything() -> None:
    for relay in ("baseline", "py-uvloop"):
        result = run_baseline(4, "closed", 0.3, relay=relay)
        assert result["ok"], result
        assert result["interrupts"] > 100
        assert result["cpu_us_per_interrupt"] > 0


def test_eoid_under_the_pump_loses_nothing() -> None:
    for mode, rate in (("closed", None), ("paced", 2000)):
        result = run_eoid(8, mode, 0.5, rate)
        assert result["lost"] == 0, result
        assert result["interrupts"] > 100
        assert result["eoi_to_unmask_p99_us"] is not None
        assert result["arm_seconds"] > 0


def test_memory_measures_a_real_daemon_and_its_devices() -> None:
    """bench.memory's readings are plausible (no sizes are asserted beyond sanity)."""
    mb = 1 << 20
    result = run_rss([1, 128], "uvloop", 4096, scrapes=1)
    for row in result["rows"]:
        for reading in (row["ready"], row["scraped"]):
            assert 10 * mb < reading["VmRSS"] <= reading["VmHWM"] < 1024 * mb
            assert reading["RssAnon"] > 0 and reading["RssFile"] > 0
            assert reading["RssAnon"] + reading["RssFile"] <= reading["VmRSS"] + mb
        assert row["scrape_bytes"] > 0
    per_device = result["fits"]["ready VmRSS"]["per_device"]
    assert 0 < per_device < 100_000, result["fits"]
    traced = trace_devices(16)
    assert 0 < traced["per_device"] < 100_000
    assert any("runner.py" in site["where"] for site in traced["sites"]), traced["sites"]


def test_memory_finds_what_pulls_in_ssl() -> None:
    result = run_imports(["asyncio"], ["asyncio", "yaml"])
    asyncio_alone = result["alone"][1]
    assert asyncio_alone["ssl"] and "asyncio/base_events.py" in asyncio_alone["ssl_via"]
    assert [r["module"] for r in result["layers"]] == ["(interpreter)", "asyncio", "yaml"]
    assert result["layers"][1]["added"]["VmRSS"] > 0


def test_eoid_on_the_kernel_path_is_not_woken_per_interrupt() -> None:
    """Kernel mode on sim for real: eoid routes each line to its consumer's fds and the
    pump, playing the kernel, signals the consumer's irq and unmasks on its EOI (the
    virqfd). Every interrupt counted on the host's side, none relayed, eoid's lane asleep."""
    result = run_eoid(8, "closed", 0.5, datapath="kernel")
    assert result["lost"] == 0, result
    assert result["interrupts"] == 0
    assert result["kernel_interrupts"] == result["pump"]["fired"] > 1000
    assert result["pump"]["virqfd_unmasks"] == result["pump"]["fired"]
    lane = [n for t, n in result["voluntary_switches_by_thread"].items() if "lane" in t]
    assert lane == [0], result["voluntary_switches_by_thread"]


def test_sampled_observation_under_closed_load_loses_nothing() -> None:
    """Observation windows (100 ms every 1 s on each of 16 devices) switch lines between
    the kernel's path and the relay under closed-loop load: every fire completes, each
    is counted once (relayed by eoid or on the kernel's path), no EOI is taken for a
    spurious one. (Fails while a route is applied after eoid drained the eventfds.)"""
    result = run_eoid(16, "closed", 2.0, datapath="kernel", observe=("1s", "100ms"))
    assert result["observations"] >= 16, result
    assert result["interrupts"] > 0 and result["kernel_interrupts"] > 0, result
    # the guest sends one EOI an irq: none is spurious but a redelivered one's
    assert result["spurious_eois"] <= result["pump"]["redelivered"], result
    assert result["pump"]["in_flight"] == 0, result["pump"]
    assert result["lost"] == 0, result
