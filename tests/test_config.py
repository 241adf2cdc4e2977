"""services.conf: every bad config is refused with exit 78 and `FILE:LINE [section] key: problem`
for each problem at once; the shipped file validates and documents itself."""

import dataclasses
import os
import re
from pathlib import Path

import pytest

import selfheal
from conftest import run_main

REPO_CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "services.conf")

GLOBAL = """\
[selfheal]
name = MiracleMax
email_to = owner@example.org
email_from = selfheal@example.org
"""
SERVICE = """
[story-stages]
port = 5002
strategies = port_conflict, service_restart
"""


def svc(*lines):
    return GLOBAL + SERVICE + "\n".join(lines) + "\n"


def glob(*lines):
    return GLOBAL + "\n".join(lines) + "\n" + SERVICE


# id, config text, [(line needle, nth occurrence, section, key, words in the problem)]
# The line number is where the needle is in the text, so the table cannot drift from it.
BAD = [
    ("key-typo", svc("prot = 5002"), [("prot = 5002", 1, "story-stages", "prot", "did you mean 'port'")]),
    ("strategy-typo", GLOBAL + "\n[worker]\nstrategies = service_restrat\n",
     [("strategies = service_restrat", 1, "worker", "strategies", "did you mean 'service_restart'")]),
    ("unknown-strategy", GLOBAL + "\n[worker]\nstrategies = reboot_host\n",
     [("strategies = reboot_host", 1, "worker", "strategies", "unknown strategy 'reboot_host'")]),
    ("check-strategy-without-what-to-check", GLOBAL + "\n[worker]\nstrategies = service_restart, config_validation\n",
     [("config_validation", 1, "worker", "strategies", "config_validation needs config_check or config_files")]),
    ("strategy-key-without-its-strategy", GLOBAL + "\n[worker]\nrequired_env = DATABASE_URL\n",
     [("required_env", 1, "worker", "required_env", "used by environment_check, which is not in strategies")]),
    ("bad-symlink-pair", GLOBAL + "\n[worker]\nstrategies = database_check\nsymlinks = /a/b /c/d\n",
     [("symlinks", 1, "worker", "symlinks", "/path/link -> /path/target")]),
    ("bad-db-mode", GLOBAL + "\n[worker]\nstrategies = database_check\ndb_path = /var/lib/w\ndb_mode = 999\n",
     [("db_mode", 1, "worker", "db_mode", "octal mode")]),
    ("bad-env-name", GLOBAL + "\n[worker]\nstrategies = environment_check\nrequired_env = DATABASE-URL\n",
     [("required_env", 1, "worker", "required_env", "not 'DATABASE-URL'")]),
    ("config-check-with-a-relative-program", GLOBAL + "\n[worker]\nstrategies = config_validation\n"
     "config_check = bin/check --strict\n",
     [("config_check", 1, "worker", "config_check", "absolute path or a plain command name")]),
    ("strategy-twice", GLOBAL + "\n[worker]\nstrategies = service_restart service_restart\n",
     [("strategies =", 1, "worker", "strategies", "twice")]),
    ("duplicate-section", svc("[story-stages]", "domain = books.jbyrd.org"),
     [("[story-stages]", 2, "story-stages", None, "duplicate section (first at line {[story-stages]})")]),
    ("duplicate-key", svc("port = 5003"),
     [("port = 5003", 1, "story-stages", "port", "duplicate key (first at line {port = 5002})")]),
    ("default-section", svc("[DEFAULT]", "port = 1"), [("[DEFAULT]", 1, "DEFAULT", None, "did you mean [selfheal]")]),
    ("port-too-big", GLOBAL + "\n[worker]\nport = 70000\n", [("port = 70000", 1, "worker", "port", "port number")]),
    ("port-not-a-number", GLOBAL + "\n[worker]\nport = http\n", [("port = http", 1, "worker", "port", "port number")]),
    ("email-to-no-at", GLOBAL.replace("owner@example.org", "root") + SERVICE,
     [("email_to = root", 1, "selfheal", "email_to", "not a mail address")]),
    ("email-from-no-domain", GLOBAL.replace("selfheal@example.org", "me@") + SERVICE,
     [("email_from = me@", 1, "selfheal", "email_from", "not a mail address")]),
    ("health-url-ftp", svc("health_url = ftp://books.jbyrd.org/"),
     [("health_url", 1, "story-stages", "health_url", "http")]),
    ("template-without-instance", GLOBAL + "\n[app]\nunit = app@.service\n",
     [("unit = app@.service", 1, "app", "unit", "app@.service")]),
    ("never-touch-sshd", GLOBAL + "\n[ssh]\nunit = sshd.service\n",
     [("unit = sshd.service", 1, "ssh", "unit", "never touches sshd.service")]),
    ("never-touch-dbus", GLOBAL + "\n[bus]\nunit = dbus.service\n",
     [("unit = dbus.service", 1, "bus", "unit", "never touches dbus.service")]),
    ("never-touch-itself", GLOBAL + "\n[me]\nunit = selfheal@story-stages.service\n",
     [("unit = selfheal@", 1, "me", "unit", "never touches")]),
    ("smtp-user-without-password-file", glob("smtp_user = alice"),
     [("smtp_user", 1, "selfheal", "smtp_user", "smtp_password_file")]),
    ("name-spans-two-lines", GLOBAL.replace("name = MiracleMax", "name = Miracle\n  Max") + SERVICE,
     [("name = Miracle", 1, "selfheal", "name", "one line")]),
    ("name-with-carriage-return", GLOBAL.replace("name = MiracleMax", "name = Miracle\rMax") + SERVICE,
     [("Max", 1, None, None, "cannot parse")]),
    ("duration-unknown-unit", glob("verify_timeout = 5parsecs"),
     [("verify_timeout", 1, "selfheal", "verify_timeout", "unknown unit 'parsecs'")]),
    ("duration-zero", glob("failure_window = 0"), [("failure_window", 1, "selfheal", "failure_window", "more than zero")]),
    ("duration-words", glob("smtp_timeout = soon"), [("smtp_timeout", 1, "selfheal", "smtp_timeout", "not a duration")]),
    ("threshold-zero", glob("failure_threshold = 0"),
     [("failure_threshold", 1, "selfheal", "failure_threshold", "whole number")]),
    ("threshold-beyond-the-summary", glob("failure_threshold = 257"),
     [("failure_threshold", 1, "selfheal", "failure_threshold", "256 or less")]),
    ("security-unknown", glob("smtp_security = tls"),
     [("smtp_security", 1, "selfheal", "smtp_security", "starttls")]),
    ("bool-unknown", svc("critical = maybe"), [("critical = maybe", 1, "story-stages", "critical", "yes or no")]),
    ("bad-service-name", GLOBAL + "\n[story stages]\nport = 5002\n",
     [("[story stages]", 1, "story stages", None, "service name")]),
    ("global-key-typo", glob("emial_to = owner@example.org"),
     [("emial_to", 1, "selfheal", "emial_to", "did you mean 'email_to'")]),
    ("unit-listed-twice", GLOBAL + "\n[books]\nunit = story-stages.service\n" + SERVICE,
     [("[story-stages]", 1, "story-stages", "unit", "already listed as [books]")]),
    ("port-conflict-without-port", GLOBAL + "\n[worker]\nstrategies = port_conflict\n",
     [("strategies = port_conflict", 1, "worker", "strategies", "port_conflict needs port")]),
    ("password-file-relative", glob("smtp_password_file = etc/pw"),
     [("smtp_password_file", 1, "selfheal", "smtp_password_file", "absolute path")]),
    ("smtp-host-bad", glob("smtp_host = mail_server!"), [("smtp_host", 1, "selfheal", "smtp_host", "host name")]),
    ("three-problems", GLOBAL + "\n[worker]\nprot = 1\ncritical = maybe\n\n[web]\nhealth_url = ftp://x/\n",
     [("prot = 1", 1, "worker", "prot", "unknown key"), ("critical = maybe", 1, "worker", "critical", "yes or no"),
      ("health_url", 1, "web", "health_url", "http")]),
]


def line_number(text, needle, nth=1):
    """Where needle is, counting lines as a text-mode open() does (\n, \r\n or \r end a line)."""
    hits = [i for i, line in enumerate(re.split(r"\r\n|\r|\n", text), 1) if needle in line]
    assert len(hits) >= nth, "needle %r not %d times in the test's config" % (needle, nth)
    return hits[nth - 1]


def expected_problem(path, text, needle, nth, section, key, words):
    words = re.sub(r"\{(.*?)\}", lambda m: str(line_number(text, m.group(1))), words)
    where = "%s:%d%s%s: " % (path, line_number(text, needle, nth), " [%s]" % section if section else "",
                             " " + key if key else "")
    return where, words


@pytest.fixture(scope="module")
def validated(cli, tmp_path_factory):
    """Every table entry validated by `selfheal.py validate FILE` in-process (run_main, 34
    configs in 1 s where 34 processes take 5 s of CPU), and the missing and the shipped file
    by the command itself, as processes."""
    folder = tmp_path_factory.mktemp("configs")
    files = {}
    for case_id, text, _ in BAD:
        files[case_id] = folder / (case_id + ".conf")
        files[case_id].write_text(text)
    results = {n: (str(path), run_main("validate", path)) for n, path in files.items()}
    files = {"missing": folder / "missing.conf", "shipped": REPO_CONF}
    names = list(files)
    for name, done in zip(names, cli.many([("validate", files[n]) for n in names])):
        results[name] = (str(files[name]), done)
    return results


@pytest.mark.parametrize("case_id, text, problems", BAD, ids=[c[0] for c in BAD])
def test_bad_config_exits_78_naming_file_line_section_and_key(validated, case_id, text, problems):
    path, done = validated[case_id]
    assert done.returncode == selfheal.EX_CONFIG, done.stdout + done.stderr
    reported = done.stderr.splitlines()
    for needle, nth, section, key, words in problems:
        where, words = expected_problem(path, text, needle, nth, section, key, words)
        lines = [line for line in reported if line.startswith(where)]
        assert lines, "no problem reported at %r in:\n%s" % (where, done.stderr)
        assert any(words in line for line in lines), "%r not in %r" % (words, lines)
    assert "%d problem(s)" % len(problems) in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_config_file_exits_78_and_says_so(validated):
    path, done = validated["missing"]
    assert done.returncode == selfheal.EX_CONFIG
    assert path in done.stderr and "no such file" in done.stderr


def test_shipped_config_validates_and_lists_the_four_services(validated):
    path, done = validated["shipped"]
    assert done.returncode == 0, done.stderr
    for name in ("story-stages", "passgo", "traefik", "actual-budget"):
        assert name in done.stdout


def test_shipped_config_has_the_miraclemax_ports_and_critical_flags():
    config = selfheal.load_config(REPO_CONF, trusted=False)
    found = {name: (s.unit, s.port, s.critical) for name, s in config.services.items()}
    assert found == {
        "story-stages": ("story-stages.service", 5002, True),
        "passgo": ("passgo.service", 5001, True),
        "traefik": ("traefik.service", 80, True),
        "actual-budget": ("actual-budget.service", 5006, False),
    }
    assert config.settings.name == "MiracleMax"


def test_shipped_config_shows_every_global_key_at_its_default():
    text = open(REPO_CONF, encoding="utf-8").read()
    for name, field in selfheal.GLOBAL_KEYS.items():
        match = re.search(r"^#?[ \t]*%s[ \t]*=[ \t]*(.*)$" % re.escape(name), text, re.M)
        assert match, "[selfheal] %s is neither set nor commented in services.conf" % name
        # A commented key shows its default; one without a default shows an example instead.
        if match.group(0).startswith("#") and field.default not in ("", ()) and not field.metadata["derived"]:
            shown = field.metadata["parse"](match.group(1).strip())  # read by the key's own checker
            assert shown == field.default, "%s is commented as %r, but the default is %r" % (
                name, match.group(1).strip(), field.default)


def test_shipped_config_documents_every_service_key_and_names_no_other():
    text = open(REPO_CONF, encoding="utf-8").read()
    for key in selfheal.SERVICE_KEYS:
        assert re.search(r"^#\s+%s\s+=" % re.escape(key), text, re.M), "service key %s is not documented" % key
    strategies = set(re.findall(r"^#\s+(\w+):", text, re.M))
    assert set(selfheal.STRATEGIES) <= strategies
    written = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, re.M))
    assert written <= set(selfheal.GLOBAL_KEYS) | set(selfheal.SERVICE_KEYS), written - set(
        selfheal.GLOBAL_KEYS) - set(selfheal.SERVICE_KEYS)


README = os.path.join(os.path.dirname(REPO_CONF), "README.md")


def test_the_readme_names_every_key_and_its_global_table_gives_the_true_defaults():
    text = open(README, encoding="utf-8").read()
    section = text[text.index("## services.conf"):text.index("Every problem in a config is reported at once")]
    for key in list(selfheal.GLOBAL_KEYS) + list(selfheal.SERVICE_KEYS):
        assert "`%s`" % key in section, "README's services.conf section does not name %s" % key
    checked = 0
    for row in re.findall(r"^\| (`[a-z_]+`(?:, `[a-z_]+`)*) \| ([^|]*) \|", section, re.M):
        keys = re.findall(r"`([a-z_]+)`", row[0])
        defaults = re.findall(r"`([^`]*)`", row[1])
        assert all(key in selfheal.GLOBAL_KEYS for key in keys), keys
        for key, shown in zip(keys, defaults if len(defaults) == len(keys) else []):
            field = selfheal.GLOBAL_KEYS[key]
            if not field.metadata["derived"]:
                assert field.metadata["parse"](shown) == field.default, "README: %s %r" % (key, shown)
                checked += 1
    assert checked >= 15  # the table was read, not skipped


def test_validate_help_lists_every_key_with_its_doc(capsys):
    with pytest.raises(SystemExit):
        selfheal.main(["validate", "--help"])
    out = capsys.readouterr().out
    for name, field in list(selfheal.GLOBAL_KEYS.items()) + list(selfheal.SERVICE_KEYS.items()):
        assert re.search(r"^  %s\s+.*%s" % (re.escape(name), re.escape(field.metadata["doc"][:30])), out, re.M), name


def test_text_before_the_first_section_is_reported_at_line_1():
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config("name = x\n" + GLOBAL + SERVICE, "f.conf")
    assert caught.value.problems[0].startswith("f.conf:1: ")


def test_config_without_selfheal_section_is_refused():
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config(SERVICE, "f.conf")
    assert any("[selfheal]" in p for p in caught.value.problems)


def test_config_with_only_the_global_section_lists_no_services_and_is_refused():
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config(GLOBAL, "f.conf")
    assert any("no services" in p for p in caught.value.problems)


def test_windows_line_ends_are_read_like_unix_ones(tmp_path):
    path = tmp_path / "crlf.conf"
    path.write_bytes((GLOBAL + SERVICE).replace("\n", "\r\n").encode())
    config = selfheal.load_config(str(path), trusted=False)
    assert config.settings.name == "MiracleMax"
    assert config.services["story-stages"].strategies == ("port_conflict", "service_restart")


def test_multi_line_recipient_list_is_accepted():
    text = GLOBAL.replace("email_to = owner@example.org", "email_to = owner@example.org,\n  ops@example.org") + SERVICE
    assert selfheal.parse_config(text, "f.conf").settings.email_to == ("owner@example.org", "ops@example.org")


def test_template_instance_unit_is_accepted():
    config = selfheal.parse_config(GLOBAL + "\n[blue]\nunit = app@blue.service\nport = 8001\n", "f.conf")
    assert config.services["blue"].unit == "app@blue.service"


def test_template_without_instance_is_explained_as_a_missing_instance():
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config(GLOBAL + "\n[app]\nunit = app@.service\n", "f.conf")
    assert "instance" in caught.value.problems[0]


@pytest.mark.parametrize("section", ["sshd", "dbus", "systemd-journald", "selfheal-watch"])
def test_section_named_after_a_never_touch_unit_is_refused(section):
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config(GLOBAL + "\n[%s]\nport = 22\n" % section, "f.conf")
    assert "never touches" in caught.value.problems[0]


def test_unparsable_line_is_quoted_once():
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config(GLOBAL + "Max\n" + SERVICE, "f.conf")
    assert "cannot parse 'Max'" in caught.value.problems[0]


def test_line_numbers_stay_right_after_a_form_feed_page_break():
    text = GLOBAL + "\x0c\n" + SERVICE + "prot = 1\n"
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config(text, "f.conf")
    assert caught.value.problems[0].startswith("f.conf:%d " % line_number(text, "prot = 1"))


def test_trusted_config_must_be_roots_and_not_writable_by_others_as_root(tmp_path, monkeypatch):
    monkeypatch.setattr(selfheal, "is_root", lambda: True)
    path = tmp_path / "services.conf"
    path.write_text(GLOBAL + SERVICE)
    path.chmod(0o666)
    uid = path.stat().st_uid  # root's when the tests run as root, else the test user's
    problem = selfheal.check_trusted_file(str(path), "the config")
    if uid == 0:
        assert problem == "%s: the config is writable by group or others (chmod go-w %s)" % (path, path)
    else:
        assert problem == "%s: the config is owned by uid %d; it must be owned by root (chown root:root %s)" % (
            path, uid, path)
    with pytest.raises(selfheal.ConfigError) as refused:
        selfheal.load_config(str(path), trusted=True)
    assert refused.value.problems == [problem]
    assert list(selfheal.load_config(str(path), trusted=False).services) == ["story-stages"]


def test_a_users_config_is_theirs_when_selfheal_is_not_root(tmp_path, not_root):
    path = tmp_path / "services.conf"  # only root's config decides what root does
    path.write_text(GLOBAL + SERVICE)
    path.chmod(0o666)
    assert selfheal.check_trusted_file(str(path), "the config") is None
    assert list(selfheal.load_config(str(path), trusted=True).services) == ["story-stages"]


@pytest.mark.parametrize("text, seconds", [
    ("90", 90), ("90s", 90), ("90sec", 90), ("5m", 300), ("5min", 300), ("1h", 3600), ("2d", 172800),
    ("1w", 604800), ("1h30m", 5400), ("1h 30m", 5400), ("0.5s", 0.5), ("5M", 300),
])
def test_parse_duration_accepts_systemd_like_units(text, seconds):
    assert selfheal.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5parsecs", "-5", "1.5.2", "1e9", "m5", "inf", "1h-30m", "5 fortnights"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError):
        selfheal.parse_duration(text)


def test_smtp_password_file_that_is_missing_or_not_roots_is_a_config_error_as_root(tmp_path, monkeypatch):
    monkeypatch.setattr(selfheal, "is_root", lambda: True)
    secret = tmp_path / "pw"
    text = "[selfheal]\nsmtp_user = me\nsmtp_password_file = %s\n\n[worker]\n" % secret
    with pytest.raises(selfheal.ConfigError) as missing:
        selfheal.parse_config(text, "services.conf", check_files=True)
    assert missing.value.problems == ["services.conf:3 [selfheal] smtp_password_file: cannot read %s: "
                                      "No such file or directory" % secret]
    secret.write_text("hunter2\n")
    os.chmod(str(secret), 0o600)
    if os.geteuid() == 0:
        os.chown(str(secret), 4242, 4242)  # as a user, the file is already not root's
    uid = secret.stat().st_uid
    with pytest.raises(selfheal.ConfigError) as foreign:
        selfheal.parse_config(text, "services.conf", check_files=True)
    assert foreign.value.problems == ["services.conf:3 [selfheal] smtp_password_file: %s is owned by uid %d; "
                                      "it must be root's (chown root: %s)" % (secret, uid, secret)]


@pytest.mark.skipif(os.geteuid() != 0, reason="a password file of root's is made as root only")
def test_smtp_password_file_of_roots_readable_by_others_is_a_config_error(tmp_path):
    secret = tmp_path / "pw"
    text = "[selfheal]\nsmtp_user = me\nsmtp_password_file = %s\n\n[worker]\n" % secret
    secret.write_text("hunter2\n")
    os.chmod(str(secret), 0o644)
    with pytest.raises(selfheal.ConfigError) as loose:
        selfheal.parse_config(text, "services.conf", check_files=True)
    assert loose.value.problems == ["services.conf:3 [selfheal] smtp_password_file: %s is mode 644; it must be "
                                    "0600 or 0400 (chmod 600 %s)" % (secret, secret)]
    os.chmod(str(secret), 0o600)
    assert selfheal.parse_config(text, "services.conf", check_files=True).settings.smtp_user == "me"


def test_no_services_is_reported_with_the_other_problems_not_instead_of_them():
    with pytest.raises(selfheal.ConfigError) as err:
        selfheal.parse_config(GLOBAL + "smtp_prot = 25\n", "services.conf")
    problems = err.value.problems
    assert any("[selfheal] smtp_prot: unknown key" in p for p in problems), problems
    assert any("no services listed" in p for p in problems), problems


def test_a_service_section_with_a_problem_is_not_called_missing():
    with pytest.raises(selfheal.ConfigError) as err:
        selfheal.parse_config(GLOBAL + "\n[web]\nprot = 80\n", "services.conf")
    assert not any("no services listed" in p for p in err.value.problems), err.value.problems


def test_the_readmes_quick_start_config_is_valid_as_written():
    """The block a new user copies first parses with no problem (the drill installs it)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("```ini\n", readme.index("## Quick start")) + len("```ini\n")
    config = selfheal.parse_config(readme[start:readme.index("```", start)], "README.md")
    assert list(config.services) == ["nginx", "postgresql", "redis-server"]
    assert config.services["postgresql"].unit == "postgresql@15-main.service"
    assert config.services["redis-server"].health_command == ("/usr/bin/redis-cli", "-p", "6379", "ping")
