"""Drills for the HTTP channels on a real systemd and postfix: an HTTP sink runs as a unit
inside the container (tests/http_sink.py, every request logged as a JSON line) and selfheal
is installed with heartbeat_url and webhook_url pointing at it. A crash is mailed AND
posted with the same status; with the sink stopped the mail still arrives, the post is
queued and the next watch run delivers it once the sink is back; the heartbeat arrives
every watch run, and a watch run with the sink down still exits 0."""

import json
import time

import pytest

from drillkit import drill_conf
from drillkit import queued_for
from drillkit import (REPO_INSIDE, about, clear_mailbox, drill_suites, installed_host, kill, mails_about,
                      show, wait_idle, web_unit)

pytestmark = pytest.mark.drill

INTERVAL = 5  # watch_interval of this drill's config, seconds
SINK_PORT = 5090
SINK = "/usr/local/bin/http-sink"
SINK_LOG = "/var/log/http-sink.jsonl"
HOOK = "/hook/drill-token"
BEAT = "/ping/drill-uuid"
# systemd's catalog ids of "Starting UNIT..." and of the job that finished it (sd-messages.h);
# the wording of those lines changed between versions, the ids did not.
UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"

UNITS = {
    "victim.service": web_unit(5030),
    "hooksink.service": ("[Unit]\nDescription=HTTP sink of the drill (webhook and heartbeat)\n[Service]\n"
                         "ExecStart=/usr/bin/python3 %s %d %s\n" % (SINK, SINK_PORT, SINK_LOG)),
}

CONFIG = drill_conf({"smtp_timeout": "3s", "verify_timeout": "10s", "watch_interval": "%ds" % INTERVAL,
                     "heartbeat_url": "http://127.0.0.1:%d%s" % (SINK_PORT, BEAT),
                     "webhook_url": "http://127.0.0.1:%d%s" % (SINK_PORT, HOOK), "webhook_format": "json",
                     "webhook_timeout": "2s"},
                    {"victim": {"port": 5030}})


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)

    def sink(box):
        box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/http_sink.py", SINK])

    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("victim", "hooksink"),
                        ports=(5030, SINK_PORT), prepare=sink) as box:
        yield box


def requests(box, path=None):
    try:
        text = box.read(SINK_LOG)
    except FileNotFoundError:
        return []
    found = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in found if path is None or r["path"] == path]


def wait_requests(box, path, count, timeout, since=0.0):
    deadline = time.monotonic() + timeout
    while True:
        found = [r for r in requests(box, path) if r["ts"] >= since]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, "%d request(s) to %s after %d s, wanted %d" % (
            len(found), path, timeout, count)
        time.sleep(0.1)


def queued(box):
    return queued_for(box, "webhook")




def watch_runs(box, since):
    """(start, end) of each finished run of selfheal-watch.service since `since`, from systemd's journal."""
    out = box.run(["journalctl", "-u", "selfheal-watch.service", "--since", "@%d" % int(since), "-o", "json",
                   "--no-pager"]).stdout
    runs, start = [], None
    for line in out.splitlines():
        entry = json.loads(line)
        ts = int(entry["__REALTIME_TIMESTAMP"]) / 1e6
        if entry.get("MESSAGE_ID") == UNIT_STARTING:
            start = ts
        elif entry.get("MESSAGE_ID") == UNIT_STARTED and start is not None:
            runs.append((start, ts))
            start = None
    return runs


def test_heartbeat_arrives_every_watch_run(host):
    since = time.time()
    wait_requests(host, BEAT, 3, timeout=8 * INTERVAL, since=since)
    time.sleep(1)
    runs = watch_runs(host, since + 1)
    pings = [p["ts"] for p in requests(host, BEAT) if p["ts"] >= since]
    assert len(runs) >= 2
    for start, end in runs:  # one ping inside each run, and only one
        assert len([t for t in pings if start <= t <= end]) == 1, (start, end, pings)
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    print("\nheartbeat: %d watch runs, %d pings, gaps %s s (watch_interval %d s)" % (
        len(runs), len(pings), ", ".join("%.1f" % g for g in gaps), INTERVAL))
    assert all(p["method"] == "GET" and p["headers"].get("User-Agent", "").startswith("selfheal/")
               for p in requests(host, BEAT))


def test_killed_service_is_mailed_and_posted_with_the_same_status(host):
    clear_mailbox(host)
    killed = time.time()
    kill(host, "victim")
    [mail] = host.wait_mail(about("victim", "RESOLVED"), timeout=30)
    [post] = wait_requests(host, HOOK, 1, timeout=30, since=killed)
    event = json.loads(post["body"])
    assert post["method"] == "POST" and post["headers"]["Content-Type"] == "application/json"
    assert (event["service"], event["status"]) == ("victim", "RESOLVED")
    assert event["subject"] == str(mail["Subject"])
    assert "killed by signal KILL" in event["summary"]
    print("\nSIGKILL to webhook post: %.2f s" % (post["ts"] - killed))


def test_webhook_down_mail_arrives_post_is_queued_then_the_next_watch_run_delivers_it(host):
    wait_idle(host, "victim")
    clear_mailbox(host)
    host.run(["systemctl", "stop", "hooksink"])
    try:
        kill(host, "victim")
        host.wait_mail(about("victim", "RESOLVED"), timeout=30)
        wait_idle(host, "victim")
        assert len(queued(host)) == 1
        assert show(host, "victim", "ActiveState") == "active"  # healing did not wait on the webhook
        # A watch run with the sink down (no heartbeat, no webhook) still succeeds.
        host.run(["systemctl", "start", "selfheal-watch.service"], timeout=60)
        assert show(host, "selfheal-watch.service", "Result") == "success"
        assert show(host, "selfheal-watch.service", "ExecMainStatus") == "0"
        assert len(queued(host)) == 1
    finally:
        host.run(["systemctl", "start", "hooksink"])
    host.wait_listening(SINK_PORT)
    back = time.time()
    # Nobody re-sends it: the next watch run delivers the queue.
    [post] = wait_requests(host, HOOK, 1, timeout=4 * INTERVAL, since=back)
    event = json.loads(post["body"])
    assert (event["service"], event["status"]) == ("victim", "RESOLVED")
    assert event["ts"] < back  # the report's own time, not the delivery's
    assert queued(host) == []
    assert len(mails_about(host, "victim")) == 1  # the mail was not sent a second time
    print("\nsink back to queued post delivered: %.2f s (watch_interval %d s)" % (post["ts"] - back, INTERVAL))


def test_heartbeat_failure_is_logged_once_and_the_heartbeat_comes_back_with_the_sink(host):
    wait_requests(host, BEAT, 1, timeout=3 * INTERVAL, since=time.time())  # a good one first
    time.sleep(0.5)
    stopped = time.time()
    host.run(["systemctl", "stop", "hooksink"])
    try:
        time.sleep(3 * INTERVAL)
        log = host.run(["journalctl", "-t", "miraclemax-self-heal", "--since", "@%d" % int(stopped),
                        "--no-pager", "-o", "cat"]).stdout
        assert log.count("heartbeat failed") == 1, log  # when it starts failing, then at most hourly
        assert "drill-uuid" not in log  # the URL's secret part never reaches the journal
        assert show(host, "selfheal-watch.service", "Result") == "success", "%s\n%s" % (
            show(host, "selfheal-watch.service", "ExecMainStatus"), host.journal("selfheal-watch.service", lines=60))
    finally:
        host.run(["systemctl", "start", "hooksink"])
    host.wait_listening(SINK_PORT)
    back = time.time()
    wait_requests(host, BEAT, 1, timeout=3 * INTERVAL, since=back)
    time.sleep(0.5)
    log = host.run(["journalctl", "-t", "miraclemax-self-heal", "--since", "@%d" % int(back),
                    "--no-pager", "-o", "cat"]).stdout
    assert "works again" in log
