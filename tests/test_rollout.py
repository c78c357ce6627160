"""agent.controller.rollout: the pure wave planner and health gate, by tables and hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.controller.errors import BadRequest
from agent.controller.rollout import Policy, Target, evaluate, plan, spread_order, wave_sizes

P = Policy()


@pytest.mark.parametrize(("total", "canary", "growth", "expected"), [
    (0, 5, 2, []),
    (1, 5, 2, [1]),
    (10, 5, 2, [1, 2, 4, 3]),
    (200, 5, 2, [10, 20, 40, 80, 50]),
    (200, 10, 2, [20, 40, 80, 60]),
    (100, 100, 2, [100]),
    (5, 50, 1, [3, 2]),
])
def test_wave_sizes(total: int, canary: float, growth: float, expected: list[int]) -> None:
    assert wave_sizes(total, Policy(canary_percent=canary, growth=growth)) == expected


@pytest.mark.parametrize(("outcomes", "started", "now", "last", "verdict", "reason"), [
    ({}, 0, 0, False, "advance", "empty wave"),
    ({"a": "success", "b": "success"}, 0, 1, False, "advance", "2 of 2 devices committed"),
    ({"a": "success", "b": "success"}, 0, 1, True, "complete", "2 of 2"),
    ({"a": "failure", "b": "pending", "c": "pending", "d": "pending", "e": "pending"}, 0, 1, False,
     "pause", "1 of 5 devices in the wave failed"),
    ({"a": "success", "b": "running"}, 0, 1, False, "wait", "1 of 2 committed"),
    ({"a": "success", "b": "running"}, 0, 3601, False, "pause", "only 1 of 2 devices committed within"),
    ({"a": "canceled", "b": "success"}, 0, 1, False, "wait", "1 of 2 committed, 0 failed"),
])
def test_gate(outcomes: dict, started: float, now: float, last: bool, verdict: str, reason: str) -> None:
    d = evaluate(outcomes, policy=P, wave_started=started, now=now, last_wave=last)
    assert d.verdict == verdict
    assert reason in d.reason


@pytest.mark.parametrize("bad", [{"canary_percent": 0}, {"canary_percent": 101}, {"growth": 0.5},
                                 {"success_threshold": 0}, {"error_threshold": 1.5}, {"window": 0},
                                 {"nope": 1}, {"growth": "x"}])
def test_policy_rejects(bad: dict) -> None:
    with pytest.raises(BadRequest, match="rollout policy"):
        Policy.from_dict(bad)


def test_canary_spreads_across_sites_and_is_deterministic() -> None:
    targets = [Target(f"d{i}", f"site{i % 4}") for i in range(40)] + [Target("lonely", "site-x")]
    first = plan(targets, Policy(canary_percent=10), "seed")
    assert first == plan(list(reversed(targets)), Policy(canary_percent=10), "seed")
    sites = {t.device_id: t.site for t in targets}
    assert len({sites[d] for d in first[0]}) == 5  # 5 devices, 5 sites: one each
    assert plan(targets, Policy(canary_percent=10), "other")[0] != first[0]


targets_st = st.lists(st.tuples(st.text("abcdef", min_size=1, max_size=6), st.sampled_from("xyz")),
                      max_size=80, unique_by=lambda t: t[0]).map(lambda ts: [Target(i, s) for i, s in ts])


@settings(max_examples=200, deadline=None)
@given(targets_st, st.floats(0.5, 100), st.floats(1, 5), st.text(max_size=5))
def test_plan_partitions_targets(targets: list[Target], canary: float, growth: float, seed: str) -> None:
    waves = plan(targets, Policy(canary_percent=canary, growth=growth), seed)
    flat = [d for w in waves for d in w]
    assert sorted(flat) == sorted(t.device_id for t in targets)  # each device exactly once
    assert all(w for w in waves)
    assert all(len(a) < len(b) for a, b in itertools.pairwise(waves[:-1]))  # growing
    if targets:
        assert len(waves[0]) == max(1, min(len(targets), -(-len(targets) * canary // 100)))
        # spread: no site gets a second canary slot before every site with devices has one
        sites = {t.device_id: t.site for t in targets}
        per_site = [sites[d] for d in waves[0]]
        assert len(set(per_site)) == min(len(waves[0]), len(set(sites.values())))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["pending", "running", "success", "failure", "canceled"]), max_size=30),
       st.floats(0, 10_000))
def test_gate_never_advances_past_error_threshold(outcomes: list[str], elapsed: float) -> None:
    d = evaluate({str(i): o for i, o in enumerate(outcomes)}, policy=P, wave_started=0, now=elapsed,
                 last_wave=False)
    n = len(outcomes)
    if n and outcomes.count("failure") / n >= P.error_threshold:
        assert d.verdict == "pause"
    if d.verdict == "advance" and n:
        assert outcomes.count("success") / n >= P.success_threshold


def test_spread_order_is_a_permutation() -> None:
    ts = [Target(str(i), "s") for i in range(10)]
    assert sorted(spread_order(ts, "x")) == sorted(t.device_id for t in ts)
