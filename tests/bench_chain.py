#!/usr/bin/env python3
"""Benchmark (not a test): a database with 10, 100 and 300 dependents (depends_on), killed.

    sudo python3 tests/bench_chain.py [--suite bookworm] [--sizes 10,100,300] [--kills 3]

Boots the drill container (tests/bed.py), installs selfheal with ./install.sh, runs a web
stand-in as the database (port, health_url) and N dependents that stay up (app@1..N,
`sleep infinity`: no port, no health check; cheap enough for 300 on a small host). For each N
the database is SIGKILLed `--kills` times; each time it measures, on the host, from just before
`systemctl kill` until the RESOLVED mail is in /var/mail/root (the chain is looked at before
the mail goes: its cost is in this time), and checks that no dependent was restarted.

Prints each run, then the median per N and the cost per dependent. Goal (issue 21): the mail
within 3 s at 100 dependents, and the cost linear from 10 to 300.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from bed import skip_or_fail_reason  # noqa: E402
from drillkit import CLONE, drill_conf, installed_host, web_unit  # noqa: E402

SETTINGS = {"failure_threshold": 256, "flap_threshold": 1000, "watch_interval": "5min"}
APP = "[Unit]\nDescription=dependent %i\n[Service]\nExecStart=/bin/sleep infinity\n"


def config(n):
    services = {"db": {"port": 5500, "health_url": "http://127.0.0.1:5500/health"}}
    services.update({"app%03d" % i: {"unit": "app@%d.service" % i, "depends_on": "db"} for i in range(1, n + 1)})
    return drill_conf(SETTINGS, services)


def resolved_mails(box):
    return [m for m in box.mails() if "db - RESOLVED" in str(m["Subject"])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=None, help="bookworm (systemd 252) or trixie (257)")
    parser.add_argument("--sizes", default="10,100,300")
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.sizes.split(",")]
    reason = skip_or_fail_reason(args.suite)
    if reason:
        print("cannot run: %s" % reason, file=sys.stderr)
        return 2
    units = {"db.service": web_unit(5500), "app@.service": APP}
    with installed_host(TESTS.parent, units, config(1), suite=args.suite, start=("db",), ports=(5500,)) as box:
        print(box.run(["systemctl", "--version"]).stdout.splitlines()[0])
        medians = {}
        for n in sizes:
            box.run(["systemctl", "start"] + ["app@%d.service" % i for i in range(1, n + 1)], timeout=300)
            box.write("/etc/selfheal/services.conf", config(n))
            box.run([CLONE + "/selfheal.py", "validate", "/etc/selfheal/services.conf"], timeout=60)
            before = box.run(["systemctl", "show", "-p", "InvocationID", "--value"] +
                             ["app@%d.service" % i for i in range(1, n + 1)]).stdout.split()
            times = []
            for _ in range(args.kills):
                box.wait_listening(5500, timeout=30)
                box.sh(": > /var/mail/root")
                started = time.monotonic()
                box.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "db.service"])
                deadline = started + 600
                while not resolved_mails(box):
                    if time.monotonic() > deadline:
                        raise SystemExit("no RESOLVED mail for db within 600 s (%d dependents)" % n)
                    time.sleep(0.02)
                took = time.monotonic() - started
                times.append(took)
                print("%3d dependents: kill -> mail %.2f s" % (n, took), flush=True)
                time.sleep(1)
            after = box.run(["systemctl", "show", "-p", "InvocationID", "--value"] +
                            ["app@%d.service" % i for i in range(1, n + 1)]).stdout.split()
            restarted = sum(1 for a, b in zip(before, after) if a != b)
            medians[n] = statistics.median(times)
            print("%3d dependents: median %.2f s; dependents restarted: %d" % (n, medians[n], restarted), flush=True)
        print("\nsize  median  per dependent over the smallest")
        low = sizes[0]
        for n in sizes:
            extra = (medians[n] - medians[low]) / (n - low) * 1000 if n != low else 0.0
            print("%4d  %5.2f s  %s" % (n, medians[n], "%.1f ms" % extra if n != low else "-"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
