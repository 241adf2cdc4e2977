"""Drill for deploy/ansible (issue: put selfheal on many hosts with Ansible).

Several booted systemd hosts at once, one per suite of SELFHEAL_BED_SUITES (two of the same
suite when only one is given), each with its own stand-in services and its own services in
the inventory. The real `ansible-playbook` runs deploy/ansible/site.yml and uninstall.yml
against them through a test-only connection plugin (tests/ansible/connection_plugins/
nsenter.py: the containers have no network and no ssh). Then each host heals a crash and
mails RESOLVED, as if installed by hand.

The tests run in file order on one fleet: deploy, rerun, --check, change, heal, status
(status.yml's table and merged JSON, then a service selfheal cannot bring back), uninstall.
Ansible is a tool of the deployer and of these tests only; selfheal never imports it.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time

import pytest

from bed import Container
from drillkit import (REPO_INSIDE, STANDIN, about, body, clear_mailbox, drill_suites, history, http_get, kill, show,
                      wait_for, wait_idle, web_unit)

pytestmark = pytest.mark.drill

PLAYBOOK_TIMEOUT = 600
STAGE = "/var/lib/selfheal-deploy"  # the role's selfheal_stage_dir
LIBDIR = "/usr/local/lib/selfheal"
PORTS = {"story-stages": 5002, "passgo": 5001, "actual-budget": 5006}
# Every host runs all three stand-ins; the inventory gives each host two of them, so the
# third one proves that a host gets the services of its own inventory entry and no others.
ROTATION = ["story-stages", "passgo", "actual-budget"]


def fleet_suites():
    suites = drill_suites()
    return suites if len(suites) > 1 else suites * 2


def host_names():
    return ["%s-%d" % (suite, i) for i, suite in enumerate(fleet_suites())]


def listed(index):
    """The services host number `index` has in the inventory (two of the three)."""
    return [ROTATION[(index + k) % 3] for k in range(2)]


def unlisted(index):
    return ROTATION[(index + 2) % 3]


@pytest.fixture(scope="module")
def ansible_playbook():
    """The ansible-playbook to run, or skip (a failure under CI=true, like bed_reason)."""
    path = shutil.which("ansible-playbook")
    if not path:
        reason = "ansible-playbook is missing (tests/run.sh installs ansible-core as root)"
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and " + reason)
        pytest.skip(reason)
    return path


class Fleet:
    """The booted hosts, the inventory Ansible reads, and ansible-playbook runs."""

    def __init__(self, boxes, repo_root, tmp, playbook):
        self.boxes, self.repo, self.tmp, self.playbook = boxes, repo_root, tmp, playbook
        self.names = host_names()
        self.inventory = tmp / "inventory.json"  # JSON is YAML: the yaml inventory plugin reads it
        self.hostvars = {}
        self.runs = 0
        for i, (name, box) in enumerate(zip(self.names, boxes)):
            self.hostvars[name] = {
                "ansible_connection": "nsenter",
                "ansible_nsenter_pid": box.pid,
                "ansible_become": False,  # root outside is root inside; no sudo in the bed
                "ansible_python_interpreter": "/usr/bin/python3",
                "selfheal_settings": {"name": "MiracleMax-%s" % name, "email_to": "root@localhost",
                                      "email_from": "selfheal@miraclemax.localdomain",
                                      "smtp_timeout": "3s", "verify_timeout": "10s"},
                "selfheal_services": {svc: {"port": PORTS[svc], "critical": svc == "story-stages",
                                            "strategies": ["port_conflict", "service_restart"],
                                            "health_url": "http://127.0.0.1:%d/health" % PORTS[svc]}
                                      for svc in listed(i)},
            }
        self.write_inventory()

    def write_inventory(self):
        self.inventory.write_text(json.dumps({"selfheal": {"hosts": self.hostvars}}, indent=1))

    def env(self):
        env = dict(os.environ)
        env.update({
            "ANSIBLE_CONNECTION_PLUGINS": str(self.repo / "tests/ansible/connection_plugins"),
            "ANSIBLE_PIPELINING": "True", "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "False", "ANSIBLE_LOCAL_TEMP": str(self.tmp / "ansible-tmp"),
            "ANSIBLE_CONFIG": str(self.tmp / "no-ansible.cfg"),  # no user or site config
            "ANSIBLE_FORKS": "5",
        })
        return env

    def run(self, playbook, *args):
        """ansible-playbook PLAYBOOK ARGS -> (CompletedProcess, {host: recap counts}, seconds)."""
        argv = [self.playbook, "-i", str(self.inventory), str(self.repo / "deploy/ansible" / playbook)]
        started = time.monotonic()
        done = subprocess.run(argv + list(args), env=self.env(), cwd=str(self.repo), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                              timeout=PLAYBOOK_TIMEOUT)
        seconds = time.monotonic() - started
        self.runs += 1
        log = self.tmp / ("%02d-%s.log" % (self.runs, playbook))
        log.write_text(done.stdout)
        print("ansible-playbook %s %s: exit %d in %.1f s (%s)" % (playbook, " ".join(args), done.returncode,
                                                                 seconds, log))
        return done, recap(done.stdout), seconds

    def box(self, name):
        return self.boxes[self.names.index(name)]


def recap(output):
    """{host: {"ok": n, "changed": n, "failed": n, ...}} from the PLAY RECAP lines."""
    counts = {}
    for line in output.split("PLAY RECAP")[-1].splitlines():
        match = re.match(r"^(\S+)\s+:\s+(.*)$", line)
        if match:
            counts[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return counts


def boot_host(stack, suite, repo_root):
    box = stack.enter_context(Container(suite=suite, binds_ro={str(repo_root): REPO_INSIDE}))
    box.run(["install", "-m", "0755", REPO_INSIDE + "/tests/standin.py", STANDIN])
    for svc, port in PORTS.items():
        box.write("/etc/systemd/system/%s.service" % svc, web_unit(port))
    box.run(["systemctl", "daemon-reload"])
    box.run(["systemctl", "enable", "--now", *PORTS])
    for port in PORTS.values():
        box.wait_listening(port)
    return box


@pytest.fixture(scope="module")
def fleet(bed_reason, ansible_playbook, repo_root, tmp_path_factory):
    if bed_reason:
        pytest.skip(bed_reason)
    with contextlib.ExitStack() as stack:
        boxes = [boot_host(stack, suite, repo_root) for suite in fleet_suites()]
        yield Fleet(boxes, repo_root, tmp_path_factory.mktemp("ansible"), ansible_playbook)


def sha(box, path):
    done = box.run(["sha256sum", path], check=False)
    return done.stdout.split()[0] if done.returncode == 0 else None


def exists(box, path):
    return box.run(["test", "-e", path], check=False).returncode == 0


def assert_recap(done, counts, expect_changed):
    """Every host ran without failure; expect_changed: {host: bool} (changed > 0 or == 0)."""
    assert done.returncode == 0, done.stdout[-6000:]
    assert set(counts) == set(expect_changed), done.stdout[-3000:]
    for host, changed in expect_changed.items():
        assert counts[host]["failed"] == 0 and counts[host]["unreachable"] == 0, done.stdout[-6000:]
        assert (counts[host]["changed"] > 0) == changed, (host, counts[host], done.stdout[-6000:])


# ---------------------------------------------------------------------------------------


def test_check_on_fresh_hosts_reports_changes_and_installs_nothing(fleet):
    done, counts, _ = fleet.run("site.yml", "--check", "--diff")
    assert_recap(done, counts, {name: True for name in fleet.names})
    assert "+[story-stages]" in done.stdout  # the diff shows the config that would be written
    for box in fleet.boxes:
        assert not exists(box, STAGE)
        assert not exists(box, "/etc/systemd/system/selfheal@.service")
        assert show(box, "story-stages.service", "OnFailure") == ""


def test_playbook_installs_each_host_with_the_services_of_its_own_inventory_entry(fleet):
    done, counts, seconds = fleet.run("site.yml")
    assert_recap(done, counts, {name: True for name in fleet.names})
    print("first deploy to %d hosts: %.1f s" % (len(fleet.names), seconds))
    for i, (name, box) in enumerate(zip(fleet.names, fleet.boxes)):
        for svc in listed(i):
            assert show(box, svc + ".service", "OnFailure") == "selfheal@%s.service" % svc, name
            assert exists(box, "/etc/systemd/system/%s.service.d/selfheal.conf" % svc)
        assert show(box, unlisted(i) + ".service", "OnFailure") == ""
        assert not exists(box, "/etc/systemd/system/%s.service.d/selfheal.conf" % unlisted(i))
        assert show(box, "selfheal-watch.timer", "ActiveState") == "active"
        assert exists(box, LIBDIR + "/selfheal.py")
        assert sha(box, LIBDIR + "/selfheal.py") == hashlib.sha256(
            (fleet.repo / "selfheal.py").read_bytes()).hexdigest()
        conf = box.run(["cat", "/etc/selfheal/services.conf"]).stdout
        assert "name = MiracleMax-%s" % name in conf
        assert "strategies = port_conflict, service_restart" in conf
        assert ("critical = yes" in conf) == ("story-stages" in listed(i))
        assert box.run(["selfheal", "validate"]).returncode == 0


def test_second_run_reports_changed_0_on_every_host(fleet):
    done, counts, seconds = fleet.run("site.yml")
    assert_recap(done, counts, {name: False for name in fleet.names})
    print("rerun on %d hosts (nothing to do): %.1f s" % (len(fleet.names), seconds))


def test_check_sees_drift_on_a_host_changes_nothing_and_the_real_run_repairs_it(fleet):
    """A drop-in deleted by hand: --check says that host would change (selfheal's install
    --dry-run), touches nothing; the real run puts it back; then all is changed=0 again."""
    last = fleet.names[-1]
    box = fleet.box(last)
    svc = listed(len(fleet.names) - 1)[0]
    dropin = "/etc/systemd/system/%s.service.d/selfheal.conf" % svc
    box.run(["rm", dropin])
    done, counts, _ = fleet.run("site.yml", "--check")
    assert_recap(done, counts, {name: name == last for name in fleet.names})
    assert not exists(box, dropin)
    done, counts, _ = fleet.run("site.yml")
    assert_recap(done, counts, {name: name == last for name in fleet.names})
    assert exists(box, dropin)
    done, counts, _ = fleet.run("site.yml", "--check")
    assert_recap(done, counts, {name: False for name in fleet.names})


def test_check_diff_of_one_hosts_changed_var_reports_it_and_changes_no_file(fleet):
    first = fleet.names[0]
    box = fleet.box(first)
    before = {path: sha(box, path) for path in (STAGE + "/services.conf", "/etc/selfheal/services.conf")}
    svc = listed(0)[0]
    fleet.hostvars[first]["selfheal_services"][svc]["on_stopped"] = "report"
    fleet.write_inventory()
    done, counts, _ = fleet.run("site.yml", "--check", "--diff")
    assert_recap(done, counts, {name: name == first for name in fleet.names})
    assert "+on_stopped = report" in done.stdout
    assert {path: sha(box, path) for path in before} == before


def test_real_run_applies_the_changed_var_to_that_host_only_and_keeps_the_old_config(fleet):
    first = fleet.names[0]
    done, counts, _ = fleet.run("site.yml")
    assert_recap(done, counts, {name: name == first for name in fleet.names})
    box = fleet.box(first)
    assert "on_stopped = report" in box.run(["cat", "/etc/selfheal/services.conf"]).stdout
    assert "on_stopped" not in box.run(["cat", "/etc/selfheal/services.conf.bak"]).stdout
    for other in fleet.boxes[1:]:
        assert not exists(other, "/etc/selfheal/services.conf.bak")


def test_config_selfheal_rejects_fails_that_host_only_and_replaces_nothing(fleet):
    first = fleet.names[0]
    box = fleet.box(first)
    paths = (STAGE + "/services.conf", "/etc/selfheal/services.conf")
    before = {path: sha(box, path) for path in paths}
    svc = listed(0)[0]
    fleet.hostvars[first]["selfheal_services"][svc]["port"] = "http"
    fleet.write_inventory()
    try:
        done, counts, _ = fleet.run("site.yml")
    finally:
        fleet.hostvars[first]["selfheal_services"][svc]["port"] = PORTS[svc]
        fleet.write_inventory()
    assert done.returncode != 0
    assert counts[first]["failed"] == 1
    assert "failed to validate" in done.stdout and "[%s] port" % svc in done.stdout
    assert {path: sha(box, path) for path in paths} == before
    for other in fleet.names[1:]:
        assert counts[other]["failed"] == 0 and counts[other]["changed"] == 0, counts


def test_sigkilled_service_on_each_host_is_healed_and_mailed_resolved(fleet):
    for i, (name, box) in enumerate(zip(fleet.names, fleet.boxes)):
        svc = listed(i)[-1]
        clear_mailbox(box)
        old_pid = show(box, svc, "MainPID")
        started = time.monotonic()
        box.run(["systemctl", "kill", "--kill-who=main", "-s", "KILL", svc])
        [mail] = box.wait_mail(about(svc, "RESOLVED"), timeout=40)
        print("%s: %s killed -> RESOLVED mail in %.2f s" % (name, svc, time.monotonic() - started))
        assert str(mail["Subject"]) == "✅ MiracleMax-%s: %s - RESOLVED" % (name, svc)
        assert "killed by signal KILL" in body(mail)
        assert http_get(box, PORTS[svc]) == "200"
        assert show(box, svc, "MainPID") not in ("0", old_pid)


def run_status(fleet):
    """ansible-playbook status.yml -> (CompletedProcess, recap, the table it printed, the merged JSON)."""
    out = fleet.tmp / "fleet-status.json"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    done, counts, seconds = fleet.run("status.yml", "-e", "selfheal_status_file=%s" % out)
    print("status of %d hosts: %.1f s" % (len(fleet.names), seconds))
    return done, counts, printed_table(done.stdout), json.loads(out.read_text())


def printed_table(output):
    """The lines the "Fleet status" task printed (its msg, a list of strings)."""
    after = output.split("TASK [selfheal : Fleet status]", 1)[1]
    block = after.split('"msg": [\n', 1)[1].split("\n    ]", 1)[0]
    return [json.loads(line.strip().rstrip(",")) for line in block.splitlines()]


def table_row(table, host, service):
    [row] = [line for line in table if line.split()[:2] == [host, service]]
    return row


def test_status_playbook_tables_every_host_and_service_writes_the_merged_json_and_exits_0(fleet):
    done, counts, table, merged = run_status(fleet)
    assert_recap(done, counts, {name: False for name in fleet.names})
    print("\n".join(table))
    assert list(merged["hosts"]) == fleet.names and merged["problems"] == []
    for i, name in enumerate(fleet.names):
        entry = merged["hosts"][name]
        assert entry["name"] == "MiracleMax-%s" % name and entry["healthy"] is True
        assert [s["name"] for s in entry["services"]] == listed(i)
        for svc in listed(i):
            row = table_row(table, name, svc)
            assert row.split()[2] == "active" and row.endswith("mail 0, webhook 0"), row
        assert "RESOLVED" in table_row(table, name, listed(i)[-1])  # the heal of the step before
    assert "%d host(s), %d service(s): no problem" % (len(fleet.names), 2 * len(fleet.names)) in table


BROKEN = "/run/systemd/system/%s.service.d/zz-drill-broken.conf"


def test_status_playbook_exits_non_zero_and_names_a_service_selfheal_could_not_bring_back(fleet):
    """A start that always fails (ExecStartPre=/bin/false) and a crash: selfheal's restart
    cannot bring it back, status says failed, the playbook names that host and service."""
    i = 1 % len(fleet.names)
    name, box, svc = fleet.names[i], fleet.boxes[i], listed(i)[0]
    heals = len(history(box, svc))
    box.sh("mkdir -p \"$(dirname %s)\" && printf '[Service]\\nExecStartPre=/bin/false\\n' > %s"
           % (BROKEN % svc, BROKEN % svc))
    box.run(["systemctl", "daemon-reload"])
    try:
        kill(box, svc)
        wait_for(lambda: len(history(box, svc)) > heals, 60, "selfheal's heal of %s" % svc)
        wait_idle(box, svc, timeout=60)
        done, counts, table, merged = run_status(fleet)
    finally:
        box.run(["rm", "-f", BROKEN % svc])
        box.run(["systemctl", "daemon-reload"])
        box.run(["selfheal", "resume", svc])  # in case the failed heals escalated it
        wait_idle(box, svc, timeout=60)
        box.run(["systemctl", "reset-failed", svc])
        box.run(["systemctl", "start", svc])
        box.wait_listening(PORTS[svc])
    print("\n".join(table))
    assert history(box, svc)[-1]["outcome"] != "RESOLVED"
    assert done.returncode != 0, done.stdout[-6000:]
    for other in fleet.names:
        assert counts[other]["failed"] == (1 if other == name else 0), counts
    assert [(p["host"], p["service"]) for p in merged["problems"]] == [(name, svc)]
    assert "problem: %s %s: %s" % (name, svc, merged["problems"][0]["problem"]) in table
    assert table_row(table, name, svc).split()[2] != "active"
    assert "%d host(s), %d service(s): 1 problem(s)" % (len(fleet.names), 2 * len(fleet.names)) in table
    for j, other in enumerate(fleet.names):  # every other row is still there
        assert [s["name"] for s in merged["hosts"][other]["services"]] == listed(j)
        for other_svc in listed(j):
            table_row(table, other, other_svc)
    # put back: the uninstall step finds every service running and selfheal content
    wait_for(lambda: box.run(["selfheal", "status", "--service", svc], check=False).returncode == 0, 30,
             "selfheal status to say %s is fine again" % svc)


def test_uninstall_removes_units_and_dropins_keeps_services_running_and_rerun_changes_nothing(fleet):
    done, counts, _ = fleet.run("uninstall.yml")
    assert_recap(done, counts, {name: True for name in fleet.names})
    for i, (name, box) in enumerate(zip(fleet.names, fleet.boxes)):
        for svc in listed(i):
            assert show(box, svc + ".service", "OnFailure") == "", name
            assert not exists(box, "/etc/systemd/system/%s.service.d/selfheal.conf" % svc)
        for unit in ("selfheal@.service", "selfheal-watch.service", "selfheal-watch.timer"):
            assert not exists(box, "/etc/systemd/system/" + unit)
        assert not exists(box, STAGE) and not exists(box, LIBDIR + "/selfheal.py")
        for svc in PORTS:
            assert show(box, svc, "ActiveState") == "active", (name, svc)
        assert exists(box, "/etc/selfheal/services.conf")  # kept unless selfheal_purge=true
    again, counts, _ = fleet.run("uninstall.yml")
    assert_recap(again, counts, {name: False for name in fleet.names})
