#!/usr/bin/env python3
"""Benchmark (not a test): wall time of `miraclemax-status` for 4, 50 and 200 services.

    sudo python3 tests/bench_status.py [--runs 15] [--sizes 4,50,200] [--suite bookworm]

Boots the drill container (tests/bed.py) with the four MiracleMax stand-ins on their ports
(story-stages 5002, passgo 5001, traefik 80, actual-budget 5006) and 196 cheap services
(`sleep infinity`, no port), all running. For each size it installs selfheal with
./install.sh for the four plus the first N-4 cheap ones, lets the watch look once (so every
service has its watch state, as on a real host), and keeps a heal history of 500 events over
the last week. Then, inside the container (no nsenter overhead), it runs `miraclemax-status`
and `miraclemax-status --json` N times each, stdout to a pipe, after one warm-up run.

Prints the median, min and 90th percentile per size; for reference the median of the one
busctl call that asks systemd about every unit, and of one `systemctl show` of them all (what
the dashboard would take with it instead); and the 200/4 ratio. Goal: median under 0.3 s at
200 services, and within 2x of 4 services.
"""

import argparse
import json
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from bed import Container, skip_or_fail_reason  # noqa: E402
from drillkit import CLONE, REPO_INSIDE, STANDIN, web_unit  # noqa: E402

WEB = [("story-stages", 5002, "books.jbyrd.org", True), ("passgo", 5001, "passgo.jbyrd.org", True),
       ("traefik", 80, "jbyrd.org", True), ("actual-budget", 5006, "budget.jbyrd.org", False)]
SLEEPER = "[Unit]\nDescription=bench sleeper\n[Service]\nExecStart=/bin/sleep infinity\n"
HISTORY_EVENTS = 500

# Runs inside the container: time a command line N times after a warm-up; JSON out.
TIMER = r"""
import json, subprocess, sys, time
runs, argv = int(sys.argv[1]), sys.argv[2:]
subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
times, rc, err = [], None, ""
for _ in range(runs):
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    times.append(time.perf_counter() - start)
    rc, err = done.returncode, done.stderr.decode()[-400:]
print(json.dumps({"times": times, "rc": rc, "err": err, "bytes": len(done.stdout)}))
"""

# Runs inside the container: a heal history like a busy week's (the dashboard reads all of it).
HISTORY = r"""
import json, random, sys, time
names, now = sys.argv[2:], time.time()
random.seed(5)
with open("/var/lib/selfheal/history.jsonl", "w") as out:
    for i in range(int(sys.argv[1])):
        ts = now - 7 * 86400 + i * (7 * 86400 / int(sys.argv[1]))
        out.write(json.dumps({"ts": round(ts, 3), "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)),
                              "service": random.choice(names), "unit": "x.service",
                              "outcome": random.choice(["RESOLVED"] * 8 + ["RECOVERED", "FAILED"]),
                              "trigger": "onfailure", "strategy": "service_restart", "healing_seconds": 0.4,
                              "result": "signal", "exit": "killed KILL",
                              "root_cause": "The main process was killed by signal KILL (SIGKILL) from outside.",
                              "healed_invocation": "", "last_invocation": "", "trigger_detail": ""},
                             sort_keys=True) + "\n")
"""


def config(size):
    lines = ["[selfheal]", "name = MiracleMax", "email_to = root@localhost",
             "email_from = selfheal@miraclemax.localdomain", ""]
    for name, port, domain, critical in WEB[:size]:
        lines += ["[%s]" % name, "port = %d" % port, "domain = %s" % domain,
                  "critical = %s" % ("yes" if critical else "no"), ""]
    for i in range(max(0, size - len(WEB))):
        lines += ["[sleeper-%03d]" % i, ""]
    return "\n".join(lines)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--sizes", default="4,50,200")
    parser.add_argument("--suite", default=None, help="bullseye (systemd 247), bookworm (252) or trixie (257)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    reason = skip_or_fail_reason(args.suite)
    if reason:
        print("cannot run: %s" % reason, file=sys.stderr)
        return 2
    most = max(sizes)
    with Container(suite=args.suite, binds_ro={str(TESTS.parent): REPO_INSIDE}) as box:
        box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/standin.py", STANDIN])
        for name, port, _, _ in WEB:
            box.write("/etc/systemd/system/%s.service" % name, web_unit(port))
        for i in range(max(0, most - len(WEB))):
            box.write("/etc/systemd/system/sleeper-%03d.service" % i, SLEEPER)
        box.run(["systemctl", "daemon-reload"])
        units = [name for name, _, _, _ in WEB] + ["sleeper-%03d" % i for i in range(max(0, most - len(WEB)))]
        box.run(["systemctl", "start", *units], timeout=300)
        for _, port, _, _ in WEB:
            box.wait_listening(port)
        box.run(["cp", "-a", REPO_INSIDE, CLONE])
        version = box.run(["systemctl", "--version"]).stdout.splitlines()[0]
        python = box.run(["python3", "-V"]).stdout.split()[1]
        print("%s, python %s, %d runs per figure (median / min / p90, seconds)" % (version, python, args.runs))
        print("%8s  %-24s  %-24s  %-7s  %s" % ("services", "miraclemax-status", "... --json", "busctl",
                                               "systemctl show (not used)"))
        medians = {}
        for size in sizes:
            box.write(CLONE + "/services.conf", config(size))
            box.run([CLONE + "/install.sh"], timeout=300)
            names = units[:size]
            box.run(["python3", "-c", HISTORY, str(HISTORY_EVENTS), *names])
            box.run(["selfheal", "watch"], timeout=120)  # every service gets its watch state
            figures = []
            asked = ["%s.service" % n for n in names] + ["selfheal-watch.timer"]
            for argv in (["miraclemax-status"], ["miraclemax-status", "--json"],
                         ["busctl", "--json=short", "--", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                          "org.freedesktop.systemd1.Manager", "ListUnitsByNames", "as", str(len(asked))] + asked,
                         ["systemctl", "show", "-p", "Id,LoadState,ActiveState,SubState", "--"] + asked):
                result = json.loads(box.run(["python3", "-c", TIMER, str(args.runs), *argv], timeout=600).stdout)
                if argv[0] == "miraclemax-status" and result["rc"] not in (0, 1):
                    raise SystemExit("%s exited %s: %s" % (" ".join(argv), result["rc"], result["err"]))
                figures.append(result["times"])
            medians[size] = percentile(figures[0], 0.5)
            print("%8d  %-24s  %-24s  %-7.3f  %.3f" % (size, *("%.3f / %.3f / %.3f" % (
                percentile(t, 0.5), min(t), percentile(t, 0.9)) for t in figures[:2]), percentile(figures[2], 0.5),
                percentile(figures[3], 0.5)))
        print()
        if 200 in medians and 4 in medians:
            print("200 vs 4 services: %.2fx (goal: within 2x); at 200: %.3f s (goal: under 0.3 s)"
                  % (medians[200] / medians[4], medians[200]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
