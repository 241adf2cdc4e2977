"""Drill: the test command's own setup on a fresh minimal Debian host.

On such a host (python3, no pip, no pytest) `sudo tests/run.sh` once stopped at once with
`No module named pip`, and Debian 12+ refuses `pip install` into its Python anyway (PEP 668);
a green run on a machine that already had pytest hid it. Here, for each suite, a private
writable copy of the cached drill root (debootstrap minbase with python3, systemd and the
drills' services; neither pip nor pytest, nor any tool run.sh installs: checked first, and
the drill fails if that premise does not hold) gets the repo copied in as a user's clone,
and `tests/run.sh --setup-only` runs in it as root with `systemd-nspawn --pipe` (not booted:
apt needs no running systemd; the host's network reaches the Debian mirror, as when the
root was built). It must exit 0 with pytest from Debian's python3-pytest, never pip, and
the tools the drills need installed (all but ansible-core on Debian 11, which has none);
a second run must install nothing.
"""

import json
import shutil
import time

import pytest

from bed import Container
from drillkit import drill_suites

pytestmark = pytest.mark.drill

CLONE = "/root/selfheal"
RUN_SH = CLONE + "/tests/run.sh"
# What `tests/run.sh` installs as root when missing (command -> Debian package).
TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container",
         "shellcheck": "shellcheck", "ansible-playbook": "ansible-core"}
# Debian 11 packages no ansible-core (its Ansible is 2.10; deploy/ansible needs 2.14).
NO_ANSIBLE_CORE = {"bullseye"}
DEBIAN_SITE = "/usr/lib/python3/dist-packages/"
SETUP_TIMEOUT = 600  # apt-get update + install of a few dozen packages from the mirror
FAST_LAYER_TIMEOUT = 900  # under a minute on 2 idle cores; the drills may share them
# Skips of the fast layer that say something about the fresh host, not the code: no drill
# roots are built there (test_calendar compares with each root's systemd-analyze), no tzdata.
ALWAYS_SKIPPED = ("is not built (tests/run.sh builds it)", "no zoneinfo")

# What the host's python3 and PATH offer, as JSON: is pytest or pip importable, where from.
FACTS = r"""
import importlib.util, json, shutil, sys
def where(name):
    spec = importlib.util.find_spec(name)
    return spec.origin if spec else None
print(json.dumps({"python": sys.executable, "pytest": where("pytest"), "pip": where("pip"),
                  "tools": {t: shutil.which(t) for t in %r}}))
""" % (sorted(TOOLS),)


def facts(box):
    return json.loads(box.pipe(["python3", "-c", FACTS]).stdout)


def copy_clone(repo_root, box):
    """The checkout as a user's clone has it (no .git, caches or venv), owned by root."""
    junk = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "*.pyc")
    shutil.copytree(str(repo_root), str(box.root / CLONE.lstrip("/")), symlinks=True, ignore=junk)


@pytest.fixture(scope="module", params=drill_suites())
def fresh(request, bed_reason, repo_root):
    """A fresh host after `tests/run.sh --setup-only`: (box, before, result, seconds)."""
    if bed_reason:
        pytest.skip(bed_reason)
    with Container(suite=request.param, boot=False) as box:
        before = facts(box)
        if before["pytest"] or before["pip"] or any(before["tools"].values()):
            pytest.fail("premise: the %s root is not a fresh minimal host (it must have neither "
                        "pytest nor pip nor the tools run.sh installs): %s" % (box.suite, before))
        copy_clone(repo_root, box)
        started = time.monotonic()
        result = box.pipe([RUN_SH, "--setup-only"], check=False, timeout=SETUP_TIMEOUT)
        seconds = time.monotonic() - started
        print("\n[fresh host %s] tests/run.sh --setup-only: exit %d in %.1f s\n%s%s"
              % (box.suite, result.returncode, seconds, result.stdout, result.stderr))
        yield box, before, result, seconds


def test_setup_only_exits_0_and_says_what_it_did(fresh):
    box, _, result, _ = fresh
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tests/run.sh --setup-only:" in result.stdout
    assert "installed with apt-get: python3-pytest" in result.stdout
    assert "imports pytest" in result.stdout


def test_pytest_comes_from_debian_python3_pytest_and_pip_is_still_absent(fresh):
    box, before, _, _ = fresh
    after = facts(box)
    assert after["python"] == before["python"]
    assert after["pytest"] and after["pytest"].startswith(DEBIAN_SITE), after
    assert after["pip"] is None, after
    assert box.pipe(["python3", "-c", "import pytest"]).returncode == 0
    status = box.pipe(["dpkg-query", "-W", "-f=${Status}", "python3-pytest"]).stdout
    assert status == "install ok installed"
    assert not (box.root / CLONE.lstrip("/") / "tests/.venv").exists()


def test_the_tools_the_drills_need_are_installed(fresh):
    box, _, result, _ = fresh
    tools = facts(box)["tools"]
    missing = {tool for tool, path in tools.items() if not path}
    if box.suite in NO_ANSIBLE_CORE:
        assert missing == {"ansible-playbook"}, tools
        assert "not installed: ansible-core (no such package" in result.stdout
    else:
        assert missing == set(), tools
        assert "installed with apt-get: ansible-core (no recommends)" in result.stdout
        # Not `ansible`, the collections ansible-core recommends (260 MB on Debian 12).
        ansible = box.pipe(["dpkg-query", "-W", "-f=${Status}", "ansible"], check=False).stdout
        assert ansible != "install ok installed"


def test_setup_only_builds_no_root(fresh):
    box, _, result, _ = fresh
    assert not (box.root / "var/cache/selfheal-bed").exists()
    assert "not built (--setup-only)" in result.stdout


def test_the_installed_pytest_runs_the_whole_fast_layer_and_it_passes(fresh):
    """Past the setup: Debian's own pytest (6.0 on 11, 7.2 on 12, 8.3 on 13) on Debian's
    Python runs the repo's conftest and the whole fast layer (-m "not drill": no container in
    the container), as root, as `sudo tests/run.sh` would on that host; how long it took is
    printed. On Debian 11 the Ansible tests skip (no ansible-core); nothing else may."""
    box, _, _, _ = fresh
    version = box.pipe(["python3", "-c", "import pytest; print(pytest.__version__)"]).stdout.strip()
    started = time.monotonic()
    # Under sh, not exec'd by it: `nspawn --pipe` makes its command PID 1, and a process of
    # the tests that is PID 1 reads as systemd itself to selfheal, as it would on any host.
    done = box.pipe(["/bin/sh", "-c", 'python3 -m pytest -q -rs -p no:cacheprovider -m "not drill" "$0"; exit $?',
                     CLONE + "/tests"], check=False, timeout=FAST_LAYER_TIMEOUT)
    seconds = time.monotonic() - started
    out = done.stdout + done.stderr
    summary = (done.stdout.strip().splitlines() or [""])[-1]  # pytest's last line (nspawn may add to stderr)
    print("\n[fresh host %s] the fast layer with pytest %s: exit %d in %.1f s: %s"
          % (box.suite, version, done.returncode, seconds, summary))
    assert done.returncode == 0, out
    assert " passed" in summary and " failed" not in summary and " error" not in summary, out
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    allowed = ("ansible-playbook is missing", "ansible-inventory is missing") if box.suite in NO_ANSIBLE_CORE else ()
    allowed += ALWAYS_SKIPPED
    assert all(any(why in line for why in allowed) for line in skipped), "\n".join(skipped)
    if box.suite in NO_ANSIBLE_CORE:
        assert "ansible-playbook is missing" in out


def test_a_second_setup_only_installs_nothing(fresh):
    box, _, _, _ = fresh
    again = box.pipe([RUN_SH, "--setup-only"], check=False, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already importable" in again.stdout
    assert "apt-get" not in again.stdout + again.stderr
