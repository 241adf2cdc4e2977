"""Webhook and heartbeat: every mailed report is also posted to webhook_url (json, slack or
ntfy) with a queue of its own, so mail and webhook never block or repeat each other; a
watch run that checked every service pings heartbeat_url, one that could not does not, and
a failed ping never fails the watch. Runs against tests/http_sink.py and tests/smtp_sink.py."""

import json
import logging
import socket
import stat
import time

import pytest

import selfheal
from conftest import queued_for
from http_sink import HttpSink

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

STORY, WORKER = "story-stages.service", "worker.service"
HOOK = "/hook/T0KEN-s3cret"  # a token in the path, as Slack's and ntfy's URLs have
BEAT = "/ping/6f1c-uuid"


@pytest.fixture
def http_sink():
    sink = HttpSink()
    yield sink
    sink.close()


def configure(bed, smtp_port=None, **keys):
    """The heal bed's config with extra [selfheal] keys (webhook_url = ..., heartbeat_url = ...)."""
    return bed.configure(smtp_port=smtp_port, **keys)


def hooked(bed, sink, fmt="json", smtp_port=None, **keys):
    return configure(bed, smtp_port, webhook_url=sink.url(HOOK), webhook_format=fmt, **keys)


def queued_posts(bed):
    """Reports in the outbox the webhook has still to post."""
    return queued_for(bed.paths, "webhook")


def mail_subjects(bed):
    return [str(m["Subject"]) for m in bed.sink.messages]


def posts(sink):
    return [r for r in sink.requests if r.path == HOOK]


def report(bed, subject, body="x\n"):
    """A report as the code makes one, for a subject "ICON NAME: SERVICE - LABEL" (its status:
    the label's first words, as the test writes them)."""
    head, _, label = subject.rpartition(" - ")
    return selfheal.new_report(bed.config.settings, "", head.rpartition(": ")[2], label, body, subject_text=subject,
                               status=label.partition(" (")[0])


def queue_post(bed, subject):
    """A report queued for the webhook alone (its mail went out already)."""
    queued = dict(report(bed, subject, "queued report\n"), channels={"webhook": "queued"})
    path = selfheal.queue_report(bed.paths, queued)
    time.sleep(0.002)  # records are named by the time in ms: keep them in order
    return path


def flushed(bed, channel="webhook"):
    """flush_outbox's figures for one channel: (sent now, still queued)."""
    return tuple(selfheal.flush_outbox(bed.config, bed.paths)[channel])


def all_healthy(bed):
    bed.host.unit(STORY, ActiveState="active", SubState="running", Result="success", InvocationID="a" * 32)
    bed.host.listen(5002)
    bed.host.unit(WORKER, ActiveState="active", SubState="running", Result="success", InvocationID="b" * 32)


# =============================================================================
# Config
# =============================================================================


def test_webhook_and_heartbeat_are_off_by_default_with_json_and_a_5s_timeout(bed):
    s = bed.config.settings
    assert (s.heartbeat_url, s.webhook_url, s.webhook_format, s.webhook_timeout) == ("", "", "json", 5.0)


@pytest.mark.parametrize("lines, problem", [
    ("heartbeat_url = ftp://hc.example.org/ping", "[selfheal] heartbeat_url: must be an http:// or https:// URL"),
    ("webhook_url = hooks.slack.com/services/x", "[selfheal] webhook_url: must be an http:// or https:// URL"),
    ("webhook_url = http://x.example.org/a b", "[selfheal] webhook_url: must not contain spaces"),
    ("webhook_url = http://x.example.org/\nwebhook_format = teams",
     "[selfheal] webhook_format: must be one of json | slack | ntfy"),
    ("webhook_url = http://x.example.org/\nwebhook_timeout = 2m", "[selfheal] webhook_timeout: must be 60 s or less"),
    ("heartbeat_url = http://x.example.org/\nwebhook_timeout = 0", "[selfheal] webhook_timeout: must be more than zero"),
    ("webhook_format = slack", "[selfheal] webhook_format: needs webhook_url"),
    ("webhook_timeout = 3s", "[selfheal] webhook_timeout: needs webhook_url or heartbeat_url"),
    ("webhook_ulr = http://x.example.org/", "[selfheal] webhook_ulr: unknown key (did you mean 'webhook_url'?)"),
], ids=["heartbeat-ftp", "no-scheme", "space", "format", "timeout-long", "timeout-zero", "format-alone",
        "timeout-alone", "typo"])
def test_bad_webhook_and_heartbeat_keys_are_reported_with_file_line_section_and_key(lines, problem):
    text = "[selfheal]\nemail_to = root@localhost\n%s\n\n[web]\nport = 80\n" % lines
    key = problem.split("] ", 1)[1].split(":", 1)[0]
    line = [n for n, text_line in enumerate(text.splitlines(), 1) if text_line.startswith(key + " =")][0]
    with pytest.raises(selfheal.ConfigError) as exc:
        selfheal.parse_config(text, "services.conf")
    assert any(p.startswith("services.conf:%d %s" % (line, problem)) for p in exc.value.problems), exc.value.problems


def test_validate_exits_78_and_lists_every_webhook_problem_at_once(write_conf, cli):
    path = write_conf("[selfheal]\nheartbeat_url = gopher://x\nwebhook_url = http://ok.example.org/\n"
                      "webhook_format = teams\nwebhook_timeout = 5h\n\n[web]\n")
    done = cli("validate", path)
    assert done.returncode == 78
    assert [line.split(" ", 2)[:2] for line in done.stderr.splitlines()[:3]] == [
        [path + ":2", "[selfheal]"], [path + ":4", "[selfheal]"], [path + ":5", "[selfheal]"]]
    assert "3 problem(s); nothing was changed." in done.stderr


def test_shipped_config_documents_the_webhook_keys_and_they_are_in_the_readme():
    conf = open(selfheal.__file__.replace("selfheal.py", "services.conf"), encoding="utf-8").read()
    readme = open(selfheal.__file__.replace("selfheal.py", "README.md"), encoding="utf-8").read()
    for key in ("heartbeat_url", "webhook_url", "webhook_format", "webhook_timeout"):
        assert "#%s =" % key in conf
        assert "`%s`" % key in readme


# =============================================================================
# Formats
# =============================================================================


def test_json_post_carries_the_documented_object_with_the_mail_subject_and_a_short_summary(bed, http_sink):
    hooked(bed, http_sink)
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    (mail,) = bed.sink.messages
    (post,) = http_sink.wait(1, path=HOOK)
    assert post.method == "POST" and post.header("Content-Type") == "application/json"
    assert post.header("User-Agent").startswith("selfheal/")
    event = post.json()
    assert set(event) == {"version", "selfheal", "host", "name", "service", "status", "subject", "title",
                          "summary", "ts", "time", "thread"}
    assert (event["version"], event["name"], event["service"], event["status"]) == (
        1, "MiracleMax", "worker", "RESOLVED")
    assert event["subject"] == mail["Subject"] == "✅ MiracleMax: worker - RESOLVED"
    assert event["thread"] == "".join(str(mail["Message-ID"]).split())
    summary = event["summary"]
    assert summary.startswith("worker.service failed: main process killed by signal KILL")
    assert "Root cause: " in summary and "Healing time: " in summary
    assert "DIAGNOSIS" not in summary and "POST-HEALING" not in summary and len(summary) <= selfheal.SUMMARY_CHARS


def test_slack_post_is_a_text_object_with_markup_escaped_and_no_link_previews(bed, http_sink):
    hooked(bed, http_sink, "slack")
    msg = report(bed, "❌ MiracleMax: worker - FAILED", "worker <https://evil.example/|click> & co broke\n")
    assert selfheal.deliver(bed.config, bed.paths, msg) is True
    payload = http_sink.wait(1, path=HOOK)[0].json()
    assert set(payload) == {"text", "unfurl_links", "unfurl_media"}
    assert payload["unfurl_links"] is False and payload["unfurl_media"] is False
    assert payload["text"] == ("❌ MiracleMax: worker - FAILED\n"
                               "worker &lt;https://evil.example/...&gt; &amp; co broke")


def test_a_url_in_the_summary_keeps_only_scheme_and_host_so_a_token_in_it_never_reaches_the_chat(bed):
    # The report of a heal the watch started: its finding quotes the health_url it got.
    svc = bed.config.services["story-stages"]
    finding = selfheal.Finding("unhealthy", "port 5002 open but GET http://127.0.0.1:5002/health?token=s3cret: "
                                            "HTTP 500", time.time())
    diag = selfheal.Diagnosis(unit={"Id": svc.unit, "ActiveState": "active", "SubState": "running"}, result="success",
                              exit_code="", exit_status="", from_monitor_env=False, journal=(), listeners=(),
                              holders=(), failed_at=None, detected_after=None, finding=finding)
    result = selfheal.HealResult(service=svc, outcome=selfheal.Outcome.FAILED, trigger="watch",
                                 started_at=time.time(), diagnosis=diag, runs=(),
                                 root_cause=selfheal.root_cause(svc, diag), healing_seconds=None,
                                 post={"ActiveState": "active", "SubState": "running"}, escalation="still unhealthy")
    made = selfheal.new_report(bed.config.settings, "❌", "story-stages", "FAILED",
                               selfheal.render_report(bed.config.settings, result))
    assert "GET http://127.0.0.1:5002/health?token=s3cret: HTTP 500" in made["body"]  # the mail says it all
    summary = selfheal.webhook_event(bed.config.settings, made)["summary"]
    assert "s3cret" not in summary and "/health" not in summary
    assert "GET http://127.0.0.1:5002/...: HTTP 500" in summary


@pytest.mark.parametrize("key, value, problem", [
    ("webhook_url", "http://hooks.example:abc/x", "has a port that is not a number"),
    ("webhook_url", "http://hooks.example:70000/x", "has a port that is not a number"),
    ("heartbeat_url", "http://höst.example/ping", "must be ASCII"),
    ("heartbeat_url", "https://hc.example/päng", "must be ASCII"),
])
def test_a_url_that_could_never_be_sent_is_a_config_error(bed, key, value, problem):
    with pytest.raises(selfheal.ConfigError) as err:
        configure(bed, **{key: value})
    assert any(("[selfheal] %s: " % key) in p and problem in p for p in err.value.problems), err.value.problems


def test_ntfy_post_is_plain_text_with_ascii_title_priority_and_tags(bed, http_sink):
    hooked(bed, http_sink, "ntfy")
    bed.host.failed(WORKER)
    bed.heal("worker")
    (post,) = http_sink.wait(1, path=HOOK)
    assert post.header("Content-Type") == "text/plain; charset=utf-8"
    assert post.header("Title") == "MiracleMax: worker - RESOLVED"
    assert post.header("Priority") == "default"
    assert post.header("Tags") == "white_check_mark,selfheal,worker"
    assert post.text().startswith("worker.service failed") and "Root cause: " in post.text()


def test_ntfy_marks_a_failure_high_and_its_tag_says_so(bed, http_sink):
    hooked(bed, http_sink, "ntfy")
    msg = report(bed, "🛑 MiracleMax: worker - ESCALATED", "too many heals\n")
    selfheal.deliver(bed.config, bed.paths, msg)
    (post,) = http_sink.wait(1, path=HOOK)
    assert (post.header("Priority"), post.header("Tags")) == ("high", "octagonal_sign,selfheal,worker")


def test_nothing_that_reaches_an_ntfy_header_can_break_the_line_or_leave_ascii():
    assert selfheal.header_safe("Café ✅\r\nX-Injected: 1\x00") == "Cafe X-Injected: 1"
    settings = selfheal.Settings(name="Café\r\nX-Injected: 1", email_to=("a@b.c",), email_from="s@b.c",
                                 webhook_url="http://x.example.org/", webhook_format="ntfy")
    made = selfheal.new_report(settings, "✅", "worker", "RESOLVED", "fine\r\nnow ✅")
    body, headers = selfheal.webhook_request(settings, selfheal.webhook_event(settings, made))
    for value in headers.values():
        value.encode("ascii")
        assert "\r" not in value and "\n" not in value
    assert headers["Title"] == "Cafe\\x0d X-Injected: 1: worker - RESOLVED"
    assert body == "fine\\x0d\nnow ✅".encode("utf-8")  # the body stays UTF-8 text, as the report has it


@pytest.mark.parametrize("icon, service, label, status", [
    ("✅", "story-stages", "RESOLVED (recovered by systemd)", "RESOLVED"),
    ("✅", "worker", "RESOLVED (was down 5 min)", "RESOLVED"),
    ("⚠️", "worker", "FLAPPING", "FLAPPING"),
    ("⏰", "worker", "STILL FAILING", "STILL FAILING"),
    ("❌", "worker", "FAILED (selfheal crashed)", "FAILED"),
    ("❌", "selfheal", "CONFIG BROKEN", "CONFIG BROKEN"),
])
def test_the_webhook_is_told_the_reports_service_and_status_as_data_not_parsed_from_the_subject(
        bed, icon, service, label, status):
    made = selfheal.new_report(bed.config.settings, icon, service, label, "x\n", status=status)
    assert made["subject"] == "%s MiracleMax: %s - %s" % (icon, service, label)
    event = selfheal.webhook_event(bed.config.settings, made)
    assert (event["service"], event["status"], event["title"]) == (service, status, made["subject"][len(icon) + 1:])
    # A name with ": " and " - " in it, which no regex over the subject could split right.
    odd = selfheal.Settings(name="My: Host - 2", email_to=("a@b.c",), email_from="s@b.c")
    event = selfheal.webhook_event(odd, selfheal.new_report(odd, icon, service, label, "x\n", status=status))
    # A label that is not a status is refused unless the status is given: none is cut from text.
    if label != status:
        with pytest.raises(ValueError):
            selfheal.new_report(bed.config.settings, icon, service, label, "x\n")
    assert (event["service"], event["status"], event["name"]) == (service, status, "My: Host - 2")


def test_flapping_summary_starts_with_the_flapping_preface(bed, http_sink):
    hooked(bed, http_sink)
    for _ in range(3):  # flap_threshold = 3 failures within flap_window
        bed.host.failed(WORKER)
        assert bed.heal("worker")[0] == 0
    *_, flapping = [p.json() for p in http_sink.wait(3, path=HOOK)]
    assert flapping["subject"] == mail_subjects(bed)[-1] == "⚠️ MiracleMax: worker - FLAPPING"
    lead, *rest = flapping["summary"].split("\n")
    assert lead.startswith("FLAPPING: worker failed 3 times within 15 min (")
    assert lead.endswith("further recoveries in this incident are recorded in the history but not mailed one by one.")
    assert "RESOLVED" not in lead  # the inner heal report's title is not part of the chat summary
    issue, cause, healing = rest
    assert issue == "worker.service failed: main process killed by signal KILL (result: signal)."
    assert cause == ("Root cause: It was killed with SIGKILL from outside the service (an operator, a script, or "
                     "the kernel); systemd does not report an out-of-memory kill here.")
    assert healing.startswith("Healing time: ") and healing.endswith(" from failure to verified healthy")


def test_a_long_report_without_sections_is_cut_to_the_summary_limit(bed):
    summary = selfheal.report_summary("s", "s\n\n" + "traceback line\n" * 500)
    assert len(summary) == selfheal.SUMMARY_CHARS and summary.endswith("...")


# =============================================================================
# The queue: never lost, never blocking or repeating the other channel
# =============================================================================


def test_webhook_down_queues_the_post_while_the_mail_goes_out_and_healing_completes(bed, closed_port):
    configure(bed, webhook_url="http://127.0.0.1:%d%s" % (closed_port, HOOK))
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    assert [m["Subject"] for m in bed.sink.messages] == ["✅ MiracleMax: worker - RESOLVED"]
    assert bed.spooled() == []
    (queued,) = queued_posts(bed)
    assert stat.S_IMODE(queued.stat().st_mode) == 0o600
    assert stat.S_IMODE(bed.paths.spool.stat().st_mode) == 0o700
    assert json.loads(queued.read_text())["channels"] == {"mail": "sent", "webhook": "queued"}
    assert json.loads(queued.read_text())["subject"] == "✅ MiracleMax: worker - RESOLVED"


@pytest.mark.parametrize("linked", ["spool", "webhook_spool"])
def test_webhook_down_with_a_symlinked_queue_dir_heals_mails_and_writes_nothing_through_the_link(
        bed, closed_port, tmp_path, caplog, linked):
    configure(bed, webhook_url="http://127.0.0.1:%d%s" % (closed_port, HOOK))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = getattr(bed.paths, linked)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(elsewhere)
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    assert [m["Subject"] for m in bed.sink.messages] == ["✅ MiracleMax: worker - RESOLVED"]
    assert list(elsewhere.iterdir()) == []
    assert "is a symlink" in caplog.text


@pytest.mark.parametrize("linked", ["spool", "webhook_spool"])
def test_a_symlinked_webhook_queue_is_neither_posted_from_nor_emptied(bed, http_sink, tmp_path, caplog, linked):
    hooked(bed, http_sink)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "webhook").mkdir(parents=True)
    planted = (elsewhere / "webhook" if linked == "spool" else elsewhere) / "1-planted.json"
    planted.write_text(json.dumps({"subject": "planted", "summary": "", "status": "RESOLVED"}))
    target = getattr(bed.paths, linked)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(elsewhere)
    assert flushed(bed) == (0, 0)
    assert posts(http_sink) == [] and planted.exists()
    assert "is a symlink; selfheal neither sends nor removes" in caplog.text


def test_queued_post_is_made_once_the_webhook_is_back_and_the_mail_is_not_sent_again(bed, closed_port, http_sink):
    configure(bed, webhook_url="http://127.0.0.1:%d%s" % (closed_port, HOOK))
    bed.host.failed(WORKER)
    bed.heal("worker")
    hooked(bed, http_sink)  # the webhook is back
    assert flushed(bed) == (1, 0)
    assert flushed(bed, "mail") == (0, 0)
    assert [p.json()["subject"] for p in posts(http_sink)] == ["✅ MiracleMax: worker - RESOLVED"]
    assert len(bed.sink.messages) == 1 and queued_posts(bed) == []


def test_mail_down_queues_the_mail_while_the_webhook_posts_and_a_later_flush_posts_nothing_twice(
        bed, closed_port, http_sink):
    hooked(bed, http_sink, smtp_port=closed_port)
    bed.host.failed(WORKER)
    assert bed.heal("worker")[0] == 0
    assert len(posts(http_sink)) == 1 and len(bed.spooled()) == 1 and queued_posts(bed) == []
    hooked(bed, http_sink)  # mail is back
    assert selfheal.main(["flush-mail"]) == 0
    assert [m["Subject"] for m in bed.sink.messages] == ["✅ MiracleMax: worker - RESOLVED"]
    assert len(posts(http_sink)) == 1


def test_a_webhook_that_hangs_costs_a_report_only_its_timeout_and_the_post_is_queued(bed, http_sink):
    hooked(bed, http_sink, webhook_timeout="0.5s")
    http_sink.delay = 3
    msg = report(bed, "❌ MiracleMax: worker - FAILED", "x\n")
    import time
    started = time.monotonic()
    assert selfheal.deliver(bed.config, bed.paths, msg) is True  # the mail went out
    assert time.monotonic() - started < 0.5 + 1.5
    assert len(queued_posts(bed)) == 1 and len(bed.sink.messages) == 1


@pytest.mark.parametrize("status", [500, 503, 429, 408])
def test_a_5xx_or_a_busy_answer_keeps_the_post_queued_for_the_next_try(bed, http_sink, status):
    hooked(bed, http_sink)
    http_sink.status = status
    msg = report(bed, "❌ MiracleMax: worker - FAILED", "x\n")
    selfheal.deliver(bed.config, bed.paths, msg)
    assert len(queued_posts(bed)) == 1
    http_sink.status = 200
    assert flushed(bed) == (1, 0)
    assert [p.json()["status"] for p in posts(http_sink)] == ["FAILED", "FAILED"]


@pytest.mark.parametrize("status", [400, 404, 410, 302])
def test_a_4xx_or_a_redirect_sets_the_post_aside_as_rejected_and_later_posts_still_go(bed, http_sink, caplog, status):
    hooked(bed, http_sink)
    http_sink.status = status
    first = report(bed, "❌ MiracleMax: worker - FAILED", "x\n")
    selfheal.deliver(bed.config, bed.paths, first)
    assert queued_posts(bed) == []
    (kept,) = bed.paths.spool.glob("*.rejected")  # kept, never deleted unsent
    record = json.loads(kept.read_text())
    assert record["status"] == "FAILED" and record["channels"]["mail"] == "sent"
    assert record["channels"]["webhook"].startswith("rejected: ") and "HTTP %d" % status in record["channels"]["webhook"]
    assert any("refused for good" in r.getMessage() and "HTTP %d" % status in r.getMessage()
               for r in caplog.records if r.levelno == logging.ERROR)
    http_sink.status = 200
    later = report(bed, "✅ MiracleMax: worker - RESOLVED", "x\n")
    assert selfheal.deliver(bed.config, bed.paths, later) is True
    assert [p.method for p in http_sink.requests] == ["POST", "POST"]  # a redirect is never followed
    assert [m["Subject"] for m in bed.sink.messages] == ["❌ MiracleMax: worker - FAILED",
                                                         "✅ MiracleMax: worker - RESOLVED"]


def test_a_queued_post_refused_for_good_is_set_aside_and_the_rest_of_the_queue_goes(bed, http_sink):
    hooked(bed, http_sink)
    queue_post(bed, "❌ MiracleMax: worker - FAILED")
    http_sink.status = 404
    assert flushed(bed) == (0, 0)
    assert len(list(bed.paths.spool.glob("*.rejected"))) == 1


def test_new_post_waits_behind_queued_ones_and_they_arrive_oldest_first(bed, http_sink):
    hooked(bed, http_sink)
    queue_post(bed, "❌ MiracleMax: worker - FAILED")
    import time
    time.sleep(0.002)
    queue_post(bed, "⏰ MiracleMax: worker - STILL FAILING")
    msg = report(bed, "✅ MiracleMax: worker - RESOLVED (was down 1 h)", "x\n")
    assert selfheal.deliver(bed.config, bed.paths, msg) is True
    assert [p.json()["status"] for p in posts(http_sink)] == ["FAILED", "STILL FAILING", "RESOLVED"]
    assert queued_posts(bed) == []


def test_new_post_is_queued_behind_older_ones_while_the_webhook_still_fails(bed, http_sink):
    hooked(bed, http_sink)
    queue_post(bed, "❌ MiracleMax: worker - FAILED")
    http_sink.status = 502
    msg = report(bed, "✅ MiracleMax: worker - RESOLVED", "x\n")
    selfheal.deliver(bed.config, bed.paths, msg)
    assert len(http_sink.requests) == 1  # the older one was tried; the new one waits behind it
    assert [json.loads(p.read_text())["status"] for p in queued_posts(bed)] == ["FAILED", "RESOLVED"]


def test_damaged_queued_post_is_set_aside_as_bad_and_the_rest_is_posted(bed, http_sink):
    hooked(bed, http_sink)
    bed.paths.spool.mkdir(parents=True)
    damaged = bed.paths.spool / "0000000000001-deadbeef.json"
    damaged.write_text('{"subject": "half written')
    queue_post(bed, "✅ MiracleMax: worker - RESOLVED")
    assert flushed(bed) == (1, 0)
    assert damaged.with_suffix(".bad").is_file()


def test_queued_posts_wait_while_webhook_url_is_unset_and_are_not_dropped(bed, http_sink):
    hooked(bed, http_sink)
    queue_post(bed, "✅ MiracleMax: worker - RESOLVED")
    bed.configure()  # webhook_url removed from the config
    assert flushed(bed) == (0, 1)
    assert len(queued_posts(bed)) == 1 and http_sink.requests == []


def test_a_queued_post_is_made_in_the_format_configured_when_it_is_sent(bed, http_sink):
    hooked(bed, http_sink, "json")
    queue_post(bed, "✅ MiracleMax: worker - RESOLVED")
    hooked(bed, http_sink, "slack")
    selfheal.flush_outbox(bed.config, bed.paths)
    assert set(posts(http_sink)[0].json()) == {"text", "unfurl_links", "unfurl_media"}


def test_watch_run_makes_the_queued_posts(bed, http_sink):
    hooked(bed, http_sink)
    all_healthy(bed)
    queue_post(bed, "✅ MiracleMax: worker - RESOLVED")
    assert selfheal.cmd_watch(bed.config, bed.paths) == 0
    assert len(posts(http_sink)) == 1 and queued_posts(bed) == []


def test_flush_mail_flushes_both_queues_says_so_and_fails_while_a_post_is_left(bed, http_sink, capsys):
    hooked(bed, http_sink)
    queue_post(bed, "✅ MiracleMax: worker - RESOLVED")
    http_sink.status = 503
    assert selfheal.main(["flush-mail"]) == 1
    assert "flush-mail: 0 sent, 0 still queued; webhook: 0 sent, 1 still queued" in capsys.readouterr().out
    http_sink.status = 200
    assert selfheal.main(["flush"]) == 0  # the alias
    assert "webhook: 1 sent, 0 still queued" in capsys.readouterr().out
    assert selfheal.main(["flush-mail", "--quiet"]) == 0
    assert capsys.readouterr().out == ""


def test_flush_mail_without_a_webhook_prints_what_it_always_did(bed, capsys):
    assert selfheal.main(["flush-mail"]) == 0
    assert capsys.readouterr().out == "flush-mail: 0 sent, 0 still queued\n"


def test_user_and_password_in_the_url_become_basic_auth_and_no_log_line_shows_the_secret(bed, http_sink, caplog):
    caplog.set_level(logging.DEBUG, logger="selfheal")
    configure(bed, webhook_url="http://bot:pa%%40ss@127.0.0.1:%d%s" % (http_sink.port, HOOK))
    msg = report(bed, "✅ MiracleMax: worker - RESOLVED", "x\n")
    assert selfheal.deliver(bed.config, bed.paths, msg) is True
    (post,) = posts(http_sink)
    assert post.header("Authorization") == "Basic Ym90OnBhQHNz"  # bot:pa@ss
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "posted" in text and "T0KEN" not in text and "pa%40ss" not in text and "bot" not in text


def test_notify_never_posts_nothing_either(bed, http_sink):
    configure(bed, webhook_url=http_sink.url(HOOK), notify="never")
    bed.host.failed(WORKER)
    bed.heal("worker")
    assert bed.sink.messages == [] and http_sink.requests == [] and queued_posts(bed) == []


def test_test_email_posts_a_test_to_the_webhook_too(bed, http_sink, capsys):
    hooked(bed, http_sink, "ntfy")
    assert selfheal.main(["test-email"]) == 0
    (post,) = posts(http_sink)
    assert (post.header("Priority"), post.header("Tags")) == ("low", "test_tube,selfheal")
    assert "webhook: posted to http://127.0.0.1:%d/... as ntfy (HTTP 200)" % http_sink.port in capsys.readouterr().out


def test_test_email_fails_when_the_webhook_fails_even_though_the_mail_went(bed, http_sink, capsys):
    hooked(bed, http_sink)
    http_sink.status = 401
    assert selfheal.main(["test-email"]) == 1
    assert len(bed.sink.messages) == 1
    err = capsys.readouterr().err
    assert "webhook: FAILED" in err and "HTTP 401" in err and "T0KEN" not in err


def test_dashboard_counts_the_queued_posts(bed, http_sink):
    hooked(bed, http_sink)
    queue_post(bed, "✅ MiracleMax: worker - RESOLVED")
    all_healthy(bed)
    data = selfheal.dashboard_json(selfheal.collect_dashboard(bed.config, bed.paths))
    assert (data["config"]["mail_queue"], data["config"]["webhook_queue"]) == (0, 1)
    text = selfheal.render_dashboard(selfheal.collect_dashboard(bed.config, bed.paths), unicode=False)
    assert "1 waiting (posted by the next watch; now: sudo selfheal flush-mail)" in text


# =============================================================================
# Heartbeat
# =============================================================================


def test_a_watch_run_that_checked_every_service_pings_the_heartbeat(bed, http_sink):
    configure(bed, heartbeat_url=http_sink.url(BEAT))
    all_healthy(bed)
    assert selfheal.cmd_watch(bed.config, bed.paths) == 0
    (ping,) = http_sink.wait(1, path=BEAT)
    assert ping.method == "GET" and ping.header("User-Agent").startswith("selfheal/")
    assert selfheal.cmd_watch(bed.config, bed.paths) == 0
    assert len(http_sink.wait(2, path=BEAT)) == 2  # every run


def test_a_watch_run_that_finds_a_service_down_still_pings_it_was_checked(bed, http_sink):
    configure(bed, heartbeat_url=http_sink.url(BEAT))
    all_healthy(bed)
    bed.host.failed(WORKER)
    bed.host.unit("selfheal@.service")
    assert selfheal.cmd_watch(bed.config, bed.paths) == 0
    assert len(http_sink.wait(1, path=BEAT)) == 1


def test_a_watch_run_that_could_not_ask_systemd_about_a_service_does_not_ping(bed, http_sink, monkeypatch, caplog):
    configure(bed, heartbeat_url=http_sink.url(BEAT))
    all_healthy(bed)
    real = selfheal.show_units
    monkeypatch.setattr(selfheal, "show_units", lambda units, *a: dict(real(units, *a), **{WORKER: {}}))
    assert selfheal.cmd_watch(bed.config, bed.paths) == 0
    assert http_sink.requests == []
    assert any("could not check worker; no heartbeat" in r.getMessage() for r in caplog.records)


def test_a_watch_run_that_could_not_read_the_listening_ports_does_not_ping(bed, http_sink, monkeypatch):
    configure(bed, heartbeat_url=http_sink.url(BEAT))
    all_healthy(bed)
    monkeypatch.setattr(selfheal, "listening_ports", lambda proc=None: None)
    assert selfheal.cmd_watch(bed.config, bed.paths) == 0
    assert http_sink.requests == []


def test_a_watch_run_that_broke_on_a_service_does_not_ping(bed, http_sink, monkeypatch):
    configure(bed, heartbeat_url=http_sink.url(BEAT))
    all_healthy(bed)
    real = selfheal.watch_service

    def broken_for_worker(config, paths, svc, *args):
        if svc.name == "worker":
            raise RuntimeError("disk on fire")
        return real(config, paths, svc, *args)

    monkeypatch.setattr(selfheal, "watch_service", broken_for_worker)
    assert selfheal.cmd_watch(bed.config, bed.paths) == 1
    assert [r.path for r in http_sink.requests] == []


@pytest.mark.parametrize("down", ["refused", "http-500"])
def test_a_failed_heartbeat_never_fails_the_watch_and_is_logged_once_then_its_recovery(
        bed, http_sink, closed_port, caplog, down):
    caplog.set_level(logging.DEBUG, logger="selfheal")
    if down == "refused":
        configure(bed, heartbeat_url="http://127.0.0.1:%d%s" % (closed_port, BEAT))
    else:
        configure(bed, heartbeat_url=http_sink.url(BEAT))
        http_sink.status = 500
    all_healthy(bed)
    assert selfheal.cmd_watch(bed.config, bed.paths) == 0
    assert selfheal.cmd_watch(bed.config, bed.paths) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "heartbeat failed" in w]) == 1  # not one per run
    (warning,) = [w for w in warnings if "heartbeat failed" in w]
    assert ("refused" if down == "refused" else "HTTP 500") in warning and "6f1c" not in warning
    caplog.clear()
    http_sink.status = 200
    configure(bed, heartbeat_url=http_sink.url(BEAT))
    assert selfheal.cmd_watch(bed.config, bed.paths) == 0
    assert any("heartbeat to" in r.getMessage() and "works again" in r.getMessage() for r in caplog.records)


def test_watch_command_exits_0_when_the_heartbeat_cannot_be_reached(bed, closed_port, as_root):
    configure(bed, heartbeat_url="http://127.0.0.1:%d%s" % (closed_port, BEAT))
    all_healthy(bed)
    assert selfheal.main(["watch"]) == 0


def test_http_sink_answers_every_method_with_its_status_and_keeps_the_request(http_sink):
    import urllib.error
    import urllib.request
    http_sink.status = 418
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(urllib.request.Request(http_sink.url("/x"), data=b"hi"), timeout=5)
    assert exc.value.code == 418
    (req,) = http_sink.requests
    assert (req.method, req.path, req.body) == ("POST", "/x", b"hi")


def test_a_queue_that_cannot_be_flushed_never_costs_the_new_report_on_either_channel(bed, closed_port, monkeypatch):
    configure(bed, smtp_port=closed_port, webhook_url="http://127.0.0.1:%d%s" % (closed_port, HOOK))

    def broken(*args, **kwargs):
        raise OSError(40, "Too many levels of symbolic links", "/run/selfheal/locks")
    monkeypatch.setattr(selfheal, "flush_outbox", broken)
    msg = report(bed, "❌ MiracleMax: worker - FAILED", "worker broke\n")
    assert selfheal.deliver(bed.config, bed.paths, msg) is False
    assert len(bed.spooled()) == 1 and len(queued_posts(bed)) == 1


def test_a_damaged_heartbeat_marker_never_fails_the_watch(bed, closed_port):
    configure(bed, heartbeat_url="http://127.0.0.1:%d/ping" % closed_port)
    bed.paths.run.mkdir(parents=True, exist_ok=True)
    (bed.paths.run / "heartbeat.json").write_text('{"failing_since": "x", "logged": [1]}\n')
    assert selfheal.ping_heartbeat(bed.config, bed.paths) is False
    assert isinstance(json.loads((bed.paths.run / "heartbeat.json").read_text())["failing_since"], float)


def test_a_webhook_that_trickles_its_answer_is_given_up_after_webhook_timeout_in_all(bed):
    """urllib's timeout is per socket operation: one byte every 0.2 s would never trip it."""
    import threading
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = server.accept()
        with conn:
            conn.settimeout(0.5)
            try:
                conn.recv(65536)
            except OSError:
                pass
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        configure(bed, webhook_url="http://127.0.0.1:%d%s" % (server.getsockname()[1], HOOK), webhook_timeout="0.5s")
        msg = report(bed, "❌ MiracleMax: worker - FAILED", "worker broke\n")
        started = time.monotonic()
        assert selfheal.deliver(bed.config, bed.paths, msg) is True  # the mail went; the post did not
        assert time.monotonic() - started < 0.5 + 2.0
        assert len(queued_posts(bed)) == 1
    finally:
        stop.set()
        server.close()


def test_test_email_pings_the_heartbeat_and_says_so(bed, http_sink, capsys):
    configure(bed, heartbeat_url=http_sink.url("/ping/uuid"))
    assert selfheal.cmd_test_email(bed.config) == selfheal.EX_OK
    assert [r.method for r in http_sink.wait(1, path="/ping/uuid")] == ["GET"]
    assert "test-email: heartbeat: http://127.0.0.1:%d/... answered HTTP 200" % http_sink.port in capsys.readouterr().out


def test_test_email_fails_when_the_heartbeat_cannot_be_reached(bed, closed_port, capsys):
    configure(bed, heartbeat_url="http://127.0.0.1:%d/ping" % closed_port)
    assert selfheal.cmd_test_email(bed.config) == selfheal.EX_FAIL
    assert "test-email: heartbeat: FAILED: connection to http://127.0.0.1:%d/... refused" % closed_port \
        in capsys.readouterr().err
