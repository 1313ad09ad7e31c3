"""eoid.service under a real systemd 252 PID 1: start, reload, watchdog, restart, stop.

Run by tests/vm/run-systemd-tests inside a QEMU guest (see conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from pathlib import Path

import pytest

from eoid.demo import sim_call
from tests.helpers import Consumer
from tests.vm.edu import EduLine, bind_vfio, find_edus
from tests.vm.systemd.conftest import (
    CONFIG_DIR,
    CONTROL,
    DEVICES,
    EOID,
    RUNTIME_DIR,
    SIM_SOCKET,
    WEDGE_SIGNAL,
    Guest,
    proc_status,
    run,
    wait_restarted,
    wait_until,
)

pytestmark = pytest.mark.systemd

# "2/2 devices up, 0 interrupts/s": refreshed with every watchdog ping
STATUS_UP = re.compile(rf"{len(DEVICES)}/{len(DEVICES)} devices up\b")
BAD_DEVICE_YAML = 'pci_address: "0000:00:11.0"\nbackend: {type: sim}\npolicy: {eoi_timeout: soon}\n'


def reloads(guest: Guest, result: str) -> float:
    value = guest.metric("eoid_config_reloads_total", result=result)
    assert value is not None, f"no eoid_config_reloads_total{{result={result!r}}}"
    return value


def seconds(timespan: str) -> float:
    """systemd's formatted timespan ("10s", "1min 30s", "500ms") in seconds."""
    units = {"min": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(min|ms|us|s)", timespan):
        total += float(number) * units[unit]
    return total


def test_start_waits_for_ready_and_shows_the_status_line(fresh: Guest) -> None:
    running = fresh
    p = running.eoid.show(
        "ActiveState",
        "SubState",
        "Result",
        "NRestarts",
        "StatusText",
        "Type",
        "NotifyAccess",
        "ExecMainStartTimestampMonotonic",
        "ActiveEnterTimestampMonotonic",
    )
    # `systemctl start` of a Type=notify unit returns only once READY=1 arrived.
    assert (p["ActiveState"], p["SubState"], p["Result"]) == ("active", "running", "success")
    assert (p["Type"], p["NotifyAccess"]) == ("notify", "main")
    assert p["NRestarts"] == "0"
    assert re.match(rf"\d+/{len(DEVICES)} devices up, \d+ interrupts/s$", p["StatusText"])
    # A device that was slow to open (the sim, under TCG) comes up on a retry; the
    # status line follows with the next watchdog ping.
    wait_until(lambda: bool(STATUS_UP.match(running.eoid.prop("StatusText"))), 30, "2/2 up")
    assert int(p["ExecMainStartTimestampMonotonic"]) < int(p["ActiveEnterTimestampMonotonic"])
    running.wait_consumers()
    out = run(str(EOID), "status", "--socket", str(CONTROL)).stdout
    for device in DEVICES:
        assert device in out


def test_the_daemon_runs_with_no_capabilities_in_its_sandbox(running: Guest) -> None:
    pid = running.eoid.main_pid
    status = proc_status(pid)
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapPrm"], 16) == 0
    assert int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # SystemCallFilter= is a seccomp filter
    assert status["Uid"].split()[:2] == ["0", "0"]
    assert status["Gid"].split()[:2] == [str(running.eoid_gid)] * 2  # Group=eoid
    # The runtime directory and control socket are for group eoid only.
    d = RUNTIME_DIR.stat()
    assert (d.st_uid, d.st_gid, stat.S_IMODE(d.st_mode)) == (0, running.eoid_gid, 0o750)
    s = CONTROL.stat()
    assert stat.S_ISSOCK(s.st_mode)
    assert (s.st_uid, s.st_gid, stat.S_IMODE(s.st_mode)) == (0, running.eoid_gid, 0o660)
    # ProtectSystem=strict: the daemon sees / read-only (the last mount on / is on top).
    mounts = [m.split() for m in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
    root = [m for m in mounts if m[4] == "/"]
    assert root, "no / in the service's mount namespace"
    assert "ro" in root[-1][5].split(",")
    assert any(m[4] == str(RUNTIME_DIR) and "rw" in m[5].split(",") for m in mounts)
    # MemoryDenyWriteExecute= and the syscall filter did not break Python: it serves.
    assert running.metric("eoid_device_up", device="sim0") == 1


def last_reload_successful(guest: Guest) -> float | None:
    return guest.metric("eoid_config_last_reload_successful")


def test_reload_applies_a_good_configuration_in_place(running: Guest) -> None:
    pid = running.eoid.main_pid
    cursor = running.eoid.cursor()
    ok = reloads(running, "success")
    failed = reloads(running, "failure")
    before = running.metric("eoid_config_last_reload_success_timestamp_seconds")
    assert before is not None
    (CONFIG_DIR / "devices.d" / "sim1.yaml").write_text(
        'pci_address: "0000:00:11.0"\nbackend: {type: sim}\n'
        "policy: {eoi_timeout: 750ms, on_eoi_timeout: redeliver}\n"
    )
    running.eoid.systemctl("reload")
    # ExecReload= is `eoid reload`, which waits for the daemon's answer: when
    # `systemctl reload` returns, the configuration is applied (no polling).
    assert reloads(running, "success") == ok + 1
    assert last_reload_successful(running) == 1
    running.eoid.wait_active()
    assert running.eoid.main_pid == pid
    assert STATUS_UP.match(running.eoid.prop("StatusText"))
    assert reloads(running, "failure") == failed
    after = running.metric("eoid_config_last_reload_success_timestamp_seconds")
    assert after is not None
    assert after > before
    log = running.eoid.journal(cursor)
    assert "Reloading" in log
    assert "Reloaded" in log
    assert "configuration reloaded" in log
    assert "reloaded: added -, removed -, changed sim1" in log  # `eoid reload`'s answer
    assert all(running.metric("eoid_device_up", device=d) == 1 for d in DEVICES)


def test_systemctl_reload_fails_visibly_on_a_configuration_the_daemon_rejects(
    running: Guest,
) -> None:
    """`systemctl reload` fails (status 78), the daemon keeps the old configuration and
    says so (eoid_config_last_reload_successful 0, `eoid status`) until a fixed one is
    reloaded (1 again)."""
    pid = running.eoid.main_pid
    cursor = running.eoid.cursor()
    ok = reloads(running, "success")
    failed = reloads(running, "failure")
    (CONFIG_DIR / "devices.d" / "sim1.yaml").write_text(BAD_DEVICE_YAML)
    result = running.eoid.systemctl("reload", check=False)
    assert result.returncode != 0, result
    # the daemon itself was asked and refused: counted, and the gauge drops to 0
    assert reloads(running, "failure") == failed + 1
    assert last_reload_successful(running) == 0
    running.eoid.wait_active()
    assert running.eoid.main_pid == pid
    log = running.eoid.journal(cursor)
    assert "status=78" in log, log
    assert "rejected the configuration" in log  # `eoid reload` on stderr
    assert re.search(r"sim1\.yaml:\d+", log), log  # the daemon's problem, file and line
    assert "reload rejected" in log  # and the daemon's own line
    status = run(str(EOID), "status", "--socket", str(CONTROL), check=False)
    assert "last reload: REJECTED" in status.stdout, status.stdout
    # the old configuration keeps running: sim1 still times out after 500ms, not "soon"
    assert all(running.metric("eoid_device_up", device=d) == 1 for d in DEVICES)
    running.round_trip("sim1")
    # fixed: the next reload succeeds and the gauge is back to 1
    running.write_config()
    running.eoid.systemctl("reload")
    assert reloads(running, "success") == ok + 1
    assert last_reload_successful(running) == 1
    assert STATUS_UP.match(running.eoid.prop("StatusText"))


def test_sighup_with_a_bad_configuration_keeps_the_old_one(running: Guest) -> None:
    """A bare SIGHUP (nobody waits for an answer): the daemon refuses it all the same."""
    pid = running.eoid.main_pid
    cursor = running.eoid.cursor()
    ok = reloads(running, "success")
    failed = reloads(running, "failure")
    (CONFIG_DIR / "devices.d" / "sim1.yaml").write_text(BAD_DEVICE_YAML)
    running.eoid.systemctl("kill", "--kill-whom=main", "--signal=SIGHUP")
    wait_until(lambda: reloads(running, "failure") == failed + 1, 30, "a failed reload")
    running.eoid.wait_active()
    assert running.eoid.main_pid == pid
    log = running.eoid.journal(cursor)
    assert "reload rejected" in log
    assert re.search(r"sim1\.yaml:\d+", log), log
    assert all(running.metric("eoid_device_up", device=d) == 1 for d in DEVICES)
    # and a good configuration afterwards is taken again
    running.write_config()
    running.eoid.systemctl("reload")
    wait_until(lambda: reloads(running, "success") == ok + 1, 30, "the next good reload")
    wait_until(
        lambda: bool(STATUS_UP.match(running.eoid.prop("StatusText"))), 30, "status back to normal"
    )


STORMY_SIM1 = (
    'pci_address: "0000:00:11.0"\nbackend: {type: sim}\n'
    "policy: {eoi_timeout: 500ms, on_eoi_timeout: redeliver, storm: {max_rate: 5, burst: 1, "
    "backoff_initial: 1ms, backoff_max: 100ms, recovery: 1s}}\n"
)


@pytest.mark.timeout(300)  # two reloads, each an `eoid reload` (Python start-up) under TCG
def test_journal_priorities_select_a_storm_warning_and_not_the_info_lines(
    running: Guest,
) -> None:
    """Every line reaches journald with its syslog priority (<N>, sd-daemon(3)): an
    operator's `journalctl -p warning -u eoid` shows a storm and none of the info lines."""
    cursor = running.eoid.cursor()
    ok = reloads(running, "success")
    running.write_config(sim1=STORMY_SIM1)
    running.eoid.systemctl("reload")
    wait_until(lambda: reloads(running, "success") == ok + 1, 30, "the stormy policy applied")
    running.wait_consumers()

    def warnings() -> str:
        return running.eoid.journal(cursor, "-p", "warning")

    try:
        # the sim's guest EOIs at once and the line stays asserted: a storm
        sim_call(SIM_SOCKET, "set", line="sim1", stuck=True)
        sim_call(SIM_SOCKET, "raise", line="sim1")
        wait_until(lambda: "interrupt storm" in warnings(), 60, "the storm's warning")
    finally:
        sim_call(SIM_SOCKET, "set", line="sim1", stuck=False)
        sim_call(SIM_SOCKET, "ack", line="sim1")
        running.write_config()
        running.eoid.systemctl("reload")
        wait_until(lambda: reloads(running, "success") == ok + 2, 30, "the policy restored")
    shown = [json.loads(line) for line in warnings().splitlines() if line.startswith("{")]
    assert shown, warnings()
    assert {e["level"] for e in shown} <= {"warning", "error"}, shown
    assert any(e["message"] == "interrupt storm: deferring unmasks"
               and e["device"] == "sim1" for e in shown)
    # the info lines are in the journal, at priority 6, as JSON without the prefix
    records = running.eoid.entries(cursor)
    ours = {r["MESSAGE"]: r["PRIORITY"] for r in records
            if str(r.get("MESSAGE", "")).startswith("{")}
    reloaded = [m for m in ours if json.loads(m)["message"] == "configuration reloaded"]
    storm = [m for m in ours if json.loads(m)["message"] == "interrupt storm: deferring unmasks"]
    assert reloaded and all(ours[m] == "6" for m in reloaded)
    assert storm and all(ours[m] == "4" for m in storm)
    assert "configuration reloaded" not in warnings()


def test_a_wedged_event_loop_is_killed_by_the_watchdog_and_restarted(running: Guest) -> None:
    watchdog = seconds(running.eoid.prop("WatchdogUSec"))
    assert watchdog > 0, "WatchdogSec= is not set"
    pid = running.eoid.main_pid
    restarts = int(running.eoid.prop("NRestarts"))
    cursor = running.eoid.cursor()
    running.wait_consumers()
    attaches = {d: running.sim_guest(d)["attaches"] for d in DEVICES}
    # A healthy daemon pings: it outlives one full watchdog period.
    time.sleep(watchdog * 1.2)
    assert running.eoid.main_pid == pid
    assert int(running.eoid.prop("NRestarts")) == restarts
    # Wedge the loop (tests/vm/systemd/hooks): other threads still run, no pings come.
    running.eoid.systemctl("kill", "--kill-whom=main", f"--signal={WEDGE_SIGNAL}")
    wait_restarted(running.eoid, pid, restarts, timeout=watchdog * 3 + 30)
    log = running.eoid.journal(cursor)
    assert "wedged the main thread" in log
    assert "Watchdog timeout" in log
    assert "Failed with result 'watchdog'" in log
    running.wait_devices_up()
    # The killed eoid handed nothing over on purpose, yet its fd store copies carry the
    # devices and the consumers' connections: the guests never had to re-attach.
    for device in DEVICES:
        running.round_trip(device)
        assert running.sim_guest(device)["attaches"] == attaches[device]


def test_restart_hands_devices_and_consumers_over_through_the_fd_store(running: Guest) -> None:
    """DESIGN.md section 7: a restart loses no interrupt and no consumer notices it."""
    running.wait_consumers()
    attaches = {d: running.sim_guest(d)["attaches"] for d in DEVICES}
    stored = int(running.eoid.prop("NFileDescriptorStore"))
    # per device trigger, irq and eoi, the control socket, one connection per consumer
    assert stored >= 4 * len(DEVICES) + 1
    pid = running.eoid.main_pid
    marker = RUNTIME_DIR / "restart-marker"
    marker.touch()
    cursor = running.eoid.cursor()
    running.eoid.systemctl("restart")
    assert running.eoid.main_pid not in {0, pid}
    assert marker.exists()  # RuntimeDirectoryPreserve=restart
    assert CONTROL.exists()
    assert int(running.eoid.prop("NFileDescriptorStore")) >= stored
    running.wait_devices_up()
    for device in DEVICES:
        running.round_trip(device)  # through eventfds the new eoid adopted
        assert running.sim_guest(device)["attaches"] == attaches[device]
    assert running.metric("eoid_consumer_attached", device="sim0") == 1
    assert "consumer attached" not in running.eoid.journal(cursor)


def test_kill_9_and_restart_under_load_lose_no_interrupt(running: Guest) -> None:
    """Under load from the simulated devices and guests, a SIGKILL (restarted by
    Restart=on-failure) and a systemctl restart lose no interrupt, and no guest
    re-attaches: every device event raised is serviced by its guest in the end."""
    running.wait_consumers()
    attaches = {d: running.sim_guest(d)["attaches"] for d in DEVICES}
    for device in DEVICES:
        sim_call(SIM_SOCKET, "set", line=device, rate=100)
    time.sleep(2)
    pid, restarts = running.eoid.main_pid, int(running.eoid.prop("NRestarts"))
    running.eoid.systemctl("kill", "--kill-whom=main", "--signal=SIGKILL")
    wait_restarted(running.eoid, pid, restarts, timeout=60)
    running.wait_devices_up()
    time.sleep(2)
    running.eoid.systemctl("restart")
    running.wait_devices_up()
    time.sleep(2)
    for device in DEVICES:
        sim_call(SIM_SOCKET, "set", line=device, rate=0)

    def drained() -> bool:
        lines = sim_call(SIM_SOCKET, "stats")["lines"]
        return all(line["raised"] == line["acked"] and not line["asserted"]
                   and not line["guest"]["in_service"] for line in lines.values())

    wait_until(drained, 60, "every device event serviced by its guest")
    lines = sim_call(SIM_SOCKET, "stats")["lines"]
    for device in DEVICES:
        assert lines[device]["raised"] > 300  # ~6 s at 100/s, across both restarts
        assert lines[device]["guest"]["attaches"] == attaches[device]


def test_stop_is_clean_and_drops_runtime_state(running: Guest) -> None:
    cursor = running.eoid.cursor()
    running.eoid.systemctl("stop")
    p = running.eoid.show("ActiveState", "Result", "ExecMainStatus", "NFileDescriptorStore")
    assert p == {
        "ActiveState": "inactive",
        "Result": "success",
        "ExecMainStatus": "0",
        "NFileDescriptorStore": "0",
    }
    assert not RUNTIME_DIR.exists()  # RuntimeDirectoryPreserve=restart, not yes
    assert "eoid stopped" in running.eoid.journal(cursor)


def test_a_bad_configuration_fails_the_start_for_good(guest: Guest) -> None:
    guest.eoid.systemctl("stop")
    guest.eoid.systemctl("reset-failed", check=False)
    guest.write_config(sim1=BAD_DEVICE_YAML)
    try:
        result = guest.eoid.systemctl("start", check=False)
        assert result.returncode != 0
        time.sleep(3)  # several RestartSec= periods: no restart may follow
        p = guest.eoid.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
        assert p == {
            "ActiveState": "failed",
            "Result": "exit-code",
            "ExecMainStatus": "78",  # EX_CONFIG, RestartPreventExitStatus=78
            "NRestarts": "0",
        }
    finally:
        guest.write_config()
        guest.eoid.systemctl("reset-failed", check=False)


def test_the_installed_unit_verifies_inside_the_guest(guest: Guest) -> None:
    fragment = guest.eoid.prop("FragmentPath")
    result = run("systemd-analyze", "verify", fragment, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert os.path.basename(fragment) == "eoid.service"


def test_a_real_vfio_device_under_the_full_sandbox_survives_a_restart(running: Guest) -> None:
    """vfio-pci INTx of a QEMU edu, relayed by eoid.service with DevicePolicy=closed, no
    capabilities and its syscall filter; then handed over across `systemctl restart`."""
    edus = find_edus()
    assert edus, "no edu device: run-systemd-tests boots the guest with VM_EDU=1"
    bind_vfio(edus[0])
    edu_yaml = (
        f"pci_address: '{edus[0]}'\nbackend: {{type: vfio, share_device_fd: true}}\n"
        "policy: {eoi_timeout: 60s}\n"
    )
    try:
        running.write_config(edu0=edu_yaml)
        running.eoid.systemctl("reload")
        wait_until(lambda: running.metric("eoid_device_up", device="edu0") == 1, 60, "edu0 up")
        with Consumer(CONTROL, "edu0") as consumer:
            assert consumer.reply["fds"] == ["irq", "eoi", "device"]
            edu = EduLine(consumer.extra[0])

            def round_trips(n: int) -> list[int]:
                got = []
                for _ in range(n):
                    edu.raise_()
                    got.append(consumer.wait_irq(10))
                    edu.ack()
                    consumer.send_eoi()
                return got

            assert round_trips(20) == [1] * 20
            before = running.metric("eoid_interrupts_total", device="edu0")
            assert before is not None
            pid = running.eoid.main_pid
            running.eoid.systemctl("restart")
            assert running.eoid.main_pid not in {0, pid}
            wait_until(
                lambda: running.metric("eoid_device_up", device="edu0") == 1, 60, "edu0 adopted"
            )
            # the same consumer connection and eventfds, the same open VFIO device
            assert round_trips(20) == [1] * 20
            after = running.metric("eoid_interrupts_total", device="edu0")
            assert after is not None
            assert after - before == 20  # counters carried over by the handover
    finally:
        running.write_config()
        running.eoid.systemctl("reload")
        wait_until(
            lambda: running.metric("eoid_device_up", device="edu0") is None, 60, "edu0 removed"
        )
