"""Install and uninstall into a DESTDIR (no root, systemd not told): the files, their modes,
idempotence, drop-ins following the config, and an uninstall that removes exactly what
install put there. install.sh does the same as `selfheal.py install`."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import selfheal
from conftest import conf as conf_text  # (`conf` here is the fixture below)

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

REPO = Path(__file__).resolve().parent.parent
INSTALL_SH = REPO / "install.sh"
LIBDIR = "/usr/local/lib/selfheal"
SERVICES = {"story-stages": {"port": 5002, "strategies": "port_conflict, service_restart"},
            "passgo": {"port": 5001}, "blue": {"unit": "app@blue.service"}}
CONF = conf_text(services=SERVICES)
WITHOUT_PASSGO = conf_text(services={name: keys for name, keys in SERVICES.items() if name != "passgo"})
DROPINS = {
    "story-stages": "etc/systemd/system/story-stages.service.d/selfheal.conf",
    "passgo": "etc/systemd/system/passgo.service.d/selfheal.conf",
    "blue": "etc/systemd/system/app@blue.service.d/selfheal.conf",
}


def snapshot(root):
    """{relative path: (mode, bytes or symlink target)} of every file and link under root."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = ("link", os.readlink(str(path)))
        elif path.is_file():
            found[rel] = (stat.S_IMODE(path.stat().st_mode), path.read_bytes())
    return found


def without_bytecode(tree):
    return {k: v for k, v in tree.items() if "__pycache__" not in k}


@pytest.fixture
def conf(write_conf):
    return write_conf(CONF)


def install(destdir, config, *more):
    return selfheal.main(["install", "--destdir", str(destdir), "--prefix", "/usr/local", "--config", str(config)]
                         + list(more))


def test_install_into_destdir_puts_every_file_with_its_mode(tmp_path, conf):
    root = tmp_path / "root"
    assert install(root, conf) == 0
    tree = snapshot(root)

    assert tree[LIBDIR[1:] + "/selfheal.py"] == (0o755, (REPO / "selfheal.py").read_bytes())
    assert tree["usr/local/bin/miraclemax-status"] == (0o755, selfheal.MIRACLEMAX_STATUS.encode())
    assert tree["usr/local/sbin/selfheal"] == ("link", LIBDIR + "/selfheal.py")
    assert tree["etc/selfheal/services.conf"] == (0o644, CONF.encode())
    for name in selfheal.UNIT_TEMPLATES:
        assert tree["etc/systemd/system/" + name] == (0o644, selfheal.render_unit(name, LIBDIR).encode())
    for name, rel in DROPINS.items():
        mode, text = tree[rel]
        assert mode == 0o644
        assert ("OnFailure=selfheal@%s.service" % name).encode() in text.splitlines()
    manifest = tree["var/lib/selfheal/" + selfheal.MANIFEST_NAME][1].decode().split()
    # config and state (the last config that loaded) are kept by an uninstall: not in the manifest
    installed = {"/" + k for k in without_bytecode(tree)} - {"/etc/selfheal/services.conf",
                                                            "/var/lib/selfheal/" + selfheal.MANIFEST_NAME,
                                                            "/var/lib/selfheal/last-good.conf",
                                                            "/var/lib/selfheal/services.public.conf"}
    assert set(manifest) == installed
    # The dashboard's copy: readable by all, the same services.
    mode, public = tree["var/lib/selfheal/services.public.conf"]
    assert mode == 0o644
    assert sorted(selfheal.parse_config(public.decode(), "public").services) == sorted(
        selfheal.parse_config(CONF, "conf").services)


def test_install_of_a_config_with_url_credentials_makes_it_root_only_and_the_public_copy_has_none(tmp_path, cli):
    path = tmp_path / "services.conf"
    passgo = {"port": 5001, "health_url": "http://watch:Pw-0f-passgo@127.0.0.1:5001/health"}
    path.write_text(conf_text({"webhook_url": "https://hooks.example.org/T0KEN/x"}, dict(SERVICES, passgo=passgo)))
    root = tmp_path / "root"
    done = cli("install", "--destdir", root, "--prefix", "/usr/local", "--config", path)
    assert done.returncode == 0, done.stderr
    assert "mode 0600: it holds [selfheal] webhook_url, [passgo] health_url" in done.stdout
    tree = snapshot(root)
    mode, text = tree["etc/selfheal/services.conf"]
    assert mode == 0o600 and b"Pw-0f-passgo" in text
    mode, public = tree["var/lib/selfheal/services.public.conf"]
    assert mode == 0o644
    assert b"Pw-0f-passgo" not in public and b"T0KEN" not in public
    assert b"health_url = http://127.0.0.1:5001/" in public
    assert b"webhook_url = https://hooks.example.org/" in public
    # The copy loads as a config (the dashboard without root reads it), with the same services.
    copy = selfheal.load_config(str(root / "var/lib/selfheal/services.public.conf"), trusted=False)
    assert sorted(copy.services) == sorted(selfheal.load_config(str(path), trusted=False).services)


def test_second_install_says_nothing_installed_and_changes_nothing(tmp_path, conf, cli):
    root = tmp_path / "root"
    args = ("install", "--destdir", root, "--prefix", "/usr/local", "--config", conf)
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert any(line.startswith("  installed ") for line in first.stdout.splitlines())
    before = snapshot(root)
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    assert [line for line in second.stdout.splitlines() if line.strip().startswith(("installed", "linked"))] == []
    assert snapshot(root) == before


def test_install_and_uninstall_say_last_how_many_files_they_changed_and_a_rerun_says_nothing(
        tmp_path, write_conf, cli):
    """The last line is what a deploy tool (deploy/ansible) reads to report changed or ok."""
    root = tmp_path / "root"
    one, two = write_conf(CONF, "one.conf"), write_conf(WITHOUT_PASSGO, "two.conf")

    def last_line(*args):
        done = cli("install", "--destdir", root, "--prefix", "/usr/local", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()[-1]

    first = last_line("--config", one)
    # selfheal.py, README.md, miraclemax-status, 3 units, 3 drop-ins, the link and the config
    assert first == "%d file(s) changed." % (len(selfheal.UNIT_TEMPLATES) + len(DROPINS) + 5)
    assert last_line("--config", one) == "nothing changed."
    assert last_line("--config", two) == "2 file(s) changed."  # the config, passgo's drop-in gone
    assert last_line("--uninstall").endswith(" file(s) changed.")
    assert last_line("--uninstall") == "nothing changed."


def test_dry_run_says_what_install_would_change_to_the_file_and_changes_nothing(tmp_path, write_conf, cli):
    """For Ansible's --check: drift on the host (a drop-in deleted, the config edited by hand,
    a service no longer listed) is reported as it would be changed, and nothing is."""
    root = tmp_path / "root"
    one, two = write_conf(CONF, "one.conf"), write_conf(WITHOUT_PASSGO, "two.conf")

    def dry(config):
        before = snapshot(root) if root.exists() else {}
        done = cli("install", "--destdir", root, "--prefix", "/usr/local", "--config", config, "--dry-run")
        assert done.returncode == 0, done.stderr
        assert (snapshot(root) if root.exists() else {}) == before
        return done.stdout.splitlines()

    fresh = dry(one)
    assert fresh[-1] == "%d file(s) would change." % (len(selfheal.UNIT_TEMPLATES) + len(DROPINS) + 5)
    assert not root.exists() or not any(root.rglob("*.service"))
    assert install(root, one) == 0
    assert dry(one)[-1] == "nothing would change."
    (root / DROPINS["passgo"]).unlink()
    (root / "etc/selfheal/services.conf").write_text(CONF + "# edited by hand\n")
    said = dry(one)
    assert said[-1] == "2 file(s) would change."
    assert "  would install /etc/selfheal/services.conf (the previous one kept as .bak)" in said
    assert any(line.startswith("  would install ") and "passgo" in line for line in said)
    assert install(root, one) == 0
    said = dry(two)
    assert said[-1] == "2 file(s) would change." and any(line.startswith("  would remove ") for line in said)
    assert cli("install", "--uninstall", "--dry-run", "--destdir", root).returncode == 2


def test_changed_config_replaces_the_installed_one_and_keeps_the_previous_as_bak(tmp_path, write_conf):
    root = tmp_path / "root"
    assert install(root, write_conf(CONF, "one.conf")) == 0
    changed = conf_text({"name": "MiracleMax2"}, SERVICES)
    assert install(root, write_conf(changed, "two.conf")) == 0
    assert (root / "etc/selfheal/services.conf").read_text() == changed
    assert (root / "etc/selfheal/services.conf.bak").read_text() == CONF


def test_same_config_again_makes_no_bak(tmp_path, conf):
    root = tmp_path / "root"
    install(root, conf)
    install(root, conf)
    assert not (root / "etc/selfheal/services.conf.bak").exists()


def test_service_removed_from_the_config_loses_its_dropin_and_the_others_stay(tmp_path, write_conf):
    root = tmp_path / "root"
    assert install(root, write_conf(CONF, "one.conf")) == 0
    assert install(root, write_conf(WITHOUT_PASSGO, "two.conf")) == 0
    assert not (root / DROPINS["passgo"]).exists()
    assert not (root / DROPINS["passgo"]).parent.exists()
    assert (root / DROPINS["story-stages"]).is_file() and (root / DROPINS["blue"]).is_file()
    assert "/" + DROPINS["passgo"] not in (root / "var/lib/selfheal" / selfheal.MANIFEST_NAME).read_text().split()


def test_foreign_file_named_like_our_dropin_is_left_alone(tmp_path, conf):
    root = tmp_path / "root"
    foreign = root / "etc/systemd/system/other.service.d/selfheal.conf"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("[Service]\nEnvironment=SELFHEAL=mine\n")
    assert install(root, conf) == 0
    assert foreign.read_text() == "[Service]\nEnvironment=SELFHEAL=mine\n"
    assert install(root, conf, "--uninstall") == 0
    assert foreign.read_text() == "[Service]\nEnvironment=SELFHEAL=mine\n"


def test_uninstall_removes_exactly_what_install_put_there_and_keeps_the_config(tmp_path, conf):
    root = tmp_path / "root"
    own_unit = root / "etc/systemd/system/story-stages.service"
    own_unit.parent.mkdir(parents=True)
    own_unit.write_text("[Service]\nExecStart=/srv/story/run\n")
    assert install(root, conf) == 0
    before = snapshot(root)
    manifest = (root / "var/lib/selfheal" / selfheal.MANIFEST_NAME).read_text().split()

    assert selfheal.main(["install", "--uninstall", "--destdir", str(root), "--prefix", "/usr/local"]) == 0
    after = snapshot(root)
    removed = {"/" + k for k in without_bytecode(before)} - {"/" + k for k in after}
    assert removed == set(manifest) | {"/var/lib/selfheal/" + selfheal.MANIFEST_NAME}
    assert after["etc/selfheal/services.conf"] == before["etc/selfheal/services.conf"]
    assert after["etc/systemd/system/story-stages.service"] == before["etc/systemd/system/story-stages.service"]
    assert not any("__pycache__" in k for k in after)


def test_broken_config_exits_78_lists_the_problem_and_creates_nothing(tmp_path, write_conf, cli):
    root = tmp_path / "root"
    root.mkdir()
    bad = write_conf(CONF.replace("port = 5001", "prot = 5001"), "bad.conf")
    done = cli("install", "--destdir", root, "--config", bad)
    assert done.returncode == selfheal.EX_CONFIG
    assert "prot" in done.stderr and "did you mean 'port'" in done.stderr
    assert list(root.iterdir()) == []


def test_config_writable_by_others_is_not_installed(tmp_path, write_conf):
    root = tmp_path / "root"
    root.mkdir()
    path = write_conf(CONF, "loose.conf")
    os.chmod(path, 0o666)
    assert install(root, path) == selfheal.EX_CONFIG
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("prefix", ["usr/local", "/usr/lo cal", "/opt/$(id)", "/opt/x;rm"])
def test_bad_prefix_is_refused_before_anything_is_written(tmp_path, conf, prefix):
    root = tmp_path / "root"
    root.mkdir()
    assert selfheal.main(["install", "--destdir", str(root), "--prefix", prefix, "--config", conf]) == 2
    assert list(root.iterdir()) == []


def test_prefix_with_dotdot_is_refused_and_nothing_lands_outside_destdir(tmp_path, conf):
    root = tmp_path / "a" / "b" / "root"
    root.mkdir(parents=True)
    rc = selfheal.main(["install", "--destdir", str(root), "--prefix", "/../../escaped", "--config", conf])
    outside = tmp_path / "a" / "escaped"
    escaped = outside.exists()
    shutil.rmtree(str(tmp_path / "a"), ignore_errors=True)
    assert rc == 2 and not escaped


@pytest.mark.parametrize("argv", [["install"], ["install", "--uninstall"]], ids=["install", "uninstall"])
def test_install_onto_the_host_needs_root(conf, capsys, not_root, monkeypatch, argv):
    def onto_the_host(*args, **kwargs):  # the guard let it through: fail, never touch this host
        raise AssertionError("selfheal %s went on without root" % " ".join(argv))
    monkeypatch.setattr(selfheal.Installer, "install", onto_the_host)
    monkeypatch.setattr(selfheal.Installer, "uninstall", onto_the_host)
    monkeypatch.setattr(selfheal.sys, "argv", ["selfheal.py"] + argv)
    assert selfheal.main(argv + ["--config", conf]) == 2
    assert capsys.readouterr().err == "selfheal: install needs root (try: sudo selfheal.py %s)\n" % " ".join(argv)


# =============================================================================
# install.sh
# =============================================================================


def install_sh(*args, env=None, python_dir=None):
    full = dict(os.environ)
    full.pop("PYTHONPATH", None)
    if python_dir:
        full["PATH"] = str(python_dir) + os.pathsep + full.get("PATH", "")
    full.update(env or {})
    return subprocess.run(["bash", str(INSTALL_SH)] + list(args), env=full, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)


def test_install_sh_with_destdir_installs_the_same_tree_as_selfheal_install(tmp_path, conf, python_dir):
    by_script, by_python = tmp_path / "by-script", tmp_path / "by-python"
    done = install_sh(env={"DESTDIR": str(by_script), "PREFIX": "/usr/local", "CONFIG": conf},
                      python_dir=python_dir)
    assert done.returncode == 0, done.stderr
    assert install(by_python, conf) == 0
    script_tree, python_tree = snapshot(by_script), snapshot(by_python)
    assert without_bytecode(script_tree) == without_bytecode(python_tree)
    assert sorted(k for k in script_tree if "__pycache__" in k) == sorted(k for k in python_tree if "__pycache__" in k)


def test_install_sh_refuses_a_bad_prefix(tmp_path, conf, python_dir):
    root = tmp_path / "root"
    root.mkdir()
    done = install_sh(env={"DESTDIR": str(root), "PREFIX": "relative/prefix", "CONFIG": conf}, python_dir=python_dir)
    assert done.returncode == 2
    assert "PREFIX" in done.stderr
    assert list(root.iterdir()) == []


def test_install_sh_help_exits_0_and_an_unknown_option_exits_2():
    helped = install_sh("--help")
    assert helped.returncode == 0 and "DESTDIR" in helped.stdout and "--uninstall" in helped.stdout
    wrong = install_sh("--frobnicate")
    assert wrong.returncode == 2 and "--frobnicate" in wrong.stderr


def test_install_sh_is_shellcheck_clean():
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run([shellcheck, str(INSTALL_SH)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_installed_miraclemax_status_finds_its_installed_library(tmp_path, conf, cli):
    root = tmp_path / "root"
    assert install(root, conf) == 0
    done = cli("--help", script=root / "usr/local/bin/miraclemax-status", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "usage" in done.stdout.lower()


def test_uninstall_removes_the_metrics_selfheal_wrote_and_nothing_else_of_that_name(tmp_path, conf):
    root = tmp_path / "root"
    assert install(root, conf) == 0
    prom = root / selfheal.METRICS_FILE.lstrip("/")
    prom.parent.mkdir(parents=True)
    prom.write_text("# HELP selfheal_info selfheal's version\n# TYPE selfheal_info gauge\nselfheal_info 1\n")
    other = prom.with_name("other.prom")
    other.write_text("# HELP node_thing\n")
    assert selfheal.main(["install", "--uninstall", "--destdir", str(root), "--prefix", "/usr/local"]) == 0
    assert not prom.exists() and other.exists()  # stale metrics would say a service is up

    assert install(root, conf) == 0
    prom.write_text("# somebody else's file with selfheal's name\n")
    assert selfheal.main(["install", "--uninstall", "--destdir", str(root), "--prefix", "/usr/local"]) == 0
    assert prom.exists()
