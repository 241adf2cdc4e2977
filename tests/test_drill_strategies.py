"""Drills for triage and the repair strategies on a real systemd and postfix: a config its
checker rejects, a required variable gone from the env file, a declared database symlink
deleted; a FAILED incident reminded in its thread; a config that stops loading mailed with
the last good settings. (Port conflicts: tests/test_drill_heal.py. OOM: the containers here get no memory
controller, so it is proven in the fast layer from systemd's oom-kill result.)"""

import json
import time

import pytest

from drillkit import drill_conf
from drillkit import (about, body, clear_mailbox, drill_suites, http_get, installed_host,
                      mails_about, show, starts, web_unit)

pytestmark = pytest.mark.drill



UNITS = {
    "checked.service": web_unit(5030, args="--config /etc/checked/app.conf"),
    "envy.service": web_unit(5031, "EnvironmentFile=/etc/envy/env\n", args="--require-env DATABASE_URL"),
    "linked.service": web_unit(5032, args="--data /var/lib/linked/db.sqlite"),
}

CHECKER = """#!/usr/bin/python3
import sys
text = open("/etc/checked/app.conf").read()
if "valid" not in text:
    print("/etc/checked/app.conf: line 1: unknown directive %r" % text.split()[0])
    sys.exit(1)
print("configuration ok")
"""

CONFIG = drill_conf({"watch_interval": "5s", "verify_timeout": "10s",
                     "reminder_interval": "20s"}, {  # short, so the reminder drill below sees one
    "checked": {"port": 5030, "strategies": "service_restart, config_validation",
                "config_check": "/usr/local/bin/check-checked --strict", "config_files": "/etc/checked/app.conf"},
    "envy": {"port": 5031, "strategies": "service_restart, environment_check", "required_env": "DATABASE_URL"},
    "linked": {"port": 5032, "strategies": "database_check, service_restart", "db_path": "/srv/data/db.sqlite",
               "symlinks": "/var/lib/linked/db.sqlite -> /srv/data/db.sqlite"},
})


def prepare_box(box):
    box.write("/etc/checked/app.conf", "valid: yes\nlisten: 5030\n")
    box.write("/usr/local/bin/check-checked", CHECKER, 0o755)
    box.write("/etc/envy/env", "# envy\nDATABASE_URL=sqlite:///srv/envy.db\nLOG_LEVEL=info\n", 0o600)
    box.run(["mkdir", "-p", "/srv/data", "/var/lib/linked"])
    box.run(["python3", "-c", "import sqlite3; db = sqlite3.connect('/srv/data/db.sqlite'); "
             "db.execute('create table books (title text)'); db.commit()"])
    box.run(["ln", "-s", "/srv/data/db.sqlite", "/var/lib/linked/db.sqlite"])


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("checked", "envy", "linked"),
                        ports=(5030, 5031, 5032), prepare=prepare_box) as box:
        yield box




def test_config_its_checker_rejects_is_not_restarted_then_heals_once_fixed(host):
    time.sleep(6)  # a watch run sees it healthy and keeps the config it started with
    clear_mailbox(host)
    host.write("/etc/checked/app.conf", "lisen: 5030\n")  # a typo, and "valid" gone
    host.run(["systemctl", "restart", "checked"], check=False)
    [mail] = host.wait_mail(about("checked", "FAILED"), timeout=30)
    text = body(mail)
    assert "config_validation moved first" in text  # triage: the journal says config error
    assert "config check: /usr/local/bin/check-checked --strict: FAILED" in text
    assert "line 1: unknown directive 'lisen:'" in text  # the checker's own words
    assert "was not restarted" in text
    assert "/etc/checked/app.conf: CHANGED since the last healthy start" in text
    assert "+lisen: 5030" in text and "-valid: yes" in text
    started = starts(host, "checked")
    time.sleep(3)
    assert starts(host, "checked") == started, "selfheal restarted a service whose config is broken"
    assert len(mails_about(host, "checked")) == 1

    host.write("/etc/checked/app.conf", "valid: yes\nlisten: 5030\n")
    host.run(["selfheal", "heal", "checked"])
    host.wait_mail(about("checked", "RESOLVED"), timeout=30)
    assert http_get(host, 5030) == "200"


def test_required_variable_removed_from_the_env_file_fails_naming_file_and_variable(host):
    clear_mailbox(host)
    host.write("/etc/envy/env", "# envy\nLOG_LEVEL=info\n", 0o600)
    host.run(["systemctl", "restart", "envy"], check=False)
    [mail] = host.wait_mail(about("envy", "FAILED"), timeout=30)
    text = body(mail)
    assert "environment_check moved first" in text
    assert "DATABASE_URL is not set (looked in /etc/envy/env" in text
    assert "not restarted" in text
    started = starts(host, "envy")
    time.sleep(3)
    assert starts(host, "envy") == started and show(host, "envy", "ActiveState") == "failed"
    assert len(mails_about(host, "envy")) == 1


def test_deleted_database_symlink_is_recreated_and_the_mail_names_it(host):
    clear_mailbox(host)
    dry = host.run(["selfheal", "heal", "linked", "--dry-run"]).stdout
    assert "Triage:" in dry
    host.run(["rm", "/var/lib/linked/db.sqlite"])
    host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "linked"])
    [mail] = host.wait_mail(about("linked", "RESOLVED"), timeout=30)
    text = body(mail)
    assert "recreate symlink /var/lib/linked/db.sqlite -> /srv/data/db.sqlite: ok" in text
    assert "SQLite quick_check: ok" in text
    assert host.run(["readlink", "/var/lib/linked/db.sqlite"]).stdout.strip() == "/srv/data/db.sqlite"
    assert http_get(host, 5032) == "200"


def test_unresolved_failure_is_reminded_in_its_thread(host):
    # envy was left FAILED by the drill above: the watch reminds, replying to that mail
    # (the first of the incident's thread).
    thread = json.loads(host.read("/var/lib/selfheal/services/envy.json"))["incident"]["message_id"]
    [reminder] = host.wait_mail(about("envy", "STILL FAILING"), timeout=45)
    assert reminder["In-Reply-To"].strip() == thread  # a long id may be folded onto its own line
    assert "journalctl -u envy.service" in body(reminder)


def test_a_config_that_stops_loading_is_mailed_with_the_last_good_settings(host):
    clear_mailbox(host)
    good = host.read("/etc/selfheal/services.conf")
    host.write("/etc/selfheal/services.conf", good.replace("[envy]", "[envy]\nprot = 5031"))
    try:
        [mail] = host.wait_mail(lambda m: "selfheal - CONFIG BROKEN" in str(m["Subject"]), timeout=30)
        assert "[envy] prot: unknown key (did you mean 'port'?)" in body(mail)
        time.sleep(12)  # more watch runs: still one mail (hourly at most)
        assert len([m for m in host.mails() if "CONFIG BROKEN" in str(m["Subject"])]) == 1
    finally:
        host.write("/etc/selfheal/services.conf", good)
