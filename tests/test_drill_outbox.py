"""Drills for reports that are never lost, on a real systemd with postfix: a tarpit SMTP server
(a greeting of 220- lines that never ends) holds a heal no longer than smtp_timeout and the
report stays queued; a heal stopped while it sends (`systemctl stop selfheal@NAME`) leaves its
report queued; once the real mail server is configured again, each report arrives exactly once,
by mail and on the webhook (one outbox, each channel marking its own delivery).
"""

import json
import time

import pytest

from drillkit import drill_conf
from drillkit import (REPO_INSIDE, queued_for, about, clear_mailbox, drill_suites, installed_host, kill, mails_about, show, wait_for,
                      wait_idle, web_unit)

pytestmark = pytest.mark.drill

SLOW = "/usr/local/bin/slow-server"
TARPIT_PORT, TRICKLE_PORT = 2525, 5032
# A server that answers every connection with `text` at `step` seconds a piece: a tarpit SMTP
# server (a 220- line every 0.5 s, for ever) or a health endpoint that trickles (a byte a time).
SLOW_CODE = """\
import socket, sys, threading, time
port, mode = int(sys.argv[1]), sys.argv[2]
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(16)
def pieces():
    if mode == "tarpit":
        while True:
            yield b"220-hold on\\r\\n"
    for byte in b"HTTP/1.1 200 OK\\r\\nX-Slow: " + b"a" * 10000:
        yield bytes([byte])
def serve(conn):
    with conn:
        for piece in pieces():
            try:
                conn.sendall(piece)
            except OSError:
                return
            time.sleep(0.5)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

SINK, SINK_PORT, SINK_LOG, HOOK = "/usr/local/bin/http-sink", 5090, "/var/log/http-sink.jsonl", "/hook/outbox"

UNITS = {
    "web.service": web_unit(5031),
    "tarpit.service": "[Service]\nExecStart=/usr/bin/python3 %s %d tarpit\n" % (SLOW, TARPIT_PORT),
    "trickle.service": "[Service]\nExecStart=/usr/bin/python3 %s %d trickle\n" % (SLOW, TRICKLE_PORT),
    "hooksink.service": "[Service]\nExecStart=/usr/bin/python3 %s %d %s\n" % (SINK, SINK_PORT, SINK_LOG),
}

def config(smtp_port, smtp_timeout, **settings):
    """The installed config: mail through smtp_port (25: postfix; TARPIT_PORT: the tarpit)."""
    return drill_conf(dict({"smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_timeout": smtp_timeout,
                            "verify_timeout": "10s", "watch_interval": "1h",
                            "webhook_url": "http://127.0.0.1:5090/hook/outbox", "webhook_timeout": "2s"}, **settings),
                      {"web": {"port": 5031, "health_url": "http://127.0.0.1:5031/health"}})


def prepare_box(box):
    box.write(SLOW, SLOW_CODE, 0o755)
    box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/http_sink.py", SINK])


def posts(box, service):
    """Webhook posts the sink received about `service`."""
    try:
        text = box.read(SINK_LOG)
    except FileNotFoundError:
        return []
    bodies = [json.loads(json.loads(line)["body"]) for line in text.splitlines() if line.strip()]
    return [b for b in bodies if b.get("service") == service]


@pytest.fixture(scope="module", params=drill_suites("bookworm", "trixie"))
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, config(TARPIT_PORT, "3s"), suite=request.param,
                        start=("web", "tarpit", "hooksink", "trickle"),
                        ports=(5031, TARPIT_PORT, SINK_PORT, TRICKLE_PORT),
                        prepare=prepare_box) as box:
        box.run(["systemctl", "stop", "selfheal-watch.timer"])  # the drill flushes when it wants to
        yield box


def queued(box):
    return queued_for(box, "mail")


def use_config(box, port, timeout):
    box.write("/etc/selfheal/services.conf", config(port, timeout), 0o644)


def test_tarpit_smtp_server_holds_the_heal_no_longer_than_smtp_timeout_and_the_report_stays_queued(host):
    use_config(host, TARPIT_PORT, "3s")
    clear_mailbox(host)
    before = len(queued(host))
    started = time.monotonic()
    kill(host, "web")
    wait_for(lambda: show(host, "selfheal@web.service", "ActiveState") == "activating", 10, "the heal to start")
    wait_idle(host, "web", timeout=60)
    took = time.monotonic() - started
    print("\ntarpit: crash to heal finished in %.2f s (smtp_timeout 3 s)" % took)
    assert took < 3 + 10, took  # smtp_timeout, verification and a few seconds: never for ever
    assert show(host, "selfheal@web.service", "Result") == "success"
    assert len(queued(host)) == before + 1
    assert host.mails() == []
    posted = len(posts(host, "web"))
    assert posted >= 1 and not queued_for(host, "webhook")  # the webhook did not wait for the mail
    # The real mail server again: the queued report arrives, once.
    use_config(host, 25, "3s")
    host.run(["/usr/local/sbin/selfheal", "flush-mail"], timeout=60)
    [mail] = host.wait_mail(about("web", "RESOLVED"), timeout=30)
    assert queued(host) == []
    host.run(["/usr/local/sbin/selfheal", "flush-mail"], timeout=60)
    time.sleep(1)
    assert len(mails_about(host, "web")) == 1
    assert len(posts(host, "web")) == posted  # posted once, never again by a flush


def test_heal_stopped_while_it_sends_leaves_its_report_queued_and_it_arrives_once(host):
    use_config(host, TARPIT_PORT, "60s")  # the heal sits in the SMTP session for a minute
    clear_mailbox(host)
    host.run(["journalctl", "--rotate"], check=False)
    kill(host, "web")
    # The heal prints its outcome, then records and reports: stop it in the SMTP session.
    wait_for(lambda: "RESOLVED" in host.run(["journalctl", "-u", "selfheal@web.service", "-o", "cat",
                                              "--no-pager", "-n", "20"], check=False).stdout, 30,
             "the heal to finish healing")
    time.sleep(1.0)
    assert show(host, "selfheal@web.service", "ActiveState") == "activating"  # still sending
    posted = len(posts(host, "web"))
    host.run(["systemctl", "stop", "selfheal@web.service"], timeout=60)
    assert len(queued(host)) == 1, host.journal("selfheal@web.service", lines=40)
    assert len(queued_for(host, "webhook")) == 1  # not yet posted: the mail channel goes first
    assert host.mails() == [] and len(posts(host, "web")) == posted
    use_config(host, 25, "3s")
    host.run(["/usr/local/sbin/selfheal", "flush-mail"], timeout=60)
    [mail] = host.wait_mail(about("web", "RESOLVED"), timeout=30)
    assert queued(host) == []
    time.sleep(1)
    assert len(mails_about(host, "web")) == 1
    assert len(posts(host, "web")) == posted + 1 and not queued_for(host, "webhook")
    host.run(["/usr/local/sbin/selfheal", "flush-mail"], timeout=60)
    assert len(mails_about(host, "web")) == 1 and len(posts(host, "web")) == posted + 1


def test_a_health_endpoint_that_trickles_its_answer_does_not_hold_the_watch_run_past_its_budget(host):
    """health_timeout = 2min for an endpoint that answers a byte every 0.5 s: the watch run
    (budget: watch_interval = 20s) still ends in about 20 s, judges the other service, and
    says which one it could not judge."""
    conf = config(25, "3s", watch_interval="20s") + (
        "\n[trickle]\nport = %d\nhealth_url = http://127.0.0.1:%d/health\nhealth_timeout = 2min\n"
        % (TRICKLE_PORT, TRICKLE_PORT))
    host.write("/etc/selfheal/services.conf", conf, 0o644)
    try:
        host.run(["systemctl", "reset-failed", "selfheal-watch.service"], check=False)
        since = time.time()
        started = time.monotonic()
        host.run(["systemctl", "start", "selfheal-watch.service"], timeout=200, check=False)
        took = time.monotonic() - started
        print("\ntrickling health endpoint: watch run took %.1f s (budget 20 s, health_timeout 2 min)" % took)
        journal = host.run(["journalctl", "-u", "selfheal-watch.service", "--since", "@%d" % int(since),
                            "-o", "cat", "--no-pager"]).stdout
        assert 19 < took < 30, journal
        assert "trickle: its health check had not answered when the watch run's budget was spent" in journal
        assert "no heartbeat this run" in journal or "could not check trickle" in journal
        status = json.loads(host.run(["/usr/local/sbin/selfheal", "status", "--json"]).stdout)
        web = next(s for s in status["services"] if s["name"] == "web")
        assert web["watch_checked"] >= since - 1, web  # the other service was looked at in that run
    finally:
        use_config(host, 25, "3s")

