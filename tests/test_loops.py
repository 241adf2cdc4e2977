"""Never re-arm a loop (issue 21): when the evidence says a service's config is broken (its
journal, or its config_check), a heal makes no reset-failed and second restart, and at most
one failed start a round; systemd's start limit, which stopped its Restart= loop, is kept until
a config_check passes, or a heal is asked for (by hand, or the watch's retry). Fakes only."""

import shutil

import pytest

import selfheal

pytestmark = pytest.mark.usefixtures("quiet_selfheal")

REDIS = "redis-server.service"
TYPO = "Dec 07 18:00:01 vm redis-server[4100]: *** FATAL CONFIG FILE ERROR (Redis 7.0.15) ***"
TRUE, FALSE = shutil.which("true"), shutil.which("false")


def configure(bed, strategies="config_validation, service_restart", check=None, files=None):
    keys = {"strategies": strategies}
    if check:
        keys["config_check"] = check
    if files:
        keys["config_files"] = files
    bed.configure(services={"redis-server": keys})


def changes(bed):
    """What the heal asked of systemd for the unit: restart, reset-failed, start..."""
    return [c[1] for c in bed.host.actions() if c[0] == "systemctl" and REDIS in c]


def looping(bed, result="start-limit-hit", on_restart="fail"):
    """Redis with Restart=always, a typo in its config: systemd restarted it until its start limit."""
    bed.host.failed(REDIS, result=result, code="1", status="1", Restart="always", on_restart=on_restart)
    bed.host.journal([TYPO], invocation=bed.host.load()["units"][REDIS]["props"]["InvocationID"])


def test_start_limit_with_a_broken_config_in_the_journal_is_triaged_bad_config():
    diag = selfheal.Diagnosis(unit={}, result="start-limit-hit", exit_code="exited", exit_status="1",
                              from_monitor_env=True, journal=(TYPO,), listeners=(), holders=(),
                              failed_at=None, detected_after=None)
    assert selfheal.triage(diag) == ("bad_config", TYPO)


def test_broken_config_without_a_checker_is_not_reset_so_systemds_start_limit_stops_the_loop(bed):
    configure(bed, strategies="service_restart")
    looping(bed)
    assert bed.heal("redis-server")[0] == 1
    assert changes(bed) == []
    (event,) = bed.history("redis-server")
    assert event["outcome"] == "FAILED"


def test_broken_config_its_checker_rejects_gets_neither_reset_nor_restart(bed):
    configure(bed, check=FALSE)
    looping(bed)
    assert bed.heal("redis-server")[0] == 1
    assert changes(bed) == []


def test_config_fixed_by_hand_is_reset_and_restarted_once_its_checker_passes(bed):
    configure(bed, check=TRUE)
    looping(bed, on_restart="active")
    assert bed.heal("redis-server")[0] == 0
    assert changes(bed) == ["reset-failed", "restart"]


def test_a_broken_config_gets_no_start_from_its_own_failure_and_one_from_a_retry(bed, tmp_path):
    """No checker, result exit-code (no start limit yet): the heal its failure triggers starts
    nothing (the journal says the config is invalid, nothing can prove it fixed); the watch's
    retry, asked for, starts it once, and it fails once: at most one failed start a round."""
    (tmp_path / "redis.conf").write_text("port 6379\n")
    configure(bed, files=tmp_path / "redis.conf")
    looping(bed, result="exit-code")
    assert bed.heal("redis-server")[0] == 1
    assert changes(bed) == []
    bed.host.clear_calls()
    assert bed.heal("redis-server", trigger="retry")[0] == 1
    assert changes(bed) == ["restart"]


def test_the_echo_of_that_one_failed_start_adds_no_second(bed, tmp_path):
    (tmp_path / "redis.conf").write_text("port 6379\n")
    configure(bed, files=tmp_path / "redis.conf")
    looping(bed, result="exit-code")
    bed.heal("redis-server", trigger="retry")
    props = bed.host.load()["units"][REDIS]["props"]
    bed.host.clear_calls()
    env = {"MONITOR_UNIT": REDIS, "MONITOR_SERVICE_RESULT": "exit-code", "MONITOR_EXIT_CODE": "exited",
           "MONITOR_EXIT_STATUS": "1", "MONITOR_INVOCATION_ID": props["InvocationID"]}
    assert bed.heal("redis-server", env=env)[0] == 0
    assert changes(bed) == []


@pytest.mark.parametrize("trigger", ["manual", "retry"])
def test_a_heal_asked_for_clears_the_start_limit_and_restarts_once(bed, trigger):
    configure(bed, strategies="service_restart")
    looping(bed, on_restart="active")
    assert bed.heal("redis-server", trigger=trigger)[0] == 0
    assert changes(bed) == ["reset-failed", "restart"]


def test_a_plain_start_limit_without_config_evidence_is_still_reset_and_restarted(bed):
    configure(bed, strategies="service_restart")
    bed.host.failed(REDIS, result="start-limit-hit", code="1", status="1")
    assert bed.heal("redis-server")[0] == 0
    assert changes(bed) == ["reset-failed", "restart"]
