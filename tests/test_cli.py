"""The command line: every bad command line and its exit code, miraclemax-status, and the
small commands (status, pause, resume)."""

import io
import json
import os
import time
from pathlib import Path

import pytest

import selfheal
from conftest import conf

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

REPO = Path(__file__).resolve().parent.parent
STATUS_SCRIPT = REPO / "miraclemax-status"
CONF = conf(services={"worker": {}, "story-stages": {"port": 5002, "critical": "yes"}})

# args, exit status, (stream, words) it must say; None = the default config below is used
COMMAND_LINES = [
    ("no-arguments", [], 2, ("out", "usage")),
    ("unknown-verb", ["frobnicate"], 2, ("err", "frobnicate")),
    ("heal-without-name", ["heal"], 2, ("err", "name")),
    ("version", ["--version"], 0, ("out", "selfheal " + selfheal.VERSION)),
    ("pause-bad-duration", ["pause", "worker", "5parsecs"], 2, ("err", "5parsecs")),
    ("pause-without-name", ["pause"], 2, ("err", "name")),
    ("pause-unknown-service", ["pause", "nope"], 2, ("err", "nope")),
    ("resume-unknown-service", ["resume", "nope"], 2, ("err", "nope")),
    ("heal-unknown-service", ["heal", "--dry-run", "nope"], 2, ("err", "not listed")),
    ("status-unknown-option", ["status", "--bogus"], 2, ("err", "--bogus")),
    ("validate-missing-file", ["validate", "/nonexistent/services.conf"], 78, ("err", "no such file")),
    ("install-relative-prefix", ["install", "--prefix", "relative", "--destdir", "{tmp}/root"], 2, ("err", "PREFIX")),
    ("help", ["--help"], 0, ("out", "heal")),
]
if os.geteuid() != 0:  # as root this would really heal (with the host's systemctl)
    COMMAND_LINES.append(("heal-needs-root", ["heal", "worker"], 2, ("err", "root")))


@pytest.fixture(scope="module")
def command_lines(cli, tmp_path_factory):
    """Every entry of COMMAND_LINES run as `python3 selfheal.py ...`, all at once."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "services.conf").write_text(CONF)
    env = dict(os.environ, SELFHEAL_CONFIG=str(tmp / "services.conf"), SELFHEAL_STATE_DIR=str(tmp / "state"),
               SELFHEAL_RUN_DIR=str(tmp / "run"), SELFHEAL_LOG_DIR=str(tmp / "log"))
    arg_lists = [[a.format(tmp=tmp) for a in entry[1]] for entry in COMMAND_LINES]
    results = cli.many(arg_lists, env=env)
    return {entry[0]: (result, tmp) for entry, result in zip(COMMAND_LINES, results)}


@pytest.mark.parametrize("case_id, args, code, said", COMMAND_LINES, ids=[c[0] for c in COMMAND_LINES])
def test_command_line_exits_with_its_status_and_says_why(command_lines, case_id, args, code, said):
    done, tmp = command_lines[case_id]
    assert done.returncode == code, (done.stdout, done.stderr)
    stream, words = said
    assert words in (done.stdout if stream == "out" else done.stderr)
    assert "Traceback" not in done.stderr
    assert not (tmp / "state" / "services").exists()  # no bad command line changed any state
    if case_id == "install-relative-prefix":
        assert not (tmp / "root").exists()


@pytest.mark.parametrize("version, says", [
    (247, "MONITOR_* on failure: no: failure facts come from systemctl show"),
    (252, "MONITOR_* on failure: yes (systemd >= 251)"),
])
def test_version_names_the_hosts_systemd_and_whether_it_passes_monitor_env(cli, fake_host, version, says):
    with fake_host.edit() as state:  # the fake systemctl on PATH answers --version
        state["systemd_version"] = version
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "selfheal " + selfheal.VERSION
    assert lines[1].startswith("Python 3.")
    assert lines[2] == "systemd %d (%d.0-fake)" % (version, version)
    assert lines[3].startswith(says)


@pytest.mark.parametrize("case", ["systemctl-missing", "systemctl-fails"])
def test_version_without_a_usable_systemctl_says_unknown_and_exits_0(cli, fake_host, tmp_path, case):
    env = dict(os.environ)
    if case == "systemctl-missing":
        (tmp_path / "empty-bin").mkdir()
        env["PATH"] = str(tmp_path / "empty-bin")
        why = "systemctl: command not found"
    else:
        with fake_host.edit() as state:
            state["systemd_version"] = None
        why = "--version fails on this pretend host"
    done = cli("--version", env=env)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "selfheal " + selfheal.VERSION
    assert lines[2].startswith("systemd: unknown (") and why in lines[2]
    assert lines[3].startswith("MONITOR_* on failure: unknown")


def test_miraclemax_status_help_exits_0(cli):
    done = cli("--help", script=STATUS_SCRIPT)
    assert done.returncode == 0
    assert "usage" in done.stdout.lower() and "--json" in done.stdout


def test_miraclemax_status_without_an_installed_config_says_how_to_install_and_exits_2(cli, tmp_path):
    missing = tmp_path / "nowhere" / "services.conf"
    done = cli(script=STATUS_SCRIPT, env=dict(os.environ, SELFHEAL_CONFIG=str(missing)))
    assert done.returncode == 2
    assert str(missing) in done.stdout and "install" in done.stdout


def test_miraclemax_status_shows_each_service_and_fails_while_one_is_down(cli, fake_host, write_conf, monkeypatch):
    # the fakes really run here: miraclemax-status -> selfheal -> tests/fakes/systemctl
    monkeypatch.setenv("SELFHEAL_CONFIG", write_conf(CONF))
    fake_host.unit("worker.service", ActiveState="active", SubState="running")
    fake_host.unit("story-stages.service", ActiveState="failed", SubState="failed")
    down = cli(script=STATUS_SCRIPT)
    assert down.returncode == 1, down.stderr
    rows = {}  # the dashboard's service rows (tests/test_status.py tests the dashboard itself)
    for line in down.stdout.split("SERVICE HEALTH")[1].split("SUMMARY")[0].splitlines():
        words = line.split()
        for name in ("worker", "story-stages"):
            if name in words and not line.lstrip().startswith(("↳", "->")):
                rows[name] = (words[words.index(name) + 1], "critical" in words)
    assert rows == {"worker": ("ACTIVE", False), "story-stages": ("FAILED", True)}
    assert "MiracleMax" in down.stdout.splitlines()[1]

    fake_host.unit("story-stages.service", ActiveState="active", SubState="running")
    up = cli("--json", script=STATUS_SCRIPT)
    assert up.returncode == 0, up.stderr
    data = json.loads(up.stdout)
    assert data["name"] == "MiracleMax"
    assert {r["name"]: (r["state"], r["port"], r["critical"]) for r in data["services"]} == {
        "worker": ("active", None, False), "story-stages": ("active", 5002, True)}
    # one batched ask per run (busctl), and one systemctl show for the failed unit's details
    assert [c[0] for c in fake_host.calls()] == ["busctl", "systemctl", "busctl"]


def test_status_shows_a_paused_service_as_paused_and_its_last_heal(fake_host, write_conf, monkeypatch, as_root):
    path = write_conf(CONF)
    monkeypatch.setenv("SELFHEAL_CONFIG", path)
    fake_host.unit("worker.service", ActiveState="failed", SubState="failed")
    fake_host.unit("story-stages.service", ActiveState="active", SubState="running")
    selfheal.append_line(fake_host.paths.history, json.dumps(
        {"ts": 1.0, "time": "2024-11-28 05:00:00 UTC", "service": "story-stages", "outcome": "RESOLVED"}))
    assert selfheal.main(["pause", "worker", "30m"]) == 0
    out = io.StringIO()
    assert selfheal.show_dashboard(selfheal.load_config(path), fake_host.paths, True, out=out) == 0  # paused: not down
    rows = {r["name"]: r for r in json.loads(out.getvalue())["services"]}
    assert rows["worker"]["state"] == "paused"
    assert (rows["story-stages"]["last_outcome"], rows["story-stages"]["last_heal"]) == (
        "RESOLVED", "2024-11-28 05:00:00 UTC")


def test_pause_for_a_duration_sets_its_end_and_resume_clears_it(fake_host, write_conf, monkeypatch, as_root):
    monkeypatch.setenv("SELFHEAL_CONFIG", write_conf(CONF))
    before = time.time()
    assert selfheal.main(["pause", "worker", "30m"]) == 0
    until = selfheal.paused_until(fake_host.paths, "worker")
    assert before + 1800 <= until <= time.time() + 1800
    assert selfheal.main(["resume", "worker"]) == 0
    assert selfheal.paused_until(fake_host.paths, "worker") is None


@pytest.mark.parametrize("argv", [["-c", "{conf}", "status"], ["status", "-c", "{conf}"],
                                  ["status", "--config", "{conf}"]])
def test_config_option_works_before_and_after_the_command(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SELFHEAL_CONFIG", str(tmp_path / "not-this-one.conf"))
    conf = tmp_path / "elsewhere" / "services.conf"
    assert selfheal.main([a.format(conf=conf) for a in argv]) == 2
    assert str(conf) in capsys.readouterr().out
