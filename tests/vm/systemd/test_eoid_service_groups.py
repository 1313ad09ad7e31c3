"""Who may attach, under the shipped unit: supplementary groups come from the kernel.

eoid.service has ``ProtectProc=invisible`` and no ``CAP_SYS_PTRACE``: the daemon cannot
read another user's ``/proc/PID/status``, so a consumer allowed only through a
supplementary group is recognised only through ``SO_PEERGROUPS`` (issue 9, finding 5).
Run by tests/vm/run-systemd-tests inside a QEMU guest (see conftest.py).
"""

from __future__ import annotations

import grp
import os

import pytest

from eoid.control import ControlClient
from eoid.errors import ProtocolError
from tests.vm.systemd.conftest import CONTROL, Guest, run, wait_until

pytestmark = pytest.mark.systemd

NOBODY = 65534
VMM_GROUP = "eoid-test-vmm"
DEVICE = "grp0"


def attach_as(device: str, groups: list[int]) -> str:
    """Attach from a live child running as uid/gid 65534 with ``groups`` as its
    supplementary groups; what happened: ``attached:irq,eoi`` or an error code."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        result = "error"
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with ControlClient(CONTROL, timeout=30) as client:
                reply, fds = client.request("attach", device=device)
                result = "attached:" + ",".join(reply["fds"])
                for fd in fds:
                    os.close(fd)
        except ProtocolError as e:
            result = e.code
        except BaseException as e:
            result = f"error: {e!r}"
        finally:
            os.write(w, result.encode())
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        return f.read()


def test_a_consumer_allowed_only_through_a_supplementary_group_attaches(
        running: Guest) -> None:
    run("groupadd", "-f", VMM_GROUP)
    vmm = grp.getgrnam(VMM_GROUP).gr_gid
    cursor = running.eoid.cursor()
    # A device for this test alone (the sim's guests hold the others); its line is not
    # served, so it stays down, which does not matter to who may attach.
    running.write_config(**{DEVICE: 'pci_address: "0000:00:1f.0"\nbackend: {type: sim}\n'
                            f"consumers: {{gids: [{VMM_GROUP}]}}\n"})
    try:
        running.eoid.systemctl("reload")
        wait_until(lambda: "configuration reloaded" in running.eoid.journal(cursor), 60,
                   "the reload applied")
        # Both reach the socket through group eoid (root:eoid 0660 in root:eoid 0750);
        # only the first is in the device's consumers, and only as a supplementary group.
        assert attach_as(DEVICE, [running.eoid_gid]) == "forbidden"
        assert attach_as(DEVICE, [running.eoid_gid, vmm]) == "attached:irq,eoi"
        journal = running.eoid.journal(cursor)
        refused = [line for line in journal.splitlines() if "control request refused" in line]
        assert refused and '"uid": 65534' in refused[0] and '"gid": 65534' in refused[0], \
            journal[-3000:]
    finally:
        running.write_config()
        running.eoid.systemctl("reload")
