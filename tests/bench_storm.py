#!/usr/bin/env python3
"""Benchmark (not a test): a storm, N services SIGKILLed at once, selfheal against systemd's
own Restart= alone, in the same container.

    sudo python3 tests/bench_storm.py [--suite bookworm] [--services 30] [--storms 3]

Boots the drill container (tests/bed.py) and installs selfheal with ./install.sh. Then, with
N small HTTP stand-ins (tests/standin.py, a Python process each):

    systemd alone   N instances with Restart=on-failure, RestartSec=100ms, not listed in
                    services.conf: one `systemctl kill --kill-who=main -s KILL` of them all,
                    then the time until every one answers HTTP again;
    selfheal        N other instances without Restart=, listed (port, health_url), selfheal's
                    defaults otherwise: the same kill, the same clock; then the mails the
                    storm brought (10 s after all answered), and the peak of selfheal's
                    processes together (the resident memory of every process whose command
                    line names selfheal, summed, sampled every 20 ms inside the container).

Each storm is timed inside the container (no nsenter in the measured time). Prints each storm
and the medians. Goals (issue 21): selfheal within 1.5x systemd alone, at most 3 mails a storm,
under 200 MB together at the peak; after each storm every service back without a human.
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
from drillkit import CLONE, STANDIN, drill_conf, installed_host  # noqa: E402

ALONE_BASE, HEALED_BASE = 7000, 6000
TEMPLATE = ("[Unit]\nDescription=stand-in %i\n[Service]\nExecStart=/usr/bin/python3 " + STANDIN + " %i\n{extra}")

# Run inside the container: kill them all, poll until all answer, sample selfheal's memory.
STORM = r'''
import json, os, socket, subprocess, sys, threading, time
units, ports = sys.argv[1].split(","), [int(p) for p in sys.argv[2].split(",")]
peak, stop = [0], threading.Event()
def rss_of_selfheal():
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmd = f.read()
            if b"selfheal" not in cmd or b"storm.py" in cmd:
                continue
            with open("/proc/%s/status" % pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss_of_selfheal())
        time.sleep(0.02)
def answers(port):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        ok = s.recv(12).startswith(b"HTTP/1.0 200")
        s.close()
        return ok
    except OSError:
        return False
threading.Thread(target=sample, daemon=True).start()
t0 = time.monotonic()
subprocess.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL"] + units, check=True)
time.sleep(0.05)
pending = set(ports)
while pending and time.monotonic() - t0 < 300:
    pending = {p for p in pending if not answers(p)}
    time.sleep(0.01)
back = time.monotonic() - t0
time.sleep(float(sys.argv[3]))
stop.set()
print(json.dumps({"back": back, "left": sorted(pending), "peak": peak[0]}))
'''


def storm(box, units, ports, settle):
    out = box.run(["python3", "/var/tmp/storm.py", ",".join(units), ",".join(map(str, ports)), str(settle)],
                  timeout=400).stdout
    return json.loads(out.strip().splitlines()[-1])


def wait_all_active(box, units, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        states = box.run(["systemctl", "show", "-p", "ActiveState", "--value"] + units).stdout.split()
        if all(s == "active" for s in states):
            return
        if time.monotonic() > deadline:
            raise SystemExit("not all active again: %s" % states)
        time.sleep(0.5)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=None, help="bookworm (systemd 252) or trixie (257)")
    parser.add_argument("--services", type=int, default=30)
    parser.add_argument("--storms", type=int, default=3)
    args = parser.parse_args(argv)
    reason = skip_or_fail_reason(args.suite)
    if reason:
        print("cannot run: %s" % reason, file=sys.stderr)
        return 2
    n = args.services
    alone = ["alone@%d.service" % (ALONE_BASE + i) for i in range(1, n + 1)]
    healed = ["healed@%d.service" % (HEALED_BASE + i) for i in range(1, n + 1)]
    services = {"web%d" % (HEALED_BASE + i): {"unit": "healed@%d.service" % (HEALED_BASE + i), "port": HEALED_BASE + i,
                                              "health_url": "http://127.0.0.1:%d/health" % (HEALED_BASE + i)}
                for i in range(1, n + 1)}
    config = drill_conf({"watch_interval": "5min"}, services)
    units = {"alone@.service": TEMPLATE.format(extra="Restart=on-failure\nRestartSec=100ms\n"),
             "healed@.service": TEMPLATE.format(extra="")}
    with installed_host(TESTS.parent, units, config, suite=args.suite) as box:
        print(box.run(["systemctl", "--version"]).stdout.splitlines()[0], "-", n, "services", flush=True)
        box.write("/var/tmp/storm.py", STORM)
        results = {"systemd alone": [], "selfheal": []}
        mails = []
        peaks = []
        for label, group, base in (("systemd alone", alone, ALONE_BASE), ("selfheal", healed, HEALED_BASE)):
            ports = [base + i for i in range(1, n + 1)]
            box.run(["systemctl", "start"] + group, timeout=300)
            wait_all_active(box, group)
            for port in ports:
                box.wait_listening(port, timeout=60)
            for k in range(args.storms):
                box.sh(": > /var/mail/root")
                got = storm(box, group, ports, 10.0 if label == "selfheal" else 0.5)
                results[label].append(got["back"])
                line = "%-13s storm %d: all %d answering again in %.2f s" % (label, k + 1, n, got["back"])
                if got["left"]:
                    line += " (%d never came back)" % len(got["left"])
                if label == "selfheal":
                    count = len(box.mails())
                    mails.append(count)
                    peaks.append(got["peak"])
                    line += "; %d mail(s); selfheal's processes at the peak: %.0f MB" % (count, got["peak"] / 1e6)
                print(line, flush=True)
                wait_all_active(box, group)
                time.sleep(2)
            box.run(["systemctl", "stop"] + group, timeout=300)
        a, s = statistics.median(results["systemd alone"]), statistics.median(results["selfheal"])
        print("\nmedian of %d storms of %d services: systemd alone %.2f s, selfheal %.2f s (%.2fx); "
              "mails per storm: %s; peak memory: %.0f MB (max)" % (
                  args.storms, n, a, s, s / a, ", ".join(map(str, mails)), max(peaks) / 1e6), flush=True)
        outcomes = box.run([CLONE + "/selfheal.py", "status", "--json"], check=False).stdout
        try:
            escalated = [x["name"] for x in json.loads(outcomes)["services"] if x.get("escalated")]
        except (ValueError, KeyError, TypeError):
            escalated = ["?"]
        print("escalated after the storms: %s" % (", ".join(escalated) or "none"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
