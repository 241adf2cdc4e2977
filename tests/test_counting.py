"""What counts toward flapping and failure_threshold (issue 21): only failures of the service
itself. Not the echo of selfheal's own failed restart (its OnFailure= fires a heal of a run
selfheal started and already reported), not a clean stop the watch found, not one service's
share of a burst that hit many at once. Fakes only (no root, no systemd)."""

import os
import time

import pytest

import selfheal

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

WORKER = "worker.service"


def subjects(bed):
    return [str(m["Subject"]).split(" - ", 1)[-1] for m in bed.sink.messages]


def restarts(bed):
    return [c for c in bed.host.actions() if c[:2] == ["systemctl", "restart"]]


def echo_env(bed, unit=WORKER):
    """MONITOR_* as systemd sets them for the run the unit failed in (its InvocationID now)."""
    props = bed.host.load()["units"][unit]["props"]
    return {"MONITOR_UNIT": unit, "MONITOR_SERVICE_RESULT": "exit-code", "MONITOR_EXIT_CODE": "exited",
            "MONITOR_EXIT_STATUS": "1", "MONITOR_INVOCATION_ID": props["InvocationID"]}


def test_echo_of_a_failed_manual_heal_restarts_nothing_and_mails_nothing(bed):
    bed.configure(failure_threshold=2, flap_threshold=2)
    bed.host.failed(WORKER, on_restart="fail")
    assert bed.heal("worker", trigger="manual")[0] == 1  # `selfheal heal worker` on a broken service
    assert subjects(bed) == ["FAILED"]
    for _ in range(3):  # the restart's failed run fires OnFailure= (systemd does, each time)
        bed.host.clear_calls()
        rc, _ = bed.heal("worker", env=echo_env(bed))
        assert rc == 0
        assert restarts(bed) == []
    assert subjects(bed) == ["FAILED"]
    assert [e["outcome"] for e in bed.history("worker")] == ["FAILED"]


def test_heal_twice_on_a_broken_service_then_fixed_ends_resolved_without_flapping_or_escalation(bed):
    """Issue 21's case: `selfheal heal NAME` twice on a broken service (each restart's failure
    echoes through OnFailure=), then the service is fixed and healed once more."""
    bed.configure(failure_threshold=2, flap_threshold=2)
    bed.host.failed(WORKER, on_restart="fail")
    for _ in range(2):
        assert bed.heal("worker", trigger="manual")[0] == 1
        assert bed.heal("worker", env=echo_env(bed))[0] == 0  # the echo
    with bed.host.edit() as state:
        state["units"][WORKER]["on_restart"] = "active"
    assert bed.heal("worker", trigger="manual")[0] == 0
    assert not [s for s in subjects(bed) if "FLAPPING" in s or "ESCALATED" in s], subjects(bed)
    assert subjects(bed)[-1] == "RESOLVED"


def test_echo_is_recognised_by_time_when_the_run_differs_from_the_one_selfheal_saw(bed):
    """Without MONITOR_* (systemd 247) or after systemd's own Restart= replaced the run selfheal
    started: a failure inside the heal that restarted it is that heal's, not a new one."""
    bed.host.failed(WORKER, on_restart="fail")
    assert bed.heal("worker", trigger="manual")[0] == 1
    (event,) = bed.history("worker")
    assert event["acted_until"] >= event["ts"]
    with bed.host.edit() as state:  # another run, which failed while that heal ran
        props = state["units"][WORKER]["props"]
        props["InvocationID"] = "c" * 32
        ago = time.time() - (event["ts"] + event["acted_until"]) / 2
        props["ExecMainExitTimestampMonotonic"] = str(int((time.monotonic() - ago) * 1e6))
    bed.host.clear_calls()
    assert bed.heal("worker")[0] == 0
    assert restarts(bed) == []
    assert subjects(bed) == ["FAILED"]


def test_a_run_selfheal_verified_healthy_that_dies_later_is_a_new_failure(bed):
    bed.configure(failure_threshold=2)
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    (event,) = bed.history("worker")
    bed.host.failed(WORKER, InvocationID=event["last_invocation"])  # the very run it brought back
    bed.host.clear_calls()
    assert bed.heal("worker")[0] == 0
    assert len(restarts(bed)) == 1
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED", "RESOLVED"]
    assert len(selfheal.heal_attempts(bed.paths, "worker", 0)) == 2


def test_a_new_failure_after_a_failed_heal_that_restarted_nothing_is_healed(bed):
    """The config check failed, so nothing was restarted: no run of selfheal's to echo."""
    bed.host.failed(WORKER)
    event = {"ts": time.time() - 5, "time": "x", "service": "worker", "outcome": "FAILED", "trigger": "onfailure",
             "last_invocation": bed.host.load()["units"][WORKER]["props"]["InvocationID"]}
    selfheal.record_event(bed.paths, event)
    bed.host.clear_calls()
    assert bed.heal("worker")[0] == 0
    assert len(restarts(bed)) == 1


def stopped(host, unit):
    host.unit(unit, ActiveState="inactive", SubState="dead", Result="success", InvocationID="d" * 32)


def test_four_clean_stops_found_by_the_watch_neither_flap_nor_escalate(bed):
    """`systemctl stop` four times (the watch starting it each time): Result=success, no
    FLAPPING, no ESCALATED; each start is still reported and recorded."""
    bed.configure(failure_threshold=2, flap_threshold=2)
    for i in range(4):
        stopped(bed.host, WORKER)
        selfheal.write_finding(bed.paths, "worker", selfheal.Finding(
            "stopped", "found stopped: inactive (dead)", time.time(), invocation="d" * 32))
        assert bed.heal("worker")[0] == 0
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED"] * 4
    assert all(e["a_failure"] is False for e in bed.history("worker"))
    assert selfheal.heal_attempts(bed.paths, "worker", 0) == []
    assert not [s for s in subjects(bed) if "FLAPPING" in s or "ESCALATED" in s], subjects(bed)


def test_one_services_share_of_a_burst_does_not_count_toward_failure_threshold(bed):
    bed.configure(failure_threshold=2)
    for other in ("db", "cache"):  # two more services' OnFailure= arrived just now
        selfheal.note_arrival(bed.paths, other)
    for _ in range(3):
        bed.host.failed(WORKER)
        assert bed.heal("worker")[0] == 0
    events = bed.history("worker")
    assert [e["burst"] for e in events] == [3, 3, 3]
    assert selfheal.heal_attempts(bed.paths, "worker", 0) == []
    assert "ESCALATED" not in " ".join(subjects(bed))


def test_arrivals_older_than_the_burst_window_are_not_a_burst(bed):
    for other in ("db", "cache"):
        selfheal.note_arrival(bed.paths, other)
        old = time.time() - 10 * selfheal.BURST_WINDOW
        os.utime(str(bed.paths.arrival(other)), (old, old))
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    (event,) = bed.history("worker")
    assert "burst" not in event
    assert len(selfheal.heal_attempts(bed.paths, "worker", 0)) == 1


@pytest.mark.parametrize("event, counts", [
    ({"outcome": "RESOLVED", "trigger": "onfailure"}, True),
    ({"outcome": "FAILED", "trigger": "watch"}, True),
    ({"outcome": "RESOLVED", "trigger": "watch", "a_failure": False}, False),  # a clean stop
    ({"outcome": "RESOLVED", "trigger": "onfailure", "burst": selfheal.BURST_MIN}, False),
    ({"outcome": "RESOLVED", "trigger": "onfailure", "burst": selfheal.BURST_MIN - 1}, True),
    ({"outcome": "RESOLVED", "trigger": "manual"}, False),
    ({"outcome": "RECOVERED", "trigger": "onfailure"}, False),
])
def test_counts_as_attempt(event, counts):
    assert selfheal.counts_as_attempt(dict(event, ts=1.0)) is counts
