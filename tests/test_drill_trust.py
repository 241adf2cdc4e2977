"""Drills written as the attacker: a service runs as its own Unix account `app`, owns its data
directory /srv/app, its env file and its config files, and tries to make selfheal (root) act
through what it controls (STYLE.md habit 15: never follow its links, never block on it, bound
what is read, escape control characters, never echo a value).

One container per suite, one service per vector (ports 5060-5069), the webhook sink on 5079.
The service "crashes itself": its own account SIGKILLs its main process. What each vector
plants is checked first (the link really is app's, the marker really is in the root file), so
a failure here is selfheal's, not the drill's. A marker (MARKER_..._<random>) stands for a
secret: it must never reach a mail, a webhook post or a file others can read under selfheal's
directories, unless a test says otherwise (the journal's own lines may go to the owner by mail).
"""

import json
import secrets
import time

import pytest

from drillkit import drill_conf
from drillkit import REPO_INSIDE, body, drill_suites, installed_host, mails_about, show, wait_idle, web_unit

pytestmark = pytest.mark.drill

TOKEN = secrets.token_hex(4)
M_ROOTFILE = "MARKER_ROOTFILE_" + TOKEN  # in /root/secret.env (root, 0600)
M_ENVVAL = "MARKER_ENVVAL_" + TOKEN  # a value in app's own env file, on a line that does not parse
M_ENVVAL2 = "MARKER_ENVVAL2_" + TOKEN  # a value in app's own env file, on a good line
M_ROOTCONF = "MARKER_ROOTCONF_" + TOKEN  # in /root/secret.conf (root, 0600)
M_URLPW = "MARKER_URLPW_" + TOKEN  # the password in a health_url
M_JOURNAL = "MARKER_JOURNAL_" + TOKEN  # what the service prints to its journal
SECRET_MARKERS = (M_ROOTFILE, M_ENVVAL, M_ENVVAL2, M_ROOTCONF, M_URLPW)  # never in mail, post or readable file

APP = "app"
ROOT_ENV = "/root/secret.env"
ROOT_CONF = "/root/secret.conf"
DB = "/srv/app/db.sqlite"
DB_TARGET = "/var/lib/dpkg/info/dash.postinst"  # root's, 0755: chown/chmod through a link would change it
DIR_DB_PARENT = "/srv/app2/data"
DIR_TARGET_DIR = "/var/lib/dpkg/info"
DIR_DB = DIR_DB_PARENT + "/base-files.postinst"
DIR_TARGET = DIR_TARGET_DIR + "/base-files.postinst"
ENV_LINK = "/srv/app/env-link"
ENV_VALUES = "/srv/app/env-values"
ENV_ZERO = "/srv/app/env-zero"
CONF_LINK = "/srv/app/conf-link"
CONF_FIFO = "/srv/app/conf-fifo"

SINK_PORT = 5079
SINK = "/usr/local/bin/http-sink"
SINK_LOG = "/var/log/http-sink.jsonl"
HOOK = "/hook"
SCANNED = ("/var/lib/selfheal", "/var/log/selfheal", "/run/selfheal", "/etc/selfheal")
HEAL_DEADLINE = 60  # seconds a heal or a watch run may take, whatever the service does
AS_APP = "User=%s\nGroup=%s\n" % (APP, APP)

PORTS = {"dblink": 5060, "dirlink": 5061, "envlink": 5062, "envvals": 5063, "conflink": 5064,
         "envzero": 5065, "conffifo": 5066, "urlpw": 5067, "weird": 5068, "journal": 5069}

UNITS = {name + ".service": web_unit(port, AS_APP) for name, port in PORTS.items()}
UNITS["conflink.service"] = web_unit(PORTS["conflink"], AS_APP, args="--config " + CONF_LINK)
UNITS["weird.service"] = web_unit(PORTS["weird"], AS_APP, args="--weird-reply")
UNITS["journal.service"] = web_unit(PORTS["journal"], AS_APP, args="--say " + M_JOURNAL)
UNITS["hooksink.service"] = ("[Unit]\nDescription=HTTP sink of the drill (webhook)\n[Service]\n"
                             "ExecStart=/usr/bin/python3 %s %d %s\n" % (SINK, SINK_PORT, SINK_LOG))

CONFIG = drill_conf({
    "verify_timeout": "10s",
    "smtp_timeout": "3s",
    "watch_interval": "1h",  # The drill runs the watch itself, when it wants a look.
    "webhook_url": "http://127.0.0.1:%d%s" % (SINK_PORT, HOOK),
    "webhook_timeout": "2s",
}, {
    "dblink": {"port": PORTS["dblink"], "strategies": "database_check, service_restart", "db_path": DB,
               "db_owner": "app:app", "db_mode": "0640"},
    "dirlink": {"port": PORTS["dirlink"], "strategies": "database_check, service_restart", "db_path": DIR_DB,
                "db_owner": "app:app", "db_mode": "0640"},
    "envlink": {"port": PORTS["envlink"], "strategies": "environment_check, service_restart", "env_file": ENV_LINK},
    "envvals": {"port": PORTS["envvals"], "strategies": "environment_check, service_restart", "env_file": ENV_VALUES},
    "conflink": {"port": PORTS["conflink"], "strategies": "config_validation, service_restart",
                 "config_files": CONF_LINK},
    "envzero": {"port": PORTS["envzero"], "strategies": "environment_check, service_restart", "env_file": ENV_ZERO},
    "conffifo": {"port": PORTS["conffifo"], "strategies": "config_validation, service_restart",
                 "config_files": CONF_FIFO},
    "urlpw": {"port": PORTS["urlpw"],
              "health_url": "http://watcher:%s@127.0.0.1:%d/health" % (M_URLPW, PORTS["urlpw"])},
    # Started by its test, not at boot; stopped before that is not news.
    "weird": {"port": PORTS["weird"], "health_url": "http://127.0.0.1:%d/health" % PORTS["weird"],
              "on_stopped": "ignore"},
    "journal": {"port": PORTS["journal"]},
})


# Reading /dev/zero whole eats all memory; the drill machine is shared. An address-space
# rlimit on this one heal makes that a quick MemoryError instead (the drill's own guard,
# not selfheal's: a selfheal that does not follow the link never comes near it).
ZERO_GUARD = ("/etc/systemd/system/selfheal@envzero.service.d/trust-drill-guard.conf",
              "# tests/test_drill_trust.py: keep a heal that reads /dev/zero off the shared machine\n"
              "[Service]\nLimitAS=2G\n")


def as_app(box, script, **kw):
    """A shell command run by the service's own account: what the attacker can do."""
    return box.run(["runuser", "-u", APP, "--", "/bin/sh", "-c", script], **kw)


def prepare_box(box):
    box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/http_sink.py", SINK])
    box.run(["useradd", "--system", "--user-group", APP])
    box.run(["install", "-d", "-o", APP, "-g", APP, "-m", "0750", "/srv/app", "/srv/app2", DIR_DB_PARENT])
    as_app(box, "umask 077 && python3 -c \"import sqlite3; db = sqlite3.connect('%s'); "
                "db.execute('create table t (x)'); db.commit()\" && chmod 0640 %s" % (DB, DB))
    as_app(box, "umask 027 && echo app-data > %s" % DIR_DB)
    as_app(box, "umask 077 && for f in %s %s %s; do echo GREETING=hello > $f; done" % (ENV_LINK, ENV_VALUES, ENV_ZERO))
    # Config files older than the service's start: the watch keeps a copy of them (a baseline).
    as_app(box, "umask 077 && for f in %s %s; do printf 'valid\\nlisten 0\\n' > $f; touch -d '-1 hour' $f; done"
           % (CONF_LINK, CONF_FIFO))
    box.sh("umask 077 && printf 'APP_SECRET=%s\\nBAD-NAME=%s\\n' > %s && printf 'listen %s\\n' > %s"
           % (M_ROOTFILE, M_ROOTFILE, ROOT_ENV, M_ROOTCONF, ROOT_CONF))
    box.run(["mkdir", "-p", ZERO_GUARD[0].rsplit("/", 1)[0]])
    box.write(ZERO_GUARD[0], ZERO_GUARD[1])


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    started = [n for n in PORTS if n != "weird"] + ["hooksink"]
    ports = [p for n, p in PORTS.items() if n != "weird"] + [SINK_PORT]
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=started, ports=ports,
                        prepare=prepare_box) as box:
        yield box


# ---- what the attacker does ---------------------------------------------------------------


def crash_as_app(box, name):
    """The service kills its own main process (SIGKILL, as its own account): a crash.
    Returns the heal's InactiveExitTimestampMonotonic before, to see the heal start."""
    before = show(box, "selfheal@%s.service" % name, "InactiveExitTimestampMonotonic")
    pid = show(box, name + ".service", "MainPID")
    assert pid not in ("", "0"), "%s is not running before the attack: %s" % (name, box.journal(name + ".service"))
    as_app(box, "kill -9 %s" % pid)
    return before


def lstat(box, path):
    """owner, type and target of `path` itself (not followed)."""
    kind = box.run(["stat", "-c", "%U %F", path]).stdout.strip()
    return kind, box.run(["readlink", path], check=False).stdout.strip()


def fingerprint(box, path):
    """uid, gid, mode, size, mtime and sha256 of `path` (a root file an attack aims at)."""
    stat = box.run(["stat", "-c", "uid=%u gid=%g mode=%a size=%s mtime=%Y", path]).stdout.strip()
    return stat + " sha256=" + box.run(["sha256sum", path]).stdout.split()[0]


# ---- what selfheal did ----------------------------------------------------------------------


def wait_heal(box, name, before, timeout=HEAL_DEADLINE):
    """Wait until selfheal@NAME.service started after `before` and ended; seconds it took
    from now, or None if it still ran after `timeout`."""
    unit = "selfheal@%s.service" % name
    started = time.monotonic()
    deadline = started + timeout
    while show(box, unit, "InactiveExitTimestampMonotonic") in (before, "", "0"):
        if time.monotonic() > deadline:
            raise AssertionError("no heal started for %s within %d s\n%s" % (
                name, timeout, box.journal(name + ".service")))
        time.sleep(0.05)
    while box.run(["systemctl", "is-active", unit], check=False).stdout.strip() in ("activating", "active",
                                                                                     "deactivating"):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)
    return time.monotonic() - started


def wait_mails(box, name, timeout=30):
    """Every mail about service `name`, once at least one is there."""
    box.wait_mail(lambda m: (": %s - " % name) in str(m["Subject"]), timeout=timeout)
    time.sleep(1)  # a second report of the same heal (a retry) would be here by now
    return mails_about(box, name)


def mail_text(msg):
    """Subject, headers and every text part of a mail, decoded."""
    parts = ["%s: %s" % (k, v) for k, v in msg.items()]
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            parts.append(part.get_content())
    return "\n".join(parts)


def all_mails(box):
    return [(str(m["Subject"]), mail_text(m)) for m in box.mails()]


def posts(box):
    try:
        text = box.read(SINK_LOG)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def readable_files(box):
    """{path: text} of every regular file others may read under selfheal's directories, read
    inside the container (/run is a tmpfs there), and the files of /var/log/selfheal that
    others may read at all."""
    code = ("import json, os, stat, sys\n"
            "found = {}\n"
            "for top in sys.argv[1:]:\n"
            "    for root, dirs, files in os.walk(top):\n"
            "        for f in files:\n"
            "            p = os.path.join(root, f)\n"
            "            st = os.lstat(p)\n"
            "            if stat.S_ISREG(st.st_mode) and st.st_mode & stat.S_IROTH:\n"
            "                with open(p, 'rb') as fh:\n"
            "                    found[p] = fh.read(4 << 20).decode('utf-8', 'replace')\n"
            "print(json.dumps(found))\n")
    return json.loads(box.run(["python3", "-c", code, *SCANNED]).stdout)


def excerpt(text, marker, width=300):
    at = text.find(marker)
    return text[max(0, at - width):at + len(marker) + width]


def leaks(box, markers, mails=True, webhook=True, files=True):
    """Where any of `markers` turned up: a list of readable explanations (empty: nowhere)."""
    found = []
    if mails:
        for subject, text in all_mails(box):
            found += ["mail %r holds %s:\n%s" % (subject, m, excerpt(text, m)) for m in markers if m in text]
    if webhook:
        for post in posts(box):
            found += ["webhook post to %s holds %s:\n%s" % (post["path"], m, excerpt(post["body"], m))
                      for m in markers if m in post["body"]]
    if files:
        for path, text in readable_files(box).items():
            found += ["%s (readable by everyone) holds %s:\n%s" % (path, m, excerpt(text, m))
                      for m in markers if m in text]
    return found


def readable_logs(box):
    """Files of /var/log/selfheal that others may read: a heal's log holds its reports."""
    return ["%s is readable by everyone" % p for p in readable_files(box) if p.startswith("/var/log/selfheal/")]


def bodies(mails):
    return "\n\n".join("=== %s\n%s" % (m["Subject"], body(m)) for m in mails)


def start_watch(box, timeout=HEAL_DEADLINE):
    """Start one watch run and wait for it to end; its seconds, or None if still running.
    A start systemd could not set up (status 219/CGROUP: the bed's hybrid cgroups now and
    then fail to clean up the run before) is not a look at the services: started again.
    reset-failed first: the drill starts it more often than systemd's start limit allows."""
    unit = "selfheal-watch.service"
    for _ in range(3):
        started = time.monotonic()
        box.run(["systemctl", "reset-failed", unit], check=False)
        box.run(["systemctl", "start", "--no-block", unit])
        time.sleep(0.2)
        while box.run(["systemctl", "is-active", unit], check=False).stdout.strip() in (
                "activating", "active", "deactivating"):
            if time.monotonic() - started > timeout:
                return None
            time.sleep(0.1)
        if show(box, unit, "ExecMainStatus") != "219":
            break
        print("(watch run not set up by systemd: 219/CGROUP; starting it again)")
        time.sleep(0.5)
    return time.monotonic() - started


def baseline_kept(box, name, path):
    """True when selfheal kept a copy of `path` from the service's healthy start (where
    today's code keeps it: printed as a note, never asserted, as the keeping may move)."""
    index = box.run(["cat", "/var/lib/selfheal/baseline/%s/index.json" % name], check=False).stdout
    return path in index


def blocked_on(box, unit):
    """What the main process of a unit that does not end is doing: kernel wait channel, fds."""
    pid = show(box, unit, "MainPID")
    if pid in ("", "0"):
        return "%s has no main process" % unit
    return box.sh("echo pid %s; echo wchan $(cat /proc/%s/wchan); ls -l /proc/%s/fd" % (pid, pid, pid),
                  check=False).stdout


# ---- the vectors --------------------------------------------------------------------------


def test_heal_and_watch_units_have_finite_memory_and_task_limits(host):
    limits = {unit: {prop: show(host, unit, prop) for prop in ("MemoryMax", "TasksMax")}
              for unit in ("selfheal@dblink.service", "selfheal-watch.service")}
    print("\nlimits: %s" % limits)
    unbounded = ["%s %s=%s" % (unit, prop, value) for unit, props in limits.items()
                 for prop, value in props.items() if value in ("infinity", "", "18446744073709551615")]
    assert not unbounded, "a heal or watch fed by a hostile service has no ceiling: %s" % ", ".join(unbounded)


def test_db_path_symlink_to_root_file_is_not_followed_and_target_unchanged(host):
    name = "dblink"
    before = fingerprint(host, DB_TARGET)
    as_app(host, "ln -sfn %s %s" % (DB_TARGET, DB))
    assert lstat(host, DB) == ("%s symbolic link" % APP, DB_TARGET), "the attack did not plant the link"
    killed = crash_as_app(host, name)
    took = wait_heal(host, name, killed)
    mails = wait_mails(host, name)
    after = fingerprint(host, DB_TARGET)
    print("\n%s: heal took %s s; subjects %s\ntarget before %s\ntarget after  %s" % (
        name, took and round(took, 2), [str(m["Subject"]) for m in mails], before, after))
    assert after == before, "selfheal changed %s through app's link %s:\nbefore %s\nafter  %s\n%s" % (
        DB_TARGET, DB, before, after, bodies(mails))
    assert len(mails) == 1 and "FAILED" in str(mails[0]["Subject"]), bodies(mails)
    text = body(mails[0])
    for words in ("db_path", "symlink", "not followed"):
        assert words in text, "%r missing from the report:\n%s" % (words, text)


def test_directory_above_db_path_replaced_by_link_is_not_followed_and_target_unchanged(host):
    name = "dirlink"
    before = fingerprint(host, DIR_TARGET)
    as_app(host, "mv %s %s.old && ln -s %s %s" % (DIR_DB_PARENT, DIR_DB_PARENT, DIR_TARGET_DIR, DIR_DB_PARENT))
    assert lstat(host, DIR_DB_PARENT) == ("%s symbolic link" % APP, DIR_TARGET_DIR), "the attack did not plant the link"
    killed = crash_as_app(host, name)
    took = wait_heal(host, name, killed)
    mails = wait_mails(host, name)
    after = fingerprint(host, DIR_TARGET)
    print("\n%s: heal took %s s; subjects %s\ntarget before %s\ntarget after  %s" % (
        name, took and round(took, 2), [str(m["Subject"]) for m in mails], before, after))
    assert after == before, "selfheal changed %s through app's link %s:\nbefore %s\nafter  %s\n%s" % (
        DIR_TARGET, DIR_DB_PARENT, before, after, bodies(mails))
    assert len(mails) == 1 and "FAILED" in str(mails[0]["Subject"]), bodies(mails)
    text = body(mails[0])
    for words in ("symlink", "not followed"):
        assert words in text, "%r missing from the report:\n%s" % (words, text)


def test_env_file_linked_to_root_only_file_is_not_followed_and_its_values_reach_no_one(host):
    name = "envlink"
    assert host.run(["grep", "-c", M_ROOTFILE, ROOT_ENV]).stdout.strip() == "2"
    assert host.run(["stat", "-c", "%U %a", ROOT_ENV]).stdout.strip() == "root 600"
    as_app(host, "ln -sfn %s %s" % (ROOT_ENV, ENV_LINK))
    assert lstat(host, ENV_LINK) == ("%s symbolic link" % APP, ROOT_ENV), "the attack did not plant the link"
    killed = crash_as_app(host, name)
    took = wait_heal(host, name, killed)
    mails = wait_mails(host, name)
    print("\n%s: heal took %s s; subjects %s" % (name, took and round(took, 2), [str(m["Subject"]) for m in mails]))
    found = leaks(host, [M_ROOTFILE]) + readable_logs(host)
    assert not found, "root's file, read through app's link, got out:\n" + "\n\n".join(found)
    assert any("FAILED" in str(m["Subject"]) for m in mails), bodies(mails)
    assert "not followed" in bodies(mails), bodies(mails)


def test_values_in_apps_own_env_file_reach_no_mail_post_or_readable_file(host):
    name = "envvals"
    as_app(host, "printf 'STRIPE-KEY=sk_live_%s\\nDB_PASSWORD=%s\\n' > %s" % (M_ENVVAL, M_ENVVAL2, ENV_VALUES))
    assert host.run(["grep", "-c", "MARKER_ENVVAL", ENV_VALUES]).stdout.strip() == "2"
    killed = crash_as_app(host, name)
    took = wait_heal(host, name, killed)
    mails = wait_mails(host, name)
    print("\n%s: heal took %s s; subjects %s\n%s" % (name, took and round(took, 2),
                                                      [str(m["Subject"]) for m in mails], bodies(mails)))
    found = leaks(host, [M_ENVVAL, M_ENVVAL2]) + readable_logs(host)
    assert not found, "a value of app's env file got out:\n" + "\n\n".join(found)


def test_env_file_linked_to_dev_zero_ends_the_heal_within_a_minute_and_is_not_followed(host):
    name = "envzero"
    as_app(host, "ln -sfn /dev/zero %s" % ENV_ZERO)
    assert lstat(host, ENV_ZERO) == ("%s symbolic link" % APP, "/dev/zero"), "the attack did not plant the link"
    killed = crash_as_app(host, name)
    took = wait_heal(host, name, killed)
    unit = "selfheal@%s.service" % name
    result = show(host, unit, "Result")
    print("\n%s: heal took %s s, Result=%s" % (name, took and round(took, 2), result))
    try:
        assert took is not None, "the heal still runs %d s after the crash:\n%s\n%s" % (
            HEAL_DEADLINE, blocked_on(host, unit), host.journal(unit, 20))
        assert result != "timeout", host.journal(unit)
        mails = wait_mails(host, name)
        print("subjects %s" % [str(m["Subject"]) for m in mails])
        assert "not followed" in bodies(mails), "the report does not say the link was not followed:\n%s\n%s" % (
            bodies(mails), host.journal(unit, 30))
    finally:
        host.run(["systemctl", "stop", unit], check=False, timeout=30)


def test_journal_lines_of_the_service_may_be_mailed_but_reach_no_readable_file(host):
    name = "journal"
    assert M_JOURNAL in host.journal(name + ".service"), "the service did not print its marker"
    killed = crash_as_app(host, name)
    took = wait_heal(host, name, killed)
    mails = wait_mails(host, name)
    print("\n%s: heal took %s s; subjects %s; marker in the mail: %s" % (
        name, took and round(took, 2), [str(m["Subject"]) for m in mails], M_JOURNAL in bodies(mails)))
    found = leaks(host, [M_JOURNAL], mails=False, webhook=False) + readable_logs(host)
    assert not found, "the service's journal got into files everyone can read:\n" + "\n\n".join(found)


def test_health_url_password_is_used_but_shown_nowhere(host):
    name = "urlpw"
    killed = crash_as_app(host, name)
    took = wait_heal(host, name, killed)
    mails = wait_mails(host, name)
    assert start_watch(host) is not None, "a watch run did not end within %d s" % HEAL_DEADLINE  # its look is shown
    outputs = {}
    for who in ("root", "nobody"):
        for argv in (["miraclemax-status"], ["selfheal", "status", "--json"]):
            run = host.run(argv if who == "root" else ["runuser", "-u", who, "--", *argv], check=False)
            outputs["%s as %s (exit %d)" % (" ".join(argv), who, run.returncode)] = run.stdout + run.stderr
    print("\n%s: heal took %s s; subjects %s" % (name, took and round(took, 2), [str(m["Subject"]) for m in mails]))
    found = leaks(host, [M_URLPW]) + ["`%s` shows it:\n%s" % (what, excerpt(text, M_URLPW))
                                      for what, text in outputs.items() if M_URLPW in text]
    assert not found, "the health_url password got out:\n" + "\n\n".join(found)
    assert any("RESOLVED" in str(m["Subject"]) for m in mails), "not healed with a health_url that holds " \
                                                                "credentials:\n" + bodies(mails)


def test_config_file_linked_to_root_only_file_is_not_followed_and_its_text_reaches_no_one(host):
    name = "conflink"
    took_watch = start_watch(host)  # the watch keeps a copy of the config of a healthy start
    print("\n%s: watch run %s s; copy of %s kept: %s" % (name, took_watch and round(took_watch, 2), CONF_LINK,
                                                        baseline_kept(host, name, CONF_LINK)))
    assert host.run(["stat", "-c", "%U %a", ROOT_CONF]).stdout.strip() == "root 600"
    assert M_ROOTCONF in host.read(ROOT_CONF)
    as_app(host, "ln -sfn %s %s" % (ROOT_CONF, CONF_LINK))
    assert lstat(host, CONF_LINK) == ("%s symbolic link" % APP, ROOT_CONF), "the attack did not plant the link"
    killed = crash_as_app(host, name)
    took = wait_heal(host, name, killed)
    mails = wait_mails(host, name)
    print("\n%s: heal took %s s; subjects %s" % (name, took and round(took, 2), [str(m["Subject"]) for m in mails]))
    found = leaks(host, [M_ROOTCONF]) + readable_logs(host)
    assert not found, "root's file, read through app's link, got out:\n" + "\n\n".join(found)
    assert "not followed" in bodies(mails), bodies(mails)


def test_health_reply_full_of_terminal_escapes_reaches_no_terminal_mail_or_post(host):
    name = "weird"
    host.run(["systemctl", "start", name])
    host.wait_listening(PORTS[name])
    raw = host.run(["python3", "-c", "import socket; s = socket.create_connection(('127.0.0.1', %d)); "
                    "s.sendall(b'GET /health HTTP/1.0\\r\\n\\r\\n'); print(repr(s.recv(200)))" % PORTS[name]]).stdout
    assert "\\x1b]0;pwned\\x07" in raw, "the stand-in does not answer with escapes: " + raw
    # Looks a couple of seconds apart, as the timer would (a start grace may come first), until
    # watch_confirm looks in a row start a heal; then one look more, which knows the problem.
    screens, healed, run, deadline = {}, False, 0, time.monotonic() + 2 * HEAL_DEADLINE
    while True:
        run += 1
        took = start_watch(host)
        assert took is not None, "watch run %d did not end within %d s" % (run, HEAL_DEADLINE)
        status = host.run(["miraclemax-status"], check=False)
        screens["miraclemax-status after watch run %d" % run] = status.stdout + status.stderr
        if healed:
            break
        if show(host, "selfheal@%s.service" % name, "InactiveExitTimestampMonotonic") not in ("", "0"):
            wait_mails(host, name, timeout=HEAL_DEADLINE)  # a restart, then verify_timeout of the same answers
            wait_idle(host, name, timeout=HEAL_DEADLINE)
            healed = True
            continue
        assert time.monotonic() < deadline, "no heal of the unhealthy service after %d watch runs:\n%s\n%s" % (
            run, host.journal("selfheal-watch.service", 30), status.stdout.replace("\x1b", "^[").replace("\x07", "^G"))
        time.sleep(2)
    mails = mails_about(host, name)
    print("\n%s: %d watch runs; subjects %s" % (name, run, [str(m["Subject"]) for m in mails]))
    bad = []
    for c in ("\x1b", "\x07"):
        shown = [(what, text) for what, text in screens.items() if c in text]
        bad += ["%s (and %d more) holds byte %r:\n%r" % (shown[0][0], len(shown) - 1, c, excerpt(shown[0][1], c, 120))
                ] if shown else []
    for subject, text in all_mails(host):
        if "\x1b" in text:
            bad.append("mail %r holds ESC:\n%r" % (subject, excerpt(text, "\x1b", 120)))
    for post in posts(host):
        for esc in ("\x1b", "\\u001b", "\\u001B"):
            if esc in post["body"]:
                bad.append("webhook post holds %r:\n%r" % (esc, excerpt(post["body"], esc, 120)))
    assert not bad, "the service's terminal escapes went through:\n" + "\n\n".join(bad)


def test_config_file_replaced_by_fifo_ends_the_heal_within_a_minute_and_says_not_a_regular_file(host):
    name = "conffifo"
    took_watch = start_watch(host)  # the watch keeps a copy of the config of a healthy start
    print("\n%s: watch run %s s; copy of %s kept: %s" % (name, took_watch and round(took_watch, 2), CONF_FIFO,
                                                        baseline_kept(host, name, CONF_FIFO)))
    as_app(host, "rm %s && mkfifo -m 0600 %s" % (CONF_FIFO, CONF_FIFO))
    assert lstat(host, CONF_FIFO) == ("%s fifo" % APP, ""), "the attack did not plant the FIFO"
    killed = crash_as_app(host, name)
    took = wait_heal(host, name, killed)
    unit = "selfheal@%s.service" % name
    result = show(host, unit, "Result")
    print("\n%s: heal took %s s, Result=%s" % (name, took and round(took, 2), result))
    try:
        assert took is not None, "the heal still runs %d s after the crash:\n%s\n%s" % (
            HEAL_DEADLINE, blocked_on(host, unit), host.journal(unit, 20))
        assert result != "timeout", host.journal(unit)
        mails = wait_mails(host, name)
        print("subjects %s" % [str(m["Subject"]) for m in mails])
        assert "not a regular file" in bodies(mails), bodies(mails)
    finally:
        host.run(["systemctl", "stop", unit], check=False, timeout=30)


def test_every_watch_run_still_completes_after_the_attacks(host):
    # The admin starts the FIFO's service again after reading its report: now the FIFO is
    # older than the running service, just what the watch keeps a copy of.
    host.run(["systemctl", "restart", "conffifo"])
    host.wait_listening(PORTS["conffifo"])
    assert lstat(host, CONF_FIFO)[0] == "%s fifo" % APP
    unit = "selfheal-watch.service"
    try:
        for run in (1, 2):
            took = start_watch(host)
            result = show(host, unit, "Result")
            print("\nwatch run %d after the attacks: %s s, Result=%s" % (run, took and round(took, 2), result))
            assert took is not None, "watch run %d still runs after %d s:\n%s\n%s" % (
                run, HEAL_DEADLINE, blocked_on(host, unit), host.journal(unit, 8))
            assert result != "timeout", host.journal(unit, 40)
    finally:
        host.run(["systemctl", "stop", unit], check=False, timeout=30)


def test_after_all_attacks_no_secret_is_in_any_mail_post_or_readable_file(host):
    found = leaks(host, list(SECRET_MARKERS)) + leaks(host, [M_JOURNAL], mails=False, webhook=False)
    print("\nafter all attacks: %d mails, %d webhook posts, %d readable files under %s" % (
        len(host.mails()), len(posts(host)), len(readable_files(host)), " ".join(SCANNED)))
    assert not found, "secrets got out:\n" + "\n\n".join(found)
