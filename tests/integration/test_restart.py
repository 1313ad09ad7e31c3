"""Restart without loss: the daemon under a stand-in for systemd's fd store (FakeSystemd).

The daemon really is SIGKILLed or SIGTERMed and restarted as a new process with the
stored fds (``LISTEN_FDS``); the sim process and the consumers are never restarted.
"""

from __future__ import annotations

import json
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from eoid.fdstore import sim_fd_name
from eoid.testing import FakeSystemd
from tests.helpers import Consumer, Env, environment, free_port, wait_until


class Supervised:
    """The daemon started the way systemd starts it, and restarted the same way."""

    def __init__(self, env: Env, systemd: FakeSystemd) -> None:
        self.env = env
        self.systemd = systemd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.env.root / "daemon.log").open("ab") as log:
            self.proc = self.systemd.spawn(
                [sys.executable, "-m", "eoid.cli", "run", "-c", str(self.env.config)],
                stdout=log, stderr=subprocess.STDOUT)
        self.systemd.wait_for(READY="1", timeout=20)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(10)
        self.systemd.drain()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)


@pytest.fixture
def supervised() -> Iterator[Supervised]:
    with environment(devices=2) as env, FakeSystemd() as systemd:
        env.start_sim()
        daemon = Supervised(env, systemd)
        daemon.start()
        try:
            yield daemon
        finally:
            daemon.stop()


def no_eof(vm: Consumer) -> bool:
    """The consumer's control connection is still open (nothing to read, no EOF)."""
    ready, _, _ = select.select([vm.client.sock], [], [], 0)
    return not ready


def test_fds_are_parked_in_the_store(supervised: Supervised) -> None:
    names = {name for name, _ in supervised.systemd.store}
    assert {"control", "state", "d.dev0.trigger", "d.dev0.irq", "d.dev0.eoi", "d.dev0.unmask",
            "d.dev1.trigger", sim_fd_name(str(supervised.env.sim_socket))} <= names

    def peers() -> set[str]:
        supervised.systemd.drain()
        return {n for n, _ in supervised.systemd.store if n.startswith("peer.")}

    with Consumer(supervised.env.control, "dev0"):
        wait_until(lambda: peers() == {"peer.1"}, what="the consumer's connection stored")
    wait_until(lambda: peers() == set(), what="and removed when it closed")


def test_sigkill_with_an_interrupt_pending_loses_nothing(supervised: Supervised) -> None:
    env = supervised.env
    with Consumer(env.control, "dev0") as vm:
        env.sim("raise", line="dev0")
        assert vm.wait_irq() == 1
        supervised.systemd.drain()
        supervised.kill()
        # while no eoid runs, the guest services the device and ends the interrupt
        env.sim("ack", line="dev0")
        vm.send_eoi()
        supervised.start()
        assert no_eof(vm)  # the consumer never noticed
        wait_until(lambda: env.device("dev0")["state"] == "armed", what="unmasked")
        assert env.device("dev0")["consumer"] is not None
        env.sim("raise", line="dev0")  # the line was re-armed: the next interrupt arrives
        assert vm.wait_irq() == 1
        env.sim("ack", line="dev0")
        vm.send_eoi()
        wait_until(lambda: env.sim("stats")["lines"]["dev0"]["unmasks"] == 2)
    line = env.sim("stats")["lines"]["dev0"]
    assert line["raised"] == line["acked"] == 2
    assert line["fires"] == line["unmasks"] == 2


def test_sigkill_while_the_line_fires_delivers_it_after_restart(supervised: Supervised) -> None:
    env = supervised.env
    with Consumer(env.control, "dev1") as vm:
        supervised.kill()
        env.sim("raise", line="dev1")  # fires into the trigger eventfd nobody reads
        assert vm.wait_irq(0.3) == 0
        supervised.start()
        assert vm.wait_irq() == 1  # delivered by the successor
        env.sim("ack", line="dev1")
        vm.send_eoi()
        wait_until(lambda: env.device("dev1")["state"] == "armed")
        assert vm.wait_irq(0.3) == 0  # exactly once


def test_sigkill_between_read_and_forward_recovers_by_timeout() -> None:
    """A fire the old process read but never forwarded: the successor cannot know, so it
    waits eoi_timeout for an EOI and then unmasks; the still-asserted line fires again."""
    with environment(devices=1, device_yaml="policy: {eoi_timeout: 300ms}\n") as env, \
            FakeSystemd() as systemd:
        env.start_sim()
        daemon = Supervised(env, systemd)
        daemon.start()
        try:
            with Consumer(env.control, "dev0") as vm:
                env.sim("raise", line="dev0")
                assert vm.wait_irq() == 1  # the guest takes it but never services or ends it
                daemon.kill()
                daemon.start()
                assert vm.wait_irq(5) == 1  # after 300 ms the unmask makes it fire again
                env.sim("ack", line="dev0")
                vm.send_eoi()
                wait_until(lambda: env.device("dev0")["state"] == "armed")
        finally:
            daemon.stop()


def test_sigterm_under_systemd_hands_over_counters_and_consumers(supervised: Supervised,
                                                                 ) -> None:
    env = supervised.env
    with Consumer(env.control, "dev0") as vm:
        for _ in range(3):
            env.sim("raise", line="dev0")
            assert vm.wait_irq() == 1
            env.sim("ack", line="dev0")
            vm.send_eoi()
        wait_until(lambda: env.scrape()["eoid_unmasks_total"][(("device", "dev0"),)] == 3)
        supervised.kill(signal.SIGTERM)
        assert env.control.exists()  # a handover keeps the socket for the successor
        assert env.sim("stats")["lines"]["dev0"]["enabled"]  # and the device enabled
        supervised.start()
        assert no_eof(vm)
        samples = env.scrape()
        assert samples["eoid_interrupts_total"][(("device", "dev0"),)] == 3  # carried over
        env.sim("raise", line="dev0")
        assert vm.wait_irq() == 1


def test_demo_kill_daemon_every_loses_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "eoid.cli", "demo", "--json", "--duration", "6", "--devices",
         "4", "--rate", "400", "--kill-daemon-every", "1.5", "--metrics-listen",
         f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=120, check=False)
    assert result.stdout, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert result.returncode == 0, summary
    assert summary["daemon_restarts"] >= 3
    assert summary["lost"] == 0 and summary["drained"]
    assert summary["totals"]["guest_attaches"] == 4  # no guest ever re-attached
    assert summary["totals"]["device_raised"] > 4 * 400 * 4


def test_notify_protocol_ready_status_reload_and_watchdog() -> None:
    with environment(devices=2) as env, FakeSystemd() as systemd:
        env.start_sim()
        with (env.root / "daemon.log").open("ab") as log:
            proc = systemd.spawn([sys.executable, "-m", "eoid.cli", "run", "-c",
                                  str(env.config)], stdout=log, stderr=subprocess.STDOUT,
                                 watchdog_usec=200_000)
        try:
            ready = systemd.wait_for(READY="1", timeout=20)
            assert (ready.get("STATUS") or "").startswith("2/2 devices up")
            pings = systemd.watchdog_pings
            wait_until(lambda: bool(systemd.drain()) and systemd.watchdog_pings >= pings + 3,
                       5, "watchdog pings from the loop")
            # a reload: RELOADING=1 with a timestamp, then READY=1
            proc.send_signal(signal.SIGHUP)
            reloading = systemd.wait_for(RELOADING="1", timeout=10)
            assert int(reloading.get("MONOTONIC_USEC") or "0") > 0
            systemd.wait_for(READY="1", timeout=10)
            # a bad reload says why in STATUS=
            env.write_device("dev9", "policy: {eoi_timeout: never}\n")
            proc.send_signal(signal.SIGHUP)
            failed = systemd.wait_for(lambda m: "READY" in m and "reload failed" in (
                m.get("STATUS") or ""), timeout=10)
            assert "dev9.yaml:3" in (failed.get("STATUS") or "")
            # a wedged loop stops petting the watchdog
            proc.send_signal(signal.SIGSTOP)
            systemd.drain()
            before = systemd.watchdog_pings
            with pytest.raises(TimeoutError):
                systemd.wait_for(WATCHDOG="1", timeout=0.6)
            assert systemd.watchdog_pings == before
            proc.send_signal(signal.SIGCONT)
            systemd.wait_for(WATCHDOG="1", timeout=5)
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            proc.wait(10)


def test_a_removed_device_leaves_the_store(supervised: Supervised) -> None:
    env = supervised.env
    (env.root / "devices.d" / "dev1.yaml").unlink()
    assert supervised.proc is not None
    supervised.proc.send_signal(signal.SIGHUP)

    def stored() -> set[str]:
        supervised.systemd.drain()
        return {name for name, _ in supervised.systemd.store}

    wait_until(lambda: not any(n.startswith("d.dev1.") for n in stored()), 10,
               "dev1's fds removed from the store")
    assert {"d.dev0.trigger", "d.dev0.unmask", sim_fd_name(str(env.sim_socket))} <= stored()


def test_the_kernel_path_outlives_a_sigkill_and_the_successor_takes_it_over() -> None:
    """On the kernel's path no eoid is needed per interrupt: the guest goes on while the
    daemon is dead, and the successor (re-routing, then reconciling as after any restart)
    puts the line back where its configuration says, with nothing lost."""
    with environment(devices=1, device_yaml="datapath: kernel\n") as env, \
            FakeSystemd() as systemd:
        env.start_sim()
        daemon = Supervised(env, systemd)
        daemon.start()
        try:
            with Consumer(env.control, "dev0") as vm:
                wait_until(lambda: env.device("dev0")["datapath"] == "kernel", what="kernel")
                env.sim("raise", line="dev0")
                assert vm.wait_irq() == 1
                daemon.kill()
                env.sim("ack", line="dev0")
                vm.send_eoi()  # the kernel's unmask (the sim's virqfd) takes it
                for _ in range(3):  # and the next ones, with no eoid at all
                    env.sim("raise", line="dev0")
                    assert vm.wait_irq() == 1
                    env.sim("ack", line="dev0")
                    vm.send_eoi()
                env.sim("raise", line="dev0")
                assert vm.wait_irq() == 1  # pending across the restart
                env.write_device("dev0", "")  # the successor's configuration: relay
                daemon.start()
                assert no_eof(vm)
                wait_until(lambda: env.device("dev0")["datapath"] == "relay", what="relay")
                env.sim("ack", line="dev0")
                vm.send_eoi()  # read by eoid now: unmasks
                wait_until(lambda: env.device("dev0")["state"] == "armed", what="armed")
                env.sim("raise", line="dev0")
                assert vm.wait_irq() == 1
                env.sim("ack", line="dev0")
                vm.send_eoi()
                wait_until(lambda: env.device("dev0")["state"] == "armed", what="armed")
                assert vm.wait_irq(0.3) == 0  # exactly once
            line = env.sim("stats")["lines"]["dev0"]
            assert line["raised"] == line["acked"] == 6
            assert (line["fires"], line["kernel_fires"]) == (6, 5)
        finally:
            daemon.stop()
