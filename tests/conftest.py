"""Shared by every test: eoid's logging is process-wide, so no test leaks its setup."""

from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """A test that configured eoid's logging (a level of ``warning``, say) must not hide
    the next test's log lines from ``structlog.testing.capture_logs``."""
    yield
    structlog.reset_defaults()
