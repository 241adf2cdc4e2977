"""The pure part: a Diagnosis -> root cause, and a HealResult -> report text and subject.
No host is needed: these are functions of their data."""

import pytest

import selfheal

SVC = selfheal.Service(name="story-stages", unit="story-stages.service", port=5002, domain="books.jbyrd.org",
                       critical=True, strategies=("port_conflict", "service_restart"))
SETTINGS = selfheal.Settings(name="MiracleMax", email_to=("owner@example.org",), email_from="selfheal@example.org")


def make_diag(result="signal", exit_code="killed", exit_status="KILL", journal=(), holders=(), listeners=(),
              from_monitor_env=False, detected_after=None, **props):
    unit = {"Id": SVC.unit, "ActiveState": "failed", "SubState": "failed", "Result": result, "NRestarts": "0",
            "ExecMainPID": "4100"}
    unit.update(props)
    return selfheal.Diagnosis(unit=unit, result=result, exit_code=exit_code, exit_status=exit_status,
                              from_monitor_env=from_monitor_env, journal=tuple(journal),
                              listeners=tuple(listeners), holders=tuple(holders), failed_at=None,
                              detected_after=detected_after)


def restart_run(ok=True):
    checks = (selfheal.Check("unit", ok, "active (running)" if ok else "failed (failed)"),)
    return selfheal.StrategyRun(
        name="service_restart",
        actions=(selfheal.Action("systemctl restart story-stages.service", True, 0.2),),
        verification=selfheal.Verification(ok, 0.4, checks))


def make_result(outcome, runs=(), escalation="", healing_seconds=None, diag=None, post=None):
    diag = diag or make_diag(journal=["vm systemd[1]: story-stages.service: Failed with result 'signal'."])
    return selfheal.HealResult(
        service=SVC, outcome=outcome, trigger="onfailure", started_at=1732770000.0, diagnosis=diag,
        runs=tuple(runs), root_cause=selfheal.root_cause(SVC, diag), healing_seconds=healing_seconds,
        post=post or {"ActiveState": "active", "SubState": "running", "UnitFileState": "enabled"},
        escalation=escalation)


# =============================================================================
# Root cause
# =============================================================================

ROOT_CAUSES = [
    # id, diagnosis, words the summary must contain, evidence (a journal line or None)
    ("oom-kill-with-peak", make_diag("oom-kill", "killed", "KILL", MemoryPeak=str(512 * 1024 * 1024)),
     ["memory", "peak", "512"], None),
    ("exec-203", make_diag("exit-code", "exited", "203", journal=[
        "vm python3[4100]: started",
        "vm (ghost-app)[4100]: ghost.service: Failed to locate executable /opt/ghost/ghost-app: No such file",
        "vm systemd[1]: ghost.service: Main process exited, code=exited, status=203/EXEC"]),
     ["executable", "203"], "status=203/EXEC"),
    ("sigkill", make_diag("signal", "killed", "KILL"), ["SIGKILL"], None),
    ("other-signal", make_diag("signal", "killed", "TERM"), ["TERM"], None),
    ("core-dump", make_diag("core-dump", "dumped", "SEGV"), ["SEGV", "core"], None),
    ("start-limit-hit", make_diag("start-limit-hit", "exited", "1"), ["start limit"], None),
    ("address-in-use", make_diag("exit-code", "exited", "1", journal=[
        "vm python3[4100]: starting on :5002",
        "vm python3[4100]: OSError: [Errno 98] Address already in use",
        "vm systemd[1]: story-stages.service: Main process exited, code=exited, status=1/FAILURE"]),
     ["port"], "Address already in use"),
    ("plain-exit-1", make_diag("exit-code", "exited", "1", journal=[
        "vm worker[4100]: loading settings", "vm worker[4100]: giving up after 3 retries"]),
     ["status 1"], "giving up after 3 retries"),
    ("permission-denied", make_diag("exit-code", "exited", "1", journal=[
        "vm worker[4100]: open /srv/worker/q.db: Permission denied", "vm worker[4100]: exiting"]),
     ["denied"], "Permission denied"),
    ("watchdog", make_diag("watchdog", "killed", "ABRT"), ["watchdog"], None),
    ("start-timeout", make_diag("timeout", "", ""), ["time"], None),
]


# id: (confidence, words the recommendation must contain: what to do about that failure)
ADVICE = {
    "oom-kill-with-peak": ("high", "raise MemoryMax="),
    "exec-203": ("high", "restarting will not help"),
    "sigkill": ("medium", "journalctl -k"),
    "other-signal": ("medium", "who sent the signal"),
    "core-dump": ("high", "coredumpctl"),
    "start-limit-hit": ("high", "why each start failed"),
    "address-in-use": ("high", "ss -tlnp"),
    "plain-exit-1": ("low", "last words"),
    "permission-denied": ("medium", "owner and mode"),
    "watchdog": ("high", "deadlock"),
    "start-timeout": ("medium", "TimeoutStartSec="),
}


@pytest.mark.parametrize("case_id, diag, words, evidence", ROOT_CAUSES, ids=[c[0] for c in ROOT_CAUSES])
def test_root_cause_names_what_happened_and_quotes_its_evidence(case_id, diag, words, evidence):
    cause = selfheal.root_cause(SVC, diag)
    for word in words:
        assert word.lower() in cause.summary.lower(), cause.summary
    if evidence:
        assert evidence in cause.evidence and cause.evidence in diag.journal
    confidence, advice = ADVICE[case_id]
    assert cause.confidence == confidence
    assert advice in cause.recommendation, cause.recommendation


def test_oom_kill_without_a_known_peak_does_not_invent_one():
    cause = selfheal.root_cause(SVC, make_diag("oom-kill", "killed", "KILL", MemoryPeak="[not set]"))
    assert "memory" in cause.summary and "peak" not in cause.summary


def test_plain_exit_with_the_last_journal_line_as_evidence_has_low_confidence():
    diag = make_diag("exit-code", "exited", "1", journal=["a: one", "a: two", "a: the last words"])
    cause = selfheal.root_cause(SVC, diag)
    assert (cause.evidence, cause.confidence) == ("a: the last words", "low")


def test_exec_failure_outranks_a_generic_missing_file_hint():
    diag = make_diag("exit-code", "exited", "203",
                     journal=["vm systemd[1]: x.service: Failed at step EXEC spawning /opt/x: No such file or directory"])
    assert "executable" in selfheal.root_cause(SVC, diag).summary


def test_stopped_service_advises_pausing_selfheal():
    diag = make_diag("success", "", "", ActiveState="inactive", SubState="dead")
    cause = selfheal.root_cause(SVC, diag)
    assert "not running" in cause.summary
    assert "pause story-stages" in cause.recommendation


def test_a_word_containing_oom_is_not_taken_for_out_of_memory():
    diag = make_diag("exit-code", "exited", "1", journal=["vm chat[4100]: cannot join chatroom 'lobby': closed"])
    assert "memory" not in selfheal.root_cause(SVC, diag).summary


# =============================================================================
# Report and subject
# =============================================================================


@pytest.mark.parametrize("outcome, present, absent", [
    (selfheal.Outcome.RESOLVED, ["HOW IT WAS FIXED", "HEALING TIME"], ["MANUAL STEPS", "WHY A HUMAN IS NEEDED"]),
    (selfheal.Outcome.RECOVERED, ["HOW IT WAS FIXED", "HEALING TIME"], ["MANUAL STEPS"]),
    (selfheal.Outcome.FAILED, ["MANUAL STEPS", "WHY A HUMAN IS NEEDED"], ["HOW IT WAS FIXED", "HEALING TIME"]),
    (selfheal.Outcome.ESCALATED, ["MANUAL STEPS", "WHY A HUMAN IS NEEDED"], ["HOW IT WAS FIXED", "HEALING TIME"]),
])
def test_report_sections_follow_the_outcome(outcome, present, absent, sections):
    healed = outcome in (selfheal.Outcome.RESOLVED, selfheal.Outcome.RECOVERED)
    result = make_result(outcome, runs=[restart_run(healed)] if outcome is not selfheal.Outcome.RECOVERED else [],
                         escalation="" if healed else "a human must look", healing_seconds=3.0 if healed else None)
    found = sections(selfheal.render_report(SETTINGS, result, host="vm.example.org"))
    for title in ["SERVICE", "ISSUE DETECTED", "DIAGNOSIS", "HEALING", "ROOT CAUSE", "RECOMMENDATION",
                  "POST-HEALING STATUS"] + present:
        assert title in found
    for title in absent:
        assert title not in found


def test_recovered_report_says_systemd_restarted_it_not_selfheal(section):
    result = make_result(selfheal.Outcome.RECOVERED, healing_seconds=1.0)
    text = selfheal.render_report(SETTINGS, result, host="vm")
    assert "systemd" in section(text, "HOW IT WAS FIXED")


def test_subject_carries_name_service_and_outcome_with_a_distinct_mark_for_failure():
    subjects = {o: selfheal.subject(SETTINGS, make_result(o)) for o in selfheal.Outcome}
    assert subjects[selfheal.Outcome.RESOLVED] == "✅ MiracleMax: story-stages - RESOLVED"
    ok_mark = subjects[selfheal.Outcome.RESOLVED].split(" ")[0]
    for outcome in (selfheal.Outcome.FAILED, selfheal.Outcome.ESCALATED):
        assert subjects[outcome].split(" ")[0] != ok_mark
        assert "MiracleMax: story-stages" in subjects[outcome] and outcome.value in subjects[outcome]


def test_manual_steps_name_the_unit_and_how_to_rearm(section):
    result = make_result(selfheal.Outcome.FAILED, runs=[restart_run(False)], escalation="restart failed")
    steps = section(selfheal.render_report(SETTINGS, result, host="vm.example.org"), "MANUAL STEPS")
    assert "story-stages.service" in steps
    assert "resume story-stages" in steps
    assert "vm.example.org" in steps


def test_diagnosis_names_the_port_holder_and_memory_peak(section):
    holder = selfheal.Process(4242, "www-data", "/usr/bin/python3 -m http.server 5002", "/system.slice/x.service")
    diag = make_diag("exit-code", "exited", "1", holders=[holder],
                     listeners=[selfheal.Listener(5002, "0.0.0.0", (4242,))], MemoryPeak=str(3 * 1024 * 1024))
    text = selfheal.render_report(SETTINGS, make_result(selfheal.Outcome.FAILED, diag=diag, escalation="x"), host="vm")
    diagnosis = section(text, "DIAGNOSIS")
    assert "pid 4242" in diagnosis and "http.server 5002" in diagnosis and "www-data" in diagnosis
    assert "3.0 MiB" in diagnosis


def test_journal_section_appears_only_when_there_are_journal_lines(sections):
    with_journal = selfheal.render_report(SETTINGS, make_result(selfheal.Outcome.FAILED, escalation="x"), host="vm")
    without = selfheal.render_report(SETTINGS, make_result(selfheal.Outcome.FAILED, escalation="x",
                                                           diag=make_diag()), host="vm")
    assert any(t.startswith("JOURNAL") for t in sections(with_journal))
    assert not any(t.startswith("JOURNAL") for t in sections(without))


def test_report_is_a_pure_function_of_its_data(monkeypatch):
    def no_commands(*args, **kwargs):
        raise AssertionError("render_report ran a command")
    monkeypatch.setattr(selfheal, "run", no_commands)
    result = make_result(selfheal.Outcome.RESOLVED, runs=[restart_run()], healing_seconds=2.5)
    first = selfheal.render_report(SETTINGS, result, host="vm")
    assert first == selfheal.render_report(SETTINGS, result, host="vm")
    assert first.splitlines()[0] == selfheal.subject(SETTINGS, result)


def test_issue_detected_says_how_the_main_process_ended(section):
    killed = selfheal.render_report(SETTINGS, make_result(selfheal.Outcome.RESOLVED), host="vm")
    exited = selfheal.render_report(SETTINGS, make_result(selfheal.Outcome.RESOLVED, diag=make_diag(
        "exit-code", "exited", "3")), host="vm")
    assert "KILL" in section(killed, "ISSUE DETECTED")
    assert "status 3" in section(exited, "ISSUE DETECTED")


@pytest.mark.parametrize("value, shown", [
    (str(512 * 1024 * 1024), "512.0 MiB"),
    ("1023", "1023 B"),
    (str(3 * 1024 ** 3), "3.0 GiB"),
    ("[not set]", ""),
    (str(2 ** 64 - 1), ""),  # systemd's "unset"
    ("0", ""),
])
def test_format_bytes_shows_binary_units_and_hides_unset_values(value, shown):
    assert selfheal.format_bytes(value) == shown


@pytest.mark.parametrize("seconds, unit", [(0.25, " s"), (42, " s"), (300, " min"), (3600, " min"), (7200, " h"),
                                           (5 * 3600, " h"), (3 * 86400, " d")])
def test_format_duration_picks_a_readable_unit(seconds, unit):
    text = selfheal.format_duration(seconds)
    assert text.endswith(unit)
    number = float(text.split()[0])
    scale = {" s": 1, " min": 60, " h": 3600, " d": 86400}[unit]
    assert abs(number * scale - seconds) <= max(0.01, 0.05 * seconds)
