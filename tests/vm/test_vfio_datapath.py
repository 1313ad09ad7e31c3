"""The real daemon moving real vfio-pci devices between the relay and the kernel's path.

One ``eoid run`` for the module with two edu devices on ``datapath: kernel``, each sharing
its device fd with its consumer, so the test plays the VMM and the guest driver: raise an
edu interrupt, take it from ``irq``, service the device (ack), write ``eoi``. The switching
test follows tests/integration/test_datapath.py's, on the real driver: every device event
must be delivered exactly once whatever path the line is on when it fires.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from eoid.control import ControlClient
from eoid.vfio import sysfs
from eoid.vfio.procirq import IrqCounter
from tests.helpers import Consumer, Env, environment, wait_until
from tests.vm.daemon import serving
from tests.vm.edu import EduLine

pytestmark = pytest.mark.vfio

WAIT = 5.0
QUIET = 0.3
# no timeout may act in a scenario; the storm policy must not throttle a busy test loop
POLICY = "policy: {eoi_timeout: 60s, storm: {max_rate: 1000000, burst: 1000000}}\n"
NAMES = ("edu0", "edu1")


@pytest.fixture(scope="module", params=["1", "0"], ids=["fastpath", "python"])
def daemon(edus: list[str], request: pytest.FixtureRequest) -> Iterator[Env]:
    os.environ["EOID_FASTPATH"] = request.param
    with environment(devices=0) as env:
        for name, address in zip(NAMES, edus, strict=False):
            (env.root / "devices.d" / f"{name}.yaml").write_text(
                f"pci_address: '{address}'\nbackend: {{type: vfio, share_device_fd: true}}\n"
                "datapath: kernel\n" + POLICY)
        proc = env.eoid("run", "-c", str(env.config), log="daemon.log")
        with serving(env, proc):
            yield env


def counter(env: Env, metric: str, device: str) -> float:
    return env.scrape()[metric].get((("device", device),), 0.0)


def wait_path(env: Env, device: str, path: str) -> None:
    wait_until(lambda: env.device(device)["datapath"] == path, WAIT * 4, f"{device} {path}")


def test_on_the_kernel_path_eoid_sees_nothing_and_counts_everything(daemon: Env) -> None:
    before = {m: counter(daemon, m, "edu0") for m in
              ("eoid_interrupts_total", "eoid_kernel_interrupts_total")}
    with Consumer(daemon.control, "edu0") as vm:
        wait_path(daemon, "edu0", "kernel")
        edu = EduLine(vm.extra[0])
        for _ in range(50):
            edu.raise_()
            assert vm.wait_irq(WAIT) == 1
            edu.ack()
            vm.send_eoi()
        assert vm.wait_irq(QUIET) == 0
        assert counter(daemon, "eoid_interrupts_total", "edu0") \
            == before["eoid_interrupts_total"]
        wait_until(lambda: counter(daemon, "eoid_kernel_interrupts_total", "edu0")
                   == before["eoid_kernel_interrupts_total"] + 50, WAIT,
                   "the guest's /proc count of the line, 50 more")
        assert daemon.device("edu0")["state"] == "kernel"


@dataclass
class Driver:
    """A guest driver and its VMM in one thread: one device event at a time, each
    serviced once; records what it saw."""

    env: Env
    name: str
    stop: threading.Event
    events: int = 0
    irqs: int = 0
    problems: list[str] = field(default_factory=list)

    def run(self) -> None:
        with Consumer(self.env.control, self.name) as vm:
            edu = EduLine(vm.extra[0])
            while not self.stop.is_set():
                edu.raise_()
                self.events += 1
                got = vm.wait_irq(WAIT)
                self.irqs += got
                if got != 1:
                    self.problems.append(f"event {self.events}: irq count {got}")
                    return
                if edu.status() != 1:
                    self.problems.append(f"event {self.events}: status {edu.status()}")
                    return
                edu.ack()
                vm.send_eoi()
            late = vm.wait_irq(QUIET)  # a duplicate delivery would show here
            self.irqs += late
            if late:
                self.problems.append(f"{late} irq(s) after the last event")


def test_switching_back_and_forth_under_load_loses_nothing(daemon: Env,
                                                          edus: list[str]) -> None:
    """Both devices driven as fast as the guest goes while each is moved between the
    paths every few milliseconds (and observation windows opened across them)."""
    metrics = ("eoid_interrupts_total", "eoid_kernel_interrupts_total", "eoid_forwards_total")
    before = {(m, n): counter(daemon, m, n) for n in NAMES for m in metrics}
    host = IrqCounter(max_age=0)
    irqs = {n: sysfs.read_host_irq(a) or 0 for n, a in zip(NAMES, edus, strict=False)}
    host_before = {n: host.count(irqs[n]) or 0 for n in NAMES}
    stop = threading.Event()
    drivers = [Driver(daemon, name, stop) for name in NAMES]
    threads = [threading.Thread(target=d.run, name=d.name) for d in drivers]
    for t in threads:
        t.start()
    for name in NAMES:
        wait_path(daemon, name, "kernel")
    switches = [0]

    def flip() -> None:
        paths = ("relay", "kernel")
        with ControlClient(daemon.control) as client:
            while not stop.is_set():
                for i, name in enumerate(NAMES):
                    client.request("datapath", device=name,
                                   datapath=paths[(switches[0] + i) % 2])
                if switches[0] % 10 == 0:
                    client.request("observe", device=NAMES[0], seconds=0.01)
                switches[0] += 1
                time.sleep(0.003)

    flipper = threading.Thread(target=flip, name="flip")
    flipper.start()
    time.sleep(6)
    stop.set()
    flipper.join()
    for t in threads:
        t.join(WAIT * 3)
    with ControlClient(daemon.control) as client:
        for name in NAMES:
            client.request("datapath", device=name, datapath="configured")
    assert switches[0] > 50, switches
    report = {}
    for d in drivers:
        assert not d.problems, (d.name, d.problems)
        assert d.events > 50 and d.irqs == d.events, (d.name, d.events, d.irqs)
        delta = {m: counter(daemon, m, d.name) - before[(m, d.name)] for m in metrics}
        relayed, kernel = delta["eoid_interrupts_total"], delta["eoid_kernel_interrupts_total"]
        forwards = delta["eoid_forwards_total"]
        report[d.name] = {"events": d.events, "relayed": relayed, "forwards": forwards,
                          "kernel": kernel, "host": (host.count(irqs[d.name]) or 0)
                          - host_before[d.name]}
        assert relayed > 0 and kernel > 0, (d.name, delta)
        # each event reached the consumer once: from eoid (forwards) or from the kernel
        # (the rest). The host's count during the kernel windows never exceeds that rest;
        # it misses the kernel's re-signals and fires racing a switch (docs/intx-eoi.md
        # §14), and here more than those (an open question, ibid.)
        assert forwards <= d.events
        assert kernel <= d.events - forwards, report[d.name]
        assert relayed + kernel <= d.events, report[d.name]
    print(f"{switches[0]} switches: {report}")
    for name in NAMES:
        assert daemon.device(name)["up"]
