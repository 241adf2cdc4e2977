"""Drills for the data checks on a real systemd and postfix: a database file whose declared
owner and mode were changed is restored and the service restarted; a damaged SQLite file is
reported (FAILED, no restart, SQLite's own words); an env file holding secrets that everyone
can read is named in the report. (A deleted declared symlink: tests/test_drill_strategies.py.)"""

import time

import pytest

from drillkit import drill_conf
from drillkit import (about, body, clear_mailbox, drill_suites, http_get, installed_host,
                      kill, mails_about, show, starts, web_unit)

pytestmark = pytest.mark.drill



OWNED_DB = "/srv/owned/db.sqlite"
DAMAGED_DB = "/srv/damaged/db.sqlite"
LEAKY_ENV = "/etc/leaky/env"

UNITS = {
    "owned.service": web_unit(5040, args="--data " + OWNED_DB),
    "damaged.service": web_unit(5041, args="--data " + DAMAGED_DB),
    "leaky.service": web_unit(5042, "EnvironmentFile=%s\n" % LEAKY_ENV, args="--require-env API_KEY"),
}

CONFIG = drill_conf({"verify_timeout": "10s"}, {
    "owned": {"port": 5040, "strategies": "database_check, service_restart", "db_path": OWNED_DB,
              "db_owner": "nobody:nogroup", "db_mode": "0640"},
    "damaged": {"port": 5041, "strategies": "database_check, service_restart", "db_path": DAMAGED_DB},
    "leaky": {"port": 5042, "strategies": "environment_check, service_restart", "required_env": "API_KEY"},
})


def make_db(box, path, rows=0):
    box.run(["mkdir", "-p", path.rsplit("/", 1)[0]])
    box.run(["python3", "-c", "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
             "db.execute('create table books (title text)'); "
             "db.executemany('insert into books values (?)', [('x' * 500,)] * int(sys.argv[2])); "
             "db.commit()", path, str(rows)])


def prepare_box(box):
    make_db(box, OWNED_DB)
    box.run(["chown", "nobody:nogroup", OWNED_DB])
    box.run(["chmod", "0640", OWNED_DB])
    make_db(box, DAMAGED_DB, rows=200)  # several pages, so damage lands inside the b-tree
    box.write(LEAKY_ENV, "API_KEY=s3cret\nLOG_LEVEL=info\n", 0o644)


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("owned", "damaged", "leaky"),
                        ports=(5040, 5041, 5042), prepare=prepare_box) as box:
        yield box




def test_database_owner_and_mode_changed_are_restored_as_declared_and_service_restarted(host):
    clear_mailbox(host)
    host.run(["chown", "root:root", OWNED_DB])
    host.run(["chmod", "0666", OWNED_DB])
    kill(host, "owned")
    [mail] = host.wait_mail(about("owned", "RESOLVED"), timeout=30)
    text = body(mail)
    assert "chown nobody:nogroup %s" % OWNED_DB in text
    assert "chmod 0640 %s" % OWNED_DB in text
    assert "is mode 0666, not 0640" in text
    assert host.run(["stat", "-c", "%U:%G %a", OWNED_DB]).stdout.strip() == "nobody:nogroup 640"
    assert http_get(host, 5040) == "200"


def test_damaged_sqlite_file_fails_with_sqlites_words_and_is_not_restarted(host):
    clear_mailbox(host)
    before = host.run(["sha256sum", DAMAGED_DB]).stdout
    # Scribble over the second and third pages (the table's b-tree), as a torn write would.
    host.run(["dd", "if=/dev/urandom", "of=" + DAMAGED_DB, "bs=4096", "seek=1", "count=2", "conv=notrunc"])
    damaged = host.run(["sha256sum", DAMAGED_DB]).stdout
    assert damaged != before
    started = starts(host, "damaged.service")
    kill(host, "damaged")
    [mail] = host.wait_mail(about("damaged", "FAILED"), timeout=30)
    text = body(mail)
    assert "SQLite says %s is damaged" % DAMAGED_DB in text
    assert "Its database is damaged" in text  # the root cause, though systemd says SIGKILL
    assert "sqlite3 %s 'PRAGMA integrity_check'" % DAMAGED_DB in text  # a manual step
    time.sleep(3)
    assert starts(host, "damaged.service") == started, "selfheal restarted a service on damaged data"
    assert show(host, "damaged.service", "ActiveState") == "failed"
    assert host.run(["sha256sum", DAMAGED_DB]).stdout == damaged, "selfheal changed the damaged data"
    assert len(mails_about(host, "damaged")) == 1


def test_env_file_with_secrets_readable_by_everyone_is_named_in_the_report(host):
    clear_mailbox(host)
    kill(host, "leaky")
    [mail] = host.wait_mail(about("leaky", "RESOLVED"), timeout=30)
    text = body(mail)
    assert "%s is readable by everyone and holds API_KEY (chmod o-r %s)" % (LEAKY_ENV, LEAKY_ENV) in text
    assert "s3cret" not in text  # names only, never values
    assert host.run(["stat", "-c", "%a", LEAKY_ENV]).stdout.strip() == "644"  # reported, not changed
