"""miraclemax-status / `selfheal.py status`: the dashboard.

The text is a pure function of the collected data, so most of it is tested without a host;
the rest runs against the fake systemctl (tests/fakes) and temp dirs, in-process.
The documented shape of `status --json` (README) is tests/statuskit.py; the drill uses it too.
"""

import io
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import selfheal
from conftest import conf
from statuskit import check_shape

REPO = Path(__file__).resolve().parent.parent
STATUS_SCRIPT = REPO / "miraclemax-status"
NOW = 1_700_000_000.0
HOUR = 3600.0

SETTINGS = {"email_to": "owner@example.org, ops@example.org", "failure_threshold": 4, "failure_window": "2h"}
SERVICES = {"story-stages": {"port": 5002, "domain": "books.jbyrd.org", "critical": "yes"},
            "passgo": {"port": 5001, "domain": "passgo.jbyrd.org", "critical": "yes"},
            "traefik": {"port": 80},
            "actual-budget": {"port": 5006, "domain": "budget.jbyrd.org"}}
CONF = conf(SETTINGS, SERVICES)
NAMES = ["story-stages", "passgo", "traefik", "actual-budget"]


# =============================================================================
# Pure rendering: a Dashboard built by hand, no host
# =============================================================================

def svc(name, state, **kw):
    active = {"paused": "failed", "unhealthy": "active", "not-found": "inactive"}.get(state, state)
    return selfheal.ServiceStatus(name, name + ".service", state, active_state=active, **kw)


def event(service, outcome, hours_ago, seconds=1.5, cause="The main process was killed by signal KILL"):
    return {"ts": NOW - hours_ago * HOUR, "time": "t", "service": service, "outcome": outcome, "trigger": "onfailure",
            "healing_seconds": seconds, "root_cause": cause}


def dashboard(services=None, events=(), count=None, **setup):
    services = services if services is not None else (
        svc("story-stages", "active", port=5002, domain="books.jbyrd.org", critical=True, listening=True,
            last_heal=event("story-stages", "RESOLVED", 2)),
        svc("passgo", "failed", port=5001, critical=True, result="exit-code",
            last_heal=event("passgo", "FAILED", 0.1, None)),
        svc("traefik", "paused", port=80, paused_until=0.0),
        svc("actual-budget", "unhealthy", port=5006, watch_detail="port 5006 not listening", watch_checked=NOW - 40),
    )
    options = dict(config_path="/etc/selfheal/services.conf", units_installed=True, timer="active",
                   watch_interval=30.0, last_watch=NOW - 12, monitored=len(services), critical=2,
                   email_to=("owner@example.org",), failure_threshold=3, failure_window=HOUR, mail_queue=0)
    options.update(setup)
    system = selfheal.SystemOverview(NOW, "miraclemax", 3 * 86400 + 4 * HOUR + 720, (0.12, 0.08, 0.01), 2,
                                     4 * 2 ** 30, 3 * 2 ** 30,
                                     (selfheal.DiskUsage("/", "/", 40 * 2 ** 30, 10 * 2 ** 30, 28 * 2 ** 30),))
    events = tuple(events)
    activity = selfheal.Activity(NOW - 86400, len(events) if count is None else count, {"RESOLVED": len(events)},
                                 events)
    return selfheal.Dashboard("MiracleMax", system, tuple(services), activity, selfheal.SelfhealSetup(**options))


def row(text, name):
    """The line of one service in the SERVICE HEALTH section of a rendered dashboard."""
    lines = text.splitlines()
    start = [i for i, line in enumerate(lines) if "SERVICE HEALTH" in line][0]
    end = [i for i, line in enumerate(lines) if "SUMMARY" in line][0]
    [line] = [line for line in lines[start + 1:end]
              if name in line.split() and not line.strip().startswith(("↳", "->"))]
    return line


def test_dashboard_shows_every_section_with_the_design_glyphs_on_utf8():
    text = selfheal.render_dashboard(dashboard(events=[event("story-stages", "RESOLVED", 2)]), unicode=True)
    lines = text.splitlines()
    assert lines[0].startswith("╭") and lines[0].endswith("╮") and lines[2].startswith("╰")
    assert "MiracleMax" in lines[1] and "host miraclemax" in lines[1]
    for title in ("📊 SYSTEM OVERVIEW", "🩺 SERVICE HEALTH", "📈 SUMMARY", "🩹 RECENT SELF-HEALING ACTIVITY",
                  "🔧 SELF-HEALING CONFIGURATION"):
        assert any(line.startswith(title + " ─") for line in lines), title
    assert "Uptime  3d 4h 12m" in text and "Load    0.12 0.08 0.01 (2 CPUs)" in text
    assert "Memory  1.0 GiB / 4.0 GiB (25%)" in text
    assert "Disk /  10.0 GiB / 40.0 GiB (26%), 28.0 GiB free" in text  # as df: 10 / (10 + 28)
    story = lines[[i for i, line in enumerate(lines) if "✅ story-stages" in line][0]:][:2]
    assert story[0].split() == ["✅", "story-stages", "ACTIVE", ":5002", "books.jbyrd.org", "★", "critical"]
    assert story[1].strip() == "↳ Last healing: 2h ago - RESOLVED in 1.50 s"
    assert "❌ passgo" in text and "FAILED" in row(text, "passgo") and "critical" in row(text, "passgo")
    assert "↳ Last healing: 6m ago - FAILED\n" in text  # no healing time: none said
    assert "🚧 traefik" in text and "PAUSED" in row(text, "traefik")
    assert "↳ Paused until resumed (sudo selfheal resume traefik)" in text
    assert "🟠 actual-budget" in text and "UNHEALTHY" in row(text, "actual-budget")
    assert "↳ Unhealthy (40s ago): port 5006 not listening" in text
    assert "4 services: 1 running, 1 failed, 0 inactive, 1 paused, 1 unhealthy" in text
    assert "1 heal in the last 24 h: 1 RESOLVED" in text
    assert "✅ ENABLED: units installed, selfheal-watch.timer active (every 30 s, last look 12s ago)" in text
    assert "Owner mail    owner@example.org" in text
    assert "Threshold     3 heals of one service within 1 h, then escalate" in text
    assert "Mail queue" not in text  # only when something waits
    assert "\033[" not in text


def test_dashboard_columns_line_up_with_wide_emoji():
    for unicode in (True, False):
        text = selfheal.render_dashboard(dashboard(), unicode=unicode)
        rows = [row(text, name) for name in NAMES]
        columns = {selfheal.text_width(line[:line.index(":")]) for line in rows}
        assert len(columns) == 1, rows  # the port column starts at the same terminal column


def test_dashboard_is_plain_ascii_when_the_terminal_is_not_utf8():
    text = selfheal.render_dashboard(dashboard(events=[event("story-stages", "RESOLVED", 2)]), unicode=False)
    assert text.isascii(), [ch for ch in text if not ch.isascii()]
    assert text.splitlines()[0].startswith("+--") and "| MiracleMax - self-healing status" in text
    assert "-- SERVICE HEALTH --" in text
    assert "[ OK ] story-stages" in text and "[FAIL] passgo" in text and "[PAUS] traefik" in text
    assert "[WARN] actual-budget" in text and "* critical" in text
    assert "-> Last healing: 2h ago - RESOLVED in 1.50 s" in text


def test_colour_only_when_asked_and_the_words_stay_the_same():
    plain = selfheal.render_dashboard(dashboard(), unicode=True, color=False)
    coloured = selfheal.render_dashboard(dashboard(), unicode=True, color=True)
    assert "\033[31mFAILED" in coloured and "\033[32mACTIVE" in coloured
    import re
    assert re.sub(r"\033\[[0-9;]*m", "", coloured) == plain


class Tty(io.StringIO):
    encoding = "utf-8"

    def isatty(self):
        return True


@pytest.mark.parametrize("tty, env, wanted", [
    (True, {"TERM": "xterm"}, True),
    (True, {"TERM": "xterm", "NO_COLOR": "1"}, False),
    (True, {"TERM": "xterm", "NO_COLOR": ""}, True),  # no-color.org: set and not empty
    (True, {"TERM": "dumb"}, False),
    (False, {"TERM": "xterm"}, False),
], ids=["tty", "no-color", "no-color-empty", "dumb", "pipe"])
def test_colour_only_on_a_tty_and_never_with_no_color(tty, env, wanted):
    out = Tty() if tty else io.StringIO()
    assert selfheal.terminal_wants_colour(out, env) is wanted


@pytest.mark.parametrize("encoding, env, wanted", [
    ("utf-8", {"LANG": "en_US.UTF-8"}, True),
    ("UTF-8", {"LANG": "de_DE.utf8"}, True),
    ("utf-8", {"LANG": "C"}, False),
    ("utf-8", {}, False),  # cron, systemd: no locale at all
    ("utf-8", {"LANG": "C", "LC_CTYPE": "C.UTF-8"}, False),  # Python's own coercion of C (PEP 538)
    ("utf-8", {"LANG": "C.UTF-8", "LC_CTYPE": "C.UTF-8"}, True),
    ("utf-8", {"LANG": "en_US.UTF-8", "LC_ALL": "C"}, False),  # LC_ALL wins
    ("utf-8", {"LC_ALL": "en_US.UTF-8", "LANG": "C"}, True),
    ("utf-8", {"LC_CTYPE": "en_US.UTF-8", "LANG": "C"}, True),
    ("ascii", {"LANG": "en_US.UTF-8"}, False),  # PYTHONIOENCODING=ascii: emoji would not even encode
    ("latin-1", {"LANG": "en_US.UTF-8"}, False),
])
def test_unicode_only_when_the_output_and_the_users_locale_are_utf8(encoding, env, wanted):
    out = types.SimpleNamespace(encoding=encoding)
    assert selfheal.terminal_wants_unicode(out, env) is wanted


def test_summary_counts_each_service_once_and_names_extra_states_only_when_present():
    d = dashboard(services=[svc("a", "active"), svc("b", "active"), svc("c", "inactive")])
    assert "3 services: 2 running, 0 failed, 1 inactive\n" in selfheal.render_dashboard(d, unicode=False)
    d = dashboard(services=[svc("a", "activating"), svc("b", "not-found"), svc("c", "unknown")])
    assert "3 services: 0 running, 0 failed, 0 inactive, 1 starting or stopping, 1 missing, 1 unknown" in (
        selfheal.render_dashboard(d, unicode=False))


@pytest.mark.parametrize("states, code", [
    (["active", "active"], 0),
    (["active", "reloading", "paused"], 0),
    (["active", "failed"], 1),
    (["active", "unhealthy"], 1),
    (["inactive"], 1),
    (["activating"], 1),
    (["not-found"], 1),
    (["unknown"], 1),
    ([], 0),
])
def test_exit_status_is_0_only_when_every_service_shown_is_healthy(states, code):
    d = dashboard(services=[svc("s%d" % i, state) for i, state in enumerate(states)])
    assert d.exit_code == code


def test_a_service_stopped_on_purpose_with_on_stopped_ignore_is_not_a_problem():
    d = dashboard(services=[svc("batch", "inactive", stop_is_fine=True)])
    assert d.exit_code == 0
    assert "Stopped, as configured (on_stopped = ignore)" in selfheal.render_dashboard(d)


def test_service_notes_say_what_an_admin_must_know():
    services = [
        svc("esc", "failed", escalated=True, result="exit-code"),
        svc("gone", "not-found"),
        svc("deaf", "active", port=5009, listening=False),
        svc("unhooked", "active", hooked=False),
        svc("later", "paused", paused_until=NOW + 2 * HOUR),
    ]
    text = selfheal.render_dashboard(dashboard(services=services), unicode=True)
    assert "↳ Backing off after too many heals: healed at growing intervals (re-arm: sudo selfheal resume esc)" in text
    assert "↳ systemd says: failed (exit-code)" in text
    assert "↳ Unit gone.service is not found on this host" in text
    assert "↳ Port 5009 is not listening" in text
    assert "↳ No OnFailure= hook" in text and "; no OnFailure= hook: unhooked" in text
    assert "↳ Paused until %s" % selfheal.local_time(NOW + 2 * HOUR) in text


@pytest.mark.parametrize("setup, words", [
    (dict(units_installed=False), "❌ NOT ENABLED: selfheal's units are not installed here (sudo ./install.sh)"),
    (dict(timer="inactive"), "🟠 PARTLY: units installed, but selfheal-watch.timer is inactive"),
    (dict(timer="unknown", systemd_error="systemctl show: Access denied"),
     "❔ UNKNOWN: units installed; selfheal-watch.timer: systemctl show: Access denied"),
    (dict(mail_queue=3), "Mail queue    3 waiting (sent by the next watch; now: sudo selfheal flush-mail)"),
    (dict(mail_queue=None, mail_queue_error="not readable without root"),
     "Mail queue    unknown (not readable without root)"),
], ids=["not-installed", "timer-inactive", "systemctl-failed", "queue", "queue-not-root"])
def test_configuration_says_whether_self_healing_is_enabled_and_what_waits(setup, words):
    assert words in selfheal.render_dashboard(dashboard(**setup), unicode=True)


def test_activity_lists_the_newest_first_with_outcome_and_healing_time_and_clips_to_the_width():
    events = [event("story-stages", "RESOLVED", 3, 1.2), event("passgo", "FAILED", 1, None, "x" * 200)]
    text = selfheal.render_dashboard(dashboard(events=reversed(events)), unicode=True, width=80)
    lines = text.splitlines()
    start = [i for i, line in enumerate(lines) if "RECENT SELF-HEALING" in line][0]
    first, second = lines[start + 2], lines[start + 3]
    assert first.split()[2:4] == ["passgo", "FAILED"] and first.split()[4] == "-"
    assert second.split()[2:5] == ["story-stages", "RESOLVED", "1.20"]
    assert first.endswith("…") and selfheal.text_width(first) <= 80
    assert all(selfheal.text_width(line) <= 80 for line in lines if "RESOLVED" in line or "FAILED" in line)


def test_activity_says_so_when_nothing_happened_or_the_history_is_unreadable():
    assert "No self-healing in the last 24 h." in selfheal.render_dashboard(dashboard())
    d = dashboard()
    d = selfheal.Dashboard(d.name, d.system, d.services, selfheal.Activity(NOW - 86400, 0, {}, (), 0,
                                                                           "not readable without root"), d.setup)
    assert "unknown (not readable without root)" in selfheal.render_dashboard(d)


def test_unknown_system_values_render_as_unknown_not_as_errors():
    d = dashboard()
    d = selfheal.Dashboard(d.name, selfheal.SystemOverview(NOW, "h"), d.services, d.activity, d.setup)
    text = selfheal.render_dashboard(d, unicode=False)
    for label in ("Uptime", "Load", "Memory", "Disk /"):
        assert [line for line in text.splitlines() if line.strip().startswith(label)][0].endswith("unknown")
    check_shape(selfheal.dashboard_json(d))


@pytest.mark.parametrize("seconds, words", [(0, "0s ago"), (89, "89s ago"), (90, "1m ago"), (7200, "2h ago"),
                                            (9000, "2h ago"), (36 * 3600, "1d ago"), (-5, "0s ago")])
def test_ago_rounds_down_to_whole_units(seconds, words):
    assert selfheal.ago(seconds) == words


def test_json_of_a_hand_built_dashboard_matches_the_documented_shape():
    data = selfheal.dashboard_json(dashboard(events=[event("story-stages", "RESOLVED", 2)]))
    check_shape(data)
    assert json.loads(json.dumps(data)) == data
    rows = {s["name"]: s for s in data["services"]}
    assert rows["traefik"]["paused"] is True and rows["traefik"]["paused_until"] is None  # until resumed
    assert rows["story-stages"]["last_outcome"] == "RESOLVED" and rows["story-stages"]["last_healing_seconds"] == 1.5
    assert data["healthy"] is False and data["summary"]["failed"] == 1
    assert data["system"]["memory"] == {"total_bytes": 4 * 2 ** 30, "used_bytes": 2 ** 30,
                                        "available_bytes": 3 * 2 ** 30, "percent": 25.0}


# =============================================================================
# Collecting: /proc, statvfs, the history (fake host: tests/fakes on PATH)
# =============================================================================

def test_system_overview_reads_proc_and_statvfs(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text("MemTotal:        4000000 kB\nMemFree:          100000 kB\n"
                                  "MemAvailable:    3000000 kB\nBuffers:           1 kB\n")
    (proc / "uptime").write_text("12345.67 40000.00\n")
    (proc / "loadavg").write_text("0.50 0.25 0.10 1/123 4567\n")
    config = selfheal.parse_config(CONF, "services.conf", hostname="vm")
    system = selfheal.collect_system(config, NOW, (), proc)
    assert (system.memory_total, system.memory_available) == (4000000 * 1024, 3000000 * 1024)
    assert system.uptime == 12345.67 and system.load == (0.5, 0.25, 0.1)
    [root] = system.disks
    st = os.statvfs("/")
    assert (root.path, root.mount, root.total) == ("/", "/", st.f_blocks * st.f_frsize)
    assert abs(root.used - (st.f_blocks - st.f_bfree) * st.f_frsize) < 64 * 2 ** 20  # the disk is in use


def test_memory_without_memavailable_counts_free_buffers_and_cache(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 50 kB\nCached: 250 kB\n")
    assert selfheal.read_meminfo(tmp_path) == (1000 * 1024, 400 * 1024)
    assert selfheal.read_meminfo(tmp_path / "nowhere") == (None, None)


def test_each_filesystem_holding_a_db_path_is_listed_once_with_its_services(tmp_path):
    here = selfheal.disk_usages([("/", ""), (str(tmp_path), "story-stages"), (str(tmp_path), "passgo"),
                                 (str(tmp_path / "missing"), "ghost")])
    same = os.stat("/").st_dev == os.stat(str(tmp_path)).st_dev
    assert len(here) == (1 if same else 2)
    assert here[-1].services == ("story-stages", "passgo", "ghost")  # a missing db: where it would be
    assert here[-1].mount == selfheal.mount_point(str(tmp_path))
    assert selfheal.mount_point("/") == "/"
    # and collect_system asks about the db_path of each service that has one
    config = selfheal.parse_config(CONF, "services.conf", hostname="vm")
    services = [types.SimpleNamespace(name="story-stages", db_path=str(tmp_path)),
                types.SimpleNamespace(name="x", db_path="")]
    system = selfheal.collect_system(config, NOW, services)
    assert [d.services for d in system.disks] == ([("story-stages",)] if same else [(), ("story-stages",)])


def test_the_filesystem_of_a_db_path_is_shown_with_its_services(capsys, tmp_path, write_conf, monkeypatch,
                                                                 fake_host):
    other = "/dev/shm"  # a tmpfs on most Linux hosts: another filesystem than /
    if not os.path.isdir(other) or os.stat(other).st_dev == os.stat("/").st_dev:
        pytest.skip("no second filesystem at %s" % other)
    story = dict(SERVICES["story-stages"], strategies="database_check, service_restart",
                 db_path="%s/selfheal-test/books.db" % other)
    monkeypatch.setenv("SELFHEAL_CONFIG", write_conf(conf(SETTINGS, dict(SERVICES, **{"story-stages": story}))))
    monkeypatch.setenv("LANG", "C")
    code, out, _ = status(capsys)
    st = os.statvfs(other)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    assert "Disk %s" % other in out and out.split("Disk %s" % other)[1].splitlines()[0].endswith("free (story-stages)")
    disks = json.loads(status(capsys, "--json")[1])["system"]["disks"]
    assert [(d["path"], d["mount"], d["services"]) for d in disks] == [
        ("/", "/", []), (other, other, ["story-stages"])]
    assert disks[1]["total_bytes"] == st.f_blocks * st.f_frsize and abs(disks[1]["used_bytes"] - used) < 2 ** 24


@pytest.fixture
def host(fake_host, write_conf, monkeypatch, tmp_path):
    """The fake host with the four MiracleMax services running, selfheal installed (units in a
    temp UNIT_DIR, the timer active), a UTF-8 locale, and no terminal."""
    monkeypatch.setenv("SELFHEAL_CONFIG", write_conf(CONF))
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name in selfheal.UNIT_TEMPLATES:
        (unit_dir / name).write_text("x")
    monkeypatch.setattr(selfheal, "UNIT_DIR", str(unit_dir))
    for name, port in zip(NAMES, (5002, 5001, 80, 5006)):
        fake_host.unit(name + ".service", ActiveState="active", SubState="running")
        fake_host.listen(port)
        (unit_dir / (name + ".service.d")).mkdir()  # the OnFailure= drop-in install puts there
        (unit_dir / (name + ".service.d") / selfheal.DROPIN_NAME).write_text("x")
    fake_host.unit("selfheal-watch.timer", ActiveState="active", SubState="waiting")
    for name in ("LC_ALL", "LC_CTYPE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LANG", "C.UTF-8")
    fake_host.unit_dir = unit_dir
    return fake_host


def status(capsys, *args):
    """main(["status", *args]) in-process -> (exit status, stdout, stderr)."""
    try:
        code = selfheal.main(["status", *args])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def history(host, *events, torn=""):
    host.paths.state.mkdir(parents=True, exist_ok=True)
    with open(str(host.paths.history), "a", encoding="utf-8") as handle:
        for e in events:
            handle.write(json.dumps(e) + "\n")
        handle.write(torn)


def test_all_healthy_exits_0_and_shows_the_true_states(host, capsys):
    code, out, err = status(capsys)
    assert (code, err) == (0, "")
    assert "4 services: 4 running, 0 failed, 0 inactive\n" in out
    for name in NAMES:
        assert "✅ %s" % name in out
    assert "✅ ENABLED: units installed, selfheal-watch.timer active" in out
    assert "4 monitored, 2 critical" in out and "hook" not in out


def test_one_failed_service_exits_1_and_shows_failed_with_its_last_heal(host, capsys):
    host.failed("passgo.service", result="exit-code", code="1", status="203")
    history(host, {"ts": time.time() - 2 * HOUR - 60, "time": "t", "service": "story-stages", "outcome": "RESOLVED",
                   "healing_seconds": 0.8, "root_cause": "killed"},
            {"ts": time.time() - 300, "time": "t", "service": "passgo", "outcome": "FAILED",
             "healing_seconds": None, "root_cause": "203/EXEC"})
    code, out, _ = status(capsys)
    assert code == 1
    assert "❌ passgo" in out and "FAILED" in row(out, "passgo")
    assert "↳ systemd says: failed (exit-code)" in out
    assert "↳ Last healing: 5m ago - FAILED\n" in out
    assert "↳ Last healing: 2h ago - RESOLVED in 0.80 s" in out
    assert "4 services: 3 running, 1 failed, 0 inactive" in out
    assert "2 heals in the last 24 h: 1 RESOLVED, 1 FAILED" in out or "2 heals in the last 24 h: 1 FAILED, 1 RESOLVED" in out


def test_paused_service_shows_paused_and_does_not_fail_the_exit_status(host, capsys):
    host.failed("traefik.service")
    selfheal.save_service_state(host.paths, "traefik", {"paused_until": 0.0})
    code, out, _ = status(capsys)
    assert code == 0
    assert "🚧 traefik" in out and "PAUSED" in row(out, "traefik") and "1 paused" in out


def test_unhealthy_is_the_watchs_last_verdict_while_the_unit_is_active(host, capsys):
    selfheal.save_watch_state(host.paths, "story-stages", {"verdict": "unhealthy", "checked": time.time() - 30,
                                                           "detail": "GET http://127.0.0.1:5002/health: 500"})
    code, out, _ = status(capsys)
    assert code == 1
    assert "🟠 story-stages" in out and "UNHEALTHY" in row(out, "story-stages")
    assert "↳ Unhealthy (30s ago): GET http://127.0.0.1:5002/health: 500" in out
    assert "last look 30s ago" in out


def test_an_unhealthy_verdict_about_an_earlier_run_is_not_shown(host, capsys):
    # the current run started 10 s ago; the watch said "unhealthy" 60 s ago, of the run before
    host.unit("story-stages.service", ActiveState="active", SubState="running",
              ActiveEnterTimestampMonotonic=str(int((time.monotonic() - 10) * 1e6)))
    selfheal.save_watch_state(host.paths, "story-stages", {"verdict": "unhealthy", "checked": time.time() - 60,
                                                           "detail": "hung"})
    code, out, _ = status(capsys)
    assert code == 0 and "ACTIVE" in row(out, "story-stages")
    selfheal.save_watch_state(host.paths, "story-stages", {"verdict": "unhealthy", "checked": time.time() - 5,
                                                           "detail": "hung"})
    assert status(capsys)[0] == 1  # said of this run


def test_one_busctl_call_for_any_number_of_services_and_no_ss(host, capsys, write_conf, monkeypatch):
    many = CONF + "".join("\n[svc%03d]\n%s" % (i, "port = %d\n" % (6000 + i) if i % 10 == 0 else "")
                          for i in range(60))
    monkeypatch.setenv("SELFHEAL_CONFIG", write_conf(many))
    for i in range(60):
        host.unit("svc%03d.service" % i, ActiveState="active", SubState="running")
    host.clear_calls()
    code, out, _ = status(capsys, "--json")
    data = json.loads(out)
    assert code == 0 and len(data["services"]) == 64
    [call] = host.calls()  # one process, whatever the number of services: no systemctl, no ss
    assert call[:8] == ["busctl", "--json=short", "--", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                        "org.freedesktop.systemd1.Manager", "ListUnitsByNames"]
    assert call[8:] == ["as", "65"] + [s["unit"] for s in data["services"]] + ["selfheal-watch.timer"]
    host.clear_calls()
    status(capsys)  # the text too
    assert len(host.calls()) == 1


def test_failed_and_unhealthy_units_get_one_systemctl_show_together_for_their_details(host, capsys, write_conf,
                                                                                    monkeypatch):
    many = CONF + "".join("\n[svc%03d]\n" % i for i in range(30))
    monkeypatch.setenv("SELFHEAL_CONFIG", write_conf(many))
    for i in range(30):
        if i % 3:
            host.unit("svc%03d.service" % i, ActiveState="active", SubState="running")
        else:
            host.failed("svc%03d.service" % i, result="exit-code", code="1", status="1")
    selfheal.save_watch_state(host.paths, "passgo", {"verdict": "unhealthy", "checked": time.time(), "detail": "x"})
    host.clear_calls()
    code, out, _ = status(capsys, "--json")
    assert code == 1
    busctl, show = host.calls()
    assert busctl[0] == "busctl" and show[:2] == ["systemctl", "show"]
    assert show[show.index("--") + 1:] == ["passgo.service"] + ["svc%03d.service" % i for i in range(0, 30, 3)]
    rows = {s["name"]: s for s in json.loads(out)["services"]}
    assert rows["svc003"]["result"] == "exit-code" and rows["passgo"]["state"] == "unhealthy"


def test_without_busctl_one_systemctl_show_asks_about_all(host, capsys, monkeypatch):
    with host.edit() as state:
        state["busctl_fail"] = True
    host.failed("passgo.service", result="exit-code", code="1", status="1")
    host.clear_calls()
    code, out, err = status(capsys, "--json")
    assert code == 1 and err == ""
    busctl, show = host.calls()
    assert busctl[0] == "busctl" and show[show.index("--") + 1:] == [n + ".service" for n in NAMES] + [
        "selfheal-watch.timer"]
    data = json.loads(out)
    assert [s["state"] for s in data["services"]] == ["active", "failed", "active", "active"]
    assert data["services"][1]["result"] == "exit-code" and data["config"]["timer"] == "active"


def test_when_systemd_cannot_be_asked_the_states_are_unknown_and_nothing_fails(host, capsys, monkeypatch):
    with host.edit() as state:
        state["busctl_fail"] = True
    monkeypatch.setattr(selfheal, "SYSTEMCTL", str(host.root / "no-systemctl"))
    code, out, err = status(capsys)
    assert code == 1 and "Traceback" not in err
    assert "4 unknown" in out and "states unknown: systemctl show:" in out
    assert "❔ UNKNOWN: units installed; selfheal-watch.timer: systemctl show:" in out
    assert len(host.calls()) == 1  # busctl; then systemctl (not found): never one per unit


def test_json_has_the_documented_shape_and_true_values(host, capsys):
    host.failed("passgo.service", result="exit-code", code="1", status="1")
    selfheal.save_service_state(host.paths, "traefik", {"paused_until": time.time() + HOUR})
    history(host, {"ts": time.time() - 60, "time": "t", "service": "story-stages", "outcome": "RESOLVED",
                   "healing_seconds": 0.5, "root_cause": "killed", "trigger": "onfailure"})
    (host.paths.spool).mkdir(parents=True)
    (host.paths.spool / "1-a.eml").write_text("x")
    (host.paths.spool / "2-b.rejected").write_text("x")  # set aside: not waiting
    code, out, err = status(capsys, "--json")
    assert code == 1 and err == ""
    data = json.loads(out)
    check_shape(data)
    rows = {s["name"]: s for s in data["services"]}
    assert [s["name"] for s in data["services"]] == NAMES  # config order
    assert (rows["passgo"]["state"], rows["passgo"]["active_state"], rows["passgo"]["result"], rows["passgo"]["problem"]) \
        == ("failed", "failed", "exit-code", True)
    assert rows["traefik"]["state"] == "paused" and rows["traefik"]["paused_until"] > time.time()
    assert (rows["story-stages"]["port"], rows["story-stages"]["listening"], rows["story-stages"]["domain"],
            rows["story-stages"]["critical"], rows["story-stages"]["hooked"]) == (5002, True, "books.jbyrd.org", True, True)
    assert rows["story-stages"]["last_outcome"] == "RESOLVED" and rows["story-stages"]["last_healing_seconds"] == 0.5
    assert data["summary"] == {"total": 4, "running": 2, "failed": 1, "inactive": 0, "activating": 0, "paused": 1,
                               "unhealthy": 0, "missing": 0, "unknown": 0}
    assert data["activity"]["count"] == 1 and data["activity"]["events"][0]["trigger"] == "onfailure"
    conf = data["config"]
    assert (conf["enabled"], conf["timer"], conf["services_monitored"], conf["critical"], conf["email_to"],
            conf["failure_threshold"], conf["failure_window_seconds"], conf["mail_queue"]) == (
        True, "active", 4, 2, ["owner@example.org", "ops@example.org"], 4, 7200.0, 1)
    assert data["name"] == "MiracleMax" and data["healthy"] is False


def test_service_option_shows_only_those_services_and_exits_by_them(host, capsys):
    host.failed("passgo.service")
    history(host, {"ts": time.time() - 60, "service": "passgo", "outcome": "FAILED"},
            {"ts": time.time() - 50, "service": "story-stages", "outcome": "RESOLVED"})
    code, out, _ = status(capsys, "--service", "story-stages")
    assert code == 0
    assert "story-stages" in out and "passgo" not in out and "traefik" not in out
    assert "1 service: 1 running" in out and "1 heal in the last 24 h: 1 RESOLVED" in out
    assert "4 monitored" in out  # the configuration is still the whole of it
    code, out, _ = status(capsys, "--service", "passgo", "--service", "traefik", "--json")
    data = json.loads(out)
    assert code == 1 and [s["name"] for s in data["services"]] == ["passgo", "traefik"]
    assert data["only"] == ["passgo", "traefik"] and data["activity"]["count"] == 1


def test_since_sets_the_activity_window(host, capsys):
    now = time.time()
    history(host, *[{"ts": now - days * 86400 - 60, "service": "story-stages", "outcome": "RESOLVED"}
                    for days in (0, 2, 5, 9)])
    assert "1 heal in the last 24 h" in status(capsys)[1]
    assert "3 heals in the last 7 d" in status(capsys, "--since", "7d")[1]
    data = json.loads(status(capsys, "--since", "30d", "--json")[1])
    assert data["activity"]["count"] == 4 and abs(data["activity"]["since_ts"] - (now - 30 * 86400)) < 60
    assert [e["ts"] for e in data["activity"]["events"]] == sorted((e["ts"] for e in data["activity"]["events"]),
                                                                    reverse=True)


def test_a_torn_last_history_line_is_skipped_and_counted(host, capsys):
    history(host, {"ts": time.time() - 60, "service": "story-stages", "outcome": "RESOLVED", "healing_seconds": 1},
            torn='{"ts": 1732770000.1, "service": "passgo", "outc')
    code, out, err = status(capsys)
    assert code == 0 and "Traceback" not in err
    assert "1 heal in the last 24 h" in out and "(1 damaged history line skipped)" in out
    data = json.loads(status(capsys, "--json")[1])
    assert data["activity"]["damaged_lines"] == 1 and data["activity"]["count"] == 1
    # garbage of every kind in the middle is skipped too, and a heal after it is read
    history(host, torn='\n[1, 2]\n{"ts": "soon", "service": "x"}\n{"service": 5, "ts": 1}\n\x00\x00\n')
    history(host, {"ts": time.time() - 30, "service": "passgo", "outcome": "FAILED"})
    data = json.loads(status(capsys, "--json")[1])
    assert data["activity"]["count"] == 2 and data["activity"]["damaged_lines"] == 5


class NoPermission(types.ModuleType):
    """selfheal's `os` as a user without root sees it: the spool cannot be listed, the
    history cannot be opened."""

    def __init__(self, spool, history=None):
        super().__init__("os")
        self._spool, self._history = str(spool), str(history)

    def __getattr__(self, name):
        return getattr(os, name)

    def scandir(self, path="."):
        if str(path) == self._spool:
            raise PermissionError(13, "Permission denied", str(path))
        return os.scandir(path)

    def open(self, path, *args, **kwargs):
        if str(path) == self._history:
            raise PermissionError(13, "Permission denied", str(path))
        return os.open(path, *args, **kwargs)


def test_without_root_what_is_root_only_is_unknown_and_nothing_fails(host, capsys, monkeypatch):
    host.paths.spool.mkdir(parents=True)
    host.paths.history.write_text("")
    monkeypatch.setattr(selfheal, "os", NoPermission(host.paths.spool, host.paths.history))
    code, out, err = status(capsys)
    assert (code, err) == (0, "")  # the services are fine; not knowing the queue is not a failure
    assert "Mail queue    unknown (not readable without root)" in out
    assert "Heal history: unknown (not readable without root)" in out
    data = json.loads(status(capsys, "--json")[1])
    check_shape(data)
    assert data["config"]["mail_queue"] is None and data["config"]["mail_queue_error"] == "not readable without root"
    assert data["activity"]["error"] == "not readable without root"


def test_without_the_units_installed_it_says_how_to_install(host, capsys):
    for name in selfheal.UNIT_TEMPLATES:  # uninstalled: the drop-ins go too, as uninstall does
        (host.unit_dir / name).unlink()
    host.unit("selfheal-watch.timer", LoadState="not-found", ActiveState="inactive")
    code, out, _ = status(capsys)
    assert code == 0  # the services themselves are fine
    assert "NOT ENABLED: selfheal's units are not installed here (sudo ./install.sh)" in out
    data = json.loads(status(capsys, "--json")[1])
    assert (data["config"]["enabled"], data["config"]["units_installed"], data["config"]["timer"]) == (
        False, False, "not-found")


def test_a_service_without_its_onfailure_hook_is_named(host, capsys):
    (host.unit_dir / "traefik.service.d" / selfheal.DROPIN_NAME).unlink()
    out = status(capsys)[1]
    assert "no OnFailure= hook: traefik" in out and "↳ No OnFailure= hook" in out
    assert json.loads(status(capsys, "--json")[1])["services"][2]["hooked"] is False


def test_ascii_output_under_a_c_locale(host, capsys, monkeypatch):
    monkeypatch.setenv("LANG", "C")
    out = status(capsys)[1]
    assert out.isascii() and "[ OK ] story-stages" in out


@pytest.mark.parametrize("args, words", [
    (["--service", "storystages"], "did you mean 'story-stages'"),
    (["--since", "7 parsecs"], "--since"),
    (["--since", "0"], "--since"),
    (["--watch", "0"], "--watch"),
    (["--watch", "soon"], "--watch"),
    (["--bogus"], "--bogus"),
], ids=["unknown-service", "since-not-a-duration", "since-zero", "watch-zero", "watch-not-a-duration", "bogus"])
def test_bad_command_lines_exit_2_and_say_why(host, capsys, args, words):
    code, out, err = status(capsys, *args)
    assert code == 2 and words in err and "Traceback" not in err


def test_a_broken_config_exits_2_with_every_problem(host, capsys, write_conf, monkeypatch):
    monkeypatch.setenv("SELFHEAL_CONFIG", write_conf("[selfheal]\nemail_to = nobody\n\n[web]\nprot = 1\n"))
    code, out, err = status(capsys)
    assert code == 2 and out == ""
    assert "[web] prot: unknown key (did you mean 'port'?)" in err and "[selfheal] email_to" in err


@pytest.mark.parametrize("json_flag", [False, True])
def test_nothing_installed_says_how_to_install_and_exits_2(tmp_path, capsys, monkeypatch, json_flag):
    monkeypatch.setenv("SELFHEAL_CONFIG", str(tmp_path / "none.conf"))
    code, out, err = status(capsys, *(["--json"] if json_flag else []))
    assert code == 2
    said = err if json_flag else out
    assert "selfheal is not installed here" in said and "sudo ./install.sh" in said
    assert (out if json_flag else err) == ""  # --json: stdout stays clean for the script


def test_watch_redraws_until_ctrl_c_and_exits_0(host, capsys, monkeypatch):
    naps = []

    def sleep(seconds):
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(selfheal.time, "sleep", sleep)
    code, out, _ = status(capsys, "--watch", "5")
    assert code == 0 and naps == [5.0, 5.0, 5.0]
    assert out.count("SERVICE HEALTH") == 3 and "Every 5 s · Ctrl-C to quit" in out
    assert "\033[" not in out  # not a terminal: frames one after another

    naps.clear()
    code, out, _ = status(capsys, "--watch", "--json")
    frames = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and naps == [2.0] * 3 and len(frames) == 3
    check_shape(frames[0])


def test_watch_on_a_terminal_redraws_in_place_and_restores_the_cursor(host, monkeypatch):
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    monkeypatch.setenv("NO_COLOR", "1")
    calls = []

    def sleep(seconds):
        calls.append(seconds)
        if len(calls) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(selfheal.time, "sleep", sleep)
    assert selfheal.main(["status", "--watch", "1"]) == 0
    text = tty.getvalue()
    assert text.startswith("\033[?25l\033[2J") and text.endswith("\033[?25h")
    assert text.count("\033[H") == 2 and "\033[J" in text and "\033[K\n" in text
    assert "\033[3" not in text  # NO_COLOR: no colour even on a terminal


def test_colour_through_main_on_a_terminal(host, monkeypatch):
    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    host.failed("passgo.service")
    assert selfheal.main(["status"]) == 1
    assert "\033[31mFAILED" in tty.getvalue()


def test_cmd_status_prints_to_the_stream_it_is_given(host):
    out = io.StringIO()
    assert selfheal.show_dashboard(selfheal.load_config(os.environ["SELFHEAL_CONFIG"], trusted=False), host.paths,
                               as_json=True, out=out) == 0
    check_shape(json.loads(out.getvalue()))


def test_miraclemax_status_and_selfheal_status_are_the_same_code(host, cli):
    # really run: the entry point, selfheal.py, and the fakes as processes
    a = cli("--json", script=STATUS_SCRIPT)
    b = cli("status", "--json")
    assert a.returncode == b.returncode == 0, (a.stderr, b.stderr)
    one, two = json.loads(a.stdout), json.loads(b.stdout)
    for data in (one, two):
        data.pop("ts"), data.pop("time"), data.pop("system"), data["activity"].pop("since_ts"), data["activity"].pop("since")
        for s in data["services"]:
            s.pop("listening")  # the processes read the real /proc/net/tcp, not the fake one
    assert one == two
    assert "usage: miraclemax-status" in cli("--help", script=STATUS_SCRIPT).stdout


def test_a_closed_pipe_is_not_an_error(host, cli):
    # `selfheal status --watch 0.2 | head -n 1`: it writes until the reader is gone
    with subprocess.Popen(cli.argv(["status", "--watch", "0.2"]), env=cli.env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True) as writer:
        head = subprocess.run(["head", "-n", "1"], stdin=writer.stdout, stdout=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        writer.stdout.close()  # head is the only reader left: once it exits, the pipe is closed
        err = writer.stderr.read()
        writer.wait(timeout=60)
    assert head.stdout.startswith("╭") and "Error" not in err and "Traceback" not in err


def test_watch_exits_0_on_ctrl_c_even_when_sigint_comes_twice(host, cli):
    # a terminal's Ctrl-C (or `timeout -s INT`) reaches the process and its group: two SIGINTs
    import signal
    proc = subprocess.Popen(cli.argv(["status", "--watch", "0.2"]), env=cli.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    try:
        assert proc.stdout.readline()  # the first frame is out: the watch is running
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


@pytest.mark.parametrize("props, problem", [
    ({"Type": "oneshot", "RemainAfterExit": "no", "Result": "success"}, False),
    ({"Type": "oneshot", "RemainAfterExit": "yes", "Result": "success"}, True),
    ({"Type": "simple", "Result": "success"}, True),
], ids=["finished-job-is-done", "remain-after-exit-stopped", "simple-stopped"])
def test_a_oneshot_job_whose_run_succeeded_is_not_a_problem_on_the_dashboard(tmp_path, props, problem):
    service = selfheal.Service(name="job", unit="job.service")
    unit = dict({"LoadState": "loaded", "ActiveState": "inactive", "SubState": "dead"}, **props)
    paths = selfheal.Paths(tmp_path / "state", tmp_path / "run", tmp_path / "log")
    status = selfheal.service_status(service, unit, paths, {}, {}, None, None, 0.0, NOW)
    assert status.problem is problem


def test_a_service_waiting_for_its_dependency_says_so_on_the_dashboard_and_in_json(fake_host, write_conf):
    config = selfheal.load_config(write_conf(conf(services={"db": {}, "app": {"depends_on": "db"}})), trusted=False)
    fake_host.failed("db.service")
    fake_host.failed("app.service")
    fake_host.unit("selfheal@.service")
    verdicts, errors = {}, []
    selfheal.look(config, fake_host.paths, list(config.services.values()), verdicts, errors)
    assert verdicts == {"db": "failed", "app": "waiting"}
    board = selfheal.collect_dashboard(config, fake_host.paths)
    app = next(s for s in board.services if s.name == "app")
    assert app.watch_verdict == "waiting"
    assert selfheal.service_json(app)["watch_detail"].startswith("waiting for db: failed")
    text = selfheal.render_dashboard(board, unicode=False)
    assert "Waiting: waiting for db: failed (failed), result signal" in text
