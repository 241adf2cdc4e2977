"""Shared pytest setup: tests/ on sys.path (for `from bed import ...`), the `drill` marker,
and the fixtures the drills share."""

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from bed import skip_or_fail_reason  # noqa: E402  (needs the sys.path line above)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "drill: boots a real systemd in a container (tests/bed.py); needs root"
    )


def _searchable(directory):
    """False only for what execvp would find refused (EACCES): a directory we may not search,
    or one under such a directory; a directory that does not exist is harmless (ENOENT)."""
    try:
        os.stat(directory)
    except PermissionError:
        return False
    except OSError:
        return True
    return os.access(directory, os.X_OK)


@pytest.fixture(scope="session", autouse=True)
def searchable_path():
    """PATH without the directories this user cannot search. Run as another user with root's
    PATH (`su nobody -c ...` keeps /root/.pyenv/shims), execvp meets EACCES there first, and
    every missing command says "Permission denied" instead of "command not found", which the
    tests of a missing command check. The PATH of the run is restored after it."""
    saved = os.environ.get("PATH")
    if saved is not None:
        os.environ["PATH"] = os.pathsep.join(d for d in saved.split(os.pathsep) if _searchable(d))
    yield
    if saved is not None:
        os.environ["PATH"] = saved


@pytest.fixture(scope="session")
def repo_root():
    """The checkout under test (bind it into a Container to test this very code)."""
    return TESTS.parent


@pytest.fixture(scope="session")
def bed_reason():
    """None if the drill bed is usable, else why not.  Under CI=true an unusable bed
    fails the run here, so a drill can simply `pytest.skip(bed_reason)`."""
    reason = skip_or_fail_reason()
    if reason and os.environ.get("CI") == "true":
        pytest.fail("CI=true and the drill bed is unusable: " + reason)
    return reason


# ======================================================================================
# Fast layer (no root, no systemd): selfheal in-process, fake systemctl/ss/journalctl on
# PATH (tests/fakes), temp state dirs, and an SMTP sink (tests/smtp_sink.py).
# ======================================================================================

import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import py_compile  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

REPO = TESTS.parent
SELFHEAL_PY = REPO / "selfheal.py"
FAKES = TESTS / "fakes"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import selfheal  # noqa: E402
from smtp_sink import SmtpSink  # noqa: E402

_spec = importlib.util.spec_from_file_location("fakestate", str(FAKES / "fakestate.py"))
fakestate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fakestate)

# -- services.conf for tests -----------------------------------------------------------

# What every test config has unless it says otherwise: a name and addresses that validate.
TEST_SETTINGS = {"name": "MiracleMax", "email_to": "owner@example.org",
                 "email_from": "selfheal@miraclemax.example.org"}


def conf(settings=None, services=None, base=TEST_SETTINGS) -> str:
    """services.conf text: [selfheal] with `base` updated by `settings` (a value of None leaves
    a key out), then one [section] per entry of `services`, in order, with its keys ({} or
    None: a section with no keys). Values are written as str(value), one `key = value` line
    each. Where the exact text is what a test is about (a problem at FILE:LINE, a key spelt
    oddly, a value over two lines), the test writes the text out instead."""
    lines = ["[selfheal]"] + ["%s = %s" % (k, v) for k, v in dict(base, **(settings or {})).items() if v is not None]
    for name, keys in (services or {}).items():
        lines += ["", "[%s]" % name] + ["%s = %s" % (k, v) for k, v in (keys or {}).items() if v is not None]
    return "\n".join(lines) + "\n"


# The services the heal tests run with (the `bed` fixture).
HEAL_SERVICES = {
    "story-stages": {"port": 5002, "domain": "books.jbyrd.org", "critical": "yes",
                     "strategies": "port_conflict, service_restart"},
    "worker": {"critical": "no"},
}


def monotonic_usec(seconds_ago: float = 0.0) -> str:
    """A systemd ...TimestampMonotonic value for `seconds_ago` (CLOCK_MONOTONIC is host-wide)."""
    return str(int((time.monotonic() - seconds_ago) * 1e6))


class _NoSyslog(logging.Handler):
    """Stands in for selfheal.SyslogHandler: tests do not write to the host's journal."""

    def __init__(self, ident):
        super().__init__()
        self.ident = ident

    def emit(self, record):
        pass


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """os.fsync does nothing in the test process. selfheal syncs every file it replaces or
    appends to, and the directory too, so that a power cut leaves the old or the new state;
    no test here can cut the power, and on ext4 a sync costs about a millisecond: the fast
    layer made about 5,500 of them (7 s). What the file holds, its mode, the atomic rename and
    the append are all still real; the drills run selfheal's real syncs on a real systemd."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture
def quiet_selfheal(monkeypatch):
    """selfheal's logger as a test wants it: no syslog, records reach caplog; restored after."""
    logger = selfheal.log
    level = logger.level
    monkeypatch.setattr(selfheal, "SyslogHandler", _NoSyslog)
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    yield logger
    logger.setLevel(level)


class FakeHost:
    """The pretend host the fakes read: edit units, listeners and journal; read the calls."""

    def __init__(self, root):
        self.root = root
        self.state_file = root / "fake-systemd.json"
        self.calls_file = root / "fake-calls.jsonl"
        self.paths = selfheal.Paths(root / "state", root / "run", root / "log")
        self.save({"units": {}, "listeners": [], "journal": []})

    # -- state ------------------------------------------------------------------------
    def load(self) -> dict:
        return json.loads(self.state_file.read_text(encoding="utf-8"))

    def save(self, state: dict) -> None:
        fakestate.save(str(self.state_file), state)

    @contextlib.contextmanager
    def edit(self):
        state = self.load()
        yield state
        self.save(state)

    def unit(self, name, on_restart="active", listen=None, then=None, fail_status=None, **props):
        """Create or replace a unit; props are `systemctl show` properties."""
        with self.edit() as state:
            unit = {"props": {k: str(v) for k, v in props.items()}, "on_restart": on_restart}
            if listen:
                unit["listen"] = listen
            if then:
                unit["then"] = then
            if fail_status is not None:
                unit["fail_status"] = str(fail_status)
            state["units"][name] = unit

    def failed(self, name, result="signal", code="2", status="9", seconds_ago=2.0, **kw):
        """A unit systemd just marked failed (default: its main process got SIGKILL)."""
        props = {"ActiveState": "failed", "SubState": "failed", "Result": result,
                 "ExecMainCode": code, "ExecMainStatus": status, "ExecMainPID": "4100",
                 "InvocationID": hashlib.md5(name.encode()).hexdigest(), "NRestarts": "0",
                 "ExecMainExitTimestampMonotonic": monotonic_usec(seconds_ago)}
        props.update({k: v for k, v in kw.items() if k[:1].isupper()})
        options = {k: v for k, v in kw.items() if not k[:1].isupper()}
        self.unit(name, **options, **props)

    def listen(self, port, pid=None, comm="python3", address="0.0.0.0", cgroup=None, cmdline=None, started=None):
        """A listener; with a cgroup, its pid is a pretend process there (fake_read_process),
        started at `started` (seconds after boot, as time.monotonic() counts) if given."""
        with self.edit() as state:
            entry = {"port": port, "address": address, "comm": comm}
            if pid:
                entry["pid"] = pid
            if cgroup:
                entry["cgroup"] = cgroup
            if cmdline:
                entry["cmdline"] = cmdline
            if started is not None:
                entry["started"] = started
            state["listeners"].append(entry)

    def journal(self, lines, invocation=None):
        with self.edit() as state:
            if invocation:
                state.setdefault("journal_by_invocation", {})[invocation] = list(lines)
            else:
                state["journal"] = list(lines)

    # -- calls ------------------------------------------------------------------------
    def calls(self, prog=None) -> list:
        try:
            lines = self.calls_file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        calls = [json.loads(line) for line in lines if line.strip()]
        return [c for c in calls if prog is None or c[0] == prog]

    def actions(self) -> list:
        """What changed the host, in order: every call but reads ("show", ss, journalctl)."""
        return [c for c in self.calls() if c[0] not in ("ss", "journalctl") and c[1:2] != ["show"]]

    def log_call(self, argv) -> None:
        """Put a test double's action (e.g. a pretend kill) into the same ordered call log."""
        with open(str(self.calls_file), "a", encoding="utf-8") as handle:
            handle.write(json.dumps(list(argv)) + "\n")

    def clear_calls(self) -> None:
        if self.calls_file.exists():
            self.calls_file.unlink()

    # -- /proc/PID for the listeners' pids ------------------------------------------
    def fake_read_process(self, real):
        """read_process for the fake host: a listener's pid is a pretend process in the
        listener's "cgroup" (none given: gone, as if it had ended), never whatever real
        process has that pid here; any other pid is read from the real /proc."""
        def read_process(pid, proc=None):
            for lst in self.load().get("listeners", []):
                if isinstance(lst, dict) and int(lst.get("pid") or 0) == pid:
                    if not lst.get("cgroup"):
                        return None
                    return selfheal.Process(pid, lst.get("user", "root"),
                                            lst.get("cmdline", lst.get("comm", "python3")), lst["cgroup"], 60.0,
                                            lst.get("started"))
            return real(pid) if proc is None else real(pid, proc)
        return read_process

    # -- /proc/net/tcp{,6} with the same listeners ss shows ----------------------------
    def write_proc_net(self):
        """Write fake-proc/net/tcp and tcp6 from the state's listeners; return fake-proc."""
        proc = self.root / "fake-proc"
        (proc / "net").mkdir(parents=True, exist_ok=True)
        header = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
                  "   uid  timeout inode\n")
        tables = {"tcp": [header], "tcp6": [header]}
        for i, lst in enumerate(self.load().get("listeners", [])):
            if isinstance(lst, str):
                address, _, port = lst.split()[3].rpartition(":")
            else:
                address, port = lst.get("address", "0.0.0.0"), lst["port"]
            v6 = address.startswith("[") or address == "*"
            zero = "0" * 32 if v6 else "0" * 8
            tables["tcp6" if v6 else "tcp"].append(
                "%4d: %s:%04X %s:0000 0A 00000000:00000000 00:00000000 00000000     0        0 %d 1 "
                "0000000000000000 100 0 0 10 0\n" % (i, zero, int(port), zero, 20000 + i))
        for name, lines in tables.items():
            (proc / "net" / name).write_text("".join(lines))
        return proc


def _load_fake(name):
    """A fake command (tests/fakes/NAME, no .py) loaded as a module, once."""
    module = _FAKE_MODULES.get(name)
    if module is None:
        loader = importlib.machinery.SourceFileLoader("fake_" + name, str(FAKES / name))
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
        loader.exec_module(module)
        _FAKE_MODULES[name] = module
    return module


_FAKE_MODULES: dict = {}
sys.modules.setdefault("fakestate", fakestate)  # what the fakes import


def _run_fakes_in_process(argv, *args, env=None, **kwargs):
    """subprocess.run for selfheal: a command that PATH resolves to tests/fakes runs in-process
    (same argv, output, exit status and call log as executing it, without ~50 ms of Python
    start-up per call); anything else really runs."""
    path = shutil.which(argv[0], path=(env if env is not None else os.environ).get("PATH"))
    if not path or os.path.dirname(os.path.realpath(path)) != str(FAKES):
        return subprocess.run(argv, *args, env=env, **kwargs)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = _load_fake(os.path.basename(path)).main(list(argv))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except fakestate.Hang:
            time.sleep(kwargs.get("timeout") or 0)
            raise subprocess.TimeoutExpired(list(argv), kwargs.get("timeout"))
    return subprocess.CompletedProcess(list(argv), rc, out.getvalue(), err.getvalue())


def _subprocess_with_fakes_in_process():
    proxy = types.ModuleType("subprocess")
    proxy.__getattr__ = lambda name: getattr(subprocess, name)  # PEP 562: the rest is subprocess
    proxy.run = _run_fakes_in_process
    return proxy


@pytest.fixture(scope="session")
def python_dir(tmp_path_factory):
    """A directory whose python3 is this interpreter: the fakes' `env python3` starts fast
    (no pyenv-style shim) and install.sh uses the Python under test."""
    path = tmp_path_factory.mktemp("python-bin")
    (path / "python3").symlink_to(sys.executable)
    return path


@pytest.fixture
def fake_host(tmp_path, monkeypatch, quiet_selfheal, python_dir):
    """tests/fakes first on PATH, a fresh fake host state, selfheal's dirs under tmp_path."""
    host = FakeHost(tmp_path)
    monkeypatch.setenv("PATH", os.pathsep.join([str(FAKES), str(python_dir), os.environ.get("PATH", "")]))
    monkeypatch.setenv("FAKE_SYSTEMD_STATE", str(host.state_file))
    monkeypatch.setenv("FAKE_SYSTEMD_CALLS", str(host.calls_file))
    # A config_check or health_command gets PATH alone; the fake checkers record their calls.
    monkeypatch.setattr(selfheal, "COMMAND_ENV_KEEP", ("FAKE_SYSTEMD_STATE", "FAKE_SYSTEMD_CALLS"))
    monkeypatch.setenv("SELFHEAL_STATE_DIR", str(host.paths.state))
    monkeypatch.setenv("SELFHEAL_RUN_DIR", str(host.paths.run))
    monkeypatch.setenv("SELFHEAL_LOG_DIR", str(host.paths.logs))
    for name in list(os.environ):
        if name.startswith("MONITOR_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(selfheal, "KILL_GRACE", 0.5)
    # A run with neither port nor health check must stay up SETTLE_SECONDS, probed every
    # POLL_INTERVAL; shorter ones here keep the heal tests fast (tests/test_heal.py checks the
    # settling itself, with its own SETTLE_SECONDS).
    monkeypatch.setattr(selfheal, "SETTLE_SECONDS", 0.01)
    monkeypatch.setattr(selfheal, "POLL_INTERVAL", 0.01)
    monkeypatch.setattr(selfheal, "RECHECK_DELAY", 0.05)  # the watch looks again at a hang this soon
    # Fast by default: the fakes run in-process. Ask for `real_commands` to exec them.
    monkeypatch.setattr(selfheal, "subprocess", _subprocess_with_fakes_in_process())
    if hasattr(selfheal, "listening_ports"):  # reads /proc/net/tcp: give it the fake host's
        real_listening_ports = selfheal.listening_ports
        monkeypatch.setattr(selfheal, "listening_ports",
                            lambda proc=None: real_listening_ports(host.write_proc_net()))
    if hasattr(selfheal, "listen_inodes"):  # the same, for the sockets on one port
        real_listen_inodes = selfheal.listen_inodes
        monkeypatch.setattr(selfheal, "listen_inodes",
                            lambda port, proc=None: real_listen_inodes(port, host.write_proc_net()))
    monkeypatch.setattr(selfheal, "read_process", host.fake_read_process(selfheal.read_process))
    # The default metrics_file is the host's own node_exporter directory: where the host has
    # one (a Debian root with prometheus-node-exporter), a heal here would write the host's
    # metrics and ask the host's busctl. The fake host has none, as most hosts; a test of the
    # metrics gives its own metrics_file (tests/test_fleetview.py).
    real_write_metrics = selfheal.write_metrics
    monkeypatch.setattr(selfheal, "write_metrics", lambda config, paths, watch_ran=None: None
                        if config.settings.metrics_file == selfheal.METRICS_FILE
                        else real_write_metrics(config, paths, watch_ran))
    return host


@pytest.fixture
def as_root(monkeypatch):
    """selfheal believes it runs as root (its root guard lets `heal`, `watch`, `pause` and
    `resume` through), whoever runs the tests: selfheal.is_root is the one place it asks.

    Run by a user, two things only root can do are left out: the tests' files cannot be
    root's, so the trusted-file check (the config must be root's alone; test_config.py and
    test_hostile.py check it) is off, and so is giving root-only files to root (restrict:
    fchown); the commands root may run must be the running user's alone instead of root's
    (ROOT_OWNER). As root, only is_root is patched (to what it says anyway)."""
    monkeypatch.setattr(selfheal, "is_root", lambda: True)
    if os.geteuid() != 0:
        monkeypatch.setattr(selfheal, "check_trusted_file", lambda path, what: None)
        monkeypatch.setattr(selfheal, "restrict", lambda fd, mode: None)
        monkeypatch.setattr(selfheal, "ROOT_OWNER", os.geteuid())


@pytest.fixture
def not_root(monkeypatch):
    """selfheal believes it does not run as root, even when the tests do."""
    monkeypatch.setattr(selfheal, "is_root", lambda: False)


@pytest.fixture
def real_commands(fake_host, monkeypatch):
    """selfheal really executes tests/fakes/* (found on PATH) instead of running them in-process."""
    monkeypatch.setattr(selfheal, "subprocess", subprocess)
    return fake_host


@pytest.fixture
def smtp_sink():
    """A running SMTP sink on 127.0.0.1; .messages, .wait(n), .mode = "close"/"554"/"auth-fail"."""
    sink = SmtpSink()
    yield sink
    sink.close()


@pytest.fixture
def closed_port():
    """A 127.0.0.1 port nothing listens on (a mail server that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def write_conf(tmp_path):
    """write_conf(text, name="services.conf") -> str path of a 0644 file under tmp_path."""
    def write(text, name="services.conf"):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)
        return str(path)
    return write


DEPLOY = REPO / "deploy" / "ansible"


def ansible(tool, *args, tmp_path, env_more=None):
    """Run an Ansible command (ansible-playbook, ...) in deploy/ansible -> CompletedProcess.
    Skips the test where it is not installed; under CI=true that fails it instead."""
    path = shutil.which(tool)
    if not path:
        reason = "%s is missing (tests/run.sh installs ansible-core as root)" % tool
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and " + reason)
        pytest.skip(reason)
    # Its temp dirs under tmp_path: the "remote" one (-c local) is ~/.ansible/tmp by default,
    # and a user like nobody has no home to write.
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
               ANSIBLE_REMOTE_TEMP=str(tmp_path / "ansible-remote-tmp"), ANSIBLE_CONFIG=str(tmp_path / "no-ansible.cfg"))
    env.update(env_more or {})
    env.pop("PYTHONPATH", None)
    return subprocess.run([path] + [str(a) for a in args], env=env, cwd=str(DEPLOY), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)


# What `python3 selfheal.py` does, from bytecode compiled once: the code runs as __main__
# with __file__, argv[0] and sys.path[0] as the script would have them.
RUN_COMPILED = ("import sys, __main__; src, pyc = sys.argv[1:3]; del sys.argv[1:3]; "
                "sys.argv[0] = __main__.__file__ = src; sys.path[0] = src.rpartition('/')[0]; "
                "exec(__import__('marshal').loads(open(pyc, 'rb').read()[16:]), __main__.__dict__)")


class SelfhealCli:
    """Runs `python3 selfheal.py ARGS` (or another script) -> CompletedProcess with text output.

    selfheal.py is compiled once for the session (a script is compiled afresh at every run,
    414 KB of it, and the checkout's __pycache__ may not be writable), and each run executes
    that bytecode as __main__, as the script would run (RUN_COMPILED). Another script
    (miraclemax-status, an installed copy) runs as itself.
    -S: selfheal is stdlib-only, so it needs no site-packages (and each run starts faster).
    """

    def __init__(self, pyc):
        self.pyc = str(pyc)
        py_compile.compile(str(SELFHEAL_PY), cfile=self.pyc, doraise=True)

    def argv(self, args, script=None):
        how = [str(script)] if script else ["-c", RUN_COMPILED, str(SELFHEAL_PY), self.pyc]
        return [sys.executable, "-S"] + how + [str(a) for a in args]

    def env(self, env=None):
        full = dict(os.environ if env is None else env)
        full.pop("PYTHONPATH", None)
        return full

    def __call__(self, *args, env=None, cwd=None, script=None, timeout=60):
        return subprocess.run(self.argv(args, script), env=self.env(env), cwd=str(cwd) if cwd else None,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=timeout)

    def many(self, arg_lists, env=None, workers=None):
        """Run several command lines at once (they are independent) -> results in order."""
        workers = workers or min(8, 2 * (os.cpu_count() or 2))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda args: self(*args, env=env), arg_lists))


def run_main(*args, env=None):
    """`selfheal.py ARGS` in this process -> CompletedProcess: selfheal.main(ARGS) with argv,
    environment (env: all of it, as for a new process), stdout and stderr its own for the
    call, and selfheal's logger put back after. For tables of command lines that read a file
    and answer (validate); what only a process shows (exit through sys.exit, a crash's
    traceback on stderr, the bytecode that runs) stays with `cli`."""
    args = [str(a) for a in args]
    logger = selfheal.log
    saved = (sys.argv, dict(os.environ), logger.handlers[:], logger.level, logger.propagate)
    out, err = io.StringIO(), io.StringIO()
    try:
        sys.argv = [str(SELFHEAL_PY)] + args
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = selfheal.main(args)
            except SystemExit as exc:  # argparse: usage errors, --help, --version
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved[0]
        if env is not None:
            os.environ.clear()
            os.environ.update(saved[1])
        logger.handlers[:], logger.level, logger.propagate = saved[2], saved[3], saved[4]
    return subprocess.CompletedProcess([str(SELFHEAL_PY)] + args, rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    """cli(*args, env=None, cwd=None, script=None) runs selfheal.py as a command; cli.many([...])."""
    return SelfhealCli(tmp_path_factory.mktemp("bytecode") / "selfheal.pyc")


class HealBed:
    """fake_host + smtp_sink + a config pointing at the sink: heal services in-process."""

    def __init__(self, host, sink, write_conf, monkeypatch):
        self.host, self.sink, self._write, self._monkeypatch = host, sink, write_conf, monkeypatch
        self.paths = host.paths
        self.configure()

    def configure(self, smtp_port=None, failure_threshold=3, verify_timeout="3s", services=HEAL_SERVICES,
                  **settings):
        """(Re)write the config: mail to the sink (or smtp_port), the services (HEAL_SERVICES),
        and any more [selfheal] keys given (webhook_url="...", heal_timeout="9s")."""
        text = conf(dict({"smtp_host": "127.0.0.1", "smtp_port": smtp_port or self.sink.port, "smtp_timeout": "5s",
                          "failure_threshold": failure_threshold, "failure_window": "1h",
                          "verify_timeout": verify_timeout}, **settings), services)
        self.config_path = self._write(text)
        self._monkeypatch.setenv("SELFHEAL_CONFIG", self.config_path)
        self.config = selfheal.load_config(self.config_path, trusted=False)
        return self.config

    def heal(self, name, trigger="onfailure", env=None, dry_run=False):
        """selfheal's `heal` command in-process -> (exit status, what it printed)."""
        out = io.StringIO()
        rc = selfheal.cmd_heal(self.config, name, self.paths, trigger, env=env or {},
                                   dry_run=dry_run, out=out)
        return rc, out.getvalue()

    def history(self, name=None):
        return selfheal.read_history(self.paths, name)

    def spooled(self, channel="mail"):
        """Reports in the outbox that `channel` has still to send, oldest first."""
        return queued_for(self.paths, channel)

    def queued_subjects(self, channel="mail"):
        return [json.loads(p.read_text())["subject"] for p in self.spooled(channel)]


def queued_for(paths, channel="mail"):
    """Reports in the outbox that `channel` has still to send, oldest first."""
    return [p for p in selfheal.outbox(paths) if json.loads(p.read_text())["channels"].get(channel) == "queued"]


def queue_report(paths, settings, subject, body="queued report\n", service="worker", status="RESOLVED"):
    """A report put in the outbox the way a heal does, with the channels settings give it."""
    path = selfheal.queue_report(paths, selfheal.new_report(settings, "", service, status, body,
                                                            subject_text=subject))
    time.sleep(0.002)  # records are named by the time in ms: keep them apart and in order
    return path


@pytest.fixture
def bed(fake_host, smtp_sink, write_conf, monkeypatch):
    return HealBed(fake_host, smtp_sink, write_conf, monkeypatch)


def report_sections(text: str) -> list:
    """Section titles of a report: a line followed by a line of as many dashes."""
    lines = text.splitlines()
    return [lines[i].strip() for i in range(len(lines) - 1)
            if lines[i].strip() and lines[i + 1].strip() == "-" * len(lines[i].strip())]


@pytest.fixture
def sections():
    return report_sections


def report_section(text: str, title: str) -> str:
    """The body of one report section (indented lines under its dashes), "" when absent."""
    lines = text.splitlines()
    for i in range(len(lines) - 1):
        if lines[i].strip() == title and lines[i + 1].strip() == "-" * len(title):
            body = []
            for line in lines[i + 2:]:
                if line and not line.startswith(" "):
                    break
                body.append(line.strip())
            return "\n".join(body).strip()
    return ""


@pytest.fixture
def section():
    return report_section


# ======================================================================================
# The watch's bed (tests/test_watch.py, and the tests of what the watch finds:
# test_health_command, test_host_checks, test_report_truth): the fake host and an SMTP sink
# with the watch's settings, a clock the test moves forward, and fake health answers.
# ======================================================================================

STORY = "story-stages.service"
WORKER = "worker.service"
HEALTH = "http://127.0.0.1:5002/health"
RUN = "a" * 32  # an InvocationID: the run of the unit the watch looks at
OTHER_RUN = "b" * 32
HANG = (False, "no answer within 5 s")
FINE = (True, "HTTP 200")

# The watch bed's [selfheal] keys beyond conftest.TEST_SETTINGS (smtp_port: the sink's).
WATCH_SETTINGS = {"smtp_host": "127.0.0.1", "smtp_timeout": "5s", "failure_window": "1h", "verify_timeout": "3s",
                  "watch_interval": "30s", "watch_confirm": 2, "flap_threshold": 3, "flap_window": "15m",
                  "reminder_interval": "1h", "incident_quiet": "10m"}


class Clock:
    """selfheal's time.time(), moved forward by the test; time.monotonic and sleep stay real."""

    def __init__(self):
        self.offset = 0.0

    def time(self):
        return time.time() + self.offset

    def advance(self, seconds):
        self.offset += seconds


@pytest.fixture
def clock(monkeypatch):
    clock = Clock()
    proxy = types.ModuleType("time")
    proxy.__getattr__ = lambda name: getattr(time, name)  # PEP 562: the rest is the real time
    proxy.time = clock.time
    monkeypatch.setattr(selfheal, "time", proxy)
    return clock


class Health:
    """Stands in for selfheal.http_check: an answer per URL (a callable is asked each time)."""

    def __init__(self):
        self.answers = {}

    def __call__(self, url, timeout, expect_status=(), expect_text=""):
        answer = self.answers.get(url, FINE)
        return answer() if callable(answer) else answer


class WatchBed:
    """The fake host and an SMTP sink with the watch's settings, a clock and fake health answers."""

    def __init__(self, host, sink, write_conf, monkeypatch, clock, health):
        self.host, self.sink, self.paths = host, sink, host.paths
        self.clock, self.health = clock, health
        self._write, self._monkeypatch = write_conf, monkeypatch
        self.host.unit("selfheal@.service")  # the template the watch starts selfheal@NAME.service from
        self.configure()

    def configure(self, settings=None, story=None, worker=None, extra=None, failure_threshold=10, health_url=HEALTH):
        """The config: WATCH_SETTINGS and `settings`; [story-stages] (port 5002, health_url) and
        [worker] with more keys from `story` and `worker`; then the sections in `extra`."""
        services = {"story-stages": dict({"port": 5002, "health_url": health_url, "strategies": "service_restart"},
                                         **(story or {})),
                    "worker": dict(worker or {})}
        path = self._write(conf(dict(WATCH_SETTINGS, smtp_port=self.sink.port, failure_threshold=failure_threshold,
                                     **(settings or {})), dict(services, **(extra or {}))))
        self._monkeypatch.setenv("SELFHEAL_CONFIG", path)
        self.config = selfheal.load_config(path, trusted=False)
        return self.config

    def look(self, name, health=None):
        """One look of the watch at one service, at the unit as the fake host shows it now."""
        svc = self.config.services[name]
        return selfheal.watch_service(self.config, self.paths, svc, selfheal.show_unit(svc.unit),
                                      selfheal.listening_ports(), health, self.clock.time())

    def heal(self, name, trigger="onfailure"):
        """What selfheal@NAME.service runs (heal --trigger onfailure NAME) -> (rc, printed)."""
        out = io.StringIO()
        rc = selfheal.cmd_heal(self.config, name, self.paths, trigger, env={}, out=out)
        return rc, out.getvalue()

    def triggers(self):
        """The heals the watch handed to systemd: `systemctl start ...` calls."""
        return [c[1:] for c in self.host.calls("systemctl") if c[1:2] == ["start"]]

    def touched(self, unit):
        """Calls that changed the unit itself (restart, start, stop, ...)."""
        return [c for c in self.host.actions() if unit in c]

    def finding(self, name):
        path = self.paths.finding(name)
        return json.loads(path.read_text()) if path.exists() else None

    def watch_state(self, name):
        return selfheal.load_watch_state(self.paths, name)

    def state(self, name):
        return selfheal.load_service_state(self.paths, name)

    def outcomes(self, name):
        return [e["outcome"] for e in selfheal.read_history(self.paths, name)]

    def subjects(self):
        return [m["Subject"] for m in self.sink.messages]

    def resume(self, name):
        assert selfheal.cmd_pause(self.config, self.paths, "resume", name, None) == selfheal.EX_OK


@pytest.fixture
def health(monkeypatch):
    fake = Health()
    monkeypatch.setattr(selfheal, "http_check", fake)
    return fake


@pytest.fixture(scope="module")
def module_sink():
    sink = SmtpSink()
    yield sink
    sink.close()


@pytest.fixture
def sink(module_sink):
    """One SMTP sink for this module (stopping one per test costs more than these tests), emptied."""
    with module_sink.lock:
        module_sink.received.clear()
    module_sink.mode = "ok"
    return module_sink


@pytest.fixture
def wb(fake_host, sink, write_conf, monkeypatch, clock, health):
    return WatchBed(fake_host, sink, write_conf, monkeypatch, clock, health)


def running(host, unit, invocation=RUN, **props):
    host.unit(unit, ActiveState="active", SubState="running", Result="success", InvocationID=invocation, **props)


def stopped(host, unit, invocation=RUN, **props):
    host.unit(unit, ActiveState="inactive", SubState="dead", Result="success", InvocationID=invocation, **props)
