"""Configuration: units, every error naming file:line: field, and the shipped examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from eoid.config import format_duration, load_config, parse_duration
from eoid.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "ns"), [
    ("500us", 500_000), ("500µs", 500_000), ("2s", 2 * 10**9), ("1.5ms", 1_500_000),
    ("100ns", 100), ("1m", 60 * 10**9), (" 10 ms ", 10_000_000)])
def test_durations(text: str, ns: int) -> None:
    assert parse_duration(text) == ns


@pytest.mark.parametrize("bad", ["5", "fast", "-1s", "1 parsec", 5, None, "1e3s"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(bad)


def test_format_duration_round_trips() -> None:
    for text in ("2s", "500ms", "250us", "7ns"):
        assert format_duration(parse_duration(text)) == text


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "eoid.yaml"


def problems(root: Path, files: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(write(root, files))
    return e.value.problems


def test_shipped_examples_are_valid() -> None:
    config = load_config(REPO / "config" / "eoid.yaml")
    assert set(config.devices) == {"sim0", "sim1"}
    assert config.devices["sim1"].policy.eoi_timeout == 500_000_000
    assert config.daemon.metrics.address() == ("127.0.0.1", 9466)


def test_every_problem_names_file_line_and_field(tmp_path: Path) -> None:
    found = problems(tmp_path, {
        "eoid.yaml": "metrics:\n  listen: nowhere\n",
        "devices.d/nic0.yaml": ("# comment\npci_address: '01:00'\nbackend:\n  type: sim\n"
                                "  colour: red\npolicy:\n  eoi_timeout: 5\n"),
    })
    assert found == [f"{tmp_path}/eoid.yaml:2: metrics.listen: 'nowhere' is not host:port "
                     "(e.g. 127.0.0.1:9466, [::1]:9466 or :9466)"]
    (tmp_path / "eoid.yaml").write_text("")
    found = problems(tmp_path, {})
    nic0 = f"{tmp_path}/devices.d/nic0.yaml"
    assert found == [
        f"{nic0}:2: pci_address: '01:00' is not a PCI address (DDDD:BB:DD.F)",
        f"{nic0}:5: backend.colour: unknown setting",
        f"{nic0}:7: policy.eoi_timeout: 5 is not a duration (a number and a unit: 500us, "
        "10ms, 2s, 1m)",
    ]


def test_missing_fields_unknown_backend_and_bad_yaml(tmp_path: Path) -> None:
    found = problems(tmp_path, {
        "eoid.yaml": "",
        "devices.d/a.yaml": "backend: {type: sim}\n",
        "devices.d/b.yaml": "pci_address: '0000:01:00.0'\nbackend: {type: pci-stub}\n",
        "devices.d/c.yaml": "pci_address: '0000:01:00.0'\nbackend: [\n",
        "devices.d/d.yaml": "- just\n- a list\n",
    })
    text = "\n".join(found)
    assert f"{tmp_path}/devices.d/a.yaml:1: pci_address: required setting is missing" in text
    assert (f"{tmp_path}/devices.d/b.yaml:2: backend: unknown backend type 'pci-stub' "
            "(expected sim or vfio)") in text
    assert f"{tmp_path}/devices.d/c.yaml:3:1: invalid YAML: " in text
    assert f"{tmp_path}/devices.d/d.yaml:1: (file): expected a mapping" in text


def test_duplicate_names_and_addresses(tmp_path: Path) -> None:
    found = problems(tmp_path, {
        "eoid.yaml": "",
        "devices.d/a.yaml": "name: x\npci_address: '0000:01:00.0'\nbackend: {type: vfio}\n",
        "devices.d/b.yaml": "name: x\npci_address: '0000:01:00.1'\nbackend: {type: vfio}\n",
        "devices.d/c.yaml": "pci_address: '0000:01:00.0'\nbackend: {type: vfio}\n",
    })
    assert any("b.yaml:1: name: 'x' is already used by" in p for p in found)
    assert any("c.yaml:1: pci_address: 0000:01:00.0 is already used by" in p for p in found)


def test_names_users_and_groups(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {
        "eoid.yaml": "control: {socket_group: root, socket_mode: '0640'}\n",
        "devices.d/NIC.yaml": ("name: nic-0\npci_address: '0000:0A:1f.7'\nbackend: {type: sim}\n"
                               "consumers: {uids: [root, 1000], gids: [root]}\n"),
    }))
    device = config.devices["nic-0"]
    assert device.pci_address == "0000:0a:1f.7"
    assert device.consumers.uids == (0, 1000)
    assert device.consumers.allows(1000, frozenset({5}))
    assert device.consumers.allows(7, frozenset({0}))
    assert not device.consumers.allows(7, frozenset({7}))
    assert config.daemon.control.socket_mode == 0o640
    bad = problems(tmp_path, {"devices.d/NIC.yaml": (
        "name: NIC 0\npci_address: '0000:0a:1f.7'\nbackend: {type: sim}\n"
        "consumers: {uids: [no-such-user-here]}\n")})
    assert any("name: 'NIC 0' is not a device name" in p for p in bad)
    assert any(":4: consumers.uids.0: no such user 'no-such-user-here'" in p for p in bad)


def test_missing_devices_dir(tmp_path: Path) -> None:
    found = problems(tmp_path, {"eoid.yaml": "log: {level: info}\ndevices_dir: nowhere\n"})
    assert found == [f"{tmp_path}/eoid.yaml:2: devices_dir: {tmp_path}/nowhere is not a "
                     "directory"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eoid.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_check_config_exit_codes(tmp_path: Path) -> None:
    ok = run_cli("check-config", "-c", str(REPO / "config" / "eoid.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "2 device(s)" in ok.stdout
    write(tmp_path, {"eoid.yaml": "", "devices.d/nic0.yaml": (
        "pci_address: '0000:01:00.0'\nbackend: {type: sim}\npolicy:\n  on_eoi_timeout: panic\n")})
    bad = run_cli("check-config", "-c", str(tmp_path / "eoid.yaml"))
    assert bad.returncode == 78
    assert bad.stderr.startswith(f"{tmp_path}/devices.d/nic0.yaml:4: policy.on_eoi_timeout: ")
    run = run_cli("run", "-c", str(tmp_path / "eoid.yaml"))
    assert run.returncode == 78
    assert "nic0.yaml:4" in run.stderr
    assert run_cli("check-config", "-c", str(tmp_path / "absent.yaml")).returncode == 78


def test_cli_help_and_version() -> None:
    assert run_cli("--version").stdout.startswith("eoid ")
    for command in ("run", "check-config", "status", "reload", "devices", "sim", "demo"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: eoid" in result.stdout
    assert run_cli("frobnicate").returncode == 2
