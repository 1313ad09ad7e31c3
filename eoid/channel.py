"""The INTx channel: one device's interrupt state machine, with no I/O.

The kernel's vfio-pci masks a level-triggered INTx line each time it fires and signals
the trigger eventfd once per assertion episode; the line stays masked until someone
unmasks it. eoid sits in the middle: it forwards each interrupt to the consumer (the
guest), waits for the guest's EOI, then unmasks. This module decides *what* to do for
each event; the loop shell (``eoid.runner``) does it.

Events are method calls with an injected ``now`` (monotonic nanoseconds); each returns
a bit set of actions. Allocation-free on the common path, because it runs per interrupt.

This module is the one place the rules are written. eoid/_fastpath.c repeats three of
them, for a line the runner lent it (``lend``: ARMED or PENDING, a consumer attached, not
stuck, no storm episode), and declines everything else back to here: ``trigger`` from
ARMED, or from PENDING while ``adopting`` (``fast_trigger``: forward, PENDING, the EOI
deadline, no longer adopting; declined when no loop timer covers that deadline), ``eoi``
from PENDING, not adopting, with a token to spare (``fast_eoi``: the GCRA of
``_take_token``, unmask, ARMED), and a spurious ``eoi`` while ARMED without
``unmask_on_spurious`` (counted only). Its ``ST_ARMED``/``ST_PENDING`` are
``State``'s values, and tests/unit/test_fastpath.py checks both: the constants, and the
rules against this module in a differential test with time passing.
"""

from __future__ import annotations

import enum
from bisect import bisect_left

from eoid.config import EoiTimeoutPolicy, Policy
from eoid.stats import BUCKETS_NS, DeviceStats


class State(enum.IntEnum):
    DOWN = 0  # not enabled: no trigger registered
    ARMED = 1  # line unmasked, waiting for the device
    PENDING = 2  # fired and forwarded; line masked until the consumer's EOI
    HELD = 3  # fired with no consumer attached; line stays masked until one attaches
    THROTTLED = 4  # EOI seen during a storm; the unmask is deferred by the backoff
    # What the runner shows instead of the channel's own state; the channel never enters
    # these (its line goes on as before underneath):
    FAULTED = 5  # the device reported an error: no unmask until it is reset or reopened
    ABANDONED = 6  # HELD for longer than ``policy.held_timeout``: no consumer came for it
    KERNEL = 7  # on the kernel's path (``to_kernel``): the consumer's eventfds are the line's
    # trigger and unmask, and whether an interrupt is pending is not eoid's to know


# Module-level aliases: cheaper to reach on the hot path than attributes of the enum class.
_DOWN, _ARMED, _PENDING, _HELD = State.DOWN, State.ARMED, State.PENDING, State.HELD
_KERNEL = State.KERNEL

# Actions, combined as bits.
FORWARD = 1  # signal the consumer's irq eventfd
UNMASK = 2  # re-enable the line
TIMER = 4  # ``timer_at`` changed: make sure ``timer()`` is called at (or after) it
STORM_BEGIN = 8  # a storm episode started: log it (once per episode)
STORM_END = 16  # the storm episode ended
EOI_TIMEOUT = 32  # an EOI deadline passed: log it
_FORWARD_TIMER = FORWARD | TIMER
_UNMASK_TIMER = UNMASK | TIMER


class Channel:
    """State of one INTx line as eoid sees it; see the module docstring."""

    __slots__ = ("_backoff", "_backoff_initial", "_eoi_timeout", "_episode", "_half",
                 "_interval", "_last_throttle", "_limit", "_tat", "adopting", "attached",
                 "pending_since", "policy", "state", "stats", "stuck", "timer_at")

    def __init__(self, policy: Policy, stats: DeviceStats | None = None) -> None:
        self.policy = policy
        self._prefetch()
        self.stats = stats if stats is not None else DeviceStats()
        self.state = State.DOWN
        self.attached = False
        self.timer_at: int | None = None
        self.pending_since = 0  # when the interrupt now pending (or held) was delivered
        self.stuck = False  # an EOI deadline passed and the policy kept waiting
        self._tat = 0  # the storm limiter's theoretical arrival time (see ``_take_token``)
        self._backoff = policy.storm.backoff_initial
        self._episode = False
        self._last_throttle = 0
        # Taken over after a restart, and not yet known whether an interrupt is pending
        # (see ``adopt``). A plain attribute: the shell reads it on every EOI.
        self.adopting = False

    # --- lifecycle ---------------------------------------------------------------------

    def enable(self, now: int) -> int:
        """The trigger is registered and the line unmasked."""
        self.state = State.ARMED
        self.timer_at = None
        self.stuck = False
        return TIMER

    def adopt(self, triggers: int, eois: int, now: int) -> int:
        """Take over a line that a previous eoid process left enabled (docs/intx-eoi.md §9).

        ``triggers`` and ``eois`` are what the eventfds accumulated meanwhile. A trigger
        means the line was armed and fired: deliver it (an EOI beside it cannot be for
        it, the consumer never saw it). An EOI alone ended the interrupt that was pending:
        unmask. Neither: the consumer may still be servicing an interrupt we forwarded
        before the restart, so wait for its EOI as if pending, and if none comes within
        ``eoi_timeout``, unmask anyway: an unmask of an unmasked line is a no-op. With no
        consumer, nothing can be owed: unmask now (a held line fires again).

        While ``adopting``, the line may in fact be unmasked, so the shell must read the
        trigger before it hands the channel an EOI."""
        self.enable(now)
        stats = self.stats
        if triggers:
            stats.eois += eois
            stats.spurious_eois += eois
            return self.trigger(triggers, now)
        stats.eois += eois
        if eois or not self.attached:  # an interrupt held for nobody needs no EOI
            return UNMASK | TIMER
        self.state = State.PENDING
        self.pending_since = now
        self.timer_at = now + self.policy.eoi_timeout
        self.adopting = True
        return TIMER

    def to_kernel(self) -> int:
        """Hand the line to the kernel's path (datapath ``kernel``, docs/intx-eoi.md §14):
        from now on the kernel signals the consumer and unmasks on its EOI. What eoid owes
        is done on the way out: a throttled line's deferred unmask (its EOI came), an
        interrupt held for nobody delivered. A pending interrupt (adopting or not) needs
        nothing: its EOI reaches the kernel's unmask. The storm policy does not follow
        the line there: an episode ends."""
        actions = TIMER
        if self.state == State.THROTTLED:
            actions |= UNMASK
        elif self.state == State.HELD:
            actions |= FORWARD
        if self._episode:
            actions |= self._end_episode()
        self.state = State.KERNEL
        self.timer_at = None
        self.stuck = self.adopting = False
        return actions

    def from_kernel(self, triggers: int, eois: int, now: int) -> int:
        """Take the line back from the kernel's path, with what the trigger and EOI
        eventfds hold once it is re-routed. Nothing is known of the line: the
        reconciliation is the one after a restart (``adopt``)."""
        return self.adopt(triggers, eois, now)

    def disable(self) -> int:
        self.state = State.DOWN
        self.timer_at = None
        self.stuck = False
        return TIMER

    def set_policy(self, policy: Policy) -> None:
        """Apply a (reloaded) policy in place; the line is not touched."""
        storm = policy.storm
        if storm != self.policy.storm:
            self._backoff = storm.backoff_initial
        self.policy = policy
        self._prefetch()

    def _prefetch(self) -> None:
        """What the hot path reads of the policy, as plain attributes."""
        storm = self.policy.storm
        self._eoi_timeout = self.policy.eoi_timeout
        self._interval = max(1, round(1e9 / storm.max_rate))  # ns one token takes to refill
        self._limit = storm.burst * self._interval
        self._half = self._limit // 2
        self._backoff_initial = storm.backoff_initial

    # --- the hot path --------------------------------------------------------------------

    def trigger(self, count: int, now: int) -> int:
        """The kernel signalled the trigger eventfd ``count`` times since the last read."""
        stats = self.stats
        stats.interrupts += count
        if count > 1:
            stats.coalesced_interrupts += count - 1
        state = self.state
        if state is _DOWN or state is _HELD:
            return 0  # DOWN: a stale signal; HELD: already waiting for a consumer
        if state is _KERNEL:
            return FORWARD  # signalled before the trigger was swapped: the kernel's to end
        self.pending_since = now
        self.stuck = self.adopting = False
        if not self.attached:
            self.state = _HELD
            self.timer_at = None
            return TIMER
        self.state = _PENDING
        self.timer_at = now + self._eoi_timeout
        return _FORWARD_TIMER

    def eoi(self, count: int, now: int) -> int:
        """The consumer (or KVM's resampler) signalled the EOI eventfd ``count`` times."""
        stats = self.stats
        stats.eois += count
        if self.state is not _PENDING:
            stats.spurious_eois += count
            if self.state is _ARMED and self.policy.unmask_on_spurious:
                return UNMASK
            return 0
        if self.adopting:
            self.adopting = False  # not an interrupt we timed: no service time
        else:
            elapsed = now - self.pending_since
            hist = stats.service
            hist.counts[bisect_left(BUCKETS_NS, elapsed)] += 1
            hist.sum_ns += elapsed
        self.stuck = False
        if self._take_token(now):
            self.state = _ARMED
            self.timer_at = None
            if self._episode:
                if now - self._last_throttle >= self.policy.storm.recovery:
                    return UNMASK | self._end_episode()
                self.timer_at = self._last_throttle + self.policy.storm.recovery
            return _UNMASK_TIMER
        return self._throttle(now)

    # --- timers and consumers ------------------------------------------------------------

    def timer(self, now: int) -> int:
        """Called at or after ``timer_at``: an EOI deadline or the end of a throttle."""
        if self.timer_at is None or now < self.timer_at:
            return TIMER  # re-scheduled since: just wait for the new time
        self.timer_at = None
        if self.state == State.THROTTLED:
            self.state = State.ARMED
            self.timer_at = self._last_throttle + self.policy.storm.recovery  # see _throttle
            return UNMASK | TIMER
        if self.state == State.ARMED and self._episode:  # quiet since: the storm is over
            return self._end_episode()
        if self.state != State.PENDING:
            return TIMER
        if self.adopting:
            self.adopting = False
            self.state = State.ARMED
            return UNMASK | TIMER
        self.stats.eoi_timeouts += 1
        action = self.policy.on_eoi_timeout
        if action == EoiTimeoutPolicy.UNMASK:
            self.state = State.ARMED
            return UNMASK | EOI_TIMEOUT | TIMER
        if action == EoiTimeoutPolicy.REDELIVER:
            self.timer_at = now + self.policy.eoi_timeout
            return FORWARD | EOI_TIMEOUT | TIMER
        self.stuck = True
        return EOI_TIMEOUT | TIMER

    def attach(self, now: int) -> int:
        """A consumer attached; a held interrupt is delivered to it now."""
        self.attached = True
        if self.state != State.HELD:
            return 0
        self.state = State.PENDING
        self.pending_since = now
        self.timer_at = now + self.policy.eoi_timeout
        return FORWARD | TIMER

    def detach(self) -> int:
        """The consumer left; an interrupt it had not ended is held for the next one."""
        self.attached = False
        if self.state != State.PENDING:
            return 0
        if self.adopting:  # nothing known to be pending: no consumer can still owe an EOI
            self.adopting = False
            self.state = State.ARMED
            self.timer_at = None
            return UNMASK | TIMER
        self.state = State.HELD
        self.timer_at = None
        self.stuck = False
        return TIMER

    # --- the fast path ---------------------------------------------------------------------

    def lend(self) -> tuple[int, int, int | None, int, int, bool] | None:
        """The state ``eoid._fastpath`` needs to run the common transitions itself (a
        trigger when ARMED or adopting, an EOI with a token to spare when PENDING, a
        spurious EOI): (state, pending_since, timer_at, tat, backoff, adopting), as
        ``FastPath.lend`` takes it; None where the rules are less simple: not ARMED or
        PENDING, no consumer, stuck, or in a storm episode. ``reclaim`` takes it back.
        Adopting is lent because a line back from the kernel's path (an observation
        window) is adopting until its first interrupt: the lane takes that one too."""
        state = self.state
        if (state is not _ARMED and state is not _PENDING) or not self.attached \
                or self.stuck or self._episode:
            return None
        return (state, self.pending_since, self.timer_at, self._tat, self._backoff,
                self.adopting)

    def fast_policy(self) -> tuple[int, int, int, int, int, bool]:
        """What the fast path needs of the policy, as ``FastPath.set_policy`` takes it
        (sent once, and again after ``set_policy``)."""
        return (self._eoi_timeout, self._interval, self._limit, self._half,
                self._backoff_initial, self.policy.unmask_on_spurious)

    def reclaim(self, state: int, pending_since: int, timer_at: int | None, tat: int,
                backoff: int, *, adopting: bool) -> None:
        """The state as the fast path left it (it counted into its own arrays)."""
        self.adopting = adopting
        self.state = State(state)
        self.pending_since = pending_since
        self.timer_at = timer_at
        self._tat = tat
        self._backoff = backoff

    # --- storm protection ----------------------------------------------------------------

    def _take_token(self, now: int) -> bool:
        """Spend one token of a bucket refilled at ``max_rate`` and holding ``burst``.

        Kept as GCRA (the "virtual scheduling" form of a token bucket): one integer,
        the theoretical arrival time ``_tat``; the bucket holds
        ``(limit - (tat - now)) / interval`` tokens. Integer arithmetic only, since it
        runs for every EOI. Every interrupt spends a token, a throttled one too (the
        bucket goes into debt until its deferred unmask), so the sustained rate never
        exceeds ``max_rate``. A bucket at least half full means the device is back under
        its limit: the backoff then starts again from ``backoff_initial``."""
        tat = self._tat
        if tat - now <= self._half:
            self._backoff = self._backoff_initial
            tat = max(tat, now)  # a full bucket holds no more than ``burst``
        tat += self._interval
        self._tat = tat
        return tat - now <= self._limit

    def _throttle(self, now: int) -> int:
        storm = self.policy.storm
        self.stats.storm_throttles += 1
        actions = TIMER
        if not self._episode:
            self._episode = True
            actions |= STORM_BEGIN
        repaid = self._tat - self._limit - now  # until the debt is paid
        self.state = State.THROTTLED
        self.timer_at = now + max(self._backoff, repaid)
        self._backoff = min(self._backoff * 2, storm.backoff_max)
        # Recovery counts from the deferred unmask, not from the EOI it deferred: a line
        # that stays asserted with a backoff longer than ``recovery`` is one episode, and
        # a line that goes quiet ends it ``recovery`` later (a timer), not at its next EOI.
        self._last_throttle = self.timer_at
        return actions

    def _end_episode(self) -> int:
        self._episode = False
        self._backoff = self.policy.storm.backoff_initial
        return TIMER | STORM_END

    @property
    def in_storm(self) -> bool:
        return self._episode

