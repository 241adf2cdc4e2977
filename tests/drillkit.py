"""What the drills share: a container with stand-in services and selfheal installed by
./install.sh from a copy of the repo (as a user's clone), and small readers of its state."""

import contextlib
import json
import os
import time
from pathlib import Path

from bed import Container
from conftest import conf

# The systemd versions the drills prove: Debian 11 (247, Python 3.9), 12 (252, 3.11),
# 13 (257, 3.13).  SELFHEAL_BED_SUITES="bookworm" narrows a run while working on a drill.
ALL_SUITES = ("bullseye", "bookworm", "trixie")
# What each suite boots; tests/test_bed.py checks it, the drills expect behaviour by it.
SUITE_VERSIONS = {
    "bullseye": {"systemd": 247, "python": (3, 9)},
    "bookworm": {"systemd": 252, "python": (3, 11)},
    "trixie": {"systemd": 257, "python": (3, 13)},
}
MONITOR_ENV_SINCE = 251  # systemd passes MONITOR_* to OnFailure= units from this version on


def passes_monitor_env(suite):
    """True when the suite's systemd hands OnFailure= units the failed run's MONITOR_*."""
    return SUITE_VERSIONS[suite]["systemd"] >= MONITOR_ENV_SINCE


def drill_suites(*only):
    """The suites each drill module runs on (module fixtures take them as params). `only`
    narrows a module to the versions its behaviour depends on (CI time is finite: what does
    not depend on the systemd version runs on fewer suites)."""
    wanted = os.environ.get("SELFHEAL_BED_SUITES", "").split()
    unknown = [s for s in wanted if s not in ALL_SUITES]
    if unknown:
        raise ValueError("SELFHEAL_BED_SUITES: unknown suite(s) %s (known: %s)"
                         % (" ".join(unknown), " ".join(ALL_SUITES)))
    suites = list(wanted or ALL_SUITES)
    return [s for s in suites if s in only] if only else suites


# [selfheal] of every drill's services.conf: mail to root's mailbox in the container (its own
# postfix), from an address of the container's domain.
DRILL_SETTINGS = {"name": "MiracleMax", "email_to": "root@localhost", "email_from": "selfheal@miraclemax.localdomain"}


def drill_conf(settings=None, services=None):
    """A drill's services.conf text: conftest.conf with DRILL_SETTINGS as the base."""
    return conf(settings, services, base=DRILL_SETTINGS)


REPO_INSIDE = "/src"
CLONE = "/root/selfheal"
STANDIN = "/usr/local/bin/standin"


def web_unit(port, extra="", args=""):
    """A stand-in web app on 127.0.0.1:PORT; `args` are more standin.py options (--config
    FILE, --data PATH...), `extra` adds [Service] lines."""
    return ("[Unit]\nDescription=stand-in on %d\n[Service]\nExecStart=/usr/bin/python3 %s %s\n%s"
            "[Install]\nWantedBy=multi-user.target\n" % (port, STANDIN, " ".join(filter(None, [str(port), args])), extra))


def kill(box, unit):
    """SIGKILL the unit's main process (a crash). The whole cgroup is not killed: that failed
    now and then with EIO in these containers (hybrid cgroups)."""
    box.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", unit])


def starts(box, unit):
    """How many runs of `unit` systemd started (its "Started ..." journal lines, in every
    version's wording), whether or not they came up."""
    out = box.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit], check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("Started "))


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


@contextlib.contextmanager
def installed_host(repo_root, units, config, start=(), ports=(), suite=None, prepare=None):
    """Boot a container, add `units` ({name: text}), run prepare(box), start `start`, install."""
    with Container(suite=suite, binds_ro={str(repo_root): REPO_INSIDE}) as box:
        box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/standin.py", STANDIN])
        if prepare:
            prepare(box)
        for name, text in units.items():
            box.write("/etc/systemd/system/" + name, text)
        box.run(["systemctl", "daemon-reload"])
        if start:
            box.run(["systemctl", "enable", "--now", *start])
        for port in ports:
            box.wait_listening(port)
        box.run(["cp", "-a", REPO_INSIDE, CLONE])
        box.write(CLONE + "/services.conf", config)
        install = box.run([CLONE + "/install.sh"], timeout=120)
        box.install_output = install.stdout + install.stderr
        yield box


def clear_mailbox(box):
    box.sh(": > /var/mail/root")


def about(service, outcome):
    return lambda m: ("%s - %s" % (service, outcome)) in str(m["Subject"])


def body(msg):
    return msg.get_body(preferencelist=("plain",)).get_content()


def http_get(box, port, path="/health"):
    code = ("import urllib.request,sys\n"
            "try:\n print(urllib.request.urlopen('http://127.0.0.1:%d%s', timeout=3).status)\n"
            "except Exception as e:\n print('error', e)\n" % (port, path))
    return box.run(["python3", "-c", code], check=False).stdout.strip()


def show(box, unit, prop):
    return box.run(["systemctl", "show", "-p", prop, "--value", unit]).stdout.strip()


def history(box, service=None):
    try:
        text = box.read("/var/lib/selfheal/history.jsonl")
    except FileNotFoundError:
        return []
    events = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [e for e in events if service is None or e["service"] == service]


def mails_about(box, service):
    return [m for m in box.mails() if (": %s - " % service) in str(m["Subject"])]


def wait_idle(box, name, timeout=30):
    """Wait until selfheal@NAME.service is not running (a heal finished)."""
    deadline = time.monotonic() + timeout
    while box.run(["systemctl", "is-active", "selfheal@%s.service" % name], check=False).stdout.strip() in (
            "activating", "active", "deactivating"):
        assert time.monotonic() < deadline, "selfheal@%s.service still running" % name
        time.sleep(0.05)


def wait_past_start_grace(box, unit, grace):
    """Wait until the unit's current run is older than `grace` seconds (start_grace, at least
    verify_timeout): before that, the watch calls a failing port or health check "starting".
    CLOCK_MONOTONIC is the host's inside the container too."""
    entered = int(show(box, unit, "ActiveEnterTimestampMonotonic") or 0) / 1e6
    left = entered + grace + 0.5 - time.monotonic()
    if left > 0:
        time.sleep(left)


OUTBOX = "/var/lib/selfheal/spool"
_QUEUED_FOR = ("import glob, json, sys\n"
               "for p in sorted(glob.glob('%s/*.json')):\n"
               "    if json.load(open(p))['channels'].get(sys.argv[1]) == 'queued': print(p)\n" % OUTBOX)


def queued_for(box, channel="mail"):
    """The reports in the host's outbox that `channel` (mail, webhook) has still to send."""
    return box.run(["python3", "-c", _QUEUED_FOR, channel]).stdout.split()


def readme_block(after, lang="ini"):
    """The first ```LANG block of the README after the text `after`: the examples a user
    copies are the ones the drills run."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = text.index("```%s\n" % lang, text.index(after)) + len(lang) + 4
    return text[start:text.index("```", start)]
