#!/usr/bin/env python3
"""Benchmark (not a test): seconds from a hang (SIGSTOP) to answering HTTP again, and to
the report in the mailbox, with the watch as installed (the timer, watch_interval = 30s).

    sudo python3 tests/bench_hang_to_healthy.py [N] [--suite bookworm]

Boots the drill container (tests/bed.py), installs selfheal with ./install.sh as a user
would, with one web service (port, health_url with the default health_timeout), and leaves
selfheal-watch.timer alone: nothing starts the watch by hand. Then N times (default 6):

    wait until the service's run is older than start_grace (a young run that does not
    answer is "starting", not hung), then a random 0..watch_interval more, so the hang
    lands anywhere in the timer's cycle;
    SIGSTOP its main process;
    stop -> healthy  from just before `kill -STOP` is issued until a GET /health (0.5 s
                     timeout, polled from inside the container) is answered 200 again;
    stop -> mail     until the RESOLVED mail is in /var/mail/root (the real postfix).

Prints each run, then p50/p95/max. What to expect: up to one watch_interval until the
first look, health_timeout per failed look, 2 s between the two looks, then the restart.
"""

import argparse
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from bed import INSIDE_ENV, NSENTER, skip_or_fail_reason  # noqa: E402
from drillkit import installed_host, show, web_unit  # noqa: E402

PORT = 5002
INTERVAL = 30.0  # watch_interval's default; the config below leaves it (and start_grace) alone
START_GRACE = 30.0  # default: verify_timeout (30 s)
CONFIG = """\
[selfheal]
name = MiracleMax
email_to = root@localhost
email_from = selfheal@miraclemax.localdomain
# the benchmark hangs it on purpose, many times an hour: no escalation, no FLAPPING
failure_threshold = 256
flap_threshold = 1000

[story-stages]
port = 5002
domain = books.jbyrd.org
critical = yes
strategies = port_conflict, service_restart
health_url = http://127.0.0.1:5002/health
"""

# Polls GET /health inside the container until it is answered 200; prints the monotonic
# time of that answer (the host and the container share CLOCK_MONOTONIC).
POLLER = """
import time, urllib.request
while True:
    try:
        if urllib.request.urlopen('http://127.0.0.1:%d/health', timeout=0.5).status == 200:
            print(time.monotonic())
            break
    except Exception:
        pass
    time.sleep(0.05)
""" % PORT


def percentile(values, fraction):
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def run_age(box):
    entered = int(show(box, "story-stages", "ActiveEnterTimestampMonotonic")) / 1e6
    return time.monotonic() - entered


def where_time_went(box, start, mail):
    """The watch runs around the hang (seconds after SIGSTOP they started) and the report's
    finding: where the seconds went."""
    out = box.run(["journalctl", "--no-pager", "-o", "short-monotonic", "-u", "selfheal-watch.service"],
                  check=False).stdout
    runs = [float(line.split("]")[0].lstrip("[ ")) - start for line in out.splitlines()
            if "Starting selfheal-watch" in line]
    runs = ["%+.1f" % t for t in runs if -5 < t < 120]
    text = mail.decode("utf-8", "replace")
    found = next((line.strip() for line in text.splitlines() if "The watch found" in line), "")
    return "watch runs at %s s; %s" % (" ".join(runs), found[:160])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hangs", nargs="?", type=int, default=6)
    parser.add_argument("--suite", default=None, help="bullseye (systemd 247), bookworm (252) or trixie (257)")
    args = parser.parse_args(argv)
    reason = skip_or_fail_reason(args.suite)
    if reason:
        print("cannot run: %s" % reason, file=sys.stderr)
        return 2
    with installed_host(TESTS.parent, {"story-stages.service": web_unit(PORT)}, CONFIG, suite=args.suite,
                        start=("story-stages",), ports=(PORT,)) as box:
        version = box.run(["systemctl", "--version"]).stdout.splitlines()[0]
        assert show(box, "selfheal-watch.timer", "ActiveState") == "active"
        mbox = box.host_path("/var/mail/root")
        healthy, mailed = [], []
        print("%s, python %s, watch_interval %ds (timer)" % (
            version, box.run(["python3", "-V"]).stdout.split()[1], INTERVAL))
        print("%4s  %14s  %12s" % ("run", "stop->healthy s", "stop->mail s"))
        for i in range(1, args.hangs + 1):
            while box.run(["systemctl", "is-active", "selfheal@story-stages.service"],
                          check=False).stdout.strip() in ("activating", "active"):
                time.sleep(0.1)
            box.wait_listening(PORT, timeout=60)
            time.sleep(max(0.0, START_GRACE + 1 - run_age(box)) + random.uniform(0, INTERVAL))
            pid = show(box, "story-stages", "MainPID")
            size = mbox.stat().st_size if mbox.exists() else 0
            start = time.monotonic()
            box.run(["kill", "-STOP", pid])
            poll = subprocess.run([NSENTER, "-t", str(box.pid), "-a", "--", "env", "-i", *INSIDE_ENV,
                                   "python3", "-c", POLLER], stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=240)
            if poll.returncode != 0 or not poll.stdout.strip():
                raise SystemExit("run %d: poller failed: %s" % (i, poll.stderr))
            healthy.append(float(poll.stdout.split()[-1]) - start)
            while not (mbox.exists() and mbox.stat().st_size > size and b"\n\n" in mbox.read_bytes()[size:]):
                if time.monotonic() - start > 240:
                    raise SystemExit("run %d: no mail within 240 s" % i)
                time.sleep(0.01)
            mailed.append(time.monotonic() - start)
            new = mbox.read_bytes()[size:]
            if b"story-stages - RESOLVED" not in new:
                sys.stdout.write(new.decode("utf-8", "replace"))
                raise SystemExit("run %d: the report was not RESOLVED (above)" % i)
            print("%4d  %14.1f  %12.1f   %s" % (i, healthy[-1], mailed[-1], where_time_went(box, start, new)),
                  flush=True)
    print()
    for what, values in (("stop -> healthy", healthy), ("stop -> mailbox", mailed)):
        print("%s: p50 %.1f s, p95 %.1f s, max %.1f s, mean %.1f s (n=%d)" % (
            what, percentile(values, 0.5), percentile(values, 0.95), max(values), statistics.mean(values),
            len(values)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
