"""The INTx state machine: each rule of DESIGN.md §2, then a stateful model check."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from eoid.channel import (
    EOI_TIMEOUT,
    FORWARD,
    STORM_BEGIN,
    STORM_END,
    TIMER,
    UNMASK,
    Channel,
    State,
)
from eoid.config import EoiTimeoutPolicy, Policy, StormPolicy

MS = 1_000_000
S = 1_000_000_000


def policy(**kw: object) -> Policy:
    storm = kw.pop("storm", {})
    return Policy.model_validate({"eoi_timeout": "100ms", **kw, "storm": {
        "max_rate": 1000, "burst": 10, "backoff_initial": "1ms", "backoff_max": "64ms",
        "recovery": "1s", **storm}})  # type: ignore[dict-item]


def state(ch: Channel) -> State:
    """Read through a call, so that mypy does not narrow the state across transitions."""
    return ch.state


def armed(p: Policy | None = None, attached: bool = True) -> Channel:
    ch = Channel(p or policy())
    ch.enable(0)
    if attached:
        ch.attach(0)
    return ch


def test_interrupt_is_forwarded_once_and_eoi_unmasks_once() -> None:
    ch = armed()
    assert ch.trigger(1, 10) == FORWARD | TIMER
    assert state(ch) is State.PENDING
    assert ch.timer_at == 10 + 100 * MS
    assert ch.eoi(1, 50) == UNMASK | TIMER
    assert state(ch) is State.ARMED
    assert ch.timer_at is None
    assert (ch.stats.interrupts, ch.stats.eois, ch.stats.spurious_eois) == (1, 1, 0)
    assert ch.stats.service.count == 1
    assert ch.stats.service.sum_ns == 40


def test_coalesced_triggers_are_counted_not_lost() -> None:
    ch = armed()
    assert ch.trigger(3, 0) & FORWARD
    assert (ch.stats.interrupts, ch.stats.coalesced_interrupts) == (3, 2)


@pytest.mark.parametrize("state_setup", ["armed", "held", "throttled", "down"])
def test_eoi_with_nothing_pending_is_spurious_and_unmasks_nothing(state_setup: str) -> None:
    ch = armed(attached=state_setup != "held")
    if state_setup == "held":
        ch.trigger(1, 0)
    elif state_setup == "throttled":
        ch.set_policy(policy(storm={"burst": 1, "max_rate": 1}))
        for now in (0, 1):  # the second interrupt within a second exceeds 1/s
            ch.trigger(1, now)
            ch.eoi(1, now)
        assert ch.state is State.THROTTLED
    elif state_setup == "down":
        ch.disable()
    before = ch.stats.spurious_eois
    assert ch.eoi(2, 5) & UNMASK == 0
    assert ch.stats.spurious_eois == before + 2


def test_unmask_on_spurious_is_a_policy() -> None:
    ch = armed(policy(unmask_on_spurious=True))
    assert ch.eoi(1, 0) == UNMASK
    assert ch.stats.spurious_eois == 1


@pytest.mark.parametrize(("on_timeout", "expected", "state"), [
    (EoiTimeoutPolicy.WARN, EOI_TIMEOUT | TIMER, State.PENDING),
    (EoiTimeoutPolicy.UNMASK, UNMASK | EOI_TIMEOUT | TIMER, State.ARMED),
    (EoiTimeoutPolicy.REDELIVER, FORWARD | EOI_TIMEOUT | TIMER, State.PENDING),
])
def test_eoi_timeout_policies(on_timeout: EoiTimeoutPolicy, expected: int,
                              state: State) -> None:
    ch = armed(policy(on_eoi_timeout=on_timeout))
    ch.trigger(1, 0)
    assert ch.timer(50 * MS) == TIMER  # too early: nothing happens, wait on
    assert ch.timer(100 * MS) == expected
    assert ch.state is state
    assert ch.stats.eoi_timeouts == 1
    if on_timeout is EoiTimeoutPolicy.WARN:
        assert ch.stuck and ch.timer_at is None
        assert ch.eoi(1, 5 * S) == UNMASK | TIMER  # a late EOI still ends it
        assert not ch.stuck
    if on_timeout is EoiTimeoutPolicy.REDELIVER:
        assert ch.timer_at == 200 * MS


def test_detach_while_pending_holds_and_attach_redelivers() -> None:
    ch = armed()
    ch.trigger(1, 0)
    assert ch.detach() == TIMER
    assert state(ch) is State.HELD
    assert ch.timer_at is None
    assert ch.eoi(1, 1) == 0  # nobody should EOI now; it is spurious
    assert ch.attach(10) == FORWARD | TIMER
    assert state(ch) is State.PENDING and ch.pending_since == 10


def test_interrupt_with_no_consumer_is_held_masked() -> None:
    ch = armed(attached=False)
    assert ch.trigger(1, 0) == TIMER
    assert ch.state is State.HELD
    assert ch.trigger(1, 1) == 0  # a re-signal while held changes nothing
    assert ch.attach(5) & FORWARD


def test_storm_throttles_with_backoff_logs_once_and_recovers() -> None:
    ch = armed(policy(storm={"max_rate": 1000, "burst": 2, "backoff_initial": "1ms",
                             "backoff_max": "4ms", "recovery": "10ms"}))
    now, throttles, begins = 0, [], 0
    for _ in range(12):  # a line that re-fires at once, 10 µs a round trip
        ch.trigger(1, now)
        actions = ch.eoi(1, now + 10_000)
        now += 10_000
        if ch.state is State.THROTTLED:
            assert actions & UNMASK == 0
            begins += bool(actions & STORM_BEGIN)
            assert ch.timer_at is not None
            delay = ch.timer_at - now
            throttles.append(delay)
            now = ch.timer_at
            assert ch.timer(now) == UNMASK | TIMER
        else:
            assert actions & UNMASK
    assert begins == 1 and ch.in_storm
    assert throttles[0] >= 1 * MS
    assert max(throttles) <= 4 * MS
    assert ch.stats.storm_throttles == len(throttles)
    # rate never exceeds max_rate: 12 interrupts need at least (12 - burst) ms
    assert now >= (12 - 2) * MS
    # quiet for longer than the recovery period: the next EOI ends the episode
    ch.trigger(1, now + 50 * MS)
    assert ch.eoi(1, now + 51 * MS) == UNMASK | TIMER | STORM_END
    assert not ch.in_storm


def test_policy_reload_applies_in_place() -> None:
    ch = armed()
    ch.trigger(1, 0)
    ch.set_policy(policy(eoi_timeout="5s"))
    assert ch.state is State.PENDING
    ch.trigger(1, 1)
    assert ch.timer_at == 1 + 5 * S


# --- the stateful check against the kernel's level-triggered semantics --------------


class KernelLine:
    """vfio-pci's INTx as docs/intx-eoi.md §1-2 describe it, plus the device's level."""

    def __init__(self) -> None:
        self.level = 0  # device events pending: the line is asserted while > 0
        self.masked = False
        self.trigger = 0  # the trigger eventfd's counter
        self.fires = 0

    def device_raise(self) -> None:
        self.level += 1
        if not self.masked:
            self._fire()

    def unmask(self) -> None:
        if self.masked:
            if self.level:
                self._fire()
            else:
                self.masked = False

    def _fire(self) -> None:
        self.masked = True
        self.trigger += 1
        self.fires += 1


class System:
    """Kernel line + channel + the loop shell's rules + one consumer, all in memory."""

    def __init__(self, p: Policy) -> None:
        self.kernel = KernelLine()
        self.ch = Channel(p)
        self.ch.enable(0)
        self.now = 0
        self.irq = 0  # the consumer's irq eventfd counter
        self.eoi = 0  # the EOI eventfd counter
        self.attached = False
        self.outstanding = False  # the consumer read an irq it has not ended yet
        self.reads = {"trigger": 0, "eoi": 0}
        self.handled = 0

    def act(self, actions: int) -> None:
        if actions & FORWARD:
            self.irq += 1
        if actions & UNMASK:
            self.kernel.unmask()

    def read_trigger(self) -> None:
        n, self.kernel.trigger = self.kernel.trigger, 0
        if n:
            self.reads["trigger"] += n
            self.act(self.ch.trigger(n, self.now))

    def read_eoi(self) -> None:
        n, self.eoi = self.eoi, 0
        if n and self.ch.adopting:
            self.read_trigger()
        if n:
            self.reads["eoi"] += n
            self.act(self.ch.eoi(n, self.now))

    def attach(self) -> None:
        self.read_trigger()
        self.read_eoi()
        self.irq = 0
        self.attached = True
        self.act(self.ch.attach(self.now))

    def detach(self) -> None:
        self.read_trigger()
        self.read_eoi()
        self.attached = False
        self.outstanding = False
        self.act(self.ch.detach())
        self.irq = 0

    def advance(self, dt: int) -> None:
        self.now += dt
        if self.ch.timer_at is not None and self.now >= self.ch.timer_at:
            self.read_trigger()
            if self.ch.timer_at is not None and self.now >= self.ch.timer_at:
                self.act(self.ch.timer(self.now))

    def service(self) -> None:
        """A well-behaved guest: take the irq, service the device, EOI."""
        if self.irq or self.outstanding:
            self.irq = 0
            self.outstanding = False
            self.handled += self.kernel.level
            self.kernel.level = 0
            self.eoi += 1

    def settle(self) -> None:
        """Attach a good consumer and let time pass until nothing more happens."""
        if not self.attached:
            self.attach()
        for _ in range(10_000):
            self.read_trigger()
            self.service()
            self.read_eoi()
            if self.ch.timer_at is not None:
                self.advance(max(0, self.ch.timer_at - self.now))
            elif not (self.irq or self.eoi or self.kernel.trigger):
                return
        raise AssertionError("the system never settled")


policies = st.builds(
    lambda on_timeout, spurious, rate, burst: policy(
        on_eoi_timeout=on_timeout, unmask_on_spurious=spurious,
        storm={"max_rate": rate, "burst": burst}),
    st.sampled_from(list(EoiTimeoutPolicy)), st.booleans(),
    st.sampled_from([10.0, 1000.0, 1e6]), st.integers(1, 5))


class ChannelMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sys: System | None = None

    @precondition(lambda self: self.sys is None)
    @rule(p=policies)
    def start(self, p: Policy) -> None:
        self.sys = System(p)

    def _s(self) -> System:
        assert self.sys is not None
        return self.sys

    @precondition(lambda self: self.sys is not None)
    @rule()
    def device_raises(self) -> None:
        self._s().kernel.device_raise()

    @precondition(lambda self: self.sys is not None)
    @rule()
    def guest_services_device(self) -> None:
        s = self._s()
        s.handled += s.kernel.level
        s.kernel.level = 0

    @precondition(lambda self: self.sys is not None)
    @rule()
    def loop_reads_trigger(self) -> None:
        self._s().read_trigger()

    @precondition(lambda self: self.sys is not None)
    @rule(n=st.integers(1, 3))
    def consumer_writes_eoi(self, n: int) -> None:
        self._s().eoi += n

    @precondition(lambda self: self.sys is not None)
    @rule()
    def loop_reads_eoi(self) -> None:
        self._s().read_eoi()

    @precondition(lambda self: self.sys is not None)
    @rule()
    def consumer_takes_irq(self) -> None:
        """The guest reads its irq; it may end it later, or never."""
        s = self._s()
        if s.irq:
            s.irq = 0
            s.outstanding = True

    @precondition(lambda self: self.sys is not None and not self.sys.attached)
    @rule()
    def consumer_attaches(self) -> None:
        self._s().attach()

    @precondition(lambda self: self.sys is not None and self.sys.attached)
    @rule()
    def consumer_detaches(self) -> None:
        self._s().detach()

    @precondition(lambda self: self.sys is not None)
    @rule()
    def daemon_restarts(self) -> None:
        """eoid is killed and restarted: kernel, eventfds and consumer stay (fd store)."""
        s = self._s()
        s.ch = Channel(s.ch.policy)
        s.ch.attached = s.attached
        n, s.kernel.trigger = s.kernel.trigger, 0
        m, s.eoi = s.eoi, 0
        s.reads = {"trigger": n, "eoi": m}
        s.act(s.ch.adopt(n, m, s.now))

    @precondition(lambda self: self.sys is not None)
    @rule(dt=st.sampled_from([1, 1000, MS, 50 * MS, 150 * MS, 2 * S]))
    def time_passes(self, dt: int) -> None:
        self._s().advance(dt)

    @invariant()
    def masked_while_waiting(self) -> None:
        """PENDING, HELD and THROTTLED all mean "the line is masked": nothing can fire
        behind the guest's back. (An unmask on a spurious EOI can race an unread trigger,
        which is why that policy is off by default.)"""
        s = self.sys
        if s is None or s.ch.policy.unmask_on_spurious or s.ch.adopting:
            return
        if s.ch.state in (State.PENDING, State.HELD, State.THROTTLED):
            assert s.kernel.masked
        if s.ch.state is State.ARMED and s.kernel.masked:
            assert s.kernel.trigger > 0  # masked only by a fire we have not read yet

    @invariant()
    def counters_match_what_was_read(self) -> None:
        s = self.sys
        if s is None:
            return
        assert s.ch.stats.interrupts == s.reads["trigger"]
        assert s.ch.stats.eois == s.reads["eoi"]
        assert s.ch.stats.spurious_eois <= s.ch.stats.eois

    @invariant()
    def never_wedged(self) -> None:
        """Whatever happened, a consumer that from now on ends what it takes, and the
        passing of time, service every device event and leave the line unmasked: no
        interrupt is lost or stuck. (A consumer that never ends an interrupt it took is
        the EOI-timeout policies' business: see ``test_eoi_timeout_policies``.)"""
        if self.sys is None:
            return
        s = copy.deepcopy(self.sys)
        s.settle()
        assert s.kernel.level == 0
        assert not s.kernel.masked
        assert s.ch.state is State.ARMED


ChannelMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30,
                                            deadline=None)
TestChannelAgainstKernelModel = ChannelMachine.TestCase


@given(st.lists(st.integers(1, 5), min_size=1, max_size=50))
def test_every_eoi_of_a_pending_interrupt_unmasks_exactly_once(counts: list[int]) -> None:
    ch = armed(policy(storm={"max_rate": 1e9, "burst": 1000}))
    unmasks = 0
    for i, n in enumerate(counts):
        assert ch.trigger(n, i * 10) & FORWARD
        unmasks += bool(ch.eoi(1, i * 10 + 5) & UNMASK)
    assert unmasks == len(counts)
    assert ch.stats.coalesced_interrupts == sum(n - 1 for n in counts)


def test_storm_policy_validation() -> None:
    with pytest.raises(ValueError, match="backoff_max is shorter"):
        StormPolicy.model_validate({"backoff_initial": "1s", "backoff_max": "1ms"})


# --- the kernel's path (datapath: kernel) ------------------------------------------------


def test_to_kernel_from_armed_or_pending_owes_nothing() -> None:
    for fire in (False, True):
        ch = armed()
        if fire:
            ch.trigger(1, 0)  # pending: its EOI will reach the kernel's unmask
        assert ch.to_kernel() == TIMER
        assert (state(ch), ch.timer_at, ch.stuck) == (State.KERNEL, None, False)


def test_to_kernel_unmasks_a_throttled_line_and_ends_the_storm() -> None:
    ch = armed(policy(storm={"burst": 1, "max_rate": 1}))
    ch.trigger(1, 0)
    ch.eoi(1, 1)
    ch.trigger(1, 2)
    assert ch.eoi(1, 3) & STORM_BEGIN
    assert state(ch) is State.THROTTLED
    assert ch.to_kernel() == UNMASK | TIMER | STORM_END
    assert not ch.in_storm


def test_to_kernel_delivers_an_interrupt_held_for_nobody() -> None:
    ch = armed(attached=False)
    ch.trigger(1, 0)
    assert state(ch) is State.HELD
    assert ch.to_kernel() & FORWARD


def test_a_fire_read_on_the_kernel_path_is_forwarded_and_counted() -> None:
    ch = armed()
    ch.to_kernel()
    assert ch.trigger(2, 5) == FORWARD
    assert state(ch) is State.KERNEL
    assert (ch.stats.interrupts, ch.stats.coalesced_interrupts) == (2, 1)
    assert ch.lend() is None  # the fast path never runs a line on the kernel's path


@pytest.mark.parametrize(("triggers", "eois", "actions", "after"), [
    (1, 0, FORWARD | TIMER, State.PENDING),  # fired after the swap: deliver
    (1, 1, FORWARD | TIMER, State.PENDING),  # the EOI beside it cannot be for it
    (0, 1, UNMASK | TIMER, State.ARMED),  # an EOI alone ended what the kernel carried
    (0, 0, TIMER, State.PENDING),  # nothing known: wait eoi_timeout, then unmask
])
def test_from_kernel_reconciles_as_after_a_restart(triggers: int, eois: int, actions: int,
                                                   after: State) -> None:
    ch = armed()
    ch.to_kernel()
    assert ch.from_kernel(triggers, eois, 10 * MS) == actions
    assert state(ch) is after
    if not triggers and not eois:
        assert ch.adopting and ch.timer_at == 110 * MS
        assert ch.timer(110 * MS) == UNMASK | TIMER
        assert ch.stats.eoi_timeouts == 0  # not an interrupt we timed
