#!/usr/bin/env python3
"""selfheal: heal systemd services the moment they fail, and mail their owner a report.

systemd starts ``selfheal@NAME.service`` through an ``OnFailure=`` drop-in when a
service listed in services.conf fails. That unit runs ``selfheal.py heal NAME``:
diagnose (systemctl show, the journal of the failed run, who holds the port),
triage the failure and repair with the configured strategies (the one that fits the
evidence first), verify by polling against a deadline, then report. Every report is first
written to the outbox; mail and, when set, ``webhook_url`` (json, slack or ntfy) send it from
there and mark their own delivery, so what cannot be sent now goes out with the next heal,
``selfheal.py watch`` (selfheal-watch.timer) or ``flush-mail``. A watch run that checked
every service pings ``heartbeat_url`` (a dead-man's switch).
The watch also catches what OnFailure= never sees: hung, stopped, or auto-restarted services,
and heals a FAILED service again at growing intervals (retry_interval).

Python standard library only; Python 3.9+, systemd 247+.
Run ``selfheal.py --help`` for the commands.

Sections, in the order data flows (search for the title):
  Constants, Errors, Data model   paths, binaries, limits; SelfhealError; Paths, Check, PortOwner, Outcome, ...
  State and files                 atomic writes, locks, history (rotated) and per-service summaries
  Files a service controls        open_safely: the trust boundary for paths a service account owns;
                                  root_only_problems: what root runs must be root's alone; text cleaning
  Config                          value checkers, maintenance windows (systemd calendar events),
                                  the key table (Settings, Service: one key() each), parse_config
  Probes                          systemctl, the journal, listening sockets (netlink), who holds a port;
                                  run_command: config_check and health_command (as the service's user)
  Triage and root cause           FAILURE_KINDS: one table for the kind, its cause and its strategies
  Verification                    probe and verify: active, port held by the unit, health check
  Strategies                      one Strategy record per repair (STRATEGIES)
  Healing                         heal(): diagnose, refuse or repair, verify; heal_rounds; a burst:
                                  one leader heals what later triggers hand over (lead_burst), one mail
  Dependencies                    depends_on and systemd's own: WAITING, then one heal for the chain
  Reporting                       LABELS (each status's icon, ntfy tag, MESSAGE_ID, colour); the report's text (pure)
  Outbox, Mail, Webhook           a report is queued first; mail and the webhook send it from there
  Incidents                       one mail thread per incident, flapping, reminders, retries,
                                  escalate_to, maintenance windows' summaries
  Watch                           the periodic look: hangs, stops, restarts systemd repaired
  Install, Dashboard              units and drop-ins; miraclemax-status
  Metrics                         the dashboard's facts for Prometheus (node_exporter's textfile collector)
  CLI                             build_parser, main, and every command's handler: cmd_<command>
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import dataclasses
import datetime as dt
import difflib
import enum
import errno
import fcntl
import fnmatch
import grp
import json
import logging
import os
import pwd
import py_compile
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import syslog
import tempfile
import time
import traceback
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from email.message import EmailMessage

# Not imported here: email, smtplib, ssl, urllib.request (about 50 ms together). Every
# heal starts a fresh Python, so they are imported while it waits for the service to come
# back (see preload), and where they are used.

# =============================================================================
# Constants: every host path and binary, so tests can point them elsewhere
# =============================================================================

VERSION = "0.1.0"

CONFIG_PATH = "/etc/selfheal/services.conf"
STATE_DIR = "/var/lib/selfheal"  # history.jsonl, spool/, services/, install manifest
RUN_DIR = "/run/selfheal"  # locks and per-service status files (gone at boot)
LOG_DIR = "/var/log/selfheal"  # one human-readable log per service (0640 root:adm: it holds journal lines)
LOG_GROUP = "adm"  # who may read what holds journal lines, as the journal itself allows
SERVICE_LOG_MODE = 0o640
UNIT_DIR = "/etc/systemd/system"
DEFAULT_PREFIX = "/usr/local"
PYTHON = "/usr/bin/python3"

SYSTEMCTL = "systemctl"
JOURNALCTL = "journalctl"
SS = "ss"
SYSTEMD_ANALYZE = "systemd-analyze"
SETPRIV = "setpriv"  # util-linux (in every Debian): no_new_privs for a command run as a service's user
JOURNAL_SOCKET = "/run/systemd/journal/socket"  # the journal's native protocol (structured fields)
METRICS_FILE = "/var/lib/prometheus/node-exporter/selfheal.prom"  # Debian's node_exporter reads *.prom there
PROC_DIR = Path("/proc")

COMMAND_TIMEOUT = 15.0  # seconds for any external command unless said otherwise
# A config_check or health_command gets this PATH and nothing else of the environment.
COMMAND_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
COMMAND_ENV_KEEP: Tuple[str, ...] = ()  # names of selfheal's own variables passed on too (tests: their fakes' state)
COMMAND_OUTPUT_LIMIT = 65536  # bytes of a config_check's or health_command's output kept; the rest is read and dropped
HEALTH_RUN_AS = ("service", "root")  # health_run_as: the service's own User=/Group=, or root
MAX_CONFIG_BYTES = 1 << 20  # a services.conf larger than 1 MiB is not one
POLL_INTERVAL = 0.05  # seconds between verification probes
RECHECK_DELAY = 2.0  # after a look that found a hang, the watch looks again this soon
WATCH_BUDGET = (20.0, 240.0)  # a watch run's total: watch_interval, within these (TimeoutStartSec=5min)
SETTLE_SECONDS = 3.0  # a service with neither port nor health check must stay up this long
MANUAL_TRIGGER = "manual"  # `selfheal heal NAME` from a shell: asked for, not a failure
RETRY_TRIGGER = "retry"  # the watch heals a FAILED service again (retry_interval): not a new failure
CHAIN_TRIGGER = "after its dependency"  # healed in the heal of a service it needs: not its own failure
MAX_RETRY_INTERVAL = 3600.0  # retry_interval doubles up to this
BREAKER_FIRST = 30.0  # ESCALATED: the first heal after the breaker tripped, then doubling (breaker_delay)
# Heals that are not a new failure of the service: neither flapping nor failure_threshold counts them.
NOT_A_FAILURE = (MANUAL_TRIGGER, RETRY_TRIGGER, CHAIN_TRIGGER)
# Nor is a service the watch found stopped (it assesses "stopped" only for result success:
# a `systemctl stop`, which never fires OnFailure=): its heal starts it, and counts nothing.
NOT_A_FAILURE_FINDINGS = ("stopped",)
# A burst: BURST_MIN or more services whose OnFailure= came within BURST_WINDOW seconds of
# each other are one event of the host, not a failure of each (failure_threshold skips it).
BURST_WINDOW = 2.0
BURST_MIN = 3
BURST_WORKERS = 64  # heals one leader runs at once (each mostly waits: on systemctl, on the service)
BURST_POLL = 0.02  # seconds between the leader's looks for services handed to it
HEALTH_BODY_LIMIT = 65536  # health_expect_text is looked for in this much of the answer
KILL_GRACE = 5.0  # seconds between SIGTERM and SIGKILL for a stale process
MAX_JOB_SECONDS = 600.0  # the longest a systemctl job may take (selfheal@.service allows 10 min)
MAX_HEAL_SECONDS = 480.0  # heal_timeout's ceiling: the unit's 10 min less time to report
HEAL_RESERVE = 5.0  # of heal_timeout, kept for recording what happened after the last step
JOURNAL_LINES = 30
SOCK_DIAG_TIMEOUT = 0.5  # seconds for the kernel's list of listening sockets (netlink), both families

EX_OK, EX_FAIL, EX_USAGE, EX_CONFIG = 0, 1, 2, 78

DROPIN_NAME = "selfheal.conf"
DROPIN_MARK = "# Installed by selfheal"
MANIFEST_NAME = "install-manifest"

# Units selfheal never restarts, kills or wraps, whatever services.conf says.
NEVER_TOUCH = (
    "selfheal@*.service", "selfheal-*.service", "systemd-*.service", "dbus.service",
    "dbus-broker.service", "ssh.service", "sshd.service", "sshd@*.service",
    "polkit.service", "getty@*.service", "serial-getty@*.service", "user@*.service",
    "user-runtime-dir@*.service", "emergency.service", "rescue.service",
    "init.scope", "-.slice",
)

# What `systemctl show` is asked about one unit (unknown names are simply absent).
UNIT_PROPERTIES = (
    "Id", "LoadState", "ActiveState", "SubState", "Result", "UnitFileState",
    "ExecMainCode", "ExecMainStatus", "ExecMainPID", "MainPID", "InvocationID",
    "NRestarts", "MemoryCurrent", "MemoryPeak", "ControlGroup", "Restart",
    "ActiveEnterTimestamp", "InactiveEnterTimestamp", "ExecMainExitTimestamp",
    "ExecMainExitTimestampMonotonic", "InactiveEnterTimestampMonotonic",
    "StateChangeTimestampMonotonic", "FragmentPath", "User", "Group", "DynamicUser", "Description", "Names",
    "TimeoutStartUSec", "TimeoutStopUSec", "Environment", "EnvironmentFiles", "ActiveEnterTimestampMonotonic",
    "InactiveExitTimestampMonotonic", "ActiveExitTimestampMonotonic", "Type", "RemainAfterExit",
    # What systemd says the unit needs, and what needs it (listed services only count).
    "Requires", "BindsTo", "Wants", "After", "RequiredBy", "BoundBy", "WantedBy", "Before",
)

# systemd's own exit statuses for a process that never got to run its code
# (systemd.exec(5), "Process Exit Codes").
SYSTEMD_EXIT_STATUS = {
    200: ("CHDIR", "could not change to the WorkingDirectory="),
    203: ("EXEC", "the executable in ExecStart= could not be run (missing, not executable, or a bad interpreter)"),
    204: ("MEMORY", "systemd ran out of memory while starting it"),
    209: ("STDOUT", "its standard output could not be set up"),
    210: ("CHROOT", "the RootDirectory= could not be entered"),
    214: ("SETSCHEDULER", "its scheduling parameters could not be set"),
    216: ("GROUP", "the Group= in its unit does not exist"),
    217: ("USER", "the User= in its unit does not exist"),
    218: ("CAPABILITIES", "its capabilities could not be set"),
    226: ("NAMESPACE", "its file system namespace could not be set up (a ReadWritePaths= or similar path is missing)"),
    233: ("RUNTIME_DIRECTORY", "its RuntimeDirectory= could not be created"),
    238: ("STATE_DIRECTORY", "its StateDirectory= could not be created"),
    243: ("CREDENTIALS", "its credentials could not be loaded"),
}

# OnFailure= units get the failed run's facts as MONITOR_* variables since systemd 251;
# before that (Debian 11 has 247) diagnose() reads them from `systemctl show`.
MONITOR_ENV_SINCE = 251
VERSION_PROBE_TIMEOUT = 5.0  # seconds for `systemctl --version` (--version, heal -v)

log = logging.getLogger("selfheal")


# =============================================================================
# Errors
# =============================================================================


class SelfhealError(Exception):
    """Base of every error selfheal reports to the user; exit_code is what main returns."""

    exit_code = EX_FAIL


class ConfigError(SelfhealError):
    """services.conf is broken; .problems lists every problem found, each already formatted."""

    exit_code = EX_CONFIG

    def __init__(self, problems: Sequence[str]):
        super().__init__("\n".join(problems))
        self.problems = list(problems)


class UsageError(SelfhealError):
    exit_code = EX_USAGE


class Escalation(SelfhealError):
    """A strategy found something a human must decide; healing stops there.

    `cause` (a RootCause), when the strategy's finding explains the failure better than
    systemd's result does; `steps`, the manual steps that finding calls for."""

    def __init__(self, message: str, cause=None, steps: Sequence[str] = ()):
        super().__init__(message)
        self.cause = cause
        self.steps = tuple(steps)


class Stopped(BaseException):
    """SIGTERM during a heal: systemd stops selfheal@NAME.service (its TimeoutStartSec=, a
    shutdown, `systemctl stop`). Not an Exception: nothing on the way may swallow it."""


class Refused(SelfhealError):
    """selfheal will not act through this path: a link the service's account could have
    planted, a FIFO or device where a file belongs, a file too large to read. The message
    says what was found and that nothing was done ("... is a symlink owned by app: not
    followed"); a heal that meets one is FAILED with manual steps, never RESOLVED. It quotes
    names the account chose, so it is made one line, controls escaped."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


# =============================================================================
# Data model
# =============================================================================


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where selfheal keeps its files; one object so tests can move all of them."""

    state: Path = Path(STATE_DIR)
    run: Path = Path(RUN_DIR)
    logs: Path = Path(LOG_DIR)

    @property
    def history(self) -> Path:
        return self.state / "history.jsonl"

    @property
    def spool(self) -> Path:
        return self.state / "spool"

    @property
    def webhook_spool(self) -> Path:
        return self.spool / "webhook"

    def service_state(self, name: str) -> Path:
        return self.state / "services" / (name + ".json")

    def summary(self, name: str) -> Path:
        """What the hot paths need of a service's history (its last event, recent heals)."""
        return self.state / "summary" / (name + ".json")

    @property
    def public_config(self) -> Path:
        """services.conf without its secrets, for the dashboard without root (install writes it)."""
        return self.state / "services.public.conf"

    def status(self, name: str) -> Path:
        return self.run / (name + ".json")

    def lock(self, name: str) -> Path:
        return self.run / "locks" / (name + ".lock")

    def service_log(self, name: str) -> Path:
        return self.logs / (name + ".log")

    def finding(self, name: str) -> Path:
        return self.run / "findings" / (name + ".json")

    def watch_state(self, name: str) -> Path:
        return self.run / "watch" / (name + ".json")

    def handed(self, name: str) -> Path:
        """A failed service handed to the heal under way (the leader of a burst)."""
        return self.run / "handed" / (name + ".json")

    @property
    def leading(self) -> Path:
        """Exists while a heal leads a burst (made by selfheal@.service's ExecCondition=)."""
        return self.run / "leading"

    def arrival(self, name: str) -> Path:
        """Touched when an OnFailure= trigger for the service arrives (its mtime: when)."""
        return self.run / "arrivals" / name

    @classmethod
    def from_env(cls, env=os.environ) -> "Paths":
        """SELFHEAL_STATE_DIR / _RUN_DIR / _LOG_DIR move the directories (tests, packaging)."""
        return cls(
            Path(env.get("SELFHEAL_STATE_DIR", STATE_DIR)),
            Path(env.get("SELFHEAL_RUN_DIR", RUN_DIR)),
            Path(env.get("SELFHEAL_LOG_DIR", LOG_DIR)),
        )


@dataclasses.dataclass(frozen=True)
class Config:
    path: str
    settings: Settings
    services: Dict[str, Service]
    lines: Dict[Tuple[Optional[str], Optional[str]], int] = dataclasses.field(default_factory=dict)

    def line(self, section: str, key: Optional[str] = None) -> int:
        """Where the key is written (its section's header when it is not); 0: unknown."""
        return self.lines.get((section, key)) or self.lines.get((section, None)) or 0

    def where(self, section: str, key: Optional[str] = None) -> str:
        """FILE:LINE [section] key, as a config problem starts."""
        return "%s:%s [%s]%s" % (self.path, self.line(section, key) or "-", section, " " + key if key else "")


@dataclasses.dataclass(frozen=True)
class Finding:
    """What the watch saw that made it start a heal (OnFailure= needs none)."""

    kind: str  # unhealthy | stopped | failed | restarted
    detail: str  # "port 5002 open but GET http://... no answer within 5 s"
    at: float  # when the watch saw it
    since: float = 0.0  # restarted: the last time the watch saw it healthy
    nrestarts: Tuple[int, int] = (0, 0)  # restarted: systemd's NRestarts before and now
    invocation: str = ""  # the run the watch saw; a heal of another run ignores the finding
    previous: str = ""  # restarted: the run the watch last saw healthy (the one that crashed)


class PortOwner(str, enum.Enum):
    """Who holds a listening port, as port_holder finds it."""
    OWN = "own"  # a process of the unit's current run (or port_owner = any: whoever it is)
    LEFTOVER = "leftover"  # only processes of an earlier run of the unit (KillMode=process)
    FOREIGN = "foreign"  # a process of another unit, or of none (at least one such)
    SOCKET_UNIT = "socket unit"  # systemd itself: a socket unit waiting for its service
    UNKNOWN = "unknown"  # ss could not say (not root, a holder gone)


PORT_TAKEN = (PortOwner.FOREIGN, PortOwner.LEFTOVER)  # the unit's new run would fail to bind


class Holding(NamedTuple):
    """port_holder's answer: the owner as a value, and the same said for people."""
    owner: PortOwner
    detail: str


class Outcome(str, enum.Enum):
    RESOLVED = "RESOLVED"  # selfheal repaired it and verified it works
    RECOVERED = "RECOVERED"  # systemd's own Restart= brought it back; selfheal verified
    FAILED = "FAILED"  # nothing worked: a human is needed
    ESCALATED = "ESCALATED"  # too many heals in the window: a human is told; healed at growing intervals
    HEALTHY = "HEALTHY"  # nothing was wrong when selfheal looked
    STOPPED = "STOPPED"  # found stopped; on_stopped = report: left stopped, reported
    WAITING = "WAITING"  # a service it needs is down: that one is healed first (not recorded, not mailed)


@dataclasses.dataclass(frozen=True)
class CmdResult:
    argv: Tuple[str, ...]
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def brief(self) -> str:
        """The first line of what it said: systemctl puts the reason there."""
        text = (self.err or self.out).strip().splitlines()
        return text[0] if text else "exit status %d" % self.rc


@dataclasses.dataclass(frozen=True)
class Process:
    pid: int
    user: str
    cmdline: str
    cgroup: str
    age_seconds: Optional[float] = None
    started: Optional[float] = None  # seconds after boot (CLOCK_BOOTTIME, never behind CLOCK_MONOTONIC)


@dataclasses.dataclass(frozen=True)
class Listener:
    port: int
    address: str
    pids: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    unit: Dict[str, str]  # systemctl show properties
    result: str
    exit_code: str  # exited | killed | dumped | ""
    exit_status: str  # "1", "KILL", ...
    from_monitor_env: bool  # True when systemd handed us MONITOR_* (systemd 251+)
    journal: Tuple[str, ...]
    listeners: Tuple[Listener, ...]  # sockets listening on the service's port
    holders: Tuple[Process, ...]  # processes behind those sockets
    failed_at: Optional[float]  # wall clock of the failure, when systemd says
    detected_after: Optional[float]  # seconds from failure to this diagnosis
    finding: Optional[Finding] = None  # when the watch started this heal
    invocation: str = ""  # the failed run's InvocationID (MONITOR_INVOCATION_ID when systemd gave it)

    @property
    def active_state(self) -> str:
        return self.unit.get("ActiveState", "")

    @property
    def sub_state(self) -> str:
        return self.unit.get("SubState", "")

    @property
    def systemd_restarting(self) -> bool:
        """Newer systemd (257 here; not 247 or 252) fires OnFailure= with its own Restart= still pending."""
        return self.sub_state == "auto-restart" or (
            self.active_state == "activating" and self.unit.get("Restart", "no") != "no"
            and self.result not in ("", "success")
        )


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    # A port check's holder, as a value (None: nothing listens, or not a port check). Every
    # rule about whose the port is reads this, never the detail, which is for people.
    owner: Optional["PortOwner"] = dataclasses.field(default=None, compare=False)


@dataclasses.dataclass(frozen=True)
class Verification:
    ok: bool
    seconds: float
    checks: Tuple[Check, ...]
    unit: Dict[str, str] = dataclasses.field(default_factory=dict, compare=False)  # as last seen

    def summary(self) -> str:
        return "; ".join("%s: %s" % (c.name, c.detail) for c in self.checks)


@dataclasses.dataclass(frozen=True)
class Action:
    what: str  # "systemctl restart story-stages.service"
    ok: bool
    seconds: float
    detail: str = ""
    starts: bool = False  # it started a new run of the service (restart, start)


@dataclasses.dataclass(frozen=True)
class StrategyRun:
    name: str
    actions: Tuple[Action, ...]
    verification: Optional[Verification]
    note: str = ""  # why it did nothing, or what it found
    found: Tuple[str, ...] = ()  # what a check looked at, line by line

    @property
    def healed(self) -> bool:
        return self.verification is not None and self.verification.ok


@dataclasses.dataclass(frozen=True)
class RootCause:
    summary: str
    confidence: str  # high | medium | low
    evidence: str
    recommendation: str


@dataclasses.dataclass(frozen=True)
class HealResult:
    service: Service
    outcome: Outcome
    trigger: str
    started_at: float  # wall clock when the heal began
    diagnosis: Diagnosis
    runs: Tuple[StrategyRun, ...]
    root_cause: RootCause
    healing_seconds: Optional[float]  # failure (or heal start) to verified healthy
    post: Dict[str, str]  # systemctl show after healing
    escalation: str = ""  # why a human is needed
    after: Optional[Diagnosis] = None  # the unit after a repair that did not work
    plan: str = ""  # triage: what the evidence says and the order the strategies ran in
    manual: Tuple[str, ...] = ()  # manual steps a strategy's finding calls for
    waiting_for: str = ""  # WAITING: the service it needs, which is down
    waiting_detail: str = ""  # and how it is down
    burst: int = 0  # services whose OnFailure= came within BURST_WINDOW of this one's (BURST_MIN+: one event)
    acted_until: float = 0.0  # wall clock when a heal that restarted or changed something ended

    @property
    def a_failure(self) -> bool:
        """Whether the heal answers a failure of the service itself (flapping counts it)."""
        finding = self.diagnosis.finding
        return self.trigger not in NOT_A_FAILURE and not (finding and finding.kind in NOT_A_FAILURE_FINDINGS)

    @property
    def strategy(self) -> str:
        healed = [r.name for r in self.runs if r.healed]
        return healed[0] if healed else (self.runs[-1].name if self.runs else "none")


# =============================================================================
# State and files: atomic writes, locks, history, per-service state, status files
# =============================================================================


def ensure_dir(path: Path, mode: int = 0o755) -> None:
    """Create a directory selfheal writes into, and refuse one that is a symlink: it could
    point anywhere, and selfheal (root) never writes through it. A missing directory is
    refused when the nearest existing one above it is a symlink (state/ for state/spool/)."""
    existing = path
    while not os.path.lexists(str(existing)) and existing.parent != existing:
        existing = existing.parent
    if existing.is_symlink():
        raise OSError(errno.ELOOP, "%s is a symlink, not a directory; selfheal does not write through it "
                      "(remove the link)" % existing)
    path.mkdir(parents=True, exist_ok=True, mode=mode)


def atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a whole file so a crash leaves the old or the new one, never half of one."""
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, str(path))
        fsync_dir(path.parent)  # the new name too survives a power cut
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def append_line(path: Path, line: str, mode: int = 0o644) -> None:
    """Append one line to an O_APPEND file: a crash loses at most that line.

    If an earlier writer died mid-line, a newline is put first so the torn line stays
    alone (readers skip it) and this one is whole. mode 0640 files go to group adm (as the
    journal does), and a file left more open by an older version is narrowed.
    """
    ensure_dir(path.parent)
    fd = os.open(str(path), os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        restrict(fd, mode)
        data = (line.rstrip("\n") + "\n").encode("utf-8")
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def restrict(fd: int, mode: int) -> None:
    """A root-only file (mode without o+r) is made so on its descriptor: 0640 belongs to
    group adm when it exists (readers of the journal may read what holds journal lines)."""
    if mode & 0o004 or not is_root():
        return
    st = os.fstat(fd)
    gid = 0
    if mode & 0o040:
        with contextlib.suppress(KeyError):
            gid = grp.getgrnam(LOG_GROUP).gr_gid
    if st.st_uid != 0 or st.st_gid != gid:
        os.fchown(fd, 0, gid)
    if st.st_mode & 0o7777 != mode:
        os.fchmod(fd, mode)


# -- History: heal events, rotated, with a small summary per service ----------------------
# history.jsonl is append-only, one event per line, and rotated when it passes
# HISTORY_ROTATE_BYTES (history.jsonl.1 ... .HISTORY_KEEP, the oldest dropped). What the
# hot paths need (a service's last event, its recent heals for failure_threshold) is kept
# per service in summary/NAME.json, written with each event: no heal, watch run or dashboard
# reads the whole history. The dashboard's activity window reads the files from the end.

HISTORY_ROTATE_BYTES = 1 << 20  # history.jsonl is rotated at 1 MiB (about 1,500 events)
HISTORY_KEEP = 4  # rotated files kept: the history takes at most 5 MiB
SERVICE_LOG_ROTATE_BYTES = 1 << 20  # /var/log/selfheal/NAME.log is rotated at 1 MiB, one kept
SUMMARY_ATTEMPTS = 256  # heal times kept per service: failure_threshold is at most this
HISTORY_CHUNK = 1 << 16


def record_event(paths: Paths, event: dict) -> None:
    """One heal event: a line in the history, the service's summary, and a rotation when the
    history has grown past its bound. Raises OSError (the caller logs it)."""
    event = clean_data(event)
    lock = Lock(paths.run / "locks" / "history.lock")
    try:
        locked = lock.wait(10.0)
    except OSError:  # no lock directory (a full or odd /run): append all the same
        locked = False
    try:
        named = isinstance(event.get("service"), str) and NAME_RE.match(event["service"])
        summary = history_summary(paths, event["service"]) if named else {}  # (before this event)
        append_line(paths.history, json.dumps(event, sort_keys=True))
        if named:
            atomic_write(paths.summary(event["service"]), json.dumps(
                summarize(summary, event), sort_keys=True) + "\n")
        if locked:  # two rotating at once could drop a generation early
            rotate(paths.history, HISTORY_ROTATE_BYTES, HISTORY_KEEP)
    finally:
        if locked:
            lock.release()


def summarize(summary: dict, event: dict) -> dict:
    """summary with one more event: the last one, heals by outcome, recent heal times."""
    outcome = str(event.get("outcome") or "?")
    counts = dict(summary.get("counts") or {})
    counts[outcome] = int(counts.get(outcome) or 0) + 1
    attempts = list(summary.get("attempts") or [])
    if counts_as_attempt(event):
        attempts = (attempts + [float(event["ts"])])[-SUMMARY_ATTEMPTS:]
    return {"version": 1, "last": event, "counts": counts, "attempts": attempts}


def counts_as_attempt(event: dict) -> bool:
    """A heal that counts toward failure_threshold: selfheal's own repair or failure, not
    what systemd's Restart= repaired, not a heal asked for by hand, a retry, a clean stop, a
    dependent's heal in its root's chain, or one service's share of a burst."""
    return event.get("outcome") in (Outcome.RESOLVED.value, Outcome.FAILED.value) and \
        event.get("trigger") not in NOT_A_FAILURE and event.get("a_failure", True) is not False and \
        int(event.get("burst") or 0) < BURST_MIN


def history_summary(paths: Paths, name: str) -> dict:
    """The service's summary; made from the end of the history when there is none yet (an
    older selfheal kept none)."""
    try:
        data = json.loads(paths.summary(name).read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("version") == 1 and isinstance(data.get("attempts"), list):
            return data
    except (OSError, ValueError):
        pass
    summary: dict = {}
    try:
        events = scan_history(paths, name, max_bytes=HISTORY_ROTATE_BYTES * (HISTORY_KEEP + 1))[0]
    except OSError:
        events = []
    for event in events:
        summary = summarize(summary, event)
    if summary:
        summary["last"] = clean_data(summary["last"])
        if is_root():  # made once: the next heal, watch run and dashboard read it
            with contextlib.suppress(OSError):
                atomic_write(paths.summary(name), json.dumps(summary, sort_keys=True) + "\n")
    return summary


def last_event(paths: Paths, name: str) -> Optional[dict]:
    last = history_summary(paths, name).get("last")
    return last if isinstance(last, dict) else None


def heal_attempts(paths: Paths, name: str, since: float) -> List[float]:
    """When selfheal healed the service since `since` (what failure_threshold counts)."""
    times = []
    for ts in history_summary(paths, name).get("attempts", []):
        with contextlib.suppress(TypeError, ValueError):
            if float(ts) >= since:
                times.append(float(ts))
    return times


def rotate(path: Path, limit: int, keep: int) -> None:
    """path -> path.1 -> ... -> path.KEEP (the oldest dropped), once path is over limit bytes.
    A file far over it (one an older selfheal let grow for a year) keeps its last `limit`
    bytes, from a line's start, as path.1: the bound holds from the first rotation."""
    try:
        size = os.lstat(str(path)).st_size
    except FileNotFoundError:
        return
    if size < limit:
        return
    for number in range(keep, 0, -1):
        newer = path if number == 1 else path.with_name("%s.%d" % (path.name, number - 1))
        with contextlib.suppress(FileNotFoundError):
            os.replace(str(newer), str(path.with_name("%s.%d" % (path.name, number))))  # renames a link, never follows
    if size > 2 * limit and keep:
        first = path.with_name(path.name + ".1")
        fd = os.open(str(first), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            tail = os.pread(fd, limit, size - limit)
            tail = tail[tail.find(b"\n") + 1:]
            os.pwrite(fd, tail, 0)
            os.ftruncate(fd, len(tail))
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(path.parent)


def history_files(paths: Paths) -> List[Path]:
    """The history, newest first: history.jsonl, then .1, .2, ..."""
    return [paths.history] + [paths.history.with_name("%s.%d" % (paths.history.name, n))
                              for n in range(1, HISTORY_KEEP + 1)]


def lines_backward(path: Path) -> Iterator[bytes]:
    """The lines of a file, last first, read in chunks from its end (raises OSError)."""
    fd = os.open(str(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        position, rest = os.fstat(fd).st_size, b""
        while position > 0:
            size = min(HISTORY_CHUNK, position)
            position -= size
            lines = (os.pread(fd, size, position) + rest).split(b"\n")
            rest = lines.pop(0)
            yield from reversed(lines)
        yield rest
    finally:
        os.close(fd)


def read_history(paths: Paths, service: Optional[str] = None, since: float = 0.0) -> List[dict]:
    """Heal events since `since` (of one service, or all), oldest first; [] when unreadable."""
    try:
        return [clean_data(event) for event in scan_history(paths, service, since)[0]]
    except OSError:
        return []


def scan_history(paths: Paths, service: Optional[str] = None, since: float = 0.0,
                 max_bytes: Optional[int] = None) -> Tuple[List[dict], int]:
    """Heal events since `since` (of one service, or all), oldest first, and how many lines
    were damaged (a crash mid-write, a hand edit: skipped, never fatal). The one reader of
    the history: from its end, so a window costs what is in it, not the history's size;
    max_bytes stops it earlier. Raises OSError when the history cannot be read. The events
    are as written (clean since 0.1.0): what is shown of them goes through clean_data."""
    events: List[dict] = []
    damaged, read, older_seen = 0, 0, 0  # older_seen: lines before since in a row (a clock
    done = False  # step may mix a few lines, so a window ends after 100 of them)
    for path in history_files(paths):
        try:
            with contextlib.closing(lines_backward(path)) as lines:
                for line in lines:
                    read += len(line) + 1
                    if max_bytes is not None and read > max_bytes:
                        done = True
                        break
                    if not line.strip():
                        continue
                    try:
                        event = json.loads(line.decode("utf-8", "replace"))
                        event["ts"] = float(event["ts"])
                        if not 0 < event["ts"] < 1e11:  # also NaN
                            raise ValueError("not a time")
                        if not isinstance(event["service"], str) or not isinstance(event.get("outcome", ""), str):
                            raise TypeError("not a heal event")
                    except (ValueError, KeyError, TypeError, IndexError):
                        damaged += 1
                        continue
                    if event["ts"] < since:
                        older_seen += 1
                        if older_seen >= 100:
                            done = True
                            break
                        continue
                    older_seen = 0
                    if service is None or event["service"] == service:
                        events.append(event)
        except FileNotFoundError:
            continue
        if done:
            break
    events.reverse()
    return events, damaged


def read_state(path: Path) -> dict:
    """A JSON state file; {} when it is missing or damaged (never fatal)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def write_state(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(clean_data(data), sort_keys=True) + "\n")


def load_service_state(paths: Paths, name: str) -> dict:
    return read_state(paths.service_state(name))


def save_service_state(paths: Paths, name: str, data: dict) -> None:
    write_state(paths.service_state(name), data)


@contextlib.contextmanager
def service_state(paths: Paths, name: str, best_effort: bool = False):
    """Load, change and save a service's state under its own lock, so a pause, a heal and
    the watch never overwrite each other's changes. Saved only if the block succeeds.

    best_effort: a state that cannot be locked or saved (a full disk) is logged, not raised,
    so what the caller does next (mail a report) still happens; unlocked, it is not saved."""
    lock = Lock(paths.service_state(name).with_suffix(".lock"))
    try:
        locked = lock.wait(10.0)
    except OSError as exc:
        if not best_effort:
            raise
        log.error("could not lock the state of %s: %s", name, exc)
        locked = False
    if not locked and not best_effort:
        raise SelfhealError("the state of %s stayed locked for 10 s" % name)
    try:
        state = load_service_state(paths, name)
        yield state
        if locked:
            save_service_state(paths, name, state)
    except OSError as exc:
        if not best_effort:
            raise
        log.error("could not save the state of %s: %s", name, exc)
    finally:
        lock.release()


def paused_until(paths: Paths, name: str, now: Optional[float] = None) -> Optional[float]:
    """None when not paused; 0.0 when paused until resumed; else the end of the pause."""
    now = time.time() if now is None else now
    state = load_service_state(paths, name)
    if "paused_until" not in state:
        return None
    try:
        until = float(state["paused_until"] or 0.0)
    except (TypeError, ValueError):
        until = 0.0  # paused; a value that is not a time means until resumed
    if until and until <= now:
        return None
    return until


class Lock:
    """One heal per service at a time: a non-blocking flock on a file under RUN_DIR."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        ensure_dir(self.path.parent)
        self.fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            os.close(self.fd)
            self.fd = None
            return False

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.acquire():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def record_heal(paths: Paths, result: HealResult, report_text: str) -> None:
    """History line, status file and service log; each failure logged, none fatal."""
    svc = result.service
    event = {
        "ts": round(result.started_at, 3),
        "time": iso(result.started_at),
        "service": svc.name,
        "unit": svc.unit,
        "outcome": result.outcome.value,
        "trigger": result.trigger,
        "strategy": result.strategy,
        "healing_seconds": None if result.healing_seconds is None else round(result.healing_seconds, 3),
        "result": result.diagnosis.result,
        "exit": ("%s %s" % (result.diagnosis.exit_code, result.diagnosis.exit_status)).strip(),
        "root_cause": result.root_cause.summary,
        # The run selfheal brought back: a trigger that finds this run healthy is not news.
        "healed_invocation": result.post.get("InvocationID", "")
        if result.outcome in (Outcome.RESOLVED, Outcome.RECOVERED) else "",
        # The run selfheal last looked at: the watch does not act twice on a known problem.
        "last_invocation": result.post.get("InvocationID", ""),
        "trigger_detail": result.diagnosis.finding.detail if result.diagnosis.finding else "",
        "a_failure": result.a_failure,
    }
    if result.burst >= BURST_MIN:
        event["burst"] = result.burst
    if result.acted_until:
        event["acted_until"] = round(result.acted_until, 3)
    # history and the status file are for the dashboard without root (0644): the event's
    # fields only, cleaned; the report (journal lines, config diffs) goes to the 0640 log.
    event = clean_data(event)
    steps = [
        (lambda: record_event(paths, event), "history"),
        (lambda: atomic_write(paths.status(svc.name), json.dumps(event, sort_keys=True) + "\n"), "status file"),
        (lambda: rotate(paths.service_log(svc.name), SERVICE_LOG_ROTATE_BYTES, 1), "service log"),
        (lambda: append_line(paths.service_log(svc.name), clean(report_text.rstrip()) + "\n" + "-" * 72,
                             SERVICE_LOG_MODE), "service log"),
    ]
    for step, what in steps:
        try:
            step()
        except OSError as exc:
            log.error("could not write the %s: %s", what, exc)


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


# =============================================================================
# Files a service controls: reached without following its links, bounded, never blocking
# =============================================================================
#
# selfheal is root; a service's data dir, env file and config files belong to the service's
# account, which may be hostile. Every strategy, the watch and the report reach such a path
# only through open_safely(): it walks the path one component at a time (openat with
# O_NOFOLLOW), acts on the descriptor it opened (fstat, fchown, fchmod, read), accepts only
# a regular file or a directory, never blocks (O_NONBLOCK: a FIFO is refused, not waited
# on) and reads at most a bounded size. A symlink is followed only when it cannot be a trap:
#   - owned by root in a directory only root can write (/etc/nginx/sites-enabled/x), or
#   - owned by the same user as what it finally leads to (app's own link to app's own file:
#     nothing app could not reach itself); a link of root's in app's directory counts as app's.
#     A link owned by app that leads to root's file, another user's, a device or a FIFO is
#     refused, and so is a path with links of two users.

SAFE_READ_LIMIT = 1 << 20  # an env or config file larger than 1 MiB is not read
MAX_DIFF_LINES = 2000  # config_files longer than this are compared by size and time only
SQLITE_COPY_LIMIT = 256 << 20  # SQLite checks a private copy; a larger database is not checked
MAX_LINK_HOPS = 40  # as the kernel's ELOOP limit

_O_PATH = getattr(os, "O_PATH", 0o10000000)


def within(seconds: float, work: Callable[[], object], name: str = "selfheal-call"):
    """work() with `seconds` for the whole of it, not for each socket operation (a server
    that answers a byte at a time, a tarpit sending 220- lines forever). Still running then:
    left behind in a daemon thread, and socket.timeout is raised here. Its own exception is
    raised here as it is."""
    import threading

    outcome: Dict[str, object] = {}

    def attempt() -> None:
        try:
            outcome["answer"] = work()
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    worker = threading.Thread(target=attempt, name=name, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise socket.timeout("timed out")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("answer")


_DEADLINES: List[float] = []  # when the run under way must be done (monotonic): the watch's budget


@contextlib.contextmanager
def budget(seconds: float):
    """A total time for what runs inside (a watch run): checks that time_left() says is
    spent are not begun; what they would have done waits for the next run."""
    _DEADLINES.append(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINES.pop()


def time_left() -> Optional[float]:
    """Seconds left in the budget of the run under way (never below 0); None without one."""
    return max(0.0, _DEADLINES[-1] - time.monotonic()) if _DEADLINES else None


def is_root() -> bool:
    """The one place selfheal asks whether it runs as root (tests patch it)."""
    return os.geteuid() == 0


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return "gid %d" % gid


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown kind of file"


class SafeFile(NamedTuple):
    """What open_safely opened: the descriptor (O_RDONLY), its fstat, and the path it was
    reached by once trusted links are resolved."""
    fd: int
    st: os.stat_result
    real: str


def open_safely(path: str, what: str, want: str = "file") -> SafeFile:
    """Open `path` (key `what` of the config, for messages) as root without following a link
    the service's account could have planted. want: "file", "dir" or "any" (either).

    Raises Refused for a link not followed, a FIFO/device/socket, a second hard link of
    someone else's, a non-directory in the middle ("..", as the kernel would, goes up one
    directory already opened); OSError (FileNotFoundError...) as the kernel says. The
    caller closes .fd."""
    if not path.startswith("/"):
        raise Refused("%s %s: not an absolute path; not followed" % (what, path))
    todo = [part for part in path.split("/") if part]
    stack = [os.open("/", _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    names: List[str] = []
    link_owners = set()
    hops = 0
    try:
        while True:
            here = "/" + "/".join(names)
            if not todo:  # the path was "/" or ended in a trusted link to "/"
                name, parent = ".", stack[-1]
                break
            name = todo.pop(0)
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    names.pop()
                continue
            fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            st = os.fstat(fd)
            shown = os.path.join(here, name)
            if stat.S_ISLNK(st.st_mode):
                os.close(fd)
                parent_st = os.fstat(stack[-1])
                root_link = st.st_uid == 0 and parent_st.st_uid == 0 and not parent_st.st_mode & 0o022
                if not root_link:
                    # A link of root's in a directory of the account's (one selfheal made for
                    # `symlinks`, say) may have been moved there by the account: it counts as
                    # the directory owner's.
                    link_owners.add(st.st_uid or parent_st.st_uid)
                    if len(link_owners) > 1:
                        raise Refused("%s %s: %s is a symlink owned by %s, after a link of another user: "
                                      "not followed" % (what, path, shown, owner_name(st.st_uid or parent_st.st_uid)))
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise Refused("%s %s: more than %d symlinks: not followed" % (what, path, MAX_LINK_HOPS))
                target = os.readlink(name, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                    names = []
                todo = [part for part in target.split("/") if part] + todo
                continue
            if todo:  # a directory on the way
                if not stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    raise Refused("%s %s: %s is %s, not a directory: not followed" % (
                        what, path, shown, file_kind(st.st_mode)))
                stack.append(fd)
                names.append(name)
                continue
            os.close(fd)
            parent = stack[-1]
            break
        # The last component: check its kind on an O_PATH descriptor (opening a FIFO or a
        # device for reading could block or act), then open it for real and make sure it is
        # still the same file.
        probe_fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            st = os.fstat(probe_fd)
        finally:
            os.close(probe_fd)
        shown = "/" + "/".join(names + ([name] if name != "." else []))
        if link_owners and st.st_uid not in link_owners:
            link_owner = owner_name(next(iter(link_owners)))
            raise Refused("%s %s is a symlink owned by %s (or reached through one) that leads to %s, "
                          "owned by %s: not followed" % (what, path, link_owner, shown, owner_name(st.st_uid)))
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and st.st_uid != os.fstat(parent).st_uid:
            # Another name for it may be anyone's (with fs.protected_hardlinks=0, /etc/shadow).
            raise Refused("%s %s: %s has %d hard links and is owned by %s, not by the owner of its "
                          "directory: not read" % (what, path, shown, st.st_nlink, owner_name(st.st_uid)))
        allowed = {"file": stat.S_ISREG(st.st_mode), "dir": stat.S_ISDIR(st.st_mode),
                   "any": stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)}[want]
        if not allowed:
            expected = {"file": "a regular file", "dir": "a directory", "any": "a regular file or directory"}[want]
            raise Refused("%s %s: %s is %s, not %s: not read" % (
                what, path, shown if shown != path else "it", file_kind(st.st_mode), expected))
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
        if stat.S_ISDIR(st.st_mode):
            flags |= os.O_DIRECTORY
        fd = os.open(name, flags, dir_fd=parent)
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
            os.close(fd)
            raise Refused("%s %s: it changed while selfheal looked at it: not read" % (what, path))
        return SafeFile(fd, opened, shown)
    finally:
        for fd in stack:
            os.close(fd)


def read_safely(path: str, what: str, limit: int = SAFE_READ_LIMIT) -> Tuple[str, os.stat_result]:
    """The text of a service's file (UTF-8, undecodable bytes replaced), reached by
    open_safely; Refused when it is larger than `limit`."""
    handle = open_safely(path, what, "file")
    try:
        if handle.st.st_size > limit:
            raise Refused("%s %s: %s, larger than the %s selfheal reads: not read" % (
                what, path, format_bytes(str(handle.st.st_size)), format_bytes(str(limit))))
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(handle.fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:  # it grew while read
            raise Refused("%s %s: larger than the %s selfheal reads: not read" % (
                what, path, format_bytes(str(limit))))
        return b"".join(chunks).decode("utf-8", "replace"), handle.st
    finally:
        os.close(handle.fd)


def stat_safely(path: str, what: str, want: str = "any") -> os.stat_result:
    handle = open_safely(path, what, want)
    os.close(handle.fd)
    return handle.st


# --- commands root runs: root's alone ----------------------------------------------------

ROOT_OWNER = 0  # besides root, whose files root_only_problems trusts (the fast tests, run by a user: that user)


def root_only_problems(argv: Sequence[str]) -> List[str]:
    """Why root must not run this command, or []. Its program (found on PATH if a plain name),
    every existing file an argument names (an absolute path, alone or after "=", as in
    --config=/etc/app.conf) and every directory on the way to each must be owned by root and
    writable by no one else (by its group only when that is root's group), the rule sudo
    applies to its secure path: otherwise whoever may write there chooses what root runs. A
    sticky directory (/tmp) counts as root's for what root owns in it: only root may rename or
    remove that.
    Symlinks on the way are followed one by one; each must be root's, and so must all it leads
    through. A file that does not exist yet is judged when it does (each run checks again)."""
    argv = command_argv(argv)
    problems = []
    program = argv[0]
    if not program.startswith("/"):
        return ["%s: not found on PATH" % program]
    named = [program] + [arg.partition("=")[2] if "=" in arg and not arg.startswith("/") else arg
                         for arg in argv[1:]]
    for index, path in enumerate(named):
        if not path.startswith("/") or (index and not os.path.lexists(path)):
            continue
        problem = root_only_path_problem(path)
        if problem and problem not in problems:
            problems.append(problem)
    return problems


def root_only_path_problem(path: str, hops: int = 0) -> str:
    """root_only_problems for one absolute path: "" or why not (one line)."""
    def fault(where: str, st: os.stat_result) -> str:
        if st.st_uid not in (0, ROOT_OWNER):
            return "%s is owned by %s, not root" % (where, owner_name(st.st_uid))
        if stat.S_ISLNK(st.st_mode):
            return ""
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
            return ""  # sticky (/tmp): no one else may rename or remove what root owns in it
        if st.st_mode & stat.S_IWOTH:
            return "%s is writable by anyone (mode %04o)" % (where, stat.S_IMODE(st.st_mode))
        if st.st_mode & stat.S_IWGRP and st.st_gid not in (0, ROOT_OWNER):
            return "%s is writable by group %s (mode %04o)" % (where, group_name(st.st_gid), stat.S_IMODE(st.st_mode))
        return ""

    current = "/"
    parts = [part for part in path.split("/") if part not in ("", ".")]
    try:
        bad = fault("/", os.lstat("/"))
        if bad:
            return one_line("%s: %s" % (path, bad))
        for index, part in enumerate(parts):
            if part == "..":
                current = os.path.dirname(current)
                continue
            step = os.path.join(current, part)
            st = os.lstat(step)
            bad = fault(step, st)
            if bad:
                return one_line("%s: %s" % (path, bad))
            if stat.S_ISLNK(st.st_mode):
                if hops >= MAX_LINK_HOPS:
                    return one_line("%s: more than %d symlinks" % (path, MAX_LINK_HOPS))
                target = os.path.join(current, os.readlink(step))
                rest = "/".join(parts[index + 1:])
                return root_only_path_problem(os.path.join(target, rest) if rest else target, hops + 1)
            current = step
    except FileNotFoundError:  # not there (yet): whatever makes it there must write where only root may
        return ""
    except OSError as exc:
        return one_line("%s: %s" % (path, exc.strerror))
    return ""


# --- text from outside: what selfheal writes never carries a secret or a control character

# The user info runs to the LAST @ of the authority (a password may hold one), as urlsplit
# reads it; "https:\/\/" is how JSON logs write a URL.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*:(?:\\?/){2})[^/\\\s?#]*@")
# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the characters that
# reorder or hide text: bidi embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069,
# the marks U+200E, U+200F and U+061C) can make a line read backwards; zero-width and invisible
# ones (U+200B-U+200D, U+2060-U+2064, U+FEFF, U+180E, the soft hyphen U+00AD, the interlinear
# annotation characters U+FFF9-U+FFFB) can hide text. Tab and newline stay.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\xad\u061c\u180e\u200b-\u200f\u2028-\u202e"
                      "\u2060-\u2064\u2066-\u2069\ufeff\ufff9-\ufffb]")
# systemd quotes an environment assignment it rejects, value and all ("Ignoring invalid
# environment assignment 'STRIPE-KEY=sk_live_...': /etc/app.env", "Invalid environment
# assignment, ignoring: KEY=value"): the value goes, up to the line's last quote or its end.
_ENV_ASSIGNMENT = re.compile(r"(?i)\benvironment(?: variable)? (?:name or )?(?:assignment|entry|variable)s?\b")
QUOTED_LINE_CHARS = 500  # the most of one line from outside (journal, a checker's output) quoted anywhere
EXCERPT_CHARS = 8192  # the most of one excerpt (a journal, a checker's output) in a report


def without_credentials(text: str) -> str:
    """Every URL in `text` without its user:password@ ("http://***@host/...")."""
    return _URL_USERINFO.sub(r"\1***@", text)


def escape_controls(text: str) -> str:
    """Control characters (a terminal's escape sequences, a carriage return that hides a
    line) shown as \\xNN, as journalctl shows them; tab and newline are kept."""
    return _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256
                        else "\\u%04x" % ord(m.group()), text)


def without_env_values(text: str) -> str:
    """Each line where systemd (or anyone) quotes an environment assignment, with the value
    replaced by *** and the name kept: 'KEY=***'. A quoted word with no = is all value."""
    if "nvironment" not in text and "NVIRONMENT" not in text:
        return text
    out = []
    for line in text.split("\n"):
        found = _ENV_ASSIGNMENT.search(line)
        if found:
            head, rest = line[:found.end()], line[found.end():]
            name, equals, value = rest.partition("=")
            last_quote = max(value.rfind("'"), value.rfind('"'))
            if equals:
                line = head + name + "=***" + (value[last_quote:] if last_quote >= 0 else "")
            else:  # no name to keep: the quoted word, or what follows the colon
                first = min((i for i in (rest.find("'"), rest.find('"')) if i >= 0), default=-1)
                end = max(rest.rfind("'"), rest.rfind('"'))
                if 0 <= first < end:
                    line = head + rest[:first + 1] + "***" + rest[end:]
                elif rest.strip(" :,"):
                    line = head + rest[:len(rest) - len(rest.lstrip(" :,"))] + "***"
        out.append(line)
    return "\n".join(out)


def bounded(text: str, limit: int = QUOTED_LINE_CHARS) -> str:
    """At most `limit` characters of text from outside, saying how much was left out."""
    if len(text) <= limit:
        return text
    return "%s... [%d more characters not shown]" % (text[:limit], len(text) - limit)


def bounded_lines(lines: Iterable[str], line_limit: int = QUOTED_LINE_CHARS,
                  total: int = EXCERPT_CHARS) -> List[str]:
    """An excerpt: each line bounded, and the last lines that fit in `total` characters
    (the end of a journal says most), with a line that says how many were left out."""
    kept: List[str] = []
    size = 0
    lines = [bounded(line, line_limit) for line in lines]
    for line in reversed(lines):
        if size + len(line) + 1 > total:
            break
        kept.append(line)
        size += len(line) + 1
    kept.reverse()
    if len(kept) < len(lines):
        kept.insert(0, "[%d earlier lines not shown: the excerpt is bounded at %d characters]"
                    % (len(lines) - len(kept), total))
    return kept


def one_line(text: str) -> str:
    """clean(), and newlines and tabs escaped too: for a value that is one line of a report
    (a path, a refusal, a verdict), so a name planted with a newline cannot start a section."""
    return clean(text).replace("\n", "\\n").replace("\t", "\\t")


def clean(text: str) -> str:
    """Text from outside (journal, health replies, process names, config diffs, findings)
    made fit for a mail, a webhook, a file or a terminal: no URL credentials, no controls."""
    return escape_controls(without_env_values(without_credentials(str(text))))


def clean_data(value):
    """clean() applied to every string in a JSON-able value (history lines, state files)."""
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, dict):
        return {clean_data(k): clean_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_data(v) for v in value]
    return value


def display_url(url: str) -> str:
    """A URL as selfheal shows it anywhere: without user:password@."""
    return without_credentials(url)


# =============================================================================
# Config
# =============================================================================

GLOBAL_SECTION = "selfheal"
DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
UNIT_RE = re.compile(r"^[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.@\\-]+)?\.service$")
HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$")
ADDR_RE = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
IDENT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,48}$")
SMTP_SECURITY = ("none", "starttls", "ssl")
NOTIFY = ("always", "on-failure", "never")
ON_STOPPED = ("heal", "report", "ignore")
PORT_OWNERS = ("unit", "any")
WEBHOOK_FORMATS = ("json", "slack", "ntfy")
MAX_WEBHOOK_TIMEOUT = 60.0  # a notification must never hold up healing for long
MIN_WATCH_INTERVAL = 5.0


def parse_duration(text: str) -> float:
    """'90', '90s', '5m', '1h', '2d', '1h30m' -> seconds. Raises ValueError."""
    text = text.strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError("not a duration (use e.g. 30s, 5m, 1h, 2d)")
    total = 0.0
    for number, unit in parts:
        if unit not in DURATION_UNITS:
            raise ValueError("unknown unit %r (use s, m, h, d or w)" % unit)
        total += float(number) * DURATION_UNITS[unit]
    return total


def format_duration(seconds: float) -> str:
    if seconds < 10:
        return "%d s" % seconds if seconds == int(seconds) else "%.2f s" % seconds
    if seconds < 120:
        return "%.0f s" % seconds
    minutes = seconds / 60
    if minutes < 120:
        return "%.0f min" % minutes
    hours = minutes / 60
    return "%.0f h" % hours if hours < 48 else "%.0f d" % (hours / 24)


def split_list(text: str) -> List[str]:
    return [item for item in re.split(r"[,\s]+", text.strip()) if item]


def short_hostname() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def _scan_lines(text: str):
    """Yield (lineno, section, key) for every section header and key line, in file order.

    configparser parses the values; this only finds where things are, so every problem can
    be reported with its line, duplicates included (configparser stops at the first one).
    """
    section = None
    for lineno, line in enumerate(text.split("\n"), 1):  # as configparser counts lines
        stripped = line.strip()
        if not stripped or stripped[0] in "#;" or line[0] in " \t":
            continue  # blank, comment or continuation
        match = re.match(r"^\[(.*)\]\s*$", stripped)
        if match:
            section = match.group(1)
            yield lineno, section, None
            continue
        key = re.split(r"[=:]", stripped, maxsplit=1)[0].strip().lower()
        yield lineno, section, key


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return " (did you mean %r?)" % close[0] if close else ""


# Value checkers: return the converted value or raise ValueError with the reason.

HEADER_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")  # controls, and what str.splitlines splits at


def check_header_text(value: str) -> str:
    if not value or len(value) > 78 or HEADER_BREAKS.search(value):
        raise ValueError("must be 1-78 printable characters on one line")
    return value


def check_address(value: str) -> str:
    if not ADDR_RE.match(value):
        raise ValueError("not a mail address (user@host)")
    return value


def check_addresses(value: str) -> Tuple[str, ...]:
    addresses = tuple(a.strip() for a in value.split(",") if a.strip())
    if not addresses:
        raise ValueError("needs at least one mail address")
    for address in addresses:
        if not ADDR_RE.match(address):
            raise ValueError("%r is not a mail address (user@host)" % address)
    return addresses


def check_host(value: str) -> str:
    if not HOST_RE.match(value):
        raise ValueError("not a host name")
    return value


def check_port(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError("not a port number (1-65535)")
    return int(value)


def positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise ValueError("not a whole number of 1 or more")
    return int(value)


def positive_duration(value: str) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than zero")
    return seconds


def check_watch_interval(value: str) -> float:
    seconds = parse_duration(value)
    if seconds < MIN_WATCH_INTERVAL or seconds != int(seconds):
        raise ValueError("must be whole seconds, %d s or more" % MIN_WATCH_INTERVAL)
    return seconds


def check_webhook_timeout(value: str) -> float:
    seconds = positive_duration(value)
    if seconds > MAX_WEBHOOK_TIMEOUT:
        raise ValueError("must be %d s or less (a notification must not hold up healing)" % MAX_WEBHOOK_TIMEOUT)
    return seconds


def check_failure_threshold(value: str) -> int:
    number = positive_int(value)
    if number > SUMMARY_ATTEMPTS:
        raise ValueError("must be %d or less (the heals a service's summary keeps)" % SUMMARY_ATTEMPTS)
    return number


def check_retry_interval(value: str) -> float:
    seconds = parse_duration(value)
    if seconds and not MIN_WATCH_INTERVAL <= seconds <= MAX_RETRY_INTERVAL:
        raise ValueError("must be 0 (no retries) or from %d s to %s" % (MIN_WATCH_INTERVAL, format_duration(MAX_RETRY_INTERVAL)))
    return seconds


def check_names(value: str) -> Tuple[str, ...]:
    names = tuple(split_list(value))
    bad = [n for n in names if not NAME_RE.match(n)]
    if not names or bad:
        raise ValueError("list service names (sections of this file)%s" % (
            ": not %s" % ", ".join(map(repr, bad)) if bad else ""))
    if len(set(names)) != len(names):
        raise ValueError("a service is listed twice")
    return names


def check_metrics_file(value: str) -> str:
    if value and (not value.endswith(".prom") or check_abs_path(value) != value):
        raise ValueError("must be an absolute path ending in .prom (node_exporter's textfile collector), or empty")
    return value


def check_flap_threshold(value: str) -> int:
    number = positive_int(value)
    if number < 2:
        raise ValueError("must be 2 or more (one failure is not flapping)")
    return number


def check_statuses(value: str) -> Tuple[int, ...]:
    codes = split_list(value)
    if not codes or not all(c.isdigit() and 100 <= int(c) <= 599 for c in codes):
        raise ValueError("list HTTP status codes, e.g. 200 or 200, 204")
    return tuple(int(c) for c in codes)


def check_expect_text(value: str) -> str:
    if not value or len(value) > 200 or any(ord(c) < 32 for c in value):
        raise ValueError("must be 1-200 printable characters")
    return value


def check_command(value: str) -> Tuple[str, ...]:
    """An argument list, split like a shell would but never run by one. The program is an
    absolute path or a plain name looked up on PATH when it runs."""
    import shlex

    if any(ord(c) < 32 for c in value):
        raise ValueError("must be one line without control characters")
    try:
        argv = tuple(shlex.split(value))
    except ValueError as exc:
        raise ValueError("cannot split into arguments (%s)" % exc)
    if not argv:
        raise ValueError("needs a command, e.g. /usr/sbin/nginx -t")
    if not (argv[0].startswith("/") or re.match(r"^[A-Za-z0-9._+-]+$", argv[0])):
        raise ValueError("the program must be an absolute path or a plain command name")
    return argv


def check_paths(value: str) -> Tuple[str, ...]:
    paths = tuple(p.strip() for p in value.split(",") if p.strip())
    if not paths:
        raise ValueError("list at least one absolute path")
    for path in paths:
        check_abs_path(path)
    return paths


def check_env_names(value: str) -> Tuple[str, ...]:
    names = tuple(split_list(value))
    bad = [n for n in names if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", n)]
    if not names or bad:
        raise ValueError("list variable names like DATABASE_URL%s" % (": not %s" % ", ".join(map(repr, bad)) if bad else ""))
    return names


def check_owner(value: str) -> str:
    if not re.match(r"^[a-z_][a-z0-9_.-]*(:[a-z_][a-z0-9_.-]*)?$", value, re.I):
        raise ValueError("must be user or user:group")
    return value


def check_mode(value: str) -> int:
    if not re.match(r"^0?[0-7]{3,4}$", value):
        raise ValueError("must be an octal mode like 0640")
    return int(value, 8)


def check_symlinks(value: str) -> Tuple[Tuple[str, str], ...]:
    pairs = []
    for item in (i.strip() for i in value.split(",") if i.strip()):
        link, arrow, target = item.partition("->")
        if not arrow:
            raise ValueError("write each as /path/link -> /path/target, separated by commas")
        pairs.append((check_abs_path(link.strip()), check_abs_path(target.strip())))
    if not pairs:
        raise ValueError("list at least one /path/link -> /path/target")
    return tuple(pairs)


def check_bool(value: str) -> bool:
    states = configparser.ConfigParser.BOOLEAN_STATES
    if value.lower() not in states:
        raise ValueError("not yes or no")
    return states[value.lower()]


def check_abs_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() or ord(c) < 32 for c in value) or "/../" in value + "/":
        raise ValueError("must be an absolute path without spaces or ..")
    return value


def check_ident(value: str) -> str:
    if not IDENT_RE.match(value):
        raise ValueError("use 1-48 of A-Z a-z 0-9 _ . -")
    return value


def check_unit(value: str) -> str:
    if re.search(r"@\.service$", value):
        raise ValueError("a template needs an instance (app@blue.service, not app@.service)")
    if not UNIT_RE.match(value) or ".." in value or len(value) > 255:
        raise ValueError("not a service unit name like app.service or app@blue.service")
    if never_touch(value):
        raise ValueError("selfheal never touches %s (systemd's own, dbus, ssh and its own units)" % value)
    return value


def check_url(value: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("must be an http:// or https:// URL")
    if any(c.isspace() or ord(c) < 32 for c in value):
        raise ValueError("must not contain spaces or control characters")
    if not value.isascii():
        raise ValueError("must be ASCII (write an international name in its xn-- form, %-escape the rest)")
    try:
        parsed.port  # noqa: B018 - raises for a port that is not a number in 0-65535
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    return value


def check_start_grace(value: str) -> float:
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError("must be 0 or more")
    return seconds


def check_heal_timeout(value: str) -> float:
    seconds = positive_duration(value)
    if seconds > MAX_HEAL_SECONDS:
        raise ValueError("at most %s: selfheal@.service stops a heal at 10 min (TimeoutStartSec=), and "
                         "the report needs time after it" % format_duration(MAX_HEAL_SECONDS))
    return seconds


def check_strategies(value: str) -> Tuple[str, ...]:
    names = split_list(value)
    if not names:
        raise ValueError("list at least one strategy")
    for name in names:
        if name not in STRATEGIES:
            raise ValueError("unknown strategy %r%s (available: %s)"
                             % (name, _did_you_mean(name, STRATEGIES), ", ".join(STRATEGIES)))
    if len(set(names)) != len(names):
        raise ValueError("a strategy is listed twice")
    return tuple(names)


def choice(options: Sequence[str]) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value.lower() not in options:
            raise ValueError("must be one of %s" % " | ".join(options))
        return value.lower()
    return check


# -- Maintenance windows: a systemd calendar event and a duration -------------------------
# `maintenance = Sun *-*-* 03:00 1h; Mon..Fri 22:00 UTC 30m`. Calendar events follow
# systemd.time(7) and elapse where systemd-analyze calendar says they do (tested against
# systemd 247, 252 and 257), computed here so that no check waits for a subprocess.

CAL_MAX_YEAR = 2199  # systemd gives up there too; "never elapses again" means None
MAX_WINDOW = 7 * 86400
_EPOCH_DAY = dt.date(1970, 1, 1).toordinal()
_WEEKDAYS = {n: i for i, day in enumerate(("monday", "tuesday", "wednesday", "thursday",
                                           "friday", "saturday", "sunday"))
             for n in (day, day[:3])}
_WD = "(" + "|".join(sorted(_WEEKDAYS, key=len, reverse=True)) + ")"
_WD_LIST = re.compile(r"%s((\.\.|-)%s)?(,%s((\.\.|-)%s)?)*,?" % ((_WD,) * 4), re.I)
_SHORTHANDS = {"minutely": "*-*-* *:*:00", "hourly": "*-*-* *:00:00", "daily": "*-*-* 00:00:00",
               "weekly": "Mon *-*-* 00:00:00", "monthly": "*-*-01 00:00:00",
               "quarterly": "*-01,04,07,10-01 00:00:00"}
_SHORTHANDS.update(dict.fromkeys(("yearly", "annually", "anually"), "*-01-01 00:00:00"))
_SHORTHANDS.update(dict.fromkeys(("semiannually", "semi-annually", "biannually", "bi-annually"),
                                 "*-01,07-01 00:00:00"))
Chain = Tuple[Tuple[int, int, int], ...]  # (start, stop or -1, repeat or 0), as systemd keeps them


def _expand(chain: Chain, hi: int) -> Tuple[int, ...]:
    """The values a chain matches, up to hi."""
    vals = set()
    for a, b, r in chain:
        vals.update(range(a, (b if b >= 0 else hi) + 1, r) if r else (a,))
    return tuple(sorted(v for v in vals if v <= hi))


@dataclasses.dataclass(frozen=True)
class CalendarSpec:
    """A parsed calendar event; None in a field means any value."""
    text: str
    utc: bool
    weekdays: Optional[frozenset]  # 0 = Monday
    years: Optional[frozenset]
    months: Optional[frozenset]
    days: Optional[Chain]          # counted from the month's end when end_of_month ('~')
    end_of_month: bool
    hours: Tuple[int, ...]
    minutes: Tuple[int, ...]
    seconds: Tuple[int, ...]

    def _month_days(self, y: int, m: int) -> Tuple[int, ...]:
        n = (dt.date(y + m // 12, m % 12 + 1, 1) - dt.date(y, m, 1)).days
        if self.days is None:
            days = range(1, n + 1)
        elif self.end_of_month:  # ~1 is the last day; ~7..1 style ranges run forward in time
            days = _expand(tuple((n + 1 - a, -1, r) if b < 0 else (n + 1 - b, n + 1 - a, r)
                                 for a, b, r in self.days), n)
        else:
            days = _expand(self.days, n)
        return tuple(d for d in days if self.weekdays is None
                     or dt.date(y, m, d).weekday() in self.weekdays)

    def _walk(self, naive: int, step: int, low_year: int = 1970):
        """Matching wall-clock times (seconds on a naive time line), from naive on, in
        direction step, skipping whole years, months and days that cannot match."""
        day, sec = divmod(naive, 86400)
        start = dt.date.fromordinal(_EPOCH_DAY + day)
        hms = (sec // 3600, sec // 60 % 60, sec % 60)
        fwd = step > 0
        for y in range(start.year, CAL_MAX_YEAR + 1 if fwd else low_year - 1, step):
            if self.years is not None and y not in self.years:
                continue
            first_month = start.month if y == start.year else 1 if fwd else 12
            for m in range(first_month, 13 if fwd else 0, step):
                if self.months is not None and m not in self.months:
                    continue
                this_month = (y, m) == (start.year, start.month)
                for d in self._month_days(y, m)[::step]:
                    if this_month and (d - start.day) * step < 0:
                        continue
                    first = this_month and d == start.day
                    base = (dt.date(y, m, d).toordinal() - _EPOCH_DAY) * 86400
                    for h in self.hours[::step]:
                        if first and (h - hms[0]) * step < 0:
                            continue
                        same_h = first and h == hms[0]
                        for mi in self.minutes[::step]:
                            if same_h and (mi - hms[1]) * step < 0:
                                continue
                            same_m = same_h and mi == hms[1]
                            for s in self.seconds[::step]:
                                if not same_m or (s - hms[2]) * step >= 0:
                                    yield base + h * 3600 + mi * 60 + s

    def _offset(self, ts: int) -> int:
        return 0 if self.utc else time.localtime(ts).tm_gmtoff

    def _times(self, naive: int) -> List[int]:
        """The UNIX times of a wall-clock time, earliest first: none when a DST change skips
        it, two when one repeats it. Decided from the zone's offsets alone: mktime() would
        pick by the offset the process last converted with."""
        if self.utc:
            return [naive]
        offsets = {time.localtime(naive + shift).tm_gmtoff for shift in (-86400, -43200, 0, 43200, 86400)}
        return sorted(naive - offset for offset in offsets if time.localtime(naive - offset).tm_gmtoff == offset)

    def next_elapse(self, after: float) -> Optional[float]:
        """The first matching time strictly after `after`, as systemd computes it
        (systemd-analyze calendar --base-time, 247, 252 and 257): a wall-clock time that the
        end of summer time repeats is its first occurrence, or its second when `after` is
        already past the first (the base's own offset then decides, as it does for systemd)."""
        start = int(after // 1) + 1
        for naive in self._walk(start + self._offset(start), 1):
            for ts in self._times(naive):
                if ts > after:
                    return float(ts)
        return None

    def last_elapse(self, at: float, within: float) -> Optional[float]:
        """The latest matching time t with at - within < t <= at, or None: when a running
        timer fires, so a repeated wall-clock time counts at its first occurrence only (a
        timer that fired there computes its next elapse from there, past the repeat)."""
        hi, lo = int(at // 1), int((at - within) // 1)
        # Across a DST change the wall clock repeats or skips an hour: walk the wall-clock
        # span of both offsets, and keep what maps into the interval.
        offsets = (self._offset(lo), self._offset(hi))
        low = lo + min(offsets)
        for naive in self._walk(hi + max(offsets), -1,
                                dt.date.fromordinal(_EPOCH_DAY + low // 86400).year):
            if naive < low:
                return None
            times = self._times(naive)
            if times and at - within < times[0] <= at:
                return float(times[0])
        return None


def _chain(text: str, name: str, lo: int, hi: int, end_of_month: bool = False) -> Optional[Chain]:
    """One date or time field ('*', 5, 1,15, 1..5, 0/15, 1..20/2), checked as systemd checks it."""
    if text == "*":
        return None
    if end_of_month:
        hi -= 3  # systemd: at most 28 days before the month's end
    tilde = "~" if end_of_month else ""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\.\.(\d+))?(?:/(\d+))?", item)
        if not m:
            if name == "second" and re.search(r"\d\.\d", item) and ".." not in item:
                raise ValueError("fractional seconds (%s) are not supported" % item)
            raise ValueError("invalid %s %r (use e.g. 5, 1,15, 8..18, 0/15)" % (name, item or text))
        a, b = int(m[1]), int(m[2] or -1)
        r = int(m[3] or (1 if m[2] else 0))
        if m[3] and r == 0:
            raise ValueError("%s repetition %s must not be /0" % (name, item))
        if name == "year" and (a < 100 or 0 <= b < 100):
            raise ValueError("two-digit year %s is not supported; write the full year" % item)
        if name == "second" and m[2] and not m[3] and a >= b:  # systemd refuses these too
            raise ValueError("second range %s is empty" % item)
        if b > a and r:  # systemd's normalization: a range ends on a repetition
            b -= (b - a) % r
        if b == a:
            b, r = -1, 0
        for v in (a, b) if b >= 0 else (a,):
            if not lo <= v <= hi:
                raise ValueError("%s %s%d is out of range (%s%d-%s%d)" % (name, tilde, v, tilde, lo, tilde, hi))
        if r > hi - lo or (b < 0 and (a - r < lo if end_of_month else a + r > hi)):
            raise ValueError("%s repetition %s%s does not fit in %d-%d" % (name, tilde, item, lo, hi))
        if b >= 0 and a + r > b:
            raise ValueError("%s range %s%s runs backwards" % (name, tilde, item))
        out.append((a, b, r))
    return tuple(out)


def parse_calendar(text: str) -> CalendarSpec:
    """Parse a systemd calendar event ('Sun *-*-* 03:00', 'Mon..Fri 22:00 UTC', 'daily').
    Refused on purpose, though systemd takes them: time zones other than UTC (the local zone's
    own name too: systemd's reading of CET in summer differs), fractional seconds, two-digit
    years, @timestamps."""
    tokens = text.split()
    if not tokens:
        raise ValueError("empty calendar expression")
    last = tokens[-1].upper()
    utc = len(tokens) > 1 and last == "UTC"
    if utc:
        tokens.pop()
    elif len(tokens) > 1 and last[0].isalpha() and not _WD_LIST.fullmatch(last):
        raise ValueError("time zone %r is not supported; use local time or UTC" % tokens[-1])
    head = tokens[0].lower()
    if head in _SHORTHANDS:
        if len(tokens) > 1:
            raise ValueError("%r stands alone (UTC may follow)" % tokens[0])
        return dataclasses.replace(parse_calendar(_SHORTHANDS[head]), text=text.strip(), utc=utc)
    if head in ("now", "today", "yesterday", "tomorrow", "epoch") or head[0] in "@+-":
        raise ValueError("%r is a time stamp, not a calendar event" % tokens[0])
    weekdays = None
    if head[0].isalpha():
        if not _WD_LIST.fullmatch(head):
            raise ValueError("unknown weekday in %r (use e.g. Mon, Mon..Fri, Sat,Sun)" % tokens[0])
        days = set()
        for item in head.rstrip(",").split(","):
            ends = re.split(r"\.\.|-", item)
            a, b = _WEEKDAYS[ends[0]], _WEEKDAYS[ends[-1]]
            if a > b:
                raise ValueError("weekday range %s runs backwards" % item)
            days.update(range(a, b + 1))
        weekdays = frozenset(days) if len(days) < 7 else None  # all seven: no condition
        tokens.pop(0)
    if len(tokens) > 2:
        raise ValueError("unexpected %r (the form is [WEEKDAYS] [DATE] [TIME] [UTC])" % " ".join(tokens[2:]))
    date, clock = "*-*-*", "00:00:00"
    if len(tokens) == 2:
        date, clock = tokens
    elif tokens and ":" in re.split(r"[-~]", tokens[0])[0]:  # systemd: a ':' first means a time
        clock = tokens[0]
    elif tokens:
        date = tokens[0]
    parts = re.split(r"([-~])", date)
    if len(parts) == 3:
        parts = ["*", "-"] + parts
    if len(parts) != 5 or parts[1] == "~":
        raise ValueError("%r is not a date (YYYY-MM-DD or MM-DD, '~' before the day)" % date)
    hms = clock.split(":")
    if len(hms) not in (2, 3):
        raise ValueError("%r is not a time (HH:MM or HH:MM:SS)" % clock)
    hms += ["00"] * (3 - len(hms))
    end_of_month = parts[3] == "~"
    years, months = _chain(parts[0], "year", 1970, CAL_MAX_YEAR), _chain(parts[2], "month", 1, 12)
    days_chain = _chain(parts[4], "day", 1, 31, end_of_month)
    hours, minutes, seconds = (_chain(p, name, 0, hi) or ((0, hi, 1),) for p, name, hi in
                               zip(hms, ("hour", "minute", "second"), (23, 59, 59)))
    return CalendarSpec(
        text=text.strip(), utc=utc, weekdays=weekdays,
        years=None if years is None else frozenset(_expand(years, CAL_MAX_YEAR)),
        months=None if months is None else frozenset(_expand(months, 12)),
        days=days_chain, end_of_month=end_of_month and days_chain is not None,
        hours=_expand(hours, 23), minutes=_expand(minutes, 59), seconds=_expand(seconds, 59))


class Window(NamedTuple):
    spec: CalendarSpec
    seconds: float
    text: str


def parse_maintenance(value: str) -> Tuple[Window, ...]:
    """'Sun *-*-* 03:00 1h; Mon..Fri 22:00 UTC 30m' (';' or new lines between windows)."""
    windows = []
    for text in (w.strip() for w in re.split(r"[;\n]", value)):
        if not text:
            continue
        try:
            event, duration = (text.rsplit(None, 1) + [""])[:2]
            if not duration:
                raise ValueError("expected '<calendar event> <duration>', e.g. 'Sun *-*-* 03:00 1h'")
            try:
                seconds = parse_duration(duration)
            except ValueError as e:
                raise ValueError("it must end in a duration, not %r (%s), e.g. 'Sun *-*-* 03:00 1h'"
                                 % (duration, e)) from None
            if not 0 < seconds <= MAX_WINDOW:
                raise ValueError("duration %s must be more than 0 and at most 7d" % duration)
            windows.append(Window(parse_calendar(event), seconds, text))
        except ValueError as e:
            raise ValueError("maintenance window %r: %s" % (text, e)) from None
    return tuple(windows)


def maintenance_end(windows: Sequence[Window], now: float) -> Optional[float]:
    """When the maintenance window open at `now` ends (the latest, if several); None if none is."""
    ends = [start + w.seconds for w in windows
            if (start := w.spec.last_elapse(now, w.seconds)) is not None]
    return max(ends, default=None)


# -- The key table: every services.conf key, declared once -------------------------------
# A key is a field of Settings ([selfheal]) or Service (one per service section), declared
# with key(): its default, the checker that turns its text into a value (or says why it
# cannot, raising ValueError) and one line of documentation. parse_config, the defaults,
# its problem messages and `selfheal validate --help` all read it from here.


def key(default, parse: Callable[[str], object], doc: str, derived: str = ""):
    """One services.conf key. derived: how a default made at parse time is said (the host's name)."""
    return dataclasses.field(default=default, metadata={"parse": parse, "doc": doc, "derived": derived})


@dataclasses.dataclass(frozen=True)
class Settings:
    """The [selfheal] section."""

    name: str = key("localhost", check_header_text, "prefix of every subject", derived="the short host name")
    email_to: Tuple[str, ...] = key(("root@localhost",), check_addresses, "comma-separated recipients")
    email_from: str = key("selfheal@localhost", check_address, "sender", derived="selfheal@<host>")
    smtp_host: str = key("localhost", check_host, "mail server")
    smtp_port: int = key(25, check_port, "its port")
    smtp_security: str = key("none", choice(SMTP_SECURITY), "none, starttls or ssl")
    smtp_user: str = key("", check_header_text, "login (needs smtp_password_file)")
    smtp_password_file: str = key("", check_abs_path, "the login's password: root's, mode 0600 or 0400")
    smtp_timeout: float = key(10.0, positive_duration, "one SMTP session in all; then the report is queued")
    failure_threshold: int = key(3, check_failure_threshold, "heals per failure_window before escalating (at most 256); then healed at growing intervals")
    failure_window: float = key(3600.0, positive_duration, "the window of failure_threshold")
    verify_timeout: float = key(30.0, positive_duration, "how long a repaired service has to become healthy")
    heal_timeout: float = key(300.0, check_heal_timeout, "the whole heal, all strategies and their checks (at most 8min)")
    syslog_ident: str = key("miraclemax-self-heal", check_ident, "journal identifier")
    watch_interval: float = key(30.0, check_watch_interval, "how often the watch looks (5s or more); a run's budget")
    watch_confirm: int = key(2, positive_int, "failed looks in a row before the watch acts")
    flap_threshold: int = key(3, check_flap_threshold, "failures within flap_window that make an incident FLAPPING")
    flap_window: float = key(900.0, positive_duration, "the window of flap_threshold")
    reminder_interval: float = key(86400.0, positive_duration, "re-send an unresolved FAILED/ESCALATED/STOPPED")
    incident_quiet: float = key(600.0, positive_duration, "healthy this long: the incident (mail thread) is over")
    notify: str = key("always", choice(NOTIFY), "always, on-failure or never (mail and webhook alike)")
    heartbeat_url: str = key("", check_url, "GET after every watch run that checked every service (dead-man's switch)")
    webhook_url: str = key("", check_url, "every report is also POSTed here, queued like mail")
    webhook_format: str = key("json", choice(WEBHOOK_FORMATS), "json, slack or ntfy")
    webhook_timeout: float = key(5.0, check_webhook_timeout, "for webhook_url and heartbeat_url (60s at most)")
    metrics_file: str = key(METRICS_FILE, check_metrics_file, "Prometheus metrics after every heal and watch run "
                            "(node_exporter's textfile collector); empty: none")
    retry_interval: float = key(300.0, check_retry_interval, "the watch heals a FAILED service again after this, "
                                "then twice as long each time up to 1h; 0: never")
    escalate_to: Tuple[str, ...] = key((), check_addresses, "second contact: a FAILED/ESCALATED incident open "
                                       "escalate_after is mailed here too, once")
    escalate_after: float = key(1800.0, positive_duration, "how long an incident stays FAILED/ESCALATED before "
                                "escalate_to hears of it")
    maintenance: Tuple[Window, ...] = key((), parse_maintenance, "windows (systemd calendar event and a duration, "
                                          "; between): nothing healed or mailed")


@dataclasses.dataclass(frozen=True)
class Service:
    """One service section; its name is the section's."""

    name: str = ""
    unit: str = key("", check_unit, "the systemd unit", derived="<name>.service")
    port: Optional[int] = key(None, check_port, "TCP port it listens on, checked after a repair")
    domain: str = key("", check_host, "the public name it serves, shown in reports")
    critical: bool = key(False, check_bool, "yes or no: shown as the report's priority")
    strategies: Tuple[str, ...] = key(("service_restart",), check_strategies, "repairs to try, in order")
    health_url: str = key("", check_url, "http(s) URL that must answer 2xx/3xx after a repair and at each look")
    health_command: Tuple[str, ...] = key((), check_command, "instead of health_url: an argument list; healthy: exit 0")
    health_run_as: str = key("service", choice(HEALTH_RUN_AS), "service (its User=/Group=; nobody for root or "
                             "DynamicUser=) or root: who runs health_command")
    health_timeout: float = key(5.0, positive_duration, "one health_url request or health_command in all")
    health_expect_status: Tuple[int, ...] = key((), check_statuses, "the status(es) that count as healthy (default 2xx/3xx)")
    health_expect_text: str = key("", check_expect_text, "text that must appear in the answer (or the command's output)")
    on_stopped: str = key("heal", choice(ON_STOPPED), "heal, report or ignore: when the watch finds it stopped")
    port_owner: str = key("unit", choice(PORT_OWNERS), "unit, or any when another unit's process serves the port")
    notify: str = key("", choice(NOTIFY), "always, on-failure or never", derived="the global notify")
    config_check: Tuple[str, ...] = key((), check_command, "config_validation: the checker, as an argument list")
    config_files: Tuple[str, ...] = key((), check_paths, "config_validation: shown when changed since a healthy start")
    env_file: Tuple[str, ...] = key((), check_paths, "environment_check: besides the unit's EnvironmentFile=")
    required_env: Tuple[str, ...] = key((), check_env_names, "environment_check: names that must be set, non-empty")
    db_path: str = key("", check_abs_path, "database_check: its database file or data directory")
    db_owner: str = key("", check_owner, "database_check: user or user:group (default: the unit's User=)")
    db_mode: Optional[int] = key(None, check_mode, "database_check: its mode, e.g. 0640")
    symlinks: Tuple[Tuple[str, str], ...] = key((), check_symlinks, "database_check: /path/link -> /path/target, ...")
    maintenance: Tuple[Window, ...] = key((), parse_maintenance, "its own windows, besides the global ones")
    depends_on: Tuple[str, ...] = key((), check_names, "services it needs: healed first; one report for the chain")
    start_grace: float = key(0.0, check_start_grace, "a run younger than this is starting, not hung (at least verify_timeout)",
                             derived="verify_timeout")


GLOBAL_KEYS = {f.name: f for f in dataclasses.fields(Settings) if "parse" in f.metadata}
SERVICE_KEYS = {f.name: f for f in dataclasses.fields(Service) if "parse" in f.metadata}


def keys_help() -> str:
    """The key table as text, for `selfheal validate --help`."""
    def shown(field) -> str:
        value = field.default
        if field.metadata["derived"]:
            return field.metadata["derived"]
        if value in ("", (), None):
            return "(none)"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):  # a duration, as one would write it
            for unit, size in (("h", 3600), ("min", 60)):
                if value >= size and value % size == 0:
                    return "%d%s" % (value // size, unit)
            return "%gs" % value
        return ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)

    lines = []
    for title, keys in (("[selfheal]", GLOBAL_KEYS), ("[SERVICE] (one section per service)", SERVICE_KEYS)):
        lines += ["", "services.conf %s:" % title]
        lines += ["  %-20s %-22s %s" % (name, shown(f), f.metadata["doc"]) for name, f in keys.items()]
    return "\n".join(lines[1:])


def parse_config(text: str, path: str = CONFIG_PATH, hostname: Optional[str] = None,
                 check_files: bool = False) -> Config:
    """Parse and validate services.conf text. Raises ConfigError listing every problem.

    check_files: also check the files it names on this host (the SMTP password file)."""
    problems: List[Tuple[int, str]] = []  # (line, message), reported in line order
    lines: Dict[Tuple[Optional[str], Optional[str]], int] = {}

    def problem(lineno, section, key, message):
        where = "%s:%s" % (path, lineno if lineno else "-")
        if section is not None:
            where += " [%s]" % section
        if key:
            where += " %s" % key
        problems.append((lineno or 0, "%s: %s" % (where, message)))

    for lineno, section, key in _scan_lines(text):
        if (section, key) in lines:
            what = "duplicate section" if key is None else "duplicate key"
            problem(lineno, section, key, "%s (first at line %d)" % (what, lines[(section, key)]))
            if key is not None:
                lines[(section, key)] = lineno  # configparser keeps the last value: point at it
        else:
            lines[(section, key)] = lineno

    # A line configparser cannot read is reported and blanked, and the rest is read and
    # checked too: every problem in one pass.
    source = text.split("\n")
    for _attempt in range(len(source) + 1):
        parser = configparser.ConfigParser(interpolation=None, strict=False, default_section="\0none")
        try:
            parser.read_string("\n".join(source), source=path)
            break
        except configparser.MissingSectionHeaderError as exc:
            problem(exc.lineno, None, None, "text before the first [section] header")
            source[exc.lineno - 1] = ""
        except configparser.ParsingError as exc:
            for lineno, _ in exc.errors:
                problem(lineno, None, None, "cannot parse %r (expected key = value)" % source[lineno - 1].strip())
                source[lineno - 1] = ""

    def line_of(section, key=None):
        return lines.get((section, key)) or lines.get((section, None))

    hostname = hostname or short_hostname()
    try:
        default_name = check_header_text(hostname)
    except ValueError:
        default_name = "localhost"  # a host name that cannot go into a mail header as it is
    raw_global = dict(parser.items(GLOBAL_SECTION)) if parser.has_section(GLOBAL_SECTION) else {}
    if not parser.has_section(GLOBAL_SECTION):
        problem(None, None, None, "no [selfheal] section (it says where reports are mailed)")

    def take(section, values, key, convert, default):
        """Convert one value, recording a problem (and returning the default) when it is bad."""
        if key not in values:
            return default
        raw = values[key].strip()
        try:
            return convert(raw)
        except ValueError as exc:
            message = str(exc) if repr(raw) in str(exc) else "%s: %r" % (exc, raw)
            problem(line_of(section, key), section, key, message)
            return default

    for key in raw_global:
        if key not in GLOBAL_KEYS:
            problem(line_of(GLOBAL_SECTION, key), GLOBAL_SECTION, key,
                    "unknown key" + _did_you_mean(key, GLOBAL_KEYS))
    g = raw_global
    s = GLOBAL_SECTION

    def read_keys(section: str, values: Dict[str, str], keys, defaults: Dict[str, object]) -> Dict[str, object]:
        """Every key of the table for this section: its value, or its default."""
        return {name: take(section, values, name, field.metadata["parse"], defaults.get(name, field.default))
                for name, field in keys.items()}

    settings = Settings(**read_keys(s, g, GLOBAL_KEYS, {  # type: ignore[arg-type]
        "name": default_name,
        "email_from": "selfheal@%s" % hostname if HOST_RE.match(hostname) else "selfheal@localhost"}))
    if settings.heal_timeout < settings.verify_timeout + HEAL_RESERVE:
        key = "heal_timeout" if "heal_timeout" in g else "verify_timeout"
        problem(line_of(s, key), s, key, "heal_timeout (%s) must be at least verify_timeout (%s) + %s"
                % (format_duration(settings.heal_timeout), format_duration(settings.verify_timeout),
                   format_duration(HEAL_RESERVE)))
    if settings.smtp_user and "smtp_password_file" not in g:
        problem(line_of(s, "smtp_user"), s, "smtp_user", "needs smtp_password_file as well")
    if "webhook_format" in g and "webhook_url" not in g:
        problem(line_of(s, "webhook_format"), s, "webhook_format", "needs webhook_url")
    if "webhook_timeout" in g and "webhook_url" not in g and "heartbeat_url" not in g:
        problem(line_of(s, "webhook_timeout"), s, "webhook_timeout", "needs webhook_url or heartbeat_url")
    if "escalate_after" in g and "escalate_to" not in g:
        problem(line_of(s, "escalate_after"), s, "escalate_after", "needs escalate_to")
    if check_files and settings.smtp_password_file:
        bad = secret_file_problem(settings.smtp_password_file)
        if bad:
            problem(line_of(s, "smtp_password_file"), s, "smtp_password_file", bad)

    services: Dict[str, Service] = {}
    units_seen: Dict[str, str] = {}
    for section in parser.sections():
        if section == GLOBAL_SECTION:
            continue
        values = dict(parser.items(section))
        if section.lower() in ("default", GLOBAL_SECTION) or (
                difflib.SequenceMatcher(None, section.lower(), GLOBAL_SECTION).ratio() >= 0.8):
            problem(line_of(section), section, None,
                    "unknown section (did you mean [selfheal]?)")
            continue
        if not NAME_RE.match(section):
            problem(line_of(section), section, None, "a service name is 1-64 of A-Z a-z 0-9 _ . - "
                    "and starts with a letter or digit")
            continue
        for key in values:
            if key not in SERVICE_KEYS:
                problem(line_of(section, key), section, key, "unknown key" + _did_you_mean(key, SERVICE_KEYS))
        # The default unit goes through the same check: [sshd] must not wrap sshd.service.
        values.setdefault("unit", section + ".service")
        unit = take(section, values, "unit", check_unit, section + ".service")
        if unit in units_seen:
            problem(line_of(section, "unit"), section, "unit",
                    "%s is already listed as [%s]" % (unit, units_seen[unit]))
        units_seen[unit] = section
        others = {name: field for name, field in SERVICE_KEYS.items() if name != "unit"}  # (checked above)
        svc = Service(name=section, unit=unit, **read_keys(section, values, others, {}))  # type: ignore[arg-type]
        if "health_url" in values and "health_command" in values:
            problem(line_of(section, "health_command"), section, "health_command",
                    "use health_url or health_command, not both")
        for key in ("health_expect_status", "health_expect_text", "health_timeout"):
            if key in values and "health_url" not in values and (
                    key == "health_expect_status" or "health_command" not in values):
                problem(line_of(section, key), section, key, "needs health_url" if key == "health_expect_status"
                        else "needs health_url or health_command")
        for strategy in STRATEGIES.values():
            if strategy.name in svc.strategies and strategy.needs and not any(
                    getattr(svc, key) or key in values for key in strategy.needs):
                problem(line_of(section, "strategies"), section, "strategies",
                        "%s needs %s" % (strategy.name, " or ".join(strategy.needs)))
            for key in strategy.keys:
                if key in values and strategy.name not in svc.strategies:
                    problem(line_of(section, key), section, key,
                            "is used by %s, which is not in strategies" % strategy.name)
        services[section] = svc
    for message, (section, key) in dependency_problems(services):
        problem(line_of(section, key), section, key, message)
    if not services and not any(s not in ("selfheal", None) for s, _ in lines):
        problem(None, None, None, "no services listed: add one [section] per service")
    if problems:
        raise ConfigError([text for _, text in sorted(problems, key=lambda p: p[0])])
    return Config(path=path, settings=settings, services=services, lines=lines)


def dependency_problems(services: Dict[str, Service]) -> List[Tuple[str, Tuple[str, str]]]:
    """depends_on naming no listed service, the service itself, or closing a cycle."""
    found = []
    for svc in services.values():
        for name in svc.depends_on:
            if name == svc.name:
                found.append(("%s cannot depend on itself" % name, (svc.name, "depends_on")))
            elif name not in services:
                found.append(("%r is not a service in this file%s" % (name, _did_you_mean(name, services)),
                              (svc.name, "depends_on")))
    graph = {svc.name: tuple(n for n in svc.depends_on if n in services and n != svc.name)
             for svc in services.values()}
    cycle = find_cycle(graph)
    if cycle:
        found.append(("a cycle: %s" % " -> ".join(cycle + [cycle[0]]), (cycle[0], "depends_on")))
    return found


def find_cycle(graph: Dict[str, Sequence[str]]) -> List[str]:
    """One cycle of a graph (name -> names it needs) as a list of names, or []."""
    done, path = set(), []  # type: ignore[var-annotated]

    def visit(name: str) -> List[str]:
        if name in path:
            return path[path.index(name):]
        if name in done:
            return []
        path.append(name)
        for needed in graph.get(name, ()):
            cycle = visit(needed)
            if cycle:
                return cycle
        path.pop()
        done.add(name)
        return []

    for name in sorted(graph):
        cycle = visit(name)
        if cycle:
            return list(cycle)
    return []


def never_touch(unit: str) -> bool:
    return any(fnmatch.fnmatchcase(unit, pattern) for pattern in NEVER_TOUCH)


def never_touch_loaded(props: Dict[str, str]) -> str:
    """The protected name a loaded unit really has, through any alias (dbus-org.* ->
    systemd-logind.service), or ""."""
    for name in [props.get("Id", "")] + props.get("Names", "").split():
        if name and never_touch(name):
            return name
    return ""


def check_trusted_file(path: str, what: str) -> Optional[str]:
    """When running as root, a file that decides what root does must be root's alone."""
    if not is_root():
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        return "%s: cannot read %s: %s" % (path, what, exc.strerror)
    if st.st_uid != 0:
        return "%s: %s is owned by uid %d; it must be owned by root (chown root:root %s)" % (
            path, what, st.st_uid, path)
    if st.st_mode & 0o022:
        return "%s: %s is writable by group or others (chmod go-w %s)" % (path, what, path)
    # Whoever can write its directory (or a symlink's) can replace it, unless that is sticky.
    for folder in dict.fromkeys(os.path.dirname(p) for p in (os.path.abspath(path), os.path.realpath(path))):
        try:
            dst = os.stat(folder)
        except OSError as exc:
            return "%s: cannot read %s: %s" % (folder, what, exc.strerror)
        if dst.st_uid != 0 or (dst.st_mode & 0o022 and not dst.st_mode & 0o1000):
            return "%s: %s is in %s, which someone besides root can write (chown root: %s; chmod go-w %s)" % (
                path, what, folder, folder, folder)
    return None


def secret_file_problem(path: str) -> str:
    """What is wrong with a file holding a secret, or "" (checked as root only)."""
    if os.path.islink(path):
        return "%s is a symlink; name the file itself (a link can be pointed anywhere)" % path
    try:
        st = os.stat(path)
    except OSError as exc:
        return "cannot read %s: %s" % (path, exc.strerror)
    if is_root() and st.st_uid != 0:
        return "%s is owned by uid %d; it must be root's (chown root: %s)" % (path, st.st_uid, path)
    if is_root() and st.st_mode & 0o077:
        return "%s is mode %o; it must be 0600 or 0400 (chmod 600 %s)" % (path, st.st_mode & 0o777, path)
    return ""


SECRET_URL_KEYS = ("webhook_url", "heartbeat_url")  # the token is often the path itself


def config_secrets(config: "Config") -> List[str]:
    """The keys whose values are secrets: URLs with user:password@, webhook/heartbeat URLs."""
    found = ["[selfheal] %s" % key for key in SECRET_URL_KEYS if getattr(config.settings, key)]
    found += ["[%s] health_url" % svc.name for svc in config.services.values()
              if urllib.parse.urlsplit(svc.health_url).password is not None
              or urllib.parse.urlsplit(svc.health_url).username]
    return found


def public_config_text(text: str) -> str:
    """services.conf as the dashboard without root may read it, rebuilt from what configparser
    reads (so no spelling of a key, `:` or a continued line slips past): every URL cut to
    scheme, host and port, command lines to their program; the rest as it was."""
    import io

    parser = configparser.ConfigParser(interpolation=None, strict=False, default_section="\0none")
    parser.read_string(text)
    for section in parser.sections():
        for key, value in parser.items(section):
            if key.lower() in ("webhook_url", "heartbeat_url", "health_url") and value.strip():
                value = url_for_log(value.strip()).replace("/...", "/")
            elif key.lower() in ("config_check", "health_command") and value.strip():
                value = value.split()[0]  # arguments may be secrets (redis-cli -a PASSWORD)
            parser.set(section, key, without_credentials(value))
    out = io.StringIO()
    out.write("# services.conf without its secrets, for the dashboard without root (selfheal install)\n")
    parser.write(out)
    return out.getvalue()


def load_config(path: str, trusted: bool = True) -> Config:
    """Read and validate a config file. trusted: enforce root ownership (when run as root)."""
    try:
        # O_NONBLOCK: a FIFO in its place must not hang the open; only a regular file of a
        # sane size is read (not /dev/zero, not a directory).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(["%s: not a regular file" % path])
            if st.st_size > MAX_CONFIG_BYTES:
                raise ConfigError(["%s: %d bytes; a services.conf is at most %d" % (path, st.st_size, MAX_CONFIG_BYTES)])
            with os.fdopen(fd, encoding="utf-8") as handle:
                fd = -1
                text = handle.read(MAX_CONFIG_BYTES + 1)
        finally:
            if fd != -1:
                os.close(fd)
    except FileNotFoundError:
        raise ConfigError(["%s: no such file (copy services.conf from selfheal, or pass --config)" % path])
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(["%s: cannot read: %s" % (path, exc)])
    problems = []
    if trusted:
        bad = check_trusted_file(path, "the config")
        if bad:
            problems.append(bad)
    try:
        config = parse_config(text, path, check_files=trusted)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems)
    if problems:
        raise ConfigError(problems)
    return config


# =============================================================================
# Probes: what the host says
# =============================================================================


def run(argv: Sequence[str], timeout: float = COMMAND_TIMEOUT) -> CmdResult:
    """Run one command: argument list, no shell, no stdin, C locale, a timeout.

    Expected failures (not found, timeout, non-zero exit) come back in the result.
    """
    env = dict(os.environ, LC_ALL="C", SYSTEMD_PAGER="", SYSTEMD_COLORS="0", PAGER="cat")
    start = time.monotonic()
    try:
        proc = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, env=env, check=False,
                              universal_newlines=True, errors="replace")
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except FileNotFoundError:
        rc, out, err = 127, "", "%s: command not found" % argv[0]
    except subprocess.TimeoutExpired:
        rc, out, err = 124, "", "%s: timed out after %.0f s" % (argv[0], timeout)
    except OSError as exc:
        rc, out, err = 126, "", "%s: %s" % (argv[0], exc.strerror)
    result = CmdResult(tuple(argv), rc, out, err, time.monotonic() - start)
    log.debug("ran %s: rc=%d in %.3fs", " ".join(argv), rc, result.seconds)
    return result


class Identity(NamedTuple):
    """Who a command runs as: uid, gid, supplementary groups, and a name for reports."""
    uid: int
    gid: int
    groups: Tuple[int, ...]
    name: str


ROOT = Identity(0, 0, (), "root")


def nobody() -> Identity:
    try:
        entry = pwd.getpwnam("nobody")
        return Identity(entry.pw_uid, entry.pw_gid, (entry.pw_gid,), "nobody")
    except KeyError:
        return Identity(65534, 65534, (65534,), "nobody")


def service_identity(unit: Dict[str, str]) -> Identity:
    """The user and group a service's own commands run as: its User= and Group= as systemd
    reports them (a name or a number), with that user's groups, as systemd gives its
    processes. A service of root, a DynamicUser= one (its uid lives only while it runs), or a
    user this host cannot resolve: nobody."""
    user, group = unit.get("User", "").strip(), unit.get("Group", "").strip()
    if unit.get("DynamicUser") == "yes" or user in ("", "root", "0"):
        return nobody()
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        return nobody()
    if entry.pw_uid == 0:
        return nobody()
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except (KeyError, OverflowError):
            return nobody()
    if gid == 0:  # a root group would reach what only root's group may: not a service's own right
        return nobody()
    try:
        groups = tuple(g for g in os.getgrouplist(entry.pw_name, gid) if g != 0)
    except OSError:
        groups = (gid,)
    return Identity(entry.pw_uid, gid, groups, entry.pw_name)


def run_command(argv: Sequence[str], timeout: float, identity: Identity = ROOT) -> CmdResult:
    """Run a command services.conf names (config_check, health_command) for a service: no
    shell, no stdin, cwd /, an environment of PATH alone, its own session and process group,
    output (stdout and stderr together) read to its end but only the first
    COMMAND_OUTPUT_LIMIT bytes kept. At the deadline, or once the command itself has exited,
    whatever is left of its process group is killed: nothing it started outlives it.

    identity: as root (ROOT), or as a service's user (service_identity): then its uid, gid and
    groups, which drops every capability, and no_new_privs (setpriv), so no set-user-ID
    program or file capability gives any back. A selfheal that is not root runs it as itself.
    Expected failures come back in the result (rc 124: timed out; 126, 127: could not run)."""
    import select

    argv = list(argv)
    shown = tuple(argv)
    options: Dict[str, object] = {}
    if identity.uid != 0 and is_root():
        setpriv = shutil.which(SETPRIV, path=COMMAND_PATH)
        if not setpriv:
            return CmdResult(shown, 126, "", "%s: not found, so it cannot run without privileges: "
                             "install util-linux" % SETPRIV, 0.0)
        options = {"user": identity.uid, "group": identity.gid, "extra_groups": list(identity.groups)}
        argv = [setpriv, "--no-new-privs", "--inh-caps=-all", "--", *argv]
    start = time.monotonic()
    deadline = start + timeout
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, cwd="/", env=dict(
                                    {name: os.environ[name] for name in COMMAND_ENV_KEEP if name in os.environ},
                                    PATH=COMMAND_PATH),
                                start_new_session=True, close_fds=True, **options)  # type: ignore[arg-type]
    except FileNotFoundError:
        return CmdResult(shown, 127, "", "%s: command not found" % shown[0], 0.0)
    except OSError as exc:
        return CmdResult(shown, 126, "", "%s: %s" % (argv[0], exc.strerror), 0.0)
    kept, size, timed_out = [], 0, False
    assert proc.stdout is not None
    with proc.stdout:
        fd = proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not select.select([fd], [], [], left)[0]:
                continue
            data = os.read(fd, 65536)
            if not data:
                break
            if size < COMMAND_OUTPUT_LIMIT:
                kept.append(data[:COMMAND_OUTPUT_LIMIT - size])
            size += len(data)
        # Its output is closed; wait for its exit without reaping it, so its pid (its
        # process group's id) cannot be reused before the group is killed.
        while not timed_out and not waited(proc.pid):
            if time.monotonic() >= deadline:
                timed_out = True
            else:
                time.sleep(0.01)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass  # none left (ESRCH), or the group is not ours to signal (EPERM: not root)
    rc = proc.wait()
    out = b"".join(kept).decode("utf-8", "replace")
    if size > COMMAND_OUTPUT_LIMIT:
        out += "\n[%d more bytes of output not kept]" % (size - COMMAND_OUTPUT_LIMIT)
    if timed_out:
        return CmdResult(shown, 124, out, "%s: timed out after %s" % (shown[0], format_duration(timeout)),
                         time.monotonic() - start)
    return CmdResult(shown, rc, out, "", time.monotonic() - start)


def waited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (waitid WNOWAIT)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def parse_show(text: str) -> List[Dict[str, str]]:
    """`systemctl show` output for one or more units -> one dict per unit."""
    units: List[Dict[str, str]] = []
    current: Dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                units.append(current)
            current = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            current[key] = current[key] + "\n" + value if key in current else value
    if current:
        units.append(current)
    return units


def show_units(units: Sequence[str], properties: Sequence[str] = UNIT_PROPERTIES) -> Dict[str, Dict[str, str]]:
    """One `systemctl show` for many units -> {unit: properties}. Empty dicts when it fails."""
    if not units:
        return {}
    result = run([SYSTEMCTL, "show", "-p", ",".join(properties), "--", *units])
    blocks = parse_show(result.out) if result.ok else []
    if len(blocks) != len(units):  # systemctl failed or merged output: ask one by one
        blocks = []
        for unit in units:
            one = run([SYSTEMCTL, "show", "-p", ",".join(properties), "--", unit])
            found = parse_show(one.out) if one.ok else []
            blocks.append(found[0] if found else {})
    return {unit: block for unit, block in zip(units, blocks)}


def show_unit(unit: str) -> Dict[str, str]:
    return show_units([unit])[unit]


LISTEN_PROC_RE = re.compile(r'\("((?:[^"\\]|\\.)*)",pid=(\d+),fd=\d+\)')


def parse_ss(text: str) -> List[Listener]:
    """`ss -H -tlnp` -> listeners. Local address is the 4th column; process info the rest."""
    listeners = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        local = fields[3]
        address, _, port = local.rpartition(":")
        if not port.isdigit():
            continue
        pids = tuple(sorted({int(pid) for _, pid in LISTEN_PROC_RE.findall(" ".join(fields[5:]))}))
        listeners.append(Listener(int(port), address, pids))
    return listeners


def listeners_on(port: int) -> Tuple[Listener, ...]:
    result = run([SS, "-H", "-t", "-l", "-n", "-p"])
    if not result.ok:
        result = run([SS, "-H", "-t", "-l", "-n"])
    return tuple(lst for lst in parse_ss(result.out) if lst.port == port)


def boot_time() -> float:
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def read_process(pid: int, proc: Path = Path("/proc")) -> Optional[Process]:
    """What /proc says about pid: owner, command line, cgroup, age. None when it is gone."""
    base = proc / str(pid)
    try:
        with open(str(base / "cmdline"), "rb") as handle:  # a process may make it as long as it likes
            cmdline = one_line(handle.read(4096).replace(b"\0", b" ").decode("utf-8", "replace").strip())
        uid = os.stat(base).st_uid
        by_controller = {}
        for line in (base / "cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            by_controller[controllers] = path
        # cgroup v2 ("0::/..."), else systemd's own v1 hierarchy; never a resource controller's.
        cgroup = by_controller.get("") or by_controller.get("name=systemd") or ""
        proc_stat = (base / "stat").read_text()
        start_ticks = int(proc_stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    age = None
    btime = boot_time()
    if btime:
        age = max(0.0, time.time() - (btime + start_ticks / os.sysconf("SC_CLK_TCK")))
    return Process(pid, user, cmdline, cgroup, age, start_ticks / os.sysconf("SC_CLK_TCK"))


def belongs_to_unit(process: Process, unit: str) -> bool:
    """Proof of ownership: the process sits in the unit's own cgroup (or one below it).

    The unit's cgroup is reached from the root through slices only
    (/system.slice/app.service, /system.slice/system-app.slice/app@blue.service): a
    same-named cgroup inside another unit's subtree (a user manager's, a container's) is
    not the system unit's, so it is no proof.
    """
    parts = process.cgroup.strip("/").split("/")
    if unit not in parts:
        return False
    return all(part.endswith(".slice") for part in parts[:parts.index(unit)])


def read_journal(invocation: str, unit: str, lines: int = JOURNAL_LINES) -> Tuple[str, ...]:
    """The journal of one run: the service's own lines and systemd's lines about that run.
    Matched on what journald sets itself (fields that begin with _): INVOCATION_ID alone
    could be sent by any user, so systemd's lines are those of _PID=1 that carry it."""
    if invocation:
        argv = [JOURNALCTL, "--no-pager", "-q", "-o", "short-iso", "-n", str(lines),
                "_SYSTEMD_INVOCATION_ID=%s" % invocation, "+", "_PID=1", "INVOCATION_ID=%s" % invocation]
    else:
        argv = [JOURNALCTL, "--no-pager", "-q", "-o", "short-iso", "-n", str(lines), "-u", unit]
    result = run(argv, timeout=10)
    return journal_excerpt(result.out, lines) if result.ok else ()


def journal_excerpt(text: str, lines: int = JOURNAL_LINES) -> Tuple[str, ...]:
    """journalctl's output as a report quotes it: the last lines, each cleaned (no controls, no
    credentials, no environment value systemd quoted) and bounded, the whole bounded too."""
    return tuple(bounded_lines(clean(line) for line in text.splitlines()[-lines:]))


def read_journal_since(unit: str, since: float, lines: int = JOURNAL_LINES) -> Tuple[str, ...]:
    argv = [JOURNALCTL, "--no-pager", "-q", "-o", "short-iso", "-n", str(lines), "-u", unit,
            "--since", "@%d" % max(0, int(since) - 1)]
    result = run(argv, timeout=10)
    return journal_excerpt(result.out, lines) if result.ok else ()


TIMESPAN_UNITS = {"us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "min": 60,
                  "m": 60, "h": 3600, "hr": 3600, "d": 86400, "w": 604800, "M": 2629800, "y": 31557600}


def parse_timespan(text: str) -> float:
    """systemd's "1min 30s", "100ms", "infinity" -> seconds (infinity: MAX_JOB_SECONDS)."""
    text = text.strip()
    if text == "infinity":
        return MAX_JOB_SECONDS
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", text):
        total += float(number) * TIMESPAN_UNITS.get(unit or "s", 0.0)
    return total


def parse_usec_timestamp(value: str) -> Optional[float]:
    try:
        usec = int(value)
    except (TypeError, ValueError):
        return None
    return usec / 1e6 if usec > 0 else None


CRASH_LINE_RE = re.compile(r"Main process exited, code=(\w+), status=(\d+)(?:/(\w+))?")
RESULT_LINE_RE = re.compile(r"Failed with result '([\w-]+)'")


def crash_from_journal(lines: Sequence[str]) -> Tuple[str, str, str]:
    """(result, exit code, exit status) of the last crash systemd logged in these lines."""
    result = code = status = ""
    for line in lines:
        match = CRASH_LINE_RE.search(line)
        if match:
            code, status = match.group(1), match.group(3) or match.group(2)
            result = ""
        match = RESULT_LINE_RE.search(line)
        if match:
            result = match.group(1)
    return result, code, status


def crash_time(lines: Sequence[str]) -> Optional[float]:
    """When the last crash systemd logged in these (short-iso) lines happened, or None."""
    for line in reversed(lines):
        if CRASH_LINE_RE.search(line):
            try:
                return dt.datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S%z").timestamp()
            except ValueError:
                return None
    return None


def diagnose(svc: Service, env=os.environ, finding: Optional[Finding] = None) -> Diagnosis:
    """Everything known about the failure, gathered in a few fast calls."""
    unit = show_unit(svc.unit)
    if finding and finding.kind == "restarted":
        # systemd's Restart= already replaced the crashed run (no OnFailure= on systemd
        # 252): the crash is only in the journal since the watch last saw it healthy.
        journal = (read_journal(finding.previous, svc.unit) if finding.previous
                   else read_journal_since(svc.unit, finding.since))
        result, exit_code, exit_status = crash_from_journal(journal)
        crashed = crash_time(journal)  # to the second, as the journal says it
        if crashed and finding.since:  # never before the watch last saw it healthy
            crashed = max(crashed, finding.since)
        failed_at = min(crashed, time.time()) if crashed else None
        return Diagnosis(unit, result or "unknown", exit_code, exit_status, False, journal, (), (),
                         failed_at, None if failed_at is None else time.time() - failed_at, finding,
                         finding.previous)
    from_env = env.get("MONITOR_UNIT") == svc.unit and bool(env.get("MONITOR_SERVICE_RESULT"))
    if from_env:  # systemd 251+: the failed run's facts, even if the unit moved on since
        result = env.get("MONITOR_SERVICE_RESULT", "")
        exit_code = env.get("MONITOR_EXIT_CODE", "")
        exit_status = env.get("MONITOR_EXIT_STATUS", "")
        invocation = env.get("MONITOR_INVOCATION_ID", "") or unit.get("InvocationID", "")
    else:
        result = unit.get("Result", "")
        exit_code = {"1": "exited", "2": "killed", "3": "dumped"}.get(unit.get("ExecMainCode", ""), "")
        status = unit.get("ExecMainStatus", "")
        exit_status = signal_name(status) if exit_code in ("killed", "dumped") else status
        invocation = unit.get("InvocationID", "")
    journal = read_journal(invocation, svc.unit)
    listeners: Tuple[Listener, ...] = ()
    holders: List[Process] = []
    ports = listening_ports() if svc.port else None
    if svc.port and (ports is None or svc.port in ports):  # ss -p only when someone listens
        listeners = listeners_on(svc.port)
        for pid in sorted({pid for lst in listeners for pid in lst.pids}):
            process = read_process(pid)
            if process:
                holders.append(process)
    failed_mono = (parse_usec_timestamp(unit.get("ExecMainExitTimestampMonotonic", ""))
                   or parse_usec_timestamp(unit.get("InactiveEnterTimestampMonotonic", "")))
    failed_at = detected_after = None
    if failed_mono:
        detected_after = max(0.0, time.monotonic() - failed_mono)
        failed_at = time.time() - detected_after
    if finding and finding.kind == "unhealthy":
        # Still running: systemd's timestamps say nothing of the hang. Counted from the
        # watch's first failed look (the report says so), never from the heal's start.
        failed_at = min(finding.since, time.time()) if finding.since else None
        detected_after = None if failed_at is None else time.time() - failed_at
    return Diagnosis(unit, result, exit_code, exit_status, from_env, journal, listeners,
                     tuple(holders), failed_at, detected_after, finding, invocation)


def signal_name(number: str) -> str:
    try:
        return signal.Signals(int(number)).name.replace("SIG", "")
    except (ValueError, TypeError):
        return number


# NETLINK_SOCK_DIAG (linux/netlink.h, sock_diag.h, inet_diag.h): what `ss -tl` asks the kernel.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10  # the state /proc/net/tcp writes as 0A
NLMSG_HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port id
# inet_diag_req_v2: family, protocol, extensions, pad, states (a bit per state), inet_diag_sockid
INET_DIAG_REQ_V2 = struct.Struct("=BBBBI48s")
# inet_diag_msg: family, state, timer, retrans, then inet_diag_sockid (sport and dport in network
# byte order, src, dst, interface, cookie), expires, rqueue, wqueue, uid, inode
INET_DIAG_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
SOCK_DIAG_BUFFER = 1 << 16  # the kernel fills at most 32 KiB per datagram of a dump
_LISTEN_SOURCES_SAID: set = set()  # which source tcp_listen_sockets used, said once per process


def sock_diag_request(family: int, seq: int) -> bytes:
    """A SOCK_DIAG_BY_FAMILY dump request for family's TCP sockets in LISTEN state only: the
    kernel then walks its listening table alone, never the established connections."""
    request = INET_DIAG_REQ_V2.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN, b"")
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                          seq, 0) + request


def parse_sock_diag(data: bytes, seq: int) -> Tuple[List[Tuple[int, str]], bool]:
    """One datagram of the reply to sock_diag_request(..., seq) -> ((port, inode) of each TCP
    socket in LISTEN state in it, whether the dump ended there). An NLMSG_ERROR (or a dump the
    kernel ended with an error) raises OSError with its errno; bytes that are not a whole
    reply raise ValueError. Messages of another seq are skipped."""
    found: List[Tuple[int, str]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < NLMSG_HDR.size:
            raise ValueError("sock_diag: %d stray bytes at the end of a reply" % (len(data) - offset))
        length, kind, _, msg_seq, _ = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            raise ValueError("sock_diag: a message of %d bytes at byte %d of %d" % (length, offset, len(data)))
        body = data[offset + NLMSG_HDR.size:offset + length]
        offset += (length + 3) & ~3  # NLMSG_ALIGN
        if msg_seq != seq:
            continue
        if kind in (NLMSG_DONE, NLMSG_ERROR):
            if len(body) < 4:
                if kind == NLMSG_DONE:
                    return found, True
                raise ValueError("sock_diag: an error message of %d bytes" % len(body))
            (code,) = struct.unpack_from("=i", body)
            if code < 0:
                raise OSError(-code, "sock_diag: %s" % os.strerror(-code))
            if kind == NLMSG_DONE:
                return found, True
            continue  # NLMSG_ERROR with 0: an acknowledgement
        if kind != SOCK_DIAG_BY_FAMILY:
            continue  # NLMSG_NOOP
        if len(body) < INET_DIAG_MSG.size:
            raise ValueError("sock_diag: a socket of %d bytes, not %d" % (len(body), INET_DIAG_MSG.size))
        fields = INET_DIAG_MSG.unpack_from(body)
        family, state, sport, inode = fields[0], fields[1], fields[4], fields[-1]
        if state == TCP_LISTEN and family in (socket.AF_INET, socket.AF_INET6):
            found.append((int.from_bytes(sport, "big"), str(inode)))
    return found, False


def sock_diag_listeners(timeout: float = SOCK_DIAG_TIMEOUT) -> List[Tuple[int, str]]:
    """(port, inode) of every TCP socket in LISTEN state, IPv4 and IPv6, asked of the kernel
    over NETLINK_SOCK_DIAG as `ss -tl` does: as fast with 20,000 connections as with none,
    and no capability needed. Raises OSError when the kernel or a sandbox refuses (EPERM,
    EAFNOSUPPORT, EPROTONOSUPPORT: no AF_NETLINK, no inet_diag) or timeout passes, ValueError
    for a reply it cannot read."""
    deadline = time.monotonic() + timeout
    found: List[Tuple[int, str]] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sock:
        for seq, family in enumerate((socket.AF_INET, socket.AF_INET6), 1):
            try:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.sendto(sock_diag_request(family, seq), (0, 0))
                done = False
                while not done:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    data, _, flags, _ = sock.recvmsg(SOCK_DIAG_BUFFER)
                    if flags & socket.MSG_TRUNC:
                        raise ValueError("sock_diag: a reply longer than %d bytes" % SOCK_DIAG_BUFFER)
                    sockets, done = parse_sock_diag(data, seq)
                    found.extend(sockets)
            except OSError as exc:
                if family == socket.AF_INET6 and exc.errno == errno.ENOENT:
                    continue  # a kernel without IPv6 has no table for it (as /proc has no tcp6)
                raise
    return found


def proc_net_listeners(proc: Path) -> Optional[List[Tuple[int, str]]]:
    """(port, inode) of every TCP socket in LISTEN state, from proc's net/tcp and tcp6; None
    when unreadable (no net/tcp: ProcSubset=pid, say). Every socket of the host is a line
    there: 0.15 s a call with 20,000 connections (tests/bench_listeners.py), hence
    sock_diag_listeners first."""
    found = []
    for name in ("tcp", "tcp6"):
        try:
            text = (proc / "net" / name).read_text()
        except FileNotFoundError:
            if name == "tcp6":
                continue  # no IPv6 here
            return None
        except OSError:
            return None
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A":  # 0A is TCP_LISTEN
                found.append((int(fields[1].rpartition(":")[2], 16), fields[9]))
    return found


def _say_listen_source(source: str, text: str, *args) -> None:
    """A debug line (-v) about where the listening sockets came from, once per process."""
    if source not in _LISTEN_SOURCES_SAID:
        _LISTEN_SOURCES_SAID.add(source)
        log.debug(text, *args)


def tcp_listen_sockets(proc: Optional[Path] = None) -> Optional[List[Tuple[int, str]]]:
    """(port, inode as /proc writes it) of every TCP socket in LISTEN state, IPv4 and IPv6:
    from the kernel (sock_diag_listeners), else from PROC_DIR's net/tcp and tcp6 when netlink
    fails (a sandbox without AF_NETLINK, a kernel without inet_diag); None when neither
    answers. Given a proc (a test's fake /proc), its files alone are read."""
    why = ""
    if proc is None:
        proc = PROC_DIR
        try:
            sockets = sock_diag_listeners()
        except (OSError, ValueError) as exc:
            why = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
        else:
            _say_listen_source("netlink", "listening sockets: asked of the kernel (NETLINK_SOCK_DIAG)")
            return sockets
    found = proc_net_listeners(proc)
    _say_listen_source("proc" if found is not None else "none", "listening sockets: %s %s/net/tcp%s",
                       "read from" if found is not None else "cannot read", proc,
                       " (netlink: %s)" % why if why else "")
    return found


def listening_ports(proc: Optional[Path] = None) -> Optional[set]:
    """TCP ports in LISTEN state (tcp_listen_sockets: no process started); None when unreadable."""
    sockets = tcp_listen_sockets(proc)
    return None if sockets is None else {port for port, _ in sockets}


def systemd_version(timeout: float = VERSION_PROBE_TIMEOUT) -> Tuple[Optional[int], str]:
    """This host's systemd from `systemctl --version`: (247, "systemd 247 (247.3-7+deb11u5)"),
    or (None, why not). Never raises; it needs no running systemd."""
    result = run([SYSTEMCTL, "--version"], timeout=timeout)
    first = (result.out.splitlines() or [""])[0].strip()
    match = re.match(r"systemd (\d+)\b", first)
    if result.ok and match:
        return int(match.group(1)), first
    why = (result.err.strip().splitlines() or [first or "no version in its output"])[-1]
    return None, "systemctl --version: %s" % why if not why.startswith(SYSTEMCTL) else why


def systemd_facts(timeout: float = VERSION_PROBE_TIMEOUT) -> List[str]:
    """What this host's systemd gives selfheal, one line each (for --version and heal -v)."""
    version, detail = systemd_version(timeout)
    if version is None:
        return ["systemd: unknown (%s)" % detail,
                "MONITOR_* on failure: unknown: failure facts come from systemctl show "
                "unless systemd passes them"]
    if version >= MONITOR_ENV_SINCE:
        monitor = "yes (systemd >= %d)" % MONITOR_ENV_SINCE
    else:
        monitor = "no: failure facts come from systemctl show (MONITOR_* needs systemd >= %d)" % MONITOR_ENV_SINCE
    return [detail, "MONITOR_* on failure: %s" % monitor]


def listen_inodes(port: int, proc: Optional[Path] = None) -> Optional[set]:
    """Inodes of the TCP sockets listening on port (tcp_listen_sockets); None when unreadable."""
    sockets = tcp_listen_sockets(proc)
    return None if sockets is None else {inode for listening, inode in sockets if listening == port}


def main_holds_port(inodes: set, main_pid: int, unit: str, control_group: str = "",
                    proc: Path = Path("/proc")) -> Optional[Process]:
    """The unit's main process when it holds every listening socket in inodes (listen_inodes
    of the port), else None.

    The usual answer after a good restart, read from /proc alone (no ss): the crash-to-mail
    path stays as fast as before. Anything else is for port_holder to find out.
    """
    if not inodes or main_pid <= 1:
        return None
    wanted = {"socket:[%s]" % inode for inode in inodes}
    try:
        with os.scandir(proc / str(main_pid) / "fd") as fds:
            for fd in fds:
                try:
                    wanted.discard(os.readlink(fd.path))
                except OSError:
                    continue
                if not wanted:
                    break
    except OSError:
        return None
    process = read_process(main_pid, proc) if not wanted else None
    return process if process is not None and in_unit_cgroup(process, unit, control_group) else None


def in_unit_cgroup(process: Process, unit: str, control_group: str = "") -> bool:
    """The process is the unit's: belongs_to_unit, or inside the ControlGroup= systemd
    reports for the unit (which also holds when services.conf names the unit by an alias)."""
    group = control_group.rstrip("/")
    if group and (process.cgroup == group or process.cgroup.startswith(group + "/")):
        return True
    return belongs_to_unit(process, unit)


def socket_cgroups() -> Optional[Dict[int, List[str]]]:
    """port -> the cgroups of the sockets listening on it, from `ss --cgroup` (iproute2 5.9+,
    cgroup v2): the cgroup of the process that made each socket. No CAP_SYS_PTRACE needed,
    unlike ss -p, so the watch's sandbox can tell too. None when ss cannot say."""
    result = run([SS, "-H", "-t", "-l", "-n", "--cgroup"])
    if not result.ok:
        return None
    found: Dict[int, List[str]] = {}
    for line in result.out.splitlines():
        fields = line.split()
        groups = [f[len("cgroup:"):] for f in fields[5:] if f.startswith("cgroup:")]
        port = fields[3].rpartition(":")[2] if len(fields) > 3 else ""
        if groups and port.isdigit():
            found.setdefault(int(port), []).append(groups[0])
    return found


def leftover(process: Process, since: Optional[float]) -> bool:
    """Started before the unit's current run began (since: its InactiveExitTimestampMonotonic,
    in seconds): a leftover of an earlier run (KillMode=process), not the run being verified.
    CLOCK_BOOTTIME is never behind CLOCK_MONOTONIC, so a suspended host never makes a new
    process look old; 0.1 s covers the clock ticks /proc counts in."""
    return since is not None and process.started is not None and process.started < since - 0.1


def port_holder(port: int, unit: str, control_group: str = "",
                listeners: Optional[Sequence[Listener]] = None,
                since: Optional[float] = None,
                cgroups: Optional[Callable[[], Optional[Dict[int, List[str]]]]] = None
                ) -> Holding:
    """Whose is the socket listening on port? OWN when a process in the unit's cgroup holds
    it; FOREIGN (detail naming every holder) when another unit's process or one of no unit
    does, LEFTOVER when only leftovers of the unit's earlier runs (started before since) do;
    SOCKET_UNIT for systemd's own socket; UNKNOWN when that cannot be told (ss missing or
    refused, not root, holder gone).

    One `ss -p` unless given its listeners; ask only when the port is known to listen. When
    it names no process (no CAP_SYS_PTRACE: the watch), the sockets' cgroups decide.
    """
    if listeners is None:
        result = run([SS, "-H", "-t", "-l", "-n", "-p"])
        if not result.ok:
            return Holding(PortOwner.UNKNOWN, "holder unknown: %s" % result.brief())
        listeners = parse_ss(result.out)
    sockets = [lst for lst in listeners if lst.port == port]
    if not sockets:
        return Holding(PortOwner.UNKNOWN, "holder unknown: ss shows no listener on it")
    own: Dict[int, Process] = {}
    others: Dict[int, Process] = {}
    stale: Dict[int, Process] = {}
    by_systemd = False
    for lst in sockets:
        processes = [p for p in (read_process(pid) for pid in lst.pids) if p is not None]
        mine = [p for p in processes if in_unit_cgroup(p, unit, control_group)]
        current = [p for p in mine if not leftover(p, since)]
        if current:
            own.update((p.pid, p) for p in current)
        elif mine:
            stale.update((p.pid, p) for p in mine)
        elif 1 in lst.pids:
            by_systemd = True  # a socket unit's socket, waiting for its service
        else:
            others.update((p.pid, p) for p in processes)
    if others or stale:
        said = []
        if others:
            said.append("%s, not by a process of %s" % (
                "; ".join(describe_process(p) for _, p in sorted(others.items())), unit))
        if stale:
            said.append("%s, a leftover of an earlier run of %s" % (
                "; ".join(describe_process(p) for _, p in sorted(stale.items())), unit))
        return Holding(PortOwner.FOREIGN if others else PortOwner.LEFTOVER, "held by " + "; and by ".join(said))
    if own:
        return Holding(PortOwner.OWN, "pid %s of %s" % (", ".join(map(str, sorted(own))), unit))
    if by_systemd:
        return Holding(PortOwner.SOCKET_UNIT, "held by systemd (socket activation)")
    groups = ((cgroups or socket_cgroups)() or {}).get(port, [])
    ours = [g for g in groups if in_unit_cgroup(Process(0, "", "", g), unit, control_group)]
    strangers = sorted({g for g in groups if g not in ours and g not in ("/", "/init.scope")})  # not systemd's
    if strangers:
        return Holding(PortOwner.FOREIGN, "held by a socket of %s, not of %s (ss names no process: not root?)" % (
            ", ".join(strangers), unit))
    if ours:
        return Holding(PortOwner.OWN, "a socket of %s; ss names no process" % unit)
    return Holding(PortOwner.UNKNOWN, "holder unknown: ss names no live process (not root?)")


def preload() -> None:
    """Import what mailing and HTTP checks need (about 80 ms): in a thread of its own from
    the heal's start, while it waits on systemctl and the service anyway."""
    def imports() -> None:
        import email.message  # noqa: F401
        import email.parser  # noqa: F401
        import email.policy  # noqa: F401
        import smtplib  # noqa: F401
        import ssl  # noqa: F401
        import urllib.request  # noqa: F401

    if not PRELOADING:
        import threading

        PRELOADING.append(threading.Thread(target=imports, name="selfheal-preload", daemon=True))
        PRELOADING[0].start()


PRELOADING: List[object] = []  # the preload thread, once started

def http_check(url: str, timeout: float, expect_status: Sequence[int] = (),
               expect_text: str = "") -> Tuple[bool, str]:
    """GET url. Healthy: the expected status (default any 2xx or 3xx; redirects are not
    followed) and, when asked, the expected text in the first 64 KiB. user:password@ in the
    URL is sent as Basic authorization (http_send), and the whole request gets `timeout`, not
    each read. The detail never holds the URL's credentials or a control character of the
    answer. Never raises."""
    import http.client

    def status_ok(code: int) -> bool:
        return code in expect_status if expect_status else 200 <= code < 400

    expected = "/".join(map(str, expect_status)) or "2xx/3xx"
    try:
        status, body = http_send(url, timeout, limit=HEALTH_BODY_LIMIT)
    except http.client.HTTPException as exc:
        return False, one_line("not an HTTP answer (%s: %.80s)" % (type(exc).__name__, exc))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, socket.timeout) or "timed out" in str(reason):
            return False, "no answer within %s" % format_duration(timeout)
        return False, one_line(str(reason))
    if not status_ok(status):
        return False, "HTTP %d, expected %s" % (status, expected)
    if expect_text and expect_text not in body.decode("utf-8", "replace"):
        return False, "HTTP %d but the body lacks %s" % (status, clean(repr(expect_text)))
    return True, "HTTP %d" % status


def shlex_join(argv: Sequence[str]) -> str:
    """An argument list as one could type it (shlex.join, Python 3.8+), for reports."""
    import shlex

    return " ".join(shlex.quote(arg) for arg in argv)


def command_argv(argv: Sequence[str]) -> List[str]:
    """An argument list from services.conf with its program found: a plain name is looked up
    on PATH when it runs (config_check, health_command)."""
    argv = list(argv)
    if not argv[0].startswith("/"):
        argv[0] = shutil.which(argv[0]) or argv[0]
    return argv


CANNOT_RUN = "cannot run: "  # command_check's detail when the program is missing: no verdict on the service


def command_check(argv: Sequence[str], timeout: float, expect_text: str = "",
                  identity: Identity = ROOT) -> Tuple[bool, str]:
    """Run a health_command through run_command (no shell, no stdin, an environment of PATH
    alone, its process group killed after timeout) as `identity`; as root only when
    root_only_problems finds nothing, checked right before it runs. Healthy: exit status 0
    and, when asked, the expected text in its output (stdout and stderr, the first 64 KiB).
    Never raises; the detail quotes at most 80 characters of one line of output, control
    characters escaped (it is the service's answer, not ours)."""
    argv = command_argv(argv)
    if identity.uid == 0 and is_root():
        refused = root_only_problems(argv)
        if refused:
            return False, CANNOT_RUN + "refused to run it as root: %s" % "; ".join(refused)
    result = run_command(argv, timeout, identity)
    output = (result.out + "\n" + result.err).strip()
    first = next((line.strip() for line in output.splitlines() if line.strip()), "")
    if first.startswith("Traceback (most recent call last)"):  # Python's own words are its last line
        first = [line.strip() for line in output.splitlines() if line.strip()][-1]
    telling = NOT_A_HANG_RE.search(output) if not result.ok or expect_text not in output else None
    if telling:  # quote what names the problem, wherever it is in the answer (80 characters end with it)
        line_start = output.rfind("\n", 0, telling.start()) + 1
        first = output[max(line_start, telling.end() - 78):].split("\n", 1)[0].strip()
    said = ": %r" % first[:80] if first else ""  # repr: control characters escaped
    if result.rc == 124:
        return False, "no answer within %s" % format_duration(timeout)
    if result.rc in (126, 127):
        return False, CANNOT_RUN + one_line((result.err or result.out).strip()[:200])
    if not result.ok:
        return False, "exit status %d%s" % (result.rc, said)
    if expect_text and expect_text not in output:
        return False, "exit status 0 but the output lacks %r%s" % (expect_text, said)
    return True, "exit status 0%s" % said


# A health check that answers with one of these is not hung: the service runs and says what
# is wrong (Redis's MISCONF when it cannot save, a login refused for a file it cannot open).
# A restart cannot fix that, and may never finish (Redis will not exit without saving).
NOT_A_HANG_RE = re.compile(r"MISCONF|unable to persist|no space left on device|read-only file system|"
                           r"disk quota exceeded|permission denied", re.I)


def health_identity(svc: Service, unit: Dict[str, str]) -> Identity:
    """Who runs the service's health_command: its own user (health_run_as = service), or root."""
    return ROOT if svc.health_run_as == "root" else service_identity(unit)


def health_check(svc: Service, unit: Dict[str, str]) -> Tuple[bool, str]:
    """The service's own health check, health_url or health_command: (healthy, detail).
    unit: its properties as systemd reports them (User=, Group=, DynamicUser=)."""
    if svc.health_command:
        ok, detail = command_check(svc.health_command, svc.health_timeout, svc.health_expect_text,
                                   health_identity(svc, unit))
        return ok, "`%s`: %s" % (shlex_join(svc.health_command), detail)
    return http_check(svc.health_url, svc.health_timeout, svc.health_expect_status, svc.health_expect_text)


# =============================================================================
# Triage and root cause (pure): what kind of failure, and why
# =============================================================================

@dataclasses.dataclass(frozen=True)
class FailureKind:
    """A failure a failed run's journal can show: the line that says so, what the report
    gives as its cause ("It exited with status 1: <cause>."), how sure that is, what a human
    should do, and the strategies that can fix it (tried first, in the configured order)."""

    kind: str
    pattern: "re.Pattern[str]"
    cause: str
    confidence: str
    advice: str
    strategies: Tuple[str, ...] = ()


def _kind(kind, pattern, cause, confidence, advice, strategies=()) -> FailureKind:
    return FailureKind(kind, re.compile(pattern, re.I), cause, confidence, advice, tuple(strategies))


# In the order they are tried on each line: triage and the root cause both take the failed
# run's last line that matches any, and the first kind that matches it.
FAILURE_KINDS: Tuple[FailureKind, ...] = (
    _kind("port_in_use", r"address already in use|EADDRINUSE|bind\(\).*failed",
          "its port was already taken when it started", "high",
          "Find what holds the port (ss -tlnp) and make sure only one copy of the service runs.",
          ["port_conflict"]),
    _kind("missing_env", r"KeyError: '(?-i:[A-Z_][A-Z0-9_]*)'|environment variable\W+[A-Za-z_][A-Za-z0-9_]*\W+(is )?"
          r"(not set|missing|required|unset|empty)|\b(?-i:[A-Z_][A-Z0-9_]{2,}) (is )?(not set|unset|missing|required)\b",
          "a required environment variable is missing or empty", "high",
          "Set it in the service's environment file (selfheal never invents values); environment_check names it.",
          ["environment_check"]),
    _kind("bad_config", r"\bconfig(uration)?\b.{0,40}\b(error|invalid|failed)|syntax error|parse error|"
          r"invalid (option|directive|value)|unknown (directive|option)",
          "its configuration is invalid", "high",
          "Fix the configuration; a config_check lets selfheal verify it before restarting.",
          ["config_validation"]),
    _kind("database_access", r"unable to open database",
          "it could not open its database file (missing, or its owner or mode changed)", "high",
          "Check that the file exists with its owner and mode (db_owner and db_mode let selfheal restore them); "
          "restore it from a backup only if it is gone.", ["database_check"]),
    _kind("database", r"database (disk image )?is malformed|file is not a database|no such table|database is locked",
          "its database is damaged or unreachable", "high",
          "Check the database file (sqlite3 FILE 'PRAGMA integrity_check') and restore it from a backup.",
          ["database_check"]),
    _kind("disk_full", r"no space left on device|ENOSPC|disk quota exceeded",
          "its disk is full", "high", "Free space on the filesystem it writes to.", ["database_check"]),
    _kind("permission", r"permission denied|EACCES|operation not permitted",
          "it was denied access to a file or port", "medium",
          "Check the owner and mode of the files it uses, and its User= in the unit.", ["database_check"]),
    _kind("missing_file", r"no such file or directory|ENOENT",
          "a file it needs is missing", "medium", "Restore the missing file named in the journal lines.",
          ["database_check"]),
    _kind("oom", r"out of memory|MemoryError|Cannot allocate memory|\boom(?:[_-]kill(?:er)?)?\b",
          "it ran out of memory", "medium", "Check its memory use and the host's free memory."),
)
FAILURE_KIND = {kind.kind: kind for kind in FAILURE_KINDS}
# Kinds that say the service's config is broken: a heal never re-arms its Restart= loop for
# them (no reset-failed and second restart) and makes at most one failed start a round.
CONFIG_BROKEN_KINDS = ("bad_config",)


def journal_kind(journal: Sequence[str]) -> Optional[Tuple[FailureKind, str]]:
    """The failure the journal shows: its last line that matches a kind, and that kind. The
    service's own lines first: systemd's about it ("Can't open PID file ... (yet?): No such file
    or directory" after a failed start) only when the service said nothing telling."""
    own = own_lines(journal)
    for lines in (own, [line for line in journal if line not in own]):
        for line in reversed(lines):
            for kind in FAILURE_KINDS:
                if kind.pattern.search(line):
                    return kind, line
    return None


def triage(diag: Diagnosis) -> Tuple[str, str]:
    """What kind of failure this is, and the evidence: (kind, the line or fact that says so)."""
    if diag.finding and diag.finding.kind in ("unhealthy", "stopped"):
        return {"unhealthy": "hang", "stopped": "stopped"}[diag.finding.kind], diag.finding.detail
    if diag.result == "oom-kill":
        return "oom", "systemd result oom-kill"
    if diag.result == "start-limit-hit":
        # Why each start failed says more than that systemd stopped trying: a config its
        # journal calls broken is bad_config, which no restart (nor reset-failed) fixes.
        said = journal_kind(diag.journal)
        if said and said[0].kind in CONFIG_BROKEN_KINDS:
            return said[0].kind, said[1]
        return "start_limit", "systemd result start-limit-hit"
    if diag.result in ("timeout", "watchdog"):
        return "hang", "systemd result %s" % diag.result
    if diag.exit_code == "exited" and diag.exit_status == "203":
        return "exec", "exit status 203/EXEC"
    for line in reversed(diag.journal):
        if "Failed to load environment files" in line:  # systemd's own: a missing EnvironmentFile=
            return "missing_env", line
    found = journal_kind(diag.journal)
    if found:
        return found[0].kind, found[1]
    if diag.exit_code in ("killed", "dumped"):
        return ("crash" if diag.exit_code == "dumped" else "killed"), "signal %s" % diag.exit_status
    return ("exit" if diag.exit_code == "exited" else "unknown"), ""


def plan_strategies(configured: Sequence[str], kind: str) -> List[str]:
    """The configured strategies, the ones that fit the evidence first (in their order)."""
    fits = FAILURE_KIND[kind].strategies if kind in FAILURE_KIND else ()
    fitting = [name for name in configured if name in fits]
    return fitting + [name for name in configured if name not in fitting]


def root_cause(svc: Service, diag: Diagnosis) -> RootCause:
    """Explain the failure from what the watch saw, systemd's result, the exit status and
    the journal."""
    finding = diag.finding
    if finding and finding.kind == "unhealthy":
        if NOT_A_HANG_RE.search(finding.detail):
            return RootCause("It is running and answers, but reports a problem with its data that a restart cannot fix ("
                             "disk space, permissions or persistence): %s." % finding.detail, "high",
                             "watch: " + finding.detail,
                             "Fix what its answer names (free space, the owner and mode of its data directory), "
                             "then check it again; a restart would lose what it holds in memory, and may not "
                             "finish at all (Redis does not exit while it cannot save).")
        if "no answer" in finding.detail or "timed out" in finding.detail:
            return RootCause("It hung: %s, while systemd still counted it as running." % finding.detail,
                             "high", "watch: " + finding.detail,
                             "A hang is a deadlock, an exhausted pool or a blocking call. Next time, "
                             "before it is restarted, look at what it waits for (py-spy dump, gdb -p PID, "
                             "/proc/PID/stack); pause selfheal for it to keep it in that state.")
        return RootCause("It was running but not serving: %s." % finding.detail, "medium",
                         "watch: " + finding.detail,
                         "Read its journal for errors; check what it needs (database, disk, config).")
    if finding and finding.kind == "stopped" and diag.active_state == "inactive" and diag.result in ("", "success"):
        return RootCause("It was stopped cleanly (systemctl stop, or a unit it depends on stopped), not crashed.",
                         "high", "systemd: inactive (dead), result success",
                         "If that was maintenance, pause selfheal first next time: selfheal pause %s. "
                         "To leave stopped services alone, set on_stopped = report or ignore." % svc.name)
    cause = _failure_cause(svc, diag)
    if finding and finding.kind == "restarted":
        return RootCause("It crashed and systemd's Restart= brought it back by itself. " + cause.summary,
                         cause.confidence, cause.evidence, cause.recommendation)
    return cause


def _failure_cause(svc: Service, diag: Diagnosis) -> RootCause:
    result, code, status = diag.result, diag.exit_code, diag.exit_status
    peak = diag.unit.get("MemoryPeak", "")
    evidence = "systemd result %r" % (result or "unknown")
    if code:
        evidence += ", main process %s %s" % (code, status)
    found = journal_kind(diag.journal)
    if result == "oom-kill":
        memory = " (peak memory %s)" % format_bytes(peak) if format_bytes(peak) else ""
        return RootCause("The kernel's out-of-memory killer ended it%s." % memory, "high", evidence,
                         "It needs more memory than it had: look for a leak or a load spike, "
                         "raise MemoryMax= or add memory/swap.")
    if result == "start-limit-hit":
        if found:  # what each start said
            return RootCause("It failed too often in a row and systemd stopped restarting it (start limit hit): "
                             "%s." % found[0].cause, found[0].confidence, found[1], found[0].advice)
        return RootCause("It failed too often in a row and systemd stopped restarting it (start limit hit).",
                         "high", evidence, "Read the journal lines below for why each start failed.")
    if found and found[0].kind == "port_in_use":
        return RootCause("It could not start: its port was already taken.", "high", found[1], found[0].advice)
    if found and diag.active_state == "activating":  # a start still running, or stuck: its own words
        return RootCause("It did not come up: %s." % found[0].cause, found[0].confidence, found[1], found[0].advice)
    if code == "exited" and status.isdigit() and int(status) in SYSTEMD_EXIT_STATUS:
        name, meaning = SYSTEMD_EXIT_STATUS[int(status)]
        line = next((ln for ln in reversed(diag.journal) if name in ln or "Failed to" in ln), "")
        return RootCause("systemd could not start it: %s (status %s/%s)." % (meaning, status, name),
                         "high", line or evidence,
                         "Fix the unit or restore what it points to; restarting will not help until then.")
    if result == "core-dump" or code == "dumped":
        return RootCause("It crashed (signal %s, core dumped)." % status, "high", evidence,
                         "A crash is a bug or corrupt input: keep the core (coredumpctl) and look at what "
                         "it was doing in the journal lines below.")
    if result == "watchdog":
        return RootCause("It stopped answering systemd's watchdog (hung).", "high", evidence,
                         "Look for a deadlock or a blocking call; the journal lines show its last words.")
    if result == "timeout":
        return RootCause("It did not start or stop within its time limit.", "medium", evidence,
                         "Check what it waits for at start (database, network) and TimeoutStartSec=.")
    leftovers = [p for p in diag.holders if belongs_to_unit(p, svc.unit)
                 and str(p.pid) != diag.unit.get("MainPID", "")]
    if leftovers and code in ("killed", "dumped", "exited") and diag.active_state in ("failed", "inactive"):
        return RootCause("Its main process ended (%s %s) and a leftover process of its own kept port %s, so a "
                         "new run could not bind it: %s." % (code, status, svc.port, describe_process(leftovers[0])),
                         "high", "port %s held by %s" % (svc.port, describe_process(leftovers[0])),
                         "Its processes outlive the main one (KillMode=process or mixed, or a forked child): "
                         "let systemd stop the whole service (KillMode=control-group) or have the child exit "
                         "with its parent. Why the main process ended: the journal lines below.")
    if result == "signal" or code == "killed":
        if status == "KILL":
            return RootCause("It was killed with SIGKILL from outside the service (an operator, a script, "
                             "or the kernel); systemd does not report an out-of-memory kill here.",
                             "medium", evidence,
                             "If nobody killed it on purpose, check `journalctl -k` for the kernel's view "
                             "and who else runs on this host.")
        return RootCause("It was ended by signal %s." % status, "medium", evidence,
                         "Find who sent the signal; the journal lines show what it was doing.")
    if code == "exited" and status not in ("", "0"):
        if found:
            kind, line = found
            return RootCause("It exited with status %s: %s." % (status, kind.cause), kind.confidence, line,
                             kind.advice)
        raised = exception_line(diag.journal)
        if raised:
            return RootCause("It exited with status %s: an unhandled %s in its own code." % (status, raised[0]),
                             "medium", raised[1], "The traceback in the journal lines below shows where it was "
                             "raised: that is a bug (or input it cannot handle), which a restart does not fix.")
        own = own_lines(diag.journal)
        return RootCause("It exited with status %s; its journal does not say why." % status, "low",
                         own[-1] if own else evidence,
                         "Read the journal lines below: the service's last words usually name the cause.")
    if found and result not in ("", "success"):  # a start that failed without an exit status of its own
        return RootCause("It failed (systemd result %s): %s." % (result, found[0].cause), found[0].confidence,
                         found[1], found[0].advice)
    if diag.active_state == "inactive":
        return RootCause("It was not running (stopped, or never started).", "low", evidence,
                         "If it was stopped on purpose, pause selfheal for it: selfheal pause %s." % svc.name)
    return RootCause("systemd reports it %s (result %s)." % (diag.active_state or "unknown", result or "unknown"),
                     "low", evidence, "Read the journal lines below.")


SYSTEMD_LINE_RE = re.compile(r"^(?:\S+ ){1,2}systemd\[1\]: ")
EXCEPTION_RE = re.compile(r"\]: (?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception))(?::|$)")


def own_lines(journal: Sequence[str]) -> List[str]:
    """The lines the service wrote itself: not systemd's about it ("Triggering OnFailure=")."""
    return [line for line in journal if not SYSTEMD_LINE_RE.match(line)]


def exception_line(journal: Sequence[str]) -> Optional[Tuple[str, str]]:
    """(exception name, its line) of the last Python traceback's last line in the service's own lines."""
    for line in reversed(own_lines(journal)):
        match = EXCEPTION_RE.search(line)
        if match:
            return match.group(1), line
    return None


def format_bytes(value: str) -> str:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return ""
    if number <= 0 or number >= 2 ** 63:  # systemd says [not set] as UINT64_MAX
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if number < 1024 or unit == "GiB":
            return ("%d %s" % (number, unit)) if unit == "B" else ("%.1f %s" % (number, unit))
        number /= 1024.0
    return ""


# =============================================================================
# Verification
# =============================================================================


def probe(svc: Service, health: bool = True, within_seconds: Optional[float] = None
          ) -> Tuple[Tuple[Check, ...], Dict[str, str]]:
    """One look at the service: unit active, then port listening, then health URL answering
    (within_seconds: the health check gets no more than that, however long health_timeout).

    The port counts only when a process of the unit holds it (port_holder): a stale or
    foreign listener is not the new run, which is about to fail on bind. When the holder
    cannot be told, listening counts, and the check's detail says so.
    Each check runs only when the one before it passed. Returns the checks and the unit's
    properties as seen.
    """
    unit = SHARED.unit(svc.unit) if SHARED is not None else show_unit(svc.unit)
    if finished_oneshot(unit):  # its run is its whole life: judged by the run's result
        return (Check("unit", True, "%s (%s): a oneshot job whose run succeeded (exit status %s)" % (
            unit.get("ActiveState", "unknown"), unit.get("SubState", "unknown"), unit.get("ExecMainStatus") or "0")),), unit
    port = None
    if svc.port and unit.get("ActiveState") == "active":
        inodes = listen_inodes(svc.port)
        listening = bool(inodes) if inodes is not None else bool(listeners_on(svc.port))
        detail = "%d %s" % (svc.port, "listening" if listening else "not listening")
        owner = PortOwner.OWN if listening else None
        main = main_holds_port(inodes, int(unit.get("MainPID") or 0), svc.unit, unit.get("ControlGroup", "")) \
            if inodes else None
        if main is not None:
            detail += " (pid %d of %s)" % (main.pid, svc.unit)
        elif listening and svc.port_owner == "any":
            detail += " (port_owner = any: whoever holds it)"
        elif listening:  # but by whom: a stale or foreign process makes the new run fail to bind
            owner, who = port_holder(svc.port, svc.unit, unit.get("ControlGroup", ""),
                                     since=parse_usec_timestamp(unit.get("InactiveExitTimestampMonotonic", "")))
            if owner in PORT_TAKEN:
                listening, detail = False, "%d %s" % (svc.port, who)
                if owner is PortOwner.FOREIGN:
                    detail += " (if that process serves the port for %s, e.g. docker-proxy, set " \
                              "port_owner = any in [%s])" % (svc.unit, svc.name)
            else:
                detail += " (%s)" % (who if owner is PortOwner.OWN else who + "; counted as the service's")
        port = Check("port", listening, detail, owner)
    if within_seconds is not None and within_seconds < svc.health_timeout:
        svc = dataclasses.replace(svc, health_timeout=max(within_seconds, 0.1))
    checked = svc
    return judge(svc, unit, port, (lambda: health_check(checked, unit)) if health else None), unit


def judge(svc: Service, unit: Dict[str, str], port: Optional[Check],
          health: Optional[Callable[[], Tuple[bool, str]]]) -> Tuple[Check, ...]:
    """The one judgement of a service's health, for verify and the watch alike: the unit is
    active, then its port (a Check: listening, and held by the unit; None when it has no port
    or that is not known), then its health check (asked only when all before it passed;
    None: no check, or not asked). Each check counts only when the ones before it passed."""
    state = "%s (%s)" % (unit.get("ActiveState") or "unknown", unit.get("SubState") or "unknown")
    checks = [Check("unit", unit.get("ActiveState") == "active", state)]
    if port is not None and checks[-1].ok:
        checks.append(port)
    if health is not None and (svc.health_url or svc.health_command) and all(c.ok for c in checks):
        ok, detail = health()
        checks.append(Check("health", ok, detail if svc.health_command else "GET %s: %s" % (
            display_url(svc.health_url), detail)))
    return tuple(checks)


def verify(svc: Service, timeout: float, clock=time.monotonic, sleep=time.sleep) -> Verification:
    """Poll until every check holds (success at once) or the deadline passes.

    Gives up early when systemd has definitely given up: the unit is failed, or inactive
    with no job pending, so a unit that cannot start is not waited on for the full deadline.
    """
    start = clock()
    taken: Optional[Check] = None  # the port held by another process, as seen while it was up
    # With neither port nor health check, "active" alone proves little: a run that dies a
    # second after its start was active too. It must stay active, the same run, for SETTLE.
    settle = SETTLE_SECONDS if not (svc.port or svc.health_url or svc.health_command) else 0.0
    steady_since, steady_run = None, ""
    while True:
        # The health check gets only what is left of the timeout: verify never runs past it.
        checks, unit = probe(svc, within_seconds=timeout - (clock() - start))
        elapsed = clock() - start
        if all(c.ok for c in checks):
            run_id = unit.get("InvocationID", "")
            if settle and not finished_oneshot(unit):
                if steady_since is None or run_id != steady_run:
                    steady_since, steady_run = clock(), run_id
                if clock() - steady_since < settle:
                    sleep(POLL_INTERVAL)
                    continue
            return Verification(True, elapsed, checks, unit)
        steady_since = None
        taken = next((c for c in checks if c.name == "port" and c.owner in PORT_TAKEN), taken)
        state = unit.get("ActiveState", "")
        given_up = state == "failed" or (state == "inactive" and elapsed > 1.0)
        if given_up or elapsed >= timeout:
            if taken and not any(c.name == "port" for c in checks):  # it failed on bind, most likely
                checks += (Check("port", False, taken.detail + " (while the unit was up)", taken.owner),)
            return Verification(False, elapsed, checks, unit)
        if svc.port and checks[-1].name == "port" and not checks[-1].ok and checks[-1].owner is None:
            wait_for_listener(svc.port, POLL_INTERVAL, clock, sleep)  # the next probe as soon as it binds
        else:
            sleep(POLL_INTERVAL)


def wait_for_listener(port: int, seconds: float, clock=time.monotonic, sleep=time.sleep) -> None:
    """Wait up to `seconds` for something to listen on port, asking the kernel every 5 ms (a
    netlink question costs about 0.1 ms): the probe that follows comes when the service binds."""
    end = clock() + seconds
    while clock() < end:
        ports = SHARED.ports() if SHARED is not None else listening_ports()
        if ports is None or port in ports:
            return
        sleep(min(LISTENER_POLL, max(0.0, end - clock())))


LISTENER_POLL = 0.005


class SharedLook:
    """While one process heals a burst, its heals' verifications share what they poll: one
    `systemctl show` for every unit being verified, at most once per POLL_INTERVAL, and one
    list of listening sockets per LISTENER_POLL, instead of one each per heal. A unit that a
    heal just acted on (restart) is asked afresh at its next look."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()
        self.units: Dict[str, Dict[str, str]] = {}
        self.stale: set = set()
        self.shown_at = 0.0
        self.ports_at, self.listening = 0.0, None  # type: Tuple[float, Optional[set]]

    def unit(self, unit: str) -> Dict[str, str]:
        with self.lock:
            fresh = time.monotonic() - self.shown_at < POLL_INTERVAL
            if not (fresh and unit in self.units and unit not in self.stale and self.units[unit]):
                wanted = sorted(set(self.units) | {unit})
                self.units.update(show_units(wanted))
                self.shown_at, self.stale = time.monotonic(), set()
            return dict(self.units.get(unit) or {})

    def acted(self, unit: str) -> None:
        with self.lock:
            self.stale.add(unit)

    def ports(self) -> Optional[set]:
        with self.lock:
            if time.monotonic() - self.ports_at >= LISTENER_POLL:
                self.listening, self.ports_at = listening_ports(), time.monotonic()
            return self.listening


SHARED: Optional[SharedLook] = None  # set while a burst's leader heals more than one service


# =============================================================================
# Strategies: what selfheal does
# =============================================================================


class HealContext:
    """What a strategy needs: the service, its diagnosis, the settings; collects actions."""

    def __init__(self, svc: Service, diag: Diagnosis, settings: Settings, dry_run: bool = False,
                 paths: Optional[Paths] = None, deadline: Optional[float] = None):
        self.svc = svc
        self.diag = diag
        self.settings = settings
        self.dry_run = dry_run
        self.paths = paths or Paths()
        # heal_timeout for the whole heal (time.monotonic()); every step gets what is left.
        self.deadline = deadline if deadline is not None else time.monotonic() + settings.heal_timeout
        self.actions: List[Action] = []
        self.found: List[str] = []  # what a check saw, for the report, whether or not it acted
        self.config_broken = triage(diag)[0] in CONFIG_BROKEN_KINDS  # the evidence says so
        self.asked = False  # a heal asked for (by hand, or a retry): it may clear systemd's start limit

    def systemctl(self, verb: str, timeout: Optional[float] = None) -> bool:
        argv = [SYSTEMCTL, verb, "--", self.svc.unit]
        what = "systemctl %s %s" % (verb, self.svc.unit)
        if self.dry_run:
            self.actions.append(Action(what, True, 0.0, "dry run: not done"))
            return True
        result = run(argv, timeout=timeout or self.job_timeout())
        if SHARED is not None:
            SHARED.acted(self.svc.unit)
        self.actions.append(Action(what, result.ok, result.seconds, "" if result.ok else result.brief(),
                                   starts=verb in ("restart", "start")))
        return result.ok

    def job_timeout(self) -> float:
        """How long a restart job may take: the unit's own stop timeout when it runs (a unit
        that ignores SIGTERM takes TimeoutStopSec=) and its start timeout up to verify_timeout,
        at least verify_timeout, at most 10 min."""
        unit = self.diag.unit
        # The start gets verify_timeout at most: a run not up by then is not healthy in time
        # either (PostgreSQL's start with a bad config waits for a PID file that never comes).
        start = min(parse_timespan(unit.get("TimeoutStartUSec", "")), self.settings.verify_timeout)
        # Nothing to stop in a unit that is down (failed, inactive): its start is the whole job.
        stop = parse_timespan(unit.get("TimeoutStopUSec", "")) if self.diag.active_state not in ("failed", "inactive") else 0.0
        own = stop + start
        return min(MAX_JOB_SECONDS, max(self.settings.verify_timeout, own + 5.0), self.left())

    def left(self, at_most: float = MAX_JOB_SECONDS) -> float:
        """Seconds of heal_timeout left for the next step (at least 1: a step that gets no
        time at all says nothing about what it would have found)."""
        return max(1.0, min(at_most, self.deadline - HEAL_RESERVE - time.monotonic()))

    def record(self, what: str, ok: bool, seconds: float = 0.0, detail: str = "") -> None:
        self.actions.append(Action(what, ok, seconds, detail))


def strategy_service_restart(ctx: HealContext) -> str:
    """Restart the unit; clear systemd's start limit first when it was hit, unless the
    evidence says the config is broken (then the limit is what stops a loop: kept)."""
    unit = ctx.diag.unit
    refuse_futile_restart(ctx)
    keep_limit = ctx.config_broken and not ctx.asked
    limit_hit = unit.get("Result") == "start-limit-hit" or ctx.diag.result == "start-limit-hit"
    if limit_hit and keep_limit:
        return ("not restarted: systemd's start limit holds it and the evidence says its config is broken; "
                "reset-failed would re-arm its Restart= loop. Fix the config: the next retry picks it up")
    if limit_hit:
        ctx.systemctl("reset-failed", timeout=COMMAND_TIMEOUT)
    if unit.get("LoadState") in ("masked", "not-found"):
        return "not restarted: the unit is %s" % unit.get("LoadState")
    if not ctx.systemctl("restart") and not keep_limit:
        now = show_unit(ctx.svc.unit)
        state = now.get("ActiveState", "")
        if state == "deactivating" or (state == "activating" and "timed out after" in ctx.actions[-1].detail):
            # The job never finished: a stop that hangs (a service that will not exit, Redis
            # that cannot save, TimeoutStopSec=infinity) or a start that does. Not systemd's
            # start limit, and no second restart on top.
            phase, limit = (("stop", "TimeoutStopSec=%s" % (unit.get("TimeoutStopUSec") or "?")) if state == "deactivating"
                            else ("start", "TimeoutStartSec=%s" % (unit.get("TimeoutStartUSec") or "?")))
            step = ctx.actions[-1]
            ctx.actions[-1] = dataclasses.replace(step, detail="%s; its %s was still running (%s (%s), %s)" % (
                step.detail, phase, state, now.get("SubState", "?"), limit))
            return "the restart did not finish (its %s hangs): selfheal did not restart it again" % phase
        # Refused without a new run: systemd's start limit ("Start request repeated too
        # quickly"; systemd 252 leaves Result= at the old failure, so the unchanged
        # InvocationID is the tell). selfheal's own crash-loop guard is failure_threshold:
        # clear systemd's counter and try once more.
        if now.get("Result") == "start-limit-hit" or now.get("InvocationID") == unit.get("InvocationID"):
            ctx.systemctl("reset-failed", timeout=COMMAND_TIMEOUT)
            ctx.systemctl("restart")
            return "systemd refused the first restart (start limit); reset-failed, then restarted"
    return ""


def refuse_futile_restart(ctx: HealContext) -> None:
    """Raise Escalation, restarting nothing, where a restart cannot help: the service answers
    that it cannot write its data (not a hang: a restart loses what it holds and may never
    finish), or a process of no unit of its own holds its port while it is down."""
    svc, diag = ctx.svc, ctx.diag
    finding = diag.finding
    if finding and finding.kind == "unhealthy" and NOT_A_HANG_RE.search(finding.detail):
        raise Escalation("%s answers its health check but reports a problem with its data (%s); selfheal "
                         "restarted nothing: that is not a hang, a restart cannot fix it and would lose what it "
                         "holds in memory. Fix what it names, then: selfheal heal %s"
                         % (svc.unit, finding.detail, svc.name), root_cause(svc, diag))
    found = journal_kind(diag.journal)
    # A heal asked for (by hand, or the watch's retry) gets its one start: that is how a
    # config fixed by hand is picked up without a command (issue 21's breaker never abandons).
    if found and found[0].kind == "bad_config" and not svc.config_check and diag.active_state not in LIVE_STATES \
            and not ctx.asked:
        raise Escalation("%s's failed run said its configuration is invalid (%s); with no config_check to prove "
                         "it fixed, selfheal restarted nothing: a restart would start it into the same config "
                         "(and loop). Fix the config, then: selfheal heal %s" % (svc.unit, found[1], svc.name),
                         root_cause(svc, diag))
    if not svc.port or svc.port_owner == "any" or diag.active_state in LIVE_STATES:
        return
    foreign = [p for p in diag.holders if p.pid != 1 and not belongs_to_unit(p, svc.unit)]
    if foreign:
        who = "; ".join(describe_process(p) for p in foreign)
        raise Escalation("port %d is held by a process that is not %s's (%s), so selfheal restarted nothing: the "
                         "new run could not bind it. Stop that process (or move one of them to another port), "
                         "then: selfheal heal %s. If that process serves the port for %s (docker-proxy), set "
                         "port_owner = any in [%s]" % (svc.port, svc.unit, who, svc.name, svc.unit, svc.name),
                         RootCause("It cannot start: port %d is held by another process: %s." % (svc.port, who),
                                   "high", "port %d held by %s" % (svc.port, who),
                                   "Find out why that process runs (systemctl status %d) and stop it, or give one "
                                   "of them another port; selfheal never signals a process that is not the "
                                   "service's own." % foreign[0].pid))


def strategy_port_conflict(ctx: HealContext) -> str:
    """Free the port from a stale process of the service itself, then restart.

    Only a process proven to be in the service's own cgroup, and not its live main
    process, is ever signalled. Anything else holding the port is named, not touched.
    """
    svc = ctx.svc
    if not svc.port:
        return "no port configured"
    listeners = ctx.diag.listeners  # who held the port when the diagnosis ran, moments ago
    pids = sorted({pid for lst in listeners for pid in lst.pids})
    if not listeners:
        return "port %d is free; nothing to do" % svc.port
    if not pids:
        return "port %d is held, but the holder is unknown (not root?); nothing killed" % svc.port
    stale, foreign = [], []
    for pid in pids:
        process = read_process(pid)
        if process is None:
            continue
        if pid in (1, os.getpid()) or not belongs_to_unit(process, svc.unit):
            foreign.append(process)
        else:
            stale.append(process)
    if foreign:
        raise Escalation("port %d is held by %s; selfheal only stops processes of %s"
                         % (svc.port, "; ".join(describe_process(p) for p in foreign), svc.unit))
    unit = show_unit(svc.unit)
    main_pid = int(unit.get("MainPID") or 0)
    if main_pid and read_process(main_pid) is not None:
        # A live main process: the others holding the socket are its workers, not leftovers.
        return "port %d is held by the running %s itself (main pid %d); nothing to free" % (
            svc.port, svc.unit, main_pid)
    if unit.get("ActiveState") in LIVE_STATES and unit.get("SubState") != "auto-restart":
        # A live unit without a main pid (oneshot + RemainAfterExit=, forking without
        # PIDFile=): its processes are its current run, stopped only by systemd (ExecStop=,
        # TimeoutStopSec=), never signalled by selfheal. The restart that follows does that.
        return "port %d is held by %s, which is %s: its current run, not a leftover; nothing signalled" % (
            svc.port, svc.unit, unit.get("ActiveState"))
    since = parse_usec_timestamp(unit.get("InactiveExitTimestampMonotonic", ""))
    for process in stale:
        terminate(ctx, process, since)
    if unit.get("Result") == "start-limit-hit":
        ctx.systemctl("reset-failed", timeout=COMMAND_TIMEOUT)
    ctx.systemctl("restart")
    return ""


def describe_process(p: Process) -> str:
    age = " running for %s" % format_duration(p.age_seconds) if p.age_seconds is not None else ""
    return "pid %d (user %s, cgroup %s%s): %s" % (p.pid, p.user, p.cgroup or "?", age, p.cmdline[:200])


def terminate(ctx: HealContext, process: Process, since: Optional[float] = None) -> None:
    """SIGTERM, wait up to KILL_GRACE, then SIGKILL; re-checking before each signal that it is
    still the unit's, and still a leftover: once the unit runs again, a process that is not
    older than that run (since: its InactiveExitTimestampMonotonic) is never signalled."""
    what = "stop stale %s" % describe_process(process)
    if ctx.dry_run:
        ctx.record(what, True, 0.0, "dry run: not done")
        return
    start = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        current = read_process(process.pid)
        if current is None:
            break
        if not belongs_to_unit(current, ctx.svc.unit):  # pid reused: not ours any more
            ctx.record(what, False, time.monotonic() - start, "pid %d left the unit's cgroup; not signalled" % process.pid)
            return
        unit = show_unit(ctx.svc.unit)
        if unit.get("ActiveState") in LIVE_STATES and unit.get("SubState") != "auto-restart":
            begun = parse_usec_timestamp(unit.get("InactiveExitTimestampMonotonic", ""))
            if begun != since and not leftover(current, begun):
                ctx.record(what, False, time.monotonic() - start, "%s started again (%s); pid %d may be part "
                           "of its new run: not signalled" % (ctx.svc.unit, unit.get("ActiveState"), process.pid))
                return
        if not send_signal(process.pid, sig, ctx.svc.unit):
            break  # it ended by itself meanwhile
        deadline = time.monotonic() + KILL_GRACE
        while time.monotonic() < deadline and read_process(process.pid) is not None:
            time.sleep(POLL_INTERVAL)
        if read_process(process.pid) is None:
            ctx.record(what, True, time.monotonic() - start, "ended by %s" % sig.name)
            return
    gone = read_process(process.pid) is None
    ctx.record(what, gone, time.monotonic() - start, "ended" if gone else "still running after SIGKILL")


def send_signal(pid: int, sig: int, unit: str) -> bool:
    """Signal pid if it still belongs to unit. False when it is gone.

    With a pidfd (Linux 5.3+), ownership is checked on the very process that gets the
    signal, so a pid reused in between cannot be hit; otherwise the check is a moment older.
    """
    pidfd = None
    try:
        if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
            try:
                pidfd = os.pidfd_open(pid)
            except OSError as exc:
                if exc.errno == errno.ESRCH:
                    return False
                pidfd = None  # no pidfd here (old kernel, seccomp): fall back
        current = read_process(pid)
        if current is None or not belongs_to_unit(current, unit):
            return False
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


# --- config_validation -------------------------------------------------------


def refusal_escalation(svc: Service, refusals: Sequence[str], not_done: str) -> Escalation:
    """What selfheal found and would not act through: FAILED, with what to do by hand."""
    paths = [r.split(" ")[1] for r in refusals if len(r.split(" ")) > 1]
    cause = RootCause("A path the service's account controls is not what selfheal may safely touch: %s."
                      % "; ".join(refusals), "high", refusals[0],
                      "selfheal runs as root and never acts through a link the service's account could "
                      "have planted, a FIFO or a device. Look at who made it and why; make it a regular file "
                      "(or a link of root's), then heal again.")
    steps = ("ls -la %s" % " ".join(dict.fromkeys(paths)),
             "namei -l %s    # who owns every component" % " ".join(dict.fromkeys(paths)),
             "selfheal heal %s    # once it is fixed" % svc.name)
    return Escalation("selfheal refused to act: %s. %s" % ("; ".join(refusals), not_done), cause, steps)


def root_command_escalation(svc: Service, key: str, refused: Sequence[str], not_done: str) -> Escalation:
    """A command services.conf has root run that is not root's alone: FAILED, nothing run."""
    cause = RootCause("selfheal would have run %s as root, but it is not root's alone: %s." % (key, "; ".join(refused)),
                      "high", refused[0],
                      "Whoever may change a program root runs, a file it is given or a directory above "
                      "them, can run anything as root. Make them root's (chown root:root, chmod go-w), "
                      "or, for a health_command, let it run as the service (health_run_as = service).")
    paths = sorted({problem.split(":", 1)[0] for problem in refused})
    steps = ("namei -l %s    # who owns every component" % " ".join(paths),
             "selfheal validate    # says the same until it is fixed",
             "selfheal heal %s    # once it is fixed" % svc.name)
    return Escalation("selfheal refused to run %s as root: %s. %s" % (key, "; ".join(refused), not_done),
                      cause, steps)


def strategy_config_validation(ctx: HealContext) -> str:
    """Run the service's own config checker: a config it rejects is never restarted into a
    loop; one it accepts is restarted. Shows what changed in config_files since the last
    healthy start."""
    svc = ctx.svc
    refusals = []
    for path in svc.config_files:
        try:
            stat_safely(path, "config_files", "file")
        except Refused as exc:
            refusals.append(str(exc))
        except OSError:
            pass  # missing: config_changes and the checker say so
    if refusals:  # the checker (as root) would read through it too, into the report
        ctx.record("config files: %s" % ", ".join(svc.config_files), False, 0.0, "; ".join(refusals))
        raise refusal_escalation(svc, refusals, "Neither the config check nor a restart was run.")
    ctx.found.extend(config_changes(ctx.paths, svc))
    refuse_futile_restart(ctx)  # before the checker: `nginx -t` binds the port, and fails on a squatter
    if svc.config_check:
        argv = command_argv(svc.config_check)
        what = "config check: %s" % " ".join(svc.config_check)
        refused = root_only_problems(argv) if is_root() else []  # again now: swapped since install?
        if refused:
            ctx.record(what, False, 0.0, "not run: " + "; ".join(refused))
            raise root_command_escalation(svc, "config_check", refused,
                                          "Neither the config check nor a restart was run.")
        result = run_command(argv, ctx.left(60))
        output = bounded_lines(one_line(line) for line in (result.out + result.err).strip().splitlines()[-20:])
        # It runs as root and reads what the config names: when the service's account owns a
        # config file, it could make the checker read (and quote) any file. Then only its exit
        # status is reported; the owner runs the checker to read its words.
        theirs = [path for path, owner in config_owners(svc) if owner != 0]
        if theirs and output:
            output = ["(its output is not shown: %s %s the service account's, so it could quote any file "
                      "root can read; run `%s` to see it)" % (", ".join(theirs), "is" if len(theirs) == 1
                                                                else "are", " ".join(svc.config_check))]
        ctx.record(what, result.ok, result.seconds, "\n".join(output) or "exit status %d" % result.rc)
        if result.rc in (124, 126, 127):  # not found, not executable, timed out: no verdict
            raise Escalation("the config check `%s` could not run (%s), so %s was not restarted. Fix "
                             "config_check, then: selfheal heal %s" % (" ".join(svc.config_check),
                                                                         result.brief(), svc.unit, svc.name))
        if not result.ok:
            said = next((line for line in output if CHECK_ERROR_RE.search(line)), output[0] if output else "")
            kind = journal_kind([said]) if said and not theirs else None
            what = ("Its own check `%s` fails: %s" % (" ".join(svc.config_check), kind[0].cause)
                    if kind and kind[0].kind != "bad_config" else  # a missing directory, a port taken...
                    "Its configuration is invalid: its own check `%s` rejects it" % " ".join(svc.config_check))
            cause = RootCause("%s%s." % (what, ": " + said if said and not theirs else " (exit status %d)" % result.rc),
                "high", said or "config check: exit status %d" % result.rc,
                "Fix what the check names, run it again by hand, then: selfheal heal %s" % svc.name)
            raise Escalation("the config check `%s` failed (exit status %d), so %s was not restarted: a "
                             "restart cannot fix a config its own checker rejects. Fix the config, then: "
                             "selfheal heal %s" % (" ".join(svc.config_check), result.rc, svc.unit, svc.name), cause)
    if ctx.config_broken and not ctx.asked and not svc.config_check and \
            show_unit(svc.unit).get("Result") == "start-limit-hit":
        return ("not restarted: systemd's start limit holds it and the evidence says its config is broken "
                "(no config_check to say it is fixed); reset-failed would re-arm its Restart= loop")
    restart(ctx)
    return ""


CHECK_ERROR_RE = re.compile(r"\[emerg\]|\berror\b|invalid|fatal|unknown|not terminated|failed", re.I)


def config_owners(svc: Service) -> List[Tuple[str, int]]:
    """(path, owner uid) of each config file open_safely reaches; one it cannot is left out
    (the strategy refuses those before the checker runs)."""
    owners = []
    for path in svc.config_files:
        with contextlib.suppress(OSError, Refused):
            owners.append((path, stat_safely(path, "config_files", "file").st_uid))
    return owners


def restart(ctx: HealContext) -> None:
    """The restart that ends a repair; clears systemd's start limit first when it was hit."""
    refuse_futile_restart(ctx)
    if show_unit(ctx.svc.unit).get("Result") == "start-limit-hit":
        ctx.systemctl("reset-failed", timeout=COMMAND_TIMEOUT)
    ctx.systemctl("restart")


SECRET_RE = re.compile(r"(pass|secret|token|key|credential)\w*(\s*[=:]|\s+\S)", re.I)


def baseline_dir(paths: Paths, name: str) -> Path:
    return paths.state / "baseline" / name


def remember_config_files(paths: Paths, svc: Service, unit: Dict[str, str]) -> None:
    """Keep a copy of each config file the running service started with (its mtime is older
    than the start), so a later failure can show what changed since the last healthy start."""
    started = parse_usec_timestamp(unit.get("ActiveEnterTimestampMonotonic", ""))
    if not svc.config_files or not started:
        return
    started_wall = time.time() - (time.monotonic() - started)
    meta_path = baseline_dir(paths, svc.name) / "index.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    changed = False
    for number, path in enumerate(svc.config_files):
        try:
            st = stat_safely(path, "config_files", "file")
            if st.st_mtime > started_wall or st.st_size > SAFE_READ_LIMIT:
                continue  # changed after the start (not what it runs with), or too big to keep
            known = meta.get(path, {})
            if known.get("mtime") == st.st_mtime and known.get("size") == st.st_size:
                continue
            copy = baseline_dir(paths, svc.name) / ("%d.copy" % number)
            text, st = read_safely(path, "config_files")
            atomic_write(copy, text, 0o600)
        except (OSError, Refused):
            continue  # a link of the service's account, a FIFO...: config_changes says so
        meta[path] = {"mtime": st.st_mtime, "size": st.st_size, "copy": str(copy), "kept": time.time()}
        changed = True
    if changed:
        atomic_write(meta_path, json.dumps(meta, sort_keys=True) + "\n", 0o600)


def config_changes(paths: Paths, svc: Service) -> List[str]:
    """config_files changed since the last healthy start: name, mtime, size, and a diff (lines
    that look like secrets masked)."""
    import difflib

    try:
        meta = json.loads((baseline_dir(paths, svc.name) / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    lines = []
    for path in svc.config_files:
        known = meta.get(path)
        try:
            st = stat_safely(path, "config_files", "file")
        except Refused as exc:
            lines.append(str(exc))
            continue
        except OSError as exc:
            lines.append("%s: %s" % (path, exc.strerror))
            continue
        if not known:
            lines.append("%s: modified %s, %d bytes (no copy from a healthy start to compare)" % (
                path, iso(st.st_mtime), st.st_size))
            continue
        if known["mtime"] == st.st_mtime and known["size"] == st.st_size:
            lines.append("%s: unchanged since the last healthy start" % path)
            continue
        lines.append("%s: CHANGED since the last healthy start: modified %s (was %s), %d bytes (was %d)" % (
            path, iso(st.st_mtime), iso(known["mtime"]), st.st_size, known["size"]))
        try:
            old = Path(known["copy"]).read_text(encoding="utf-8", errors="replace").splitlines()
            new = read_safely(path, "config_files")[0].splitlines()
        except Refused as exc:
            lines.append("    " + str(exc))
            continue
        except OSError:
            continue
        if len(old) > MAX_DIFF_LINES or len(new) > MAX_DIFF_LINES:  # difflib is quadratic at worst
            lines.append("    (not compared line by line: over %d lines)" % MAX_DIFF_LINES)
            continue
        diff = list(difflib.unified_diff(old, new, "%s (healthy start)" % path, "%s (now)" % path, lineterm="", n=2))
        for line in diff[:40]:
            lines.append("    " + bounded(clean(line[:1] + " [a line that looks like a secret]" if SECRET_RE.search(
                line[1:]) and line[:1] in "+- " and not line.startswith(("---", "+++")) else line)))
        if len(diff) > 40:
            lines.append("    ... (%d more lines)" % (len(diff) - 40))
    return lines


# --- environment_check -------------------------------------------------------


def parse_env_file(text: str) -> Tuple[Dict[str, Tuple[int, str]], List[str]]:
    """systemd's EnvironmentFile= syntax -> ({name: (line, value)}, problems)."""
    names: Dict[str, Tuple[int, str]] = {}
    problems = []
    lines = text.split("\n")
    number = 0
    while number < len(lines):
        start = number + 1
        line = lines[number]
        number += 1
        while line.endswith("\\") and number < len(lines):  # continued on the next line
            line = line[:-1] + lines[number]
            number += 1
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        if stripped.startswith("export "):
            stripped = stripped[len("export "):].lstrip()
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            # Never quoted: the line may be a secret whose name is misspelt (STRIPE-KEY=sk_...).
            problems.append("line %d: not NAME=value (a name has only letters, digits and _; "
                            "the line is not shown: it may hold a secret)" % start)
            continue
        value = value.strip()
        quote = value[:1] if value[:1] in ("'", '"') else ""
        parts = [value]
        while quote and not (len(parts[-1]) >= (2 if len(parts) == 1 else 1) and parts[-1].endswith(quote)) \
                and number < len(lines):
            parts.append(lines[number].rstrip())  # a quoted value may span lines
            number += 1
        value = "\n".join(parts)
        if quote and len(value) >= 2 and value.endswith(quote):
            value = value[1:-1]
        elif quote:
            problems.append("line %d: %s: the quote is not closed" % (start, key))
            continue
        names[key] = (start, value)
    return names, problems


def unit_env_files(unit: Dict[str, str]) -> List[Tuple[str, bool]]:
    """EnvironmentFiles= of `systemctl show`: [(path, may be missing)]."""
    files = []
    for entry in re.findall(r"(\S+) \(ignore_errors=(yes|no)\)", unit.get("EnvironmentFiles", "")):
        files.append((entry[0], entry[1] == "yes"))
    return files


def strategy_environment_check(ctx: HealContext) -> str:
    """Check the environment the unit starts with: its EnvironmentFile= entries and env_file,
    and that every required_env name is set and not empty. Reports file, line and name;
    never writes or invents a value. Acts on nothing: a problem stops the heal with a report."""
    svc = ctx.svc
    unit = show_unit(svc.unit)
    files = unit_env_files(unit) + [(path, False) for path in svc.env_file if path not in
                                    [f for f, _ in unit_env_files(unit)]]
    problems, warnings, seen = [], [], {}
    env_values = {}
    for name, value in re.findall(r'(?:^|\s)"?([A-Za-z_][A-Za-z0-9_]*)=([^\s"]*)', unit.get("Environment", "")):
        seen.setdefault(name, "Environment= in %s" % svc.unit)
        env_values[name] = value
    refusals = []
    for path, optional in files:
        key = "env_file" if path in svc.env_file else "EnvironmentFile="
        try:
            text, st = read_safely(path, key)
        except Refused as exc:
            refusals.append(str(exc))
            continue
        except FileNotFoundError:
            if not optional:
                problems.append("%s: missing (the unit's EnvironmentFile= needs it)" % path)
            continue
        except OSError as exc:
            problems.append("%s: cannot read: %s" % (path, exc.strerror))
            continue
        names, bad = parse_env_file(text)
        problems.extend("%s: %s" % (path, b) for b in bad)
        for name, (line, value) in names.items():
            seen[name] = "%s:%d" % (path, line)
            if value == "" and name in svc.required_env:
                problems.append("%s:%d: %s is empty" % (path, line, name))
        secrets = [n for n in names if re.search(r"PASS|SECRET|TOKEN|KEY", n, re.I)]
        if st.st_mode & 0o004 and secrets:
            warnings.append("%s is readable by everyone and holds %s (chmod o-r %s)" % (
                path, ", ".join(sorted(secrets)), path))
    for name in svc.required_env:
        if seen.get(name, "").startswith("Environment=") and env_values.get(name) == "":
            problems.append("%s is empty (Environment= in %s)" % (name, svc.unit))
        if name not in seen:
            where = ", ".join(path for path, _ in files) or "no environment file"
            problems.append("%s is not set (looked in %s and the unit's Environment=)" % (name, where))
    if refusals:
        ctx.record("environment check: %s" % ", ".join(path for path, _ in files), False, 0.0, "; ".join(refusals))
        raise refusal_escalation(svc, refusals, "%s was not restarted." % svc.unit)
    ctx.found.extend(problems + ["warning: " + w for w in warnings])
    checked = ", ".join(path for path, _ in files) or "no environment files"
    ctx.record("environment check: %s" % checked, not problems, 0.0,
               "%d problem(s)" % len(problems) if problems else "%d name(s) set, required ones present" % len(seen))
    if problems:
        raise Escalation("the environment of %s is broken, so it was not restarted: %s. Fix it (selfheal "
                         "never writes values), then: selfheal heal %s" % (svc.unit, "; ".join(problems), svc.name))
    ctx.actions.pop()  # only a check: nothing was changed, the next strategy restarts
    return "environment ok: %s" % checked


# --- database_check ----------------------------------------------------------


def strategy_database_check(ctx: HealContext) -> str:
    """Check the service's data: it exists, owner and mode, free space and inodes, SQLite's
    quick_check (read-only). Repairs only what the config declares: a declared symlink whose
    target exists, the declared owner and mode. Never deletes, moves or truncates data."""
    svc = ctx.svc
    problems, refusals, repaired = [], [], False
    for link, target in svc.symlinks:
        try:
            repaired = restore_symlink(ctx, link, target, problems) or repaired
        except Refused as exc:
            refusals.append(str(exc))
    if svc.db_path:
        try:
            problems.extend(check_db_path(ctx))
        except Refused as exc:
            refusals.append(str(exc))
        repaired = repaired or any(a.ok and a.what.startswith(("chown", "chmod")) for a in ctx.actions)
    if refusals:
        ctx.record("data check: %s" % ", ".join([svc.db_path] * bool(svc.db_path) + [l for l, _ in svc.symlinks]),
                   False, 0.0, "; ".join(refusals))
        raise refusal_escalation(svc, refusals, "%s was not restarted; nothing was changed through it." % svc.unit)
    if problems:
        raise data_escalation(svc, problems)
    if repaired:
        restart(ctx)
        return ""
    if svc.db_path and any(f.startswith("SQLite quick_check: ok") for f in ctx.found):
        return "data checked (SQLite quick_check ok): %s" % "; ".join(ctx.found)
    if svc.db_path and not any(f.startswith("SQLite quick_check") for f in ctx.found):
        return ("data checked: owner, mode and free space only (selfheal looks inside SQLite files, not "
                "other databases): %s" % ("; ".join(ctx.found) or "nothing declared"))
    return "data checked: %s" % ("; ".join(ctx.found) or "nothing declared")


def restore_symlink(ctx: HealContext, link: str, target: str, problems: List[str]) -> bool:
    """A declared symlink, recreated in its directory as opened by open_safely (so a link the
    service's account planted above it cannot redirect the new link), atomically. -> repaired."""
    parent_path, name = os.path.split(link.rstrip("/"))
    parent = open_safely(parent_path or "/", "symlinks", "dir")
    try:
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        current = os.readlink(name, dir_fd=parent.fd) if st and stat.S_ISLNK(st.st_mode) else None
        if current == target and os.path.exists(target):
            ctx.found.append("symlink %s -> %s: ok" % (link, target))
            return False
        if not os.path.exists(target):
            problems.append("symlink %s should point to %s, which does not exist" % (link, target))
            return False
        if st and not stat.S_ISLNK(st.st_mode):
            problems.append("%s should be a symlink to %s but is %s; not touched" % (link, target, file_kind(st.st_mode)))
            return False
        what = "recreate symlink %s -> %s%s" % (link, target, " (it pointed to %s)" % one_line(current) if current else "")
        if ctx.dry_run:
            ctx.record(what, True, 0.0, "dry run: not done")
            return False
        tmp = "%s.selfheal-%d" % (name, os.getpid())
        try:
            os.symlink(target, tmp, dir_fd=parent.fd)
            os.replace(tmp, name, src_dir_fd=parent.fd, dst_dir_fd=parent.fd)  # never a moment without it
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent.fd)
            ctx.record(what, False, 0.0, exc.strerror)
            problems.append("could not recreate %s: %s" % (link, exc.strerror))
            return False
        ctx.record(what, True)
        return True
    finally:
        os.close(parent.fd)


def data_escalation(svc: Service, problems: List[str]) -> Escalation:
    """The data needs a human: that is the root cause, whatever ended the process."""
    message = "the data of %s needs a human: %s" % (svc.unit, "; ".join(problems))
    damaged = next((p for p in problems if p.startswith("SQLite says")), "")
    if damaged:
        path = svc.db_path
        cause = RootCause("Its database is damaged: %s." % damaged, "high", "SQLite quick_check (read-only) on %s" % path,
                          "Do not run it on this file: keep a copy of the damaged file, then restore the "
                          "last good backup (or salvage with sqlite3's .recover into a new file).")
        steps = ("systemctl stop %s" % svc.unit,
                 "cp -a %s %s.damaged    # keep the evidence" % (path, path),
                 "sqlite3 %s 'PRAGMA integrity_check'    # apt-get install sqlite3, if it is missing" % path,
                 "restore %s from a backup (or: sqlite3 %s .recover | sqlite3 %s.recovered)" % (path, path, path))
    else:
        cause = RootCause("Its data needs a human: %s." % "; ".join(problems), "high", problems[0],
                          "Fix what is listed: selfheal restores only a declared symlink, owner and mode, "
                          "and never creates, moves or deletes data.")
        steps = ("ls -l %s" % " ".join([svc.db_path] * bool(svc.db_path) + [link for link, _ in svc.symlinks]),
                 "df -h %s; df -i %s" % ((svc.db_path or "/",) * 2)) if svc.db_path or svc.symlinks else ()
    return Escalation(message, cause, steps)


def check_db_path(ctx: HealContext) -> List[str]:
    """db_path as reached by open_safely: owner and mode restored on the descriptor (as
    declared), free space, SQLite's quick_check. Raises Refused for a path it will not touch."""
    svc, path = ctx.svc, ctx.svc.db_path
    try:
        handle = open_safely(path, "db_path", "any")
    except FileNotFoundError:
        return ["%s is missing; selfheal never creates or restores data" % path]
    except OSError as exc:
        return ["%s: %s" % (path, exc.strerror)]
    try:
        return check_db_handle(ctx, handle)
    finally:
        os.close(handle.fd)


def check_db_handle(ctx: HealContext, handle: SafeFile) -> List[str]:
    svc, path, st, fd, problems = ctx.svc, ctx.svc.db_path, handle.st, handle.fd, []
    if stat.S_ISREG(st.st_mode) and st.st_nlink > 1 and (svc.db_owner or svc.db_mode is not None):
        # Another name for the same file may be anyone's (a hard link to a file of root's).
        raise Refused("db_path %s has %d hard links: its owner and mode are not changed" % (path, st.st_nlink))
    owner = svc.db_owner or show_unit(svc.unit).get("User", "")
    if owner:
        user, _, group = owner.partition(":")
        try:
            uid = pwd.getpwnam(user).pw_uid
            gid = grp.getgrnam(group).gr_gid if group else -1
        except KeyError:
            problems.append("owner %s of %s does not exist on this host" % (owner, path))
        else:
            if st.st_uid != uid or (gid != -1 and st.st_gid != gid):
                fix_attr(ctx, "chown %s %s" % (owner, path), lambda: os.fchown(fd, uid, gid), bool(svc.db_owner),
                         problems, "%s is owned by uid %d, not %s" % (path, st.st_uid, owner))
    if svc.db_mode is not None and (st.st_mode & 0o7777) != svc.db_mode:
        fix_attr(ctx, "chmod %04o %s" % (svc.db_mode, path), lambda: os.fchmod(fd, svc.db_mode), True,
                 problems, "%s is mode %04o, not %04o" % (path, st.st_mode & 0o7777, svc.db_mode))
    fs = os.fstatvfs(fd)
    if fs.f_blocks and fs.f_bavail * fs.f_frsize < min(100 << 20, fs.f_blocks * fs.f_frsize // 100):
        problems.append("the filesystem of %s is full: %s free" % (
            path, format_bytes(str(fs.f_bavail * fs.f_frsize)) or "0 B"))
    if fs.f_files and fs.f_favail < max(1, fs.f_files // 100):
        problems.append("the filesystem of %s has no free inodes (%d left)" % (path, fs.f_favail))
    ctx.found.append("%s: owner uid %d, mode %04o, %s free" % (path, st.st_uid, st.st_mode & 0o7777,
                                                              format_bytes(str(fs.f_bavail * fs.f_frsize)) or "0 B"))
    verdict = sqlite_quick_check(handle, str(ctx.paths.state)) if stat.S_ISREG(st.st_mode) else ""
    if verdict:
        ctx.found.append("SQLite quick_check: %s" % verdict)
        if verdict != "ok" and not verdict.startswith("cannot check"):
            problems.append("SQLite says %s is damaged: %s" % (path, verdict))
    return problems


def fix_attr(ctx: HealContext, what: str, change: Callable[[], None], declared: bool,
             problems: List[str], problem: str) -> None:
    """Restore an owner or mode the config declares; only report one it does not."""
    if not declared:
        problems.append(problem + " (declare db_owner to let selfheal restore it)")
        return
    if ctx.dry_run:
        ctx.record(what, True, 0.0, "dry run: not done")
        return
    try:
        change()
        ctx.record(what, True, 0.0, "was: " + problem)
    except OSError as exc:
        ctx.record(what, False, 0.0, exc.strerror)
        problems.append(problem)


def sqlite_quick_check(handle, workdir: Optional[str] = None) -> str:
    """SQLite's PRAGMA quick_check, read-only, when the file (a SafeFile, or a path opened
    with open_safely) is an SQLite file; else "".

    SQLite opens by name (it needs the -wal/-shm files beside it): the name open_safely
    resolved, which only root or the file's own user could change since; what SQLite may
    read through a swap in that moment is a verdict (ok, malformed), never content."""
    if isinstance(handle, str):
        try:
            handle = open_safely(handle, "db_path", "file")
        except (OSError, Refused):
            return ""
        try:
            return sqlite_quick_check(handle, workdir)
        finally:
            os.close(handle.fd)
    try:
        if os.pread(handle.fd, 16, 0) != b"SQLite format 3\0":
            return ""
    except OSError:
        return ""
    import sqlite3

    # SQLite opens by name (and resolves /proc/self/fd links back to names), which the
    # service's account may swap for a link to root's database between our open and its. So
    # it checks a copy made through the descriptor selfheal opened, in a private directory.
    if handle.st.st_size > SQLITE_COPY_LIMIT:
        return "cannot check: larger than %s (checked through a copy)" % format_bytes(str(SQLITE_COPY_LIMIT))
    if workdir:  # on disk beside selfheal's state, not in a tmpfs charged to MemoryMax=
        ensure_dir(Path(workdir), mode=0o700)
    with tempfile.TemporaryDirectory(prefix=".sqlite-check-", dir=workdir) as private:
        copy = os.path.join(private, "copy.db")
        out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            offset = 0
            while True:
                chunk = os.pread(handle.fd, 1 << 20, offset)
                if not chunk:
                    break
                os.write(out, chunk)
                offset += len(chunk)
        finally:
            os.close(out)
        try:
            db = sqlite3.connect("file:%s?mode=ro&immutable=1" % urllib.parse.quote(copy), uri=True, timeout=5)
            try:
                rows = db.execute("PRAGMA quick_check").fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:  # its words may quote the file (a schema): one line, cut short
            if re.search(r"malformed|not a database|corrupt", str(exc), re.I):
                return one_line(str(exc))[:200]  # that is the damage itself
            return "cannot check: %s" % one_line(str(exc))[:200]  # unreadable: no verdict
    return one_line("; ".join(str(r[0]) for r in rows[:5]))[:300] or "ok"




@dataclasses.dataclass(frozen=True)
class Strategy:
    """One repair: what it does, what its section must set (any one of `needs`), and the
    keys that belong to it (set without it in `strategies`: a config error). Which failures
    it fits is said by FAILURE_KINDS."""

    name: str
    act: Callable[[HealContext], str]
    needs: Tuple[str, ...] = ()
    keys: Tuple[str, ...] = ()


STRATEGIES: Dict[str, Strategy] = {strategy.name: strategy for strategy in (
    Strategy("service_restart", strategy_service_restart),
    Strategy("port_conflict", strategy_port_conflict, needs=("port",)),
    Strategy("config_validation", strategy_config_validation, needs=("config_check", "config_files"),
             keys=("config_check", "config_files")),
    Strategy("environment_check", strategy_environment_check, keys=("env_file", "required_env")),
    Strategy("database_check", strategy_database_check, needs=("db_path", "symlinks"),
             keys=("db_path", "db_owner", "db_mode", "symlinks")),
)}


# =============================================================================
# Healing: diagnose, refuse or repair, verify
# =============================================================================


# port_holder's words for a port another unit's process holds (not a leftover of the unit's own).


def heal(config: Config, svc: Service, paths: Paths, trigger: str = MANUAL_TRIGGER,
         env=os.environ, dry_run: bool = False, finding: Optional[Finding] = None,
         chain: bool = True, until: Optional[float] = None, restarted: bool = False) -> HealResult:
    """Heal one service once. The caller holds the service's lock. chain: wait (WAITING)
    when a service it needs is down; off for the heal of a dependent by its root's heal,
    which gives it `until` (a time.monotonic()) as its deadline if that comes first.
    restarted: the leader of a burst restarted it already, before this diagnosis (env: the
    failed run's facts, read before that restart); verified first, then the strategies."""
    settings = config.settings
    started_at, start_mono = time.time(), time.monotonic()
    deadline = min(start_mono + settings.heal_timeout, until or float("inf"))
    preload()  # mail and HTTP imports, beside the diagnosis and the restart
    diag = diagnose(svc, env, finding)
    protected = never_touch_loaded(diag.unit)  # an alias of a protected unit
    if protected:
        raise UsageError("selfheal never touches %s: it is %s" % (svc.unit, protected))
    cause = root_cause(svc, diag)
    kind, evidence = triage(diag)
    order = plan_strategies(svc.strategies, kind)
    plan = "%s%s; strategies in this order: %s" % (
        kind, " (%s)" % evidence.strip()[:160] if evidence else "", ", ".join(order))
    if order != list(svc.strategies):
        plan += " (%s moved first: it fits the evidence)" % order[0]
    runs: List[StrategyRun] = []

    def finish(outcome: Outcome, escalation: str = "", found: Optional[Escalation] = None) -> HealResult:
        healed_mono = time.monotonic()
        healing, after, why = None, None, (found.cause if found and found.cause else cause)
        if outcome in (Outcome.RESOLVED, Outcome.RECOVERED):
            healing = (healed_mono - start_mono) + (diag.detected_after or 0.0)
            if outcome is Outcome.RECOVERED and not any(r.actions for r in runs):
                healing = systemd_recovery_seconds(runs[-1].verification.unit if runs and runs[-1].verification
                                                   else {}) or healing
        elif any(r.actions for r in runs) and not dry_run and not (found and found.cause):
            # The repair started a new run that failed too: its own facts say more than the
            # crash did (a restart that fails with 203/EXEC names the missing executable).
            after = diagnose(svc, {})
            new_run = after.unit.get("InvocationID") != diag.unit.get("InvocationID")
            stuck = after.active_state == "activating" and journal_kind(after.journal) is not None
            if new_run and (after.result not in ("", "success") or stuck):
                later = root_cause(svc, after)
                why = RootCause("The repair failed: " + later.summary[0].lower() + later.summary[1:],
                                later.confidence, later.evidence, later.recommendation)
            else:
                after = None
        last_seen = runs[-1].verification.unit if runs and runs[-1].verification else {}
        post = last_seen or (after.unit if after else show_unit(svc.unit))
        acted = time.time() if any(a.starts for r in runs for a in r.actions) and not dry_run else 0.0
        return HealResult(svc, outcome, trigger, started_at, diag, tuple(runs), why,
                          healing, post, escalation, after, plan, found.steps if found else (),
                          acted_until=acted)

    if restarted and not dry_run:
        verification = verify(svc, settings.verify_timeout)
        runs.append(StrategyRun("service_restart", (Action(
            "systemctl restart %s" % svc.unit, True, 0.0, "with the rest of the burst, before this diagnosis",
            starts=True),), verification, "restarted at once, with the other services of the burst (a plain "
            "crash: %s)" % (diag.result or "?")))
        if verification.ok:
            return finish(Outcome.RESOLVED)
        diag = dataclasses.replace(diag, unit=show_unit(svc.unit))
    elif trigger == "onfailure" and finding is None and not dry_run:
        echo = echo_of(paths, svc, diag)
        if echo:  # the failed run is one selfheal started and already reported: nothing new
            log.info("%s: %s", svc.name, echo)
            runs.append(StrategyRun("none", (), None, echo))
            return finish(Outcome.HEALTHY)

    service_state_now = load_service_state(paths, svc.name)
    if service_state_now.get("escalated") and not dry_run:
        # The breaker is open: heal at growing intervals, never never. A retry (the watch, when
        # the interval is up), a heal asked for by hand, or a failure after the interval heals.
        due = breaker_due(service_state_now)
        if trigger not in (MANUAL_TRIGGER, RETRY_TRIGGER) and due and time.time() < due:
            return finish(Outcome.ESCALATED,
                          "%s failed again while selfheal backs off (too many heals since %s): the next heal is "
                          "at %s, sooner only if someone runs: selfheal heal %s" % (
                              svc.name, iso(float(service_state_now["escalated"])), iso(due), svc.name))
    else:
        window_start = max(started_at - settings.failure_window, float(service_state_now.get("rearmed_at", 0.0)))
        # selfheal's own repairs count; what systemd's Restart= repaired by itself does not.
        # A heal asked for by hand (`selfheal heal NAME`, as a FAILED mail suggests) is not a failure.
        attempts = heal_attempts(paths, svc.name, window_start)
        if len(attempts) >= settings.failure_threshold and not dry_run and trigger != MANUAL_TRIGGER:
            first = breaker_delay(settings, 0)
            return finish(Outcome.ESCALATED,
                          "%d heals of %s within %s (failure_threshold = %d): selfheal backs off so a human can "
                          "look. It heals it again in %s, then at growing intervals (at most %s), and says so "
                          "in this thread when it is back; a fix made by hand is picked up then, with no "
                          "command typed. Heal it now: selfheal heal %s; re-arm: selfheal resume %s"
                          % (len(attempts), svc.name, format_duration(settings.failure_window),
                             settings.failure_threshold, format_duration(first),
                             format_duration(breaker_delay(settings, 64)), svc.name, svc.name))

    if finding and finding.kind == "stopped" and svc.on_stopped == "report" and diag.active_state == "inactive":
        runs.append(StrategyRun("none", (), None, "on_stopped = report: selfheal left it stopped"))
        return finish(Outcome.STOPPED, "%s was found stopped and on_stopped = report, so selfheal left it "
                      "stopped. If that is wrong: systemctl start %s" % (svc.unit, svc.unit))

    if finding and finding.kind == "restarted" and diag.active_state in ("active", "activating"):
        # Give systemd's new run its verify_timeout, as after our own restart: never a
        # second restart on top of systemd's unless that run does not become healthy.
        verification = verify(svc, settings.verify_timeout) if not dry_run else None
        before, now = finding.nrestarts
        runs.append(StrategyRun("systemd_restart", (), verification,
                                "systemd's Restart= restarted it by itself (restarts %d -> %d); selfheal "
                                "verified it and did not restart it again" % (before, now)))
        if verification and verification.ok:
            return finish(Outcome.RECOVERED)
    elif diag.systemd_restarting:
        verification = verify(svc, settings.verify_timeout) if not dry_run else None
        runs.append(StrategyRun("systemd_restart", (), verification,
                                "systemd's own Restart= was already restarting it; selfheal waited "
                                "instead of restarting it a second time"))
        if verification and verification.ok:
            return finish(Outcome.RECOVERED)
    elif diag.active_state in ("active", "activating") and not (finding and finding.kind == "unhealthy"):
        # Someone (systemd's Restart=, a human) already started a new run. One that started
        # moments ago gets the rest of verify_timeout to become healthy, as after our own
        # restart: never a second restart on top of one that is still coming up.
        started = parse_usec_timestamp(diag.unit.get("ActiveEnterTimestampMonotonic", ""))
        age = time.monotonic() - started if started else settings.verify_timeout
        if not dry_run and (diag.active_state == "activating" or age < settings.verify_timeout):
            seen = verify(svc, max(1.0, settings.verify_timeout - age))
            checks, unit = seen.checks, seen.unit
        else:
            checks, unit = probe(svc)
        if all(c.ok for c in checks):
            runs.append(StrategyRun("none", (), Verification(True, 0.0, checks, unit),
                                    "it was already running again and healthy when selfheal looked"))
            earlier = last_event(paths, svc.name)
            if earlier and earlier.get("healed_invocation") == unit.get("InvocationID"):
                # A heal that ran while this trigger waited already brought back this very
                # run of the service, and reported it: nothing new to do or to say.
                return finish(Outcome.HEALTHY)
            recovered = diag.result not in ("", "success") or trigger == "onfailure" or finding is not None
            return finish(Outcome.RECOVERED if recovered else Outcome.HEALTHY)

    if chain and has_chain(config, svc, diag.unit):
        graph, shown = look_at_chain(config)
        blocked = blocking_dependency(config, paths, svc, graph, shown)
        if blocked:
            needed, why = blocked
            runs.append(StrategyRun("none", (), None, "waiting for %s" % needed))
            return dataclasses.replace(finish(Outcome.WAITING, "%s needs %s, which is %s: selfheal heals %s first, then verifies "
                          "%s and restarts it if it is still down" % (svc.name, needed, why, needed, svc.name)),
                waiting_for=needed, waiting_detail=why)

    if finding and finding.kind == "unhealthy" and diag.active_state == "active" and svc.port and not dry_run:
        # The port held by another unit's process (or one of no unit) while this unit runs: a
        # restart cannot free that port (the new run would fail to bind) and would stop a
        # service that may be working: never a restart on a port-owner mismatch alone.
        # (Asked without the health check: a hung service must not cost health_timeout.)
        checks, unit = probe(svc, health=False)
        port = next((c for c in checks if c.name == "port"), None)
        if port is not None and port.owner is PortOwner.FOREIGN:
            runs.append(StrategyRun("none", (), Verification(False, 0.0, checks, unit),
                                    "the port is another unit's: selfheal restarted nothing"))
            return finish(Outcome.FAILED, "port %d is held by another unit's process while %s is running, so "
                          "selfheal restarted nothing: a restart cannot free the port (the new run would fail "
                          "to bind) and would only interrupt %s. If that process serves the port for %s "
                          "(docker-proxy), set port_owner = any in [%s]; if it is the service itself under "
                          "another unit (a cluster started by a wrapper unit), set unit = to that unit"
                          % (svc.port, svc.unit, svc.unit, svc.unit, svc.name))

    if svc.health_command and svc.health_run_as == "root" and is_root() and not dry_run:
        refused = root_only_problems(svc.health_command)  # again now: swapped since install?
        if refused:
            found = root_command_escalation(svc, "health_command", refused, "Nothing was restarted: "
                                            "its recovery could not have been verified.")
            runs.append(StrategyRun("none", (), None, str(found)))
            return finish(Outcome.FAILED, str(found), found)

    for name in order:
        if kind in CONFIG_BROKEN_KINDS and any(a.starts and not (r.verification and r.verification.ok)
                                               for r in runs for a in r.actions):
            # One failed start is what a broken config gets per heal round: another strategy's
            # restart would only fail again and feed its Restart= loop.
            runs.append(StrategyRun(name, (), None, "not tried: a restart already failed and the evidence "
                                    "says the config is broken"))
            break
        ctx = HealContext(svc, diag, settings, dry_run, paths, deadline)
        ctx.asked = trigger in (MANUAL_TRIGGER, RETRY_TRIGGER)
        try:
            note = STRATEGIES[name].act(ctx)
        except Escalation as exc:
            runs.append(StrategyRun(name, tuple(ctx.actions), None, str(exc), tuple(ctx.found)))
            return finish(Outcome.FAILED, str(exc), exc)
        acted = bool(ctx.actions) and ctx.actions[-1].ok  # verification is the judge
        verification = verify(svc, ctx.left(settings.verify_timeout)) if acted and not dry_run else None
        runs.append(StrategyRun(name, tuple(ctx.actions), verification, note, tuple(ctx.found)))
        if verification and verification.ok:
            return finish(Outcome.RESOLVED)
        if time.monotonic() >= deadline - HEAL_RESERVE:
            step = ctx.actions[-1] if ctx.actions else None
            unfinished = ("`%s` did not finish (%s)" % (step.what, step.detail or "no answer") if step and not step.ok
                          else "%s had not become healthy" % svc.unit)
            return finish(Outcome.FAILED, "the heal did not finish within heal_timeout = %s: %s. What it is "
                          "waiting for: systemctl status %s; systemctl list-jobs" % (
                              format_duration(settings.heal_timeout), unfinished, svc.unit))
    last = runs[-1] if runs else None
    why = "every configured strategy (%s) was tried and the service is still not healthy" % ", ".join(svc.strategies)
    if last and last.verification:
        why += ": " + last.verification.summary()
    elif last and last.actions and not last.actions[-1].ok:
        why += ": %s failed: %s" % (last.actions[-1].what, last.actions[-1].detail)
    return finish(Outcome.FAILED, why)


def echo_of(paths: Paths, svc: Service, diag: Diagnosis) -> str:
    """Why this OnFailure= is the echo of selfheal's own restart (empty when it is not): the
    failed run is one the last heal started and saw fail, and that heal already reported
    FAILED or ESCALATED. A run that heal verified healthy and that died later is news."""
    last = last_event(paths, svc.name)
    if not last or last.get("outcome") not in (Outcome.FAILED.value, Outcome.ESCALATED.value):
        return ""
    if float(last.get("ts") or 0) < float(load_service_state(paths, svc.name).get("rearmed_at", 0.0)):
        return ""  # resumed by a human since: whatever fails now is news
    acted_until = float(last.get("acted_until") or 0.0)
    if not acted_until:
        return ""  # it restarted nothing: no run of selfheal's to echo
    same_run = bool(diag.invocation) and diag.invocation == last.get("last_invocation")
    during = bool(acted_until and diag.failed_at and float(last.get("ts") or 0) <= diag.failed_at <= acted_until + 1.0)
    if not (same_run or during):
        return ""
    return ("the failed run is the one selfheal's heal of %s started (its restart failed), reported %s "
            "then: not a new failure; the watch retries it" % (last.get("time", "?"), last.get("outcome")))


def systemd_recovery_seconds(unit: Dict[str, str]) -> Optional[float]:
    """When systemd's Restart= brought a unit back by itself: from the moment its crashed run
    left the active state to the moment its new run entered it (both systemd's own clock),
    or None when systemd's timestamps do not say so."""
    left = parse_usec_timestamp(unit.get("ActiveExitTimestampMonotonic", ""))
    entered = parse_usec_timestamp(unit.get("ActiveEnterTimestampMonotonic", ""))
    return entered - left if left and entered and entered > left else None


@contextlib.contextmanager
def stop_on_sigterm(active: bool = True):
    """While a heal runs, SIGTERM raises Stopped (caught by heal_rounds), so what is in
    flight is recorded and queued before the process ends; the old handler comes back after."""
    import threading

    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Stopped()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def heal_rounds(config: Config, svc: Service, paths: Paths, trigger: str, env, dry_run: bool,
                finding: Optional[Finding], out, event: Optional["BurstEvent"] = None,
                restarted: bool = False) -> int:
    """heal() until the service stays healed (a failure merged into a running heal gets one
    more round), recording and reporting each; SIGTERM records and queues what is in flight."""
    name = svc.name
    outcome = Outcome.HEALTHY
    reporting: Optional[str] = None  # the report being recorded and queued, when SIGTERM comes
    queued_before = len(QUEUED)
    # The chain's heals count against the heal's own deadline (heal_timeout), as its steps do.
    until = time.monotonic() + config.settings.heal_timeout
    try:
        for _round in range(config.settings.failure_threshold + 1):
            if _round and paused_until(paths, name) is not None:
                break  # paused while we were busy: stop here
            try:
                result = heal(config, svc, paths, trigger, env, dry_run, finding,
                              restarted=restarted and not _round)
            except SelfhealError:
                raise
            except Exception:  # a bug in selfheal must not leave the failure unreported
                log.exception("selfheal crashed while healing %s", name)
                if not dry_run:
                    report_heal_crash(config, paths, svc, traceback.format_exc())
                return EX_FAIL
            outcome = result.outcome
            text = render_report(config.settings, result, paths=paths)
            if dry_run:
                print("DRY RUN: nothing was changed. Below: the diagnosis and the plan; the outcome is\n"
                      "what the plan alone would reach, not a result.\n", file=out)
                print(text, file=out)
                return EX_OK
            print(one_line(text.splitlines()[0]) + "\n" + one_line(summary_line(result)), file=out)
            if outcome is Outcome.WAITING:
                log_outcome(result, incident_key(paths, result.waiting_for))
                wait_for_dependency(paths, svc, result, result.waiting_for,
                                    failed=result.waiting_detail.startswith("failed"))
                return EX_OK
            root_thread = waited_thread(paths, name)  # it waited for a service: its news joins that thread
            forget_waiting(paths, name)
            reporting, queued_before = text, len(QUEUED)  # recorded, then queued before it is sent
            if trigger == "onfailure" and outcome is not Outcome.HEALTHY:
                # Handed over to a leader, its trigger started no Python to note its arrival:
                # the leader's event knows those.
                together = event.size() if event is not None else 0
                result = dataclasses.replace(result, burst=max(burst_size(paths, result.started_at), together))
            if outcome is not Outcome.HEALTHY:
                record_heal(paths, result, text)
            remember_restarts(paths, name, result.post)
            try:
                chain_started = time.monotonic()
                dependents, waiting, no_time = chain_of(config, paths, svc, result, until)
            except (Stopped, KeyboardInterrupt):
                raise
            except Exception:  # a bug in the chain must not cost the root its report
                log.exception("selfheal crashed while looking at what needs %s", name)
                dependents, waiting, no_time = [], [], []
            if outcome is Outcome.HEALTHY and not dependents:
                log_outcome(result)
                return EX_OK
            text = reporting = with_preface(text, chain_preface(
                svc, outcome, dependents, waiting, no_time, time.monotonic() - chain_started,
                config.settings.heal_timeout))
            if (event is not None and not dependents and outcome in (Outcome.RESOLVED, Outcome.RECOVERED)
                    and not load_service_state(paths, name).get("escalated")  # a human was told: its own thread
                    and event.collect(result, text)):
                log_outcome(result)  # its mail is the burst's one (BurstEvent.finish)
                reporting = None
                again = show_unit(svc.unit)
                if again.get("ActiveState") != "failed":
                    break
                trigger, env, finding = "failed again during the heal", {}, None
                continue
            problems = [r.service.name for r, _ in dependents if r.outcome in PROBLEM_OUTCOMES]
            thread = notify_heal(config, paths, result, text, thread=root_thread,
                                 label_note=" (%s FAILED)" % and_list(problems) if problems else "")
            log_outcome(result, incident_key(paths, name))
            for dependent, dependent_text in dependents:
                if dependent.outcome is not Outcome.HEALTHY:
                    notify_heal(config, paths, dependent, dependent_text, mail=False, thread=thread)
                log_outcome(dependent, incident_key(paths, dependent.service.name))
            reporting = None
            if outcome is not Outcome.RESOLVED and outcome is not Outcome.RECOVERED:
                break
            # A failure that came while we were busy was merged into this run by systemd:
            # look once more, so it is not lost.
            again = show_unit(svc.unit)
            if again.get("ActiveState") != "failed":
                break
            trigger, env, finding = "failed again during the heal", {}, None
    except Stopped:
        if reporting and len(QUEUED) > queued_before:  # queued before any send began
            log.warning("stopped (SIGTERM) while reporting on %s; the report is queued", name)
        elif reporting:  # stopped before its report reached the queue: queue it now
            try:
                queue_report(paths, new_report(config.settings, "", name, outcome.value, reporting,
                                               subject_text=reporting.splitlines()[0]))
            except OSError as exc:
                log.critical("stopped (SIGTERM) and could not queue the report (%s); it follows:\n%s",
                             exc, reporting)
        else:
            report_heal_stopped(config, paths, svc, trigger)
        return EX_FAIL
    ok = (Outcome.RESOLVED, Outcome.RECOVERED, Outcome.HEALTHY, Outcome.STOPPED)  # STOPPED: as configured
    return EX_OK if outcome in ok else EX_FAIL


def chain_of(config: Config, paths: Paths, svc: Service, result: HealResult, until: float
             ) -> Tuple[List[Tuple[HealResult, str]], List[str], List[str]]:
    """The services that need this one: healed after it (when it is healthy; when it was
    healthy all along, only those that waited for it), the names of those still waiting, and
    of those the heal's deadline left to the watch."""
    if not has_chain(config, svc, result.post or result.diagnosis.unit):
        return [], [], []
    graph, shown = look_at_chain(config)
    if result.outcome in (Outcome.RESOLVED, Outcome.RECOVERED, Outcome.HEALTHY):
        return heal_dependents(config, paths, svc, graph, until, only_waiting=result.outcome is Outcome.HEALTHY,
                               shown=shown)
    waiting = []
    for name in needed_by(graph, svc.name, reverse=True):
        dependent = config.services[name]
        if paused_until(paths, name) is not None or maintenance_until(config, dependent) is not None:
            continue
        unit = shown.get(dependent.unit, {})
        active = unit.get("ActiveState")
        down = unit.get("LoadState") == "loaded" and active not in ("active", "reloading") and not (
            active == "inactive" and dependent.on_stopped != "heal")
        if down or waits_for(paths, name, [svc.name] + needed_by(graph, name)):
            waiting.append(name)
    return [], waiting, []


def waited_thread(paths: Paths, name: str) -> str:
    """The mail thread of the open incident of the service this one noted it waits for."""
    noted = load_service_state(paths, name).get("waiting_on")
    if not isinstance(noted, dict) or not NAME_RE.match(str(noted.get("service", ""))):
        return ""
    incident = load_service_state(paths, str(noted["service"])).get("incident") or {}
    return str(incident.get("message_id") or "") if isinstance(incident, dict) and not incident.get("closed") else ""


def with_preface(text: str, preface: str) -> str:
    """The report with the chain's lines right under its subject line."""
    if not preface:
        return text
    subject_line, _, rest = text.partition("\n")
    return "%s\n\n%s%s" % (subject_line, preface, rest.lstrip("\n"))


def report_heal_stopped(config: Config, paths: Paths, svc: Service, trigger: str) -> None:
    """SIGTERM in the middle of a heal: a history line and a FAILED report, queued only
    (the process is being stopped; the watch, flush-mail or the next heal sends it)."""
    now = time.time()
    why = ("selfheal@%s.service was stopped (SIGTERM) before the heal of %s finished: its TimeoutStartSec=, "
           "a shutdown or `systemctl stop`" % (svc.name, svc.unit))
    log.error("%s; recording it and queueing the report", why)
    with contextlib.suppress(OSError):
        record_event(paths, {
            "ts": round(now, 3), "time": iso(now), "service": svc.name, "unit": svc.unit, "outcome": "FAILED",
            "trigger": trigger, "root_cause": why})
    body = ("%s.\n\nIt may still be broken. Look at it now:\n  systemctl status %s\n"
            "  journalctl -u %s -n 100 --no-pager\n  journalctl -u selfheal@%s.service -n 50 --no-pager\n"
            % (why, svc.unit, svc.unit, svc.name))
    try:
        queue_report(paths, new_report(config.settings, SUBJECT_ICON[Outcome.FAILED], svc.name,
                                       "FAILED (heal stopped)", body, status=Outcome.FAILED.value))
    except OSError as exc:
        log.critical("could not queue the report (%s); it follows:\n%s", exc, body)


def report_heal_crash(config: Config, paths: Paths, svc: Service, trace: str) -> None:
    body = ("selfheal crashed while healing %s (%s) on %s, so it may still be broken.\n\n"
            "Look at it now:\n  systemctl status %s\n  journalctl -u %s -n 100 --no-pager\n\n"
            "What selfheal hit (please report it):\n\n%s" % (
                svc.name, svc.unit, socket.gethostname(), svc.unit, svc.unit, trace))
    try:
        record_event(paths, {
            "ts": round(time.time(), 3), "time": iso(time.time()), "service": svc.name, "unit": svc.unit,
            "outcome": "FAILED", "trigger": "selfheal crashed", "root_cause": trace.splitlines()[-1]})
    except OSError:
        pass
    deliver(config, paths, new_report(config.settings, SUBJECT_ICON[Outcome.FAILED], svc.name,
                                      "FAILED (selfheal crashed)", body, status=Outcome.FAILED.value))


def note_arrival(paths: Paths, name: str) -> None:
    """An OnFailure= trigger for the service arrived now (burst_size counts these)."""
    path = paths.arrival(name)
    try:
        ensure_dir(path.parent)
        with open(str(path), "a"):
            pass
        os.utime(str(path))
    except OSError as exc:
        log.debug("could not note the trigger's arrival: %s", exc)


def burst_size(paths: Paths, at: float) -> int:
    """How many services' OnFailure= triggers arrived within BURST_WINDOW of `at`."""
    count = 0
    try:
        with os.scandir(str(paths.run / "arrivals")) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if abs(entry.stat(follow_symlinks=False).st_mtime - at) <= BURST_WINDOW:
                        count += 1
    except OSError:
        return 0
    return count


def may_hand_over(paths: Paths, name: str) -> bool:
    """A service whose heal has its own drop-in (selfheal@NAME.service.d: a path only its heal
    may write) is healed in its own unit's sandbox, never handed to another's."""
    return not os.path.isdir(os.path.join(UNIT_DIR, "selfheal@%s.service.d" % name))


def hand_over(paths: Paths, name: str, env) -> bool:
    """Leave the service, and what systemd said of its failed run, for the heal that leads."""
    facts = {key: str(value) for key, value in env.items() if key.startswith("MONITOR_")}
    try:
        ensure_dir(paths.handed(name).parent, 0o700)
        atomic_write(paths.handed(name), json.dumps({"env": facts, "at": time.time()}) + "\n", 0o600)
        return True
    except OSError as exc:
        log.warning("%s: could not hand it over (%s); healing it here", name, exc)
        return False


def take_handed(paths: Paths, only: str = "") -> Dict[str, Dict[str, str]]:
    """The services handed over (only: that one), each taken once: name -> MONITOR_* facts."""
    taken: Dict[str, Dict[str, str]] = {}
    try:
        with os.scandir(str(paths.handed("x").parent)) as entries:
            names = [e.name for e in entries if e.name.endswith(".json")]
    except OSError:
        return taken
    for file_name in names:
        name = file_name[:-len(".json")]
        if (only and name != only) or not NAME_RE.match(name):
            continue
        path = paths.handed(name)
        try:
            raw = path.read_text(encoding="utf-8")
            path.unlink()
        except OSError:
            continue  # taken meanwhile: by the heal that leads
        try:
            data = json.loads(raw) if raw.strip() else {}  # empty: left by the unit's ExecCondition=
        except ValueError:
            data = {}
        env = data.get("env") if isinstance(data, dict) else None
        taken[name] = {str(k): str(v) for k, v in env.items()} if isinstance(env, dict) else {}
    return taken


def lead_burst(config: Config, paths: Paths, own: str, leader: "Lock", out) -> int:
    """One process heals a burst: its own service in the main thread, at once (a single
    failure is as fast as ever), and every service handed over meanwhile in threads
    (BURST_WORKERS at most). Those healed back form one event and one mail (BurstEvent).
    The lead is let go only when nothing is left; a service handed over just then is seen
    by the look after, which leads again. Returns the own service's exit status."""
    import threading

    rc = EX_OK
    first = True
    while True:
        event = BurstEvent(config, paths)
        own_units: List[str] = []
        graph_cache: Dict[str, Dict[str, Tuple[str, ...]]] = {}
        slots = threading.BoundedSemaphore(BURST_WORKERS)
        workers: List[threading.Thread] = []
        own_done = threading.Event()

        def work(name: str, env: Dict[str, str], restarted: bool) -> None:
            try:
                heal_service(config, name, paths, "onfailure", env, False, out, event, restarted)
            except SelfhealError as exc:
                log.error("%s: %s", name, exc)
            except Exception:  # a bug in one heal: said, and the burst goes on
                log.exception("selfheal crashed while healing %s in a burst", name)
            finally:
                slots.release()

        def dispatch() -> None:
            global SHARED
            while True:
                handed = take_handed(paths)
                for name in handed:  # members at once: a heal that ends meanwhile is not alone
                    event.join(name)
                for _ in range(5):  # a storm's triggers come over ~100 ms: one batch, one restart
                    if not handed:
                        break
                    time.sleep(BURST_POLL)
                    more = take_handed(paths)
                    if not more:
                        break
                    for name in more:
                        event.join(name)
                    handed.update(more)
                batch = {}
                wait_for_root = roots_in_burst(config, paths, handed, event, graph_cache)
                for name, env in handed.items():
                    if name not in config.services or name in wait_for_root:
                        continue
                    if may_hand_over(paths, name):
                        batch[name] = env
                        if SHARED is None:  # more than one heal from here on: their polls are shared
                            SHARED = SharedLook()
                    else:  # its heal has its own sandbox: its own unit heals it, once this lead ends
                        own_units.append(name)
                prestarted = restart_at_once(config, paths, batch, event.size() - len(batch))
                for name, env in batch.items():
                    slots.acquire()
                    worker = threading.Thread(target=work, args=(name, env, name in prestarted),
                                              name="selfheal-" + name, daemon=True)
                    worker.start()
                    workers.append(worker)
                if not batch:
                    if own_done.is_set() and not any(w.is_alive() for w in workers):
                        return
                    time.sleep(BURST_POLL)

        own_env = take_handed(paths, own).get(own) if first else None
        dispatcher = threading.Thread(target=dispatch, name="selfheal-burst", daemon=True)
        if own_env is not None:
            event.join(own)
        dispatcher.start()
        try:
            if own_env is not None:
                rc = heal_service(config, own, paths, "onfailure", own_env, False, out, event)
        finally:
            own_done.set()
        dispatcher.join()
        global SHARED
        SHARED = None
        event.finish()
        first = False
        with contextlib.suppress(OSError):  # before the lead is let go: a trigger after this leads
            os.rmdir(str(paths.leading))
        leader.release()
        for name in dict.fromkeys(own_units):
            started = run([SYSTEMCTL, "start", "--no-block", "selfheal@%s.service" % name])
            if not started.ok:
                log.error("could not start selfheal@%s.service: %s", name, started.brief())
        if not take_handed_names(paths) or not leader.acquire():
            break
    write_metrics(config, paths)
    return rc


def roots_in_burst(config: Config, paths: Paths, handed: Dict[str, Dict[str, str]], event: "BurstEvent",
                   graph_cache: Dict[str, Dict[str, Tuple[str, ...]]]) -> Dict[str, str]:
    """Of the services handed over, those that need another service of the same burst:
    name -> the one they wait for. They are not healed on their own (a restart against a dead
    database only fails again): noted as waiting, the heal of what they need heals them after
    it, in order, in its one report (heal_dependents); the watch, should that one not recover."""
    if not handed:
        return {}
    if "graph" not in graph_cache:  # one look per burst
        graph_cache["graph"] = look_at_chain(config)[0]
    graph = graph_cache["graph"]
    together = set(handed) | set(event.names())
    waiting: Dict[str, str] = {}
    for name in handed:
        needed = [n for n in needed_by(graph, name) if n in together]
        if needed and name in config.services:
            waiting[name] = needed[0]
            with contextlib.suppress(OSError, SelfhealError), service_state(paths, name) as state:
                state["waiting_on"] = {"service": needed[0], "since": time.time(),
                                       "detail": "failed in the same burst"}
            log.info("%s needs %s, which failed in the same burst: healed after it", name, needed[0])
    return waiting


RESTART_AT_ONCE_RESULTS = ("signal", "core-dump")  # a plain crash: no config or data to look at first


def restart_at_once(config: Config, paths: Paths, batch: Dict[str, Dict[str, str]], others: int = 0) -> set:
    """Restarts first: of the services handed over together, those that plainly crashed are
    restarted at once, in one `systemctl restart --no-block`, before their diagnosis (which
    runs while they come up). Only a failed unit whose run was killed by a signal, whose
    first strategy is service_restart, with nothing else to decide first (paused, in a
    window, the breaker open, a problem reported, too many heals): the rest are healed as
    ever. Each one's facts (MONITOR_*) are read before, into `batch`. others: services of the
    same burst already being healed. Returns their names."""
    if not batch or len(batch) + others < 2:
        return set()
    units = {config.services[name].unit: name for name in batch}
    shown = show_units(list(units), ("Id", "ActiveState", "SubState", "Result", "ExecMainCode", "ExecMainStatus",
                                     "InvocationID", "Restart"))
    chosen = []
    for unit, name in units.items():
        svc, props = config.services[name], shown.get(unit, {})
        if not batch[name].get("MONITOR_SERVICE_RESULT") and props.get("InvocationID"):
            code = {"1": "exited", "2": "killed", "3": "dumped"}.get(props.get("ExecMainCode", ""), "")
            status = props.get("ExecMainStatus", "")
            batch[name] = {"MONITOR_UNIT": unit, "MONITOR_SERVICE_RESULT": props.get("Result", ""),
                           "MONITOR_EXIT_CODE": code, "MONITOR_INVOCATION_ID": props.get("InvocationID", ""),
                           "MONITOR_EXIT_STATUS": signal_name(status) if code in ("killed", "dumped") else status}
        if props.get("ActiveState") != "failed" or props.get("Result") not in RESTART_AT_ONCE_RESULTS:
            continue
        if not svc.strategies or svc.strategies[0] != "service_restart" or has_chain(config, svc, {}):
            continue
        state = load_service_state(paths, name)
        last = last_event(paths, name) or {}
        window_start = max(time.time() - config.settings.failure_window, float(state.get("rearmed_at", 0.0)))
        if (paused_until(paths, name) is not None or maintenance_until(config, svc) is not None
                or state.get("escalated") or open_problem(paths, name) or paths.finding(name).exists()
                or last.get("outcome") in (Outcome.FAILED.value, Outcome.ESCALATED.value)
                or len(heal_attempts(paths, name, window_start)) >= config.settings.failure_threshold - 1):
            continue
        chosen.append(name)
    if not chosen:
        return set()
    started = run([SYSTEMCTL, "restart", "--no-block", "--"] + [config.services[n].unit for n in chosen])
    if not started.ok:
        log.warning("burst: restarting %s at once failed (%s); each is healed on its own", and_list(chosen),
                    started.brief())
        return set()
    log.info("burst: restarted %s at once; diagnosing them while they come up", and_list(chosen))
    return set(chosen)


class BurstEvent:
    """The services one leader heals together: those back (RESOLVED, RECOVERED) are told in
    one mail, a line each, with the time until all were back; one that needs a human keeps
    its own mail and thread. A heal that ends while it is the only one so far is mailed on
    its own at once (a single failure waits for nothing)."""

    def __init__(self, config: Config, paths: Paths):
        import threading

        self.config, self.paths = config, paths
        self.lock = threading.Lock()
        self.members: List[str] = []
        self.collected: List[Tuple[HealResult, str]] = []
        self.alone: List[str] = []  # back, and mailed on their own before the rest came

    def join(self, name: str) -> None:
        with self.lock:
            if name not in self.members:  # handed over again (it failed again meanwhile): one member
                self.members.append(name)

    def size(self) -> int:
        with self.lock:
            return len(self.members)

    def names(self) -> List[str]:
        with self.lock:
            return list(self.members)

    def collect(self, result: HealResult, text: str) -> bool:
        """Keep the report for the burst's mail; False: mail it now, on its own."""
        with self.lock:
            if len(self.members) < 2:
                self.alone.append(result.service.name)
                return False
            self.collected.append((result, text))
            return True

    def finish(self) -> None:
        with self.lock:
            collected, self.collected = self.collected, []
            members = [name for name in self.members if name not in self.alone]
        if not collected:
            return
        if len(collected) == 1:
            notify_heal(self.config, self.paths, collected[0][0], collected[0][1])
            return
        settings = self.config.settings
        label, body = burst_report(collected, members)
        send, thread, label, body, status = burst_incident(self.paths, settings, label, body)
        report = new_report(settings, SUBJECT_ICON[Outcome.RESOLVED], "burst", label, body, thread=thread,
                            status=status)
        note_burst_thread(self.paths, report["message_id"])
        for result, text in collected:  # each service's incident follows the burst's thread
            notify_heal(self.config, self.paths, result, text, mail=False, thread=thread or report["message_id"])
        fields = {"SELFHEAL_SERVICE": "burst", "SELFHEAL_OUTCOME": "RESOLVED",
                  "SELFHEAL_SERVICES": ",".join(r.service.name for r, _ in collected),
                  "SELFHEAL_INCIDENT": report["message_id"].strip("<>")}
        log.info("burst: %s", label, extra={"journal": fields})
        if not send:
            log.info("burst: not mailed (the bursts are FLAPPING: told once in this thread)")
        elif any(should_mail(settings, r.service, "RESOLVED") for r, _ in collected):
            deliver(self.config, self.paths, report)


def burst_incident(paths: Paths, settings: Settings, label: str, body: str) -> Tuple[bool, str, str, str, str]:
    """Bursts are an incident of the host, as failures are of a service: one thread while they
    come less than incident_quiet apart, and FLAPPING once at flap_threshold bursts within
    flap_window, then silence until it is quiet (a group of services crash-looping together).
    Returns (mail it, thread, label, body, status: RESOLVED or FLAPPING)."""
    path = paths.state / "burst.json"
    lock = Lock(paths.run / "locks" / "burst-incident.lock")
    now = time.time()
    try:
        lock.wait(10.0)
        state = read_state(path)
        if now - float(state.get("last") or 0.0) >= settings.incident_quiet:
            state = {}
        times = [float(t) for t in state.get("bursts", []) if float(t) >= now - settings.flap_window] + [now]
        send, status = True, Outcome.RESOLVED.value
        if len(times) >= settings.flap_threshold:
            if state.get("flapping"):
                send = False
            else:
                state["flapping"] = True
                label, status = "FLAPPING (%s)" % label, "FLAPPING"
                body = ("FLAPPING: %d bursts within %s. selfheal keeps healing every service in them (a burst is\n"
                        "not a failure of each, so no breaker trips); further bursts until it has been quiet for\n"
                        "incident_quiet = %s are in the history, not mailed one by one.\n\n" % (
                            len(times), format_duration(settings.flap_window),
                            format_duration(settings.incident_quiet))) + body
        thread = str(state.get("thread") or "")
        state.update(bursts=times[-64:], last=now)
        write_state(path, state)
        return send, thread, label, body, status
    except (OSError, SelfhealError) as exc:
        log.warning("burst: could not keep its incident (%s); mailed as a new one", exc)
        return True, "", label, body, Outcome.RESOLVED.value
    finally:
        lock.release()


def note_burst_thread(paths: Paths, message_id: str) -> None:
    """The first mail of a burst incident starts its thread."""
    with contextlib.suppress(OSError, SelfhealError):
        path = paths.state / "burst.json"
        state = read_state(path)
        if not state.get("thread"):
            state["thread"] = message_id
            write_state(path, state)


def burst_report(collected: Sequence[Tuple[HealResult, str]], members: Sequence[str]) -> Tuple[str, str]:
    """(label, body) of a burst's one mail: how many, when, how long until all were back."""
    failed = [r.diagnosis.failed_at or r.started_at for r, _ in collected]
    back = [(r.diagnosis.failed_at or r.started_at) + (r.healing_seconds or 0.0) for r, _ in collected]
    first, spread, all_back = min(failed), max(failed) - min(failed), max(back) - min(failed)
    others = [name for name in members if name not in {r.service.name for r, _ in collected}]
    lines = ["%d services failed within %s of each other, from %s on %s; all %d were back %s after the first "
             "failure." % (len(members), format_duration(spread), iso(first), socket.gethostname(),
                           len(collected), format_duration(all_back)), ""]
    width = max(len(r.service.name) for r, _ in collected)
    for result, _ in sorted(collected, key=lambda item: item[0].service.name):
        how = ("restarted (%s), healthy in %s" % (result.strategy, format_duration(result.healing_seconds or 0.0))
               if result.outcome is Outcome.RESOLVED else "came back by itself (systemd's Restart=); verified")
        lines.append("  %s  %s; %s" % (result.service.name.ljust(width), result.root_cause.summary.rstrip("."), how))
    if others:
        lines += ["", "Not back, each in its own mail and thread: %s." % and_list(others)]
    lines += ["", "selfheal healed them in one process (one heal for a burst). Each service's full report is in",
              "%s/NAME.log; `selfheal status` shows them all." % LOG_DIR]
    return "RESOLVED (%d services)" % len(collected), "\n".join(lines) + "\n"


def summary_line(result: HealResult) -> str:
    if result.healing_seconds is not None:
        return "%s %s in %s" % (result.service.name, result.outcome.value.lower(), format_duration(result.healing_seconds))
    return "%s: %s" % (result.service.name, result.escalation or result.outcome.value.lower())


def log_outcome(result: HealResult, incident: str = "") -> None:
    """The heal's outcome in one journal line, with its fields (SELFHEAL_*, MESSAGE_ID)."""
    level = logging.INFO if result.outcome in (Outcome.RESOLVED, Outcome.RECOVERED, Outcome.HEALTHY,
                                               Outcome.WAITING) else logging.ERROR
    fields = {"SELFHEAL_SERVICE": result.service.name, "SELFHEAL_UNIT": result.service.unit,
              "SELFHEAL_OUTCOME": result.outcome.value, "SELFHEAL_TRIGGER": result.trigger,
              "SELFHEAL_STRATEGY": result.strategy, "SELFHEAL_INCIDENT": incident}
    if result.outcome.value in EVENT_IDS:
        fields["MESSAGE_ID"] = EVENT_IDS[result.outcome.value]
    if result.healing_seconds is not None:
        fields["SELFHEAL_HEALING_SECONDS"] = "%.3f" % result.healing_seconds
    if result.waiting_for:
        fields["SELFHEAL_WAITING_FOR"] = result.waiting_for
    log.log(level, "%s: %s; strategy %s; cause: %s", result.service.name, summary_line(result),
            result.strategy, result.root_cause.summary, extra={"journal": fields})


def incident_key(paths: Paths, name: str) -> str:
    """The open incident's id for the journal: its thread's Message-ID, or NAME@OPENED."""
    incident = load_service_state(paths, name).get("incident") or {}
    if not isinstance(incident, dict) or not incident.get("opened"):
        return ""
    return str(incident.get("message_id") or "").strip("<>") or "%s@%d" % (name, float(incident["opened"]))


# =============================================================================
# Dependencies: what a service needs, healed first; one report for the chain
# =============================================================================
# A service needs another when services.conf says so (depends_on) or systemd does:
# Requires=, BindsTo=, or Wants= with After=, between two listed services. A service that
# fails while one it needs is down is not restarted on its own (it would only fail again):
# its heal ends WAITING, and the heal of the one it needs, once that is healthy, verifies
# every service that needs it, in dependency order, and heals those still down. Their
# outcomes go into that heal's report: one mail, led by the root.

DOWN_VERDICTS = ("unhealthy", "stopped", "failed", "healing", "transient", "waiting")


def systemd_needs(unit: Dict[str, str]) -> set:
    words = {k: set(unit.get(k, "").split()) for k in ("Requires", "BindsTo", "Wants", "After")}
    return words["Requires"] | words["BindsTo"] | (words["Wants"] & words["After"])


def systemd_needed_by(unit: Dict[str, str]) -> set:
    words = {k: set(unit.get(k, "").split()) for k in ("RequiredBy", "BoundBy", "WantedBy", "Before")}
    return words["RequiredBy"] | words["BoundBy"] | (words["WantedBy"] & words["Before"])


def dependency_graph(config: Config, shown: Dict[str, Dict[str, str]]) -> Dict[str, Tuple[str, ...]]:
    """name -> the listed services it needs directly: depends_on, then what systemd says
    (shown: systemctl show of the listed units). An edge from systemd that would close a
    cycle is left out (logged): depends_on was checked for cycles when the config loaded."""
    by_unit = {svc.unit: svc.name for svc in config.services.values()}
    graph = {name: list(svc.depends_on) for name, svc in config.services.items()}
    for name, svc in config.services.items():
        for unit in sorted(systemd_needs(shown.get(svc.unit, {}))):
            needed = by_unit.get(unit)
            if needed and needed != name and needed not in graph[name]:
                graph[name].append(needed)
                if find_cycle(graph):
                    graph[name].remove(needed)
                    log.warning("%s: systemd says it needs %s, which needs it too; that dependency is ignored",
                                name, needed)
    return {name: tuple(needs) for name, needs in graph.items()}


def in_dependency_order(graph: Dict[str, Sequence[str]], names: Iterable[str]) -> List[str]:
    """names, every one after those it needs (config order otherwise). Visits only what the
    names need: linear in the chain, not in the whole graph, for each call."""
    wanted, order, seen = set(names), [], set()  # type: ignore[var-annotated]

    def visit(name: str) -> None:
        stack = [(name, iter(graph.get(name, ())))]
        seen.add(name)
        while stack:
            current, needs = stack[-1]
            for needed in needs:
                if needed not in seen:
                    seen.add(needed)
                    stack.append((needed, iter(graph.get(needed, ()))))
                    break
            else:
                stack.pop()
                if current in wanted:
                    order.append(current)

    for name in graph:
        if name in wanted and name not in seen:
            visit(name)
    return order


def reverse_graph(graph: Dict[str, Sequence[str]]) -> Dict[str, List[str]]:
    """name -> the services that need it directly (in config order)."""
    needers: Dict[str, List[str]] = {name: [] for name in graph}
    for name, needs in graph.items():
        for needed in needs:
            needers.setdefault(needed, []).append(name)
    return needers


def needed_by(graph: Dict[str, Sequence[str]], name: str, reverse: bool = False,
              needers: Optional[Dict[str, List[str]]] = None) -> List[str]:
    """Every service `name` needs, directly or not (reverse: every one that needs it), in
    dependency order. needers: reverse_graph(graph), when the caller has it already."""
    if reverse and needers is None:
        needers = reverse_graph(graph)
    found, todo = set(), [name]  # type: ignore[var-annotated]
    while todo:
        current = todo.pop()
        step = needers.get(current, ()) if reverse and needers is not None else graph.get(current, ())
        for other in step:
            if other not in found and other != name:
                found.add(other)
                todo.append(other)
    return in_dependency_order(graph, found)


def has_chain(config: Config, svc: Service, unit: Dict[str, str]) -> bool:
    """Whether the service needs, or is needed by, another listed service (from its own
    systemctl show): only then is the whole list asked about."""
    units = {s.unit for s in config.services.values()} - {svc.unit}
    return bool(svc.depends_on or any(svc.name in s.depends_on for s in config.services.values())
                or (systemd_needs(unit) | systemd_needed_by(unit)) & units)


CHAIN_PROPERTIES = ("Id", "LoadState", "ActiveState", "SubState", "Result", "InvocationID", "Requires", "BindsTo",
                    "Wants", "After", "ActiveEnterTimestampMonotonic",
                    "User", "Group", "DynamicUser")  # whom a health_command runs as


def look_at_chain(config: Config) -> Tuple[Dict[str, Tuple[str, ...]], Dict[str, Dict[str, str]]]:
    """The dependency graph, every listed unit's state (one systemctl show), and the state of
    the heals of those another service needs (one more: only those are ever waited for; asking
    systemd about every selfheal@ instance would make it load one per listed service)."""
    shown = show_units([svc.unit for svc in config.services.values()], CHAIN_PROPERTIES)
    graph = dependency_graph(config, shown)
    needed = sorted({name for needs in graph.values() for name in needs})
    if needed:
        shown.update(show_units(["selfheal@%s.service" % name for name in needed], ("Id", "ActiveState")))
    return graph, shown


def blocking_dependency(config: Config, paths: Paths, svc: Service, graph: Dict[str, Tuple[str, ...]],
                        shown: Dict[str, Dict[str, str]], ignore: str = "") -> Optional[Tuple[str, str]]:
    """(name, why) of the first service this one needs (the root of the chain first) that is
    down, being healed, or known to need a human; None when all it needs is up. ignore: a
    service taken as up (the root whose heal is asking)."""
    for name in needed_by(graph, svc.name):
        if name == ignore:
            continue
        needed = config.services[name]
        unit = shown.get(needed.unit, {})
        active, sub = unit.get("ActiveState", ""), unit.get("SubState", "")
        if shown.get("selfheal@%s.service" % name, {}).get("ActiveState") in ("active", "activating"):
            return name, "being healed (selfheal@%s.service)" % name
        if being_healed(paths, name):  # by the heal that leads a burst, under another unit
            return name, "being healed"
        if unit.get("LoadState", "loaded") != "loaded" or (active == "inactive" and needed.on_stopped == "ignore"):
            continue  # no such unit, or stopped on purpose as configured: nothing to wait for
        if active and active not in ("active", "reloading"):
            return name, "%s (%s)" % (active, sub or "?")
        problem = open_problem(paths, name)
        if problem:  # running, but reported FAILED or ESCALATED: a human is on it
            return name, "%s (%s, not yet fixed)" % (active or "?", problem)
        watch = load_watch_state(paths, name)
        if watch.get("verdict") == "unhealthy" and time.time() - float(watch.get("checked") or 0) < \
                2 * config.settings.watch_interval:
            return name, "unhealthy (%s)" % clean(str(watch.get("detail", "")))[:120]
    return None


def being_healed(paths: Paths, name: str) -> bool:
    """Whether a heal holds the service's lock now (asked without waiting)."""
    lock = Lock(paths.lock(name))
    try:
        if lock.acquire():
            lock.release()
            return False
        return True
    except OSError:
        return False


def open_problem(paths: Paths, name: str) -> str:
    """FAILED, ESCALATED or STOPPED when the service's incident is open with that problem."""
    incident = load_service_state(paths, name).get("incident") or {}
    return str(incident.get("problem") or "") if isinstance(incident, dict) and not incident.get("closed") else ""


def waits_for(paths: Paths, name: str, roots: Iterable[str]) -> bool:
    """Whether the service noted it waits for one of `roots`."""
    noted = load_service_state(paths, name).get("waiting_on")
    return isinstance(noted, dict) and noted.get("service") in set(roots)


def forget_waiting(paths: Paths, name: str) -> None:
    if "waiting_on" in load_service_state(paths, name):
        with contextlib.suppress(OSError, SelfhealError), service_state(paths, name, best_effort=True) as state:
            state.pop("waiting_on", None)


def wait_for_dependency(paths: Paths, svc: Service, result: HealResult, needed: str, failed: bool) -> None:
    """A heal that ended WAITING: note what it waits for, and make sure that one is being
    healed when it is failed (its own OnFailure= normally sees to that), unless selfheal
    already reported it FAILED or ESCALATED: then its retries and a human do."""
    try:
        with service_state(paths, svc.name) as state:
            state["waiting_on"] = {"service": needed, "since": result.started_at, "detail": result.escalation}
    except (OSError, SelfhealError) as exc:
        log.warning("could not note that %s waits for %s: %s", svc.name, needed, exc)
    if failed and not open_problem(paths, needed) and not load_service_state(paths, needed).get("escalated"):
        started = run([SYSTEMCTL, "start", "--no-block", "selfheal@%s.service" % needed])
        if not started.ok:
            log.error("could not start selfheal@%s.service: %s", needed, started.brief())


def heal_dependents(config: Config, paths: Paths, svc: Service, graph: Dict[str, Tuple[str, ...]],
                    until: float, only_waiting: bool = False, shown: Optional[Dict[str, Dict[str, str]]] = None
                    ) -> Tuple[List[Tuple[HealResult, str]], List[str], List[str]]:
    """After `svc` is healthy: every service that needs it, in dependency order, verified and
    healed when still down (only_waiting: only those that noted they wait for it). Each is
    recorded, not mailed. Returns (result, report) for those that were down or waiting, the
    names of those left waiting (for another service still down: the watch heals them once it
    may), and of those left for lack of time (`until`, the heal's deadline).

    Linear in the chain: the state of every unit comes from one `systemctl show` (`shown`, or
    one call here), updated with what this chain healed; a dependent that is active, listens
    and answers its health check (all asked at once) is left alone without a heal. A bug in one
    dependent's heal is reported on its own; the chain and the root's report go on."""
    done: List[Tuple[HealResult, str]] = []
    left: List[str] = []
    no_time: List[str] = []
    chain = [svc.name]
    if shown is None:
        shown = look_at_chain(config)[1]
    shown = dict(shown)
    shown[svc.unit] = dict(shown.get(svc.unit, {}), ActiveState="active", SubState="running")
    needers = reverse_graph(graph)
    dependents = needed_by(graph, svc.name, reverse=True, needers=needers)
    healthy = healthy_at_a_glance(config, paths, [config.services[n] for n in dependents], shown, until)
    for name in dependents:
        dependent = config.services[name]
        waited = waits_for(paths, name, chain + needed_by(graph, name))
        if only_waiting and not waited:
            continue
        if not waited and name in healthy:
            continue  # active, listening and answering: not this chain's to touch
        if paused_until(paths, name) is not None or maintenance_until(config, dependent) is not None:
            log.info("%s needs %s but is paused or in maintenance: not looked at", name, svc.name)
            continue
        unit = shown.get(dependent.unit, {})
        if unit.get("ActiveState") == "inactive" and dependent.on_stopped != "heal" and not waited:
            continue  # stopped, and to be left stopped (on_stopped): not this chain's to start
        blocked = blocking_dependency(config, paths, dependent, graph, shown, ignore=svc.name)
        if blocked:  # another service it needs is still down: it waits for that one now
            with contextlib.suppress(OSError, SelfhealError), service_state(paths, name) as state:
                state["waiting_on"] = {"service": blocked[0], "since": time.time(), "detail": blocked[1]}
            left.append(name)
            continue
        if time.monotonic() > until - config.settings.verify_timeout - HEAL_RESERVE:
            log.warning("%s needs %s; no time left in this heal to look at it (the watch does)", name, svc.name)
            no_time.append(name)
            continue
        lock = Lock(paths.lock(name))
        if not lock.wait(min(config.settings.verify_timeout + 10, max(0.0, until - time.monotonic()))):
            log.warning("%s needs %s; its own heal is still running, so it is left to that heal", name, svc.name)
            continue
        try:
            result = heal(config, dependent, paths, CHAIN_TRIGGER, {}, chain=False, until=until)
            forget_waiting(paths, name)
            if result.post:
                shown[dependent.unit] = dict(shown.get(dependent.unit, {}), **result.post)
            if result.outcome is Outcome.HEALTHY and not waited:
                continue  # up all along: not part of this chain
            chain.append(name)
            text = render_report(config.settings, result, paths=paths)
            if result.outcome is not Outcome.HEALTHY:
                record_heal(paths, result, text)
            remember_restarts(paths, name, result.post)
            done.append((result, text))
        except (Stopped, KeyboardInterrupt):
            raise
        except Exception:  # a bug in selfheal: said on its own, the rest of the chain goes on
            log.exception("selfheal crashed while healing %s after %s", name, svc.name)
            report_heal_crash(config, paths, dependent, traceback.format_exc())
        finally:
            lock.release()
    return done, left, no_time


def healthy_at_a_glance(config: Config, paths: Paths, services: Sequence[Service],
                        shown: Dict[str, Dict[str, str]], until: float) -> set:
    """The names of those that are active, whose port listens and whose health check answers
    (every check at once, within the heal's deadline): one look for the whole chain."""
    active = [s for s in services if shown.get(s.unit, {}).get("ActiveState") in ("active", "reloading")]
    if not active:
        return set()
    ports = listening_ports() if any(s.port for s in active) else None
    listening = [s for s in active if not s.port or ports is None or s.port in ports]
    answers = health_checks(listening, shown)  # each within its health_timeout (no budget: heals may run in threads)
    return {s.name for s in listening if answers.get(s.name, (True, ""))[0] and (
        s.name in answers or not (s.health_url or s.health_command))}


def chain_preface(svc: Service, outcome: Outcome, dependents: Sequence[Tuple[HealResult, str]],
                  waiting: Sequence[str] = (), no_time: Sequence[str] = (), took: Optional[float] = None,
                  heal_timeout: float = 0.0) -> str:
    """The lines that lead a root's report: which services failed because of it, what became
    of each, and those the heal's deadline (heal_timeout) left to the watch."""
    if not dependents and not waiting and not no_time:
        return ""
    down = [r.service.name for r, _ in dependents if r.outcome is not Outcome.HEALTHY] + list(waiting) + list(no_time)
    lines = []
    if outcome is Outcome.HEALTHY:
        lines.append("%s is healthy; %s waited for it." % (svc.name, and_list(
            [r.service.name for r, _ in dependents] + list(waiting))))
    elif down:
        lines.append("%s failed; %s failed because of it." % (svc.name, and_list(down)))
    else:
        lines.append("%s failed; the services that need it were verified." % svc.name)
    for result, _ in dependents:
        lines.append("  %s: %s" % (result.service.name, chain_line(result, svc.name)))
    for name in waiting:
        lines.append("  %s: waiting; selfheal heals it once what it needs is healthy again" % name)
    for name in no_time:
        lines.append("  %s: not looked at: the heal ran out of heal_timeout; the watch heals it" % name)
    if outcome not in (Outcome.RESOLVED, Outcome.RECOVERED, Outcome.HEALTHY) and waiting:
        lines.append("They are not restarted while %s is down (they would only fail again)." % svc.name)
    if no_time:
        lines.append("The chain ran out of time: heal_timeout = %s was spent after %s; %d service(s) above are "
                     "left to the watch." % (format_duration(heal_timeout), format_duration(took or 0.0), len(no_time)))
    elif took is not None and dependents:
        lines.append("The chain took %s." % format_duration(took))
    return "\n".join(lines) + "\n\n"


def chain_line(result: HealResult, root: str) -> str:
    if result.outcome is Outcome.RESOLVED:
        return "restarted after %s (%s), healthy in %s" % (root, result.strategy, format_duration(
            result.healing_seconds or 0.0))
    if result.outcome in (Outcome.RECOVERED, Outcome.HEALTHY):
        return "came back by itself once %s was up; verified healthy" % root
    return "%s: %s" % (result.outcome.value, result.escalation or result.root_cause.summary)


def and_list(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else "%s and %s" % (", ".join(names[:-1]), names[-1])


# =============================================================================
# Reporting (pure: a function of the data)
# =============================================================================

class Label(NamedTuple):
    """How one status of a report is shown everywhere: the subject's icon, ntfy's tag and
    priority, the journal's MESSAGE_ID (fixed for good: README), the dashboard's colour,
    and whether it is a problem (mailed under notify = on-failure)."""
    icon: str
    ntfy_tag: str
    ntfy_priority: str  # default | low | high: a human should look
    message_id: str
    colour: str
    problem: bool


# Every status a report or a heal can have, once; the views below derive from it.
LABELS = {
    "RESOLVED": Label("✅", "white_check_mark", "default", "3f5c2a9e8d7b4c1fa6e0b2d4c8f1a7e3", "green", False),
    "RECOVERED": Label("✅", "white_check_mark", "default", "8b1e6d3c5a2f4e9db7c0a1f3e5d2b4c6", "green", False),
    "FAILED": Label("❌", "x", "high", "c4a7e2f9b1d34c8e9f6a0b5d7e3c1a28", "red", True),
    "ESCALATED": Label("🛑", "octagonal_sign", "high", "e9d2b6a4c7f14e3b8a5c0d9f2e6b1a47", "red", True),
    "HEALTHY": Label("ℹ️", "information_source", "default", "", "", False),
    "STOPPED": Label("⏸️", "pause_button", "high", "5a8c3e1f7b9d4a2c6e0f8b3d1a5c7e94", "yellow", True),
    "WAITING": Label("⏳", "hourglass", "default", "7d4f1b8e2c6a4d9fb3e5a0c7d2f8e1b6", "", False),
    "FLAPPING": Label("⚠️", "warning", "high", "", "", True),
    "STILL FAILING": Label("⏰", "alarm_clock", "high", "", "", True),
    "STILL DOWN AFTER MAINTENANCE": Label("🔧", "wrench", "high", "", "", True),
    "CONFIG BROKEN": Label("❌", "x", "high", "", "", True),
    "WATCH FAILED": Label("❌", "x", "high", "", "", True),
    "TEST": Label("🧪", "test_tube", "low", "", "", False),
}
SUBJECT_ICON = {outcome: LABELS[outcome.value].icon for outcome in Outcome}


def subject_label(result: HealResult) -> str:
    if result.outcome is Outcome.RECOVERED:
        return "RESOLVED (recovered by systemd)"
    return result.outcome.value


def subject_icon(outcome: Outcome, label: str) -> str:
    return LABELS["FLAPPING"].icon if label == "FLAPPING" else SUBJECT_ICON[outcome]


def heal_status(outcome: Outcome, label: str) -> str:
    """The status of a heal's report (outbox, webhook): FLAPPING when the incident flaps;
    RESOLVED for a RECOVERED one (its subject says "recovered by systemd"); else the outcome."""
    if label == "FLAPPING":
        return "FLAPPING"
    return Outcome.RESOLVED.value if outcome is Outcome.RECOVERED else outcome.value


def make_subject(settings: Settings, outcome: Outcome, service: str, label: str) -> str:
    return "%s %s: %s - %s" % (subject_icon(outcome, label), settings.name, service, label)


def subject(settings: Settings, result: HealResult) -> str:
    return make_subject(settings, result.outcome, result.service.name, subject_label(result))


def _section(title: str, lines: Iterable[str]) -> List[str]:
    return ["", title, "-" * len(title)] + ["  " + line if line else "" for line in lines]


def render_report(settings: Settings, result: HealResult, host: Optional[str] = None,
                  paths: Optional[Paths] = None) -> str:
    svc, diag, cause = result.service, result.diagnosis, result.root_cause
    host = host or socket.gethostname() or "localhost"  # no DNS on the way to the report
    out = [subject(settings, result), ""]
    out += _section("SERVICE", [
        "Service:   %s (%s)" % (svc.name, svc.unit),
        "Domain:    %s" % (svc.domain or "-"),
        "Port:      %s" % (svc.port or "-"),
        "Priority:  %s" % ("CRITICAL" if svc.critical else "standard"),
        "Time:      %s" % iso(diag.failed_at or result.started_at),
        "Host:      %s" % host,
    ])
    out += _section("ISSUE DETECTED", [issue_text(result)])
    diagnosis = [
        "State when selfheal looked: %s (%s), result %s" % (diag.active_state or "?", diag.sub_state or "?",
                                                            diag.result or "?"),
    ]
    restarted = bool(diag.finding and diag.finding.kind == "restarted")
    if diag.exit_code and restarted:  # the unit's pid is already the new run's
        diagnosis.append("Crashed run: main process %s %s (from the journal); the new run's main pid is %s" % (
            diag.exit_code, diag.exit_status, diag.unit.get("MainPID", "?")))
    elif diag.exit_code:
        diagnosis.append("Main process: %s, %s %s" % (diag.unit.get("ExecMainPID", "?"), diag.exit_code,
                                                      diag.exit_status))
    diagnosis.append("Restarts by systemd so far: %s" % diag.unit.get("NRestarts", "?"))
    memory = format_bytes(diag.unit.get("MemoryCurrent", ""))
    peak = format_bytes(diag.unit.get("MemoryPeak", ""))
    if memory or peak:
        diagnosis.append("Memory: %s now%s" % (memory or "0", ", peak %s" % peak if peak else ""))
    if svc.port and not restarted:  # after systemd's own restart the port is the new run's
        if diag.holders:
            for p in diag.holders:
                diagnosis.append("Port %d held by %s" % (svc.port, describe_process(p)))
        elif diag.listeners:
            diagnosis.append("Port %d: something listens (owner unknown)" % svc.port)
        else:
            diagnosis.append("Port %d: nobody listening" % svc.port)
    if diag.finding and diag.finding.kind == "unhealthy" and diag.failed_at is not None:
        diagnosis.append("First failed look by the watch: %s; times below count from it" % iso(diag.failed_at))
    elif diag.detected_after is not None:
        diagnosis.append("Detected %s after the failure (%s)" % (
            format_duration(diag.detected_after), "systemd OnFailure=" if result.trigger == "onfailure" else result.trigger))
    diagnosis.append("Facts from: %s" % ("systemd's MONITOR_* variables and systemctl show"
                                         if diag.from_monitor_env else "systemctl show"))
    if result.plan:
        diagnosis.append("Triage: %s" % result.plan)
    out += _section("DIAGNOSIS", diagnosis)

    healing: List[str] = []
    steps: List[str] = []
    for run_ in result.runs:
        healing.append("Strategy: %s" % run_.name)
        for line in run_.found:
            healing.append("  · %s" % line)
        for action in run_.actions:
            first, _, more = action.detail.partition("\n")
            healing.append("  - %s: %s (%s)%s" % (action.what, "ok" if action.ok else "FAILED",
                                                  format_duration(action.seconds), ", " + first if first else ""))
            healing.extend("      " + line for line in more.splitlines())
            if action.ok:
                steps.append(action.what + (" (%s)" % first if first else ""))
        if run_.note:
            healing.append("  - %s" % run_.note)
        if run_.verification:
            v = run_.verification
            healing.append("  - verify: %s after %s: %s" % ("healthy" if v.ok else "NOT healthy",
                                                              format_duration(v.seconds), v.summary()))
            if v.ok:
                steps.append("verified healthy: %s" % v.summary())
    if not result.runs:
        healing.append("No strategy was run.")
    out += _section("HEALING", healing)
    if result.outcome in (Outcome.RESOLVED, Outcome.RECOVERED):
        if result.outcome is Outcome.RECOVERED and not any(r.actions for r in result.runs):
            steps.insert(0, "systemd restarted it by itself; selfheal did not restart it again")
        out += _section("HOW IT WAS FIXED", ["%d. %s" % (i, s) for i, s in enumerate(steps, 1)])
    out += _section("ROOT CAUSE", [cause.summary, "Confidence: %s" % cause.confidence,
                                   "Evidence: %s" % cause.evidence])
    if result.healing_seconds is not None:
        start = ("the watch's first failed look" if diag.finding and diag.finding.kind == "unhealthy"
                 else "failure")
        out += _section("HEALING TIME", ["%s from %s to verified healthy" % (
            format_duration(max(0.0, result.healing_seconds)), start)])
    if result.escalation:
        out += _section("WHY A HUMAN IS NEEDED", [result.escalation])
    out += _section("RECOMMENDATION", [cause.recommendation])
    post = result.post
    since = (post.get("ActiveEnterTimestamp") if post.get("ActiveState") in RUNNING_STATES
             else post.get("InactiveEnterTimestamp") if post.get("ActiveState") in ("inactive", "failed")
             else "")  # activating, deactivating: since the last change, which show does not say
    status = ["State:   %s (%s)" % (post.get("ActiveState", "?"), post.get("SubState", "?")),
              "Enabled: %s" % (post.get("UnitFileState") or "?"),
              "Since:   %s" % (since or "?")]
    if svc.port and result.outcome not in (Outcome.RESOLVED, Outcome.RECOVERED, Outcome.HEALTHY):
        status += port_now(svc)
    out += _section("POST-HEALING STATUS", status)
    if result.outcome in (Outcome.FAILED, Outcome.ESCALATED, Outcome.STOPPED):
        out += _section("MANUAL STEPS", [
            "ssh root@%s" % host,
            *result.manual,
            "systemctl status %s" % svc.unit,
            "journalctl -u %s -n 100 --no-pager" % svc.unit,
            "free -h; df -h",
            "systemctl reset-failed %s; systemctl restart %s" % (svc.unit, svc.unit),
            "selfheal resume %s    # re-arm healing once it is fixed" % svc.name,
        ])
    if diag.journal:
        out += _section("JOURNAL OF THE FAILED RUN (last %d lines)" % len(diag.journal), list(diag.journal))
    after = result.after
    if after is not None:
        lines = ["State: %s (%s), result %s%s" % (after.active_state, after.sub_state, after.result,
                 ", main process %s %s" % (after.exit_code, after.exit_status) if after.exit_code else "")]
        out += _section("JOURNAL OF THE REPAIR ATTEMPT", lines + [""] + list(after.journal))
    paths = paths or Paths()
    out += ["", "-- ", "selfheal %s on %s; history: %s; log: %s" % (
        VERSION, host, paths.history, paths.service_log(svc.name))]
    return "\n".join(out) + "\n"


def port_now(svc: Service) -> List[str]:
    """Who holds the service's port as the report is written (after a failed heal: the
    squatter, if any, by pid, user, cgroup and command)."""
    ports = listening_ports()
    if ports is not None and svc.port not in ports:
        return ["Port:    %d: nobody listening" % svc.port]
    pids = sorted({pid for lst in listeners_on(svc.port) for pid in lst.pids})  # IPv4 and IPv6: one process
    holders = [p for p in (read_process(pid) for pid in pids) if p]
    if not holders:
        return ["Port:    %d: something listens (owner unknown)" % svc.port]
    return ["Port:    %d held by %s" % (svc.port, describe_process(p)) for p in holders]


def issue_text(result: HealResult) -> str:
    diag, unit = result.diagnosis, result.service.unit
    if result.outcome is Outcome.ESCALATED:
        return "%s failed again; selfheal backs off (too many heals in the window) and heals it at growing intervals." % unit
    finding = diag.finding
    if finding and finding.kind == "restarted":
        crash = ""
        if diag.exit_code:
            crash = ": main process %s %s (result: %s)" % (diag.exit_code, diag.exit_status, diag.result)
        return "%s crashed%s; systemd's Restart= restarted it before selfheal was called." % (unit, crash)
    if finding:
        return "The watch found %s %s: %s." % (unit, {"unhealthy": "unhealthy", "stopped": "stopped",
                                                       "failed": "failed"}.get(finding.kind, finding.kind),
                                             finding.detail)
    if diag.exit_code == "killed" or diag.exit_code == "dumped":
        return "%s failed: main process killed by signal %s (result: %s)." % (unit, diag.exit_status, diag.result)
    if diag.exit_code == "exited" and diag.exit_status not in ("", "0"):
        return "%s failed: main process exited with status %s (result: %s)." % (unit, diag.exit_status, diag.result)
    if diag.active_state in ("failed", "activating") or diag.result not in ("", "success"):
        return "%s failed (result: %s)." % (unit, diag.result or "unknown")
    return "%s was %s (%s)." % (unit, diag.active_state or "in an unknown state", diag.sub_state or "?")


# =============================================================================
# Outbox: every report is queued first; mail and the webhook send it from there
# =============================================================================
#
# A report is data (service, status, subject, body, thread), written durably to the outbox
# (atomic, fsynced) before any channel sees it. Each channel renders it its own way and marks
# its own delivery in the record; the first attempt, the watch's retry, flush-mail and the
# run after a reboot are one code path. So a heal stopped at any instant leaves its report
# queued or delivered, and a channel that marked a report sent never sends it again. (A stop
# between a send and its mark sends that one once more, at least once rather than never; the
# mail keeps its Message-ID.) One channel that cannot send now never holds up the other.

OUTBOX_VERSION = 1  # of a queued record's format
REPORT_NAME_RE = re.compile(r"^\d+-[0-9a-f]+\.json$")
QUEUED: List[Path] = []  # what this process put in the outbox (heal_rounds asks, on SIGTERM)


class NotDelivered(SelfhealError):
    """A channel could not deliver a report. permanent: it never will (a 5xx from the mail
    server, a 3xx or 4xx other than 408/425/429 from the webhook); otherwise it is retried."""

    def __init__(self, reason: str, permanent: bool = False):
        super().__init__(reason)
        self.permanent = permanent


def new_report(settings: Settings, icon: str, service: str, label: str, body: str, thread: str = "",
               subject_text: str = "", cc: Sequence[str] = (), status: str = "") -> dict:
    """One report as data: "ICON NAME: SERVICE - LABEL" unless subject_text is given; status,
    one of LABELS (default: the label itself, which must then be one); thread, the
    Message-ID of the incident's first mail; cc, mailed besides email_to (escalate_to).
    Its channels are fixed here: mail, and the webhook when webhook_url is set."""
    status = status or label
    if status not in LABELS:
        raise ValueError("report status %r is none of LABELS" % status)
    import email.utils

    now = time.time()
    title = "%s: %s - %s" % (settings.name, service, label)
    if subject_text:
        title = subject_text[len(icon) + 1:] if icon and subject_text.startswith(icon + " ") else subject_text
    domain = settings.email_from.rpartition("@")[2] or "localhost"
    channels = {"mail": "queued"}
    if settings.webhook_url:
        channels["webhook"] = "queued"
    return clean_data({
        "version": OUTBOX_VERSION, "ts": round(now, 3), "time": iso(now), "host": socket.gethostname(),
        "name": settings.name, "service": service, "status": status,
        "subject": subject_text or "%s %s" % (icon, title), "title": title, "body": body,
        "thread": thread, "message_id": email.utils.make_msgid("selfheal", domain=domain),
        "channels": channels, **({"cc": list(cc)} if cc else {})})


def queue_report(paths: Paths, report: dict, stem: str = "") -> Path:
    """Put a report in the outbox (atomic, fsynced, 0600 in a 0700 directory)."""
    ensure_dir(paths.spool, mode=0o700)
    path = paths.spool / ("%s.json" % (stem or "%d-%s" % (float(report.get("ts") or time.time()) * 1000,
                                                         os.urandom(4).hex())))
    atomic_write(path, json.dumps(report, sort_keys=True) + "\n", mode=0o600)
    QUEUED.append(path)
    return path


def read_report(path: Path) -> Optional[dict]:
    """A queued record, or None when it is gone or damaged (then set aside as .bad, kept)."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        channels = report.get("channels") if isinstance(report, dict) else None
        if (not isinstance(channels, dict) or not channels or not set(channels) <= set(CHANNELS)
                or not all(isinstance(v, str) for v in channels.values())
                or not all(isinstance(report.get(k, ""), str) for k in (
                    "subject", "body", "title", "thread", "message_id", "service", "status", "summary"))
                or not all(isinstance(a, str) and ADDR_RE.match(a) for a in report.get("cc", []))
                or not report.get("subject")):
            raise ValueError("not a queued report")
        return report
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        with contextlib.suppress(OSError):
            path.rename(path.with_suffix(".bad"))
        log.error("queued report %s is damaged (%s); kept as %s", path, exc, path.with_suffix(".bad"))
        return None


def outbox(paths: Paths) -> List[Path]:
    """The queued records, oldest first (their names start with the time they were made)."""
    try:
        return sorted(p for p in paths.spool.iterdir()
                      if REPORT_NAME_RE.match(p.name) and p.is_file() and not p.is_symlink())
    except OSError:
        return []


def mail_message(settings: Settings, report: dict) -> EmailMessage:
    """The mail channel's rendering: the same Message-ID and date at every attempt."""
    return make_message(settings, report["subject"], report["body"], thread=report.get("thread", ""),
                        message_id=report.get("message_id", ""), when=report.get("ts"), cc=report.get("cc", ()))


def send_by_mail(config: Config, report: dict) -> str:
    try:
        send(config.settings, mail_message(config.settings, report))
    except Exception as exc:  # whatever went wrong: not delivered, the record says what
        raise NotDelivered(explain_mail_error(config.settings, exc), permanent_rejection(exc))
    return "mailed to %s" % ", ".join(tuple(config.settings.email_to) + tuple(report.get("cc", ())))


def send_by_webhook(config: Config, report: dict) -> str:
    settings = config.settings
    if not settings.webhook_url:
        raise NotDelivered("webhook_url is not set; queued posts wait for it")
    try:
        return "posted to %s (%s)" % (url_for_log(settings.webhook_url), post_webhook(settings, webhook_event(
            settings, report)))
    except NotDelivered:
        raise
    except Exception as exc:
        raise NotDelivered(explain_http_error(url_for_log(settings.webhook_url), exc, settings.webhook_timeout))


CHANNELS: Dict[str, Callable[[Config, dict], str]] = {"mail": send_by_mail, "webhook": send_by_webhook}


def deliver(config: Config, paths: Paths, report: dict) -> bool:
    """Queue the report, then send what the outbox holds. Returns whether this report's mail
    went out now. Never raises for a delivery problem: the report stays queued."""
    try:
        path: Optional[Path] = queue_report(paths, report)
    except OSError as exc:  # a full disk, a symlinked spool: send it straight away instead
        log.error("could not queue %r before sending it (%s); sending it directly", report["subject"], exc)
        return send_unqueued(config, report)
    why: List[str] = []
    try:
        flush_outbox(config, paths, wait=5.0, why=why)
    except Exception as exc:  # a broken outbox: the report stays in it, for the next try
        log.exception("could not send the outbox")
        why.append("the outbox could not be sent: %s" % exc)
    left = read_report(path) if path.exists() else None
    waiting = sorted(k for k, v in (left or {}).get("channels", {}).items() if v == "queued")
    if waiting:
        log.warning("%r not yet delivered (%s): %s; queued as %s (it goes out with the next flush: the watch, "
                    "flush-mail)", report["subject"], ", ".join(waiting),
                    why[-1] if why else "older reports are still being sent", path)
    return (left or {}).get("channels", {}).get("mail", "sent") == "sent"


def send_unqueued(config: Config, report: dict) -> bool:
    """The last resort when the outbox cannot be written: each channel once, and the whole
    report to the journal when mail fails too."""
    mailed = False
    for channel in report["channels"]:
        try:
            log.info("%s: %r %s", channel, report["subject"], CHANNELS[channel](config, report))
            mailed = mailed or channel == "mail"
        except NotDelivered as exc:
            log.critical("could not deliver %r by %s (%s) nor queue it; the report follows:\n%s",
                         report["subject"], channel, exc, report["body"])
    return mailed


def flush_outbox(config: Config, paths: Paths, wait: float = 0.0,
                 why: Optional[List[str]] = None) -> Dict[str, List[int]]:
    """Send what is queued, oldest first, on each channel, and mark each delivery in its
    record. -> {channel: [sent now, still queued]}.

    A channel stops at the first report it cannot send now (the later ones would fail too);
    the other channel goes on. A report refused for good on a channel is marked so, logged,
    and kept as .rejected once no channel has it queued: never deleted unsent.
    """
    counts = {channel: [0, 0] for channel in CHANNELS}
    if paths.spool.is_symlink():
        log.error("the outbox %s is a symlink; selfheal neither sends nor removes what it points at "
                  "(remove the link)", paths.spool)
        return counts
    if not outbox(paths) and not old_queue_files(paths):
        return counts
    lock = Lock(paths.run / "locks" / "outbox.lock")
    if not (lock.wait(wait) if wait else lock.acquire()):  # another run is sending
        return queued_counts(paths, counts)
    try:
        adopt_old_queues(paths)
        blocked: Dict[str, str] = {}
        for path in outbox(paths):
            report = read_report(path)
            if report is None:
                continue
            channels = report["channels"]
            for channel in sorted(channels):
                if channels[channel] != "queued" or channel in blocked:
                    continue
                if time_left() == 0.0:  # the watch run's budget is spent: the next run sends it
                    blocked[channel] = "no time left in this watch run"
                    log.info("%s: %r waits for the next watch run (its budget is spent)", channel, report["subject"])
                    continue
                try:
                    said = CHANNELS[channel](config, report)
                except NotDelivered as exc:
                    if not exc.permanent:
                        blocked[channel] = str(exc)
                        log.warning("%s: %r not delivered yet: %s", channel, report["subject"], exc)
                        if why is not None:
                            why.append(str(exc))
                        continue
                    channels[channel] = "rejected: %s" % exc
                    log.error("%s: %r refused for good (%s); kept in %s", channel, report["subject"], exc, path)
                else:
                    channels[channel] = "sent"
                    counts[channel][0] += 1
                    log.info("%s: %r %s", channel, report["subject"], said)
                atomic_write(path, json.dumps(report, sort_keys=True) + "\n", mode=0o600)  # the mark
            if all(state == "sent" for state in channels.values()):
                path.unlink()
            elif "queued" not in channels.values():
                path.rename(path.with_suffix(".rejected"))
    finally:
        lock.release()
    return queued_counts(paths, counts)


def queued_counts(paths: Paths, counts: Optional[Dict[str, List[int]]] = None) -> Dict[str, List[int]]:
    """counts with each channel's "still queued" figure filled in from the outbox."""
    counts = counts or {channel: [0, 0] for channel in CHANNELS}
    for channel, number in queue_lengths(paths).items():
        counts[channel][1] = number
    return counts


def queue_lengths(paths: Paths) -> Dict[str, int]:
    """Reports each channel still has to deliver (raises OSError when the outbox cannot be read:
    it is root's)."""
    lengths = {channel: 0 for channel in CHANNELS}
    if paths.spool.is_symlink():  # nothing selfheal sends from
        return lengths
    try:
        with os.scandir(str(paths.spool)) as entries:
            names = [entry.name for entry in entries if entry.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return lengths
    for name in names:
        if not REPORT_NAME_RE.match(name):
            lengths["mail"] += name.endswith(".eml")  # queued by an older selfheal
            continue
        try:
            fd = os.open(str(paths.spool / name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            with open(fd, encoding="utf-8") as handle:
                channels = json.loads(handle.read()).get("channels", {})
        except (OSError, ValueError, AttributeError):  # gone, a link, damaged: not a queued report
            continue
        for channel, state in channels.items() if isinstance(channels, dict) else ():
            if channel in lengths and state == "queued":
                lengths[channel] += 1
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        if paths.webhook_spool.is_symlink():
            return lengths
        with os.scandir(str(paths.webhook_spool)) as entries:  # queued by an older selfheal
            lengths["webhook"] += sum(1 for entry in entries
                                      if entry.name.endswith(".json") and entry.is_file(follow_symlinks=False))
    return lengths


def old_queue_files(paths: Paths) -> List[Path]:
    """What an older selfheal queued: mails as spool/*.eml, webhook posts as spool/webhook/*.json."""
    found: List[Path] = []
    for folder, pattern in ((paths.spool, "*.eml"), (paths.webhook_spool, "*.json")):
        if folder.is_symlink():
            log.error("the old queue %s is a symlink; selfheal neither sends nor removes what it points at "
                      "(remove the link)", folder)
            continue
        with contextlib.suppress(OSError):
            found += [p for p in folder.glob(pattern) if p.is_file() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.name)


def adopt_old_queues(paths: Paths) -> None:
    """Reports an older selfheal queued join the outbox with the one channel they were queued
    for; a damaged one is set aside as .bad, as before."""
    import email.parser
    import email.policy

    for path in old_queue_files(paths):
        try:
            data = path.read_bytes()
            if path.suffix == ".eml":
                msg = email.parser.BytesParser(policy=email.policy.SMTP).parsebytes(data)
                # What the old spool wrote is 7-bit text with headers, a blank line and a body.
                if (not msg["Subject"] or re.search(rb"[^\t\r\n\x20-\x7e]", data)
                        or not re.search(rb"\n\r?\n", data)):
                    raise ValueError("not a queued mail")
                subject_text = str(msg["Subject"])
                report = {"subject": subject_text, "title": subject_text, "body": message_text(msg).replace("\r\n", "\n"),
                          "thread": "".join(str(msg["In-Reply-To"] or "").split()),  # unfolded
                          "message_id": "".join(str(msg["Message-ID"] or "").split()),
                          "channels": {"mail": "queued"}}
            else:
                event = json.loads(data.decode("utf-8"))
                if not isinstance(event, dict) or not isinstance(event.get("subject"), str) or not all(
                        isinstance(event.get(k, ""), str) for k in ("summary", "status", "service", "thread")):
                    raise ValueError("not a queued webhook post")
                report = {"subject": event["subject"], "title": event["subject"], "body": event.get("summary", ""),
                          "summary": event.get("summary", ""), "status": event.get("status", ""),
                          "service": event.get("service", ""), "thread": event.get("thread", ""),
                          "channels": {"webhook": "queued"}}
                if isinstance(event.get("ts"), (int, float)):
                    report["ts"] = event["ts"]
            stem = path.stem if re.match(r"^\d+-[0-9a-f]+$", path.stem) else ""
            if stem and (paths.spool / (stem + ".json")).exists():
                stem += os.urandom(2).hex()
            queue_report(paths, dict(report, version=OUTBOX_VERSION), stem=stem)
            QUEUED.pop()
            path.unlink()
        except FileNotFoundError:
            continue
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            with contextlib.suppress(OSError):
                path.rename(path.with_suffix(".bad"))
            log.error("queued report %s is damaged (%s); kept as %s", path, exc, path.with_suffix(".bad"))


# =============================================================================
# Mail: the outbox's first channel (render, send over SMTP)
# =============================================================================


def make_message(settings: Settings, subject_text: str, body: str, thread: str = "", message_id: str = "",
                 when: Optional[float] = None, cc: Sequence[str] = ()) -> EmailMessage:
    """A plain-text UTF-8 report. thread: the Message-ID of the incident's first mail;
    message_id and when: the report's own (kept at every attempt), else new ones."""
    import email.policy
    import email.utils
    from email.message import EmailMessage

    msg = EmailMessage(policy=email.policy.SMTP)
    # Nothing that reaches a header may end it: control characters become spaces, and a
    # thread id that is not one <id@host> is left out (the mail still goes, unthreaded).
    msg["Subject"] = re.sub(HEADER_BREAKS.pattern + "+", " ", without_credentials(subject_text))
    msg["From"] = settings.email_from
    msg["To"] = ", ".join(settings.email_to)
    if cc:
        msg["Cc"] = ", ".join(cc)
    msg["Date"] = email.utils.formatdate(when, localtime=True)
    domain = settings.email_from.rpartition("@")[2] or "localhost"
    valid = re.compile(r"^<[!-;=?-~]+>$")
    msg["Message-ID"] = message_id if valid.match(message_id) else email.utils.make_msgid("selfheal", domain=domain)
    if thread and valid.match(thread):
        msg["In-Reply-To"] = thread
        msg["References"] = thread
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Mailer"] = "selfheal %s" % VERSION
    # The last gate before mail, queue and webhook: no URL credentials, no control characters.
    msg.set_content(clean(body), charset="utf-8", cte="quoted-printable")
    return msg


def read_password(path: str) -> str:
    bad = secret_file_problem(path) if os.path.islink(path) else check_trusted_file(path, "smtp_password_file")
    if bad is None and is_root() and os.stat(path).st_mode & 0o077:
        bad = "%s: smtp_password_file must be mode 0600 or 0400" % path
    if bad:
        raise SelfhealError(bad)
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), encoding="utf-8") as handle:
            return handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SelfhealError("%s: cannot read the SMTP password: %s" % (path, exc))


def send(settings: Settings, msg: EmailMessage) -> None:
    """Send one message over SMTP, the whole session (connect to QUIT) within smtp_timeout:
    smtplib's timeout is per socket operation, and a server that keeps sending 220-
    lines would hold the heal (and its lock) for ever. Raises one of mail_errors()."""
    within(settings.smtp_timeout, lambda: smtp_session(settings, msg), "selfheal-smtp")


def smtp_session(settings: Settings, msg: EmailMessage) -> None:
    import smtplib
    import ssl

    timeout = settings.smtp_timeout
    if settings.smtp_security == "ssl":
        smtp = smtplib.SMTP_SSL(settings.smtp_host, settings.smtp_port, timeout=timeout,
                                context=ssl.create_default_context())
    else:
        smtp = smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=timeout)
    with smtp:
        if settings.smtp_security == "starttls":
            smtp.starttls(context=ssl.create_default_context())
        if settings.smtp_user:
            smtp.login(settings.smtp_user, read_password(settings.smtp_password_file))
        cc = [a.strip() for a in str(msg.get("Cc", "")).split(",") if a.strip()]
        smtp.send_message(msg, from_addr=settings.email_from, to_addrs=list(settings.email_to) + cc)


def explain_mail_error(settings: Settings, exc: BaseException) -> str:
    import smtplib
    import ssl

    where = "%s:%d" % (settings.smtp_host, settings.smtp_port)
    if isinstance(exc, socket.gaierror):
        return "cannot resolve %s (DNS): %s" % (settings.smtp_host, exc.strerror or exc)
    if isinstance(exc, ConnectionRefusedError):
        return "connection to %s refused: is the mail server running?" % where
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "no answer from %s within %s" % (where, format_duration(settings.smtp_timeout))
    if isinstance(exc, ssl.SSLError):
        return "TLS with %s failed (%s): check smtp_security and the port" % (where, getattr(exc, "reason", None) or exc)
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return "%s refused the login for %s: check smtp_user and smtp_password_file" % (where, settings.smtp_user)
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return "%s does not offer that (%s): check smtp_security" % (where, exc)
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return "%s refused the recipients: %s" % (where, "; ".join(
            "%s (%d %s)" % (who, code, header_safe(said.decode("utf-8", "replace"), 120))
            for who, (code, said) in exc.recipients.items()))
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return "%s refused the sender %s: %s" % (where, settings.email_from, exc.smtp_error.decode("utf-8", "replace"))
    if isinstance(exc, smtplib.SMTPException):
        return "%s: SMTP error: %s" % (where, exc)
    return "%s: %s" % (where, exc)


def mail_errors() -> Tuple[type, ...]:
    """What a failed send raises: the network, the SMTP server, or our own checks."""
    import smtplib

    return (OSError, smtplib.SMTPException, SelfhealError)


def message_text(msg: EmailMessage) -> str:
    """The plain text of a message (what the journal gets when it can be neither sent nor queued)."""
    try:
        return msg.get_body(preferencelist=("plain",)).get_content()
    except (AttributeError, KeyError, LookupError, ValueError):
        return str(msg)


def permanent_rejection(exc: BaseException) -> bool:
    """A 5xx answer: the server will refuse this message every time (a 4xx may pass later)."""
    import smtplib

    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(code >= 500 for code, _ in exc.recipients.values())
    if isinstance(exc, (smtplib.SMTPSenderRefused, smtplib.SMTPDataError)):
        return exc.smtp_code >= 500
    return False


# =============================================================================
# Webhook and heartbeat: the HTTP channel beside mail, and the watch's sign of life
# =============================================================================

WEBHOOK_VERSION = 1  # the "version" of the json format: it goes up only when a field changes meaning
SUMMARY_CHARS = 1000  # the summary of a report posted to a webhook, at most
RETRY_STATUSES = (408, 425, 429)  # 4xx answers that mean "not now": queued and retried
NTFY_PRIORITY = {status: label.ntfy_priority for status, label in LABELS.items()}  # unknown: "high"
NTFY_TAGS = {status: label.ntfy_tag for status, label in LABELS.items()}


class WebhookError(NotDelivered):
    """A post the webhook did not take. permanent: the same request will never be taken
    (a 3xx or 4xx answer other than 408/425/429); otherwise it is worth retrying."""


def url_for_log(url: str) -> str:
    """scheme://host[:port] only: the path, query and user of a webhook URL are often its secret."""
    parts = urllib.parse.urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return "%s://%s%s" % (parts.scheme, host, "/..." if parts.path.strip("/") or parts.query else "")


def header_safe(text: str, limit: int = 200) -> str:
    """Text that may go into an HTTP header: ASCII only (accents dropped, the rest removed),
    no CR, LF or other control characters, one line of at most `limit` characters."""
    import unicodedata

    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    plain = re.sub(r"[\x00-\x1f\x7f]+", " ", plain)
    return re.sub(r" {2,}", " ", plain).strip()[:limit]


def report_summary(subject_text: str, body: str, limit: int = SUMMARY_CHARS) -> str:
    """The short text of a report, for chat: of a heal report the lines before its first
    section (a FLAPPING preface), what was detected, the root cause and the healing time or
    why a human is needed; of any other report its text. Plain text, no links added."""
    lines = body.splitlines()
    lead: List[str] = []
    sections: Dict[str, List[str]] = {}
    current: Optional[List[str]] = None
    i = 0
    while i < len(lines):
        title = lines[i].strip()
        if (title and not lines[i].startswith(" ") and i + 1 < len(lines)
                and lines[i + 1].strip() == "-" * len(title)):
            current = sections.setdefault(title, [])
            i += 2
            continue
        (lead if current is None else current).append(lines[i].strip())
        i += 1
    if "ISSUE DETECTED" in sections:
        # The lead's last line is the heal report's own title (render_report's first line):
        # the subject already says it, or, after a FLAPPING preface, the heal's own outcome.
        told = [line for line in lead if line]
        parts = [" ".join(line for line in told[:-1] if line != subject_text)]
        wanted = (("ISSUE DETECTED", "", 0), ("ROOT CAUSE", "Root cause: ", 1), ("HEALING TIME", "Healing time: ", 1),
                  ("WHY A HUMAN IS NEEDED", "Why a human is needed: ", 0))
        for title, prefix, first_lines in wanted:
            text = [line for line in sections.get(title, []) if line]
            if text:
                parts.append(prefix + " ".join(text[:first_lines] if first_lines else text))
        summary = "\n".join(p for p in parts if p)
    else:
        summary = "\n".join(lines).strip()
        if summary.startswith(subject_text):
            summary = summary[len(subject_text):].strip()
    # Link-free: a URL in the report (a health_url the watch found failing) is cut to its
    # scheme and host, so a token in its path or query never reaches a chat service.
    summary = URL_RE.sub(lambda m: url_for_log(m.group(0)), summary)
    return summary if len(summary) <= limit else summary[:limit - 3].rstrip() + "..."


URL_RE = re.compile(r"\bhttps?://[^\s<>\"']+?(?=[.,:;)]*(?:\s|$|[<>\"']))")


def webhook_event(settings: Settings, report: dict) -> dict:
    """What a webhook is told about one report (the json format, documented in the README):
    the report's own facts, so mail and webhook say the same."""
    return {
        "version": WEBHOOK_VERSION,
        "selfheal": VERSION,
        "host": report.get("host") or socket.gethostname(),
        "name": report.get("name") or settings.name,
        "service": report.get("service", ""),
        "status": report.get("status", ""),
        "subject": report["subject"],
        "summary": report.get("summary") or report_summary(report["subject"], report.get("body", "")),
        "ts": report.get("ts") or round(time.time(), 3),
        "time": iso(float(report.get("ts") or time.time())),
        "thread": report.get("thread") or report.get("message_id", ""),
        "title": report.get("title") or report["subject"],
    }


def webhook_request(settings: Settings, event: dict) -> Tuple[bytes, Dict[str, str]]:
    """The body and headers of the post, in webhook_format."""
    if settings.webhook_format == "slack":
        text = "%s\n%s" % (event["subject"], event["summary"])
        # Slack reads <...> as links and mentions, & as an entity: escaped, the text is only text.
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        payload = {"text": text, "unfurl_links": False, "unfurl_media": False}
        return json.dumps(payload).encode("ascii"), {"Content-Type": "application/json"}
    if settings.webhook_format == "ntfy":
        title = event.get("title") or event["subject"]
        tags = [NTFY_TAGS.get(event["status"], "bell"), "selfheal"]
        if NAME_RE.match(event.get("service", "")) and event["service"] not in tags:
            tags.append(event["service"])
        headers = {"Content-Type": "text/plain; charset=utf-8", "Title": header_safe(title),
                   "Priority": NTFY_PRIORITY.get(event["status"], "high"), "Tags": header_safe(",".join(tags))}
        return (event["summary"] or event["subject"]).encode("utf-8"), headers
    return json.dumps(event, sort_keys=True).encode("ascii"), {"Content-Type": "application/json"}


def http_send(url: str, timeout: float, data: Optional[bytes] = None,
              headers: Optional[Dict[str, str]] = None, limit: int = 4096) -> Tuple[int, bytes]:
    """One HTTP request (POST with data, else GET); redirects are not followed (a POST that
    turns into a GET loses its report). user:password@ in the URL is sent as Basic
    authorization. -> (status, the first `limit` bytes of the answer). Raises OSError or
    http.client.HTTPException when there is no HTTP answer."""
    import base64
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    headers = dict(headers or {})
    headers["User-Agent"] = "selfheal/%s" % VERSION
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:
        login = "%s:%s" % (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        headers["Authorization"] = "Basic " + base64.b64encode(login.encode("utf-8")).decode("ascii")
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")

    def once() -> Tuple[int, bytes]:
        try:
            with urllib.request.build_opener(NoRedirect).open(request, timeout=timeout) as response:
                return response.status, response.read(limit)
        except urllib.error.HTTPError as exc:
            try:
                answer = exc.read(limit)
            except Exception:  # the error body is only for the log
                answer = b""
            exc.close()
            return exc.code, answer

    # urllib's timeout bounds each socket operation, not the request: a server that answers
    # a byte at a time (or a slow resolver) could hold a heal far longer. The whole request
    # gets `timeout`; one still running then counts as no answer, so the report stays queued
    # (a late success means one post twice: at least once).
    return within(timeout, once, "selfheal-http")  # type: ignore[return-value]


def explain_http_error(where: str, exc: BaseException, timeout: float) -> str:
    import ssl

    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):  # urllib's URLError wraps the socket's error
        exc = reason
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the host of %s (DNS): %s" % (where, exc.strerror or exc)
    if isinstance(exc, ConnectionRefusedError):
        return "connection to %s refused" % where
    if isinstance(exc, (socket.timeout, TimeoutError)) or "timed out" in str(exc):
        return "no answer from %s within %s" % (where, format_duration(timeout))
    if isinstance(exc, ssl.SSLError):
        return "TLS with %s failed (%s)" % (where, getattr(exc, "reason", None) or exc)
    return "%s: %s" % (where, exc or type(exc).__name__)


def post_webhook(settings: Settings, event: dict) -> str:
    """Post one report to webhook_url -> "HTTP 200". Raises WebhookError."""
    import http.client

    where = url_for_log(settings.webhook_url)
    data, headers = webhook_request(settings, event)
    try:
        status, answer = http_send(settings.webhook_url, settings.webhook_timeout, data, headers)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise WebhookError(explain_http_error(where, exc, settings.webhook_timeout))
    if 200 <= status < 300:
        return "HTTP %d" % status
    said = header_safe(answer.decode("utf-8", "replace"), 120)
    text = "%s answered HTTP %d%s" % (where, status, ": " + said if said else "")
    if 300 <= status < 400:
        text += " (a redirect: set webhook_url to where it points)"
    raise WebhookError(text, permanent=300 <= status < 500 and status not in RETRY_STATUSES)


def ping_heartbeat(config: Config, paths: Paths) -> bool:
    """GET heartbeat_url: this watch run looked at every service. Never raises; a failure
    is logged when it starts, then at most hourly, and the recovery once."""
    import http.client

    settings = config.settings
    if not settings.heartbeat_url:
        return False
    where = url_for_log(settings.heartbeat_url)
    try:
        status, _ = http_send(settings.heartbeat_url, settings.webhook_timeout)
        problem = "" if 200 <= status < 300 else "%s answered HTTP %d" % (where, status)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        status, problem = 0, explain_http_error(where, exc, settings.webhook_timeout)
    marker = paths.run / "heartbeat.json"
    try:
        before = json.loads(marker.read_text(encoding="utf-8"))
        before = before if isinstance(before, dict) else {}
    except (OSError, ValueError):
        before = {}
    now = time.time()

    def when(key: str, default: float) -> float:  # a damaged marker must not fail the watch
        try:
            return float(before.get(key) or default)
        except (TypeError, ValueError):
            return default

    try:
        if problem:
            since, logged = when("failing_since", now), when("logged", 0.0)
            if now - logged >= 3600:
                log.warning("heartbeat failed: %s (failing since %s; the watch itself is fine)", problem, iso(since))
                logged = now
            else:
                log.debug("heartbeat failed: %s", problem)
            atomic_write(marker, json.dumps({"failing_since": since, "logged": logged}) + "\n")
            return False
        if before.get("failing_since"):
            log.info("heartbeat to %s works again (HTTP %d)", where, status)
            marker.unlink()
        log.debug("heartbeat: %s answered HTTP %d", where, status)
    except OSError as exc:
        log.warning("heartbeat: could not keep its state in %s: %s", marker, exc)
    return not problem


# =============================================================================
# Incidents: one mail thread per incident, flapping, reminders, notify policy
# =============================================================================

PROBLEM_OUTCOMES = (Outcome.FAILED, Outcome.ESCALATED, Outcome.STOPPED)  # a human must act
FAILURE_LABELS = tuple(status for status, label in LABELS.items() if label.problem)


def should_mail(settings: Settings, svc: Service, label: str, closes_problem: bool = False) -> bool:
    """The notify policy: always | on-failure | never (per service, else global)."""
    policy = svc.notify or settings.notify
    if policy == "never":
        return False
    if policy == "on-failure":
        return label in FAILURE_LABELS or closes_problem  # "it is fixed" ends a failure thread
    return True


def open_incident(state: dict, now: float) -> dict:
    incident = state.get("incident")
    if not incident or incident.get("closed"):
        incident = {"opened": now, "failures": [], "message_id": "", "flapping": False,
                    "problem": "", "last_mail": 0.0, "mails": 0}
        carry = state.pop("retry_carry", None)  # fixed by someone else less than incident_quiet ago
        if isinstance(carry, dict) and float(carry.get("until") or 0) > now:
            incident["retries"] = int(carry.get("retries") or 0)
        state["incident"] = incident
    return incident


def thread_report(config: Config, incident: dict, icon: str, service: str, label: str, body: str,
                  cc: Sequence[str] = (), status: str = "", reply_to: str = "") -> dict:
    """One report of an incident: the first starts the mail thread, the rest reply to it (or
    to reply_to, a mail of the thread)."""
    report = new_report(config.settings, icon, service, label, body,
                        thread=reply_to or incident.get("message_id", ""), cc=cc, status=status)
    if not incident.get("message_id"):
        incident["message_id"] = report["message_id"]
    incident["last_mail"] = time.time()
    incident["mails"] = incident.get("mails", 0) + 1
    return report


def notify_heal(config: Config, paths: Paths, result: HealResult, text: str, mail: bool = True,
                thread: str = "", label_note: str = "") -> str:
    """Decide what a heal's report becomes: a mail in the incident's thread, a FLAPPING mail
    (once), nothing (later recoveries of a flapping service; a retry that failed again; the
    notify policy), and keep the incident's state. Never raises for a mail problem.
    mail=False: only the state (a dependent, whose news is in its root's mail, `thread`).
    Returns the incident's thread (the Message-ID of its first mail)."""
    settings, svc, now = config.settings, result.service, result.started_at
    report: Optional[dict] = None
    with service_state(paths, svc.name, best_effort=True) as state:
        escalated_before = bool(state.get("escalated"))
        if result.outcome is Outcome.ESCALATED:
            state["escalated"] = state.get("escalated") or now
        incident = open_incident(state, now)
        if thread and not incident.get("message_id"):
            incident["message_id"] = thread  # its reminders follow its root's thread
        incident["failures"] = [t for t in incident["failures"] if t >= now - settings.flap_window]
        if result.a_failure:
            incident["failures"].append(now)
            incident["last_failure"] = now
        label = subject_label(result)
        send, body, closes_problem = mail, text, False
        breaker = escalated_before and result.outcome is not Outcome.ESCALATED  # healed at the breaker's pace
        if result.outcome is Outcome.ESCALATED and not escalated_before:  # the breaker trips: backoff from here
            incident["breaker_step"] = 0
            incident["next_retry"] = now + breaker_delay(settings, 0)
        elif breaker:  # each heal while the breaker is open makes the next wait longer
            incident["breaker_step"] = int(incident.get("breaker_step") or 0) + 1
            incident["next_retry"] = time.time() + breaker_delay(settings, incident["breaker_step"])
        if result.outcome is Outcome.ESCALATED and escalated_before:
            send = False  # the one escalation mail was sent already
        elif breaker and result.outcome in (Outcome.RESOLVED, Outcome.RECOVERED):
            closes_problem = bool(incident.get("problem"))
            incident["problem"] = ""
            if incident.get("breaker_told"):
                send = False  # told once that it is back; the history has every heal
            else:
                incident["breaker_told"] = True
                body = breaker_preface(settings, svc, incident) + text
        elif breaker:
            send = False  # a heal at the breaker's pace that did not help: the thread says ESCALATED
        elif result.trigger == RETRY_TRIGGER and result.outcome is Outcome.FAILED:
            send = False  # still failing: the thread has said so; reminders keep coming
        elif result.outcome in (Outcome.RESOLVED, Outcome.RECOVERED):
            closes_problem = bool(incident.get("problem"))
            incident["problem"] = ""
            if len(incident["failures"]) >= settings.flap_threshold:
                if incident.get("flapping"):
                    # One FLAPPING mail per incident; the history has every heal. But the
                    # end of a problem told (FAILED, ESCALATED) is always told.
                    send = closes_problem
                else:
                    incident["flapping"] = True
                    label = "FLAPPING"
                    body = flapping_preface(settings, svc, incident["failures"]) + text
        if label_note:  # a dependent did not come back: that is always told, as a failure
            label += label_note
            send, closes_problem = mail, True
        if result.outcome in PROBLEM_OUTCOMES:
            if not incident.get("problem") and not state.get("escalated"):  # a problem (again): its next retry
                incident["next_retry"] = now + retry_delay(settings, int(incident.get("retries") or 0))
            incident["problem"] = result.outcome.value
            incident["problem_since"] = incident.get("problem_since") or now
        else:
            incident.pop("problem_since", None)
            incident.pop("problem_mail", None)
        if send and should_mail(settings, svc, label, closes_problem):
            report = thread_report(config, incident, subject_icon(result.outcome, label), svc.name, label, body,
                                   status=heal_status(result.outcome, label))
            if result.outcome in PROBLEM_OUTCOMES and not incident.get("problem_mail"):
                # The mail with this problem's diagnosis: what reminders reply to and point at
                # (an incident that began RESOLVED has its diagnosis here, not in its first mail).
                incident["problem_mail"] = {"message_id": report["message_id"], "time": report["time"],
                                            "status": report["status"]}
        elif send:
            log.info("%s: %s not mailed (notify = %s)", svc.name, label, svc.notify or settings.notify)
        elif mail:
            log.info("%s: %s not mailed (already told in this incident)", svc.name, label)
        thread = str(incident.get("message_id") or "")
    if report is not None:  # sent after the state is saved: a slow mail server holds no lock
        deliver(config, paths, report)
    return thread


def retry_delay(settings: Settings, retries: int) -> float:
    """retry_interval, doubled for each retry this incident has had, at most an hour."""
    return min(settings.retry_interval * 2 ** min(retries, 16), MAX_RETRY_INTERVAL)


def breaker_delay(settings: Settings, step: int) -> float:
    """ESCALATED: the wait before the heal after `step` heals at the breaker's pace:
    BREAKER_FIRST, doubled each time, at most retry_interval (an hour when retries are off)."""
    cap = max(settings.retry_interval, BREAKER_FIRST) if settings.retry_interval else MAX_RETRY_INTERVAL
    return min(BREAKER_FIRST * 2 ** min(step, 16), cap)


def breaker_due(state: dict) -> float:
    """When the open breaker heals the service next (0.0: no open incident says)."""
    incident = state.get("incident")
    if not isinstance(incident, dict) or incident.get("closed"):
        return 0.0
    return float(incident.get("next_retry") or 0.0)


def breaker_preface(settings: Settings, svc: Service, incident: dict) -> str:
    return ("%s is back, healed by selfheal at the pace it keeps after too many heals (ESCALATED). It goes\n"
            "on healing it at growing intervals (the next no sooner than %s) until it has been healthy for\n"
            "incident_quiet = %s; then the count starts afresh. Further heals until then are in the history,\n"
            "not mailed one by one.\n\n" % (svc.name, iso(float(incident.get("next_retry") or time.time())),
                                             format_duration(settings.incident_quiet)))


def retry_if_due(config: Config, paths: Paths, svc: Service, now: float) -> Optional[Finding]:
    """A FAILED incident (not ESCALATED, not STOPPED) is healed again by the watch at growing
    intervals, so a fix made by hand (a corrected config) is picked up with no command typed.
    The count lives in the incident: it starts afresh once the service was healthy for
    incident_quiet, not at each success."""
    with service_state(paths, svc.name) as state:
        incident = state.get("incident")
        if not incident or incident.get("closed"):
            return None
        if state.get("escalated"):  # the breaker: never abandoned, healed at growing intervals
            if incident.get("problem") not in ("FAILED", "ESCALATED") or now < breaker_due(state):
                return None
            step = int(incident.get("breaker_step") or 0)
            incident["next_retry"] = now + breaker_delay(config.settings, step + 1)  # should this one not report
            return Finding("retry", "a heal at the breaker's pace (ESCALATED; the next in %s if it fails again)"
                           % format_duration(breaker_delay(config.settings, step + 1)), now)
        if not config.settings.retry_interval or incident.get("problem") != "FAILED":
            return None
        retries = int(incident.get("retries") or 0)
        due = float(incident.get("next_retry") or 0.0) or float(incident.get("problem_since") or now) + \
            retry_delay(config.settings, 0)
        if now < due:
            return None
        incident["retries"] = retries + 1
        incident["next_retry"] = now + retry_delay(config.settings, retries + 1)
    return Finding("retry", "retry %d of a FAILED service (the next in %s if it fails again)" % (
        retries + 1, format_duration(retry_delay(config.settings, retries + 1))), now)


def escalate_if_due(config: Config, paths: Paths, svc: Service, unit: Dict[str, str], now: float) -> None:
    """A FAILED or ESCALATED incident still open escalate_after after it began is mailed to
    escalate_to too: once per incident, in its thread."""
    settings = config.settings
    if not settings.escalate_to:
        return
    report: Optional[dict] = None
    with service_state(paths, svc.name) as state:
        incident = state.get("incident")
        if (not incident or incident.get("closed") or incident.get("problem") not in ("FAILED", "ESCALATED")
                or incident.get("escalated_to")):
            return
        since = float(incident.get("problem_since") or incident.get("opened") or now)
        if now - since < settings.escalate_after:
            return
        last = last_event(paths, svc.name) or {}
        body = ("%s on %s has been %s for %s, since %s, and no one has fixed it: after escalate_after = %s "
                "this goes to %s too.\n\nNow: %s (%s)\nCause: %s\n\n"
                "The first mail of this thread has the whole diagnosis. Look at it:\n"
                "  systemctl status %s\n  journalctl -u %s -n 100 --no-pager\n  selfheal heal %s\n"
                % (svc.name, socket.gethostname(), incident["problem"], format_duration(now - since), iso(since),
                   format_duration(settings.escalate_after), ", ".join(settings.escalate_to),
                   unit.get("ActiveState", "?"), unit.get("SubState", "?"), last.get("root_cause", "?"),
                   svc.unit, svc.unit, svc.name))
        incident["escalated_to"] = now
        if should_mail(settings, svc, "ESCALATED"):
            report = thread_report(config, incident, SUBJECT_ICON[Outcome.ESCALATED], svc.name,
                                   "%s (to %s)" % (incident["problem"], ", ".join(settings.escalate_to)), body,
                                   cc=settings.escalate_to, status=incident["problem"])
    if report is not None:
        deliver(config, paths, report)


def maintenance_until(config: Config, svc: Service, now: Optional[float] = None) -> Optional[float]:
    """When the maintenance window the service is in ends (global and its own windows);
    None outside every window."""
    windows = config.settings.maintenance + svc.maintenance
    return maintenance_end(windows, time.time() if now is None else now) if windows else None


def note_maintenance(paths: Paths, svc: Service, until: float, what: str, now: float) -> None:
    """Remember what happened to the service in a maintenance window (at most 20 lines),
    for the one mail after it, should it still be down then."""
    with service_state(paths, svc.name, best_effort=True) as state:
        window = state.get("maintenance") if isinstance(state.get("maintenance"), dict) else {}
        seen = [entry for entry in window.get("seen", []) if isinstance(entry, list) and len(entry) == 2]
        if not seen or seen[-1][1] != what:
            seen = (seen + [[now, clean(what)[:300]]])[-20:]  # bounded: a detail may quote a health reply
        state["maintenance"] = {"until": max(until, float(window.get("until") or 0.0)),
                                "since": float(window.get("since") or now), "seen": seen}


def end_of_maintenance(config: Config, paths: Paths, svc: Service, verdict: str, detail: str, now: float) -> None:
    """After a window: one mail when the service is still down (then it is treated as usual,
    in the same thread); nothing when it is fine, or when it waits for a service it needs."""
    report: Optional[dict] = None
    with service_state(paths, svc.name, best_effort=True) as state:
        window = state.pop("maintenance", None)
        if not isinstance(window, dict) or verdict not in ("failed", "stopped", "unhealthy") or (
                verdict == "stopped" and svc.on_stopped == "ignore"):
            return
        seen = "\n".join("  %s  %s" % (time.strftime("%H:%M:%S", time.localtime(float(at))), clean(str(what)))
                         for at, what in window.get("seen", []))
        body = ("The maintenance window for %s ended at %s and it is still down: %s.\n\n"
                "During the window (from %s) selfheal healed nothing and mailed nothing. What it saw:\n%s\n\n"
                "From now on selfheal treats it as usual: it heals it (its report follows in this thread),\n"
                "or, if it was already reported FAILED or ESCALATED, retries and reminds as before.\n"
                % (svc.name, iso(float(window.get("until") or now)), detail, iso(float(window.get("since") or now)),
                   seen or "  (nothing: it was down when the window ended)"))
        incident = open_incident(state, now)
        if should_mail(config.settings, svc, "STILL DOWN AFTER MAINTENANCE"):
            report = thread_report(config, incident, LABELS["STILL DOWN AFTER MAINTENANCE"].icon, svc.name,
                                   "STILL DOWN AFTER MAINTENANCE", body)
    if report is not None:
        deliver(config, paths, report)


def flapping_preface(settings: Settings, svc: Service, failures: Sequence[float]) -> str:
    times = ", ".join(time.strftime("%H:%M:%S", time.localtime(t)) for t in failures)
    return ("FLAPPING: %s failed %d times within %s (%s).\n"
            "selfheal keeps healing it up to failure_threshold = %d per %s; further recoveries in this\n"
            "incident are recorded in the history but not mailed one by one.\n\n"
            % (svc.name, len(failures), format_duration(settings.flap_window), times,
               settings.failure_threshold, format_duration(settings.failure_window)))


def incident_healthy(config: Config, paths: Paths, svc: Service, now: float) -> None:
    """The watch found the service healthy: close a quiet incident; say when a problem a
    human had to fix (FAILED, ESCALATED, STOPPED) is gone, and how long it lasted."""
    incident = load_service_state(paths, svc.name).get("incident")
    if not incident or incident.get("closed"):
        return  # the common case, decided without the lock
    report: Optional[dict] = None
    with service_state(paths, svc.name) as state:
        incident = state.get("incident")
        if not incident or incident.get("closed"):
            return
        if incident.get("problem"):
            # The heal that opened the problem may have begun after this watch run did.
            now = max(now, time.time())
            down = max(0.0, now - float(incident.get("problem_since") or incident.get("opened") or now))
            body = ("%s is healthy again: the watch found it active and answering at %s.\n"
                    "It was down (%s) for %s, since %s.\n\nselfheal did not repair it this time; "
                    "someone or something else did. Healing is armed again.\n"
                    % (svc.name, iso(now), incident["problem"], format_duration(down), iso(now - down)))
            if should_mail(config.settings, svc, "RESOLVED", closes_problem=True):
                report = thread_report(config, incident, SUBJECT_ICON[Outcome.RESOLVED], svc.name,
                                    "RESOLVED (was down %s)" % format_duration(down), body,
                                    status=Outcome.RESOLVED.value)
            incident["closed"] = now
            if state.pop("escalated", None):
                state["rearmed_at"] = now  # healthy again: the heal count starts afresh
            if incident.get("retries"):  # the backoff starts afresh only after incident_quiet
                state["retry_carry"] = {"retries": incident["retries"], "until": now + config.settings.incident_quiet}
        elif now - float(incident.get("last_failure", incident.get("opened", now))) >= config.settings.incident_quiet:
            incident["closed"] = now
            if state.pop("escalated", None):  # healthy for incident_quiet: the breaker closes
                state["rearmed_at"] = now
    if report is not None:
        deliver(config, paths, report)


def remind_if_due(config: Config, paths: Paths, svc: Service, unit: Dict[str, str], now: float) -> None:
    """An unresolved FAILED/ESCALATED/STOPPED incident is mailed again every reminder_interval."""
    report: Optional[dict] = None
    with service_state(paths, svc.name) as state:
        incident = state.get("incident")
        if not incident or incident.get("closed") or not incident.get("problem"):
            return
        if now - float(incident.get("last_mail") or 0.0) < config.settings.reminder_interval:
            return
        since = float(incident.get("problem_since") or incident.get("opened") or now)
        diagnosed = incident.get("problem_mail") if isinstance(incident.get("problem_mail"), dict) else {}
        where = ("The %s mail of %s, which this one replies to, has the diagnosis" % (
            diagnosed.get("status", "FAILED"), diagnosed.get("time", "?")) if diagnosed.get("message_id")
            else "The first mail of this thread has the diagnosis")
        body = ("Reminder: %s is still not healthy: %s (%s) since %s, %s ago.\n\n"
                "%s. Fix it, or pause selfheal for it:\n"
                "  systemctl status %s\n  journalctl -u %s -n 100 --no-pager\n  selfheal pause %s\n"
                % (svc.name, unit.get("ActiveState", "?"), unit.get("SubState", "?"), iso(since),
                   format_duration(now - since), where, svc.unit, svc.unit, svc.name))
        if should_mail(config.settings, svc, "STILL FAILING"):
            report = thread_report(config, incident, LABELS["STILL FAILING"].icon, svc.name, "STILL FAILING", body,
                                   reply_to=str(diagnosed.get("message_id") or ""))
        else:
            incident["last_mail"] = now
    if report is not None:
        deliver(config, paths, report)


# =============================================================================
# Watch: the periodic path for what OnFailure= never sees
# =============================================================================


def write_finding(paths: Paths, name: str, finding: Finding) -> None:
    atomic_write(paths.finding(name), json.dumps(dataclasses.asdict(finding)) + "\n", 0o600)


def take_finding(paths: Paths, name: str, max_age: float) -> Optional[Finding]:
    """The watch's finding for this heal, consumed; None when there is none or it is stale."""
    path = paths.finding(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        path.unlink()
        finding = Finding(kind=str(data["kind"]), detail=str(data["detail"]), at=float(data["at"]),
                          since=float(data.get("since", 0.0)),
                          nrestarts=tuple(int(n) for n in data.get("nrestarts", (0, 0)))[:2],
                          invocation=str(data.get("invocation", "")), previous=str(data.get("previous", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return finding if time.time() - finding.at <= max_age else None


def load_watch_state(paths: Paths, name: str) -> dict:
    return read_state(paths.watch_state(name))


def save_watch_state(paths: Paths, name: str, data: dict) -> None:
    write_state(paths.watch_state(name), data)


def remember_restarts(paths: Paths, name: str, unit: Dict[str, str]) -> None:
    """After a heal, systemd's restart count as it is now is not news for the watch."""
    try:
        state = load_watch_state(paths, name)
        state["nrestarts"] = int(unit.get("NRestarts") or 0)
        save_watch_state(paths, name, state)
    except (OSError, ValueError) as exc:
        log.warning("could not update the watch state of %s: %s", name, exc)


def health_checks(services: Sequence[Service], units: Dict[str, Dict[str, str]],
                  late: Optional[List[str]] = None) -> Dict[str, Tuple[bool, str]]:
    """GET every health_url, run every health_command, at once (up to 8 threads), so one slow
    service does not delay the rest. What has not answered when the watch's budget is
    spent is not judged this run: its name goes into `late`."""
    import queue
    import threading

    todo = [svc for svc in services if svc.health_url or svc.health_command]
    if not todo:
        return {}
    waiting: "queue.Queue[Service]" = queue.Queue()
    for svc in todo:
        waiting.put(svc)
    answers: Dict[str, object] = {}
    lock, finished = threading.Lock(), threading.Event()

    def checker() -> None:
        while True:
            try:
                svc = waiting.get_nowait()
            except queue.Empty:
                return
            try:
                answer: object = health_check(svc, units.get(svc.unit, {})) if svc.health_command else http_check(
                    svc.health_url, svc.health_timeout, svc.health_expect_status, svc.health_expect_text)
            except Exception as exc:  # raised in the watch below, as a bug of selfheal's
                answer = exc
            with lock:
                answers[svc.name] = answer
                if len(answers) == len(todo):
                    finished.set()

    # Daemon threads, not a pool: a check still running when the budget is spent must not
    # hold the process at exit (each one ends within its own health_timeout anyway).
    for _ in range(min(8, len(todo))):
        threading.Thread(target=checker, name="selfheal-health", daemon=True).start()
    finished.wait(time_left())
    with lock:
        got = dict(answers)
    for name, answer in got.items():
        if isinstance(answer, Exception):
            raise answer
    for svc in todo:
        if svc.name not in got:
            log.warning("%s: its health check had not answered when the watch run's budget was spent; "
                        "not judged this run", svc.name)
            if late is not None:
                late.append(svc.name)
    result: Dict[str, Tuple[bool, str]] = {name: answer for name, answer in got.items()}  # type: ignore[misc]
    for name, (ok, detail) in list(result.items()):
        if not ok and CANNOT_RUN in detail:  # a missing checker says nothing about the service
            log.warning("%s: health_command %s; not judged by it this run", name, detail)
            del result[name]
    return result


def port_holders(services: Sequence[Service], units: Dict[str, Dict[str, str]]
                 ) -> Dict[str, Holding]:
    """port_holder for each service whose port listens, from one `ss -p` for them all."""
    if not services:
        return {}
    result = run([SS, "-H", "-t", "-l", "-n", "-p"])
    if not result.ok:
        return {svc.name: Holding(PortOwner.UNKNOWN, "holder unknown: %s" % result.brief()) for svc in services}
    listeners = parse_ss(result.out)
    asked: List[Optional[Dict[int, List[str]]]] = []

    def cgroups() -> Optional[Dict[int, List[str]]]:  # one `ss --cgroup` at most, when needed
        if not asked:
            asked.append(socket_cgroups())
        return asked[0]

    holders = {}
    for svc in services:
        shown = units.get(svc.unit, {})
        holders[svc.name] = port_holder(svc.port, svc.unit, shown.get("ControlGroup", ""), listeners,
                                        parse_usec_timestamp(shown.get("InactiveExitTimestampMonotonic", "")),
                                        cgroups)
    return holders


def assess(svc: Service, unit: Dict[str, str], ports: Optional[set],
           health: Optional[Tuple[bool, str]], baseline: Optional[int],
           holder: Optional[Holding] = None, grace: float = 0.0) -> Tuple[str, str]:
    """What the watch makes of one service: (verdict, detail). holder is port_holder's
    answer for its listening port: a port held only by others' processes is unhealthy.
    A run younger than `grace` (start_grace, at least verify_timeout) whose port or health
    check fails is still starting: transient, not unhealthy.

    ok | restarted (systemd's Restart= repaired a crash since the last look) | unhealthy |
    stopped | failed | transient (starting or stopping: look again next time) | missing.
    """
    active, sub = unit.get("ActiveState", ""), unit.get("SubState", "")
    state = "%s (%s)" % (active or "unknown", sub or "unknown")
    if unit.get("LoadState") in ("not-found", "masked", "bad-setting", "error") or not unit:
        return "missing", "unit %s" % (unit.get("LoadState") or "unknown")  # install warned; not ours to start
    if active == "active":
        port = None
        if svc.port and ports is not None and svc.port not in ports:
            port = Check("port", False, "%d not listening" % svc.port)
        elif holder is not None and holder.owner in PORT_TAKEN:
            port = Check("port", False, "%d %s" % (svc.port, holder.detail), holder.owner)
        answer = health
        bad = next((c for c in judge(svc, unit, port, (lambda: answer) if answer else None) if not c.ok), None)
        problem = ""
        if bad is not None and bad.name == "port":
            problem = "port %s while the unit is %s" % (bad.detail, state)
        elif bad is not None:
            problem = ("port %d open but " % svc.port if svc.port else "") + bad.detail
        if problem:
            age = run_age(unit)
            if age is not None and age < grace:
                return "transient", "starting (%s of start_grace = %s): %s" % (
                    format_duration(round(age)), format_duration(grace), problem)
            return "unhealthy", problem
        nrestarts = int(unit.get("NRestarts") or 0)
        if baseline is not None and nrestarts > baseline:
            return "restarted", "systemd restarted it by itself (restarts %d -> %d)" % (baseline, nrestarts)
        return "ok", state
    if active == "failed":
        return "failed", "%s, result %s" % (state, unit.get("Result", "?"))
    if active == "inactive":
        if unit.get("Result", "success") not in ("", "success"):
            return "failed", "%s, result %s" % (state, unit.get("Result"))
        if finished_oneshot(unit):
            return "ok", "a oneshot job that finished successfully: %s" % state
        return "stopped", "found stopped: %s" % state
    return "transient", state


def finished_oneshot(unit: Dict[str, str]) -> bool:
    """Type=oneshot without RemainAfterExit=: inactive after a successful run is its rest
    state, not a stop."""
    return (unit.get("Type") == "oneshot" and unit.get("RemainAfterExit") != "yes"
            and unit.get("ActiveState") == "inactive" and unit.get("Result", "success") in ("", "success"))


def run_age(unit: Dict[str, str]) -> Optional[float]:
    """Seconds since the unit's current run became active (None when systemd does not say)."""
    entered = parse_usec_timestamp(unit.get("ActiveEnterTimestampMonotonic", ""))
    return max(0.0, time.monotonic() - entered) if entered else None


def known_problem(paths: Paths, svc: Service, unit: Dict[str, str]) -> bool:
    """True when selfheal already reported this very run of the unit as a problem."""
    last = last_event(paths, svc.name)
    rearmed = float(load_service_state(paths, svc.name).get("rearmed_at", 0.0))
    return last is not None and float(last.get("ts", 0)) >= rearmed and \
        last.get("last_invocation") == unit.get("InvocationID") and \
        last.get("outcome") in [o.value for o in PROBLEM_OUTCOMES]


def start_heal(paths: Paths, name: str, finding: Finding) -> None:
    """Hand the finding to selfheal@NAME.service: the same path, lock and log as a crash."""
    write_finding(paths, name, finding)
    result = run([SYSTEMCTL, "start", "--no-block", "selfheal@%s.service" % name])
    if not result.ok:
        try:
            paths.finding(name).unlink()  # no heal will read it; a later one must not
        except OSError:
            pass
        raise SelfhealError("could not start selfheal@%s.service: %s" % (name, result.brief()))
    log.info("%s: %s; healing (selfheal@%s.service)", name, finding.detail, name, extra={"journal": {
        "MESSAGE_ID": EVENT_IDS["WATCH"], "SELFHEAL_SERVICE": name, "SELFHEAL_OUTCOME": "HEALING",
        "SELFHEAL_TRIGGER": "retry" if finding.kind == "retry" else "watch", "SELFHEAL_FINDING": finding.kind,
        "SELFHEAL_INCIDENT": incident_key(paths, name)}})


def watch_service(config: Config, paths: Paths, svc: Service, unit: Dict[str, str],
                  ports: Optional[set], health: Optional[Tuple[bool, str]], now: float,
                  holder: Optional[Tuple[Optional[bool], str]] = None, waiting_for: str = "") -> str:
    """One service, one watch run. Returns the verdict (for the summary). waiting_for: a
    service it needs that this run found down; it is not healed on its own meanwhile.

    Holds the service's heal lock while it decides, so it never decides on a heal's
    half-done work; a heal that is running owns the service until the next look.
    """
    lock = Lock(paths.lock(svc.name))
    if not lock.acquire():
        return "healing"
    finding = None
    try:
        state = load_watch_state(paths, svc.name)
        baseline = state.get("nrestarts")
        nrestarts = int(unit["NRestarts"]) if unit.get("NRestarts", "").isdigit() else None
        if nrestarts is not None and baseline is not None and nrestarts < baseline:
            # A heal saw a newer count than this run's snapshot, or systemd reset it (a
            # manual start): ask again, for this one service.
            unit = show_unit(svc.unit)
            nrestarts = int(unit["NRestarts"]) if unit.get("NRestarts", "").isdigit() else None
            if nrestarts is not None and nrestarts < baseline:
                baseline = nrestarts
        if paused_until(paths, svc.name, now) is not None:
            # Restarts during maintenance are not news after it.
            state.update(verdict="paused", detail="paused", checked=now, fails=0,
                         nrestarts=nrestarts if nrestarts is not None else baseline)
            save_watch_state(paths, svc.name, state)
            return "paused"
        verdict, detail = assess(svc, unit, ports, health, baseline, holder,
                                 max(svc.start_grace, config.settings.verify_timeout))
        window = maintenance_until(config, svc, now)
        if window is not None:
            # Nothing is healed or mailed in a window; what is seen is kept for after it.
            if verdict not in ("ok", "transient"):
                note_maintenance(paths, svc, window, "watch: %s: %s" % (verdict, detail), now)
            state.update(verdict="maintenance", detail="maintenance until %s; %s: %s" % (iso(window), verdict, detail),
                         checked=now, fails=0, nrestarts=nrestarts if nrestarts is not None else baseline)
            save_watch_state(paths, svc.name, state)
            return "maintenance"
        if "maintenance" in load_service_state(paths, svc.name) and verdict != "transient":
            # Summed up once the window is over (a service still starting is looked at again);
            # a dependent whose dependency is down is in that one's summary, not its own.
            end_of_maintenance(config, paths, svc, "waiting" if waiting_for else verdict, detail, now)
        # The restart count moves on only when it was seen healthy or reported: a look that
        # lands while systemd's new run is still starting does not swallow the crash.
        if nrestarts is not None and (baseline is None or verdict in ("ok", "restarted", "missing")):
            state["nrestarts"] = nrestarts
        invocation = unit.get("InvocationID", "")
        if waiting_for and verdict in ("unhealthy", "stopped", "failed"):
            verdict, detail = "waiting", "waiting for %s: %s" % (waiting_for, detail)
            state["fails"] = 0  # healed after the one it needs, by that heal
        elif verdict == "ok":
            state["fails"] = 0
            state["healthy_invocation"] = invocation
            forget_waiting(paths, svc.name)
            remember_config_files(paths, svc, unit)
            incident_healthy(config, paths, svc, now)
        elif verdict == "restarted":
            state["fails"] = 0
            finding = Finding("restarted", detail, now, float(state.get("checked") or now - 60),
                              (int(baseline or 0), int(nrestarts or 0)), invocation,
                              state.get("healthy_invocation", ""))
        elif verdict in ("unhealthy", "stopped", "failed"):
            if known_problem(paths, svc, unit):
                state["fails"] = 0
                finding = retry_if_due(config, paths, svc, now)
                if finding is None:
                    escalate_if_due(config, paths, svc, unit, now)
                    remind_if_due(config, paths, svc, unit, now)
            elif verdict == "stopped" and svc.on_stopped == "ignore":
                state["fails"] = 0
            else:
                if "waiting_on" in load_service_state(paths, svc.name):
                    # It waited for a service that is up now, and no heal of that one healed
                    # it (it came back by itself, or that heal ran out of time): heal it now.
                    state["fails"] = max(int(state.get("fails") or 0), config.settings.watch_confirm - 1)
                state["fails"] = int(state.get("fails") or 0) + 1
                state["first_fail"] = now if state["fails"] == 1 else float(state.get("first_fail") or now)
                if state["fails"] >= config.settings.watch_confirm:
                    detail += " (%d checks in a row over %s)" % (
                        state["fails"], format_duration(round(now - state["first_fail"])))
                    finding = Finding(verdict, detail, now, since=float(state["first_fail"]), invocation=invocation)
                    state["fails"] = 0
        else:
            state["fails"] = 0  # starting, stopping or missing: "in a row" starts again
        state.update(verdict=verdict, detail=detail, checked=now)
        save_watch_state(paths, svc.name, state)
    finally:
        lock.release()
    if finding is not None:  # the heal takes the lock we just let go
        start_heal(paths, svc.name, finding)
    return verdict


def look(config: Config, paths: Paths, services: Sequence[Service], verdicts: Dict[str, str],
         errors: List[str], late: Optional[List[str]] = None) -> Tuple[Dict[str, Dict[str, str]], Optional[set]]:
    """One look at these services: one systemctl show, one read of the ports, the health
    checks at once; each service's verdict into `verdicts`, a broken one into `errors`,
    one whose health check outlived the watch's budget into `late`."""
    now = time.time()
    units = show_units([svc.unit for svc in services])
    ports = listening_ports()
    active = [svc for svc in services if units.get(svc.unit, {}).get("ActiveState") == "active"
              and (not svc.port or ports is None or svc.port in ports)]
    # port_owner = any: whoever publishes the port (docker-proxy) is the service's; no ss.
    holders = port_holders([svc for svc in active if svc.port and ports is not None and svc.port_owner == "unit"],
                           units)
    health = health_checks([svc for svc in active if svc.name not in holders
                            or holders[svc.name].owner not in PORT_TAKEN], units, late)
    graph = dependency_graph(config, units) if len(config.services) > 1 else {}
    for name in in_dependency_order(graph, [svc.name for svc in services]) if graph else [s.name for s in services]:
        svc = config.services[name]
        down = [n for n in needed_by(graph, name) if (verdicts.get(n) in DOWN_VERDICTS and not (
            verdicts.get(n) == "stopped" and config.services[n].on_stopped == "ignore")) or (
            verdicts.get(n) in ("paused", "maintenance")  # and not running: its dependents wait too
            and units.get(config.services[n].unit, {}).get("ActiveState") != "active")] if graph else []
        try:
            verdicts[svc.name] = watch_service(config, paths, svc, units.get(svc.unit, {}), ports,
                                               health.get(svc.name), now, holders.get(svc.name),
                                               down[0] if down else "")
        except Exception:  # one broken service must not blind the watch to the others
            log.exception("watch of %s failed", svc.name)
            errors.append("%s:\n%s" % (svc.name, traceback.format_exc()))
    return units, ports


def watch_budget(settings: Settings) -> float:
    """A watch run's total time: one watch_interval, within WATCH_BUDGET. What is left to
    do then (a late health check, queued reports) waits for the next run."""
    return min(max(settings.watch_interval, WATCH_BUDGET[0]), WATCH_BUDGET[1])


def clear_stale_lead(paths: Paths, now: float) -> None:
    """A leader that died (SIGKILL, OOM) leaves /run/selfheal/leading, and every trigger after
    it would wait for a leader that is gone: removed when old and no heal holds the lead."""
    try:
        age = now - os.stat(str(paths.leading)).st_mtime
    except OSError:
        return
    if age < LEADING_STALE:
        return
    lock = Lock(paths.run / "locks" / "burst.lock")
    try:
        if lock.acquire():
            with contextlib.suppress(OSError):
                os.rmdir(str(paths.leading))
            log.warning("watch: removed %s, left by a heal that led a burst and died", paths.leading)
    except OSError:
        pass
    finally:
        lock.release()


def watch_run(config: Config, paths: Paths) -> int:
    unsafe = [problem for _, problem in root_command_problems(config)] if is_root() else []
    if unsafe:  # swapped since install: never run as root (command_check refuses it too); told
        report_unsafe_commands(config, paths, unsafe)
    clear_stale_lead(paths, time.time())
    services = list(config.services.values())
    verdicts: Dict[str, str] = {}
    errors: List[str] = []
    late: List[str] = []
    units, ports = look(config, paths, services, verdicts, errors, late)
    # A hang found at one look is looked at again within seconds, not a whole interval later:
    # watch_confirm looks in a row still decide, but a frozen service is healed sooner.
    for _ in range(config.settings.watch_confirm - 1):
        again = [svc for svc in services if verdicts.get(svc.name) == "unhealthy"
                 and int(load_watch_state(paths, svc.name).get("fails") or 0) > 0]
        if not again:
            break
        left = time_left()
        if left is not None and left < RECHECK_DELAY + max(svc.health_timeout for svc in again):
            log.info("watch: no time left in this run to look at %s again; the next run does",
                     ", ".join(svc.name for svc in again))
            break
        time.sleep(RECHECK_DELAY)
        look(config, paths, again, verdicts, errors, late)
    flush_outbox(config, paths)
    summary = ", ".join("%s %s" % (name, verdict) for name, verdict in verdicts.items())
    log.debug("watch: %s", summary)
    if errors:
        report_watch_failure(config, paths, "\n".join(errors))
        return EX_FAIL
    # The heartbeat says "every service was looked at": a run that could not ask systemd
    # about one, or read the listening ports, stays silent, and the dead-man's switch alerts.
    blind = [svc.name for svc in services if not units.get(svc.unit)] + late
    if ports is None and any(svc.port for svc in services):
        blind.append("ports (neither netlink nor /proc/net/tcp answered)")
    if blind:
        log.warning("watch: could not check %s; no heartbeat this run", ", ".join(blind))
    else:
        ping_heartbeat(config, paths)
    return EX_OK


def keep_last_good(paths: Paths, config_path: str) -> None:
    """Keep a copy of the config that last loaded, so a broken edit can still be reported."""
    try:
        text = Path(config_path).read_text(encoding="utf-8")
        copy = paths.state / "last-good.conf"
        if not copy.exists() or copy.read_text(encoding="utf-8") != text:
            atomic_write(copy, text, 0o600)
    except OSError as exc:
        log.debug("could not keep a copy of the config: %s", exc)


def last_mailed(paths: Paths, name: str) -> float:
    """When a rate-limited mail (NAME.json) last went out: kept in the state directory, or
    in the run directory while the state's disk is full."""
    last = 0.0
    for marker in (paths.state / name, paths.run / name):
        try:
            last = max(last, float(json.loads(marker.read_text(encoding="utf-8")).get("mailed", 0)))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    return last


def remember_mailed(paths: Paths, name: str) -> None:
    for marker in (paths.state / name, paths.run / name):
        try:
            atomic_write(marker, json.dumps({"mailed": time.time()}) + "\n")
            return
        except OSError as exc:
            log.error("could not note that %s was mailed in %s: %s", name, marker, exc)


def report_broken_config(paths: Paths, exc: ConfigError) -> None:
    """The config stopped loading: heals and the watch are off. Mail it (at most hourly)
    with the mail settings of the last config that loaded."""
    try:
        good = load_config(str(paths.state / "last-good.conf"), trusted=False)
    except SelfhealError:
        return  # never had a good one: nobody to tell but the journal
    if time.time() - last_mailed(paths, "config-broken.json") < 3600:
        return
    body = ("selfheal on %s cannot load its config, so it heals nothing until this is fixed:\n\n%s\n\n"
            "Fix it, then check with: selfheal validate\n" % (socket.gethostname(), "\n".join(exc.problems)))
    deliver(good, paths, new_report(good.settings, "❌", "selfheal", "CONFIG BROKEN", body))
    remember_mailed(paths, "config-broken.json")


def report_unsafe_commands(config: Config, paths: Paths, problems: Sequence[str]) -> None:
    """A command root would run for a service is no longer root's alone (a file swapped or
    its mode changed after install): it is not run, and that is mailed at once, then at most
    hourly while it stays (sooner when what is found changes)."""
    marker = "unsafe-commands.json"
    said = "\n".join(problems)
    try:
        before = json.loads((paths.state / marker).read_text(encoding="utf-8")).get("problems", "")
    except (OSError, ValueError, AttributeError):
        before = ""
    if before == said and time.time() - last_mailed(paths, marker) < 3600:
        return
    log.error("refused to run as root: %s", "; ".join(problems))
    body = ("selfheal on %s refused to run a command of its config as root, because someone other than "
            "root may change it:\n\n%s\n\nUntil that is fixed, the command is not run: a heal that needs "
            "it ends FAILED, and a health_command is not asked (the watch judges the service without it). "
            "A file changed like this after install may be someone trying to run code as root: look at "
            "who changed it and why.\n\nFix it (chown root:root, chmod go-w), then check with: "
            "selfheal validate\n" % (socket.gethostname(), "\n".join(problems)))
    deliver(config, paths, new_report(config.settings, "❌", "selfheal", "CONFIG BROKEN", body))
    remember_mailed(paths, marker)
    try:
        atomic_write(paths.state / marker, json.dumps({"mailed": time.time(), "problems": said}) + "\n")
    except OSError as exc:
        log.error("could not note the refused commands: %s", exc)


def report_watch_failure(config: Config, paths: Paths, what: str) -> None:
    """The healer itself is broken: say so by mail (at most once an hour), never silently."""
    if time.time() - last_mailed(paths, "watch-failure.json") < 3600:
        return
    body = ("selfheal's watch run failed on %s at %s. Services may be unwatched until this is fixed.\n\n"
            "%s\n\nLook at: journalctl _UID=0 -t %s -n 50; systemctl status selfheal-watch.service\n"
            % (socket.gethostname(), iso(time.time()), what, config.settings.syslog_ident))
    deliver(config, paths, new_report(config.settings, "❌", "selfheal", "WATCH FAILED", body))
    remember_mailed(paths, "watch-failure.json")


# =============================================================================
# Install: units, drop-ins, files (install.sh calls this too)
# =============================================================================

# What validate and install check on this host, beyond the file: every problem at once,
# before anything changes, as FILE:LINE [section] key: problem.
HOST_PROPERTIES = ("Id", "LoadState", "Names", "Type", "RemainAfterExit", "ExecStart", "ConsistsOf",
                   "ActiveState")
NOOP_PROGRAMS = ("/bin/true", "/usr/bin/true")  # a wrapper unit's ExecStart that runs nothing


def command_problem(argv: Sequence[str]) -> str:
    """Why a config_check or health_command cannot run here, or "": its program is an
    executable file, or a plain name found on PATH, as when a heal or the watch runs it."""
    program = command_argv(argv)[0]
    if not program.startswith("/"):
        return "%s: not found on PATH (%s); give its absolute path" % (program, os.environ.get("PATH", ""))
    if not os.path.isfile(program) or not os.access(program, os.X_OK):
        return "%s: no such executable file on this host" % program
    return ""


def exec_programs(exec_start: str) -> List[str]:
    """The programs of a unit's ExecStart= as `systemctl show` prints it ({ path=/bin/true ; ...})."""
    return re.findall(r"\bpath=(\S+)", exec_start)


def cgroup_unit(cgroup: str) -> str:
    """The service unit a cgroup belongs to (/system.slice/system-postgresql.slice/
    postgresql@15-main.service -> postgresql@15-main.service), or ""."""
    for part in reversed(cgroup.strip("/").split("/")):
        if part.endswith(".service"):
            return part
    return ""


def port_units(ports: Iterable[int]) -> Dict[int, List[str]]:
    """port -> the service units whose processes listen on it: one `ss -p` (pids, as root),
    else one `ss --cgroup`. Empty when ss cannot say."""
    wanted = set(ports)
    if not wanted:
        return {}
    found: Dict[int, List[str]] = {}
    result = run([SS, "-H", "-t", "-l", "-n", "-p"])
    for lst in parse_ss(result.out) if result.ok else []:
        if lst.port in wanted:
            for process in filter(None, (read_process(pid) for pid in lst.pids)):
                unit = cgroup_unit(process.cgroup)
                if unit and unit not in found.setdefault(lst.port, []):
                    found[lst.port].append(unit)
    if not found:
        for port, groups in (socket_cgroups() or {}).items():
            if port in wanted:
                found[port] = list(dict.fromkeys(filter(None, map(cgroup_unit, groups))))
    return found


def root_command_problems(config: Config, skip_missing: bool = False) -> List[Tuple[int, str]]:
    """(line, problem) for each command services.conf has root run (every config_check; a
    health_command with health_run_as = root) that is not root's alone (root_only_problems).
    skip_missing: a program that is not there at all is left to command_problem."""
    found = []
    for svc in config.services.values():
        for key in ("config_check", "health_command"):
            argv = getattr(svc, key)
            if not argv or (key == "health_command" and svc.health_run_as != "root"):
                continue
            if skip_missing and command_problem(argv):
                continue
            for refused in root_only_problems(argv):
                found.append((config.line(svc.name, key), "%s: root runs it, so it must be root's alone: %s%s" % (
                    config.where(svc.name, key), refused,
                    "" if key == "config_check" else " (or let the service run it: health_run_as = service)")))
    return found


def host_problems(config: Config, units: Dict[str, Dict[str, str]]) -> List[str]:
    """What makes a service impossible to heal as listed, on this host. units: HOST_PROPERTIES
    of every listed unit (empty dicts where systemd could not be asked: those checks skipped).

    - a unit selfheal never touches under another name (an alias);
    - config_check or health_command whose program is not here;
    - a port on a unit that never holds one: a oneshot wrapper (Type=oneshot,
      RemainAfterExit=yes) that runs nothing (ExecStart=/bin/true, Debian's postgresql.service)
      or whose port another unit's process holds. Every heal of it would fail verification
      and every watch run would find it unhealthy: the unit that serves the port is named.
    - a port held by another unit's process while the listed unit runs (not a wrapper):
      the wrong unit, or a proxy (port_owner = any). A unit that is down is not judged: the
      port may be what keeps it down.
    """
    problems: List[Tuple[int, str]] = []

    def problem(svc: Service, key: str, message: str) -> None:
        problems.append((config.line(svc.name, key), "%s: %s" % (config.where(svc.name, key), message)))

    for section, windows in [(GLOBAL_SECTION, config.settings.maintenance)] + [
            (svc.name, svc.maintenance) for svc in config.services.values()]:
        for window in windows:
            bad = calendar_problem(window.spec.text)
            if bad:
                problems.append((config.line(section, "maintenance"), "%s: %s" % (
                    config.where(section, "maintenance"), bad)))
    for svc in config.services.values():
        for key in ("config_check", "health_command"):
            bad = command_problem(getattr(svc, key)) if getattr(svc, key) else ""
            if bad:
                problem(svc, key, bad)
    problems.extend(root_command_problems(config, skip_missing=True))
    for svc in config.services.values():
        name = never_touch_loaded(units.get(svc.unit, {}))
        if name:
            problem(svc, "unit", "%s is %s here, which selfheal never touches" % (svc.unit, name))
    ported = [svc for svc in config.services.values() if svc.port and units.get(svc.unit, {}).get("LoadState") == "loaded"]
    holders = port_units(svc.port for svc in ported) if ported else {}
    for svc in ported:
        unit = units[svc.unit]
        others = [u for u in holders.get(svc.port, []) if u != svc.unit and u not in unit.get("Names", "").split()]
        wrapper = unit.get("Type") == "oneshot" and unit.get("RemainAfterExit") == "yes"
        runs_nothing = wrapper and set(exec_programs(unit.get("ExecStart", ""))) <= set(NOOP_PROGRAMS)
        if wrapper and (runs_nothing or others):
            parts = [u for u in unit.get("ConsistsOf", "").split() if u.endswith(".service")]
            serving = others or parts
            programs = exec_programs(unit.get("ExecStart", ""))
            what = "%s is a oneshot wrapper (Type=oneshot, RemainAfterExit=yes%s): no process of it ever " \
                   "listens on %d" % (svc.unit, ", ExecStart=%s" % programs[0] if runs_nothing and programs
                                      else "", svc.port)
            if serving:
                what += " (%s %s)" % (" and ".join(serving), "listens there" if others else "is what it starts")
            problem(svc, "port", "%s, so selfheal would find it unhealthy for ever and restart it, and everything "
                    "it starts, in vain. Name the unit that serves the port: %s" % (
                        what, " or ".join("[%s] with unit = %s" % (svc.name, u) for u in serving)
                        if serving else "unit = ..."))
        elif others and svc.port_owner == "unit" and unit.get("ActiveState") == "active":
            problem(svc, "port", "%d is held by %s, not by %s (which is running): if %s serves [%s], set "
                    "unit = %s; if it only forwards the port to %s (docker-proxy), set port_owner = any" % (
                        svc.port, " and ".join(others), svc.unit, others[0], svc.name, others[0], svc.unit))
    return [text for _, text in sorted(problems, key=lambda p: p[0])]


def calendar_problem(text: str) -> str:
    """What systemd says of a calendar event selfheal accepted ("" when it agrees, or cannot
    be asked): selfheal computes the windows itself, and they must mean what they mean to systemd."""
    result = run([SYSTEMD_ANALYZE, "calendar", "--", text])
    if result.ok or result.rc in (124, 126, 127):
        return ""  # not here, or no answer: the parser's own check stands
    return "systemd does not read %r as a calendar event: %s" % (text, one_line(result.err.strip() or result.out)[:200])


def check_on_host(config: Config) -> None:
    """host_problems, asking systemd once; raises ConfigError with all of them."""
    units = show_units([svc.unit for svc in config.services.values()], HOST_PROPERTIES)
    problems = host_problems(config, units)
    if problems:
        raise ConfigError(problems)


UNIT_TEMPLATES = {
    "selfheal@.service": """\
# selfheal@NAME.service heals the service [NAME] of /etc/selfheal/services.conf.
# systemd starts it through the OnFailure= drop-in selfheal installs for that service.
[Unit]
Description=selfheal: heal %i and mail a report
Documentation=file://@LIBDIR@/README.md
# A trigger must never be dropped, and the healer never heals itself (no OnFailure=).
StartLimitIntervalSec=0

[Service]
Type=oneshot
# %i, not %I: the instance is the section name as written (story-stages stays story-stages).
# Imported, not run as a script, so Python uses the compiled copy in __pycache__.
ExecStart=@PYTHON@ -I -S -c "import sys; sys.path.insert(0, '@LIBDIR@'); import selfheal; sys.exit(selfheal.main())" heal --trigger onfailure %i
# One heal for a burst: each trigger first leaves its service in /run/selfheal/handed, then
# runs Python only if it is the first (mkdir is atomic: /run/selfheal/leading exists while a
# heal leads; the leader removes it when done, the watch when a leader died). The others end
# here, at the cost of three small programs, not a Python each: the leader heals what they
# left. The "-": a trigger that cannot leave its file still runs, and heals its service
# itself. The "+": outside the sandbox below, which systemd would set up for each of these
# small programs (about 60 ms each; 90 of them in a storm of 30 took 5 s): they only make a
# directory and a file of root's under /run/selfheal, from a name systemd checked.
# A drop-in selfheal@NAME.service.d/*.conf that needs its own sandbox resets these with an
# empty ExecCondition= (the leader never heals such a service: it starts its unit).
ExecCondition=+-@MKDIR@ -p /run/selfheal/handed
ExecCondition=+-/usr/bin/touch /run/selfheal/handed/%i.json
ExecCondition=+@MKDIR@ /run/selfheal/leading
# A heal has its own deadlines (verify_timeout, smtp_timeout); this is the last resort.
TimeoutStartSec=10min

# Hardening: the least a heal needs (systemd-analyze security selfheal@x.service). The
# service's config_check runs inside this sandbox too; a checker that needs more (another
# capability, a write under /etc) fails and the FAILED mail shows its output: relax that one
# service with a drop-in /etc/systemd/system/selfheal@NAME.service.d/*.conf, not all of them.
# Root, not User=/DynamicUser=/PrivateUsers=: systemctl restart/reset-failed go through
# systemd's private socket, which only root may use.
# The capabilities its repairs use, no more: CAP_KILL signals a stale process of the healed
# service (any user's); CAP_CHOWN and CAP_FOWNER restore a declared db_owner and db_mode;
# CAP_DAC_OVERRIDE recreates a declared symlink in a directory of the service's own user and
# reads its env file, config files and database; CAP_SYS_PTRACE lets ss -p see which process
# of another user holds the port (/proc/PID/fd), the proof of ownership before any signal:
# without it such a process is never signalled and the heal escalates instead.
# CAP_NET_BIND_SERVICE is for config_check: `nginx -t` binds every listen socket of the
# config it tests and fails on port 80 with "bind() ... (13: Permission denied)" without it
# (it also opens its logs, www-data's, through CAP_DAC_OVERRIDE and creates its temp dirs
# for www-data through CAP_CHOWN: nothing more for Debian 12 and 13).
# CAP_SETUID and CAP_SETGID: a health_command runs as the service's own user and group (its
# User=/Group=, nobody for root services), which drops every capability for it; with
# NoNewPrivileges= (and setpriv --no-new-privs outside this unit) it cannot get one back.
CapabilityBoundingSet=CAP_KILL CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE CAP_SYS_PTRACE CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID
NoNewPrivileges=yes
# Relaxed: full, not strict. /usr, /boot and /etc are read-only, but /var, /srv and /opt stay
# writable: a declared db_path or symlink may be anywhere there (strict would need each one
# in ReadWritePaths=). One under /etc or /usr is not repaired by a heal (its report says
# "Read-only file system"); repair it by hand or with `selfheal heal NAME` from a root shell.
ProtectSystem=full
# Relaxed: read-only, not yes. config_files, env_file and a database may live in a home
# directory and are read; a repair there is refused, like one under /etc.
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
# Nothing it runs changes priorities, CPU affinity or NUMA policy (setrlimit is in the list,
# but glibc's setrlimit() is the prlimit64 call, which stays allowed).
SystemCallFilter=~@resources
SystemCallErrorNumber=EPERM
# AF_INET/AF_INET6: smtp_host, health_url, webhook_url (http/https); AF_UNIX: systemd and the
# journal; AF_NETLINK: the listening sockets, asked of the kernel (NETLINK_SOCK_DIAG, by selfheal
# and by ss), and glibc's resolver.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# Omitted on purpose:
# PrivateNetwork=, IPAddressDeny=: smtp_host, health_url and the webhook/heartbeat URLs may be anywhere.
# ProtectProc=invisible, ProcSubset=pid: it must see other users' processes (who holds the
#   port, in which cgroup) and /proc/stat (and /proc/net/tcp, should netlink be refused).
# MemoryDenyWriteExecute=: config_check may be a JIT runtime (java, node), which it breaks.
# RestrictSUIDSGID=: db_mode may declare a setgid data directory (e.g. 2770).
# UMask=0077: history and watch status are for the dashboard without root (0644); files
#   with secrets (spool, config copies) are written 0600 whatever the umask.
# Bounds: a heal reads at most 1 MiB of any file a service controls, and a runaway (a
# config_check that loops, a flood of journal lines) must not take the host with it.
# Measured peak (largest process, RSS) of a heal with nginx -t as config_check, an SQLite
# check and a mail: 41-44 MB on systemd 252 and 257; about 6x that is allowed, room for a
# heavier checker (relax one service with a drop-in, as above).
MemoryMax=256M
TasksMax=64
""",
    "selfheal-watch.service": """\
# The periodic look at every service in /etc/selfheal/services.conf: hung, stopped, or
# restarted by systemd itself (none of which OnFailure= sees); also retries queued mail.
# Started by selfheal-watch.timer; heals go through selfheal@NAME.service like crashes.
[Unit]
Description=selfheal: watch the services and retry queued mail
Documentation=file://@LIBDIR@/README.md

[Service]
Type=oneshot
ExecStart=@PYTHON@ -I -S -c "import sys; sys.path.insert(0, '@LIBDIR@'); import selfheal; sys.exit(selfheal.main())" watch
TimeoutStartSec=5min

# Hardening: the watch looks, mails and starts selfheal@NAME.service; it repairs nothing
# itself, so it gets less than a heal (systemd-analyze security selfheal-watch.service).
# Root, not User=/DynamicUser=/PrivateUsers=: `systemctl start --no-block selfheal@NAME`
# goes through systemd's private socket, which only root may use.
# CAP_DAC_READ_SEARCH: read a service's config_files owned by its own user, to keep the copy
# a later heal compares with. CAP_SETUID and CAP_SETGID: each health_command runs as its
# service's own user and group (nobody for root services), without any capability;
# CAP_KILL: what is left of it at its deadline is killed (its process group, of that user).
# Nothing else: no chown, no writes outside its dirs.
CapabilityBoundingSet=CAP_DAC_READ_SEARCH CAP_SETUID CAP_SETGID CAP_KILL
NoNewPrivileges=yes
# Everything read-only but its own state, logs and runtime dirs (created if missing; the
# runtime dir is kept when the watch stops: heals use it too).
ProtectSystem=strict
StateDirectory=selfheal
LogsDirectory=selfheal
RuntimeDirectory=selfheal
RuntimeDirectoryPreserve=yes
# Relaxed: metrics_file's directory is writable too (node_exporter's textfile collector;
# "-": nothing when it does not exist). The install renders it from services.conf.
ReadWritePaths=-@METRICS_DIR@
# Relaxed: read-only, not yes. config_files may live in a home directory.
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
# Other users' processes are none of its business (systemd 247+, kernel 5.8+; else no effect).
ProtectProc=invisible
SystemCallArchitectures=native
SystemCallFilter=@system-service
# Nothing it runs changes priorities, CPU affinity or NUMA policy.
SystemCallFilter=~@resources
SystemCallErrorNumber=EPERM
# AF_INET/AF_INET6: mail, health_url, webhook and heartbeat; AF_UNIX: systemd, journal; AF_NETLINK:
# the listening sockets, asked of the kernel (NETLINK_SOCK_DIAG, by selfheal and by ss --cgroup),
# and glibc's resolver.
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# Omitted on purpose:
# PrivateNetwork=, IPAddressDeny=: smtp_host, health_url and the webhook/heartbeat URLs may be anywhere.
# ProcSubset=pid: it reads /proc/stat (and /proc/net/tcp, should netlink be refused).
# UMask=0077: its status files are for the dashboard without root (0644).
# Bounds: measured peak (largest process, RSS) of a watch run: 41-43 MB on systemd 252 and
# 257; 3x that is allowed. Tasks: health checks run at most 8 at a time, plus mail and posts.
MemoryMax=128M
TasksMax=32
""",
    "selfheal-watch.timer": """\
# Every watch_interval of services.conf (rendered at install time).
[Unit]
Description=selfheal: watch the services every @WATCH_INTERVAL@

[Timer]
OnBootSec=@WATCH_INTERVAL@
OnUnitActiveSec=@WATCH_INTERVAL@
AccuracySec=1s

[Install]
WantedBy=timers.target
""",
}


# One heal for a burst, in selfheal@.service: a trigger leaves its service for the heal under
# way, then starts Python only when no heal leads. Rendered only where mkdir is at this path:
# a condition that cannot run never passes, and then every trigger runs Python (as before).
MKDIR = "/usr/bin/mkdir"
LEADING_STALE = 60.0  # seconds: a /run/selfheal/leading older than this with no leader is removed
HANDOVER_MARK = "# One heal for a burst: each trigger"


def render_unit(name: str, libdir: str, python: str = PYTHON, watch_interval: float = 30.0,
                metrics_file: str = METRICS_FILE, mkdir: Optional[str] = None) -> str:
    # Every value was validated: paths by pattern (no spaces, no newlines), the interval as
    # whole seconds.
    mkdir = MKDIR if mkdir is None else mkdir
    text = UNIT_TEMPLATES[name]
    if "@MKDIR@" in text and not (mkdir and os.path.exists(mkdir)):
        kept = [line for line in text.splitlines(True) if not line.startswith("ExecCondition=")]
        text = "".join(kept).replace(HANDOVER_MARK, "# (no %s here: every trigger runs its own heal.)\n%s"
                                     % (MKDIR, HANDOVER_MARK), 1)
    text = text.replace("@MKDIR@", mkdir)
    if not metrics_file:
        text = text.replace("ReadWritePaths=-@METRICS_DIR@", "# (metrics_file is empty: no metrics are written)")
    return (text.replace("@LIBDIR@", libdir).replace("@PYTHON@", python)
            .replace("@WATCH_INTERVAL@", "%ds" % int(watch_interval))
            .replace("@METRICS_DIR@", os.path.dirname(metrics_file)))


# Installed as /etc/systemd/system/<unit>.d/selfheal.conf for every listed service.
# OnFailure= in a drop-in adds to the unit's own OnFailure= list; it replaces nothing.
DROPIN_TEMPLATE = """\
# Installed by selfheal for [@NAME@] in @CONFIG@; removed by install.sh --uninstall.
[Unit]
OnFailure=selfheal@@NAME@.service
"""


def dropin_text(svc: Service, config_path: str) -> str:
    # Both values were validated (NAME_RE, check_abs_path): no newline can reach the unit text.
    return DROPIN_TEMPLATE.replace("@NAME@", svc.name).replace("@CONFIG@", config_path)


MIRACLEMAX_STATUS = '''\
#!/usr/bin/env python3
"""miraclemax-status: what selfheal looks after, and how it is doing.

A thin entry point into selfheal.py (`selfheal.py status`); options: --help.
It finds selfheal.py beside itself (a checkout) or in ../lib/selfheal (installed).
"""
import os
import sys

here = os.path.dirname(os.path.realpath(__file__))
for candidate in (here, os.path.join(os.path.dirname(here), "lib", "selfheal")):
    if os.path.isfile(os.path.join(candidate, "selfheal.py")):
        sys.path.insert(0, candidate)
        break

import selfheal  # noqa: E402

if __name__ == "__main__":
    sys.exit(selfheal.main(["status"] + sys.argv[1:]))
'''


@dataclasses.dataclass
class Installer:
    """Install or uninstall selfheal; every path is DESTDIR + PREFIX-based or /etc."""

    prefix: str = DEFAULT_PREFIX
    python: str = PYTHON  # the interpreter the units run selfheal with
    destdir: str = ""
    out: object = None  # default: sys.stdout at the time of writing
    created: List[str] = dataclasses.field(default_factory=list)
    changes: int = 0  # files written, linked or removed: said last, for deploy tools (Ansible)
    dry_run: bool = False  # say what would change (Ansible's --check), change nothing

    @property
    def libdir(self) -> str:
        return self.prefix.rstrip("/") + "/lib/selfheal"

    def host(self, path: str) -> Path:
        return Path(self.destdir + path) if self.destdir else Path(path)

    @property
    def live(self) -> bool:
        """Talk to systemd only when installing onto this host (no DESTDIR)."""
        return not self.destdir

    def say(self, text: str) -> None:
        print(text, file=self.out or sys.stdout)

    def put(self, path: str, text: str, mode: int) -> bool:
        """Write a file when its content differs; remember it for the manifest."""
        target = self.host(path)
        self.created.append(path)
        try:
            if target.read_text(encoding="utf-8") == text and (target.stat().st_mode & 0o7777) == mode:
                return False
        except (OSError, UnicodeDecodeError):
            pass
        self.changes += 1
        if self.dry_run:
            self.say("  would install %s" % path)
            return True
        atomic_write(target, text, mode)
        self.say("  installed %s" % path)
        return True

    def install(self, config: Config, config_text: str, self_text: str) -> int:
        libdir, conf = self.libdir, CONFIG_PATH
        units = [svc.unit for svc in config.services.values()]
        loaded = show_units(units, HOST_PROPERTIES) if self.live else {}
        if self.live:  # what only this host can tell (an alias, a wrapper unit): refuse before changing anything
            problems = host_problems(config, loaded)
            if problems:
                raise ConfigError(problems)
        if (self.put(libdir + "/selfheal.py", self_text, 0o755) or not self.host(libdir + "/__pycache__").is_dir()) \
                and not self.dry_run:
            # Compiled now: /usr is read-only in the heal's sandbox, so Python could not cache
            # it there, and every heal would compile the whole file again.
            py_compile.compile(str(self.host(libdir + "/selfheal.py")), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        readme = Path(os.path.realpath(__file__)).with_name("README.md")
        if readme.is_file():
            self.put(libdir + "/README.md", readme.read_text(encoding="utf-8"), 0o644)
        self.put(self.prefix.rstrip("/") + "/bin/miraclemax-status", MIRACLEMAX_STATUS, 0o755)
        link = self.host(self.prefix.rstrip("/") + "/sbin/selfheal")
        if self.dry_run and not (link.is_symlink() and os.readlink(str(link)) == libdir + "/selfheal.py"):
            self.changes += 1
            self.say("  would link %s -> %s/selfheal.py" % (link, libdir))
        elif not (link.is_symlink() and os.readlink(str(link)) == libdir + "/selfheal.py"):
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(libdir + "/selfheal.py")
            self.changes += 1
            self.say("  linked %s -> %s/selfheal.py" % (link, libdir))
        self.created.append(self.prefix.rstrip("/") + "/sbin/selfheal")

        target = self.host(conf)
        try:
            old = target.read_text(encoding="utf-8")
        except FileNotFoundError:
            old = None
        # A config holding a secret (a URL's user:password@, a webhook or heartbeat URL,
        # whose path is often the token) is root's alone; the dashboard without root reads
        # the copy without secrets instead.
        mode = 0o600 if config_secrets(config) else 0o644
        mode_wrong = old is not None and (target.stat().st_mode & 0o7777) != mode
        if self.dry_run and (old != config_text or mode_wrong):
            self.changes += 1
            self.say("  would install %s%s" % (conf, " (the previous one kept as .bak)" if old is not None else ""))
        elif old != config_text or mode_wrong:
            if old is not None and old != config_text:
                atomic_write(target.with_name(target.name + ".bak"), old, 0o600)
                self.say("  kept the previous %s as %s.bak" % (conf, conf))
            atomic_write(target, config_text, mode)
            self.changes += 1
            self.say("  installed %s%s" % (conf, " (mode 0600: it holds %s)" % ", ".join(config_secrets(config))
                                           if mode == 0o600 else ""))
        if not self.dry_run:
            atomic_write(self.host(STATE_DIR + "/last-good.conf"), config_text, 0o600)
            atomic_write(self.host(STATE_DIR + "/services.public.conf"), public_config_text(config_text), 0o644)

        changed = [self.put("%s/%s" % (UNIT_DIR, name),
                            render_unit(name, libdir, self.python, config.settings.watch_interval,
                                        config.settings.metrics_file), 0o644)
                   for name in UNIT_TEMPLATES]
        timer_changed = any(changed)

        wanted = set()
        for svc in config.services.values():
            state = loaded.get(svc.unit, {}).get("LoadState", "loaded") if self.live else "loaded"
            if state in ("not-found", "") or state == "masked":
                self.say("  warning: [%s] %s is %s here; no OnFailure= drop-in for it (fix the unit or "
                         "the config, then run the install again)" % (svc.name, svc.unit, state or "unknown"))
                continue
            path = "%s/%s.d/%s" % (UNIT_DIR, svc.unit, DROPIN_NAME)
            wanted.add(path)
            self.put(path, dropin_text(svc, conf), 0o644)
        self.remove_stale_dropins(wanted)
        if self.dry_run:
            self.say("dry run: %d service(s) would be watched, %d without their unit; nothing was changed."
                     % (len(wanted), len(config.services) - len(wanted)))
            self.say_changes()
            return EX_OK
        self.write_manifest()
        if self.live:
            # restart the timer only when a unit changed: a new interval counts from now on
            timer = [SYSTEMCTL, "restart" if timer_changed else "start", "selfheal-watch.timer"]
            for argv in ([SYSTEMCTL, "daemon-reload"], [SYSTEMCTL, "enable", "selfheal-watch.timer"], timer):
                result = run(argv, timeout=60)
                if not result.ok:
                    self.say("  warning: %s: %s" % (" ".join(argv), result.brief()))
        if self.live:
            Paths.from_env().spool.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.say("selfheal %s installed: %d service(s) watched, %d without their unit."
                 % (VERSION, len(wanted), len(config.services) - len(wanted)))
        self.say_changes()
        return EX_OK

    def say_changes(self) -> None:
        """The last line: whether this run changed any file (a second run says "nothing");
        with dry_run, whether it would."""
        if self.dry_run:
            self.say("%d file(s) would change." % self.changes if self.changes else "nothing would change.")
            return
        self.say("%d file(s) changed." % self.changes if self.changes else "nothing changed.")

    def dropins(self) -> List[Path]:
        return sorted(self.host(UNIT_DIR).glob("*.d/" + DROPIN_NAME))

    def remove_stale_dropins(self, wanted: set) -> None:
        for path in self.dropins():
            logical = "/" + str(path.relative_to(self.host("/"))) if self.destdir else str(path)
            if logical in wanted:
                continue
            try:
                if not path.read_text(encoding="utf-8").startswith(DROPIN_MARK):
                    continue  # somebody else's file with our name: not ours to remove
            except OSError:
                continue
            self.changes += 1
            if self.dry_run:
                self.say("  would remove %s (no longer listed)" % logical)
                continue
            path.unlink()
            try:
                path.parent.rmdir()
            except OSError:
                pass
            self.say("  removed %s (no longer listed)" % logical)

    def remove_metrics(self) -> None:
        """The metrics file would go on saying what selfheal last saw (a service up, a recent
        watch run): it goes with selfheal. Only a file selfheal wrote, never through a link."""
        try:
            target = load_config(str(self.host(CONFIG_PATH)), trusted=False).settings.metrics_file
        except SelfhealError:
            target = METRICS_FILE
        if not target:
            return
        path = self.host(target)
        try:
            fd = os.open(str(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                ours = stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, 64).startswith(b"# HELP selfheal_")
            finally:
                os.close(fd)
        except OSError:
            return
        if ours:
            path.unlink()
            self.changes += 1
            self.say("  removed %s" % target)

    def manifest_path(self) -> Path:
        return self.host(STATE_DIR + "/" + MANIFEST_NAME)

    def write_manifest(self) -> None:
        atomic_write(self.manifest_path(), "".join(p + "\n" for p in sorted(set(self.created))), 0o644)

    def uninstall(self, purge: bool = False) -> int:
        if self.live:
            run([SYSTEMCTL, "disable", "--now", "selfheal-watch.timer"], timeout=60)
        try:
            listed = self.manifest_path().read_text(encoding="utf-8").split()
        except FileNotFoundError:
            listed = []
            self.say("  no install manifest; removing selfheal's known files only")
        known = ["%s/%s" % (UNIT_DIR, name) for name in UNIT_TEMPLATES]
        cache = self.host(self.libdir + "/__pycache__")
        if cache.is_dir() and not cache.is_symlink():
            shutil.rmtree(str(cache))
        for path in sorted(set(listed + known)):
            target = self.host(path)
            if target.is_symlink() or target.is_file():
                if target.name == DROPIN_NAME and not target.read_text(encoding="utf-8").startswith(DROPIN_MARK):
                    continue
                target.unlink()
                self.changes += 1
                self.say("  removed %s" % path)
                if target.name == DROPIN_NAME or target.parent.name == "selfheal":
                    try:
                        target.parent.rmdir()
                    except OSError:
                        pass
        self.remove_stale_dropins(set())
        self.remove_metrics()
        if self.manifest_path().exists():
            self.manifest_path().unlink()
        if purge:
            for path in (self.host("/etc/selfheal"), self.host(STATE_DIR), self.host(LOG_DIR), self.host(RUN_DIR)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(str(path))
                    self.changes += 1
                    self.say("  purged %s" % path)
        else:
            self.say("  kept %s, %s and %s (the config, history, summaries, logs and queued reports); "
                     "--purge removes them" % (CONFIG_PATH, STATE_DIR, LOG_DIR))
        if self.live:
            run([SYSTEMCTL, "daemon-reload"], timeout=60)
        self.say("selfheal uninstalled; the services themselves were not touched.")
        self.say_changes()
        return EX_OK


# =============================================================================
# Dashboard: miraclemax-status (collect once, then render: a pure function of the data)
# =============================================================================

# The "version" of `status --json`. Fields may be added within a version; it goes up only
# when a field is removed or changes its meaning or type (README: "status --json").
STATUS_SCHEMA = 1
WATCH_TIMER = "selfheal-watch.timer"
DEFAULT_SINCE = 86400.0  # the activity window without --since
RECENT_EVENTS = 8  # activity lines shown (and in the JSON)
DEFAULT_WATCH = 2.0  # --watch without SECONDS
# The states of every service and the timer come from ONE D-Bus call, ListUnitsByNames through
# busctl: about 25 ms for 200 units, where one `systemctl show` of 200 takes 400 ms (a round
# trip per unit). `systemctl show` then asks only about the units that need more (failed ones,
# and active ones the watch last found unhealthy), or about all at once when busctl cannot.
BUSCTL = "busctl"
STATUS_PROPERTIES = ("Id", "LoadState", "ActiveState", "SubState", "Result", "ActiveEnterTimestampMonotonic",
                     "Type", "RemainAfterExit")
RUNNING_STATES = ("active", "reloading")
# A unit in one of these has a current run; its processes are systemd's to stop, not ours.
LIVE_STATES = ("active", "reloading", "activating", "deactivating")
# state -> (emoji, ASCII tag, colour)
STATE_LOOK = {
    "active": ("✅", "[ OK ]", "green"), "reloading": ("🔄", "[ OK ]", "green"),
    "failed": ("❌", "[FAIL]", "red"), "unhealthy": ("🟠", "[WARN]", "yellow"),
    "inactive": ("⚪", "[STOP]", "dim"), "activating": ("🔄", "[ .. ]", "yellow"),
    "deactivating": ("🔄", "[ .. ]", "yellow"), "paused": ("🚧", "[PAUS]", "cyan"),
    "not-found": ("❓", "[ ?? ]", "red"), "masked": ("❓", "[ ?? ]", "red"),
    "error": ("❓", "[ ?? ]", "red"), "unknown": ("❔", "[ ?? ]", "yellow"),
}
OUTCOME_COLOUR = {status: label.colour for status, label in LABELS.items() if label.colour}
ANSI = {"green": "32", "red": "31", "yellow": "33", "cyan": "36", "dim": "2", "bold": "1"}
GLYPHS = {
    True: {"box": "╭╮╰╯─│", "rule": "─", "arrow": "↳", "dot": "·", "critical": "★ critical",
           "title": "🏥", "system": "📊", "services": "🩺", "summary": "📈", "activity": "🩹", "config": "🔧",
           "ok": "✅", "bad": "❌", "warn": "🟠", "unknown": "❔", "ellipsis": "…"},
    False: {"box": "++++-|", "rule": "-", "arrow": "->", "dot": "-", "critical": "* critical",
            "title": "", "system": "", "services": "", "summary": "", "activity": "", "config": "",
            "ok": "", "bad": "", "warn": "", "unknown": "", "ellipsis": "..."},
}
# What Python puts in LC_CTYPE when it coerces a C locale (PEP 538): not the user's choice.
COERCED_CTYPES = ("C.UTF-8", "C.utf8", "UTF-8")

# The records below are NamedTuples, not frozen dataclasses: every heal imports this file, and
# a frozen dataclass costs 1-2 ms to create at import (six of them: 7 ms), a NamedTuple 0.2 ms.
# They are just as immutable and typed.


class DiskUsage(NamedTuple):
    path: str  # what was asked about: "/" or a service's db_path
    mount: str  # the mount point of the filesystem holding it
    total: int  # bytes
    used: int  # total - free, as df's Used
    available: int  # free for unprivileged users, as df's Avail
    services: Tuple[str, ...] = ()  # whose db_path lives there

    @property
    def percent(self) -> float:
        """As df's Use%: used / (used + available), so root's reserve does not count as free."""
        usable = self.used + self.available
        return 100.0 * self.used / usable if usable else 0.0


class SystemOverview(NamedTuple):
    time: float
    host: str
    uptime: Optional[float] = None  # seconds since boot (/proc/uptime)
    load: Optional[Tuple[float, float, float]] = None  # /proc/loadavg
    cpus: Optional[int] = None
    memory_total: Optional[int] = None  # bytes (/proc/meminfo MemTotal)
    memory_available: Optional[int] = None  # MemAvailable: used = total - available
    disks: Tuple[DiskUsage, ...] = ()


class ServiceStatus(NamedTuple):
    name: str
    unit: str
    # active reloading failed inactive activating deactivating paused unhealthy not-found
    # masked error unknown
    state: str
    active_state: str = ""  # systemd's own words
    sub_state: str = ""
    result: str = ""
    port: Optional[int] = None
    listening: Optional[bool] = None  # None: no port, not running, or the listening sockets unreadable
    domain: str = ""
    critical: bool = False
    paused_until: Optional[float] = None  # None: not paused; 0.0: until resumed
    escalated: bool = False  # backing off after too many heals (healed at growing intervals)
    hooked: Optional[bool] = None  # selfheal's OnFailure= drop-in is installed; None: unit not loaded
    watch_detail: str = ""  # what the watch last said, when it said unhealthy, waiting or maintenance
    watch_checked: Optional[float] = None  # when the watch last looked at it
    last_heal: Optional[dict] = None  # its newest history event
    stop_is_fine: bool = False  # on_stopped = ignore, or a oneshot job whose run succeeded
    watch_verdict: str = ""  # the watch's last word: ok, failed, waiting (for a dependency), maintenance...

    @property
    def paused(self) -> bool:
        return self.paused_until is not None

    @property
    def problem(self) -> bool:
        """Counts against exit status 0: anything but running, paused, or stopped as configured."""
        if self.state in RUNNING_STATES or self.state == "paused":
            return False
        return not (self.state == "inactive" and self.stop_is_fine)


class Activity(NamedTuple):
    since: float  # the window's start (unix time)
    heals: int  # heal events in the window
    by_outcome: Dict[str, int]
    events: Tuple[dict, ...]  # the newest RECENT_EVENTS of the window, newest first
    damaged: int = 0  # history lines that could not be read (a crash mid-write)
    error: str = ""  # why the history could not be read at all ("" when it could)


class SelfhealSetup(NamedTuple):
    config_path: str
    units_installed: bool
    timer: str  # the timer's ActiveState, "not-found", or "unknown" (systemd could not be asked)
    watch_interval: float
    last_watch: Optional[float]  # the newest look of the watch at any service shown
    monitored: int
    critical: int
    email_to: Tuple[str, ...]
    failure_threshold: int
    failure_window: float
    mail_queue: Optional[int]  # None: not known (the spool is root's)
    mail_queue_error: str = ""
    systemd_error: str = ""  # why the states are unknown
    webhook_queue: Optional[int] = 0  # queued webhook posts; None: not known (the spool is root's)

    @property
    def enabled(self) -> bool:
        return self.units_installed and self.timer == "active"


class Dashboard(NamedTuple):
    name: str
    system: SystemOverview
    services: Tuple[ServiceStatus, ...]
    activity: Activity
    setup: SelfhealSetup
    only: Tuple[str, ...] = ()  # --service: the services asked for; () = all

    @property
    def healthy(self) -> bool:
        return not any(s.problem for s in self.services)

    @property
    def exit_code(self) -> int:
        return EX_OK if self.healthy else EX_FAIL

    def summary(self) -> Dict[str, int]:
        """Every service shown in exactly one bucket."""
        buckets = {"running": RUNNING_STATES, "failed": ("failed",), "inactive": ("inactive",),
                   "activating": ("activating", "deactivating"), "paused": ("paused",),
                   "unhealthy": ("unhealthy",), "missing": ("not-found", "masked", "error"),
                   "unknown": ("unknown",)}
        counts = {"total": len(self.services)}
        for bucket, states in buckets.items():
            counts[bucket] = sum(1 for s in self.services if s.state in states)
        return counts


# -- collecting: what the host says, once ----------------------------------------


def _unreadable(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "not readable without root"
    return exc.strerror or str(exc)


def read_meminfo(proc: Path = Path("/proc")) -> Tuple[Optional[int], Optional[int]]:
    """(MemTotal, MemAvailable) in bytes; MemFree + Buffers + Cached before Linux 3.14."""
    fields = {}
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        return None, None
    total = fields.get("MemTotal")
    available = fields.get("MemAvailable")
    if available is None and total is not None:
        available = sum(fields.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return total, available


def read_uptime(proc: Path = Path("/proc")) -> Optional[float]:
    try:
        return float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_loadavg(proc: Path = Path("/proc")) -> Optional[Tuple[float, float, float]]:
    try:
        one, five, fifteen = (proc / "loadavg").read_text().split()[:3]
        return float(one), float(five), float(fifteen)
    except (OSError, ValueError):
        return None


def mount_point(path: str) -> str:
    """The mount point of the filesystem holding path: the highest directory on its device."""
    path = os.path.realpath(path)
    try:
        device = os.stat(path).st_dev
        while path != "/":
            parent = os.path.dirname(path)
            if os.stat(parent).st_dev != device:
                break
            path = parent
    except OSError:
        pass
    return path


def disk_usages(wanted: Sequence[Tuple[str, str]]) -> Tuple[DiskUsage, ...]:
    """statvfs of each (path, service) once per filesystem. A path that is not there (a missing
    database) counts for the filesystem of the nearest directory above it that is."""
    found: Dict[int, DiskUsage] = {}
    for path, service in wanted:
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        try:
            device = os.stat(path).st_dev
            if device in found:
                old = found[device]
                if service and service not in old.services:
                    found[device] = old._replace(services=old.services + (service,))
                continue
            st = os.statvfs(path)
        except OSError:
            continue
        size = st.f_frsize or st.f_bsize
        found[device] = DiskUsage(path, mount_point(path), st.f_blocks * size,
                                  (st.f_blocks - st.f_bfree) * size, st.f_bavail * size,
                                  (service,) if service else ())
    return tuple(found.values())


def collect_system(config: Config, now: float, services: Sequence[Service] = (),
                   proc: Path = Path("/proc")) -> SystemOverview:
    total, available = read_meminfo(proc)
    # A service's db_path names a filesystem worth watching (database_check watches it too).
    wanted = [("/", "")] + [(svc.db_path, svc.name) for svc in services if svc.db_path]
    return SystemOverview(now, socket.gethostname(), read_uptime(proc), read_loadavg(proc), os.cpu_count(),
                          total, available, disk_usages(wanted))


def list_units(units: Sequence[str]) -> Tuple[Optional[Dict[str, Dict[str, str]]], str]:
    """Load, active and sub state of every unit in ONE D-Bus call (systemd's ListUnitsByNames,
    through busctl). systemd loads a unit it had unloaded to answer, and says not-found for one
    that does not exist. (None, why) when busctl cannot answer."""
    result = run([BUSCTL, "--json=short", "--", "call", "org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                  "org.freedesktop.systemd1.Manager", "ListUnitsByNames", "as", str(len(units)), *units])
    if not result.ok:
        return None, "busctl: %s" % result.brief()
    try:
        rows = json.loads(result.out)["data"][0]
        if len(rows) != len(units):
            raise ValueError("%d answers for %d units" % (len(rows), len(units)))
        # a(ssssssouso): name, description, load state, active state, sub state, following, ...
        return {unit: {"Id": str(row[0]), "LoadState": str(row[2]), "ActiveState": str(row[3]),
                       "SubState": str(row[4])} for unit, row in zip(units, rows)}, ""
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return None, "busctl: unexpected answer (%s)" % exc


def show_units_once(units: Sequence[str]) -> Tuple[Dict[str, Dict[str, str]], str]:
    """One `systemctl show` for these units -> ({unit: properties}, error or "").

    Never one call per unit, also not when it fails: the states are then unknown.
    """
    result = run([SYSTEMCTL, "show", "-p", ",".join(STATUS_PROPERTIES), "--", *units])
    if not result.ok:
        return {}, "systemctl show: %s" % result.brief()
    blocks = parse_show(result.out)
    if len(blocks) != len(units):
        return {}, "systemctl show answered for %d of %d units" % (len(blocks), len(units))
    return dict(zip(units, blocks)), ""


def unit_states(units: Sequence[str], wants_detail: Callable[[str, Dict[str, str]], bool]
                ) -> Tuple[Dict[str, Dict[str, str]], str]:
    """The state of every unit from at most two processes, whatever their number: busctl for
    all, then one `systemctl show` for those wants_detail picks (or for all, when busctl
    cannot answer). -> ({unit: properties}, why they are unknown or "")."""
    states, why = list_units(units)
    if states is None:
        log.debug("%s; asking systemctl show instead", why)
        return show_units_once(units)
    more = [unit for unit in units if wants_detail(unit, states[unit])]
    if more:
        details, error = show_units_once(more)
        if error:
            log.debug("%s (the states are known; the details are not)", error)
        for unit in more:
            states[unit].update(details.get(unit, {}))
    return states, ""


def read_heal_events(paths: Paths, since: float = 0.0) -> Tuple[List[dict], int, str]:
    """Heal events since `since`, oldest first: (events, damaged lines, error). An unreadable
    history (not root) is an error string, not an exception."""
    try:
        events, damaged = scan_history(paths, since=since)
    except OSError as exc:
        return [], 0, _unreadable(exc)
    return events, damaged, ""


def last_events(paths: Paths, names: Iterable[str]) -> Dict[str, dict]:
    """Each service's last heal event, from its summary (never the whole history)."""
    found = {}
    for name in names:
        try:
            data = json.loads(paths.summary(name).read_text(encoding="utf-8"))
            last = data.get("last") if isinstance(data, dict) else None
        except (OSError, ValueError):
            last = None
        if isinstance(last, dict):
            with contextlib.suppress(TypeError, ValueError):
                found[name] = dict(clean_data(last), ts=float(last["ts"]))
    return found


def mail_queue_length(paths: Paths) -> Tuple[Optional[int], str]:
    """Reports the mail channel still has to send (the outbox is root's: (None, why) for anyone else)."""
    try:
        return queue_lengths(paths)["mail"], ""
    except OSError as exc:
        return None, _unreadable(exc)


def webhook_queue_length(paths: Paths) -> Optional[int]:
    """Reports the webhook channel still has to post (None without root: the outbox is root's)."""
    try:
        return queue_lengths(paths)["webhook"]
    except OSError:
        return None


def service_status(svc: Service, unit: Dict[str, str], paths: Paths, state: dict, watch: dict,
                   ports: Optional[set], last: Optional[dict], btime: float, now: float) -> ServiceStatus:
    """One service from what systemd says (unit), its selfheal state and the watch's last look."""
    load, active = unit.get("LoadState", ""), unit.get("ActiveState", "")
    paused = paused_until(paths, svc.name, now) if "paused_until" in state else None
    try:
        checked = float(watch["checked"]) if watch.get("checked") is not None else None
    except (TypeError, ValueError):
        checked = None
    unhealthy = watch.get("verdict") == "unhealthy"
    entered = parse_usec_timestamp(unit.get("ActiveEnterTimestampMonotonic", ""))
    if unhealthy and entered and btime and checked is not None and checked < btime + entered - 2:
        unhealthy = False  # said of an earlier run: this one started after that look
    if load == "not-found":
        state_name = "not-found"
    elif load == "masked":
        state_name = "masked"
    elif load in ("bad-setting", "error"):
        state_name = "error"
    elif paused is not None:
        state_name = "paused"
    elif not active:
        state_name = "unknown"
    elif active == "active" and unhealthy:
        state_name = "unhealthy"
    elif active in STATE_LOOK:
        state_name = active
    else:
        state_name = "unknown"
    listening = None
    if svc.port and ports is not None and active in RUNNING_STATES:
        listening = svc.port in ports
    # Hooked: the OnFailure= drop-in selfheal installs for the unit is there.
    hooked = os.path.isfile(os.path.join(UNIT_DIR, svc.unit + ".d", DROPIN_NAME)) if load == "loaded" else None
    return ServiceStatus(
        svc.name, svc.unit, state_name, active, unit.get("SubState", ""), unit.get("Result", ""), svc.port,
        listening, svc.domain, svc.critical, paused, bool(state.get("escalated")), hooked,
        clean(str(watch.get("detail", ""))) if state_name == "unhealthy" or (
            watch.get("verdict") in ("waiting", "maintenance") and active != "active") else "", checked, last,
        svc.on_stopped == "ignore" or finished_oneshot(unit),  # a job that ran and succeeded is done
        clean(str(watch.get("verdict", ""))))


def collect_dashboard(config: Config, paths: Paths, only: Sequence[str] = (), since: float = DEFAULT_SINCE,
                      now: Optional[float] = None, proc: Optional[Path] = None) -> Dashboard:
    """Everything the dashboard shows, asked once: the states of all services and the timer
    from at most two processes (unit_states), /proc and the kernel's listening sockets,
    statvfs, and selfheal's own files. proc: a fake /proc (tests), read instead of both."""
    now = time.time() if now is None else now
    services = [svc for svc in config.services.values() if not only or svc.name in only]
    watch = {svc.name: load_watch_state(paths, svc.name) for svc in services}
    by_unit = {svc.unit: svc for svc in services}

    def wants_detail(unit: str, props: Dict[str, str]) -> bool:
        """systemd's Result of a failed unit; whether a stopped one is a finished oneshot job; when
        the run began of one the watch found unhealthy."""
        svc, active = by_unit.get(unit), props.get("ActiveState")
        return svc is not None and (active in ("failed", "inactive") or (
            active == "active" and watch[svc.name].get("verdict") == "unhealthy"))

    units, systemd_error = unit_states([svc.unit for svc in services] + [WATCH_TIMER], wants_detail)
    ports = listening_ports(proc) if any(svc.port for svc in services) else None
    events, damaged, history_error = read_heal_events(paths, since=now - since)
    events.sort(key=lambda e: e["ts"])  # a hand edit or a clock step may have mixed the lines
    last = last_events(paths, [svc.name for svc in services])
    if not history_error and any(svc.name not in last for svc in services):
        # No summary (a history an older selfheal wrote, or no heal yet): the end of the history.
        with contextlib.suppress(OSError):
            for event in scan_history(paths, max_bytes=HISTORY_ROTATE_BYTES * (HISTORY_KEEP + 1))[0]:
                if event["service"] not in last or last[event["service"]]["ts"] <= event["ts"]:
                    last[event["service"]] = clean_data(event)
    btime = boot_time()
    rows = tuple(service_status(svc, units.get(svc.unit, {}), paths, load_service_state(paths, svc.name),
                                watch[svc.name], ports, last.get(svc.name), btime, now) for svc in services)

    names = {svc.name for svc in services}
    window = [e for e in events if e["ts"] >= now - since and (not only or e["service"] in names)]
    by_outcome: Dict[str, int] = {}
    for event in window:
        outcome = clean(event.get("outcome") or "?")
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
    activity = Activity(now - since, len(window), by_outcome,
                        tuple(clean_data(e) for e in reversed(window[-RECENT_EVENTS:])),
                        damaged, history_error)

    timer = units.get(WATCH_TIMER, {})
    queue, queue_error = mail_queue_length(paths)
    checks = [s.watch_checked for s in rows if s.watch_checked]
    s = config.settings
    setup = SelfhealSetup(
        config.path, all(os.path.isfile(os.path.join(UNIT_DIR, name)) for name in UNIT_TEMPLATES),
        "unknown" if not timer else ("not-found" if timer.get("LoadState") == "not-found"
                                     else timer.get("ActiveState") or "unknown"),
        s.watch_interval, max(checks) if checks else None, len(config.services),
        sum(1 for svc in config.services.values() if svc.critical), s.email_to, s.failure_threshold,
        s.failure_window, queue, queue_error, systemd_error, webhook_queue_length(paths))
    return Dashboard(s.name, collect_system(config, now, services, proc or PROC_DIR), rows, activity, setup,
                     tuple(only))


# -- JSON: the documented shape (README, "status --json") -------------------------


def _round(value: Optional[float], digits: int = 3) -> Optional[float]:
    return None if value is None else round(float(value), digits)


def service_json(s: ServiceStatus) -> dict:
    last = s.last_heal or {}
    seconds = last.get("healing_seconds")
    return {
        "name": s.name, "unit": s.unit, "state": s.state, "active_state": s.active_state,
        "sub_state": s.sub_state, "result": s.result, "port": s.port, "listening": s.listening,
        "domain": s.domain, "critical": s.critical, "problem": s.problem, "paused": s.paused,
        "paused_until": s.paused_until or None, "escalated": s.escalated, "hooked": s.hooked,
        "watch_detail": s.watch_detail, "watch_checked": _round(s.watch_checked), "watch_verdict": s.watch_verdict,
        "last_heal": str(last.get("time", "")), "last_heal_ts": _round(last.get("ts")),
        "last_outcome": str(last.get("outcome", "")),
        "last_healing_seconds": _round(seconds) if isinstance(seconds, (int, float)) else None,
    }


def event_json(event: dict) -> dict:
    seconds = event.get("healing_seconds")
    return {"ts": _round(event["ts"]), "time": iso(event["ts"]), "service": event["service"],
            "outcome": str(event.get("outcome", "")), "trigger": str(event.get("trigger", "")),
            "healing_seconds": _round(seconds) if isinstance(seconds, (int, float)) else None,
            "root_cause": str(event.get("root_cause", ""))}


def dashboard_json(d: Dashboard) -> dict:
    sysv, act, setup = d.system, d.activity, d.setup
    memory = None
    if sysv.memory_total and sysv.memory_available is not None:
        used = sysv.memory_total - sysv.memory_available
        memory = {"total_bytes": sysv.memory_total, "used_bytes": used, "available_bytes": sysv.memory_available,
                  "percent": round(100.0 * used / sysv.memory_total, 1)}
    return {
        "version": STATUS_SCHEMA,
        "selfheal": VERSION,
        "name": d.name,
        "host": sysv.host,
        "ts": _round(sysv.time),
        "time": iso(sysv.time),
        "healthy": d.healthy,
        "only": list(d.only),
        "system": {
            "uptime_seconds": _round(sysv.uptime, 1),
            "load": list(sysv.load) if sysv.load else None,
            "cpus": sysv.cpus,
            "memory": memory,
            "disks": [{"path": k.path, "mount": k.mount, "total_bytes": k.total, "used_bytes": k.used,
                       "available_bytes": k.available, "percent": round(k.percent, 1),
                       "services": list(k.services)} for k in sysv.disks],
        },
        "services": [service_json(s) for s in d.services],
        "summary": d.summary(),
        "activity": {
            "since_ts": _round(act.since), "since": iso(act.since), "count": act.heals,
            "by_outcome": dict(act.by_outcome), "events": [event_json(e) for e in act.events],
            "damaged_lines": act.damaged, "error": act.error,
        },
        "config": {
            "path": setup.config_path, "enabled": setup.enabled, "units_installed": setup.units_installed,
            "timer": setup.timer, "watch_interval_seconds": setup.watch_interval,
            "last_watch_ts": _round(setup.last_watch), "services_monitored": setup.monitored,
            "critical": setup.critical, "email_to": list(setup.email_to),
            "failure_threshold": setup.failure_threshold, "failure_window_seconds": setup.failure_window,
            "mail_queue": setup.mail_queue, "mail_queue_error": setup.mail_queue_error,
            "webhook_queue": setup.webhook_queue, "systemd_error": setup.systemd_error,
        },
    }


def status_rows(config: Config, paths: Paths) -> List[dict]:
    """The services as `status --json` lists them."""
    return [service_json(s) for s in collect_dashboard(config, paths).services]


# -- text: a pure function of the Dashboard -----------------------------------------


def text_width(text: str) -> int:
    """Terminal columns: emoji and East Asian wide characters take two, combining marks none."""
    if text.isascii():
        return len(text)
    import unicodedata

    width = 0
    for ch in text:
        if ch in "\u200d\ufe0e\ufe0f" or unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in "WF" else 1
    return width


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - text_width(text))


def _clip(text: str, width: int, ellipsis: str) -> str:
    if text_width(text) <= width:
        return text
    while text and text_width(text + ellipsis) > width:
        text = text[:-1]
    return text + ellipsis


def _paint(text: str, colour: str, on: bool) -> str:
    return "\033[%sm%s\033[0m" % (ANSI[colour], text) if on and colour else text


def human_bytes(number: Optional[float]) -> str:
    if number is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(number) < 1024 or unit == "TiB":
            return "%d %s" % (number, unit) if unit == "B" else "%.1f %s" % (number, unit)
        number /= 1024.0
    return ""


def human_uptime(seconds: float) -> str:
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 1440)
    hours, minutes = divmod(minutes, 60)
    return ("%dd %dh %dm" % (days, hours, minutes) if days else
            "%dh %dm" % (hours, minutes) if hours else "%dm" % minutes)


def ago(seconds: float) -> str:
    """'45s ago', '12m ago', '2h ago', '3d ago' (whole units, rounded down)."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return "%ds ago" % seconds
    if seconds < 90 * 60:
        return "%dm ago" % (seconds // 60)
    if seconds < 36 * 3600:
        return "%dh ago" % (seconds // 3600)
    return "%dd ago" % (seconds // 86400)


def human_span(seconds: float) -> str:
    """A configured span in its own unit: '30 s', '15 min', '1 h', '24 h', '7 d'."""
    if seconds >= 2 * 86400 and seconds % 86400 == 0:
        return "%d d" % (seconds // 86400)
    if seconds >= 3600 and seconds % 3600 == 0:
        return "%d h" % (seconds // 3600)
    if seconds >= 60 and seconds % 60 == 0:
        return "%d min" % (seconds // 60)
    return format_duration(seconds)


def local_time(ts: float, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return dt.datetime.fromtimestamp(ts).strftime(fmt)


def _heading(title: str, icon: str, g: dict, color: bool, width: int) -> List[str]:
    text = "%s %s " % (icon, title) if icon else "%s %s " % (g["rule"] * 2, title)
    return ["", _paint(text, "bold", color) + g["rule"] * max(3, width - text_width(text))]


def _service_notes(s: ServiceStatus, d: Dashboard) -> List[str]:
    now, notes = d.system.time, []
    resume = "sudo selfheal resume %s" % s.name
    if s.state == "paused":
        now_is = "; systemd says %s (%s)" % (s.active_state, s.sub_state) if s.active_state else ""
        notes.append("Paused %s (%s)%s" % ("until " + local_time(s.paused_until) if s.paused_until
                                           else "until resumed", resume, now_is))
    if s.escalated:
        notes.append("Backing off after too many heals: healed at growing intervals (re-arm: %s)" % resume)
    if s.state == "unhealthy":
        when = " (%s)" % ago(now - s.watch_checked) if s.watch_checked else ""
        notes.append("Unhealthy%s: %s" % (when, s.watch_detail or "the watch's last look failed"))
    if s.state == "failed" and s.result not in ("", "success"):
        notes.append("systemd says: %s (%s)" % (s.active_state, s.result))
    if s.watch_verdict in ("waiting", "maintenance") and s.watch_detail and s.state != "unhealthy":
        notes.append("%s: %s" % ("Waiting" if s.watch_verdict == "waiting" else "Maintenance", s.watch_detail))
    if s.state == "inactive" and s.stop_is_fine:
        notes.append("Stopped, as configured (on_stopped = ignore)")
    if s.state in ("not-found", "masked", "error"):
        words = {"not-found": "not found", "error": "broken"}.get(s.state, s.state)
        notes.append("Unit %s is %s on this host" % (s.unit, words))
    if s.listening is False:
        notes.append("Port %d is not listening" % s.port)
    if s.hooked is False and d.setup.units_installed:
        notes.append("No OnFailure= hook: crashes are not healed at once (apply the config: "
                     "sudo selfheal install --config %s)" % d.setup.config_path)
    if s.last_heal:
        seconds = s.last_heal.get("healing_seconds")
        took = " in %s" % format_duration(seconds) if isinstance(seconds, (int, float)) else ""
        notes.append("Last healing: %s - %s%s" % (ago(now - s.last_heal["ts"]), s.last_heal.get("outcome", "?"), took))
    return notes


def _system_lines(d: Dashboard, g: dict) -> List[str]:
    sysv = d.system
    rows = [("Time", iso(sysv.time)),
            ("Uptime", human_uptime(sysv.uptime) if sysv.uptime is not None else "unknown"),
            ("Load", ("%.2f %.2f %.2f" % sysv.load + (" (%d CPUs)" % sysv.cpus if sysv.cpus else ""))
             if sysv.load else "unknown")]
    if sysv.memory_total and sysv.memory_available is not None:
        used = sysv.memory_total - sysv.memory_available
        rows.append(("Memory", "%s / %s (%d%%)" % (human_bytes(used), human_bytes(sysv.memory_total),
                                                    round(100.0 * used / sysv.memory_total))))
    else:
        rows.append(("Memory", "unknown"))
    for disk in sysv.disks:
        whose = " (%s)" % ", ".join(disk.services) if disk.services else ""
        rows.append(("Disk " + disk.mount, "%s / %s (%d%%), %s free%s" % (
            human_bytes(disk.used), human_bytes(disk.total), round(disk.percent), human_bytes(disk.available),
            whose)))
    if not sysv.disks:
        rows.append(("Disk /", "unknown"))
    label = max(text_width(r[0]) for r in rows)
    return ["   %s  %s" % (_pad(k, label), v) for k, v in rows]


def _service_lines(d: Dashboard, g: dict, unicode: bool, color: bool) -> List[str]:
    if not d.services:
        return ["   No services configured in %s." % d.setup.config_path]
    ports = {s.name: ":%d" % s.port if s.port else "-" for s in d.services}
    labels = {s.name: s.state.upper().replace("-", " ") for s in d.services}
    name_w = max(text_width(s.name) for s in d.services)
    state_w = max(len(v) for v in labels.values())
    port_w = max(len(v) for v in ports.values())
    domain_w = max(len(s.domain or "-") for s in d.services)
    lines = []
    for s in d.services:
        icon, tag, colour = STATE_LOOK.get(s.state, STATE_LOOK["unknown"])
        mark = icon if unicode else tag
        cells = [_pad(s.name, name_w), _paint(_pad(labels[s.name], state_w), colour, color),
                 _pad(ports[s.name], port_w), _pad(s.domain or "-", domain_w)]
        if s.critical:
            cells.append(_paint(g["critical"], "bold", color))
        lines.append(("   %s %s" % (mark, "  ".join(cells))).rstrip())
        indent = " " * (4 + text_width(mark))  # notes start under the name
        lines += ["%s%s %s" % (indent, g["arrow"], note) for note in _service_notes(s, d)]
    if d.setup.systemd_error:
        lines.append("   %s states unknown: %s" % (g["unknown"] or "!", d.setup.systemd_error))
    return lines


def _summary_line(d: Dashboard) -> str:
    c = d.summary()
    parts = ["%d running" % c["running"], "%d failed" % c["failed"], "%d inactive" % c["inactive"]]
    for key, words in (("activating", "starting or stopping"), ("paused", "paused"), ("unhealthy", "unhealthy"),
                       ("missing", "missing"), ("unknown", "unknown")):
        if c[key]:
            parts.append("%d %s" % (c[key], words))
    return "   %d service%s: %s" % (c["total"], "" if c["total"] == 1 else "s", ", ".join(parts))


def _activity_lines(d: Dashboard, g: dict, color: bool, width: int) -> List[str]:
    act, window = d.activity, human_span(round(d.system.time - d.activity.since))
    if act.error:
        return ["   Heal history: unknown (%s)" % act.error]
    if not act.heals:
        lines = ["   No self-healing in the last %s." % window]
    else:
        outcomes = ", ".join("%d %s" % (n, o) for o, n in sorted(act.by_outcome.items(), key=lambda i: -i[1]))
        lines = ["   %d heal%s in the last %s: %s" % (act.heals, "" if act.heals == 1 else "s", window, outcomes)]
        name_w = max(text_width(e["service"]) for e in act.events)
        out_w = max(len(str(e.get("outcome", ""))) for e in act.events)
        for event in act.events:
            seconds = event.get("healing_seconds")
            took = format_duration(seconds) if isinstance(seconds, (int, float)) else "-"
            outcome = str(event.get("outcome", "") or "?")
            head = "   %s  %s  " % (local_time(event["ts"]), _pad(event["service"], name_w))
            tail = "  %7s" % took
            line = head + _paint(_pad(outcome, out_w), OUTCOME_COLOUR.get(outcome, ""), color) + tail
            room = width - text_width(head + _pad(outcome, out_w) + tail) - 2
            cause = str(event.get("root_cause", "") or "")
            if cause and room > 10:
                line += "  " + _clip(cause, room, g["ellipsis"])
            lines.append(line)
        if act.heals > len(act.events):
            lines.append("   (and %d earlier in this window)" % (act.heals - len(act.events)))
    if act.damaged:
        lines.append("   (%d damaged history line%s skipped)" % (act.damaged, "" if act.damaged == 1 else "s"))
    return lines


def _config_lines(d: Dashboard, g: dict, color: bool) -> List[str]:
    setup = d.setup
    every = "every %s" % human_span(setup.watch_interval)
    if setup.last_watch:
        every += ", last look %s" % ago(d.system.time - setup.last_watch)
    if not setup.units_installed:
        mark, colour, text = g["bad"], "red", "NOT ENABLED: selfheal's units are not installed here (sudo ./install.sh)"
    elif setup.timer == "active":
        mark, colour, text = g["ok"], "green", "ENABLED: units installed, %s active (%s)" % (WATCH_TIMER, every)
    elif setup.timer == "unknown":
        mark, colour, text = g["unknown"], "yellow", "UNKNOWN: units installed; %s: %s" % (
            WATCH_TIMER, setup.systemd_error or "state unknown")
    else:
        mark, colour, text = g["warn"], "yellow", (
            "PARTLY: units installed, but %s is %s: crashes are healed, hangs and stops are not seen "
            "(sudo systemctl enable --now %s)" % (WATCH_TIMER, setup.timer, WATCH_TIMER))
    hooked = [s for s in d.services if s.hooked is False] if setup.units_installed else []
    services = "%d monitored, %d critical" % (setup.monitored, setup.critical)
    if hooked:
        services += "; no OnFailure= hook: %s" % ", ".join(s.name for s in hooked)
    rows = [("Self-healing", ((mark + " ") if mark else "") + _paint(text, colour, color)),
            ("Services", services),
            ("Owner mail", ", ".join(setup.email_to)),
            ("Threshold", "%d heal%s of one service within %s, then escalate" % (
                setup.failure_threshold, "" if setup.failure_threshold == 1 else "s",
                human_span(setup.failure_window)))]
    if setup.mail_queue is None:
        rows.append(("Mail queue", "unknown (%s)" % setup.mail_queue_error))
    elif setup.mail_queue:
        rows.append(("Mail queue", _paint("%d waiting" % setup.mail_queue, "yellow", color)
                     + " (sent by the next watch; now: sudo selfheal flush-mail)"))
    if setup.webhook_queue:
        rows.append(("Webhooks", _paint("%d waiting" % setup.webhook_queue, "yellow", color)
                     + " (posted by the next watch; now: sudo selfheal flush-mail)"))
    rows.append(("Config", "%s %s selfheal %s" % (setup.config_path, g["dot"], VERSION)))
    label = max(text_width(r[0]) for r in rows)
    return ["   %s  %s" % (_pad(k, label), v) for k, v in rows]


def render_dashboard(d: Dashboard, unicode: bool = True, color: bool = False, width: int = 78) -> str:
    """The dashboard as text: Unicode box drawing and emoji, or plain ASCII; ANSI colour or none."""
    g = GLYPHS[bool(unicode)]
    width = max(60, width)
    box = g["box"]
    title = "%s%s %s self-healing status" % (g["title"] + " " if g["title"] else "", d.name, g["dot"])
    host = "host %s" % d.system.host
    inner = width - 4
    gap = max(1, inner - text_width(title) - text_width(host))
    lines = [box[0] + box[4] * (width - 2) + box[1],
             "%s %s%s%s %s" % (box[5], _paint(title, "bold", color), " " * gap, host,
                               box[5] if text_width(title) + gap + text_width(host) <= inner else ""),
             box[2] + box[4] * (width - 2) + box[3]]
    lines[1] = lines[1].rstrip()
    lines += _heading("SYSTEM OVERVIEW", g["system"], g, color, width) + _system_lines(d, g)
    lines += _heading("SERVICE HEALTH", g["services"], g, color, width) + _service_lines(d, g, unicode, color)
    lines += _heading("SUMMARY", g["summary"], g, color, width) + [_summary_line(d)]
    lines += (_heading("RECENT SELF-HEALING ACTIVITY", g["activity"], g, color, width)
              + _activity_lines(d, g, color, width))
    lines += _heading("SELF-HEALING CONFIGURATION", g["config"], g, color, width) + _config_lines(d, g, color)
    return "\n".join(lines) + "\n"


# -- the command ------------------------------------------------------------------


def terminal_wants_unicode(out, env=os.environ) -> bool:
    """UTF-8 output and a UTF-8 locale the user chose (LC_ALL, LC_CTYPE, LANG, in that order)."""
    encoding = (getattr(out, "encoding", "") or "").lower().replace("-", "").replace("_", "")
    if encoding != "utf8":
        return False
    for name in ("LC_ALL", "LC_CTYPE", "LANG"):
        value = env.get(name, "")
        if name == "LC_CTYPE" and value in COERCED_CTYPES:
            continue  # Python itself may have put it there for a C locale (PEP 538): ask LANG
        if value:
            return "utf8" in value.lower().replace("-", "")
    return False


def terminal_wants_colour(out, env=os.environ) -> bool:
    """Only on a terminal, never with NO_COLOR (https://no-color.org) or TERM=dumb."""
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty()) and not env.get("NO_COLOR") and env.get("TERM", "") != "dumb"


def show_dashboard(config: Config, paths: Paths, as_json: bool = False, out=None, only: Sequence[str] = (),
               since: float = DEFAULT_SINCE, unicode: Optional[bool] = None, color: Optional[bool] = None,
               width: Optional[int] = None, compact: bool = False) -> int:
    """Print the dashboard once; exit status 0 all healthy, 1 something failed or unhealthy."""
    out = out or sys.stdout
    d = collect_dashboard(config, paths, only, since)
    if as_json:
        text = json.dumps(dashboard_json(d), indent=None if compact else 2) + "\n"
    else:
        if width is None:
            width = min(100, shutil.get_terminal_size((80, 24)).columns)
        text = render_dashboard(d, terminal_wants_unicode(out) if unicode is None else unicode,
                                terminal_wants_colour(out) if color is None else color, width)
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:  # `miraclemax-status | head`: the reader has what it wanted
        silence_stdout()
    return d.exit_code


def silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so Python's exit does not complain."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)


def status_since(text: str) -> float:
    """--since: a duration such as 90m, 24h or 7d (argparse type)."""
    try:
        return positive_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("%s: %r" % (exc, text))


def status_interval(text: str) -> float:
    """--watch SECONDS: 5, 0.5 or 1m; at least 0.2 s (argparse type)."""
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("%s: %r" % (exc, text))
    if seconds < 0.2:
        raise argparse.ArgumentTypeError("at least 0.2 s: %r" % text)
    return seconds


def status_watch(load: Callable[[], Config], paths: Paths, args, out, only: Sequence[str]) -> int:
    """Redraw every args.watch seconds until Ctrl-C (exit 0): in place on a terminal, else one
    frame after another (with --json: one JSON document per line)."""
    import io

    tty = bool(getattr(out, "isatty", None) and out.isatty()) and not args.json
    unicode, colour = terminal_wants_unicode(out), terminal_wants_colour(out)
    footer = "Every %s %s Ctrl-C to quit" % (human_span(args.watch), GLYPHS[unicode]["dot"])

    def interrupted(signum, frame):
        # Ctrl-C reaches the whole process group (and `timeout -s INT` signals the child and
        # then the group): a second copy must not break the clean exit of the first, so
        # SIGINT stays ignored from here on (the program is ending).
        nonlocal previous
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous = None
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, interrupted)
    except ValueError:  # not the main thread: Python's own handler stays
        previous = None
    try:
        if tty:
            out.write("\033[?25l\033[2J")  # hide the cursor, clear the screen once
        while True:
            frame = io.StringIO()
            try:
                config = load()
                width = min(100, shutil.get_terminal_size((80, 24)).columns)
                show_dashboard(config, paths, args.json, frame, only, args.since, unicode, colour, width,
                           compact=True)
                if not args.json:
                    frame.write("\n" + footer + "\n")
            except ConfigError as exc:  # an edit in progress: say so, and look again
                if args.json:
                    print("\n".join(exc.problems), file=sys.stderr)
                else:
                    frame.write("\n".join(exc.problems) + "\n" + footer + "\n")
            text = frame.getvalue()
            if tty:  # home, each line over the old one, then clear what is left below
                out.write("\033[H" + "".join(line + "\033[K\n" for line in text.splitlines()) + "\033[J")
            else:
                out.write(text if args.json else text + "\n")
            out.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return EX_OK
    except BrokenPipeError:
        silence_stdout()
        return EX_OK
    finally:
        if tty:
            with contextlib.suppress(OSError):
                out.write("\033[?25h")
                out.flush()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


# =============================================================================
# Metrics: the dashboard's facts for Prometheus (node_exporter's textfile collector)
# =============================================================================
# After every heal and every watch run, metrics_file is rewritten atomically (a temporary
# name node_exporter does not read, then a rename) from the same collect_dashboard() the
# dashboard shows: one fact, one home. Only into a directory that exists and is root's
# alone: selfheal creates nothing there, and never writes where another account could swap
# the file or the directory under it.

METRIC_STATES = ("active", "reloading", "activating", "deactivating", "failed", "inactive", "unhealthy",
                 "paused", "not-found", "masked", "error", "unknown")
METRIC_OUTCOMES = (Outcome.RESOLVED, Outcome.RECOVERED, Outcome.FAILED, Outcome.ESCALATED, Outcome.STOPPED)


def prom_label(value: str) -> str:
    """A label value in the exposition format: backslash, double quote and newline escaped."""
    return clean(str(value)).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(d: Dashboard, counts: Dict[str, Dict[str, int]], watch_ran: Optional[float]) -> str:
    """Prometheus text exposition of a dashboard (pure). counts: heals per outcome per service
    (the summaries'); watch_ran: when the watch last ran (None: unknown)."""
    lines: List[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Iterable[Tuple[Dict[str, str], float]]) -> None:
        samples = list(samples)
        if not samples:
            return
        lines.extend(["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)])
        for labels, value in samples:
            text = ",".join('%s="%s"' % (k, prom_label(v)) for k, v in labels.items())
            lines.append("%s%s %s" % (name, "{%s}" % text if text else "", repr(float(value))
                                      if value != int(value) else int(value)))

    rows = d.services
    svc = lambda s: {"service": s.name, "unit": s.unit}  # noqa: E731
    metric("selfheal_info", "gauge", "selfheal's version and the host's name in its reports, always 1",
           [({"version": VERSION, "name": d.name}, 1)])
    metric("selfheal_service_up", "gauge", "1 when the service runs and its last look found it healthy",
           [(svc(s), 1 if s.active_state in RUNNING_STATES and s.state != "unhealthy" else 0) for s in rows])
    metric("selfheal_service_state", "gauge", "the service's state as the dashboard shows it: 1 for the one it is in",
           [(dict(svc(s), state=state), 1 if s.state == state else 0) for s in rows for state in METRIC_STATES])
    metric("selfheal_heals_total", "counter", "heals by outcome since selfheal started keeping this service's summary",
           [(dict(service=s.name, outcome=o.value), counts.get(s.name, {}).get(o.value, 0))
            for s in rows for o in METRIC_OUTCOMES])
    metric("selfheal_last_heal_timestamp_seconds", "gauge", "when the service's last heal began (UNIX time)",
           [({"service": s.name}, float(s.last_heal["ts"])) for s in rows
            if s.last_heal and isinstance(s.last_heal.get("ts"), (int, float))])
    metric("selfheal_last_healing_seconds", "gauge", "failure to verified healthy, at the service's last heal that healed it",
           [({"service": s.name}, float(s.last_heal["healing_seconds"])) for s in rows
            if s.last_heal and isinstance(s.last_heal.get("healing_seconds"), (int, float))])
    metric("selfheal_escalated", "gauge", "1 while selfheal backs off after too many heals (selfheal resume NAME re-arms it)",
           [({"service": s.name}, int(s.escalated)) for s in rows])
    metric("selfheal_paused", "gauge", "1 while the service is paused (selfheal pause NAME)",
           [({"service": s.name}, int(s.paused)) for s in rows])
    metric("selfheal_watch_last_run_timestamp_seconds", "gauge", "when the watch last looked (UNIX time)",
           [({}, watch_ran)] if watch_ran else [])
    setup = d.setup
    metric("selfheal_mail_queue", "gauge", "reports waiting in the outbox for the mail channel",
           [({}, setup.mail_queue)] if setup.mail_queue is not None else [])
    metric("selfheal_webhook_queue", "gauge", "reports waiting in the outbox for the webhook channel",
           [({}, setup.webhook_queue)] if setup.webhook_queue is not None else [])
    return "\n".join(lines) + "\n"


def write_metrics(config: Config, paths: Paths, watch_ran: Optional[float] = None) -> None:
    """Rewrite metrics_file; best effort (logged), never raises: metrics are not healing."""
    target = config.settings.metrics_file
    if not target:
        return
    folder = os.path.dirname(target)
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        log.debug("no %s (prometheus-node-exporter is not installed): no metrics", folder)
        return
    except OSError as exc:
        log.warning("metrics: cannot look at %s: %s", folder, exc)
        return
    if not stat.S_ISDIR(st.st_mode) or (is_root() and (st.st_uid != 0 or st.st_mode & 0o022)):
        log.warning("metrics: %s is not a directory root alone can write; metrics_file is not written", folder)
        return
    try:
        board = collect_dashboard(config, paths)
        counts = {name: {str(k): int(v) for k, v in (history_summary(paths, name).get("counts") or {}).items()
                         if isinstance(v, int)} for name in config.services}
        atomic_write(Path(target), metrics_text(board, counts, watch_ran or board.setup.last_watch), 0o644)
    except Exception as exc:  # never a reason for a heal or a watch run to fail
        log.warning("metrics: could not write %s: %s", target, exc)


# =============================================================================
# CLI
# =============================================================================


# A heal's outcome and what the watch does are also journal fields (native protocol), so
# `journalctl SELFHEAL_SERVICE=nginx` and log shippers filter without parsing text. One
# MESSAGE_ID per kind of event (journalctl MESSAGE_ID=...), fixed for good.
EVENT_IDS = dict({status: label.message_id for status, label in LABELS.items() if label.message_id},
                 WATCH="1c6e9a3d5f7b4e2a8d0c6b9f3e1a5d72")
EVENT_FIELD_RE = re.compile(r"^[A-Z0-9][A-Z0-9_]{0,63}$")


def journal_datagram(fields: Dict[str, str]) -> bytes:
    """Fields in the journal's native format: KEY=value lines; a value with a newline as
    KEY, a 64-bit little-endian length, the bytes (never a key from outside: checked)."""
    out = bytearray()
    for name, value in fields.items():
        if not EVENT_FIELD_RE.match(name):
            raise ValueError("not a journal field name: %r" % name)
        data = str(value).encode("utf-8", "replace")[:8192]
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def journal_send(fields: Dict[str, str]) -> bool:
    """One entry through the journal's socket; False when there is no journal to take it."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(journal_datagram(fields), JOURNAL_SOCKET)
        return True
    except OSError:
        return False


class SyslogHandler(logging.Handler):
    """Log records to syslog (the journal) under syslog_ident. A record with `journal`
    fields (log.info(..., extra={"journal": {...}})) goes through the journal's native
    protocol with them, under the same identifier; syslog when there is no journal."""

    PRIORITY = {logging.DEBUG: syslog.LOG_DEBUG, logging.INFO: syslog.LOG_INFO,
                logging.WARNING: syslog.LOG_WARNING, logging.ERROR: syslog.LOG_ERR,
                logging.CRITICAL: syslog.LOG_CRIT}

    def __init__(self, ident: str):
        super().__init__()
        self.ident = ident
        syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_DAEMON)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            priority, message = self.PRIORITY.get(record.levelno, syslog.LOG_INFO), clean(self.format(record))
            fields = getattr(record, "journal", None)
            if isinstance(fields, dict) and journal_send(dict(
                    {"MESSAGE": message, "PRIORITY": str(priority), "SYSLOG_IDENTIFIER": self.ident,
                     "SYSLOG_FACILITY": str(syslog.LOG_DAEMON >> 3), "SYSLOG_PID": str(os.getpid())},
                    **{k: clean(str(v)) for k, v in fields.items()})):
                return
            syslog.syslog(priority, message)
        except Exception:  # logging must never break healing
            self.handleError(record)


class CleanFormatter(logging.Formatter):
    """Log lines reach a terminal: no control characters, no URL credentials in them."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record))


def setup_logging(verbose: bool, quiet: bool, ident: Optional[str]) -> None:
    log.handlers[:] = []
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING))
    stderr.setFormatter(CleanFormatter("selfheal: %(message)s"))
    log.addHandler(stderr)
    if ident:
        handler = SyslogHandler(ident)
        handler.setLevel(logging.DEBUG if verbose else logging.INFO)
        log.addHandler(handler)


def version_text() -> str:
    """--version: selfheal's version, then the Python and systemd it runs with here."""
    return "\n".join(["selfheal %s" % VERSION, "Python %d.%d.%d" % sys.version_info[:3],
                      *systemd_facts()])


class VersionAction(argparse.Action):
    """--version, probing the host only when asked (argparse's own takes a fixed string)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfheal.py",
        description="Heal systemd services when they fail, and mail a report of what happened.",
        epilog="Config: %s (--config to use another). Exit status: 0 ok, 1 failure, 2 usage, "
               "78 config error." % CONFIG_PATH)
    parser.add_argument("--version", action=VersionAction,
                        help="show the version and what this host's systemd provides, then exit")
    parser.add_argument("-c", "--config", default=None, help="services.conf to use (default %s)" % CONFIG_PATH)
    parser.add_argument("-v", "--verbose", action="store_true", help="say more, on stderr")
    # The same two options after the command too (miraclemax-status --config X); SUPPRESS
    # keeps a value given before the command from being reset by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    p = add("heal", help="diagnose and heal one service now, then mail the report")
    p.add_argument("name", help="the service's section name in services.conf")
    p.add_argument("--dry-run", action="store_true", help="print the diagnosis and the plan; change nothing")
    p.add_argument("--trigger", default=MANUAL_TRIGGER, help=argparse.SUPPRESS)

    p = sub.add_parser("validate", help="check a services.conf and print every problem (like nginx -t)",
                       parents=[common], epilog=keys_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", help="the file to check (default: --config or %s)" % CONFIG_PATH)

    p = add("install", help="install selfheal on this host (what install.sh runs)")
    p.add_argument("--prefix", default=os.environ.get("PREFIX") or DEFAULT_PREFIX, help="default $PREFIX or /usr/local")
    p.add_argument("--destdir", default=os.environ.get("DESTDIR", ""), help="stage into this root (packaging); "
                   "systemd is not told")
    p.add_argument("--uninstall", action="store_true", help="remove what install put there; services keep running")
    p.add_argument("--dry-run", action="store_true",
                   help="say what install would change (last line: N file(s) would change.); change nothing")
    p.add_argument("--purge", action="store_true", help="with --uninstall: also remove config, history and queue")

    p = add("watch", help="look at every service once and act (what selfheal-watch.timer runs)")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("flush-mail", aliases=["flush"], parents=[common],
                       help="send reports queued because mail or the webhook failed")
    p.add_argument("--quiet", action="store_true", help="say nothing when the queues are empty")

    add("test-email", help="send a test mail (and a test post to webhook_url, a ping to heartbeat_url, "
                           "when set); say exactly what fails")

    p = add("status", help="the dashboard: system, services, last heals, activity, setup (miraclemax-status)")
    p.description = ("The dashboard: system overview, every service with its health and last heal, recent "
                     "self-healing activity and the configuration. Works without root (what needs root "
                     "shows as unknown).")
    p.epilog = "Exit status: 0 all healthy, 1 something failed or unhealthy, 2 not installed, bad config or usage."
    if os.path.basename(sys.argv[0] or "") == "miraclemax-status":
        p.prog = "miraclemax-status"
    p.add_argument("--json", action="store_true",
                   help="one JSON document for scripts and monitors (shape: README, 'status --json')")
    p.add_argument("--watch", nargs="?", type=status_interval, const=DEFAULT_WATCH, default=None,
                   metavar="SECONDS", help="redraw every SECONDS (default %g) until Ctrl-C" % DEFAULT_WATCH)
    p.add_argument("--service", action="append", metavar="NAME",
                   help="only this service (repeat for more); the exit status is about these only")
    p.add_argument("--since", type=status_since, default=DEFAULT_SINCE, metavar="DURATION",
                   help="the activity window, e.g. 90m, 7d (default 24h)")

    p = add("pause", help="stop healing a service (maintenance), for a while or until resumed")
    p.add_argument("name")
    p.add_argument("duration", nargs="?", help="e.g. 30m, 2h (default: until resume)")

    p = add("resume", help="heal paused services again; also re-arms after an escalation")
    p.add_argument("names", nargs="*", metavar="NAME")
    p.add_argument("--all", action="store_true", help="every listed service")
    return parser


def require_root(what: str) -> None:
    if not is_root():
        raise UsageError("%s needs root (try: sudo %s)" % (what, " ".join(sys.argv)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EX_USAGE
    paths = Paths.from_env()
    config_path = args.config or os.environ.get("SELFHEAL_CONFIG") or CONFIG_PATH
    quiet = getattr(args, "quiet", False)
    setup_logging(args.verbose, quiet, None)
    try:
        if args.command == "validate":
            return cmd_validate(args.file or config_path)
        if args.command == "install":
            return cmd_install(args, config_path)
        if args.command == "status":
            return cmd_status(args, config_path, paths)
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            if args.command in ("heal", "watch") and not getattr(args, "dry_run", False):
                report_broken_config(paths, exc)  # the healer is blind: say so by mail
            raise
        setup_logging(args.verbose, quiet, config.settings.syslog_ident)
        if args.command == "watch" or (args.command == "heal" and args.name in config.services):
            keep_last_good(paths, config_path)  # (a name from the command line is checked first)
        if args.command == "heal":
            if not args.dry_run:
                require_root("heal")
            return cmd_heal(config, args.name, paths, args.trigger, dry_run=args.dry_run)
        if args.command == "watch":
            require_root("watch")
            return cmd_watch(config, paths)
        if args.command in ("flush-mail", "flush"):
            return cmd_flush(config, paths, quiet)
        if args.command == "test-email":
            return cmd_test_email(config)
        if args.command == "pause":
            require_root(args.command)
            return cmd_pause(config, paths, args.command, args.name, getattr(args, "duration", None))
        if args.command == "resume":
            if bool(args.names) == bool(args.all):
                raise UsageError("resume: name the services, or --all (not both)")
            require_root(args.command)
            return cmd_resume(config, paths, list(config.services) if args.all else args.names)
    except SelfhealError as exc:
        if isinstance(exc, ConfigError):
            for line in exc.problems:
                print(line, file=sys.stderr)
            print("%d problem(s); nothing was changed." % len(exc.problems), file=sys.stderr)
        else:
            print("selfheal: %s" % exc, file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    parser.error("unknown command %s" % args.command)
    return EX_USAGE


def cmd_validate(path: str) -> int:
    """`validate [FILE]`: the file, then the host it names (raises ConfigError)."""
    config = load_config(path, trusted=os.path.abspath(path) == CONFIG_PATH)
    check_on_host(config)
    print("%s: ok, %d service(s): %s" % (path, len(config.services), ", ".join(config.services)))
    return EX_OK


def cmd_heal(config: Config, name: str, paths: Paths, trigger: str, env=os.environ,
                 dry_run: bool = False, out=None) -> int:
    """`heal NAME`: refuse, lock, heal, record, mail; loop if it failed again meanwhile.
    From OnFailure= (--trigger onfailure), a burst is healed by one process: the first heal
    leads, a later one hands its service to it and ends at once (see lead_burst)."""
    out = out or sys.stdout
    if name not in config.services:
        raise UsageError("%r is not listed in %s (listed: %s)"
                         % (name, config.path, ", ".join(config.services) or "none"))
    svc = config.services[name]
    if never_touch(svc.unit):
        raise UsageError("selfheal never touches %s" % svc.unit)
    if trigger == "onfailure" and not dry_run:
        note_arrival(paths, name)
        if may_hand_over(paths, name) and hand_over(paths, name, env):
            leader = Lock(paths.run / "locks" / "burst.lock")
            if not leader.acquire():
                log.info("%s: handed to the heal under way (one heal for a burst)", name)
                print("%s: handed to the heal under way" % name, file=out)
                return EX_OK
            return lead_burst(config, paths, name, leader, out)
        if not may_hand_over(paths, name):
            return heal_in_own_sandbox(config, name, paths, env, out)
    rc = heal_service(config, name, paths, trigger, env, dry_run, out)
    if not dry_run:
        write_metrics(config, paths)  # after the report: the mail never waits for it
    return rc


def heal_in_own_sandbox(config: Config, name: str, paths: Paths, env, out) -> int:
    """A service whose heal has a drop-in of its own heals itself, in its own unit, and
    nothing else. Its unit's ExecCondition= (unless the drop-in reset it) left its name in
    handed/ and took the lead (/run/selfheal/leading): both are given back once no heal leads,
    and what others handed over meanwhile is given to a heal of theirs, which leads."""
    take_handed(paths, name)
    rc = heal_service(config, name, paths, "onfailure", env, False, out)
    write_metrics(config, paths)
    leader = Lock(paths.run / "locks" / "burst.lock")
    if leader.acquire():  # no heal leads: the lead, if taken, was this unit's
        try:
            with contextlib.suppress(OSError):
                os.rmdir(str(paths.leading))
        finally:
            leader.release()
        waiting = sorted(n for n in take_handed_names(paths) if n in config.services and n != name)
        if waiting:
            started = run([SYSTEMCTL, "start", "--no-block", "selfheal@%s.service" % waiting[0]])
            if not started.ok:
                log.error("could not start selfheal@%s.service: %s", waiting[0], started.brief())
    return rc


def take_handed_names(paths: Paths) -> List[str]:
    """The names of the services handed over and not yet taken (left in place)."""
    try:
        with os.scandir(str(paths.handed("x").parent)) as entries:
            return [e.name[:-len(".json")] for e in entries if e.name.endswith(".json")]
    except OSError:
        return []


def heal_service(config: Config, name: str, paths: Paths, trigger: str, env=os.environ,
                 dry_run: bool = False, out=None, event: Optional["BurstEvent"] = None,
                 restarted: bool = False) -> int:
    """One service: paused or in a maintenance window, or its lock, then heal_rounds."""
    out = out or sys.stdout
    svc = config.services[name]
    pause = paused_until(paths, name)
    if pause is not None and not dry_run:
        log.info("%s is paused%s; not healing", name, " until " + iso(pause) if pause else "")
        print("%s is paused; not healing (selfheal resume %s)" % (name, name), file=out)
        return EX_OK
    window = maintenance_until(config, svc)
    if window is not None and trigger != MANUAL_TRIGGER and not dry_run:
        # A heal asked for by hand goes ahead: the window is for what happens by itself.
        unit = show_unit(svc.unit)
        what = "%s: %s (%s), result %s" % (trigger, unit.get("ActiveState", "?"), unit.get("SubState", "?"),
                                          unit.get("Result", "?"))
        note_maintenance(paths, svc, window, what, time.time())
        log.info("%s: %s; in a maintenance window until %s: not healed, not mailed", name, what, iso(window))
        print("%s is in a maintenance window until %s; not healing" % (name, iso(window)), file=out)
        return EX_OK
    lock = Lock(paths.lock(name))
    # A trigger that comes during a heal waits for it, then finds that run healthy and says
    # nothing (see heal); it is never lost, and never a second restart.
    patience = 2 * config.settings.verify_timeout + 2 * config.settings.smtp_timeout + 10
    if config.settings.webhook_url:
        patience += 2 * config.settings.webhook_timeout
    if not dry_run and not lock.wait(patience):
        log.warning("a heal of %s has been running for over %s; this trigger gives up", name,
                    format_duration(patience))
        print("a heal of %s is already running" % name, file=out)
        return EX_OK
    if log.isEnabledFor(logging.DEBUG):  # a process more: only when someone reads it (-v)
        log.debug("this host: %s", "; ".join(systemd_facts()))
    try:
        # Started as selfheal@NAME.service: by OnFailure=, or by the watch, which leaves a
        # finding. (systemd sets MONITOR_* in both cases: it describes the unit whose
        # OnFailure= names this instance, whoever started it.)
        finding = None
        if trigger == "onfailure" and not dry_run:
            finding = take_finding(paths, name, 3 * config.settings.watch_interval)
            if finding and finding.invocation and finding.invocation != show_unit(svc.unit).get("InvocationID"):
                finding = None  # about a run that is gone: this heal is for something newer
            if finding and finding.kind == "retry":
                trigger, env, finding = RETRY_TRIGGER, {}, None  # a FAILED service, healed again
            elif finding:
                trigger = "watch"
                if finding.kind in ("unhealthy", "restarted"):
                    env = {}  # MONITOR_* would describe an earlier run, not this problem
        with stop_on_sigterm(not dry_run):
            rc = heal_rounds(config, svc, paths, trigger, env, dry_run, finding, out, event,
                             restarted and finding is None)
    finally:
        lock.release()
    return rc


def cmd_watch(config: Config, paths: Paths) -> int:
    """The `watch` command (selfheal-watch.timer): look at every service once, act on what
    OnFailure= cannot see, retry queued mail. A broken run reports itself by mail."""
    started = time.time()
    try:
        with budget(watch_budget(config.settings)):
            return watch_run(config, paths)
    except Exception:  # the healer itself is broken: say so, never die silently
        log.exception("the watch run failed")
        report_watch_failure(config, paths, traceback.format_exc())
        return EX_FAIL
    finally:
        write_metrics(config, paths, watch_ran=started)


def cmd_flush(config: Config, paths: Paths, quiet: bool = False) -> int:
    """`flush-mail`: send what the outbox holds; 1 while anything is left."""
    counts = flush_outbox(config, paths, wait=30.0)
    (sent, left), (posted, waiting) = counts["mail"], counts["webhook"]
    if sent or left or posted or waiting or not quiet:
        webhook = "; webhook: %d sent, %d still queued" % (posted, waiting) if (
            config.settings.webhook_url or posted or waiting) else ""
        print("flush-mail: %d sent, %d still queued%s" % (sent, left, webhook))
    return EX_OK if not left and not waiting else EX_FAIL


def cmd_status(args, config_path: str, paths: Paths, out=None) -> int:
    """`status` / miraclemax-status: 0 all healthy, 1 something failed or unhealthy,
    2 not installed, a config it cannot read, or a bad command line."""
    out = out or sys.stdout
    if not os.path.exists(config_path):
        text = ("selfheal is not installed here (no %s). Install it with: sudo ./install.sh "
                "(from a clone), or: sudo python3 selfheal.py install --config services.conf" % config_path)
        print(text, file=sys.stderr if args.json else out)
        return EX_USAGE
    only = tuple(dict.fromkeys(args.service or ()))

    def load() -> Config:
        try:
            config = load_config(config_path, trusted=False)
        except ConfigError:
            # Not root and the config is root's alone (it holds secrets): the copy without them.
            if os.access(config_path, os.R_OK) or not paths.public_config.is_file():
                raise
            config = load_config(str(paths.public_config), trusted=False)
        unknown = [name for name in only if name not in config.services]
        if unknown:
            raise UsageError("--service %r: not in %s%s" % (unknown[0], config_path,
                                                           _did_you_mean(unknown[0], config.services)))
        return config

    try:
        config = load()
        if args.watch is None:
            return show_dashboard(config, paths, args.json, out, only, args.since)
        return status_watch(load, paths, args, out, only)
    except ConfigError as exc:
        for line in exc.problems:
            print(line, file=sys.stderr)
        print("%d problem(s) in the config; the dashboard needs one that loads." % len(exc.problems),
              file=sys.stderr)
        return EX_USAGE


def cmd_install(args, config_path: str) -> int:
    source = args.config or (str(Path(__file__).with_name("services.conf")) if not args.uninstall else config_path)
    # The units run selfheal with the interpreter that installs it (install.sh checked its
    # version), unless staging for another root, where only the standard path makes sense.
    python = sys.executable if (not args.destdir and os.path.isabs(sys.executable or "")
                                and re.match(r"^[A-Za-z0-9_./+-]+$", sys.executable)) else PYTHON
    installer = Installer(prefix=args.prefix, destdir=args.destdir, python=python,
                          dry_run=bool(getattr(args, "dry_run", False)))
    if (not args.prefix.startswith("/") or not re.match(r"^[A-Za-z0-9_./+-]+$", args.prefix)
            or any(part in (".", "..") for part in args.prefix.split("/"))):
        raise UsageError("PREFIX must be an absolute path of A-Z a-z 0-9 _ . / + - without . or .. "
                         "components: %r" % args.prefix)
    if not installer.destdir:
        require_root("install")
    if args.uninstall:
        if installer.dry_run:
            raise UsageError("--dry-run is for install only")
        return installer.uninstall(purge=args.purge)
    # The source config is the admin's own file in a checkout (not yet root's): check its
    # content and that nobody else can write it; /etc/selfheal gets a root-owned copy.
    config = load_config(source, trusted=False)
    st = os.stat(source)
    if st.st_mode & 0o022:
        raise ConfigError(["%s: writable by group or others (chmod go-w %s)" % (source, source)])
    with open(source, encoding="utf-8") as handle:
        config_text = handle.read()
    with open(os.path.realpath(__file__), encoding="utf-8") as handle:
        self_text = handle.read()
    print("installing selfheal %s from %s (prefix %s%s)" % (
        VERSION, source, args.prefix, ", destdir " + args.destdir if args.destdir else ""))
    return installer.install(config, config_text, self_text)


def cmd_test_email(config: Config) -> int:
    s = config.settings
    body = ("This is a test from selfheal %s on %s.\n\nIf you can read this, reports about %s will reach you.\n"
            % (VERSION, socket.gethostname(), ", ".join(config.services)))
    report = new_report(s, "🧪", "selfheal", "TEST", body, subject_text="🧪 %s: selfheal test mail" % s.name)
    rc = EX_OK
    try:
        send(s, mail_message(s, report))
        print("test-email: sent to %s via %s:%d (%s)" % (", ".join(s.email_to), s.smtp_host, s.smtp_port,
                                                         s.smtp_security))
    except mail_errors() as exc:
        print("test-email: FAILED: %s" % explain_mail_error(s, exc), file=sys.stderr)
        rc = EX_FAIL
    if s.webhook_url:  # tested on its own: a broken mail setup says nothing about the webhook
        try:
            said = post_webhook(s, webhook_event(s, report))
            print("test-email: webhook: posted to %s as %s (%s)" % (url_for_log(s.webhook_url), s.webhook_format, said))
        except WebhookError as exc:
            print("test-email: webhook: FAILED: %s" % exc, file=sys.stderr)
            rc = EX_FAIL
    if s.heartbeat_url:  # the same GET a watch run makes (it only says "alive")
        import http.client

        where = url_for_log(s.heartbeat_url)
        try:
            status, _ = http_send(s.heartbeat_url, s.webhook_timeout)
            problem = "" if 200 <= status < 300 else "%s answered HTTP %d" % (where, status)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            status, problem = 0, explain_http_error(where, exc, s.webhook_timeout)
        if problem:
            print("test-email: heartbeat: FAILED: %s" % problem, file=sys.stderr)
            rc = EX_FAIL
        else:
            print("test-email: heartbeat: %s answered HTTP %d" % (where, status))
    return rc


def cmd_pause(config: Config, paths: Paths, verb: str, name: str, duration: Optional[str]) -> int:
    if name not in config.services:
        raise UsageError("%r is not listed in %s" % (name, config.path))
    until = 0.0
    if verb == "pause" and duration:
        try:
            until = time.time() + positive_duration(duration)
        except ValueError as exc:
            raise UsageError("pause: %s: %r" % (exc, duration))
    try:
        with service_state(paths, name) as state:
            if verb == "pause":
                state["paused_until"] = until
            else:
                state.pop("paused_until", None)
                state.pop("escalated", None)
                state["rearmed_at"] = time.time()
                if state.get("incident") and not state["incident"].get("closed"):
                    state["incident"]["closed"] = state["rearmed_at"]  # a human stepped in: start afresh
    except OSError as exc:
        raise SelfhealError("could not %s %s: %s" % (verb, name, exc))
    if verb == "pause":
        print("%s paused %s" % (name, "until " + iso(until) if until else "until: selfheal resume %s" % name))
        log.info("%s paused", name)
    else:
        print("%s: healing resumed (heal count re-armed)" % name)
        log.info("%s resumed", name)
    return EX_OK


def cmd_resume(config: Config, paths: Paths, names: Sequence[str]) -> int:
    """`resume NAME... | --all`: each named service is healed again and its heal count re-armed.
    Every name is checked before any is changed."""
    unknown = [name for name in names if name not in config.services]
    if unknown:
        raise UsageError("%r is not listed in %s%s" % (unknown[0], config.path,
                                                      _did_you_mean(unknown[0], config.services)))
    for name in dict.fromkeys(names):
        cmd_pause(config, paths, "resume", name, None)
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
