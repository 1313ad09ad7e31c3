"""A structure-aware fuzzer for the control socket, against a live ``eoid run``.

Hypothesis's strategies generate a corpus of messages: valid operations whose fields
are mutated (ids of every JSON type, huge integers, NaN, deep nesting, wrong types,
unknown keys) and raw bytes (empty, not UTF-8, oversize, almost-JSON). Drawing from
hypothesis costs some 10-30 ms a message, so the campaign's volume comes from a seeded
mutator over that corpus: it sends entries as they are, swaps fields between them,
splices them and mutates bytes (inserting NaN, 1e999, 4301-digit integers, deep
nesting, NUL, lone surrogates), each with ``SCM_RIGHTS`` attachments (none, eventfds,
pipes, sockets, a mix, or up to 64 fds). They are sent on connections made by uid/gid
65534 (``eoid.testing.connect_as``; the daemon sees that user, from the kernel), the
way a hostile local user would. Every message must get exactly one reply. After each
batch every connection is closed and the fuzzer checks that the daemon is alive, that
its fd count is back to its baseline, and that every simulated device still
reconciles: one interrupt each, attached as root, is forwarded, EOI'd and unmasked,
and the daemon's counters and the device's agree (interrupts = forwards = EOIs =
unmasks; device fires = daemon unmasks).

    python -m tests.fuzz.control_socket --messages 1000000     # as root; JSON report

``tests/fuzz/test_control_fuzz.py`` runs a bounded campaign in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from eoid.testing import connect_as
from eoid.wire import MAX_FDS, recv_msg
from tests.helpers import Consumer, Env, environment, wait_until

NOBODY = 65534
BATCH = 100  # messages between two checks
CORPUS = 300  # messages drawn from hypothesis for the mutator to work from
CONNECTIONS = 4  # fuzzing connections per batch
REPLY_TIMEOUT = 5.0
DEVICE_YAML = {"dev0": "consumers: {uids: [65534]}\n", "dev1": ""}  # dev1: root only


# --- what is sent ---------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.text(min_size=250, max_size=300))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
ops = st.one_of(st.sampled_from(["hello", "attach", "detach", "status", "reload", "reset",
                                 "datapath", "observe"]), json_values)
fields = st.one_of(st.sampled_from(["after", "limit", "datapath", "seconds", "device"]),
                   st.text(max_size=8))
"""Keys of extra fields: the ones some operation reads (status pages, datapath, observe)."""
devices = st.one_of(st.sampled_from(["dev0", "dev1", "nope", "dev0 ", "DEV0", ""]),
                    st.text(min_size=60, max_size=80), json_values)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A valid operation with some fields mutated, dropped or added."""
    message: dict[str, Any] = {"op": draw(ops)}
    if draw(st.booleans()):
        message["id"] = draw(json_values)
    if draw(st.integers(0, 3)):
        message["device"] = draw(devices)
    message.update(draw(st.dictionaries(fields, st.one_of(devices, json_values), max_size=2)))
    text = json.dumps(message)  # NaN and Infinity as Python writes them
    special = draw(st.integers(0, 19))
    if special == 0:  # an integer too long to convert
        text = text[:-1] + ', "id": ' + "9" * draw(st.integers(4290, 4400)) + "}"
    elif special == 1:  # nesting deeper than a parser's stack
        depth = draw(st.integers(900, 20000))
        text = text[:-1] + ', "id": ' + "[" * depth + "]" * depth + "}"
    return text.encode()


raw_messages = st.one_of(
    st.binary(max_size=300),
    st.just(b""),
    st.sampled_from([b"{", b"null", b"[]", b'"x"', b"{}", b'{"op": NaN}', b"\x00" * 8,
                     b'{"op": "hello"}' + b"\xff"]),
    st.integers(65537, 80000).map(lambda n: b"{" + b" " * n + b"}"),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
FD_KINDS = ("none", "eventfd", "pipe", "socket", "mixed", "many")
TOKENS = (b"NaN", b"-Infinity", b"1e999", b"9" * 4301, b"[" * 1000, b"\x00", b"\xff", b'"',
          b"{", b"}", b",", b":", b"\\u0000", b"\\ud800", b'"id":', b'"op":"attach"')


TEMPLATES = [json.dumps(m).encode() for m in (
    {"op": "hello", "id": 1}, {"op": "attach", "device": "dev0", "id": 2},
    {"op": "attach", "device": "dev1", "id": 3}, {"op": "detach", "device": "dev0", "id": 4},
    {"op": "status", "id": 5}, {"op": "reload", "id": 6},
    {"op": "status", "after": "dev0", "limit": 1, "id": 7}, {"op": "status", "device": "dev1"})] * 5
"""Valid requests (several times: the mutator picks them, and their fields, often)."""


@dataclass(frozen=True)
class Message:
    data: bytes
    fds: str
    count: int
    conn: int


def build_corpus(size: int, seed: int | None = None) -> list[bytes]:
    """``size`` messages drawn from the strategies above."""
    corpus: list[bytes] = []

    @settings(max_examples=size, deadline=None, database=None, phases=[Phase.generate],
              derandomize=seed is None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(requests(), requests(), raw_messages))
    def collect(data: bytes) -> None:
        corpus.append(data)

    if seed is not None:
        collect = hypothesis_seed(seed)(collect)
    collect()
    return corpus + TEMPLATES


class Mutator:
    """Messages from the corpus, as they are or mutated, with fds attached."""

    def __init__(self, corpus: list[bytes], rng: random.Random) -> None:
        self.corpus = corpus
        self.rng = rng
        self.parsed = [m for m in (self._parse(d) for d in corpus) if m is not None]

    @staticmethod
    def _parse(data: bytes) -> dict[str, Any] | None:
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            return None
        return value if isinstance(value, dict) else None

    def data(self) -> bytes:
        rng = self.rng
        pick = rng.random()
        if pick < 0.3 or not self.parsed:
            return rng.choice(self.corpus)
        if pick < 0.6:  # a request whose fields come from other requests
            message = dict(rng.choice(self.parsed))
            for _ in range(rng.randint(1, 3)):
                donor = rng.choice(self.parsed)
                key = rng.choice(["op", "id", "device", *donor.keys()])
                message[key] = donor.get(key, rng.choice(list(donor.values()) or [None]))
            try:
                return json.dumps(message).encode()
            except (ValueError, RecursionError):
                return rng.choice(self.corpus)
        if pick < 0.7:  # two messages spliced
            a, b = rng.choice(self.corpus), rng.choice(self.corpus)
            return a[:rng.randint(0, len(a))] + b[rng.randint(0, len(b)):]
        data = bytearray(rng.choice(self.corpus))  # bytes mutated
        for _ in range(rng.randint(1, 4)):
            at = rng.randint(0, len(data))
            what = rng.random()
            if what < 0.4:
                data[at:at] = rng.choice(TOKENS)
            elif what < 0.7 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            else:
                del data[at:at + rng.randint(1, 16)]
        return bytes(data)

    def message(self) -> Message:
        rng = self.rng
        kind = rng.choice((*FD_KINDS, "none", "none", "none"))
        count = 0 if kind == "none" else (rng.randint(MAX_FDS + 1, 64) if kind == "many"
                                          else rng.randint(1, MAX_FDS))
        return Message(self.data(), kind, count, rng.randrange(CONNECTIONS))


def make_fds(kind: str, count: int) -> list[int]:
    """``count`` fds of ``kind`` to send (the caller closes them after sending)."""
    fds: list[int] = []
    while len(fds) < count:
        pick = kind if kind not in ("mixed", "many") else ("eventfd", "pipe", "socket")[
            len(fds) % 3]
        if pick == "eventfd":
            fds.append(os.eventfd(0, os.EFD_CLOEXEC))
        elif pick == "pipe":
            r, w = os.pipe()
            fds += [r, w]
        else:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            fds += [a.detach(), b.detach()]
    for fd in fds[count:]:
        os.close(fd)
    return fds[:count]


# --- the campaign -----------------------------------------------------------------------------


@dataclass
class Report:
    messages: int = 0
    batches: int = 0
    replies: int = 0
    unanswered: int = 0
    closed_by_daemon: int = 0
    fds_sent: int = 0
    attached: int = 0
    crashes: int = 0
    tracebacks: int = 0
    reconciled_batches: int = 0
    seconds: float = 0.0
    messages_per_second: float = 0.0
    daemon_fds_before: int = 0
    daemon_fds_after: int = 0
    daemon_rss_kib_before: int = 0
    daemon_rss_kib_after: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Campaign:
    """A sim, a daemon, and the checks; ``run_batch`` sends one batch and checks."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.report = Report()
        self.daemon = env.procs[-1]
        self.baseline = self._settled_fds()
        self.report.daemon_fds_before = self.baseline
        self.report.daemon_rss_kib_before = rss_kib(self.daemon.pid)
        self.started = time.monotonic()
        self.conns: list[socket.socket] | None = None
        self.in_batch = 0

    def connections(self) -> list[socket.socket]:
        if os.geteuid() == 0:
            conns = connect_as(self.env.control, NOBODY, NOBODY, count=CONNECTIONS)
        else:  # not root: fuzz as ourselves (the daemon runs as us too)
            conns = []
            for _ in range(CONNECTIONS):
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                conn.connect(str(self.env.control))
                conns.append(conn)
        for conn in conns:
            conn.settimeout(REPLY_TIMEOUT)
        return conns

    def send(self, message: Message, batch: int) -> None:
        """Send one message on this batch's connections; close them and check after
        every ``batch`` messages."""
        if self.conns is None:
            self.conns = self.connections()
        self._send(self.conns, message)
        self.in_batch += 1
        if self.in_batch >= batch:
            self.end_batch()

    def end_batch(self) -> None:
        if self.conns is None:
            return
        for conn in self.conns:
            conn.close()
        self.conns = None
        self.in_batch = 0
        self.report.batches += 1
        self.check()

    def _send(self, conns: list[socket.socket], message: Message) -> None:
        report = self.report
        conn = conns[message.conn]
        report.messages += 1
        fds = make_fds(message.fds, message.count)
        try:
            if fds:
                socket.send_fds(conn, [message.data], fds)
            else:
                conn.send(message.data)
        except OSError as e:
            report.failures.append(f"send failed: {e!r} ({message!r:.200})")
            return
        finally:
            for fd in fds:
                os.close(fd)
        report.fds_sent += len(fds)
        while True:
            try:
                received = recv_msg(conn, 1 << 20)
            except TimeoutError:
                report.unanswered += 1
                report.failures.append(f"no reply within {REPLY_TIMEOUT}s: {message!r:.300}")
                conns[message.conn] = self._replace(conn)
                return
            if received is None:
                report.closed_by_daemon += 1
                report.unanswered += 1
                report.failures.append(f"connection closed, no reply: {message!r:.300}")
                conns[message.conn] = self._replace(conn)
                return
            reply, got = received
            for fd in got:
                os.close(fd)
            if "event" not in reply:
                break
        report.replies += 1
        if reply.get("ok") is True:
            report.attached += bool(got)
            code = "ok"
        else:
            code = str(reply.get("error", {}).get("code"))
        report.codes[code] = report.codes.get(code, 0) + 1

    def _replace(self, conn: socket.socket) -> socket.socket:
        conn.close()
        return self.connections()[0]

    def check(self) -> None:
        """The daemon lives, holds no fd it did not hold before, and every device still
        relays an interrupt with its counters and the device's in agreement."""
        report = self.report
        if self.daemon.poll() is not None:
            report.crashes += 1
            raise AssertionError(f"the daemon died ({self.daemon.returncode}): "
                                 f"{self.env.log('daemon')[-3000:]}")
        pid = self.daemon.pid
        try:
            wait_until(lambda: fd_count(pid) == self.baseline, 10, "fds back to the baseline")
        except AssertionError:
            raise AssertionError(f"the daemon holds {fd_count(pid)} fds, "
                                 f"{self.baseline} before") from None
        for name in DEVICE_YAML:
            self._round_trip(name)
        lines = self.env.sim("stats")["lines"]
        for name in DEVICE_YAML:
            counters = self.env.device(name)["counters"]
            pairs = {k: counters[k] for k in ("interrupts", "forwards", "eois", "unmasks")}
            assert len(set(pairs.values())) == 1, f"{name} does not reconcile: {pairs}"
            line = lines[name]
            assert line["fires"] == counters["unmasks"] == line["unmasks"], (name, line, pairs)
            assert line["raised"] == line["acked"], (name, line)
        report.reconciled_batches += 1

    def _settled_fds(self) -> int:
        """The daemon's fd count once the connections that just closed are gone from it
        (it sees their end asynchronously): the same count for half a second."""
        pid = self.daemon.pid
        readings = [fd_count(pid)]
        while len(readings) < 5 or len(set(readings[-5:])) > 1:
            time.sleep(0.1)
            readings.append(fd_count(pid))
        return readings[-1]

    def _round_trip(self, name: str) -> None:
        with Consumer(self.env.control, name) as vm:
            self.env.sim("raise", line=name)
            assert vm.wait_irq() == 1, f"{name}: no interrupt"
            self.env.sim("ack", line=name)
            vm.send_eoi()
            wait_until(lambda: self.env.device(name)["state"] == "armed", 10, f"{name} re-armed")

    def finish(self) -> Report:
        report = self.report
        report.seconds = round(time.monotonic() - self.started, 3)
        report.messages_per_second = round(report.messages / report.seconds, 1) \
            if report.seconds else 0.0
        if self.daemon.poll() is None:
            report.daemon_fds_after = self._settled_fds()
            report.daemon_rss_kib_after = rss_kib(self.daemon.pid)
        else:
            report.crashes += 1
        log = self.env.log("daemon")
        report.tracebacks = log.count("Traceback") + log.count('"exception"')
        return report


@contextmanager
def campaign() -> Iterator[Campaign]:
    """A sim and a daemon (logging at info, as in production) to fuzz."""
    with environment(devices=0, daemon_yaml="") as env:
        env.write_daemon()
        env.config.write_text(env.config.read_text().replace("level: debug", "level: info"))
        for name, extra in DEVICE_YAML.items():
            env.write_device(name, extra)
        env.start_sim()
        env.start_daemon()
        yield Campaign(env)


def run_campaign(total: int, batch: int = BATCH, seed: int = 0,
                 corpus_size: int = CORPUS) -> Report:
    """Send ``total`` messages, checking the daemon after every ``batch``; the same
    ``seed`` sends the same messages."""
    mutator = Mutator(build_corpus(corpus_size, seed or None), random.Random(seed))
    with campaign() as fuzz:
        for _ in range(total):
            fuzz.send(mutator.message(), batch)
        fuzz.end_batch()
        return fuzz.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz.control_socket",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--seed", type=int, default=0,
                        help="0 (the default): the same campaign every run")
    parser.add_argument("--corpus", type=int, default=CORPUS,
                        help="messages drawn from hypothesis for the mutator")
    args = parser.parse_args(argv)
    report = run_campaign(args.messages, args.batch, args.seed, args.corpus)
    print(json.dumps(asdict(report), indent=2))
    ok = not (report.crashes or report.tracebacks or report.unanswered or report.failures
              or report.daemon_fds_after != report.daemon_fds_before)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
