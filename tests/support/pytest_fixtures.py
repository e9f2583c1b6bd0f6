"""pytest fixtures for the test bed.

Import them into a conftest.py (``pytest_plugins`` only works in the root conftest)::

    from tests.support.pytest_fixtures import netns_required, testbed  # noqa: F401
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from testbed.netns import netns_available
from testbed.testbed import FAST_KEX, Testbed, cleanup_stale_testbeds, sshd_missing_message

_stale_checked = False


@pytest.fixture
def testbed() -> Iterator[Testbed]:
    """A fresh test bed, closed (every process stopped, directory removed) after the test.

    The first use in a session also removes test beds left behind by crashed runs.
    """
    global _stale_checked
    message = sshd_missing_message()
    if message:
        pytest.fail(message, pytrace=False)
    if not _stale_checked:
        _stale_checked = True
        cleanup_stale_testbeds()
    bed = Testbed(kex=FAST_KEX)
    try:
        yield bed
    finally:
        problems = bed.close()
        if problems:
            pytest.fail(f"test bed teardown left processes behind: {problems}", pytrace=False)


@pytest.fixture
def netns_required() -> None:
    """Skip unless running as root with working ``ip netns``."""
    why = netns_available()
    if why:
        pytest.skip(why)
