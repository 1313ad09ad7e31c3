"""eoid: relays VFIO INTx interrupts and their EOIs between devices and guests, measuring them."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("eoid")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"
