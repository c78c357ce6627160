"""The deployment action's state machine, pure: what a DDI feedback report does to an action.

Action states: open (assigned) → running (device reported progress) → success |
failure; open/running → canceling (cancel requested, device sees cancelAction)
→ canceled, or back to running when the device rejects the cancel. A finished
action never changes again, so a report replayed from a device's offline queue
is harmless. ``Fleet.feedback`` stores the report and applies ``next_status``
in one transaction.

What is stored of a report is bounded (``stored_report``): its execution, result, progress,
code and at most ``MAX_DETAILS`` details of ``MAX_DETAIL`` characters, never more than
``MAX_REPORT`` bytes, whatever the device sent (a DDI body may be up to 1 MiB).
"""

from __future__ import annotations

import json
from typing import Any

from agent.controller import rollout
from agent.controller.errors import BadRequest

OPEN_STATES = ("open", "running", "canceling")
TERMINAL = ("success", "failure", "canceled")
RUNNING_EXECUTIONS = ("proceeding", "scheduled", "resumed", "download", "downloaded", "downloading")
MAX_DETAILS = 16  # details kept of one report (the edgeops agent sends at most 16)
MAX_DETAIL = 512  # characters kept of each
MAX_REPORT = 4096  # bytes, at most, stored for one report


def outcome(status: str) -> rollout.Outcome:
    """An action's status as the rollout gate counts it."""
    return {"open": "pending", "running": "running", "canceling": "running", "success": "success",
            "failure": "failure", "canceled": "canceled"}.get(status, "pending")  # type: ignore[return-value]


def success_signal(attributes: dict[str, str]) -> str:
    """What a device's ``closed/success`` means, from what its client told us about itself:
    ``commit`` (reported after the trial boot committed the new slot) or ``write`` (reported
    when the image was written, before any reboot). The edgeops agent always sends
    ``edgeops.compatible`` and reports success only after a commit; any other client may declare
    the same with the attribute ``edgeops.success_after = commit`` (rauc-hawkbit-updater: in its
    ``[device]`` section, with ``post_update_close = false`` and a program that closes the action
    once the new slot is marked good). Everything else reports after the write
    (rauc-hawkbit-updater's default ``post_update_close = true``)."""
    if "edgeops.compatible" in attributes or attributes.get("edgeops.success_after") == "commit":
        return "commit"
    return "write"


def gate_outcome(status: str, success_after: str, require_commit: bool) -> rollout.Outcome:
    """An action as a rollout gate counts it: with ``require_commit``, a success that did not
    come after a commit is still ``running`` (installed, not yet known to boot)."""
    if require_commit and status == "success" and success_after != "commit":
        return "running"
    return outcome(status)


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


def report_details(body: dict[str, Any]) -> list[str]:
    """``status.details`` (DdiStatus: a list of strings), cut to what is kept."""
    details = body["status"].get("details")
    if details is None:
        return []
    if not isinstance(details, list) or not all(isinstance(d, str) for d in details):
        raise BadRequest("status.details must be a list of strings")
    return [d[:MAX_DETAIL] for d in details[:MAX_DETAILS]]


def stored_report(body: dict[str, Any], execution: str, finished: str) -> str:
    """The JSON kept of a report: bounded to ``MAX_REPORT`` bytes (details dropped from the end)."""
    doc: dict[str, Any] = {"execution": execution, "finished": finished,
                           "details": report_details(body)}
    status = body["status"]
    result = status.get("result")
    progress = result.get("progress") if isinstance(result, dict) else None
    if isinstance(progress, dict) and all(_small_int(progress.get(k)) for k in ("cnt", "of")):
        doc["progress"] = {"cnt": progress["cnt"], "of": progress["of"]}
    if _small_int(status.get("code")):
        doc["code"] = status["code"]
    text = json.dumps(doc, ensure_ascii=False)
    while len(text.encode()) > MAX_REPORT:
        doc["details"].pop()
        text = json.dumps(doc, ensure_ascii=False)
    return text


def _small_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and -(1 << 31) <= v < (1 << 31)
