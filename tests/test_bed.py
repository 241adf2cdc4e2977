"""The drill bed itself: a booted container has a working systemd and a working postfix,
and each suite boots the systemd and Python versions the drills claim to prove."""

import re
import textwrap

import pytest

from bed import Container, wait_until
from drillkit import SUITE_VERSIONS, drill_suites

pytestmark = pytest.mark.drill

SEND_MAIL = textwrap.dedent(
    """
    import smtplib, sys
    from email.message import EmailMessage
    msg = EmailMessage()
    msg["From"] = "bed@localhost"
    msg["To"] = sys.argv[1]
    msg["Subject"] = sys.argv[2]
    msg.set_content("hello from inside the bed\\n")
    with smtplib.SMTP("127.0.0.1", 25, timeout=10) as smtp:
        smtp.send_message(msg)
    """
)

WEB_UNIT = textwrap.dedent(
    """
    [Unit]
    Description=drill web server

    [Service]
    ExecStart=/usr/bin/python3 -m http.server 5002 --bind 127.0.0.1
    """
)


@pytest.fixture(scope="module", params=drill_suites())
def box(request, bed_reason):
    if bed_reason:
        pytest.skip(bed_reason)
    with Container(suite=request.param) as container:
        yield container


def send_mail(box, to, subject):
    box.run(["python3", "-c", SEND_MAIL, to, subject])


def test_container_runs_systemd_as_pid1(box):
    assert box.run(["systemctl", "--version"]).stdout.startswith("systemd ")
    assert box.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert box.run(["hostname"]).stdout.strip() == "miraclemax"
    assert box.run(["systemctl", "is-system-running"], check=False).stdout.strip() == "running"


def test_suite_boots_the_systemd_and_python_versions_it_stands_for(box):
    want = SUITE_VERSIONS[box.suite]
    first = box.run(["systemctl", "--version"]).stdout.splitlines()[0]
    assert int(re.match(r"systemd (\d+)", first).group(1)) == want["systemd"], first
    python = box.run(["python3", "-c", "import sys; print(*sys.version_info[:2])"]).stdout.split()
    assert tuple(int(n) for n in python) == want["python"], python


def test_mail_to_root_lands_in_root_mbox(box):
    send_mail(box, "root@localhost", "bed test: to root")
    [mail] = box.wait_mail(lambda m: m["Subject"] == "bed test: to root")
    assert mail["To"] == "root@localhost"
    assert "hello from inside the bed" in mail.get_content()


def test_mail_to_owner_alias_reaches_root(box):
    send_mail(box, "owner@localhost", "bed test: to owner")
    box.wait_mail(lambda m: m["Subject"] == "bed test: to owner")


def test_wait_mail_timeout_names_subjects_seen(box):
    with pytest.raises(AssertionError, match="subjects seen"):
        box.wait_mail(lambda m: m["Subject"] == "never sent", timeout=0.2)


def test_write_and_read_go_through_the_root(box):
    box.write("/etc/bed-probe", "probe\n")
    assert box.run(["cat", "/etc/bed-probe"]).stdout == "probe\n"
    box.sh("echo from-inside > /etc/bed-probe2")
    assert box.read("/etc/bed-probe2") == "from-inside\n"
    with pytest.raises(ValueError):
        box.write("/run/bed-probe", "tmpfs inside: not visible from the host\n")


def test_sigkilled_unit_without_restart_ends_failed(box):
    box.write("/etc/systemd/system/web.service", WEB_UNIT)
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "start", "web"])
    box.wait_listening(5002)
    assert box.run(["systemctl", "is-active", "web"]).stdout.strip() == "active"

    box.run(["systemctl", "kill", "-s", "KILL", "web"])

    def failed():
        return box.run(["systemctl", "is-failed", "web"], check=False).stdout.strip() == "failed"

    wait_until(failed, 10, "web.service to be failed")
    show = box.run(["systemctl", "show", "-p", "Result,ExecMainStatus", "web"]).stdout
    assert "Result=signal" in show
    assert "ExecMainStatus=9" in show
