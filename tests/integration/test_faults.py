"""Faults are states: a device that reported an error, or whose interrupt has been held with
no consumer for too long, says so in ``eoid status``, its JSON and ``eoid_device_state``
for as long as it lasts, and ``eoid reset`` (or, for a fault, a reload) recovers it."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from eoid.control import ControlClient
from eoid.errors import ProtocolError
from eoid.wire import recv_msg
from tests.helpers import Consumer, Env, environment, wait_until

QUIET = 0.3


@pytest.fixture
def env() -> Iterator[Env]:
    with environment(devices=2, device_yaml="policy: {held_timeout: 1s}\n") as e:
        e.start_sim()
        e.start_daemon()
        yield e


def state_gauge(env: Env, device: str) -> str:
    """The one state ``eoid_device_state`` says the device is in."""
    states = [dict(k)["state"] for k, v in env.scrape()["eoid_device_state"].items()
              if dict(k)["device"] == device and v == 1]
    assert len(states) == 1, states
    return states[0]


def fault(env: Env, vm: Consumer, device: str) -> None:
    env.sim("error", line=device)  # as vfio-pci's AER error eventfd does
    wait_until(lambda: env.device(device)["state"] == "faulted", what="faulted")
    msg = recv_msg(vm.client.sock)
    assert msg is not None and msg[0]["event"] == "device_error"


def test_a_device_error_is_a_state_until_reset(env: Env) -> None:
    with Consumer(env.control, "dev0") as vm:
        fault(env, vm, "dev0")
        status = env.device("dev0")
        assert status["faulted"] and not status["up"]
        assert state_gauge(env, "dev0") == "faulted"
        assert env.scrape()["eoid_device_up"][(("device", "dev0"),)] == 0
        assert env.scrape()["eoid_device_up"][(("device", "dev1"),)] == 1
        assert state_gauge(env, "dev1") == "armed"
        text = env.command("status")
        assert text.returncode == 1, text
        assert "faulted" in text.stdout
        # while faulted, an EOI does not unmask the line (and is no unmask error)
        env.sim("raise", line="dev0")
        assert vm.wait_irq() == 1
        unmasks = env.sim("stats")["lines"]["dev0"]["unmasks"]
        vm.send_eoi()
        wait_until(lambda: env.device("dev0")["counters"]["eois"] == 1, what="EOI read")
        assert env.sim("stats")["lines"]["dev0"]["unmasks"] == unmasks
        assert env.device("dev0")["counters"]["errors"]["unmask"] == 0
        assert env.device("dev0")["state"] == "faulted"  # it lasts
        # eoid reset: reopened, armed, the same consumer's eventfds work again
        env.sim("ack", line="dev0")  # (a line still asserted would fire again at once)
        result = env.command("reset", "dev0")
        assert result.returncode == 0, result.stderr
        assert env.device("dev0")["state"] == "armed" and env.device("dev0")["up"]
        assert state_gauge(env, "dev0") == "armed"
        assert env.scrape()["eoid_device_up"][(("device", "dev0"),)] == 1
        env.sim("raise", line="dev0")
        assert vm.wait_irq() == 1
        vm.send_eoi()
        wait_until(lambda: env.sim("stats")["lines"]["dev0"]["unmasks"] > unmasks,
                   what="unmasked after the reset")
        assert env.command("status").returncode == 0


def test_a_reload_reopens_a_faulted_device(env: Env) -> None:
    with Consumer(env.control, "dev1") as vm:
        fault(env, vm, "dev1")
        env.procs[-1].send_signal(signal.SIGHUP)
        wait_until(lambda: env.device("dev1")["state"] == "armed", what="reopened by reload")
        assert env.device("dev1")["up"] and not env.device("dev1")["faulted"]
        env.sim("raise", line="dev1")
        assert vm.wait_irq() == 1


def test_an_interrupt_held_with_no_consumer_too_long_is_abandoned(env: Env) -> None:
    env.sim("raise", line="dev0")
    wait_until(lambda: env.device("dev0")["state"] == "held", what="held")
    assert state_gauge(env, "dev0") == "held"  # held for a moment is normal
    wait_until(lambda: env.device("dev0")["state"] == "abandoned", what="abandoned")
    assert state_gauge(env, "dev0") == "abandoned"
    assert env.scrape()["eoid_device_up"][(("device", "dev0"),)] == 1  # open, only unclaimed
    result = env.command("status")
    assert result.returncode == 1 and "abandoned" in result.stdout
    # a consumer that attaches gets the interrupt, as ever
    with Consumer(env.control, "dev0") as vm:
        assert vm.wait_irq() == 1
        assert env.device("dev0")["state"] == "pending"


def test_reset_drops_an_abandoned_interrupt(env: Env) -> None:
    env.sim("raise", line="dev1")
    wait_until(lambda: env.device("dev1")["state"] == "abandoned", what="abandoned")
    env.sim("ack", line="dev1")  # the device no longer asserts: a reset loses nothing
    assert env.command("reset", "dev1").returncode == 0
    assert env.device("dev1")["state"] == "armed"
    with Consumer(env.control, "dev1") as vm:
        assert vm.wait_irq(QUIET) == 0


def test_a_reload_recovers_an_abandoned_device(env: Env) -> None:
    """As a fault: the device is reopened, so the interrupt held for nobody is dropped (a
    line still asserted fires again once armed, and is held again for the next consumer)."""
    env.sim("raise", line="dev1")
    wait_until(lambda: env.device("dev1")["state"] == "abandoned", what="abandoned")
    env.procs[-1].send_signal(signal.SIGHUP)
    wait_until(lambda: env.device("dev1")["state"] == "held", what="reopened by reload")
    assert env.device("dev0")["state"] == "armed"  # the others are not touched
    env.sim("ack", line="dev1")
    with Consumer(env.control, "dev1") as vm:
        assert vm.wait_irq() == 1  # the one the device still asserted, delivered
        vm.send_eoi()
        wait_until(lambda: env.device("dev1")["state"] == "armed", what="armed")
    assert env.command("status").returncode == 0


def test_reset_of_an_unknown_device_is_refused(env: Env) -> None:
    with ControlClient(env.control) as client, pytest.raises(ProtocolError) as err:
        client.request("reset", device="nope")
    assert err.value.code == "unknown_device"
    result = env.command("reset", "nope")
    assert result.returncode == 1 and "nope" in result.stderr
