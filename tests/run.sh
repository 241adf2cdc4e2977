#!/usr/bin/env bash
# tests/run.sh: run every test from a fresh clone, setting up what the tests need.
#
#   sudo tests/run.sh [PYTEST ARGS...]
#   sudo tests/run.sh --setup-only
#
# - pytest (the only package the tests use) is installed when missing: Debian's python3-pytest
#   for Debian's python3 (as root), else pip, else pip in a venv (tests/.venv);
# - as root: debootstrap, systemd-nspawn, shellcheck and ansible-core (the deploy/ansible
#   drill runs ansible-playbook; selfheal itself never needs it; Debian 11 has no
#   ansible-core, and there those tests skip) are installed with apt-get when missing, and
#   the Debian roots the drills boot (11, 12, 13) are built once and cached
#   (/var/cache/selfheal-bed);
# - then pytest runs the fast layer and the real-systemd drills (tests/bed.py).
# Not root: the drills are skipped (said so in the summary). CI=true: they are required,
# and a drill that cannot run fails the run.
# The fast layer alone: `tests/run.sh -m "not drill"` (or, without root, plain pytest).
#
# Debian's pytest too: when the Python of the run is not Debian's own /usr/bin/python3 (a
# pyenv or venv Python, as on CI) and /usr/bin/python3 has pytest (as root: gets it from
# python3-pytest), the fast layer runs first under that pytest as well (6.0 on Debian 11, 7.2
# on 12, 8.3 on 13: a fresh Debian host's `sudo tests/run.sh` runs it), and its failure fails
# the run. SELFHEAL_DEBIAN_PYTEST=no leaves it out.
#
# --setup-only: install the packages exactly as above, check that the Python the run would
# use imports pytest, print what was done, and stop: neither the Debian roots are built (a
# few minutes each, with debootstrap) nor pytest run. tests/test_drill_fresh_host.py runs it
# as root in fresh Debian 11, 12 and 13 roots (python3, no pip, no pytest).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"

setup_only=false
if [ "${1:-}" = "--setup-only" ]; then
    setup_only=true
    shift
    if [ "$#" -gt 0 ]; then
        echo "tests/run.sh: --setup-only takes no other arguments (got: $*)" >&2
        exit 2
    fi
fi

is_root() { [ "$(id -u)" -eq 0 ]; }
done_steps=()  # what setup did, for the --setup-only summary

# Debian's own python3 (any name or link of it: /bin/python3 on merged /usr, python3.11)
# is the one whose sys.path holds /usr/lib/python3/dist-packages, where python3-pytest goes.
is_debian_python() {
    local path
    path="$(command -v "$python" 2>/dev/null)" || return 1
    [ -e /usr/bin/python3 ] && [ "$(readlink -f "$path")" = "$(readlink -f /usr/bin/python3)" ]
}

# pytest, the one package the tests use. Debian's own python3 gets Debian's python3-pytest
# (a minimal install has no pip, and Debian 12+ refuses pip into the system Python: PEP 668);
# another Python gets it from pip, or, where pip may not install, in a venv under tests/.
apt_packages=()
if "$python" -c 'import pytest' 2>/dev/null; then
    done_steps+=("pytest already importable by $python")
elif is_root && command -v apt-get >/dev/null 2>&1 && is_debian_python; then
    apt_packages+=(python3-pytest)
elif "$python" -m pip --version >/dev/null 2>&1 && "$python" -m pip install --quiet pytest 2>/dev/null; then
    echo "tests/run.sh: installed pytest (pip)" >&2
    done_steps+=("installed pytest for $python with pip")
elif "$python" -m venv --system-site-packages tests/.venv >/dev/null 2>&1 \
        && tests/.venv/bin/python -m pip install --quiet pytest; then
    echo "tests/run.sh: installed pytest in tests/.venv" >&2
    python=tests/.venv/bin/python
    done_steps+=("installed pytest with pip in tests/.venv")
else
    echo "tests/run.sh: cannot install pytest for $python: install it (Debian: apt-get install python3-pytest)" >&2
    exit 1
fi

# Debian's own python3 and its pytest, for the fast layer under the pytest a Debian ships
# (when the run's Python is another one).
debian_python=""
if [ "${SELFHEAL_DEBIAN_PYTEST:-yes}" != "no" ] && [ -x /usr/bin/python3 ] && ! is_debian_python; then
    if /usr/bin/python3 -c 'import pytest' 2>/dev/null; then
        debian_python=/usr/bin/python3
    elif is_root && command -v apt-get >/dev/null 2>&1; then
        debian_python=/usr/bin/python3
        apt_packages+=(python3-pytest)
    fi
fi

ansible_core=false
if is_root; then
    command -v debootstrap >/dev/null 2>&1 || apt_packages+=(debootstrap)
    command -v systemd-nspawn >/dev/null 2>&1 || apt_packages+=(systemd-container)
    command -v shellcheck >/dev/null 2>&1 || apt_packages+=(shellcheck)
    command -v ansible-playbook >/dev/null 2>&1 || ansible_core=true
fi
if [ "${#apt_packages[@]}" -gt 0 ] || [ "$ansible_core" = true ]; then
    apt-get update -q >/dev/null
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
    echo "tests/run.sh: installing ${apt_packages[*]} (apt-get)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${apt_packages[@]}" >/dev/null
    done_steps+=("installed with apt-get: ${apt_packages[*]}")
fi
# ansible-core without its Recommends: they pull in `ansible`, the community collections
# (260 MB, most of this setup's time), and deploy/ansible uses ansible.builtin only. Debian 11
# has no ansible-core (its Ansible is 2.10; the role needs 2.14): the Ansible tests then skip
# (and fail under CI=true), and the rest runs.
if [ "$ansible_core" = true ]; then
    if apt-cache show ansible-core >/dev/null 2>&1; then
        echo "tests/run.sh: installing ansible-core (apt-get, no recommends)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ansible-core >/dev/null
        done_steps+=("installed with apt-get: ansible-core (no recommends)")
    else
        echo "tests/run.sh: this Debian has no ansible-core package: the Ansible tests will be skipped" >&2
        done_steps+=("not installed: ansible-core (no such package in this Debian release)")
    fi
fi

if ! version="$("$python" -c 'import pytest; print(pytest.__version__, pytest.__file__)' 2>&1)"; then
    echo "tests/run.sh: $python still cannot import pytest: $version" >&2
    exit 1
fi
done_steps+=("$python imports pytest $version")
if [ -n "$debian_python" ]; then
    if ! debian_version="$("$debian_python" -c 'import pytest; print(pytest.__version__, pytest.__file__)' 2>&1)"; then
        echo "tests/run.sh: $debian_python still cannot import pytest: $debian_version" >&2
        exit 1
    fi
    done_steps+=("$debian_python imports pytest $debian_version (the fast layer runs under it too)")
fi

if is_root; then
    if [ "$setup_only" = true ]; then
        done_steps+=("not built (--setup-only): the Debian roots for ${SELFHEAL_BED_SUITES:-bullseye bookworm trixie}")
    else
        # The drills run on every suite in SELFHEAL_BED_SUITES (default: all three, i.e.
        # systemd 247, 252 and 257); each root is built once and cached.
        for suite in ${SELFHEAL_BED_SUITES:-bullseye bookworm trixie}; do
            "$python" tests/bed.py build "$suite"
        done
    fi
elif [ "${CI:-}" = "true" ]; then
    echo "tests/run.sh: CI=true needs root for the real-systemd drills" >&2
    exit 1
else
    echo "tests/run.sh: not root: the real-systemd drills will be skipped (sudo $0 runs them)" >&2
fi

if [ "$setup_only" = true ]; then
    echo "tests/run.sh --setup-only:"
    printf '  %s\n' "${done_steps[@]}"
    exit 0
fi
# The fast layer under Debian's pytest first (the arguments given, then -m "not drill": the
# drills run once, below), then everything under the run's Python; either failing fails it.
debian_failed=false
if [ -n "$debian_python" ]; then
    echo "tests/run.sh: the fast layer under Debian's pytest ($debian_python, pytest ${debian_version%% *})" >&2
    "$debian_python" -m pytest tests -ra -p no:cacheprovider "$@" -m "not drill" || debian_failed=true
fi
status=0
"$python" -m pytest tests -ra "$@" || status=$?
if [ "$debian_failed" = true ]; then
    echo "tests/run.sh: the fast layer failed under Debian's pytest ${debian_version%% *} (above)" >&2
    [ "$status" -ne 0 ] || status=1
fi
exit "$status"
