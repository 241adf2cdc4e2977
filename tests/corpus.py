"""The failure corpus: failures hosts really have, on Debian's own nginx, PostgreSQL, Redis and
memcached (configured as the README's quick start says) and on small apps of our own, each
written down before it was measured: how it is broken, what should come of it (healed, or
reported because a restart cannot fix it) and its cause in plain words.

tests/bench_corpus.py runs them in the drill bed (one container per suite, one scenario after
the other) and measures each against what is written here. Data only, and the host they run on.

Shell snippets run inside the container with /bin/sh -c; {cluster}, {pgver}, {pgconf} and
{pgdata} are filled in from the suite's PostgreSQL (15 on Debian 12, 17 on 13).
"""

import dataclasses
from typing import Tuple

from drillkit import DRILL_SETTINGS, REPO_INSIDE, STANDIN, readme_block, web_unit


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    service: str            # the services.conf section the mail is about
    broken: str             # how it is broken, in plain words
    expect: str             # "healed" or "reported" (a restart cannot fix it)
    cause: str              # the cause, in plain words
    cause_re: str           # what ROOT CAUSE must say for the cause to count as named (regex, any case)
    trigger: str            # sh: break it (the clock starts before this)
    undo: str = ""          # sh: what a human does to fix it afterwards (not timed)
    prepare: str = ""       # sh: before the clock starts (backups, the files it breaks: changed before
                            # the benchmark's snapshot of /etc and /srv, so they are not selfheal's)
    by: str = "crash"       # "crash" (systemd notices: OnFailure=) or "watch" (only the watch can)
    touches: Tuple[str, ...] = ()   # units besides the service's own that may be restarted
    no_restart: bool = False  # restarting the service is itself a wrong action here
    squatter: bool = False    # the scenario starts a foreign process that must survive
    grace: bool = False       # a hang: wait until the run is past start_grace first
    wait: float = 120.0       # seconds to wait for the mail
    also_healthy: Tuple[str, ...] = ()  # other services that must be healthy again (a chain)


UNITS = {  # section -> unit; postgresql's is the suite's cluster
    "nginx": "nginx.service", "postgresql": "postgresql@{cluster}.service",
    "redis-server": "redis-server.service", "memcached": "memcached.service",
    "notes": "notes.service", "books": "books.service", "jobs": "jobs.service",
}

SITE = "/etc/nginx/sites-available/default"
KILL = "systemctl kill --kill-who=main -s KILL %s"
NOTES_ENV = "/etc/notes/notes.env"
NOTES_DB = "/srv/notes/notes.db"
# A process of no unit selfheal knows, on port 80 (bound, never answering HTTP).
SQUAT = ("systemd-run --unit=squatter --quiet /usr/bin/python3 -c \"import socket, time; s = socket.socket(); "
         "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 80)); s.listen(); "
         "time.sleep(86400)\"")
# systemd in the bed cannot always kill a whole cgroup (EIO: FACTS.md), so a stopped unit's
# other processes (nginx's workers) may live on and keep serving. What systemd does on a real
# host, done by hand after a stop: every process left in the unit's cgroup killed.
REAP = ("for f in /sys/fs/cgroup/unified/system.slice/%(unit)s/cgroup.procs /sys/fs/cgroup/systemd/system.slice/"
        "%(unit)s/cgroup.procs /sys/fs/cgroup/system.slice/%(unit)s/cgroup.procs; do [ -r $f ] && grep -v -x -e 0 -e 1 $f "
        "| xargs -r kill -KILL; done; true")
# (cgroup.procs lists a process of another PID namespace as 0, and `kill 0` is the caller's whole
# process group: on the host, the benchmark itself.)
STOP = "systemctl stop %(unit)s; " + REAP
# A crash of nginx: its master and its workers at once, which is where a real host ends up
# (systemd kills the workers when the master dies; in the bed that sometimes fails, and the
# workers would keep port 80 from the new run: a failure of the bed, not one of the corpus).
CRASH_NGINX = "m=$(systemctl show -p MainPID --value nginx); kill -KILL $m $(pgrep -P $m); true"
GET = "python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:5480%s', timeout=2)\" || true"


SCENARIOS = (
    # ---- hangs first: every service is past its start_grace once, right after boot ----
    Scenario("nginx-hung", "nginx", "every nginx process stopped (SIGSTOP): port open, no answer",
             "healed", "it hung (no answer)", r"hung|no answer|timed out",
             CRASH_NGINX.replace("KILL", "STOP"), by="watch", grace=True),
    Scenario("redis-hung", "redis-server", "redis-server stopped (SIGSTOP): ping unanswered",
             "healed", "it hung (no answer)", r"hung|no answer|timed out",
             KILL.replace("KILL", "STOP") % "redis-server", by="watch", grace=True),
    Scenario("memcached-hung", "memcached", "memcached stopped (SIGSTOP)",
             "healed", "it hung (no answer)", r"hung|no answer|timed out",
             KILL.replace("KILL", "STOP") % "memcached", by="watch", grace=True),
    Scenario("redis-cannot-save", "redis-server",
             "/var/lib/redis made read-only (chmod 500), then BGSAVE: Redis answers MISCONF, still serves reads",
             "reported", "Redis cannot save to disk (persistence error), not a hang",
             r"sav|persist|disk|MISCONF|writ",
             "redis-cli bgsave >/dev/null", prepare="chmod 500 /var/lib/redis",
             undo="chmod 750 /var/lib/redis; redis-cli bgsave >/dev/null 2>&1; true",
             by="watch", no_restart=True, grace=True, wait=360),
    Scenario("postgresql-logins-fail", "postgresql",
             "the data directory made unreadable (chmod 000) while PostgreSQL runs: pg_isready passes, "
             "every login fails", "reported", "logins fail: permission denied on its data directory",
             r"login|permission|connect|denied",
             "true", prepare="chmod 000 {pgdata}", undo="chmod 700 {pgdata}", by="watch", no_restart=True, grace=True, wait=150),
    # ---- crashes ----
    Scenario("nginx-killed", "nginx", "nginx's master killed (SIGKILL)", "healed", "killed with SIGKILL",
             r"SIGKILL|killed", CRASH_NGINX),
    Scenario("nginx-missing-semicolon", "nginx",
             "a `;` missing in sites-enabled/default, then the master killed", "reported",
             "its configuration is invalid (nginx -t names the line)", r"config|nginx -t|not terminated",
             CRASH_NGINX, prepare="cp -p %s /root/site.bak && sed -i 's|root /var/www/html;|root /var/www/html|' %s"
             % (SITE, SITE), undo="cp -p /root/site.bak %s" % SITE),
    Scenario("nginx-log-dir-gone", "nginx", "/var/log/nginx removed (a log cleanup gone wrong), then the master "
             "killed", "reported", "a directory it needs is missing (/var/log/nginx)",
             r"no such file|missing|/var/log/nginx", CRASH_NGINX,
             prepare="mv /var/log/nginx /var/log/nginx.gone", undo="mv /var/log/nginx.gone /var/log/nginx"),
    Scenario("postgresql-killed", "postgresql", "the postmaster killed (SIGKILL)", "healed", "killed with SIGKILL",
             r"SIGKILL|killed", KILL % "postgresql@{cluster}"),
    Scenario("postgresql-bad-max-connections", "postgresql",
             "max_connections = lots in postgresql.conf, then the postmaster killed", "reported",
             "its configuration is invalid (max_connections)", r"config|max_connections|invalid value",
             KILL % "postgresql@{cluster}", prepare="cp -p {pgconf} /root/pg.bak && echo 'max_connections = lots' >> {pgconf}",
             undo="cp -p /root/pg.bak {pgconf}"),
    Scenario("postgresql-bad-shared-buffers", "postgresql",
             "shared_buffers = 128XB in postgresql.conf, then the postmaster killed", "reported",
             "its configuration is invalid (shared_buffers)", r"config|shared_buffers|invalid value",
             KILL % "postgresql@{cluster}", prepare="cp -p {pgconf} /root/pg.bak && echo 'shared_buffers = 128XB' >> {pgconf}",
             undo="cp -p /root/pg.bak {pgconf}"),
    Scenario("postgresql-datadir-mode", "postgresql",
             "the data directory chmod 000, then the postmaster killed", "reported",
             "permission denied on its data directory", r"permission|mode|denied",
             KILL % "postgresql@{cluster}", prepare="chmod 000 {pgdata}", undo="chmod 700 {pgdata}"),
    Scenario("postgresql-and-books-killed", "postgresql",
             "the postmaster and the app that needs it (books) killed at once", "healed",
             "killed with SIGKILL (books failed because of it)", r"SIGKILL|killed",
             KILL % "postgresql@{cluster}" + "; " + KILL % "books", touches=("books.service",),
             also_healthy=("books",)),
    Scenario("redis-killed", "redis-server", "redis-server killed (SIGKILL); its Restart=always brings it back",
             "healed", "killed with SIGKILL", r"SIGKILL|killed", KILL % "redis-server"),
    Scenario("redis-config-typo", "redis-server", "`bind` misspelt `bindd` in redis.conf, then killed (it loops "
             "under Restart=always)", "reported", "its configuration is invalid", r"config",
             KILL % "redis-server",
             prepare="cp -p /etc/redis/redis.conf /root/redis.bak && sed -i 's/^bind /bindd /' /etc/redis/redis.conf",
             undo="cp -p /root/redis.bak /etc/redis/redis.conf"),
    Scenario("memcached-killed", "memcached", "memcached killed (SIGKILL); its Restart=always brings it back",
             "healed", "killed with SIGKILL", r"SIGKILL|killed", KILL % "memcached"),
    Scenario("memcached-bad-option", "memcached", "an unknown option (-Q) added to /etc/memcached.conf, then "
             "killed", "reported", "its configuration is invalid (an unknown option)", r"config|invalid option|option",
             KILL % "memcached", prepare="cp -p /etc/memcached.conf /root/memcached.bak && echo '-Q' >> /etc/memcached.conf",
             undo="cp -p /root/memcached.bak /etc/memcached.conf"),
    Scenario("notes-killed", "notes", "the notes app killed (SIGKILL)", "healed", "killed with SIGKILL",
             r"SIGKILL|killed", KILL % "notes"),
    Scenario("notes-runtime-error", "notes", "a bug: its main loop raises RuntimeError (exit status 1)", "healed",
             "a RuntimeError in its own code (the traceback's last line)", r"RuntimeError",
             GET % "/crash"),
    Scenario("notes-out-of-memory", "notes", "a leak: it allocates past MemoryMax=64M (LimitAS=768M where the bed "
             "cannot enforce MemoryMax=)", "healed", "it ran out of memory", r"memory|oom", GET % "/leak"),
    Scenario("notes-watchdog", "notes", "its main loop blocks: no WATCHDOG=1 within WatchdogSec=3", "healed",
             "it stopped answering systemd's watchdog (hung)", r"watchdog|hung", GET % "/freeze"),
    Scenario("notes-secret-missing", "notes", "NOTES_SECRET deleted from its environment file, then restarted "
             "(a deploy)", "reported", "a required environment variable (NOTES_SECRET) is missing",
             r"NOTES_SECRET|environment", "systemctl restart notes || true",
             prepare="cp -p %s /root/notes.env.bak && sed -i '/^NOTES_SECRET=/d' %s" % (NOTES_ENV, NOTES_ENV),
             undo="cp -p /root/notes.env.bak %s" % NOTES_ENV),
    Scenario("notes-db-mode", "notes", "its SQLite file chmod 000, then restarted (a deploy): it cannot open it",
             "healed", "its database file's mode was wrong (permission denied); the declared 0640 restored",
             r"mode|permission|unable to open", "systemctl restart notes || true",
             prepare="chmod 000 %s" % NOTES_DB, undo="chmod 640 %s" % NOTES_DB),
    Scenario("notes-db-corrupt", "notes", "its SQLite file's header overwritten, then restarted",
             "reported", "its database file is damaged (not a database)", r"damaged|malformed|not a database|corrupt",
             "systemctl restart notes || true",
             prepare="cp -p %s /root/notes.db.bak && printf 'garbage garbage garbage!' | dd of=%s bs=1 conv=notrunc "
             "status=none" % (NOTES_DB, NOTES_DB), undo="cp -p /root/notes.db.bak %s" % NOTES_DB),
    Scenario("jobs-child-holds-port", "jobs", "the main process killed; its forked child (KillMode=process) "
             "keeps the port", "healed", "its port was held by a leftover process of its own",
             r"port|leftover|child", KILL % "jobs"),
    # ---- stopped, and a port taken: only the watch sees these ----
    Scenario("nginx-stopped", "nginx", "systemctl stop nginx (not a failure for systemd)", "healed",
             "it was stopped cleanly", r"stopped", STOP % {"unit": "nginx.service"}, by="watch"),
    Scenario("postgresql-stopped", "postgresql", "the cluster stopped (systemctl stop)", "healed",
             "it was stopped cleanly", r"stopped", STOP % {"unit": "postgresql@{cluster}.service"}, by="watch"),
    Scenario("redis-stopped", "redis-server", "systemctl stop redis-server", "healed", "it was stopped cleanly",
             r"stopped", STOP % {"unit": "redis-server.service"}, by="watch"),
    Scenario("nginx-port-taken", "nginx", "nginx stopped, and a process of no unit binds port 80 before it is "
             "started again", "reported", "port 80 is held by another process (named)",
             r"port 80|held|taken|in use", STOP % {"unit": "nginx.service"} + "; " + SQUAT,
             undo="systemctl stop squatter", by="watch", no_restart=True, squatter=True),
)


# ---- the host -----------------------------------------------------------------------

NOTES_UNIT = """\
[Unit]
Description=notes (a small app of the corpus: env file, SQLite, MemoryMax=, watchdog)
[Service]
Type=notify
User=notes
EnvironmentFile=/etc/notes/notes.env
ExecStart=/usr/bin/python3 /usr/local/bin/notes-app
WatchdogSec=3
MemoryMax=64M
# The bed's cgroup v1 hierarchy gives a container no memory controller: where MemoryMax= is not
# enforced, the address-space limit ends the leak (MemoryError) instead.
LimitAS=768M
[Install]
WantedBy=multi-user.target
"""

EXTRA_SERVICES = """\
[notes]
port = 5480
health_url = http://127.0.0.1:5480/health
strategies = environment_check, database_check, service_restart
env_file = /etc/notes/notes.env
required_env = NOTES_SECRET, NOTES_DB
db_path = /srv/notes/notes.db
db_owner = notes
db_mode = 0640

[books]
port = 5470
health_url = http://127.0.0.1:5470/health
depends_on = postgresql

[jobs]
port = 5490
health_url = http://127.0.0.1:5490/health
strategies = port_conflict, service_restart
"""

# The corpus runs selfheal as a user would: defaults, but it breaks the same services many
# times an hour on purpose (no escalation, no FLAPPING), and a FAILED one is not retried
# behind the benchmark's back (retry_interval = 0).
GLOBAL = """\
[selfheal]
name = %(name)s
email_to = %(email_to)s
email_from = %(email_from)s
failure_threshold = 256
flap_threshold = 1000
retry_interval = 0
""" % DRILL_SETTINGS


def section_of(block, name):
    """One [section] of an ini block: its header and every line up to the next header."""
    out, keep = [], False
    for line in block.splitlines():
        if line.startswith("["):
            keep = line == "[%s]" % name
        if keep:
            out.append(line)
    return "\n".join(out) + "\n"


def services_conf(cluster):
    """services.conf of the corpus: the README's quick start for nginx, PostgreSQL (this
    suite's cluster) and Redis, "Debian's own services" for memcached, and the apps."""
    quick = readme_block("## Quick start")
    postgres = section_of(quick, "postgresql").replace("postgresql@15-main", "postgresql@" + cluster)
    return "\n".join([GLOBAL, section_of(quick, "nginx"), postgres, section_of(quick, "redis-server"),
                      readme_block("### Debian's own services"), EXTRA_SERVICES])


def prepare_host(box):
    """Debian's services enabled, the apps installed and started (before selfheal)."""
    box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/standin.py", STANDIN])
    box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/corpus_app.py", "/usr/local/bin/notes-app"])
    box.sh("id notes >/dev/null 2>&1 || useradd --system --home-dir /srv/notes --shell /usr/sbin/nologin notes; "
           "install -d -o notes -g notes -m 0750 /srv/notes; install -d -m 0755 /etc/notes")
    box.write(NOTES_ENV, "# notes: its settings\nNOTES_SECRET=corpus-not-a-real-secret\nNOTES_DB=%s\n"
              "NOTES_PORT=5480\n" % NOTES_DB, mode=0o640)
    box.sh("chgrp notes %s" % NOTES_ENV)
    box.write("/etc/systemd/system/notes.service", NOTES_UNIT)
    box.write("/etc/systemd/system/books.service", web_unit(5470, args="--needs-port 5432"))
    box.write("/etc/systemd/system/jobs.service", web_unit(5490, "KillMode=process\n", args="--fork-child"))
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "enable", "--now", "nginx", "redis-server", "postgresql", "memcached", "notes"],
            timeout=180)
    for port in (80, 6379, 5432, 11211, 5480):
        box.wait_listening(port, timeout=60)
    box.sh("chmod 640 %s" % NOTES_DB)
    box.run(["systemctl", "enable", "--now", "books", "jobs"], timeout=60)
    for port in (5470, 5490):
        box.wait_listening(port, timeout=30)
    ver = box.run(["sh", "-c", "ls /etc/postgresql"]).stdout.split()[0]
    return {"cluster": ver + "-main", "pgver": ver, "pgconf": "/etc/postgresql/%s/main/postgresql.conf" % ver,
            "pgdata": "/var/lib/postgresql/%s/main" % ver}


# What "healthy" means to the benchmark (not to selfheal): each service does its job. Run
# inside the container in one python3, printing the healthy ones.
PROBE = r"""
import json, socket, subprocess, sys, urllib.request
def http(port, path="/"):
    try:
        return urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=2).status == 200
    except Exception:
        return False
def cmd(argv, want):
    try:
        return want in subprocess.run(argv, capture_output=True, text=True, timeout=4).stdout
    except Exception:
        return False
def memcached():
    try:
        s = socket.create_connection(("127.0.0.1", 11211), 2); s.settimeout(2)
        s.sendall(b"version\r\n"); return s.recv(64).startswith(b"VERSION")
    except Exception:
        return False
checks = {
    "nginx": lambda: http(80),
    "postgresql": lambda: cmd(["runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-c", "SELECT 1"], "1"),
    "redis-server": lambda: cmd(["redis-cli", "-p", "6379", "ping"], "PONG"),
    "memcached": memcached,
    "notes": lambda: http(5480, "/health"),
    "books": lambda: http(5470, "/health"),
    "jobs": lambda: http(5490, "/health"),
}
print(json.dumps([name for name in sys.argv[1:] if checks[name]()]))
"""

# What systemd would have killed on a real host (see REAP): processes left in a unit's cgroup
# that are not its current run (not MainPID or below it). Run inside before each scenario.
STRAYS = r"""
import os, signal, subprocess, sys
for unit in sys.argv[1:]:
    show = subprocess.run(["systemctl", "show", "-p", "MainPID,ControlGroup", unit], capture_output=True, text=True,
                          timeout=10).stdout
    props = dict(line.split("=", 1) for line in show.splitlines() if "=" in line)
    main, group = int(props.get("MainPID") or 0), props.get("ControlGroup") or "/system.slice/" + unit
    pids = set()
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup"):
        try:
            pids |= {int(p) for p in open(root + group + "/cgroup.procs").read().split()}
        except OSError:
            pass
    for pid in pids - {0, 1}:  # 0: another PID namespace's process; os.kill(0) would be our own group
        chain, p = [], pid
        while p > 1 and p != main and len(chain) < 50:
            chain.append(p)
            try:
                p = int(open("/proc/%d/stat" % p).read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        if p != main or not main:
            try:
                os.kill(pid, signal.SIGKILL)
                print("%s: stray %d killed" % (unit, pid))
            except OSError:
                pass
"""
