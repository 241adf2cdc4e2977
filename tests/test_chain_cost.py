"""Dependencies in linear time (issue 21): a chain reads the state of every unit it needs once
(one `systemctl show` for many units), leaves healthy dependents alone without a heal of each
(no journal, no restart), counts its time against the heal's deadline (heal_timeout), and the
report says when that ran out. Fakes only."""

import time

import pytest

import selfheal

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

DB = "db.service"


def many(n, **keys):
    services = {"db": {}}
    services.update({"app%03d" % i: dict({"depends_on": "db"}, **keys) for i in range(n)})
    return services


def shows(host):
    return [c for c in host.calls("systemctl") if c[1:2] == ["show"]]


@pytest.mark.parametrize("n", [10, 100])
def test_a_database_with_healthy_dependents_costs_a_constant_number_of_systemctl_calls(bed, n):
    bed.configure(services=many(n))
    bed.host.failed(DB)
    for i in range(n):
        bed.host.unit("app%03d.service" % i, ActiveState="active", SubState="running", Result="success")
    bed.host.clear_calls()
    started = time.monotonic()
    assert bed.heal("db")[0] == selfheal.EX_OK
    took = time.monotonic() - started
    assert [c[-1] for c in bed.host.actions() if c[:2] == ["systemctl", "restart"]] == [DB]
    # The dependents' state: read in one call (or two: the root's own look at its chain), not per dependent.
    assert len([c for c in shows(bed.host) if "app000.service" in c]) <= 2
    assert len([c for c in shows(bed.host) if "app001.service" in c and "app000.service" not in c]) == 0
    assert len(bed.host.calls("journalctl")) <= 1  # the database's failed run only: no dependent diagnosed
    (mail,) = bed.sink.messages
    assert "because of it" not in mail.get_content()
    print("db with %d healthy dependents: healed and mailed in %.2f s" % (n, took))


def test_healthy_dependents_are_asked_their_health_checks_and_an_unhealthy_one_is_healed(bed, monkeypatch):
    services = many(3, health_url="http://127.0.0.1:9/health")
    services["app001"]["health_url"] = "http://127.0.0.1:9/sick"
    bed.configure(services=services)
    bed.host.failed(DB)
    for i in range(3):
        bed.host.unit("app%03d.service" % i, ActiveState="active", SubState="running", Result="success")
    asked = []

    def http_check(url, timeout, expect_status=(), expect_text=""):
        asked.append(url)
        return (False, "HTTP 500") if url.endswith("/sick") else (True, "HTTP 200")

    monkeypatch.setattr(selfheal, "http_check", http_check)
    bed.host.clear_calls()
    assert bed.heal("db")[0] == selfheal.EX_OK
    restarted = [c[-1] for c in bed.host.actions() if c[:2] == ["systemctl", "restart"]]
    assert restarted == [DB, "app001.service"]  # the root, and the one that did not answer


def test_dependents_left_for_lack_of_time_are_named_and_the_report_says_the_chain_ran_out(bed):
    bed.configure(services=many(2))
    graph, shown = selfheal.look_at_chain(bed.config)
    for i in range(2):
        bed.host.failed("app%03d.service" % i)
    graph, shown = selfheal.look_at_chain(bed.config)
    done, waiting, no_time = selfheal.heal_dependents(bed.config, bed.paths, bed.config.services["db"], graph,
                                                      until=time.monotonic(), shown=shown)
    assert (done, waiting, no_time) == ([], [], ["app000", "app001"])
    text = selfheal.chain_preface(bed.config.services["db"], selfheal.Outcome.RESOLVED, done, waiting, no_time,
                                  took=301.0, heal_timeout=300.0)
    assert "  app000: not looked at: the heal ran out of heal_timeout; the watch heals it" in text
    assert "The chain ran out of time: heal_timeout = 5 min was spent after 5 min; 2 service(s) above" in text


def test_the_chain_counts_against_heal_timeout_not_a_longer_deadline(bed, monkeypatch):
    bed.configure(services=many(1), heal_timeout="30s")
    seen = {}
    real = selfheal.chain_of

    def chain_of(config, paths, svc, result, until):
        seen["left"] = until - time.monotonic()
        return real(config, paths, svc, result, until)

    monkeypatch.setattr(selfheal, "chain_of", chain_of)
    bed.host.failed(DB)
    bed.heal("db")
    assert 0 < seen["left"] <= 30


def test_dependency_order_and_reverse_lookups_are_linear():
    n = 3000
    graph = {"db": ()}
    graph.update({"app%d" % i: ("db",) if i == 0 else ("db", "app%d" % (i - 1)) for i in range(n)})
    started = time.monotonic()
    dependents = selfheal.needed_by(graph, "db", reverse=True)
    assert dependents == ["app%d" % i for i in range(n)]  # each after those it needs
    assert selfheal.needed_by(graph, "app2") == ["db", "app0", "app1"]
    assert time.monotonic() - started < 2.0
