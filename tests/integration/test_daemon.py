"""The daemon as a real subprocess, with the sim process, real sockets and real eventfds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from eoid.control import ControlClient
from eoid.errors import ProtocolError
from eoid.wire import recv_msg, send_msg
from tests.helpers import Consumer, Env, environment, wait_until

QUIET = 0.3  # how long "nothing arrives" is watched for


@pytest.fixture
def env() -> Iterator[Env]:
    with environment(devices=2) as e:
        e.start_sim()
        e.start_daemon()
        yield e


def counter(env: Env, name: str, device: str) -> float:
    return env.scrape()[name].get((("device", device),), 0.0)


def test_interrupts_round_trip_once_each_and_rearm_on_eoi(env: Env) -> None:
    with Consumer(env.control, "dev0") as vm:
        for _ in range(50):
            env.sim("raise", line="dev0")
            assert vm.wait_irq() == 1
            env.sim("ack", line="dev0")  # the guest driver services the device...
            vm.send_eoi()  # ...then ends the interrupt
        wait_until(lambda: env.device("dev0")["state"] == "armed", what="re-armed")
    line = env.sim("stats")["lines"]["dev0"]
    assert (line["fires"], line["unmasks"], line["acked"]) == (50, 50, 50)
    assert counter(env, "eoid_interrupts_total", "dev0") == 50
    assert counter(env, "eoid_unmasks_total", "dev0") == 50
    assert counter(env, "eoid_forwards_total", "dev0") == 50
    assert counter(env, "eoid_interrupts_total", "dev1") == 0
    service = env.scrape()["eoid_interrupt_service_seconds_count"][(("device", "dev0"),)]
    assert service == 50


def test_no_eoi_means_no_second_interrupt_and_unmask_while_asserted_refires(env: Env) -> None:
    with Consumer(env.control, "dev0") as vm:
        env.sim("raise", line="dev0")
        assert vm.wait_irq() == 1
        env.sim("raise", line="dev0")  # the device raises again while auto-masked
        assert vm.wait_irq(QUIET) == 0
        vm.send_eoi()  # EOI without servicing: the line is still asserted → fires again
        assert vm.wait_irq() == 1
        env.sim("ack", line="dev0")
        vm.send_eoi()
        assert vm.wait_irq(QUIET) == 0
        wait_until(lambda: env.device("dev0")["state"] == "armed")
    assert env.sim("stats")["lines"]["dev0"]["fires"] == 2


def test_spurious_eoi_is_counted_and_harmless(env: Env) -> None:
    with Consumer(env.control, "dev0") as vm:
        vm.send_eoi()
        wait_until(lambda: counter(env, "eoid_spurious_eois_total", "dev0") == 1)
        env.sim("raise", line="dev0")
        assert vm.wait_irq() == 1
        env.sim("ack", line="dev0")
        vm.send_eoi()
        wait_until(lambda: env.device("dev0")["state"] == "armed")
    assert counter(env, "eoid_unmasks_total", "dev0") == 1  # the spurious EOI unmasked nothing


def test_consumer_that_leaves_while_pending_hands_the_interrupt_to_the_next(env: Env) -> None:
    first = Consumer(env.control, "dev0")
    env.sim("raise", line="dev0")
    assert first.wait_irq() == 1
    first.close()  # gone without an EOI
    wait_until(lambda: env.device("dev0")["state"] == "held", what="held")
    with Consumer(env.control, "dev0") as second:
        assert second.wait_irq() == 1  # re-delivered on attach
        env.sim("ack", line="dev0")
        second.send_eoi()
        wait_until(lambda: env.device("dev0")["state"] == "armed")
        assert second.wait_irq(QUIET) == 0


def test_interrupt_with_no_consumer_is_held_until_one_attaches(env: Env) -> None:
    env.sim("raise", line="dev1")
    wait_until(lambda: env.device("dev1")["state"] == "held")
    with Consumer(env.control, "dev1") as vm:
        assert vm.wait_irq() == 1


def test_one_consumer_per_device_and_unknown_device(env: Env) -> None:
    with Consumer(env.control, "dev0"):
        with pytest.raises(ProtocolError) as busy:
            Consumer(env.control, "dev0")
        assert busy.value.code == "busy"
        with pytest.raises(ProtocolError) as unknown:
            Consumer(env.control, "nope")
        assert unknown.value.code == "unknown_device"


def test_malformed_and_oversized_requests_are_refused_without_harm(env: Env) -> None:
    with Consumer(env.control, "dev0") as vm:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as bad:
            bad.settimeout(5)
            bad.connect(str(env.control))
            for payload, code in ((b"not json", "bad_json"), (b"[1,2]", "bad_json"),
                                  (b"{" + b" " * 70000 + b"}", "too_large"),
                                  (b'{"op": "frobnicate"}', "unknown_op"),
                                  (b'{"op": "attach"}', "bad_request")):
                bad.send(payload)
                received = recv_msg(bad)
                assert received is not None
                assert received[0]["ok"] is False
                assert received[0]["error"]["code"] == code
            # fds pushed at the daemon are closed, not kept
            r, w = os.pipe()
            send_msg(bad, {"op": "hello"}, [r, w])
            os.close(r)
            os.close(w)
            assert (received := recv_msg(bad)) is not None and received[0]["ok"]
        env.sim("raise", line="dev0")  # the device never noticed
        assert vm.wait_irq() == 1


def _attach_as_nobody(env: Env) -> str:
    """Attach from a forked child that dropped to uid/gid 65534; returns what happened."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        result = "error"
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with ControlClient(env.control) as client:
                client.request("attach", device="dev0")
            result = "attached"
        except ProtocolError as e:
            result = e.code
        except BaseException as e:
            result = f"error: {e}"
        finally:
            os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_unauthorized_peer_is_refused(env: Env) -> None:
    assert _attach_as_nobody(env) == "forbidden"
    env.write_device("dev0", "consumers: {uids: [65534]}\n")
    os.kill(env.procs[-1].pid, signal.SIGHUP)
    wait_until(lambda: _attach_as_nobody(env) == "attached", 15)


def test_reload_applies_a_diff_and_rejects_a_bad_config_whole(env: Env) -> None:
    daemon = env.procs[-1]
    with Consumer(env.control, "dev0") as vm:
        env.write_device("dev0", "policy: {eoi_timeout: 300ms, on_eoi_timeout: redeliver}\n")
        (env.root / "devices.d" / "dev1.yaml").unlink()
        env.write_device("dev2")
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: sorted(d["name"] for d in env.status()["devices"])
                   == ["dev0", "dev2"], what="dev1 removed, dev2 added")
        samples = env.scrape()
        assert samples["eoid_config_reloads_total"][(("result", "success"),)] == 1
        # the changed policy applies in place: the same consumer sees a re-delivery
        env.sim("raise", line="dev0")
        assert vm.wait_irq() == 1
        assert vm.wait_irq(3) >= 1  # redelivered after 300ms without an EOI
        env.sim("ack", line="dev0")
        vm.send_eoi()
        # a bad file: nothing changes, the failure is counted and logged with file:line
        env.write_device("dev3", "policy: {eoi_timeout: soon}\n")
        daemon.send_signal(signal.SIGHUP)
        wait_until(lambda: env.scrape()["eoid_config_reloads_total"][
            (("result", "failure"),)] == 1, what="failed reload counted")
        assert sorted(d["name"] for d in env.status()["devices"]) == ["dev0", "dev2"]
        errors = [e for e in env.log_events("daemon") if e.get("problems")]
        assert any("dev3.yaml:3: policy.eoi_timeout" in p for p in errors[-1]["problems"])
        env.sim("raise", line="dev0")  # and the devices kept working
        assert vm.wait_irq() == 1


def test_vanished_sim_is_reported_and_recovered(env: Env) -> None:
    with Consumer(env.control, "dev0") as vm:
        env.procs[0].kill()  # the sim process dies
        env.procs[0].wait()
        wait_until(lambda: not env.device("dev0")["up"], what="device down")
        assert env.scrape()["eoid_device_up"][(("device", "dev0"),)] == 0
        msg = recv_msg(vm.client.sock)
        assert msg is not None and msg[0]["event"] == "device_down"
        env.start_sim()
        wait_until(lambda: env.device("dev0")["up"], 15, "device recovered")
        env.sim("raise", line="dev0")
        assert vm.wait_irq() == 1  # the same consumer, the same eventfds


def test_device_request_releases_the_device(env: Env) -> None:
    with Consumer(env.control, "dev1") as vm:
        env.sim("request", line="dev1")  # as vfio-pci does on unbind
        wait_until(lambda: not env.device("dev1")["up"], what="released")
        # (the sim takes the daemon's disable on its own connection, in its own time)
        wait_until(lambda: not env.sim("stats")["lines"]["dev1"]["enabled"], 5, "disabled")
        msg = recv_msg(vm.client.sock)
        assert msg is not None and msg[0]["event"] == "device_down"
        assert "host asked" in msg[0]["reason"]


def test_status_command_and_sigterm_shutdown(env: Env) -> None:
    out = subprocess.run([sys.executable, "-m", "eoid.cli", "status", "-c", str(env.config)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert "dev0" in out and "armed" in out and "INTERRUPTS" in out
    daemon = env.procs[-1]
    events = []
    with ControlClient(env.control) as client:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(10) == 0
        while (msg := recv_msg(client.sock)) is not None:
            events.append(msg[0].get("event"))
    assert "shutdown" in events
    assert not env.control.exists()
    wait_until(lambda: not env.sim("stats")["lines"]["dev0"]["enabled"], 5, "disabled")


def test_status_against_no_daemon_exits_unavailable(tmp_path: object) -> None:
    result = subprocess.run([sys.executable, "-m", "eoid.cli", "status", "--socket",
                             "/nonexistent/control.sock"], capture_output=True, text=True,
                            check=False, timeout=30)
    assert result.returncode == 69
    assert "is the daemon running" in result.stderr


def test_second_daemon_on_the_same_socket_refuses_to_start(env: Env) -> None:
    second = subprocess.run([sys.executable, "-m", "eoid.cli", "run", "-c", str(env.config)],
                            capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 1
    assert "already listening" in second.stderr
    assert env.status()["devices"]


def test_eoi_timeout_unmask_policy_recovers_a_guest_that_never_eois() -> None:
    with environment(devices=1, device_yaml="policy: {eoi_timeout: 200ms}\n") as env:
        env.start_sim()
        env.start_daemon()
        with Consumer(env.control, "dev0") as vm:
            env.sim("raise", line="dev0")
            assert vm.wait_irq() == 1
            env.sim("ack", line="dev0")  # serviced, but the EOI is never sent
            wait_until(lambda: env.device("dev0")["state"] == "armed", 5, "timeout unmask")
            assert env.scrape()["eoid_eoi_timeouts_total"][(("device", "dev0"),)] == 1
            env.sim("raise", line="dev0")  # the line works again
            assert vm.wait_irq() == 1
        warnings = [e for e in env.log_events("daemon") if e.get("message") == "EOI timeout"]
        assert warnings and warnings[0]["level"] == "warning"


def test_storm_is_throttled_and_recovers() -> None:
    policy = ("policy: {storm: {max_rate: 200, burst: 10, backoff_initial: 1ms, "
              "backoff_max: 50ms, recovery: 300ms}}\n")
    with environment(devices=1, device_yaml=policy) as env:
        env.start_sim()
        env.start_daemon()
        with Consumer(env.control, "dev0") as vm:
            env.sim("set", line="dev0", stuck=True)
            env.sim("raise", line="dev0")
            start = time.monotonic()
            got = 0
            while time.monotonic() - start < 1.0:  # a guest that EOIs at once, forever
                if vm.wait_irq(0.5):
                    got += 1
                    vm.send_eoi()
            throttles = env.scrape()["eoid_storm_throttles_total"][(("device", "dev0"),)]
            assert throttles > 0
            assert got < 200 * 1.0 + 10 + 20  # capped near max_rate (+burst, + slack)
            env.sim("set", line="dev0", stuck=False)
            env.sim("ack", line="dev0")
            while vm.wait_irq(0.3):
                vm.send_eoi()
            wait_until(lambda: env.device("dev0")["state"] == "armed", 5)
            time.sleep(0.4)  # past the recovery period, a normal interrupt ends the episode
            env.sim("raise", line="dev0")
            assert vm.wait_irq() == 1
            env.sim("ack", line="dev0")
            vm.send_eoi()
            wait_until(lambda: not env.device("dev0")["storm"], 5, "storm over")
        messages = [e["message"] for e in env.log_events("daemon")]
        assert messages.count("interrupt storm: deferring unmasks") == 1
        assert "interrupt storm over" in messages
