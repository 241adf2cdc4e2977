"""Drill bed: throw-away Debian containers with a real systemd and a real postfix.

The host runs as root but PID 1 is not systemd, so `systemctl` on the host is useless.
This module builds a bootable Debian root once (debootstrap + postfix), caches it, and for
each drill boots a private writable layer over it (overlayfs; `cp -a` if overlayfs is
unavailable) with `systemd-nspawn -b` on a private network:

    from bed import Container, skip_or_fail_reason

    with Container(binds_ro={"/work/main": "/src"}) as box:
        box.write("/etc/systemd/system/web.service", UNIT)
        box.run(["systemctl", "daemon-reload"])
        box.run(["systemctl", "start", "web"])
        box.wait_mail(lambda m: "web" in m["Subject"])

Everything is stdlib-only.  Command line, for debugging:

    python3 tests/bed.py build [bullseye|bookworm|trixie]   # build (or reuse) the cached root
    python3 tests/bed.py shell [bullseye|bookworm|trixie]   # boot a container, open a shell

Suites: bullseye (Debian 11: systemd 247, Python 3.9), bookworm (12: 252, 3.11), trixie
(13: 257, 3.13); the same recipe builds each (first build about 2 minutes).

Environment:
    SELFHEAL_BED_CACHE  where roots are cached (default /var/cache/selfheal-bed)
    SELFHEAL_BED_SUITE  default suite for Container() and the CLI (default bookworm)
    SELFHEAL_BED_KEEP=1 keep each container's directory after exit (its path is printed)

Gotchas (see also the docstrings):
    * --keep-unit and --register=no are required: the host has no systemd to talk to.
    * nspawn mounts tmpfs on /tmp and /run inside, so `write`/`read` (which go through the
      root directory on the host) refuse those paths; use `run`/`sh` for them.
    * Mail for any local recipient is delivered to root, i.e. /var/mail/root.
"""

import contextlib
import email
import email.policy
import errno
import fcntl
import hashlib
import json
import mailbox
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ======================================================================================
# Constants
# ======================================================================================

DEFAULT_CACHE = "/var/cache/selfheal-bed"
DEFAULT_SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
CONTAINER_TMP = "/var/tmp"

DEBOOTSTRAP = "/usr/sbin/debootstrap"
NSPAWN = "/usr/bin/systemd-nspawn"
NSENTER = "/usr/bin/nsenter"
MOUNT = "/usr/bin/mount"
UMOUNT = "/usr/bin/umount"

HOSTNAME = "miraclemax"
MAILNAME = "bed.localdomain"
ROOT_MBOX = "/var/mail/root"
SMTP_PORT = 25

INSIDE_ENV = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
]

# Timeouts, in seconds.
DEBOOTSTRAP_TIMEOUT = 1200
CONFIGURE_TIMEOUT = 900
COPY_TIMEOUT = 300
BOOT_TIMEOUT = 60
POWEROFF_TIMEOUT = 10
POLL = 0.05

# The build recipe.  Any change here changes the stamp, and the cached root is rebuilt.
INCLUDE = ["systemd", "systemd-sysv", "dbus", "python3", "iproute2", "procps"]
DEBCONF = [
    "postfix postfix/main_mailer_type select Local only",
    f"postfix postfix/mailname string {MAILNAME}",
]
POSTCONF = [
    f"myhostname = {HOSTNAME}.localdomain",
    "mydomain = localdomain",
    f"mydestination = $myhostname, {HOSTNAME}, {MAILNAME}, localhost.localdomain, localhost",
    "inet_interfaces = loopback-only",
    "inet_protocols = all",
    # Any local recipient (owner@localhost, nobody-in-particular@localhost) goes to root.
    "local_recipient_maps =",
    "luser_relay = root",
    "mailbox_size_limit = 0",
    # No certificates in a minimal root (ssl-cert is only recommended): no TLS, no warnings.
    "smtpd_tls_security_level = none",
    "smtp_tls_security_level = none",
    "smtpd_tls_cert_file =",
    "smtpd_tls_key_file =",
]
ALIASES = ["owner: root"]
MASK = ["apt-daily.timer", "apt-daily-upgrade.timer"]  # nothing may run apt mid-drill
# Real services as Debian ships them, for the drills that heal them (nginx, Redis,
# PostgreSQL, memcached) and for the metrics drill (node_exporter).  Installed but
# disabled: a drill enables what it needs, so the other drills boot as fast as before.
SERVICES = ["nginx", "redis-server", "redis-tools", "postgresql", "memcached",
            "prometheus-node-exporter"]
DISABLE = ["nginx.service", "redis-server.service", "postgresql.service",
           "memcached.service", "prometheus-node-exporter.service"]
ETC_HOSTS = (
    f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}.localdomain {HOSTNAME}\n"
    "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
)
RECIPE_VERSION = 3
STAMP = ".selfheal-bed-recipe"

# Inside-the-container paths that are mounts (tmpfs, proc...) invisible from the host dir.
VOLATILE = ("/tmp", "/run", "/dev", "/proc", "/sys", "/var/run", "/var/lock")


# ======================================================================================
# Errors
# ======================================================================================


class BedError(RuntimeError):
    """The bed could not be built, booted or used."""


class CommandFailed(subprocess.CalledProcessError):
    """A command exited non-zero; str() shows its stdout and stderr."""

    def __str__(self):
        return (
            f"{self.cmd!r} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout or ''}--- stderr ---\n{self.stderr or ''}"
        )


# ======================================================================================
# Small helpers
# ======================================================================================

_T0 = time.monotonic()


def log(msg):
    """Progress goes to stderr, with seconds since import."""
    print(f"[bed {time.monotonic() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def host_run(argv, *, timeout, check=True, input=None, capture=True):
    """The one place host commands run: argument lists, a timeout, never a shell."""
    result = subprocess.run(
        argv,
        input=input,
        stdin=None if input is not None else subprocess.DEVNULL,
        capture_output=capture,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, argv, result.stdout, result.stderr)
    return result


def wait_until(predicate, timeout, what):
    """Poll `predicate` every POLL seconds; return its first truthy value or raise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BedError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL)


def cache_dir():
    return Path(os.environ.get("SELFHEAL_BED_CACHE", DEFAULT_CACHE))


def default_suite():
    return os.environ.get("SELFHEAL_BED_SUITE", DEFAULT_SUITE)


@contextlib.contextmanager
def cache_lock(suite, shared=False):
    """flock on <cache>/<suite>.lock: exclusive to build, shared to copy."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f"{suite}.lock", "a") as fh:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for the {suite} cache lock (another run is building?)")
            fcntl.flock(fh, mode)
        yield


def resolve_in_root(root, path):
    """Host path of container path `path` under `root`, following symlinks the way the
    container would (an absolute link target is relative to `root`, never to the host)."""
    if not str(path).startswith("/"):
        raise ValueError(f"container path must be absolute: {path!r}")
    todo = [p for p in str(path).split("/") if p]
    done = []
    hops = 0
    while todo:
        name = todo.pop(0)
        if name == ".":
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        candidate = root.joinpath(*done, name)
        if not candidate.is_symlink():
            done.append(name)
            continue
        hops += 1
        if hops > 40:
            raise OSError(errno.ELOOP, "too many symlinks", str(path))
        target = os.readlink(candidate)
        if target.startswith("/"):
            done = []
        todo = [p for p in target.split("/") if p] + todo
    return root.joinpath(*done)


def mounts_under(path):
    """Mount points (in our mount namespace) at or below `path`."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix[:-1] or point.startswith(prefix):
                found.append(point)
    return found


def remove_tree(path):
    """rm -rf, but never through a mount point (a bind of the host must survive)."""
    busy = mounts_under(path)
    if busy:
        raise BedError(f"refusing to remove {path}: mounts below it: {busy}")
    shutil.rmtree(path, ignore_errors=True)


# ======================================================================================
# Building the cached root
# ======================================================================================


def recipe_stamp(suite):
    """A digest of everything that shapes the root; a change forces a rebuild."""
    recipe = {
        "version": RECIPE_VERSION,
        "suite": suite,
        "mirror": MIRROR,
        "include": INCLUDE,
        "debconf": DEBCONF,
        "postconf": POSTCONF,
        "aliases": ALIASES,
        "mask": MASK,
        "services": SERVICES,
        "disable": DISABLE,
        "hosts": ETC_HOSTS,
        "hostname": HOSTNAME,
    }
    blob = json.dumps(recipe, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16] + " " + blob + "\n"


def root_path(suite):
    return cache_dir() / suite


def root_is_current(suite):
    stamp = root_path(suite) / STAMP
    return stamp.is_file() and stamp.read_text() == recipe_stamp(suite)


def configure_script():
    """Shell run inside the fresh root (not booted) to install and set up postfix."""
    debconf = "\n".join(DEBCONF)
    postconf = " ".join(f"'{line}'" for line in POSTCONF)
    aliases = "\n".join(ALIASES)
    return f"""
set -eu
export DEBIAN_FRONTEND=noninteractive
debconf-set-selections <<'EOF'
{debconf}
EOF
# No daemon may start during the build.
printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
apt-get update -q
apt-get install -y -q --no-install-recommends postfix
apt-get install -y -q --no-install-recommends {" ".join(SERVICES)}
postconf -e {postconf}
cat >> /etc/aliases <<'EOF'
{aliases}
EOF
newaliases
systemctl --root=/ enable postfix.service
systemctl --root=/ mask {" ".join(MASK)}
systemctl --root=/ disable {" ".join(DISABLE)}
# postgresql.service is a wrapper; its clusters' units are enabled through it.
systemctl --root=/ disable 'postgresql@*' 2>/dev/null || true
rm -f /usr/sbin/policy-rc.d
apt-get clean
rm -rf /var/lib/apt/lists/*
postfix check
"""


def configure_root(tmp):
    (tmp / "etc/hostname").write_text(HOSTNAME + "\n")
    (tmp / "etc/hosts").write_text(ETC_HOSTS)
    argv = [
        NSPAWN, "--register=no", "--keep-unit", "--quiet", "--pipe",
        f"--hostname={HOSTNAME}", "-D", str(tmp), "/bin/sh", "-c", configure_script(),
    ]
    result = host_run(argv, timeout=CONFIGURE_TIMEOUT, check=False)
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-4000:]
        raise BedError(f"configuring the root failed (exit {result.returncode}):\n{output}")


def build_root(suite=None):
    """Return the cached bootable root for `suite`, building it first if needed.

    Built in a temp dir next to the cache and renamed into place only when complete;
    a stamp with the recipe digest makes a changed recipe rebuild; an exclusive flock
    keeps two concurrent runs from building twice.
    """
    suite = suite or default_suite()
    final = root_path(suite)
    if root_is_current(suite):
        return final
    with cache_lock(suite):
        if root_is_current(suite):  # built by someone else while we waited
            return final
        for stale in cache_dir().glob(f".{suite}.*"):
            log(f"removing leftover {stale}")
            remove_tree(stale)
        tmp = Path(tempfile.mkdtemp(prefix=f".{suite}.build-", dir=cache_dir()))
        tmp.chmod(0o755)  # becomes the container's "/": mkdtemp's 0700 locks out non-root
        try:
            started = time.monotonic()
            log(f"debootstrap {suite} into {tmp} (a few minutes)")
            host_run(
                [DEBOOTSTRAP, "--variant=minbase", "--include=" + ",".join(INCLUDE),
                 suite, str(tmp), MIRROR],
                timeout=DEBOOTSTRAP_TIMEOUT,
            )
            log("installing and configuring postfix")
            configure_root(tmp)
            (tmp / STAMP).write_text(recipe_stamp(suite))
            if final.exists():
                old = final.with_name(f".{suite}.old-{os.getpid()}")
                final.rename(old)
                remove_tree(old)
            tmp.rename(final)
            log(f"root {final} ready in {time.monotonic() - started:.0f}s")
        except BaseException:
            remove_tree(tmp)
            raise
    return final


def skip_or_fail_reason(suite=None):
    """None if the bed can be used here, else why not (tests skip, or fail under CI=true)."""
    suite = suite or default_suite()
    if os.geteuid() != 0:
        return "the drill bed needs root (systemd-nspawn, nsenter)"
    for binary in (NSPAWN, NSENTER):
        if not os.access(binary, os.X_OK):
            return f"{binary} is missing (apt-get install systemd-container util-linux)"
    if not os.access(DEBOOTSTRAP, os.X_OK) and not root_is_current(suite):
        return f"{DEBOOTSTRAP} is missing and no cached {suite} root is present"
    return None


# ======================================================================================
# A booted container
# ======================================================================================


def child_pids(pid):
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            pids += [int(p) for p in (task / "children").read_text().split()]
    return pids


def is_container_init(pid):
    """True once `pid` is PID 1 of its own namespace and has exec'd systemd."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    nspid = [line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")]
    nspid = nspid[0] if nspid else []
    return len(nspid) >= 2 and nspid[-1] == "1" and comm == "systemd"


def listening_ports(pid, host="127.0.0.1"):
    """TCP ports in LISTEN in the network namespace of `pid`, bound to `host` or any."""
    wanted = {"00000000", "".join(reversed([f"{int(b):02X}" for b in host.split(".")]))}
    ports = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == "0A" and address in wanted:
                ports.add(int(port, 16))
    return ports


def _parse_mail(fh):
    return email.message_from_binary_file(fh, policy=email.policy.default)


class Container:
    """A throw-away container over the cached root, booted with systemd-nspawn.

    The root is an overlayfs over the cached root (upper layer in the temp dir), or a
    `cp -a` copy where overlayfs is unavailable; either way nothing leaks between
    containers or into the cache.

    Attributes once entered: `dir` (temp dir), `root` (its root fs), `pid` (the
    container's systemd, as seen from the host), `log_path` (nspawn's console output),
    `boot_seconds` (from spawn to `running` + postfix listening).

    boot=False: the private root only, never booted (`pid` stays None); commands run with
    `pipe()`, as a throw-away `systemd-nspawn --pipe` on the host's network (apt reaches
    MIRROR, as when the root was built), not with `run()`.
    """

    def __init__(self, suite=None, binds_ro=None, boot_timeout=BOOT_TIMEOUT, boot=True):
        self.suite = suite or default_suite()
        self.binds_ro = dict(binds_ro or {})
        self.boot_timeout = boot_timeout
        self.boot = boot
        self.dir = self.root = self.pid = self.log_path = self.boot_seconds = None
        self._proc = None
        self._log = None
        self._overlay = False
        self._stack = contextlib.ExitStack()

    # ---- life cycle ------------------------------------------------------------------

    def __enter__(self):
        try:
            self._prepare_root()
            if self.boot:
                self._boot()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc):
        self._teardown()
        return False

    def reboot(self):
        """Power the container off cleanly and boot it again on the same root: what was
        written inside (state, queues, mailboxes) survives, as on a real host; /run and
        /tmp do not.  `pid` and `boot_seconds` are those of the new boot."""
        self._poweroff()
        self._proc = None
        self._log.close()
        self._log = None
        self.pid = None
        self._boot(mode="ab")

    def _prepare_root(self):
        """A private, writable root: an overlay on the cached root, else a full copy.

        The shared cache lock is held until teardown, so no rebuild can pull the cached
        root (the overlay's lower layer) from under a running container.
        """
        cached = build_root(self.suite)
        self._stack.enter_context(cache_lock(self.suite, shared=True))
        self.dir = Path(tempfile.mkdtemp(prefix=f"selfheal-bed-{self.suite}-", dir=CONTAINER_TMP))
        self.root = self.dir / "root"
        if not self._mount_overlay(cached):
            host_run(["cp", "-a", "--", str(cached), str(self.root)], timeout=COPY_TIMEOUT)

    def _mount_overlay(self, cached):
        """Mount DIR/root = overlay(lower=cached, upper=DIR/upper); False if impossible.

        Much faster than `cp -a` when the page cache is cold (here: 0.01 s vs 1.5-14 s).
        """
        upper, work = self.dir / "upper", self.dir / "work"
        if any(c in str(p) for p in (cached, self.dir) for c in ",:"):
            return False
        for path in (upper, work, self.root):
            path.mkdir()
        upper.chmod(cached.stat().st_mode & 0o7777)  # the overlay's "/" takes upper's mode
        options = f"lowerdir={cached},upperdir={upper},workdir={work}"
        result = host_run([MOUNT, "-t", "overlay", "overlay", "-o", options, str(self.root)],
                          timeout=30, check=False)
        if result.returncode == 0:
            self._overlay = True
            return True
        log(f"overlay mount failed ({result.stderr.strip()}); copying the root instead")
        for path in (upper, work, self.root):
            path.rmdir()
        return False

    def _bind_args(self):
        args = []
        for host, inside in self.binds_ro.items():
            if ":" in str(host) + str(inside):
                raise ValueError(f"':' is not allowed in bind paths: {host} -> {inside}")
            args.append(f"--bind-ro={host}:{inside}")
        return args

    def _nspawn_argv(self):
        argv = [
            NSPAWN, "--register=no", "--keep-unit", "--private-network",
            "--link-journal=no", "--console=read-only", f"--hostname={HOSTNAME}",
            "-D", str(self.root),
        ]
        return argv + self._bind_args() + ["-b"]

    def _boot(self, mode="wb"):
        self.log_path = self.dir / "nspawn.log"
        self._log = open(self.log_path, mode)
        started = time.monotonic()
        self._proc = subprocess.Popen(
            self._nspawn_argv(), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self.pid = wait_until(self._find_init, self.boot_timeout, "the container's systemd")
            remaining = self.boot_timeout - (time.monotonic() - started)
            wait_until(self._system_up, remaining, "systemctl is-system-running")
            remaining = self.boot_timeout - (time.monotonic() - started)
            self.wait_listening(SMTP_PORT, timeout=remaining)
        except BedError as err:
            raise BedError(f"{err}\n--- {self.log_path} ---\n{self._log_tail()}") from None
        self.boot_seconds = time.monotonic() - started
        log(f"{self.suite} container up in {self.boot_seconds:.2f}s: pid {self.pid}, {self.root}")

    def _find_init(self):
        if self._proc.poll() is not None:
            raise BedError(f"systemd-nspawn exited {self._proc.returncode}")
        return next((p for p in child_pids(self._proc.pid) if is_container_init(p)), None)

    def _system_up(self):
        if self._proc.poll() is not None:
            raise BedError(f"systemd-nspawn exited {self._proc.returncode}")
        state = self.run(["systemctl", "is-system-running"], check=False, timeout=10).stdout.strip()
        return state in ("running", "degraded")

    def _log_tail(self, lines=40):
        with contextlib.suppress(OSError):
            text = self.log_path.read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    def _teardown(self):
        if self._proc is not None:
            self._poweroff()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        try:
            if self._overlay:
                host_run([UMOUNT, str(self.root)], timeout=30)
                self._overlay = False
            if self.dir is None:
                pass
            elif os.environ.get("SELFHEAL_BED_KEEP") == "1":
                log(f"keeping {self.dir} (with an overlay, upper/ holds the changes)")
            else:
                remove_tree(self.dir)
        finally:
            self._stack.close()

    def _poweroff(self):
        """SIGTERM makes nspawn shut the container down cleanly; SIGKILL after 10 s."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(POWEROFF_TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                log(f"container did not power off in {POWEROFF_TIMEOUT}s; killing it")
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # kills its whole PID namespace
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()
        self._proc.wait(POWEROFF_TIMEOUT)

    # ---- commands inside ---------------------------------------------------------------

    def run(self, argv, check=True, timeout=60, input=None):
        """Run `argv` inside (all namespaces of the container's PID 1), clean env, text."""
        full = [NSENTER, "-t", str(self.pid), "-a", "--", "env", "-i", *INSIDE_ENV, *argv]
        result = host_run(full, timeout=timeout, check=False, input=input)
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, list(argv), result.stdout, result.stderr)
        return result

    def pipe(self, argv, check=True, timeout=60, input=None):
        """Run `argv` in the root of an unbooted container (boot=False) with
        `systemd-nspawn --pipe`, as root, on the host's network, with a clean env."""
        if self.boot:
            raise BedError("pipe() is for Container(boot=False); use run() in a booted one")
        full = [NSPAWN, "--register=no", "--keep-unit", "--quiet", "--pipe",
                "--link-journal=no", f"--hostname={HOSTNAME}", "-D", str(self.root),
                *self._bind_args(), "env", "-i", *INSIDE_ENV, "HOME=/root", *argv]
        result = host_run(full, timeout=timeout, check=False, input=input)
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, list(argv), result.stdout, result.stderr)
        return result

    def sh(self, script, **kw):
        """`/bin/sh -c script` inside; for tests only."""
        return self.run(["/bin/sh", "-c", script], **kw)

    def journal(self, unit=None, lines=50):
        argv = ["journalctl", "--no-pager", "-o", "short-precise", "-n", str(lines)]
        if unit:
            argv += ["-u", unit]
        result = self.run(argv, check=False, timeout=30)
        return result.stdout + result.stderr

    def wait_listening(self, port, host="127.0.0.1", timeout=10):
        """Wait until something inside listens on host:port (read from /proc/PID/net/tcp)."""
        wait_until(lambda: port in listening_ports(self.pid, host), timeout,
                   f"a listener on {host}:{port}")

    # ---- files -------------------------------------------------------------------------

    def host_path(self, path):
        """Host-side path of container file `path` (symlinks resolved inside the root)."""
        resolved = resolve_in_root(self.root, path)
        inside = "/" + str(resolved.relative_to(self.root))
        if any(inside == v or inside.startswith(v + "/") for v in VOLATILE):
            raise ValueError(f"{path} is on a mount inside the container; use run()/sh()")
        return resolved

    def write(self, path, text, mode=0o644):
        target = self.host_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def read(self, path):
        return self.host_path(path).read_text()

    # ---- mail --------------------------------------------------------------------------

    def mails(self):
        """Messages in /var/mail/root, parsed with email.policy.default."""
        path = self.host_path(ROOT_MBOX)
        if not path.exists():
            return []
        box = mailbox.mbox(path, factory=_parse_mail, create=False)
        try:
            return [message for message in box if message is not None]
        finally:
            box.close()

    def wait_mail(self, pred=lambda m: True, timeout=30, count=1):
        """Wait until `count` messages match `pred`; return them (in mbox order)."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.mails()
            matching = [m for m in seen if pred(m)]
            if len(matching) >= count:
                return matching
            if time.monotonic() > deadline:
                break
            time.sleep(POLL)
        subjects = [str(m["Subject"]) for m in seen]
        postfix_log = self.journal("postfix@-", 30).strip() or self.journal(None, 50)
        raise AssertionError(
            f"{len(matching)}/{count} matching mails after {timeout}s; subjects seen: "
            f"{subjects}\n--- postfix log ---\n{postfix_log}"
        )


# ======================================================================================
# CLI
# ======================================================================================


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("build", "shell") or len(args) > 2:
        print(__doc__, file=sys.stderr)
        return 2
    suite = args[1] if len(args) > 1 else default_suite()
    reason = skip_or_fail_reason(suite)
    if reason:
        print(f"bed: {reason}", file=sys.stderr)
        return 1
    if args[0] == "build":
        print(build_root(suite))
        return 0
    repo = Path(__file__).resolve().parent.parent
    with Container(suite, binds_ro={str(repo): "/src"}) as box:
        log("shell inside the container; /src is the repo (read-only); exit to tear down")
        env = ["env", "-i", *INSIDE_ENV, "TERM=" + os.environ.get("TERM", "xterm")]
        return subprocess.call([NSENTER, "-t", str(box.pid), "-a", "--", *env, "/bin/bash", "-l"])


if __name__ == "__main__":
    sys.exit(main())
