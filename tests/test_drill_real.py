"""Drills on Debian's own nginx, Redis and PostgreSQL (installed in the bed, enabled here),
configured exactly as the README's examples say, on a real systemd and postfix:

- nginx: `config_check = /usr/sbin/nginx -t` runs inside selfheal@.service's sandbox: a
  SIGKILL of the master is healed (RESOLVED, nginx answers again); with a typo in its
  config the heal is FAILED quoting nginx's own error, and nginx is not restarted.
- PostgreSQL: `[postgresql]` with `port = 5432`, as a Debian user would first write it,
  names the oneshot wrapper postgresql.service: install refuses (78), naming the cluster's
  unit, and installs nothing. As the README writes it (`unit = postgresql@NN-main.service`)
  a SIGKILL of the postmaster is healed, and the watch leaves the healthy cluster alone.
- memcached: its health_command (a python3 one-liner) answers; the watch leaves it alone.
- Redis: `kill -STOP` of redis-server: the watch finds it hung through its
  `health_command` (redis-cli ping), heals it, and mails RESOLVED.
"""

import re
import time

import pytest

from bed import Container
from drillkit import STANDIN, drill_conf, readme_block, web_unit
from drillkit import (CLONE, wait_past_start_grace, REPO_INSIDE, about, body, clear_mailbox, drill_suites, http_get, kill,
                      mails_about, show, starts, wait_for, wait_idle)

pytestmark = pytest.mark.drill

GLOBAL = drill_conf({
    "verify_timeout": "15s",
    "watch_interval": "1h",  # the drills start the watch themselves (systemctl start selfheal-watch.service)
})


# The README's examples, word for word: the quick start's block (nginx, PostgreSQL, Redis;
# the cluster's version is the suite's) and memcached from "Debian's own services".
QUICK_START = readme_block("## Quick start")


def section_of(block, name):
    """One [section] of an ini block: its header and every line up to the next header."""
    lines, out, keep = block.splitlines(), [], False
    for line in lines:
        if line.startswith("["):
            keep = line == "[%s]" % name
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"


NGINX = section_of(QUICK_START, "nginx")
REDIS = section_of(QUICK_START, "redis-server")
POSTGRES = section_of(QUICK_START, "postgresql").replace("postgresql@15-main", "postgresql@{cluster}")
POSTGRES_AS_FIRST_WRITTEN = "\n".join(line for line in POSTGRES.splitlines() if not line.startswith("unit ")) + "\n"
MEMCACHED = readme_block("### Debian's own services")
BOOKS = """\
[books]
port = 5470
depends_on = postgresql
"""
SITE = "/etc/nginx/sites-available/default"  # sites-enabled/default links to it


def watch_once(box):
    """One watch run, as the timer would start it (a oneshot: returns when it is done)."""
    box.run(["systemctl", "start", "selfheal-watch.service"], timeout=120)


@pytest.fixture(scope="module", params=drill_suites("bookworm", "trixie"))  # Debian 12 and 13: what a user runs today
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with Container(suite=request.param, binds_ro={str(repo_root): REPO_INSIDE}) as box:
        box.run(["systemctl", "enable", "--now", "nginx", "redis-server", "postgresql", "memcached"], timeout=120)
        for port in (80, 6379, 5432, 11211):
            box.wait_listening(port, timeout=60)
        box.cluster = box.run(["sh", "-c", "ls /etc/postgresql"]).stdout.split()[0] + "-main"
        # An app that needs the database (it will not start without it), as [books] below.
        box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/standin.py", STANDIN])
        box.write("/etc/systemd/system/books.service", web_unit(5470, args="--needs-port 5432"))
        box.run(["systemctl", "daemon-reload"])
        box.run(["systemctl", "enable", "--now", "books.service"])
        box.wait_listening(5470)
        box.run(["cp", "-a", REPO_INSIDE, CLONE])
        # First as a Debian user would write [postgresql]: refused, nothing installed.
        box.write(CLONE + "/services.conf", GLOBAL + "\n" + NGINX + "\n" + POSTGRES_AS_FIRST_WRITTEN)
        box.refused = box.run([CLONE + "/install.sh"], check=False, timeout=120)
        box.validated = box.run(["python3", CLONE + "/selfheal.py", "validate", CLONE + "/services.conf"],
                                check=False)
        box.after_refusal = box.run(["sh", "-c", "ls -d /usr/local/lib/selfheal /etc/selfheal "
                                     "/etc/systemd/system/*.d/selfheal.conf /etc/systemd/system/selfheal* "
                                     "2>/dev/null; true"]).stdout.split()
        # Then as the README writes it.
        box.write(CLONE + "/services.conf", "\n".join([GLOBAL, NGINX, REDIS, POSTGRES.format(cluster=box.cluster),
                                                        MEMCACHED, BOOKS]))
        installed = box.run([CLONE + "/install.sh"], check=False, timeout=120)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        yield box


def test_postgresql_written_as_the_wrapper_unit_is_refused_naming_the_cluster_and_nothing_is_installed(host):
    out = host.refused.stdout + host.refused.stderr
    print(out)
    assert host.refused.returncode == 78, out
    unit = "postgresql@%s.service" % host.cluster
    [line] = [line for line in out.splitlines() if "[postgresql]" in line]
    assert re.match(r"^\S*services\.conf:\d+ \[postgresql\] port: postgresql\.service is a oneshot wrapper "
                    r"\(Type=oneshot, RemainAfterExit=yes, ExecStart=/bin/true\)", line), line
    assert "[postgresql] with unit = %s" % unit in line
    assert "1 problem(s); nothing was changed." in out
    assert host.after_refusal == []
    assert host.validated.returncode == 78 and "with unit = %s" % unit in host.validated.stderr


def test_heal_sandbox_lets_nginx_t_run_and_its_exposure_is_printed(host):
    done = host.run(["systemd-analyze", "security", "--no-pager", "selfheal@nginx.service"], check=False)
    print("systemd-analyze security (%s): %s" % (host.suite, done.stdout.strip().splitlines()[-1]))
    check = host.run(["systemd-run", "--wait", "--pipe", "--quiet", "-p", "CapabilityBoundingSet=" + show(
        host, "selfheal@nginx.service", "CapabilityBoundingSet"), "-p", "ProtectSystem=full", "-p", "PrivateTmp=yes",
        "-p", "PrivateDevices=yes", "-p", "NoNewPrivileges=yes", "/usr/sbin/nginx", "-t"], check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_nginx_master_killed_is_healed_after_nginx_t_passes_and_answers_again(host):
    clear_mailbox(host)
    before = starts(host, "nginx.service")
    killed = time.monotonic()
    kill(host, "nginx")
    [mail] = host.wait_mail(about("nginx", "RESOLVED"), timeout=60)
    print("nginx (%s): SIGKILL to the RESOLVED mail in the mailbox: %.2f s"
          % (host.suite, time.monotonic() - killed))
    text = body(mail)
    assert "config check: /usr/sbin/nginx -t: ok" in text, text
    assert http_get(host, 80, "/") == "200"
    assert starts(host, "nginx.service") == before + 1
    wait_idle(host, "nginx")


def test_nginx_with_a_typo_in_its_site_is_failed_with_nginx_s_own_error_and_not_restarted(host):
    clear_mailbox(host)
    host.run(["cp", SITE, "/root/default.good"])
    host.run(["sed", "-i", "0,/^server {/s//servr {/", SITE])
    before = starts(host, "nginx.service")
    kill(host, "nginx")
    [mail] = host.wait_mail(about("nginx", "FAILED"), timeout=60)
    text = body(mail)
    print(text)
    assert 'unknown directive "servr" in /etc/nginx/sites-enabled/default' in text
    assert "was not restarted" in text
    wait_idle(host, "nginx")
    watch_once(host)  # a known problem: the watch leaves it for a human
    wait_idle(host, "nginx")
    assert starts(host, "nginx.service") == before
    assert show(host, "nginx.service", "ActiveState") == "failed"
    assert len(mails_about(host, "nginx")) == 1
    # fixed by hand, as the mail says
    host.run(["cp", "/root/default.good", SITE])
    host.run(["systemctl", "start", "nginx"])
    assert http_get(host, 80, "/") == "200"


def test_postgres_cluster_killed_is_healed_and_answers_again(host):
    clear_mailbox(host)
    unit = "postgresql@%s.service" % host.cluster
    before = starts(host, unit)
    kill(host, unit)
    [mail] = host.wait_mail(about("postgresql", "RESOLVED"), timeout=90)
    text = body(mail)
    assert "/usr/bin/psql -X -q -At -c 'SELECT current_user'`: exit status 0: 'postgres'" in text, text
    assert host.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], check=False).returncode == 0
    assert starts(host, unit) == before + 1
    wait_idle(host, "postgresql")


def test_watch_never_restarts_the_healthy_cluster(host):
    clear_mailbox(host)
    unit = "postgresql@%s.service" % host.cluster
    before, wrapper = starts(host, unit), starts(host, "postgresql.service")
    pid = show(host, unit, "MainPID")
    for _ in range(3):
        watch_once(host)
    for name in ("postgresql", "memcached", "redis-server", "nginx"):
        state = host.run(["cat", "/run/selfheal/watch/%s.json" % name]).stdout
        assert '"verdict": "ok"' in state, state
    assert (starts(host, unit), starts(host, "postgresql.service"), show(host, unit, "MainPID")) == (
        before, wrapper, pid)
    assert mails_about(host, "postgresql") == []


def test_redis_stopped_with_sigstop_is_found_hung_by_redis_cli_ping_and_healed(host):
    clear_mailbox(host)
    wait_past_start_grace(host, "redis-server.service", 15)  # a young run is "starting", not hung
    pid = show(host, "redis-server.service", "MainPID")
    host.run(["kill", "-STOP", pid])
    watch_once(host)  # two looks in a row, 2 s apart, in one run (watch_confirm = 2)
    [mail] = host.wait_mail(about("redis-server", "RESOLVED"), timeout=90)
    text = body(mail)
    print(text)
    assert "/usr/bin/redis-cli -p 6379 ping`: no answer within 5 s" in text, text
    assert host.run(["redis-cli", "-p", "6379", "ping"]).stdout.strip() == "PONG"
    assert show(host, "redis-server.service", "MainPID") != pid


def test_redis_killed_is_brought_back_by_its_own_restart_always_and_mailed_once(host):
    clear_mailbox(host)
    wait_idle(host, "redis-server")
    pid = show(host, "redis-server.service", "MainPID")
    kill(host, "redis-server")
    wait_for(lambda: show(host, "redis-server.service", "MainPID") not in ("0", pid)
             and show(host, "redis-server.service", "ActiveState") == "active", 30, "systemd to restart redis")
    watch_once(host)  # systemd 252: the watch sees the restart count go up; 257: OnFailure= fired anyway
    [mail] = host.wait_mail(about("redis-server", "RESOLVED"), timeout=60)
    assert "recovered by systemd" in str(mail["Subject"]), mail["Subject"]
    wait_idle(host, "redis-server")
    watch_once(host)
    assert len(mails_about(host, "redis-server")) == 1
    assert host.run(["redis-cli", "-p", "6379", "ping"]).stdout.strip() == "PONG"


def test_postgresql_and_the_app_that_needs_it_killed_at_once_are_one_mail_led_by_postgresql(host):
    clear_mailbox(host)
    cluster = "postgresql@%s.service" % host.cluster
    before = {unit: starts(host, unit) for unit in (cluster, "books.service")}
    kill(host, cluster)
    kill(host, "books.service")
    [mail] = host.wait_mail(about("postgresql", "RESOLVED"), timeout=90)
    wait_for(lambda: show(host, "books.service", "ActiveState") == "active", 30, "books active again")
    wait_idle(host, "postgresql")
    wait_idle(host, "books")
    lines = body(mail).splitlines()
    assert lines[2] == "postgresql failed; books failed because of it.", body(mail)
    assert lines[3].startswith("  books: restarted after postgresql (service_restart), healthy in "), body(mail)
    assert mails_about(host, "books") == []
    assert [m["Subject"] for m in host.mails()] == [mail["Subject"]]
    # The database first, then the app, each started once: never against a dead database.
    assert {unit: starts(host, unit) - before[unit] for unit in before} == {cluster: 1, "books.service": 1}
    assert int(show(host, cluster, "ActiveEnterTimestampMonotonic")) < int(
        show(host, "books.service", "ActiveEnterTimestampMonotonic"))
    assert http_get(host, 5470) == "200"
