"""health_command: a service's own health check as an argument list (redis-cli ping,
pg_isready), run through run() with health_timeout, judged like health_url by verification
and by the watch. Real commands (python3, echo), fake systemd."""

import sys

import pytest

import selfheal
from conftest import running

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

PY = sys.executable
GLOBAL = "[selfheal]\nemail_to = root@localhost\n"


def parse(section):
    return selfheal.parse_config(GLOBAL + "\n[redis-server]\n" + section, "services.conf")


def problems(section):
    with pytest.raises(selfheal.ConfigError) as exc:
        parse(section)
    return exc.value.problems


# -- config -------------------------------------------------------------------------------

def test_health_command_is_an_argument_list_split_like_config_check_and_takes_timeout_and_text():
    svc = parse("port = 6379\nhealth_command = /usr/bin/redis-cli -p 6379 ping\nhealth_expect_text = PONG\n"
                "health_timeout = 2s\n").services["redis-server"]
    assert svc.health_command == ("/usr/bin/redis-cli", "-p", "6379", "ping")
    assert (svc.health_expect_text, svc.health_timeout, svc.health_url) == ("PONG", 2.0, "")


@pytest.mark.parametrize("section, expected", [
    ("health_command = /usr/bin/redis-cli ping\nhealth_url = http://127.0.0.1/\n",
     "services.conf:5 [redis-server] health_command: use health_url or health_command, not both"),
    ("health_command = /usr/bin/redis-cli ping\nhealth_expect_status = 200\n",
     "services.conf:6 [redis-server] health_expect_status: needs health_url"),
    ("health_expect_text = PONG\n",
     "services.conf:5 [redis-server] health_expect_text: needs health_url or health_command"),
    ("health_command = 'redis-cli ping\n",
     "services.conf:5 [redis-server] health_command: cannot split into arguments (No closing quotation): \"'redis-cli ping\""),
    ("health_command = ./redis-cli ping\n",
     "services.conf:5 [redis-server] health_command: the program must be an absolute path or a plain command name: './redis-cli ping'"),
], ids=["with-health-url", "status-is-http-only", "text-without-a-check", "unbalanced-quote", "relative-path"])
def test_bad_health_command_is_one_problem_with_file_line_section_and_key(section, expected):
    assert problems(section) == [expected]


# -- command_check: the judgement -----------------------------------------------------------

def test_command_exiting_0_is_healthy_and_its_first_line_is_quoted():
    assert selfheal.command_check(["echo", "PONG"], 5.0, "PONG") == (True, "exit status 0: 'PONG'")


def test_command_output_lacking_the_expected_text_is_unhealthy():
    ok, detail = selfheal.command_check(["echo", "LOADING Redis is loading"], 5.0, "PONG")
    assert not ok and detail == "exit status 0 but the output lacks 'PONG': 'LOADING Redis is loading'"


def test_expected_text_on_stderr_counts():
    ok, _ = selfheal.command_check([PY, "-c", "import sys; sys.stderr.write('accepting connections')"], 5.0,
                                   "accepting")
    assert ok


def test_command_failing_is_unhealthy_with_its_exit_status_and_control_characters_escaped():
    ok, detail = selfheal.command_check(
        [PY, "-c", "import sys; print('no response\\x1b[31m'); sys.exit(2)"], 5.0)
    assert not ok and detail == "exit status 2: 'no response\\x1b[31m'"


def test_command_that_hangs_is_killed_after_the_timeout_and_said_to_give_no_answer():
    ok, detail = selfheal.command_check([PY, "-c", "import time; time.sleep(30)"], 0.5)
    assert (ok, detail) == (False, "no answer within 0.50 s")


def test_missing_program_is_unhealthy_and_says_it_cannot_run():
    ok, detail = selfheal.command_check(["/nonexistent/redis-cli", "ping"], 5.0)
    assert not ok and detail == "cannot run: /nonexistent/redis-cli: command not found"


def test_plain_name_is_found_on_path_and_output_is_read_no_further_than_needed():
    ok, detail = selfheal.command_check(["echo", "x" * 500], 5.0)
    assert (ok, detail) == (True, "exit status 0: '%s'" % ("x" * 80))  # its first 80 characters


# -- verification and the watch use it like health_url ------------------------------------

def test_probe_runs_health_command_after_the_unit_check(fake_host):
    running(fake_host, "redis-server.service")
    svc = selfheal.Service(name="redis-server", unit="redis-server.service", health_command=("echo", "PONG"),
                           health_expect_text="PONG")
    checks, _ = selfheal.probe(svc)
    assert [(c.name, c.ok, c.detail) for c in checks] == [
        ("unit", True, "active (running)"), ("health", True, "`echo PONG`: exit status 0: 'PONG'")]
    wrong = selfheal.Service(name="redis-server", unit="redis-server.service", health_command=("echo", "LOADING"),
                             health_expect_text="PONG")
    checks, _ = selfheal.probe(wrong)
    assert not checks[-1].ok and "lacks 'PONG'" in checks[-1].detail


def test_probe_of_an_inactive_unit_never_runs_health_command(fake_host, tmp_path):
    fake_host.unit("redis-server.service", ActiveState="failed", SubState="failed", Result="signal")
    marker = tmp_path / "ran"
    svc = selfheal.Service(name="redis-server", unit="redis-server.service",
                           health_command=(PY, "-c", "open(%r, 'w')" % str(marker)))
    checks, _ = selfheal.probe(svc)
    assert [c.name for c in checks] == ["unit"] and not marker.exists()


def test_assess_names_the_command_of_a_hung_service():
    svc = selfheal.Service(name="redis-server", unit="redis-server.service", port=6379,
                           health_command=("/usr/bin/redis-cli", "-p", "6379", "ping"))
    unit = {"Id": "redis-server.service", "LoadState": "loaded", "ActiveState": "active", "SubState": "running",
            "Result": "success", "NRestarts": "0"}
    detail = "`/usr/bin/redis-cli -p 6379 ping`: no answer within 5 s"
    assert selfheal.assess(svc, unit, {6379}, (False, detail), 0) == (
        "unhealthy", "port 6379 open but " + detail)


# Run as root: this Python may be one the service's user (nobody) cannot reach; who runs it is test_run_as.
REDIS = {"redis-server": {"health_command": "%s -c \"import time; time.sleep(30)\"" % PY, "health_timeout": "0.5s",
                          "health_run_as": "root"}}


def test_watch_finds_a_service_whose_health_command_hangs_and_hands_it_to_selfheal_after_watch_confirm(wb):
    wb.configure(extra=REDIS)
    running(wb.host, "redis-server.service")
    # One watch run: the hang is seen, looked at again a moment later (RECHECK_DELAY), and
    # handed over after watch_confirm = 2 looks in a row, not a whole interval later.
    assert selfheal.cmd_watch(wb.config, wb.paths) == selfheal.EX_OK
    assert wb.watch_state("redis-server")["verdict"] == "unhealthy"
    assert wb.triggers() == [["start", "--no-block", "selfheal@redis-server.service"]]
    assert wb.finding("redis-server")["detail"].startswith(
        "`%s -c 'import time; time.sleep(30)'`: no answer within 0.50 s (2 checks in a row" % PY)
    assert wb.touched("redis-server.service") == []  # the watch itself restarts nothing


def test_watch_of_a_service_whose_health_command_answers_is_ok(wb):
    wb.configure(extra={"redis-server": {"health_command": "echo PONG", "health_expect_text": "PONG"}})
    running(wb.host, "redis-server.service")
    for _ in range(3):
        selfheal.cmd_watch(wb.config, wb.paths)
    assert wb.watch_state("redis-server")["verdict"] == "ok"
    assert wb.triggers() == []


def test_readme_examples_for_debians_services_parse_into_the_commands_they_show():
    import os
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    [quick] = re.findall(r"## Quick start.*?```ini\n(.*?)```", readme, re.S)
    [example] = re.findall(r"### Debian's own services.*?```ini\n(.*?)```", readme, re.S)
    services = selfheal.parse_config(quick + example, "README.md").services
    assert services["redis-server"].health_command == ("/usr/bin/redis-cli", "-p", "6379", "ping")
    assert services["postgresql"].unit == "postgresql@15-main.service"
    assert services["nginx"].config_check == ("/usr/sbin/nginx", "-t")
    memcached = services["memcached"].health_command
    assert memcached[:2] == ("/usr/bin/python3", "-c") and "b'version\\r\\n'" in memcached[2]


def test_watch_never_acts_on_a_health_command_that_cannot_run(wb):
    # validate and install checked the program; removed since, it says nothing about the service
    wb.configure(extra={"redis-server": {"health_command": "/nonexistent/redis-cli ping"}})
    running(wb.host, "redis-server.service")
    for _ in range(3):
        selfheal.cmd_watch(wb.config, wb.paths)
    assert wb.watch_state("redis-server")["verdict"] == "ok"
    assert wb.triggers() == []
