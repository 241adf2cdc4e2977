"""The unit files in units/ and miraclemax-status are the ones selfheal.py installs, and the
units say what the design needs (oneshot handler with a deadline, never healing itself, %i)."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import selfheal
from conftest import conf

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "units"
DROPIN_FILE = "selfheal-dropin.conf"


def directives(text):
    """{section: {key: [values]}} of a unit file (comments and blank lines skipped)."""
    found, section = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            found.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        found[section].setdefault(key.strip(), []).append(value.strip())
    return found


def selfheal_args(exec_start):
    """The arguments an ExecStart= hands to selfheal's main()."""
    argv = shlex.split(exec_start)
    if "-c" in argv:  # python -c "...import selfheal; selfheal.main()" ARGS
        return argv[argv.index("-c") + 2:]
    script = next(i for i, a in enumerate(argv) if a.endswith("selfheal.py"))
    return argv[script + 1:]


def test_units_dir_holds_exactly_the_templates_and_the_dropin():
    assert sorted(os.listdir(str(UNITS))) == sorted(list(selfheal.UNIT_TEMPLATES) + [DROPIN_FILE])


@pytest.mark.parametrize("name", sorted(selfheal.UNIT_TEMPLATES))
def test_unit_file_is_byte_identical_to_what_selfheal_installs(name):
    assert (UNITS / name).read_bytes() == selfheal.UNIT_TEMPLATES[name].encode("utf-8")


def test_dropin_file_is_byte_identical_to_what_selfheal_installs():
    assert (UNITS / DROPIN_FILE).read_bytes() == selfheal.DROPIN_TEMPLATE.encode("utf-8")


def test_miraclemax_status_is_byte_identical_and_executable():
    path = REPO / "miraclemax-status"
    assert path.read_bytes() == selfheal.MIRACLEMAX_STATUS.encode("utf-8")
    assert os.access(str(path), os.X_OK)


def test_handler_unit_is_a_oneshot_with_a_deadline_that_never_heals_itself():
    unit = directives(selfheal.UNIT_TEMPLATES["selfheal@.service"])
    assert unit["Service"]["Type"] == ["oneshot"]
    (timeout,) = unit["Service"]["TimeoutStartSec"]
    assert 0 < selfheal.parse_duration(timeout) <= 3600
    assert all("OnFailure" not in keys for keys in unit.values())
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"]  # a trigger is never dropped (in [Unit], not [Service])


def test_handler_execstart_hands_the_escaped_instance_to_heal():
    (exec_start,) = directives(selfheal.UNIT_TEMPLATES["selfheal@.service"])["Service"]["ExecStart"]
    assert "%I" not in exec_start
    args = selfheal_args(exec_start)
    assert args[-1] == "%i"
    parsed = selfheal.build_parser().parse_args(args[:-1] + ["story-stages"])
    assert (parsed.command, parsed.name, parsed.trigger, parsed.dry_run) == ("heal", "story-stages", "onfailure",
                                                                            False)


def test_watch_service_runs_watch_and_its_timer_uses_the_configured_interval():
    (exec_start,) = directives(selfheal.UNIT_TEMPLATES["selfheal-watch.service"])["Service"]["ExecStart"]
    parsed = selfheal.build_parser().parse_args(selfheal_args(exec_start))
    assert parsed.command == "watch"
    timer = directives(selfheal.render_unit("selfheal-watch.timer", "/usr/local/lib/selfheal", watch_interval=7))
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    assert timer["Timer"].get("Unit", ["selfheal-watch.service"]) == ["selfheal-watch.service"]
    assert timer["Timer"]["OnUnitActiveSec"] == ["7s"] and timer["Timer"]["OnBootSec"] == ["7s"]
    assert selfheal.parse_duration(timer["Timer"]["AccuracySec"][0]) <= 1


@pytest.mark.parametrize("name", sorted(selfheal.UNIT_TEMPLATES))
def test_rendered_unit_has_no_placeholder_left_and_points_at_the_libdir(name):
    text = selfheal.render_unit(name, "/opt/sh/lib/selfheal")
    assert "@LIBDIR@" not in text and "@PYTHON@" not in text
    for exec_start in directives(text).get("Service", {}).get("ExecStart", []):
        assert shlex.split(exec_start)[0] == selfheal.PYTHON
        assert "/opt/sh/lib/selfheal" in exec_start


# selfheal.py in the libdir of a user's run: this checkout's, told it runs as root through its
# is_root seam (what the as_root fixture of tests/conftest.py does in-process).
SELFHEAL_AS_ROOT = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("selfheal", %r)
selfheal = importlib.util.module_from_spec(spec)
sys.modules["selfheal"] = selfheal  # what `import selfheal` gives the unit's command
spec.loader.exec_module(selfheal)
selfheal.is_root = lambda: True
selfheal.check_trusted_file = lambda path, what: None  # a user's files cannot be root's
selfheal.restrict = lambda fd, mode: None  # nor be given to root
"""


def test_rendered_watch_unit_command_really_runs_selfheal(tmp_path):
    # Run the unit's own command line as systemd would (no shell), with the fake systemctl on
    # PATH saying the one service is active. libdir: this checkout as root; as a user, one
    # whose selfheal.py is this checkout's told it is root (watch refuses to run otherwise).
    libdir = REPO
    if os.geteuid() != 0:
        libdir = tmp_path / "lib"
        libdir.mkdir()
        (libdir / "selfheal.py").write_text(SELFHEAL_AS_ROOT % str(REPO / "selfheal.py"))
    text = selfheal.render_unit("selfheal-watch.service", str(libdir), python=sys.executable)
    (exec_start,) = directives(text)["Service"]["ExecStart"]
    config = tmp_path / "services.conf"
    config.write_text(conf(services={"worker": {}}))
    state = tmp_path / "fake.json"
    state.write_text(json.dumps({"units": {"worker.service": {"props": {"ActiveState": "active",
                                                                          "SubState": "running"}}}}))
    env = dict(os.environ, SELFHEAL_CONFIG=str(config), SELFHEAL_STATE_DIR=str(tmp_path / "state"),
               SELFHEAL_RUN_DIR=str(tmp_path / "run"), SELFHEAL_LOG_DIR=str(tmp_path / "log"),
               FAKE_SYSTEMD_STATE=str(state), FAKE_SYSTEMD_CALLS=str(tmp_path / "calls"),
               PATH=str(REPO / "tests" / "fakes") + os.pathsep + os.environ["PATH"])
    done = subprocess.run(shlex.split(exec_start), env=env, cwd=str(tmp_path), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    seen = json.loads((tmp_path / "run" / "watch" / "worker.json").read_text())
    assert seen["verdict"] == "ok"


@pytest.mark.parametrize("name, unit", [("story-stages", "story-stages.service"), ("blue", "app@blue.service")])
def test_dropin_adds_onfailure_for_the_section_name(name, unit):
    text = selfheal.dropin_text(selfheal.Service(name=name, unit=unit), "/etc/selfheal/services.conf")
    assert text.startswith(selfheal.DROPIN_MARK)
    assert directives(text) == {"Unit": {"OnFailure": ["selfheal@%s.service" % name]}}


# -- hardening: least privilege, every relaxed or omitted setting said why -----------------

HEAL_UNIT, WATCH_UNIT = "selfheal@.service", "selfheal-watch.service"

# The settings chosen for each service (systemd-analyze security), all known to systemd 247.
HARDENING = {
    HEAL_UNIT: {
        "CapabilityBoundingSet": "CAP_KILL CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE CAP_SYS_PTRACE CAP_NET_BIND_SERVICE "
                                 "CAP_SETUID CAP_SETGID",
        "NoNewPrivileges": "yes", "ProtectSystem": "full", "ProtectHome": "read-only", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
        "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "LockPersonality": "yes",
        "SystemCallArchitectures": "native", "SystemCallFilter": ["@system-service", "~@resources"],
        "SystemCallErrorNumber": "EPERM",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    },
    WATCH_UNIT: {
        "CapabilityBoundingSet": "CAP_DAC_READ_SEARCH CAP_SETUID CAP_SETGID CAP_KILL",
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "StateDirectory": "selfheal", "LogsDirectory": "selfheal",
        "RuntimeDirectory": "selfheal", "RuntimeDirectoryPreserve": "yes", "ProtectHome": "read-only",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
        "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "ProtectProc": "invisible", "SystemCallArchitectures": "native",
        "SystemCallFilter": ["@system-service", "~@resources"], "SystemCallErrorNumber": "EPERM",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK", "ReadWritePaths": "-@METRICS_DIR@",
    },
}
# Set, but weaker than the strictest value: the comment right above says "Relaxed" and why.
RELAXED = {HEAL_UNIT: ("ProtectSystem", "ProtectHome"), WATCH_UNIT: ("ProtectHome", "ReadWritePaths")}
# Left out: named in the unit's "Omitted on purpose" comment, with a reason.
OMITTED = {
    HEAL_UNIT: ("PrivateNetwork", "IPAddressDeny", "ProtectProc", "ProcSubset", "MemoryDenyWriteExecute",
                "RestrictSUIDSGID", "UMask"),
    WATCH_UNIT: ("PrivateNetwork", "IPAddressDeny", "ProcSubset", "UMask"),
}


def comment_above(text, key):
    """The comment lines right above the line setting `key` (none: "")."""
    lines = text.splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith(key + "="))
    above = []
    for line in reversed(lines[:index]):
        if not line.startswith("#"):
            break
        above.insert(0, line)
    return "\n".join(above)


# What a service unit sets besides its hardening: what runs, how long, and its bounds
# (tests above and test_drill_units check those).
NOT_HARDENING = {"Type", "ExecStart", "ExecCondition", "TimeoutStartSec", "MemoryMax", "TasksMax"}


@pytest.mark.parametrize("name", sorted(HARDENING))
def test_service_unit_has_exactly_the_chosen_hardening_settings(name):
    service = directives((UNITS / name).read_text(encoding="utf-8"))["Service"]
    for key, value in HARDENING[name].items():
        assert service.get(key) == (value if isinstance(value, list) else [value]), key
    unlisted = set(service) - set(HARDENING[name]) - NOT_HARDENING
    assert unlisted == set(), "set in %s but not in HARDENING (or NOT_HARDENING): %s" % (name, sorted(unlisted))
    assert not {"User", "DynamicUser", "PrivateUsers"} & set(service)  # root: systemd's private socket


def capabilities(name):
    """The capabilities units/NAME keeps: its CapabilityBoundingSet= lines (read as systemd
    does: several lines add up; an empty one clears what came before)."""
    kept = set()
    for value in directives((UNITS / name).read_text(encoding="utf-8"))["Service"]["CapabilityBoundingSet"]:
        assert not value.startswith("~"), value  # a deny list would keep everything else
        kept = kept | set(value.split()) if value else set()
    return kept


# A capability that another one covers (capabilities(7)): CAP_DAC_OVERRIDE bypasses file read,
# write and execute checks, so also what CAP_DAC_READ_SEARCH bypasses (read, directory search).
COVERED_BY = {"CAP_DAC_READ_SEARCH": "CAP_DAC_OVERRIDE"}


def test_watch_gets_fewer_capabilities_than_a_heal_and_none_a_heal_lacks():
    heal, watch = capabilities(HEAL_UNIT), capabilities(WATCH_UNIT)
    assert len(watch) < len(heal), (watch, heal)
    lacking = {cap for cap in watch if cap not in heal and COVERED_BY.get(cap) not in heal}
    assert lacking == set(), "the watch may do what a heal may not: %s" % ", ".join(sorted(lacking))


def test_watch_writable_dirs_are_selfheals_own_state_log_and_run_dirs():
    service = directives(selfheal.UNIT_TEMPLATES[WATCH_UNIT])["Service"]
    assert service["ProtectSystem"] == ["strict"]
    assert "/var/lib/" + service["StateDirectory"][0] == selfheal.STATE_DIR
    assert "/var/log/" + service["LogsDirectory"][0] == selfheal.LOG_DIR
    assert "/run/" + service["RuntimeDirectory"][0] == selfheal.RUN_DIR
    assert service["RuntimeDirectoryPreserve"] == ["yes"]  # heals use /run/selfheal too


@pytest.mark.parametrize("name, key", [(n, k) for n, keys in sorted(RELAXED.items()) for k in keys])
def test_relaxed_setting_has_a_comment_saying_relaxed_and_why(name, key):
    comment = comment_above(selfheal.UNIT_TEMPLATES[name], key)
    assert comment.startswith("# Relaxed: ") and len(comment) > 60, comment


@pytest.mark.parametrize("name, key", [(n, k) for n, keys in sorted(OMITTED.items()) for k in keys])
def test_omitted_setting_is_not_set_and_its_comment_says_why(name, key):
    text = selfheal.UNIT_TEMPLATES[name]
    assert key not in directives(text)["Service"]
    omitted = text[text.index("# Omitted on purpose:"):]
    match = re.search(r"^# (\S+=[\w ]*, )*%s=[\w ]*(, \S+=[\w ]*)*: (.+)$" % key, omitted, re.M)
    assert match and len(match.group(3)) > 20, key


@pytest.mark.parametrize("name", sorted(HARDENING))
def test_every_capability_kept_is_explained_in_the_units_comments(name):
    text = (UNITS / name).read_text(encoding="utf-8")
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for cap in capabilities(name):
        assert cap + " " in comments.replace(",", " ").replace(":", " "), cap
