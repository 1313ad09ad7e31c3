"""The ``eoid`` command line. It builds a configuration and calls into the package; no logic.

Exit codes follow sysexits.h where one fits: 0 ok, 1 failure (for ``status``: a device needs
attention), 2 usage, 69 the daemon is unavailable (EX_UNAVAILABLE), 77 not permitted
(EX_NOPERM), 78 a bad configuration (EX_CONFIG; for ``reload``: the daemon rejected it).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eoid import __version__
from eoid.config import Config, LogFormat, load_config, load_daemon_config, parse_duration
from eoid.errors import ConfigError, EoidError, ProtocolError
from eoid.stats import human_seconds

if TYPE_CHECKING:
    from eoid.control import ControlClient

EX_OK, EX_FAIL, EX_USAGE, EX_UNAVAILABLE, EX_NOPERM, EX_CONFIG = 0, 1, 2, 69, 77, 78
UNHEALTHY = ("down", "faulted", "abandoned")
"""Device states that make ``eoid status`` exit 1 (and a stuck interrupt does too)."""
DEFAULT_CONFIG = Path(os.environ.get("EOID_CONFIG", "/etc/eoid/eoid.yaml"))


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"the daemon's eoid.yaml (default: {DEFAULT_CONFIG}, or $EOID_CONFIG)")


def _socket_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--socket", type=Path, help="the control socket (default: from the config's "
                   "daemon settings; the device files are not read)")


def _misbehaviour_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("misbehaving devices (to see what eoid does about each)")
    g.add_argument("--stuck-line", action="append", default=[], metavar="DEVICE",
                   help="the device's line stays asserted: an interrupt storm")
    g.add_argument("--no-eoi", action="append", default=[], metavar="DEVICE",
                   help="the guest services the device but never sends the EOI")
    g.add_argument("--spurious-eoi", action="append", default=[], metavar="DEVICE",
                   help="the guest sends EOIs with nothing pending (100 per second)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eoid", description="Relay VFIO INTx interrupts and their EOIs between passthrough "
        "devices and their VMMs, and measure every step for Prometheus.")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show eoid's version and build, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon", description="Run the daemon in the "
                       "foreground (systemd Type=notify aware). SIGHUP reloads, SIGTERM stops.")
    _config_arg(p)
    p.add_argument("--log-format", choices=[f.value for f in LogFormat],
                   help="override the config's log.format")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    p = sub.add_parser("check-config", help="validate the configuration",
                       description="Validate eoid.yaml and every device file; print each "
                       "problem as file:line[:column]: field: message. Exit 0 if valid, 78 if not.")
    _config_arg(p)
    p.add_argument("--probe", action="store_true",
                   help="also check each VFIO device on this host (bound, INTx, IOMMU group)")

    p = sub.add_parser("status", help="show the running daemon's devices",
                       description="Ask the running daemon for every device's state and "
                       "the last reload's result. Exit 0 if every device relays, 1 if one "
                       "is down, faulted, abandoned or stuck (a monitoring check), 69 if "
                       "no daemon answers, 77 if not permitted.")
    _socket_args(p)
    p.add_argument("--json", action="store_true",
                   help="print the daemon's JSON reply (every page's devices in one list)")

    p = sub.add_parser("reload", help="make the running daemon reload its configuration",
                       description="Ask the running daemon to reload its configuration and "
                       "report the result: exit 0 if applied, 78 if the daemon rejected it "
                       "(its problems are printed; the running configuration stays).")
    _socket_args(p)

    p = sub.add_parser("reset", help="reset a device and reopen it",
                       description="Reset the device where its backend can "
                       "(VFIO_DEVICE_RESET), then reopen it: clears a fault (after a device "
                       "error) and drops an interrupt held for no consumer. Root or the "
                       "daemon's user only.")
    _socket_args(p)
    p.add_argument("device", help="the device's name")

    p = sub.add_parser("datapath", help="move a device between the relay and the kernel's path",
                       description="Put a device on the relay (eoid forwards, times and "
                       "polices every interrupt) or on the kernel's path (the consumer's "
                       "eventfds are the line's trigger and unmask: no eoid wake-up per "
                       "interrupt), live, until the next reload; 'configured' returns it to "
                       "its YAML's datapath. Root or the daemon's user only.")
    _socket_args(p)
    p.add_argument("device", help="the device's name")
    p.add_argument("datapath", choices=["relay", "kernel", "configured"])

    p = sub.add_parser("observe", help="relay a device on the kernel's path for a while",
                       description="Relay a device for DURATION (default 10s), so its "
                       "service times, EOI timeouts and storms are measured, then return "
                       "it to the kernel's path. Root or the daemon's user only.")
    _socket_args(p)
    p.add_argument("device", help="the device's name")
    p.add_argument("--for", dest="duration", default="10s", metavar="DURATION",
                   help="how long to relay (10ms to 1h; default 10s)")

    p = sub.add_parser("devices", help="list PCI devices usable with vfio-pci INTx",
                       description="List PCI devices bound to vfio-pci (and those that could "
                       "be), with IOMMU group, INTx pin, DisINTx and a ready device YAML.")
    p.add_argument("--json", action="store_true")
    p.add_argument("--sysfs", type=Path, default=Path("/sys"), help=argparse.SUPPRESS)

    p = sub.add_parser("sim", help="serve simulated devices (and guests)",
                       description="Serve the config's sim-backend devices on the sim socket, "
                       "generate load, and attach a simulated guest to each through the "
                       "control socket.")
    _config_arg(p)
    p.add_argument("--rate", type=float, default=100.0,
                   help="device events per second, per device (default 100)")
    p.add_argument("--service-time", default="50us",
                   help="the guests' service time per interrupt (default 50us)")
    p.add_argument("--no-guests", action="store_true", help="serve the devices only")
    _misbehaviour_args(p)

    p = sub.add_parser("demo", help="simulated devices, daemon and guests, live",
                       description="Start simulated devices, the daemon and simulated guests; "
                       "show a live per-device view and serve /metrics. With --duration and "
                       "--json, run unattended and print a reconciled summary (exit 0 only "
                       "if nothing was lost).")
    p.add_argument("--devices", type=int, default=4, help="number of devices (default 4)")
    p.add_argument("--rate", type=float, default=500.0,
                   help="interrupts per second per device (default 500)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--service-time", default="50us", help="guest service time (default 50us)")
    p.add_argument("--metrics-listen", default="127.0.0.1:9466",
                   help="where the daemon serves /metrics (default 127.0.0.1:9466)")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--json", action="store_true", help="print one JSON summary at the end")
    p.add_argument("--kill-daemon-every", type=float, default=None, metavar="S",
                   help="play systemd: SIGKILL the daemon every S seconds and restart it "
                   "with its fd store; nothing may be lost and no guest may re-attach")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="write the generated config and logs to DIR and keep them")
    _misbehaviour_args(p)
    return parser


class _Version(argparse.Action):
    """``--version``, worked out only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(build_description())
        parser.exit()


def build_description() -> str:
    """The version and what it was built and runs with (for bug reports)."""
    import platform
    from importlib import metadata

    from eoid import _fastpath

    def dist(name: str) -> str:
        try:
            return f"{name} {metadata.version(name)}"
        except metadata.PackageNotFoundError:
            return f"{name} missing"

    return "\n".join([
        f"eoid {__version__}",
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()} {platform.machine()}",
        f"fast path: {getattr(_fastpath, '__file__', '?')}",
        ", ".join(dist(n) for n in ("uvloop", "pydantic", "prometheus-client", "structlog")),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = COMMANDS[args.command](args)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EX_NOPERM if isinstance(e.__cause__, PermissionError) else EX_CONFIG
    except ProtocolError as e:
        print(f"eoid {args.command}: refused: {e} ({e.code})", file=sys.stderr)
        return EX_NOPERM if e.code == "forbidden" else EX_FAIL
    except NotPermitted as e:
        print(f"eoid {args.command}: {e}", file=sys.stderr)
        return EX_NOPERM
    except DaemonUnavailable as e:
        print(f"eoid {args.command}: {e}", file=sys.stderr)
        return EX_UNAVAILABLE
    except EoidError as e:
        print(f"eoid {args.command}: {e}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from eoid import log
    from eoid.daemon import run_daemon

    config = load_config(args.config)
    settings = config.daemon.log
    log.configure(args.log_format or settings.format, args.log_level or settings.level,
                  repeat_summary=settings.repeat_summary / 1e9,
                  pinned=[k for k in ("format", "level") if getattr(args, f"log_{k}")])
    faulthandler.enable()  # a watchdog kill (SIGABRT) leaves the wedged stack in the journal
    run_daemon(config)
    return EX_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    print(f"{args.config}: ok, {len(config.devices)} device(s): "
          + ", ".join(f"{d.name} ({d.backend.type} {d.pci_address})"
                      for d in config.devices.values()))
    if args.probe:
        return _probe(config)
    return EX_OK


def _probe(config: Config) -> int:
    from eoid.vfio.probe import probe_device

    failed = False
    for device in config.devices.values():
        if device.backend.type != "vfio":
            continue
        problems = probe_device(device.name, device.pci_address)
        for problem in problems:
            print(f"{device.name}: {problem}", file=sys.stderr)
        failed |= bool(problems)
        if not problems:
            print(f"{device.name}: {device.pci_address} ready")
    return EX_CONFIG if failed else EX_OK


def _control_path(args: argparse.Namespace) -> Path:
    """The control socket: ``--socket``, or eoid.yaml's daemon settings alone (a broken
    device file must not keep an operator from asking the daemon what is wrong)."""
    if args.socket is not None:
        return Path(args.socket)
    return load_daemon_config(args.config).control.socket


class DaemonUnavailable(EoidError):
    """Nobody answers on the control socket (exit 69)."""


class NotPermitted(EoidError):
    """The control socket (or the config) exists but this user may not use it (exit 77)."""


def _connect(args: argparse.Namespace) -> ControlClient:
    from eoid.control import ControlClient

    path = _control_path(args)
    try:
        return ControlClient(path)
    except EoidError as e:
        if isinstance(e.__cause__, PermissionError):
            raise NotPermitted(f"{e} (is this user in the daemon's group?)") from e
        raise DaemonUnavailable(f"{e} (is the daemon running?)") from e


def _ask(args: argparse.Namespace, op: str, **fields: Any) -> dict[str, Any]:
    with _connect(args) as client:
        return client.request(op, **fields)[0]


def _status(args: argparse.Namespace, device: str | None = None) -> dict[str, Any]:
    """The daemon's status, every page of it (or one device's)."""
    with _connect(args) as client:
        return client.status(device)


def unhealthy(reply: dict[str, Any]) -> list[str]:
    """The devices of a status reply that need attention, each with why."""
    return [f"{d['name']}: {d['state']}" + (" (stuck)" if d["stuck"] else "")
            for d in reply["devices"] if d["state"] in UNHEALTHY or d["stuck"]]


def cmd_status(args: argparse.Namespace) -> int:
    reply = _status(args)
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(render_status(reply))
    return EX_FAIL if unhealthy(reply) else EX_OK


def _render_reload(last: dict[str, Any] | None) -> str:
    if last is None:
        return "last reload: unknown (an older daemon)"
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last["at"]))
    if last["successful"]:
        return f"last reload: ok ({when})"
    more = f"; and {last['problems_omitted']} more" if last.get("problems_omitted") else ""
    return f"last reload: REJECTED ({when}), the previous configuration runs: " \
        + "; ".join(last["problems"]) + more


def render_status(reply: dict[str, Any]) -> str:
    daemon = reply["daemon"]
    lines = [f"eoid {daemon['version']} pid {daemon['pid']}, up {daemon['uptime_seconds']:.0f}s,"
             f" config {daemon['config']}", _render_reload(daemon.get("last_reload")), ""]
    header = ("DEVICE", "STATE", "CONSUMER", "INTERRUPTS", "EOIS", "SPURIOUS", "TIMEOUTS",
              "THROTTLES", "SERVICE p99", "UNMASK p99")
    rows = [header]
    for d in reply["devices"]:
        c = d["counters"]
        state = f"down: {d['down_reason']}" if d["state"] == "down" else d["state"]
        state += " (stuck)" if d["stuck"] else ""
        state += " (storm)" if d["storm"] else ""
        consumer = (f"pid {d['consumer']['pid']}" if d.get("consumer") else
                    "attached" if d.get("attached") else "-")  # who: operators only
        rows.append((d["name"], state, consumer, str(c["interrupts"]), str(c["eois"]),
                     str(c["spurious_eois"]), str(c["eoi_timeouts"]), str(c["storm_throttles"]),
                     human_seconds(d["service_p99_seconds"]),
                     human_seconds(d["unmask_p99_seconds"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    attention = unhealthy(reply)
    if attention:
        lines += ["", "needs attention: " + ", ".join(attention)]
    return "\n".join(lines)


def cmd_reload(args: argparse.Namespace) -> int:
    reply = _ask(args, "reload")
    if "successful" not in reply:  # an older daemon: it does not say
        print("reload requested; see the daemon's log (or `eoid status`) for the result")
        return EX_OK
    if not reply["successful"]:
        print("eoid reload: the daemon rejected the configuration; the previous one keeps "
              "running:", file=sys.stderr)
        for problem in reply["problems"]:
            print(problem, file=sys.stderr)
        if reply.get("problems_omitted"):
            print(f"... and {reply['problems_omitted']} more (all of them are in the daemon's "
                  "log; `eoid check-config` lists them too)", file=sys.stderr)
        return EX_CONFIG
    print("reloaded: " + ", ".join(f"{k} {', '.join(reply[k]) or '-'}"
                                   for k in ("added", "removed", "changed")))
    return EX_OK


RESET_WAIT = 10.0  # seconds ``eoid reset`` waits for a device that opens asynchronously


def cmd_reset(args: argparse.Namespace) -> int:
    import time

    reply = _ask(args, "reset", device=args.device)
    deadline = time.monotonic() + RESET_WAIT
    while reply.get("opening") and time.monotonic() < deadline:
        time.sleep(0.05)  # the daemon has no "tell me when opened": ask again
        reply = {**reply, **_status(args, args.device)["devices"][0]}
    how = "reset and reopened" if reply["reset"] else "reopened (its backend has no reset)"
    if not reply["up"]:
        print(f"eoid reset: {args.device}: {how}, but it is {reply['state']}: "
              f"{reply['down_reason'] or ''}".rstrip(": "), file=sys.stderr)
        return EX_FAIL
    print(f"{args.device}: {how}; {reply['state']}")
    return EX_OK


def _render_path(reply: dict[str, Any]) -> str:
    where = f"{reply['device']}: on the {reply['datapath']} path"
    if reply.get("moving_to"):  # the backend has not applied the switch yet (sim)
        where += f", moving to the {reply['moving_to']} path"
    if (reply.get("moving_to") or reply["datapath"]) != reply["wanted"]:
        why = ("observing" if reply["observing"] else
               "no consumer attached" if not reply["attached"] else
               "the device is not up and healthy")
        where += f" (wanted: {reply['wanted']}; {why})"
    return where


def cmd_datapath(args: argparse.Namespace) -> int:
    reply = _ask(args, "datapath", device=args.device, datapath=args.datapath)
    print(_render_path(reply))
    return EX_OK


def cmd_observe(args: argparse.Namespace) -> int:
    try:
        duration = parse_duration(args.duration)
    except ValueError as e:
        print(f"eoid observe: --for: {e}", file=sys.stderr)
        return EX_USAGE
    reply = _ask(args, "observe", device=args.device, seconds=duration / 1e9)
    print(_render_path(reply))
    return EX_OK


def cmd_devices(args: argparse.Namespace) -> int:
    from eoid.vfio.probe import list_devices, render_devices

    reports = list_devices(sysfs_root=args.sysfs)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print(render_devices(reports))
    return EX_OK


def misbehaviour(args: argparse.Namespace, name: str) -> dict[str, Any]:
    return {"stuck_line": name in args.stuck_line, "no_eoi": name in args.no_eoi,
            "spurious_eoi": 100.0 if name in args.spurious_eoi else 0.0}


def cmd_sim(args: argparse.Namespace) -> int:
    import asyncio

    import uvloop

    from eoid import log
    from eoid.sim.server import LineSpec, Misbehaviour, serve

    config = load_config(args.config)
    log.configure(config.daemon.log.format, config.daemon.log.level)
    service = parse_duration(args.service_time) if args.service_time != "0" else 0
    specs = [LineSpec(d.backend.line or d.name, d.name, args.rate, service,
                      Misbehaviour(**misbehaviour(args, d.name)))
             for d in config.devices.values() if d.backend.type == "sim"]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(config.daemon.sim.socket, specs,
                         None if args.no_guests else config.daemon.control.socket))
    return EX_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from eoid.demo import run_demo

    return run_demo(args)


COMMANDS = {"run": cmd_run, "check-config": cmd_check_config, "status": cmd_status,
            "reload": cmd_reload, "reset": cmd_reset, "datapath": cmd_datapath,
            "observe": cmd_observe, "devices": cmd_devices, "sim": cmd_sim,
            "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
