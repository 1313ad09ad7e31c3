"""Type stubs of the C extension eoid/_fastpath.c (see its header comment)."""

from collections.abc import Callable, Sequence

TRIGGER: int
EOI: int
UNMASK: int
NO_TIME: int

def set_buckets(bounds_ns: Sequence[int], /) -> None: ...

FastState = tuple[int, int, int, int, int]
"""(state, pending_since, timer_at, tat, backoff); ``NO_TIME`` for no timer_at."""

Counts = tuple[int, int, int, int, int, int,
               tuple[int, ...], int, tuple[int, ...], int, tuple[int, ...], int]
"""interrupts, coalesced, eois, forwards, unmasks, forward errors, then the service,
dispatch and unmask histograms, each as (non-cumulative bucket counts, sum in ns)."""

class FastPath:
    state: int
    interrupts: int
    @property
    def fast(self) -> bool: ...
    def __init__(self, trigger_fd: int, irq_fd: int, eoi_fd: int,
                 slow: Callable[[int, int], None]) -> None: ...
    def on_trigger(self) -> None: ...
    def on_eoi(self) -> None: ...
    def take(self, state: int, pending_since: int, timer_at: int, tat: int, backoff: int,
             eoi_timeout: int, interval: int, limit: int, half: int, backoff_initial: int,
             loop_timer_at: int, /) -> None: ...
    def release(self) -> FastState | None: ...
    def set_unmask(self, fd: int, request: int = 0, arg: bytes = b"", /) -> None: ...
    def counts(self) -> Counts | None: ...
