"""Drills written as the attacker who holds only a service's own Unix account (`app`, owning
/srv/app): what root runs on that service's behalf must run with no more than its rights,
and what selfheal writes must not carry what the account planted (issue 19).

Vectors, one service each (ports 5090-5095), on systemd 252 and 257:
- health_command owned by the account (run as the service, the default): it runs as app,
  with no capability; its `systemd-run ... id > /root/...` and its read of /etc/shadow fail;
- health_command with health_run_as = root whose directory a bad deploy handed to app: the
  watch never runs it as root, and mails CONFIG BROKEN naming it;
- config_check the same way: the heal refuses to run it, is FAILED and says why;
- validate and install refuse an account-owned checker (and a script an interpreter runs)
  with FILE:LINE;
- systemd's "Ignoring invalid environment assignment 'KEY=value'" keeps the value out of
  mails, the webhook and /var/log/selfheal;
- a forged journal entry (SYSLOG_IDENTIFIER, MESSAGE_ID, SELFHEAL_SERVICE) from the account is
  returned by none of the README's queries;
- bidi and zero-width characters and a 20 KB line in the service's journal reach no mail raw
  or whole.
"""

import json
import re
import secrets
import time
from pathlib import Path

import pytest

from drillkit import REPO_INSIDE, body, drill_conf, drill_suites, installed_host, mails_about, show, web_unit

pytestmark = pytest.mark.drill

TOKEN = secrets.token_hex(4)
APP = "app"
AS_APP = "User=%s\nGroup=%s\n" % (APP, APP)
PORTS = {"ownhealth": 5090, "roothealth": 5091, "rootcheck": 5092, "envleak": 5093, "noisy": 5094}
SINK_PORT = 5095
SINK = "/usr/local/bin/http-sink"
SINK_LOG = "/var/log/http-sink.jsonl"

OWN_CHECK = "/srv/app/bin/check"  # app's own: run as app
ROOT_HEALTH_DIR = "/opt/roothealth"  # root's at install; a bad deploy hands it to app later
ROOT_HEALTH = ROOT_HEALTH_DIR + "/check"
ROOT_CHECK_DIR = "/opt/rootcheck"
ROOT_CHECK = ROOT_CHECK_DIR + "/check"
ENV_FILE = "/srv/app/env"
SECRET = "sk_live_MARKER_" + TOKEN
FORGED = "FORGED_MARKER_" + TOKEN
NOISY = "/usr/local/bin/noisy"
RLO, ZWSP = "\u202e", "\u200b"
RESOLVED_ID = "3f5c2a9e8d7b4c1fa6e0b2d4c8f1a7e3"  # the README's MESSAGE_ID of a RESOLVED heal
REPO_README = Path(__file__).resolve().parent.parent / "README.md"

# What the attacker writes into a checker it can change: say who ran it (into the journal:
# selfheal's sandboxes leave it no file to write), then try for root.
PAYLOAD = """#!/bin/sh
logger -t runas-drill "{name} uid=$(id -u) $(grep -E '^(CapEff|NoNewPrivs)' /proc/self/status | tr '\\t\\n' '  ')\
shadow=$(cat /etc/shadow 2>/dev/null | wc -c)"
systemd-run --wait --quiet /bin/sh -c 'id > /root/pwned-{name}' 2>/dev/null
id > /root/direct-{name} 2>/dev/null
exit 0
"""
GOOD_CHECK = "#!/bin/sh\nexit 0\n"

NOISY_PY = """#!/usr/bin/python3
import os, sys
print("evil line %sdrowssap%s hidden" , flush=True)
print("L" * 20000, flush=True)
os.execv("/usr/bin/python3", ["python3", "/usr/local/bin/standin", "%d"])
""" % (RLO, ZWSP, PORTS["noisy"])

UNITS = {
    "ownhealth.service": web_unit(PORTS["ownhealth"], AS_APP),
    "roothealth.service": web_unit(PORTS["roothealth"], AS_APP),
    "rootcheck.service": web_unit(PORTS["rootcheck"], AS_APP),
    "envleak.service": web_unit(PORTS["envleak"], AS_APP + "EnvironmentFile=%s\n" % ENV_FILE),
    "noisy.service": "[Unit]\nDescription=noisy\n[Service]\nExecStart=%s\n%s[Install]\nWantedBy=multi-user.target\n"
                     % (NOISY, AS_APP),
    "hooksink.service": "[Unit]\nDescription=HTTP sink\n[Service]\nExecStart=/usr/bin/python3 %s %d %s\n"
                        % (SINK, SINK_PORT, SINK_LOG),
}

CONFIG = drill_conf({
    "verify_timeout": "8s", "smtp_timeout": "3s", "watch_interval": "1h",
    "webhook_url": "http://127.0.0.1:%d/hook" % SINK_PORT, "webhook_timeout": "2s",
}, {
    "ownhealth": {"port": PORTS["ownhealth"], "health_command": OWN_CHECK},
    "roothealth": {"port": PORTS["roothealth"], "health_command": ROOT_HEALTH, "health_run_as": "root"},
    "rootcheck": {"port": PORTS["rootcheck"], "strategies": "config_validation, service_restart",
                  "config_check": ROOT_CHECK},
    "envleak": {"port": PORTS["envleak"]},
    "noisy": {"port": PORTS["noisy"]},
})


def as_app(box, script, **kw):
    return box.run(["runuser", "-u", APP, "--", "/bin/sh", "-c", script], **kw)


def write_as_app(box, path, text):
    """The account (re)writes a file it may write: what the attacker does."""
    as_app(box, "cat > %s" % path, input=text)


def prepare_box(box):
    box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/http_sink.py", SINK])
    box.run(["useradd", "--system", "--user-group", APP])
    box.run(["install", "-d", "-o", APP, "-g", APP, "-m", "0755", "/srv/app", "/srv/app/bin"])
    write_as_app(box, OWN_CHECK, GOOD_CHECK)
    as_app(box, "chmod 0755 %s" % OWN_CHECK)
    for path in (ROOT_HEALTH, ROOT_CHECK):
        box.run(["install", "-d", "-m", "0755", path.rsplit("/", 1)[0]])
        box.write(path, GOOD_CHECK, mode=0o755)
    write_as_app(box, ENV_FILE, "GOOD=1\nSTRIPE-KEY=%s\n" % SECRET)
    box.write(NOISY, NOISY_PY, mode=0o755)


@pytest.fixture(scope="module", params=drill_suites("bookworm", "trixie"))
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    names = list(PORTS)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=names + ["hooksink"],
                        ports=list(PORTS.values()) + [SINK_PORT], prepare=prepare_box) as box:
        yield box


def uid_of(box, user):
    return box.run(["id", "-u", user]).stdout.strip()


def watch(box):
    box.run(["systemctl", "start", "selfheal-watch.service"], timeout=120)


def crash(box, name):
    before = show(box, "selfheal@%s.service" % name, "InactiveExitTimestampMonotonic")
    pid = show(box, name + ".service", "MainPID")
    assert pid not in ("", "0"), box.journal(name + ".service")
    as_app(box, "kill -9 %s" % pid)
    deadline = time.monotonic() + 60
    while show(box, "selfheal@%s.service" % name, "InactiveExitTimestampMonotonic") in (before, "", "0"):
        assert time.monotonic() < deadline, "no heal of %s started" % name
        time.sleep(0.05)
    while box.run(["systemctl", "is-active", "selfheal@%s.service" % name], check=False).stdout.strip() in (
            "activating", "active", "deactivating"):
        assert time.monotonic() < deadline, "the heal of %s did not end" % name
        time.sleep(0.1)


def no_root_files(box, name):
    for path in ("/root/pwned-" + name, "/root/direct-" + name):
        assert box.run(["test", "-e", path], check=False).returncode != 0, "%s exists: root ran it" % path


def said(box, name):
    """What the payload named `name` logged: [(uid of the sender as journald saw it, message)]."""
    out = box.run(["journalctl", "--no-pager", "-o", "json", "-t", "runas-drill"], check=False).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [(e["_UID"], e["MESSAGE"]) for e in entries if e["MESSAGE"].startswith(name + " ")]


def test_a_health_command_of_the_account_runs_as_the_account_and_gets_nothing_more(host):
    write_as_app(host, OWN_CHECK, PAYLOAD.format(name="own"))
    watch(host)
    time.sleep(0.5)
    runs = said(host, "own")
    assert runs, host.journal("selfheal-watch.service")
    app = uid_of(host, APP)
    for uid, message in runs:
        fields = dict(word.split("=", 1) if "=" in word else (word.rstrip(":"), "") for word in message.split())
        assert uid == app and fields["uid"] == app, message
        assert re.search(r"CapEff:\s+0+\b", message) and re.search(r"NoNewPrivs:\s+1\b", message), message
        assert fields["shadow"] == "0", message  # /etc/shadow was not readable
    no_root_files(host, "own")


def test_a_root_health_command_handed_to_the_account_after_install_is_never_run_as_root_and_is_mailed(host):
    host.run(["chown", "-R", APP, ROOT_HEALTH_DIR])  # a bad deploy
    write_as_app(host, ROOT_HEALTH, PAYLOAD.format(name="roothealth"))
    watch(host)
    watch(host)
    assert said(host, "roothealth") == [], "it ran"
    no_root_files(host, "roothealth")
    host.wait_mail(lambda m: "CONFIG BROKEN" in str(m["Subject"]), timeout=30)
    broken = [m for m in host.mails() if "CONFIG BROKEN" in str(m["Subject"])]
    assert len(broken) == 1  # once, not at every watch run
    text = body(broken[0])
    assert "refused to run a command of its config as root" in text
    assert "[roothealth] health_command: root runs it, so it must be root's alone: %s: %s is owned by %s, not root" % (
        ROOT_HEALTH, ROOT_HEALTH_DIR, APP) in text


def test_a_config_check_handed_to_the_account_is_refused_at_the_heal_and_the_mail_says_so(host):
    host.run(["chown", "-R", APP, ROOT_CHECK_DIR])
    write_as_app(host, ROOT_CHECK, PAYLOAD.format(name="rootcheck"))
    crash(host, "rootcheck")
    assert said(host, "rootcheck") == [], "the checker ran"
    no_root_files(host, "rootcheck")
    host.wait_mail(lambda m: ": rootcheck - " in str(m["Subject"]), timeout=30)
    (mail,) = mails_about(host, "rootcheck")
    assert "FAILED" in str(mail["Subject"])
    assert "selfheal refused to run config_check as root: %s: %s is owned by %s, not root" % (
        ROOT_CHECK, ROOT_CHECK_DIR, APP) in body(mail)


def test_validate_and_install_refuse_checkers_of_the_account_with_file_and_line(host):
    host.run(["install", "-d", "-o", APP, "-m", "0755", "/srv/app/lib"])
    write_as_app(host, "/srv/app/lib/health.py", "print(1)\n")
    bad = drill_conf({}, {
        "ownhealth": {"port": PORTS["ownhealth"], "health_command": OWN_CHECK, "health_run_as": "root"},
        "rootcheck": {"port": PORTS["rootcheck"], "strategies": "config_validation, service_restart",
                      "config_check": "/usr/bin/python3 /srv/app/lib/health.py"},
    })
    host.write("/root/bad.conf", bad, mode=0o600)
    before = host.run(["sha256sum", "/etc/selfheal/services.conf"]).stdout
    lines = bad.splitlines()
    for argv in (["selfheal", "validate", "/root/bad.conf"], ["selfheal", "install", "--config", "/root/bad.conf"]):
        result = host.run(argv, check=False)
        assert result.returncode == 78, (argv, result.stdout, result.stderr)
        out = result.stderr
        line = lines.index("health_command = %s" % OWN_CHECK) + 1
        assert "/root/bad.conf:%d [ownhealth] health_command: root runs it, so it must be root's alone: %s: %s is " \
               "owned by %s, not root" % (line, OWN_CHECK, "/srv/app", APP) in out, out
        line = lines.index("config_check = /usr/bin/python3 /srv/app/lib/health.py") + 1
        assert "/root/bad.conf:%d [rootcheck] config_check: root runs it, so it must be root's alone: " \
               "/srv/app/lib/health.py: /srv/app is owned by %s, not root" % (line, APP) in out, out
    assert host.run(["sha256sum", "/etc/selfheal/services.conf"]).stdout == before  # nothing changed


def test_the_value_of_an_invalid_env_assignment_is_in_no_mail_post_or_file(host):
    crash(host, "envleak")
    host.wait_mail(lambda m: ": envleak - " in str(m["Subject"]), timeout=30)
    journal = host.run(["journalctl", "--no-pager", "-u", "envleak.service"]).stdout
    assert SECRET in journal  # systemd did quote it: the drill's premise holds
    mail = mails_about(host, "envleak")[0]
    text = body(mail)
    assert "Ignoring invalid environment assignment 'STRIPE-KEY=***'" in text
    for msg in host.mails():
        assert SECRET not in msg.as_string()
    time.sleep(1)
    posts = host.run(["cat", SINK_LOG], check=False).stdout
    assert posts and SECRET not in posts
    found = host.run(["grep", "-rl", SECRET, "/var/log/selfheal", "/var/lib/selfheal", "/run/selfheal"],
                     check=False).stdout
    assert found == ""


def test_a_journal_entry_forged_by_the_account_is_returned_by_none_of_the_readme_queries(host):
    forge = ("import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
             "s.sendto(b'MESSAGE=%s\\nSYSLOG_IDENTIFIER=miraclemax-self-heal\\nMESSAGE_ID=%s\\n"
             "SELFHEAL_SERVICE=ownhealth\\nSELFHEAL_OUTCOME=RESOLVED\\n', '/run/systemd/journal/socket')"
             % (FORGED, RESOLVED_ID))
    as_app(host, "python3 -c \"%s\"" % forge)
    time.sleep(0.5)
    unguarded = host.run(["journalctl", "--no-pager", "-o", "cat", "SELFHEAL_SERVICE=ownhealth"]).stdout
    assert FORGED in unguarded  # the forgery reached the journal: only _UID=0 tells it apart
    readme = open(REPO_README, encoding="utf-8").read()
    queries = sorted(set(re.findall(r"^(journalctl [^#\n]*?(?:-t miraclemax-self-heal|MESSAGE_ID=|SELFHEAL_SERVICE=)"
                                    r"[^#\n|]*)", readme, re.M)))
    assert len(queries) >= 3, queries
    for query in queries:
        argv = [word.replace("story-stages", "ownhealth") for word in query.split() if word not in ("-f",)]
        argv = [w if not w.startswith("MESSAGE_ID=") else "MESSAGE_ID=" + RESOLVED_ID for w in argv]
        out = host.run(argv + ["--no-pager", "-o", "cat"], check=False).stdout
        assert FORGED not in out, query


def test_bidi_controls_and_a_20_kb_line_from_the_journal_reach_no_mail_raw_or_whole(host):
    crash(host, "noisy")
    host.wait_mail(lambda m: ": noisy - " in str(m["Subject"]), timeout=30)
    (mail,) = mails_about(host, "noisy")
    raw = mail.as_bytes()
    assert len(raw) < 24000, len(raw)
    text = body(mail)
    assert "\\u202edrowssap\\u200b" in text
    for msg in host.mails():
        content = "\n".join(part.get_content() for part in msg.walk() if part.get_content_maintype() == "text")
        assert RLO not in content and ZWSP not in content
        assert "L" * 1000 not in content
