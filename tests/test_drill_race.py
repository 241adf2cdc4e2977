"""Drills on a real systemd: two triggers racing for one service, and a host that reboots
with reports still queued.

Race: the service is SIGKILLed (OnFailure= starts selfheal@NAME a few ms later) and the watch
is started at about the same moment, its start moved from 520 ms before to 240 ms after the kill over 20 rounds so
it lands before, during and after the heal (and, started first, takes its snapshot just as
the kill lands).  Each round must end with exactly one restart of the service and exactly
one report, by mail and by webhook (an HTTP sink runs as a unit inside).

Reboot: with the mail server and the webhook down a crash is healed and its report queued on
both channels; the container is powered off and booted again; the first watch run after
boot delivers both.
"""

import collections
import json
import time

import pytest

from drillkit import drill_conf
from drillkit import OUTBOX, queued_for
from drillkit import (REPO_INSIDE, about, body, clear_mailbox, drill_suites, history, installed_host,
                      kill, mails_about, show, starts, wait_for, wait_idle, web_unit)

pytestmark = pytest.mark.drill

ROUNDS = 20
# The watch's start relative to the kill, from -520 ms (a watch run takes 0.4-0.5 s here,
# most of it starting Python: started first, it looks at the units about when the kill
# lands) to +240 ms (it looks while, or after, the heal runs).
OFFSETS_MS = [-520 + 40 * i for i in range(ROUNDS)]
SINK_PORT = 5090
SINK = "/usr/local/bin/http-sink"
SINK_LOG = "/var/log/http-sink.jsonl"
HOOK = "/hook/race"

UNITS = {
    "racer.service": web_unit(5030),
    "sleeper.service": web_unit(5031),
    "hooksink.service": ("[Unit]\nDescription=HTTP sink of the drill (webhook)\n[Service]\n"
                         "ExecStart=/usr/bin/python3 %s %d %s\n[Install]\nWantedBy=multi-user.target\n"
                         % (SINK, SINK_PORT, SINK_LOG)),
}

CONFIG = drill_conf({
    # the drill triggers the watch itself; the timer's own runs (every 5 s) only add more races
    "watch_interval": "5s",
    "watch_confirm": 1,  # act on the first look: a failed unit is a failed unit
    # twenty crashes in a minute are this drill's point, not a flapping service to give up on
    "failure_threshold": 100,
    "flap_threshold": 100,
    "smtp_timeout": "3s",
    "webhook_url": "http://127.0.0.1:%d%s" % (SINK_PORT, HOOK),
    "webhook_timeout": "2s",
}, {"racer": {"port": 5030}, "sleeper": {"port": 5031}})


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    def sink(box):
        box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/http_sink.py", SINK])

    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("racer", "sleeper", "hooksink"),
                        ports=(5030, 5031, SINK_PORT), prepare=sink) as box:
        yield box


def posts(box, service):
    """Webhook posts the sink received about `service` (json format: one object each)."""
    try:
        text = box.read(SINK_LOG)
    except FileNotFoundError:
        return []
    found = [json.loads(line) for line in text.splitlines() if line.strip()]
    bodies = [json.loads(r["body"]) for r in found if r["path"] == HOOK]
    return [b for b in bodies if b.get("service") == service]






def watch_idle(box):
    return box.run(["systemctl", "is-active", "selfheal-watch.service"],
                   check=False).stdout.strip() not in ("activating", "active", "deactivating")


def watch_saw(box, name, since):
    """What the watch made of NAME in its last run after `since` (its state file), or
    "healing" when it found the heal lock taken and left the service alone."""
    out = box.run(["cat", "/run/selfheal/watch/%s.json" % name], check=False).stdout
    state = json.loads(out) if out.strip() else {}
    return state.get("verdict", "?") if float(state.get("checked", 0)) >= since else "healing"


def test_onfailure_and_watch_at_the_same_moment_restart_once_and_report_once_each_time(host):
    clear_mailbox(host)
    seen = collections.Counter()
    wait_for(lambda: starts(host, "racer.service") == 1, 10, "the first start in the journal")
    for round_no, offset in enumerate(OFFSETS_MS, 1):
        since = float(host.run(["date", "+%s.%N"]).stdout)
        crash = "systemctl kill --kill-who=main -s KILL racer.service"
        look = "systemctl start --no-block selfheal-watch.service"
        first, second = (crash, look) if offset >= 0 else (look, crash)
        host.sh("%s; sleep %.3f; %s" % (first, abs(offset) / 1000, second))
        host.wait_mail(about("racer", "RESOLVED"), timeout=30, count=round_no)
        wait_idle(host, "racer")
        wait_for(lambda: watch_idle(host), 30, "the watch run to end")
        wait_idle(host, "racer")  # a heal the watch may have started in its last moment
        seen[watch_saw(host, "racer", since)] += 1
        assert show(host, "racer.service", "ActiveState") == "active", "round %d" % round_no
        wait_for(lambda: starts(host, "racer.service") >= round_no + 1, 10, "the restart in the journal")
        assert starts(host, "racer.service") == round_no + 1, \
            "round %d (watch %d ms after the kill): more than one restart" % (round_no, offset)
        assert len(mails_about(host, "racer")) == round_no, \
            "round %d (watch %d ms after the kill): more than one report" % (round_no, offset)
        wait_for(lambda: len(posts(host, "racer")) >= round_no, 10, "the webhook post")
        assert len(posts(host, "racer")) == round_no, \
            "round %d (watch %d ms after the kill): more than one webhook post" % (round_no, offset)
    # Quiet afterwards: a late watch run or heal adds neither a restart nor a mail.
    time.sleep(6)
    wait_idle(host, "racer")
    assert starts(host, "racer.service") == ROUNDS + 1
    mails = mails_about(host, "racer")
    assert len(mails) == ROUNDS and all("RESOLVED" in str(m["Subject"]) for m in mails)
    assert [p["status"] for p in posts(host, "racer")] == ["RESOLVED"] * ROUNDS
    outcomes = [e["outcome"] for e in history(host, "racer")]
    # A heal the watch started after the real one finished finds nothing to do: HEALTHY,
    # no restart, no mail.  How often that happened shows the race was really run.
    print("racer heals: %d RESOLVED, %d HEALTHY (the watch's late second look); the watch saw: %s"
          % (outcomes.count("RESOLVED"), outcomes.count("HEALTHY"), dict(seen)))
    assert outcomes.count("RESOLVED") == ROUNDS and set(outcomes) <= {"RESOLVED", "HEALTHY"}


def test_report_queued_before_a_reboot_is_delivered_after_it_by_mail_and_webhook(host):
    clear_mailbox(host)
    host.run(["systemctl", "stop", "postfix.service", "hooksink.service"])
    kill(host, "sleeper.service")
    wait_for(lambda: bool(history(host, "sleeper")) and show(host, "sleeper.service", "ActiveState") == "active",
             30, "the heal of sleeper")
    wait_idle(host, "sleeper")
    assert queued_for(host, "mail"), "no mail queued in " + OUTBOX
    assert queued_for(host, "webhook"), "no post queued in " + OUTBOX
    assert not host.mails() and not posts(host, "sleeper")

    host.reboot()

    assert show(host, "sleeper.service", "ActiveState") == "active"  # enabled: back with the host
    msg = host.wait_mail(about("sleeper", "RESOLVED"), timeout=30)[0]
    text = body(msg)
    assert "KILL" in text
    wait_for(lambda: len(posts(host, "sleeper")) == 1, 30, "the queued webhook post")
    wait_for(lambda: not queued_for(host, "mail") and not queued_for(host, "webhook"),
             10, "both queues to empty")
    assert len(mails_about(host, "sleeper")) == 1 and len(posts(host, "sleeper")) == 1
    assert posts(host, "sleeper")[0]["status"] == "RESOLVED"
