"""Seen from a fleet, through the fakes: the Prometheus text selfheal writes for
node_exporter's textfile collector (names, types, escaping, where it refuses to write), and
the journal fields of a heal's outcome (the native protocol's datagram, read from a socket)."""

import os
import re
import socket
import struct

import pytest

import selfheal
from conftest import conf

pytestmark = pytest.mark.usefixtures("quiet_selfheal")
REAL_HANDLER = selfheal.SyslogHandler  # quiet_selfheal swaps it for a silent one


@pytest.fixture
def logged(monkeypatch):
    """selfheal's real journal/syslog handler on its logger, at INFO, for one test."""
    handler = REAL_HANDLER("miraclemax-self-heal")
    monkeypatch.setattr(selfheal.log, "level", 20)
    selfheal.log.addHandler(handler)
    yield handler
    selfheal.log.removeHandler(handler)

SAMPLE = re.compile(r'^[a-z_]+(\{[a-z_]+="(?:[^"\\\n]|\\[\\"n])*"(,[a-z_]+="(?:[^"\\\n]|\\[\\"n])*")*\})? -?[0-9.e+]+$')


def metric_lines(text):
    return [line for line in text.splitlines() if not line.startswith("#")]


def value_of(text, metric, **labels):
    want = ",".join('%s="%s"' % kv for kv in labels.items())
    for line in metric_lines(text):
        if line.startswith(metric + ("{" + want if want else "")):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_a_healed_service_is_counted_up_and_every_line_is_valid_exposition_text(bed, tmp_path, monkeypatch):
    prom = tmp_path / "node-exporter" / "selfheal.prom"
    prom.parent.mkdir()
    bed.configure(metrics_file=str(prom))
    bed.host.failed("worker.service")
    assert bed.heal("worker")[0] == selfheal.EX_OK
    text = prom.read_text()
    assert oct(prom.stat().st_mode & 0o777) == "0o644"  # node_exporter runs as its own user
    for line in metric_lines(text):
        assert SAMPLE.match(line), line
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert {"selfheal_info", "selfheal_service_up", "selfheal_service_state", "selfheal_heals_total",
            "selfheal_last_heal_timestamp_seconds", "selfheal_last_healing_seconds", "selfheal_escalated",
            "selfheal_paused", "selfheal_mail_queue", "selfheal_webhook_queue"} <= names
    assert "# TYPE selfheal_heals_total counter" in text
    assert value_of(text, "selfheal_heals_total", service="worker", outcome="RESOLVED") == 1
    assert value_of(text, "selfheal_heals_total", service="worker", outcome="FAILED") == 0
    assert value_of(text, "selfheal_service_up", service="worker") == 1
    assert value_of(text, "selfheal_service_state", service="worker", unit="worker.service", state="active") == 1
    assert value_of(text, "selfheal_service_state", service="worker", unit="worker.service", state="failed") == 0
    assert value_of(text, "selfheal_mail_queue") == 0
    assert value_of(text, "selfheal_info", version=selfheal.VERSION, name="MiracleMax") == 1
    assert not [p for p in prom.parent.iterdir() if p.name != "selfheal.prom"]  # no temporary file left


def test_the_watch_writes_when_it_last_ran(bed, tmp_path):
    prom = tmp_path / "selfheal.prom"
    bed.configure(metrics_file=str(prom))
    bed.host.unit("worker.service", ActiveState="active", SubState="running", Result="success")
    bed.host.unit("story-stages.service", ActiveState="active", SubState="running", Result="success")
    before = selfheal.time.time()
    selfheal.cmd_watch(bed.config, bed.paths)
    ran = value_of(prom.read_text(), "selfheal_watch_last_run_timestamp_seconds")
    assert ran is not None and before - 1 <= ran <= selfheal.time.time()


def test_label_values_are_escaped_as_the_exposition_format_says():
    assert selfheal.prom_label('say "hi" \\ there') == 'say \\"hi\\" \\\\ there'


@pytest.mark.parametrize("case", ["missing", "group-writable", "symlink", "empty-setting"])
def test_metrics_are_not_written_where_they_must_not_be(bed, tmp_path, as_root, case):
    folder = tmp_path / "textfile"
    target = folder / "selfheal.prom"
    if case == "group-writable":
        folder.mkdir(mode=0o775)
        folder.chmod(0o775)
    elif case == "symlink":
        (tmp_path / "elsewhere").mkdir()
        folder.symlink_to(tmp_path / "elsewhere")
    bed.configure(metrics_file="" if case == "empty-setting" else str(target))
    bed.host.failed("worker.service")
    bed.heal("worker")
    assert not target.exists() and not (tmp_path / "elsewhere" / "selfheal.prom").exists()
    assert not (case == "missing" and folder.exists())  # selfheal creates nothing there


def test_the_watch_unit_may_write_only_the_metrics_directory_the_config_names():
    text = selfheal.render_unit("selfheal-watch.service", "/usr/local/lib/selfheal", metrics_file="/srv/prom/sh.prom")
    assert "ReadWritePaths=-/srv/prom\n" in text
    off = selfheal.render_unit("selfheal-watch.service", "/usr/local/lib/selfheal", metrics_file="")
    assert "ReadWritePaths" not in off.replace("# (metrics_file is empty", "")


@pytest.mark.parametrize("value", ["relative.prom", "/var/lib/x/selfheal.txt", "/var/lib/x y/s.prom"])
def test_a_metrics_file_that_is_not_an_absolute_prom_path_is_a_config_error(value):
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config(conf({"metrics_file": value}, {"worker": {}}))
    assert "[selfheal] metrics_file:" in caught.value.problems[0]


# -- journal fields ---------------------------------------------------------------------


def parse_datagram(data):
    """The journal's native format back into a dict (both the KEY=value and the binary form)."""
    fields, i = {}, 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = end + 1
        else:
            (size,) = struct.unpack("<Q", data[end + 1:end + 9])
            fields[line.decode()] = data[end + 9:end + 9 + size].decode()
            i = end + 9 + size + 1
    return fields


@pytest.fixture
def journal(tmp_path, monkeypatch):
    path = str(tmp_path / "journal.socket")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    monkeypatch.setattr(selfheal, "JOURNAL_SOCKET", path)
    yield sock
    sock.close()


def received(sock):
    out = []
    while True:
        try:
            out.append(parse_datagram(sock.recv(65536)))
        except socket.timeout:
            return out
        finally:
            sock.settimeout(0.3)


def test_a_heals_outcome_reaches_the_journal_with_its_fields(bed, journal, logged):
    bed.host.failed("worker.service")
    bed.heal("worker")
    (entry,) = [e for e in received(journal) if "SELFHEAL_OUTCOME" in e]
    assert entry["SELFHEAL_SERVICE"] == "worker" and entry["SELFHEAL_UNIT"] == "worker.service"
    assert entry["SELFHEAL_OUTCOME"] == "RESOLVED" and entry["SELFHEAL_TRIGGER"] == "onfailure"
    assert entry["MESSAGE_ID"] == selfheal.EVENT_IDS["RESOLVED"]
    assert entry["SYSLOG_IDENTIFIER"] == "miraclemax-self-heal" and entry["PRIORITY"] == "6"
    assert entry["SELFHEAL_INCIDENT"].endswith("@miraclemax.example.org")  # the mail thread's id
    assert entry["MESSAGE"].startswith("worker: worker resolved in ")
    assert float(entry["SELFHEAL_HEALING_SECONDS"]) > 0


def test_a_value_with_a_newline_is_sent_in_the_binary_form_and_a_bad_key_never_is():
    data = selfheal.journal_datagram({"MESSAGE": "two\nlines", "SELFHEAL_SERVICE": "web"})
    assert data == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\nSELFHEAL_SERVICE=web\n"
    assert parse_datagram(data) == {"MESSAGE": "two\nlines", "SELFHEAL_SERVICE": "web"}
    for bad in ("lower", "_SYSTEMD_UNIT", "A=B", "A\nB"):
        with pytest.raises(ValueError):
            selfheal.journal_datagram({bad: "x"})


def test_without_a_journal_the_line_goes_to_syslog(bed, monkeypatch, tmp_path, logged):
    monkeypatch.setattr(selfheal, "JOURNAL_SOCKET", str(tmp_path / "no-journal"))
    said = []
    monkeypatch.setattr(selfheal.syslog, "syslog", lambda priority, message: said.append((priority, message)))
    bed.host.failed("worker.service")
    bed.heal("worker")
    assert any(m.startswith("worker: worker resolved in ") for _, m in said)
