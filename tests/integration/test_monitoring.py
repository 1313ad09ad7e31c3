"""The shipped alert rules and dashboard are valid, tested, and use only real metric names.

promtool must be installed (Debian package ``prometheus``): these tests fail
rather than skip without it, so CI cannot silently stop checking the rules.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import environment

MONITORING = Path(__file__).resolve().parents[2] / "monitoring"
RULES = MONITORING / "eoid-alerts.yaml"
RULE_TESTS = MONITORING / "eoid-alerts.test.yaml"
DASHBOARD = MONITORING / "eoid-dashboard.json"

# DESIGN.md section 6: every name eoid exports (histograms by their base name).
COUNTERS = {
    "eoid_interrupts_total",
    "eoid_eois_total",
    "eoid_unmasks_total",
    "eoid_spurious_eois_total",
    "eoid_coalesced_interrupts_total",
    "eoid_eoi_timeouts_total",
    "eoid_storm_throttles_total",
    "eoid_errors_total",
    "eoid_config_reloads_total",
}
HISTOGRAMS = {
    "eoid_interrupt_service_seconds",
    "eoid_unmask_latency_seconds",
    "eoid_dispatch_latency_seconds",
}
GAUGES = {
    "eoid_device_up",
    "eoid_consumer_attached",
    "eoid_device_state",
    "eoid_device_info",
    "eoid_build_info",
    "eoid_loop_lag_seconds",
    "eoid_config_last_reload_success_timestamp_seconds",
    "eoid_config_last_reload_successful",
}
KNOWN = COUNTERS | HISTOGRAMS | GAUGES
PER_DEVICE = KNOWN - {  # eoid's own overheads are daemon-wide by default
    "eoid_unmask_latency_seconds",
    "eoid_dispatch_latency_seconds",
    "eoid_build_info",
    "eoid_loop_lag_seconds",
    "eoid_config_reloads_total",
    "eoid_config_last_reload_success_timestamp_seconds",
    "eoid_config_last_reload_successful",
}
METRIC_RE = re.compile(r"\beoid_[a-z_]+")


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: CI must install the Debian package 'prometheus'"
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression, histogram series folded to their base name."""
    names = set()
    for found in METRIC_RE.findall(expr):
        name = found
        for suffix in ("_bucket", "_sum", "_count"):
            if found.endswith(suffix) and found.removesuffix(suffix) in HISTOGRAMS:
                name = found.removesuffix(suffix)
        names.add(name)
    return names


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dashboard()["annotations"]["list"] if "expr" in a]
    return exprs


# -- alert rules -------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_both_firing_and_quiet() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert firing == alerts
    assert quiet == alerts


def test_alerts_follow_the_mixin_conventions() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Eoid(?:[A-Z][a-z0-9]+)+", name), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        used = metric_names(rule["expr"])
        if used & PER_DEVICE:
            assert "{{ $labels.device }}" in rule["annotations"]["description"], name


def test_alerts_use_only_metrics_eoid_exports() -> None:
    used = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    assert used <= KNOWN, used - KNOWN
    # the alerts the design asks for are all there
    for needed in (
        "eoid_device_up",
        "eoid_eoi_timeouts_total",
        "eoid_storm_throttles_total",
        "eoid_errors_total",
        "eoid_interrupt_service_seconds",
        "eoid_device_state",
        "eoid_config_last_reload_successful",
    ):
        assert needed in used, needed
    assert any('up{job="eoid"}' in rule["expr"] for rule in alert_rules())
    assert any(rule["expr"].startswith("absent(") for rule in alert_rules())


def test_no_alert_on_eoid_series_fires_while_eoid_is_down() -> None:
    """One page when eoid dies (EoidDown), not also every alert whose rate() window still
    holds the last samples (promtool covers the behaviour; this, that no rule forgets)."""
    for rule in alert_rules():
        if metric_names(rule["expr"]):
            assert rule["expr"].rstrip().endswith(
                'and on (job, instance) up{job="eoid"} == 1'), rule["alert"]


def test_the_rules_say_what_is_deliberately_not_alerted_on() -> None:
    header = RULES.read_text().split("groups:")[0]
    assert "Deliberately not alerted on" in header
    for unalerted in ("eoid_spurious_eois_total", "eoid_coalesced_interrupts_total",
                      "eoid_consumer_attached"):
        assert unalerted in header, unalerted
        assert all(unalerted not in rule["expr"] for rule in alert_rules())


# -- dashboard -----------------------------------------------------------------------------


def test_dashboard_uses_only_metrics_eoid_exports() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert used <= KNOWN, used - KNOWN
    # the panels the design asks for
    assert used >= {
        "eoid_interrupts_total",
        "eoid_interrupt_service_seconds",
        "eoid_unmask_latency_seconds",
        "eoid_spurious_eois_total",
        "eoid_coalesced_interrupts_total",
        "eoid_eoi_timeouts_total",
        "eoid_storm_throttles_total",
        "eoid_device_up",
        "eoid_consumer_attached",
        "eoid_loop_lag_seconds",
        "eoid_config_reloads_total",
    }


def test_dashboard_service_time_shows_p50_and_p99() -> None:
    exprs = dashboard_exprs()
    for quantile in ("0.5", "0.99"):
        assert any(
            f"histogram_quantile({quantile}," in e and "eoid_interrupt_service_seconds_bucket" in e
            for e in exprs
        ), quantile
    assert any(
        "histogram_quantile(0.99," in e and "eoid_unmask_latency_seconds_bucket" in e for e in exprs
    )


def test_dashboard_is_templated_on_datasource_and_device() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["device"]["type"] == "query"
    assert variables["device"]["multi"] is True
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for t in panel["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", panel["title"]
            if metric_names(t["expr"]) & PER_DEVICE:
                assert 'device=~"$device"' in t["expr"], (panel["title"], t["expr"])


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool has no expression checker, but it parses recording rules: wrap each query."""
    substitutions = {
        "$__rate_interval": "5m",
        '"$device"': '".+"',
        '"$job"': '".+"',
        '"$instance"': '".+"',
    }
    rules = []
    for i, query in enumerate(dashboard_exprs()):
        expr = query
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_daemon_exports_every_metric_the_rules_and_dashboard_use() -> None:
    """The name list above against a real daemon's /metrics, so neither can drift."""
    used = set().union(
        *(metric_names(rule["expr"]) for rule in alert_rules()),
        *(metric_names(e) for e in dashboard_exprs()),
    )
    with environment(devices=1) as env:
        env.start_sim()
        env.start_daemon()
        exported = set().union(*(metric_names(name) for name in env.scrape()))
    assert used <= exported, used - exported
    assert exported >= KNOWN  # every name of DESIGN.md section 6 is really exported


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("rate(eoid_unmask_latency_seconds_bucket[5m])", {"eoid_unmask_latency_seconds"}),
        ("eoid_interrupts_total / eoid_eois_total", {"eoid_interrupts_total", "eoid_eois_total"}),
        ("eoid_typo_total", {"eoid_typo_total"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
