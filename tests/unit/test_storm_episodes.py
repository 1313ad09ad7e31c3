"""Storm episodes (issue 10, finding 8): one episode per storm, ended by quiet time."""

from __future__ import annotations

from eoid.channel import STORM_BEGIN, STORM_END, TIMER, UNMASK, Channel, State
from tests.unit.test_channel import MS, S, armed, policy


def storm(ch: Channel, now: int, rounds: int) -> tuple[int, int, int]:
    """A line that stays asserted: it re-fires at once after every unmask. Returns the
    time, and how many episodes began and ended."""
    begins = ends = 0
    for _ in range(rounds):
        ch.trigger(1, now)
        actions = ch.eoi(1, now + 10_000)
        now += 10_000
        begins += bool(actions & STORM_BEGIN)
        ends += bool(actions & STORM_END)
        if ch.state is State.THROTTLED:
            assert ch.timer_at is not None
            now = ch.timer_at
            actions = ch.timer(now)
            assert actions & UNMASK
            ends += bool(actions & STORM_END)
    return now, begins, ends


def test_a_line_asserted_for_minutes_is_one_episode() -> None:
    """backoff_max (10 s) longer than recovery (2 s): before, every deferral longer than
    recovery ended the episode at the next EOI, and the next throttle began another (24
    episodes in these 5 minutes)."""
    ch = armed(policy(storm={"max_rate": 1, "burst": 1, "backoff_initial": "1ms",
                             "backoff_max": "10s", "recovery": "2s"}))
    now, begins, ends = storm(ch, 0, 300)
    assert now > 300 * S
    assert (begins, ends) == (1, 0)
    assert ch.in_storm


def test_a_storm_ends_when_the_line_stays_quiet_for_recovery() -> None:
    """No interrupt after the storm: a timer ends the episode ``recovery`` after the last
    deferred unmask (before: flagged until the next interrupt)."""
    ch = armed(policy(storm={"max_rate": 1000, "burst": 2, "backoff_initial": "1ms",
                             "backoff_max": "4ms", "recovery": "10ms"}))
    now, begins, _ = storm(ch, 0, 12)
    assert begins == 1 and ch.in_storm and ch.state is State.ARMED
    assert ch.timer_at is not None and ch.timer_at <= now + 10 * MS
    assert ch.timer(ch.timer_at - 1) == TIMER  # not yet
    assert ch.timer(ch.timer_at) == TIMER | STORM_END
    assert not ch.in_storm
    assert ch.timer_at is None
