"""The telemetry policy, pure: label rules, downsampling, eviction, retries and Retry-After, rate,
span boundaries — tables of cases and hypothesis."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import telemetry_policy as tp
from agent.errors import ConfigError

RULES = tp.parse_rules([
    {"match": "edgeops_qoe_*", "scope": "local"},
    {"match": "app_user_*", "hash": ["user"], "drop": ["session"]},
    {"match": "app_visits_total", "aggregate": ["user"]},
    {"match": "site_*", "scope": "regional"},
], "t")


@pytest.mark.parametrize(("labels", "scope", "out"), [
    ({"__name__": "edgeops_qoe_latency_seconds", "target": "x"}, "local",
     (("__name__", "edgeops_qoe_latency_seconds"), ("target", "x"))),
    ({"__name__": "app_user_seconds", "user": "ann", "session": "s1"}, "upstream",
     (("__name__", "app_user_seconds"), ("user", tp.hash_value("ann", b"salt")))),
    ({"__name__": "app_visits_total", "user": "ann", "page": "/"}, "upstream",
     (("__name__", "app_visits_total"), ("page", "/"))),
    ({"__name__": "site_door_open", "door": "2"}, "regional",
     (("__name__", "site_door_open"), ("door", "2"), (tp.SCOPE_LABEL, "regional"))),
    ({"__name__": "node_load1", tp.SCOPE_LABEL: "regional"}, "regional",
     (("__name__", "node_load1"), (tp.SCOPE_LABEL, "regional"))),
    ({"__name__": "node_load1"}, "upstream", (("__name__", "node_load1"),)),
])
def test_the_first_matching_rule_decides_scope_and_labels(labels: dict[str, str], scope: str,
                                                          out: tuple[tuple[str, str], ...]) -> None:
    d = tp.decide(labels, RULES, b"salt")
    assert (d.scope, d.labels) == (scope, out)


def test_a_hashed_value_depends_on_the_salt() -> None:
    assert tp.hash_value("ann", b"a") != tp.hash_value("ann", b"b")


def test_aggregate_sums_series_that_collide() -> None:
    a = (("__name__", "v"), ("page", "/"))
    assert tp.aggregate([(a, 1, 2.0), (a, 1, 3.0), (a, 2, 1.0)]) == [(a, 1, 5.0), (a, 2, 1.0)]


@pytest.mark.parametrize(("raw", "word"), [
    ({"match": "x", "scope": "nowhere"}, "scope"),
    ({"match": ""}, "match"),
    ({"match": "x", "hash": "user"}, "hash"),
    ({"match": "x", "drop": ["__name__"]}, "metric name"),
    ({"match": "x", "colour": 1}, "unknown keys"),
])
def test_a_bad_rule_is_one_line_naming_it(raw: dict[str, object], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        tp.parse_rules([raw], "agent.toml [telemetry]")


B = tp.Budget(budget_bytes=100 * tp.SAMPLE_COST, full_resolution_ms=60_000, step_ms=10_000)


def test_downsampling_keeps_the_last_timestamp_with_the_mean_of_a_gauge() -> None:
    rows = [tp.Row(i, 1, i * 1000, float(i)) for i in range(10)]  # one 10 s step, ended long ago
    plan = tp.downsample(rows, now_ms=200_000, budget=B)
    assert plan.keep == [tp.Row(9, 1, 9000, 4.5, "gauge", True)]
    assert sorted(plan.remove) == list(range(9))


def test_downsampling_keeps_the_last_value_of_a_counter() -> None:
    rows = [tp.Row(i, 1, i * 1000, float(i * i), "counter") for i in range(10)]
    assert tp.downsample(rows, 200_000, B).keep[0].value == 81.0


def test_nothing_inside_full_resolution_or_a_cut_step_is_downsampled() -> None:
    # now - full resolution = 65 s: the step [60 s, 70 s) is cut by the horizon and stays whole
    rows = [tp.Row(i, 1, 60_000 + i * 1000, 1.0) for i in range(10)]
    assert tp.downsample(rows, 125_000, B) == tp.Downsampled([], [])


def test_rows_already_downsampled_are_left_alone() -> None:
    rows = [tp.Row(1, 1, 1000, 1.0, downsampled=True), tp.Row(2, 1, 2000, 1.0, downsampled=True)]
    assert tp.downsample(rows, 500_000, B) == tp.Downsampled([], [])


@given(st.lists(st.tuples(st.integers(1, 3), st.integers(0, 300_000), st.floats(-1e6, 1e6)),
                max_size=200), st.integers(0, 400_000))
def test_downsampling_accounts_for_every_row(raw: list[tuple[int, int, float]], now: int) -> None:
    rows = [tp.Row(i, s, t, v) for i, (s, t, v) in enumerate(raw)]
    plan = tp.downsample(rows, now, B)
    kept = {r.id for r in plan.keep}
    assert not kept & set(plan.remove) and len(set(plan.remove)) == len(plan.remove)
    steps = {(r.series, r.ts // B.step_ms) for r in plan.keep}
    assert len(steps) == len(plan.keep)  # one row per step per series
    assert all(r.ts // B.step_ms * B.step_ms + B.step_ms <= now - B.full_resolution_ms
               for r in plan.keep)


@pytest.mark.parametrize(("held", "evict"), [(0, 0), (100, 0), (101, 1), (250, 150)])
def test_eviction_brings_the_count_to_the_budget_exactly(held: int, evict: int) -> None:
    assert tp.evict_count(held, B) == evict


@pytest.mark.parametrize(("status", "header", "outcome", "delay"), [
    (200, None, tp.Outcome.ACKED, 0.0),
    (204, None, tp.Outcome.ACKED, 0.0),
    (400, None, tp.Outcome.REJECTED, 0.0),
    (404, None, tp.Outcome.REJECTED, 0.0),
    (429, None, tp.Outcome.RETRY, 2.0),
    (429, "30", tp.Outcome.RETRY, 30.0),
    (429, "100000", tp.Outcome.RETRY, 300.0),  # capped
    (503, "Wed, 02 Dec 2026 00:01:40 GMT", tp.Outcome.RETRY, 100.0),
    (503, "soon", tp.Outcome.RETRY, 2.0),  # unparsable: the backoff
    (500, "30", tp.Outcome.RETRY, 2.0),  # Retry-After only means something on 429/503
    (None, None, tp.Outcome.RETRY, 2.0),
])
def test_answers_classify_as_the_remote_write_spec_says(status: int | None, header: str | None,
                                                       outcome: tp.Outcome, delay: float) -> None:
    now = 1_796_169_600.0  # Wed, 02 Dec 2026 00:00:00 GMT
    v = tp.classify(status, header, failures=2, now=now, u=0.5)  # backoff: 0.5 * 4 s
    assert (v.outcome, v.delay) == (outcome, delay)


@given(st.integers(0, 100), st.floats(0, 0.999))
def test_backoff_never_exceeds_its_cap(failures: int, u: float) -> None:
    assert 0 <= tp.RetryPolicy(base=1, cap=300).backoff(failures, u) <= 300


def test_the_rate_limit_spaces_sends_by_their_size() -> None:
    r = tp.RateLimit(1000)
    r.sent(500, now=10.0)
    assert r.wait(10.0) == 0.5 and r.wait(11.0) == 0.0


@pytest.mark.parametrize(("before", "after", "span"), [
    ("idle", "writing", "write"), ("writing", "trial-pending", "reboot"),
    ("trial-pending", "testing", "health"), ("testing", "committing", "commit"),
    ("testing", "reverting", "revert"), ("committing", "idle", ""), ("idle", "idle", None),
    ("reverting", "idle", ""),
])
def test_phase_changes_are_span_boundaries(before: str, after: str, span: str | None) -> None:
    assert tp.span_for(before, after) == span


@pytest.mark.parametrize(("name", "prio"), [("edgeops_phase_info", tp.Priority.AGENT),
                                            ("edgeops_qoe_loss_ratio", tp.Priority.QOE),
                                            ("node_load1", tp.Priority.SYSTEM)])
def test_agent_series_go_first(name: str, prio: tp.Priority) -> None:
    assert tp.priority_of(name) is prio


@given(st.binary(max_size=512))
def test_remote_write_decode_returns_or_raises_its_one_error(body: bytes) -> None:
    from agent.adapters import remote_write

    with contextlib.suppress(remote_write.BadWrite):
        remote_write.decode(body)


@given(st.lists(st.tuples(st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
                                          st.text(max_size=20), max_size=4),
                          st.lists(st.tuples(st.integers(-2**62, 2**62), st.floats(allow_nan=False)),
                                   max_size=5)), max_size=5))
def test_remote_write_round_trips(raw: list[tuple[dict[str, str], list[tuple[int, float]]]]) -> None:
    from agent.adapters import remote_write

    series = [(tuple(sorted(lb.items())), sorted(pts)) for lb, pts in raw]
    assert remote_write.decode(remote_write.encode(series)) == series


@given(st.binary(max_size=512))
def test_otlp_decode_returns_or_raises_its_one_error(body: bytes) -> None:
    from agent.adapters import otlp

    with contextlib.suppress(otlp.BadExport):
        otlp.decode(body)


def test_the_embedded_prompb_descriptor_is_the_one_assembled_in_code() -> None:
    from agent.adapters import remote_write

    assert remote_write.file_descriptor().SerializeToString() == remote_write.FILE_DESCRIPTOR
