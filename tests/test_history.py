"""Bounded state (fast layer): the history is rotated at its bound, what the hot paths need
of it (a service's last event, its recent heals for failure_threshold) is kept per service
in a summary written with each event, and a window is read from the end of the history, not
from its start. On a real systemd with a year of history: tests/bench_loaded.py."""

import json
import os
import time

import pytest

import selfheal

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

WORKER = "worker.service"


@pytest.fixture
def paths(tmp_path):
    return selfheal.Paths(tmp_path / "state", tmp_path / "run", tmp_path / "log")


def event(ts, outcome="RESOLVED", service="worker", trigger="onfailure", **more):
    return dict({"ts": ts, "time": selfheal.iso(ts), "service": service, "outcome": outcome, "trigger": trigger},
                **more)


def test_the_history_is_rotated_at_its_bound_and_the_summary_keeps_what_heals_need(paths, monkeypatch):
    monkeypatch.setattr(selfheal, "HISTORY_ROTATE_BYTES", 4000)
    now = time.time()
    for i in range(400):  # about 40 kB of events: ten times the bound
        selfheal.record_event(paths, event(now - 4000 + i * 10, "RECOVERED" if i % 4 else "RESOLVED"))
    files = [p for p in selfheal.history_files(paths) if p.exists()]
    assert len(files) == selfheal.HISTORY_KEEP + 1
    assert sum(p.stat().st_size for p in files) <= 4000 * (selfheal.HISTORY_KEEP + 1) + 200
    summary = json.loads(paths.summary("worker").read_text())
    assert summary["counts"] == {"RESOLVED": 100, "RECOVERED": 300}  # every event, though most lines are gone
    assert summary["last"]["ts"] == now - 4000 + 399 * 10
    assert selfheal.heal_attempts(paths, "worker", now - 1000) == [now - 4000 + i * 10 for i in range(300, 400, 4)]
    assert selfheal.last_event(paths, "worker")["outcome"] == "RECOVERED"


def test_heals_asked_for_by_hand_and_recoveries_are_not_attempts(paths):
    now = time.time()
    selfheal.record_event(paths, event(now - 30, "RESOLVED", trigger=selfheal.MANUAL_TRIGGER))
    selfheal.record_event(paths, event(now - 20, "RECOVERED"))
    selfheal.record_event(paths, event(now - 10, "FAILED"))
    assert selfheal.heal_attempts(paths, "worker", 0) == [now - 10]


def test_failure_threshold_holds_after_the_lines_of_the_heals_were_rotated_away(bed, monkeypatch):
    monkeypatch.setattr(selfheal, "HISTORY_ROTATE_BYTES", 300)
    monkeypatch.setattr(selfheal, "HISTORY_KEEP", 1)
    now = time.time()
    for i in range(3):  # failure_threshold = 3 in the heal config
        selfheal.record_event(bed.paths, event(now - 60 + i, "RESOLVED"))
    for i in range(20):  # another service's events push the worker's lines out of the history
        selfheal.record_event(bed.paths, event(now - 30 + i, "RECOVERED", service="story-stages"))
    assert selfheal.read_history(bed.paths, "worker") == []
    bed.host.failed(WORKER)
    bed.heal("worker")
    assert selfheal.last_event(bed.paths, "worker")["outcome"] == "ESCALATED"
    assert bed.host.actions() == []


def test_a_history_an_older_selfheal_wrote_gives_the_summary_once_without_counting_twice(paths):
    now = time.time()
    paths.state.mkdir(parents=True)
    paths.history.write_text("".join(json.dumps(event(now - 100 + i, "FAILED")) + "\n" for i in range(2)))
    selfheal.record_event(paths, event(now, "RESOLVED"))
    summary = json.loads(paths.summary("worker").read_text())
    assert summary["counts"] == {"FAILED": 2, "RESOLVED": 1}
    assert summary["attempts"] == [now - 100, now - 99, now]


def test_a_window_is_read_from_the_end_of_the_history_not_from_its_start(paths, monkeypatch):
    now = time.time()
    paths.state.mkdir(parents=True)
    old = "".join(json.dumps(event(now - 400 * 86400 + i * 30, "RECOVERED")) + "\n" for i in range(50000))
    recent = "".join(json.dumps(event(now - 3600 + i, "RESOLVED")) + "\n" for i in range(5))
    paths.history.write_text(old + recent)
    read = []
    real_pread = os.pread

    def pread(fd, size, offset):
        read.append(size)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(selfheal.os, "pread", pread)
    events, damaged = selfheal.scan_history(paths, since=now - 86400)
    assert [e["outcome"] for e in events] == ["RESOLVED"] * 5 and damaged == 0
    assert sum(read) <= 2 * selfheal.HISTORY_CHUNK, "read %d bytes of %d" % (sum(read), len(old))


def test_the_service_log_is_rotated_with_one_older_file_kept(bed, monkeypatch):
    monkeypatch.setattr(selfheal, "SERVICE_LOG_ROTATE_BYTES", 500)
    for _ in range(3):
        bed.host.failed(WORKER)
        assert bed.heal("worker")[0] == 0
    log = bed.paths.service_log("worker")
    assert log.exists() and log.with_name(log.name + ".1").exists()
    assert not log.with_name(log.name + ".2").exists()
    assert "RESOLVED" in log.read_text()


def test_a_damaged_summary_is_made_again_from_the_history(paths):
    now = time.time()
    selfheal.record_event(paths, event(now - 10, "FAILED"))
    paths.summary("worker").write_text("{not json")
    selfheal.record_event(paths, event(now, "RESOLVED"))
    assert json.loads(paths.summary("worker").read_text())["counts"] == {"FAILED": 1, "RESOLVED": 1}


def test_a_history_an_older_selfheal_let_grow_is_cut_to_the_bound_at_the_first_rotation(paths, monkeypatch):
    monkeypatch.setattr(selfheal, "HISTORY_ROTATE_BYTES", 10000)
    now = time.time()
    paths.state.mkdir(parents=True)
    lines = [json.dumps(event(now - 100000 + i, "RECOVERED")) + "\n" for i in range(5000)]  # ~0.5 MB
    paths.history.write_text("".join(lines))
    selfheal.record_event(paths, event(now, "RESOLVED"))
    kept = paths.history.with_name("history.jsonl.1")
    assert 9000 < kept.stat().st_size <= 10000
    assert kept.read_text().endswith(json.dumps(event(now, "RESOLVED"), sort_keys=True) + "\n")
    events = selfheal.read_history(paths)
    assert events[-1]["outcome"] == "RESOLVED" and len(events) > 50  # whole lines, the newest kept
    assert not paths.history.exists() or paths.history.stat().st_size == 0
