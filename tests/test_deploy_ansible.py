"""deploy/ansible without a host: the playbooks parse, and the example inventory renders a
services.conf that selfheal accepts for every host (the drill, test_drill_ansible.py, runs
the playbooks against booted hosts). Skipped where Ansible is not installed (a failure
under CI=true, where tests/run.sh has installed it)."""

import json
import re

import pytest

from conftest import DEPLOY, ansible

EXAMPLE = DEPLOY / "inventory.example.yml"


def test_the_playbooks_pass_ansible_syntax_check(tmp_path):
    done = ansible("ansible-playbook", "-i", EXAMPLE, "--syntax-check", "site.yml", "uninstall.yml", "status.yml",
                   tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_example_inventory_renders_a_config_selfheal_validates_for_every_host(tmp_path, cli):
    listed = ansible("ansible-inventory", "-i", EXAMPLE, "--list", tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    inventory = json.loads(listed.stdout)
    hosts = inventory["selfheal"]["hosts"]
    assert len(hosts) >= 2
    done = ansible("ansible", "selfheal", "-i", EXAMPLE, "-c", "local", "-m", "ansible.builtin.template",
                   "-a", "src=roles/selfheal/templates/services.conf.j2 dest=%s/{{ inventory_hostname }}.conf "
                   "mode=0644" % tmp_path, "-e", "ansible_python_interpreter=/usr/bin/python3", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for host in hosts:
        out = tmp_path / (host + ".conf")
        checked = cli("validate", out)
        assert checked.returncode == 0, out.read_text() + checked.stderr
        found = checked.stdout.strip().split(" service(s): ", 1)[1].split(", ")
        services = inventory["_meta"]["hostvars"][host]["selfheal_services"]
        assert sorted(found) == sorted(services)  # every service of the host, none of another's


BAD_INVENTORIES = {
    # a mapping as a value: its keys would be written out raw, one of them a new section
    "mapping-value": {"selfheal_settings": {"name": "x"},
                      "selfheal_services": {"web": {"port": {"x\n[evil]\nunit = postgresql.service": None}}}},
    "multi-line-value": {"selfheal_settings": {"name": "x"},
                         "selfheal_services": {"web": {"domain": "a.example\n[evil]"}}},
    "mapping-in-a-list": {"selfheal_settings": {"email_to": [{"x\nbcc": 1}]}, "selfheal_services": {"web": None}},
    "section-name-with-a-bracket": {"selfheal_settings": {"name": "x"}, "selfheal_services": {"web]\n[evil": None}},
}


@pytest.fixture(scope="module")
def bad_inventories_checked(tmp_path_factory):
    """One `ansible-playbook --check site.yml` over a host per BAD_INVENTORIES case (Ansible
    runs each host on its own; one run instead of one per case saves its start-up, about a
    second each) -> (output, {case: the host's stage dir})."""
    tmp_path = tmp_path_factory.mktemp("bad-inventories")
    hosts, stages = {}, {}
    for case, values in BAD_INVENTORIES.items():
        stages[case] = tmp_path / ("stage-" + case)
        hosts["probe-" + case] = dict(values, ansible_connection="local", ansible_become=False,
                                      ansible_python_interpreter="/usr/bin/python3",
                                      selfheal_stage_dir=str(stages[case]))
    inventory = tmp_path / "inventory.json"
    inventory.write_text(json.dumps({"selfheal": {"hosts": hosts}}))
    done = ansible("ansible-playbook", "-i", inventory, "--check", "site.yml", tmp_path=tmp_path)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    return out, stages


@pytest.mark.parametrize("case", sorted(BAD_INVENTORIES))
def test_inventory_values_that_could_smuggle_a_key_or_section_fail_the_host_before_anything_runs(
        bad_inventories_checked, case):
    out, stages = bad_inventories_checked
    # What Ansible said about this host: each `failed: [host]...` record, however many lines
    # its message spans (a section name with a newline in it spans two).
    records = re.split(r"\n(?=(?:ok|changed|failed|fatal|skipping): \[|TASK |PLAY |\n)", out)
    said = [r for r in records if re.match(r"(?:failed|fatal): \[probe-%s\]" % re.escape(case), r)]
    assert any("must map plain key names to one-line values" in r or "a section name of A-Z" in r
               for r in said), out
    (recap,) = [line for line in out.splitlines() if line.startswith("probe-%s " % case)]
    assert " failed=1 " in recap and " changed=0 " in recap, recap
    assert not stages[case].exists()
