"""What the failure corpus (tests/corpus.py, tests/bench_corpus.py) found wrong in reports and
actions, each pinned here without a host: a health check that answers with a persistence or
permission problem is not a hang and gets no restart; a port a foreign process holds gets no
restart; a Python exception, a stuck start, a leftover holder and systemd's own restart are
named as what they are; a holder listening on IPv4 and IPv6 is one line."""

import dataclasses

import pytest

import selfheal

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

REDIS = selfheal.Service(name="redis-server", unit="redis-server.service", port=6379)
APP = selfheal.Service(name="jobs", unit="jobs.service", port=5490)
MISCONF = ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. "
           "Commands that may modify the data set are disabled")


def diag(result="exit-code", code="exited", status="1", journal=(), finding=None, holders=(), **unit):
    return selfheal.Diagnosis(unit=dict(unit), result=result, exit_code=code, exit_status=status,
                              from_monitor_env=False, journal=tuple(journal), listeners=(), holders=tuple(holders),
                              failed_at=None, detected_after=None, finding=finding)


def unhealthy(detail):
    return selfheal.Finding("unhealthy", detail, 0.0)


def test_health_command_answering_misconf_quotes_the_problem_not_a_timeout():
    ok, detail = selfheal.command_check(["echo", MISCONF], 5.0, "PONG")
    assert not ok and "MISCONF Redis is configured" in detail


def test_health_command_with_a_python_traceback_quotes_its_last_line():
    ok, detail = selfheal.command_check(
        [selfheal.sys.executable, "-c", "import socket; raise socket.timeout('timed out')"], 5.0, "VERSION")
    assert not ok and "timed out" in detail and "Traceback" not in detail


def test_heal_unhealthy_with_misconf_is_reported_as_a_persistence_problem_and_never_restarted():
    detail = "port 6379 open but `/usr/bin/redis-cli -p 6379 ping`: exit status 0 but the output lacks 'PONG': %r" % (
        MISCONF[:80])
    d = diag(result="success", code="", status="", finding=unhealthy(detail), ActiveState="active")
    cause = selfheal.root_cause(REDIS, d)
    assert cause.summary.startswith("It is running and answers, but reports a problem with its data that a restart cannot fix")
    ctx = selfheal.HealContext(REDIS, d, selfheal.Settings())
    with pytest.raises(selfheal.Escalation) as exc:
        selfheal.strategy_service_restart(ctx)
    assert ctx.actions == [] and "restarted nothing" in str(exc.value)
    assert exc.value.cause.summary == cause.summary


def test_heal_hung_service_is_still_restarted():
    d = diag(result="success", code="", status="", finding=unhealthy("port 6379 open but ping: no answer within 5 s"),
             ActiveState="active")
    selfheal.refuse_futile_restart(selfheal.HealContext(REDIS, d, selfheal.Settings()))  # no Escalation
    assert selfheal.root_cause(REDIS, d).summary.startswith("It hung")


def test_heal_port_held_by_foreign_pid_escalates_with_it_as_root_cause_and_no_action():
    squatter = selfheal.Process(4242, "root", "/usr/bin/python3 -c squat", "/system.slice/squatter.service")
    d = diag(result="success", code="", status="", holders=[squatter], ActiveState="inactive")
    ctx = selfheal.HealContext(selfheal.Service(name="nginx", unit="nginx.service", port=80), d, selfheal.Settings())
    with pytest.raises(selfheal.Escalation) as exc:
        selfheal.strategy_service_restart(ctx)
    assert ctx.actions == []
    assert exc.value.cause.summary.startswith("It cannot start: port 80 is held by another process: pid 4242")


def test_python_runtime_error_is_the_root_cause_with_the_services_own_line_as_evidence():
    journal = ["2026-12-07T18:00:00+0000 box notes-app[7]: Traceback (most recent call last):",
               "2026-12-07T18:00:00+0000 box notes-app[7]: RuntimeError: the index is inconsistent",
               "2026-12-07T18:00:00+0000 box systemd[1]: notes.service: Main process exited, code=exited, status=1/FAILURE",
               "2026-12-07T18:00:00+0000 box systemd[1]: notes.service: Triggering OnFailure= dependencies."]
    cause = selfheal.root_cause(APP, diag(journal=journal, ActiveState="failed"))
    assert cause.summary == "It exited with status 1: an unhandled RuntimeError in its own code."
    assert cause.evidence == journal[1] and cause.confidence == "medium"


def test_exit_without_a_telling_line_says_so_and_quotes_the_services_last_line_not_systemds():
    journal = ["2026-12-07T18:00:00+0000 box app[7]: shutting down",
               "2026-12-07T18:00:00+0000 box systemd[1]: app.service: Triggering OnFailure= dependencies."]
    cause = selfheal.root_cause(APP, diag(journal=journal, ActiveState="failed"))
    assert "does not say why" in cause.summary and cause.evidence == journal[0] and cause.confidence == "low"


def test_start_stuck_in_activating_names_the_config_line_of_its_own_journal():
    journal = ['2026-12-07T18:00:00+0000 box postgresql@15-main[9]: FATAL:  invalid value for parameter '
               '"max_connections": "lots"']
    d = diag(result="success", code="", status="", journal=journal, ActiveState="activating")
    cause = selfheal.root_cause(selfheal.Service(name="postgresql", unit="postgresql@15-main.service"), d)
    assert cause.summary == "It did not come up: its configuration is invalid." and cause.evidence == journal[0]


def test_leftover_child_holding_the_port_is_the_root_cause_of_a_killed_service():
    child = selfheal.Process(4343, "root", "python3 standin.py 5490 --fork-child", "/system.slice/jobs.service")
    d = diag(result="signal", code="killed", status="KILL", holders=[child], ActiveState="failed", MainPID="0")
    cause = selfheal.root_cause(APP, d)
    assert "a leftover process of its own kept port 5490" in cause.summary and "pid 4343" in cause.summary


def test_recovered_by_systemd_healing_time_runs_from_the_crash_to_the_new_run_being_up():
    unit = {"ActiveExitTimestampMonotonic": "100000000", "ActiveEnterTimestampMonotonic": "100300000"}
    assert selfheal.systemd_recovery_seconds(unit) == pytest.approx(0.3)
    assert selfheal.systemd_recovery_seconds({"ActiveEnterTimestampMonotonic": "100300000"}) is None


def test_post_healing_status_lists_a_holder_on_ipv4_and_ipv6_once(monkeypatch):
    proc = selfheal.Process(4242, "root", "/usr/bin/python3 -c squat", "/system.slice/squatter.service")
    monkeypatch.setattr(selfheal, "listening_ports", lambda: {80})
    monkeypatch.setattr(selfheal, "listeners_on", lambda port: (
        selfheal.Listener(80, "0.0.0.0", (4242,)), selfheal.Listener(80, "[::]", (4242,))))
    monkeypatch.setattr(selfheal, "read_process", lambda pid: proc)
    assert len(selfheal.port_now(selfheal.Service(name="nginx", unit="nginx.service", port=80))) == 1


def test_unopenable_sqlite_file_is_told_to_check_owner_and_mode_before_any_backup():
    line = "box python3[7]: sqlite3.OperationalError: unable to open database file"
    cause = selfheal.root_cause(APP, diag(journal=[line], ActiveState="failed"))
    assert "owner or mode" in cause.summary and cause.recommendation.startswith("Check that the file exists")


def test_health_command_failing_login_quotes_permission_denied_from_deep_in_its_output():
    said = ("psql: error: connection to server on socket \"/var/run/postgresql/.s.PGSQL.5432\" failed: FATAL:  "
            "could not open file \"global/pg_filenode.map\": Permission denied")
    ok, detail = selfheal.command_check([selfheal.sys.executable, "-c", "import sys; print(%r); sys.exit(2)" % said],
                                        5.0, "1")
    assert not ok and "Permission denied" in detail and selfheal.NOT_A_HANG_RE.search(detail)


def test_start_limit_hit_names_what_each_start_said():
    journal = ["box redis-server[7]: *** FATAL CONFIG FILE ERROR (Redis 7.0.15) ***",
               "box systemd[1]: redis-server.service: Start request repeated too quickly."]
    d = diag(result="start-limit-hit", code="exited", status="1", journal=journal, ActiveState="failed")
    assert selfheal.root_cause(REDIS, d).summary == (
        "It failed too often in a row and systemd stopped restarting it (start limit hit): its configuration is "
        "invalid.")


def test_restart_whose_stop_never_finishes_is_reported_as_a_hung_stop_not_a_start_limit(monkeypatch):
    d = diag(result="success", code="", status="", ActiveState="active", InvocationID="run-1",
             TimeoutStopUSec="infinity")
    ctx = selfheal.HealContext(REDIS, d, selfheal.Settings())
    calls = []

    def systemctl(verb, timeout=None):
        calls.append(verb)
        ctx.record("systemctl %s %s" % (verb, REDIS.unit), False, 280.0, "systemctl: timed out after 280 s")
        return False
    monkeypatch.setattr(ctx, "systemctl", systemctl)
    monkeypatch.setattr(selfheal, "show_unit", lambda unit: {"ActiveState": "deactivating", "SubState": "stop-sigterm",
                                                             "InvocationID": "run-1"})
    note = selfheal.strategy_service_restart(ctx)
    assert calls == ["restart"]  # no reset-failed, no second restart
    assert "start limit" not in note and "its stop hangs" in note
    assert ctx.actions[-1].detail == ("systemctl: timed out after 280 s; its stop was still running "
                                      "(deactivating (stop-sigterm), TimeoutStopSec=infinity)")


def test_config_check_failing_on_a_missing_directory_names_that_not_an_invalid_config(monkeypatch, tmp_path):
    said = 'nginx: [emerg] open() "/var/log/nginx/error.log" failed (2: No such file or directory)'
    monkeypatch.setattr(selfheal, "root_only_problems", lambda argv: [])
    monkeypatch.setattr(selfheal, "run_command", lambda argv, timeout, identity=selfheal.ROOT: selfheal.CmdResult(
        tuple(argv), 1, "", said + "\nnginx: configuration file /etc/nginx/nginx.conf test failed\n", 0.01))
    nginx = selfheal.Service(name="nginx", unit="nginx.service", config_check=("/usr/sbin/nginx", "-t"))
    d = diag(result="signal", code="killed", status="KILL", ActiveState="failed")
    ctx = selfheal.HealContext(nginx, d, selfheal.Settings(), paths=selfheal.Paths(state=tmp_path))
    with pytest.raises(selfheal.Escalation) as exc:
        selfheal.strategy_config_validation(ctx)
    assert exc.value.cause.summary == ("Its own check `/usr/sbin/nginx -t` fails: a file it needs is missing: %s." % said)


def test_failed_start_is_explained_by_the_services_own_line_not_systemds_pid_file_message():
    journal = ['2026-12-07T19:06:31+0000 box postgresql@15-main[3216]: pg_ctl: could not open PID file '
               '"/var/lib/postgresql/15/main/postmaster.pid": Permission denied',
               "2026-12-07T19:06:31+0000 box systemd[1]: postgresql@15-main.service: Can't open PID file "
               "/run/postgresql/15-main.pid (yet?) after start: No such file or directory",
               "2026-12-07T19:06:31+0000 box systemd[1]: postgresql@15-main.service: Failed with result 'protocol'."]
    d = diag(result="protocol", code="", status="", journal=journal, ActiveState="failed")
    cause = selfheal.root_cause(selfheal.Service(name="postgresql", unit="postgresql@15-main.service"), d)
    assert cause.summary == "It failed (systemd result protocol): it was denied access to a file or port."
    assert cause.evidence == journal[0]
