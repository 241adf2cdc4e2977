"""Maintenance windows' calendar events: parsing and matching, and the same elapses as
`systemd-analyze calendar` gives in the drills' Debian roots (systemd 247, 252, 257; run in
a chroot, no boot), for accepted and rejected expressions alike."""

import calendar
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import bed
from drillkit import SUITE_VERSIONS, drill_suites
from selfheal import Window, maintenance_end, parse_calendar, parse_maintenance

ROOTS = {suite: SUITE_VERSIONS[suite]["systemd"] for suite in drill_suites()}
BED = str(bed.cache_dir())
REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def utc():
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = old
    time.tzset()


def ts(s):
    """'2026-12-06 03:00:00' (UTC) -> UNIX time."""
    return float(calendar.timegm(time.strptime(s, "%Y-%m-%d %H:%M:%S")))


# ---- parsing ------------------------------------------------------------------------------

@pytest.mark.parametrize("expr, message", [
    ("Mon *-*-* 25:00", "hour 25 is out of range (0-23)"),
    ("*-13-01", "month 13 is out of range (1-12)"),
    ("*-*-32", "day 32 is out of range (1-31)"),
    ("*-*-* 03:60", "minute 60 is out of range (0-59)"),
    ("*-*-* 03:00:60", "second 60 is out of range (0-59)"),
    ("2200-01-01", "year 2200 is out of range (1970-2199)"),
    ("*-*~29", "day ~29 is out of range (~1-~28)"),
    ("Funday", "unknown weekday in 'Funday'"),
    ("Fri..Mon", "weekday range fri..mon runs backwards"),
    ("*-*-* 1:2:3:4", "'1:2:3:4' is not a time"),
    ("*-*-10..05", "day range 10..05 runs backwards"),
    ("*:30/30", "minute repetition 30/30 does not fit in 0-59"),
    ("*-*-01/0", "day repetition 01/0 must not be /0"),
    ("*/2:00", "invalid hour '*/2' (use e.g. 5, 1,15, 8..18, 0/15)"),
    ("daily 03:00", "'daily' stands alone"),
    ("Mon 03:00 Tuesday", "is not a date"),
    ("26-01-01", "two-digit year 26 is not supported"),
    ("*-*-* 03:00:05.5", "fractional seconds (05.5) are not supported"),
    ("*-*-* 03:00 Europe/Berlin", "time zone 'Europe/Berlin' is not supported; use local time or UTC"),
    ("now", "'now' is a time stamp, not a calendar event"),
    ("@1700000000", "is a time stamp"),
    ("", "empty calendar expression"),
    ("*~02-03", "is not a date"),
    ("Mon 03:00 *-*-*", "is not a date"),
])
def test_parse_errors(expr, message):
    with pytest.raises(ValueError) as e:
        parse_calendar(expr)
    assert message in str(e.value)


def test_shorthands_and_defaults():
    assert parse_calendar("DAILY").hours == (0,) and parse_calendar("daily").minutes == (0,)
    assert parse_calendar("weekly").weekdays == frozenset({0})
    assert parse_calendar("quarterly").months == frozenset({1, 4, 7, 10})
    assert parse_calendar("daily UTC").utc and not parse_calendar("daily").utc
    only_time = parse_calendar("06:30")
    assert (only_time.years, only_time.months, only_time.days) == (None, None, None)
    assert (only_time.hours, only_time.minutes, only_time.seconds) == ((6,), (30,), (0,))
    only_date = parse_calendar("2026-12-24")
    assert (only_date.hours, only_date.minutes, only_date.seconds) == ((0,), (0,), (0,))
    assert parse_calendar("Mon..Sun 03:00").weekdays is None  # every day: no restriction
    assert parse_calendar("*-*-* *:*:*").seconds == tuple(range(60))


# ---- matching -----------------------------------------------------------------------------

def test_next_elapse_is_strictly_after():
    spec = parse_calendar("Sun *-*-* 03:00 UTC")
    assert spec.next_elapse(ts("2026-12-06 02:59:59")) == ts("2026-12-06 03:00:00")
    assert spec.next_elapse(ts("2026-12-06 02:59:59") + 0.5) == ts("2026-12-06 03:00:00")
    assert spec.next_elapse(ts("2026-12-06 03:00:00")) == ts("2026-12-13 03:00:00")
    assert parse_calendar("2020-*-*").next_elapse(ts("2026-01-01 00:00:00")) is None


def test_calendar_edge_cases():
    def chain(expr, start, n):
        spec, t, out = parse_calendar(expr), ts(start), []
        for _ in range(n):
            t = spec.next_elapse(t)
            out.append(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)))
        return out
    assert chain("*-02-29", "2026-01-01 00:00:00", 2) == ["2028-02-29 00:00:00", "2032-02-29 00:00:00"]
    assert chain("*-*-31 12:00", "2027-01-31 13:00:00", 2) == ["2027-03-31 12:00:00", "2027-05-31 12:00:00"]
    assert chain("Mon *-05~07/1", "2026-01-01 00:00:00", 1) == ["2026-05-25 00:00:00"]  # last Monday
    assert chain("*-02~03", "2028-01-01 00:00:00", 2) == ["2028-02-27 00:00:00", "2029-02-26 00:00:00"]
    assert chain("*-*-01/10", "2027-02-21 00:00:00", 2) == ["2027-03-01 00:00:00", "2027-03-11 00:00:00"]
    assert chain("*-*-* 0/5:00", "2026-12-01 20:00:00", 1) == ["2026-12-02 00:00:00"]


def test_last_elapse():
    spec = parse_calendar("Sun *-*-* 03:00 UTC")
    assert spec.last_elapse(ts("2026-12-06 03:30:00"), 3600) == ts("2026-12-06 03:00:00")
    assert spec.last_elapse(ts("2026-12-06 03:00:00"), 3600) == ts("2026-12-06 03:00:00")  # t <= at
    assert spec.last_elapse(ts("2026-12-06 04:00:00"), 3600) is None  # at - within < t
    assert spec.last_elapse(ts("2026-12-06 02:59:59"), 3600) is None
    assert spec.last_elapse(ts("2026-12-12 23:00:00"), 7 * 86400) == ts("2026-12-06 03:00:00")
    assert parse_calendar("*-*-* *:*:*").last_elapse(ts("2026-12-06 03:00:00") + 0.7, 1) == \
        ts("2026-12-06 03:00:00")
    assert parse_calendar("2020-*-*").last_elapse(ts("2026-12-06 03:00:00"), 7 * 86400) is None


def test_local_time_dst_gap():
    if not os.path.exists("/usr/share/zoneinfo/Europe/Berlin"):
        pytest.skip("no zoneinfo")
    os.environ["TZ"] = "Europe/Berlin"
    time.tzset()
    spec = parse_calendar("*-*-* 02:30")  # 2027-03-28 has no 02:30 in Berlin
    assert spec.next_elapse(ts("2027-03-27 12:00:00")) == ts("2027-03-29 00:30:00")
    assert spec.next_elapse(ts("2027-01-10 12:00:00")) == ts("2027-01-11 01:30:00")  # CET = UTC+1
    assert spec.last_elapse(ts("2027-07-01 01:00:00"), 3600) == ts("2027-07-01 00:30:00")  # CEST


# ---- maintenance windows ------------------------------------------------------------------

def test_parse_maintenance():
    windows = parse_maintenance("Sun *-*-* 03:00 1h; Mon..Fri 22:00 UTC 1h30m\n  *-*-01 02:00 2d")
    assert [(w[1], w[2]) for w in windows] == [
        (3600.0, "Sun *-*-* 03:00 1h"), (5400.0, "Mon..Fri 22:00 UTC 1h30m"), (172800.0, "*-*-01 02:00 2d")]
    assert windows[1][0].utc
    assert isinstance(windows[0], Window) and windows[0].seconds == 3600.0
    assert parse_maintenance("  ") == ()
    assert [w.seconds for w in parse_maintenance(
        "daily 30s; daily 5min; daily 5m; daily 10sec; daily 1w; daily 1d2h; daily 90")] == \
        [30, 300, 300, 10, 604800, 93600, 90]


@pytest.mark.parametrize("value, message", [
    ("Sun *-*-* 03:00", "maintenance window 'Sun *-*-* 03:00': it must end in a duration, not '03:00'"),
    ("daily 1h; Sun *-*-* 25:00 1h", "maintenance window 'Sun *-*-* 25:00 1h': hour 25 is out of range"),
    ("daily 8d", "maintenance window 'daily 8d': duration 8d must be more than 0 and at most 7d"),
    ("daily 0s", "duration 0s must be more than 0"),
    ("daily 1x", "not '1x' (unknown unit 'x'"),
    ("daily UTC", "maintenance window 'daily UTC': it must end in a duration, not 'UTC'"),
    ("1h", "expected '<calendar event> <duration>'"),
])
def test_parse_maintenance_errors(value, message):
    with pytest.raises(ValueError) as e:
        parse_maintenance(value)
    assert message in str(e.value)


def test_maintenance_end():
    windows = parse_maintenance("Sun *-*-* 03:00 1h; Sun *-*-* 03:30 2h; Sat 23:00 5h")
    assert maintenance_end(windows, ts("2026-12-05 23:00:00")) == ts("2026-12-06 04:00:00")
    assert maintenance_end(windows, ts("2026-12-06 03:10:00")) == ts("2026-12-06 04:00:00")
    assert maintenance_end(windows, ts("2026-12-06 03:45:00")) == ts("2026-12-06 05:30:00")  # overlap
    assert maintenance_end(windows, ts("2026-12-06 23:30:00")) is None
    assert maintenance_end(windows, ts("2026-12-06 05:29:59")) == ts("2026-12-06 05:30:00")
    assert maintenance_end(windows, ts("2026-12-06 05:30:00")) is None
    assert maintenance_end((), ts("2026-12-06 03:10:00")) is None


def test_last_elapse_timing():
    at, worst = time.time(), 0.0
    for expr in ("Sun *-*-* 03:00", "*-*-* *:*:*", "Mon *-02-29 03:00", "*-02-30", "2020-*-*",
                 "*-*-* 23:59:59", "Mon *-05~07/1 04:00", "*-*-01/10 0/5:0/7:0/9", "Sat 23:00"):
        spec = parse_calendar(expr)
        start = time.perf_counter()
        for _ in range(20):
            spec.last_elapse(at, 7 * 86400)
        took = (time.perf_counter() - start) / 20
        worst = max(worst, took)
        print(f"last_elapse({expr!r}, 7d): {took * 1000:.3f} ms")
    print(f"worst: {worst * 1000:.3f} ms")
    if os.path.exists("/usr/share/zoneinfo/Europe/Berlin"):  # the costliest: an hour walked twice
        os.environ["TZ"] = "Europe/Berlin"
        time.tzset()
        spec, at = parse_calendar("*-*-* *:*:*"), ts("2027-10-31 01:30:00")
        start = time.perf_counter()
        # systemd's every-second timer jumps from 00:59:59 to 02:00:00 UTC that night (its
        # next elapse after 02:59:59 CEST is 03:00 CET): the repeated hour never fires.
        assert spec.last_elapse(at, 7 * 86400) == ts("2027-10-31 00:59:59")
        print(f"last_elapse('*-*-* *:*:*', 7d) in Berlin's repeated hour: "
              f"{(time.perf_counter() - start) * 1000:.3f} ms")


# ---- comparison with systemd-analyze calendar ---------------------------------------------

ACCEPTED = [
    "Sun *-*-* 03:00", "Mon..Fri 22:00", "Sat,Sun 10:30", "Monday *-*-* 01:15:30",
    "Mon-Wed,Fri 12:00", "mon,tue 04:00 UTC", "Mon, 03:00", "Sat..Sun *-*-1..7 04:00",
    "Fri *-*-13 13:13", "*-*-* 03:00 UTC", "*-*-01 02:00", "*-*-01/2 05:00", "*-01,04,07,10-01",
    "2026..2030-*-* 06:00", "2027-*-* 00:00", "2026-12-24", "12-24 18:00", "*-02-29",
    "Mon *-02-29", "*-*-31 23:59:59", "*-02~03", "Mon *-05~07/1", "*-*~01", "*-*~01..07/3 08:00",
    "*-*~05/2", "*-*-* 0/5:00", "*-*-01/10", "*:0/15", "*:*:0/7", "*-*-* 8..18/2:30",
    "*-*-* 1,13:05,35:10,40", "*-*-* 03..03:00", "*-*-01..03/5", "06:00", "03:00:15", "*-*-* *:*:*",
    "minutely", "hourly", "daily", "weekly", "MONTHLY", "yearly", "annually", "quarterly",
    "semiannually", "daily UTC", "2020-*-*", "*-02-30",
]
REJECTED = [
    "Mon *-*-* 25:00", "*-13-01", "Funday", "*-*-* 1:2:3:4", "*-*-32", "*-*-* 03:60", "*-*-* 03:00:60",
    "Fri..Mon", "*/2:00", "*:30/30", "*~02-03", "*-*~29", "*-*-* *:*:05..05", "1969-*-*", "2200-01-01",
    "Mon..", "*-*-1,", "*-*-0", "*-*-01/0", "now", "today", "epoch", "Mon Tue", "Mond", "03:00 *-*-*",
    "*-*-*-*", "UTC", "5", "*-*-10..05", "daily 03:00",
]
# systemd accepts these; selfheal refuses them on purpose (see parse_calendar's docstring).
REFUSED = ["*-*-* 03:00 Europe/Berlin", "*-*-* 03:00:05.5", "26-01-01", "@1700000000"]
# A repetition that overflows its field (hour 0/5 reaching "25") makes systemd skip matches: 247
# always (the next day's 00:00, the next month's 1st), 252/257 still when the overflow also rolls
# the month or year over. selfheal matches every value the expression lists; for these, systemd's
# elapses must be ours with some left out.
OVERFLOW_SKIPS = {"*-*-* 0/5:00", "*-*-01/10", "*:*:0/7"}
LINE = re.compile(r"^\s*(?:Next elapse|Iter\. #\d+|Iteration #\d+): \w+ (\S+ \S+) UTC$", re.M)


def systemd_analyze_in(root, *args, zone="UTC"):
    """systemd-analyze ARGS in that root (chrooted; TZ=zone); skipped (failed under CI=true)
    when the root cannot be asked."""
    path = os.path.join(BED, root)
    missing = ("chroot needs root" if os.geteuid() != 0 else
               "%s is not built (tests/run.sh builds it)" % path
               if not os.path.exists(os.path.join(path, "usr/bin/systemd-analyze")) else "")
    if missing and os.environ.get("CI") == "true":
        pytest.fail("CI=true: " + missing)
    if missing:
        pytest.skip(missing)
    return subprocess.run([shutil.which("chroot") or "/usr/sbin/chroot", path, "systemd-analyze", *args],
                          env={"TZ": zone, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                          capture_output=True, text=True, timeout=60)


def analyze(root, expr, zone="UTC"):
    """(exit status, output) of systemd-analyze calendar --iterations=20 in that root."""
    p = systemd_analyze_in(root, "calendar", "--iterations=20", expr, zone=zone)
    return p.returncode, p.stdout



def systemd_calendar(root, expr):
    """(exit status, [elapses]) from systemd-analyze calendar in that root, TZ=UTC."""
    rc, out = analyze(root, expr)
    return rc, [ts(s) for s in LINE.findall(out)]


def our_chain(expr, now, n=20):
    spec, out, t = parse_calendar(expr), [], now
    while len(out) < n and (t := spec.next_elapse(t)) is not None:
        out.append(t)
    return out


@pytest.mark.parametrize("root", ROOTS)
@pytest.mark.parametrize("expr", ACCEPTED)
def test_same_elapses_as_systemd(root, expr):
    before = time.time()
    rc, theirs = systemd_calendar(root, expr)
    after = time.time()
    assert rc == 0, f"systemd {ROOTS[root]} rejects {expr!r}"
    if expr in OVERFLOW_SKIPS:
        ours = our_chain(expr, before, 60)
        assert theirs and set(theirs) <= set(ours) and theirs[0] >= ours[0]
        return
    ours = our_chain(expr, before)
    if ours != theirs:  # a second may have ticked while systemd-analyze ran
        ours = our_chain(expr, after)
    fmt = lambda ts_list: [time.strftime("%a %F %T", time.gmtime(t)) for t in ts_list]
    assert fmt(ours) == fmt(theirs)


@pytest.mark.parametrize("root", ROOTS)
@pytest.mark.parametrize("expr", REJECTED)
def test_rejected_like_systemd(root, expr):
    rc, _ = systemd_calendar(root, expr)
    assert rc != 0, f"systemd {ROOTS[root]} accepts {expr!r}"
    with pytest.raises(ValueError):
        parse_calendar(expr)


@pytest.mark.parametrize("root", ROOTS)
@pytest.mark.parametrize("expr", REFUSED)
def test_refused_on_purpose(root, expr):
    rc, _ = systemd_calendar(root, expr)
    assert rc == 0, f"systemd {ROOTS[root]} rejects {expr!r} too"
    with pytest.raises(ValueError):
        parse_calendar(expr)


# Local time: around the DST changes in Europe/Berlin (a skipped hour in March, a repeated one
# in October), against systemd with the same TZ.
LOCAL = ["*-03-25..31 02:30", "*-10-25..31 02:30", "*-10-31 *:00,30", "Sun *-03,10-25..31 01..03:15"]


@pytest.mark.parametrize("root", ROOTS)
@pytest.mark.parametrize("expr", LOCAL)
def test_local_time_like_systemd(root, expr):
    zone = "Europe/Berlin"
    if not all(os.path.exists(os.path.join(r, "usr/share/zoneinfo", zone)) for r in ("/", os.path.join(BED, root))):
        pytest.skip("no zoneinfo for %s" % zone)
    rc, out = analyze(root, expr, zone)
    theirs = [ts(x) for x in re.findall(r"^\s*\(in UTC\): \w+ (\S+ \S+) UTC$", out, re.M)]
    assert rc == 0 and len(theirs) == 20
    os.environ["TZ"] = zone
    time.tzset()
    assert our_chain(expr, time.time()) == theirs


# ---- last_elapse (what a window's opening is) agrees with next_elapse (checked against systemd) ----

def repeats_an_earlier_time(t):
    """t is the second occurrence of its wall-clock time (the hour summer time's end repeats)."""
    return any(time.localtime(t - shift)[:6] == time.localtime(t)[:6] for shift in (1800, 3600, 7200))


def brute_last(spec, at, within):
    """The latest elapse in (at - within, at] found by walking next_elapse from the window's
    start. A running timer never fires at a second occurrence (it computes its next elapse from
    the first): a walk that starts inside the repeated hour sees those, and they do not count."""
    found, t = None, at - within
    while True:
        t = spec.next_elapse(t)
        if t is None or t > at:
            return found
        if not repeats_an_earlier_time(t):
            found = t


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin"])
@pytest.mark.parametrize("expr", ["Sun *-*-* 03:00", "*-*-* 02:30", "Mon..Fri 22:00", "*-*-01 00:00", "hourly",
                                  "*-*-* *:0/15", "Sat,Sun *-*-* 01:00..04:00/30"])
def test_last_elapse_is_the_latest_next_elapse_in_the_window(zone, expr):
    if not os.path.exists("/usr/share/zoneinfo/" + zone):
        pytest.skip("no zoneinfo for %s" % zone)
    os.environ["TZ"] = zone
    time.tzset()
    spec = parse_calendar(expr)
    # Every 37 minutes across a spring and an autumn change in Berlin, the repeated hour too.
    for start in (ts("2027-03-26 00:00:00"), ts("2027-10-29 00:00:00")):
        for step in range(0, 4 * 86400, 37 * 60):
            at = start + step
            for within in (1800, 3 * 3600):
                assert spec.last_elapse(at, within) == brute_last(spec, at, within), (expr, at, within)


# ---- the repeated and the skipped hour, as systemd decides them, whatever the process did before ----

DST_CASES = [  # (expression, base time UTC): Berlin's autumn (repeated 02:00-03:00) and spring (skipped) nights
    ("Sun *-*-* 02:30", "2027-10-30 12:00:00"), ("*-*-* *:30", "2027-10-31 00:00:00"),
    ("*-*-* 02:00..03:00/15", "2027-10-30 23:50:00"), ("Sun *-*-* 02:30", "2027-03-27 12:00:00"),
    ("*-*-* *:30", "2027-03-28 00:00:00"), ("*-*-* *:30", "2027-10-31 01:15:00"),
]
OURS_IN_A_FRESH_PROCESS = """
import calendar, sys, time
sys.path.insert(0, sys.argv[1])
import selfheal
if sys.argv[4] == "after-a-winter-conversion":  # what made mktime() pick the other offset
    time.mktime((2027, 12, 1, 12, 0, 0, 0, 0, -1))
spec, t = selfheal.parse_calendar(sys.argv[2]), calendar.timegm(time.strptime(sys.argv[3], "%Y-%m-%d %H:%M:%S"))
for _ in range(4):
    t = spec.next_elapse(t)
    print(time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)))
"""


@pytest.mark.parametrize("root", ROOTS)
@pytest.mark.parametrize("expr, base", DST_CASES)
@pytest.mark.parametrize("before", ["fresh", "after-a-winter-conversion"])
def test_repeated_and_skipped_hours_elapse_as_systemds_base_time_says(root, expr, base, before):
    zone = "Europe/Berlin"
    if not os.path.exists("/usr/share/zoneinfo/" + zone):
        pytest.skip("no zoneinfo for %s" % zone)
    done = systemd_analyze_in(root, "calendar", "--iterations=4", "--base-time=%s UTC" % base, expr, zone=zone)
    theirs = re.findall(r"^\s*\(in UTC\): \w+ (\S+ \S+) UTC$", done.stdout, re.M)
    assert done.returncode == 0 and len(theirs) == 4, done.stdout + done.stderr
    ours = subprocess.run([sys.executable, "-S", "-c", OURS_IN_A_FRESH_PROCESS, REPO_DIR, expr, base, before],
                          env={"TZ": zone, "PATH": os.environ.get("PATH", "")}, capture_output=True, text=True,
                          timeout=60)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout.split("\n")[:4] == theirs, (expr, base, before)
