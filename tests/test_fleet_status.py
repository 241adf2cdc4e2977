"""deploy/ansible/status.yml without a host: its script (roles/selfheal/files/fleet_status.py)
fed what Ansible registers for `selfheal status --json` on each host, the JSON made by
selfheal's own dashboard_json; then the real playbook against local "hosts" whose selfheal
is a stand-in printing that JSON, one without selfheal and one unreachable. The drill
(test_drill_ansible.py) runs it against booted hosts."""

import base64
import importlib.util
import io
import json
import re
import time

import pytest

import selfheal
from conftest import DEPLOY, REPO, ansible

SCRIPT = DEPLOY / "roles" / "selfheal" / "files" / "fleet_status.py"
_spec = importlib.util.spec_from_file_location("fleet_status", str(SCRIPT))
fleet_status = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fleet_status)

NOW = 1_700_000_000.0


def svc(name, state="active", **kw):
    active = {"paused": "failed", "unhealthy": "active"}.get(state, state)
    return selfheal.ServiceStatus(name, name + ".service", state, active_state=active, **kw)


def heal(name, outcome, ts=NOW - 600):
    return {"ts": ts, "time": selfheal.iso(ts), "service": name, "outcome": outcome, "trigger": "onfailure",
            "healing_seconds": 1.5, "root_cause": "killed"}


def status_json(*services, host="h", mail_queue=0, webhook_queue=0):
    """What `selfheal status --json` prints for these services (selfheal's own dashboard_json)."""
    setup = selfheal.SelfhealSetup("/etc/selfheal/services.conf", True, "active", 30.0, NOW - 10, len(services), 0,
                                   ("owner@example.org",), 3, 3600.0, mail_queue, webhook_queue=webhook_queue)
    board = selfheal.Dashboard("MiracleMax", selfheal.SystemOverview(NOW, host), tuple(services),
                               selfheal.Activity(NOW - 86400, 0, {}, ()), setup)
    return json.dumps(selfheal.dashboard_json(board))


def ran(text, rc=None):
    """Ansible's registered result of the command task that ran status --json."""
    if rc is None:
        rc = 0 if json.loads(text)["healthy"] else 1
    return {"changed": False, "failed": False, "rc": rc, "stdout": text, "stderr": "", "msg": "",
            "cmd": ["/usr/bin/python3", "/usr/local/lib/selfheal/selfheal.py", "status", "--json"]}


def table_row(lines, host, service):
    [row] = [line for line in lines if line.split()[:2] == [host, service]]
    return row


HEALTHY = {
    "web-1": ran(status_json(svc("story-stages", last_heal=heal("story-stages", "RESOLVED")), svc("passgo"))),
    "web-2": ran(status_json(svc("actual-budget"))),
}


def test_a_healthy_fleet_has_one_row_per_service_of_each_host_and_no_problem():
    merged = fleet_status.merge(HEALTHY)
    lines = fleet_status.render(merged)
    assert lines[0].split() == ["HOST", "SERVICE", "STATE", "LAST", "HEAL", "ESCALATED/PAUSED", "QUEUE"]
    assert merged["problems"] == []
    assert list(merged["hosts"]) == ["web-1", "web-2"]
    assert [s["name"] for s in merged["hosts"]["web-1"]["services"]] == ["story-stages", "passgo"]
    row = table_row(lines, "web-1", "story-stages")
    assert row.split()[2] == "active"
    assert "%s RESOLVED" % selfheal.iso(NOW - 600) in row and row.endswith("mail 0, webhook 0")
    assert table_row(lines, "web-1", "passgo").split()[3] == "-"  # never healed
    assert table_row(lines, "web-2", "actual-budget")
    assert "2 host(s), 3 service(s): no problem" in lines


def test_the_columns_line_up():
    lines = fleet_status.render(fleet_status.merge(dict(HEALTHY, **{"a-much-longer-host-name": ran(
        status_json(svc("x", "failed", last_heal=heal("x", "FAILED"))))})))
    table = lines[:5]
    for column in ("SERVICE", "STATE", "LAST HEAL", "ESCALATED/PAUSED", "QUEUE"):
        start = table[0].index(column)
        assert all(line[start - 2:start] == "  " and line[start] != " " for line in table), column


def test_a_failed_service_is_a_problem_named_with_its_host_and_state():
    results = dict(HEALTHY, **{"db-1": ran(status_json(svc("postgres", "failed", last_heal=heal("postgres", "FAILED")),
                                                        svc("redis")))})
    merged = fleet_status.merge(results)
    assert merged["problems"] == [{"host": "db-1", "service": "postgres", "problem": "failed"}]
    lines = fleet_status.render(merged)
    assert "FAILED" in table_row(lines, "db-1", "postgres")
    assert "problem: db-1 postgres: failed" in lines
    assert "3 host(s), 5 service(s): 1 problem(s)" in lines


def test_an_escalated_service_is_a_problem_even_while_it_runs():
    merged = fleet_status.merge({"h": ran(status_json(svc("web", escalated=True)))})
    assert merged["hosts"]["h"]["healthy"] is True  # status itself exits 0 for it
    assert merged["problems"] == [{"host": "h", "service": "web", "problem": "escalated"}]
    assert table_row(fleet_status.render(merged), "h", "web").split()[3:5] == ["-", "escalated"]


def test_a_failed_and_escalated_service_says_both():
    merged = fleet_status.merge({"h": ran(status_json(svc("web", "failed", escalated=True)))})
    assert merged["problems"] == [{"host": "h", "service": "web", "problem": "failed, escalated"}]


def test_a_paused_service_is_shown_and_is_not_a_problem():
    until = NOW + 3600
    merged = fleet_status.merge({"h": ran(status_json(svc("web", "paused", paused_until=0.0),
                                                      svc("api", "paused", paused_until=until)))})
    assert merged["problems"] == []
    lines = fleet_status.render(merged)
    assert table_row(lines, "h", "web").split()[2:5] == ["paused", "-", "paused"]
    assert "paused until %s" % time.strftime("%Y-%m-%d %H:%M", time.localtime(until)) in table_row(lines, "h", "api")
    text = json.loads(status_json(svc("web", "paused", paused_until=0.0)))
    text["services"][0]["paused_until"] = 1e300  # not a time: said as paused, not a crash
    lines = fleet_status.render(fleet_status.merge({"h": ran(json.dumps(text))}))
    assert table_row(lines, "h", "web").split()[4] == "paused"


def test_unknown_queue_lengths_show_as_question_marks():
    lines = fleet_status.render(fleet_status.merge({"h": ran(status_json(svc("web"), mail_queue=None,
                                                                         webhook_queue=None))}))
    assert table_row(lines, "h", "web").endswith("mail ?, webhook ?")
    lines = fleet_status.render(fleet_status.merge({"h": ran(status_json(svc("web"), mail_queue=3,
                                                                         webhook_queue=1))}))
    assert table_row(lines, "h", "web").endswith("mail 3, webhook 1")


NOT_INSTALLED = ("selfheal is not installed here (no /etc/selfheal/services.conf). Install it with: sudo "
                 "./install.sh (from a clone), or: sudo python3 selfheal.py install --config services.conf")
HOST_ERRORS = {
    "unreachable": ({"unreachable": True, "changed": False, "msg": "Failed to connect to the host via ssh: "
                     "ssh: connect to host h port 22: No route to host\r\nmore"},
                    "unreachable", "Failed to connect to the host via ssh"),
    "program-missing": ({"rc": 2, "stdout": "", "stderr": "/usr/bin/python3: can't open file "
                         "'/usr/local/lib/selfheal/selfheal.py': [Errno 2] No such file or directory"},
                        "not installed", "can't open file"),
    "config-missing": ({"rc": 2, "stdout": "", "stderr": NOT_INSTALLED}, "not installed", "no /etc/selfheal"),
    "bad-config": ({"rc": 2, "stdout": "", "stderr": "services.conf:4 [web] port: not a number\n"
                    "1 problem(s) in the config; the dashboard needs one that loads."}, "error", "services.conf:4"),
    "python-missing": ({"rc": 2, "stdout": "", "stderr": "", "msg": "[Errno 2] No such file or directory: "
                        "b'/usr/bin/python3'"}, "error", "No such file"),
    "traceback": ({"rc": 1, "stdout": "", "stderr": "Traceback (most recent call last):\n  ..."},
                  "unreadable", "status --json"),
    "not-an-object": ({"rc": 0, "stdout": "[1, 2]", "stderr": ""}, "unreadable", "not a status object"),
    "newer-shape": ({"rc": 0, "stdout": json.dumps({"version": 2, "services": []}), "stderr": ""},
                    "unreadable", "version 2 (this reads version 1)"),
    "no-result": ({}, "no result", "failed before"),
    "killed": ({"rc": -9, "stdout": "", "stderr": ""}, "error", "exited -9"),
}


@pytest.mark.parametrize("case", sorted(HOST_ERRORS))
def test_a_host_without_an_answer_is_a_problem_row_not_a_missing_host(case):
    result, kind, detail = HOST_ERRORS[case]
    merged = fleet_status.merge(dict(HEALTHY, h=result))
    entry = merged["hosts"]["h"]
    assert entry["error"] == kind and detail in entry["detail"] and "\n" not in entry["detail"]
    [problem] = merged["problems"]
    assert problem["host"] == "h" and problem["service"] is None and problem["problem"].startswith(kind + ": ")
    lines = fleet_status.render(merged)
    assert table_row(lines, "h", "-").split()[2:] == kind.split() + ["-", "-", "-"]
    assert "3 host(s), 3 service(s): 1 problem(s)" in lines  # the others are still counted


def test_exit_1_without_a_service_with_a_problem_is_still_a_problem_of_the_host():
    text = json.loads(status_json(svc("web")))
    text["healthy"] = False
    merged = fleet_status.merge({"h": ran(json.dumps(text))})
    assert merged["problems"] == [{"host": "h", "service": None, "problem": "selfheal status says unhealthy"}]


def test_text_from_a_host_cannot_break_the_table():
    merged = fleet_status.merge({"h\x1b[2J": {"rc": 2, "stdout": "", "stderr": "x" * 5000 + "\x07"}})
    lines = fleet_status.render(merged)
    assert all("\x1b" not in line and "\x07" not in line for line in lines)
    assert len(merged["hosts"]["h\x1b[2J"]["detail"]) == fleet_status.DETAIL_MAX
    assert merged["problems"][0]["host"] == "h\x1b[2J"  # the inventory name, as Ansible matches it


def test_a_host_with_no_services_listed_has_a_row_and_no_problem():
    merged = fleet_status.merge({"h": ran(status_json())})
    assert merged["problems"] == []
    assert table_row(fleet_status.render(merged), "h", "-").split()[2:4] == ["no", "services"]


# -- the script as the playbook runs it --------------------------------------------------


def run_main(monkeypatch, capsys, stdin, *argv):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = fleet_status.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("encode", [lambda text: base64.b64encode(text.encode()).decode(), lambda text: text],
                         ids=["base64", "plain"])
def test_main_writes_the_merged_file_and_prints_the_table_and_the_problems_by_host(tmp_path, monkeypatch, capsys,
                                                                                  encode):
    results = dict(HEALTHY, **{"db-1": ran(status_json(svc("postgres", "failed")))})
    out_path = tmp_path / "fleet.json"
    code, out, err = run_main(monkeypatch, capsys, encode(json.dumps(results)), "--out", str(out_path))
    assert (code, err) == (0, "")
    printed = json.loads(out)
    merged = json.loads(out_path.read_text())
    assert merged == fleet_status.merge(results)
    assert set(merged) == {"version", "hosts", "problems"} and merged["version"] == 1
    assert merged["hosts"]["web-2"] == json.loads(HEALTHY["web-2"]["stdout"])  # each host's own object
    assert printed["problems_by_host"] == {"db-1": ["postgres: failed"]}
    assert printed["out"] == str(out_path)
    assert printed["table"] == fleet_status.render(merged) + ["merged JSON: %s" % out_path]
    assert not list(tmp_path.glob("*.partial"))


def test_main_exits_1_when_the_file_cannot_be_written_or_the_input_is_not_an_object(tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, json.dumps(HEALTHY), "--out", str(tmp_path / "no" / "f.json"))
    assert (code, out) == (1, "") and "fleet_status: " in err
    code, out, err = run_main(monkeypatch, capsys, base64.b64encode(b"[]").decode(), "--out", str(tmp_path / "f.json"))
    assert (code, out) == (1, "") and "expected a JSON object" in err
    code, out, err = run_main(monkeypatch, capsys, "[not base64]", "--out", str(tmp_path / "f.json"))
    assert (code, out) == (1, "") and "fleet_status: " in err
    assert not (tmp_path / "f.json").exists()


# -- the real playbook, against local "hosts" ----------------------------------------


def fake_selfheal(prefix, text, rc):
    """PREFIX/lib/selfheal/selfheal.py that prints `text` and exits `rc`, as status --json."""
    lib = prefix / "lib" / "selfheal"
    lib.mkdir(parents=True)
    (lib / "status.json").write_text(text)
    (lib / "selfheal.py").write_text("import pathlib, sys\nassert sys.argv[1:] == ['status', '--json'], sys.argv\n"
                                     "print(pathlib.Path(__file__).with_name('status.json').read_text())\n"
                                     "sys.exit(%d)\n" % rc)
    return str(prefix)


def local_host(prefix):
    return {"ansible_connection": "local", "ansible_become": False, "ansible_python_interpreter": "/usr/bin/python3",
            "selfheal_prefix": prefix}


def run_status(tmp_path, hosts):
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"selfheal": {"hosts": hosts}}))
    out = tmp_path / "fleet.json"
    plugins = str(REPO / "tests" / "ansible" / "connection_plugins")  # nsenter: the unreachable host
    done = ansible("ansible-playbook", "-i", inventory, "status.yml", "-e", "selfheal_status_file=%s" % out,
                   tmp_path=tmp_path, env_more={"ANSIBLE_CONNECTION_PLUGINS": plugins})
    return done, done.stdout + done.stderr, json.loads(out.read_text()) if out.exists() else None


def test_playbook_on_a_healthy_fleet_prints_every_service_writes_the_file_and_exits_0(tmp_path):
    hosts = {name: local_host(fake_selfheal(tmp_path / name, result["stdout"], 0)) for name, result in HEALTHY.items()}
    done, output, merged = run_status(tmp_path, hosts)
    assert done.returncode == 0, output
    assert merged == fleet_status.merge(HEALTHY)
    for name, result in HEALTHY.items():
        for service in json.loads(result["stdout"])["services"]:
            assert '"%s' % name in output and service["name"] in output
    assert output.count('"HOST  ') == 1  # the table, printed once
    assert "no problem" in output and "changed=1" not in output


def test_playbook_names_each_problem_and_exits_non_zero_after_printing_and_writing(tmp_path):
    failing = status_json(svc("postgres", "failed", last_heal=heal("postgres", "FAILED")), svc("redis"))
    hosts = {
        "web-1": local_host(fake_selfheal(tmp_path / "web-1", HEALTHY["web-1"]["stdout"], 0)),
        "db-1": local_host(fake_selfheal(tmp_path / "db-1", failing, 1)),  # status exits 1: read all the same
        "bare": local_host(str(tmp_path / "nothing-here")),
        "gone": {"ansible_connection": "nsenter", "ansible_nsenter_pid": 2 ** 30, "ansible_become": False},
    }
    done, output, merged = run_status(tmp_path, hosts)
    assert done.returncode == 2, output
    assert list(merged["hosts"]) == ["web-1", "db-1", "bare", "gone"]
    assert merged["problems"] == [
        {"host": "db-1", "service": "postgres", "problem": "failed"},
        {"host": "bare", "service": None, "problem": merged["problems"][1]["problem"]},
        {"host": "gone", "service": None, "problem": merged["problems"][2]["problem"]},
    ]
    assert merged["problems"][1]["problem"].startswith("not installed: ")
    # ansible-core 2.19 (Debian 13) puts "Task failed: " before the connection's own words
    assert re.match(r"unreachable: (Task failed: )?nsenter: no process", merged["problems"][2]["problem"])
    assert "problem: db-1 postgres: failed" in output and "4 host(s), 4 service(s): 3 problem(s)" in output
    table, failures = output.split("TASK [selfheal : Fail each host")
    assert "merged JSON: %s" % (tmp_path / "fleet.json") in table
    for name in ("db-1", "bare", "gone"):
        assert "fatal: [%s]: FAILED!" % name in failures
    assert "fatal: [web-1]" not in failures and "skipping: [web-1]" in failures
