"""Fixtures for the tests that need the real vfio-pci driver (inside the QEMU guest).

They run only through tests/vm/run-vfio-tests, which boots the guest with
EOID_VM=1 and two or more edu devices; anywhere else they are skipped with that
reason. Inside the guest a missing edu or vfio module is a failure, not a skip.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from eoid.vfio.device import open_vfio_device
from tests.vm.edu import Edu, bind_vfio, find_edus

IN_VM = os.environ.get("EOID_VM") == "1"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nointxmask: needs vfio_pci.nointxmask=1 (run-vfio-tests boots a second "
        "guest for these)")
    config.addinivalue_line(
        "markers", "pcie: needs devices behind PCIe root ports and QEMU's monitor (run-vfio-tests "
        "boots a third guest with VM_PCIE and VM_MONITOR for these)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if IN_VM:
        return
    skip = pytest.mark.skip(reason="needs the QEMU guest: run tests/vm/run-vfio-tests")
    here = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("vfio") and here in item.path.parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def edus() -> list[str]:
    """Every edu device, bound to vfio-pci."""
    assert Path("/dev/vfio/vfio").exists(), "no /dev/vfio/vfio: vfio-pci not loaded in the guest"
    found = find_edus()
    assert len(found) >= 2, f"the guest needs two or more edu devices, found {found}"
    for address in found:
        bind_vfio(address)
    return found


@pytest.fixture
def edu(edus: list[str]) -> Iterator[Edu]:
    """The first edu, opened through eoid; closed (and re-bound if needed) afterwards."""
    yield from _opened(edus[0], "edu0")


@pytest.fixture
def edu_b(edus: list[str]) -> Iterator[Edu]:
    yield from _opened(edus[1], "edu1")


SHARED_PAIR = ("0000:00:10.0", "0000:00:14.0")  # q35: INTA# of slots 0x10 and 0x14 → one GSI


@pytest.fixture
def shared_pair(edus: list[str]) -> Iterator[tuple[Edu, Edu]]:
    """Two edus whose INTx lines the host routes to the same IRQ."""
    assert set(SHARED_PAIR) <= set(edus), f"run-vfio-tests puts edu at slots 10 and 14: {edus}"
    first = _opened(SHARED_PAIR[0], "edu0")
    second = _opened(SHARED_PAIR[1], "edu2")
    try:
        yield next(first), next(second)
    finally:
        first.close()
        second.close()


def _opened(address: str, name: str) -> Generator[Edu, None, None]:
    bind_vfio(address)
    device = open_vfio_device(name, address)
    try:
        yield Edu(device)
    finally:
        device.close()
        bind_vfio(address)


@pytest.fixture
def trigger() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)
