"""A real KVM guest as eoid's consumer (README, "KVM consumers"): the VMM attaches over the
control socket and registers the device's ``irq``/``eoi`` eventfds with ``KVM_IRQFD`` and
``KVM_IRQFD_FLAG_RESAMPLE``; the guest's handler acks the sim device through a port write
and EOIs. On the relay, on the kernel's path (the sim playing VFIO's virqfd), and moved
between them underneath the guest: every device event serviced exactly once, and what the
sim fired, what eoid relayed, what the kernel's path carried and what the guest ran add up.

The sim's load presents one event per interrupt (the next once the previous one is acked),
so each ack services one event or none."""

from __future__ import annotations

import select
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from eoid.control import ControlClient
from eoid.testing import FakeSystemd
from tests.helpers import Env, environment, wait_until
from tests.integration.test_restart import Supervised
from tests.kvm.consumer import KvmGuest

KERNEL = "datapath: kernel\n"


@pytest.fixture
def guest_env(request: pytest.FixtureRequest) -> Iterator[tuple[Env, KvmGuest]]:
    """A sim (no load yet), a daemon with one device (``device_yaml`` from the test's
    ``param``) and the KVM guest attached to it."""
    with environment(devices=1, device_yaml=getattr(request, "param", "")) as env:
        env.start_sim()
        env.start_daemon()
        with KvmGuest(env.control, env.sim_socket, "dev0") as guest:
            wait_until(lambda: env.device("dev0")["consumer"] is not None, 5, "attached")
            yield env, guest
            guest.vm.check()


def load(env: Env, rate: float, seconds: float = 0,
         during: Callable[[], None] | None = None) -> None:
    """``rate`` events a second for ``seconds`` (``during()`` called meanwhile), then stop
    and wait until every event raised was serviced and the line is idle."""
    env.sim("set", line="dev0", rate=rate)
    if during is not None:
        during()
    else:
        time.sleep(seconds)
    env.sim("quiesce")

    def settled() -> bool:
        line = env.sim("stats")["lines"]["dev0"]
        return bool(line["acked"] == line["raised"] and not line["masked"]
                    and not line["pending"] and not line["queued"])
    wait_until(settled, 15, "every device event serviced")


def reconcile(env: Env, guest: KvmGuest, resample_at: str) -> dict[str, Any]:
    """What holds on any KVM; returns the figures, and prints them."""
    line = env.sim("stats")["lines"]["dev0"]
    wait_until(lambda: counter(env, "eoid_kernel_interrupts_total") == line["kernel_fires"],
               5, "the host's count of the kernel path caught up")
    samples = env.scrape()
    key = (("device", "dev0"),)
    relayed = samples["eoid_interrupts_total"][key]
    figures = {"resample_at": resample_at, "events": line["raised"], "fires": line["fires"],
               "relayed": relayed, "kernel": line["kernel_fires"], "runs": guest.runs,
               "idle_runs": guest.idle_runs,
               "forwards": samples["eoid_forwards_total"][key],
               "eois": samples["eoid_eois_total"][key],
               "spurious": samples["eoid_spurious_eois_total"][key]}
    print(figures)
    # every device event serviced, each exactly once, by the guest's handler
    assert line["raised"] > 0
    assert line["raised"] == line["acked"] == guest.serviced, figures
    assert guest.max_handled == 1
    # every handler run reached the VMM (the guest's own count), each serviced one or none
    assert guest.runs == guest.vm.handled == guest.serviced + guest.idle_runs
    # every fire went to eoid's trigger or straight to the guest's irqfd
    assert relayed + line["kernel_fires"] == line["fires"], figures
    assert samples["eoid_eoi_timeouts_total"][key] == 0
    # each run was injected by a fire; KVM merges a fire only while the GSI is raised
    assert guest.runs <= line["fires"], figures
    if resample_at == "eoi":  # the GSI is lowered at EOI: nothing is injected twice
        assert guest.idle_runs == 0, figures
    return figures


def counter(env: Env, name: str) -> float:
    return env.scrape()[name].get((("device", "dev0"),), 0.0)


def test_on_the_relay_the_guest_services_every_event(
        guest_env: tuple[Env, KvmGuest], resample_at: str) -> None:
    env, guest = guest_env
    assert env.device("dev0")["datapath"] == "relay"
    load(env, rate=400, seconds=1.5)
    figures = reconcile(env, guest, resample_at)
    # one interrupt, one forward, one injection, one resample: nothing merged or lost
    assert figures["relayed"] == figures["fires"] == figures["forwards"] == figures["runs"]
    assert figures["eois"] == figures["forwards"] and figures["spurious"] == 0
    assert figures["kernel"] == 0
    samples = env.scrape()
    assert samples["eoid_interrupt_service_seconds_count"][(("device", "dev0"),)] \
        == figures["eois"]


@pytest.mark.parametrize("guest_env", [KERNEL], indirect=True)
def test_on_the_kernel_path_the_guest_services_every_event_without_eoid(
        guest_env: tuple[Env, KvmGuest], resample_at: str) -> None:
    env, guest = guest_env
    wait_until(lambda: env.device("dev0")["datapath"] == "kernel", 5, "the kernel path")
    load(env, rate=400, seconds=1.5)
    figures = reconcile(env, guest, resample_at)
    assert figures["relayed"] == figures["forwards"] == figures["eois"] == 0
    assert figures["kernel"] == figures["fires"] == figures["runs"]
    line = env.sim("stats")["lines"]["dev0"]
    assert line["virqfd_unmasks"] == figures["runs"]  # each resample unmasked, in the kernel


@pytest.mark.parametrize("guest_env", [KERNEL + "observe: {every: 1s, for: 250ms}\n"],
                         indirect=True)
def test_sampled_observation_relays_windows_underneath_the_guest(
        guest_env: tuple[Env, KvmGuest], resample_at: str) -> None:
    env, guest = guest_env
    load(env, rate=400, seconds=3.2)
    device = env.device("dev0")
    assert device["observations"] >= 2, device
    figures = reconcile(env, guest, resample_at)
    assert figures["relayed"] > 0 and figures["kernel"] > figures["relayed"]
    assert env.scrape()["eoid_interrupt_service_seconds_count"][(("device", "dev0"),)] > 0


def test_datapath_and_observe_commands_move_the_guests_device_under_load(
        guest_env: tuple[Env, KvmGuest], resample_at: str) -> None:
    """As an operator would, with the eoid commands, while the guest takes interrupts."""
    env, guest = guest_env

    def operate() -> None:
        time.sleep(0.3)
        done = env.command("datapath", "dev0", "kernel")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: env.device("dev0")["datapath"] == "kernel", 5, "the kernel path")
        time.sleep(0.3)
        done = env.command("observe", "dev0", "--for", "300ms")
        assert done.returncode == 0, done.stderr
        assert "observing" in done.stdout
        wait_until(lambda: env.device("dev0")["observations"] == 1
                   and env.device("dev0")["datapath"] == "kernel", 5, "observation ended")
        time.sleep(0.3)
        done = env.command("datapath", "dev0", "configured")
        assert done.returncode == 0, done.stderr
        wait_until(lambda: env.device("dev0")["datapath"] == "relay", 5, "the relay")
        time.sleep(0.3)
    load(env, rate=400, during=operate)
    assert env.device("dev0")["observations"] == 1
    figures = reconcile(env, guest, resample_at)
    assert 0 < figures["kernel"] < figures["fires"]


def test_switching_every_few_milliseconds_under_the_guest_loses_nothing(
        guest_env: tuple[Env, KvmGuest], resample_at: str) -> None:
    """The datapath flipped every 3 ms, with 10 ms observation windows across it, while
    the guest services a steady load."""
    env, guest = guest_env
    switches = 0

    def flip() -> None:
        nonlocal switches
        deadline = time.monotonic() + 2.5
        with ControlClient(env.control) as client:
            while time.monotonic() < deadline:
                client.request("datapath", device="dev0",
                               datapath=("relay", "kernel")[switches % 2])
                if switches % 10 == 5:
                    client.request("observe", device="dev0", seconds=0.01)
                switches += 1
                time.sleep(0.003)
            client.request("datapath", device="dev0", datapath="configured")
    load(env, rate=400, during=flip)
    assert switches > 100
    figures = reconcile(env, guest, resample_at)
    assert 0 < figures["kernel"] < figures["fires"]


@pytest.mark.parametrize("guest_env", ["", KERNEL], indirect=True, ids=["relay", "kernel"])
def test_a_vm_that_dies_with_an_interrupt_in_flight_leaves_it_to_the_next_vm(
        guest_env: tuple[Env, KvmGuest], resample_at: str) -> None:
    """A frozen guest (its vCPU stopped: KVM raises the GSI but injects nothing, so no
    resample comes on any KVM) whose VMM then dies: KVM releases the irqfd without a
    word (§13.5), eoid holds the interrupt, line masked, and the next VM services it."""
    env, guest = guest_env
    path = env.device("dev0")["datapath_wanted"]
    wait_until(lambda: env.device("dev0")["datapath"] == path, 5, path)
    guest.vm.stop()
    env.sim("raise", line="dev0")
    wait_until(lambda: env.sim("stats")["lines"]["dev0"]["fires"] == 1, 5, "fired")
    time.sleep(0.1)
    assert env.sim("stats")["lines"]["dev0"]["masked"]  # no resample: nobody unmasked it
    guest.kill()
    wait_until(lambda: env.device("dev0")["state"] == "held", 5, "held for the next VM")
    with KvmGuest(env.control, env.sim_socket, "dev0") as successor:
        wait_until(lambda: successor.serviced == 1, 5, "serviced by the next VM")
        wait_until(lambda: not env.sim("stats")["lines"]["dev0"]["masked"], 5, "unmasked")
        wait_until(lambda: env.device("dev0")["datapath"] == path, 5, f"{path} again")
        line = env.sim("stats")["lines"]["dev0"]
        assert (line["raised"], line["acked"], guest.runs) == (1, 1, 0)
        assert successor.max_handled == 1
        if resample_at == "eoi":
            assert successor.runs == 1
        successor.vm.check()


REDELIVER = "policy: {eoi_timeout: 100ms, on_eoi_timeout: redeliver}\n"


@pytest.mark.parametrize("guest_env", [REDELIVER], indirect=True)
def test_redeliver_gives_a_kvm_guest_nothing_while_its_gsi_is_raised(
        guest_env: tuple[Env, KvmGuest], resample_at: str) -> None:
    """README, "KVM consumers": each redelivery signals the irqfd of a GSI that KVM holds
    raised (the frozen guest has not taken the interrupt), which injects nothing more."""
    env, guest = guest_env
    guest.vm.stop()
    env.sim("raise", line="dev0")
    wait_until(lambda: counter(env, "eoid_eoi_timeouts_total") >= 3, 5, "three redeliveries")
    guest.vm.start()
    wait_until(lambda: guest.serviced == 1, 5, "serviced")
    time.sleep(0.1)
    line = env.sim("stats")["lines"]["dev0"]
    timeouts = counter(env, "eoid_eoi_timeouts_total")
    assert counter(env, "eoid_forwards_total") == line["fires"] + timeouts
    assert guest.runs == line["fires"]  # one run per fire: the redeliveries merged
    assert (line["raised"], line["acked"]) == (1, 1)


@pytest.mark.parametrize("device_yaml", ["", KERNEL], ids=["relay", "kernel"])
def test_two_devices_sharing_the_guests_gsi_each_have_every_event_serviced(
        device_yaml: str, resample_at: str) -> None:
    """Two devices on one guest GSI share KVM's resampler: each resample signals both
    resamplefds (§13.2), so each device sees EOIs the other's interrupts caused. The
    level semantics keep that harmless: an early unmask of a device that still asserts
    makes it fire again."""
    with environment(devices=2, device_yaml=device_yaml) as env:
        env.start_sim()
        env.start_daemon()
        with KvmGuest(env.control, env.sim_socket, ["dev0", "dev1"]) as guest:
            path = "kernel" if device_yaml else "relay"
            wait_until(lambda: all(d["consumer"] and d["datapath"] == path
                                   for d in env.status()["devices"]), 5, "attached")
            for name in ("dev0", "dev1"):
                env.sim("set", line=name, rate=300)
            time.sleep(1.5)
            env.sim("quiesce")

            def settled() -> bool:
                return all(v["acked"] == v["raised"] and not v["masked"] and not v["pending"]
                           and not v["queued"] for v in env.sim("stats")["lines"].values())
            wait_until(settled, 15, "every device event serviced")
            lines = env.sim("stats")["lines"]
            samples = env.scrape()
            print({"resample_at": resample_at, "runs": guest.runs, "idle": guest.idle_runs,
                   **{n: {k: v[k] for k in ("raised", "fires", "kernel_fires")}
                      for n, v in lines.items()},
                   "spurious": {n: samples["eoid_spurious_eois_total"][(("device", n),)]
                                for n in lines}})
            for name, line in lines.items():
                key = (("device", name),)
                assert line["raised"] > 0
                assert line["raised"] == line["acked"] == guest.serviced_by[name], name
                assert samples["eoid_interrupts_total"][key] + line["kernel_fires"] \
                    == line["fires"], name
                assert samples["eoid_eoi_timeouts_total"][key] == 0
            assert guest.max_handled == 1
            assert guest.runs == guest.vm.handled
            assert guest.runs <= sum(line["fires"] for line in lines.values())
            guest.vm.check()


@pytest.mark.parametrize("device_yaml", ["", KERNEL], ids=["relay", "kernel"])
def test_the_guest_is_served_across_a_sigkilled_daemon(device_yaml: str) -> None:
    """eoid SIGKILLed under load and restarted with its fd store, the VMM never told (its
    connection and irqfd stay): on the relay the line waits for the successor, on the
    kernel's path the guest goes on with no eoid at all; every event serviced once."""
    with environment(devices=1, device_yaml=device_yaml) as env, FakeSystemd() as systemd:
        env.start_sim()
        daemon = Supervised(env, systemd)
        daemon.start()
        try:
            with KvmGuest(env.control, env.sim_socket, "dev0") as guest:
                path = "kernel" if device_yaml else "relay"
                wait_until(lambda: env.device("dev0")["datapath"] == path, 5, path)

                def kill_and_restart() -> None:
                    time.sleep(0.5)
                    daemon.kill()
                    before = guest.serviced
                    time.sleep(0.5)
                    served_without_eoid = guest.serviced - before
                    if path == "kernel":
                        assert served_without_eoid >= 10
                    else:  # at most the interrupt forwarded before the kill
                        assert served_without_eoid <= 1
                    daemon.start()
                    # the VMM's connection is stored and kept: no EOF, nothing sent to it
                    assert not select.select([guest.consumers[0].client.sock], [], [], 0)[0]
                    wait_until(lambda: env.device("dev0")["datapath"] == path, 5, path)
                    time.sleep(0.5)
                load(env, rate=300, during=kill_and_restart)
                line = env.sim("stats")["lines"]["dev0"]
                assert line["raised"] == line["acked"] == guest.serviced > 300
                assert guest.max_handled == 1
                assert guest.runs == guest.vm.handled <= line["fires"]
                assert env.device("dev0")["consumer"] is not None  # the same connection
                guest.vm.check()
        finally:
            daemon.stop()


def test_an_interrupt_can_end_at_the_guests_unmask_without_reaching_its_handler(
        pending_unmask: str, resample_at: str) -> None:
    """README, "KVM consumers": forwarded while the guest's pin is masked, the interrupt
    ends when the guest unmasks it, with a resample and no handler run (on kernels with
    KVM's 2023 change, §13.4); eoid takes it for an EOI and unmasks, and the device, still
    asserting, fires again and reaches the handler. ``eoid_interrupts_total`` counts both
    fires for the one event."""
    with environment(devices=1) as env:
        env.start_sim()
        env.start_daemon()
        with KvmGuest(env.control, env.sim_socket, "dev0", boot=False) as guest:
            wait_until(lambda: env.device("dev0")["consumer"] is not None, 5, "attached")
            env.sim("raise", line="dev0")
            wait_until(lambda: counter(env, "eoid_forwards_total") == 1, 5, "forwarded")
            guest.vm.start()
            wait_until(lambda: guest.serviced == 1, 5, "serviced")
            wait_until(lambda: not env.sim("stats")["lines"]["dev0"]["masked"], 5, "unmasked")
            time.sleep(0.05)
            line = env.sim("stats")["lines"]["dev0"]
            fires, runs = line["fires"], guest.runs
            print({"pending_unmask": pending_unmask, "resample_at": resample_at,
                   "fires": fires, "runs": runs})
            assert (line["raised"], line["acked"]) == (1, 1)
            assert counter(env, "eoid_interrupts_total") == fires
            assert counter(env, "eoid_eois_total") == fires  # one resample a fire
            # each fire ran the handler once, but the one that ended at the unmask
            assert runs == fires - (pending_unmask == "resample")
            if resample_at == "eoi":
                assert fires == 1 + (pending_unmask == "resample")
            guest.vm.check()
