"""A report is never lost (fast layer): it is queued before any channel sees it, each SMTP
session has smtp_timeout in all (a tarpit cannot hold a heal), and a heal stopped by SIGTERM
records and queues what is in flight. On a real systemd: tests/test_drill_outbox.py."""

import email.utils
import json
import os
import signal
import socket
import threading
import time

import pytest

import selfheal
from conftest import queue_report
from http_sink import HttpSink

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

WORKER = "worker.service"


class Tarpit:
    """An SMTP server that never finishes its greeting: a 220- continuation line every 0.2 s."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self.drip, args=(conn,), daemon=True).start()

    def drip(self, conn):
        with conn:
            while not self.stop.is_set():
                try:
                    conn.sendall(b"220-still greeting you\r\n")
                except OSError:
                    return
                time.sleep(0.2)

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.fixture
def tarpit():
    server = Tarpit()
    yield server
    server.close()


def test_tarpit_smtp_server_holds_a_heal_no_longer_than_smtp_timeout_and_the_report_is_queued(bed, tarpit):
    bed.configure(smtp_port=tarpit.port, smtp_timeout="1s")  # the tarpit would hold it for ever
    bed.host.failed(WORKER)
    started = time.monotonic()
    rc, _ = bed.heal("worker")
    took = time.monotonic() - started
    assert rc == 0
    assert took < 1 + 3, "a heal against a tarpit took %.1f s" % took
    assert bed.queued_subjects() == ["✅ MiracleMax: worker - RESOLVED"]


def test_the_report_is_in_the_queue_before_the_mail_server_is_even_asked(bed, monkeypatch):
    seen = []

    def send(settings, msg):
        seen.append([p.name for p in bed.spooled()])
        raise KeyboardInterrupt  # the process dies mid-send, as under a kill

    monkeypatch.setattr(selfheal, "send", send)
    bed.host.failed(WORKER)
    with pytest.raises(KeyboardInterrupt):
        bed.heal("worker")
    assert seen and len(seen[0]) == 1  # queued before the send began
    assert bed.queued_subjects() == ["✅ MiracleMax: worker - RESOLVED"]  # and still there


def test_sigterm_during_verification_writes_the_history_line_and_queues_a_failed_report(bed, monkeypatch):
    real_verify = selfheal.verify

    def verify(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # systemd stops selfheal@worker.service now
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(selfheal, "verify", verify)
    bed.host.failed(WORKER)
    rc, _ = bed.heal("worker")
    assert rc == 1
    (event,) = bed.history("worker")
    assert event["outcome"] == "FAILED" and "SIGTERM" in event["root_cause"]
    assert bed.queued_subjects() == ["❌ MiracleMax: worker - FAILED (heal stopped)"]
    assert bed.sink.messages == []  # queued only: the process is being stopped
    assert signal.getsignal(signal.SIGTERM) is not None  # the old handler is back
    selfheal.flush_outbox(bed.config, bed.paths)
    assert [m["Subject"] for m in bed.sink.messages] == ["❌ MiracleMax: worker - FAILED (heal stopped)"]


def test_sigterm_after_the_heal_but_before_its_report_was_queued_queues_it(bed, monkeypatch):
    real_record = selfheal.record_heal

    def record(*args, **kwargs):
        real_record(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(selfheal, "record_heal", record)
    bed.host.failed(WORKER)
    bed.heal("worker")
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED"]
    assert bed.queued_subjects() == ["✅ MiracleMax: worker - RESOLVED"]


# =============================================================================
# One outbox, two channels: each marks its own delivery
# =============================================================================


def unfolded(header):
    return "".join(str(header).split())


@pytest.fixture
def hook():
    sink = HttpSink()
    yield sink
    sink.close()


def with_webhook(bed, sink, smtp_port=None):
    bed.configure(smtp_port=smtp_port, webhook_url=sink.url("/hook"))


def test_each_channel_marks_its_own_delivery_and_never_sends_a_report_twice(bed, hook, closed_port):
    with_webhook(bed, hook, smtp_port=closed_port)  # mail is down, the webhook is up
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    (record,) = selfheal.outbox(bed.paths)
    assert json.loads(record.read_text())["channels"] == {"mail": "queued", "webhook": "sent"}
    assert len(hook.requests) == 1
    selfheal.flush_outbox(bed.config, bed.paths)  # mail still down: nothing posted again
    assert len(hook.requests) == 1
    with_webhook(bed, hook)  # mail is back
    assert selfheal.flush_outbox(bed.config, bed.paths) == {"mail": [1, 0], "webhook": [0, 0]}
    assert [m["Subject"] for m in bed.sink.messages] == ["✅ MiracleMax: worker - RESOLVED"]
    assert len(hook.requests) == 1 and selfheal.outbox(bed.paths) == []


def test_a_retried_mail_keeps_the_message_id_and_date_it_was_queued_with(bed, closed_port):
    bed.configure(smtp_port=closed_port)
    bed.host.failed(WORKER)
    bed.heal("worker")
    (record,) = selfheal.outbox(bed.paths)
    queued = json.loads(record.read_text())
    time.sleep(1.1)
    bed.configure()
    selfheal.flush_outbox(bed.config, bed.paths)
    (mail,) = bed.sink.messages
    assert unfolded(mail["Message-ID"]) == queued["message_id"]
    assert email.utils.parsedate_to_datetime(mail["Date"]).timestamp() == int(queued["ts"])
    state = json.loads((bed.paths.state / "services" / "worker.json").read_text())
    assert state["incident"]["message_id"] == queued["message_id"]  # what later mails reply to


def test_stopped_between_a_send_and_its_mark_the_report_stays_queued_and_is_sent_again(bed, monkeypatch):
    """Killed at any instant: queued or delivered, never neither (here: at least once)."""
    real_write = selfheal.atomic_write

    def killed_at_the_mark(path, text, mode=0o644):
        if path.parent == bed.paths.spool and '"sent"' in text:
            raise KeyboardInterrupt  # SIGKILL, as near as a test can come
        return real_write(path, text, mode)

    monkeypatch.setattr(selfheal, "atomic_write", killed_at_the_mark)
    bed.host.failed(WORKER)
    with pytest.raises(KeyboardInterrupt):
        bed.heal("worker")
    assert len(bed.sink.messages) == 1 and bed.queued_subjects() == ["✅ MiracleMax: worker - RESOLVED"]
    monkeypatch.setattr(selfheal, "atomic_write", real_write)
    selfheal.flush_outbox(bed.config, bed.paths)
    assert len(bed.sink.messages) == 2 and selfheal.outbox(bed.paths) == []
    assert bed.sink.messages[0]["Message-ID"] == bed.sink.messages[1]["Message-ID"]  # one mail to a reader


def test_reports_an_older_selfheal_queued_join_the_outbox_and_go_out_once(bed, hook):
    with_webhook(bed, hook)
    old_mail = selfheal.make_message(bed.config.settings, "❌ MiracleMax: worker - FAILED", "queued by 0.0.9\n",
                                     thread="<first@example.org>")
    bed.paths.webhook_spool.mkdir(parents=True)
    (bed.paths.spool / "1700000000000-0a0b0c0d.eml").write_text(old_mail.as_string())
    (bed.paths.webhook_spool / "1700000000001-0e0f0a0b.json").write_text(json.dumps({
        "subject": "❌ MiracleMax: worker - FAILED", "summary": "worker broke", "status": "FAILED",
        "service": "worker", "thread": "<first@example.org>", "ts": 1700000000.0}))
    assert selfheal.queue_lengths(bed.paths) == {"mail": 1, "webhook": 1}
    assert selfheal.flush_outbox(bed.config, bed.paths) == {"mail": [1, 0], "webhook": [1, 0]}
    (mail,) = bed.sink.messages
    assert (unfolded(mail["Message-ID"]), mail["In-Reply-To"]) == (unfolded(old_mail["Message-ID"]),
                                                                   "<first@example.org>")
    assert mail.get_content() == "queued by 0.0.9\n"
    (post,) = hook.requests
    assert (post.json()["status"], post.json()["service"], post.json()["summary"]) == ("FAILED", "worker",
                                                                                       "worker broke")
    assert sorted(p.name for p in bed.paths.spool.rglob("*") if p.is_file()) == []


def test_a_channel_that_cannot_send_never_holds_up_the_other(bed, hook, closed_port):
    with_webhook(bed, hook, smtp_port=closed_port)
    for subject in ("first", "second", "third"):
        queue_report(bed.paths, bed.config.settings, subject)
    counts = selfheal.flush_outbox(bed.config, bed.paths)
    assert counts == {"mail": [0, 3], "webhook": [3, 0]}
    assert [r.json()["subject"] for r in hook.requests] == ["first", "second", "third"]
