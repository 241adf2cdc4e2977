"""Drills on a real systemd with a real mail server (issue: heal a crashed service).

One container for the module: the repo is bound read-only at /src, copied to
/root/selfheal as a user's clone would be, services.conf edited there, and installed
with `./install.sh` exactly as the README says. Each drill breaks a real service and
reads the real mailbox (/var/mail/root, delivered by postfix).
"""

import time

import pytest

from drillkit import drill_conf
from drillkit import queued_for
from drillkit import (drill_suites, CLONE, REPO_INSIDE, SUITE_VERSIONS, about, body, clear_mailbox, history, http_get,
                      installed_host, passes_monitor_env, show)

pytestmark = pytest.mark.drill

UNITS = {
    "story-stages.service": """\
[Unit]
Description=story-stages stand-in
[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/standin 5002
[Install]
WantedBy=multi-user.target
""",
    # Its executable is deleted by a drill: systemd then fails it with 203/EXEC.
    "ghost.service": """\
[Unit]
Description=ghost stand-in
[Service]
ExecStart=/opt/ghost/ghost-app 5010
[Install]
WantedBy=multi-user.target
""",
    # KillMode=process: when the main process dies its forked child keeps the port.
    "forky.service": """\
[Unit]
Description=forky stand-in
[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/standin 5003 --fork-child
KillMode=process
[Install]
WantedBy=multi-user.target
""",
    "blocked.service": """\
[Unit]
Description=blocked stand-in (its port is taken by another unit)
[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/standin 5004
""",
    "app@.service": """\
[Unit]
Description=app instance %i
[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/standin 5005
[Install]
WantedBy=multi-user.target
""",
}

CONFIG = drill_conf({
    "smtp_timeout": "3s",
    "verify_timeout": "10s",
    "flap_threshold": 5,  # these drills crash story-stages three times in a few minutes, each a separate check
}, {
    "story-stages": {"port": 5002, "domain": "books.jbyrd.org", "critical": "yes",
                     "strategies": "port_conflict, service_restart", "health_url": "http://127.0.0.1:5002/health"},
    "ghost": {"port": 5010},
    "forky": {"port": 5003, "strategies": "port_conflict, service_restart"},
    # started (and broken) by a drill on purpose: the watch must not start it first
    "blocked": {"port": 5004, "strategies": "port_conflict, service_restart", "on_stopped": "ignore"},
    "app-blue": {"unit": "app@blue.service", "port": 5005},
    "absent": {"port": 5099},
})


@pytest.fixture(scope="module", params=drill_suites())
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    def ghost_app(box):
        box.run(["install", "-D", "-m", "0755", REPO_INSIDE + "/tests/standin.py", "/opt/ghost/ghost-app"])

    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("story-stages", "ghost", "forky", "app@blue"),
                        ports=(5002, 5003, 5005, 5010), prepare=ghost_app) as box:
        yield box


def test_install_puts_a_dropin_on_each_listed_unit_and_warns_about_missing_ones(host):
    assert "absent.service is not-found" in host.install_output
    for unit, name in (("story-stages.service", "story-stages"), ("app@blue.service", "app-blue")):
        assert show(host, unit, "OnFailure") == "selfheal@%s.service" % name
    assert show(host, "selfheal-watch.timer", "ActiveState") == "active"
    again = host.run([CLONE + "/install.sh"], timeout=120).stdout
    assert "installed" not in again.replace("selfheal 0.1.0 installed", "")  # idempotent


def test_sigkilled_web_service_answers_again_and_resolved_mail_tells_the_truth(host):
    clear_mailbox(host)
    old_pid = show(host, "story-stages", "MainPID")
    host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "story-stages"])
    [mail] = host.wait_mail(about("story-stages", "RESOLVED"), timeout=30)
    assert http_get(host, 5002) == "200"
    assert show(host, "story-stages", "MainPID") not in ("0", old_pid)
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail["Message-ID"] and mail["Date"]
    text = body(mail)
    assert str(mail["Subject"]) == "✅ MiracleMax: story-stages - RESOLVED"
    assert "killed by signal KILL (result: signal)" in text
    assert "Main process: %s, killed KILL" % old_pid in text
    assert "Domain:    books.jbyrd.org" in text and "CRITICAL" in text
    assert "1. systemctl restart story-stages.service" in text
    assert "health: GET http://127.0.0.1:5002/health: HTTP 200" in text
    assert "from failure to verified healthy" in text
    assert "State:   active (running)" in text
    # systemd < 251 (Debian 11) passes no MONITOR_*: the same facts come from systemctl show
    assert ("Facts from: systemd's MONITOR_* variables and systemctl show\n" if passes_monitor_env(host.suite)
            else "Facts from: systemctl show\n") in text
    events = history(host, "story-stages")
    assert events[-1]["outcome"] == "RESOLVED" and events[-1]["exit"] == "killed KILL"


def test_version_and_heal_debug_log_name_this_systemd_and_where_failure_facts_come_from(host):
    systemd = SUITE_VERSIONS[host.suite]["systemd"]
    says = ("MONITOR_* on failure: yes (systemd >= 251)" if passes_monitor_env(host.suite)
            else "MONITOR_* on failure: no: failure facts come from systemctl show")
    lines = host.run(["selfheal", "--version"]).stdout.splitlines()
    assert lines[0] == "selfheal 0.1.0"
    assert lines[1].startswith("Python %d.%d." % SUITE_VERSIONS[host.suite]["python"])
    assert lines[2].startswith("systemd %d (" % systemd)
    assert lines[3].startswith(says)
    dry = host.run(["selfheal", "-v", "heal", "story-stages", "--dry-run"])
    assert "this host: systemd %d (" % systemd in dry.stderr and says in dry.stderr


def test_missing_binary_gives_one_failed_mail_with_manual_steps_and_no_restart_storm(host):
    clear_mailbox(host)
    host.run(["rm", "/opt/ghost/ghost-app"])
    host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "ghost"])
    [mail] = host.wait_mail(about("ghost", "FAILED"), timeout=30)
    text = body(mail)
    assert "MANUAL STEPS" in text and "systemctl status ghost.service" in text
    assert "journalctl -u ghost.service" in text
    assert "JOURNAL OF THE FAILED RUN" in text and "listening on 127.0.0.1:5010" in text
    assert "executable" in text  # the root cause is the missing binary, from the restart's 203/EXEC
    time.sleep(5)  # room for a storm to show itself
    assert len([m for m in host.mails() if "ghost" in str(m["Subject"])]) == 1
    assert show(host, "ghost", "ActiveState") == "failed"
    assert len(history(host, "ghost")) == 1
    # Counted from PID 1's own lines: the executor's "Failed at step EXEC" line can lose its unit
    # field when the process is gone before journald reads its cgroup (seen once on systemd 257).
    pid1 = host.run(["journalctl", "_PID=1", "UNIT=ghost.service", "-o", "cat", "--no-pager"]).stdout
    exec_failures = pid1.count("status=203/EXEC")
    assert exec_failures == 1, "selfheal should restart the broken service once, and only once"
    # Every command the mail tells the owner to run exists on this host, on root's PATH.
    steps = text.split("MANUAL STEPS", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    commands = {line.split()[0] for line in steps if line.strip()} | {
        part.split()[0] for line in steps for part in line.split(";")[1:] if part.split()}
    commands -= {"ssh"}  # from the owner's machine to this one
    assert any(line.strip().startswith("selfheal resume ") for line in steps), steps
    for command in sorted(commands):
        found = host.run(["sh", "-c", "command -v %s" % command], check=False)
        assert found.returncode == 0, "the mail tells the owner to run %r, which is not on PATH:\n%s" % (
            command, "\n".join(steps))


def test_report_written_while_mail_server_is_down_arrives_when_it_is_back(host):
    clear_mailbox(host)
    host.run(["systemctl", "stop", "postfix"])
    try:
        host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "story-stages"])
        deadline = time.monotonic() + 30
        while not queued_for(host, "mail"):
            assert time.monotonic() < deadline, "the report was not queued"
            time.sleep(0.1)
        assert http_get(host, 5002) == "200"  # healing did not wait on the mail server
        assert host.mails() == []
    finally:
        host.run(["systemctl", "start", "postfix"])
    # Nobody re-sends it: the next watch run (selfheal-watch.timer, every 30 s) delivers the queue.
    host.wait_mail(about("story-stages", "RESOLVED"), timeout=90)
    assert not queued_for(host, "mail")


def test_stale_process_of_the_service_holding_its_port_is_stopped_and_service_restarted(host):
    clear_mailbox(host)
    main_pid = show(host, "forky", "MainPID")
    procs = host.run(["pgrep", "-f", "standin 5003 --fork-child"]).stdout.split()
    [child] = [p for p in procs if p != main_pid]
    host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "forky"])
    [mail] = host.wait_mail(about("forky", "RESOLVED"), timeout=30)
    text = body(mail)
    assert "stop stale pid %s" % child in text and "ended by SIGTERM" in text
    assert host.run(["test", "-d", "/proc/" + child], check=False).returncode != 0
    assert http_get(host, 5003) == "200"


def test_port_held_by_another_units_process_is_never_killed_and_failed_mail_names_it(host):
    clear_mailbox(host)
    host.run(["systemd-run", "--unit=squatter", "/usr/bin/python3", "/usr/local/bin/standin", "5004"])
    host.wait_listening(5004)
    squatter = show(host, "squatter", "MainPID")
    host.run(["systemctl", "start", "blocked"], check=False)
    [mail] = host.wait_mail(about("blocked", "FAILED"), timeout=30)
    text = body(mail)
    assert "pid %s" % squatter in text and "squatter.service" in text
    assert "port was already taken" in text or "Address already in use" in text
    assert show(host, "squatter", "ActiveState") == "active"
    assert show(host, "squatter", "MainPID") == squatter
    host.run(["systemctl", "stop", "squatter"])


def test_template_instance_heals_under_its_section_name(host):
    clear_mailbox(host)
    host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "app@blue.service"])
    [mail] = host.wait_mail(about("app-blue", "RESOLVED"), timeout=30)
    assert "app@blue.service" in body(mail)
    assert http_get(host, 5005) == "200"


def test_broken_config_makes_install_print_every_error_and_change_nothing(host):
    snapshot = ["find", "/etc/systemd/system", "/etc/selfheal", "/usr/local", "-printf", "%p %s %T@ %m\\n"]
    before = host.run(snapshot).stdout
    host.run(["cp", "-a", REPO_INSIDE, "/root/broken"])
    host.write("/root/broken/services.conf", (
        "[selfheal]\n"
        "email_to = not-an-address\n"       # line 2
        "\n"
        "[story-stages]\n"
        "prot = 5002\n"                     # line 5
        "strategies = service_restrat\n"    # line 6
    ))
    result = host.run(["/root/broken/install.sh"], check=False)
    assert result.returncode == 78
    conf = "/root/broken/services.conf"
    assert "%s:2 [selfheal] email_to:" % conf in result.stderr
    assert "%s:5 [story-stages] prot: unknown key (did you mean 'port'?)" % conf in result.stderr
    assert "%s:6 [story-stages] strategies:" % conf in result.stderr
    assert host.run(snapshot).stdout == before


def test_status_table_shows_the_services_and_their_last_heal(host):
    out = host.run(["miraclemax-status"], check=False).stdout
    assert "story-stages" in out and "RESOLVED" in out
    assert "ghost" in out and "failed" in out


def test_uninstall_removes_what_install_put_there_and_services_keep_running(host):
    result = host.run([CLONE + "/install.sh", "--uninstall"], timeout=120)
    assert "removed /etc/systemd/system/selfheal@.service" in result.stdout
    assert show(host, "story-stages", "OnFailure") == ""
    assert show(host, "story-stages", "ActiveState") == "active"
    assert host.run(["test", "-e", "/usr/local/lib/selfheal/selfheal.py"], check=False).returncode == 1
    assert host.run(["test", "-e", "/etc/selfheal/services.conf"], check=False).returncode == 0


def test_single_file_install_on_a_new_host_heals_too(host):
    """Only selfheal.py and a services.conf: the units come out of the file itself."""
    host.run(["mkdir", "-p", "/root/single"])
    host.run(["cp", REPO_INSIDE + "/selfheal.py", "/root/single/selfheal.py"])
    host.write("/root/single/services.conf", CONFIG)
    out = host.run(["python3", "/root/single/selfheal.py", "install", "--config", "/root/single/services.conf"],
                   timeout=120).stdout
    assert "installed /etc/systemd/system/selfheal@.service" in out
    assert show(host, "story-stages.service", "OnFailure") == "selfheal@story-stages.service"
    clear_mailbox(host)
    host.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", "story-stages"])
    host.wait_mail(about("story-stages", "RESOLVED"), timeout=30)
    assert http_get(host, 5002) == "200"
