"""edgeops tpm: provision, status, quote, rotate, renew (device side)."""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.common import add_config_option, command, config_path
from agent.errors import UsageError

if TYPE_CHECKING:
    from agent.adapters.rot import RootOfTrust
    from agent.core.config import AgentConfig


def register(sub: Any) -> None:
    p = command(sub, "tpm", "TPM root of trust: anchored keyring, rollback counter, attestation",
                "edgeops tpm status")
    ts = p.add_subparsers(dest="tpm_command", metavar="ACTION", required=True)

    v = command(ts, "provision", "anchor the keyring, create the counter and the identity key",
                "edgeops tpm provision --device-id gw-0042")
    add_config_option(v)
    v.add_argument("--device-id", default=None, help="device ID for enrolment (default: host name)")
    v.set_defaults(func=_provision)

    s = command(ts, "status", "explain what is anchored, the floor, the certificate's life",
                "edgeops tpm status --json")
    add_config_option(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=_status)

    q = command(ts, "quote", "quote the measurement PCR for the controller's nonce",
                "edgeops tpm quote --nonce 6b1f0c9e2d4a8b7f6b1f0c9e2d4a8b7f")
    add_config_option(q)
    q.add_argument("--nonce", required=True, help="hex, 8 to 64 bytes, fresh from the controller")
    q.set_defaults(func=_quote)

    r = command(ts, "rotate", "re-anchor to a new root set signed by a current root",
                "edgeops tpm rotate --keyring new-roots.pem --signature new-roots.sig")
    add_config_option(r)
    r.add_argument("--keyring", type=Path, required=True, help="the new root certificates (PEM)")
    r.add_argument("--signature", type=Path, required=True, help="rotation signature by a current root")
    r.set_defaults(func=_rotate)

    n = command(ts, "renew", "fetch a new identity certificate from the fleet controller now",
                "edgeops tpm renew")
    add_config_option(n)
    n.set_defaults(func=_renew)


def _open(a: argparse.Namespace) -> tuple[AgentConfig, RootOfTrust]:
    from agent.adapters import rot
    from agent.core import config as config_mod

    cfg = config_mod.load(config_path(a.config))
    return cfg, rot.open_root(cfg.tpm, cfg.state_dir)


def _provision(a: argparse.Namespace) -> int:
    from agent.adapters import fsutil
    from agent.device.identity import DeviceIdentity

    cfg, root = _open(a)
    st = root.provision(cfg.keyring.read_bytes())
    if (journal_floor := _journal_floor(cfg)) > (st.floor or 0):
        # the device already committed releases before it was provisioned: carry its floor over
        root.raise_floor(journal_floor)
        st = root.status()
    ident = DeviceIdentity(root, cfg.state_dir)
    request = {"device_id": a.device_id or socket.gethostname(), "kind": root.kind,
               "tls_public_pem": ident.ensure_key().decode(), "ak_public_pem": root.ak_public_pem().decode()}
    out = cfg.state_dir / "identity" / "enrolment.json"
    fsutil.atomic_write(out, json.dumps(request, indent=1).encode(), mode=fsutil.SECRET, dir_mode=0o700)
    assert st.anchor is not None  # provision() anchors or raises
    print(f"keyring anchored in the {_where(root.kind)}: sha256 {st.anchor[:16]}…")
    print(f"rollback floor: {st.floor}")
    print(f"enrolment request (public keys only): {out}")
    return 0


def _journal_floor(cfg: AgentConfig) -> int:
    from agent.adapters.journal import Journal

    if not cfg.journal_path.exists():
        return 0
    j = Journal(cfg.journal_path)
    try:
        return j.security_floor
    finally:
        j.close()


def _where(kind: str) -> str:
    return "TPM" if kind == "tpm" else "software keystore (no TPM: weaker, see docs/tpm.md)"


def _best_known_time(cfg: AgentConfig) -> int:
    from agent.adapters.journal import Journal
    from agent.core.trust import best_known_time

    trusted = 0
    if cfg.journal_path.exists():
        j = Journal(cfg.journal_path)
        try:
            trusted = j.trusted_time
        finally:
            j.close()
    return best_known_time(time.time(), trusted)


def _status(a: argparse.Namespace) -> int:
    from agent.core.anchor import keyring_anchor
    from agent.core.identity import CertTimes
    from agent.device.identity import DeviceIdentity

    cfg, root = _open(a)
    st = root.status()
    info: dict[str, Any] = st.as_dict()
    info["keyring_matches"] = (st.anchor == keyring_anchor(cfg.keyring.read_bytes()).hex()
                               if st.anchor else None)
    cert = DeviceIdentity(root, cfg.state_dir).certificate()
    now = _best_known_time(cfg)
    info["certificate_seconds_left"] = CertTimes.of(cert).life_left(now) if cert else None
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    for line in _explain(info, str(cfg.keyring)):
        print(line)
    return 0


def _explain(i: dict[str, Any], keyring: str) -> list[str]:
    where = _where(str(i["kind"]))
    if i["anchor"] is None:
        return [f"Nothing is anchored in the {where} yet: run 'edgeops tpm provision'."]
    lock = "write-locked" if i["anchor_locked"] else "a file, not lockable"
    match = {True: "matches", False: "DOES NOT MATCH — installs will be refused"}[bool(i["keyring_matches"])]
    lines = [
        f"Trusted roots: the {where} holds the SHA-256 of the root set ({lock}); "
        f"the keyring file {keyring} {match}.",
        f"Rollback floor: bundles below security_version {i['floor']} are refused "
        + (f"(TPM NV counter value {i['counter']})." if i["kind"] == "tpm"
           else "(kept in the keystore file)."),
        f"Measurements: {i['measurements']} event(s) extended into PCR {i['pcr']} since boot.",
    ]
    left = i["certificate_seconds_left"]
    if left is None:
        lines.append("Identity certificate: none yet (enrol the device, then fetch one).")
    elif left <= 0:
        lines.append(f"Identity certificate: expired {_span(-left)} ago; the agent must renew it.")
    else:
        lines.append(f"Identity certificate: valid for another {_span(left)}.")
    return lines


def _span(seconds: int) -> str:
    h, m = divmod(seconds // 60, 60)
    return f"{h} h {m} min" if h else f"{m} min"


def _quote(a: argparse.Namespace) -> int:
    try:
        nonce = bytes.fromhex(a.nonce)
    except ValueError:
        raise UsageError("--nonce must be hexadecimal") from None
    _, root = _open(a)
    print(root.quote(nonce).to_json())
    return 0


def _rotate(a: argparse.Namespace) -> int:
    from agent.adapters import fsutil

    cfg, root = _open(a)
    new = a.keyring.read_bytes()
    root.rotate_keyring(cfg.keyring.read_bytes(), new, a.signature.read_bytes())
    # The anchor moved first; now the file follows. A crash in between leaves a mismatch that
    # refuses installs (fail closed) until the same rotation is applied again.
    fsutil.atomic_write(cfg.keyring, new, mode=fsutil.PUBLIC)
    print(f"keyring rotated and re-anchored in the {_where(root.kind)}")
    return 0


def _renew(a: argparse.Namespace) -> int:
    """One renewal, whatever the certificate's age: with the current certificate while it is
    valid at the best-known time, else with the enrolment token ([fleet] token/token_file)."""
    from agent.core.identity import CertTimes
    from agent.device.fleet_files import find_fleet
    from agent.device.identity import DeviceIdentity, FleetIdentity

    cfg, root = _open(a)
    fleet = find_fleet(cfg)
    if fleet is None:
        raise UsageError(f"no [fleet] section in {cfg.path} or fleet.toml beside it",
                         hint="renewal needs the controller: [fleet] url, controller_id, ca_cert")
    now = _best_known_time(cfg)
    cert = FleetIdentity(DeviceIdentity(root, cfg.state_dir), fleet).renew(now)
    left = CertTimes.of(cert).life_left(now)
    print(f"identity certificate renewed for {fleet.controller_id}: serial {cert.serial_number:x}, "
          f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (another {_span(left)})")
    return 0

