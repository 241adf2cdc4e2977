"""Drills on a real systemd (issue: the port check read every socket of the host from
/proc/net/tcp): inside the real sandboxes of selfheal@.service and selfheal-watch.service the
listening sockets are asked of the kernel (NETLINK_SOCK_DIAG), and the port is still proven
to be the restarted service's; where a sandbox refuses AF_NETLINK, /proc/net/tcp answers.

The units run with -v (a drop-in): each process says once which source it used. One suite:
what is tested is the kernel and the units' sandbox, which systemd 247, 252 and 257 applied
alike when this drill was run on all three.
"""

import json

import pytest

from drillkit import drill_conf
from drillkit import (about, body, clear_mailbox, drill_suites, installed_host, kill, show, wait_idle,
                      web_unit)

pytestmark = pytest.mark.drill

UNITS = {"ears.service": web_unit(5041), "nonet.service": web_unit(5042)}

CONFIG = drill_conf({"smtp_host": "127.0.0.1", "smtp_timeout": "3s", "verify_timeout": "10s", "watch_interval": "1h"}, {
    "ears": {"port": 5041, "health_url": "http://127.0.0.1:5041/health", "strategies": "service_restart"},
    "nonet": {"port": 5042, "health_url": "http://127.0.0.1:5042/health", "strategies": "service_restart"},
})

FROM_KERNEL = "selfheal: listening sockets: asked of the kernel (NETLINK_SOCK_DIAG)"
FROM_PROC = "selfheal: listening sockets: read from /proc/net/tcp (netlink: Address family not supported by protocol)"


def verbose(box, unit, installed):
    """A drop-in that runs the installed unit's command line with -v (debug lines on stderr)."""
    (line,) = [x for x in box.read("/etc/systemd/system/" + installed).splitlines() if x.startswith("ExecStart=")]
    assert 'selfheal.main())" ' in line, line
    box.write("/etc/systemd/system/%s.d/verbose.conf" % unit,
              "[Service]\nExecStart=\n%s\n" % line.replace('selfheal.main())" ', 'selfheal.main())" -v ', 1))


@pytest.fixture(scope="module", params=drill_suites("bookworm"))
def host(request, bed_reason, repo_root):
    if bed_reason:
        pytest.skip(bed_reason)
    with installed_host(repo_root, UNITS, CONFIG, suite=request.param, start=("ears", "nonet"),
                        ports=(5041, 5042)) as box:
        for unit in ("selfheal@ears.service", "selfheal@nonet.service"):
            verbose(box, unit, "selfheal@.service")
        verbose(box, "selfheal-watch.service", "selfheal-watch.service")
        # a sandbox without AF_NETLINK (an admin's drop-in, or a kernel that refuses it)
        box.write("/etc/systemd/system/selfheal@nonet.service.d/no-netlink.conf",
                  "[Service]\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n")
        box.run(["systemctl", "daemon-reload"])
        yield box


def said(box, unit):
    """What the last run of unit wrote on stderr (one line per debug record, -v)."""
    invocation = show(box, unit, "InvocationID")
    assert invocation, unit
    return box.run(["journalctl", "--no-pager", "-o", "cat", "_SYSTEMD_INVOCATION_ID=" + invocation,
                    "_TRANSPORT=stdout"]).stdout.splitlines()


@pytest.mark.parametrize("name, port, source, not_said", [
    ("ears", 5041, FROM_KERNEL, "/proc/net/tcp"),  # the heal's own sandbox: the kernel answers
    ("nonet", 5042, FROM_PROC, FROM_KERNEL),  # a sandbox without AF_NETLINK: /proc/net/tcp, as proof as good
], ids=["netlink", "without-af-netlink"])
def test_heal_in_its_sandbox_finds_the_listener_and_proves_it_is_the_new_runs(host, name, port, source, not_said):
    clear_mailbox(host)
    kill(host, name + ".service")
    [mail] = host.wait_mail(about(name, "RESOLVED"), timeout=30)
    wait_idle(host, name)
    pid = show(host, name + ".service", "MainPID")
    # the inode the listener check gave is the one the new main process holds (main_holds_port, /proc/PID/fd)
    assert "port: %d listening (pid %s of %s.service)" % (port, pid, name) in body(mail)
    lines = said(host, "selfheal@%s.service" % name)
    assert lines.count(source) == 1, lines  # said once per process, however many probes
    assert not [x for x in lines if not_said in x], lines


def test_watch_in_its_sandbox_asks_the_kernel_and_finds_both_ports(host):
    host.run(["systemctl", "start", "selfheal-watch.service"], timeout=60)
    assert show(host, "selfheal-watch.service", "Result") == "success"
    lines = said(host, "selfheal-watch.service")
    assert lines.count(FROM_KERNEL) == 1, lines
    for name in ("ears", "nonet"):  # "ok" needs the port listening (a look, not a heal)
        state = json.loads(host.run(["cat", "/run/selfheal/watch/%s.json" % name]).stdout)
        assert state["verdict"] == "ok", state
