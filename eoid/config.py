"""Configuration: the daemon's ``eoid.yaml`` and one ``devices.d/<name>.yaml`` per device.

Models are pydantic v2 with ``extra="forbid"``, so a typo is an error rather than a
silently ignored setting. YAML is composed into nodes first so that every error can
name the file, the line and the field: ``devices.d/nic0.yaml:4: pci_address: …``.
"""

from __future__ import annotations

import enum
import grp
import os
import pwd
import re
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from eoid.errors import ConfigError
from eoid.stats import BUCKETS_NS, SERVICE_BUCKETS_NS, check_buckets

# --- human units ----------------------------------------------------------------------

_DURATION = re.compile(r"^\s*([0-9]{1,12})(?:\.([0-9]{1,9}))?\s*(ns|us|µs|ms|s|m|h)\s*$")
_NS_PER_UNIT = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9,
                "h": 3600 * 10**9}


def _show(value: object, limit: int = 40) -> str:
    """``repr`` cut to ``limit`` characters: an error message quotes a value, not a file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_duration(value: object) -> int:
    """``'500us'`` → 500000 (nanoseconds). A bare number is refused: its unit would be a guess.

    Exact integer arithmetic (at most 12 digits, 9 decimals), so no input overflows."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            whole, frac, unit = m.group(1), (m.group(2) or "").ljust(9, "0"), m.group(3)
            scaled = (int(whole) * 10**9 + int(frac)) * _NS_PER_UNIT[unit]
            return (scaled + 5 * 10**8) // 10**9  # to the nearest nanosecond
    raise ValueError(f"{_show(value)} is not a duration (a number and a unit: 500us, 10ms, "
                     "2s, 1m)")


def _within(low: str, high: str) -> Callable[[int], int]:
    """Check a duration is between ``low`` and ``high`` (inclusive). The bounds keep the
    int64 nanosecond arithmetic of the runner and the C fast path (``now + timeout``,
    a doubled backoff) far from overflow, and the timers from spinning."""
    lo, hi = parse_duration(low), parse_duration(high)

    def within(ns: int) -> int:
        if not lo <= ns <= hi:
            raise ValueError(f"{_human(ns)} is not between {low} and {high}")
        return ns

    return within


def _human(ns: int) -> str:
    """Like ``format_duration``, in hours and minutes too."""
    for unit, scale in (("h", _NS_PER_UNIT["h"]), ("m", _NS_PER_UNIT["m"])):
        if ns >= scale and ns % scale == 0:
            return f"{ns // scale}{unit}"
    return format_duration(ns)


def format_duration(ns: int) -> str:
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if ns >= scale and ns % scale == 0:
            return f"{ns // scale}{unit}"
    return f"{ns}ns"


EoiTimeout = Annotated[int, BeforeValidator(parse_duration), AfterValidator(_within("1ms", "24h"))]
"""How long a guest may take to end an interrupt."""
Backoff = Annotated[int, BeforeValidator(parse_duration), AfterValidator(_within("1us", "1h"))]
"""A storm's deferred unmask; doubled up to ``backoff_max``, so at most 2h in flight."""
Recovery = Annotated[int, BeforeValidator(parse_duration), AfterValidator(_within("1ms", "24h"))]
BucketBound = Annotated[int, BeforeValidator(parse_duration), AfterValidator(_within("1us", "10s"))]
"""A histogram bucket's upper bound: one of the recorded bounds (see ``check_buckets``)."""
SummaryPeriod = Annotated[int, BeforeValidator(parse_duration),
                          AfterValidator(_within("1s", "24h"))]
HeldTimeout = Annotated[int, BeforeValidator(parse_duration),
                        AfterValidator(_within("1ms", "24h"))]
"""How long an interrupt may wait for a consumer before the device shows ``abandoned``."""


_PCI_ADDRESS = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-1][0-9a-fA-F]\.[0-7]$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_LISTEN = re.compile(r"^(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]*):(\d{1,5})$")


SHARED = "shared"
"""Validation-context key: the models already loaded, by value (see ``_Strict``)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _shared(self, info: ValidationInfo) -> Self:
        """Within one load (``SHARED`` in the validation context), settings equal to ones
        already loaded are those: a thousand devices with one policy hold one ``Policy``
        (each model instance costs ~0.5 kB). They are frozen, so sharing is safe."""
        shared: dict[Any, Any] | None = (info.context or {}).get(SHARED)
        return self if shared is None else shared.setdefault(self, self)


# --- who may use the control socket -----------------------------------------------------


_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown(2)


def _uid(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ID:
        return value
    if isinstance(value, str):
        try:
            return pwd.getpwnam(value).pw_uid
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            raise ValueError(f"no such user {_show(value)}") from None
    raise ValueError(f"{_show(value)} is not a user name or uid (0 to {_MAX_ID})")


def _gid(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_ID:
        return value
    if isinstance(value, str):
        try:
            return grp.getgrnam(value).gr_gid
        except (KeyError, ValueError):
            raise ValueError(f"no such group {_show(value)}") from None
    raise ValueError(f"{_show(value)} is not a group name or gid (0 to {_MAX_ID})")


_MODE = re.compile(r"^0?[0-7]{3}$")


def _mode(value: object) -> int:
    """An octal string: YAML reads an unquoted 0660 as the number 432 and ``true`` as 1."""
    if isinstance(value, str) and _MODE.match(value):
        return int(value, 8)
    raise ValueError(f"{_show(value)} is not a file mode: write it as an octal string in "
                     "quotes, e.g. '0660'")


def _socket_path(value: Path) -> Path:
    """What ``bind(2)`` takes: no NUL, and within ``sun_path`` (108 bytes with its NUL)."""
    raw = os.fsencode(value)
    if b"\0" in raw:
        raise ValueError("a path cannot hold a NUL byte")
    if len(raw) > 107:
        raise ValueError(f"{_show(str(value))} is longer than 107 bytes (a unix socket's limit)")
    return value


SocketPath = Annotated[Path, AfterValidator(_socket_path)]


Uid = Annotated[int, BeforeValidator(_uid)]
Gid = Annotated[int, BeforeValidator(_gid)]


class Access(_Strict):
    """Peers allowed by uid or by group (primary or supplementary). root is always allowed."""

    uids: tuple[Uid, ...] = ()
    gids: tuple[Gid, ...] = ()

    def allows(self, uid: int, gids: frozenset[int]) -> bool:
        return uid == 0 or uid in self.uids or not gids.isdisjoint(self.gids)


# --- the daemon ---------------------------------------------------------------------------


class LoopKind(enum.StrEnum):
    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class LogFormat(enum.StrEnum):
    AUTO = "auto"  # JSON under journald or a pipe, console on a terminal
    JSON = "json"
    CONSOLE = "console"


class ControlConfig(_Strict):
    socket: SocketPath = Path("/run/eoid/control.sock")
    socket_mode: Annotated[int, BeforeValidator(_mode)] = 0o660
    """An octal string, ``'0000'`` to ``'0777'``."""
    socket_group: Gid | None = None
    status: Access | None = None
    """Who may ask for ``status``; unset: anyone who can connect to the socket."""
    max_message_bytes: int = Field(default=65536, ge=1024, le=1 << 20, strict=True)
    max_connections_per_uid: int = Field(default=256, ge=1, le=65536, strict=True)
    """Connections one uid may hold at once (root and the daemon's own user: no limit)."""


class MetricsConfig(_Strict):
    listen: str | None = "127.0.0.1:9466"
    """``host:port`` for ``/metrics`` (``:port``: every interface); null turns it off."""
    per_device_histograms: Literal["none", "service", "all"] = "service"
    """Histograms exported per device; the others are daemon-wide (see README, Metrics)."""
    service_buckets: tuple[BucketBound, ...] = SERVICE_BUCKETS_NS
    overhead_buckets: tuple[BucketBound, ...] = BUCKETS_NS
    """Exported bounds of the service and of the dispatch/unmask histograms (recorded ones)."""

    @field_validator("service_buckets", "overhead_buckets")
    @classmethod
    def _buckets(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return check_buckets(v)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            m = _LISTEN.match(v)
            if not m or int(m.group(2)) > 65535:
                raise ValueError(f"{v!r} is not host:port "
                                 "(e.g. 127.0.0.1:9466, [::1]:9466 or :9466)")
        return v

    def address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class LogConfig(_Strict):
    format: LogFormat = LogFormat.AUTO
    level: Literal["debug", "info", "warning", "error"] = "info"
    repeat_summary: SummaryPeriod = 60 * 10**9
    """Repeated warnings about one ongoing condition: the first is logged, the rest once
    per this period as a summary (``repeats=N``)."""


class SimConfig(_Strict):
    socket: SocketPath = Path("/run/eoid/sim.sock")
    """Where ``eoid sim`` serves its simulated devices."""


class DaemonConfig(_Strict):
    devices_dir: Path = Path("devices.d")
    """Relative paths are taken from the directory of ``eoid.yaml``."""
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    log: LogConfig = LogConfig()
    loop: LoopKind = LoopKind.UVLOOP
    sim: SimConfig = SimConfig()


# --- one passthrough device -------------------------------------------------------------


class EoiTimeoutPolicy(enum.StrEnum):
    WARN = "warn"  # count it and show the interrupt as stuck; keep waiting
    UNMASK = "unmask"  # re-arm the line; a still-asserted line fires again
    REDELIVER = "redeliver"  # signal the consumer again and wait another timeout


class StormPolicy(_Strict):
    """A token bucket: ``burst`` interrupts at once, refilled at ``max_rate`` per second."""

    max_rate: float = Field(default=10_000, ge=1, le=1e9, allow_inf_nan=False)
    """Interrupts per second, 1 to 1e9: one token refills in 1 ns to 1 s."""
    burst: int = Field(default=100, ge=1, le=1_000_000, strict=True)
    """Tokens the bucket holds: ``burst`` refills take at most 1e6 s, within int64 ns."""
    backoff_initial: Backoff = parse_duration("1ms")
    backoff_max: Backoff = parse_duration("1s")
    recovery: Recovery = parse_duration("2s")
    """An episode ends after this long without throttling; the backoff then resets."""

    @model_validator(mode="after")
    def _backoff(self) -> StormPolicy:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max is shorter than backoff_initial")
        return self


class Policy(_Strict):
    eoi_timeout: EoiTimeout = parse_duration("2s")
    on_eoi_timeout: EoiTimeoutPolicy = EoiTimeoutPolicy.UNMASK
    unmask_on_spurious: bool = False
    """Off by default: a spurious EOI racing an unread trigger would unmask a line whose
    interrupt has not been delivered yet. The EOI timeout covers a really lost EOI."""
    storm: StormPolicy = StormPolicy()
    held_timeout: HeldTimeout = parse_duration("1m")
    """An interrupt held this long with no consumer shows the device as ``abandoned``."""


class SimBackend(_Strict):
    type: Literal["sim"]
    line: str | None = None
    """The simulated line's name; defaults to the device's name."""
    socket: SocketPath | None = None
    """Overrides the daemon's ``sim.socket``."""


class VfioBackend(_Strict):
    type: Literal["vfio"]
    share_device_fd: bool = False
    """Hand the attached consumer a dup of the VFIO device fd (a VFIO group can be open
    in one process only, so a VMM that takes a pre-opened fd gets it from us)."""
    register_request_irqs: bool = True


class Datapath(enum.StrEnum):
    """Who carries a device's interrupts (README, "Two datapaths")."""

    RELAY = "relay"  # eoid reads the trigger and the EOI, forwards and unmasks: sees all
    KERNEL = "kernel"  # the consumer's eventfds are the line's trigger and unmask: no eoid


ObservePeriod = Annotated[int, BeforeValidator(parse_duration),
                          AfterValidator(_within("1s", "24h"))]
ObserveWindow = Annotated[int, BeforeValidator(parse_duration),
                          AfterValidator(_within("10ms", "1h"))]


class Observe(_Strict):
    """Sampled observation of a device on the kernel path: relay one window of ``for``
    every ``every``, so latencies and stuck EOIs are still seen, at a fraction of the cost."""

    every: ObservePeriod
    window: ObserveWindow = Field(alias="for")

    @model_validator(mode="after")
    def _shorter(self) -> Observe:
        if self.window >= self.every:
            raise ValueError("'for' must be shorter than 'every'")
        return self


class DeviceConfig(_Strict):
    name: str
    pci_address: str
    backend: Annotated[SimBackend | VfioBackend, Field(discriminator="type")]
    consumers: Access = Access()
    policy: Policy = Policy()
    datapath: Datapath = Datapath.RELAY
    observe: Observe | None = None
    """Applies while the device is on the kernel path."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"{v!r} is not a device name (lower-case letters, digits, _ . -)")
        return v

    @field_validator("pci_address")
    @classmethod
    def _pci(cls, v: str) -> str:
        if not _PCI_ADDRESS.match(v):
            raise ValueError(f"{v!r} is not a PCI address (DDDD:BB:DD.F)")
        return v.lower()


# --- loading with line numbers ------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


MAX_FILE_BYTES = 64 * 1024
"""A config file is a few hundred bytes; a bigger one is a mistake (or an attack)."""
MAX_DEPTH = 32
"""Nesting levels, aliases followed; the models are five deep."""
MAX_VALUES = 10_000
"""Scalars, sequences and mappings in one file with its aliases expanded: an alias bomb
(each level repeating the one before) stops here before anything walks it."""

Where = tuple[str | int, ...]


def _problem(shown: str, line: int, column: int | None, field: str, message: str) -> str:
    """One ``file:line[:column]: field: message`` line, with anything unprintable escaped."""
    where = f"{shown}:{line}" if column is None else f"{shown}:{line}:{column}"
    text = f"{where}: {field}: {message}"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with bounded nesting, whose construction errors (an integer of
    more than 4300 digits, 2020-13-45) are marked YAML errors like the parser's."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # The composer recurses once per level; the parser under it does not. Counting
        # nodes here stops a file of many small values early: the pure-Python parser
        # takes about 30 us a value.
        self._depth += 1
        self._nodes += 1
        try:
            if self._depth > MAX_DEPTH or self._nodes > MAX_VALUES:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                problem = f"nested deeper than {MAX_DEPTH} levels" if self._depth > MAX_DEPTH \
                    else f"more than {MAX_VALUES} values"
                raise yaml.composer.ComposerError(None, None, problem, mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception as e:  # PyYAML's constructors raise anything:
            # ValueError (int('0x')), KeyError (!!bool maybe), AttributeError (!!timestamp x)
            reason = f"an integer of more than {sys.get_int_max_str_digits()} digits" \
                if "integer string conversion" in str(e) else str(e)
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {reason}", node.start_mark) from e


def _lines(node: yaml.Node, shown: str) -> dict[Where, int]:
    """(path, 1-based line) of every value, walking aliases, in at most ``MAX_VALUES``
    steps: a graph of aliases that expands beyond that (or into itself) is refused
    before the constructor or the models see it."""
    lines: dict[Where, int] = {}
    # (path, or None where no model field can be, depth, node)
    stack: list[tuple[Where | None, int, yaml.Node]] = [((), 0, node)]
    seen = 0
    while stack:
        path, depth, n = stack.pop()
        seen += 1
        mark = n.start_mark
        if seen > MAX_VALUES:
            raise ConfigError([_problem(shown, mark.line + 1, mark.column + 1, "(file)",
                                        f"more than {MAX_VALUES} values (aliases expanded)")])
        if depth > MAX_DEPTH:
            raise ConfigError([_problem(shown, mark.line + 1, mark.column + 1, "invalid YAML",
                                        "recursive alias, or nested deeper than "
                                        f"{MAX_DEPTH} levels through aliases")])
        if path is not None:
            lines.setdefault(path, mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                sub: Where | None = None
                if path is not None and isinstance(key, yaml.ScalarNode):
                    sub = (*path, key.value)
                    lines.setdefault(sub, key.start_mark.line + 1)
                stack.append((None, depth + 1, key))
                stack.append((sub, depth + 1, value))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                stack.append((None if path is None else (*path, i), depth + 1, item))
    return lines


def _read(path: Path, shown: str) -> bytes:
    """At most ``MAX_FILE_BYTES`` of a regular file: never blocks on a FIFO or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) else "a NUL byte in the path"
        raise ConfigError([_problem(shown, 1, None, "(file)", f"cannot read: {reason}")]) from e
    try:
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError([_problem(shown, 1, None, "(file)", "not a regular file")])
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError([_problem(shown, 1, None, "(file)", f"cannot read: {e.strerror}")]) \
            from e
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError([_problem(shown, 1, None, "(file)",
                                    f"larger than {MAX_FILE_BYTES} bytes")])
    return data


def _load_yaml(path: Path, shown: str) -> tuple[Any, dict[Where, int]]:
    """The document of one file and the line of every value, or a ConfigError: whatever
    the bytes, in time bounded by the limits above."""
    data = _read(path, shown)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError([_problem(shown, line, column, "(file)",
                                    f"not UTF-8 (byte 0x{data[e.start]:02x})")]) from None
    loader: _Loader | None = None
    try:
        loader = _Loader(text)  # checks every character first
        node = loader.get_single_node()
        lines = {} if node is None else _lines(node, shown)
        document = None if node is None else loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 0)
        problem = e.problem or e.context or "malformed"
        if e.problem and e.context:
            problem = f"{e.problem} ({e.context})"
        raise ConfigError([_problem(shown, line, column or None, "invalid YAML", problem)]) \
            from None
    except yaml.reader.ReaderError as e:
        before = text[:e.position]
        line = before.count("\n") + 1
        column = e.position - (before.rfind("\n") + 1) + 1
        character = e.character if isinstance(e.character, int) else 0
        raise ConfigError([_problem(shown, line, column, "invalid YAML",
                                    f"character #x{character:04x} is not allowed")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([_problem(shown, 1, None, "invalid YAML", str(e))]) from None
    finally:
        if loader is not None:
            loader.dispose()
    return document, lines


def _validate(model: type[M], data: Any, shown: str, lines: Mapping[Where, int],
              shared: dict[Any, Any] | None = None) -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([_problem(shown, 1, None, "(file)", "expected a mapping of settings, "
                                    f"got {type(data).__name__}")])
    try:
        return model.model_validate(data, context={SHARED: shared})
    except ValidationError as e:
        problems: list[tuple[int, str]] = []
        for err in e.errors():
            loc = tuple(err["loc"])
            if len(loc) > 1 and loc[0] == "backend" and loc[1] in ("sim", "vfio"):
                loc = (loc[0], *loc[2:])  # drop pydantic's union-tag step: not a YAML key
            line = 1
            for n in range(len(loc), -1, -1):
                if loc[:n] in lines:
                    line = lines[loc[:n]]
                    break
            field = ".".join(_key(p) for p in loc) or "(file)"
            problems.append((line, _problem(shown, line, None, field, _message(err))))
        raise ConfigError([text for _, text in sorted(problems)]) from e


_KEY = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def _key(part: object) -> str:
    """A step of a field's path; an odd key (spaces, colons, any length) is quoted."""
    text = str(part)
    return text if _KEY.match(text) else _show(text).replace(" ", "\\x20").replace(":", "\\x3a")


def _message(err: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "missing":
        return "required setting is missing"
    if kind == "value_error":
        return str(msg).removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        return f"unknown backend type {_show(err['input'].get('type'))} (expected sim or vfio)" \
            if isinstance(err.get("input"), dict) else str(msg)
    return f"{msg} (got {_show(err['input'])})" if "input" in err and not isinstance(
        err["input"], dict | list) else str(msg)


@dataclass(frozen=True)
class Config:
    """Everything ``eoid run`` needs: the daemon settings and the devices, by name."""

    path: Path
    daemon: DaemonConfig
    devices: dict[str, DeviceConfig]


def load_device(path: Path, shown: str | None = None,
                shared: dict[Any, Any] | None = None) -> DeviceConfig:
    """Load one device file; its name defaults to the file's stem. Settings equal to ones
    in ``shared`` are taken from there, and new ones added (see ``_Strict``)."""
    shown = shown or str(path)
    data, lines = _load_yaml(path, shown)
    if data is None:
        data = {}
    if isinstance(data, dict) and "name" not in data:
        data = {"name": path.stem, **data}
    return _validate(DeviceConfig, data, shown, lines, shared)


def load_daemon_config(path: Path) -> DaemonConfig:
    """eoid.yaml's daemon settings alone: what a client needs to find the daemon's socket,
    whatever state the device files are in."""
    data, lines = _load_yaml(path, str(path))
    return _validate(DaemonConfig, data, str(path), lines)


def load_config(path: Path) -> Config:
    """Load and validate the whole configuration, collecting every problem before failing."""
    data, lines = _load_yaml(path, str(path))
    daemon = _validate(DaemonConfig, data, str(path), lines)
    problems: list[str] = []
    devices: dict[str, DeviceConfig] = {}
    where: dict[str, str] = {}
    devices_dir = path.parent / daemon.devices_dir
    try:
        files = sorted(devices_dir.glob("*.yaml")) + sorted(devices_dir.glob("*.yml")) \
            if devices_dir.is_dir() else None
    except OSError as e:  # a name too long, say: is_dir() ignores only some errors
        files, reason = None, f"cannot read {devices_dir}: {e.strerror}"
    else:
        reason = f"{devices_dir} is not a directory"
    if files is None:
        raise ConfigError([_problem(str(path), lines.get(("devices_dir",), 1), None,
                                    "devices_dir", reason)])
    pci_seen: dict[str, str] = {}
    shared: dict[Any, Any] = {}
    for file in files:
        shown = str(file)
        try:
            device = load_device(file, shown, shared)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        if device.name in devices:
            problems.append(_problem(shown, 1, None, "name", f"{device.name!r} is already "
                                     f"used by {where[device.name]}"))
            continue
        if device.backend.type == "vfio" and device.pci_address in pci_seen:
            problems.append(_problem(shown, 1, None, "pci_address", f"{device.pci_address} is "
                                     f"already used by {pci_seen[device.pci_address]}"))
            continue
        pci_seen[device.pci_address] = shown
        devices[device.name] = device
        where[device.name] = shown
    if problems:
        raise ConfigError(problems)
    return Config(path=path, daemon=daemon, devices=devices)
