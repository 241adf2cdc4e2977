"""Drills for a burst on a real systemd (252, 257), issue 21: ten services SIGKILLed at once
are healed by one process (the other triggers end in selfheal@.service's ExecCondition=,
starting no Python) and told in one mail, a line each; four such storms in a row each end with
every service back, no human, no ESCALATED; a service that cannot come back keeps its own
FAILED mail while the rest are one mail."""

import time

import pytest

from drillkit import (CLONE, body, clear_mailbox, drill_conf, drill_suites, history, installed_host, mails_about,
                      show, wait_for)

pytestmark = pytest.mark.drill

N = 10
PORTS = [5600 + i for i in range(1, N + 1)]
NAMES = ["storm%d" % p for p in PORTS]
TEMPLATE = ("[Unit]\nDescription=stand-in %i\n[Service]\nExecStart=/usr/bin/python3 /usr/local/bin/standin %i "
            "--config /etc/storm-%i.conf\n")
UNITS = {"storm@.service": TEMPLATE}
SERVICES = {name: {"unit": "storm@%d.service" % port, "port": port,
                   "health_url": "http://127.0.0.1:%d/health" % port} for name, port in zip(NAMES, PORTS)}
BASE = {"watch_interval": "5min", "verify_timeout": "10s"}


def prepare_box(box):
    for port in PORTS:
        box.write("/etc/storm-%d.conf" % port, "valid\n")


@pytest.fixture(scope="module", params=drill_suites("bookworm", "trixie"))
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, drill_conf(BASE, SERVICES), suite=request.param, prepare=prepare_box,
                        start=["storm@%d" % p for p in PORTS], ports=PORTS) as box:
        yield box


def units():
    return ["storm@%d.service" % p for p in PORTS]


def all_active(box):
    return box.run(["systemctl", "show", "-p", "ActiveState", "--value"] + units()).stdout.split() == ["active"] * N


def storm(box):
    for port in PORTS:
        box.wait_listening(port, timeout=30)
    box.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL"] + units())


def pythons_started(box, since):
    """How many selfheal@ units ran their ExecStart (Python), from the journal since `since`."""
    out = box.run(["journalctl", "--no-pager", "-o", "cat", "--since", since, "-u", "selfheal@*"], check=False).stdout
    skipped = sum(1 for line in out.splitlines() if "Skipped due to 'exec-condition'" in line)
    started = sum(1 for line in out.splitlines() if line.startswith("Starting selfheal@"))
    return started - skipped


def test_ten_services_killed_at_once_are_one_heal_and_one_mail(host):
    clear_mailbox(host)
    since = host.run(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()
    time.sleep(1)
    started = time.monotonic()
    storm(host)
    wait_for(lambda: all_active(host), 60, "all ten active again")
    back = time.monotonic() - started
    [mail] = host.wait_mail(lambda m: "burst - RESOLVED" in str(m["Subject"]), timeout=30)
    time.sleep(3)
    print("10 at once: all active in %.1f s; mails: %s" % (back, [str(m["Subject"]) for m in host.mails()]))
    assert len(host.mails()) <= 3
    text = body(mail)
    lines = [ln for ln in text.splitlines() if ln.startswith("  storm")]
    named = {ln.split()[0] for ln in lines}
    others = {str(m["Subject"]).split(": ", 1)[1].split(" - ")[0] for m in host.mails()
              if m["Message-ID"] != mail["Message-ID"]}
    assert named | others == set(NAMES), text  # each service once: in the burst's mail, or in its own
    assert pythons_started(host, since) <= 3  # the leader (and at most a trigger or two that raced it)
    assert not host.run(["test", "-e", "/run/selfheal/leading"], check=False).returncode == 0


def test_four_storms_in_a_row_each_end_with_every_service_back_and_none_escalated(host):
    """Bursts that repeat are one incident of the host: FLAPPING once, then quiet (the first
    test's storm was the first of them)."""
    clear_mailbox(host)
    for k in range(4):
        storm(host)
        wait_for(lambda: all_active(host), 60, "all ten active again after storm %d" % (k + 1))
        wait_for(lambda: not host.run(["test", "-e", "/run/selfheal/leading"], check=False).returncode == 0, 30,
                 "the leader done")
        time.sleep(1)
    said = [str(m["Subject"]) for m in host.mails()]
    print("four storms in a row: %d mails: %s" % (len(said), said))
    assert not [s for s in said if "ESCALATED" in s], said
    assert len([s for s in said if "FLAPPING" in s]) == 1, said
    assert len(said) <= 4, said
    status = host.run([CLONE + "/selfheal.py", "status", "--json"], check=False).stdout
    assert '"escalated": true' not in status


def test_one_that_cannot_come_back_keeps_its_own_failed_mail(host):
    host.run(["rm", "-f", "/var/lib/selfheal/burst.json"])  # as after incident_quiet: a new burst incident
    clear_mailbox(host)
    host.write("/etc/storm-%d.conf" % PORTS[0], "broken\n")
    storm(host)
    failed = host.wait_mail(lambda m: "%s - FAILED" % NAMES[0] in str(m["Subject"]), timeout=60)
    burst = host.wait_mail(lambda m: "burst - RESOLVED (%d services)" % (N - 1) in str(m["Subject"]), timeout=60)
    assert failed and burst
    assert "Not back, each in its own mail and thread: %s." % NAMES[0] in body(burst[0])
    host.write("/etc/storm-%d.conf" % PORTS[0], "valid\n")
    host.run([CLONE + "/selfheal.py", "heal", NAMES[0]], check=False)
    wait_for(lambda: show(host, units()[0], "ActiveState") == "active", 30, "the broken one fixed")
    assert history(host, NAMES[0])[-1]["outcome"] == "RESOLVED"
    print("history of %s: %s" % (NAMES[0], [(e["outcome"], e["trigger"]) for e in history(host, NAMES[0])]))
    host.wait_mail(lambda m: "%s - RESOLVED" % NAMES[0] in str(m["Subject"]), timeout=30)
    assert str(mails_about(host, NAMES[0])[-1]["Subject"]).endswith("RESOLVED")
