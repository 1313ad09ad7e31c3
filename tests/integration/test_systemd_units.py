"""The shipped units pass systemd's own checks, and keep the properties eoid relies on.

``systemd-analyze verify`` runs without systemd as PID 1, so this runs in every CI
job (it needs the ``systemd`` package). It exits 0 even for unknown keys or bad
values, so the tests also demand empty output. The behaviour under a real PID 1
is tested in the VM (tests/vm/run-systemd-tests, ``pytest -m systemd``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "eoid.service"
SYSUSERS = ROOT / "systemd" / "eoid.sysusers.conf"
INSTALLED_EOID = "/opt/eoid/bin/eoid"
MAX_EXPOSURE = 2.5  # systemd-analyze security: 2.0 today; "OK" ends at 4.0


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing: CI must install the systemd package"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, check=False)


def render(tmp_path: Path, service_extra: str = "") -> Path:
    """A copy of the unit whose executables exist on this machine (verify checks them)."""
    text = UNIT.read_text().replace(INSTALLED_EOID, sys.executable)
    text = text.replace("[Service]\n", "[Service]\n" + service_extra, 1)
    out = tmp_path / "eoid.service"
    out.write_text(text)
    return out


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values in order (systemd keys may repeat, so no configparser)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def test_verify_is_clean(tmp_path: Path) -> None:
    result = systemd_analyze("verify", str(render(tmp_path)))
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_verify_complains_about_nothing_but_the_uninstalled_executable(tmp_path: Path) -> None:
    shutil.copy(UNIT, tmp_path / "eoid.service")
    result = systemd_analyze("verify", str(tmp_path / "eoid.service"))
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    assert all(INSTALLED_EOID in line for line in complaints), complaints
    if not Path(INSTALLED_EOID).exists():  # the usual case: eoid not installed on this host
        assert complaints, "expected a complaint about /opt/eoid/bin/eoid"


def test_verify_would_catch_an_unknown_key(tmp_path: Path) -> None:
    """The negative control for the empty-stderr assertion above."""
    result = systemd_analyze("verify", str(render(tmp_path, "ProtectEverything=yes\n")))
    assert result.returncode == 0  # which is why stderr must be checked
    assert "Unknown key 'ProtectEverything' in section [Service]" in result.stderr


def test_security_exposure_stays_low(tmp_path: Path) -> None:
    unit = render(tmp_path)
    result = systemd_analyze(
        "security", "--offline=yes", f"--threshold={round(MAX_EXPOSURE * 10)}", str(unit)
    )
    match = re.search(r"Overall exposure level for eoid\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE
    assert result.returncode == 0, result.stderr


def test_the_properties_eoid_relies_on() -> None:
    s = unit_settings(UNIT)
    one = {k: v[-1] for k, v in s.items()}
    # Readiness and reload protocol that eoid.systemd implements (252: no notify-reload).
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "main"
    # `eoid reload` waits for the daemon's verdict and exits 78 when it rejects the config
    assert s["Service.ExecReload"] == [f"{INSTALLED_EOID} reload --config ${{EOID_CONFIG}}"]
    assert one["Service.ExecStart"] == f"{INSTALLED_EOID} run --config ${{EOID_CONFIG}}"
    assert "EOID_CONFIG=/etc/eoid/eoid.yaml" in s["Service.Environment"]
    assert "Service.ExecStartPre" not in s  # a bad config must fail as exit 78 of ExecStart
    # A bad config (EX_CONFIG) fails for good; anything else, watchdog included, restarts.
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.RestartPreventExitStatus"] == "78"
    assert "Service.WatchdogSec" in one
    # 4 fds per device for a few hundred devices, plus consumers.
    assert int(one["Service.FileDescriptorStoreMax"]) >= 4 * 300 + 300
    assert int(one["Service.LimitNOFILE"]) >= 2 * int(one["Service.FileDescriptorStoreMax"])
    assert one["Service.RuntimeDirectory"] == "eoid"
    assert one["Service.RuntimeDirectoryPreserve"] == "restart"
    assert one["Service.StateDirectory"] == "eoid"
    assert one["Service.ConfigurationDirectory"] == "eoid"
    # Sandbox: no capabilities, only the VFIO device nodes, read-only system.
    assert one["Service.CapabilityBoundingSet"] == ""
    assert one["Service.Group"] == "eoid"
    assert one["Service.DevicePolicy"] == "closed"
    assert sorted(s["Service.DeviceAllow"]) == sorted(
        ["/dev/vfio/vfio rw", "char-vfio rw", "/dev/iommu rw", "char-vfio-dev rw"]
    )
    assert "Service.PrivateDevices" not in s  # it would hide /dev/vfio
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectProc": "invisible",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert one[f"Service.{key}"] == value, key
    assert s["Service.SystemCallFilter"][0] == "@system-service"


def test_sysusers_creates_the_eoid_system_group(tmp_path: Path) -> None:
    exe = shutil.which("systemd-sysusers")
    assert exe, "systemd-sysusers is missing: CI must install the systemd package"
    conf_dir = tmp_path / "usr/lib/sysusers.d"
    conf_dir.mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    shutil.copy(SYSUSERS, conf_dir / "eoid.conf")
    result = subprocess.run(
        [exe, f"--root={tmp_path}"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    groups = {
        line.split(":")[0]: int(line.split(":")[2])
        for line in (tmp_path / "etc/group").read_text().splitlines()
    }
    assert set(groups) == {"eoid"}
    assert groups["eoid"] < 1000  # a system group
    assert not (tmp_path / "etc/passwd").exists()  # no user: eoid runs as root


@pytest.mark.parametrize("command", ["run", "check-config", "reload"])
def test_the_cli_accepts_the_arguments_the_unit_passes(command: str) -> None:
    from eoid.cli import build_parser

    args = build_parser().parse_args([command, "--config", "/etc/eoid/eoid.yaml"])
    assert str(args.config) == "/etc/eoid/eoid.yaml"
