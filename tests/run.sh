#!/usr/bin/env bash
# tests/run.sh: run every test from a fresh clone, setting up what the tests need.
#
#   sudo tests/run.sh [PYTEST ARGS...]
#
# - pytest (the only package the tests use) is installed when missing: Debian's python3-pytest
#   for Debian's python3 (as root), else pip, else pip in a venv (tests/.venv);
# - as root: debootstrap, systemd-nspawn, shellcheck and ansible-core (the deploy/ansible
#   drill runs ansible-playbook; selfheal itself never needs it) are installed with apt-get
#   when missing, and the Debian roots the drills boot (11, 12, 13) are built once and
#   cached (/var/cache/selfheal-bed);
# - then pytest runs the fast layer and the real-systemd drills (tests/bed.py).
# Not root: the drills are skipped (said so in the summary). CI=true: they are required,
# and a drill that cannot run fails the run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"

# pytest, the one package the tests use. Debian's own python3 gets Debian's python3-pytest
# (a minimal install has no pip, and Debian 12+ refuses pip into the system Python: PEP 668);
# another Python gets it from pip, or, where pip may not install, in a venv under tests/.
if ! "$python" -c 'import pytest' 2>/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 \
            && [ "$(command -v "$python")" = /usr/bin/python3 ]; then
        echo "tests/run.sh: installing python3-pytest (apt-get)" >&2
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-pytest >/dev/null
    elif "$python" -m pip --version >/dev/null 2>&1 && "$python" -m pip install --quiet pytest 2>/dev/null; then
        echo "tests/run.sh: installed pytest (pip)" >&2
    elif "$python" -m venv --system-site-packages tests/.venv >/dev/null 2>&1 \
            && tests/.venv/bin/python -m pip install --quiet pytest; then
        echo "tests/run.sh: installed pytest in tests/.venv" >&2
        python=tests/.venv/bin/python
    else
        echo "tests/run.sh: cannot install pytest for $python: install it (Debian: apt-get install python3-pytest)" >&2
        exit 1
    fi
fi

if [ "$(id -u)" -eq 0 ]; then
    missing=()
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
    command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
    command -v ansible-playbook >/dev/null 2>&1 || missing+=(ansible-core)
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "tests/run.sh: installing ${missing[*]}" >&2
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    fi
    # The drills run on every suite in SELFHEAL_BED_SUITES (default: all three, i.e.
    # systemd 247, 252 and 257); each root is built once and cached.
    for suite in ${SELFHEAL_BED_SUITES:-bullseye bookworm trixie}; do
        "$python" tests/bed.py build "$suite"
    done
elif [ "${CI:-}" = "true" ]; then
    echo "tests/run.sh: CI=true needs root for the real-systemd drills" >&2
    exit 1
else
    echo "tests/run.sh: not root: the real-systemd drills will be skipped (sudo $0 runs them)" >&2
fi

exec "$python" -m pytest tests -ra "$@"
