"""sd_notify, watchdog and LISTEN_FDS against a real datagram socket and real fds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from eoid.systemd import (
    MAX_FDS_PER_MESSAGE,
    MAX_MESSAGE_BYTES,
    Notifier,
    SystemdError,
    listen_fds,
    monotonic_usec,
    valid_fdname,
    watchdog_interval,
)
from eoid.testing import FakeSystemd, fd_is_open, same_file, same_file_by_fstat


@pytest.fixture
def sd() -> Iterator[FakeSystemd]:
    with FakeSystemd() as fake:
        yield fake


@pytest.fixture
def notifier(sd: FakeSystemd) -> Iterator[Notifier]:
    with Notifier.from_environ(sd.environ()) as n:
        yield n


def eventfd_with(value: int) -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    if value:
        os.eventfd_write(fd, value)
    return fd


# -- Notifier without a service manager ------------------------------------------------


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.address is None
    fd = eventfd_with(1)
    try:
        assert n.ready("x") is False
        assert n.watchdog() is False
        assert n.fdstore("dev", [fd]) is False
        assert n.fdstore_remove("dev") is False
        assert n.barrier() is False
        assert n.send("READY=1", fds=[fd]) is False
    finally:
        os.close(fd)


def test_from_environ_can_hide_the_socket_from_children() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "OTHER": "1"}
    n = Notifier.from_environ(env, unset=True)
    assert n.enabled
    assert n.address == "/run/systemd/notify"
    assert env == {"OTHER": "1"}


@pytest.mark.parametrize("value", ["relative/path", "notify.sock"])
def test_a_notify_socket_that_is_neither_path_nor_abstract_is_rejected(value: str) -> None:
    with pytest.raises(SystemdError, match="NOTIFY_SOCKET"):
        Notifier.from_environ({"NOTIFY_SOCKET": value})


def test_a_vanished_socket_raises_oserror(tmp_path: os.PathLike[str]) -> None:
    with (
        Notifier(os.path.join(tmp_path, "gone.sock")) as n,
        pytest.raises(FileNotFoundError),
    ):
        n.ready()


# -- messages as PID 1 parses them ---------------------------------------------------


def test_ready_with_status_arrives_in_one_datagram_from_our_pid(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    assert notifier.ready("3 devices armed")
    msg = sd.receive()
    assert msg.text == "READY=1\nSTATUS=3 devices armed"
    assert msg.pid == os.getpid()
    assert sd.state == "ready"
    assert sd.status == "3 devices armed"


def test_abstract_socket_names_work() -> None:
    with FakeSystemd(abstract=True) as sd, Notifier.from_environ(sd.environ()) as n:
        assert sd.notify_socket.startswith("@")
        n.status("hello")
        assert sd.receive().fields == {"STATUS": "hello"}


def test_notify_upper_cases_keys_and_writes_booleans_as_digits(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    notifier.notify(ready=True, errno=0)
    assert sd.receive().text == "READY=1\nERRNO=0"


@pytest.mark.parametrize(
    ("fields", "match"),
    [({"STATUS": "two\nlines"}, "single line"), ({"BAD-KEY": "x"}, "field name")],
)
def test_fields_that_would_forge_or_break_the_message_are_refused(
    notifier: Notifier, fields: dict[str, object], match: str
) -> None:
    with pytest.raises(SystemdError, match=match):
        notifier.notify(**fields)


def test_reloading_carries_a_current_monotonic_timestamp(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    before = monotonic_usec()
    notifier.reloading("reloading")
    after = monotonic_usec()
    msg = sd.receive()
    assert msg.get("RELOADING") == "1"
    assert msg.get("STATUS") == "reloading"
    assert before <= int(msg.fields["MONOTONIC_USEC"]) <= after
    assert sd.state == "reloading"
    notifier.ready()
    sd.receive()
    assert sd.state == "ready"


def test_stopping_watchdog_and_extend_timeout(sd: FakeSystemd, notifier: Notifier) -> None:
    notifier.watchdog()
    notifier.watchdog()
    notifier.extend_timeout(2.5)
    notifier.stopping("bye")
    assert [m.text for m in sd.drain()] == [
        "WATCHDOG=1",
        "WATCHDOG=1",
        "EXTEND_TIMEOUT_USEC=2500000",
        "STOPPING=1\nSTATUS=bye",
    ]
    assert sd.watchdog_pings == 2
    assert sd.extend_timeout_usec == 2_500_000
    assert sd.state == "stopping"


def test_messages_pid_1_would_truncate_are_refused(notifier: Notifier) -> None:
    with pytest.raises(SystemdError, match="exceeds"):
        notifier.status("x" * MAX_MESSAGE_BYTES)
    fds = [eventfd_with(0) for _ in range(MAX_FDS_PER_MESSAGE + 1)]
    try:
        with pytest.raises(SystemdError, match="fds in one notification"):
            notifier.send("FDSTORE=1", fds=fds)
    finally:
        for fd in fds:
            os.close(fd)


def test_the_longest_allowed_message_gets_through(sd: FakeSystemd, notifier: Notifier) -> None:
    text = "STATUS=" + "y" * (MAX_MESSAGE_BYTES - len("STATUS="))
    notifier.send(text)
    assert sd.receive().text == text


# -- file descriptor store -------------------------------------------------------------


def test_fdstore_passes_the_same_eventfd_not_a_copy_of_its_value(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    fd = eventfd_with(42)
    try:
        notifier.fdstore("dev0-trigger", [fd])
        msg = sd.receive()
        assert msg.fields == {"FDSTORE": "1", "FDNAME": "dev0-trigger"}
        [stored] = sd.stored("dev0-trigger")
        assert msg.fds == (stored,)
        assert stored != fd
        assert same_file(fd, stored)
        assert os.eventfd_read(stored) == 42  # read through PID 1's duplicate...
        os.eventfd_write(stored, 7)
        assert os.eventfd_read(fd) == 7  # ...and back: one kernel object
    finally:
        os.close(fd)


@pytest.mark.parametrize("check", [same_file, same_file_by_fstat])
def test_same_file_tells_duplicates_from_distinct_eventfds_and_sockets(
    check: Callable[[int, int], bool],
) -> None:
    a, b = eventfd_with(0), eventfd_with(0)
    s1, s2 = socket.socketpair()
    dup = os.dup(a)
    try:
        assert check(a, dup)
        assert not check(a, b)  # both are the one anon inode: fdinfo tells them apart
        assert not check(s1.fileno(), s2.fileno())
        assert not check(a, s1.fileno())
    finally:
        for fd in (a, b, dup):
            os.close(fd)
        s1.close()
        s2.close()


def test_resending_a_stored_fd_is_deduplicated_like_pid_1_does(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    a, b = eventfd_with(1), eventfd_with(2)
    try:
        notifier.fdstore("dev0", [a, b])
        notifier.fdstore("dev0", [a])
        sd.drain()
        assert [name for name, _ in sd.store] == ["dev0", "dev0"]
        assert not same_file(*sd.stored("dev0"))
    finally:
        os.close(a)
        os.close(b)


def test_long_fd_lists_are_split_into_several_datagrams(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    fds = [eventfd_with(i + 1) for i in range(MAX_FDS_PER_MESSAGE + 47)]
    try:
        notifier.fdstore("many", fds)
        msgs = sd.drain()
        assert [m.n_fds for m in msgs] == [MAX_FDS_PER_MESSAGE, 47]
        stored = sd.stored("many")
        assert [os.eventfd_read(fd) for fd in stored] == list(range(1, len(fds) + 1))
    finally:
        for fd in fds:
            os.close(fd)


def test_fdstore_remove_closes_every_fd_of_that_name(sd: FakeSystemd, notifier: Notifier) -> None:
    fds = [eventfd_with(1), eventfd_with(2), eventfd_with(3)]
    try:
        notifier.fdstore("dev0", fds[:2])
        notifier.fdstore("dev1", fds[2:])
        sd.drain()
        doomed = sd.stored("dev0")
        notifier.fdstore_remove("dev0")
        assert sd.receive().fields == {"FDSTOREREMOVE": "1", "FDNAME": "dev0"}
        assert not any(fd_is_open(fd) for fd in doomed)
        assert [name for name, _ in sd.store] == ["dev1"]
    finally:
        for fd in fds:
            os.close(fd)


def test_an_fd_store_that_is_full_drops_the_excess() -> None:
    with FakeSystemd(fdstore_max=1) as small, Notifier(small.notify_socket) as n:
        a, b = eventfd_with(1), eventfd_with(2)
        try:
            n.fdstore("x", [a, b])
            small.receive()
            assert len(small.store) == 1
        finally:
            os.close(a)
            os.close(b)


@pytest.mark.parametrize("name", ["", "a:b", "tab\there", "é", "x" * 256])
def test_names_that_cannot_round_trip_through_listen_fdnames_are_refused(
    notifier: Notifier, name: str
) -> None:
    assert not valid_fdname(name)
    fd = eventfd_with(0)
    try:
        with pytest.raises(SystemdError, match="invalid fd store name"):
            notifier.fdstore(name, [fd])
        with pytest.raises(SystemdError, match="invalid fd store name"):
            notifier.fdstore_remove(name)
    finally:
        os.close(fd)


def test_fds_sent_without_fdstore_are_closed_by_the_manager(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    r, w = os.pipe()
    try:
        notifier.send("STATUS=stray", fds=[w])
        msg = sd.receive()
        assert msg.n_fds == 1
        assert msg.fds == ()
        assert sd.store == []
        os.close(w)
        w = -1
        assert os.read(r, 1) == b""  # the manager's copy is gone too: EOF
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# -- barrier ----------------------------------------------------------------------------


def test_barrier_returns_once_the_manager_processed_everything_before_it(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    seen: list[str] = []

    def manager() -> None:
        for _ in range(2):
            seen.append(sd.receive().text)

    thread = threading.Thread(target=manager)
    thread.start()
    notifier.stopping()
    assert notifier.barrier(timeout=10)
    thread.join()
    assert seen == ["STOPPING=1", "BARRIER=1"]


def test_barrier_times_out_when_nobody_reads(sd: FakeSystemd, notifier: Notifier) -> None:
    with pytest.raises(TimeoutError):
        notifier.barrier(timeout=0.05)
    sd.drain()  # the fake closes the pipe end it got; nothing leaks


# -- watchdog ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "5000000"}, 5.0),
        ({"WATCHDOG_USEC": "250000", "WATCHDOG_PID": "SELF"}, 0.25),
        ({"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    env = {k: str(os.getpid()) if v == "SELF" else v for k, v in env.items()}
    assert watchdog_interval(env) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-1"},
        {"WATCHDOG_USEC": "1", "WATCHDOG_PID": "me"},
    ],
)
def test_a_malformed_watchdog_environment_is_an_error(env: dict[str, str]) -> None:
    with pytest.raises(SystemdError):
        watchdog_interval(env)


def test_fake_environ_sets_a_watchdog_for_this_process(sd: FakeSystemd) -> None:
    assert watchdog_interval(sd.environ(watchdog_usec=3_000_000)) == 3.0


# -- LISTEN_FDS ----------------------------------------------------------------------------


def test_listen_fds_meant_for_another_process_are_ignored_and_unset() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "KEEP": "x"}
    assert listen_fds(env) == {}
    assert env == {"KEEP": "x"}


def test_listen_fds_absent_or_zero() -> None:
    assert listen_fds({}) == {}
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}
    assert listen_fds(env, unset=False) == {}
    assert "LISTEN_FDS" in env


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "only-one"}, "2 names|1 names"),
        ({"LISTEN_FDS": "many"}, "not integers"),
        ({"LISTEN_FDS": "-1"}, "negative"),
    ],
)
def test_a_malformed_listen_environment_is_an_error_and_still_unset(
    env: dict[str, str], match: str
) -> None:
    env["LISTEN_PID"] = str(os.getpid())
    with pytest.raises(SystemdError, match=match):
        listen_fds(env)
    assert env == {}


# A child that reports what listen_fds() gave it, with proof of identity for
# each fd: the eventfd counter it reads, and its close-on-exec flag.
CHILD_REPORT = """
import fcntl, json, os, sys
from eoid.systemd import listen_fds
try:
    got = listen_fds()
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(0)
print(json.dumps({
    "fds": got,
    "counters": {n: [os.eventfd_read(fd) for fd in fds] for n, fds in got.items()},
    "cloexec": all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
                   for fds in got.values() for fd in fds),
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    "notify_socket": os.environ.get("NOTIFY_SOCKET"),
}))
"""


def run_child(sd: FakeSystemd, code: str = CHILD_REPORT) -> dict[str, object]:
    proc = sd.spawn([sys.executable, "-c", code], stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    result: dict[str, object] = json.loads(out)
    return result


def test_a_spawned_service_gets_the_stored_fds_from_3_grouped_by_name(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    fds = [eventfd_with(10), eventfd_with(11), eventfd_with(20)]
    try:
        notifier.fdstore("dev0", fds[:2])
        notifier.fdstore("dev1", fds[2:])
        sd.drain()
    finally:
        for fd in fds:
            os.close(fd)
    report = run_child(sd)
    assert report == {
        "fds": {"dev0": [3, 4], "dev1": [5]},
        "counters": {"dev0": [10, 11], "dev1": [20]},
        "cloexec": True,
        "env_left": [],
        "notify_socket": sd.notify_socket,
    }
    assert len(sd.store) == 3  # the store keeps its copies for the next restart


def test_a_service_without_stored_fds_gets_none(sd: FakeSystemd) -> None:
    assert run_child(sd)["fds"] == {}


def test_a_promised_fd_that_is_not_open_is_an_error() -> None:
    code = "import os\nos.environ['LISTEN_PID'] = str(os.getpid())\n" + CHILD_REPORT
    env = {**os.environ, "LISTEN_FDS": "3", "LISTEN_FDNAMES": "a:b:c"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, check=True, timeout=30
    )
    assert "is not open" in json.loads(out.stdout)["error"]


# -- a restart, end to end, in separate processes ------------------------------------------

SERVICE = """
import os
from eoid.systemd import Notifier, listen_fds, watchdog_interval
passed = listen_fds()
n = Notifier.from_environ(unset=True)
if "counter" in passed:
    [fd] = passed["counter"]
    value = os.eventfd_read(fd)
else:
    fd, value = os.eventfd(0, os.EFD_CLOEXEC), 41
os.eventfd_write(fd, value + 1)
n.fdstore("counter", [fd])
n.ready(f"counter={value + 1} watchdog={watchdog_interval()}")
n.barrier()
"""


def test_the_fd_store_carries_an_eventfd_across_a_restart(sd: FakeSystemd) -> None:
    first = sd.spawn([sys.executable, "-c", SERVICE], watchdog_usec=4_000_000)
    ready = sd.wait_for(READY="1", timeout=30)
    assert ready.pid == first.pid
    sd.wait_for(BARRIER="1", timeout=30)  # receiving it releases the service's barrier()
    assert first.wait(timeout=30) == 0
    assert sd.status == "counter=42 watchdog=4.0"

    second = sd.spawn([sys.executable, "-c", SERVICE])
    sd.wait_for(BARRIER="1", timeout=30)
    assert second.wait(timeout=30) == 0
    assert sd.status == "counter=43 watchdog=None"
    assert len(sd.store) == 1  # the second instance re-sent the same fd: deduplicated


def test_with_a_main_pid_messages_from_other_processes_are_not_applied(
    sd: FakeSystemd, notifier: Notifier
) -> None:
    proc = sd.spawn([sys.executable, "-c", "pass"])
    assert proc.wait(timeout=30) == 0
    notifier.ready("not from the main process")
    msg = sd.receive()
    assert msg.pid == os.getpid()
    assert sd.rejected == [msg]
    assert sd.state == "starting"
    assert sd.status is None
