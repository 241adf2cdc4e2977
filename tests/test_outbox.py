"""A report is never lost (fast layer): it is queued before any channel sees it, each SMTP
session has smtp_timeout in all (a tarpit cannot hold a heal), and a heal stopped by SIGTERM
records and queues what is in flight. On a real systemd: tests/test_drill_outbox.py."""

import email
import email.policy
import os
import signal
import socket
import threading
import time

import pytest

import selfheal

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


def queued_subjects(bed):
    return [email.message_from_bytes(p.read_bytes(), policy=email.policy.default)["Subject"] for p in bed.spooled()]


def test_tarpit_smtp_server_holds_a_heal_no_longer_than_smtp_timeout_and_the_report_is_queued(bed, tarpit):
    bed.configure(smtp_port=tarpit.port)  # smtp_timeout = 5s in the heal config
    bed.host.failed(WORKER)
    started = time.monotonic()
    rc, _ = bed.heal("worker")
    took = time.monotonic() - started
    assert rc == 0
    assert took < 5 + 3, "a heal against a tarpit took %.1f s" % took
    assert queued_subjects(bed) == ["✅ MiracleMax: worker - RESOLVED"]


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
    assert queued_subjects(bed) == ["✅ MiracleMax: worker - RESOLVED"]  # and still there


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
    assert queued_subjects(bed) == ["❌ MiracleMax: worker - FAILED (heal stopped)"]
    assert bed.sink.messages == []  # queued only: the process is being stopped
    assert signal.getsignal(signal.SIGTERM) is not None  # the old handler is back
    selfheal.flush_spool(bed.config, bed.paths)
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
    assert queued_subjects(bed) == ["✅ MiracleMax: worker - RESOLVED"]
