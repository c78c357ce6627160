"""agent.core.plan: the install and rollback preconditions, as tables of cases."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from agent.core import model_spec, plan
from agent.core.health import HealthPolicy, parse_policy
from agent.core.lifecycle import Phase, State
from agent.core.manifest import Manifest, Payload
from agent.errors import ConfigError, EdgeopsError, IncompatibleBundle, RollbackRefused, StateError

SLOTS = {"A": {"rootfs": Path("/dev/a"), "app": Path("/dev/a-app")},
         "B": {"rootfs": Path("/dev/b"), "app": Path("/dev/b-app")}}
DEVICE = parse_policy({"deadline": 60, "probe": [{"type": "process", "name": "sshd"}]})


def payload(name: str = "rootfs", slot_class: str = "rootfs") -> Payload:
    return Payload(name, slot_class, 100, "0" * 64, 100, "none", 65536, "0" * 64)


def manifest(*payloads: Payload, health: dict[str, Any] | None = None) -> Manifest:
    return Manifest("edgeops-sim", "2.0", 1, 0, payloads or (payload(),), health)


def plan_for(m: Manifest, **kw: Any) -> plan.InstallPlan:
    args: dict[str, Any] = {"phase": Phase.IDLE, "booted": "A", "primary": "A", "slots": SLOTS,
                            "device_health": DEVICE, **kw}
    return plan.plan_install(m, **args)


@pytest.mark.parametrize("m, kw, error, words", [
    (manifest(), {"phase": Phase.TESTING}, StateError, "cannot install while the device is testing"),
    (manifest(), {"phase": Phase.COMMITTING}, StateError, "while the device is committing"),
    (manifest(), {"phase": Phase.REVERTING}, StateError, "while the device is reverting"),
    (manifest(), {"primary": "B"}, StateError, "will boot slot B next, not the running slot A"),
    (manifest(), {"slots": {"A": SLOTS["A"]}}, ConfigError, "cannot choose the inactive slot"),
    (manifest(health={"deadline": 0}), {}, IncompatibleBundle, "bundle health checks do not fit"),
    (manifest(health={"probe": [{"type": "process", "name": "x", "name2": 1}]}), {},
     IncompatibleBundle, "unknown key"),
    (manifest(payload("one"), payload("two")), {}, IncompatibleBundle,
     "two payloads target slot class 'rootfs'"),
    (manifest(payload("m", "model")), {}, IncompatibleBundle, "this is a model bundle"),
    (manifest(payload("fw", "firmware")), {}, IncompatibleBundle,
     "payload 'fw' targets class 'firmware', which this board has no slot for"),
    # the life cycle is asked first, then the bootloader, then the bundle
    (manifest(payload("m", "model")), {"phase": Phase.TESTING, "primary": "B"}, StateError,
     "while the device is testing"),
    (manifest(payload("m", "model")), {"primary": "B"}, StateError, "will boot slot B next"),
])
def test_refusals(m: Manifest, kw: dict[str, Any], error: type[EdgeopsError], words: str) -> None:
    with pytest.raises(error, match=words):
        plan_for(m, **kw)


@pytest.mark.parametrize("phase", [Phase.IDLE, Phase.WRITING, Phase.WRITTEN, Phase.TRIAL_PENDING])
def test_install_may_start_where_the_life_cycle_allows(phase: Phase) -> None:
    assert plan_for(manifest(), phase=phase).target == "B"


def test_plan_writes_each_payload_to_the_inactive_slot() -> None:
    p = plan_for(manifest(payload("root", "rootfs"), payload("app", "app")), booted="B", primary="B")
    assert (p.target, p.previous) == ("A", "B")
    assert [(w.payload.name, w.dest) for w in p.writes] == [("root", Path("/dev/a")),
                                                             ("app", Path("/dev/a-app"))]


def test_bundle_health_adds_to_the_device_checks() -> None:
    p = plan_for(manifest(health={"retries": 7, "probe": [{"type": "tcp", "host": "h", "port": 1}]}))
    assert p.health.retries == 7 and p.health.deadline == 60
    assert [s.kind for s in p.health.probes] == ["process", "tcp"]
    assert plan_for(manifest()).health is DEVICE


def test_refused_health_says_what_is_wrong() -> None:
    with pytest.raises(IncompatibleBundle, match="number from 1") as info:
        plan_for(manifest(health={"deadline": 0}), device_health=HealthPolicy())
    assert "must be a number" in str(info.value)


def test_model_class_is_the_model_spec_one() -> None:
    assert plan.MODEL_CLASS == model_spec.MODEL_CLASS


# --- rollback --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Held:
    state: str
    version: str | None = "1.0"
    security_version: int | None = 2


@pytest.mark.parametrize("held, floor, error, words", [
    ({}, 0, StateError, r"slot B holds no known-good version to roll back to \(empty\)"),
    ({"B": Held("bad")}, 0, StateError, r"to roll back to \(bad\)"),
    ({"B": Held("trial")}, 0, StateError, r"\(trial\)"),
    ({"B": Held("good")}, 3, RollbackRefused, "security_version 2, below the device floor 3"),
    ({"B": Held("good", security_version=None)}, 1, RollbackRefused, "below the device floor 1"),
])
def test_rollback_refusals(held: dict[str, Held], floor: int, error: type[EdgeopsError],
                           words: str) -> None:
    with pytest.raises(error, match=words):
        plan.plan_rollback(booted="A", slots=SLOTS, held=held, floor=floor)


def test_rollback_boots_the_other_good_slot() -> None:
    held = {"A": Held("good", "2.0", 2), "B": Held("good", "1.0", 2)}
    assert plan.plan_rollback(booted="A", slots=SLOTS, held=held, floor=2) == ("B", "1.0")
    assert plan.plan_rollback(booted="B", slots=SLOTS, held=held, floor=0) == ("A", "2.0")
    assert plan.plan_rollback(booted="A", slots=SLOTS, held={"B": replace(held["B"], security_version=None)},
                              floor=0) == ("B", "1.0")


# --- a trial armed for the next boot is replaced only when asked -------------------------------
TRIAL = plan.Trial("B", "2.0")


@pytest.mark.parametrize("pending, replace_trial, words", [
    (TRIAL, False, "slot B holds version 2.0, armed to be tried at the next boot"),
    (plan.Trial("B", None), False, "slot B holds a trial the journal does not know"),
    (TRIAL, True, None),
    (None, False, None),
])
def test_an_armed_trial_is_replaced_only_on_purpose(pending: plan.Trial | None, replace_trial: bool,
                                                    words: str | None) -> None:
    kw = {"phase": Phase.TRIAL_PENDING, "pending": pending, "replace_trial": replace_trial}
    if words is None:
        assert plan_for(manifest(), **kw).target == "B"
        return
    with pytest.raises(StateError, match=words) as info:
        plan_for(manifest(), **kw)
    assert "--replace-trial" in info.value.hint


def test_a_trial_is_refused_after_the_phase_and_the_bootloader() -> None:
    # the life cycle is still asked first: a trial that is running is no pending trial
    with pytest.raises(StateError, match="while the device is testing"):
        plan_for(manifest(), phase=Phase.TESTING, pending=TRIAL, replace_trial=False)


@pytest.mark.parametrize("state, armed, expected", [
    (State(), None, None),
    (State(), "B", plan.Trial("B", None)),  # armed by hand, or a journal recovered without it
    (State(Phase.TRIAL_PENDING, "B", "A", "2.0"), "B", TRIAL),
    (State(Phase.WRITTEN, "B", "A", "2.0"), None, TRIAL),  # complete, its flag about to be set
    (State(Phase.WRITING, "B", "A", "2.0"), None, None),  # half-written: nothing to try
])
def test_which_trial_is_pending(state: State, armed: str | None, expected: plan.Trial | None) -> None:
    assert plan.pending_trial(state, armed) == expected
