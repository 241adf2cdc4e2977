"""Drills for the watch path (what OnFailure= never sees) on a real systemd and postfix, on
every suite (systemd 247, 252, 257): stopped, hung, restarted by systemd itself, flapping,
paused; one incident, one mail thread."""

import time

import pytest

from drillkit import drill_conf
from drillkit import drill_suites, about, body, clear_mailbox, history, http_get, installed_host, mails_about, show, web_unit

pytestmark = pytest.mark.drill

INTERVAL = 5  # watch_interval of this drill's config, seconds
CONFIRM = 2

UNITS = {
    "stopme.service": web_unit(5020),
    "hangs.service": web_unit(5021),
    "autorestart.service": web_unit(5022, "Restart=on-failure\nRestartSec=200ms\n"),
    # Killed by timeout(1) a few seconds after each start: it crashes over and over.
    "flaps.service": ("[Unit]\nDescription=crashes every few seconds\n[Service]\n"
                      "ExecStart=/usr/bin/timeout -s KILL 3 /usr/bin/python3 /usr/local/bin/standin 5023\n"
                      "[Install]\nWantedBy=multi-user.target\n"),
    "maint.service": web_unit(5024),
    "reportonly.service": web_unit(5025),
}

CONFIG = drill_conf({"watch_interval": "%ds" % INTERVAL, "watch_confirm": CONFIRM, "verify_timeout": "10s"}, {
    "stopme": {"port": 5020},
    "hangs": {"port": 5021, "health_url": "http://127.0.0.1:5021/health", "health_timeout": "2s"},
    "autorestart": {"port": 5022},
    "flaps": {"port": 5023, "on_stopped": "ignore"},  # the drill starts it; until then the watch must leave it alone
    "maint": {"port": 5024},
    "reportonly": {"port": 5025, "on_stopped": "report"},
})


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param,
                        start=("stopme", "hangs", "autorestart", "maint", "reportonly"),
                        ports=(5020, 5021, 5022, 5024, 5025)) as box:
        box.systemd = int(box.run(["systemctl", "--version"]).stdout.split()[1])
        yield box


def test_watch_timer_runs_at_the_configured_interval(host):
    assert show(host, "selfheal-watch.timer", "ActiveState") == "active"
    assert "OnUnitActiveSec=%ds" % INTERVAL in host.read("/etc/systemd/system/selfheal-watch.timer")


def test_stopped_service_is_started_again_within_two_intervals_and_one_mail_says_so(host):
    clear_mailbox(host)
    host.run(["systemctl", "stop", "stopme"])
    stopped = time.monotonic()
    [mail] = host.wait_mail(about("stopme", "RESOLVED"), timeout=CONFIRM * INTERVAL + 20)
    took = time.monotonic() - stopped
    assert http_get(host, 5020) == "200"
    assert took <= (CONFIRM + 1) * INTERVAL + 5, "took %.1f s" % took
    text = body(mail)
    assert "The watch found stopme.service stopped" in text
    assert "stopped cleanly" in text
    time.sleep(INTERVAL)
    assert len(mails_about(host, "stopme")) == 1


def test_frozen_service_with_open_port_is_restarted_and_reported_as_a_hang(host):
    clear_mailbox(host)
    pid = show(host, "hangs", "MainPID")
    host.run(["kill", "-STOP", pid])
    frozen = time.monotonic()
    [mail] = host.wait_mail(about("hangs", "RESOLVED"), timeout=CONFIRM * INTERVAL + 40)
    took = time.monotonic() - frozen
    text = body(mail)
    assert "It hung: port 5021 open but GET http://127.0.0.1:5021/health: no answer within 2 s" in text
    assert "systemctl restart hangs.service" in text
    assert show(host, "hangs", "MainPID") != pid
    assert http_get(host, 5021) == "200"
    # interval x confirm, plus a health timeout per look, plus the restart
    assert took <= (CONFIRM + 1) * INTERVAL + CONFIRM * 2 + 10, "took %.1f s" % took


def test_crash_repaired_by_systemds_restart_gets_exactly_one_restart_and_one_mail(host):
    clear_mailbox(host)
    journal = ["journalctl", "-u", "autorestart", "-o", "cat", "--no-pager"]
    started = host.run(journal).stdout.count("Started")
    host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "autorestart"])
    [mail] = host.wait_mail(about("autorestart", "RESOLVED (recovered by systemd)"), timeout=CONFIRM * INTERVAL + 20)
    time.sleep(2 * INTERVAL + 2)  # the watch looks again: it must not report or restart it twice
    after = host.run(journal + ["-o", "short-precise"]).stdout
    assert after.count("Started") - started == 1, after
    assert show(host, "autorestart", "NRestarts") == "1"
    assert len(mails_about(host, "autorestart")) == 1
    text = body(mail)
    assert "did not restart it again" in text
    assert "KILL" in text  # the diagnosis of the crash itself
    assert http_get(host, 5022) == "200"
    [event] = history(host, "autorestart")
    assert event["outcome"] == "RECOVERED"
    # 252 never calls OnFailure= here (the watch found it); 254+ calls it before restarting
    assert event["trigger"] == ("watch" if host.systemd < 254 else "onfailure")


def test_service_crashing_every_few_seconds_is_a_handful_of_mails_in_one_thread(host):
    clear_mailbox(host)
    host.run(["systemctl", "start", "flaps"])
    time.sleep(60)  # it crashes every 3 s; selfheal heals, flags it, then escalates and stops
    mails = mails_about(host, "flaps")
    subjects = [str(m["Subject"]) for m in mails]
    assert 2 <= len(mails) <= 5, subjects
    assert sum("FLAPPING" in s for s in subjects) == 1, subjects
    assert sum("ESCALATED" in s for s in subjects) == 1, subjects
    first = mails[0]["Message-ID"]
    for reply in mails[1:]:
        assert reply["In-Reply-To"] == first and first in reply["References"]
    assert show(host, "flaps", "ActiveState") == "failed"  # healing stopped at the threshold
    time.sleep(2 * INTERVAL)
    assert len(mails_about(host, "flaps")) == len(mails)


def test_paused_service_that_is_stopped_stays_stopped_and_no_mail_is_sent(host):
    clear_mailbox(host)
    host.run(["selfheal", "pause", "maint"])
    host.run(["systemctl", "stop", "maint"])
    time.sleep((CONFIRM + 2) * INTERVAL)
    assert show(host, "maint", "ActiveState") == "inactive"
    assert mails_about(host, "maint") == []
    assert "paused" in host.run(["miraclemax-status"], check=False).stdout
    host.run(["selfheal", "resume", "maint"])
    host.wait_mail(about("maint", "RESOLVED"), timeout=CONFIRM * INTERVAL + 20)


def test_on_stopped_report_leaves_it_stopped_and_mails_once(host):
    clear_mailbox(host)
    host.run(["systemctl", "stop", "reportonly"])
    [mail] = host.wait_mail(about("reportonly", "STOPPED"), timeout=CONFIRM * INTERVAL + 20)
    assert "systemctl start reportonly.service" in body(mail)
    time.sleep((CONFIRM + 1) * INTERVAL)
    assert show(host, "reportonly", "ActiveState") == "inactive"
    assert len(mails_about(host, "reportonly")) == 1
    host.run(["systemctl", "start", "reportonly"])  # someone starts it: the thread is told
    [fixed] = host.wait_mail(about("reportonly", "RESOLVED (was down"), timeout=2 * INTERVAL + 20)
    assert fixed["In-Reply-To"] == mail["Message-ID"]
