"""edgeops keys: init-root, issue-signer, revoke (host side).

``agent.host.keys`` (and with it ``cryptography``) is imported by the handlers, so
registering these commands for ``edgeops --help`` costs nothing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.cli.common import command
from agent.errors import UsageError


def register(sub: Any) -> None:
    p = command(sub, "keys", "root and signer keys (host side)", "edgeops keys init-root pki/root")
    ks = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)

    r = command(ks, "init-root", "create an offline root key and certificate",
                "edgeops keys init-root pki/root --name 'Example fleet root'")
    r.add_argument("dir", nargs="?", type=Path, metavar="DIR",
                   help="directory for root.key and root.crt (or give it as --out)")
    r.add_argument("--out", type=Path, metavar="DIR", help="the same directory, as an option")
    r.add_argument("--name", default="edgeops root",
                   help="the certificate's common name (default 'edgeops root')")
    r.add_argument("--days", type=int, help="days the root is valid (default 20 years)")
    r.set_defaults(func=_init_root)

    s = command(ks, "issue-signer", "issue a short-lived signing key certified by the root",
                "edgeops keys issue-signer --root pki/root --out pki/signer --days 30")
    s.add_argument("--root", type=Path, required=True, help="the directory made by init-root")
    s.add_argument("--out", type=Path, required=True, help="directory for signer.key and signer.crt")
    s.add_argument("--days", type=int, help="days the signer is valid (default 90)")
    s.add_argument("--name", default="edgeops signer",
                   help="the certificate's common name (default 'edgeops signer')")
    s.set_defaults(func=_issue)

    v = command(ks, "revoke", "revoke signers: updates ROOT/revoked.crl",
                "edgeops keys revoke --root pki/root --cert pki/signer/signer.crt")
    v.add_argument("--root", type=Path, required=True,
                   help="the directory made by init-root (its key signs the list)")
    v.add_argument("--cert", type=Path, action="append", default=[],
                   help="a signer.crt to revoke (repeatable)")
    v.add_argument("--serial", action="append", default=[],
                   help="a serial number (hex) to revoke (repeatable)")
    v.set_defaults(func=_revoke)


def _init_root(a: argparse.Namespace) -> int:
    from agent.host import keys

    if a.dir is not None and a.out is not None and a.dir != a.out:
        raise UsageError(f"two directories given ({a.dir} and --out {a.out})",
                         hint="give the directory once: 'edgeops keys init-root DIR'")
    out = a.dir if a.dir is not None else a.out
    if out is None:
        raise UsageError("name the directory for the root key",
                         hint="'edgeops keys init-root DIR' (or --out DIR)")
    kp = keys.init_root(out, name=a.name, days=keys.ROOT_DAYS if a.days is None else a.days)
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
