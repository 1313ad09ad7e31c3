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
