"""The deployment action's state machine, pure: what a DDI feedback report does to an action.

Action states: open (assigned) → running (device reported progress) → success |
failure; open/running → canceling (cancel requested, device sees cancelAction)
→ canceled, or back to running when the device rejects the cancel. A finished
action never changes again, so a report replayed from a device's offline queue
is harmless. ``Fleet.feedback`` stores the report and applies ``next_status``
in one transaction.
"""

from __future__ import annotations

from typing import Any

from agent.controller import rollout
from agent.controller.errors import BadRequest

OPEN_STATES = ("open", "running", "canceling")
TERMINAL = ("success", "failure", "canceled")
RUNNING_EXECUTIONS = ("proceeding", "scheduled", "resumed", "download", "downloaded", "downloading")


def outcome(status: str) -> rollout.Outcome:
    """An action's status as the rollout gate counts it."""
    return {"open": "pending", "running": "running", "canceling": "running", "success": "success",
            "failure": "failure", "canceled": "canceled"}.get(status, "pending")  # type: ignore[return-value]


def parse_feedback(body: dict[str, Any]) -> tuple[str, str]:
    """DdiActionFeedback: {"status": {"execution": ..., "result": {"finished": ...}}} (hawkBit DDI v1)."""
    status = body.get("status") if isinstance(body, dict) else None
    if not isinstance(status, dict) or not isinstance(status.get("execution"), str):
        raise BadRequest("feedback needs status.execution")
    result = status.get("result") or {}
    finished = result.get("finished", "none") if isinstance(result, dict) else "none"
    if finished not in ("success", "failure", "none"):
        raise BadRequest(f"status.result.finished {finished!r} is not success, failure or none")
    execution = status["execution"]
    if execution not in ("closed", "canceled", "rejected", *RUNNING_EXECUTIONS):
        raise BadRequest(f"status.execution {execution!r} is not a DDI execution status")
    return execution, str(finished)


def next_status(current: str, execution: str, finished: str, cancel: bool) -> str:
    """The action's status after a report (``cancel``: the report is on cancelAction)."""
    if current in TERMINAL:
        return current  # a repeated report (offline queue replay) changes nothing
    if cancel:
        # Feedback on cancelAction (hawkBit DDI): "canceled", or "closed" with success, confirms
        # the cancel; "rejected" or a failed close means the device carries on with the update.
        if execution == "canceled" or (execution == "closed" and finished != "failure"):
            return "canceled"
        return "running" if execution in ("rejected", "closed") else current
    if execution == "closed":
        # hawkBit DDI: "closed" with finished "none" is handled like success.
        return "failure" if finished == "failure" else "success"
    if execution == "canceled":
        return "canceled" if current == "canceling" else current
    if execution == "rejected":
        return "running" if current == "canceling" else current
    return current if current == "canceling" else "running"
