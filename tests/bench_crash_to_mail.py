#!/usr/bin/env python3
"""Benchmark (not a test): seconds from SIGKILL to the report in the mailbox.

    sudo python3 tests/bench_crash_to_mail.py [--crashes 20] [--suite bookworm] [--loaded]

Boots the drill container (tests/bed.py), installs selfheal with ./install.sh as a user
would, with one web service (port, health_url: a full heal with diagnosis, verification
and the whole report), then SIGKILLs it N times. Each time it measures, on the host:

    kill -> mail   from just before `systemctl kill` is issued (so the nsenter and
                   systemctl overhead counts against selfheal) until the RESOLVED mail is
                   in /var/mail/root, delivered by the real postfix;
    heal           selfheal's own "healing time" (failure to verified healthy), from history.

--loaded first seeds a year of history (a million lines, as an older selfheal let it grow)
and holds 20,000 open TCP sockets (tests/loadkit.py); it also times the dashboard
(`selfheal status --json`) and prints the bytes selfheal keeps on disk at the end.

Prints each run, then p50/p95/max. Goals: plain p50 <= 0.35 s; loaded <= max(1 s, 2 x plain);
the dashboard < 1 s.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from bed import skip_or_fail_reason  # noqa: E402
from drillkit import installed_host, web_unit  # noqa: E402
from loadkit import load, open_sockets, state_bytes  # noqa: E402

CONFIG = """\
[selfheal]
name = MiracleMax
email_to = root@localhost
email_from = selfheal@miraclemax.localdomain
# the benchmark crashes it on purpose, many times an hour: no escalation, no FLAPPING
failure_threshold = 256
flap_threshold = 1000

[story-stages]
port = 5002
domain = books.jbyrd.org
critical = yes
strategies = port_conflict, service_restart
health_url = http://127.0.0.1:5002/health
"""


def percentile(values, fraction):
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crashes", type=int, default=20)
    parser.add_argument("--suite", default=None, help="bullseye (systemd 247), bookworm (252) or trixie (257)")
    parser.add_argument("--loaded", action="store_true", help="a year of history and 20,000 open sockets")
    args = parser.parse_args(argv)
    reason = skip_or_fail_reason(args.suite)
    if reason:
        print("cannot run: %s" % reason, file=sys.stderr)
        return 2
    repo = TESTS.parent
    with installed_host(repo, {"story-stages.service": web_unit(5002)}, CONFIG, suite=args.suite,
                        start=("story-stages",), ports=(5002,)) as box:
        version = box.run(["systemctl", "--version"]).stdout.splitlines()[0]
        if args.loaded:
            seeded = load(box, "story-stages")
            print("loaded: %.0f MB of history seeded, %d TCP sockets open" % (seeded / 1e6, open_sockets(box)))
        mbox = box.host_path("/var/mail/root")
        history = box.host_path("/var/lib/selfheal/history.jsonl")
        totals, heals = [], []
        print("%s, python %s" % (version, box.run(["python3", "-V"]).stdout.split()[1]))
        print("%4s  %12s  %10s" % ("run", "kill->mail s", "heal s"))
        for i in range(1, args.crashes + 1):
            box.wait_listening(5002)
            box.run(["systemctl", "is-active", "--quiet", "story-stages"])
            # wait for the previous heal to finish entirely before the next crash
            while box.run(["systemctl", "is-active", "selfheal@story-stages.service"],
                          check=False).stdout.strip() in ("activating", "active"):
                time.sleep(0.05)
            size = mbox.stat().st_size if mbox.exists() else 0
            start = time.monotonic()
            box.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "story-stages"])
            while not (mbox.exists() and mbox.stat().st_size > size and
                       b"\n\n" in mbox.read_bytes()[size:]):
                if time.monotonic() - start > 60:
                    raise SystemExit("run %d: no mail within 60 s" % i)
                time.sleep(0.005)
            total = time.monotonic() - start
            new = mbox.read_bytes()[size:]
            if b"story-stages - RESOLVED" not in new:
                sys.stdout.write(new.decode("utf-8", "replace"))
                raise SystemExit("run %d: the report was not RESOLVED (above)" % i)
            time.sleep(0.2)  # let the heal write its history line
            summary = box.host_path("/var/lib/selfheal/summary/story-stages.json")
            event = json.loads(summary.read_text())["last"] if summary.exists() else \
                json.loads(history.read_text().splitlines()[-1])
            totals.append(total)
            heals.append(event.get("healing_seconds") or 0.0)
            print("%4d  %12.3f  %10.3f" % (i, total, heals[-1]))
        dashboard = []
        for _ in range(5):
            started = time.monotonic()
            box.run(["/usr/local/sbin/selfheal", "status", "--json"], check=False)
            dashboard.append(time.monotonic() - started)
        kept = state_bytes(box)
    print()
    print("kill -> mailbox: p50 %.3f s, p95 %.3f s, max %.3f s, mean %.3f s (n=%d)" % (
        percentile(totals, 0.5), percentile(totals, 0.95), max(totals), statistics.mean(totals), len(totals)))
    print("healing time:    p50 %.3f s, p95 %.3f s" % (percentile(heals, 0.5), percentile(heals, 0.95)))
    print("dashboard (status --json): p50 %.3f s, max %.3f s" % (percentile(dashboard, 0.5), max(dashboard)))
    print("state kept (/var/lib/selfheal, /var/log/selfheal): %.2f MiB" % (kept / (1 << 20)))
    print("goals: plain p50 <= 0.35 s; loaded <= max(1 s, 2 x plain); dashboard < 1 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
