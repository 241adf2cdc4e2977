"""Dependencies, through the fakes: a service that fails while one it needs is down waits
(WAITING: not restarted, not mailed); the heal of the one it needs, once that is healthy,
verifies and heals the services that need it, in dependency order, and mails one report for
the chain, led by the root. depends_on and systemd's Requires=/BindsTo=/Wants=+After= count."""

import pytest

import selfheal
from conftest import conf

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

DB, APP, WEB = "db.service", "app.service", "web.service"
CHAIN = {"db": {}, "app": {"depends_on": "db"}, "web": {"depends_on": "app"}}


def restarts(host):
    return [c[-1] for c in host.actions() if c[:2] == ["systemctl", "restart"]]


def test_a_dependent_that_fails_while_its_dependency_is_down_waits_and_asks_for_that_heal(bed):
    bed.configure(services=CHAIN)
    bed.host.unit("selfheal@.service")
    bed.host.failed(DB)
    bed.host.failed(APP)
    rc, printed = bed.heal("app")
    assert rc == selfheal.EX_OK
    assert "WAITING" in printed
    assert restarts(bed.host) == []  # not restarted against a dead database
    assert bed.sink.messages == [] and bed.history("app") == []
    assert ["systemctl", "start", "--no-block", "selfheal@db.service"] in bed.host.actions()
    assert selfheal.load_service_state(bed.paths, "app")["waiting_on"]["service"] == "db"


def test_the_root_heal_restarts_its_dependents_after_it_in_order_and_mails_one_report(bed, section):
    bed.configure(services=CHAIN)
    for unit in (DB, APP, WEB):
        bed.host.failed(unit)
    assert bed.heal("web")[0] == selfheal.EX_OK  # waits for app (the first down on its way is db)
    assert bed.heal("app")[0] == selfheal.EX_OK
    bed.host.clear_calls()

    assert bed.heal("db")[0] == selfheal.EX_OK
    assert restarts(bed.host) == [DB, APP, WEB]  # the root first, then in dependency order
    (mail,) = bed.sink.messages
    assert mail["Subject"] == "✅ MiracleMax: db - RESOLVED"
    lines = mail.get_content().splitlines()
    assert lines[2] == "db failed; app and web failed because of it."
    assert lines[3].startswith("  app: restarted after db (service_restart), healthy in ")
    assert [(e["outcome"], e["trigger"]) for e in bed.history("app")] == [("RESOLVED", "after its dependency")]
    assert "waiting_on" not in selfheal.load_service_state(bed.paths, "app")
    # The dependents' incidents follow the root's thread; their heals are not failures of theirs.
    app_incident = selfheal.load_service_state(bed.paths, "app")["incident"]
    assert app_incident["message_id"] == mail["Message-ID"].strip()
    assert selfheal.heal_attempts(bed.paths, "app", 0) == []


def test_a_dependent_that_stayed_up_is_left_alone_and_not_named(bed):
    bed.configure(services=CHAIN)
    bed.host.failed(DB)
    bed.host.unit(APP, ActiveState="active", SubState="running", Result="success")
    bed.host.unit(WEB, ActiveState="active", SubState="running", Result="success")
    bed.heal("db")
    assert restarts(bed.host) == [DB]
    (mail,) = bed.sink.messages
    assert "because of it" not in mail.get_content()


def test_a_dependent_that_fails_again_after_the_root_is_named_in_the_subject(bed):
    bed.configure(services=CHAIN)
    bed.host.failed(DB)
    bed.host.failed(APP, on_restart="fail")
    bed.host.unit(WEB, ActiveState="active", SubState="running", Result="success")
    bed.heal("db")
    (mail,) = bed.sink.messages
    assert mail["Subject"] == "✅ MiracleMax: db - RESOLVED (app FAILED)"
    assert "  app: FAILED: " in mail.get_content()
    assert selfheal.load_service_state(bed.paths, "app")["incident"]["problem"] == "FAILED"


def test_a_root_that_stays_failed_says_who_waits_for_it(bed):
    bed.configure(services=CHAIN)
    bed.host.failed(DB, on_restart="fail")
    bed.host.failed(APP)
    bed.heal("app")
    bed.heal("db")
    (mail,) = bed.sink.messages
    body = mail.get_content()
    assert mail["Subject"] == "❌ MiracleMax: db - FAILED"
    assert "db failed; app failed because of it." in body
    assert "They are not restarted while db is down" in body
    assert restarts(bed.host) == [DB]


def test_systemd_requires_and_wants_with_after_count_as_dependencies(bed):
    bed.configure(services={"db": {}, "app": {}, "cache": {}})
    bed.host.failed(DB, RequiredBy="app.service")
    bed.host.failed(APP, Requires="db.service")
    bed.host.failed("cache.service", Wants="db.service")  # Wants= without After=: not a dependency
    graph, _ = selfheal.look_at_chain(bed.config)
    assert graph == {"db": (), "app": ("db",), "cache": ()}
    bed.host.unit("cache.service", ActiveState="failed", Wants="db.service", After="db.service")
    assert selfheal.look_at_chain(bed.config)[0]["cache"] == ("db",)
    assert bed.heal("app")[1].count("WAITING") == 1


def test_a_systemd_dependency_that_closes_a_cycle_is_ignored():
    config = selfheal.parse_config(conf(services={"a": {"depends_on": "b"}, "b": {}}))
    shown = {"b.service": {"Requires": "a.service"}}
    assert selfheal.dependency_graph(config, shown) == {"a": ("b",), "b": ()}


def test_a_service_with_no_dependencies_costs_no_extra_systemctl_call(bed):
    bed.configure(services={"db": {}, "app": {}})
    bed.host.failed(DB)
    bed.heal("db")
    shows = [c for c in bed.host.calls("systemctl") if c[1:2] == ["show"]]
    assert not any("selfheal@db.service" in c for c in shows)


@pytest.mark.parametrize("services, problem", [
    ({"a": {"depends_on": "b"}, "b": {"depends_on": "c"}, "c": {"depends_on": "a"}},
     "[a] depends_on: a cycle: a -> b -> c -> a"),
    ({"a": {"depends_on": "a"}}, "[a] depends_on: a cannot depend on itself"),
    ({"a": {"depends_on": "dbb"}, "db": {}}, "[a] depends_on: 'dbb' is not a service in this file (did you mean 'db'?)"),
    ({"a": {"depends_on": "db, db"}, "db": {}}, "[a] depends_on: a service is listed twice: 'db, db'"),
])
def test_dependency_problems_are_config_errors_with_their_line(services, problem):
    with pytest.raises(selfheal.ConfigError) as caught:
        selfheal.parse_config(conf(services=services), "/etc/selfheal/services.conf")
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].endswith(problem)
    assert caught.value.problems[0].startswith("/etc/selfheal/services.conf:")


def test_the_watch_does_not_heal_a_dependent_while_what_it_needs_is_down(bed):
    bed.configure(services=CHAIN)
    bed.host.unit("selfheal@.service")
    bed.host.failed(DB)
    bed.host.failed(APP)
    bed.host.unit(WEB, ActiveState="active", SubState="running", Result="success")
    verdicts, errors = {}, []
    for _ in range(3):
        selfheal.look(bed.config, bed.paths, list(bed.config.services.values()), verdicts, errors)
    assert errors == []
    assert verdicts["app"] == "waiting" and verdicts["db"] == "failed"
    starts = [c for c in bed.host.actions() if c[1:2] == ["start"]]
    assert starts == [["systemctl", "start", "--no-block", "selfheal@db.service"]]


def test_a_bug_in_a_dependents_heal_costs_the_root_neither_its_record_nor_its_mail(bed, monkeypatch):
    bed.configure(services=CHAIN)
    bed.host.failed(DB)
    bed.host.failed(APP)
    bed.host.unit(WEB, ActiveState="active", SubState="running", Result="success")
    real_heal = selfheal.heal

    def heal(config, svc, *args, **kwargs):
        if svc.name == "app":
            raise RuntimeError("a bug")
        return real_heal(config, svc, *args, **kwargs)

    monkeypatch.setattr(selfheal, "heal", heal)
    assert bed.heal("db")[0] == selfheal.EX_OK
    subjects = {m["Subject"] for m in bed.sink.messages}
    assert subjects == {"❌ MiracleMax: app - FAILED (selfheal crashed)", "✅ MiracleMax: db - RESOLVED"}
    assert [e["outcome"] for e in bed.history("db")] == ["RESOLVED"]


def test_a_note_that_it_waited_is_forgotten_once_it_is_healed_on_its_own(bed):
    bed.configure(services=CHAIN)
    bed.host.unit("selfheal@.service")
    bed.host.failed(DB)
    bed.host.failed(APP)
    bed.heal("app")  # WAITING for db (and it asked for db's heal)
    bed.host.unit("selfheal@db.service", ActiveState="inactive", SubState="dead")  # that heal is over
    bed.host.unit(DB, ActiveState="active", SubState="running", Result="success")
    bed.heal("app")  # db came back by itself: app is healed on its own
    assert "waiting_on" not in selfheal.load_service_state(bed.paths, "app")
    bed.host.failed(DB, on_restart="fail", InvocationID="d" * 32)
    bed.host.unit(WEB, ActiveState="active", SubState="running", Result="success")
    before = len(bed.sink.messages)
    bed.heal("db")
    mail = bed.sink.messages[before]
    assert mail["Subject"] == "❌ MiracleMax: db - FAILED"
    assert "because of it" not in mail.get_content()  # app is running: not waiting, not named


def test_a_dependent_that_did_not_come_back_is_mailed_even_under_notify_on_failure(bed):
    bed.configure(services=CHAIN, notify="on-failure")
    bed.host.failed(DB)
    bed.host.failed(APP, on_restart="fail")
    bed.host.unit(WEB, ActiveState="active", SubState="running", Result="success")
    bed.heal("db")
    (mail,) = bed.sink.messages
    assert mail["Subject"] == "✅ MiracleMax: db - RESOLVED (app FAILED)"


def test_a_dependent_that_needs_another_service_still_down_keeps_waiting_for_that_one(bed):
    bed.configure(services={"db": {}, "redis": {}, "web": {"depends_on": "db, redis"}})
    bed.host.unit("selfheal@.service")
    bed.host.failed(DB)
    bed.host.failed("redis.service", on_restart="fail")
    bed.host.failed(WEB)
    bed.heal("web")
    bed.host.clear_calls()
    bed.heal("db")
    assert restarts(bed.host) == [DB]  # not web: redis is still down
    assert selfheal.load_service_state(bed.paths, "web")["waiting_on"]["service"] == "redis"
    (mail,) = bed.sink.messages
    assert "  web: waiting; selfheal heals it once what it needs is healthy again" in mail.get_content()


def test_a_dependent_stopped_on_purpose_is_not_started_by_the_chain(bed):
    bed.configure(services={"db": {}, "app": {"depends_on": "db", "on_stopped": "ignore"}})
    bed.host.failed(DB)
    bed.host.unit(APP, ActiveState="inactive", SubState="dead", Result="success")
    bed.heal("db")
    assert restarts(bed.host) == [DB]
    assert "because of it" not in bed.sink.messages[0].get_content()


def test_a_healthy_root_heals_only_what_waited_for_it_and_says_nothing_otherwise(bed):
    bed.configure(services=CHAIN)
    bed.host.unit(DB, ActiveState="active", SubState="running", Result="success")
    bed.host.failed(APP)  # down for a reason of its own, not waiting for db
    assert bed.heal("db", trigger=selfheal.MANUAL_TRIGGER)[0] == selfheal.EX_OK
    assert restarts(bed.host) == [] and bed.sink.messages == []


def test_a_root_already_reported_failed_is_not_healed_again_by_each_dependents_failure(bed):
    bed.configure(services=CHAIN)
    bed.host.unit("selfheal@.service")
    bed.host.failed(DB, on_restart="fail")
    bed.heal("db")  # FAILED, mailed
    bed.host.failed(APP)
    bed.host.clear_calls()
    assert "WAITING" in bed.heal("app")[1]
    assert [c for c in bed.host.actions() if c[1:2] == ["start"]] == []  # db's retries and a human do


def test_the_watch_heals_a_waiting_service_at_its_first_look_once_what_it_needs_is_up(bed):
    bed.configure(services=CHAIN)
    bed.host.unit("selfheal@.service")
    bed.host.failed(DB)
    bed.host.failed(APP)
    bed.heal("app")  # WAITING
    bed.host.unit("selfheal@db.service", ActiveState="inactive", SubState="dead")
    bed.host.unit(DB, ActiveState="active", SubState="running", Result="success")  # back by itself
    bed.host.unit(WEB, ActiveState="active", SubState="running", Result="success")
    bed.host.clear_calls()
    verdicts, errors = {}, []
    selfheal.look(bed.config, bed.paths, list(bed.config.services.values()), verdicts, errors)
    assert verdicts["app"] == "failed"
    assert [c for c in bed.host.actions() if c[1:2] == ["start"]] == [
        ["systemctl", "start", "--no-block", "selfheal@app.service"]]
