"""A real Prometheus (Debian's ``prometheus``) scrapes a live daemon whose simulated devices
misbehave, with a copy of the shipped rules (``for:`` and range windows shortened); through
its HTTP API: each alert fires for the device that misbehaves and for no healthy one, each
resolves once the fault is gone, and every dashboard query returns data.

Like the promtool tests, this fails rather than skips without /usr/bin/prometheus (``./dev``
installs the ``prometheus`` package), so CI cannot silently stop running it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from eoid.control import wait_for_socket
from eoid.demo import sim_call
from tests.helpers import Consumer, Env, environment, free_port, wait_until
from tests.integration.test_monitoring import RULES, dashboard_exprs

PROMETHEUS = "/usr/bin/prometheus"
FOR = "2s"  # every `for:` of the shipped rules, in the copy
WINDOW = "5s"  # every range window of the shipped rules, in the copy (scrapes are 1 s apart)
HEALTHY = {"dev0", "dev3"}  # dev3's guest sends spurious EOIs: deliberately not alerted on

# alert -> the device it must fire for (None: a daemon-wide alert)
MISBEHAVING = {
    ("EoidInterruptStormThrottling", "dev1"),  # its line is stuck asserted
    ("EoidInterruptStuck", "dev2"),  # its guest never sends the EOI
    ("EoidDeviceFaulted", "dev4"),  # it reported an error (AER)
    ("EoidInterruptAbandoned", "dev5"),  # its interrupt is held and no consumer comes
    ("EoidGuestServiceLatencyHigh", "dev6"),  # its guest takes 100 ms an interrupt
    ("EoidDeviceDown", "dev7"),  # its backend line does not exist
    ("EoidConfigReloadFailed", None),  # a device file that does not validate
}


def shortened_rules(text: str) -> str:
    """The shipped rules with each `for:` and each range window cut to seconds."""
    doc = yaml.safe_load(text)
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("for", "0m") != "0m":
                rule["for"] = FOR
            rule["expr"] = re.sub(r"\[\d+[smh]\]", f"[{WINDOW}]", rule["expr"])
    return yaml.safe_dump(doc)


class Prometheus:
    def __init__(self, root: Path, target: int) -> None:
        self.port = free_port()
        (root / "rules.yaml").write_text(shortened_rules(RULES.read_text()))
        (root / "prometheus.yaml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(root / "rules.yaml")],
            "scrape_configs": [{"job_name": "eoid", "static_configs": [
                {"targets": [f"127.0.0.1:{target}"]}]}]}))
        self.log = root / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={root / 'prometheus.yaml'}",
                 f"--storage.tsdb.path={root / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._ready, 30, "prometheus ready")

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                return True
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}" + (f"?{query}" if query else "")
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self) -> list[tuple[str, str | None, str]]:
        """(alert name, device label, state) of every pending or firing alert."""
        return sorted((a["labels"]["alertname"], a["labels"].get("device"), a["state"])
                      for a in self.api("alerts")["alerts"])

    def firing(self) -> set[tuple[str, str | None]]:
        return {(name, device) for name, device, state in self.alerts() if state == "firing"}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def write_sim_config(root: Path, control: Path, devices: list[str]) -> tuple[Path, Path]:
    """A config of its own for one ``eoid sim`` process: it serves (and guests) these."""
    root.mkdir()
    (root / "devices.d").mkdir()
    config, sock = root / "eoid.yaml", root / "sim.sock"
    config.write_text(f"control: {{socket: {control}}}\nsim: {{socket: {sock}}}\n"
                      "metrics: {listen: null}\n")
    for name in devices:
        (root / "devices.d" / f"{name}.yaml").write_text(
            "pci_address: '0000:00:01.0'\nbackend: {type: sim}\n")
    return config, sock


def start_sim(env: Env, name: str, config: Path, sock: Path, *args: str
              ) -> subprocess.Popen[bytes]:
    proc = env.eoid("sim", "-c", str(config), *args, log=f"{name}.log")
    assert wait_for_socket(sock, 20, lambda: proc.poll() is None), env.log(name)
    return proc


def write_device(env: Env, name: str, index: int, backend: str = "{type: sim}",
                 extra: str = "") -> None:
    (env.root / "devices.d" / f"{name}.yaml").write_text(
        f"pci_address: '0000:00:{0x10 + index:02x}.0'\nbackend: {backend}\n{extra}")


def cli(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eoid.cli", *args, "-c", str(env.config)],
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def env() -> Iterator[Env]:
    assert shutil.which(PROMETHEUS), "prometheus is missing: ./dev installs Debian's package"
    with environment(devices=0) as e:
        yield e


def until(prom: Prometheus, predicate: Callable[[], bool], what: str, timeout: float = 40
          ) -> None:
    """Poll Prometheus, and check at every poll that no healthy device has a firing alert
    (a pending one may come and go on a loaded machine: `for:` is cut to 2 s here)."""
    deadline = time.monotonic() + timeout
    while True:
        alerts = prom.alerts()
        assert not [a for a in alerts if a[1] in HEALTHY and a[2] == "firing"], alerts
        if predicate():
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {alerts}"
        time.sleep(0.5)


def test_each_alert_fires_for_its_device_on_live_data_and_resolves(env: Env) -> None:
    # sim A: dev0, dev2-dev4 with guests; B: dev5 and dev7, no guests; C: dev6, a slow
    # guest; S: dev1, whose stuck line keeps its process busy (the guests of A must not wait)
    sim_a = write_sim_config(env.root / "a", env.control, ["dev0", "dev2", "dev3", "dev4"])
    sim_s = write_sim_config(env.root / "s", env.control, ["dev1"])
    sim_b = write_sim_config(env.root / "b", env.control, ["dev5", "dev7"])
    sim_c = write_sim_config(env.root / "c", env.control, ["dev6"])
    for i in range(5):
        write_device(env, f"dev{i}", i, f"{{type: sim, socket: {sim_a[1]}}}")
    write_device(env, "dev1", 1, f"{{type: sim, socket: {sim_s[1]}}}",
                 "policy: {storm: {max_rate: 200, burst: 10}}\n")
    write_device(env, "dev2", 2, f"{{type: sim, socket: {sim_a[1]}}}",
                 "policy: {eoi_timeout: 200ms}\n")
    write_device(env, "dev5", 5, f"{{type: sim, socket: {sim_b[1]}}}",
                 "policy: {held_timeout: 1s}\n")
    write_device(env, "dev6", 6, f"{{type: sim, socket: {sim_c[1]}}}")
    write_device(env, "dev7", 7, f"{{type: sim, socket: {sim_b[1]}, line: missing}}")
    start_sim(env, "sim-a", *sim_a, "--rate", "50", "--no-eoi", "dev2", "--spurious-eoi", "dev3")
    start_sim(env, "sim-s", *sim_s, "--rate", "50", "--stuck-line", "dev1")
    start_sim(env, "sim-b", *sim_b, "--rate", "0", "--no-guests")
    start_sim(env, "sim-c", *sim_c, "--rate", "10", "--service-time", "100ms")
    daemon = env.start_daemon(wait_up=False)
    wait_until(lambda: [d["name"] for d in env.status()["devices"] if not d["up"]] == ["dev7"],
               20, "every device but dev7 open")
    prom = Prometheus(env.root, env.port)
    try:
        # misbehave, once Prometheus has seen the counters at 0 (for the dashboard's rates)
        until(prom, lambda: bool(prom.api("query", query='eoid_errors_total{device="dev4"}')[
            "result"]), "a first scrape")
        sim_call(sim_b[1], "raise", line="dev5")  # held: nobody attaches to dev5
        sim_call(sim_a[1], "error", line="dev4")
        write_device(env, "dev8", 8, "{type: sim}", "policy: {eoi_timeout: soon}\n")
        assert cli(env, "reload").returncode == 78
        until(prom, lambda: prom.firing() == MISBEHAVING, "every alert firing")

        # every dashboard query returns data (the errors panel: dev4's error)
        for query in dashboard_exprs():
            expr = query.replace("$__rate_interval", "1m")
            for var in ("$job", "$instance", "$device"):
                expr = expr.replace(f'"{var}"', '".+"')
            assert prom.api("query", query=expr)["result"], query

        # the faults go away: every alert resolves
        sim_call(sim_a[1], "heal")
        sim_call(sim_s[1], "heal")
        sim_call(sim_c[1], "set", line="dev6", rate=0)
        assert cli(env, "reset", "dev4").returncode == 0
        with Consumer(env.control, "dev5") as vm:
            assert vm.wait_irq() == 1
            sim_call(sim_b[1], "ack", line="dev5")
            vm.send_eoi()
            (env.root / "devices.d" / "dev8.yaml").unlink()
            write_device(env, "dev7", 7, f"{{type: sim, socket: {sim_b[1]}}}")
            assert cli(env, "reload").returncode == 0
            until(prom, lambda: not prom.alerts(), "every alert resolved")
        assert cli(env, "status").returncode == 0

        # eoid itself goes away: EoidDown, and nothing else over its last samples
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        until(prom, lambda: bool(prom.firing()), "EoidDown")
        time.sleep(2)  # a further evaluation or two
        assert prom.alerts() == [("EoidDown", None, "firing")]
    finally:
        prom.stop()
