"""agent.controller.actions: the pure action state machine (DDI feedback -> action status), by tables."""

from __future__ import annotations

import itertools
import json

import pytest

from agent.controller.actions import (
    MAX_REPORT,
    RUNNING_EXECUTIONS,
    TERMINAL,
    gate_outcome,
    next_status,
    outcome,
    parse_feedback,
    report_details,
    stored_report,
    success_signal,
)
from agent.controller.errors import BadRequest

STATES = ("open", "running", "canceling", *TERMINAL)
EXECUTIONS = ("closed", "canceled", "rejected", *RUNNING_EXECUTIONS)


@pytest.mark.parametrize(("current", "execution", "finished", "cancel", "expected"), [
    ("open", "proceeding", "none", False, "running"),
    ("open", "download", "none", False, "running"),
    ("running", "closed", "success", False, "success"),
    ("running", "closed", "none", False, "success"),  # hawkBit: "none" is handled like success
    ("running", "closed", "failure", False, "failure"),
    ("canceling", "proceeding", "none", False, "canceling"),  # progress does not undo a cancel
    ("canceling", "canceled", "none", False, "canceled"),
    ("running", "canceled", "none", False, "running"),  # nothing asked it to cancel
    ("canceling", "rejected", "none", False, "running"),
    ("running", "rejected", "none", False, "running"),
    ("canceling", "canceled", "none", True, "canceled"),
    ("canceling", "closed", "success", True, "canceled"),
    ("canceling", "closed", "none", True, "canceled"),
    ("canceling", "closed", "failure", True, "running"),  # the cancel failed: the update goes on
    ("canceling", "rejected", "none", True, "running"),
    ("canceling", "proceeding", "none", True, "canceling"),
])
def test_next_status(current: str, execution: str, finished: str, cancel: bool, expected: str) -> None:
    assert next_status(current, execution, finished, cancel) == expected


FINISHED = ("success", "failure", "none")


@pytest.mark.parametrize(("current", "execution", "finished", "cancel"),
                         list(itertools.product(TERMINAL, EXECUTIONS, FINISHED, (False, True))))
def test_a_finished_action_never_changes(current: str, execution: str, finished: str, cancel: bool) -> None:
    assert next_status(current, execution, finished, cancel) == current  # offline queue replays


@pytest.mark.parametrize(("body", "expected"), [
    ({"status": {"execution": "closed", "result": {"finished": "success"}}}, ("closed", "success")),
    ({"status": {"execution": "proceeding"}}, ("proceeding", "none")),
    ({"status": {"execution": "proceeding", "result": "odd"}}, ("proceeding", "none")),
])
def test_parse_feedback(body: dict, expected: tuple[str, str]) -> None:
    assert parse_feedback(body) == expected


@pytest.mark.parametrize("body", [
    {}, {"status": "closed"}, {"status": {"execution": 3}}, {"status": {"execution": "exploded"}},
    {"status": {"execution": "closed", "result": {"finished": "maybe"}}},
])
def test_parse_feedback_refuses(body: dict) -> None:
    with pytest.raises(BadRequest):
        parse_feedback(body)


def test_outcome_counts_every_state_for_the_gate() -> None:
    assert [outcome(s) for s in STATES] == ["pending", "running", "running", "success", "failure", "canceled"]
    assert outcome("unheard-of") == "pending"


@pytest.mark.parametrize(("attributes", "signal"), [
    ({"edgeops.compatible": "x", "edgeops.board": "sim"}, "commit"),  # the edgeops agent
    ({"product": "Terminator"}, "write"),  # rauc-hawkbit-updater's [device] section
    ({"product": "T", "edgeops.success_after": "commit"}, "commit"),  # a client that declares it
    ({"edgeops.success_after": "write"}, "write"),
    ({"version": "1.0"}, "write"),
    ({}, "write"),
])
def test_success_signal(attributes: dict[str, str], signal: str) -> None:
    assert success_signal(attributes) == signal


@pytest.mark.parametrize(("status", "after", "require", "expected"), [
    ("success", "commit", True, "success"),
    ("success", "write", True, "running"),  # written, not yet known to boot
    ("success", "", True, "running"),  # reported before the controller recorded the signal
    ("success", "write", False, "success"),
    ("failure", "write", True, "failure"),
    ("open", "", True, "pending"),
])
def test_gate_outcome(status: str, after: str, require: bool, expected: str) -> None:
    assert gate_outcome(status, after, require) == expected


def test_stored_report_is_bounded() -> None:
    body = {"status": {"execution": "proceeding", "code": 7, "details": ["é" * 10_000] * 100,
                       "result": {"finished": "none", "progress": {"cnt": 1, "of": 2}}}}
    stored = stored_report(body, "proceeding", "none")
    assert len(stored.encode()) <= MAX_REPORT
    doc = json.loads(stored)
    assert doc["code"] == 7 and doc["progress"] == {"cnt": 1, "of": 2} and doc["details"]
    with pytest.raises(BadRequest):
        report_details({"status": {"execution": "closed", "details": 5}})
