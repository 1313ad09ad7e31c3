"""A structure-aware fuzzer of the config loader (hypothesis).

Each example is a config tree: ``eoid.yaml`` and one to three device files, made from valid
configurations whose fields, values and types are mutated, then perhaps damaged byte by byte,
spliced with YAML edge cases (anchors, alias bombs, tags, deep nesting, several documents,
directives), or replaced by random bytes. The loader must either accept the tree, and then
every value is within the bounds the README documents (and fits the int64 nanosecond
arithmetic of the runner and the C fast path), or raise ConfigError whose every line is
``file:line[:column]: field: message`` for a file of the tree; never another exception, and
within ``SECONDS`` of CPU per tree (CPU, not wall time: the bound is on the loader's work,
whatever else the machine runs).

CI runs ``EXAMPLES`` trees (2,000); the long campaign is::

    EOID_FUZZ_CONFIGS=100000 .venv/bin/python -m pytest tests/unit/test_config_fuzz.py \\
        -q -s

which prints the tally (accepted, refused, slowest tree) at the end.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eoid.channel import Channel
from eoid.config import Config, load_config
from eoid.errors import ConfigError

EXAMPLES = int(os.environ.get("EOID_FUZZ_CONFIGS", "2000"))
SECONDS = 2.0
PROBLEM = re.compile(r"^(?P<file>[^\n]+?):(?P<line>[0-9]+)(?::(?P<col>[0-9]+))?: "
                     r"(?P<field>[^\n]+?): (?P<message>[^\n]+)$")

# The documented bounds (README, Configuration): the oracle for every accepted config.
NS = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
EOI_TIMEOUT = (NS["ms"], 24 * NS["h"])
BACKOFF = (NS["us"], NS["h"])
RECOVERY = (NS["ms"], 24 * NS["h"])
MAX_RATE = (1.0, 1e9)
BURST = (1, 1_000_000)
MAX_ID = 2**32 - 2
MESSAGE_BYTES = (1024, 1 << 20)
CONNECTIONS = (1, 65536)
BUCKET = (NS["us"], 10 * NS["s"])
REPEAT_SUMMARY = (NS["s"], 24 * NS["h"])
RECORDED = ["1us", "2.5us", "5us", "10us", "25us", "50us", "100us", "250us", "500us", "1ms",
            "2.5ms", "5ms", "10ms", "25ms", "50ms", "100ms", "250ms", "500ms", "1s", "2.5s",
            "5s", "10s"]

# --- generation: a seed from hypothesis, the structure from ``random.Random(seed)`` --------
# (one draw per tree: hypothesis manages the examples and replays a failure from its seed,
# at a fraction of the cost of drawing every mutation through it)

UNITS = ["ns", "us", "µs", "ms", "s", "m", "h", "d", "", "sec", "MS"]
SPECIAL_DURATIONS = ["1ms", "24h", "1h", "1us", "2s", "86400s", "3600.000000001s", "0.5ns",
                     "1e3s", "-1s", " 10 ms ", "9" * 400 + "s", "1_000ms", "24.000000001h",
                     "999999999999h", "0ms"]
SPECIAL_NUMBERS: list[Any] = [0, 1, 10**6, 10**6 + 1, 10**9, 1e-300, 1e300, 2**63, -1,
                              2**32 - 2, 2**32 - 1, float("nan"), float("inf"), -0.0, 0.5,
                              10**40, True, False]
SPECIAL_TEXT = ["", "h:65536", "\x00", "a\nb", "0660", "0o660", "root", "nobody", "sim", "vfio",
                "/run/eoid/x.sock", "/" + "x" * 200, "!!", "*a", "&a", "{", "[", "~", "\ud7ff",
                "\u2028", "\x85", "é", "\t", ":", "- x", "null", "0000:01:00.0", "1ms",
                "x" * 300, "/proc/self/fd/0", "/dev/zero", ".", ".."]
IDS: list[Any] = ["root", "nobody", "no-such-user", 2**32 - 2, 2**32 - 1, -1, 10**30, True]


def text(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(SPECIAL_TEXT)
    return "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0, 0x3000)]))
                   for _ in range(rng.randrange(0, 12)))


def duration(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(SPECIAL_DURATIONS)
    number = str(rng.randrange(0, 10 ** rng.randrange(1, 16)))
    if roll < 0.5:
        number += "." + str(rng.randrange(0, 10 ** rng.randrange(1, 12)))
    return number + rng.choice(UNITS)


def number(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(SPECIAL_NUMBERS)
    if roll < 0.6:
        return rng.randrange(-(10 ** rng.randrange(1, 45)), 10 ** rng.randrange(1, 45))
    return rng.uniform(-1e12, 1e12) * 10.0 ** rng.randrange(-320, 300)


def nasty(rng: random.Random) -> Any:
    """Any value, of any type, leaning to the edges."""
    kind = rng.randrange(8)
    if kind == 0:
        return None
    if kind == 1:
        return number(rng)
    if kind == 2:
        return duration(rng)
    if kind == 3:
        return text(rng)
    if kind == 4:
        return [number(rng) for _ in range(rng.randrange(4))]
    if kind == 5:
        return {text(rng): number(rng) for _ in range(rng.randrange(3))}
    if kind == 6:
        return rng.choice(IDS)
    return rng.random() < 0.5


VALID_IDS: list[Any] = ["root", 0, 2**32 - 2, 65534]


def ids(rng: random.Random) -> list[Any]:
    """Valid uids and gids (``IDS`` holds invalid ones, for the mutations)."""
    return [rng.choice([rng.randrange(0, 70000), *VALID_IDS]) for _ in range(rng.randrange(4))]


def maybe(rng: random.Random) -> bool:
    return rng.random() < 0.5


def daemon_doc(rng: random.Random) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if maybe(rng):
        doc["devices_dir"] = "devices.d"
    if maybe(rng):
        doc["control"] = {
            "socket": rng.choice(["/run/eoid/control.sock", "/tmp/c.sock"]),
            "socket_mode": rng.choice(["0660", "0600", "0777", "660"]),
            "max_message_bytes": rng.randint(*MESSAGE_BYTES),
            "max_connections_per_uid": rng.choice([1, 256, CONNECTIONS[1]]),
        }
        if maybe(rng):
            doc["control"]["status"] = {"uids": ids(rng), "gids": ids(rng)}
    if maybe(rng):
        doc["metrics"] = {"listen": rng.choice(
            ["127.0.0.1:9466", "[::1]:0", None, "localhost:65535", ":9466"])}
        if maybe(rng):
            doc["metrics"]["per_device_histograms"] = rng.choice(["none", "service", "all"])
        for key in ("service_buckets", "overhead_buckets"):
            if maybe(rng):
                doc["metrics"][key] = sorted(rng.sample(RECORDED, rng.randint(1, 8)),
                                             key=RECORDED.index)
    if maybe(rng):
        doc["log"] = {"format": rng.choice(["auto", "json", "console"]),
                      "level": rng.choice(["debug", "info", "warning", "error"]),
                      "repeat_summary": rng.choice(["1s", "60s", "24h"])}
    if maybe(rng):
        doc["loop"] = rng.choice(["uvloop", "asyncio"])
    if maybe(rng):
        doc["sim"] = {"socket": "/run/eoid/sim.sock"}
    return doc


def device_doc(rng: random.Random, index: int) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "pci_address": f"0000:{index:02x}:00.{rng.randrange(8)}",
        "backend": dict(rng.choice([{"type": "sim"}, {"type": "vfio"},
                                    {"type": "sim", "line": "l0"},
                                    {"type": "vfio", "share_device_fd": True}])),
    }
    if maybe(rng):
        doc["consumers"] = {"uids": ids(rng), "gids": ids(rng)}
    if maybe(rng):
        storm: dict[str, Any] = {}
        if maybe(rng):
            storm["max_rate"] = rng.choice([rng.uniform(1, 1e9), rng.randint(1, 10**9), 1, 1e9])
        if maybe(rng):
            storm["burst"] = rng.choice([rng.randint(*BURST), 1, BURST[1]])
        if maybe(rng):
            storm["backoff_initial"] = rng.choice(["1us", "1ms", "10ms"])
        if maybe(rng):
            storm["backoff_max"] = rng.choice(["1s", "1h", "10ms"])
        if maybe(rng):
            storm["recovery"] = rng.choice(["1ms", "2s", "24h"])
        doc["policy"] = {"eoi_timeout": rng.choice(["1ms", "500ms", "2s", "24h"]),
                         "on_eoi_timeout": rng.choice(["warn", "unmask", "redeliver"]),
                         "unmask_on_spurious": maybe(rng), "storm": storm}
    return doc


def mutate(rng: random.Random, doc: Any, depth: int = 0) -> Any:
    """Change fields: replace a value (any type), drop, rename or add a key, wrap in a list."""
    if isinstance(doc, dict):
        out: dict[Any, Any] = {}
        for key, value in doc.items():
            roll = rng.randrange(20)
            if roll == 0:
                continue  # dropped
            if roll == 1:
                out[key] = nasty(rng)
            elif roll == 2:
                out[rng.choice([key.upper(), key + "s", key[:-1], 1, None, text(rng)])] = value
            elif roll == 3 and depth < 4:
                out[key] = [value]
            else:
                out[key] = mutate(rng, value, depth + 1)
        if rng.randrange(16) == 0:
            out[text(rng)] = nasty(rng)
        return out
    if isinstance(doc, list):
        return [mutate(rng, item, depth + 1) for item in doc]
    return nasty(rng) if rng.randrange(10) == 0 else doc


_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def render(rng: random.Random, doc: Any) -> bytes:
    dumped = yaml.dump(doc, Dumper=_Dumper, default_flow_style=rng.choice([None, True, False]),
                       allow_unicode=maybe(rng), sort_keys=False, width=10**6)
    return dumped.encode("utf-8", "surrogatepass")


def alias_bomb(rng: random.Random) -> bytes:
    levels, width = rng.randint(1, 40), rng.randint(1, 12)
    lines = ["a0: &a0 [x, y]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return ("\n".join(lines) + "\n").encode()


EDGES: list[bytes] = [
    b"%YAML 1.1\n---\n", b"%TAG ! tag:x,2000:\n---\n", b"---\n", b"...\n", b"--- |\n  x\n",
    b"\xef\xbb\xbf", b"\t", b"\x00", b"\r\n", b"\x85", b"\xe2\x80\xa8", b"\x1b[2J",
    b"!!binary aGk=\n", b"!!set {a, b}\n", b"!!omap [a: 1]\n", b"!!python/object:os.system {}\n",
    b"!!timestamp 2020-13-45\n", b"x: 2020-02-30\n", b"<<: *nope\n", b"<<: {policy: 1}\n",
    b"a: &a [*a]\n", b"a: &a {b: *a}\n", b"&a a: *a\n", b"? [a]\n: b\n", b"? {a: 1}\n: b\n",
    b"a: b\na: c\n", b"[" * 300, b"{a: " * 300, b"- " * 300 + b"x\n", b"'" + b"x" * 100,
    b"\"\\u0000\\ud800\"\n", b"a: !!int 1" + b"0" * 5000 + b"\n", b"a: !!float 1e999\n",
    b"a: 0b102\n", b"a: 0x\n", b"a: 1:2:3\n", b"a: .NaN\n", b"a: -.inf\n", b"a: ~\n",
    b"*undefined\n", b"&x\n", b"!<tag:yaml.org,2002:str> 1\n", b"!local 1\n", b">-\n x\n",
    b"key: |\n\t tab\n", b"\n" * 1000, b"# " + b"\xff" * 10 + b"\n",
    b"policy: {storm: {burst: " + b"9" * 4400 + b"}}\n", b"policy: &p {storm: *p}\n",
    b"<<: [*a, *a]\n", b"a: &a {<<: *a}\n",
]


def damage(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        at = rng.randint(0, len(out))
        op = rng.randrange(4)
        if op == 0:
            out[at:at] = rng.randbytes(rng.randint(1, 4))
        elif op == 1:
            del out[at:at + rng.randint(1, 8)]
        elif op == 2 and at < len(out):
            out[at] = rng.randrange(256)
        else:
            out[at:at] = rng.choice(EDGES)
    return bytes(out)


def yaml_file(rng: random.Random, doc: Any) -> bytes:
    kind = rng.randrange(20)
    if kind < 6:  # valid
        return render(rng, doc)
    if kind < 11:  # fields, values and types mutated
        return render(rng, mutate(rng, doc))
    if kind < 14:  # bytes damaged
        return damage(rng, render(rng, mutate(rng, doc) if maybe(rng) else doc))
    if kind < 17:  # a YAML edge case spliced in at a line
        lines = render(rng, doc).splitlines(keepends=True)
        lines.insert(rng.randint(0, len(lines)), rng.choice(EDGES) + b"\n")
        return b"".join(lines)
    if kind < 18:
        return alias_bomb(rng)
    if kind < 19:
        return b"".join(rng.choice(EDGES) for _ in range(rng.randint(1, 3)))
    return rng.randbytes(rng.randrange(200))


def config_tree(seed: int) -> dict[str, bytes]:
    """A daemon file and one to three device files: all valid (a third of the trees), or
    one of them broken (a third), or each broken or not at random."""
    rng = random.Random(seed)
    mode = rng.randrange(3)
    count = rng.randint(1, 3)
    broken = rng.randrange(count + 1)  # the daemon file (0) or a device file
    docs = [daemon_doc(rng), *(device_doc(rng, i) for i in range(count))]
    files = []
    for i, doc in enumerate(docs):
        if mode == 0 or (mode == 1 and i != broken):
            files.append(render(rng, doc))
        else:
            files.append(yaml_file(rng, doc))
    tree = {"eoid.yaml": files[0]}
    for i, data in enumerate(files[1:]):
        name = f"dev{i}" if mode == 0 or rng.random() < 0.8 else rng.choice(
            ["Bad Name", "x" * 70, "dev0", "é", "a" + "\n"])
        tree[f"devices.d/{name}.yaml"] = data
    return tree


# --- the oracle -----------------------------------------------------------------------------


def within(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def check_bounds(config: Config) -> None:
    control = config.daemon.control
    assert 0 <= control.socket_mode <= 0o777
    assert within(control.max_message_bytes, MESSAGE_BYTES)
    assert within(control.max_connections_per_uid, CONNECTIONS)
    metrics = config.daemon.metrics
    for buckets in (metrics.service_buckets, metrics.overhead_buckets):
        assert buckets and list(buckets) == sorted(set(buckets))
        assert all(within(b, BUCKET) for b in buckets)
    assert within(config.daemon.log.repeat_summary, REPEAT_SUMMARY)
    for path in (control.socket, config.daemon.sim.socket):
        raw = os.fsencode(path)
        assert len(raw) <= 107 and b"\0" not in raw
    for access in (control.status,):
        if access is not None:
            assert all(0 <= i <= MAX_ID for i in (*access.uids, *access.gids))
    address = config.daemon.metrics.address()
    assert address is None or 0 <= address[1] <= 65535
    for device in config.devices.values():
        policy, storm = device.policy, device.policy.storm
        assert type(storm.burst) is int and within(storm.burst, BURST)
        assert math.isfinite(storm.max_rate) and within(storm.max_rate, MAX_RATE)
        assert within(policy.eoi_timeout, EOI_TIMEOUT)
        assert within(storm.backoff_initial, BACKOFF) and within(storm.backoff_max, BACKOFF)
        assert storm.backoff_initial <= storm.backoff_max
        assert within(storm.recovery, RECOVERY)
        assert all(0 <= i <= MAX_ID for i in (*device.consumers.uids, *device.consumers.gids))
        # what the runner lends the C fast path (int64 nanoseconds), with years of uptime
        channel = Channel(policy)
        uptime = 10 * 365 * 24 * NS["h"]
        worst = uptime + channel._limit + channel._interval + 2 * storm.backoff_max \
            + policy.eoi_timeout + storm.recovery
        assert worst < 2**62, (device.name, worst)


TALLY = {"trees": 0, "files": 0, "accepted": 0, "refused": 0, "problems": 0, "slowest": 0.0}


@pytest.mark.timeout(0 if EXAMPLES > 2000 else 600)  # ~30 s for 2,000 on a quiet machine
@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**64 - 1))
def test_any_config_tree_loads_or_is_refused_line_by_line(seed: int) -> None:
    tree = config_tree(seed)
    root = Path(tempfile.mkdtemp(prefix="eoid-fuzz-"))
    try:
        (root / "devices.d").mkdir()
        for name, data in tree.items():
            (root / name).write_bytes(data)
        started = time.process_time()
        problems: list[str] = []
        try:
            config: Config | None = load_config(root / "eoid.yaml")
        except ConfigError as e:
            config, problems = None, e.problems
        elapsed = time.process_time() - started
        if config is None:
            assert problems
            for problem in problems:
                m = PROBLEM.match(problem)
                assert m, problem
                assert m["file"].startswith(str(root) + "/"), problem
            TALLY["refused"] += 1
            TALLY["problems"] += len(problems)
        else:
            check_bounds(config)
            TALLY["accepted"] += 1
        assert elapsed < SECONDS, (elapsed, tree)
        TALLY["trees"] += 1
        TALLY["files"] += len(tree)
        TALLY["slowest"] = max(TALLY["slowest"], elapsed)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_zz_tally() -> None:
    """Runs after the fuzzer (file order): both outcomes were exercised; print the figures."""
    if TALLY["trees"] == 0:
        return  # the fuzzer was deselected
    print(f"\nconfig fuzz: {TALLY}", file=sys.stderr)
    assert TALLY["accepted"] > 0 and TALLY["refused"] > 0, TALLY
