"""The breaker that tells and never abandons (issue 21): ESCALATED mails a human once, then
selfheal heals the service at growing intervals (BREAKER_FIRST, doubling, at most
retry_interval): while restarts help, and while they do not, so a fix made by hand is picked up
in the same thread with no command typed. `resume` takes several names and --all. Fakes only."""

import pytest

import selfheal
from conftest import WORKER  # the fixtures (clock, health, sink, wb) are conftest.py's

SUBJECT_END = lambda m: str(m["Subject"]).split(" - ", 1)[-1]  # noqa: E731


def crash(wb, n):
    """The worker's run number n crashed (SIGKILL), a run selfheal had not seen."""
    wb.host.failed(WORKER, InvocationID="%032x" % (0xC0DE00 + n))


def test_a_crash_loop_that_restarts_help_is_escalated_once_then_healed_at_growing_intervals(wb):
    wb.configure(failure_threshold=3)
    for n in range(3):
        crash(wb, n)
        assert wb.heal("worker")[0] == 0
    crash(wb, 3)
    wb.host.clear_calls()
    assert wb.heal("worker")[0] == 1  # the breaker trips: told, and no restart this time
    assert wb.touched(WORKER) == []
    assert [SUBJECT_END(m) for m in wb.sink.messages] == ["RESOLVED", "RESOLVED", "FLAPPING", "ESCALATED"]
    body = wb.sink.messages[-1].get_content()
    assert "heals it again in 30 s, then at growing intervals (at most 5 min)" in body

    wb.look("worker")  # not yet due
    assert wb.triggers() == []
    delays = []
    for n in range(4, 8):
        due = selfheal.breaker_due(wb.state("worker"))
        wb.clock.advance(due - wb.clock.time() + 1)
        wb.look("worker")  # the watch heals it at the breaker's pace
        assert len(wb.triggers()) == 1
        wb.host.clear_calls()
        assert wb.heal("worker")[0] == 0
        assert [c[1] for c in wb.touched(WORKER)] == ["restart"]
        delays.append(selfheal.breaker_due(wb.state("worker")) - wb.clock.time())
        crash(wb, n)  # ... and it crashes again: waits for the next heal
        wb.host.clear_calls()
        assert wb.heal("worker")[0] == 1
        assert wb.touched(WORKER) == []
    assert delays == sorted(delays) and delays[0] < delays[-1] <= 300 + 5
    subjects = [SUBJECT_END(m) for m in wb.sink.messages]
    assert subjects == ["RESOLVED", "RESOLVED", "FLAPPING", "ESCALATED", "RESOLVED"]  # back: told once
    assert "goes\non healing it at growing intervals" in wb.sink.messages[-1].get_content()
    first = wb.sink.messages[0]["Message-ID"]
    assert all(m["In-Reply-To"] == first for m in wb.sink.messages[1:])


def test_the_breaker_closes_once_the_service_was_healthy_for_incident_quiet(wb):
    wb.configure(failure_threshold=1)
    crash(wb, 0)
    wb.heal("worker")
    crash(wb, 1)
    assert wb.heal("worker")[0] == 1  # ESCALATED
    wb.clock.advance(selfheal.BREAKER_FIRST + 1)
    wb.look("worker")
    assert wb.heal("worker")[0] == 0  # healed at the breaker's pace
    assert wb.state("worker").get("escalated")
    wb.clock.advance(11 * 60)  # healthy for incident_quiet (10 min)
    wb.look("worker")
    state = wb.state("worker")
    assert not state.get("escalated") and state["incident"].get("closed")
    crash(wb, 2)
    wb.host.clear_calls()
    assert wb.heal("worker")[0] == 0  # the count started afresh: healed at once
    assert [c[1] for c in wb.touched(WORKER)] == ["restart"]


def test_restarts_that_do_not_help_are_retried_until_a_fix_by_hand_is_picked_up_in_the_thread(wb):
    wb.configure({"retry_interval": "5m"}, failure_threshold=1)
    wb.host.failed(WORKER, on_restart="fail")
    assert wb.heal("worker")[0] == 1  # FAILED
    wb.host.failed(WORKER, on_restart="fail", InvocationID="c" * 32)
    assert wb.heal("worker")[0] == 1  # ESCALATED
    for _ in range(3):  # restarts do not help: retried at growing intervals, not mailed
        wb.clock.advance(selfheal.breaker_due(wb.state("worker")) - wb.clock.time() + 1)
        wb.look("worker")
        assert wb.heal("worker")[0] == 1
    assert [SUBJECT_END(m) for m in wb.sink.messages] == ["FAILED", "ESCALATED"]
    with wb.host.edit() as state:  # fixed by hand
        state["units"][WORKER]["on_restart"] = "active"
    wb.clock.advance(selfheal.breaker_due(wb.state("worker")) - wb.clock.time() + 1)
    wb.look("worker")
    assert wb.heal("worker")[0] == 0
    subjects = [SUBJECT_END(m) for m in wb.sink.messages]
    assert subjects == ["FAILED", "ESCALATED", "RESOLVED"]
    first = wb.sink.messages[0]["Message-ID"]
    assert wb.sink.messages[-1]["In-Reply-To"] == first


@pytest.mark.parametrize("step, seconds", [(0, 30), (1, 60), (2, 120), (3, 240), (4, 300), (40, 300)])
def test_breaker_delay_doubles_from_breaker_first_up_to_retry_interval(wb, step, seconds):
    config = wb.configure({"retry_interval": "5m"})
    assert selfheal.breaker_delay(config.settings, step) == seconds


def test_breaker_delay_with_retries_off_still_retries_at_most_hourly(wb):
    config = wb.configure({"retry_interval": "0"})
    assert selfheal.breaker_delay(config.settings, 40) == selfheal.MAX_RETRY_INTERVAL


def test_resume_takes_several_names_and_all(wb, as_root, capsys):
    for name in ("worker", "story-stages"):
        with selfheal.service_state(wb.paths, name) as state:
            state["escalated"] = 1.0
            state["paused_until"] = 0.0
    assert selfheal.main(["resume", "worker", "story-stages"]) == 0
    assert not wb.state("worker").get("escalated") and not wb.state("story-stages").get("escalated")
    for name in ("worker", "story-stages"):
        with selfheal.service_state(wb.paths, name) as state:
            state["escalated"] = 1.0
    assert selfheal.main(["resume", "--all"]) == 0
    assert [n for n in ("worker", "story-stages") if wb.state(n).get("escalated")] == []
    out = capsys.readouterr().out
    assert out.count("healing resumed") == 4


@pytest.mark.parametrize("argv", [["resume"], ["resume", "--all", "worker"], ["resume", "worker", "nosuch"]])
def test_resume_needs_names_or_all_and_changes_nothing_on_an_unknown_name(wb, as_root, argv):
    with selfheal.service_state(wb.paths, "worker") as state:
        state["escalated"] = 1.0
    assert selfheal.main(argv) == selfheal.EX_USAGE
    assert wb.state("worker").get("escalated") == 1.0
