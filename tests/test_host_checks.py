"""What validate and install check on this host beyond the file, through the fakes: a port
listed on a unit that never holds one (Debian's postgresql.service, a oneshot wrapper with
ExecStart=/bin/true) or that another unit's process holds; a config_check or health_command
whose program is not here. Every problem at once, FILE:LINE [section] key, exit 78, nothing
changed."""

import sys
import shutil

import pytest

import selfheal
from conftest import STORY, conf, running

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

GLOBAL = "[selfheal]\nemail_to = root@localhost\n\n"
WRAPPER = dict(Type="oneshot", RemainAfterExit="yes", ActiveState="active", SubState="exited",
               ExecStart="{ path=/bin/true ; argv[]=/bin/true ; ignore_errors=no ; start_time=[n/a] ; "
                         "stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }",
               ConsistsOf="postgresql@15-main.service")
CLUSTER = "postgresql@15-main.service"
CLUSTER_CGROUP = "/system.slice/system-postgresql.slice/postgresql@15-main.service"
AS_FIRST_WRITTEN = "[postgresql]\nport = 5432\n"


@pytest.fixture
def debian_postgres(fake_host):
    fake_host.unit("postgresql.service", **WRAPPER)
    fake_host.unit(CLUSTER, Type="forking", ActiveState="active", SubState="running", MainPID="700")
    fake_host.listen(5432, pid=700, comm="postgres", address="127.0.0.1", cgroup=CLUSTER_CGROUP,
                     cmdline="/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main")
    return fake_host


def validate(write_conf, capsys, text):
    path = write_conf(GLOBAL + text)
    rc = selfheal.main(["validate", path])
    out, err = capsys.readouterr()
    return rc, out.replace(path, "services.conf"), err.replace(path, "services.conf")


def test_postgresql_as_a_debian_user_writes_it_is_a_config_error_naming_the_cluster(debian_postgres, write_conf,
                                                                                      capsys):
    rc, _, err = validate(write_conf, capsys, AS_FIRST_WRITTEN)
    assert rc == selfheal.EX_CONFIG
    assert err.splitlines() == [
        "services.conf:5 [postgresql] port: postgresql.service is a oneshot wrapper (Type=oneshot, "
        "RemainAfterExit=yes, ExecStart=/bin/true): no process of it ever listens on 5432 "
        "(postgresql@15-main.service listens there), so selfheal would find it unhealthy for ever and restart "
        "it, and everything it starts, in vain. Name the unit that serves the port: [postgresql] with "
        "unit = postgresql@15-main.service",
        "1 problem(s); nothing was changed."]


def test_wrapper_whose_cluster_is_down_still_names_the_unit_it_starts(debian_postgres, write_conf, capsys):
    with debian_postgres.edit() as state:
        state["listeners"] = []
    rc, _, err = validate(write_conf, capsys, AS_FIRST_WRITTEN)
    assert rc == selfheal.EX_CONFIG
    assert "(postgresql@15-main.service is what it starts)" in err
    assert "[postgresql] with unit = postgresql@15-main.service" in err


def test_postgresql_written_with_the_clusters_unit_validates(debian_postgres, write_conf, capsys):
    rc, out, err = validate(write_conf, capsys, "[postgresql]\nunit = %s\nport = 5432\n" % CLUSTER)
    assert (rc, err) == (selfheal.EX_OK, "")
    assert "ok, 1 service(s): postgresql" in out


def test_wrapper_without_a_port_is_not_judged(debian_postgres, write_conf, capsys):
    assert validate(write_conf, capsys, "[postgresql]\n")[0] == selfheal.EX_OK


def test_oneshot_wrapper_that_runs_a_program_and_holds_its_own_port_is_fine(fake_host, write_conf, capsys):
    fake_host.unit("legacy.service", **dict(WRAPPER, ExecStart="{ path=/etc/init.d/legacy ; argv[]=/etc/init.d/legacy "
                                                               "start ; ignore_errors=no }", ConsistsOf=""))
    fake_host.listen(7000, pid=701, cgroup="/system.slice/legacy.service")
    assert validate(write_conf, capsys, "[legacy]\nport = 7000\n")[0] == selfheal.EX_OK


def test_running_unit_whose_port_another_unit_holds_is_a_config_error_unless_port_owner_any(fake_host, write_conf,
                                                                                            capsys):
    fake_host.unit("traefik.service", ActiveState="active", SubState="running", MainPID="800")
    fake_host.listen(80, pid=900, comm="docker-proxy", cgroup="/system.slice/docker.service")
    rc, _, err = validate(write_conf, capsys, "[traefik]\nport = 80\n")
    assert rc == selfheal.EX_CONFIG
    assert err.splitlines()[0] == (
        "services.conf:5 [traefik] port: 80 is held by docker.service, not by traefik.service (which is running): "
        "if docker.service serves [traefik], set unit = docker.service; if it only forwards the port to "
        "traefik.service (docker-proxy), set port_owner = any")
    assert validate(write_conf, capsys, "[traefik]\nport = 80\nport_owner = any\n")[0] == selfheal.EX_OK


def test_unit_that_is_down_while_another_holds_its_port_is_not_judged(fake_host, write_conf, capsys):
    # That may be exactly the conflict selfheal is there to report.
    fake_host.failed("blocked.service")
    fake_host.listen(5004, pid=901, cgroup="/system.slice/squatter.service")
    assert validate(write_conf, capsys, "[blocked]\nport = 5004\n")[0] == selfheal.EX_OK


def test_missing_programs_of_config_check_and_health_command_are_all_reported_at_once(debian_postgres, write_conf,
                                                                                       capsys):
    rc, _, err = validate(write_conf, capsys, AS_FIRST_WRITTEN + "health_command = /usr/bin/pg_isready-nope -q\n\n"
                          "[nginx]\nstrategies = config_validation\nconfig_check = nginx-nope -t\n"
                          "health_command = %s -c pass\n" % sys.executable)
    lines = err.splitlines()
    assert rc == selfheal.EX_CONFIG and lines[-1] == "3 problem(s); nothing was changed."
    assert lines[0].startswith("services.conf:5 [postgresql] port: postgresql.service is a oneshot wrapper")
    assert lines[1] == "services.conf:6 [postgresql] health_command: /usr/bin/pg_isready-nope: no such executable " \
                       "file on this host"
    assert lines[2].startswith("services.conf:10 [nginx] config_check: nginx-nope: not found on PATH (")


def test_validate_where_systemd_cannot_be_asked_checks_the_file_and_the_programs_only(debian_postgres, write_conf,
                                                                                     capsys, monkeypatch):
    monkeypatch.setattr(selfheal, "SYSTEMCTL", "/nonexistent/systemctl")  # a build host, a container
    assert validate(write_conf, capsys, AS_FIRST_WRITTEN) == (
        selfheal.EX_OK, "services.conf: ok, 1 service(s): postgresql\n", "")
    rc, _, err = validate(write_conf, capsys, AS_FIRST_WRITTEN + "health_command = /nonexistent/pg_isready\n")
    assert rc == selfheal.EX_CONFIG and "[postgresql] health_command: /nonexistent/pg_isready: no such" in err


def test_install_refuses_the_wrapper_before_writing_anything(debian_postgres, write_conf, tmp_path, monkeypatch):
    monkeypatch.setattr(selfheal.Installer, "live", property(lambda self: True))
    config = selfheal.load_config(write_conf(GLOBAL + AS_FIRST_WRITTEN), trusted=False)
    dest = tmp_path / "dest"
    dest.mkdir()
    installer = selfheal.Installer(destdir=str(dest))
    with pytest.raises(selfheal.ConfigError) as exc:
        installer.install(config, GLOBAL + AS_FIRST_WRITTEN, "# selfheal.py\n")
    assert "[postgresql] with unit = postgresql@15-main.service" in exc.value.problems[0]
    assert list(dest.iterdir()) == []
    assert [c for c in debian_postgres.actions()] == []


# -- at run time: a port another unit holds is never a reason to restart ------------------


def test_heal_of_a_running_service_whose_port_another_unit_holds_restarts_nothing_and_says_why(wb):
    running(wb.host, STORY, ControlGroup="/system.slice/story-stages.service")
    wb.host.listen(5002, pid=4242, cgroup="/system.slice/other-app.service", cmdline="python3 -m http.server 5002")
    selfheal.cmd_watch(wb.config, wb.paths)  # two looks in a row within the run: handed over
    assert wb.triggers() == [["start", "--no-block", "selfheal@story-stages.service"]]
    rc, _ = wb.heal("story-stages")
    assert wb.touched(STORY) == []
    assert wb.outcomes("story-stages") == ["FAILED"]
    (msg,) = wb.sink.messages
    text = msg.get_content()
    assert "port 5002 held by pid 4242 (user root, cgroup /system.slice/other-app.service" in text
    assert "selfheal restarted nothing" in text and "port_owner = any in [story-stages]" in text


def test_a_maintenance_window_systemd_reads_otherwise_is_a_problem_at_its_line(fake_host, write_conf, monkeypatch,
                                                                              tmp_path):
    """selfheal computes windows itself; validate has systemd-analyze read each one too."""
    analyze = tmp_path / "systemd-analyze"
    analyze.write_text("#!/bin/sh\necho \"Failed to parse calendar specification '$3': Invalid argument\" >&2\n"
                       "exit 1\n")
    analyze.chmod(0o755)
    monkeypatch.setattr(selfheal, "SYSTEMD_ANALYZE", str(analyze))
    path = write_conf(conf({"maintenance": "Sun *-*-* 03:00 1h"}, {"worker": {}}))
    config = selfheal.load_config(path, trusted=False)
    assert selfheal.host_problems(config, {}) == [
        "%s:5 [selfheal] maintenance: systemd does not read 'Sun *-*-* 03:00' as a calendar event: Failed to "
        "parse calendar specification 'Sun *-*-* 03:00': Invalid argument" % path]


def test_a_maintenance_window_the_real_systemd_analyze_reads_is_no_problem(write_conf):
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze here")
    config = selfheal.load_config(write_conf(conf({"maintenance": "Mon..Fri *-*-* 22:00 UTC 30m; monthly 2h"},
                                                  {"worker": {}})), trusted=False)
    assert selfheal.host_problems(config, {}) == []
