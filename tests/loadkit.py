"""A loaded host for the drill and the benchmark: a year of history as an older selfheal let
it grow (a crash-looping service that Restart= repairs: a RECOVERED line every watch run)
and 20,000 open TCP sockets (established loopback connections, as on a busy host)."""

import json
import time

YEAR_LINES = 1_000_000  # a RECOVERED line every 30 s for a year
HOLDER = "/usr/local/bin/hold-sockets"
PAIRS_PER_HOLDER = 5000
HOLDER_CODE = """\
import socket, sys, time
pairs = int(sys.argv[1])
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(4096)
held = []
for _ in range(pairs):
    client = socket.create_connection(server.getsockname())
    held += [client, server.accept()[0]]
print("holding %d sockets" % len(held), flush=True)
while True:
    time.sleep(3600)
"""


def year_of_history(service, lines=YEAR_LINES, now=None):
    """The bytes of `lines` RECOVERED events of `service`, 30 s apart, ending now."""
    now = time.time() if now is None else now
    template = {"ts": 0.0, "time": "", "service": service, "unit": service + ".service", "outcome": "RECOVERED",
                "trigger": "watch", "strategy": "systemd_restart", "healing_seconds": 0.412,
                "result": "signal", "exit": "killed KILL",
                "root_cause": "The process was killed by signal KILL (from outside: the OOM killer, a person, "
                              "or another program); systemd's Restart= brought it back",
                "healed_invocation": "0" * 32, "last_invocation": "0" * 32,
                "trigger_detail": "systemd restarted it by itself (restarts 1 -> 2)"}
    line = json.dumps(dict(template, ts="@TS@", time="@TIME@"), sort_keys=True)
    line = line.replace('"@TS@"', "%.3f").replace("@TIME@", "%s")  # one format for a million lines
    start = now - lines * 30.0
    assert line.index("%s") < line.index("%.3f")  # sorted keys: "time" comes before "ts"
    return "".join(line % (time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start + i * 30.0)), start + i * 30.0)
                   + "\n" for i in range(lines)).encode()


def load(box, service, lines=YEAR_LINES, socket_pairs=10_000):
    """Seed the year of history into the host and hold the sockets; -> bytes of history written."""
    data = year_of_history(service, lines)
    path = box.host_path("/var/lib/selfheal/history.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    box.write(HOLDER, HOLDER_CODE, 0o755)
    # Several holders: a process may have 20,000 files open here at most (the bed's own limit).
    units = ["hold-sockets-%d" % n for n in range(-(-socket_pairs // PAIRS_PER_HOLDER))]
    for unit in units:
        box.run(["systemd-run", "--unit=" + unit, "-p", "LimitNOFILE=%d" % (2 * PAIRS_PER_HOLDER + 100),
                 "/usr/bin/python3", HOLDER, str(min(PAIRS_PER_HOLDER, socket_pairs))])
    deadline = time.monotonic() + 120
    for unit in units:
        while "holding" not in box.run(["journalctl", "-u", unit, "-o", "cat", "--no-pager"]).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("%s did not get its sockets in 120 s: %s" % (unit, box.run(
                    ["journalctl", "-u", unit, "-o", "cat", "--no-pager"]).stdout[-500:]))
            time.sleep(0.5)
    return len(data)


def open_sockets(box):
    """TCP sockets in this network namespace (all states), as /proc/net/tcp and tcp6 list them."""
    out = box.run(["sh", "-c", "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | wc -l"]).stdout
    return int(out.strip()) - 2


def state_bytes(box):
    """Bytes selfheal keeps on disk: /var/lib/selfheal and /var/log/selfheal."""
    out = box.run(["du", "-sb", "/var/lib/selfheal", "/var/log/selfheal"]).stdout
    return sum(int(line.split()[0]) for line in out.splitlines())
