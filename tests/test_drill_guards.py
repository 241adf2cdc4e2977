"""Drills for selfheal's guards on a real systemd: the circuit breaker and its re-arm, pause,
one heal at a time, and test-email against the real mail server."""

import time

import pytest

from drillkit import drill_conf
from drillkit import drill_suites, about, body, clear_mailbox, history, http_get, installed_host, mails_about, show, wait_idle, web_unit

pytestmark = pytest.mark.drill

UNITS = {
    "flappy.service": web_unit(5006),
    "calm.service": web_unit(5007),
    "busy.service": web_unit(5008),
}

CONFIG = drill_conf({"failure_threshold": 2, "failure_window": "1h"},
                    {"flappy": {"port": 5006}, "calm": {"port": 5007}, "busy": {"port": 5008}})


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("flappy", "calm", "busy"),
                        ports=(5006, 5007, 5008)) as box:
        yield box


def crash(box, unit, port):
    box.wait_listening(port)
    box.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", unit])


def test_more_heals_than_the_threshold_escalate_once_and_resume_rearms(host):
    clear_mailbox(host)
    for _ in range(2):  # failure_threshold = 2: these two are healed
        crash(host, "flappy", 5006)
        wait_idle(host, "flappy")
        host.wait_listening(5006)
    assert [e["outcome"] for e in history(host, "flappy")] == ["RESOLVED", "RESOLVED"]

    crash(host, "flappy", 5006)  # the third within the window: escalate, do not heal
    [mail] = host.wait_mail(about("flappy", "ESCALATED"), timeout=30)
    assert "selfheal resume flappy" in body(mail)
    wait_idle(host, "flappy")
    assert show(host, "flappy", "ActiveState") == "failed"

    host.run(["systemctl", "start", "flappy"])  # a human starts it; it crashes again
    crash(host, "flappy", 5006)
    wait_idle(host, "flappy")
    time.sleep(1)
    assert show(host, "flappy", "ActiveState") == "failed"  # still not healed
    assert len(mails_about(host, "flappy")) == 3  # and no second escalation mail

    assert "healing resumed" in host.run(["selfheal", "resume", "flappy"]).stdout
    host.run(["systemctl", "start", "flappy"])
    crash(host, "flappy", 5006)
    host.wait_mail(about("flappy", "RESOLVED"), timeout=30, count=3)
    assert http_get(host, 5006) == "200"


def test_paused_service_is_not_healed_and_no_mail_is_sent_until_resumed(host):
    clear_mailbox(host)
    assert "paused" in host.run(["selfheal", "pause", "calm"]).stdout
    assert "paused" in host.run(["miraclemax-status"], check=False).stdout
    crash(host, "calm", 5007)
    wait_idle(host, "calm")
    time.sleep(1)
    assert show(host, "calm", "ActiveState") == "failed"
    assert mails_about(host, "calm") == [] and history(host, "calm") == []
    host.run(["selfheal", "resume", "calm"])
    host.run(["selfheal", "heal", "calm"])  # by hand, now that it is resumed
    host.wait_mail(about("calm", "RESOLVED"), timeout=30)


def test_a_second_trigger_during_a_heal_does_not_restart_twice(host):
    clear_mailbox(host)
    started_before = host.run(["journalctl", "-u", "busy", "-o", "cat", "--no-pager"]).stdout.count("Started")
    crash(host, "busy", 5008)
    # A manual heal at the same moment as systemd's OnFailure= trigger.
    manual = host.run(["selfheal", "heal", "busy"], check=False)
    wait_idle(host, "busy")
    host.wait_mail(about("busy", "RESOLVED"), timeout=30)
    time.sleep(1)
    log = host.run(["journalctl", "-u", "busy", "-o", "cat", "--no-pager"]).stdout
    assert log.count("Started") - started_before == 1, (manual.stdout, log[-2000:])
    assert len(mails_about(host, "busy")) == 1


def test_test_email_reaches_the_mailbox_and_says_why_when_it_cannot(host):
    clear_mailbox(host)
    ok = host.run(["selfheal", "test-email"])
    assert "sent to root@localhost" in ok.stdout
    host.wait_mail(lambda m: "selfheal test mail" in str(m["Subject"]), timeout=20)
    host.run(["systemctl", "stop", "postfix"])
    try:
        bad = host.run(["selfheal", "test-email"], check=False)
    finally:
        host.run(["systemctl", "start", "postfix"])
    assert bad.returncode == 1
    assert "refused" in bad.stderr and "is the mail server running?" in bad.stderr
