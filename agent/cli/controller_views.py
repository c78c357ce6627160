"""The controller CLI's output for people: tables and summaries of the REST API's answers.

``controller_cmd`` parses, asks the controller and hands the JSON answer here (or prints it
as it is, with --json). Times are ISO 8601 in UTC, to the second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any


def iso(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; '-' for an empty one; the last column unpadded."""
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = [headers, *cells]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=False)) +
                     ("  " if len(line) > 1 else "") + line[-1] for line in lines).rstrip()


def devices_table(r: Any) -> None:
    print(table(("DEVICE", "SITE", "VERSION", "LAST SEEN", "GROUPS", "TAGS"),
                [(d["id"], d["site"], d["version"], iso(d["last_seen"]), ",".join(d["groups"]),
                  ",".join(d["tags"])) for d in r["devices"]]))


def attestation_text(r: Any) -> None:
    """``controller device attestation``: the verdict, then the verified event log."""
    slot = f", boot slot {r['boot_slot']}" if r.get("boot_slot") else ""
    why = f": {r['detail']}" if r["result"] == "refused" and r.get("detail") else ""
    print(f"{r['device']}: {r['result']} ({r['kind']} quote of PCR {r['pcr']}{slot}) at "
          f"{iso(r['checked'])}{why}")
    print(f"last verified {iso(r['verified'])}; {r['quotes']} quote(s) verified, {r['refusals']} "
          f"refused since the key was bound {iso(r['bound'])}; AK SHA-256 {r['ak_sha256'][:16]}…")
    print(table(("EVENT", "DIGEST"), [(e["label"], e["digest"]) for e in r["events"]]))


def groups_table(r: Any) -> None:
    print(table(("GROUP", "DEVICES", "MEMBERS"),
                [(g, len(m), ", ".join(m[:8]) + (", ..." if len(m) > 8 else ""))
                 for g, m in r["groups"].items()]))


def bundles_table(r: Any) -> None:
    print(table(("ID", "VERSION", "COMPATIBLE", "SIZE", "FILE", "SIGNER"),
                [(b["id"], b["version"], b["compatible"], b["size"], b["filename"], b["signer"])
                 for b in r["bundles"]]))


def progress(st: dict[str, Any]) -> str:
    return f"wave {st['current_wave'] + 1} of {st['waves']}" if st["waves"] else "no waves"


def rollouts_table(r: Any) -> None:
    print(table(("ID", "NAME", "BUNDLE", "STATUS", "WAVE", "CREATED", "REASON"),
                [(x["id"], x["name"], x["bundle"], x["status"], progress(x), x.get("created_at"),
                  x["reason"]) for x in r["rollouts"]]))


def rollout_line(st: dict[str, Any]) -> None:
    reason = f": {st['reason']}" if st["reason"] else ""
    print(f"rollout {st['id']} ({st['name']}) is {st['status']}, {progress(st)}{reason}")


STATES = ("open", "running", "canceling", "success", "failure", "canceled")


def waves_table(st: dict[str, Any]) -> str:
    rows = []
    for w in range(st["waves"]):
        counts = st["actions"].get(str(w), {})
        mark = "*" if w == st["current_wave"] and st["status"] in ("running", "paused") else ""
        rows.append((f"{w}{mark}", st["wave_sizes"].get(str(w), 0), *(counts.get(s, 0) for s in STATES)))
    return table(("WAVE", "DEVICES", *(s.upper() for s in STATES)), rows)


def rollout_text(st: dict[str, Any]) -> str:
    reason = f"\nreason     {st['reason']}" if st["reason"] else ""
    policy = st["policy"]
    out = (f"rollout    {st['id']} ({st['name']}), bundle {st['bundle']}\n"
           f"status     {st['status']}, {progress(st)}{reason}\n"
           f"gate       success {policy['success_threshold']:g}, error {policy['error_threshold']:g}, "
           f"window {policy['window']:g} s{', require commit' if policy.get('require_commit') else ''}\n"
           f"\n{waves_table(st)}")
    if st.get("skipped_devices"):
        out += f"\n\nskipped    {', '.join(st['skipped_devices'])}"
    if st.get("history"):
        out += "\n\n" + table(("AT", "WHO", "EVENT", "DETAIL"),
                               [(h["at"], h["who"], h["event"], h["detail"]) for h in st["history"][-20:]])
    return out


def rollout_detail(st: dict[str, Any]) -> None:
    print(rollout_text(st))


def created(st: dict[str, Any]) -> None:
    n = sum(st["wave_sizes"].values())
    print(f"rollout {st['id']} ({st['name']}): {n} devices in {st['waves']} waves, {st['status']}")
    for device, why in sorted(st.get("skipped", {}).items()):
        print(f"  left out {device}: {why}")


def actions_table(r: Any) -> None:
    print(table(("ID", "DEVICE", "ROLLOUT", "WAVE", "BUNDLE", "STATE", "UPDATED", "REASON"),
                [(x["id"], x["device"], x["rollout"], x["wave"], x["bundle"], x["status"],
                  x.get("updated_at"), x["detail"] if x["status"] != "success" else "")
                 for x in r["actions"]]))
