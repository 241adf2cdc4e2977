"""One heal for a burst, one mail per event (issue 21): the first OnFailure= heal leads; a
later one hands its service over and ends at once; the leader heals what is handed to it in
threads, and those back are one mail with a line each and the time until all were back; a
service that needs a human keeps its own mail and thread. The fakes are executed as processes
here (`real_commands`): the leader's threads run them at once. No root, no systemd."""

import pytest

import selfheal
from conftest import HEAL_SERVICES

pytestmark = pytest.mark.usefixtures("quiet_selfheal", "real_commands")

STORY, WORKER, CACHE = "story-stages.service", "worker.service", "cache.service"
SERVICES = dict(HEAL_SERVICES, cache={})


def restarted(bed):
    """Every unit restarted, once per restart (a burst's leader restarts several in one call)."""
    units = []
    for call in bed.host.actions():
        if call[:2] == ["systemctl", "restart"]:
            units += [arg for arg in call[2:] if arg.endswith(".service")]
    return sorted(units)


def leader_lock(bed):
    return selfheal.Lock(bed.paths.run / "locks" / "burst.lock")


def test_a_trigger_during_a_burst_hands_its_service_over_and_ends_at_once(bed):
    bed.host.failed(WORKER)
    lock = leader_lock(bed)
    assert lock.acquire()
    try:
        rc, printed = bed.heal("worker")
    finally:
        lock.release()
    assert rc == 0 and "handed to the heal under way" in printed
    assert restarted(bed) == [] and bed.sink.messages == []
    assert bed.paths.handed("worker").exists()
    assert selfheal.take_handed(bed.paths) == {"worker": {}}


def test_the_leader_heals_what_was_handed_to_it_and_sends_one_mail_for_the_burst(bed):
    bed.configure(services=SERVICES)
    for unit in (STORY, WORKER, CACHE):
        bed.host.failed(unit, listen={"port": 5002} if unit == STORY else None)
    for name in ("worker", "cache"):  # their triggers came while the leader was starting
        selfheal.note_arrival(bed.paths, name)
        assert selfheal.hand_over(bed.paths, name, {"MONITOR_UNIT": "%s.service" % name,
                                                    "MONITOR_SERVICE_RESULT": "signal"})
    rc, _ = bed.heal("story-stages")
    assert rc == 0
    assert restarted(bed) == sorted([STORY, WORKER, CACHE])  # each once
    # Restarts first: the two plain crashes handed over together, in one call, before their diagnosis.
    assert ["systemctl", "restart", "--no-block", "--", CACHE, WORKER] in bed.host.actions()
    (mail,) = bed.sink.messages
    assert mail["Subject"] == "✅ MiracleMax: burst - RESOLVED (3 services)"
    text = mail.get_content()
    assert text.startswith("3 services failed within ")
    assert "; all 3 were back " in text.splitlines()[0]
    for name in ("cache", "story-stages", "worker"):
        assert [ln for ln in text.splitlines() if ln.startswith("  %s " % name)], text
    for name in ("cache", "story-stages", "worker"):  # each one's incident follows the burst's thread
        assert selfheal.load_service_state(bed.paths, name)["incident"]["message_id"] == mail["Message-ID"].strip()
        (event,) = bed.history(name)
        assert event["outcome"] == "RESOLVED" and event["burst"] == 3
    assert list(bed.paths.handed("x").parent.iterdir()) == []


def test_a_service_that_needs_a_human_keeps_its_own_mail_in_a_burst(bed):
    bed.configure(services=SERVICES)
    bed.host.failed(STORY, listen={"port": 5002})
    bed.host.failed(WORKER, on_restart="fail")
    bed.host.failed(CACHE)
    for name in ("worker", "cache"):
        assert selfheal.hand_over(bed.paths, name, {})
    bed.heal("story-stages")
    subjects = sorted(str(m["Subject"]) for m in bed.sink.messages)
    assert subjects == ["✅ MiracleMax: burst - RESOLVED (2 services)", "❌ MiracleMax: worker - FAILED"]
    burst = next(m for m in bed.sink.messages if "burst" in str(m["Subject"]))
    assert "Not back, each in its own mail and thread: worker." in burst.get_content()


def test_a_single_failure_is_mailed_on_its_own_at_once(bed):
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    (mail,) = bed.sink.messages
    assert mail["Subject"] == "✅ MiracleMax: worker - RESOLVED"


def test_a_service_with_its_own_heal_drop_in_is_healed_in_its_own_unit(bed, tmp_path, monkeypatch):
    monkeypatch.setattr(selfheal, "UNIT_DIR", str(tmp_path))
    (tmp_path / "selfheal@worker.service.d").mkdir()
    bed.host.failed(WORKER)
    lock = leader_lock(bed)
    assert lock.acquire()
    try:
        assert bed.heal("worker")[0] == 0
    finally:
        lock.release()
    assert restarted(bed) == [WORKER]
    assert not bed.paths.handed("worker").exists()


def test_a_heal_in_its_own_unit_gives_back_the_lead_its_condition_took_and_starts_one_handed_over(
        bed, tmp_path, monkeypatch):
    """Its unit's ExecCondition= left it in handed/ and made /run/selfheal/leading; a trigger
    that came meanwhile (cache) found the lead taken and ended. Once done, with no heal leading,
    the lead is given back and cache's heal started, which leads: nothing waits for the watch."""
    monkeypatch.setattr(selfheal, "UNIT_DIR", str(tmp_path))
    (tmp_path / "selfheal@worker.service.d").mkdir()
    bed.configure(services=SERVICES)
    bed.host.failed(WORKER)
    bed.paths.handed("x").parent.mkdir(parents=True)
    for name in ("worker", "cache"):
        bed.paths.handed(name).write_text("")
    bed.paths.leading.mkdir()
    assert bed.heal("worker")[0] == 0
    assert restarted(bed) == [WORKER]
    assert not bed.paths.leading.exists()
    assert ["systemctl", "start", "--no-block", "selfheal@cache.service"] in bed.host.actions()
    assert not bed.paths.handed("worker").exists() and bed.paths.handed("cache").exists()


def test_a_heal_in_its_own_unit_leaves_the_lead_of_a_heal_that_leads(bed, tmp_path, monkeypatch):
    monkeypatch.setattr(selfheal, "UNIT_DIR", str(tmp_path))
    (tmp_path / "selfheal@worker.service.d").mkdir()
    bed.host.failed(WORKER)
    bed.paths.leading.mkdir(parents=True)
    lock = leader_lock(bed)
    assert lock.acquire()
    try:
        assert bed.heal("worker")[0] == 0
    finally:
        lock.release()
    assert bed.paths.leading.exists()  # another heal leads: its lead is its own to give back


def test_what_is_handed_over_keeps_only_systemds_facts_and_bad_names_are_ignored(bed):
    assert selfheal.hand_over(bed.paths, "worker", {"MONITOR_UNIT": "worker.service", "PATH": "/bin", "HOME": "/"})
    (bed.paths.handed("x").parent / "..bad.json").write_text("{}")
    assert selfheal.take_handed(bed.paths) == {"worker": {"MONITOR_UNIT": "worker.service"}}


def test_an_empty_file_left_by_the_units_exec_condition_is_a_service_handed_over_without_facts(bed):
    bed.paths.handed("worker").parent.mkdir(parents=True)
    bed.paths.handed("worker").write_text("")
    assert selfheal.take_handed(bed.paths) == {"worker": {}}


def test_the_heal_unit_hands_over_and_starts_python_only_for_the_first_trigger(tmp_path):
    text = selfheal.render_unit("selfheal@.service", "/usr/local/lib/selfheal", mkdir="/usr/bin/mkdir")
    conditions = [ln for ln in text.splitlines() if ln.startswith("ExecCondition=")]
    assert conditions == [
        "ExecCondition=+-/usr/bin/mkdir -p /run/selfheal/handed",
        "ExecCondition=+-/usr/bin/touch /run/selfheal/handed/%i.json",
        "ExecCondition=+/usr/bin/mkdir /run/selfheal/leading"]
    paths = selfheal.Paths(run=__import__("pathlib").Path("/run/selfheal"))
    assert str(paths.handed("x")) == "/run/selfheal/handed/x.json"  # where the unit leaves it, the leader looks
    assert str(paths.leading) == "/run/selfheal/leading"
    missing = selfheal.render_unit("selfheal@.service", "/usr/local/lib/selfheal", mkdir=str(tmp_path / "mkdir"))
    assert not [ln for ln in missing.splitlines() if ln.startswith("ExecCondition=")]
    assert "every trigger runs its own heal" in missing


def test_the_leader_removes_the_lead_marker_when_done(bed):
    bed.paths.leading.mkdir(parents=True)  # made by the first trigger's ExecCondition=
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    assert not bed.paths.leading.exists()


def test_the_watch_removes_a_marker_left_by_a_leader_that_died(bed):
    bed.paths.leading.mkdir(parents=True)
    selfheal.clear_stale_lead(bed.paths, __import__("time").time())
    assert bed.paths.leading.exists()  # young: a leader may be starting
    selfheal.clear_stale_lead(bed.paths, __import__("time").time() + selfheal.LEADING_STALE + 1)
    assert not bed.paths.leading.exists()


def test_a_marker_of_a_living_leader_is_kept(bed):
    bed.paths.leading.mkdir(parents=True)
    lock = leader_lock(bed)
    assert lock.acquire()
    try:
        selfheal.clear_stale_lead(bed.paths, __import__("time").time() + selfheal.LEADING_STALE + 1)
    finally:
        lock.release()
    assert bed.paths.leading.exists()


def test_restarts_first_only_for_plain_crashes_with_nothing_to_decide_first(bed):
    services = dict(SERVICES, db={}, queue={})
    bed.configure(services=services)
    bed.host.failed(WORKER)  # SIGKILL: restarted at once
    bed.host.failed(CACHE, result="exit-code", code="1", status="1")  # may be its config: diagnosed first
    bed.host.failed("db.service")
    bed.host.failed("queue.service", result="core-dump", code="3", status="11")
    with selfheal.service_state(bed.paths, "db") as state:  # the breaker is open: its pace decides
        state["escalated"] = 1.0
    batch = {"worker": {}, "cache": {}, "db": {}, "queue": {}}
    assert selfheal.restart_at_once(bed.config, bed.paths, batch) == {"worker", "queue"}
    assert batch["worker"]["MONITOR_SERVICE_RESULT"] == "signal"  # its facts, read before the restart
    assert batch["queue"]["MONITOR_EXIT_STATUS"] == "SEGV"
    assert selfheal.restart_at_once(bed.config, bed.paths, {"worker": {}}) == set()  # one alone: as ever


def burst_of_three(bed):
    for unit in (STORY, WORKER, CACHE):
        bed.host.failed(unit, listen={"port": 5002} if unit == STORY else None)
    for name in ("worker", "cache"):
        assert selfheal.hand_over(bed.paths, name, {})
    assert bed.heal("story-stages")[0] == 0


def test_bursts_that_repeat_are_one_thread_flapping_once_then_quiet(bed):
    """Services crash-looping together: each round a burst, healed every time (no breaker), but
    mailed as an incident of the host: one thread, FLAPPING once at flap_threshold."""
    bed.configure(services=SERVICES, flap_threshold=3)
    for _ in range(5):
        burst_of_three(bed)
    subjects = [str(m["Subject"]) for m in bed.sink.messages]
    assert subjects == ["✅ MiracleMax: burst - RESOLVED (3 services)"] * 2 + [
        "✅ MiracleMax: burst - FLAPPING (RESOLVED (3 services))"], subjects
    first = bed.sink.messages[0]["Message-ID"]
    assert all(m["In-Reply-To"] == first for m in bed.sink.messages[1:])
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED"] * 5  # healed every time
    assert selfheal.heal_attempts(bed.paths, "worker", 0) == []


def test_a_dependent_in_the_same_burst_waits_and_is_healed_in_its_roots_one_report(bed):
    bed.configure(services={"db": {}, "app": {"depends_on": "db"}, "worker": {}})
    for unit in ("db.service", "app.service", WORKER):
        bed.host.failed(unit)
    for name in ("app", "worker"):
        assert selfheal.hand_over(bed.paths, name, {})
    bed.heal("db")
    restarts = [u for c in bed.host.actions() if c[:2] == ["systemctl", "restart"]
                for u in c[2:] if u.endswith(".service")]
    assert restarts.index("db.service") < restarts.index("app.service") and restarts.count("app.service") == 1
    subjects = sorted(str(m["Subject"]) for m in bed.sink.messages)
    assert subjects == ["✅ MiracleMax: db - RESOLVED", "✅ MiracleMax: worker - RESOLVED"], subjects
    db_mail = next(m for m in bed.sink.messages if "db - RESOLVED" in str(m["Subject"]))
    assert "db failed; app failed because of it." in db_mail.get_content()


def test_the_end_of_a_failed_problem_is_mailed_even_in_a_flapping_incident(bed):
    """Bursts made the incident FLAPPING (its heals counted, not mailed one by one); then it
    failed for good and was FAILED; its fix by hand is told, in its thread."""
    bed.configure(services=SERVICES, flap_threshold=2)
    for _ in range(3):
        burst_of_three(bed)
    bed.host.failed(WORKER, on_restart="fail")
    assert bed.heal("worker")[0] == 1
    with bed.host.edit() as state:
        state["units"][WORKER]["on_restart"] = "active"
    assert bed.heal("worker", trigger="manual")[0] == 0
    worker = [str(m["Subject"]) for m in bed.sink.messages if ": worker - " in str(m["Subject"])]
    assert worker[-1] == "✅ MiracleMax: worker - RESOLVED", worker


def test_a_service_whose_breaker_tripped_keeps_its_own_thread_in_a_burst(bed):
    bed.configure(services=SERVICES)
    with selfheal.service_state(bed.paths, "worker") as state:  # ESCALATED earlier; a human was told
        state["escalated"] = 1.0
        state["incident"] = {"opened": 1.0, "failures": [], "message_id": "<esc@x>", "problem": "ESCALATED",
                             "next_retry": 1.0, "breaker_step": 0}
    burst_of_three(bed)
    burst = next(m for m in bed.sink.messages if ": burst - " in str(m["Subject"]))
    assert "RESOLVED (2 services)" in str(burst["Subject"])
    assert not [ln for ln in burst.get_content().splitlines() if ln.startswith("  worker ")]
    (own,) = [m for m in bed.sink.messages if ": worker - " in str(m["Subject"])]
    assert own["In-Reply-To"] == "<esc@x>"  # told once it is back, in its own thread
