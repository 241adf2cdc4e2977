"""The test command itself (tests/run.sh, and .ci/run that calls it): shellcheck clean, and a
bad command line refused before it sets anything up. What it installs on a fresh Debian is
the drill tests/test_drill_fresh_host.py."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = [REPO / "tests/run.sh", REPO / ".ci/run"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_script_is_shellcheck_clean(script):
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run([shellcheck, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_setup_only_with_more_arguments_exits_2_before_any_setup():
    done = subprocess.run([str(REPO / "tests/run.sh"), "--setup-only", "-k", "mail"], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert done.returncode == 2
    assert "--setup-only takes no other arguments" in done.stderr
    assert done.stdout == ""
