"""edgeops keys: init-root, issue-signer, revoke (host side).

``agent.host.keys`` (and with it ``cryptography``) is imported by the handlers, so
registering these commands for ``edgeops --help`` costs nothing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.errors import UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("keys", help="root and signer keys (host side)")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    r = ks.add_parser("init-root", help="create an offline root key and certificate")
    r.add_argument("--out", type=Path, required=True, help="directory for root.key and root.crt")
    r.add_argument("--name", default="edgeops root", help="certificate common name")
    r.add_argument("--days", type=int, help="validity (default 20 years)")
    r.set_defaults(func=_init_root)

    s = ks.add_parser("issue-signer", help="issue a short-lived signing key certified by the root")
    s.add_argument("--root", type=Path, required=True, help="directory made by init-root")
    s.add_argument("--out", type=Path, required=True, help="directory for signer.key and signer.crt")
    s.add_argument("--days", type=int, help="validity (default 90)")
    s.add_argument("--name", default="edgeops signer")
    s.set_defaults(func=_issue)

    v = ks.add_parser("revoke", help="revoke signers: updates ROOT/revoked.crl")
    v.add_argument("--root", type=Path, required=True)
    v.add_argument("--cert", type=Path, action="append", default=[], help="signer.crt to revoke")
    v.add_argument("--serial", action="append", default=[], help="serial number (hex) to revoke")
    v.set_defaults(func=_revoke)


def _init_root(a: argparse.Namespace) -> int:
    from agent.host import keys

    kp = keys.init_root(a.out, name=a.name, days=keys.ROOT_DAYS if a.days is None else a.days)
    print(f"root key:         {kp.key_path}  (keep offline)")
    print(f"root certificate: {kp.cert_path}  (the device keyring)")
    return 0


def _issue(a: argparse.Namespace) -> int:
    from agent.host import keys

    days = keys.SIGNER_DAYS if a.days is None else a.days
    if days < 1:
        raise UsageError("--days must be at least 1")
    kp = keys.issue_signer(a.root, a.out, days=days, name=a.name)
    print(f"signer key:         {kp.key_path}")
    print(f"signer certificate: {kp.cert_path}  (valid {days} days)")
    return 0


def _revoke(a: argparse.Namespace) -> int:
    from agent.host import keys

    serials = [keys.cert_serial(c) for c in a.cert]
    try:
        serials += [int(s, 16) for s in a.serial]
    except ValueError:
        raise UsageError("--serial takes a hexadecimal serial number") from None
    if not serials:
        raise UsageError("name at least one --cert or --serial to revoke")
    crl = keys.revoke(a.root, serials)
    print(f"revocation list: {crl}  (ship it with 'bundle create --crl' or in the device keyring)")
    return 0
