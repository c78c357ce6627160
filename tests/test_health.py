"""agent.core.health: the pure commit / revert / wait decision and the [health] policy parser."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.health import MAX_PROBES, Decision, HealthPolicy, decide, parse_policy
from agent.core.probe_spec import ProbeResult, ProbeSpec
from agent.errors import ConfigError

A = ProbeSpec("command", "a", argv=("true",))
B = ProbeSpec("http", "b", url="http://127.0.0.1/health")
POLICY = HealthPolicy(deadline=60, interval=2, retries=3, probes=(A, B))


def ok(name: str, at: float = 0.0) -> ProbeResult:
    return ProbeResult(name, True, "exit 0", at, 0.01)


def bad(name: str, detail: str = "exit 1: boom", at: float = 0.0) -> ProbeResult:
    return ProbeResult(name, False, detail, at, 0.01)


# --- decide: one row per rule ---------------------------------------------------------------
@pytest.mark.parametrize(("results", "now", "verdict", "in_reason"), [
    # commit: every probe's latest result is ok
    ([ok("a"), ok("b")], 5, "commit", "all 2 health probes passed"),
    ([bad("a"), bad("b"), ok("a"), ok("b")], 5, "commit", "passed"),
    ([ok("a"), ok("b")], 500, "commit", "passed"),  # passing after the deadline still commits
    # wait: not all passing yet, nothing exhausted, deadline not reached
    ([], 5, "wait", "a (no result yet); b (no result yet)"),
    ([ok("a")], 5, "wait", "b (no result yet)"),
    ([ok("a"), bad("b"), bad("b")], 5, "wait", "b (exit 1: boom)"),
    ([ok("b"), ok("a"), bad("b"), ok("b"), bad("b"), bad("b")], 5, "wait", "b (exit 1: boom)"),
    ([ok("a"), ok("b"), bad("a")], 60, "wait", "a (exit 1: boom)"),  # at the deadline, not past
    # revert: one probe failed `retries` times in a row
    ([bad("a"), bad("a"), bad("a")], 5, "revert", "probe 'a' failed 3 times in a row: exit 1"),
    ([ok("a"), ok("b"), bad("b", "HTTP 500")] + [bad("b", "HTTP 503")] * 2, 5, "revert",
     "probe 'b' failed 3 times in a row: HTTP 503"),
    # revert: the deadline passed without all passing
    ([ok("a")], 60.5, "revert", "deadline of 60s passed; still failing: b (no result yet)"),
    ([ok("a"), bad("b", "HTTP 500")], 61, "revert", "still failing: b (HTTP 500)"),
    ([bad("a"), bad("b")], 61, "revert", "a (exit 1: boom); b (exit 1: boom)"),
])
def test_decide_rules(results: list[ProbeResult], now: float, verdict: str,
                      in_reason: str) -> None:
    d = decide(POLICY, results, started=0, now=now)
    assert d.verdict == verdict
    assert in_reason in d.reason


def test_decide_with_zero_probes_commits() -> None:
    assert decide(HealthPolicy(), [], started=0, now=0).verdict == "commit"


def test_decide_ignores_results_of_probes_not_in_the_policy() -> None:
    results = [ok("a"), ok("b"), bad("gone"), bad("gone"), bad("gone")]
    assert decide(POLICY, results, started=0, now=5).verdict == "commit"


def test_decide_measures_the_deadline_from_started() -> None:
    assert decide(POLICY, [], started=1000, now=1059).verdict == "wait"
    assert decide(POLICY, [], started=1000, now=1061).verdict == "revert"


def test_decide_retry_exhaustion_is_reported_before_the_deadline() -> None:
    d = decide(POLICY, [bad("a")] * 3, started=0, now=100)
    assert d.reason.startswith("probe 'a' failed 3 times in a row")


def test_decide_reason_is_one_bounded_line() -> None:
    results = [bad("a", "line one\nline two " + "x" * 5000)]
    d = decide(POLICY, results, started=0, now=5)
    assert "\n" not in d.reason and len(d.reason) <= 1000


def test_decision_is_a_frozen_value() -> None:
    d = Decision("wait", "waiting")
    with pytest.raises(AttributeError):
        d.verdict = "commit"  # type: ignore[misc]


# --- decide: properties ---------------------------------------------------------------------
NAMES = ("a", "b", "c")
_results = st.lists(st.builds(ProbeResult, st.sampled_from((*NAMES, "other")), st.booleans(),
                              st.text(max_size=30), st.just(0.0), st.just(0.0)), max_size=30)
_policies = st.builds(
    HealthPolicy,
    deadline=st.floats(1, 3600), interval=st.just(2.0), retries=st.integers(1, 5),
    probes=st.lists(st.sampled_from(NAMES), unique=True, max_size=3).map(
        lambda names: tuple(ProbeSpec("command", n, argv=("true",)) for n in names)))
_times = st.floats(0, 10_000)


@given(_policies, _results, _results, _times, _times)
def test_revert_is_never_taken_back_by_more_failures_or_more_time(
        policy: HealthPolicy, results: list[ProbeResult], more: list[ProbeResult],
        now: float, later: float) -> None:
    if decide(policy, results, started=0, now=now).verdict != "revert":
        return
    failures = [ProbeResult(r.name, False, r.detail, 0, 0) for r in more]
    after = decide(policy, results + failures, started=0, now=now + later)
    assert after.verdict == "revert"


@given(_policies, _results, _times)
def test_all_latest_ok_commits_before_the_deadline(
        policy: HealthPolicy, results: list[ProbeResult], now: float) -> None:
    latest = [ok(p.name) for p in policy.probes]
    d = decide(policy, results + latest, started=0, now=min(now, policy.deadline))
    assert d.verdict == "commit"


@given(_policies, _results, _times)
def test_past_the_deadline_there_is_no_waiting(
        policy: HealthPolicy, results: list[ProbeResult], extra: float) -> None:
    d = decide(policy, results, started=0, now=policy.deadline + 0.001 + extra)
    assert d.verdict in ("commit", "revert")


@given(_policies, _results, _times)
def test_decide_is_total_and_its_reason_one_line(
        policy: HealthPolicy, results: list[ProbeResult], now: float) -> None:
    d = decide(policy, results, started=0, now=now)
    assert d.verdict in ("commit", "revert", "wait")
    assert d.reason and "\n" not in d.reason


# --- parse_policy ---------------------------------------------------------------------------
def test_parse_empty_table_gives_defaults() -> None:
    assert parse_policy({}) == HealthPolicy(deadline=120, interval=2, retries=3, probes=())


def test_parse_full_table() -> None:
    doc = {"deadline": 300, "interval": 0.5, "retries": 5, "probe": [
        {"type": "http", "url": "http://127.0.0.1:8080/health"},
        {"type": "systemd", "unit": "app.service", "timeout": 10},
    ]}
    p = parse_policy(doc)
    assert (p.deadline, p.interval, p.retries) == (300.0, 0.5, 5)
    assert [s.name for s in p.probes] == ["http http://127.0.0.1:8080/health",
                                          "systemd app.service"]


def test_bundle_override_replaces_given_keys_and_keeps_the_rest() -> None:
    base = parse_policy({"deadline": 300, "retries": 5})
    p = parse_policy({"deadline": 90}, base=base)
    assert (p.deadline, p.interval, p.retries) == (90.0, 2.0, 5)


def test_bundle_probes_are_added_to_the_device_probes() -> None:
    base = parse_policy({"probe": [{"type": "process", "name": "sshd"}]})
    p = parse_policy({"probe": [{"type": "tcp", "host": "127.0.0.1", "port": 8080}]}, base=base)
    assert [s.name for s in p.probes] == ["process sshd", "tcp 127.0.0.1:8080"]


def test_bundle_cannot_drop_device_probes_with_an_empty_list() -> None:
    base = parse_policy({"probe": [{"type": "process", "name": "sshd"}]})
    assert parse_policy({"probe": []}, base=base).probes == base.probes


def test_bundle_repeating_a_device_probe_runs_it_once() -> None:
    sshd = {"type": "process", "name": "sshd"}
    base = parse_policy({"probe": [sshd]})
    assert parse_policy({"probe": [sshd]}, base=base).probes == base.probes


def test_two_different_probes_with_one_name_are_refused() -> None:
    doc = {"probe": [{"type": "process", "name": "sshd"},
                     {"type": "command", "command": ["true"], "name": "process sshd"}]}
    with pytest.raises(ConfigError, match=r"health.probe\[1\]: another probe is already named"):
        parse_policy(doc)


def test_bundle_errors_name_the_bundle_and_hint_at_rebuilding_it() -> None:
    with pytest.raises(ConfigError, match=r"^bundle health\.deadline") as info:
        parse_policy({"deadline": 0}, base=HealthPolicy())
    assert "bundle" in info.value.hint


def test_total_probe_count_is_bounded_after_merging() -> None:
    def probes(n: int, prefix: str) -> list[dict[str, Any]]:
        return [{"type": "command", "command": ["true"], "name": f"{prefix}{i}"} for i in range(n)]
    base = parse_policy({"probe": probes(20, "dev")})
    with pytest.raises(ConfigError, match="33 probes in all, at most 32"):
        parse_policy({"probe": probes(13, "bundle")}, base=base)


@pytest.mark.parametrize(("doc", "message"), [
    ({"deadlin": 10}, "health has unknown key 'deadlin'; allowed: deadline, interval, retries"),
    ({"deadline": 3601}, "health.deadline must be a number from 1 to 3600"),
    ({"deadline": "60"}, "health.deadline must be a number"),
    ({"deadline": float("nan")}, "health.deadline must be a number"),
    ({"deadline": True}, "health.deadline must be a number"),
    ({"interval": 0.05}, "health.interval must be a number from 0.1 to 600"),
    ({"interval": 601}, "health.interval must be a number from 0.1 to 600"),
    ({"retries": 0}, "health.retries must be a whole number from 1 to 100"),
    ({"retries": 101}, "health.retries must be a whole number from 1 to 100"),
    ({"retries": 2.0}, "health.retries must be a whole number"),
    ({"probe": {"type": "http"}}, "health.probe must be a list of at most 32"),
    ({"probe": [{}] * (MAX_PROBES + 1)}, "health.probe must be a list of at most 32"),
    ({"probe": [{"type": "tcp", "host": "h"}]}, "health.probe[0] (tcp) needs the key 'port'"),
    ({"probe": [{"type": "http", "url": "gopher://x"}]}, "health.probe[0].url must be an http"),
    ([1, 2], "health must be a table"),
])
def test_parse_rejects_with_one_line_naming_the_key(doc: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(doc)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


# Arbitrary JSON-ish input, biased towards our own keys so the deep paths get exercised.
_KEYS = st.sampled_from(["deadline", "interval", "retries", "probe", "type", "url", "command",
                         "unit", "host", "port", "name", "path", "min_free_mb", "timeout"])
_TYPES = st.sampled_from(["command", "systemd", "http", "tcp", "process", "disk"])
_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
            | _TYPES | st.just("http://127.0.0.1:1/") | st.just("/"))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_KEYS | st.text(max_size=5), inner, max_size=5),
                     max_leaves=20)
# Mostly in range, so that one bad value does not hide the checks after it.
_numbers = st.one_of(st.integers(1, 100), st.floats(0.1, 600), _json)
# Per kind, values that are often right, so that most probe tables get past the first check.
_FIELDS = {
    "command": {"command": st.lists(st.text(max_size=8), min_size=1, max_size=3) | _json},
    "systemd": {"unit": st.sampled_from(["app.service", "-x", ""]) | _json},
    "http": {"url": st.sampled_from(["http://127.0.0.1:1/", "https://h/x", "ftp://h/", "http://["])
             | _json},
    "tcp": {"host": st.sampled_from(["127.0.0.1", "h\n"]) | _json, "port": _numbers},
    "process": {"name": st.text(max_size=8) | _json},
    "disk": {"path": st.sampled_from(["/", "/data", "rel"]) | _json, "min_free_mb": _numbers},
}
_probe_docs = _TYPES.flatmap(lambda kind: st.fixed_dictionaries(
    {"type": st.just(kind), **_FIELDS[kind]},
    optional={"timeout": _numbers} if kind == "process"
    else {"timeout": _numbers, "name": st.text(max_size=8) | _json}))
_near_valid = st.fixed_dictionaries({}, optional={
    "deadline": _numbers, "interval": _numbers, "retries": _numbers,
    "probe": st.lists(_probe_docs, max_size=4) | _json})
_arbitrary = st.dictionaries(_KEYS | st.text(max_size=5), _json, max_size=5) | _json


def _parses_or_config_error(doc: Any, as_override: bool) -> None:
    base = HealthPolicy(probes=(A,)) if as_override else None
    try:
        policy = parse_policy(doc, base=base)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(policy, HealthPolicy)
    assert len(policy.probes) <= MAX_PROBES
    assert 1 <= policy.deadline <= 3600 and 1 <= policy.retries <= 100


@settings(max_examples=500)
@given(_near_valid, st.booleans())
def test_parse_policy_on_near_valid_input_raises_only_config_error(
        doc: dict[str, Any], as_override: bool) -> None:
    _parses_or_config_error(doc, as_override)


@settings(max_examples=300)
@given(_arbitrary, st.booleans())
def test_parse_policy_on_arbitrary_input_raises_only_config_error(
        doc: Any, as_override: bool) -> None:
    _parses_or_config_error(doc, as_override)
