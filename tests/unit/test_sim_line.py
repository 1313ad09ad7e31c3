"""The sim's line on the kernel's path (``SimLine.route``) against the kernel's semantics."""

from __future__ import annotations

import os

from eoid.device import drain_eventfd
from eoid.sim.line import SimLine


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _routed_line() -> tuple[SimLine, int, int, int]:
    """An enabled line on the kernel's path: (line, eoid's trigger, irq, eoi) as the
    daemon holds them (the line owns dup()s, as the sim owns what came in a message)."""
    line = SimLine("dev0")
    trigger, irq, eoi = _eventfd(), _eventfd(), _eventfd()
    line.enable(os.dup(trigger), _eventfd())
    line.route(os.dup(irq), os.dup(eoi))
    return line, trigger, irq, eoi


def test_an_eoi_written_while_bound_unmasks_even_if_unread_at_the_unbind() -> None:
    """The kernel's virqfd unmasks when the EOI is written; the sim reads it in its loop.
    An EOI still unread when the line is routed back must not be left to eoid (which
    would call it spurious and leave the line masked)."""
    line, trigger, irq, eoi = _routed_line()
    line.raise_()
    assert drain_eventfd(irq) == 1 and line.masked and line.kernel_fires == 1
    line.ack()
    os.eventfd_write(eoi, 1)  # the consumer's EOI; the sim's loop has not read it yet
    line.route(os.dup(trigger), -1)
    assert not line.masked and line.virqfd_unmasks == 1
    assert drain_eventfd(eoi) == 0  # nothing left for eoid to take as its own
    line.raise_()  # and the next interrupt comes to eoid
    assert drain_eventfd(trigger) == 1 and drain_eventfd(irq) == 0
    line.disable()
    _close(trigger, irq, eoi)


def test_an_unread_eoi_for_a_line_still_asserted_fires_on_the_route_it_came_on() -> None:
    line, trigger, irq, eoi = _routed_line()
    line.raise_(1)
    line.queue(1)  # a second event, presented once the first is acked
    assert drain_eventfd(irq) == 1
    line.ack()  # the queued event asserts the line again at once
    os.eventfd_write(eoi, 1)
    line.route(os.dup(trigger), -1)
    assert drain_eventfd(irq) == 1 and line.kernel_fires == 2  # the kernel's path's fire
    assert drain_eventfd(trigger) == 0 and line.masked
    line.disable()
    _close(trigger, irq, eoi)


def test_an_eoi_waiting_when_bound_unmasks_at_once() -> None:
    line = SimLine("dev0")
    trigger, irq, eoi = _eventfd(), _eventfd(), _eventfd()
    line.enable(os.dup(trigger), _eventfd())
    line.raise_()
    assert drain_eventfd(trigger) == 1 and line.masked
    line.ack()
    os.eventfd_write(eoi, 1)  # the EOI came before the switch reached the line
    line.route(os.dup(irq), os.dup(eoi))
    assert not line.masked and line.virqfd_unmasks == 1
    line.disable()
    _close(trigger, irq, eoi)
