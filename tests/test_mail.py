"""Mail: a report is sent, or queued when it cannot be and sent later; mail errors are
explained in words; `test-email` says what fails. Runs against tests/smtp_sink.py."""

import json
import os
import smtplib
import socket
import ssl
import stat
import time

import pytest

import selfheal
from conftest import queue_report

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

WORKER = "worker.service"


def queue(bed, *subjects):
    for subject in subjects:
        queue_report(bed.paths, bed.config.settings, subject)


def flush(bed):
    """flush_outbox's figures for the mail channel: (sent now, still queued)."""
    return tuple(selfheal.flush_outbox(bed.config, bed.paths)["mail"])


def test_smtp_down_queues_the_report_and_healing_still_completes(bed, closed_port, caplog):
    bed.configure(smtp_port=closed_port)
    bed.host.failed(WORKER)
    rc, _ = bed.heal("worker")

    assert rc == 0
    assert [c[1] for c in bed.host.actions()] == ["restart"]
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED"]
    (queued,) = bed.spooled()
    assert stat.S_IMODE(queued.stat().st_mode) == 0o600  # reports name hosts, pids, users
    assert json.loads(queued.read_text())["subject"] == "✅ MiracleMax: worker - RESOLVED"
    assert any("refused" in r.getMessage() and str(queued.name) in r.getMessage() for r in caplog.records)


def test_queued_report_is_sent_once_the_server_is_back_and_the_queue_empties(bed, closed_port):
    bed.configure(smtp_port=closed_port)
    bed.host.failed(WORKER)
    bed.heal("worker")
    assert len(bed.spooled()) == 1

    bed.configure()  # the mail server is back
    assert flush(bed) == (1, 0)
    assert bed.spooled() == []
    assert [m["Subject"] for m in bed.sink.messages] == ["✅ MiracleMax: worker - RESOLVED"]


def test_flush_sends_the_oldest_first(bed):
    queue(bed, "first", "second", "third")
    assert flush(bed) == (3, 0)
    assert [m["Subject"] for m in bed.sink.messages] == ["first", "second", "third"]


def test_next_heal_sends_the_queued_report_first_then_its_own(bed):
    # Oldest first: a mail thread must not arrive with its replies before its first mail.
    queue(bed, "report written while the mail server was down")
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    assert [m["Subject"] for m in bed.sink.messages] == [
        "report written while the mail server was down", "✅ MiracleMax: worker - RESOLVED"]
    assert bed.spooled() == []


def test_new_report_waits_behind_queued_ones_while_the_server_still_refuses(bed, closed_port):
    queue(bed, "older report")
    bed.configure(smtp_port=closed_port)
    bed.host.failed(WORKER)
    bed.heal("worker")
    assert len(bed.spooled()) == 2
    assert bed.queued_subjects() == ["older report", "✅ MiracleMax: worker - RESOLVED"]


def test_flush_stops_at_the_first_failure_and_keeps_every_message(bed, closed_port):
    queue(bed, "first", "second")
    bed.configure(smtp_port=closed_port)
    assert flush(bed) == (0, 2)
    assert len(bed.spooled()) == 2


@pytest.mark.parametrize("name", ["0000000000001-deadbeef.json", "0000000000001-deadbeef.eml"],
                         ids=["record", "older-selfheal-mail"])
def test_damaged_queued_file_is_set_aside_as_bad_and_the_rest_is_sent(bed, name):
    bed.paths.spool.mkdir(parents=True)
    damaged = bed.paths.spool / name
    damaged.write_bytes(b"\x00\x01 this was half written when the disk filled up")
    queue(bed, "good")
    selfheal.flush_outbox(bed.config, bed.paths)
    assert [m["Subject"] for m in bed.sink.messages] == ["good"]
    assert bed.spooled() == []
    assert damaged.with_suffix(".bad").is_file()


def test_flush_mail_does_not_count_a_file_set_aside_as_still_queued(bed, capsys):
    bed.paths.spool.mkdir(parents=True)
    (bed.paths.spool / "0000000000001-deadbeef.json").write_bytes(b"\x00\x01 garbage")
    assert flush(bed) == (0, 0)


def test_flush_mail_command_reports_counts_and_fails_while_mail_is_left(bed, closed_port, capsys):
    queue(bed, "one")
    bed.configure(smtp_port=closed_port)
    assert selfheal.main(["flush-mail"]) == 1
    assert "0 sent, 1 still queued" in capsys.readouterr().out
    bed.configure()
    assert selfheal.main(["flush-mail"]) == 0
    assert "1 sent, 0 still queued" in capsys.readouterr().out
    assert selfheal.main(["flush-mail", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_server_refusing_service_gets_the_report_queued_not_lost(bed):
    bed.sink.mode = "554"
    report = selfheal.new_report(bed.config.settings, "", "worker", "FAILED", "body\n",
                                 subject_text="refused at the door")
    assert selfheal.deliver(bed.config, bed.paths, report) is False
    assert len(bed.spooled()) == 1


def test_message_is_7bit_clean_and_the_text_arrives_unchanged(bed):
    body = "Café crashed ✅ at 05:00\n.a line starting with a dot\n" + "x" * 300 + "\n"
    msg = selfheal.make_message(bed.config.settings, "✅ MiracleMax: café - RESOLVED", body)
    raw = msg.as_bytes()
    raw.decode("ascii")  # no 8-bit data on the wire
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    report = selfheal.new_report(bed.config.settings, "✅", "café", "RESOLVED", body)
    assert selfheal.deliver(bed.config, bed.paths, report) is True
    (received,) = bed.sink.messages
    assert received["Subject"] == "✅ MiracleMax: café - RESOLVED"
    assert received.get_content() == body


# =============================================================================
# Explaining mail errors
# =============================================================================

SETTINGS = selfheal.Settings(name="MiracleMax", email_to=("owner@example.org",), email_from="selfheal@example.org",
                             smtp_host="mail.example.org", smtp_port=2525, smtp_user="alice",
                             smtp_password_file="/etc/selfheal/smtp-password", smtp_timeout=7.0)


def ssl_error(reason):
    """An SSLError as _ssl raises it (with .reason and .library)."""
    exc = ssl.SSLError(1, "[SSL: %s] %s" % (reason, reason.lower().replace("_", " ")))
    exc.reason, exc.library = reason, "SSL"
    return exc


@pytest.mark.parametrize("exc, words", [
    (ConnectionRefusedError(111, "Connection refused"), ["mail.example.org:2525", "refused"]),
    (smtplib.SMTPAuthenticationError(535, b"5.7.8 credentials invalid"), ["mail.example.org:2525", "alice",
                                                                           "smtp_password_file"]),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), ["mail.example.org", "DNS"]),
    (socket.timeout("timed out"), ["mail.example.org:2525", "7"]),
    (ssl_error("WRONG_VERSION_NUMBER"), ["mail.example.org:2525", "TLS"]),
], ids=["refused", "auth", "dns", "timeout", "tls"])
def test_explain_mail_error_says_what_failed_in_one_line(exc, words):
    text = selfheal.explain_mail_error(SETTINGS, exc)
    for word in words:
        assert word in text
    assert "\n" not in text and "Traceback" not in text


def test_timeout_and_refusal_are_told_apart():
    refused = selfheal.explain_mail_error(SETTINGS, ConnectionRefusedError(111, "Connection refused"))
    timeout = selfheal.explain_mail_error(SETTINGS, socket.timeout("timed out"))
    assert "refused" in refused and "refused" not in timeout


# =============================================================================
# test-email
# =============================================================================


def test_test_email_exits_0_when_the_server_takes_it(bed, cli):
    done = cli("test-email")
    assert done.returncode == 0, done.stderr
    (msg,) = bed.sink.messages
    assert msg["Auto-Submitted"] == "auto-generated"
    assert "owner@example.org" in done.stdout


def test_test_email_exits_1_with_a_clear_message_when_refused(bed, cli, closed_port):
    bed.configure(smtp_port=closed_port)
    done = cli("test-email")
    assert done.returncode == 1
    assert "refused" in done.stderr and "127.0.0.1:%d" % closed_port in done.stderr
    assert "Traceback" not in done.stderr


def _auth_config(bed, tmp_path):
    secret = tmp_path / "smtp-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    bed.configure(smtp_user="alice", smtp_password_file=secret)


def test_test_email_with_a_rejected_login_names_the_user_and_sends_nothing(bed, tmp_path, capsys):
    _auth_config(bed, tmp_path)
    bed.sink.mode = "auth-fail"
    assert selfheal.main(["test-email"]) == 1
    err = capsys.readouterr().err
    assert "alice" in err and "login" in err
    assert bed.sink.auth_attempts >= 1
    assert bed.sink.messages == []


def test_test_email_logs_in_when_smtp_user_is_set(bed, tmp_path):
    _auth_config(bed, tmp_path)
    assert selfheal.main(["test-email"]) == 0
    assert bed.sink.auth_attempts >= 1 and len(bed.sink.messages) == 1


def test_password_file_readable_by_others_or_not_roots_is_refused_when_root(tmp_path, monkeypatch):
    monkeypatch.setattr(selfheal, "is_root", lambda: True)
    secret = tmp_path / "smtp-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    uid = secret.stat().st_uid  # root's when the tests run as root, else the test user's
    with pytest.raises(selfheal.SelfhealError) as refused:
        selfheal.read_password(str(secret))
    if uid == 0:
        assert str(refused.value) == "%s: smtp_password_file must be mode 0600 or 0400" % secret
    else:
        assert str(refused.value) == ("%s: smtp_password_file is owned by uid %d; it must be owned by root "
                                      "(chown root:root %s)" % (secret, uid, secret))


def test_password_file_of_a_user_is_read_when_selfheal_is_not_root(tmp_path, not_root):
    secret = tmp_path / "smtp-password"  # a user's own test setup: the rules are for root's files
    secret.write_text("s3cret\n")
    secret.chmod(0o644)
    assert selfheal.read_password(str(secret)) == "s3cret"


def test_smtp_sink_unstuffs_dots_and_handles_rset_noop_and_quit(smtp_sink):
    # The sink is a test double: check it speaks the protocol it claims to.
    with socket.create_connection((smtp_sink.host, smtp_sink.port), timeout=5) as sock:
        stream = sock.makefile("rwb")

        def say(line):
            stream.write(line.encode() + b"\r\n")
            stream.flush()
            reply = stream.readline()
            while reply[3:4] == b"-":
                reply = stream.readline()
            return int(reply[:3])

        assert int(stream.readline()[:3]) == 220
        assert say("HELO test") == 250
        assert say("RCPT TO:<x@example.org>") == 503  # MAIL first
        assert say("MAIL FROM:<a@example.org>") == 250
        assert say("RSET") == 250
        assert say("MAIL FROM:<a@example.org>") == 250
        assert say("RCPT TO:<b@example.org>") == 250
        assert say("NOOP") == 250
        assert say("DATA") == 354
        assert say("Subject: dots\r\n\r\n..leading dot\r\nplain\r\n.") == 250
        assert say("QUIT") == 221
    (received,) = smtp_sink.received
    assert (received.mail_from, received.rcpt_to) == ("a@example.org", ("b@example.org",))
    assert received.message.get_content() == ".leading dot\nplain\n"


def test_flush_sets_aside_a_message_refused_for_good_and_sends_the_rest(bed):
    queue(bed, "refused for good")
    bed.sink.mode = "rcpt-550"
    assert flush(bed) == (0, 0)
    assert bed.spooled() == []
    [kept] = list(bed.paths.spool.glob("*.rejected"))  # set aside, never deleted unsent
    record = json.loads(kept.read_text())
    assert record["subject"] == "refused for good" and record["channels"]["mail"].startswith("rejected: ")
    assert "550" in record["channels"]["mail"]
    bed.sink.mode = "ok"
    queue(bed, "later report")
    assert flush(bed) == (1, 0)
    assert [m["Subject"] for m in bed.sink.messages] == ["later report"]


def test_flush_keeps_a_message_refused_for_now_in_the_queue(bed):
    queue(bed, "refused for now")
    bed.sink.mode = "rcpt-450"
    assert flush(bed) == (0, 1)
    assert len(bed.spooled()) == 1 and not list(bed.paths.spool.glob("*.rejected"))
