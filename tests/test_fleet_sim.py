"""The fleet simulator's scenarios against the real controller (127.0.0.1, SQLite, compressed time).

Each test runs one bundled scenario (tools/fleet_sim/scenarios) with a small fleet and checks
what the scenario is about from the devices' own view and the controller's. Time is
simulated (``netsim.SimClock``): a week offline takes about half a minute here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.controller import rollout
from agent.errors import ConfigError
from agent.host import fleet_sim
from agent.host.netsim import Link, flapping


def scenario(name: str, **changes: object) -> fleet_sim.Scenario:
    return fleet_sim.Scenario.load(fleet_sim.scenario_path(name)).with_(**changes)


def test_a_bad_release_halts_after_the_canary_and_reaches_no_one_else(tmp_path: Path) -> None:
    rep = fleet_sim.run(scenario("canary-bad-release", devices=60), tmp_path)
    assert rep.rollout["status"] == "paused" and rep.rollout["current_wave"] == 0
    canary = set(rep.canary)
    assert 0 < len(canary) < 60
    received = {d["id"] for d in rep.devices if d["received"]}
    assert received <= canary  # nobody outside the canary downloaded the release
    for d in rep.devices:
        assert d["running"] == "1.0", d  # every canary reverted; the rest never moved
        assert rep.controller_versions[d["id"]] == d["running"]  # the controller agrees
        if d["id"] in canary and d["received"]:
            assert d["slots"][d["booted"]]["state"] == "good"
            assert any(s["state"] == "bad" and s["version"] == "2.0" for s in d["slots"].values())


def test_a_site_back_from_a_week_offline_catches_up_without_a_stampede(tmp_path: Path) -> None:
    sc = scenario("site-offline-week", devices=45)
    rep = fleet_sim.run(sc, tmp_path, until="converged")
    assert all(d["running"] == "2.0" for d in rep.devices)  # every device converged
    (cut,) = next(s for s in sc.sites if s.name == "remote").link.partitions
    remote = [d for d in rep.devices if d["id"].startswith("remote")]
    assert remote and all(rep.finished_at[d["id"]] >= cut[1] for d in remote)  # really was away
    assert rep.proxies["remote"]["refused"] > 0
    # polls per poll interval, after the first (the devices' start) and before the last (partial)
    rates = rep.poll_rates(sc.poll_sleep)[1:-1]
    steady = sc.devices  # each device once per interval
    assert rates and max(rates) <= 2 * steady, rates
    back = int(cut[1] // sc.poll_sleep)  # the interval in which the site returned, and after
    assert max(rep.poll_rates(sc.poll_sleep)[back:back + 3]) <= 2 * steady


def test_a_wan_cut_leaves_the_regional_site_updating_and_central_hears_all_within_a_minute(
        tmp_path: Path) -> None:
    sc = scenario("regional-wan-cut", devices=30)
    rep = fleet_sim.run(sc, tmp_path, until="converged")
    (cut,) = sc.wan.partitions
    edge = [d["id"] for d in rep.devices if d["id"].startswith("edge")]
    assert edge and all(rep.finished_at[d] < cut[1] for d in edge)  # updated during the cut
    assert all(d["running"] == "2.0" for d in rep.devices)
    assert rep.wan_back == cut[1]
    late = {d: rep.central_closed_at[d] - cut[1] for d in edge}
    assert all(t <= 60 for t in late.values()), late  # central had every report within a minute
    assert rep.rollout["status"] == "finished"


def test_a_paced_rollout_keeps_each_site_under_its_cap_and_converges(tmp_path: Path) -> None:
    sc = scenario("slow-site", devices=24)
    rep = fleet_sim.run(sc, tmp_path, until="converged")
    assert all(d["running"] == "2.0" for d in rep.devices)
    pacing = rep.rollout["pacing"]
    assert pacing["site_concurrency"] == sc.policy["site_concurrency"]
    assert pacing["sites"]["slow"]["bandwidth"] > 0  # measured from the devices' reports
    for site in ("fast", "slow"):
        spans = [s for d in rep.devices if d["id"].startswith(site) for s in d["downloads"]]
        most = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
        assert most <= sc.policy["site_concurrency"]


def test_a_flapping_link_cuts_transfers_yet_every_device_converges_once(tmp_path: Path) -> None:
    """A link down 20 s of every minute through the whole rollout: requests are cut and
    retried, yet every device ends on the release, the controller agrees (one successful
    action per device, nothing else), and no report is left queued on any device."""
    sc = scenario("flapping-link", devices=30)
    rep = fleet_sim.run(sc, tmp_path, until="converged")
    assert rep.proxies["flappy"]["refused"] > 0  # the link really did drop
    assert rep.stats.failed > 0  # and the devices saw it
    assert all(d["running"] == "2.0" for d in rep.devices)
    assert all(rep.controller_versions[d["id"]] == "2.0" for d in rep.devices)
    assert all(d["pending_reports"] == 0 for d in rep.devices)
    assert rep.rollout["status"] == "finished"
    assert {st for w in rep.rollout["actions"].values() for st in w} == {"success"}
    assert sum(w["success"] for w in rep.rollout["actions"].values()) == sc.devices
    flappy = [d for d in rep.devices if d["id"].startswith("flappy")]
    assert flappy and all(len(set(d["received"])) == 1 for d in flappy)  # one action each


def test_a_scenario_with_a_bad_value_is_refused_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\ndevices = "many"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        fleet_sim.Scenario.load(bad)
    bad.write_text('[[sites]]\nname = "a"\npartitions = [[10, 5]]\n')
    with pytest.raises(ConfigError, match="start < end"):
        fleet_sim.Scenario.load(bad)
    with pytest.raises(ConfigError, match="known: "):
        fleet_sim.scenario_path("no-such-scenario")


def test_every_bundled_scenario_parses() -> None:
    names = sorted(p.stem for p in fleet_sim.SCENARIOS.glob("*.toml"))
    assert {"canary-bad-release", "site-offline-week", "regional-wan-cut", "flapping-link",
            "slow-site"} <= set(names)
    for n in names:
        assert fleet_sim.Scenario.load(fleet_sim.scenario_path(n)).devices >= 1


def test_the_cli_lists_scenarios_and_refuses_a_bad_device_count() -> None:
    out = subprocess.run([sys.executable, "-m", "agent.cli", "fleet-sim", "--list"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "canary-bad-release" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "agent.cli", "fleet-sim", "slow-site", "--devices", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--devices" in bad.stderr


# --- the pure parts ----------------------------------------------------------------------------
@given(st.floats(0.5, 50), st.floats(1, 4), st.floats(0, 600), st.booleans())
def test_the_ramp_never_shrinks_and_grows_only_while_healthy(rate: float, growth: float, t: float,
                                                             healthy: bool) -> None:
    p = rollout.Policy(ramp_rate=rate, ramp_growth=growth)
    now, later = (rollout.ramp_allowance(p, x, healthy=healthy) for x in (t, t + 60))
    assert later >= now >= rate
    flat = rollout.ramp_allowance(p, t, healthy=False)
    assert flat <= rollout.ramp_allowance(p, t, healthy=True)


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 3)), max_size=40),
       st.integers(0, 5), st.floats(0, 30))
def test_release_respects_the_site_caps_and_the_ramp(targets: list[tuple[str, int]], cap: int,
                                                     released: float) -> None:
    ts = [rollout.Target(f"d{i}", site) for i, (site, _) in enumerate(targets)]
    in_flight = {"a": 1, "b": 0, "c": 2}
    p = rollout.Policy(ramp_rate=3, ramp_growth=2, site_concurrency=cap)
    caps = rollout.site_caps(p, dict.fromkeys("abc", 0.0), 1000)
    out = rollout.release(ts, p, released=int(released), since=90, healthy=True,
                          in_flight=in_flight, caps=caps)
    assert len(out) <= max(0, rollout.ramp_allowance(p, 90, healthy=True) - int(released))
    for site in "abc":
        n = sum(1 for t in ts if t.device_id in out and t.site == site)
        if n:
            assert in_flight[site] + n <= (cap or float("inf"))


def test_site_bandwidth_is_the_best_aggregate_seen() -> None:
    # two downloads of 1000 bytes side by side over 10 s each: the site moved 200 bytes/s
    assert rollout.site_bandwidth([(0, 10), (0, 10)], 1000) == pytest.approx(200)
    assert rollout.site_bandwidth([(0, None)], 1000) == 0.0
    caps = rollout.site_caps(rollout.Policy(download_seconds=20), {"s": 200.0, "new": 0.0}, 1000)
    assert caps == {"s": 4, "new": 1}  # 200 B/s serves four 1000-byte downloads in 20 s


def test_a_flapping_link_is_down_for_its_share_of_each_period() -> None:
    link = Link(partitions=flapping(60, 20, 0, 600))
    down = sum(link.down(t + 0.5) for t in range(600))
    assert down == 200


@pytest.mark.parametrize("field", ["ramp_rate", "site_concurrency", "download_seconds", "ramp_growth"])
def test_pacing_values_out_of_range_are_a_bad_request(field: str) -> None:
    from agent.controller.errors import BadRequest

    for value in (-1, 1e300):
        with pytest.raises(BadRequest, match=field):
            rollout.Policy.from_dict({field: value})
