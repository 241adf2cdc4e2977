"""Drills on a real systemd: a full disk under selfheal's state and log directories.

A tiny tmpfs is mounted over /var/lib/selfheal and /var/log/selfheal inside the container
(their contents copied in) and filled to the last byte. A crashed service must still be
restarted, and its RESOLVED report mailed; what selfheal could not write is said clearly in
the journal, and selfheal@NAME.service does not crash. With the mail server down as well,
the report can be neither sent nor queued: it goes to the journal whole.
"""

import contextlib
import time

import pytest

from drillkit import drill_conf
from drillkit import (about, body, clear_mailbox, drill_suites, http_get, installed_host, kill, show,
                      wait_idle, web_unit)

pytestmark = pytest.mark.drill

UNITS = {"web.service": web_unit(5002)}

CONFIG = drill_conf({"smtp_timeout": "3s", "verify_timeout": "10s"},
                    {"web": {"port": 5002, "health_url": "http://127.0.0.1:5002/health"}})

FULL_DIRS = ("/var/lib/selfheal", "/var/log/selfheal")


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("web",), ports=(5002,)) as box:
        yield box


@contextlib.contextmanager
def full_disk(box, dirs=FULL_DIRS):
    """Each of dirs on its own 64 KiB tmpfs (with its contents), filled up; undone after."""
    try:
        for n, path in enumerate(dirs):
            keep = "/var/tmp/keep-%d" % n
            box.sh("mkdir -p {p} && rm -rf {k} && cp -a {p} {k} && mount -t tmpfs -o size=64k,mode=0755 tmpfs {p} "
                   "&& cp -a {k}/. {p}/".format(k=keep, p=path))
            box.sh("dd if=/dev/zero of={p}/filler bs=1k 2>/dev/null; :".format(p=path))
            assert "100%" in box.run(["df", "--output=pcent", path]).stdout
        yield
    finally:
        for path in dirs:
            box.run(["umount", path], check=False)


def history_lines(box):
    """history.jsonl as selfheal sees it (read inside: the tmpfs is not visible from the host)."""
    done = box.run(["cat", "/var/lib/selfheal/history.jsonl"], check=False)
    return [line for line in done.stdout.splitlines() if line.strip()]


def heal_journal(box):
    return box.journal("selfheal@web.service", lines=400)




def test_full_state_and_log_disks_still_heal_and_mail_resolved_and_say_what_was_not_written(host):
    clear_mailbox(host)
    host.run(["journalctl", "--rotate"], check=False)
    old_pid = show(host, "web", "MainPID")
    with full_disk(host):
        before = history_lines(host)
        started = time.monotonic()
        kill(host, "web")
        [mail] = host.wait_mail(about("web", "RESOLVED"), timeout=60)
        print("full disk: crash to RESOLVED mail in %.2f s" % (time.monotonic() - started))
        wait_idle(host, "web")
        assert http_get(host, 5002) == "200"
        assert show(host, "web", "MainPID") not in ("0", old_pid)
        assert "from failure to verified healthy" in body(mail)
        assert show(host, "selfheal@web.service", "Result") == "success"
        journal = heal_journal(host)
        assert "could not write the history" in journal and "No space left on device" in journal
        assert "Traceback" not in journal
        assert history_lines(host) == before  # nothing half-written
    # Space is back: the next heal is recorded again.
    clear_mailbox(host)
    kill(host, "web")
    host.wait_mail(about("web", "RESOLVED"), timeout=60)
    wait_idle(host, "web")
    assert history_lines(host)[-1:] and '"outcome": "RESOLVED"' in history_lines(host)[-1]


def test_full_disk_and_mail_server_down_heals_and_puts_the_whole_report_in_the_journal(host):
    clear_mailbox(host)
    host.run(["systemctl", "stop", "postfix"])
    try:
        with full_disk(host):
            kill(host, "web")
            deadline = time.monotonic() + 60
            while "nor queue it" not in heal_journal(host):
                assert time.monotonic() < deadline, heal_journal(host)
                time.sleep(0.2)
            wait_idle(host, "web")
            assert http_get(host, 5002) == "200"
            journal = heal_journal(host)
            assert "the report follows:" in journal and "ROOT CAUSE" in journal
            assert "Traceback" not in journal
            assert show(host, "selfheal@web.service", "Result") == "success"
            assert not host.sh("ls /var/lib/selfheal/spool/ | grep -v '^$'", check=False).stdout.strip()
    finally:
        host.run(["systemctl", "start", "postfix"])
