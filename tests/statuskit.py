"""The documented shape of `selfheal status --json` (README "status --json"), checked key by
key: tests/test_status.py (the fast layer) and tests/test_drill_status.py (a real host)."""

import selfheal


class Maybe:
    """A value of `schema`, or null."""

    def __init__(self, schema):
        self.schema = schema


NUM = (int, float)
SERVICE_SCHEMA = {
    "name": str, "unit": str, "state": str, "active_state": str, "sub_state": str, "result": str,
    "port": Maybe(int), "listening": Maybe(bool), "domain": str, "critical": bool, "problem": bool,
    "paused": bool, "paused_until": Maybe(NUM), "escalated": bool, "hooked": Maybe(bool),
    "watch_detail": str, "watch_checked": Maybe(NUM), "watch_verdict": str, "last_heal": str, "last_heal_ts": Maybe(NUM),
    "last_outcome": str, "last_healing_seconds": Maybe(NUM),
}
EVENT_SCHEMA = {"ts": NUM, "time": str, "service": str, "outcome": str, "trigger": str,
                "healing_seconds": Maybe(NUM), "root_cause": str}
SCHEMA = {
    "version": int, "selfheal": str, "name": str, "host": str, "ts": NUM, "time": str, "healthy": bool,
    "only": [str],
    "system": {
        "uptime_seconds": Maybe(NUM), "load": Maybe([NUM]), "cpus": Maybe(int),
        "memory": Maybe({"total_bytes": int, "used_bytes": int, "available_bytes": int, "percent": NUM}),
        "disks": [{"path": str, "mount": str, "total_bytes": int, "used_bytes": int, "available_bytes": int,
                   "percent": NUM, "services": [str]}],
    },
    "services": [SERVICE_SCHEMA],
    "summary": {"total": int, "running": int, "failed": int, "inactive": int, "activating": int, "paused": int,
                "unhealthy": int, "missing": int, "unknown": int},
    "activity": {"since_ts": NUM, "since": str, "count": int, "by_outcome": {str: int}, "events": [EVENT_SCHEMA],
                 "damaged_lines": int, "error": str},
    "config": {"path": str, "enabled": bool, "units_installed": bool, "timer": str, "watch_interval_seconds": NUM,
               "last_watch_ts": Maybe(NUM), "services_monitored": int, "critical": int, "email_to": [str],
               "failure_threshold": int, "failure_window_seconds": NUM, "mail_queue": Maybe(int),
               "mail_queue_error": str, "webhook_queue": Maybe(int), "systemd_error": str},
}
STATES = {"active", "reloading", "failed", "inactive", "activating", "deactivating", "paused", "unhealthy",
          "not-found", "masked", "error", "unknown"}


def shape_problems(value, schema, where="$"):
    """Every way `value` differs from `schema`: [] when it matches exactly (no extra keys)."""
    if isinstance(schema, Maybe):
        return [] if value is None else shape_problems(value, schema.schema, where)
    if isinstance(schema, list):
        if not isinstance(value, list):
            return ["%s: a list expected, got %r" % (where, value)]
        return [p for i, item in enumerate(value) for p in shape_problems(item, schema[0], "%s[%d]" % (where, i))]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return ["%s: an object expected, got %r" % (where, value)]
        if list(schema) == [str]:  # a map of str to one schema
            return [p for k, v in value.items() for p in
                    (shape_problems(k, str, where) + shape_problems(v, schema[str], "%s.%s" % (where, k)))]
        problems = ["%s: missing key %r" % (where, k) for k in schema if k not in value]
        problems += ["%s: undocumented key %r" % (where, k) for k in value if k not in schema]
        return problems + [p for k in schema if k in value for p in shape_problems(value[k], schema[k], where + "." + k)]
    types_ = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types_:  # True is an int to Python, not to a script
        return ["%s: %r is a bool" % (where, value)]
    return [] if isinstance(value, types_) else ["%s: %r is not %s" % (where, value, schema)]


def check_shape(data):
    problems = shape_problems(data, SCHEMA)
    assert problems == [], "\n".join(problems)
    assert data["version"] == selfheal.STATUS_SCHEMA == 1
    assert all(s["state"] in STATES for s in data["services"])
    assert data["summary"]["total"] == len(data["services"]) == sum(
        v for k, v in data["summary"].items() if k != "total")
