"""Drills for who gets told what, on a real systemd and postfix: notify = on-failure mails a
FAILED heal and the "fixed" that ends it but not a routine RESOLVED; notify = never mails
nothing and still heals and records; a watch run that breaks mails WATCH FAILED once."""

import time

import pytest

from drillkit import drill_conf
from drillkit import (REPO_INSIDE, about, body, clear_mailbox, drill_suites, history, installed_host, kill,
                      mails_about, show)

pytestmark = pytest.mark.drill


def app_unit(name, port):
    """A stand-in run from its own copy, so one service's binary can go missing."""
    return ("[Unit]\nDescription=%s\n[Service]\nExecStart=/usr/bin/python3 /opt/%s/app %d\n"
            "[Install]\nWantedBy=multi-user.target\n" % (name, name, port))


UNITS = {
    "quiet.service": app_unit("quiet", 5050),
    "silent.service": app_unit("silent", 5051),
    "calm.service": app_unit("calm", 5052),
}

CONFIG = drill_conf({"watch_interval": "5s", "verify_timeout": "5s"}, {
    "quiet": {"port": 5050, "notify": "on-failure"},
    "silent": {"port": 5051, "notify": "never"},
    "calm": {"port": 5052},
})


def prepare_box(box):
    for name in ("quiet", "silent", "calm"):
        box.run(["install", "-D", "-m", "0755", REPO_INSIDE + "/tests/standin.py", "/opt/%s/app" % name])


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("quiet", "silent", "calm"),
                        ports=(5050, 5051, 5052), prepare=prepare_box) as box:
        yield box




def wait_history(box, name, count, timeout=30):
    deadline = time.monotonic() + timeout
    while len(history(box, name)) < count:
        assert time.monotonic() < deadline, "no heal of %s recorded: %s" % (name, history(box, name))
        time.sleep(0.1)
    return history(box, name)


def test_on_failure_policy_skips_a_routine_resolved_but_mails_failed_and_its_end(host):
    clear_mailbox(host)
    kill(host, "quiet")
    assert wait_history(host, "quiet", 1)[-1]["outcome"] == "RESOLVED"
    assert show(host, "quiet.service", "ActiveState") == "active"
    time.sleep(3)
    assert mails_about(host, "quiet") == []

    host.run(["mv", "/opt/quiet/app", "/opt/quiet/app.away"])
    kill(host, "quiet")
    [failed] = host.wait_mail(about("quiet", "FAILED"), timeout=30)
    assert wait_history(host, "quiet", 2)[-1]["outcome"] == "FAILED"

    host.run(["mv", "/opt/quiet/app.away", "/opt/quiet/app"])
    host.run(["systemctl", "start", "quiet"])  # fixed by hand: the watch sees it and says so
    [fixed] = host.wait_mail(about("quiet", "RESOLVED"), timeout=30)
    assert fixed["In-Reply-To"].strip() == failed["Message-ID"].strip()
    assert len(mails_about(host, "quiet")) == 2


def test_never_policy_heals_and_records_but_mails_nothing_even_when_healing_fails(host):
    clear_mailbox(host)
    kill(host, "silent")
    assert wait_history(host, "silent", 1)[-1]["outcome"] == "RESOLVED"
    host.run(["mv", "/opt/silent/app", "/opt/silent/app.away"])
    kill(host, "silent")
    assert wait_history(host, "silent", 2)[-1]["outcome"] == "FAILED"
    assert "FAILED" in host.read("/var/log/selfheal/silent.log")  # the report is still written
    time.sleep(6)  # a watch run too
    assert mails_about(host, "silent") == []
    host.run(["mv", "/opt/silent/app.away", "/opt/silent/app"])
    host.run(["selfheal", "heal", "silent"])


def test_a_broken_watch_run_is_mailed_once_and_the_next_good_run_goes_on(host):
    clear_mailbox(host)
    # The watch keeps its per-service notes in /run/selfheal/watch/NAME.json; a directory
    # in that place makes writing calm's note fail, one service's problem in a watch run.
    host.run(["rm", "-f", "/run/selfheal/watch/calm.json"])
    host.run(["mkdir", "-p", "/run/selfheal/watch/calm.json/blocked"])
    try:
        [mail] = host.wait_mail(lambda m: "selfheal - WATCH FAILED" in str(m["Subject"]), timeout=30)
        text = body(mail)
        assert "calm" in text and "Services may be unwatched" in text
        deadline = time.monotonic() + 10  # the mail goes out just before the run ends
        while "Failed with result 'exit-code'" not in host.journal("selfheal-watch.service", 100):
            assert time.monotonic() < deadline, "the broken watch run did not end as failed"
            time.sleep(0.2)
        # the other services are still watched meanwhile: quiet is checked and healed
        kill(host, "quiet")
        before = len(history(host, "quiet"))
        assert wait_history(host, "quiet", before + 1)[-1]["outcome"] == "RESOLVED"
        time.sleep(11)  # two more broken watch runs: still one mail (hourly at most)
        assert len([m for m in host.mails() if "WATCH FAILED" in str(m["Subject"])]) == 1
    finally:
        host.run(["rm", "-rf", "/run/selfheal/watch/calm.json"])
    assert host.run(["systemctl", "start", "selfheal-watch.service"], check=False).returncode == 0
