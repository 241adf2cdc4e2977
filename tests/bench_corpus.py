#!/usr/bin/env python3
"""Benchmark (not a test): the failure corpus (tests/corpus.py) on a real systemd, measured.

    sudo python3 tests/bench_corpus.py [--suite bookworm] [--only NAME ...] [--restart-only]

Boots one drill container (tests/bed.py) with Debian's nginx, PostgreSQL, Redis, memcached and
the corpus's own apps running, installs selfheal with ./install.sh and the README's quick start
(tests/corpus.py: services_conf), then breaks each scenario in turn and measures it:

    outcome   healed (the service does its job again: the benchmark's own probe, not
              selfheal's), reported (a mail that is not RESOLVED/RECOVERED), or what went wrong
    mail      the first mail about it after the break, in /var/mail/root (real postfix)
    cause     ROOT CAUSE of that mail names the scenario's cause (its regex)
    wrong     wrong actions: a healthy service restarted (another unit's run changed), a
              foreign process signalled, a file under /etc or /srv changed by anyone but the
              scenario, a restart where none may be
    to mail, to healthy   seconds from just before the break to the mail, to healthy again

Then the scenario is undone as a human would (its `undo`, reset-failed, start) before the next.
--restart-only runs the same corpus without selfheal: Restart=on-failure (RestartSec=100ms) added
to every unit that has no Restart= of its own, as systemd alone would do it.

Prints one row per scenario and a summary; exit status 0 whether or not goals are met.
"""

import argparse
import email
import email.policy
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from bed import Container, skip_or_fail_reason  # noqa: E402
from corpus import PROBE, REAP, SCENARIOS, STRAYS, UNITS, prepare_host, services_conf  # noqa: E402
from drillkit import CLONE, REPO_INSIDE  # noqa: E402

START_GRACE = 30.0  # the corpus's verify_timeout (the default): a younger run is "starting"
HEALTHY_WAIT = 40.0  # after the mail (or, without selfheal, after the break) to be healthy again
WATCHED = ("/etc", "/srv")  # every file: owner, mode, size, mtime
WATCHED_DIRS = ("/var/lib/redis", "{pgdata}", "/var/log/nginx")  # these directories themselves (their files are data)
DIRS = "find %s -maxdepth 0 -printf '%%p %%m %%U %%G 0 0\\n' 2>/dev/null; true"
FINGERPRINT = ("find %s -xdev \\( -path /etc/selfheal -o -path /etc/selfheal/\\* -o -path /etc/systemd/system/\\* "
               "-o -path /etc/ld.so.cache \\) -prune -o -printf '%%p %%m %%U %%G %%s %%T@\\n' 2>/dev/null; true")


class Bench:
    def __init__(self, box, facts, restart_only, keep=None):
        self.box, self.facts, self.restart_only, self.keep = box, facts, restart_only, keep
        self.mbox = box.host_path("/var/mail/root")

    def unit(self, service):
        return UNITS[service].format(**self.facts)

    def fill(self, text):
        return text.format(**self.facts) if text else text

    def sh(self, script, timeout=60):
        try:
            return self.box.run(["/bin/sh", "-c", script], check=False, timeout=timeout)
        except subprocess.TimeoutExpired:
            print("  (timed out after %d s: %s)" % (timeout, script[:100]), flush=True)
            return subprocess.CompletedProcess(script, 124, "", "")

    def healthy(self, names):
        try:
            out = self.box.run(["python3", "-c", PROBE, *names], check=False, timeout=30).stdout
        except subprocess.TimeoutExpired:
            return set()
        try:
            return set(json.loads(out or "[]"))
        except ValueError:
            return set()

    def show(self, unit, prop):
        return self.box.run(["systemctl", "show", "-p", prop, "--value", unit], check=False).stdout.strip()

    def invocations(self):
        units = [self.unit(s) for s in UNITS]
        out = self.box.run(["systemctl", "show", "-p", "Id,InvocationID", *units], check=False).stdout
        found, current = {}, None
        for line in out.splitlines():
            if line.startswith("Id="):
                current = line[3:]
            elif line.startswith("InvocationID=") and current:
                found[current] = line[len("InvocationID="):]
        return found

    def starts(self, unit, since):
        out = self.box.run(["journalctl", "--no-pager", "-o", "cat", "-u", unit, "--since", "@%d" % int(since)],
                           check=False).stdout
        return sum(1 for line in out.splitlines() if line.startswith("Starting "))

    def fingerprint(self):
        text = self.sh(FINGERPRINT % " ".join(WATCHED) + "; " + DIRS % self.fill(" ".join(WATCHED_DIRS)),
                       timeout=60).stdout
        return {parts[0]: parts[1:] for parts in (line.rsplit(" ", 5) for line in text.splitlines() if line)}

    def mailbox_size(self):
        return self.mbox.stat().st_size if self.mbox.exists() else 0

    def new_mails(self, offset):
        if not self.mbox.exists():
            return []
        data = self.mbox.read_bytes()[offset:]
        parts = re.split(rb"(?m)^From [^\n]*\n", data)
        return [email.message_from_bytes(p, policy=email.policy.default) for p in parts if p.strip()]

    def wait_idle(self, service, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.box.run(["systemctl", "is-active", "selfheal@%s.service" % service],
                            check=False).stdout.strip() not in ("activating", "active", "deactivating"):
                return
            time.sleep(0.2)

    def past_grace(self, unit):
        entered = int(self.show(unit, "ActiveEnterTimestampMonotonic") or 0) / 1e6
        left = entered + START_GRACE + 1 - time.monotonic()
        if left > 0:
            time.sleep(left)

    def active(self, names):
        units = [self.unit(n) for n in names]
        states = self.box.run(["systemctl", "is-active", *units], check=False).stdout.split()
        return {n for n, state in zip(names, states) if state == "active"}

    def restore(self, names):
        """Bring every service back to healthy (as a human would), however the scenario ended:
        its unit active and the probe passing (a leftover of the bed may answer for a unit that
        is still starting: it is killed first, and the unit must be up itself)."""
        for _ in range(3):
            self.box.run(["python3", "-c", STRAYS, *[self.unit(n) for n in names]], check=False, timeout=60)
            up = self.active(names)
            sick = [n for n in names if n not in self.healthy(names) or n not in up]
            if not sick:
                return True
            for name in sick:  # --no-block: a start job stuck waiting (a PID file) is replaced, not waited on
                unit = self.unit(name)
                self.sh("systemctl kill -s CONT %s; systemctl stop --no-block %s; sleep 1; %s; systemctl reset-failed %s; "
                        "systemctl start --no-block %s" % (unit, unit, REAP % {"unit": unit}, unit, unit), timeout=60)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and (set(sick) - self.healthy(sick) or set(sick) - self.active(sick)):
                time.sleep(0.5)
        return not [n for n in names if n not in self.healthy(names) or n not in self.active(names)]

    def run(self, sc):
        unit = self.unit(sc.service)
        strays = self.box.run(["python3", "-c", STRAYS, *[self.unit(s) for s in UNITS]], check=False, timeout=60)
        if strays.stdout.strip():  # the bed's doing, not selfheal's: said, not counted
            print("  (before %s: %s)" % (sc.name, "; ".join(strays.stdout.split("\n")).strip("; ")), flush=True)
        if sc.grace:
            self.past_grace(unit)
        self.sh(self.fill(sc.prepare))
        before_inv, before_files = self.invocations(), self.fingerprint()
        offset, wall = self.mailbox_size(), time.time()
        squatter = None
        t0 = time.monotonic()
        self.sh(self.fill(sc.trigger))
        if sc.squatter:
            time.sleep(0.3)
            squatter = self.show("squatter.service", "MainPID")
        watch = [sc.service, *sc.also_healthy]
        mail = to_mail = to_healthy = None
        seen_down = False
        wait = sc.wait if not self.restart_only else (HEALTHY_WAIT if sc.expect == "healed" else 8.0)
        deadline, next_probe = t0 + wait, t0 + 0.3
        while time.monotonic() < deadline:
            now = time.monotonic()
            if mail is None and not self.restart_only and self.mailbox_size() > offset:
                about = [m for m in self.new_mails(offset) if (": %s - " % sc.service) in str(m["Subject"])]
                if about:
                    mail, to_mail = about[0], now - t0
            if to_healthy is None and now >= next_probe:
                if set(watch) <= self.healthy(watch):
                    # without selfheal, healthy counts only once it was seen down (a hang, a stop),
                    # not because the break had not yet bitten; a crash may be back before a look
                    if seen_down or not self.restart_only or sc.by == "crash":
                        to_healthy = time.monotonic() - t0
                else:
                    seen_down = True
                next_probe = time.monotonic() + 0.25
            if (mail is not None or self.restart_only) and (to_healthy is not None or sc.expect == "reported"):
                break
            time.sleep(0.02)
        if mail is not None and sc.expect == "healed" and to_healthy is None:
            end = time.monotonic() + HEALTHY_WAIT
            while time.monotonic() < end and to_healthy is None:
                if set(watch) <= self.healthy(watch):
                    to_healthy = time.monotonic() - t0
                time.sleep(0.25)
        if not self.restart_only:
            self.wait_idle(sc.service)
        after_inv, after_files = self.invocations(), self.fingerprint()
        wrong = []
        allowed = {unit, *sc.touches}
        for name, inv in before_inv.items():
            if name not in allowed and after_inv.get(name) != inv:
                wrong.append("restarted %s" % name)
        if sc.no_restart and after_inv.get(unit) != before_inv.get(unit):
            wrong.append("restarted %s" % unit)
        elif sc.no_restart and self.starts(unit, wall) > 0:
            wrong.append("started %s (futile)" % unit)
        if squatter and squatter != "0" and self.show("squatter.service", "MainPID") != squatter:
            wrong.append("foreign process %s signalled" % squatter)
        changed = sorted(p for p in set(before_files) | set(after_files)
                         if before_files.get(p) != after_files.get(p))
        declared = ("/srv/notes/notes.db",) if sc.service == "notes" else ()  # its db_path
        changed = [p for p in changed if not p.startswith(declared or ("//",))]
        wrong += ["changed %s" % p for p in changed[:3]]
        subject = str(mail["Subject"]) if mail is not None else ""
        label = re.search(r" - ([A-Z]+)", subject)
        label = label.group(1) if label else ""
        root = ""
        if mail is not None:
            text = mail.get_body(preferencelist=("plain",)).get_content()
            match = re.search(r"\nROOT CAUSE\n-+\n(.*?)\n\n", text, re.S)
            root = match.group(1).strip() if match else ""
        healed = to_healthy is not None
        if self.restart_only:
            outcome = "healed" if healed else "down" if sc.expect == "healed" else "unreported"
        elif label in ("RESOLVED", "RECOVERED", "HEALTHY"):
            outcome = "healed" if healed else "RESOLVED-but-down"
        elif label:
            outcome = "reported"
        else:
            outcome = "healed-no-mail" if healed else "no-mail"
        if self.keep:  # the mail and what selfheal logged, for reading afterwards
            self.keep.mkdir(parents=True, exist_ok=True)
            (self.keep / (sc.name + ".mail")).write_text(
                mail.get_body(preferencelist=("plain",)).get_content() if mail is not None else "(no mail)\n")
            (self.keep / (sc.name + ".log")).write_text(self.box.run(
                ["journalctl", "--no-pager", "-o", "short-precise", "--since", "@%d" % int(wall)],
                check=False, timeout=60).stdout[-200000:])
        cause_ok = bool(root) and re.search(sc.cause_re, root.splitlines()[0], re.I) is not None
        self.sh(self.fill(sc.undo))
        if squatter:
            self.sh("systemctl stop squatter; systemctl reset-failed squatter")
        self.restore(list(UNITS))
        return {"name": sc.name, "expect": sc.expect, "outcome": outcome, "label": label,
                "mailed": mail is not None, "cause_ok": cause_ok, "cause": root.splitlines()[0] if root else "",
                "wrong": wrong, "to_mail": to_mail, "to_healthy": to_healthy, "by": sc.by}


def fmt(seconds):
    return "%.1f" % seconds if seconds is not None else "-"


def summary(rows, restart_only):
    fixable = [r for r in rows if r["expect"] == "healed"]
    unfixable = [r for r in rows if r["expect"] == "reported"]
    healed = sum(r["outcome"] == "healed" for r in fixable)
    reported = sum(r["outcome"] == "reported" and r["cause_ok"] for r in unfixable)
    lines = ["fixable healed:              %d/%d" % (healed, len(fixable)),
             "unfixable reported, cause:   %d/%d" % (reported, len(unfixable))]
    if not restart_only:
        mails = [r["to_mail"] for r in rows if r["to_mail"] is not None]
        crashes = [r["to_mail"] for r in rows if r["to_mail"] is not None and r["by"] == "crash"]
        lines += ["cause named right:           %d/%d" % (sum(r["cause_ok"] for r in rows), len(rows)),
                  "mailed:                      %d/%d" % (sum(r["mailed"] for r in rows), len(rows))]
        if mails:
            lines.append("break to mail:               p50 %.1f s, mean %.1f s, max %.1f s; crashes p50 %.1f s"
                         % (statistics.median(mails), statistics.mean(mails), max(mails),
                            statistics.median(crashes) if crashes else float("nan")))
    lines.append("wrong actions:               %d" % sum(len(r["wrong"]) for r in rows))
    heals = [r["to_healthy"] for r in fixable if r["to_healthy"] is not None]
    if heals:
        lines.append("break to healthy (fixable):  p50 %.1f s, mean %.1f s, max %.1f s"
                     % (statistics.median(heals), statistics.mean(heals), max(heals)))
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=None, help="bookworm (systemd 252) or trixie (257)")
    parser.add_argument("--only", nargs="*", default=(), help="scenario names")
    parser.add_argument("--restart-only", action="store_true", help="systemd Restart= alone, no selfheal")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--keep", help="a directory: each scenario's mail and journal go there")
    args = parser.parse_args(argv)
    reason = skip_or_fail_reason(args.suite)
    if reason:
        print("cannot run: %s" % reason, file=sys.stderr)
        return 2
    unknown = set(args.only) - {s.name for s in SCENARIOS}
    if unknown:
        print("unknown scenario(s): %s" % " ".join(sorted(unknown)), file=sys.stderr)
        return 2
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # kill PID: the container is torn down too
    repo = TESTS.parent
    rows = []
    with Container(suite=args.suite, binds_ro={str(repo): REPO_INSIDE}) as box:
        facts = prepare_host(box)
        if args.restart_only:
            for name in UNITS:
                unit = UNITS[name].format(**facts)
                if box.run(["systemctl", "show", "-p", "Restart", "--value", unit]).stdout.strip() == "no":
                    box.write("/etc/systemd/system/%s.d/restart.conf" % unit,
                              "[Service]\nRestart=on-failure\nRestartSec=100ms\n")
            box.run(["systemctl", "daemon-reload"])
        else:
            box.run(["cp", "-a", REPO_INSIDE, CLONE])
            box.write(CLONE + "/services.conf", services_conf(facts["cluster"]))
            box.run([CLONE + "/install.sh"], timeout=180)
        bench = Bench(box, facts, args.restart_only, Path(args.keep) if args.keep else None)
        bench.restore(list(UNITS))
        version = box.run(["systemctl", "--version"]).stdout.splitlines()[0]
        print("%s; %s" % (version, "systemd Restart= alone" if args.restart_only else "selfheal"), flush=True)
        head = "%-32s %-8s %-18s %-5s %-5s %7s %7s  %s" % (
            "scenario", "expect", "outcome", "mail", "cause", "to mail", "healthy", "wrong / ROOT CAUSE")
        print(head, flush=True)
        for sc in chosen:
            row = bench.run(sc)
            rows.append(row)
            print("%-32s %-8s %-18s %-5s %-5s %7s %7s  %s" % (
                row["name"], row["expect"], row["outcome"], "yes" if row["mailed"] else "-",
                ("yes" if row["cause_ok"] else "NO") if not args.restart_only else "-", fmt(row["to_mail"]),
                fmt(row["to_healthy"]), "; ".join(row["wrong"]) or row["cause"][:90]), flush=True)
    print()
    for line in summary(rows, args.restart_only):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
