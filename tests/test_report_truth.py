"""Report truth (fast layer): every fact a mail states is true of the run it names, times
count from the failure (or the watch's first failed look, said as such) and are never
negative, and every command a mail tells the owner to run exists once installed."""

import json
import re
import time

import pytest

import selfheal
from conftest import FINE, HANG, HEALTH, OTHER_RUN, STORY, WORKER, running

ISO = "%Y-%m-%dT%H:%M:%S%z"


def journal_at(seconds_ago, unit="worker.service", pid=4100):
    t = time.strftime(ISO, time.localtime(time.time() - seconds_ago))
    return [
        "%s vm worker[%d]: processing batch 17" % (t, pid),
        "%s vm systemd[1]: %s: Main process exited, code=killed, status=9/KILL" % (t, unit),
        "%s vm systemd[1]: %s: Failed with result 'signal'." % (t, unit),
    ]


def test_recovered_by_systemd_names_the_crashed_run_not_the_new_pid_and_counts_from_the_crash(wb, section):
    running(wb.host, WORKER, NRestarts="2", MainPID="4100")
    wb.clock.advance(-30)
    wb.look("worker")  # healthy 30 s ago
    wb.clock.advance(30)
    running(wb.host, WORKER, invocation=OTHER_RUN, NRestarts="3", MainPID="5200", ExecMainPID="5200")
    wb.host.journal(journal_at(3))
    assert wb.look("worker") == "restarted"
    assert wb.heal("worker")[0] == selfheal.EX_OK
    body = wb.sink.messages[0].get_content()
    diagnosis = section(body, "DIAGNOSIS")
    assert "Crashed run: main process killed KILL (from the journal); the new run's main pid is 5200" in diagnosis
    assert "Main process: 5200" not in body
    seconds = float(re.search(r"([\d.]+) s from failure to verified healthy", section(body, "HEALING TIME")).group(1))
    assert 2.0 <= seconds < 30, section(body, "HEALING TIME")  # the crash was 3 s ago (the journal's second)


def test_recovered_by_systemd_with_a_port_never_says_nobody_listens(wb, section):
    wb.configure(worker={"port": 5011})
    running(wb.host, WORKER, NRestarts="2")
    wb.host.listen(5011)
    wb.look("worker")
    running(wb.host, WORKER, invocation=OTHER_RUN, NRestarts="3")
    wb.host.journal(journal_at(2))
    assert wb.look("worker") == "restarted"
    wb.heal("worker")
    assert "nobody listening" not in wb.sink.messages[0].get_content()


def test_hang_found_by_the_watch_counts_healing_time_from_its_first_failed_look(wb, section):
    running(wb.host, STORY, listen={"port": 5002})
    wb.host.listen(5002)
    wb.health.answers[HEALTH] = lambda: selfheal_fine(wb)
    wb.look("story-stages", HANG)
    wb.clock.advance(65)
    wb.look("story-stages", HANG)
    assert wb.heal("story-stages")[0] == selfheal.EX_OK
    body = wb.sink.messages[0].get_content()
    assert "First failed look by the watch:" in section(body, "DIAGNOSIS")
    healing = section(body, "HEALING TIME")
    assert "from the watch's first failed look to verified healthy" in healing
    assert re.search(r"1 min 5|65", healing), healing


def selfheal_fine(wb):
    return FINE if wb.host.load()["units"][STORY].get("restarts") else HANG


def test_failed_unit_is_failed_since_it_failed_not_since_its_last_start(wb, section):
    wb.host.failed(WORKER, on_restart="fail", ActiveEnterTimestamp="Mon 2026-11-30 09:00:00 UTC",
                   InactiveEnterTimestamp="Mon 2026-11-30 12:00:00 UTC")
    wb.heal("worker")
    status = section(wb.sink.messages[0].get_content(), "POST-HEALING STATUS")
    assert "Since:   Mon 2026-11-30 09:00:00 UTC" not in status, status


def test_failed_heal_names_who_holds_the_port_at_the_end(wb, section):
    wb.host.failed(STORY, on_restart="fail")
    wb.host.listen(5002, pid=4242, cgroup="/system.slice/other-app.service", cmdline="python3 -m http.server 5002")
    wb.heal("story-stages")
    status = section(wb.sink.messages[-1].get_content(), "POST-HEALING STATUS")
    assert "Port:    5002 held by pid 4242" in status and "other-app.service" in status, status


def test_every_command_a_mail_names_is_the_installed_selfheal_not_selfheal_py(wb):
    wb.configure(failure_threshold=1)
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")                      # FAILED: manual steps
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")                      # ESCALATED
    texts = [m.get_content() for m in wb.sink.messages]
    assert texts and all("selfheal.py" not in t for t in texts), texts
    assert any("selfheal resume worker" in t for t in texts)


def test_a_directory_db_path_is_never_called_ok_data(bed_dir):
    bed, path = bed_dir
    assert bed.heal("pg")[0] == 0
    body = bed.sink.messages[0].get_content()
    assert "data ok" not in body
    assert "owner, mode and free space only" in body


@pytest.fixture
def bed_dir(bed, tmp_path):
    data = tmp_path / "pgdata"
    data.mkdir()
    with open(bed.config_path, "a", encoding="utf-8") as handle:
        handle.write("\n[pg]\nstrategies = database_check, service_restart\ndb_path = %s\n" % data)
    bed.config = selfheal.load_config(bed.config_path, trusted=False)
    bed.host.failed("pg.service")
    return bed, data


def test_was_down_is_never_negative_when_the_heal_began_after_the_watch_run(wb):
    """The watch run's `now` is its start; a FAILED heal that opened the problem may be later."""
    wb.host.failed(WORKER, on_restart="fail")
    wb.heal("worker")  # FAILED: a problem in the incident
    state = json.loads(wb.paths.service_state("worker").read_text())
    watch_began = float(state["incident"]["problem_since"]) - 3.36
    running(wb.host, WORKER, invocation=OTHER_RUN)
    selfheal.incident_healthy(wb.config, wb.paths, wb.config.services["worker"], watch_began)
    subject = str(wb.sink.messages[-1]["Subject"])
    assert "RESOLVED (was down" in subject and "-" not in subject.split("was down")[1], subject
