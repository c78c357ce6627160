"""What the console's read-only commands show, as lines for an 80-column terminal; the diagnostics bundle.

Every function takes an open ``Updater`` and returns text lines; nothing here takes the
device lock or changes the device. ``diag_bundle`` gathers status, history, recent journal
entries and the board check into one tar.gz — and nothing secret: no keys, no tokens, no
config file (the config may hold a fleet token), no PIN record.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent import __version__

if TYPE_CHECKING:
    from agent.device.updater import Updater

CONNECT_TIMEOUT = 3.0
MAX_INTERFACES = 32


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else "never"


def status_lines(up: Updater) -> list[str]:
    st = up.status()
    out = [f"version   edgeops {__version__}, compatible {st['compatible']}",
           f"booted    slot {st['booted_slot']}{'  (trial)' if st['trial'] else ''}",
           f"primary   slot {st['primary_slot']}",
           f"phase     {st['phase']}",
           f"floor     security {st['security_floor']}"]
    if st["trial_pending_slot"] and not st["trial"]:
        out.append(f"next boot tries slot {st['trial_pending_slot']} once")
    if st["journal"] != "ok":
        out.append(f"journal   {st['journal']} (run 'edgeops journal recover' in a shell)")
    for name, s in st["slots"].items():
        out.append(f"{'*' if s['booted'] else ' '} slot {name}  {s['state']:<6} {s['version'] or '-'}")
    return out


def slot_lines(up: Updater) -> list[str]:
    st = up.status()
    out = ["  slot state  version      security device"]
    for name, s in st["slots"].items():
        dev = s["device"] if len(s["device"]) <= 40 else "..." + s["device"][-37:]
        out.append(f"{'*' if s['booted'] else ' '} {name:<4} {s['state']:<6} {s['version'] or '-':<12} "
                   f"{s['security_version'] if s['security_version'] is not None else '-':<8} {dev}")
    return out


def history_lines(up: Updater, n: int, *, audit: bool) -> list[str]:
    rows = up.journal.history(n * 4 if not audit else n)
    if not audit:
        rows = [r for r in rows if not r.event.startswith("console-")][-n:]
    return [f"{_when(r.ts)} {r.event:<16} {r.slot or '-':<2} {r.version or '-':<8} {r.detail}"[:200]
            for r in rows] or ["(no entries)"]


def log_lines(up: Updater, n: int) -> list[str]:
    """The agent's own log (journald, when there is one), then the edgeops journal's entries."""
    out: list[str] = []
    if shutil.which("journalctl"):
        try:
            proc = subprocess.run(["journalctl", "-u", "edgeops-agent.service", "-n", str(n),
                                   "-o", "short-iso", "--no-pager", "-q"],
                                  capture_output=True, timeout=10, check=False)
            lines = proc.stdout.decode(errors="replace").splitlines()[-n:]
            if proc.returncode == 0 and lines:
                out += ["-- agent log (journald) --", *(line[:200] for line in lines)]
        except (OSError, subprocess.TimeoutExpired):
            pass
    out += ["-- edgeops journal --", *history_lines(up, n, audit=True)]
    return out


def network_lines(up: Updater) -> list[str]:
    out = ["interfaces:"]
    net = Path("/sys/class/net")
    addrs = _addresses()
    names = sorted(p.name for p in net.iterdir())[:MAX_INTERFACES] if net.is_dir() else []
    for name in names:
        state = _read(net / name / "operstate") or "?"
        mac = _read(net / name / "address") or "-"
        out.append(f"  {name:<12} {state:<8} {mac:<17} {' '.join(addrs.get(name, []))}"[:200])
    fleet = up.cfg.fleet
    if fleet is None:
        out.append("controller: none configured (offline device)")
    else:
        u = urlsplit(fleet.url)
        port = u.port or (443 if u.scheme == "https" else 80)
        out.append(f"controller: {u.hostname}:{port} ({fleet.controller_id})")
        out.append(f"  reachable  {_reach(u.hostname or '', port)}")
    out.append(f"  last contact {_when(up.journal.last_delivered())}, "
               f"{up.journal.pending_count()} report(s) waiting")
    return out


def _read(p: Path) -> str:
    try:
        return p.read_text()[:64].strip()
    except OSError:
        return ""


def _addresses() -> dict[str, list[str]]:
    """``ip -brief addr`` as interface -> addresses (empty without iproute2)."""
    if not shutil.which("ip"):
        return {}
    try:
        proc = subprocess.run(["ip", "-brief", "addr"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out: dict[str, list[str]] = {}
    for line in proc.stdout.decode(errors="replace").splitlines()[:MAX_INTERFACES]:
        parts = line.split()
        if len(parts) >= 3:
            out[parts[0].split("@")[0]] = parts[2:6]
    return out


def _reach(host: str, port: int) -> str:
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            return f"yes (TCP connect in {(time.monotonic() - started) * 1000:.0f} ms)"
    except OSError as exc:
        return f"no ({exc.strerror or type(exc).__name__})"


def tpm_lines(up: Updater) -> list[str]:
    from agent.core import identity, trust

    root = up.root()
    out: list[str] = []
    if root is None:
        out.append("root of trust: none (this device did not opt in; [tpm] in agent.toml)")
    else:
        s = root.status()
        out += [f"root of trust: {s.kind}",
                f"  keyring anchor  {s.anchor[:16] + '...' if s.anchor else 'not provisioned'}"
                f"{' (locked)' if s.anchor_locked else ''}",
                f"  counter         {s.counter if s.counter is not None else '-'} "
                f"(floor {s.floor if s.floor is not None else '-'})",
                f"  PCR {s.pcr}          {s.measurements} measurement(s) this boot"]
    cert_path = up.cfg.state_dir / "identity" / "identity.crt"
    try:
        from cryptography import x509

        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError):
        out.append("identity: no device certificate")
        return out
    now = trust.best_known_time(up.clock(), up.journal.trusted_time)
    left = identity.CertTimes.of(cert).life_left(now)
    out.append(f"identity: {cert.subject.rfc4514_string()[:60]}")
    out.append(f"  life left {left // 86400} days (until {cert.not_valid_after_utc:%Y-%m-%d})"
               if left > 0 else "  EXPIRED: renew when the controller is reachable")
    return out


def health_lines(up: Updater) -> tuple[list[str], bool]:
    results = up.health_report()
    lines = [f"{'PASS' if r.ok else 'FAIL'}  {r.name}: {r.detail}"[:200] for r in results]
    ok = all(r.ok for r in results)
    lines.append(f"{sum(r.ok for r in results)} of {len(results)} checks passed")
    return lines, ok


def board_check_lines(up: Updater) -> list[str]:
    from agent.adapters import boardfiles
    from agent.device import boardcheck
    from agent.errors import EdgeopsError

    try:
        board = boardfiles.load(up.cfg.board)
    except EdgeopsError as exc:
        return [f"board check skipped: {exc.one_line()}"]
    problems = boardcheck.check(board, agent_compatible=up.cfg.compatible,
                                agent_backend=up.cfg.bootloader)
    return [str(p) for p in problems] or [f"board {board.name}: no problems found"]


def diag_bundle(up: Updater, device_id: str) -> tuple[str, bytes]:
    """A file name and a tar.gz holding status, history, recent entries and the board check."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(up.clock()))
    name = f"edgeops-diag-{device_id}-{stamp}.tar.gz"
    files: dict[str, bytes] = {
        "status.json": json.dumps(up.status(), indent=2).encode(),
        "history.json": json.dumps([r.__dict__ for r in up.journal.history(500)], indent=2).encode(),
        "logs.txt": "\n".join(log_lines(up, 200)).encode(),
        "board-check.txt": "\n".join(board_check_lines(up)).encode(),
        "about.json": json.dumps(_about(up, device_id), indent=2).encode(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for fname, data in files.items():
            info = tarfile.TarInfo(f"{name.removesuffix('.tar.gz')}/{fname}")
            info.size, info.mtime, info.mode = len(data), int(up.clock()), 0o644
            tar.addfile(info, io.BytesIO(data))
    return name, buf.getvalue()


def _about(up: Updater, device_id: str) -> dict[str, Any]:
    return {"edgeops": __version__, "device_id": device_id, "board": up.cfg.board,
            "compatible": up.cfg.compatible, "bootloader": up.cfg.bootloader,
            "kernel": os.uname().release, "outbox_waiting": up.journal.pending_count()}
