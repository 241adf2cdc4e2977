"""Triage and the repair strategies of issue 4 (config_validation, environment_check,
database_check), through the fakes (tests/fakes on PATH, no systemd) with real files under
tmp_path: a real config checker, real env files, real symlinks and a real SQLite database.

Bugs this file found were fixed; each keeps its test.
"""

import hashlib
import json
import os
import pwd
import re
import sqlite3
import stat
import sys
import time

import pytest

import selfheal

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

APP = "app.service"


# =============================================================================
# Helpers
# =============================================================================


def add_services(bed, text):
    """Append service sections to the bed's config and load it again."""
    with open(bed.config_path, "a", encoding="utf-8") as handle:
        handle.write("\n" + text)
    bed.config = selfheal.load_config(bed.config_path, trusted=False)
    return bed.config


def reorder(bed, old, new):
    """Replace the [app] strategies line `old` by `new` and load the config again."""
    with open(bed.config_path, encoding="utf-8") as handle:
        text = handle.read()
    assert old in text
    with open(bed.config_path, "w", encoding="utf-8") as handle:
        handle.write(text.replace(old, new))
    bed.config = selfheal.load_config(bed.config_path, trusted=False)


def started_usec(seconds_ago):
    """A systemd ...TimestampMonotonic value (microseconds of CLOCK_MONOTONIC)."""
    return str(int((time.monotonic() - seconds_ago) * 1e6))


def env_files_prop(*entries):
    """EnvironmentFiles= as systemctl show prints it: one `EnvironmentFiles=PATH
    (ignore_errors=yes|no)` line per entry. The fake prints a value as it is, so the newline
    gives the second and later lines."""
    return "\nEnvironmentFiles=".join("%s (ignore_errors=%s)" % (path, "yes" if optional else "no")
                                      for path, optional in entries)


def body_of(bed, index=0):
    return bed.sink.messages[index].get_content()


def restarts(bed):
    return [c for c in bed.host.actions() if c[:2] == ["systemctl", "restart"]]


def lines_of(text):
    return [line.strip() for line in text.splitlines()]


def make_diag(result="exit-code", code="exited", status="1", journal=(), finding=None, **props):
    return selfheal.Diagnosis(unit=dict(props), result=result, exit_code=code, exit_status=status,
                              from_monitor_env=False, journal=tuple(journal), listeners=(), holders=(),
                              failed_at=None, detected_after=None, finding=finding)


def sha(path):
    return hashlib.sha256(open(str(path), "rb").read()).hexdigest()


# =============================================================================
# Triage: the kind of failure from systemd's result, the exit status, the journal
# =============================================================================

JOURNAL_KINDS = [
    ("port_in_use", "vm python3[4100]: OSError: [Errno 98] Address already in use"),
    ("port_in_use", "vm nginx[4100]: nginx: [emerg] bind() to 0.0.0.0:80 failed (98: Address in use)"),
    ("missing_env", "vm python3[4100]: KeyError: 'DATABASE_URL'"),
    ("missing_env", "vm app[4100]: environment variable SECRET_KEY is not set"),
    ("missing_env", "vm app[4100]: fatal: DATABASE_URL is not set"),
    ("bad_config", "vm nginx[4100]: nginx: [emerg] unknown directive \"bogus\" in /etc/nginx/nginx.conf:3"),
    ("bad_config", "vm app[4100]: configuration file /etc/app/app.conf test failed"),
    ("bad_config", "vm app[4100]: syntax error at line 3"),
    ("database", "vm python3[4100]: sqlite3.DatabaseError: database disk image is malformed"),
    ("database_access", "vm python3[4100]: sqlite3.OperationalError: unable to open database file"),
    ("database", "vm python3[4100]: sqlite3.DatabaseError: file is not a database"),
    ("disk_full", "vm python3[4100]: OSError: [Errno 28] No space left on device"),
    ("permission", "vm python3[4100]: PermissionError: [Errno 13] Permission denied: '/var/lib/app/app.db'"),
    ("missing_file", "vm python3[4100]: FileNotFoundError: [Errno 2] No such file or directory: '/srv/app/x'"),
    ("oom", "vm python3[4100]: MemoryError"),
    ("oom", "vm kernel: Out of memory: Killed process 4100 (python3)"),
]


@pytest.mark.parametrize("kind, line", JOURNAL_KINDS, ids=["%s-%d" % (k, i) for i, (k, _) in enumerate(JOURNAL_KINDS)])
def test_triage_classifies_a_journal_line_and_gives_it_as_evidence(kind, line):
    journal = ["vm app[4100]: starting", line, "vm systemd[1]: app.service: Failed with result 'exit-code'."]
    assert selfheal.triage(make_diag(journal=journal)) == (kind, line)


def test_triage_takes_the_last_telling_line_of_the_journal():
    journal = ["vm app[1]: OSError: [Errno 98] Address already in use",
               "vm app[2]: KeyError: 'DATABASE_URL'"]
    assert selfheal.triage(make_diag(journal=journal))[0] == "missing_env"


@pytest.mark.parametrize("result, code, status, kind, evidence", [
    ("oom-kill", "killed", "KILL", "oom", "systemd result oom-kill"),
    ("start-limit-hit", "exited", "1", "start_limit", "systemd result start-limit-hit"),
    ("timeout", "killed", "TERM", "hang", "systemd result timeout"),
    ("watchdog", "killed", "ABRT", "hang", "systemd result watchdog"),
    ("exit-code", "exited", "203", "exec", "exit status 203/EXEC"),
    ("core-dump", "dumped", "SEGV", "crash", "signal SEGV"),
    ("signal", "killed", "KILL", "killed", "signal KILL"),
    ("exit-code", "exited", "1", "exit", ""),
])
def test_triage_classifies_systemds_result_and_exit_status(result, code, status, kind, evidence):
    assert selfheal.triage(make_diag(result, code, status)) == (kind, evidence)


def test_systemds_result_wins_over_a_journal_line():
    diag = make_diag("oom-kill", "killed", "KILL", journal=["vm app[1]: OSError: [Errno 98] Address already in use"])
    assert selfheal.triage(diag) == ("oom", "systemd result oom-kill")


@pytest.mark.parametrize("finding_kind, kind", [("unhealthy", "hang"), ("stopped", "stopped")])
def test_triage_of_a_watch_finding_uses_the_finding_and_its_detail(finding_kind, kind):
    finding = selfheal.Finding(finding_kind, "port 5002 open but GET http://127.0.0.1:5002/: no answer", time.time())
    diag = make_diag("success", "", "", journal=["vm app[1]: OSError: [Errno 98] Address already in use"],
                     finding=finding)
    assert selfheal.triage(diag) == (kind, finding.detail)


def test_triage_of_nothing_telling_is_unknown_without_evidence():
    assert selfheal.triage(make_diag("", "", "", journal=["vm app[1]: hello"])) == ("unknown", "")


@pytest.mark.parametrize("line", ["vm app[1]: config file is missing", "vm app[1]: the value is required"])
def test_a_lowercase_word_that_is_missing_is_not_a_missing_environment_variable(line):
    assert selfheal.triage(make_diag(journal=[line]))[0] != "missing_env"


def test_systemd_failing_to_load_an_environment_file_is_triaged_missing_env():
    journal = ["vm systemd[1]: app.service: Failed to load environment files: No such file or directory",
               "vm systemd[1]: app.service: Failed to run 'start' task: No such file or directory",
               "vm systemd[1]: app.service: Failed with result 'resources'."]
    kind, evidence = selfheal.triage(make_diag("resources", "", "", journal=journal))
    assert kind == "missing_env"
    assert "environment files" in evidence


# --- plan_strategies ---------------------------------------------------------


@pytest.mark.parametrize("configured, kind, planned", [
    (("service_restart", "port_conflict"), "port_in_use", ["port_conflict", "service_restart"]),
    (("service_restart", "config_validation"), "bad_config", ["config_validation", "service_restart"]),
    (("service_restart", "environment_check"), "missing_env", ["environment_check", "service_restart"]),
    (("service_restart", "database_check"), "database", ["database_check", "service_restart"]),
    (("service_restart", "database_check"), "disk_full", ["database_check", "service_restart"]),
    (("service_restart", "environment_check", "database_check"), "permission",
     ["database_check", "service_restart", "environment_check"]),
    (("service_restart", "config_validation", "environment_check"), "oom",
     ["service_restart", "config_validation", "environment_check"]),
    (("environment_check", "service_restart"), "port_in_use", ["environment_check", "service_restart"]),
    (("service_restart",), "port_in_use", ["service_restart"]),
])
def test_plan_moves_the_fitting_strategy_first_and_keeps_the_configured_order_otherwise(configured, kind, planned):
    assert selfheal.plan_strategies(configured, kind) == planned


KINDS = sorted({kind.kind for kind in selfheal.FAILURE_KINDS} |
               {"hang", "stopped", "exec", "start_limit", "crash", "killed", "exit", "unknown"})


@pytest.mark.parametrize("kind", KINDS)
def test_plan_never_adds_drops_or_repeats_a_strategy(kind):
    configured = ("service_restart", "database_check", "config_validation", "environment_check", "port_conflict")
    for n in range(1, len(configured) + 1):
        planned = selfheal.plan_strategies(configured[:n], kind)
        assert sorted(planned) == sorted(configured[:n])
        assert len(planned) == len(set(planned))


def test_every_failure_kind_names_strategies_that_exist_and_every_strategy_key_is_a_service_key():
    named = {name for kind in selfheal.FAILURE_KINDS for name in kind.strategies}
    assert named and named <= set(selfheal.STRATEGIES)
    keys = {key for strategy in selfheal.STRATEGIES.values() for key in strategy.keys + strategy.needs}
    assert keys and keys <= set(selfheal.SERVICE_KEYS)


@pytest.mark.parametrize("line, kind", [
    ("OSError: [Errno 98] Address already in use", "port_in_use"),
    ("KeyError: 'DATABASE_URL'", "missing_env"),
    ("nginx: [emerg] unknown directive \"servr\" in /etc/nginx/sites-enabled/default:3", "bad_config"),
    ("sqlite3.DatabaseError: database disk image is malformed", "database"),
    ("OSError: [Errno 28] No space left on device", "disk_full"),
    ("PermissionError: [Errno 13] Permission denied: '/srv/app/data'", "permission"),
    ("FileNotFoundError: [Errno 2] No such file or directory: '/srv/app/app.yml'", "missing_file"),
    ("MemoryError", "oom"),
])
def test_triage_and_the_root_cause_name_the_same_failure_from_one_table(line, kind):
    """Triage's kind and the report's ROOT CAUSE come from FAILURE_KINDS alike: they cannot disagree."""
    diag = make_diag(journal=("vm app[7]: starting", "vm app[7]: " + line))
    assert selfheal.triage(diag) == (kind, "vm app[7]: " + line)
    cause = selfheal.root_cause(selfheal.Service(name="app", unit="app.service"), diag)
    assert selfheal.FAILURE_KIND[kind].cause in cause.summary or "port was already taken" in cause.summary
    assert cause.evidence == "vm app[7]: " + line


# =============================================================================
# config_validation
# =============================================================================

CHECKER_PY = """\
import json, os, sys
path = sys.argv[1]
with open(os.environ["FAKE_SYSTEMD_CALLS"], "a") as calls:  # in the order of the fake host's calls
    calls.write(json.dumps(["checker", path]) + "\\n")
print("checking " + path)
for number, line in enumerate(open(path), 1):
    if line.split()[:1] == ["bogus"]:
        print("%s line %d: unknown directive 'bogus'" % (path, number))
        sys.exit(1)
print("syntax is ok")
"""

GOOD_CONF = "listen = 8080\nworkers = 4\n"
BAD_CONF = "listen = 8080\nworkers = 4\nbogus on\n"


@pytest.fixture
def checked(bed, tmp_path, monkeypatch):
    """[app] with a real config checker (a Python script) and its config file, root's as on
    a host: selfheal quotes a checker's output only then (the config of the service's own
    account could make it quote any file: test_trust.py). A user's run cannot make a file
    root's, so there selfheal is told the owner is root."""
    script = tmp_path / "check-app-conf.py"
    script.write_text(CHECKER_PY)
    conf = tmp_path / "app.conf"
    conf.write_text(GOOD_CONF)
    if os.geteuid() != 0:
        monkeypatch.setattr(selfheal, "config_owners", lambda svc: [(path, 0) for path in svc.config_files])
    add_services(bed, "[app]\nstrategies = config_validation, service_restart\n"
                      "config_check = %s -S %s %s\nconfig_files = %s\n" % (sys.executable, script, conf, conf))
    return conf


def test_config_rejected_by_its_checker_is_failed_without_any_restart_and_the_mail_has_its_output(bed, checked, section):
    checked.write_text(BAD_CONF)
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    rc, _ = bed.heal("app")
    assert rc == 1
    assert bed.host.actions() == [["checker", str(checked)]]  # checked, never restarted
    (msg,) = bed.sink.messages
    assert msg["Subject"] == "❌ MiracleMax: app - FAILED"
    body = msg.get_content()
    found = lines_of(section(body, "HEALING"))
    assert "%s line 3: unknown directive 'bogus'" % checked in found  # each output line on its own line
    assert any(line.startswith("- config check:") and "FAILED" in line and "checking %s" % checked in line
               for line in found)
    assert "was not restarted" in section(body, "WHY A HUMAN IS NEEDED")
    assert [e["outcome"] for e in bed.history("app")] == ["FAILED"]


def test_config_rejected_after_a_sigkill_makes_root_cause_the_config_not_the_kill(bed, checked, section):
    checked.write_text(BAD_CONF)
    bed.host.failed(APP, result="signal", code="killed", status="KILL")
    assert bed.heal("app")[0] == 1
    cause = section(bed.sink.messages[0].get_content(), "ROOT CAUSE")
    assert cause.startswith("Its configuration is invalid: its own check `"), cause
    assert "line 3: unknown directive 'bogus'" in cause and "SIGKILL" not in cause and "journalctl -k" not in cause


def test_config_accepted_by_its_checker_is_restarted_after_the_check_and_resolved(bed, checked):
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    rc, _ = bed.heal("app")
    assert rc == 0
    assert bed.host.actions() == [["checker", str(checked)], ["systemctl", "restart", "--", APP]]
    (event,) = bed.history("app")
    assert (event["outcome"], event["strategy"]) == ("RESOLVED", "config_validation")
    assert "syntax is ok" in body_of(bed)


def test_fixed_config_heals_on_the_next_trigger_after_a_failed_one(bed, checked):
    checked.write_text(BAD_CONF)
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 1
    checked.write_text(GOOD_CONF)
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    bed.host.clear_calls()
    assert bed.heal("app")[0] == 0
    assert restarts(bed) == [["systemctl", "restart", "--", APP]]
    assert [e["outcome"] for e in bed.history("app")] == ["FAILED", "RESOLVED"]
    assert [m["Subject"].split(" - ")[-1] for m in bed.sink.messages] == ["FAILED", "RESOLVED"]


def test_bad_config_journal_line_moves_config_validation_before_the_restart_so_nothing_restarts(
        bed, checked, section):
    reorder(bed, "strategies = config_validation, service_restart", "strategies = service_restart, config_validation")
    checked.write_text(BAD_CONF)
    line = "vm app[4100]: app.conf line 3: unknown directive 'bogus'"
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    bed.host.journal(["vm app[4100]: starting", line])
    rc, _ = bed.heal("app")
    assert rc == 1
    assert restarts(bed) == []
    triage_line = [ln for ln in lines_of(section(body_of(bed), "DIAGNOSIS")) if ln.startswith("Triage:")]
    assert triage_line == ["Triage: bad_config (%s); strategies in this order: config_validation, service_restart "
                           "(config_validation moved first: it fits the evidence)" % line]


def test_config_without_a_checker_is_restarted_and_changed_files_are_listed(bed, tmp_path, section):
    conf = tmp_path / "traefik.yml"
    conf.write_text("entryPoints: {}\n")
    add_services(bed, "[app]\nstrategies = config_validation\nconfig_files = %s\n" % conf)
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 0
    assert bed.host.actions() == [["systemctl", "restart", "--", APP]]
    healing = lines_of(section(body_of(bed), "HEALING"))
    assert any(ln.startswith("· %s: modified " % conf) and "no copy from a healthy start" in ln for ln in healing)


def test_failed_mail_shows_the_config_diff_since_the_last_healthy_start(bed, checked, section):
    old = time.time() - 100
    os.utime(str(checked), (old, old))
    svc = bed.config.services["app"]
    selfheal.remember_config_files(bed.paths, svc, {"ActiveEnterTimestampMonotonic": started_usec(10)})
    checked.write_text(BAD_CONF)
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 1
    healing = lines_of(section(body_of(bed), "HEALING"))
    assert any(ln.startswith("· %s: CHANGED since the last healthy start" % checked) for ln in healing)
    assert "·     +bogus on" in section(body_of(bed), "HEALING")


# --- remember_config_files / config_changes --------------------------------------


@pytest.fixture
def conf_svc(tmp_path):
    conf = tmp_path / "etc" / "app.conf"
    conf.parent.mkdir()
    conf.write_text("listen = 80\npassword = hunter2\nworkers = 4\n")
    old = time.time() - 100
    os.utime(str(conf), (old, old))
    svc = selfheal.Service("app", APP, strategies=("config_validation",), config_files=(str(conf),))
    paths = selfheal.Paths(tmp_path / "state", tmp_path / "run", tmp_path / "log")
    return conf, svc, paths


def test_config_file_older_than_the_healthy_start_is_kept_privately(conf_svc):
    conf, svc, paths = conf_svc
    selfheal.remember_config_files(paths, svc, {"ActiveEnterTimestampMonotonic": started_usec(10)})
    index = json.loads((selfheal.baseline_dir(paths, "app") / "index.json").read_text())
    copy = index[str(conf)]["copy"]
    assert open(copy).read() == conf.read_text()
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o600  # it may hold secrets
    assert selfheal.config_changes(paths, svc) == ["%s: unchanged since the last healthy start" % conf]


def test_config_file_changed_after_the_start_is_not_kept(conf_svc):
    conf, svc, paths = conf_svc
    selfheal.remember_config_files(paths, svc, {"ActiveEnterTimestampMonotonic": started_usec(200)})
    assert not (selfheal.baseline_dir(paths, "app") / "index.json").exists()
    (line,) = selfheal.config_changes(paths, svc)
    assert line == "%s: modified %s, %d bytes (no copy from a healthy start to compare)" % (
        conf, selfheal.iso(conf.stat().st_mtime), conf.stat().st_size)


def test_config_file_without_a_start_timestamp_is_not_kept(conf_svc):
    conf, svc, paths = conf_svc
    selfheal.remember_config_files(paths, svc, {"ActiveEnterTimestampMonotonic": "0"})
    selfheal.remember_config_files(paths, svc, {})
    assert not selfheal.baseline_dir(paths, "app").exists()


def test_changed_config_file_shows_mtime_size_and_a_unified_diff(conf_svc):
    conf, svc, paths = conf_svc
    was = conf.stat()
    selfheal.remember_config_files(paths, svc, {"ActiveEnterTimestampMonotonic": started_usec(10)})
    conf.write_text("listen = 8080\npassword = hunter2\nworkers = 4\n")
    now = time.time()
    os.utime(str(conf), (now, now))
    lines = selfheal.config_changes(paths, svc)
    assert lines[0] == ("%s: CHANGED since the last healthy start: modified %s (was %s), %d bytes (was %d)" % (
        conf, selfheal.iso(now), selfheal.iso(was.st_mtime), conf.stat().st_size, was.st_size))
    diff = [ln.strip() for ln in lines[1:]]
    assert diff[:2] == ["--- %s (healthy start)" % conf, "+++ %s (now)" % conf]
    assert "-listen = 80" in diff and "+listen = 8080" in diff


def test_config_diff_masks_a_changed_password_line(conf_svc):
    conf, svc, paths = conf_svc
    selfheal.remember_config_files(paths, svc, {"ActiveEnterTimestampMonotonic": started_usec(10)})
    conf.write_text("listen = 80\npassword = hunter3\nworkers = 4\n")
    text = "\n".join(selfheal.config_changes(paths, svc))
    assert "hunter2" not in text and "hunter3" not in text
    diff = [ln.strip() for ln in text.splitlines()[1:]]
    assert "- [a line that looks like a secret]" in diff
    assert "+ [a line that looks like a secret]" in diff


def test_config_diff_masks_an_unchanged_password_line_shown_as_context(conf_svc):
    conf, svc, paths = conf_svc
    selfheal.remember_config_files(paths, svc, {"ActiveEnterTimestampMonotonic": started_usec(10)})
    conf.write_text("listen = 81\npassword = hunter2\nworkers = 4\n")
    text = "\n".join(selfheal.config_changes(paths, svc))
    assert "-listen = 80" in text and "hunter2" not in text


def test_config_diff_masks_a_space_separated_secret(conf_svc):
    conf, svc, paths = conf_svc
    conf.write_text("port 6379\nrequirepass hunter2\n")
    old = time.time() - 100
    os.utime(str(conf), (old, old))
    selfheal.remember_config_files(paths, svc, {"ActiveEnterTimestampMonotonic": started_usec(10)})
    conf.write_text("port 6380\nrequirepass hunter3\n")
    text = "\n".join(selfheal.config_changes(paths, svc))
    assert "-port 6379" in text  # the diff is there ...
    assert "hunter2" not in text and "hunter3" not in text  # ... without the secret


def test_config_file_that_is_gone_is_named_with_the_reason(conf_svc):
    conf, svc, paths = conf_svc
    conf.unlink()
    assert selfheal.config_changes(paths, svc) == ["%s: No such file or directory" % conf]


# =============================================================================
# environment_check
# =============================================================================


NOT_NAME_VALUE = "not NAME=value (a name has only letters, digits and _; the line is not shown: it may hold a secret)"

ENV_PARSE = [  # id, text, {name: (line, value)}, problems
    pytest.param("A=1\nB=two words\n", {"A": (1, "1"), "B": (2, "two words")}, [], id="plain"),
    pytest.param('A="x y"\n', {"A": (1, "x y")}, [], id="double-quotes"),
    pytest.param("A='x y'\n", {"A": (1, "x y")}, [], id="single-quotes"),
    pytest.param('A=""\n', {"A": (1, "")}, [], id="empty-quotes"),
    pytest.param("A=\n", {"A": (1, "")}, [], id="empty"),
    pytest.param("export A=1\n", {"A": (1, "1")}, [], id="export"),
    pytest.param("  A = 1  \n", {"A": (1, "1")}, [], id="spaces-around"),
    pytest.param("URL=postgres://u:p@h/db?x=1\n", {"URL": (1, "postgres://u:p@h/db?x=1")}, [], id="equals-in-value"),
    pytest.param("# a comment\n; another\n\nA=1\n", {"A": (4, "1")}, [], id="comments-and-blanks"),
    pytest.param("A=one \\\ntwo\nB=3\n", {"A": (1, "one two"), "B": (3, "3")}, [], id="continuation"),
    pytest.param('A=1\nB="open\n', {"A": (1, "1")}, ["line 2: B: the quote is not closed"], id="unclosed-quote"),
    pytest.param("A=1\nthis is not one\n", {"A": (1, "1")}, ["line 2: %s" % NOT_NAME_VALUE], id="not-an-assignment"),
    pytest.param("1A=x\n", {}, ["line 1: %s" % NOT_NAME_VALUE], id="bad-name"),
    pytest.param("A=1\nA=2\n", {"A": (2, "2")}, [], id="last-wins"),
]


@pytest.mark.parametrize("text, names, problems", ENV_PARSE)
def test_parse_env_file_gives_names_with_line_and_value_and_problems_with_their_line(text, names, problems):
    assert selfheal.parse_env_file(text) == (names, problems)


def test_parse_env_file_reads_a_quoted_value_over_several_lines():
    text = 'KEY="-----BEGIN KEY-----\nabc\n-----END KEY-----"\nB=2\n'
    assert selfheal.parse_env_file(text) == (
        {"KEY": (1, "-----BEGIN KEY-----\nabc\n-----END KEY-----"), "B": (4, "2")}, [])


def test_unit_env_files_reads_systemctl_shows_entries_with_their_ignore_errors():
    assert selfheal.unit_env_files({"EnvironmentFiles": "/etc/app/env (ignore_errors=no)"}) == [("/etc/app/env", False)]
    assert selfheal.unit_env_files({"EnvironmentFiles": "/etc/app/opt (ignore_errors=yes)"}) == [("/etc/app/opt", True)]
    assert selfheal.unit_env_files({}) == []


@pytest.fixture
def envbed(bed, tmp_path):
    """[app] with environment_check: the unit's EnvironmentFile= app.env and env_file extra.env."""
    unit_env = tmp_path / "app.env"
    extra = tmp_path / "extra.env"
    unit_env.write_text("DATABASE_URL=postgres://db/app\n")
    extra.write_text("SECRET_KEY=s3cret\n")
    for path in (unit_env, extra):
        path.chmod(0o600)
    add_services(bed, "[app]\nstrategies = environment_check, service_restart\nenv_file = %s\n"
                      "required_env = DATABASE_URL, SECRET_KEY\n" % extra)
    bed.host.failed(APP, result="exit-code", code="1", status="1",
                    EnvironmentFiles=env_files_prop((str(unit_env), False)))
    return bed, unit_env, extra


def test_environment_all_set_goes_on_to_the_restart_and_is_resolved(envbed, section):
    bed, unit_env, extra = envbed
    assert bed.heal("app")[0] == 0
    assert bed.host.actions() == [["systemctl", "restart", "--", APP]]
    (event,) = bed.history("app")
    assert (event["outcome"], event["strategy"]) == ("RESOLVED", "service_restart")
    healing = section(body_of(bed), "HEALING")
    assert "environment ok: %s, %s" % (unit_env, extra) in healing
    assert "warning" not in healing


def test_required_name_missing_fails_naming_the_name_and_every_file_without_a_restart(envbed, section):
    bed, unit_env, extra = envbed
    extra.write_text("OTHER=1\n")
    rc, _ = bed.heal("app")
    assert rc == 1
    assert restarts(bed) == []
    body = body_of(bed)
    assert bed.sink.messages[0]["Subject"] == "❌ MiracleMax: app - FAILED"
    assert "SECRET_KEY is not set (looked in %s, %s and the unit's Environment=)" % (unit_env, extra) in body
    assert "was not restarted" in section(body, "WHY A HUMAN IS NEEDED")
    assert extra.read_text() == "OTHER=1\n"  # never invented or rewritten


def test_required_name_with_an_empty_value_fails_naming_file_and_line(envbed):
    bed, unit_env, extra = envbed
    unit_env.write_text("# the database\nDATABASE_URL=\n")
    assert bed.heal("app")[0] == 1
    assert restarts(bed) == []
    assert "%s:2: DATABASE_URL is empty" % unit_env in body_of(bed)


def test_optional_name_with_an_empty_value_is_fine(envbed):
    bed, unit_env, extra = envbed
    unit_env.write_text("DATABASE_URL=postgres://db/app\nDEBUG=\n")
    assert bed.heal("app")[0] == 0


def test_syntax_error_in_an_env_file_is_reported_with_file_and_line(envbed):
    bed, unit_env, extra = envbed
    unit_env.write_text("DATABASE_URL=postgres://db/app\n\nthis is not an assignment\n")
    assert bed.heal("app")[0] == 1
    assert restarts(bed) == []
    assert "%s: line 3: not NAME=value" % unit_env in body_of(bed)
    assert "this is not an assignment" not in body_of(bed)  # a misspelt secret is never quoted


def test_missing_required_env_file_of_the_unit_fails_naming_it(envbed):
    bed, unit_env, extra = envbed
    unit_env.unlink()
    assert bed.heal("app")[0] == 1
    assert restarts(bed) == []
    body = body_of(bed)
    assert "%s: missing (the unit's EnvironmentFile= needs it)" % unit_env in body


def test_missing_optional_env_file_is_fine(bed, tmp_path):
    extra = tmp_path / "extra.env"
    extra.write_text("DATABASE_URL=postgres://db/app\n")
    add_services(bed, "[app]\nstrategies = environment_check, service_restart\nenv_file = %s\n"
                      "required_env = DATABASE_URL\n" % extra)
    bed.host.failed(APP, result="exit-code", code="1", status="1",
                    EnvironmentFiles=env_files_prop((str(tmp_path / "optional.env"), True)))
    assert bed.heal("app")[0] == 0
    assert [e["outcome"] for e in bed.history("app")] == ["RESOLVED"]


def test_world_readable_env_file_with_a_secret_is_a_warning_not_a_failure(envbed, section):
    bed, unit_env, extra = envbed
    extra.chmod(0o644)
    assert bed.heal("app")[0] == 0
    assert restarts(bed) == [["systemctl", "restart", "--", APP]]
    healing = section(body_of(bed), "HEALING")
    assert "· warning: %s is readable by everyone and holds SECRET_KEY (chmod o-r %s)" % (extra, extra) in healing
    assert "s3cret" not in body_of(bed)
    assert stat.S_IMODE(extra.stat().st_mode) == 0o644  # reported, not changed


def test_world_readable_env_file_without_secrets_is_no_warning(envbed, section):
    bed, unit_env, extra = envbed
    unit_env.chmod(0o644)
    assert bed.heal("app")[0] == 0
    assert "warning" not in section(body_of(bed), "HEALING")


def test_required_name_set_in_the_units_environment_is_enough(envbed):
    bed, unit_env, extra = envbed
    extra.write_text("")
    with bed.host.edit() as state:
        state["units"][APP]["props"]["Environment"] = "PORT=5002 SECRET_KEY=abc"
    assert bed.heal("app")[0] == 0


def test_missing_env_journal_line_moves_environment_check_before_the_restart(envbed, section):
    bed, unit_env, extra = envbed
    reorder(bed, "strategies = environment_check, service_restart", "strategies = service_restart, environment_check")
    extra.write_text("")
    bed.host.journal(["vm app[4100]: KeyError: 'SECRET_KEY'"])
    assert bed.heal("app")[0] == 1
    assert restarts(bed) == []
    assert "strategies in this order: environment_check, service_restart" in section(body_of(bed), "DIAGNOSIS")


def test_every_environmentfile_of_the_unit_is_read(bed, tmp_path):
    first, second = tmp_path / "first.env", tmp_path / "second.env"
    first.write_text("DATABASE_URL=postgres://db/app\n")
    second.write_text("OTHER=1\n")
    add_services(bed, "[app]\nstrategies = environment_check, service_restart\nrequired_env = DATABASE_URL\n")
    bed.host.failed(APP, result="exit-code", code="1", status="1",
                    EnvironmentFiles=env_files_prop((str(first), False), (str(second), True)))
    assert selfheal.unit_env_files(selfheal.show_unit(APP)) == [(str(first), False), (str(second), True)]
    assert bed.heal("app")[0] == 0


def test_required_name_in_a_quoted_environment_entry_is_set(bed):
    add_services(bed, "[app]\nstrategies = environment_check, service_restart\nrequired_env = GREETING\n")
    bed.host.failed(APP, result="exit-code", code="1", status="1",
                    Environment='"GREETING=hello world" PORT=5002')
    assert bed.heal("app")[0] == 0


def test_required_name_empty_in_the_units_environment_fails(bed):
    add_services(bed, "[app]\nstrategies = environment_check, service_restart\nrequired_env = SECRET_KEY\n")
    bed.host.failed(APP, result="exit-code", code="1", status="1", Environment="SECRET_KEY= PORT=5002")
    assert bed.heal("app")[0] == 1
    assert restarts(bed) == []
    assert "SECRET_KEY is empty" in body_of(bed)


# =============================================================================
# database_check
# =============================================================================


def make_sqlite(path, rows=400):
    """A real SQLite database of many 1 KiB pages."""
    db = sqlite3.connect(str(path))
    try:
        db.execute("PRAGMA page_size = 1024")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
        db.executemany("INSERT INTO t (body) VALUES (?)", [("row %05d " % i * 10,) for i in range(rows)])
        db.commit()
    finally:
        db.close()
    return path


def corrupt(path):
    """Overwrite one whole page in the middle of the database with garbage."""
    pages = os.path.getsize(str(path)) // 1024
    assert pages > 10  # a page in the middle is a b-tree page, not the header
    with open(str(path), "r+b") as handle:
        handle.seek(pages // 2 * 1024)
        handle.write(b"\xff" * 1024)


@pytest.fixture
def data(tmp_path):
    """tmp/data/app.db (a real SQLite file, 0640) and where the service's link to it lives."""
    (tmp_path / "data").mkdir()
    (tmp_path / "srv").mkdir()
    db = make_sqlite(tmp_path / "data" / "app.db")
    db.chmod(0o640)
    return db, tmp_path / "srv" / "current.db"


def test_sqlite_quick_check_of_a_healthy_database_is_ok(data):
    db, _ = data
    assert selfheal.sqlite_quick_check(str(db)) == "ok"


def test_sqlite_quick_check_of_a_corrupted_database_is_not_ok_and_leaves_it_as_it_was(data):
    db, _ = data
    corrupt(db)
    before = sha(db)
    verdict = selfheal.sqlite_quick_check(str(db))
    # SQLite's own word on the damage: the error it stops with, or quick_check's first rows
    assert verdict == "database disk image is malformed" or verdict.startswith("*** in database main ***"), verdict
    assert sha(db) == before  # read-only


def test_sqlite_quick_check_of_a_file_that_is_not_sqlite_is_empty(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("SQLite is mentioned, but this is text\n")
    assert selfheal.sqlite_quick_check(str(plain)) == ""
    assert selfheal.sqlite_quick_check(str(tmp_path)) == ""
    assert selfheal.sqlite_quick_check(str(tmp_path / "missing.db")) == ""


def test_deleted_declared_symlink_is_recreated_then_restarted_and_the_mail_names_the_link(bed, data, section):
    db, link = data
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\nsymlinks = %s -> %s\n"
                 % (db, link, db))
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    rc, _ = bed.heal("app")
    assert rc == 0
    assert os.readlink(str(link)) == str(db)
    assert bed.host.actions() == [["systemctl", "restart", "--", APP]]
    (event,) = bed.history("app")
    assert (event["outcome"], event["strategy"]) == ("RESOLVED", "database_check")
    body = body_of(bed)
    assert bed.sink.messages[0]["Subject"] == "✅ MiracleMax: app - RESOLVED"
    assert "recreate symlink %s -> %s" % (link, db) in section(body, "HOW IT WAS FIXED")
    assert "SQLite quick_check: ok" in section(body, "HEALING")
    assert list(link.parent.iterdir()) == [link]  # no temporary link left behind


def test_symlink_pointing_elsewhere_is_pointed_back_and_the_report_says_where_it_pointed(bed, data):
    db, link = data
    link.symlink_to(link.parent / "old.db")
    add_services(bed, "[app]\nstrategies = database_check\nsymlinks = %s -> %s\n" % (link, db))
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 0
    assert os.readlink(str(link)) == str(db)
    assert "(it pointed to %s)" % (link.parent / "old.db") in body_of(bed)


def test_symlink_whose_target_is_missing_fails_and_nothing_is_created(bed, data):
    db, link = data
    gone = db.parent / "gone.db"
    add_services(bed, "[app]\nstrategies = database_check, service_restart\nsymlinks = %s -> %s\n" % (link, gone))
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 1
    assert not os.path.lexists(str(link)) and not gone.exists()
    assert restarts(bed) == []
    assert "symlink %s should point to %s, which does not exist" % (link, gone) in body_of(bed)


def test_link_path_that_is_a_regular_file_fails_and_the_file_is_untouched(bed, data):
    db, link = data
    link.write_text("precious data\n")
    before = os.stat(str(link))
    add_services(bed, "[app]\nstrategies = database_check, service_restart\nsymlinks = %s -> %s\n" % (link, db))
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 1
    assert not link.is_symlink() and link.read_text() == "precious data\n"
    assert (os.stat(str(link)).st_ino, os.stat(str(link)).st_mtime) == (before.st_ino, before.st_mtime)
    assert restarts(bed) == []
    assert "%s should be a symlink to %s but is a regular file; not touched" % (link, db) in body_of(bed)


def test_declared_db_mode_that_differs_is_restored_and_restarted(bed, data, section):
    db, _ = data
    db.chmod(0o644)
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\ndb_mode = 0600\n" % db)
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 0
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    assert bed.host.actions() == [["systemctl", "restart", "--", APP]]
    fixed = section(body_of(bed), "HOW IT WAS FIXED")
    assert "chmod 0600 %s (was: %s is mode 0644, not 0600)" % (db, db) in fixed


def test_db_owner_differing_from_the_units_user_is_reported_not_changed_when_not_declared(bed, data):
    db, _ = data
    owner = db.stat().st_uid
    other = next((p for p in pwd.getpwall() if p.pw_uid != owner and re.match(r"^[a-z_][a-z0-9_.-]*$", p.pw_name)),
                 None)
    if other is None:
        pytest.skip("no second user on this host")
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\n" % db)
    bed.host.failed(APP, result="exit-code", code="1", status="1", User=other.pw_name)
    assert bed.heal("app")[0] == 1
    assert db.stat().st_uid == owner
    assert restarts(bed) == []
    assert ("%s is owned by uid %d, not %s (declare db_owner to let selfheal restore it)"
            % (db, owner, other.pw_name)) in body_of(bed)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_declared_db_owner_is_restored_as_root(bed, data):
    db, _ = data
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this host")
    os.chown(str(db), nobody.pw_uid, nobody.pw_gid)
    add_services(bed, "[app]\nstrategies = database_check\ndb_path = %s\ndb_owner = root:root\n" % db)
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 0
    assert (db.stat().st_uid, db.stat().st_gid) == (0, 0)
    assert "chown root:root %s" % db in body_of(bed)


def test_corrupted_sqlite_database_fails_untouched_without_a_restart(bed, data, section):
    db, _ = data
    corrupt(db)
    before = sha(db)
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\n" % db)
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 1
    assert sha(db) == before
    assert restarts(bed) == []
    assert "SQLite says %s is damaged" % db in section(body_of(bed), "WHY A HUMAN IS NEEDED")


def test_damaged_sqlite_is_the_root_cause_even_after_a_kill_and_manual_steps_say_how_to_restore(bed, data, section):
    db, _ = data
    corrupt(db)
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\n" % db)
    bed.host.failed(APP, result="signal", code="killed", status="KILL")
    assert bed.heal("app")[0] == 1
    text = body_of(bed)
    cause = section(text, "ROOT CAUSE")
    assert "Its database is damaged: SQLite says %s is damaged" % db in cause
    assert "SIGKILL" not in cause
    assert "restore the last good backup" in section(text, "RECOMMENDATION")
    steps = section(text, "MANUAL STEPS")
    assert "systemctl stop app.service" in steps and "sqlite3 %s 'PRAGMA integrity_check'" % db in steps


def test_missing_db_path_fails_and_nothing_is_created(bed, tmp_path):
    gone = tmp_path / "data" / "gone.db"
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\n" % gone)
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 1
    assert not gone.exists()
    assert "%s is missing; selfheal never creates or restores data" % gone in body_of(bed)


def test_healthy_data_is_reported_and_the_next_strategy_restarts(bed, data, section):
    db, link = data
    link.symlink_to(db)
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\nsymlinks = %s -> %s\n"
                 % (db, link, db))
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    assert bed.heal("app")[0] == 0
    (event,) = bed.history("app")
    assert (event["outcome"], event["strategy"]) == ("RESOLVED", "service_restart")
    healing = section(body_of(bed), "HEALING")
    assert "· symlink %s -> %s: ok" % (link, db) in healing
    assert "· SQLite quick_check: ok" in healing


def test_database_journal_line_moves_database_check_before_a_blind_restart(bed, data, section):
    db, link = data
    add_services(bed, "[app]\nstrategies = service_restart, database_check\nsymlinks = %s -> %s\n" % (link, db))
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    bed.host.journal(["vm app[4100]: sqlite3.OperationalError: unable to open database file"])
    assert bed.heal("app")[0] == 0
    assert os.readlink(str(link)) == str(db)
    assert restarts(bed) == [["systemctl", "restart", "--", APP]]  # one restart, after the repair
    (event,) = bed.history("app")
    assert event["strategy"] == "database_check"
    assert "database_check moved first" in section(body_of(bed), "DIAGNOSIS")


def test_dry_run_plans_the_symlink_but_changes_nothing(bed, data):
    db, link = data
    db.chmod(0o644)
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\ndb_mode = 0600\n"
                      "symlinks = %s -> %s\n" % (db, link, db))
    bed.host.failed(APP, result="exit-code", code="1", status="1")
    rc, out = bed.heal("app", dry_run=True)
    assert rc == 0
    assert not os.path.lexists(str(link))
    assert stat.S_IMODE(db.stat().st_mode) == 0o644
    assert bed.host.actions() == []
    assert bed.sink.messages == [] and bed.history("app") == []
    assert "recreate symlink %s -> %s: ok (0 s), dry run: not done" % (link, db) in out
    assert "chmod 0600 %s: ok (0 s), dry run: not done" % db in out
