"""Configuration: the daemon's ``eoid.yaml`` and one ``devices.d/<name>.yaml`` per device.

Models are pydantic v2 with ``extra="forbid"``, so a typo is an error rather than a
silently ignored setting. YAML is composed into nodes first so that every error can
name the file, the line and the field: ``devices.d/nic0.yaml:4: pci_address: …``.
"""

from __future__ import annotations

import enum
import grp
import pwd
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar

import yaml
from pydantic import (
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

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)\s*$")
_NS_PER_UNIT = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9,
                "h": 3600 * 10**9}


def parse_duration(value: object) -> int:
    """``'500us'`` → 500000 (nanoseconds). A bare number is refused: its unit would be a guess."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return round(float(m.group(1)) * _NS_PER_UNIT[m.group(2)])
    raise ValueError(f"{value!r} is not a duration (a number and a unit: 500us, 10ms, 2s, 1m)")


Duration = Annotated[int, BeforeValidator(parse_duration), Field(gt=0)]
"""A positive duration in nanoseconds, written with a unit in YAML."""


def format_duration(ns: int) -> str:
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if ns >= scale and ns % scale == 0:
            return f"{ns // scale}{unit}"
    return f"{ns}ns"


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


def _uid(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise ValueError(f"no such user {value!r}") from None
    raise ValueError(f"{value!r} is not a user name or uid")


def _gid(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ValueError(f"no such group {value!r}") from None
    raise ValueError(f"{value!r} is not a group name or gid")


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
    socket: Path = Path("/run/eoid/control.sock")
    socket_mode: Annotated[int, BeforeValidator(lambda v: int(v, 8) if isinstance(v, str) else v)]\
        = 0o660
    socket_group: Gid | None = None
    status: Access | None = None
    """Who may ask for ``status``; unset: anyone who can connect to the socket."""
    max_message_bytes: int = Field(default=65536, ge=1024, le=1 << 20)

    @field_validator("socket_mode")
    @classmethod
    def _mode(cls, v: int) -> int:
        if not 0 <= v <= 0o777:
            raise ValueError(f"{oct(v)} is not a file mode (e.g. '0660')")
        return v


class MetricsConfig(_Strict):
    listen: str | None = "127.0.0.1:9466"
    """``host:port`` for ``/metrics`` (``:port``: every interface); null turns it off."""
    per_device_histograms: Literal["none", "service", "all"] = "service"
    """Histograms exported per device; the others are daemon-wide (see README, Metrics)."""
    service_buckets: tuple[Duration, ...] = SERVICE_BUCKETS_NS
    overhead_buckets: tuple[Duration, ...] = BUCKETS_NS
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


class SimConfig(_Strict):
    socket: Path = Path("/run/eoid/sim.sock")
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

    max_rate: float = Field(default=10_000, gt=0)
    burst: int = Field(default=100, ge=1)
    backoff_initial: Duration = parse_duration("1ms")
    backoff_max: Duration = parse_duration("1s")
    recovery: Duration = parse_duration("2s")
    """An episode ends after this long without throttling; the backoff then resets."""

    @model_validator(mode="after")
    def _backoff(self) -> StormPolicy:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max is shorter than backoff_initial")
        return self


class Policy(_Strict):
    eoi_timeout: Duration = parse_duration("2s")
    on_eoi_timeout: EoiTimeoutPolicy = EoiTimeoutPolicy.UNMASK
    unmask_on_spurious: bool = False
    """Off by default: a spurious EOI racing an unread trigger would unmask a line whose
    interrupt has not been delivered yet. The EOI timeout covers a really lost EOI."""
    storm: StormPolicy = StormPolicy()


class SimBackend(_Strict):
    type: Literal["sim"]
    line: str | None = None
    """The simulated line's name; defaults to the device's name."""
    socket: Path | None = None
    """Overrides the daemon's ``sim.socket``."""


class VfioBackend(_Strict):
    type: Literal["vfio"]
    share_device_fd: bool = False
    """Hand the attached consumer a dup of the VFIO device fd (a VFIO group can be open
    in one process only, so a VMM that takes a pre-opened fd gets it from us)."""
    register_request_irqs: bool = True


class DeviceConfig(_Strict):
    name: str
    pci_address: str
    backend: Annotated[SimBackend | VfioBackend, Field(discriminator="type")]
    consumers: Access = Access()
    policy: Policy = Policy()

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


def _node_lines(node: yaml.Node, path: tuple[str | int, ...] = ()) -> Iterator[
        tuple[tuple[str | int, ...], int]]:
    """Yield (path, 1-based line) for every value in a composed YAML document."""
    yield path, node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k = key.value
            yield (*path, k), key.start_mark.line + 1
            for sub, line in _node_lines(value, (*path, k)):
                if sub != (*path, k):
                    yield sub, line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _node_lines(item, (*path, i))


def _load_yaml(path: Path, shown: str) -> tuple[Any, dict[tuple[str | int, ...], int]]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{shown}: cannot read: {e.strerror}"]) from e
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        line = (e.problem_mark.line + 1) if e.problem_mark else 1
        raise ConfigError([f"{shown}:{line}: invalid YAML: {e.problem}"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"{shown}: invalid YAML: {e}"]) from e
    lines = dict(_node_lines(node)) if node is not None else {}
    return data, lines


def _validate(model: type[M], data: Any, shown: str,
              lines: Mapping[tuple[str | int, ...], int],
              shared: dict[Any, Any] | None = None) -> M:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{shown}:1: expected a mapping of settings, got {type(data).__name__}"])
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
            field = ".".join(str(p) for p in loc) or "(file)"
            problems.append((line, f"{shown}:{line}: {field}: {_message(err)}"))
        raise ConfigError([text for _, text in sorted(problems)]) from e


def _message(err: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "missing":
        return "required setting is missing"
    if kind == "value_error":
        return str(msg).removeprefix("Value error, ")
    if kind == "union_tag_invalid":
        return f"unknown backend type {err['input'].get('type')!r} (expected sim or vfio)" \
            if isinstance(err.get("input"), dict) else str(msg)
    return f"{msg} (got {err['input']!r})" if "input" in err and not isinstance(
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
    if isinstance(data, dict) and "name" not in data:
        data = {"name": path.stem, **data}
    return _validate(DeviceConfig, data, shown, lines, shared)


def load_config(path: Path) -> Config:
    """Load and validate the whole configuration, collecting every problem before failing."""
    data, lines = _load_yaml(path, str(path))
    daemon = _validate(DaemonConfig, data, str(path), lines)
    problems: list[str] = []
    devices: dict[str, DeviceConfig] = {}
    where: dict[str, str] = {}
    devices_dir = path.parent / daemon.devices_dir
    if not devices_dir.is_dir():
        raise ConfigError([f"{path}:{lines.get(('devices_dir',), 1)}: devices_dir: "
                           f"{devices_dir} is not a directory"])
    pci_seen: dict[str, str] = {}
    shared: dict[Any, Any] = {}
    for file in sorted(devices_dir.glob("*.yaml")) + sorted(devices_dir.glob("*.yml")):
        shown = str(file)
        try:
            device = load_device(file, shown, shared)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        if device.name in devices:
            problems.append(f"{shown}:1: name: {device.name!r} is already used by "
                            f"{where[device.name]}")
            continue
        if device.backend.type == "vfio" and device.pci_address in pci_seen:
            problems.append(f"{shown}:1: pci_address: {device.pci_address} is already used by "
                            f"{pci_seen[device.pci_address]}")
            continue
        pci_seen[device.pci_address] = shown
        devices[device.name] = device
        where[device.name] = shown
    if problems:
        raise ConfigError(problems)
    return Config(path=path, daemon=daemon, devices=devices)
