"""/metrics under load checked by the real promtool, and `eoid demo` end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from eoid.stats import BUCKETS_SECONDS
from tests.helpers import environment, free_port, wait_until

DESIGN_METRICS = [
    "eoid_interrupts_total", "eoid_eois_total", "eoid_unmasks_total",
    "eoid_spurious_eois_total", "eoid_coalesced_interrupts_total", "eoid_eoi_timeouts_total",
    "eoid_storm_throttles_total", "eoid_errors_total", "eoid_interrupt_service_seconds_bucket",
    "eoid_unmask_latency_seconds_bucket", "eoid_dispatch_latency_seconds_bucket",
    "eoid_device_up", "eoid_consumer_attached", "eoid_device_state", "eoid_device_info",
    "eoid_build_info", "eoid_loop_lag_seconds", "eoid_config_reloads_total",
    "eoid_config_last_reload_success_timestamp_seconds", "process_resident_memory_bytes",
]


def test_live_metrics_pass_promtool_and_agree_with_the_devices() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (./dev test does)"
    with environment(devices=3) as env:
        env.start_daemon(wait_up=False)
        env.eoid("sim", "-c", str(env.config), "--rate", "300", log="sim.log")
        wait_until(lambda: all(d["consumer"] and d["up"] for d in env.status()["devices"]),
                   20, "guests attached")
        time.sleep(1.0)
        with urllib.request.urlopen(env.url, timeout=10) as r:
            text = r.read().decode()
        check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                               text=True, timeout=60, check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout + check.stderr == ""  # no lint complaints at all
        for name in DESIGN_METRICS:
            assert f"\n{name}" in text, name
        les = {line.split('le="')[1].split('"')[0] for line in text.splitlines()
               if line.startswith('eoid_unmask_latency_seconds_bucket{le=')}  # daemon-wide
        assert {"1e-06", "10.0", "+Inf"} <= les
        assert len(les) == len(BUCKETS_SECONDS) + 1
        assert 'eoid_device_state{device="dev1",state="armed"}' in text or \
            'eoid_device_state{device="dev1",state="pending"}' in text
        # quiesce, then every counter pair agrees exactly
        env.sim("quiesce")
        wait_until(lambda: all(d["state"] == "armed" for d in env.status()["devices"]), 10)
        lines = env.sim("stats")["lines"]
        samples = env.scrape()
        for dev, line in lines.items():
            key = (("device", dev),)
            assert line["fires"] > 100
            assert samples["eoid_interrupts_total"][key] == line["fires"]
            assert samples["eoid_unmasks_total"][key] == line["unmasks"]
            assert samples["eoid_forwards_total"][key] == line["guest"]["irqs"]
            assert samples["eoid_eois_total"][key] == line["guest"]["eois"]
            assert samples["eoid_interrupt_service_seconds_count"][key] == line["fires"]
            assert samples["eoid_consumer_attached"][key] == 1


def demo(*args: str) -> tuple[int, dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "eoid.cli", "demo", "--json", "--metrics-listen",
         f"127.0.0.1:{free_port()}", *args], capture_output=True, text=True, timeout=120,
        check=False)
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_demo_reconciles_and_loses_nothing() -> None:
    code, summary = demo("--duration", "3", "--devices", "4", "--rate", "1000")
    assert code == 0
    assert summary["lost"] == 0 and summary["mismatches"] == [] and summary["drained"]
    totals = summary["totals"]
    assert isinstance(totals, dict)
    assert totals["device_fires"] == totals["daemon_interrupts"] == totals["guest_irqs"]
    assert totals["daemon_unmasks"] == totals["device_unmasks"]
    assert totals["device_raised"] == totals["device_acked"] > 4 * 1000 * 2


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_demo_misbehaving_devices_show_in_metrics_and_recover(loop: str) -> None:
    code, summary = demo("--duration", "4", "--devices", "4", "--rate", "300", "--loop", loop,
                         "--stuck-line", "dev01", "--no-eoi", "dev02", "--spurious-eoi", "dev03")
    assert code == 0, summary
    per = summary["per_device"]
    assert isinstance(per, dict)
    assert per["dev01"]["daemon"]["storm_throttles"] > 0  # the stuck line was throttled
    assert per["dev01"]["device"]["fires"] > per["dev01"]["device"]["raised"]
    assert per["dev02"]["daemon"]["eoi_timeouts"] > 0  # the silent guest was timed out
    assert per["dev03"]["daemon"]["spurious_eois"] == per["dev03"]["guest"][
        "spurious_eois_sent"] > 0
    assert per["dev00"]["daemon"]["storm_throttles"] == 0
    # recovered: every event of every device was serviced and all lines are re-armed
    assert summary["lost"] == 0 and summary["drained"] and summary["mismatches"] == []
