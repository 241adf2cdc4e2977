"""Healing through the fakes (tests/fakes on PATH, no root, no systemd): diagnose, refuse or
repair, verify, record, mail. Also the probes healing relies on (systemctl show, ss, /proc,
cgroup ownership) and the state it keeps (history, status, locks, pauses)."""

import dataclasses
import email.utils
import errno
import json
import logging
import os
import pwd
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import selfheal
from conftest import HEAL_SERVICES, conf, queue_report

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

STORY = "story-stages.service"
WORKER = "worker.service"


def in_order(found, wanted):
    """True when every title of wanted is in found, in that order."""
    try:
        positions = [found.index(title) for title in wanted]
    except ValueError:
        return False
    return positions == sorted(positions)


class FakeProcesses:
    """Pretend processes for read_process and a kill that only ever signals them.

    selfheal's `os` is swapped for a proxy whose kill() records the signal (and makes the
    pretend process exit); the real os.kill is never reached, so no real process can be hit.
    """

    def __init__(self, monkeypatch, host):
        self.host = host
        self.table = {}
        self.kills = []
        self.exit_on = (signal.SIGTERM, signal.SIGKILL)
        monkeypatch.setattr(selfheal, "read_process", lambda pid, proc=None: self.table.get(pid))
        proxy = types.ModuleType("os")

        def everything_else(name):  # PEP 562: everything else is the real os ...
            if name == "pidfd_open":  # ... but no pidfd: the signal must go through kill()
                raise AttributeError(name)
            return getattr(os, name)

        proxy.__getattr__ = everything_else
        proxy.kill = self.kill
        monkeypatch.setattr(selfheal, "os", proxy)

    def add(self, pid, cgroup, cmdline="/usr/bin/python3 app.py", user="www-data", port=None):
        self.table[pid] = selfheal.Process(pid, user, cmdline, cgroup, 600.0)
        if port:
            self.host.listen(port, pid=pid)

    def kill(self, pid, sig):
        self.kills.append((pid, sig))
        self.host.log_call(["kill", "-" + signal.Signals(sig).name.replace("SIG", ""), str(pid)])
        if pid not in self.table:
            raise ProcessLookupError(errno.ESRCH, "No such process")
        if sig in self.exit_on:
            del self.table[pid]
            with self.host.edit() as state:
                state["listeners"] = [lst for lst in state["listeners"] if lst.get("pid") != pid]


# =============================================================================
# Probes: systemctl show, ss, /proc, cgroup ownership
# =============================================================================


def test_parse_show_gives_one_dict_per_unit_and_keeps_equals_signs_in_values():
    text = ("Id=a.service\nActiveState=failed\nResult=signal\nDescription=a=b c\n\n"
            "Id=b.service\nActiveState=active\nStatusText=\n")
    units = selfheal.parse_show(text)
    assert units == [
        {"Id": "a.service", "ActiveState": "failed", "Result": "signal", "Description": "a=b c"},
        {"Id": "b.service", "ActiveState": "active", "StatusText": ""},
    ]


def test_parse_show_of_nothing_is_no_units():
    assert selfheal.parse_show("") == []
    assert selfheal.parse_show("\n\n") == []


def test_show_units_asks_systemctl_once_for_many_units_and_maps_each(fake_host):
    fake_host.unit(STORY, ActiveState="failed", Result="signal")
    fake_host.unit(WORKER, ActiveState="active")
    shown = selfheal.show_units([STORY, WORKER, "ghost.service"], ("Id", "LoadState", "ActiveState"))
    assert len(fake_host.calls("systemctl")) == 1
    assert shown[STORY]["ActiveState"] == "failed"
    assert shown[WORKER]["ActiveState"] == "active"
    assert shown["ghost.service"]["LoadState"] == "not-found"


def test_run_gives_a_result_not_an_exception_for_expected_failures():
    missing = selfheal.run(["selfheal-no-such-command-here"])
    assert missing.rc == 127 and not missing.ok and "not found" in missing.brief()
    slow = selfheal.run(["sleep", "5"], timeout=0.2)
    assert slow.rc == 124 and "timed out" in slow.brief()
    failed = selfheal.run([sys.executable, "-S", "-c", "import sys; sys.stderr.write('why it failed\\n'); sys.exit(3)"])
    assert (failed.rc, failed.brief()) == (3, "why it failed")


def test_run_uses_the_c_locale_and_no_stdin():
    done = selfheal.run([sys.executable, "-S", "-c", "import os, sys; print(os.environ['LC_ALL'], repr(sys.stdin.read()))"])
    assert done.out == "C ''\n"


def test_listening_ports_reads_listen_sockets_of_tcp_and_tcp6(tmp_path):
    (tmp_path / "net").mkdir()
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    rest = " 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n"
    (tmp_path / "net" / "tcp").write_text(
        header + "   0: 00000000:138A 00000000:0000 0A" + rest      # 0.0.0.0:5002 LISTEN
        + "   1: 0100007F:1F90 0100007F:C350 01" + rest)         # 127.0.0.1:8080 ESTABLISHED
    (tmp_path / "net" / "tcp6").write_text(
        header + "   0: %s:0050 %s:0000 0A" % ("0" * 32, "0" * 32) + rest)  # [::]:80 LISTEN
    assert selfheal.listening_ports(tmp_path) == {5002, 80}


def test_listening_ports_of_a_proc_without_net_tcp_are_unknown_not_none_listening(tmp_path):
    assert selfheal.listening_ports(tmp_path) is None  # ProcSubset=pid hides /proc/net: unknown
    assert selfheal.listen_inodes(5002, tmp_path) is None


# -- the kernel's answer (NETLINK_SOCK_DIAG), fed as bytes and asked for real ----------

NLM_F_MULTI = 0x2


def nlmsg(kind, body, seq=1):
    """One netlink message as the kernel sends it: nlmsghdr, body, padding to 4 bytes."""
    raw = selfheal.NLMSG_HDR.pack(selfheal.NLMSG_HDR.size + len(body), kind, NLM_F_MULTI, seq, 0) + body
    return raw + b"\0" * (-len(raw) % 4)


def diag_msg(family, port, inode, state=selfheal.TCP_LISTEN, seq=1):
    """A SOCK_DIAG_BY_FAMILY reply: one inet_diag_msg (the port in network byte order)."""
    body = selfheal.INET_DIAG_MSG.pack(family, state, 0, 0, port.to_bytes(2, "big"), b"\0\0", b"", b"", 0,
                                       b"", 0, 0, 0, 0, inode)
    return nlmsg(selfheal.SOCK_DIAG_BY_FAMILY, body, seq)


def done_msg(seq=1, code=0):
    return nlmsg(selfheal.NLMSG_DONE, struct.pack("=i", code), seq)


def error_msg(code, seq=1):
    """NLMSG_ERROR: the negative errno (0: an acknowledgement), then the request's header."""
    return nlmsg(selfheal.NLMSG_ERROR, struct.pack("=i", code) + selfheal.NLMSG_HDR.pack(72, 20, 0x301, seq, 0), seq)


def test_sock_diag_request_asks_for_tcp_sockets_in_listen_state_only():
    data = selfheal.sock_diag_request(socket.AF_INET6, 7)
    length, kind, flags, seq, _ = selfheal.NLMSG_HDR.unpack_from(data)
    family, protocol, _, _, states, sockid = selfheal.INET_DIAG_REQ_V2.unpack_from(data, selfheal.NLMSG_HDR.size)
    assert (length, kind, flags, seq) == (len(data), 20, 0x301, 7)  # SOCK_DIAG_BY_FAMILY, REQUEST|DUMP
    assert (family, protocol, states, sockid) == (socket.AF_INET6, socket.IPPROTO_TCP, 1 << 10, b"\0" * 48)


def test_sock_diag_reply_gives_port_and_inode_of_each_listen_socket_until_done():
    one = diag_msg(socket.AF_INET, 5002, 111) + diag_msg(socket.AF_INET6, 80, 4294967295)
    assert selfheal.parse_sock_diag(one, 1) == ([(5002, "111"), (80, "4294967295")], False)
    assert selfheal.parse_sock_diag(done_msg(), 1) == ([], True)


def test_sock_diag_reply_in_many_parts_is_read_until_done_and_nothing_after_it():
    parts = [diag_msg(socket.AF_INET, 5002, 111), diag_msg(socket.AF_INET, 5003, 333) + done_msg()
             + diag_msg(socket.AF_INET, 9999, 999)]
    assert selfheal.parse_sock_diag(parts[0], 1) == ([(5002, "111")], False)
    assert selfheal.parse_sock_diag(parts[1], 1) == ([(5003, "333")], True)


def test_sock_diag_reply_skips_other_states_other_requests_noops_and_acknowledgements():
    data = (diag_msg(socket.AF_INET, 40000, 222, state=1)  # ESTABLISHED: never asked for, never counted
            + diag_msg(socket.AF_INET, 6000, 666, seq=2)   # the answer to another request
            + nlmsg(1, b"x")                                # NLMSG_NOOP, 17 bytes: padded to 20
            + error_msg(0)                                  # an acknowledgement
            + diag_msg(socket.AF_INET, 5002, 111))
    assert selfheal.parse_sock_diag(data, 1) == ([(5002, "111")], False)


@pytest.mark.parametrize("reply, code", [
    (error_msg(-errno.EPERM), errno.EPERM),                                       # NLMSG_ERROR
    (diag_msg(socket.AF_INET, 5002, 111) + done_msg(code=-errno.EINTR), errno.EINTR),  # a dump ended by an error
])
def test_sock_diag_error_in_the_reply_raises_its_errno(reply, code):
    with pytest.raises(OSError) as raised:
        selfheal.parse_sock_diag(reply, 1)
    assert raised.value.errno == code


def test_sock_diag_reply_cut_anywhere_gives_a_prefix_or_a_value_error_never_a_wrong_socket():
    whole = diag_msg(socket.AF_INET, 5002, 111) + diag_msg(socket.AF_INET6, 80, 444) + done_msg()
    full = [(5002, "111"), (80, "444")]
    for cut in range(1, len(whole)):
        try:
            found, done = selfheal.parse_sock_diag(whole[:cut], 1)
        except ValueError:
            continue
        assert found == full[:len(found)] and not done, cut
    for garbage in (b"\0" * 16, b"\xff" * 20, selfheal.NLMSG_HDR.pack(8, 20, 0, 1, 0)):  # lengths 0, huge, < header
        with pytest.raises(ValueError):
            selfheal.parse_sock_diag(garbage, 1)


@pytest.fixture
def sockets_here():
    """On 127.0.0.1 (and ::1 when this host has it): a listening socket, and an established
    connection to another listener -> (listeners {port: {inodes}}, the client's local port,
    the server side's inode of that connection)."""
    opened = []

    def track(sock):
        opened.append(sock)
        return sock

    def listener(family, address, port=0):
        sock = track(socket.socket(family))
        sock.bind((address, port))
        sock.listen()
        return sock

    def inode(sock):
        return str(os.fstat(sock.fileno()).st_ino)

    try:
        listen = listener(socket.AF_INET, "127.0.0.1")
        port = listen.getsockname()[1]
        listeners = {port: {inode(listen)}}
        try:
            listeners[port].add(inode(listener(socket.AF_INET6, "::1", port)))  # the same port on ::1
        except OSError:
            pass  # no IPv6 here: IPv4 alone
        server = listener(socket.AF_INET, "127.0.0.1")
        listeners[server.getsockname()[1]] = {inode(server)}
        client = track(socket.create_connection(server.getsockname(), timeout=5))
        accepted = track(server.accept()[0])
        yield listeners, client.getsockname()[1], inode(accepted)
    finally:
        for sock in opened:
            sock.close()


def test_kernel_names_the_listening_sockets_here_and_not_an_established_connection(sockets_here):
    listeners, client_port, accepted = sockets_here
    found = selfheal.sock_diag_listeners()  # really asked, IPv4 and IPv6: it must not fail here
    for port, inodes in listeners.items():
        assert {inode for p, inode in found if p == port} == inodes
    assert client_port not in {p for p, _ in found}
    assert accepted not in {inode for _, inode in found}
    # /proc/net/tcp says the same of these sockets
    from_proc = selfheal.proc_net_listeners(selfheal.PROC_DIR)
    for port, inodes in listeners.items():
        assert {inode for p, inode in from_proc if p == port} == inodes
    # and so do listening_ports and listen_inodes
    ports = selfheal.listening_ports()
    assert set(listeners) <= ports and client_port not in ports
    assert all(selfheal.listen_inodes(port) == inodes for port, inodes in listeners.items())


def _netlink_refused(monkeypatch):  # a sandbox without AF_NETLINK (or seccomp) says EPERM
    def refuse(timeout=None):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(selfheal, "sock_diag_listeners", refuse)
    return "Operation not permitted"


def _no_such_netlink_family(monkeypatch):  # the kernel itself refuses the socket()
    monkeypatch.setattr(selfheal, "NETLINK_SOCK_DIAG", 32)  # >= MAX_LINKS: EPROTONOSUPPORT
    return os.strerror(errno.EPROTONOSUPPORT)


def _reply_not_understood(monkeypatch):
    def garbled(data, seq):
        raise ValueError("sock_diag: a message of 0 bytes at byte 0 of 16")
    monkeypatch.setattr(selfheal, "parse_sock_diag", garbled)
    return "sock_diag: a message of 0 bytes at byte 0 of 16"


@pytest.mark.parametrize("fail", [_netlink_refused, _no_such_netlink_family, _reply_not_understood])
def test_listening_sockets_come_from_proc_net_tcp_when_netlink_fails_and_it_is_said_once(
        sockets_here, monkeypatch, caplog, fail):
    listeners, client_port, _ = sockets_here
    monkeypatch.setattr(selfheal, "_LISTEN_SOURCES_SAID", set())
    why = fail(monkeypatch)
    caplog.set_level(logging.DEBUG, logger="selfheal")
    for _ in range(3):
        ports = selfheal.listening_ports()
        assert set(listeners) <= ports and client_port not in ports
        assert all(selfheal.listen_inodes(port) == inodes for port, inodes in listeners.items())
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("listening sockets:")]
    assert said == ["listening sockets: read from /proc/net/tcp (netlink: %s)" % why]


def test_listening_sockets_asked_of_the_kernel_are_said_once_per_process(sockets_here, monkeypatch, caplog):
    listeners, _, _ = sockets_here
    monkeypatch.setattr(selfheal, "_LISTEN_SOURCES_SAID", set())
    monkeypatch.setattr(selfheal, "PROC_DIR", Path("/nonexistent-proc"))  # so /proc cannot be what answers
    caplog.set_level(logging.DEBUG, logger="selfheal")
    for _ in range(3):
        assert set(listeners) <= selfheal.listening_ports()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("listening sockets:")]
    assert said == ["listening sockets: asked of the kernel (NETLINK_SOCK_DIAG)"]


def test_listening_sockets_are_unknown_when_neither_netlink_nor_proc_answers(monkeypatch, tmp_path):
    _netlink_refused(monkeypatch)
    monkeypatch.setattr(selfheal, "PROC_DIR", tmp_path)  # no net/tcp in it
    assert selfheal.listening_ports() is None
    assert selfheal.listen_inodes(5002) is None


SS_LINES = [
    ('LISTEN 0 128 0.0.0.0:5002 0.0.0.0:* users:(("python3",pid=4242,fd=3))',
     selfheal.Listener(5002, "0.0.0.0", (4242,))),
    ('LISTEN 0      4096            [::]:80             [::]:*    users:(("traefik",pid=900,fd=7))',
     selfheal.Listener(80, "[::]", (900,))),
    ('LISTEN 0 128 [::1]:5001 [::]:* users:(("passgo",pid=31,fd=4))',
     selfheal.Listener(5001, "[::1]", (31,))),
    ("LISTEN 0 128 *:5006 *:*", selfheal.Listener(5006, "*", ())),
    ("LISTEN 0 128 127.0.0.53%lo:53 0.0.0.0:*", selfheal.Listener(53, "127.0.0.53%lo", ())),
    ('LISTEN 0 511 0.0.0.0:8000 0.0.0.0:* users:(("gunicorn",pid=11,fd=5),("gunicorn",pid=10,fd=5),'
     '("gunicorn",pid=11,fd=6))', selfheal.Listener(8000, "0.0.0.0", (10, 11))),
    ('LISTEN 0 5 0.0.0.0:7000 0.0.0.0:* users:(("my \\"odd\\" app",pid=77,fd=3))',
     selfheal.Listener(7000, "0.0.0.0", (77,))),
]


@pytest.mark.parametrize("line, expected", SS_LINES, ids=["ipv4", "ipv6-any", "ipv6-loopback", "star-no-process",
                                                          "interface-suffix", "several-pids", "quoted-name"])
def test_parse_ss_reads_port_address_and_pids(line, expected):
    assert selfheal.parse_ss(line + "\n") == [expected]


def test_parse_ss_skips_a_header_and_blank_lines():
    text = "State Recv-Q Send-Q Local Address:Port Peer Address:Port Process\n\n" + SS_LINES[0][0] + "\n"
    assert selfheal.parse_ss(text) == [SS_LINES[0][1]]


def test_listeners_on_falls_back_to_ss_without_p_when_p_is_refused(fake_host):
    fake_host.listen(5002, pid=4242)
    with fake_host.edit() as state:
        state["ss_fail_p"] = True
    assert selfheal.listeners_on(5002) == (selfheal.Listener(5002, "0.0.0.0", ()),)
    assert selfheal.listeners_on(5003) == ()


def test_read_process_of_a_child_we_started_has_its_command_user_and_a_young_age():
    child = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        proc = selfheal.read_process(child.pid)
        while proc is not None and proc.cmdline != "sleep 30" and time.monotonic() < deadline:
            time.sleep(0.01)  # between fork and exec the child has no command line yet
            proc = selfheal.read_process(child.pid)
        me = selfheal.read_process(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert proc is not None and proc.pid == child.pid
    assert proc.cmdline == "sleep 30"
    assert proc.user == pwd.getpwuid(os.geteuid()).pw_name
    assert proc.cgroup.startswith("/")
    assert proc.age_seconds is not None and 0 <= proc.age_seconds < 10
    assert me is not None and me.pid == os.getpid()
    assert me.age_seconds >= proc.age_seconds


def test_read_process_of_a_finished_process_is_none():
    child = subprocess.Popen(["true"])
    child.wait()
    assert selfheal.read_process(child.pid) is None


def fake_proc(tmp_path, pid, cgroup_text, cmdline=b"/usr/bin/python3\0app.py\0"):
    base = tmp_path / "proc" / str(pid)
    base.mkdir(parents=True)
    (base / "cmdline").write_bytes(cmdline)
    (base / "cgroup").write_text(cgroup_text)
    after = ["S"] + ["0"] * 49
    after[19] = "100"  # starttime, field 22 of stat
    (base / "stat").write_text("%d (my app) %s\n" % (pid, " ".join(after)))
    return tmp_path / "proc"


def test_read_process_takes_the_unified_cgroup_line_on_a_hybrid_host(tmp_path):
    proc = fake_proc(tmp_path, 4242, "12:memory:/system.slice/other.service\n"
                                     "1:name=systemd:/system.slice/story-stages.service\n"
                                     "0::/system.slice/story-stages.service\n")
    process = selfheal.read_process(4242, proc)
    assert process.cgroup == "/system.slice/story-stages.service"
    assert process.cmdline == "/usr/bin/python3 app.py"


def test_read_process_takes_the_systemd_hierarchy_on_a_legacy_cgroup_v1_host(tmp_path):
    proc = fake_proc(tmp_path, 4242, "12:pids:/\n3:cpu,cpuacct:/\n"
                                     "1:name=systemd:/system.slice/story-stages.service\n")
    assert selfheal.read_process(4242, proc).cgroup == "/system.slice/story-stages.service"


def _proc(cgroup):
    return selfheal.Process(4242, "root", "python3 app.py", cgroup)


@pytest.mark.parametrize("cgroup, belongs", [
    ("/system.slice/story-stages.service", True),
    ("/system.slice/story-stages.service/worker-1", True),
    ("/system.slice/apps.slice/story-stages.service", True),
    ("/system.slice/story-stages.service.d", False),
    ("/system.slice/story-stages.service-other", False),
    ("/system.slice/old-story-stages.service", False),
    ("/system.slice/story-stages.socket", False),
    ("/system.slice", False),
    ("/", False),
    ("", False),
])
def test_belongs_to_unit_needs_the_exact_unit_component(cgroup, belongs):
    assert selfheal.belongs_to_unit(_proc(cgroup), STORY) is belongs


@pytest.mark.parametrize("cgroup", [
    "/user.slice/user-1000.slice/user@1000.service/app.slice/story-stages.service",
    "/machine.slice/machine-box.scope/payload/system.slice/story-stages.service",
])
def test_a_delegated_subtree_named_like_the_unit_is_not_proof_of_ownership(cgroup):
    assert selfheal.belongs_to_unit(_proc(cgroup), STORY) is False


# =============================================================================
# Healing: outcomes, mail, order of actions
# =============================================================================

STORY_JOURNAL = [
    "2024-11-28T05:00:01+0000 vm python3[4100]: serving books on :5002",
    "2024-11-28T05:00:09+0000 vm systemd[1]: story-stages.service: Main process exited, code=killed, status=9/KILL",
    "2024-11-28T05:00:09+0000 vm systemd[1]: story-stages.service: Failed with result 'signal'.",
]


def test_sigkilled_unit_that_restarts_fine_is_resolved_with_one_restart_and_a_full_report(bed, sections, section):
    bed.host.failed(STORY, listen={"port": 5002, "pid": 5555})
    bed.host.journal(STORY_JOURNAL)
    before = time.time()
    rc, out = bed.heal("story-stages")

    assert rc == 0
    assert bed.host.actions() == [["systemctl", "restart", "--", STORY]]
    (received,) = bed.sink.received
    msg = received.message
    assert msg["Subject"] == "✅ MiracleMax: story-stages - RESOLVED"
    assert received.rcpt_to == ("owner@example.org",)
    assert msg["Auto-Submitted"] == "auto-generated"
    assert abs(email.utils.parsedate_to_datetime(msg["Date"]).timestamp() - before) < 60
    assert re.fullmatch(r"<[^<>@\s]+@miraclemax\.example\.org>", msg["Message-ID"].strip())  # may be folded
    body = msg.get_content()
    assert in_order(sections(body), ["SERVICE", "ISSUE DETECTED", "DIAGNOSIS", "HEALING", "HOW IT WAS FIXED",
                                     "ROOT CAUSE", "HEALING TIME", "RECOMMENDATION", "POST-HEALING STATUS"])
    assert "MANUAL STEPS" not in sections(body)
    assert "story-stages.service" in section(body, "SERVICE") and "5002" in section(body, "SERVICE")
    assert "KILL" in section(body, "ISSUE DETECTED")
    assert "SIGKILL" in section(body, "ROOT CAUSE")
    assert "systemctl restart story-stages.service" in section(body, "HOW IT WAS FIXED")
    assert "active" in section(body, "POST-HEALING STATUS")
    (event,) = bed.history("story-stages")
    assert event["outcome"] == "RESOLVED"
    # the failure happened 2 s before the heal started: healing time counts from the failure
    assert 2.0 <= event["healing_seconds"] < 2.0 + (time.time() - before) + 1
    assert out.splitlines()[0] == msg["Subject"]


def test_fakes_really_executed_from_path_give_the_same_heal(bed, real_commands):
    assert selfheal.subprocess is subprocess  # selfheal.run starts tests/fakes/* as processes
    bed.host.failed(STORY, listen={"port": 5002, "pid": 5555})
    rc, _ = bed.heal("story-stages")
    assert rc == 0
    assert bed.host.actions() == [["systemctl", "restart", "--", STORY]]
    assert {"systemctl", "journalctl"} <= {c[0] for c in bed.host.calls()}  # ss only when the port is held
    assert bed.sink.messages[0]["Subject"] == "✅ MiracleMax: story-stages - RESOLVED"


def test_restart_that_fails_gives_a_failed_mail_with_manual_steps_and_the_journal(bed, sections, section):
    bed.host.failed(WORKER, result="exit-code", code="1", status="1", on_restart="fail")
    fatal = "2024-11-28T05:00:09+0000 vm worker[4100]: fatal: cannot open queue /srv/worker/q.db"
    bed.host.journal(["2024-11-28T05:00:08+0000 vm worker[4100]: starting", fatal])
    rc, _ = bed.heal("worker")

    assert rc == 1
    assert [c[1] for c in bed.host.actions()] == ["restart"]
    (msg,) = bed.sink.messages
    assert msg["Subject"] == "❌ MiracleMax: worker - FAILED"
    body = msg.get_content()
    titles = sections(body)
    assert "HOW IT WAS FIXED" not in titles and "HEALING TIME" not in titles
    assert WORKER in section(body, "MANUAL STEPS")
    journal_titles = [t for t in titles if t.startswith("JOURNAL")]
    assert journal_titles and fatal in section(body, journal_titles[0])
    assert [e["outcome"] for e in bed.history("worker")] == ["FAILED"]


def test_restart_failing_with_203_exec_names_the_executable_in_the_root_cause(bed, section):
    bed.host.failed(WORKER, on_restart="fail", fail_status="203")
    rc, _ = bed.heal("worker")
    assert rc == 1
    assert "executable" in section(bed.sink.messages[0].get_content(), "ROOT CAUSE")


def test_start_limit_hit_is_reset_before_the_restart(bed):
    bed.host.failed(WORKER, result="start-limit-hit", code="1", status="1")
    rc, _ = bed.heal("worker")
    assert rc == 0
    assert [c[1] for c in bed.host.actions()] == ["reset-failed", "restart"]
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED"]


def test_systemd_auto_restart_pending_is_waited_for_and_not_restarted_a_second_time(bed):
    bed.host.unit(WORKER, ActiveState="activating", SubState="auto-restart", Restart="on-failure",
                  Result="exit-code", ExecMainCode="1", ExecMainStatus="1", NRestarts="1",
                  then={"after": 0.3, "set": {"ActiveState": "active", "SubState": "running", "Result": "success"}})
    rc, _ = bed.heal("worker")
    assert rc == 0
    assert bed.host.actions() == []
    assert [e["outcome"] for e in bed.history("worker")] == ["RECOVERED"]
    (msg,) = bed.sink.messages
    assert msg["Subject"].startswith("✅ MiracleMax: worker - ")


MONITOR = "0123456789abcdef0123456789abcdef"
SHOWN = "fedcba9876543210fedcba9876543210"


@pytest.mark.parametrize("monitor_unit, used", [(WORKER, True), ("other.service", False)],
                         ids=["names-this-unit", "names-another-unit"])
def test_monitor_env_is_used_only_when_monitor_unit_is_this_unit(bed, monitor_unit, used):
    # systemctl show (the unit now): exited with 1. MONITOR_* (the run that failed): SIGKILL.
    bed.host.failed(WORKER, result="exit-code", code="1", status="1", InvocationID=SHOWN)
    bed.host.journal(["vm worker[1]: the run systemd reported"], invocation=MONITOR)
    bed.host.journal(["vm worker[2]: the run systemctl shows"], invocation=SHOWN)
    env = {"MONITOR_UNIT": monitor_unit, "MONITOR_SERVICE_RESULT": "signal", "MONITOR_EXIT_CODE": "killed",
           "MONITOR_EXIT_STATUS": "KILL", "MONITOR_INVOCATION_ID": MONITOR}
    rc, _ = bed.heal("worker", env=env)

    assert rc == 0
    first_query = bed.host.calls("journalctl")[0]
    assert "_SYSTEMD_INVOCATION_ID=%s" % (MONITOR if used else SHOWN) in first_query
    (event,) = bed.history("worker")
    assert (event["result"], event["exit"]) == (("signal", "killed KILL") if used else ("exit-code", "exited 1"))
    body = bed.sink.messages[0].get_content()
    assert ("the run systemd reported" in body) is used
    assert ("the run systemctl shows" in body) is not used


@pytest.mark.parametrize("version, says", [(247, "no: failure facts come from systemctl show"),
                                           (252, "yes (systemd >= 251)")])
def test_heal_at_debug_level_logs_the_hosts_systemd_and_whether_it_passes_monitor_env(bed, caplog, version, says):
    with bed.host.edit() as state:
        state["systemd_version"] = version
    bed.host.failed(WORKER)
    caplog.set_level(logging.DEBUG, logger="selfheal")
    rc, _ = bed.heal("worker")

    assert rc == 0
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("this host:")]
    assert "systemd %d (" % version in line
    assert "MONITOR_* on failure: " + says in line
    assert "Facts from: systemctl show\n" in bed.sink.messages[0].get_content()  # no MONITOR_* given


def test_heal_below_debug_level_never_asks_systemctl_for_its_version(bed):
    bed.host.failed(WORKER)
    rc, _ = bed.heal("worker")

    assert rc == 0
    assert [c for c in bed.host.calls("systemctl") if "--version" in c] == []


def test_port_held_by_a_foreign_pid_fails_kills_nothing_and_the_report_names_the_holder(bed, monkeypatch):
    procs = FakeProcesses(monkeypatch, bed.host)
    bed.host.failed(STORY, result="exit-code", code="1", status="1", listen={"port": 5002, "pid": 5555})
    procs.add(4242, "/system.slice/other-app.service", "/usr/bin/python3 -m http.server 5002", port=5002)
    bed.host.journal(["vm python3[4100]: OSError: [Errno 98] Address already in use"])
    rc, _ = bed.heal("story-stages")

    assert rc == 1
    assert procs.kills == []
    assert bed.host.actions() == []
    (msg,) = bed.sink.messages
    assert msg["Subject"] == "❌ MiracleMax: story-stages - FAILED"
    body = msg.get_content()
    assert "pid 4242" in body and "/usr/bin/python3 -m http.server 5002" in body
    assert [e["outcome"] for e in bed.history("story-stages")] == ["FAILED"]


# --- verification judges the port by its holder -------------------------------------

STORY_SVC = selfheal.Service(name="story-stages", unit=STORY, port=5002)
OTHER_APP = "/system.slice/other-app.service"
HTTP_SERVER = "/usr/bin/python3 -m http.server 5002"


def test_probe_counts_the_port_when_a_process_in_the_units_cgroup_holds_it(fake_host):
    fake_host.unit(STORY, ActiveState="active", SubState="running")
    fake_host.listen(5002, pid=5555, cgroup="/system.slice/story-stages.service")
    checks, _ = selfheal.probe(STORY_SVC)
    assert checks[-1] == selfheal.Check("port", True, "5002 listening (pid 5555 of story-stages.service)")


def test_probe_counts_a_holder_in_the_control_group_systemd_reports_for_an_alias(fake_host):
    # services.conf names an alias: the cgroup is named after the real unit, ControlGroup= says which
    fake_host.unit("books.service", ActiveState="active", ControlGroup="/system.slice/story-stages.service")
    fake_host.listen(5002, pid=5555, cgroup="/system.slice/story-stages.service/worker")
    checks, _ = selfheal.probe(selfheal.Service(name="books", unit="books.service", port=5002))
    assert checks[-1].ok and "pid 5555" in checks[-1].detail


def test_probe_port_held_by_another_units_process_is_not_up_and_names_pid_command_and_cgroup(fake_host):
    fake_host.unit(STORY, ActiveState="active", SubState="running", ControlGroup="/system.slice/story-stages.service")
    fake_host.listen(5002, pid=4242, cgroup=OTHER_APP, cmdline=HTTP_SERVER)
    checks, _ = selfheal.probe(STORY_SVC)
    port = checks[-1]
    assert (port.name, port.ok) == ("port", False)
    assert port.detail.startswith("5002 held by pid 4242 (user root, cgroup %s" % OTHER_APP)
    assert HTTP_SERVER in port.detail and "not by a process of story-stages.service" in port.detail
    assert port.detail.endswith("set port_owner = any in [story-stages])")  # the way out, for docker-proxy


def test_probe_with_port_owner_any_counts_another_units_listener_without_asking_ss(fake_host):
    fake_host.unit(STORY, ActiveState="active", SubState="running", ControlGroup="/system.slice/story-stages.service")
    fake_host.listen(5002, pid=4242, cgroup="/system.slice/docker.service", cmdline="/usr/bin/docker-proxy -host-port 5002")
    svc = dataclasses.replace(STORY_SVC, port_owner="any")
    checks, _ = selfheal.probe(svc)
    assert (checks[-1].name, checks[-1].ok) == ("port", True)
    assert "port_owner = any" in checks[-1].detail
    assert fake_host.calls("ss") == []


def test_probe_socket_of_the_unit_and_another_of_a_foreign_process_on_the_same_port_is_not_up(fake_host):
    fake_host.unit(STORY, ActiveState="active")
    fake_host.listen(5002, pid=5555, address="[::]", cgroup="/system.slice/story-stages.service")
    fake_host.listen(5002, pid=4242, cgroup=OTHER_APP, cmdline=HTTP_SERVER)  # takes the IPv4 clients
    checks, _ = selfheal.probe(STORY_SVC)
    assert not checks[-1].ok and "pid 4242" in checks[-1].detail and "pid 5555" not in checks[-1].detail


@pytest.mark.parametrize("started_ago, counted", [(600.0, False), (0.5, True)],
                         ids=["before-this-run-leftover", "after-this-run-began"])
def test_probe_counts_a_holder_of_the_unit_only_when_it_started_with_the_current_run(fake_host, started_ago, counted):
    from conftest import monotonic_usec
    fake_host.unit(STORY, ActiveState="active", InactiveExitTimestampMonotonic=monotonic_usec(1.0))
    fake_host.listen(5002, pid=4343, cgroup="/system.slice/" + STORY, cmdline="python3 app.py --fork-child",
                     started=time.monotonic() - started_ago)
    checks, _ = selfheal.probe(STORY_SVC)
    assert checks[-1].ok is counted
    assert ("a leftover of an earlier run of %s" % STORY in checks[-1].detail) is not counted
    assert "pid 4343" in checks[-1].detail


def test_read_process_says_when_the_process_started_after_boot():
    with subprocess.Popen(["sleep", "30"]) as child:
        try:
            started = selfheal.read_process(child.pid).started
        finally:
            child.kill()
    assert started is not None and abs(started - time.monotonic()) < 5.0  # monotonic == boottime here


REAL_LISTEN_INODES = selfheal.listen_inodes  # fake_host points it at the fake host's /proc/net


def test_listen_inodes_are_those_of_listen_sockets_on_the_port_in_tcp_and_tcp6(tmp_path):
    (tmp_path / "net").mkdir()
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    rest = " 00000000:00000000 00:00000000 00000000     0        0 %d 1 0000000000000000 100 0 0 10 0\n"
    (tmp_path / "net" / "tcp").write_text(
        header + "   0: 00000000:138A 00000000:0000 0A" + rest % 111      # 0.0.0.0:5002 LISTEN
        + "   1: 0100007F:138A 0100007F:C350 01" + rest % 222              # a connection to it
        + "   2: 00000000:138B 00000000:0000 0A" + rest % 333)             # :5003
    (tmp_path / "net" / "tcp6").write_text(header + "   0: %s:138A %s:0000 0A" % ("0" * 32, "0" * 32) + rest % 444)
    assert selfheal.listen_inodes(5002, tmp_path) == {"111", "444"}
    assert selfheal.listen_inodes(5004, tmp_path) == set()


@pytest.fixture
def own_listener(monkeypatch):
    """A real socket listening in this very process -> its port. read_process places every
    real process in story-stages.service's cgroup (the host's own may be anything, even /)."""
    real = selfheal.read_process

    def in_story(pid, proc=None):
        process = real(pid)
        return dataclasses.replace(process, cgroup="/system.slice/" + STORY) if process else None

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        monkeypatch.setattr(selfheal, "read_process", in_story)
        yield sock.getsockname()[1]


def test_main_process_holding_the_port_is_proven_from_proc_alone(own_listener):
    inodes = selfheal.listen_inodes(own_listener)
    assert len(inodes) == 1
    held = selfheal.main_holds_port(inodes, os.getpid(), STORY)
    assert held is not None and held.pid == os.getpid()
    assert selfheal.main_holds_port(inodes, os.getpid(), WORKER) is None  # not that unit's cgroup
    with subprocess.Popen(["sleep", "30"]) as child:  # a process that does not hold it
        try:
            assert selfheal.main_holds_port(inodes, child.pid, STORY) is None
        finally:
            child.kill()


def test_probe_of_a_port_its_main_process_holds_asks_no_ss(fake_host, monkeypatch, own_listener):
    monkeypatch.setattr(selfheal, "listen_inodes", REAL_LISTEN_INODES)
    fake_host.unit(STORY, ActiveState="active", MainPID=os.getpid())
    checks, _ = selfheal.probe(selfheal.Service(name="story-stages", unit=STORY, port=own_listener))
    assert checks[-1] == selfheal.Check("port", True, "%d listening (pid %d of %s)" % (own_listener, os.getpid(), STORY))
    assert fake_host.calls("ss") == []


def _ss_missing(host, monkeypatch):
    monkeypatch.setattr(selfheal, "SS", "selfheal-no-such-ss")


def _ss_p_refused(host, monkeypatch):
    with host.edit() as state:
        state["ss_fail_p"] = True


def _holder_gone(host, monkeypatch):
    with host.edit() as state:
        del state["listeners"][0]["cgroup"]  # its /proc entry is gone or unreadable


def _no_process_column(host, monkeypatch, socket_cgroup=None):
    with host.edit() as state:
        del state["listeners"][0]["pid"]  # ss -p run without the right to see it (no CAP_SYS_PTRACE)
        if socket_cgroup:
            state["listeners"][0]["socket_cgroup"] = socket_cgroup


def _no_process_column_old_ss(host, monkeypatch):
    _no_process_column(host, monkeypatch)
    with host.edit() as state:
        state["ss_no_cgroup"] = True


def _no_process_column_systemds_socket(host, monkeypatch):
    _no_process_column(host, monkeypatch, "/init.scope")


def _socket_unit(host, monkeypatch):
    with host.edit() as state:
        state["listeners"][0].update(pid=1, cgroup="/init.scope", cmdline="/sbin/init")


@pytest.mark.parametrize("blind, note", [
    (_ss_missing, "holder unknown: selfheal-no-such-ss: command not found"),
    (_ss_p_refused, "holder unknown: ss (fake): failed"),
    (_holder_gone, "holder unknown: ss names no live process (not root?)"),
    (_no_process_column_old_ss, "holder unknown: ss names no live process (not root?)"),
    (_no_process_column_systemds_socket, "holder unknown: ss names no live process (not root?)"),
    (_socket_unit, "held by systemd (socket activation)"),
], ids=["ss-missing", "ss-p-refused", "holder-gone", "no-process-column-no-cgroup-column",
        "no-process-column-socket-made-by-systemd", "socket-unit"])
def test_probe_port_whose_holder_cannot_be_told_counts_as_listening_and_says_so(fake_host, monkeypatch, blind, note):
    fake_host.unit(STORY, ActiveState="active")
    fake_host.listen(5002, pid=4242, cgroup=OTHER_APP)
    blind(fake_host, monkeypatch)
    checks, _ = selfheal.probe(STORY_SVC)
    assert checks[-1] == selfheal.Check("port", True, "5002 listening (%s; counted as the service's)" % note)


@pytest.mark.parametrize("socket_cgroup, ok, owner, detail", [
    (OTHER_APP, False, selfheal.PortOwner.FOREIGN,
     "5002 held by a socket of %s, not of %s (ss names no process: not root?) (if that process serves the port for "
     "%s, e.g. docker-proxy, set port_owner = any in [story-stages])" % (OTHER_APP, STORY, STORY)),
    ("/system.slice/" + STORY, True, selfheal.PortOwner.OWN,
     "5002 listening (a socket of %s; ss names no process)" % STORY),
], ids=["another-units-socket", "the-units-own-socket"])
def test_probe_without_the_holders_pid_judges_the_port_by_the_sockets_cgroup(fake_host, monkeypatch, socket_cgroup,
                                                                             ok, owner, detail):
    fake_host.unit(STORY, ActiveState="active")
    fake_host.listen(5002, pid=4242, cgroup=OTHER_APP)
    _no_process_column(fake_host, monkeypatch, socket_cgroup)
    checks, _ = selfheal.probe(STORY_SVC)
    assert checks[-1] == selfheal.Check("port", ok, detail) and checks[-1].owner is owner


def test_probe_asks_ss_only_when_the_port_listens_and_then_once(fake_host):
    fake_host.unit(STORY, ActiveState="active")
    checks, _ = selfheal.probe(STORY_SVC)
    assert checks[-1] == selfheal.Check("port", False, "5002 not listening")
    assert fake_host.calls("ss") == []
    fake_host.listen(5002, pid=5555, cgroup="/system.slice/story-stages.service")
    selfheal.probe(STORY_SVC)
    assert len(fake_host.calls("ss")) == 1


def only_restart(bed, strategies="service_restart"):
    """The heal config, story-stages with other strategies (and a short verify_timeout)."""
    story = dict(HEAL_SERVICES["story-stages"], strategies=strategies)
    bed.configure(verify_timeout="1s", services=dict(HEAL_SERVICES, **{"story-stages": story}))


def test_heal_port_held_by_a_foreign_process_is_failed_naming_it_and_restarts_nothing(
        bed, section):
    only_restart(bed)
    # the restarted run cannot bind (it opens no listener) and fails moments later; the stale
    # listener of another unit stays
    failed_again = {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code"}
    bed.host.failed(STORY, result="exit-code", code="1", status="1", then={"after": 0.4, "set": failed_again})
    bed.host.listen(5002, pid=4242, cgroup=OTHER_APP, cmdline=HTTP_SERVER)
    rc, _ = bed.heal("story-stages")

    assert rc == 1
    assert bed.host.actions() == []  # a restart cannot bind the port: none is tried
    assert [e["outcome"] for e in bed.history("story-stages")] == ["FAILED"]
    (msg,) = bed.sink.messages
    assert msg["Subject"] == "\u274c MiracleMax: story-stages - FAILED"
    body = msg.get_content()
    assert section(body, "ROOT CAUSE").startswith("It cannot start: port 5002 is held by another process: pid 4242")
    assert "selfheal restarted nothing" in body
    assert OTHER_APP in body and HTTP_SERVER in body
    assert bed.host.load()["listeners"][0]["pid"] == 4242  # nothing signalled it


def test_restart_while_a_leftover_of_the_units_earlier_run_holds_the_port_is_failed_naming_it(bed):
    only_restart(bed)  # KillMode=process left a child holding the port; no port_conflict
    failed_again = {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code"}
    bed.host.failed(STORY, result="exit-code", code="1", status="1", then={"after": 0.4, "set": failed_again})
    bed.host.listen(5002, pid=4343, cgroup="/system.slice/" + STORY, cmdline="python3 app.py --fork-child",
                    started=time.monotonic() - 600)
    rc, _ = bed.heal("story-stages")

    assert rc == 1
    assert bed.host.actions() == [["systemctl", "restart", "--", STORY]]
    (msg,) = bed.sink.messages
    assert msg["Subject"].endswith("story-stages - FAILED")
    assert "port: 5002 held by pid 4343" in msg.get_content()
    assert "a leftover of an earlier run of %s" % STORY in msg.get_content()


def test_heal_foreign_holder_of_the_port_stops_the_heal_before_any_restart_or_signal(bed, monkeypatch):
    procs = FakeProcesses(monkeypatch, bed.host)
    only_restart(bed, "service_restart, port_conflict")
    bed.host.failed(STORY, result="exit-code", code="1", status="1")
    procs.add(4242, OTHER_APP, HTTP_SERVER, port=5002)
    rc, _ = bed.heal("story-stages")

    assert rc == 1
    assert bed.host.actions() == []  # a restart could not bind the port; the holder is not ours
    assert procs.kills == []
    (event,) = bed.history("story-stages")
    assert (event["outcome"], event["strategy"]) == ("FAILED", "service_restart")
    text = bed.sink.messages[0].get_content()
    assert "port 5002 is held by a process that is not story-stages.service's" in text and HTTP_SERVER in text


def test_stale_pid_of_the_unit_itself_gets_sigterm_and_then_the_unit_is_restarted(bed, monkeypatch):
    procs = FakeProcesses(monkeypatch, bed.host)
    bed.host.failed(STORY, result="exit-code", code="1", status="1", listen={"port": 5002, "pid": 5555})
    procs.add(4343, "/system.slice/story-stages.service", "/usr/bin/python3 app.py --port 5002", port=5002)
    rc, _ = bed.heal("story-stages")

    assert rc == 0
    assert procs.kills == [(4343, signal.SIGTERM)]
    assert bed.host.actions() == [["kill", "-TERM", "4343"], ["systemctl", "restart", "--", STORY]]
    (event,) = bed.history("story-stages")
    assert (event["outcome"], event["strategy"]) == ("RESOLVED", "port_conflict")
    assert "4343" in bed.sink.messages[0].get_content()


def test_stale_pid_that_ignores_sigterm_gets_sigkill_after_the_grace(bed, monkeypatch):
    procs = FakeProcesses(monkeypatch, bed.host)
    procs.exit_on = (signal.SIGKILL,)
    monkeypatch.setattr(selfheal, "KILL_GRACE", 0.2)
    bed.host.failed(STORY, result="exit-code", code="1", status="1", listen={"port": 5002, "pid": 5555})
    procs.add(4343, "/system.slice/story-stages.service", port=5002)
    rc, _ = bed.heal("story-stages")
    assert rc == 0
    assert procs.kills == [(4343, signal.SIGTERM), (4343, signal.SIGKILL)]


def test_circuit_breaker_escalates_with_exactly_one_mail_then_stays_quiet_until_resume(bed, section, as_root):
    bed.configure(failure_threshold=2)
    for _ in range(2):
        bed.host.failed(WORKER)
        assert bed.heal("worker")[0] == 0
    assert len(bed.sink.messages) == 2

    bed.host.failed(WORKER)
    bed.host.clear_calls()
    rc, _ = bed.heal("worker")
    assert rc == 1
    assert bed.host.actions() == []
    assert len(bed.sink.messages) == 3
    escalation = bed.sink.messages[2]
    assert "ESCALATED" in escalation["Subject"]
    assert "resume worker" in section(escalation.get_content(), "WHY A HUMAN IS NEEDED")

    rc, _ = bed.heal("worker")
    assert rc == 1
    assert bed.host.actions() == []
    assert len(bed.sink.messages) == 3

    assert selfheal.main(["resume", "worker"]) == 0
    rc, _ = bed.heal("worker")
    assert rc == 0
    assert [c[1] for c in bed.host.actions()] == ["restart"]
    assert len(bed.sink.messages) == 4 and "RESOLVED" in bed.sink.messages[3]["Subject"]


def test_paused_service_gets_no_systemctl_call_and_no_mail(bed, as_root):
    bed.host.failed(WORKER)
    assert selfheal.main(["pause", "worker"]) == 0
    bed.host.clear_calls()
    rc, out = bed.heal("worker")
    assert rc == 0
    assert bed.host.calls() == []
    assert bed.sink.messages == []
    assert "paused" in out
    assert selfheal.main(["resume", "worker"]) == 0
    assert bed.heal("worker")[0] == 0
    assert [c[1] for c in bed.host.actions()] == ["restart"]


def test_pause_for_a_while_ends_by_itself(fake_host):
    selfheal.save_service_state(fake_host.paths, "worker", {"paused_until": 1000.0})
    assert selfheal.paused_until(fake_host.paths, "worker", now=999.0) == 1000.0
    assert selfheal.paused_until(fake_host.paths, "worker", now=1000.5) is None
    selfheal.save_service_state(fake_host.paths, "worker", {"paused_until": 0.0})
    assert selfheal.paused_until(fake_host.paths, "worker", now=1e12) == 0.0  # until resumed


def test_two_triggers_at_once_give_one_restart_and_one_mail(bed):
    # OnFailure= and a manual heal (or the watch) for the same crash, at the same moment:
    # the second waits for the first, then finds the run it brought back and says nothing.
    import threading

    bed.host.failed(WORKER)
    results = []
    threads = [threading.Thread(target=lambda t=t: results.append(bed.heal("worker", trigger=t)[0]))
               for t in ("onfailure", "manual")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [0, 0]
    assert [c[1] for c in bed.host.actions()] == ["restart"]
    assert len(bed.sink.messages) == 1
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED"]


def test_trigger_gives_up_when_a_heal_holds_the_lock_beyond_its_patience(bed, monkeypatch):
    bed.host.failed(WORKER)
    monkeypatch.setattr(selfheal.Lock, "wait", lambda self, timeout: False)
    rc, out = bed.heal("worker")
    assert rc == 0 and "already running" in out
    assert bed.host.actions() == [] and bed.sink.messages == []


def test_trigger_that_waited_for_a_heal_finds_that_run_healthy_and_stays_silent(bed):
    # A manual heal and systemd's OnFailure= trigger for the same crash: the one that got
    # the lock first healed and mailed; the other finds the run it brought back.
    bed.host.failed(WORKER)
    assert bed.heal("worker", trigger="manual")[0] == 0
    assert len(bed.sink.messages) == 1
    rc, _ = bed.heal("worker", trigger="onfailure")
    assert rc == 0
    assert [c[1] for c in bed.host.actions()] == ["restart"]
    assert len(bed.sink.messages) == 1
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED"]


def test_service_found_healthy_in_a_new_run_after_a_failure_is_reported_recovered(bed):
    # Not the run selfheal brought back: someone (or systemd) restarted it. That is news.
    bed.host.failed(WORKER)
    bed.heal("worker", trigger="manual")
    bed.host.unit(WORKER, ActiveState="active", SubState="running", InvocationID="another-run", Result="signal")
    rc, _ = bed.heal("worker", trigger="onfailure")
    assert rc == 0
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED", "RECOVERED"]
    assert len(bed.sink.messages) == 2


def test_dry_run_prints_the_plan_and_changes_nothing(bed):
    bed.host.failed(WORKER, result="start-limit-hit", code="1", status="1")
    rc, out = bed.heal("worker", dry_run=True)
    assert rc == 0
    assert bed.host.actions() == []
    assert bed.sink.messages == []
    assert not bed.paths.history.exists()
    assert "systemctl reset-failed worker.service" in out
    assert "systemctl restart worker.service" in out
    assert "dry run" in out


def test_dry_run_leaves_queued_mail_in_the_queue(bed):
    queue_report(bed.paths, bed.config.settings, "queued earlier")
    bed.host.failed(WORKER)
    bed.heal("worker", dry_run=True)
    assert len(bed.spooled()) == 1
    assert bed.sink.messages == []


def test_healthy_service_healed_by_hand_is_left_alone_without_mail(bed):
    bed.host.unit(WORKER, ActiveState="active", SubState="running")
    rc, out = bed.heal("worker", trigger="manual")
    assert rc == 0
    assert bed.host.actions() == []
    assert bed.sink.messages == []
    assert bed.history() == []


def test_service_not_in_the_config_is_a_usage_error(bed):
    with pytest.raises(selfheal.UsageError):
        bed.heal("nope")


def test_heal_without_dry_run_needs_root(bed, capsys, not_root, monkeypatch):
    monkeypatch.setattr(selfheal.sys, "argv", ["selfheal", "heal", "worker"])
    bed.host.failed(WORKER)
    assert selfheal.main(["heal", "worker"]) == selfheal.EX_USAGE
    assert capsys.readouterr().err == "selfheal: heal needs root (try: sudo selfheal heal worker)\n"
    assert bed.host.actions() == []


def test_heal_command_as_root_heals_through_main(bed, as_root):
    bed.host.failed(WORKER)
    assert selfheal.main(["heal", "worker"]) == 0
    assert [c[1] for c in bed.host.actions()] == ["restart"]


def test_heal_dry_run_through_main_works_without_root_and_restarts_nothing(bed):
    bed.host.failed(WORKER)
    assert selfheal.main(["heal", "--dry-run", "worker"]) == 0
    assert bed.host.actions() == []


@pytest.mark.parametrize("argv, words", [(["heal", "--dry-run", "worker"], "systemctl restart worker.service"),
                                         (["status", "--json"], '"services"')], ids=["heal-dry-run", "status"])
def test_main_prints_to_the_current_stdout(bed, capsys, argv, words):
    bed.host.failed(WORKER)
    selfheal.main(argv)
    assert words in capsys.readouterr().out


# =============================================================================
# State: history, status, service log
# =============================================================================


def test_heal_records_history_status_file_and_service_log(bed):
    bed.host.failed(WORKER)
    bed.heal("worker")
    (event,) = bed.history("worker")
    status = json.loads(bed.paths.status("worker").read_text())
    assert status == event
    assert event["service"] == "worker" and event["unit"] == WORKER
    log_text = bed.paths.service_log("worker").read_text()
    assert bed.sink.messages[0]["Subject"] in log_text


def _event(ts, outcome="RESOLVED", service="worker"):
    return json.dumps({"ts": ts, "service": service, "outcome": outcome})


def test_read_history_skips_a_torn_last_line(tmp_path):
    paths = selfheal.Paths(tmp_path, tmp_path, tmp_path)
    paths.history.write_text(_event(1.0) + "\n" + _event(2.0, "FAILED") + "\n" + '{"ts": 3.0, "serv')
    assert [e["outcome"] for e in selfheal.read_history(paths)] == ["RESOLVED", "FAILED"]


def test_read_history_filters_by_service_and_time(tmp_path):
    paths = selfheal.Paths(tmp_path, tmp_path, tmp_path)
    paths.history.write_text("\n".join([_event(1.0), _event(5.0), _event(6.0, service="other"), "[1, 2]"]) + "\n")
    assert [e["ts"] for e in selfheal.read_history(paths, "worker", since=2.0)] == [5.0]
    assert selfheal.read_history(selfheal.Paths(tmp_path / "none", tmp_path, tmp_path)) == []


def test_event_appended_after_a_torn_line_is_still_read(tmp_path):
    paths = selfheal.Paths(tmp_path, tmp_path, tmp_path)
    paths.history.write_text(_event(1.0) + "\n" + '{"ts": 2.0, "serv')
    selfheal.append_line(paths.history, _event(3.0, "FAILED"))
    assert [e["ts"] for e in selfheal.read_history(paths)] == [1.0, 3.0]


def test_atomic_write_that_fails_leaves_the_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "status.json"
    selfheal.atomic_write(target, "old\n")
    with pytest.raises(UnicodeEncodeError):
        selfheal.atomic_write(target, "new \udcff\n")  # cannot be encoded: fails mid-write
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


def test_atomic_write_replaces_content_and_sets_the_mode(tmp_path):
    target = tmp_path / "sub" / "file"
    selfheal.atomic_write(target, "one\n", mode=0o600)
    selfheal.atomic_write(target, "two\n", mode=0o640)
    assert target.read_text() == "two\n"
    assert target.stat().st_mode & 0o777 == 0o640


def test_record_heal_survives_an_unwritable_status_dir(bed, tmp_path, caplog):
    bed.host.failed(WORKER)
    run_dir = bed.paths.run
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "worker.json").mkdir()  # the status file cannot be replaced by a file
    rc, _ = bed.heal("worker")
    assert rc == 0
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED"]
    assert len(bed.sink.messages) == 1
    assert any("status file" in r.getMessage() for r in caplog.records)


def test_lock_is_exclusive_and_released(tmp_path):
    path = tmp_path / "locks" / "x.lock"
    first, second = selfheal.Lock(path), selfheal.Lock(path)
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


def test_send_signal_reaches_a_real_process_of_the_unit_through_its_pidfd(monkeypatch):
    child = subprocess.Popen(["sleep", "30"])
    try:
        me = selfheal.Process(child.pid, "root", "sleep 30", "/system.slice/story-stages.service")
        monkeypatch.setattr(selfheal, "read_process", lambda pid, proc=None: me if pid == child.pid else None)
        assert selfheal.send_signal(child.pid, signal.SIGTERM, STORY) is True
        assert child.wait(timeout=5) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()


def test_send_signal_refuses_a_process_outside_the_unit_and_reports_a_gone_one(monkeypatch):
    child = subprocess.Popen(["sleep", "30"])
    try:
        other = selfheal.Process(child.pid, "root", "sleep 30", "/system.slice/other.service")
        monkeypatch.setattr(selfheal, "read_process", lambda pid, proc=None: other if pid == child.pid else None)
        assert selfheal.send_signal(child.pid, signal.SIGTERM, STORY) is False
        assert child.poll() is None  # not signalled
    finally:
        child.kill()
        child.wait()
    assert selfheal.send_signal(child.pid, signal.SIGTERM, STORY) is False  # gone: no error


@pytest.mark.parametrize("text, seconds", [
    ("1min 30s", 90.0), ("90s", 90.0), ("100ms", 0.1), ("5min", 300.0), ("1h 2min 3s", 3723.0),
    ("infinity", selfheal.MAX_JOB_SECONDS), ("", 0.0)])
def test_parse_timespan_reads_systemds_own_format(text, seconds):
    assert selfheal.parse_timespan(text) == pytest.approx(seconds)


def test_restart_job_gets_the_units_own_stop_timeout_and_its_start_timeout_up_to_verify_timeout(bed):
    diag = selfheal.Diagnosis({"TimeoutStopUSec": "1min 30s", "TimeoutStartUSec": "1min 30s"},
                              "signal", "killed", "KILL", False, (), (), (), None, None)
    ctx = selfheal.HealContext(bed.config.services["worker"], diag, bed.config.settings)
    verify = bed.config.settings.verify_timeout
    # 90 + verify_timeout + 5: a unit that ignores SIGTERM still restarts; a start that is not
    # up within verify_timeout would not be healthy in time either (PostgreSQL waiting for a PID file)
    assert ctx.job_timeout() == 90 + verify + 5
    down = selfheal.Diagnosis({"TimeoutStopUSec": "1h", "TimeoutStartUSec": "1min 30s", "ActiveState": "failed"},
                              "signal", "killed", "KILL", False, (), (), (), None, None)
    ctx = selfheal.HealContext(bed.config.services["worker"], down, bed.config.settings)
    assert ctx.job_timeout() == verify + 5  # PostgreSQL (TimeoutStopSec=1h) already down: only its start
    quick = selfheal.Diagnosis({"TimeoutStopUSec": "1s", "TimeoutStartUSec": "1s"},
                               "signal", "killed", "KILL", False, (), (), (), None, None)
    ctx = selfheal.HealContext(bed.config.services["worker"], quick, bed.config.settings)
    assert ctx.job_timeout() == max(bed.config.settings.verify_timeout, 7.0)  # never less than verify_timeout


def test_a_crash_inside_selfheal_is_mailed_as_failed_with_its_traceback(bed, monkeypatch):
    bed.host.failed(WORKER)

    def broken(*args, **kwargs):
        raise RuntimeError("bug in a strategy")

    monkeypatch.setattr(selfheal, "heal", broken)
    rc, _ = bed.heal("worker")
    assert rc == 1
    (msg,) = bed.sink.messages
    assert msg["Subject"] == "❌ MiracleMax: worker - FAILED (selfheal crashed)"
    assert "RuntimeError: bug in a strategy" in msg.get_content()
    assert "systemctl status worker.service" in msg.get_content()
    assert [e["outcome"] for e in bed.history("worker")] == ["FAILED"]


def test_a_broken_config_is_mailed_once_an_hour_with_the_last_good_settings(bed, tmp_path, monkeypatch, as_root):
    bed.paths.state.mkdir(parents=True, exist_ok=True)
    (bed.paths.state / "last-good.conf").write_text(open(bed.config_path).read())
    broken = tmp_path / "broken.conf"
    broken.write_text("[selfheal]\nemail_to = nobody\n\n[worker]\nprot = 1\n")
    os.chmod(str(broken), 0o644)
    monkeypatch.setenv("SELFHEAL_CONFIG", str(broken))
    assert selfheal.main(["watch"]) == 78
    assert selfheal.main(["watch"]) == 78
    (msg,) = bed.sink.messages
    assert msg["Subject"] == "❌ MiracleMax: selfheal - CONFIG BROKEN"
    assert "prot: unknown key" in msg.get_content()


def test_oom_killed_service_is_healed_and_the_root_cause_says_out_of_memory_with_the_peak(bed, section):
    # systemd's own words and result for an OOM kill (the drill containers have no memory
    # controller, so this is proven here, from what systemd 252+ really says).
    bed.host.failed(WORKER, result="oom-kill", code="2", status="9", MemoryPeak=str(512 * 1024 * 1024))
    bed.host.journal([
        "2026-11-28T05:00:00+0000 vm systemd[1]: worker.service: A process of this unit has been killed by "
        "the OOM killer.",
        "2026-11-28T05:00:00+0000 vm systemd[1]: worker.service: Main process exited, code=killed, status=9/KILL",
        "2026-11-28T05:00:00+0000 vm systemd[1]: worker.service: Failed with result 'oom-kill'.",
    ])
    rc, _ = bed.heal("worker")
    assert rc == 0
    body = bed.sink.messages[0].get_content()
    cause = section(body, "ROOT CAUSE")
    assert "out-of-memory killer" in cause and "peak memory 512.0 MiB" in cause
    assert "Triage: oom (systemd result oom-kill)" in section(body, "DIAGNOSIS")
    assert "killed by the OOM killer" in section(body, "JOURNAL OF THE FAILED RUN (last 3 lines)")


def test_run_systemd_started_moments_ago_gets_time_to_come_up_and_is_not_restarted_again(bed):
    # systemd 257: OnFailure= may find systemd's new run already active but not yet listening.
    # Restarting it then would be a second restart on top of systemd's.
    from conftest import monotonic_usec

    bed.host.unit(STORY, ActiveState="active", SubState="running", Result="success", NRestarts="1",
                  ActiveEnterTimestampMonotonic=monotonic_usec(0.1),
                  listen={"port": 5002, "pid": 4321}, then={"after": 0.4, "listen": True})
    env = {"MONITOR_UNIT": STORY, "MONITOR_SERVICE_RESULT": "signal", "MONITOR_EXIT_CODE": "killed",
           "MONITOR_EXIT_STATUS": "KILL", "MONITOR_INVOCATION_ID": "crashed-run"}
    rc, _ = bed.heal("story-stages", env=env)
    assert rc == 0
    assert bed.host.actions() == []
    assert [e["outcome"] for e in bed.history("story-stages")] == ["RECOVERED"]
    assert "recovered by systemd" in bed.sink.messages[0]["Subject"]


def test_live_unit_without_a_main_pid_is_never_signalled_by_port_conflict_only_restarted(bed, monkeypatch):
    """oneshot + RemainAfterExit= (or forking without PIDFile=): MainPID=0 while its processes
    serve the port. A hang is for systemd to stop (ExecStop=, TimeoutStopSec=), never a
    SIGTERM/SIGKILL from port_conflict."""
    procs = FakeProcesses(monkeypatch, bed.host)
    bed.host.unit(STORY, ActiveState="active", SubState="exited", MainPID="0", Type="oneshot",
                  InvocationID="run-1", NRestarts="0")
    procs.add(4343, "/system.slice/story-stages.service", "/usr/bin/python3 app.py --port 5002", port=5002)
    selfheal.write_finding(bed.paths, "story-stages", selfheal.Finding(
        "unhealthy", "port 5002 open but GET http://127.0.0.1:5002/health: no answer within 2 s", time.time(),
        invocation="run-1"))
    bed.heal("story-stages")  # started by the watch as selfheal@story-stages: the finding says why
    assert procs.kills == []
    assert ["systemctl", "restart", "--", STORY] in bed.host.actions()
    assert not [a for a in bed.host.actions() if a[0] == "kill"]
    body = bed.sink.messages[0].get_content()
    assert "its current run, not a leftover; nothing signalled" in body


def test_leftover_is_not_signalled_once_the_unit_runs_again_meanwhile(bed, monkeypatch):
    """Between the look and the signal the unit started a new run: a process not older than
    that run may be part of it, so it is left alone."""
    procs = FakeProcesses(monkeypatch, bed.host)
    bed.host.failed(STORY, result="exit-code", code="1", status="1", listen={"port": 5002, "pid": 5555})
    procs.add(4343, "/system.slice/story-stages.service", "/usr/bin/python3 app.py --port 5002", port=5002)
    procs.table[4343] = dataclasses.replace(procs.table[4343], started=time.monotonic())
    svc = bed.config.services["story-stages"]
    ctx = selfheal.HealContext(svc, selfheal.diagnose(svc, {}), bed.config.settings, paths=bed.paths)
    since = selfheal.parse_usec_timestamp(ctx.diag.unit.get("InactiveExitTimestampMonotonic", ""))
    real_show = selfheal.show_unit

    def show(unit):  # by the time terminate checks, someone has started it again
        return dict(real_show(unit), ActiveState="active", SubState="running",
                    InactiveExitTimestampMonotonic=str(int((time.monotonic() - 1) * 1e6)))

    monkeypatch.setattr(selfheal, "show_unit", show)
    selfheal.terminate(ctx, procs.table[4343], since)
    assert procs.kills == []


def test_heals_asked_for_by_hand_count_neither_toward_the_threshold_nor_flapping(bed):
    """One real failure, then three `selfheal heal NAME` from a shell (as a FAILED mail tells
    the owner to run): no ESCALATED, no FLAPPING; the next real failure is still healed."""
    bed.configure(failure_threshold=2)
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0  # the real failure (OnFailure=)
    for _ in range(3):
        bed.host.failed(WORKER)
        assert bed.heal("worker", trigger="manual")[0] == 0
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0  # a second real failure: under failure_threshold = 2
    subjects = [str(m["Subject"]) for m in bed.sink.messages]
    assert not [s for s in subjects if "ESCALATED" in s or "FLAPPING" in s], subjects
    assert [e["outcome"] for e in bed.history("worker")] == ["RESOLVED"] * 5


def test_restart_that_never_finishes_ends_the_heal_failed_within_heal_timeout_naming_the_step(bed, monkeypatch):
    # heal_timeout keeps HEAL_RESERVE (5 s) to record and report: 1 s is as good here, and
    # the config's own check (heal_timeout >= verify_timeout + HEAL_RESERVE) reads it too.
    monkeypatch.setattr(selfheal, "HEAL_RESERVE", 1.0)
    bed.configure(heal_timeout="2s", verify_timeout="1s")
    bed.host.failed(STORY, on_restart="hang")
    started = time.monotonic()
    rc, _ = bed.heal("story-stages")
    took = time.monotonic() - started
    assert rc == 1
    assert took < 2 + 3, took  # heal_timeout, and the report after it
    (event,) = bed.history("story-stages")
    assert event["outcome"] == "FAILED"
    (msg,) = bed.sink.messages
    body = msg.get_content()
    assert "the heal did not finish within heal_timeout = 2 s" in body
    assert "`systemctl restart story-stages.service` did not finish" in body


@pytest.mark.parametrize("settings, message", [
    ({"heal_timeout": "20s", "verify_timeout": "30s"}, "heal_timeout (20 s) must be at least verify_timeout (30 s) + 5 s"),
    ({"heal_timeout": "9min"}, "at most 8 min"),
])
def test_heal_timeout_that_cannot_work_is_a_config_error(write_conf, settings, message):
    path = write_conf(conf(settings, {"web": {"port": 80}}))
    with pytest.raises(selfheal.ConfigError) as error:
        selfheal.load_config(path, trusted=False)
    assert any(message in p for p in error.value.problems), error.value.problems


def test_service_without_port_or_health_that_dies_a_second_after_its_restart_is_not_resolved(bed, monkeypatch):
    """"active" alone proves little: the run must stay up, the same run, for SETTLE_SECONDS."""
    monkeypatch.setattr(selfheal, "SETTLE_SECONDS", 0.6)
    died = {"ActiveState": "failed", "SubState": "failed", "Result": "exit-code", "ExecMainCode": "1",
            "ExecMainStatus": "1"}
    bed.host.failed(WORKER, then={"after": 0.2, "set": died})
    rc, _ = bed.heal("worker")
    assert rc == 1
    assert [e["outcome"] for e in bed.history("worker")][-1] == "FAILED"
    assert "RESOLVED" not in str(bed.sink.messages[-1]["Subject"])


def test_service_without_port_or_health_that_stays_up_is_resolved_after_settling(bed, monkeypatch):
    monkeypatch.setattr(selfheal, "SETTLE_SECONDS", 0.3)
    bed.host.failed(WORKER)
    started = time.monotonic()
    assert bed.heal("worker")[0] == 0
    assert time.monotonic() - started >= 0.3
    assert "RESOLVED" in str(bed.sink.messages[-1]["Subject"])


@pytest.mark.parametrize("props, ok", [
    ({"ActiveState": "inactive", "SubState": "dead", "Result": "success", "Type": "oneshot",
      "RemainAfterExit": "no", "ExecMainStatus": "0"}, True),
    ({"ActiveState": "inactive", "SubState": "dead", "Result": "success", "Type": "oneshot",
      "RemainAfterExit": "yes"}, False),
    ({"ActiveState": "failed", "SubState": "failed", "Result": "exit-code", "Type": "oneshot",
      "RemainAfterExit": "no"}, False),
    ({"ActiveState": "inactive", "SubState": "dead", "Result": "success", "Type": "simple"}, False),
], ids=["oneshot-run-succeeded", "remain-after-exit-stopped", "oneshot-run-failed", "simple-stopped"])
def test_probe_judges_a_oneshot_job_by_its_runs_result(fake_host, props, ok):
    fake_host.unit(WORKER, **props)
    checks, _ = selfheal.probe(selfheal.Service(name="worker", unit=WORKER))
    assert all(c.ok for c in checks) is ok


def test_verify_never_runs_past_verify_timeout_however_long_health_timeout_is(fake_host, monkeypatch):
    """A health endpoint that trickles its answer: each check gets only what is left."""
    fake_host.unit(STORY, ActiveState="active")
    fake_host.listen(5002, pid=5555, cgroup="/system.slice/story-stages.service")
    given = []

    def slow_check(url, timeout, expect_status=(), expect_text=""):
        given.append(timeout)
        time.sleep(timeout)
        return False, "no answer within %s" % selfheal.format_duration(timeout)

    monkeypatch.setattr(selfheal, "http_check", slow_check)
    svc = dataclasses.replace(STORY_SVC, health_url="http://127.0.0.1:5002/health", health_timeout=30.0)
    started = time.monotonic()
    result = selfheal.verify(svc, 0.5)
    took = time.monotonic() - started
    assert not result.ok and took < 1.5, took
    assert given and all(t <= 0.5 for t in given)


def test_verify_and_the_watch_judge_health_with_one_judgement_and_say_it_in_the_same_words(fake_host, monkeypatch):
    """probe (verify) and assess (the watch) both go through judge(): the same failing check
    reads the same in a report's verification and in the watch's finding."""
    fake_host.unit(STORY, ActiveState="active", SubState="running")
    fake_host.listen(5002, pid=5555, cgroup="/system.slice/story-stages.service")
    answer = (False, "HTTP 503 (expected 2xx/3xx)")
    monkeypatch.setattr(selfheal, "http_check", lambda url, timeout, *rest: answer)
    svc = dataclasses.replace(STORY_SVC, health_url="http://127.0.0.1:5002/health")
    checks, unit = selfheal.probe(svc)
    assert checks[-1] == selfheal.Check("health", False, "GET http://127.0.0.1:5002/health: HTTP 503 (expected 2xx/3xx)")
    verdict, detail = selfheal.assess(svc, unit, {5002}, answer, None)
    assert (verdict, detail) == ("unhealthy", "port 5002 open but " + checks[-1].detail)
    verdict, detail = selfheal.assess(svc, unit, set(), answer, None)
    assert (verdict, detail) == ("unhealthy", "port 5002 not listening while the unit is active (running)")
