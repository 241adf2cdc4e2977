"""Drill for miraclemax-status on a real systemd: the four MiracleMax services as stand-ins on
their ports, one healed after a SIGKILL, one failed for good (its binary is gone), one paused
for maintenance. The dashboard must say what systemctl, /proc and statvfs say, in text and in
the documented JSON shape, as root and as a user without root."""

import json
import time

import pytest

from drillkit import drill_conf
from drillkit import queued_for
from drillkit import drill_suites, REPO_INSIDE, history, installed_host, show, wait_idle, web_unit
from statuskit import check_shape

pytestmark = pytest.mark.drill

PASSGO = "/opt/passgo/passgo"  # deleted by the fixture: its restarts then fail with 203/EXEC
UNITS = {
    "story-stages.service": web_unit(5002),
    "passgo.service": ("[Unit]\nDescription=passgo stand-in\n[Service]\nExecStart=%s 5001\n"
                       "[Install]\nWantedBy=multi-user.target\n" % PASSGO),
    "traefik.service": web_unit(80),
    "actual-budget.service": web_unit(5006),
}
NAMES = ["story-stages", "passgo", "traefik", "actual-budget"]

CONFIG = drill_conf({"verify_timeout": "10s"}, {
    "story-stages": {"port": 5002, "domain": "books.jbyrd.org", "critical": "yes"},
    "passgo": {"port": 5001, "domain": "passgo.jbyrd.org", "critical": "yes"},
    "traefik": {"port": 80, "domain": "jbyrd.org", "critical": "yes"},
    "actual-budget": {"port": 5006, "domain": "budget.jbyrd.org"},
})


def wait_for_heal(box, name, outcome, timeout=60):
    deadline = time.monotonic() + timeout
    while not any(e["outcome"] == outcome for e in history(box, name)):
        assert time.monotonic() < deadline, "no %s heal of %s: %s" % (outcome, name, history(box))
        time.sleep(0.1)
    wait_idle(box, name)


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)

    def prepare_box(box):
        box.run(["install", "-D", "-m", "0755", REPO_INSIDE + "/tests/standin.py", PASSGO])

    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=["%s.service" % n for n in NAMES],
                        ports=(5002, 5001, 80, 5006), prepare=prepare_box) as box:
        box.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "story-stages"])  # a crash, healed
        wait_for_heal(box, "story-stages", "RESOLVED")
        box.wait_listening(5002)
        box.run(["rm", PASSGO])  # a crash that cannot be healed
        box.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "passgo"])
        wait_for_heal(box, "passgo", "FAILED")
        box.run(["selfheal", "pause", "traefik"])  # maintenance
        box.run(["systemctl", "stop", "traefik"])
        yield box


def status(box, *args, user=None, env=()):
    argv = ["runuser", "-u", user, "--"] if user else []
    return box.run(["env", *env] + argv + ["miraclemax-status", *args], check=False, timeout=60)


def rows(text):
    """{service: (state word, the note lines under it)} from the SERVICE HEALTH section."""
    found, current = {}, None
    for line in text.split("SERVICE HEALTH")[1].split("SUMMARY")[0].splitlines()[1:]:
        words = line.split()
        if not words:
            continue
        if words[0] in ("↳", "->"):
            found[current][1].append(line.strip())
            continue
        named = [n for n in NAMES if n in words]
        if named:  # (not the icon of the next heading)
            current = named[0]
            found[current] = (words[words.index(current) + 1], [])
    return found


def test_dashboard_shows_the_true_state_of_each_service_and_exits_1_while_one_is_failed(host):
    done = status(host)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    text = done.stdout
    systemd = {name: show(host, name, "ActiveState") for name in NAMES}
    assert systemd == {"story-stages": "active", "passgo": "failed", "traefik": "inactive",
                       "actual-budget": "active"}
    found = rows(text)
    assert {name: found[name][0] for name in NAMES} == {
        "story-stages": "ACTIVE", "passgo": "FAILED", "traefik": "PAUSED", "actual-budget": "ACTIVE"}
    assert any(n.startswith("↳ Last healing: ") and " - RESOLVED" in n for n in found["story-stages"][1]), found
    assert "↳ Last healing: " in "\n".join(found["passgo"][1]) and " - FAILED" in "\n".join(found["passgo"][1])
    assert found["traefik"][1] == ["↳ Paused until resumed (sudo selfheal resume traefik); systemd says inactive (dead)"]
    assert "4 services: 2 running, 1 failed, 0 inactive, 1 paused" in text
    assert "2 heals in the last 24 h" in text
    assert "✅ ENABLED: units installed, selfheal-watch.timer active" in text
    assert "4 monitored, 3 critical" in text and "hook" not in text
    assert "Owner mail    root@localhost" in text
    assert "host miraclemax" in text.splitlines()[1]
    for title in ("SYSTEM OVERVIEW", "SERVICE HEALTH", "SUMMARY", "RECENT SELF-HEALING ACTIVITY",
                  "SELF-HEALING CONFIGURATION"):
        assert title in text


PROBE = """\
import json, os, socket
st = os.statvfs("/")
mem = dict((l.split(":")[0], int(l.split()[1]) * 1024) for l in open("/proc/meminfo") if l.split()[1:2] and l.split()[1].isdigit())
print(json.dumps({"uptime": float(open("/proc/uptime").read().split()[0]),
                  "load": [float(x) for x in open("/proc/loadavg").read().split()[:3]],
                  "cpus": os.cpu_count(), "host": socket.gethostname(),
                  "mem_total": mem["MemTotal"], "mem_available": mem["MemAvailable"],
                  "disk_total": st.f_blocks * st.f_frsize, "disk_used": (st.f_blocks - st.f_bfree) * st.f_frsize,
                  "disk_available": st.f_bavail * st.f_frsize}))
"""


def test_json_has_the_documented_shape_and_the_values_of_proc_statvfs_and_systemctl(host):
    done = status(host, "--json")
    truth = json.loads(host.run(["python3", "-c", PROBE]).stdout)
    assert done.returncode == 1, done.stderr
    data = json.loads(done.stdout)
    check_shape(data)
    system = data["system"]
    assert (data["host"], system["cpus"]) == (truth["host"], truth["cpus"])
    assert abs(system["uptime_seconds"] - truth["uptime"]) < 5
    assert all(abs(a - b) < 1.0 for a, b in zip(system["load"], truth["load"]))
    memory = system["memory"]
    assert memory["total_bytes"] == truth["mem_total"]
    assert abs(memory["available_bytes"] - truth["mem_available"]) < 64 * 2 ** 20
    assert memory["used_bytes"] == memory["total_bytes"] - memory["available_bytes"]
    [root] = system["disks"]
    assert (root["path"], root["mount"], root["total_bytes"]) == ("/", "/", truth["disk_total"])
    assert abs(root["used_bytes"] - truth["disk_used"]) < 64 * 2 ** 20
    assert abs(root["available_bytes"] - truth["disk_available"]) < 64 * 2 ** 20

    services = {s["name"]: s for s in data["services"]}
    for name in NAMES:
        s = services[name]
        assert (s["active_state"], s["sub_state"]) == (show(host, name, "ActiveState"), show(host, name, "SubState"))
        assert s["hooked"] is True  # the drop-in is in effect: systemd names selfheal@NAME.service
    assert [services[n]["state"] for n in NAMES] == ["active", "failed", "paused", "active"]
    assert (services["story-stages"]["listening"], services["actual-budget"]["listening"]) == (True, True)
    assert services["passgo"]["result"] == show(host, "passgo", "Result")
    assert services["traefik"]["paused"] is True and services["traefik"]["paused_until"] is None

    events = history(host)
    assert services["story-stages"]["last_outcome"] == "RESOLVED"
    assert services["passgo"]["last_outcome"] == "FAILED"
    assert data["activity"]["count"] == len(events)
    assert [(e["service"], e["outcome"]) for e in data["activity"]["events"]] == [
        (e["service"], e["outcome"]) for e in reversed(events)]
    assert data["summary"] == {"total": 4, "running": 2, "failed": 1, "inactive": 0, "activating": 0,
                               "paused": 1, "unhealthy": 0, "missing": 0, "unknown": 0}
    conf = data["config"]
    spool = len(queued_for(host, "mail"))
    assert (conf["enabled"], conf["units_installed"], conf["timer"]) == (
        True, True, host.run(["systemctl", "is-active", "selfheal-watch.timer"], check=False).stdout.strip())
    assert (conf["services_monitored"], conf["critical"], conf["email_to"], conf["failure_threshold"],
            conf["failure_window_seconds"], conf["mail_queue"]) == (4, 3, ["root@localhost"], 3, 3600.0, int(spool))


def test_without_root_the_dashboard_works_and_root_only_facts_are_unknown(host):
    as_root = json.loads(status(host, "--json").stdout)
    done = status(host, "--json", user="nobody")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    data = json.loads(done.stdout)
    check_shape(data)
    assert [s["state"] for s in data["services"]] == [s["state"] for s in as_root["services"]]
    assert data["activity"]["count"] == as_root["activity"]["count"]  # the history is readable by all
    assert data["config"]["mail_queue"] is None  # the spool is root's (0700)
    assert data["config"]["mail_queue_error"] == "not readable without root"
    text = status(host, user="nobody")
    assert text.returncode == 1 and "Mail queue    unknown (not readable without root)" in text.stdout


def test_ascii_under_a_c_locale_and_colour_never_in_a_pipe(host):
    done = status(host, env=["LANG=C"])
    assert done.returncode == 1
    assert done.stdout.isascii() and "\033[" not in done.stdout
    assert "[FAIL] passgo" in done.stdout and "[PAUS] traefik" in done.stdout


def test_service_option_and_since(host):
    assert status(host, "--service", "story-stages").returncode == 0
    one = json.loads(status(host, "--service", "passgo", "--json").stdout)
    assert [s["name"] for s in one["services"]] == ["passgo"] and one["activity"]["count"] == 1
    assert status(host, "--service", "nope").returncode == 2
    week = json.loads(status(host, "--since", "7d", "--json").stdout)
    assert week["activity"]["count"] == len(history(host))


def test_watch_redraws_until_interrupted_and_exits_0(host):
    done = host.run(["timeout", "--preserve-status", "-s", "INT", "2.5", "miraclemax-status", "--watch", "1"],
                    check=False, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("SERVICE HEALTH") >= 2 and "Ctrl-C to quit" in done.stdout


def test_all_healthy_again_exits_0(host):
    host.run(["install", "-D", "-m", "0755", REPO_INSIDE + "/tests/standin.py", PASSGO])
    host.run(["systemctl", "start", "passgo"])
    host.run(["selfheal", "resume", "traefik"])
    host.run(["systemctl", "start", "traefik"])
    host.wait_listening(5001)
    host.wait_listening(80)
    done = status(host)
    assert done.returncode == 0, done.stdout
    assert "4 services: 4 running, 0 failed, 0 inactive\n" in done.stdout
