"""Drill: seen from a fleet, on a real systemd (252) with Debian's prometheus-node-exporter
running as shipped: after a crash and its heal, node_exporter serves selfheal's metrics with
the heal counted and the service up (written by the heal's sandbox, and by the watch's,
which may write nothing else under /var); the journal has the heal with its fields, found by
`journalctl SELFHEAL_SERVICE=...` and by its MESSAGE_ID."""

import json
import time

import pytest

from drillkit import about, clear_mailbox, drill_conf, drill_suites, installed_host, kill, wait_for, web_unit

pytestmark = pytest.mark.drill

UNITS = {"web.service": web_unit(5460)}
CONFIG = drill_conf({"watch_interval": "5s", "verify_timeout": "5s"},
                    {"web": {"port": 5460, "health_url": "http://127.0.0.1:5460/health"}})
RESOLVED_ID = "3f5c2a9e8d7b4c1fa6e0b2d4c8f1a7e3"  # the README's MESSAGE_ID of a RESOLVED heal


@pytest.fixture(scope="module", params=drill_suites("bookworm"))
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param,
                        start=("web.service", "prometheus-node-exporter.service"), ports=(5460,)) as box:
        # node_exporter listens on [::]:9100 (the bed's port check reads IPv4 only): ask it.
        wait_for(lambda: "node_" in box.run(["python3", "-c", SCRAPE], check=False).stdout, 15, "node_exporter")
        yield box


SCRAPE = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9100/metrics', timeout=5).read().decode())"


def scrape(box):
    """node_exporter's /metrics, selfheal's lines only: {'name{labels}': value}."""
    text = box.run(["python3", "-c", SCRAPE]).stdout
    samples = {}
    for line in text.splitlines():
        if line.startswith("selfheal_"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_after_a_crash_node_exporter_serves_the_heal_counted_and_the_service_up(host):
    clear_mailbox(host)
    kill(host, "web.service")
    host.wait_mail(about("web", "RESOLVED"), timeout=30)
    wait_for(lambda: scrape(host).get('selfheal_heals_total{outcome="RESOLVED",service="web"}') == 1, 15,
             "the heal in node_exporter's metrics")
    samples = scrape(host)
    assert samples['selfheal_service_up{service="web",unit="web.service"}'] == 1
    assert samples['selfheal_service_state{service="web",state="active",unit="web.service"}'] == 1
    assert samples['selfheal_heals_total{outcome="FAILED",service="web"}'] == 0
    assert samples['selfheal_escalated{service="web"}'] == 0
    assert samples["selfheal_mail_queue"] == 0
    assert 0 < samples['selfheal_last_healing_seconds{service="web"}'] < 10
    # The watch (ProtectSystem=strict, plus this one directory) writes them too, each run.
    start = time.time()
    wait_for(lambda: scrape(host).get("selfheal_watch_last_run_timestamp_seconds", 0) >= start - 1, 20,
             "a watch run in the metrics")
    mode = host.run(["stat", "-c", "%a %U", "/var/lib/prometheus/node-exporter/selfheal.prom"]).stdout.split()
    assert mode == ["644", "root"]


def test_the_journal_has_the_heal_with_its_fields(host):
    # The README's queries, with _UID=0: only root's entries (any user may send these fields).
    out = host.run(["journalctl", "--no-pager", "-o", "json", "_UID=0", "SELFHEAL_SERVICE=web"]).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    healed = [e for e in entries if e.get("SELFHEAL_OUTCOME") == "RESOLVED"]
    assert healed, entries
    entry = healed[-1]
    assert entry["SYSLOG_IDENTIFIER"] == "miraclemax-self-heal"
    assert entry["MESSAGE_ID"] == RESOLVED_ID
    assert entry["SELFHEAL_UNIT"] == "web.service" and entry["SELFHEAL_TRIGGER"] == "onfailure"
    assert entry["SELFHEAL_INCIDENT"] and entry["_SYSTEMD_UNIT"] == "selfheal@web.service"
    assert entry["MESSAGE"].startswith("web: web resolved in ")
    by_id = host.run(["journalctl", "--no-pager", "-o", "json", "_UID=0", "MESSAGE_ID=" + RESOLVED_ID]).stdout
    assert entry["__CURSOR"] in by_id
    # One line per outcome: the text line and the fields are the same journal entry.
    text = host.run(["journalctl", "--no-pager", "-o", "cat", "_UID=0", "-t", "miraclemax-self-heal"]).stdout
    assert text.count("web: web resolved in ") == len(healed)
