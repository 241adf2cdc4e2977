"""What root runs for a service runs with no more than that service's rights (issue 19).

- health_command runs as the unit's User=/Group= (nobody for root or DynamicUser= services),
  without capabilities, with no_new_privs, PATH alone, cwd /, its process group killed;
- a command run as root (config_check; health_command with health_run_as = root) must be
  root's alone: validate refuses it with FILE:LINE, a heal and the watch check again;
- text from outside: bidi and zero-width characters escaped, systemd's quoted environment
  assignments reduced to the name, every quoted line and excerpt bounded.

Who runs a command needs root to change; those tests skip without it (the drill
tests/test_drill_runas.py plays them on real systemd as the service's account would)."""

import os
import pwd
import re
import sys
import time

import pytest

import selfheal

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

ROOT = os.geteuid() == 0
PY = sys.executable
NOBODY = pwd.getpwnam("nobody")
ME = pwd.getpwuid(os.geteuid()).pw_name


@pytest.fixture(autouse=True)
def trust_the_running_user(monkeypatch):
    """Run by a user, the tests' files are that user's: the rule then trusts that user as it
    trusts root (as root: unchanged). What it says of modes and other owners is the same."""
    monkeypatch.setattr(selfheal, "ROOT_OWNER", os.geteuid())


def load(bed, text):
    with open(bed.config_path, "a", encoding="utf-8") as handle:
        handle.write("\n" + text)
    bed.config = selfheal.load_config(bed.config_path, trusted=False)
    return bed.config


# -- who: the service's own identity, from what systemd reports ---------------------------

def a_user():
    """A user of this host that is neither root nor nobody, with its primary group."""
    for entry in pwd.getpwall():
        if entry.pw_uid not in (0, NOBODY.pw_uid) and entry.pw_gid != 0:
            return entry
    pytest.skip("this host has no user besides root and nobody")


@pytest.mark.parametrize("unit", [
    {}, {"User": ""}, {"User": "root"}, {"User": "0"}, {"User": "app", "DynamicUser": "yes"},
    {"User": "no-such-user-here"}, {"User": "nobody", "Group": "no-such-group-here"},
], ids=["no-properties", "no-user", "root", "uid-0", "dynamic-user", "unknown-user", "unknown-group"])
def test_a_root_dynamic_or_unknown_service_user_runs_its_commands_as_nobody(unit):
    who = selfheal.service_identity(unit)
    assert (who.uid, who.gid, who.name) == (NOBODY.pw_uid, NOBODY.pw_gid, "nobody")
    assert 0 not in who.groups


def test_the_service_user_by_name_or_number_with_its_group_and_groups_but_never_root_group():
    user = a_user()
    by_name = selfheal.service_identity({"User": user.pw_name})
    by_number = selfheal.service_identity({"User": str(user.pw_uid)})
    assert by_name == by_number
    assert (by_name.uid, by_name.gid, by_name.name) == (user.pw_uid, user.pw_gid, user.pw_name)
    assert user.pw_gid in by_name.groups and 0 not in by_name.groups
    assert selfheal.service_identity({"User": user.pw_name, "Group": "root"}).uid == NOBODY.pw_uid


# -- how: run_command ----------------------------------------------------------------------

STATUS_PY = ("import os, sys; s = open('/proc/self/status').read(); "
             "f = dict(l.split(':\\t', 1) for l in s.splitlines() if ':\\t' in l); "
             "print(os.getuid(), os.getgid(), f['CapEff'].strip(), f['CapPrm'].strip(), f['NoNewPrivs'].strip(), "
             "os.getcwd(), os.getpgrp() == os.getpid())")


@pytest.mark.skipif(not ROOT, reason="changing user needs root")
def test_a_command_run_as_a_service_user_has_its_uid_no_capability_no_new_privileges_and_path_alone():
    who = selfheal.service_identity({"User": "nobody"})
    result = selfheal.run_command(["/usr/bin/python3", "-S", "-c", STATUS_PY], 10, who)
    assert result.rc == 0, result
    uid, gid, eff, prm, nnp, cwd, leader = result.out.split()
    assert (int(uid), int(gid)) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert int(eff, 16) == 0 and int(prm, 16) == 0
    assert nnp == "1"
    assert (cwd, leader) == ("/", "True")
    env = selfheal.run_command(["/usr/bin/env"], 10, who)
    assert env.out == "PATH=%s\n" % selfheal.COMMAND_PATH


def test_a_command_run_as_root_gets_path_alone_cwd_root_and_a_process_group_of_its_own(monkeypatch):
    monkeypatch.setenv("SECRET_OF_SELFHEAL", "x")
    result = selfheal.run_command([PY, "-S", "-c", "import os; print(os.getcwd(), os.getpgrp() == os.getpid())"], 10)
    assert result.rc == 0 and result.out.strip() == "/ True", result
    assert selfheal.run_command(["/usr/bin/env"], 10).out == "PATH=%s\n" % selfheal.COMMAND_PATH


def test_whatever_a_command_started_is_killed_with_its_process_group_at_its_deadline(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(60)']); open(%r, 'w').write(str(p.pid)); time.sleep(60)" % str(pidfile))
    started = time.monotonic()
    result = selfheal.run_command([PY, "-S", "-c", script], 1.0)
    assert result.rc == 124 and time.monotonic() - started < 5
    child = int(pidfile.read_text())
    for _ in range(100):  # killed: gone once reaped by init, or a zombie at worst
        try:
            with open("/proc/%d/stat" % child) as handle:
                if handle.read().split(") ")[1].startswith("Z"):
                    break
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the command's child %d outlived its deadline" % child)


def test_a_child_left_behind_by_a_command_that_exited_is_killed_too(tmp_path):
    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); open(%r, 'w').write(str(p.pid))" % str(pidfile))
    result = selfheal.run_command([PY, "-S", "-c", script], 10)
    assert result.rc == 0
    child = int(pidfile.read_text())
    time.sleep(0.2)
    assert not os.path.exists("/proc/%d" % child) or open("/proc/%d/stat" % child).read().split(") ")[1][0] == "Z"


def test_a_flood_of_output_is_read_to_its_end_but_only_64_kib_kept():
    result = selfheal.run_command([PY, "-S", "-c", "import sys; sys.stdout.write('x' * 3000000)"], 20)
    assert result.rc == 0
    assert len(result.out) < selfheal.COMMAND_OUTPUT_LIMIT + 100
    assert result.out.endswith("[%d more bytes of output not kept]" % (3000000 - selfheal.COMMAND_OUTPUT_LIMIT))


# -- root's alone: the rule for what root runs ----------------------------------------------

def writable_dir(tmp_path, mode):
    path = tmp_path / ("dir-%o" % mode)
    path.mkdir()
    path.chmod(mode)
    script = path / "check"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    return script


def test_root_only_accepts_system_programs_and_config_files():
    assert selfheal.root_only_problems(["/usr/bin/env", "--", "/etc/passwd"]) == []


@pytest.mark.parametrize("mode, said", [
    (0o777, "is writable by anyone (mode 0777)"),
    (0o1777, None),  # sticky: only root may rename or remove root's files in it
], ids=["world-writable-dir", "sticky-dir"])
def test_root_only_refuses_a_program_in_a_directory_others_may_write(tmp_path, mode, said):
    script = writable_dir(tmp_path, mode)
    problems = selfheal.root_only_problems([str(script)])
    if said is None:
        assert not any(str(script.parent) in p for p in problems), problems
    else:
        assert any(p.startswith("%s: %s %s" % (script, script.parent, said)) for p in problems), problems


def test_root_only_refuses_a_script_named_in_the_arguments_and_after_an_equals_sign(tmp_path):
    script = writable_dir(tmp_path, 0o777)
    for argv in (["/usr/bin/python3", str(script)], ["/usr/bin/env", "--config=%s" % script]):
        problems = selfheal.root_only_problems(argv)
        assert any(p.startswith(str(script)) and "writable by anyone" in p for p in problems), (argv, problems)


def test_root_only_leaves_a_file_that_does_not_exist_and_plain_words_alone(tmp_path):
    assert not [p for p in selfheal.root_only_problems(["/usr/bin/env", "-t", "ping", str(tmp_path / "none")])
                if str(tmp_path) in p]


@pytest.mark.skipif(not ROOT, reason="a file of another user needs root to make")
def test_root_only_refuses_a_file_or_a_symlink_of_the_service_account(tmp_path):
    base = tmp_path / "srv"
    base.mkdir()
    script = base / "check"
    script.write_text("#!/bin/sh\n")
    os.chown(script, NOBODY.pw_uid, NOBODY.pw_gid)
    assert selfheal.root_only_problems([str(script)]) == ["%s: %s is owned by nobody, not root" % (script, script)]
    link = base / "link"
    os.symlink("/usr/bin/true", link)
    os.lchown(link, NOBODY.pw_uid, NOBODY.pw_gid)
    assert selfheal.root_only_problems([str(link)]) == ["%s: %s is owned by nobody, not root" % (link, link)]
    os.chown(script, 0, 0)
    grouped = base / "grouped"
    grouped.write_text("#!/bin/sh\n")
    os.chown(grouped, 0, NOBODY.pw_gid)
    grouped.chmod(0o775)
    assert selfheal.root_only_problems([str(grouped)]) == [
        "%s: %s is writable by group %s (mode 0775)" % (grouped, grouped, selfheal.group_name(NOBODY.pw_gid))]


def test_validate_refuses_a_config_check_others_may_write_with_file_line_section_and_key(tmp_path, write_conf, cli):
    script = writable_dir(tmp_path, 0o777)
    path = write_conf("[selfheal]\nemail_to = root@localhost\n\n[worker]\nconfig_check = %s -t\n"
                      "strategies = config_validation, service_restart\nhealth_command = %s\nhealth_run_as = root\n\n[api]\nhealth_command = %s\n"
                      % (script, script, script))
    result = cli("validate", path)
    assert result.returncode == selfheal.EX_CONFIG, result
    lines = result.stderr.splitlines()
    # As root, the directory anyone may write is what is wrong; run by a user (whose files
    # these all are; validate, a command of its own, trusts root alone), the first of them.
    why = ("%s is writable by anyone" % script.parent if ROOT else
           "%s is owned by %s, not root" % (next(p for p in reversed(script.parents) if p.owner() == ME), ME))
    assert any(line.startswith("%s:5 [worker] config_check: root runs it, so it must be root's alone: %s: %s"
                               % (path, script, why)) for line in lines), lines
    assert any(line.startswith("%s:7 [worker] health_command: root runs it" % path) and
               line.endswith("(or let the service run it: health_run_as = service)") for line in lines), lines
    assert not any("[api]" in line for line in lines), lines  # run as the service: its own business


def test_health_run_as_takes_service_or_root_only():
    with pytest.raises(selfheal.ConfigError) as exc:
        selfheal.parse_config("[selfheal]\nemail_to = root@localhost\n\n[worker]\nhealth_command = /bin/true\n"
                              "health_run_as = admin\n", "services.conf")
    assert exc.value.problems == ["services.conf:6 [worker] health_run_as: must be one of service | root: 'admin'"]


# -- at run time: swapped after install, never run as root -------------------------------

def checker_that_leaves_a_mark(tmp_path):
    """A checker in a directory of its own; when it runs, the file `ran` appears."""
    ran = tmp_path / "ran"
    script = tmp_path / "bin" / "check"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\ntouch %s\n" % ran)
    script.chmod(0o755)
    return script, ran


def test_a_config_check_swapped_after_install_is_refused_the_heal_fails_and_the_mail_says_why(bed, tmp_path, as_root):
    script, ran = checker_that_leaves_a_mark(tmp_path)
    load(bed, "[app]\nstrategies = config_validation, service_restart\nconfig_check = %s\n" % script)
    script.parent.chmod(0o777)  # after the config was accepted
    bed.host.unit("app.service")
    bed.host.failed("app.service")
    rc, _ = bed.heal("app")
    assert rc == 1 and not ran.exists()
    assert ["systemctl", "restart", "--", "app.service"] not in bed.host.actions()
    (msg,) = bed.sink.messages
    body = msg.get_content()
    assert msg["Subject"].endswith("app - FAILED")
    assert "selfheal refused to run config_check as root: %s: %s is writable by anyone" % (script, script.parent) in body


def test_a_health_command_run_as_root_swapped_after_install_is_never_run_and_mailed_once(bed, tmp_path, as_root):
    script, ran = checker_that_leaves_a_mark(tmp_path)
    load(bed, "[app]\nhealth_command = %s\nhealth_run_as = root\n" % script)
    bed.host.unit("app.service", ActiveState="active", SubState="running", MainPID="4242")
    script.parent.chmod(0o777)
    assert selfheal.cmd_watch(bed.config, bed.paths) == selfheal.EX_OK
    assert selfheal.cmd_watch(bed.config, bed.paths) == selfheal.EX_OK
    assert not ran.exists()
    subjects = [m["Subject"] for m in bed.sink.messages]
    assert subjects == ["❌ MiracleMax: selfheal - CONFIG BROKEN"], subjects
    assert "refused to run a command of its config as root" in bed.sink.messages[0].get_content()
    # and a heal of it refuses before restarting anything
    bed.host.failed("app.service")
    assert bed.heal("app")[0] == 1 and not ran.exists()
    assert ["systemctl", "restart", "--", "app.service"] not in bed.host.actions()


# -- text that reaches a person ---------------------------------------------------------------

@pytest.mark.parametrize("char", ["\u202e", "\u202a", "\u2066", "\u2069", "\u200b", "\u200d", "\u200e",
                                  "\u2060", "\ufeff", "\u061c", "\u00ad"])
def test_bidi_and_zero_width_characters_are_escaped_like_other_controls(char):
    cleaned = selfheal.clean("price: 10%sEUR" % char)
    assert char not in cleaned and ("\\u%04x" % ord(char) in cleaned or "\\x%02x" % ord(char) in cleaned)


@pytest.mark.parametrize("line, expected", [
    ("app.service: Ignoring invalid environment assignment 'STRIPE-KEY=sk_live_123': /etc/app.env",
     "app.service: Ignoring invalid environment assignment 'STRIPE-KEY=***': /etc/app.env"),
    ("app.service: Ignoring invalid environment assignment 'KEY=it's a secret': /etc/app.env",
     "app.service: Ignoring invalid environment assignment 'KEY=***': /etc/app.env"),
    ("/etc/systemd/system/app.service:7: Invalid environment assignment, ignoring: TOKEN=abc def",
     "/etc/systemd/system/app.service:7: Invalid environment assignment, ignoring: TOKEN=***"),
    ("app.service: Ignoring invalid environment assignment 'sk_live_123': /etc/app.env",
     "app.service: Ignoring invalid environment assignment '***': /etc/app.env"),
    ("Started app.service - the environment is fine.", "Started app.service - the environment is fine."),
], ids=["quoted", "quote-in-value", "unquoted", "no-name", "no-assignment"])
def test_an_environment_assignment_systemd_quotes_keeps_its_name_and_loses_its_value(line, expected):
    assert selfheal.clean(line) == expected


def test_a_huge_journal_line_is_bounded_and_so_is_the_excerpt():
    text = "\n".join(["2026-12-07T10:00:00+0000 host app[1]: " + "A" * 20000] * 3 + ["last line"])
    excerpt = selfheal.journal_excerpt(text)
    assert excerpt[-1] == "last line"
    assert all(len(line) <= selfheal.QUOTED_LINE_CHARS + 60 for line in excerpt)
    assert sum(len(line) for line in excerpt) <= selfheal.EXCERPT_CHARS + 200
    assert "more characters not shown" in excerpt[-2]


def test_a_mail_quoting_a_20_kb_journal_line_stays_small(bed):
    bed.host.failed("worker.service")
    bed.host.journal(["2026-12-07T10:00:00+0000 host worker[1]: " + "B" * 20000,
                      "2026-12-07T10:00:01+0000 host worker[1]: \u202eevil\u200b",
                      "2026-12-07T10:00:02+0000 systemd[1]: worker.service: Ignoring invalid environment "
                      "assignment 'API-KEY=sk_live_999': /etc/worker.env"],
                     invocation=selfheal.show_unit("worker.service").get("InvocationID"))
    bed.heal("worker")
    (msg,) = bed.sink.messages
    raw = msg.as_bytes()
    assert len(raw) < 16000, len(raw)
    body = msg.get_content()
    assert "sk_live_999" not in body and "API-KEY=***" in body
    assert "\u202e" not in body and "\u200b" not in body and "\\u202eevil\\u200b" in body


# -- entries that cannot be forged ------------------------------------------------------------

def test_every_readme_query_on_selfheals_journal_fields_asks_for_uid_0(repo_root):
    readme = (repo_root / "README.md").read_text(encoding="utf-8")
    queries = [line.strip("` ") for line in readme.splitlines()
               if "journalctl" in line and re.search(r"-t miraclemax-self-heal|MESSAGE_ID=|SELFHEAL_SERVICE=", line)]
    queries = [q[q.index("journalctl"):] for q in queries]
    assert len(queries) >= 4, queries
    assert [q for q in queries if "_UID=0" not in q.split("#")[0]] == []


def test_the_journal_of_a_failed_run_is_matched_on_fields_journald_sets(monkeypatch):
    seen = []
    monkeypatch.setattr(selfheal, "run", lambda argv, timeout=0: seen.append(argv) or selfheal.CmdResult(
        tuple(argv), 0, "", "", 0.0))
    selfheal.read_journal("abc123", "app.service")
    matches = [arg for arg in seen[0] if "=" in arg or arg == "+"]
    assert matches == ["_SYSTEMD_INVOCATION_ID=abc123", "+", "_PID=1", "INVOCATION_ID=abc123"]
