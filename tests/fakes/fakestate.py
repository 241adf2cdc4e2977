"""The state the fake systemctl, ss and journalctl share (not a command itself).

One JSON file, named by $FAKE_SYSTEMD_STATE, describes the pretend host:

    {"units": {"story-stages.service": {
         "props": {"ActiveState": "failed", "Result": "signal", ...},   # what `systemctl show` says
         "on_restart": "active",     # or "fail", or a list consumed one per restart
         "fail_status": "1",         # ExecMainStatus after a failed restart (e.g. "203")
         "listen": {"port": 5002, "pid": 5555},   # the listener a successful start opens
                                                  # (in the unit's cgroup unless it says)
         "then": {"after": 0.3, "set": {...}, "listen": true}}},  # a change by itself, N s
                                                  # after the unit was first shown
     "listeners": [{"port": 5002, "pid": 4242, "comm": "python3", "address": "0.0.0.0",
                    "cgroup": "/system.slice/other.service",    # the holder's cgroup, if any,
                    "started": 1234.5},                         # and its start (s after boot)
                   "LISTEN 0 128 [::]:80 [::]:*"],                # or raw `ss -H` lines
     "journal": ["line", ...],                                   # what journalctl prints
     "journal_by_invocation": {"<id>": ["line", ...]},           # ... for one run
     "system_state": "running",                                  # is-system-running
     "systemd_version": 252,                                     # systemctl --version (null: fails)
     "ss_fail": false, "ss_fail_p": false}                       # ss exits 1 (always / with -p)

A template in "units" ("selfheal@.service") gives its instances ("selfheal@worker.service"):
the first show or start of an instance that is not in the state copies the template's entry.

Each command appends its argv (program name first) as one JSON line to $FAKE_SYSTEMD_CALLS.
The scripts run with `python3 -S` and import only this and the standard library.
"""

import contextlib
import fcntl
import json
import os
import sys
import time

DEFAULT_PROPS = {
    "LoadState": "loaded",
    "ActiveState": "inactive",
    "SubState": "dead",
    "Result": "success",
    "UnitFileState": "enabled",
    "ExecMainCode": "0",
    "ExecMainStatus": "0",
    "ExecMainPID": "0",
    "MainPID": "0",
    "NRestarts": "0",
    "MemoryCurrent": "[not set]",
    "MemoryPeak": "[not set]",
    "Restart": "no",
    "User": "",
}


class Hang(Exception):
    """A command that never finishes (a restart whose ExecStartPre= blocks): the fake's own
    process sleeps until killed; run in-process (tests/conftest.py) it lasts the caller's
    timeout and ends as subprocess.TimeoutExpired, as the real process would."""


def state_path():
    path = os.environ.get("FAKE_SYSTEMD_STATE")
    if not path:
        sys.stderr.write("%s: FAKE_SYSTEMD_STATE is not set\n" % os.path.basename(sys.argv[0]))
        sys.exit(70)
    return path


@contextlib.contextmanager
def locked_state(write=False):
    """Yield the state dict under an exclusive lock; save it afterwards when write."""
    path = state_path()
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
            state = json.loads(text)
        except FileNotFoundError:
            text, state = None, {}
        try:
            yield state
        except Hang:
            if write:  # what happened before the hang (the unit is activating) is real
                save(path, state, text)
            raise
        if write:
            save(path, state, text)


def save(path, state, unless=None):
    """Replace the state file with `state` (readers see the old or the new file), unless
    its text would be `unless` (what was read: most shows change nothing)."""
    text = json.dumps(state, indent=1, sort_keys=True)
    if text == unless:
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def record_call(argv):
    calls = os.environ.get("FAKE_SYSTEMD_CALLS")
    if not calls:
        return
    line = (json.dumps([os.path.basename(argv[0])] + list(argv[1:])) + "\n").encode("utf-8")
    fd = os.open(calls, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def unit_props(state, name):
    """The unit's full property dict (defaults filled in), or None when it does not exist."""
    unit = state.get("units", {}).get(name)
    if unit is None:
        return None
    props = dict(DEFAULT_PROPS)
    props.update({"Id": name, "Description": name, "FragmentPath": "/etc/systemd/system/" + name,
                  "ControlGroup": ""})
    props.update(unit.get("props", {}))
    return props


def instantiate(state, name):
    """The unit's entry; an instance of a template in the state gets a copy of the template's
    entry first (systemd loads app@x.service from app@.service). None when neither exists."""
    units = state.setdefault("units", {})
    if name in units or "@" not in name:
        return units.get(name)
    prefix, _, rest = name.partition("@")
    template = "%s@.%s" % (prefix, rest.rpartition(".")[2])
    if template not in units:
        return None
    units[name] = json.loads(json.dumps(units[template]))
    return units[name]


def apply_then(state, name, now=None):
    """Apply the unit's scheduled change ("then") once its time has come."""
    unit = state.get("units", {}).get(name)
    if not unit or "then" not in unit:
        return False
    then = unit["then"]
    now = time.time() if now is None else now
    if "started" not in then:
        then["started"] = now
        return True
    if now - then["started"] < float(then.get("after", 0)):
        return False
    unit.setdefault("props", {}).update(then.get("set", {}))
    if then.get("listen"):
        open_listener(state, unit, name)
    del unit["then"]
    return True


def open_listener(state, unit, name=None):
    listen = unit.get("listen")
    if not listen:
        return
    port = int(listen["port"])
    kept = [lst for lst in state.get("listeners", []) if not (isinstance(lst, dict) and int(lst["port"]) == port)]
    opened = {"address": "0.0.0.0", "comm": "python3"}
    if name:
        opened["cgroup"] = "/system.slice/" + name
    kept.append(dict(opened, **listen))
    state["listeners"] = kept
