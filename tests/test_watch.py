"""The watch and incidents, through the fakes (no root, no systemd): what the watch makes of a
unit, when it hands a heal to selfheal@NAME.service and with which finding, how a heal started
that way reports, and how heals become mail threads: one per incident, FLAPPING once,
reminders, "was down", the notify policy. Time is moved forward with the `clock` fixture."""

import socket
import threading
import time

import pytest

import selfheal
from conftest import FINE, HANG, HEALTH, OTHER_RUN, RUN, STORY, WORKER, conf, queue_report, running, stopped

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

STOPPED_MARK, FLAPPING_MARK, REMINDER_MARK = "\u23f8\ufe0f", "\u26a0\ufe0f", "\u23f0"
REAL_HTTP_CHECK = selfheal.http_check


def message_id(msg):
    return "".join(str(msg["Message-ID"]).split())  # a long header may be folded


def replies_to(msg):
    return ("".join(str(msg["In-Reply-To"] or "").split()), "".join(str(msg["References"] or "").split()))


def in_thread_of(first, msg):
    return replies_to(msg) == (message_id(first), message_id(first))


# =============================================================================
# assess(): what the watch makes of one unit
# =============================================================================

SVC = selfheal.Service(name="story-stages", unit=STORY, port=5002, health_url=HEALTH)
NO_PORT = selfheal.Service(name="worker", unit=WORKER, health_url="http://127.0.0.1:8080/ready")
PLAIN = selfheal.Service(name="worker", unit=WORKER)


def shown(active="active", sub="running", **props):
    unit = {"Id": "x.service", "LoadState": "loaded", "ActiveState": active, "SubState": sub,
            "Result": "success", "NRestarts": "0"}
    unit.update(props)
    return unit


ASSESS = [
    # id, service, unit, listening ports, health answer, NRestarts baseline, verdict, detail
    ("ok", SVC, shown(), {5002}, FINE, 0, "ok", "active (running)"),
    ("port-not-listening", SVC, shown(), {80}, None, 0,
     "unhealthy", "port 5002 not listening while the unit is active (running)"),
    ("health-timeout", SVC, shown(), {5002}, HANG, 0,
     "unhealthy", "port 5002 open but GET http://127.0.0.1:5002/health: no answer within 5 s"),
    ("health-wrong-status-no-port", NO_PORT, shown(), set(), (False, "HTTP 500, expected 2xx/3xx"), 0,
     "unhealthy", "GET http://127.0.0.1:8080/ready: HTTP 500, expected 2xx/3xx"),
    ("ports-unreadable", SVC, shown(), None, FINE, 0, "ok", "active (running)"),
    ("restarted", PLAIN, shown(NRestarts="3"), set(), None, 2,
     "restarted", "systemd restarted it by itself (restarts 2 -> 3)"),
    ("first-look-has-no-baseline", PLAIN, shown(NRestarts="3"), set(), None, None, "ok", "active (running)"),
    ("restarts-unchanged", PLAIN, shown(NRestarts="3"), set(), None, 3, "ok", "active (running)"),
    ("restart-count-reset-by-a-manual-start", PLAIN, shown(NRestarts="0"), set(), None, 3, "ok", "active (running)"),
    ("not-serving-outranks-restarted", SVC, shown(NRestarts="3"), set(), None, 2,
     "unhealthy", "port 5002 not listening while the unit is active (running)"),
    ("failed", PLAIN, shown("failed", "failed", Result="signal"), set(), None, 0,
     "failed", "failed (failed), result signal"),
    ("stopped-cleanly", PLAIN, shown("inactive", "dead"), set(), None, 0, "stopped", "found stopped: inactive (dead)"),
    ("inactive-after-a-failure", PLAIN, shown("inactive", "dead", Result="exit-code"), set(), None, 0,
     "failed", "inactive (dead), result exit-code"),
    ("activating", PLAIN, shown("activating", "start"), set(), None, 0, "transient", "activating (start)"),
    ("deactivating", PLAIN, shown("deactivating", "stop-sigterm"), set(), None, 0,
     "transient", "deactivating (stop-sigterm)"),
    ("not-found", PLAIN, shown("inactive", "dead", LoadState="not-found"), set(), None, 0,
     "missing", "unit not-found"),
    ("masked", PLAIN, shown("inactive", "dead", LoadState="masked"), set(), None, 0, "missing", "unit masked"),
    ("systemctl-said-nothing", PLAIN, {}, set(), None, 0, "missing", "unit unknown"),
    ("oneshot-finished", PLAIN, shown("inactive", "dead", Type="oneshot", RemainAfterExit="no"), set(), None, 0,
     "ok", "a oneshot job that finished successfully: inactive (dead)"),
    ("oneshot-remaining-stopped", PLAIN, shown("inactive", "dead", Type="oneshot", RemainAfterExit="yes"), set(),
     None, 0, "stopped", "found stopped: inactive (dead)"),
    ("oneshot-failed", PLAIN, shown("failed", "failed", Type="oneshot", Result="exit-code"), set(), None, 0,
     "failed", "failed (failed), result exit-code"),
]


@pytest.mark.parametrize("svc, unit, ports, health_answer, baseline, verdict, detail",
                         [c[1:] for c in ASSESS], ids=[c[0] for c in ASSESS])
def test_assess_turns_unit_port_health_and_restart_count_into_a_verdict(svc, unit, ports, health_answer,
                                                                        baseline, verdict, detail):
    assert selfheal.assess(svc, unit, ports, health_answer, baseline) == (verdict, detail)


def started_ago(seconds):
    return str(int((time.monotonic() - seconds) * 1e6))


@pytest.mark.parametrize("age, verdict, detail", [
    (10, "transient", "starting (10 s of start_grace = 60 s): port 5002 not listening while the unit is active (running)"),
    (59, "transient", "starting (59 s of start_grace = 60 s): port 5002 not listening while the unit is active (running)"),
    (61, "unhealthy", "port 5002 not listening while the unit is active (running)"),
], ids=["young-run-is-starting", "just-inside-grace", "past-grace-is-unhealthy"])
def test_assess_a_run_younger_than_start_grace_without_its_port_is_starting_not_hung(age, verdict, detail):
    unit = shown(ActiveEnterTimestampMonotonic=started_ago(age))
    assert selfheal.assess(SVC, unit, {80}, None, 0, None, 60.0) == (verdict, detail)


def test_assess_a_young_run_failing_its_health_check_is_starting_too():
    verdict, detail = selfheal.assess(SVC, shown(ActiveEnterTimestampMonotonic=started_ago(3)), {5002}, HANG, 0,
                                      None, 60.0)
    assert verdict == "transient" and detail.startswith("starting (3 s of start_grace = 60 s): port 5002 open but GET")


FOREIGN = selfheal.Holding(selfheal.PortOwner.FOREIGN, "held by pid 4242 (user root, cgroup "
                           "/system.slice/other-app.service): python3 -m http.server, not by a process of "
                           "story-stages.service")


@pytest.mark.parametrize("holder, verdict, detail", [
    (FOREIGN, "unhealthy", "port 5002 %s while the unit is active (running)" % FOREIGN.detail),
    (selfheal.Holding(selfheal.PortOwner.LEFTOVER, "held by pid 4100, a leftover"), "unhealthy",
     "port 5002 held by pid 4100, a leftover while the unit is active (running)"),
    (selfheal.Holding(selfheal.PortOwner.OWN, "pid 5555 of story-stages.service"), "ok", "active (running)"),
    (selfheal.Holding(selfheal.PortOwner.UNKNOWN, "holder unknown: ss (fake): failed"), "ok", "active (running)"),
    (selfheal.Holding(selfheal.PortOwner.SOCKET_UNIT, "held by systemd (socket activation)"), "ok", "active (running)"),
], ids=["foreign-holder", "leftover", "own-holder", "holder-unknown", "socket-unit"])
def test_assess_port_held_by_another_units_process_is_unhealthy_and_an_unknown_holder_is_not(holder, verdict, detail):
    assert selfheal.assess(SVC, shown(), {5002}, FINE, 0, holder) == (verdict, detail)


# =============================================================================
# watch_service(): when the watch hands a heal to selfheal@NAME.service
# =============================================================================


def test_hung_service_is_handed_to_selfheal_only_after_watch_confirm_bad_looks_in_a_row(wb):
    running(wb.host, STORY)
    wb.host.listen(5002)
    assert wb.look("story-stages", HANG) == "unhealthy"
    assert wb.triggers() == []
    assert wb.finding("story-stages") is None

    wb.clock.advance(2)
    assert wb.look("story-stages", HANG) == "unhealthy"
    assert wb.triggers() == [["start", "--no-block", "selfheal@story-stages.service"]]
    finding = wb.finding("story-stages")
    assert finding["kind"] == "unhealthy"
    assert finding["detail"] == ("port 5002 open but GET http://127.0.0.1:5002/health: no answer within "
                                 "5 s (2 checks in a row over 2 s)")
    assert abs(finding["at"] - wb.clock.time()) < 5
    assert wb.touched(STORY) == []  # the watch itself never restarts anything

    assert wb.look("story-stages", HANG) == "unhealthy"  # handed over: the count starts again
    assert len(wb.triggers()) == 1


def test_a_good_look_between_two_bad_ones_resets_the_count(wb):
    running(wb.host, STORY)
    wb.host.listen(5002)
    assert [wb.look("story-stages", h) for h in (HANG, FINE, HANG)] == ["unhealthy", "ok", "unhealthy"]
    assert wb.triggers() == []
    assert wb.look("story-stages", HANG) == "unhealthy"
    assert wb.triggers() == [["start", "--no-block", "selfheal@story-stages.service"]]


@pytest.mark.parametrize("on_stopped", ["heal", "report"])
def test_stopped_service_is_handed_over_with_a_stopped_finding_unless_ignored(wb, on_stopped):
    wb.configure(worker={"on_stopped": on_stopped})
    stopped(wb.host, WORKER)
    assert wb.look("worker") == "stopped"
    wb.clock.advance(30)  # a stop is looked at again at the next watch run, not within seconds
    assert wb.look("worker") == "stopped"
    assert wb.triggers() == [["start", "--no-block", "selfheal@worker.service"]]
    finding = wb.finding("worker")
    assert (finding["kind"], finding["detail"]) == (
        "stopped", "found stopped: inactive (dead) (2 checks in a row over 30 s)")


def test_on_stopped_ignore_never_acts_on_a_stopped_service_but_still_on_a_failed_one(wb):
    wb.configure(worker={"on_stopped": "ignore"})
    stopped(wb.host, WORKER)
    assert [wb.look("worker") for _ in range(4)] == ["stopped"] * 4
    assert wb.triggers() == []
    assert wb.finding("worker") is None

    wb.host.failed(WORKER)
    assert [wb.look("worker") for _ in range(2)] == ["failed", "failed"]
    assert wb.triggers() == [["start", "--no-block", "selfheal@worker.service"]]


def test_paused_service_is_never_acted_on_until_the_pause_ends(wb):
    wb.host.failed(WORKER)
    selfheal.save_service_state(wb.paths, "worker", {"paused_until": wb.clock.time() + 3600})
    assert [wb.look("worker") for _ in range(3)] == ["paused"] * 3
    assert wb.triggers() == []
    assert wb.finding("worker") is None
    assert wb.watch_state("worker")["verdict"] == "paused"

    wb.clock.advance(3601)
    assert [wb.look("worker") for _ in range(2)] == ["failed", "failed"]
    assert wb.triggers() == [["start", "--no-block", "selfheal@worker.service"]]


def test_heal_already_running_means_no_trigger_and_the_count_starts_again_after_it(wb):
    wb.host.failed(WORKER)
    heal_in_progress = selfheal.Lock(wb.paths.lock("worker"))
    assert heal_in_progress.acquire()
    try:
        assert [wb.look("worker") for _ in range(3)] == ["healing"] * 3  # the heal owns it
        assert wb.triggers() == []
    finally:
        heal_in_progress.release()
    wb.look("worker")
    assert wb.triggers() == []
    wb.look("worker")
    assert len(wb.triggers()) == 1


def test_restart_by_systemd_is_handed_over_at_once_and_becomes_the_new_baseline(wb):
    running(wb.host, WORKER, NRestarts="2")
    first_look = wb.clock.time()
    assert wb.look("worker") == "ok"
    wb.clock.advance(30)
    running(wb.host, WORKER, invocation=OTHER_RUN, NRestarts="3")

    assert wb.look("worker") == "restarted"  # no watch_confirm: the crash is over already
    assert wb.triggers() == [["start", "--no-block", "selfheal@worker.service"]]
    finding = wb.finding("worker")
    assert (finding["kind"], finding["detail"], finding["nrestarts"]) == (
        "restarted", "systemd restarted it by itself (restarts 2 -> 3)", [2, 3])
    assert finding["since"] == pytest.approx(first_look, abs=1.0)  # the journal is read from there
    assert wb.watch_state("worker")["nrestarts"] == 3

    wb.clock.advance(30)
    assert wb.look("worker") == "ok"
    assert len(wb.triggers()) == 1


@pytest.mark.parametrize("load_state", ["not-found", "masked"])
def test_missing_unit_is_left_alone(wb, load_state):
    if load_state == "masked":
        wb.host.unit(WORKER, LoadState="masked", ActiveState="inactive", SubState="dead")
    # not-found: the fake host has no worker.service at all
    assert [wb.look("worker") for _ in range(3)] == ["missing"] * 3
    assert wb.triggers() == []
    assert wb.finding("worker") is None
    assert wb.sink.messages == []


def test_a_reminder_replies_to_the_mail_with_the_problems_diagnosis_when_the_incident_began_resolved(wb):
    wb.configure({"retry_interval": "0"})
    wb.host.failed(WORKER, on_restart="active")
    assert wb.heal("worker")[0] == selfheal.EX_OK
    (resolved,) = wb.sink.messages
    assert resolved["Subject"].endswith("worker - RESOLVED")
    wb.clock.advance(60)  # within incident_quiet: the same incident, now FAILED
    wb.host.failed(WORKER, on_restart="fail", InvocationID="b" * 32)
    assert wb.heal("worker")[0] == selfheal.EX_FAIL
    failed = wb.sink.messages[1]
    assert failed["Subject"].endswith("worker - FAILED") and in_thread_of(resolved, failed)
    wb.clock.advance(3600 + 60)
    wb.look("worker")
    reminder = wb.sink.messages[-1]
    assert reminder["Subject"].endswith("worker - STILL FAILING")
    assert replies_to(reminder) == (message_id(failed), message_id(failed))
    text = reminder.get_content()
    assert "The FAILED mail of " in text and ", which this one replies to, has the diagnosis" in text
    assert "first mail of this thread" not in text


def test_known_problem_is_not_healed_again_but_reminded_in_its_thread_once_reminder_interval_passed(wb):
    wb.configure({"retry_interval": "0"})  # no retries: this is about the watch's patience
    wb.host.failed(WORKER, on_restart="fail")
    assert wb.heal("worker")[0] == selfheal.EX_FAIL
    (failed_mail,) = wb.sink.messages
    assert failed_mail["Subject"] == "❌ MiracleMax: worker - FAILED"

    assert [wb.look("worker") for _ in range(3)] == ["failed"] * 3  # the run selfheal reported
    assert wb.triggers() == []
    wb.clock.advance(3600 - 60)
    wb.look("worker")
    assert len(wb.sink.messages) == 1

    wb.clock.advance(120)
    wb.look("worker")
    assert len(wb.sink.messages) == 2
    reminder = wb.sink.messages[1]
    assert reminder["Subject"] == REMINDER_MARK + " MiracleMax: worker - STILL FAILING"
    assert in_thread_of(failed_mail, reminder)
    assert "still not healthy" in reminder.get_content()

    wb.look("worker")
    assert len(wb.sink.messages) == 2  # the next reminder is an interval away
    assert wb.triggers() == []
    assert wb.outcomes("worker") == ["FAILED"]


# =============================================================================
# take_finding(): the watch's finding, read by the heal it started
# =============================================================================


def test_finding_is_taken_once(fake_host):
    now = time.time()
    finding = selfheal.Finding("restarted", "systemd restarted it by itself (restarts 2 -> 3)", now, now - 30, (2, 3))
    selfheal.write_finding(fake_host.paths, "worker", finding)
    assert selfheal.take_finding(fake_host.paths, "worker", 90) == finding
    assert not fake_host.paths.finding("worker").exists()
    assert selfheal.take_finding(fake_host.paths, "worker", 90) is None


def test_stale_finding_is_ignored_and_not_left_for_a_later_trigger(fake_host):
    old = selfheal.Finding("stopped", "found stopped: inactive (dead)", time.time() - 100)
    selfheal.write_finding(fake_host.paths, "worker", old)
    assert selfheal.take_finding(fake_host.paths, "worker", 90) is None
    assert not fake_host.paths.finding("worker").exists()


@pytest.mark.parametrize("text", ['{"kind": "unhealthy", "detail": "x", "at"', "[1, 2]", '{"kind": "unhealthy"}',
                                  '{"kind": "stopped", "detail": "x", "at": "yesterday"}', ""],
                         ids=["torn", "a-list", "fields-missing", "bad-time", "empty"])
def test_damaged_finding_is_ignored(fake_host, text):
    path = fake_host.paths.finding("worker")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert selfheal.take_finding(fake_host.paths, "worker", 90) is None


# =============================================================================
# cmd_heal() started by the watch: the finding decides the report
# =============================================================================


def test_onfailure_start_with_a_fresh_finding_heals_as_the_watch_and_reports_what_it_found(wb, section):
    stopped(wb.host, WORKER)
    wb.look("worker")
    wb.clock.advance(30)
    wb.look("worker")
    rc, _ = wb.heal("worker")

    assert rc == selfheal.EX_OK
    assert wb.touched(WORKER) == [["systemctl", "restart", "--", WORKER]]
    assert wb.finding("worker") is None  # consumed
    (event,) = selfheal.read_history(wb.paths, "worker")
    assert (event["outcome"], event["trigger"]) == ("RESOLVED", "watch")
    assert event["trigger_detail"] == "found stopped: inactive (dead) (2 checks in a row over 30 s)"
    (msg,) = wb.sink.messages
    assert msg["Subject"] == "✅ MiracleMax: worker - RESOLVED"
    body = msg.get_content()
    assert section(body, "ISSUE DETECTED") == ("The watch found worker.service stopped: found stopped: "
                                               "inactive (dead) (2 checks in a row over 30 s).")
    assert "stopped cleanly" in section(body, "ROOT CAUSE")


def test_onfailure_start_with_a_stale_finding_stays_an_onfailure_heal(wb):
    wb.host.failed(WORKER)
    selfheal.write_finding(wb.paths, "worker", selfheal.Finding("stopped", "found stopped", wb.clock.time() - 100))
    assert wb.heal("worker")[0] == selfheal.EX_OK
    assert [e["trigger"] for e in selfheal.read_history(wb.paths, "worker")] == ["onfailure"]


def test_stopped_with_on_stopped_report_is_left_stopped_and_mailed_as_stopped(wb, section):
    wb.configure(worker={"on_stopped": "report"})
    stopped(wb.host, WORKER)
    wb.look("worker")
    wb.look("worker")
    rc, _ = wb.heal("worker")

    assert rc == selfheal.EX_OK  # left stopped as configured: selfheal@ did its job
    assert wb.touched(WORKER) == []
    assert wb.outcomes("worker") == ["STOPPED"]
    (msg,) = wb.sink.messages
    assert msg["Subject"] == STOPPED_MARK + " MiracleMax: worker - STOPPED"
    body = msg.get_content()
    assert "on_stopped = report" in section(body, "WHY A HUMAN IS NEEDED")
    assert "stopped cleanly" in section(body, "ROOT CAUSE")
    assert [wb.look("worker") for _ in range(3)] == ["stopped"] * 3  # reported: not handed over again
    assert len(wb.triggers()) == 1


def test_hang_is_restarted_and_the_report_says_it_hung(wb, section):
    running(wb.host, STORY, listen={"port": 5002})
    wb.host.listen(5002)
    # It answers again once it was restarted.
    wb.health.answers[HEALTH] = lambda: FINE if wb.host.load()["units"][STORY].get("restarts") else HANG
    wb.look("story-stages", HANG)
    wb.look("story-stages", HANG)
    rc, _ = wb.heal("story-stages")

    assert rc == selfheal.EX_OK
    assert wb.touched(STORY) == [["systemctl", "restart", "--", STORY]]
    assert [(e["outcome"], e["trigger"]) for e in selfheal.read_history(wb.paths)] == [("RESOLVED", "watch")]
    (msg,) = wb.sink.messages
    assert msg["Subject"] == "✅ MiracleMax: story-stages - RESOLVED"
    cause = section(msg.get_content(), "ROOT CAUSE")
    assert cause.startswith("It hung: port 5002 open but GET http://127.0.0.1:5002/health: no answer within 5 s")


CRASH_JOURNAL = [
    "2024-11-28T05:00:01+0000 vm worker[4100]: processing batch 17",
    "2024-11-28T05:00:09+0000 vm systemd[1]: worker.service: Main process exited, code=killed, status=9/KILL",
    "2024-11-28T05:00:09+0000 vm systemd[1]: worker.service: Failed with result 'signal'.",
    "2024-11-28T05:00:10+0000 vm systemd[1]: worker.service: Scheduled restart job, restart counter is at 3.",
    "2024-11-28T05:00:10+0000 vm systemd[1]: Started worker.service.",
]


def test_restart_by_systemd_is_recovered_without_a_restart_and_the_crash_comes_from_the_journal(wb, section):
    running(wb.host, WORKER, NRestarts="2")
    wb.look("worker")
    crashed_run = RUN
    running(wb.host, WORKER, invocation=OTHER_RUN, NRestarts="3")
    wb.host.journal(CRASH_JOURNAL)
    assert wb.look("worker") == "restarted"
    rc, _ = wb.heal("worker")

    assert rc == selfheal.EX_OK
    assert wb.touched(WORKER) == []
    # the journal of the run the watch last saw healthy: the one that crashed
    assert any("_SYSTEMD_INVOCATION_ID=" + crashed_run in c for c in wb.host.calls("journalctl"))
    (event,) = selfheal.read_history(wb.paths, "worker")
    assert (event["outcome"], event["trigger"], event["result"], event["exit"]) == (
        "RECOVERED", "watch", "signal", "killed KILL")
    (msg,) = wb.sink.messages
    assert msg["Subject"] == "✅ MiracleMax: worker - RESOLVED (recovered by systemd)"
    body = msg.get_content()
    assert "main process killed KILL (result: signal)" in section(body, "ISSUE DETECTED")
    assert "SIGKILL" in section(body, "ROOT CAUSE")
    assert "did not restart it again" in section(body, "HOW IT WAS FIXED")
    assert wb.watch_state("worker")["nrestarts"] == 3


# =============================================================================
# Incidents: threads, FLAPPING, notify policy
# =============================================================================


def test_every_mail_of_one_incident_replies_to_its_first_mail(wb):
    wb.host.failed(WORKER)
    wb.heal("worker")                                 # RESOLVED
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")                                 # FAILED
    running(wb.host, WORKER, invocation=OTHER_RUN)    # somebody fixed it
    wb.clock.advance(300)
    assert wb.look("worker") == "ok"                  # RESOLVED (was down 5 min)

    first, *rest = wb.sink.messages
    assert [m["Subject"] for m in rest] == ["❌ MiracleMax: worker - FAILED",
                                            "✅ MiracleMax: worker - RESOLVED (was down 5 min)"]
    assert first["In-Reply-To"] is None and first["References"] is None
    assert all(in_thread_of(first, m) for m in rest)
    assert len({message_id(m) for m in wb.sink.messages}) == 3


def test_flapping_service_gets_one_flapping_mail_and_later_recoveries_only_in_the_history(wb):
    for _ in range(5):
        wb.host.failed(WORKER)
        assert wb.heal("worker")[0] == selfheal.EX_OK
    assert wb.outcomes("worker") == ["RESOLVED"] * 5
    assert wb.subjects() == (["✅ MiracleMax: worker - RESOLVED"] * 2
                             + [FLAPPING_MARK + " MiracleMax: worker - FLAPPING"])
    first, _, flapping = wb.sink.messages
    assert in_thread_of(first, flapping)
    assert flapping.get_content().startswith("FLAPPING: worker failed 3 times within 15 min")


def test_failure_within_incident_quiet_stays_in_the_thread_and_one_after_it_starts_a_new_one(wb):
    wb.host.failed(WORKER)
    wb.heal("worker")
    wb.clock.advance(300)
    assert wb.look("worker") == "ok"  # healthy, but not for incident_quiet yet
    wb.host.failed(WORKER)
    wb.heal("worker")
    wb.clock.advance(601)
    assert wb.look("worker") == "ok"  # healthy for incident_quiet: the incident is over, silently
    assert wb.state("worker")["incident"].get("closed")
    assert len(wb.sink.messages) == 2
    wb.host.failed(WORKER)
    wb.heal("worker")

    first, second, third = wb.sink.messages
    assert in_thread_of(first, second)
    assert replies_to(third) == ("", "")
    assert message_id(third) != message_id(first)


@pytest.mark.parametrize("where", ["global", "service"])
def test_notify_never_mails_nothing_but_keeps_the_history(wb, where):
    if where == "global":
        wb.configure(settings={"notify": "never"})
    else:
        wb.configure(worker={"notify": "never"})
    wb.host.failed(WORKER)
    wb.heal("worker")
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")
    wb.clock.advance(2 * 3600)
    wb.look("worker")                                 # a reminder would be due
    running(wb.host, WORKER, invocation=OTHER_RUN)
    wb.look("worker")                                 # the fix would be mailed
    assert wb.sink.messages == []
    assert wb.outcomes("worker") == ["RESOLVED", "FAILED"]
    assert wb.state("worker")["incident"].get("closed")


def test_notify_on_failure_mails_the_failure_and_the_fix_that_ends_it_but_not_a_plain_recovery(wb):
    wb.configure(settings={"notify": "on-failure"})
    wb.host.failed(WORKER)
    wb.heal("worker")
    assert wb.sink.messages == []                     # RESOLVED: not mailed
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")
    running(wb.host, WORKER, invocation=OTHER_RUN)
    wb.clock.advance(300)
    wb.look("worker")

    assert wb.outcomes("worker") == ["RESOLVED", "FAILED"]
    failed, fixed = wb.sink.messages
    assert failed["Subject"] == "❌ MiracleMax: worker - FAILED"
    assert fixed["Subject"] == "✅ MiracleMax: worker - RESOLVED (was down 5 min)"
    assert in_thread_of(failed, fixed)


def test_notify_on_failure_mails_the_heal_that_fixes_a_failed_incident(wb):
    wb.configure(settings={"notify": "on-failure"})
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")                                 # FAILED: mailed
    wb.host.failed(WORKER)                            # the cause was fixed; a heal by hand works now
    assert wb.heal("worker", trigger="manual")[0] == selfheal.EX_OK
    wb.clock.advance(300)
    wb.look("worker")

    assert wb.outcomes("worker") == ["FAILED", "RESOLVED"]
    assert len(wb.sink.messages) == 2
    failed, fixed = wb.sink.messages
    assert fixed["Subject"].startswith("✅ MiracleMax: worker - RESOLVED")
    assert in_thread_of(failed, fixed)


def test_resume_closes_the_open_incident_so_the_next_failure_starts_a_new_thread(wb):
    wb.host.failed(WORKER)
    wb.heal("worker")
    assert not wb.state("worker")["incident"].get("closed")
    wb.resume("worker")
    assert wb.state("worker")["incident"].get("closed")
    wb.host.failed(WORKER)
    wb.heal("worker")
    first, second = wb.sink.messages
    assert replies_to(second) == ("", "")
    assert message_id(second) != message_id(first)


def test_resume_after_an_escalation_lets_the_watch_heal_the_service_that_is_still_failed(wb):
    wb.configure(failure_threshold=1)
    wb.host.failed(WORKER)
    wb.heal("worker")                                 # RESOLVED
    wb.host.failed(WORKER)
    assert wb.heal("worker")[0] == selfheal.EX_FAIL  # ESCALATED
    assert wb.outcomes("worker") == ["RESOLVED", "ESCALATED"]
    wb.look("worker")
    wb.look("worker")
    assert wb.triggers() == []                        # escalated: left to a human
    wb.resume("worker")                               # the human re-arms healing
    wb.look("worker")
    wb.look("worker")
    assert wb.triggers() == [["start", "--no-block", "selfheal@worker.service"]]


# =============================================================================
# incident_healthy(): the watch finds the service healthy
# =============================================================================


def test_escalated_incident_found_healthy_gets_one_was_down_mail_closes_and_clears_the_escalation(wb):
    wb.configure(failure_threshold=1)
    wb.host.failed(WORKER)
    wb.heal("worker")
    wb.host.failed(WORKER)
    wb.heal("worker")
    assert wb.outcomes("worker") == ["RESOLVED", "ESCALATED"]
    assert wb.state("worker").get("escalated")
    running(wb.host, WORKER, invocation=OTHER_RUN)   # a human fixed it
    wb.clock.advance(300)
    assert wb.look("worker") == "ok"
    assert wb.look("worker") == "ok"

    first, escalated, fixed = wb.sink.messages
    assert escalated["Subject"] == "🛑 MiracleMax: worker - ESCALATED"
    assert fixed["Subject"] == "✅ MiracleMax: worker - RESOLVED (was down 5 min)"
    assert "It was down (ESCALATED) for 5 min" in fixed.get_content()
    assert in_thread_of(first, fixed)
    state = wb.state("worker")
    assert state["incident"].get("closed")
    assert "escalated" not in state


def test_quiet_incident_closes_silently_after_incident_quiet(wb):
    wb.host.failed(WORKER)
    wb.heal("worker")
    wb.clock.advance(600 - 30)
    wb.look("worker")
    assert not wb.state("worker")["incident"].get("closed")
    wb.clock.advance(60)
    wb.look("worker")
    assert wb.state("worker")["incident"].get("closed")
    assert len(wb.sink.messages) == 1


# =============================================================================
# watch(): one run over every service
# =============================================================================


def all_healthy(wb):
    running(wb.host, STORY)
    wb.host.listen(5002)
    running(wb.host, WORKER)


def test_watch_of_healthy_services_asks_systemctl_once_and_starts_nothing(wb):
    all_healthy(wb)
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    assert [c[1] for c in wb.host.calls("systemctl")] == ["show"]
    assert {n: wb.watch_state(n)["verdict"] for n in ("story-stages", "worker")} == {
        "story-stages": "ok", "worker": "ok"}
    assert wb.sink.messages == []


def test_watch_with_one_broken_service_still_looks_at_the_others_and_mails_watch_failed_once_an_hour(
        wb, monkeypatch):
    all_healthy(wb)
    real_watch_service = selfheal.watch_service

    def broken_for_story(config, paths, svc, *args):
        if svc.name == "story-stages":
            raise RuntimeError("disk on fire")
        return real_watch_service(config, paths, svc, *args)

    monkeypatch.setattr(selfheal, "watch_service", broken_for_story)
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_FAIL
    assert wb.watch_state("worker")["verdict"] == "ok"  # looked at after the broken one
    (msg,) = wb.sink.messages
    assert msg["Subject"] == "❌ MiracleMax: selfheal - WATCH FAILED"
    assert "story-stages:" in msg.get_content() and "RuntimeError: disk on fire" in msg.get_content()

    wb.clock.advance(1800)
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_FAIL
    assert len(wb.sink.messages) == 1
    wb.clock.advance(1801)
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_FAIL
    assert len(wb.sink.messages) == 2


def test_watch_finds_a_port_held_by_another_units_process_unhealthy_without_asking_its_health(wb):
    running(wb.host, STORY, ControlGroup="/system.slice/story-stages.service")
    wb.host.listen(5002, pid=4242, cgroup="/system.slice/other-app.service", cmdline="python3 -m http.server 5002")
    running(wb.host, WORKER)
    asked = []
    wb.health.answers[HEALTH] = lambda: asked.append(HEALTH) or FINE
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    state = wb.watch_state("story-stages")
    assert state["verdict"] == "unhealthy"
    assert state["detail"].startswith("port 5002 held by pid 4242 (user root, cgroup /system.slice/other-app.service")
    assert asked == []  # its answer would be the other process's
    # one ss per look: the first look and the re-check of the hang a moment later
    assert len(wb.host.calls("ss")) == 2
    assert wb.triggers() == [["start", "--no-block", "selfheal@story-stages.service"]]


def test_watch_without_the_holders_pids_judges_every_port_by_one_ss_cgroup_call(wb):
    wb.configure(extra={"books": {"port": 5003, "health_url": "http://127.0.0.1:5003/health"}})
    running(wb.host, STORY)
    running(wb.host, "books.service")
    running(wb.host, WORKER)
    wb.host.listen(5002, cgroup="/system.slice/other-app.service")  # no pid: ss -p may not see it
    wb.host.listen(5003, cgroup="/system.slice/books.service")
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    assert wb.watch_state("story-stages")["verdict"] == "unhealthy"
    assert "held by a socket of /system.slice/other-app.service" in wb.watch_state("story-stages")["detail"]
    assert wb.watch_state("books")["verdict"] == "ok"
    # one ss -p and one ss --cgroup judge every port; the re-check of the one hang asks again
    assert [c[1:] for c in wb.host.calls("ss")] == [["-H", "-t", "-l", "-n", "-p"], ["-H", "-t", "-l", "-n", "--cgroup"]] * 2


def test_watch_of_a_port_published_by_another_unit_with_port_owner_any_is_ok_and_asks_no_ss(wb):
    wb.configure(extra={"proxied": {"port": 5004, "port_owner": "any"}})
    running(wb.host, STORY)
    wb.host.listen(5002, pid=5555, cgroup="/system.slice/story-stages.service")
    running(wb.host, "proxied.service", ControlGroup="/system.slice/proxied.service")
    wb.host.listen(5004, pid=4242, cgroup="/system.slice/docker.service", cmdline="/usr/bin/docker-proxy -host-port 5004")
    running(wb.host, WORKER)
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    assert wb.watch_state("proxied")["verdict"] == "ok"
    assert all("5004" not in " ".join(c) for c in wb.host.calls("ss"))


def test_watch_of_a_port_held_by_the_unit_itself_is_ok(wb):
    running(wb.host, STORY)
    wb.host.listen(5002, pid=5555, cgroup="/system.slice/story-stages.service")
    running(wb.host, WORKER)
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    assert wb.watch_state("story-stages")["verdict"] == "ok"


def test_watch_run_sends_the_queued_mail(wb):
    all_healthy(wb)
    queue_report(wb.paths, wb.config.settings, "queued while mail was down")
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    assert wb.subjects() == ["queued while mail was down"]
    assert selfheal.outbox(wb.paths) == []


@pytest.fixture
def not_http():
    """A TCP port that answers like an SSH server: whatever is asked, one banner line, then close."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.02)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d/health" % server.getsockname()[1]
    done.set()
    thread.join(timeout=2)
    server.close()


def test_health_url_answering_something_else_than_http_is_unhealthy_and_the_watch_goes_on(wb, monkeypatch, not_http):
    monkeypatch.setattr(selfheal, "http_check", REAL_HTTP_CHECK)
    wb.configure(health_url=not_http)
    all_healthy(wb)
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    assert wb.watch_state("story-stages")["verdict"] == "unhealthy"
    assert wb.watch_state("worker")["verdict"] == "ok"


def test_http_check_of_a_port_that_does_not_speak_http_says_so_instead_of_raising(not_http):
    ok, detail = REAL_HTTP_CHECK(not_http, 2.0)
    assert (ok, detail) == (False, "not an HTTP answer (BadStatusLine: SSH-2.0-OpenSSH_9.2\\x0d\\n)")


# =============================================================================
# status_rows(): what miraclemax-status shows
# =============================================================================


def test_status_rows_show_unhealthy_paused_and_not_found(wb):
    wb.configure(extra={"ghost": {}})  # ghost.service is not on this host
    running(wb.host, STORY)
    wb.host.listen(5002)
    wb.host.failed(WORKER)
    wb.look("story-stages", HANG)
    selfheal.save_service_state(wb.paths, "worker", {"paused_until": 0.0})
    states = {r["name"]: r["state"] for r in selfheal.status_rows(wb.config, wb.paths)}
    assert states == {"story-stages": "unhealthy", "worker": "paused", "ghost": "not-found"}

    wb.look("story-stages", FINE)
    wb.resume("worker")
    states = {r["name"]: r["state"] for r in selfheal.status_rows(wb.config, wb.paths)}
    assert states == {"story-stages": "active", "worker": "failed", "ghost": "not-found"}


def test_status_row_of_a_stopped_service_is_not_unhealthy_even_if_the_watch_last_said_so(wb):
    running(wb.host, STORY)
    wb.look("story-stages")  # port 5002 not listening: unhealthy
    assert wb.watch_state("story-stages")["verdict"] == "unhealthy"
    stopped(wb.host, STORY)
    (row,) = [r for r in selfheal.status_rows(wb.config, wb.paths) if r["name"] == "story-stages"]
    assert row["state"] == "inactive"


# =============================================================================
# services.conf: the watch's and the incidents' keys
# =============================================================================

CONF = """\
[selfheal]
email_to = owner@example.org
{settings}

[story-stages]
port = 5002
{service}
"""
URL = "health_url = http://127.0.0.1:5002/health\n"

BAD_CONF = [
    # id, [selfheal] lines, [story-stages] lines, section, key, words in the problem
    ("watch-interval-below-5s", "watch_interval = 4s", "", "selfheal", "watch_interval", "5 s or more"),
    ("watch-interval-fractional", "watch_interval = 7.5s", "", "selfheal", "watch_interval", "whole seconds"),
    ("watch-interval-not-a-duration", "watch_interval = often", "", "selfheal", "watch_interval", "not a duration"),
    ("watch-confirm-zero", "watch_confirm = 0", "", "selfheal", "watch_confirm", "1 or more"),
    ("flap-threshold-1", "flap_threshold = 1", "", "selfheal", "flap_threshold", "2 or more"),
    ("incident-quiet-zero", "incident_quiet = 0", "", "selfheal", "incident_quiet", "more than zero"),
    ("notify-unknown", "notify = sometimes", "", "selfheal", "notify", "always | on-failure | never"),
    ("service-notify-unknown", "", "notify = loudly", "story-stages", "notify", "always | on-failure | never"),
    ("on-stopped-unknown", "", "on_stopped = restart", "story-stages", "on_stopped", "heal | report | ignore"),
    ("expect-status-not-a-code", "", URL + "health_expect_status = ok", "story-stages", "health_expect_status",
     "HTTP status codes"),
    ("expect-status-out-of-range", "", URL + "health_expect_status = 200, 999", "story-stages",
     "health_expect_status", "HTTP status codes"),
    ("expect-status-without-url", "", "health_expect_status = 200", "story-stages", "health_expect_status",
     "needs health_url"),
    ("expect-text-without-url", "", "health_expect_text = ok", "story-stages", "health_expect_text",
     "needs health_url"),
    ("health-timeout-without-url", "", "health_timeout = 2s", "story-stages", "health_timeout", "needs health_url"),
]


@pytest.mark.parametrize("settings, service, section, key, words", [c[1:] for c in BAD_CONF],
                         ids=[c[0] for c in BAD_CONF])
def test_bad_watch_or_incident_setting_is_one_problem_naming_section_key_and_choices(settings, service, section,
                                                                                     key, words):
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config(CONF.format(settings=settings, service=service), "services.conf", hostname="vm")
    (problem,) = caught.value.problems
    assert ("[%s] %s: " % (section, key)) in problem
    assert words in problem


def test_watch_and_incident_settings_are_read_with_their_units_and_case_folded_choices():
    config = selfheal.parse_config(CONF.format(
        settings="watch_interval = 1m\nwatch_confirm = 3\nflap_threshold = 2\nflap_window = 5m\n"
                 "reminder_interval = 2h\nincident_quiet = 90s\nnotify = On-Failure",
        service=URL + "health_expect_status = 200, 204\nhealth_expect_text = ok\non_stopped = REPORT\nnotify = never"),
        "services.conf", hostname="vm")
    s, svc = config.settings, config.services["story-stages"]
    assert (s.watch_interval, s.watch_confirm, s.flap_threshold, s.flap_window, s.reminder_interval,
            s.incident_quiet, s.notify) == (60.0, 3, 2, 300.0, 7200.0, 90.0, "on-failure")
    assert (svc.health_expect_status, svc.health_expect_text, svc.on_stopped, svc.notify) == (
        (200, 204), "ok", "report", "never")


def test_watch_interval_of_exactly_5s_is_accepted_and_defaults_hold_without_the_keys():
    assert selfheal.parse_config(CONF.format(settings="watch_interval = 5", service=""),
                                 hostname="vm").settings.watch_interval == 5.0
    config = selfheal.parse_config(CONF.format(settings="", service=""), hostname="vm")
    s, svc = config.settings, config.services["story-stages"]
    assert (s.watch_interval, s.watch_confirm, s.flap_threshold, s.notify) == (30.0, 2, 3, "always")
    assert (svc.on_stopped, svc.notify) == ("heal", "")


def test_one_watch_run_looks_at_a_hang_again_within_seconds_and_hands_it_over(wb, monkeypatch):
    """A frozen service is confirmed by a second look RECHECK_DELAY later in the same run,
    not watch_interval later; a service that answers at the second look is left alone."""
    monkeypatch.setattr(selfheal, "RECHECK_DELAY", 0.3)
    running(wb.host, STORY)
    wb.host.listen(5002)
    running(wb.host, WORKER)
    wb.health.answers[HEALTH] = HANG
    started = time.monotonic()
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    assert time.monotonic() - started >= 0.3
    assert wb.triggers() == [["start", "--no-block", "selfheal@story-stages.service"]]
    assert "(2 checks in a row over" in wb.finding("story-stages")["detail"]


def test_a_hang_that_clears_by_the_second_look_is_not_handed_over(wb, monkeypatch):
    monkeypatch.setattr(selfheal, "RECHECK_DELAY", 0.05)
    running(wb.host, STORY)
    wb.host.listen(5002)
    answers = iter([HANG, FINE])
    wb.health.answers[HEALTH] = lambda: next(answers)
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    assert wb.triggers() == []
    assert wb.watch_state("story-stages")["verdict"] == "ok"


def test_a_hang_is_restarted_without_asking_the_hung_health_check_first(wb):
    """The heal of a hang goes straight to its strategies: asking the frozen service again
    would only cost health_timeout before the restart."""
    running(wb.host, STORY, listen={"port": 5002})
    wb.host.listen(5002)
    asked_at_restarts = []

    def answer():
        restarts = wb.host.load()["units"][STORY].get("restarts", 0)
        asked_at_restarts.append(restarts)
        return FINE if restarts else HANG

    wb.health.answers[HEALTH] = answer
    wb.look("story-stages", HANG)
    wb.look("story-stages", HANG)
    asked_at_restarts.clear()
    assert wb.heal("story-stages")[0] == selfheal.EX_OK
    assert asked_at_restarts and min(asked_at_restarts) >= 1, asked_at_restarts


# =============================================================================
# The watch run's budget: one slow check or a slow mail server cannot hold it
# =============================================================================


def test_a_health_check_still_running_when_the_budget_is_spent_is_not_judged_and_the_run_ends(wb, monkeypatch):
    all_healthy(wb)
    monkeypatch.setattr(selfheal, "WATCH_BUDGET", (1.0, 1.0))
    wb.health.answers[HEALTH] = lambda: time.sleep(4) or HANG  # a check with a long health_timeout
    started = time.monotonic()
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    took = time.monotonic() - started
    assert took < 2.5, "the watch run took %.1f s with a budget of 1 s" % took
    assert int(wb.watch_state("story-stages").get("fails") or 0) == 0  # not judged, so not counted
    assert wb.triggers() == []


def test_a_late_health_check_means_no_heartbeat_this_run(wb, monkeypatch):
    all_healthy(wb)
    pings = []
    monkeypatch.setattr(selfheal, "ping_heartbeat", lambda config, paths: pings.append(1))
    selfheal.cmd_watch(wb.config, wb.paths)
    assert pings == [1]
    monkeypatch.setattr(selfheal, "WATCH_BUDGET", (0.5, 0.5))
    wb.health.answers[HEALTH] = lambda: time.sleep(2) or FINE
    selfheal.cmd_watch(wb.config, wb.paths)
    assert pings == [1]  # the dead-man's switch alerts when the watch cannot look at everything


def test_a_hang_is_not_looked_at_again_when_the_budget_has_no_room_for_it(wb, monkeypatch):
    all_healthy(wb)
    wb.health.answers[HEALTH] = HANG
    monkeypatch.setattr(selfheal, "WATCH_BUDGET", (3.0, 3.0))  # RECHECK_DELAY 2 s + health_timeout 5 s
    started = time.monotonic()
    selfheal.cmd_watch(wb.config, wb.paths)
    assert time.monotonic() - started < 2.0  # no second look within this run
    assert wb.watch_state("story-stages")["fails"] == 1 and wb.triggers() == []
    monkeypatch.setattr(selfheal, "WATCH_BUDGET", (20.0, 240.0))
    selfheal.cmd_watch(wb.config, wb.paths)  # the next run: two more looks, two in a row is enough
    assert wb.triggers()


def test_queued_reports_past_the_budget_wait_for_the_next_run(wb, monkeypatch):
    all_healthy(wb)
    for subject in ("first", "second"):
        queue_report(wb.paths, wb.config.settings, subject)
    with selfheal.budget(0):
        assert selfheal.flush_outbox(wb.config, wb.paths)["mail"] == [0, 2]
    assert wb.sink.messages == []
    assert selfheal.flush_outbox(wb.config, wb.paths)["mail"] == [2, 0]


# =============================================================================
# Retries with backoff, and the second contact (escalate_to)
# =============================================================================


def retry_finding_kind(wb, name):
    finding = wb.finding(name)
    return finding and finding["kind"]


def test_a_failed_service_is_healed_again_at_doubling_intervals_and_a_fix_by_hand_is_picked_up(wb):
    wb.configure({"retry_interval": "5m"})
    wb.host.failed(WORKER, on_restart="fail")
    assert wb.heal("worker")[0] == selfheal.EX_FAIL
    assert wb.subjects() == ["❌ MiracleMax: worker - FAILED"]

    wb.clock.advance(290)
    assert wb.look("worker") == "failed"
    assert wb.triggers() == []  # not yet: retry_interval is 5 min
    wb.clock.advance(20)
    wb.look("worker")
    assert wb.triggers() == [["start", "--no-block", "selfheal@worker.service"]]
    assert retry_finding_kind(wb, "worker") == "retry"
    assert wb.heal("worker")[0] == selfheal.EX_FAIL  # still broken: recorded, not mailed again
    assert wb.subjects() == ["❌ MiracleMax: worker - FAILED"]
    assert [(e["outcome"], e["trigger"]) for e in selfheal.read_history(wb.paths, "worker")] == [
        ("FAILED", "onfailure"), ("FAILED", "retry")]

    wb.host.clear_calls()
    wb.clock.advance(590)  # the second retry waits twice as long: 10 min
    wb.look("worker")
    assert wb.triggers() == []
    wb.clock.advance(20)
    wb.look("worker")
    assert len(wb.triggers()) == 1

    with wb.host.edit() as state:  # someone fixed the config: the next restart works
        state["units"][WORKER]["on_restart"] = "active"
    rc, _ = wb.heal("worker")
    assert rc == selfheal.EX_OK
    assert wb.subjects()[1] == "✅ MiracleMax: worker - RESOLVED"
    assert in_thread_of(wb.sink.messages[0], wb.sink.messages[1])
    # Retries are not failures: they do not bring the service nearer failure_threshold.
    assert selfheal.heal_attempts(wb.paths, "worker", 0) == [selfheal.read_history(wb.paths, "worker")[0]["ts"]]


def test_the_retry_backoff_is_capped_at_an_hour_and_starts_again_after_incident_quiet(wb):
    wb.configure({"retry_interval": "20m", "incident_quiet": "10m"})
    settings = wb.config.settings
    assert [selfheal.retry_delay(settings, n) for n in range(4)] == [1200, 2400, 3600, 3600]

    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")
    for _ in range(2):  # two retries that fail: the next is an hour away
        wb.clock.advance(3600)
        wb.look("worker")
        wb.heal("worker")
    incident = wb.state("worker")["incident"]
    assert incident["retries"] == 2
    assert incident["next_retry"] - wb.clock.time() == pytest.approx(3600, abs=5)

    with wb.host.edit() as state:
        state["units"][WORKER]["on_restart"] = "active"
    wb.clock.advance(3600)
    wb.look("worker")
    assert wb.heal("worker")[0] == selfheal.EX_OK
    wb.clock.advance(601)
    assert wb.look("worker") == "ok"  # healthy for incident_quiet: the incident and its count end
    assert wb.state("worker")["incident"].get("closed")

    wb.host.failed(WORKER, on_restart="fail", InvocationID="c" * 32)
    wb.heal("worker")
    incident = wb.state("worker")["incident"]
    assert not incident.get("closed") and not incident.get("retries")
    assert incident["next_retry"] - wb.clock.time() == pytest.approx(1200, abs=5)


def test_an_escalated_service_is_still_retried_at_the_breakers_pace(wb):
    """Issue 21: ESCALATED tells a human and never abandons the service (tests/test_breaker.py)."""
    wb.configure({"retry_interval": "5m"}, failure_threshold=1)
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")  # FAILED: one heal, the threshold
    wb.host.failed(WORKER, on_restart="fail", InvocationID="c" * 32)
    wb.heal("worker")  # ESCALATED
    assert wb.outcomes("worker") == ["FAILED", "ESCALATED"]
    wb.host.clear_calls()
    wb.look("worker")
    assert wb.triggers() == []  # not yet: the first heal at the breaker's pace is BREAKER_FIRST away
    for _ in range(3):
        wb.clock.advance(3600)
        wb.look("worker")
    assert len(wb.triggers()) == 3


def test_retry_interval_zero_never_retries_and_bounds_are_config_errors():
    assert selfheal.check_retry_interval("0") == 0
    for bad in ("2s", "2h"):
        with pytest.raises(ValueError):
            selfheal.check_retry_interval(bad)


def test_escalate_to_gets_one_mail_in_the_thread_after_escalate_after(wb, monkeypatch):
    wb.configure({"retry_interval": "0", "escalate_to": "boss@example.org", "escalate_after": "30m"})
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")
    (first,) = wb.sink.messages
    wb.clock.advance(1700)
    wb.look("worker")
    assert len(wb.sink.messages) == 1
    wb.clock.advance(200)
    queued_status = []
    real_queue = selfheal.queue_report
    monkeypatch.setattr(selfheal, "queue_report", lambda paths, report, *a, **k: (
        queued_status.append(report["status"]), real_queue(paths, report, *a, **k))[1])
    wb.look("worker")
    monkeypatch.setattr(selfheal, "queue_report", real_queue)
    assert len(wb.sink.messages) == 2
    second = wb.sink.messages[1]
    assert second["Subject"] == "🛑 MiracleMax: worker - FAILED (to boss@example.org)"
    assert second["Cc"] == "boss@example.org" and second["To"] == "owner@example.org"
    assert wb.sink.received[-1].rcpt_to == ("owner@example.org", "boss@example.org")
    assert in_thread_of(first, second)
    assert "has been FAILED for 32 min" in second.get_content()
    # The webhook and the outbox record call it what it is: FAILED (a status given, not cut from the label).
    assert queued_status == ["FAILED"]
    for _ in range(3):
        wb.clock.advance(1800)
        wb.look("worker")
    assert [m["Subject"] for m in wb.sink.messages].count(second["Subject"]) == 1  # once per incident


def test_escalate_after_without_escalate_to_is_a_config_error(write_conf):
    path = write_conf(conf({"escalate_after": "10m"}, {"worker": {}}))
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.load_config(path, trusted=False)
    assert caught.value.problems == ["%s:5 [selfheal] escalate_after: needs escalate_to" % path]


# =============================================================================
# Maintenance windows
# =============================================================================


def window_from(wb, seconds_ago, length):
    """A maintenance value whose window opened `seconds_ago` (by the test's clock), UTC."""
    start = time.gmtime(wb.clock.time() - seconds_ago)
    return "*-*-* %s UTC %s" % (time.strftime("%H:%M:%S", start), length)


def test_in_a_maintenance_window_a_crash_is_neither_healed_nor_mailed_and_one_summary_follows(wb):
    wb.configure(worker={"maintenance": window_from(wb, 60, "10min")})
    wb.host.failed(WORKER)
    rc, printed = wb.heal("worker")
    assert rc == selfheal.EX_OK and "maintenance window" in printed
    assert wb.touched(WORKER) == [] and wb.sink.messages == [] and wb.outcomes("worker") == []
    assert [wb.look("worker") for _ in range(3)] == ["maintenance"] * 3
    assert wb.triggers() == []
    story = wb.config.services["story-stages"]  # the window is the worker's own
    assert selfheal.maintenance_until(wb.config, story, wb.clock.time()) is None

    wb.clock.advance(600)  # the window has ended; worker is still down
    assert wb.look("worker") == "failed"
    (summary,) = wb.sink.messages
    assert summary["Subject"] == "🔧 MiracleMax: worker - STILL DOWN AFTER MAINTENANCE"
    text = summary.get_content()
    assert "healed nothing and mailed nothing" in text
    assert "onfailure: failed (failed), result signal" in text
    wb.clock.advance(30)
    wb.look("worker")  # then healed as usual, after watch_confirm looks
    assert wb.triggers() == [["start", "--no-block", "selfheal@worker.service"]]
    wb.heal("worker")
    resolved = wb.sink.messages[1]
    assert resolved["Subject"] == "✅ MiracleMax: worker - RESOLVED"
    assert in_thread_of(summary, resolved)
    wb.look("worker")
    assert len(wb.sink.messages) == 2  # one summary, not one per look


def test_a_service_that_is_up_when_its_window_ends_gets_no_mail(wb):
    wb.configure({"maintenance": window_from(wb, 60, "5min")})
    wb.host.failed(WORKER)
    wb.heal("worker")
    wb.look("worker")
    running(wb.host, WORKER)  # the upgrade finished and started it again
    wb.clock.advance(300)
    assert wb.look("worker") == "ok"
    assert wb.sink.messages == []
    assert "maintenance" not in wb.state("worker")


def test_a_heal_asked_for_by_hand_goes_ahead_in_a_window(wb):
    wb.configure({"maintenance": window_from(wb, 10, "1h")})
    wb.host.failed(WORKER)
    assert wb.heal("worker", trigger=selfheal.MANUAL_TRIGGER)[0] == selfheal.EX_OK
    assert wb.touched(WORKER) == [["systemctl", "restart", "--", WORKER]]


@pytest.mark.parametrize("value, message", [
    ("Sun *-*-* 03:00", "it must end in a duration"),
    ("Sun *-*-* 25:00 1h", "hour 25 is out of range (0-23)"),
    ("Funday 03:00 1h", "unknown weekday"),
    ("Sun 03:00 8d", "at most 7d"),
])
def test_a_bad_maintenance_window_is_a_config_error_naming_it(write_conf, value, message):
    path = write_conf(conf({"maintenance": value}, {"worker": {}}))
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.load_config(path, trusted=False)
    (problem,) = caught.value.problems
    assert problem.startswith("%s:5 [selfheal] maintenance: maintenance window %r: " % (path, value))
    assert message in problem


def test_a_problem_fixed_by_someone_else_keeps_its_retry_count_for_incident_quiet(wb):
    wb.configure({"retry_interval": "5m", "incident_quiet": "10m"})
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")
    wb.clock.advance(310)
    wb.look("worker")
    wb.heal("worker")  # retry 1 fails
    running(wb.host, WORKER, invocation="c" * 32)  # fixed by hand
    wb.look("worker")  # "was down" mail; the incident closes
    wb.host.failed(WORKER, on_restart="fail", InvocationID="d" * 32)  # fails again within incident_quiet
    wb.heal("worker")
    incident = wb.state("worker")["incident"]
    assert incident["retries"] == 1
    assert incident["next_retry"] - wb.clock.time() == pytest.approx(600, abs=5)  # the doubled delay
