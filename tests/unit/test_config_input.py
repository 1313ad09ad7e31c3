"""Hostile and broken config files: every input gives a config or a ConfigError whose every
line is ``file:line[:column]: field: message``, never another exception, in bounded time."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from eoid.config import load_config
from eoid.errors import ConfigError

PROBLEM = re.compile(r"^(?P<file>[^\n]+?):(?P<line>[0-9]+)(?::(?P<col>[0-9]+))?: "
                     r"(?P<field>[^\n]+?): (?P<message>[^\n]+)$")
SECONDS = 2.0  # of CPU: every file here loads or is refused well within this


def write(root: Path, daemon: bytes, devices: dict[str, bytes]) -> Path:
    (root / "devices.d").mkdir(exist_ok=True)
    (root / "eoid.yaml").write_bytes(daemon)
    for name, data in devices.items():
        (root / "devices.d" / name).write_bytes(data)
    return root / "eoid.yaml"


def refused(root: Path, daemon: bytes = b"", **devices: bytes) -> list[str]:
    """The problems found, each checked against the format; fails if the config loads."""
    files = {f"{name}.yaml": data for name, data in devices.items()}
    started = time.process_time()  # CPU: the machine may be busy, the bound is on work
    with pytest.raises(ConfigError) as e:
        load_config(write(root, daemon, files))
    assert time.process_time() - started < SECONDS
    assert e.value.problems
    for problem in e.value.problems:
        m = PROBLEM.match(problem)
        assert m, problem
        assert m["file"].startswith(str(root)), problem
    return e.value.problems


DEVICE = b"pci_address: '0000:01:00.0'\nbackend: {type: sim}\n"


def one(root: Path, data: bytes) -> str:
    """The single problem of a device file ``d.yaml`` holding ``data``."""
    found = refused(root, d=data)
    assert len(found) == 1, found
    assert found[0].startswith(f"{root}/devices.d/d.yaml:")
    return found[0]


def test_non_utf8_bytes_name_line_and_column(tmp_path: Path) -> None:
    found = one(tmp_path, DEVICE + b"policy:\n  eoi_timeout: 2\xffs\n")
    assert found == (f"{tmp_path}/devices.d/d.yaml:4:17: (file): not UTF-8 "
                     "(byte 0xff)")


def test_nul_and_control_bytes_name_line_and_column(tmp_path: Path) -> None:
    found = one(tmp_path, DEVICE + b"policy: {eoi_timeout: 2\x00s}\n")
    assert found.startswith(f"{tmp_path}/devices.d/d.yaml:3:24: invalid YAML: "), found
    assert "#x0000" in found
    assert one(tmp_path, b"\x1b[31m: x\n").startswith(
        f"{tmp_path}/devices.d/d.yaml:1:1: invalid YAML: ")


def test_yaml_syntax_errors_give_line_and_column(tmp_path: Path) -> None:
    found = one(tmp_path, b"pci_address: '0000:01:00.0'\nbackend: [\n")
    assert re.match(rf"{tmp_path}/devices.d/d.yaml:3:1: invalid YAML: ", found), found
    found = one(tmp_path, b"a: b\n  c: d\n")
    assert re.match(rf"{tmp_path}/devices.d/d.yaml:2:4: invalid YAML: mapping values", found)
    found = one(tmp_path, b"a: 'unterminated\n")
    assert re.match(rf"{tmp_path}/devices.d/d.yaml:2:1: invalid YAML: ", found), found


@pytest.mark.parametrize(("text", "where", "expect"), [
    (b"policy: {eoi_timeout: " + b"9" * 400 + b"s}\n", ":3: policy.eoi_timeout: ",
     "is not a duration"),
    (b"policy: {storm: {burst: " + b"9" * 4400 + b"}}\n", ":3:25: invalid YAML: ",
     "digits"),
    (b"policy: {storm: {max_rate: " + b"9" * 4400 + b"}}\n", ":3:28: invalid YAML: ",
     "an integer of more than 4300 digits"),
    (b"policy: {storm: {max_rate: 1e400}}\n", ":3: policy.storm.max_rate: ", "finite"),
    (b"policy: {storm: {max_rate: 1e-300}}\n", ":3: policy.storm.max_rate: ",
     "greater than or equal to 1"),
    (b"policy: {storm: {max_rate: .nan}}\n", ":3: policy.storm.max_rate: ", "finite"),
    (b"policy: {storm: {max_rate: .inf}}\n", ":3: policy.storm.max_rate: ", "finite"),
    (b"policy: {storm: {burst: 1000000000000000000000000000000}}\n",
     ":3: policy.storm.burst: ", "less than or equal to 1000000"),
    (b"policy: {storm: {burst: true}}\n", ":3: policy.storm.burst: ", "integer"),
    (b"policy: {eoi_timeout: 1000000000000h}\n", ":3: policy.eoi_timeout: ",
     "is not a duration"),
    (b"policy: {eoi_timeout: 999999999999h}\n", ":3: policy.eoi_timeout: ",
     "is not between 1ms and 24h"),
    (b"policy: {eoi_timeout: 24.000000001h}\n", ":3: policy.eoi_timeout: ",
     "is not between 1ms and 24h"),
    (b"policy: {eoi_timeout: 1ns}\n", ":3: policy.eoi_timeout: ", "is not between 1ms and 24h"),
    (b"policy: {storm: {backoff_initial: 1ms, backoff_max: 100000h}}\n",
     ":3: policy.storm.backoff_max: ", "is not between 1us and 1h"),
    (b"policy: {storm: {recovery: 1e3s}}\n", ":3: policy.storm.recovery: ",
     "is not a duration"),
    (b"consumers: {uids: [99999999999999999999]}\n", ":3: consumers.uids.0: ",
     "is not a user name or uid"),
    (b"consumers: {gids: [\"a\\0b\"]}\n", ":3: consumers.gids.0: ", "no such group"),
    (b"policy: {storm: {max_rate: 2020-13-45}}\n", ":3:28: invalid YAML: ", "month"),
    (b"policy: {storm: {max_rate: !!timestamp x}}\n", ":3:28: invalid YAML: ",
     "cannot read this value"),
    (b"policy: {unmask_on_spurious: !!bool maybe}\n", ":3:30: invalid YAML: ",
     "cannot read this value"),
    (b"policy: {storm: {burst: !!int 0x}}\n", ":3:25: invalid YAML: ", "cannot read this value"),
    (b"policy: &a {storm: *a}\n", ":3:9: invalid YAML: ", "recursive"),
    (b"? [a, b]\n: c\n", ":3:3: invalid YAML: ", "unhashable"),
    (b"--- {a: 1}\n--- {b: 2}\n", ":3:1: invalid YAML: ", "single document"),
])
def test_hostile_values(tmp_path: Path, text: bytes, where: str, expect: str) -> None:
    found = one(tmp_path, DEVICE + text)
    assert found.startswith(f"{tmp_path}/devices.d/d.yaml{where}"), found
    assert expect in found, found
    assert len(found) < 400


@pytest.mark.parametrize("text", [b"[" * 5000, b"a: " * 5000 + b"b", b"- " * 5000 + b"x",
                                  b"{a: " * 5000 + b"}" * 5000])
def test_deep_nesting(tmp_path: Path, text: bytes) -> None:
    found = one(tmp_path, text)
    assert ": invalid YAML: " in found, found


MANY_VALUES = {  # each about 64 KiB, the most a file may hold
    "flow list": b"a: [" + b"1," * 32000 + b"]\n",
    "block list": b"a:\n" + b"- 1\n" * 16000,
    "keys": b"".join(b"k%d: 1\n" % i for i in range(8000)),
    "aliases": b"a: &a [1]\nb: [" + b"*a," * 21000 + b"]\n",
}


@pytest.mark.parametrize("name", MANY_VALUES)
def test_files_of_many_values_are_refused_early(tmp_path: Path, name: str) -> None:
    """The pure-Python parser takes ~30 us a value: the count stops it at 10,000 values
    (a 256 KiB flow list took 8.6 s of CPU before)."""
    found = one(tmp_path, MANY_VALUES[name][:65536])
    assert "more than 10000 values" in found, found


def alias_bomb(levels: int, width: int = 9, flow: bool = True) -> bytes:
    lines = [b"a0: &a0 [x]"]
    for i in range(1, levels + 1):
        refs = b", ".join(b"*a%d" % (i - 1) for _ in range(width))
        lines.append(b"a%d: &a%d [%s]" % (i, i, refs))
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("levels", [6, 9, 30])
def test_alias_bombs_are_refused_at_once(tmp_path: Path, levels: int) -> None:
    found = one(tmp_path, alias_bomb(levels))
    assert "more than 10000 values" in found, found


def test_few_aliases_are_fine(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, b"", {
        "a.yaml": b"pci_address: '0000:01:00.0'\nbackend: {type: sim}\n"
                  b"consumers: &c {uids: [0, 1]}\n",
        "b.yaml": b"pci_address: '0000:01:00.1'\nbackend: &b {type: sim}\n"
                  b"policy: {storm: &s {max_rate: 5, burst: 2}}\n"}))
    assert config.devices["a"].consumers.uids == (0, 1)
    assert config.devices["b"].policy.storm.burst == 2


@pytest.mark.parametrize(("text", "expect"), [
    (b"just a string\n", "expected a mapping of settings, got str"),
    (b"- 1\n- 2\n", "expected a mapping of settings, got list"),
    (b"42\n", "expected a mapping of settings, got int"),
    (b"!!binary aGVsbG8=\n", "expected a mapping of settings, got bytes"),
    (b"!!python/object:os.system {}\n", "could not determine a constructor"),
    (b"1: 2\npci_address: '0000:01:00.0'\nbackend: {type: sim}\n",
     "1: 1: Keys should be strings (got 1)"),
    (b"null: 2\npci_address: '0000:01:00.0'\nbackend: {type: sim}\n", "Keys should be strings"),
    (b"pci_address: '0000:01:00.0'\nbackend: {type: sim}\n'a\\nb: c': 1\n",
     "unknown setting"),
])
def test_odd_documents(tmp_path: Path, text: bytes, expect: str) -> None:
    assert expect in one(tmp_path, text)


def test_an_empty_device_file_lacks_its_settings(tmp_path: Path) -> None:
    assert refused(tmp_path, d=b"") == [
        f"{tmp_path}/devices.d/d.yaml:1: {field}: required setting is missing"
        for field in ("backend", "pci_address")]


def test_big_files_and_odd_files_are_refused(tmp_path: Path) -> None:
    found = one(tmp_path, DEVICE + b"#" * (70 * 1024) + b"\n")
    assert found == f"{tmp_path}/devices.d/d.yaml:1: (file): larger than 65536 bytes"
    (tmp_path / "devices.d" / "d.yaml").unlink()
    (tmp_path / "devices.d" / "e.yaml").mkdir()
    assert refused(tmp_path) == [
        f"{tmp_path}/devices.d/e.yaml:1: (file): cannot read: Is a directory"]


def test_unusable_devices_dirs(tmp_path: Path) -> None:
    found = refused(tmp_path, b"devices_dir: " + b"x" * 5000 + b"\n")
    assert found[0].startswith(f"{tmp_path}/eoid.yaml:1: devices_dir: cannot read "), found
    assert found[0].endswith(": File name too long"), found
    found = refused(tmp_path, b"devices_dir: \"a\\0b\"\n")
    assert found[0].startswith(f"{tmp_path}/eoid.yaml:1: devices_dir: "), found
    found = refused(tmp_path, b"devices_dir: eoid.yaml\n")
    assert found == [f"{tmp_path}/eoid.yaml:1: devices_dir: {tmp_path}/eoid.yaml is not a "
                     "directory"]


def test_a_fifo_is_not_waited_on(tmp_path: Path) -> None:
    import os

    (tmp_path / "devices.d").mkdir()
    os.mkfifo(tmp_path / "devices.d" / "f.yaml")
    found = refused(tmp_path)
    assert found == [f"{tmp_path}/devices.d/f.yaml:1: (file): not a regular file"]


def test_socket_mode_is_an_octal_string(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, b"control: {socket_mode: '0640'}\n", {}))
    assert config.daemon.control.socket_mode == 0o640
    for text in (b"true", b"0660", b"432", b"'0o660'", b"'0999'", b"'07777'", b"'rw-rw----'"):
        found = refused(tmp_path, b"control: {socket_mode: " + text + b"}\n")
        assert len(found) == 1 and found[0].startswith(
            f"{tmp_path}/eoid.yaml:1: control.socket_mode: "), found
        assert "an octal string in quotes, e.g. '0660'" in found[0], found


def test_socket_paths_must_fit_a_unix_address(tmp_path: Path) -> None:
    found = refused(tmp_path, b"control: {socket: /" + b"x" * 120 + b"}\n")
    assert found[0].startswith(f"{tmp_path}/eoid.yaml:1: control.socket: "), found
    assert "longer than 107 bytes" in found[0]
    found = refused(tmp_path, b"sim: {socket: \"/a\\0b\"}\n")
    assert "NUL" in found[0], found


def test_problem_lines_are_one_line_each(tmp_path: Path) -> None:
    found = one(tmp_path, DEVICE + b"\"evil\\nkey: x\\r\\x1b\": 1\n")
    assert "\n" not in found and "\x1b" not in found


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eoid.cli", *args], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("data", [b"\xff\xfe\x00garbage", b"a: 1\x00", b"[" * 100_000,
                                  alias_bomb(8), b"burst: " + b"9" * 4400])
def test_check_config_and_run_exit_78_without_traceback(tmp_path: Path, data: bytes) -> None:
    config = write(tmp_path, b"", {"d.yaml": data})
    for command in ("check-config", "run"):
        started = time.monotonic()
        result = run_cli(command, "-c", str(config))
        assert time.monotonic() - started < 20
        assert result.returncode == 78, result.stderr
        assert "Traceback" not in result.stderr
        lines = result.stderr.splitlines()
        assert lines and all(PROBLEM.match(line) for line in lines), result.stderr
    (tmp_path / "eoid.yaml").write_bytes(data)
    result = run_cli("check-config", "-c", str(config))
    assert result.returncode == 78 and "Traceback" not in result.stderr, result.stderr
