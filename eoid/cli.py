"""The ``eoid`` command line. It builds a configuration and calls into the package; no logic.

Exit codes follow sysexits.h where one fits: 0 ok, 1 failure, 2 usage, 69 the daemon is
unavailable (EX_UNAVAILABLE), 78 a bad configuration (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eoid import __version__
from eoid.config import Config, LogFormat, load_config, parse_duration
from eoid.errors import ConfigError, EoidError, ProtocolError
from eoid.stats import human_seconds

EX_OK, EX_FAIL, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 0, 1, 2, 69, 78
DEFAULT_CONFIG = Path(os.environ.get("EOID_CONFIG", "/etc/eoid/eoid.yaml"))


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG,
                   help=f"the daemon's eoid.yaml (default: {DEFAULT_CONFIG}, or $EOID_CONFIG)")


def _socket_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--socket", type=Path, help="the control socket (default: from the config)")


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
    parser.add_argument("--version", action="version", version=f"eoid {__version__}")
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
                       description="Ask the running daemon for every device's state.")
    _socket_args(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON reply")

    p = sub.add_parser("reload", help="make the running daemon reload its configuration")
    _socket_args(p)

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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = COMMANDS[args.command](args)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    except ProtocolError as e:
        print(f"eoid {args.command}: refused: {e} ({e.code})", file=sys.stderr)
        return EX_FAIL
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
    if args.socket is not None:
        return Path(args.socket)
    return load_config(args.config).daemon.control.socket


class DaemonUnavailable(EoidError):
    """Nobody answers on the control socket (exit 69)."""


def _ask(args: argparse.Namespace, op: str) -> dict[str, Any]:
    from eoid.control import ControlClient

    try:
        client = ControlClient(_control_path(args))
    except EoidError as e:
        raise DaemonUnavailable(f"{e} (is the daemon running?)") from e
    with client:
        return client.request(op)[0]


def cmd_status(args: argparse.Namespace) -> int:
    reply = _ask(args, "status")
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(render_status(reply))
    return EX_OK


def render_status(reply: dict[str, Any]) -> str:
    daemon = reply["daemon"]
    lines = [f"eoid {daemon['version']} pid {daemon['pid']}, up {daemon['uptime_seconds']:.0f}s,"
             f" config {daemon['config']}", ""]
    header = ("DEVICE", "STATE", "CONSUMER", "INTERRUPTS", "EOIS", "SPURIOUS", "TIMEOUTS",
              "THROTTLES", "SERVICE p99", "UNMASK p99")
    rows = [header]
    for d in reply["devices"]:
        c = d["counters"]
        state = d["state"] if d["up"] else f"down: {d['down_reason']}"
        state += " (stuck)" if d["stuck"] else ""
        state += " (storm)" if d["storm"] else ""
        consumer = f"pid {d['consumer']['pid']}" if d["consumer"] else "-"
        rows.append((d["name"], state, consumer, str(c["interrupts"]), str(c["eois"]),
                     str(c["spurious_eois"]), str(c["eoi_timeouts"]), str(c["storm_throttles"]),
                     human_seconds(d["service_p99_seconds"]),
                     human_seconds(d["unmask_p99_seconds"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def cmd_reload(args: argparse.Namespace) -> int:
    _ask(args, "reload")
    print("reload requested; see the daemon's log (or `eoid status`) for the result")
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
            "reload": cmd_reload, "devices": cmd_devices, "sim": cmd_sim, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
