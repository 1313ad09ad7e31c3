"""The two datapaths (README, "Two datapaths"): a device on the kernel's path, moved between
it and the relay live (``eoid datapath``, ``eoid observe``, reload, sampled observation),
with the sim process playing the kernel's virqfd. Real daemon, sim and eventfds."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from eoid.control import ControlClient
from eoid.errors import ProtocolError
from tests.helpers import Consumer, Env, environment, wait_until

KERNEL = "datapath: kernel\n"


@pytest.fixture
def env() -> Iterator[Env]:
    with environment(devices=2) as e:
        e.start_sim()
        e.start_daemon()
        yield e


def counter(env: Env, name: str, device: str) -> float:
    return env.scrape()[name].get((("device", device),), 0.0)


def round_trips(env: Env, vm: Consumer, line: str, n: int) -> None:
    """``n`` device events, each serviced by ``vm`` as a driver would: ack, then EOI."""
    for _ in range(n):
        env.sim("raise", line=line)
        assert vm.wait_irq() == 1
        env.sim("ack", line=line)
        vm.send_eoi()


def test_kernel_path_carries_every_interrupt_without_eoid() -> None:
    with environment(devices=1, device_yaml=KERNEL) as env:
        env.start_sim()
        env.start_daemon()
        assert env.device("dev0")["datapath"] == "relay"  # no consumer: held on the relay
        with Consumer(env.control, "dev0") as vm:
            wait_until(lambda: env.device("dev0")["datapath"] == "kernel", what="kernel path")
            assert env.device("dev0")["state"] == "kernel"
            round_trips(env, vm, "dev0", 30)
            wait_until(lambda: env.sim("stats")["lines"]["dev0"]["virqfd_unmasks"] == 30,
                       what="the sim's virqfd unmasked each")
            line = env.sim("stats")["lines"]["dev0"]
            assert (line["fires"], line["kernel_fires"], line["acked"]) == (30, 30, 30)
            assert not line["masked"]
            # eoid saw none of them, yet counts them from the host's side
            assert counter(env, "eoid_interrupts_total", "dev0") == 0
            assert counter(env, "eoid_forwards_total", "dev0") == 0
            wait_until(lambda: counter(env, "eoid_kernel_interrupts_total", "dev0") == 30,
                       what="kernel interrupts counted")
            states = env.scrape()["eoid_device_state"]
            assert states == {(("device", "dev0"), ("state", "kernel")): 1}


def test_datapath_and_observe_commands_move_a_live_device(env: Env) -> None:
    with Consumer(env.control, "dev0") as vm:
        moved = env.command("datapath", "dev0", "kernel")
        assert moved.returncode == 0, moved.stderr
        assert "on the kernel path" in moved.stdout
        round_trips(env, vm, "dev0", 5)
        assert counter(env, "eoid_interrupts_total", "dev0") == 0

        watched = env.command("observe", "dev0", "--for", "1s")
        assert watched.returncode == 0, watched.stderr
        assert "observing" in watched.stdout
        # (the reply may come before the sim has applied the switch: "moving to")
        wait_until(lambda: env.device("dev0")["datapath"] == "relay", 5, "on the relay")
        round_trips(env, vm, "dev0", 5)  # relayed, timed
        assert counter(env, "eoid_interrupts_total", "dev0") == 5
        assert env.scrape()["eoid_interrupt_service_seconds_count"][(("device", "dev0"),)] == 5
        wait_until(lambda: env.device("dev0")["datapath"] == "kernel", 5, "back after 1s")
        assert env.device("dev0")["observations"] == 1
        round_trips(env, vm, "dev0", 5)
        assert counter(env, "eoid_interrupts_total", "dev0") == 5

        assert env.command("datapath", "dev0", "configured").returncode == 0
        assert env.device("dev0")["datapath"] == "relay"
        round_trips(env, vm, "dev0", 5)
        assert counter(env, "eoid_interrupts_total", "dev0") == 10
    line = env.sim("stats")["lines"]["dev0"]
    assert (line["raised"], line["acked"], line["fires"], line["kernel_fires"]) == (20, 20, 20, 10)


def test_a_reload_switches_the_datapath_and_ends_an_override(env: Env) -> None:
    with Consumer(env.control, "dev0") as vm:
        env.write_device("dev0", KERNEL)
        assert env.command("reload").returncode == 0
        assert env.device("dev0")["datapath"] == "kernel"
        round_trips(env, vm, "dev0", 3)
        assert env.command("datapath", "dev0", "relay").returncode == 0
        assert env.device("dev0")["datapath"] == "relay"
        assert env.command("reload").returncode == 0  # the override holds until a reload
        assert env.device("dev0")["datapath"] == "kernel"
        env.write_device("dev0", "")
        assert env.command("reload").returncode == 0
        assert env.device("dev0")["datapath"] == "relay"
        round_trips(env, vm, "dev0", 3)
    line = env.sim("stats")["lines"]["dev0"]
    assert (line["acked"], line["kernel_fires"]) == (6, 3)


def test_a_consumer_that_leaves_on_the_kernel_path_leaves_its_interrupt_held() -> None:
    with environment(devices=1, device_yaml=KERNEL) as env:
        env.start_sim()
        env.start_daemon()
        with Consumer(env.control, "dev0") as vm:
            wait_until(lambda: env.device("dev0")["datapath"] == "kernel", what="kernel path")
            env.sim("raise", line="dev0")
            assert vm.wait_irq() == 1  # taken, never serviced: the line stays masked
        wait_until(lambda: env.device("dev0")["state"] == "held", what="held for the next")
        with Consumer(env.control, "dev0") as vm:
            assert vm.wait_irq() == 1  # delivered to the next consumer
            env.sim("ack", line="dev0")
            vm.send_eoi()
            wait_until(lambda: env.device("dev0")["datapath"] == "kernel", what="kernel again")
            round_trips(env, vm, "dev0", 3)
        line = env.sim("stats")["lines"]["dev0"]
        assert (line["raised"], line["acked"]) == (4, 4)


def test_a_device_error_takes_the_line_off_the_kernel_path() -> None:
    with environment(devices=1, device_yaml=KERNEL) as env:
        env.start_sim()
        env.start_daemon()
        with Consumer(env.control, "dev0") as vm:
            wait_until(lambda: env.device("dev0")["datapath"] == "kernel", what="kernel path")
            env.sim("error", line="dev0")
            wait_until(lambda: env.device("dev0")["state"] == "faulted", what="faulted")
            assert env.device("dev0")["datapath"] == "relay"
            env.sim("raise", line="dev0")
            assert vm.wait_irq() == 1
            env.sim("raise", line="dev0")
            vm.send_eoi()  # not serviced: a faulted line is not unmasked by anyone
            assert vm.wait_irq(0.3) == 0
            assert env.sim("stats")["lines"]["dev0"]["masked"]


def test_bad_datapath_requests_are_refused(env: Env) -> None:
    with ControlClient(env.control) as client:
        for fields in ({"datapath": "fast"}, {"datapath": 1}, {}):
            with pytest.raises(ProtocolError) as e:
                client.request("datapath", device="dev0", **fields)
            assert e.value.code == "bad_request"
        for seconds in (0, 0.001, 3601, 1e308, 10**400, "1s", True, None, -1, [1]):
            with pytest.raises(ProtocolError) as e:
                client.request("observe", device="dev0", seconds=seconds)
            assert e.value.code == "bad_request"
        with pytest.raises(ProtocolError) as e:
            client.request("datapath", device="nope", datapath="kernel")
        assert e.value.code == "unknown_device"
        assert client.request("status")[0]["devices"][0]["datapath"] == "relay"
    bad = env.command("observe", "dev0", "--for", "soon")
    assert bad.returncode == 2 and "--for" in bad.stderr


def _sim_with_guests(env: Env, rate: float) -> None:
    proc = env.eoid("sim", "-c", str(env.config), "--rate", str(rate), "--service-time",
                    "20us", log="sim.log")
    from eoid.control import wait_for_socket
    assert wait_for_socket(env.sim_socket, 20, lambda: proc.poll() is None), env.log("sim")


def _quiesced(env: Env) -> dict[str, Any]:
    """Stop the load and wait until every event raised was serviced."""
    env.sim("quiesce")

    def settled() -> bool:
        lines = env.sim("stats")["lines"]
        return all(v["acked"] == v["raised"] and not v["masked"] and not v["pending"]
                   for v in lines.values())
    try:
        wait_until(settled, 15, "every device event serviced")
    except AssertionError:  # which line stopped where, on both sides
        print(json.dumps({"sim": env.sim("stats")["lines"],
                          "eoid": env.status()["devices"]}, indent=1))
        raise
    return env.sim("stats")["lines"]  # type: ignore[no-any-return]


def _reconcile(env: Env, lines: dict[str, Any]) -> None:
    """Every fire went to eoid's trigger or straight to the consumer, and the consumer got
    each: what eoid counted and what the kernel's path carried add up, exactly."""
    samples = env.scrape()
    for name, line in lines.items():
        key = (("device", name),)
        guest = line["guest"]
        assert line["raised"] > 0
        assert guest["handled"] == line["raised"] == line["acked"], (name, line)
        relayed = samples["eoid_interrupts_total"][key]
        assert relayed + line["kernel_fires"] == line["fires"], (name, relayed, line)
        forwards = samples["eoid_forwards_total"][key]
        assert guest["irqs"] == forwards + line["kernel_fires"], (name, forwards, line)
        assert samples["eoid_eoi_timeouts_total"][key] == 0


def _on_the_kernel_path_under_load(env: Env, rate: float) -> None:
    _sim_with_guests(env, rate)
    env.start_daemon()
    wait_until(lambda: all(d["datapath"] == "kernel" for d in env.status()["devices"]),
               20, "guests attached, devices on the kernel path")


def _switching(env: Env, seconds: float, period: float,
               switch: Callable[[ControlClient, int], None]) -> int:
    """Call ``switch(client, round)`` every ``period`` for ``seconds`` from a thread of its
    own (as an operator's commands come); the rounds made."""
    stop = threading.Event()
    rounds = [0]

    def run() -> None:
        with ControlClient(env.control) as client:
            while not stop.is_set():
                switch(client, rounds[0])
                rounds[0] += 1
                time.sleep(period)
    switcher = threading.Thread(target=run)
    switcher.start()
    time.sleep(seconds)
    stop.set()
    switcher.join()
    return rounds[0]


def _settled_and_reconciled(env: Env) -> dict[str, Any]:
    """Quiesce, wait for eoid's counts of the kernel's path, reconcile; the sim's lines."""
    lines = _quiesced(env)
    wait_until(lambda: all(counter(env, "eoid_kernel_interrupts_total", n)
                           == lines[n]["kernel_fires"] for n in lines), 5,
               "the host's counts caught up")
    _reconcile(env, lines)
    return lines


def test_switching_back_and_forth_under_load_loses_nothing() -> None:
    """Four devices under load, each moved between the paths every few milliseconds
    (and observation windows opened across them) while guests service every event."""
    with environment(devices=4, device_yaml=KERNEL) as env:
        _on_the_kernel_path_under_load(env, rate=1000)

        def flip(client: ControlClient, round_: int) -> None:
            for i in range(4):
                client.request("datapath", device=f"dev{i}",
                               datapath=("relay", "kernel")[(round_ + i) % 2])
            if round_ % 10 == 0:
                client.request("observe", device="dev0", seconds=0.01)
        assert _switching(env, 3, 0.003, flip) > 100
        with ControlClient(env.control) as client:
            for i in range(4):
                client.request("datapath", device=f"dev{i}", datapath="configured")
        lines = _settled_and_reconciled(env)
        assert all(0 < v["kernel_fires"] < v["fires"] for v in lines.values())


def test_sampled_observation_relays_a_window_each_period() -> None:
    with environment(devices=2, device_yaml=KERNEL + "observe: {every: 1s, for: 200ms}\n") \
            as env:
        _sim_with_guests(env, rate=500)
        env.start_daemon()
        time.sleep(3.5)
        status = {d["name"]: d for d in env.status()["devices"]}
        for d in status.values():
            assert d["observations"] >= 2, d
            assert d["datapath_wanted"] == "kernel"
        lines = _settled_and_reconciled(env)
        samples = env.scrape()
        for name in lines:
            key = (("device", name),)
            relayed = samples["eoid_interrupts_total"][key]
            assert relayed > 0 and lines[name]["kernel_fires"] > relayed  # ~20 % observed
            assert samples["eoid_interrupt_service_seconds_count"][key] > 0


def test_switching_under_saturating_load_strands_no_line() -> None:
    """Lines that fire again as soon as they are unmasked (a guest with a short service
    time at a rate it cannot keep up with) switched every few milliseconds: a fire or an
    EOI always lands just as a switch is made. Reading the eventfds before the sim had
    applied the route back to the relay let one go by on the old route: a line left
    masked, its EOI counted spurious (found by the benchmark's closed-loop observation)."""
    with environment(devices=8, device_yaml=KERNEL) as env:
        _on_the_kernel_path_under_load(env, rate=2000)

        def observe_all(client: ControlClient, _: int) -> None:
            for i in range(8):
                client.request("observe", device=f"dev{i}", seconds=0.01)
        assert _switching(env, 3, 0.02, observe_all) > 20
        time.sleep(0.1)  # the last windows end
        lines = _settled_and_reconciled(env)
        samples = env.scrape()
        for name in lines:
            assert samples["eoid_spurious_eois_total"][(("device", name),)] == 0, name
