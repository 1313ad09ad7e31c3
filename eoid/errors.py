"""One error hierarchy; the CLI turns each into a message and an exit code."""

from __future__ import annotations

import os


class EoidError(Exception):
    """Base of every error eoid raises on purpose."""


class ConfigError(EoidError):
    """One or more problems in the configuration, each ``file:line: field: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class DeviceError(EoidError):
    """A device operation failed; carries the device and, when known, the errno."""

    def __init__(self, device: str, op: str, message: str, errno: int | None = None) -> None:
        detail = f" ({os.strerror(errno)})" if errno is not None else ""
        super().__init__(f"{device}: {op}: {message}{detail}")
        self.device = device
        self.op = op
        self.errno = errno


class VfioError(DeviceError):
    """A VFIO ioctl or sysfs step failed."""


class ProtocolError(EoidError):
    """A control-socket peer sent something we refuse; ``code`` goes back to it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Refused(EoidError):
    """The daemon refuses a consumer's request; the control socket turns each kind into
    the protocol's error code (``eoid.control``), the runner only says what happened."""


class UnknownDevice(Refused):
    """No device by that name."""


class NotAllowed(Refused):
    """The device's ``consumers`` do not allow this peer."""


class DeviceBusy(Refused):
    """The device already has a consumer."""


class NotAttached(Refused):
    """A detach from a consumer that does not hold the device."""
