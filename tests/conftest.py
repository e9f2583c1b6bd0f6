"""Suite-wide set-up."""

from __future__ import annotations

import signal

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """A suite started with SIGINT ignored (in the background, under nohup) would hand that on
    to every program it starts, and Python leaves an ignored SIGINT ignored: the tests that
    press Ctrl-C would press it on nothing. The tests that want it ignored ignore it
    themselves (`tests/integration/interrupts.py`)."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
