"""What a device runner needs of its consumer (a VMM on the control socket, in practice).

The runner decides who may hold a device and tells the holder what happens to it; how
that reaches the VMM (JSON on the control socket) is ``eoid.control``'s business.
"""

from __future__ import annotations

from typing import Protocol


class Consumer(Protocol):
    """A peer that may hold devices, identified by the kernel."""

    pid: int
    uid: int
    gids: frozenset[int]
    attached: set[str]
    """The devices it holds (kept by the runners)."""

    def describe(self) -> dict[str, int]:
        """Who it is, for logs and status."""
        ...

    def device_event(self, event: str, device: str, reason: str | None = None) -> None:
        """Tell it, best effort, that ``device`` went down, reported an error or was
        taken from it (``device_down``, ``device_error``, ``detached``)."""
        ...
