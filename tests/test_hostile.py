"""Hostile and broken input: one table, one row per condition. Each row gives selfheal the
input (a config, a command line, a file in its state, spool or history, a full disk) and says
what must come out: a clear error with its exit status and nothing changed on the fake host
(no file under the test's root, no systemctl action), or, where the input is not an error
(a torn history line, a damaged queued mail, a full disk), the safe behaviour instead.

Whatever the row, the directory every hostile symlink points at ("elsewhere") is never
written, and no row ends in a traceback."""

import dataclasses
import email
import email.policy
import errno
import json
import os
import time
from pathlib import Path
from typing import Callable, List, Optional

import pytest

import selfheal
from conftest import queue_report

WORKER = "worker.service"
ROOT = os.geteuid() == 0
STRANGER = 4242  # a uid that is not root

GLOBAL = """\
[selfheal]
name = MiracleMax
email_to = owner@example.org
email_from = selfheal@example.org
"""


class Hostile:
    """The bed (fake host, SMTP sink, config) plus a place hostile symlinks point at."""

    def __init__(self, bed, tmp_path, capsys, caplog, monkeypatch):
        self.bed, self.host, self.paths = bed, bed.host, bed.paths
        self.tmp, self.capsys, self.caplog, self.monkeypatch = tmp_path, capsys, caplog, monkeypatch
        self.elsewhere = tmp_path / "elsewhere"
        self.elsewhere.mkdir()
        (self.elsewhere / "precious").write_text("not selfheal's\n")
        (self.elsewhere / "planted.eml").write_bytes(
            b"Subject: planted\r\nFrom: a@example.org\r\nTo: b@example.org\r\n\r\nnot from selfheal\r\n")
        (self.elsewhere / "planted.json").write_text(json.dumps({
            "subject": "planted", "body": "not from selfheal", "channels": {"mail": "queued"}}))
        self.arg = ""  # a path a row hands to its command

    # -- inputs -----------------------------------------------------------------------
    def conf(self, text, name="hostile.conf", mode=0o644) -> str:
        path = self.tmp / name
        path.write_text(text, encoding="utf-8")
        path.chmod(mode)
        self.arg = str(path)
        return str(path)

    def queue(self, subject="good"):
        return queue_report(self.paths, self.bed.config.settings, subject)

    def spool_file(self, data: bytes, name="0000000000001-deadbeef.eml"):
        self.paths.spool.mkdir(parents=True, exist_ok=True)
        path = self.paths.spool / name
        path.write_bytes(data)
        return path

    def history(self, text: str):
        self.paths.state.mkdir(parents=True, exist_ok=True)
        self.paths.history.write_text(text, encoding="utf-8")

    def link(self, path: Path, target: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)

    def disk_full(self, *dirs):
        """Every state, history, status, log and queue write under dirs fails with ENOSPC."""
        roots = [str(d) for d in dirs]

        def full(real):
            def write(path, *args, **kwargs):
                if any(str(path).startswith(r) for r in roots):
                    raise OSError(errno.ENOSPC, "No space left on device", str(path))
                return real(path, *args, **kwargs)
            return write
        self.monkeypatch.setattr(selfheal, "atomic_write", full(selfheal.atomic_write))
        self.monkeypatch.setattr(selfheal, "append_line", full(selfheal.append_line))

    # -- actions: each returns (exit status, everything said: stdout, stderr, the log) ------
    def main(self, *argv):
        rc = selfheal.main([a.format(arg=self.arg, conf=self.bed.config_path) for a in argv])
        return rc, self.said()

    def heal(self, name="worker"):
        rc, out = self.bed.heal(name)
        return rc, out + self.said()

    def flush(self):
        sent, left = selfheal.flush_outbox(self.bed.config, self.paths)["mail"]
        return None, "sent %d left %d\n%s" % (sent, left, self.said())

    def said(self):
        captured = self.capsys.readouterr()
        return captured.out + captured.err + self.caplog.text

    # -- what the host looks like ----------------------------------------------------------
    def snapshot(self) -> dict:
        """Every file, directory and link under the test's root (but the fakes' call log)."""
        seen = {}
        for dirpath, dirnames, filenames in os.walk(str(self.tmp)):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                if name == "fake-calls.jsonl":
                    continue
                st = os.lstat(path)
                seen[path] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns,
                              os.readlink(path) if os.path.islink(path) else None)
        return seen

    def elsewhere_untouched(self):
        assert sorted(p.name for p in self.elsewhere.iterdir()) == ["planted.eml", "planted.json", "precious"]
        assert (self.elsewhere / "precious").read_text() == "not selfheal's\n"
        assert (self.elsewhere / "planted.eml").read_bytes().startswith(b"Subject: planted")

    def restarted(self) -> bool:
        return any("restart" in c and WORKER in c for c in self.host.actions())

    def subjects(self) -> List[str]:
        return [str(m["Subject"]) for m in self.bed.sink.messages]


@dataclasses.dataclass
class Row:
    id: str
    act: Callable[[Hostile], tuple]
    code: Optional[int]  # the exit status; None: not a command
    said: str = ""  # words that must be said (stdout, stderr or the log)
    setup: Callable[[Hostile], None] = lambda h: None
    then: Optional[Callable[[Hostile], None]] = None  # the safe behaviour; None: nothing changed
    root: bool = False  # needs root: it makes files root's or another user's (os.chown)
    as_root: bool = False  # selfheal runs as root would (the as_root fixture): heal, pause, resume


def config_row(id, text, said, **kw):
    """`selfheal.py validate FILE` with this text: exit 78, the problem said, nothing changed."""
    return Row(id, lambda h: h.main("validate", "{arg}"), 78, said, setup=lambda h: h.conf(text), **kw)


def service(*lines):
    return GLOBAL + "\n[web]\n" + "".join(line + "\n" for line in lines)


def name_row(id, argv, said="is not listed"):
    """A service name from the command line that is not a listed service: exit 2, nothing changed."""
    return Row(id, lambda h: h.main("-c", "{conf}", *argv), 2, said, as_root=argv[0] != "status")


def pause_row(id, setup, said):
    """A trusted file (the config, the SMTP password) that root must not trust: exit 78,
    nothing changed (a `pause` that went through would write the service's state)."""
    return Row(id, lambda h: h.main("-c", "{arg}", "pause", "worker"), 78, said, setup=setup, root=True)


def config_fifo(h):
    fifo = h.tmp / "fifo.conf"
    os.mkfifo(str(fifo))
    h.arg = str(fifo)


def config_linked_from_a_public_directory(h):
    trusted_config()(h)
    public = h.tmp / "public"
    public.mkdir()
    public.chmod(0o777)
    (public / "services.conf").symlink_to(h.arg)
    h.arg = str(public / "services.conf")


MAIL_CONF = GLOBAL + "smtp_user = alice\nsmtp_password_file = {pw}\n\n[worker]\n"


def password_file(mode=0o600, owner=0, link=False):
    def setup(h):
        secret = h.tmp / "smtp-password"
        secret.write_text("hunter2\n")
        secret.chmod(mode)
        os.chown(str(secret), owner, owner)
        pw = secret
        if link:
            pw = h.tmp / "smtp-password-link"
            pw.symlink_to(secret)
        h.conf(MAIL_CONF.format(pw=pw))
    return setup


def trusted_config(mode=0o644, owner=0, folder_mode=None, folder_owner=0):
    def setup(h):
        folder = h.tmp / "etc-selfheal"
        folder.mkdir()
        os.chown(h.conf(GLOBAL + "\n[worker]\n", name="etc-selfheal/services.conf", mode=mode), owner, owner)
        os.chown(str(folder), folder_owner, folder_owner)
        folder.chmod(folder_mode or 0o755)
    return setup


# -- the safe behaviours ---------------------------------------------------------------

def healed_and_mailed(h):
    assert h.restarted()
    assert any("worker - RESOLVED" in s for s in h.subjects()), h.subjects()


def failing_worker(h):
    h.host.failed(WORKER)


def spool_symlinked(h):
    failing_worker(h)
    h.link(h.paths.spool, h.elsewhere)


def spool_symlinked_smtp_down(h):
    spool_symlinked(h)
    h.bed.configure(smtp_port=h.closed_port)


def spool_symlinked_not_sent(h):
    assert h.bed.sink.messages == []


def healed_but_not_queued_through_the_link(h):
    assert h.restarted()
    assert h.bed.sink.messages == []


def queued_link(name):
    def setup(h):
        h.link(h.paths.spool / name, h.elsewhere / ("planted" + Path(name).suffix))
        h.queue("good")
    return setup


def link_skipped_rest_sent(name):
    def then(h):
        assert h.subjects() == ["good"]
        assert (h.paths.spool / name).is_symlink()
    return then


def history_link(h):
    failing_worker(h)
    h.link(h.paths.history, h.elsewhere / "precious")


def state_link(h):
    failing_worker(h)
    h.link(h.paths.state, h.elsewhere)


def services_link(h):
    h.link(h.paths.state / "services", h.elsewhere)


def log_link(h):
    failing_worker(h)
    h.link(h.paths.service_log("worker"), h.elsewhere / "precious")


def damaged_spool(data, name="0000000000001-deadbeef.eml"):
    """A damaged queued file: a record of the outbox (.json) or a mail an older selfheal queued (.eml)."""
    def setup(h):
        h.spool_file(data, name)
        time.sleep(0.002)
        h.queue("good")
    return setup


def set_aside_rest_sent(h):
    assert h.subjects() == ["good"]
    assert (h.paths.spool / "0000000000001-deadbeef.bad").is_file()
    assert list(h.paths.spool.glob("*.eml")) == [] and selfheal.outbox(h.paths) == []


def spool_dir_named_eml(h):
    (h.paths.spool / "0000000000001-deadbeef.eml").mkdir(parents=True)
    h.queue("good")


def dir_skipped_rest_sent(h):
    assert h.subjects() == ["good"]
    assert (h.paths.spool / "0000000000001-deadbeef.eml").is_dir()


EVENT = {"ts": 1700000000.0, "service": "worker", "outcome": "RESOLVED", "trigger": "onfailure"}


def event_line(**kw):
    return json.dumps(dict(EVENT, **kw), sort_keys=True) + "\n"


def torn_history(h):
    failing_worker(h)
    h.history(event_line() + event_line(ts=1700000100.0) + '{"ts": 17000002')


def torn_line_alone_next_heal_whole(h):
    healed_and_mailed(h)
    lines = h.paths.history.read_text().splitlines()
    assert lines[2] == '{"ts": 17000002'  # the torn line stays alone ...
    assert len(lines) == 4 and json.loads(lines[3])["outcome"] == "RESOLVED"  # ... the new one is whole
    assert len(selfheal.read_history(h.paths, "worker")) == 3
    events, damaged, _ = selfheal.read_heal_events(h.paths)
    assert (len(events), damaged) == (3, 1)


def history_with(*lines):
    def setup(h):
        failing_worker(h)
        h.history("".join(lines) + event_line(ts=1700000100.0))
    return setup


def odd_lines_skipped(h):
    healed_and_mailed(h)
    ts = [e["ts"] for e in selfheal.read_history(h.paths, "worker")]
    assert ts[0] == 1700000100.0 and len(ts) == 2


def service_state_text(text):
    def setup(h):
        failing_worker(h)
        h.paths.service_state("worker").parent.mkdir(parents=True)
        h.paths.service_state("worker").write_text(text)
    return setup


def left_paused(h):
    assert not h.restarted()
    assert h.bed.sink.messages == []


def tampered_thread(h):
    failing_worker(h)
    state = {"incident": {"opened": time.time() - 60, "failures": [], "flapping": False, "problem": "",
                          "message_id": "<a@example.org>\r\nBcc: victim@example.org", "mails": 1}}
    h.paths.service_state("worker").parent.mkdir(parents=True)
    h.paths.service_state("worker").write_text(json.dumps(state))


def no_injected_header(h):
    healed_and_mailed(h)
    received = h.bed.sink.messages[-1]
    assert received["Bcc"] is None and received["In-Reply-To"] is None
    assert all(r == "owner@example.org" for m in h.bed.sink.received for r in m.rcpt_to)


def hostile_hostname(h):
    config = selfheal.parse_config(GLOBAL.replace("name = MiracleMax\n", "") + "\n[worker]\n",
                                   hostname="evil\r\nBcc: victim@example.org")
    msg = selfheal.make_message(config.settings, selfheal.make_subject(
        config.settings, selfheal.Outcome.RESOLVED, "worker", "RESOLVED"), "body\n")
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    return None, "%s|%s|%s" % (config.settings.name, parsed["Subject"], parsed["Bcc"])


def hostile_subject(h):
    msg = selfheal.make_message(h.bed.config.settings, "worker - RESOLVED\r\nBcc: victim@example.org\x85\u2028",
                                "body\n")
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    return None, "%s|%s" % (parsed["Subject"], parsed["Bcc"])


def disk_full(h):
    failing_worker(h)
    h.disk_full(h.paths.state, h.paths.logs)


def disk_full_smtp_down(h):
    disk_full(h)
    h.bed.configure(smtp_port=h.closed_port)


def watch_failing_twice(h):
    for _ in range(2):
        selfheal.report_watch_failure(h.bed.config, h.paths, "OSError: [Errno 28] No space left on device")
    return None, h.said()


def one_watch_failure_mail(h):
    assert [s for s in h.subjects() if "WATCH FAILED" in s] == ["❌ MiracleMax: selfheal - WATCH FAILED"]


def healed_report_in_the_log(h):
    healed_but_not_queued_through_the_link(h)
    assert "the report follows:" in h.caplog.text and "ROOT CAUSE" in h.caplog.text


ROWS = [
    # Service and unit names: section header, unit =, and the command line.
    config_row("section-name-with-slash", GLOBAL + "\n[web/../../etc]\n", "a service name is 1-64"),
    config_row("section-name-dot-dot", GLOBAL + "\n[..]\n", "a service name is 1-64"),
    config_row("section-name-with-space", GLOBAL + "\n[story stages]\n", "a service name is 1-64"),
    config_row("section-name-with-percent-specifier", GLOBAL + "\n[web%n]\n", "a service name is 1-64"),
    config_row("section-name-with-shell-metacharacters", GLOBAL + "\n[web;$(reboot)]\n", "a service name is 1-64"),
    config_row("section-name-over-64-characters", GLOBAL + "\n[%s]\n" % ("a" * 65), "a service name is 1-64"),
    config_row("unit-with-slash", service("unit = ../../etc/passwd.service"), "not a service unit name"),
    config_row("unit-with-dot-dot", service("unit = web@...service"), "not a service unit name"),
    config_row("unit-with-space", service("unit = web app.service"), "not a service unit name"),
    config_row("unit-with-percent-specifier", service("unit = web%i.service"), "not a service unit name"),
    config_row("unit-with-shell-metacharacters", service("unit = web;$(reboot).service"), "not a service unit name"),
    config_row("unit-with-newline-continuation", service("unit = web.service", "  ExecStartPre=/bin/sh -c reboot"),
               "not a service unit name"),
    config_row("unit-over-255-characters", service("unit = %s.service" % ("a" * 250)), "not a service unit name"),
    name_row("heal-name-with-slash", ["heal", "../../etc/passwd"]),
    name_row("heal-name-with-newline", ["heal", "worker\nBcc: victim@example.org"], r"'worker\nBcc"),
    name_row("heal-name-with-terminal-escape", ["heal", "\x1b]0;owned\x07"], r"'\x1b]0;owned\x07'"),
    name_row("pause-name-with-shell-metacharacters", ["pause", "$(reboot); rm -rf /"]),
    name_row("resume-name-over-long", ["resume", "w" * 5000]),
    name_row("status-service-with-percent-and-slash", ["status", "--service", "%n/../web"], "not in"),
    # Paths a strategy reads or repairs: absolute, no .., one line.
    config_row("db-path-climbing-out-with-dot-dot", service("strategies = database_check",
               "db_path = /var/lib/web/../../../etc/shadow"), "absolute path without spaces or .."),
    config_row("symlinks-pair-with-a-relative-target", service("strategies = database_check", "db_path = /srv/web",
               "symlinks = /srv/web/current -> ../../etc"), "absolute path without spaces or .."),
    config_row("env-file-with-newline-continuation", service("strategies = environment_check",
               "env_file = /etc/web.env", "  /etc/shadow"), "absolute path without spaces or .."),
    # Header injection: everything that reaches a mail header.
    config_row("name-with-bcc-continuation", GLOBAL.replace("MiracleMax", "MiracleMax\n  Bcc: victim@example.org")
               + "\n[worker]\n", "1-78 printable characters on one line"),
    config_row("name-with-escape-character", GLOBAL.replace("MiracleMax", "Miracle\x1b[2JMax") + "\n[worker]\n",
               "1-78 printable characters on one line"),
    config_row("name-with-unicode-line-separator", GLOBAL.replace("MiracleMax", "MiracleMax\u2028Bcc: v@example.org")
               + "\n[worker]\n", "1-78 printable characters on one line"),
    config_row("smtp-user-with-next-line-character", GLOBAL + "smtp_user = alice\x85AUTH\nsmtp_password_file = /p\n"
               "\n[worker]\n", "1-78 printable characters on one line"),
    config_row("email-to-with-bcc-continuation", GLOBAL.replace("owner@example.org", "owner@example.org\n"
               "  Bcc: victim@example.org") + "\n[worker]\n", "is not a mail address"),
    config_row("email-from-with-angle-brackets", GLOBAL.replace("selfheal@example.org",
               "<selfheal@example.org>, victim@example.org") + "\n[worker]\n", "not a mail address"),
    config_row("smtp-user-with-newline", GLOBAL + "smtp_user = alice\n  AUTH PLAIN x\nsmtp_password_file = /p\n"
               "\n[worker]\n", "1-78 printable characters on one line"),
    Row("host-name-with-crlf-is-not-the-subject", hostile_hostname, None, "localhost|✅ localhost: worker - "
        "RESOLVED|None"),
    Row("subject-with-crlf-or-unicode-line-break-stays-one-header", hostile_subject, None,
        "worker - RESOLVED Bcc: victim@example.org |None"),
    Row("thread-id-with-crlf-in-state-is-dropped", lambda h: h.heal(), 0, "RESOLVED", setup=tampered_thread,
        then=no_injected_header),
    # health_url that is not http(s).
    config_row("health-url-file", service("health_url = file:///etc/shadow"), "must be an http:// or https:// URL"),
    config_row("health-url-ftp", service("health_url = ftp://example.org/"), "must be an http:// or https:// URL"),
    config_row("health-url-gopher", service("health_url = gopher://example.org/"), "must be an http:// or https://"),
    config_row("health-url-javascript", service("health_url = javascript:alert(1)"), "must be an http:// or https://"),
    config_row("health-url-without-host", service("health_url = http:///health"), "must be an http:// or https://"),
    config_row("health-url-with-space", service("health_url = http://example.org/a b"), "spaces or control"),
    # Files root must trust: the config and the SMTP password.
    pause_row("config-group-writable", trusted_config(mode=0o664), "writable by group or others"),
    pause_row("config-world-writable", trusted_config(mode=0o646), "writable by group or others"),
    pause_row("config-owned-by-another-user", trusted_config(owner=STRANGER), "owned by uid %d" % STRANGER),
    pause_row("config-in-a-world-writable-directory", trusted_config(folder_mode=0o777),
              "which someone besides root can write"),
    pause_row("config-linked-from-a-world-writable-directory", config_linked_from_a_public_directory,
              "which someone besides root can write"),
    pause_row("config-in-another-users-directory", trusted_config(folder_owner=STRANGER),
              "which someone besides root can write"),
    pause_row("password-file-mode-0644", password_file(mode=0o644), "is mode 644; it must be 0600"),
    pause_row("password-file-owned-by-another-user", password_file(owner=STRANGER), "owned by uid %d" % STRANGER),
    pause_row("password-file-is-a-symlink", password_file(link=True), "is a symlink; name the file itself"),
    # Not a config file at all: refused at once, never read forever or hung on.
    Row("config-is-a-fifo", lambda h: h.main("validate", "{arg}"), 78, "not a regular file", setup=config_fifo),
    Row("config-is-dev-zero", lambda h: h.main("validate", "/dev/zero"), 78, "/dev/zero: not a regular file"),
    Row("config-is-a-directory", lambda h: h.main("validate", "{arg}"), 78, "not a regular file",
        setup=lambda h: setattr(h, "arg", str(h.elsewhere))),
    Row("config-over-a-mebibyte", lambda h: h.main("validate", "{arg}"), 78, "a services.conf is at most",
        setup=lambda h: h.conf(GLOBAL + "#" * (1 << 20))),
    # Symlinks in the state, spool and log directories: never written through.
    Row("spool-dir-symlinked-elsewhere-smtp-down", lambda h: h.heal(), 0, "is a symlink",
        setup=spool_symlinked_smtp_down, then=healed_but_not_queued_through_the_link),
    Row("spool-dir-symlinked-elsewhere-flush", lambda h: h.flush(), None, "is a symlink; selfheal neither sends",
        setup=spool_symlinked, then=spool_symlinked_not_sent),
    Row("queued-file-symlinked-elsewhere", lambda h: h.flush(), None, "sent 1 left 0",
        setup=queued_link("0000000000001-deadbeef.json"), then=link_skipped_rest_sent("0000000000001-deadbeef.json")),
    Row("old-queued-mail-symlinked-elsewhere", lambda h: h.flush(), None, "sent 1 left 0",
        setup=queued_link("0000000000001-deadbeef.eml"), then=link_skipped_rest_sent("0000000000001-deadbeef.eml")),
    Row("history-file-symlinked-elsewhere", lambda h: h.heal(), 0, "could not write the history",
        setup=history_link, then=healed_and_mailed),
    Row("state-dir-symlinked-elsewhere", lambda h: h.heal(), 0, "is a symlink, not a directory",
        setup=state_link, then=healed_and_mailed),
    Row("services-state-dir-symlinked-elsewhere-pause", lambda h: h.main("-c", "{conf}", "pause", "worker"), 1,
        "could not pause worker", setup=services_link, as_root=True),
    Row("service-log-symlinked-elsewhere", lambda h: h.heal(), 0, "could not write the service log",
        setup=log_link, then=healed_and_mailed),
    # Damaged queued mail: set aside, the rest delivered.
    Row("spool-file-garbage", lambda h: h.flush(), None, "is damaged", setup=damaged_spool(b"\x00\x01 garbage"),
        then=set_aside_rest_sent),
    Row("spool-file-empty", lambda h: h.flush(), None, "is damaged", setup=damaged_spool(b""),
        then=set_aside_rest_sent),
    Row("spool-file-cut-off-in-the-headers", lambda h: h.flush(), None, "is damaged",
        setup=damaged_spool(b"Subject: =?utf-8?q?=E2=9C=85?= MiracleMax: worker - RESOLVED\r\nFrom: selfheal@ex"),
        then=set_aside_rest_sent),
    Row("spool-file-binary-after-a-subject", lambda h: h.flush(), None, "is damaged",
        setup=damaged_spool(b"Subject: x\r\nTo: owner@example.org\r\n\r\n\x00\xff\xfe\x89PNG"),
        then=set_aside_rest_sent),
    Row("outbox-record-garbage", lambda h: h.flush(), None, "is damaged",
        setup=damaged_spool(b"\x00\x01 garbage", "0000000000001-deadbeef.json"), then=set_aside_rest_sent),
    Row("outbox-record-cut-off", lambda h: h.flush(), None, "is damaged",
        setup=damaged_spool(b'{"subject": "half', "0000000000001-deadbeef.json"), then=set_aside_rest_sent),
    Row("outbox-record-with-an-unknown-channel", lambda h: h.flush(), None, "is damaged",
        setup=damaged_spool(b'{"subject": "x", "body": "", "channels": {"pager": "queued"}}',
                            "0000000000001-deadbeef.json"), then=set_aside_rest_sent),
    Row("outbox-record-not-an-object", lambda h: h.flush(), None, "is damaged",
        setup=damaged_spool(b'["subject"]', "0000000000001-deadbeef.json"), then=set_aside_rest_sent),
    Row("spool-entry-that-is-a-directory", lambda h: h.flush(), None, "sent 1 left 0", setup=spool_dir_named_eml,
        then=dir_skipped_rest_sent),
    # The history and the state: damaged lines are skipped, never fatal.
    Row("history-torn-last-line", lambda h: h.heal(), 0, "RESOLVED", setup=torn_history,
        then=torn_line_alone_next_heal_whole),
    Row("history-line-whose-ts-is-not-a-time", lambda h: h.heal(), 0, "RESOLVED",
        setup=history_with(event_line(ts="soon"), event_line(ts=None)), then=odd_lines_skipped),
    Row("history-binary-and-non-object-lines", lambda h: h.heal(), 0, "RESOLVED",
        setup=history_with("\x00\x01\x02\n", "[1, 2]\n", '"worker"\n'), then=odd_lines_skipped),
    Row("service-state-pause-that-is-not-a-time", lambda h: h.heal(), 0, "is paused; not healing",
        setup=service_state_text('{"paused_until": "soon"}'), then=left_paused),
    Row("service-state-garbage", lambda h: h.heal(), 0, "RESOLVED", setup=service_state_text("\x00{garbage"),
        then=healed_and_mailed),
    # A full disk under the state and log directories (ENOSPC on every write there).
    Row("disk-full-heals-and-mails", lambda h: h.heal(), 0, "No space left on device", setup=disk_full,
        then=healed_and_mailed),
    Row("disk-full-and-smtp-down-heals-and-logs-the-whole-report", lambda h: h.heal(), 0,
        "nor queue it", setup=disk_full_smtp_down, then=healed_report_in_the_log),
    Row("disk-full-watch-failure-mailed-once-not-every-run", watch_failing_twice, None, "could not note that",
        setup=lambda h: h.disk_full(h.paths.state), then=one_watch_failure_mail),
]


@pytest.fixture
def hostile(bed, tmp_path, capsys, caplog, monkeypatch, closed_port):
    caplog.set_level("INFO", logger="selfheal")
    h = Hostile(bed, tmp_path, capsys, caplog, monkeypatch)
    h.closed_port = closed_port
    return h


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_hostile_input_gets_a_clear_answer_and_no_side_effect(hostile, row, request):
    if row.root and not ROOT:
        pytest.skip("a file of root's or of another user is made with os.chown, as root only")
    if row.as_root:
        request.getfixturevalue("as_root")
    row.setup(hostile)
    hostile.said()  # what setting up said is not the row's answer
    hostile.host.clear_calls()
    before = hostile.snapshot()
    code, said = row.act(hostile)
    if row.code is not None:
        assert code == row.code, said
    assert row.said in said, said
    assert "Traceback" not in said
    hostile.elsewhere_untouched()
    if row.then is None:
        assert hostile.snapshot() == before
        assert hostile.host.actions() == []
        assert hostile.bed.sink.messages == []
    else:
        row.then(hostile)


def test_the_table_has_at_least_25_rows_and_unique_ids():
    assert len(ROWS) >= 25
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.skipif(not ROOT, reason="a root-owned config is made with os.chown, as root only")
def test_root_owned_config_in_a_root_only_directory_is_trusted_and_pause_works(hostile):
    trusted_config()(hostile)
    code, said = hostile.main("-c", "{arg}", "pause", "worker")
    assert code == 0, said
    assert selfheal.paused_until(hostile.paths, "worker") == 0.0
