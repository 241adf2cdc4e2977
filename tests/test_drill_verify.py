"""Drills on a real systemd (issue: verification counted someone else's listener as the
service's). A port held by another unit's process is not the restarted service: the new run
fails on bind, so the heal must say FAILED and name the holder, and never touch it.

One container for the module, selfheal installed with ./install.sh as the README says.
"""

import json
import time

import pytest

from drillkit import drill_conf
from drillkit import (STANDIN, about, body, clear_mailbox, drill_suites, history, http_get, installed_host,
                      mails_about, show, starts, wait_idle, wait_past_start_grace)

pytestmark = pytest.mark.drill

UNITS = {
    # Not started at boot: a drill starts it while another unit holds its port.
    "taken.service": """\
[Unit]
Description=stand-in whose port another unit takes
[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/standin 5006
""",
    # KillMode=process: when the main process dies its forked child keeps the port.
    "leftover.service": """\
[Unit]
Description=stand-in whose child outlives it and keeps the port
[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/standin 5008 --fork-child
KillMode=process
[Install]
WantedBy=multi-user.target
""",
    # Active, but never binds its port: whoever listens there is someone else.
    "deaf.service": """\
[Unit]
Description=stand-in that never opens its port
[Service]
ExecStart=/bin/sleep infinity
""",
    # A container's stand-in: the app runs here, but another unit publishes its port (as
    # docker-proxy of docker.service does for `docker run -p`).
    "published.service": """\
[Unit]
Description=stand-in whose port another unit publishes
[Service]
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
""",
    "publisher.service": """\
[Unit]
Description=stand-in of docker-proxy for published.service
[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/standin 5010
[Install]
WantedBy=multi-user.target
""",
    "mine.service": """\
[Unit]
Description=stand-in that keeps its own port
[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/standin 5007
[Install]
WantedBy=multi-user.target
""",
}

CONFIG = drill_conf({"smtp_timeout": "3s", "verify_timeout": "10s"}, {
    # started (and broken) by a drill on purpose: the watch must not start it first
    "taken": {"port": 5006, "strategies": "service_restart", "health_url": "http://127.0.0.1:5006/health",
              "on_stopped": "ignore"},
    "leftover": {"port": 5008, "strategies": "service_restart"},
    "deaf": {"port": 5009, "health_url": "http://127.0.0.1:5009/health", "on_stopped": "ignore"},
    "published": {"port": 5010, "port_owner": "any", "health_url": "http://127.0.0.1:5010/health"},
    "mine": {"port": 5007, "strategies": "service_restart", "health_url": "http://127.0.0.1:5007/health"},
})


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("mine", "leftover", "published", "publisher"),
                        ports=(5007, 5008, 5010)) as box:
        yield box


def test_restart_whose_port_another_unit_holds_is_failed_not_resolved_and_the_holder_lives(host):
    clear_mailbox(host)
    host.run(["systemd-run", "--unit=squatter", "/usr/bin/python3", STANDIN, "5006"])
    try:
        host.wait_listening(5006)
        squatter = show(host, "squatter", "MainPID")
        host.run(["systemctl", "start", "taken"], check=False)  # active, then fails on bind
        [mail] = host.wait_mail(about("taken", "FAILED"), timeout=30)
        wait_idle(host, "taken")
        text = body(mail)
        # no restart while another unit's process holds the port; the report names the holder:
        # pid, cgroup (its unit) and command
        assert "It cannot start: port 5006 is held by another process: pid %s (user root, cgroup " \
               "/system.slice/squatter.service" % squatter in text
        assert "selfheal restarted nothing" in text
        assert "set port_owner = any in [taken]" in text  # the way out when that is its proxy
        assert "health: " not in text  # its HTTP 200 would have been the squatter's
        time.sleep(2)  # room for a heal of the failed restart to report, had it been fooled
        subjects = [str(m["Subject"]) for m in mails_about(host, "taken")]
        assert subjects and not [s for s in subjects if "RESOLVED" in s], subjects
        assert "RESOLVED" not in [e["outcome"] for e in history(host, "taken")]
        assert show(host, "squatter", "ActiveState") == "active"
        assert show(host, "squatter", "MainPID") == squatter  # never killed
        assert http_get(host, 5006) == "200"  # still the squatter answering
    finally:
        host.run(["systemctl", "stop", "squatter"], check=False)


def test_restart_while_a_leftover_child_of_the_service_holds_its_port_is_failed_naming_it(host):
    clear_mailbox(host)
    main_pid = show(host, "leftover", "MainPID")
    [child] = [p for p in host.run(["pgrep", "-f", "standin 5008 --fork-child"]).stdout.split() if p != main_pid]
    try:
        host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "leftover"])
        [mail] = host.wait_mail(about("leftover", "FAILED"), timeout=30)
        wait_idle(host, "leftover")
        text = body(mail)
        assert "port: 5008 held by pid %s (user root, cgroup /system.slice/leftover.service" % child in text
        assert "a leftover of an earlier run of leftover.service" in text
        subjects = [str(m["Subject"]) for m in mails_about(host, "leftover")]
        assert not [s for s in subjects if "RESOLVED" in s], subjects
        assert host.run(["test", "-d", "/proc/" + child], check=False).returncode == 0  # no port_conflict: untouched
    finally:
        host.run(["systemctl", "kill", "--kill-who=all", "-s", "KILL", "leftover"], check=False)


def test_sigkilled_service_that_gets_its_port_back_is_resolved_with_its_own_pid_as_holder(host):
    clear_mailbox(host)
    host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "mine"])
    [mail] = host.wait_mail(about("mine", "RESOLVED"), timeout=30)
    wait_idle(host, "mine")
    pid = show(host, "mine", "MainPID")
    assert "port: 5007 listening (pid %s of mine.service)" % pid in body(mail)
    assert http_get(host, 5007) == "200"


def test_watch_finds_a_service_whose_port_another_unit_answers_unhealthy_and_its_heal_fails_naming_it(host):
    clear_mailbox(host)
    host.run(["systemd-run", "--unit=squatter9", "/usr/bin/python3", STANDIN, "5009"])
    try:
        host.wait_listening(5009)
        squatter = show(host, "squatter9", "MainPID")
        host.run(["systemctl", "start", "deaf"])
        wait_past_start_grace(host, "deaf.service", 10)  # until then it is "starting", not unhealthy
        deaf_starts = starts(host, "deaf.service")
        # one watch run: two looks in a row, 2 s apart (watch_confirm = 2), then the heal
        host.run(["systemctl", "start", "selfheal-watch.service"], timeout=60)
        state = json.loads(host.run(["cat", "/run/selfheal/watch/deaf.json"]).stdout)
        assert state["verdict"] == "unhealthy", state
        # the watch's sandbox has no CAP_SYS_PTRACE: ss -p cannot name the process, ss --cgroup
        # names its unit
        assert state["detail"].startswith("port 5009 held by a socket of /system.slice/squatter9.service, "
                                          "not of deaf.service"), state
        # the heal it hands over names the pid and restarts nothing: a restart cannot free the port
        [mail] = host.wait_mail(about("deaf", "FAILED"), timeout=30)
        wait_idle(host, "deaf")
        text = body(mail)
        assert "port: 5009 held by pid %s (user root, cgroup /system.slice/squatter9.service" % squatter in text
        assert "selfheal restarted nothing" in text
        assert starts(host, "deaf.service") == deaf_starts
        assert show(host, "squatter9", "MainPID") == squatter  # never killed
    finally:
        host.run(["systemctl", "stop", "squatter9", "deaf"], check=False)


def test_port_published_by_another_unit_counts_with_port_owner_any_and_the_heal_is_resolved(host):
    clear_mailbox(host)
    host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "published"])
    [mail] = host.wait_mail(about("published", "RESOLVED"), timeout=30)
    wait_idle(host, "published")
    text = body(mail)
    assert "port: 5010 listening (port_owner = any: whoever holds it)" in text
    assert show(host, "publisher", "ActiveState") == "active"
    host.run(["systemctl", "start", "selfheal-watch.service"], timeout=60)
    state = json.loads(host.run(["cat", "/run/selfheal/watch/published.json"]).stdout)
    assert state["verdict"] == "ok", state
