"""Shared pytest setup: tests/ on sys.path (for `from bed import ...`), the `drill` marker,
and the fixtures the drills share."""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from bed import skip_or_fail_reason  # noqa: E402  (needs the sys.path line above)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "drill: boots a real systemd in a container (tests/bed.py); needs root"
    )


@pytest.fixture(scope="session")
def repo_root():
    """The checkout under test (bind it into a Container to test this very code)."""
    return TESTS.parent


@pytest.fixture(scope="session")
def bed_reason():
    """None if the drill bed is usable, else why not.  Under CI=true an unusable bed
    fails the run here, so a drill can simply `pytest.skip(bed_reason)`."""
    reason = skip_or_fail_reason()
    if reason and os.environ.get("CI") == "true":
        pytest.fail("CI=true and the drill bed is unusable: " + reason)
    return reason
