#!/usr/bin/env python3
"""The fleet's status in one table and one JSON file (deploy/ansible/status.yml).

Runs on the controller (Ansible's own Python, stdlib only). Reads on stdin what the
playbook registered on each host for `selfheal status --json`, as one JSON object
{HOST: {"rc": ..., "stdout": ..., "stderr": ..., "msg": ..., "unreachable": ...}} (base64
of it from the playbook: Ansible would turn a template result that looks like a dict back
into one), writes the merged status to --out:

    {"version": 1, "hosts": {HOST: <its status --json object> or {"error": ..., "detail": ...}},
     "problems": [{"host": HOST, "service": NAME or null, "problem": WHY}, ...]}

and prints for the playbook {"table": [LINE, ...], "problems_by_host": {HOST: [WHY, ...]},
"out": PATH}.
A problem: a service whose `problem` is true (status counts it against exit 0) or that is
escalated; a host that was unreachable, has no selfheal, or whose answer cannot be read.
Paused is shown, never a problem by itself. Exit 0 when it printed and wrote, whatever it
found (the playbook fails the hosts with problems); 1 when it could not.
"""

import argparse
import base64
import json
import os
import re
import sys
import time

FLEET_SCHEMA = 1  # the merged file's shape
STATUS_SCHEMA = 1  # the `status --json` version this reads (README, "status --json")
DETAIL_MAX = 200  # characters of an error message kept (a host's stderr is not bounded)
COLUMNS = ("HOST", "SERVICE", "STATE", "LAST HEAL", "ESCALATED/PAUSED", "QUEUE")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def clean(value, limit=None):
    """A value from a host made fit for one terminal line: no control characters, bounded."""
    text = _CONTROLS.sub("?", str(value))
    return text if limit is None or len(text) <= limit else text[:limit - 3] + "..."


def first_line(text):
    return next((line.strip() for line in str(text or "").splitlines() if line.strip()), "")


# -- one host: its registered result -> its status object, or an error ----------------


def host_entry(result):
    """What `status --json` said on one host, or {"error": KIND, "detail": WHY}.

    status exits 0 (all healthy) or 1 (a service has a problem) with the JSON on stdout;
    2 (not installed, a config it cannot load) with the reason on stderr."""
    if not isinstance(result, dict) or not result:
        return {"error": "no result", "detail": "the host failed before selfheal status ran"}
    if result.get("unreachable"):
        return {"error": "unreachable", "detail": clean(first_line(result.get("msg")), DETAIL_MAX)}
    rc, stderr = result.get("rc"), first_line(result.get("stderr")) or first_line(result.get("msg"))
    if rc not in (0, 1):
        # python3 without the file: "can't open file"; selfheal without its config: "not installed"
        missing = "can't open file" in stderr or "not installed" in stderr
        return {"error": "not installed" if missing else "error", "rc": rc,
                "detail": clean(stderr or "selfheal status exited %s" % rc, DETAIL_MAX)}
    try:
        status = json.loads(result.get("stdout") or "")
    except ValueError as exc:
        return {"error": "unreadable", "rc": rc, "detail": clean("status --json: %s" % exc, DETAIL_MAX)}
    if not isinstance(status, dict) or not isinstance(status.get("services"), list):
        return {"error": "unreadable", "rc": rc, "detail": "status --json: not a status object"}
    if status.get("version") != STATUS_SCHEMA:
        return {"error": "unreadable", "rc": rc,
                "detail": clean("status --json version %s (this reads version %d)"
                                % (status.get("version"), STATUS_SCHEMA), DETAIL_MAX)}
    return status


def host_problems(host, entry):
    """[{"host", "service", "problem"}] of one host's entry (see host_entry)."""
    if "error" in entry:
        return [{"host": host, "service": None, "problem": "%s: %s" % (entry["error"], entry["detail"])}]
    found = []
    for svc in entry["services"]:
        if not isinstance(svc, dict):
            continue
        why = ([clean(svc.get("state") or "problem")] if svc.get("problem") is True else []) + (
            ["escalated"] if svc.get("escalated") is True else [])
        if why:
            found.append({"host": host, "service": clean(svc.get("name", "?")), "problem": ", ".join(why)})
    if not found and entry.get("healthy") is False:  # status exits 1: something is wrong
        found.append({"host": host, "service": None, "problem": "selfheal status says unhealthy"})
    return found


def merge(results):
    """{HOST: registered result} (in inventory order) -> the merged status (module docstring)."""
    hosts = {str(host): host_entry(result) for host, result in results.items()}
    problems = [p for host, entry in hosts.items() for p in host_problems(host, entry)]
    return {"version": FLEET_SCHEMA, "hosts": hosts, "problems": problems}


# -- the table ------------------------------------------------------------------------


def _count(value):
    return "?" if value is None else clean(value)


def queue_cell(config):
    return "mail %s, webhook %s" % (_count(config.get("mail_queue")), _count(config.get("webhook_queue")))


def last_heal_cell(svc):
    when, outcome = svc.get("last_heal") or "", svc.get("last_outcome") or ""
    return clean(("%s %s" % (when, outcome)).strip()) or "-"


def held_cell(svc):
    """escalated / paused (until when, in the controller's time)."""
    words = ["escalated"] if svc.get("escalated") is True else []
    if svc.get("paused") is True:
        until = svc.get("paused_until")
        try:
            words.append("paused until %s" % time.strftime("%Y-%m-%d %H:%M", time.localtime(until)))
        except (TypeError, ValueError, OverflowError, OSError):  # null: until resumed
            words.append("paused")
    return ", ".join(words) or "-"


def rows(merged):
    """One row per service of each host, one for a host with an error or no services."""
    out = []
    for host, entry in merged["hosts"].items():
        host = clean(host)
        if "error" in entry:
            out.append((host, "-", entry["error"], "-", "-", "-"))
            continue
        config = entry.get("config") if isinstance(entry.get("config"), dict) else {}
        services = [svc for svc in entry["services"] if isinstance(svc, dict)]
        if not services:
            out.append((host, "-", "no services", "-", "-", queue_cell(config)))
        for svc in services:
            out.append((host, clean(svc.get("name", "?")), clean(svc.get("state", "?")), last_heal_cell(svc),
                        held_cell(svc), queue_cell(config)))
    return out


def render(merged):
    """The table and what follows it, as lines of fixed-width text."""
    table = [COLUMNS] + rows(merged)
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in table]
    services = sum(len(e["services"]) for e in merged["hosts"].values() if "error" not in e)
    problems = merged["problems"]
    lines.append("%d host(s), %d service(s): %s" % (len(merged["hosts"]), services,
                                                   "%d problem(s)" % len(problems) if problems else "no problem"))
    lines += ["problem: %s%s: %s" % (clean(p["host"]), " " + p["service"] if p["service"] else "", p["problem"])
              for p in problems]
    return lines


def problem_text(p):
    """"SERVICE: WHY", or "WHY" for the host itself."""
    return "%s: %s" % (p["service"], p["problem"]) if p["service"] else p["problem"]


# -- CLI ------------------------------------------------------------------------------


def read_results(text):
    """stdin: the JSON object, or base64 of it (what the playbook sends)."""
    text = text.strip()
    if not text.startswith("{"):
        text = base64.b64decode(text, validate=True).decode("utf-8")
    results = json.loads(text)
    if not isinstance(results, dict):
        raise ValueError("expected a JSON object {HOST: result}")
    return results


def write_json(path, data):
    """Replace `path` at once (a reader never sees half a file)."""
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=False)
        handle.write("\n")
    os.replace(partial, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Merge the hosts' selfheal status --json into one table "
                                                 "and one JSON file (deploy/ansible/status.yml).")
    parser.add_argument("--out", required=True, help="the merged JSON (relative: to the current directory)")
    args = parser.parse_args(argv)
    try:
        merged = merge(read_results(sys.stdin.read()))
        out = os.path.abspath(args.out)
        write_json(out, merged)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        print("fleet_status: %s" % exc, file=sys.stderr)
        return 1
    lines = render(merged) + ["merged JSON: %s" % out]
    by_host = {}
    for p in merged["problems"]:
        by_host.setdefault(p["host"], []).append(problem_text(p))
    json.dump({"table": lines, "problems_by_host": by_host, "out": out}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
