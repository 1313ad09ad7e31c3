"""Whatever ``check-config`` accepts, the daemon runs with: the real daemon, with every
numeric setting at its documented maximum and at its minimum (and the mixes that stretch the
storm limiter's int64 arithmetic most), attaches a consumer and relays interrupts on each."""

from __future__ import annotations

import subprocess
import sys
from functools import partial

from tests.helpers import Consumer, Env, environment, wait_until

MAX_ID = 2**32 - 2
DEVICES = {
    "dev0": ("policy: {eoi_timeout: 24h, on_eoi_timeout: redeliver, storm: {max_rate: 1e9, "
             "burst: 1000000, backoff_initial: 1h, backoff_max: 1h, recovery: 24h}}\n"
             f"consumers: {{uids: [{MAX_ID}], gids: [{MAX_ID}]}}\n"),
    "dev1": ("policy: {eoi_timeout: 1ms, on_eoi_timeout: warn, storm: {max_rate: 1, "
             "burst: 1, backoff_initial: 1us, backoff_max: 1us, recovery: 1ms}}\n"
             "consumers: {uids: [0], gids: [0]}\n"),
    # the bucket's largest debt (1e6 tokens of 1 s), backoffs from the least to the most
    "dev2": ("policy: {eoi_timeout: 24h, storm: {max_rate: 1, burst: 1000000, "
             "backoff_initial: 1us, backoff_max: 1h, recovery: 1ms}}\n"),
    # a token every nanosecond, a bucket of one
    "dev3": ("policy: {eoi_timeout: 1ms, on_eoi_timeout: warn, storm: {max_rate: 1e9, "
             "burst: 1, backoff_initial: 1h, backoff_max: 1h, recovery: 24h}}\n"),
}
ROUNDS = 3


def armed(env: Env, name: str) -> bool:
    return bool(env.device(name)["state"] == "armed")


def test_daemon_runs_with_every_setting_at_its_bounds() -> None:
    with environment(devices=0) as env:
        env.config.write_text(
            f"control: {{socket: {env.control}, socket_mode: '0777', "
            f"max_message_bytes: 1048576, status: {{uids: [{MAX_ID}], gids: [{MAX_ID}]}}}}\n"
            f"metrics: {{listen: '127.0.0.1:{env.port}'}}\n"
            f"sim: {{socket: {env.sim_socket}}}\n"
            "log: {format: json, level: debug}\n")
        for i, (name, policy) in enumerate(DEVICES.items()):
            env.write_device(name, policy, index=i)
        check = subprocess.run([sys.executable, "-m", "eoid.cli", "check-config", "-c",
                                str(env.config)], capture_output=True, text=True, timeout=60,
                               check=False)
        assert check.returncode == 0, check.stderr
        env.start_sim()
        daemon = env.start_daemon()
        for name in DEVICES:
            with Consumer(env.control, name) as vm:
                for _ in range(ROUNDS):
                    env.sim("raise", line=name)
                    assert vm.wait_irq() == 1, (name, env.log("daemon")[-2000:])
                    env.sim("ack", line=name)
                    vm.send_eoi()
                    # max_rate 1 with burst 1 defers the next unmask by up to a second
                    wait_until(partial(armed, env, name), 5, f"{name} re-armed")
            line = env.sim("stats")["lines"][name]
            assert (line["fires"], line["acked"], line["unmasks"]) == (ROUNDS,) * 3, line
        assert daemon.poll() is None
        assert "Traceback" not in env.log("daemon")
        assert "OverflowError" not in env.log("daemon")
