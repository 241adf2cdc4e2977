"""Drill: bounded state on a loaded host, on a real systemd with postfix. A year of history as
an older selfheal let it grow (a million lines, ~580 MB) and 20,000 open TCP sockets: a crash
is still healed and mailed, the history is cut to its bound by the first event, the
dashboard answers from the summaries, and what selfheal keeps stays a few MiB.
Timings are printed, not asserted (tests/bench_crash_to_mail.py --loaded measures them)."""

import json
import time

import pytest

from drillkit import drill_conf
from drillkit import CLONE, about, body, clear_mailbox, drill_suites, installed_host, kill, wait_idle, web_unit
from loadkit import load, open_sockets, state_bytes

pytestmark = pytest.mark.drill

CONFIG = drill_conf(services={"web": {"port": 5031, "health_url": "http://127.0.0.1:5031/health"}})


@pytest.fixture(scope="module", params=drill_suites("bookworm"))
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, {"web.service": web_unit(5031)}, CONFIG, suite=request.param,
                        start=("web",), ports=(5031,)) as box:
        box.seeded = load(box, "web")
        yield box


def timed_status(box):
    started = time.monotonic()
    out = box.run(["/usr/local/sbin/selfheal", "status", "--json"], check=False).stdout
    return json.loads(out), time.monotonic() - started


def test_a_crash_on_a_loaded_host_is_healed_and_mailed_and_the_state_is_cut_to_its_bound(host):
    sockets = open_sockets(host)
    assert sockets >= 20000, sockets
    data, before = timed_status(host)  # no summary yet: the end of the history answers
    web = next(s for s in data["services"] if s["name"] == "web")
    assert web["last_outcome"] == "RECOVERED"
    clear_mailbox(host)
    started = time.monotonic()
    kill(host, "web")
    [mail] = host.wait_mail(about("web", "RESOLVED"), timeout=60)
    took = time.monotonic() - started
    assert "ROOT CAUSE" in body(mail) and "killed by signal KILL" in body(mail)
    wait_idle(host, "web")
    data, after = timed_status(host)
    web = next(s for s in data["services"] if s["name"] == "web")
    assert web["last_outcome"] == "RESOLVED"
    kept = host.run(["sh", "-c", "cat /var/lib/selfheal/history.jsonl* | wc -c"]).stdout.strip()
    assert int(kept) <= 5 * (1 << 20), kept  # 580 MB seeded; the bound from the first event on
    summary = json.loads(host.read("/var/lib/selfheal/summary/web.json"))
    assert summary["last"]["outcome"] == "RESOLVED" and summary["counts"]["RECOVERED"] > 1000
    assert host.run(["systemctl", "start", "selfheal-watch.service"], timeout=120, check=False).returncode == 0
    total = state_bytes(host)
    assert total < 8 * (1 << 20), total
    print("\nloaded host: %d sockets, %.0f MB of history seeded; crash -> mail %.2f s; dashboard %.2f s "
          "before the first heal, %.2f s after; state kept %.1f MiB"
          % (sockets, host.seeded / 1e6, took, before, after, total / (1 << 20)))


def test_uninstall_purge_removes_every_file_selfheal_kept_and_the_service_keeps_running(host):
    out = host.run([CLONE + "/install.sh", "--uninstall", "--purge"], timeout=120).stdout
    for path in ("/etc/selfheal", "/var/lib/selfheal", "/var/log/selfheal", "/run/selfheal"):
        assert "purged %s" % path in out, out
        assert host.run(["test", "-e", path], check=False).returncode == 1, path
    # The heals wrote metrics for node_exporter (its directory is there); stale, they would lie.
    prom = "/var/lib/prometheus/node-exporter/selfheal.prom"
    assert "removed %s" % prom in out, out
    assert host.run(["test", "-e", prom], check=False).returncode == 1
    assert host.run(["systemctl", "is-active", "web"], check=False).stdout.strip() == "active"
