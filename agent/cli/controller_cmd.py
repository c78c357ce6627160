"""edgeops controller: run the fleet controller, and manage the fleet through its REST API.

    edgeops controller serve [--db URL] [--listen 127.0.0.1:PORT] [--parent URL] [--keyring ROOT.crt]
                             [--tls-cert F --tls-key F [--device-ca DIR [--cert-lifetime S]]]
                             [--init] [--reuse-port] [--max-connections N]
    edgeops controller device list|add|tag|revoke     edgeops controller group list|add
    edgeops controller bundle list|upload      edgeops controller deploy (--device|--group|--percent)
    edgeops controller rollout create|status|pause|resume|halt|cancel

Management commands talk HTTP to a running controller (--url, $EDGEOPS_CONTROLLER_URL) with
the operator token (--token, $EDGEOPS_CONTROLLER_TOKEN); an HTTPS controller with a private CA
needs --ca-cert ($EDGEOPS_CONTROLLER_CA). Heavy imports stay inside handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.errors import TransportError, UsageError


def register(sub: Any) -> None:
    p = sub.add_parser("controller", help="the fleet controller (hawkBit DDI server) and its API")
    cs = p.add_subparsers(dest="controller_command", metavar="ACTION", required=True)

    s = cs.add_parser("serve", help="run the controller")
    s.add_argument("--db", default="controller.db", help="SQLite path or postgresql:// URL")
    s.add_argument("--data", type=Path, help="artifact directory (default: beside the SQLite file)")
    s.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    s.add_argument("--parent", help="regional mode: the parent controller's URL")
    s.add_argument("--keyring", type=Path, help="the fleet's root certificates (PEM)")
    s.add_argument("--tenant", default="DEFAULT",
                   help="the hawkBit tenant in DDI paths (default DEFAULT; compared without case)")
    s.add_argument("--poll-sleep", type=int, default=30, help="seconds devices wait between polls")
    s.add_argument("--token", default=os.environ.get("EDGEOPS_CONTROLLER_TOKEN"),
                   help="operator bearer token (default: generated once, kept in the database)")
    s.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    s.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    s.add_argument("--device-ca", type=Path,
                   help="device CA directory (root.crt, root.key, devices.json, revoked.crl): "
                        "devices must use client certificates from it (mTLS); needs --tls-cert")
    s.add_argument("--cert-lifetime", type=int, default=24 * 3600,
                   help="seconds a device certificate issued by identity/renew lives (default 86400)")
    s.add_argument("--init", action="store_true",
                   help="make a new database in an existing empty --db file (a missing file is "
                        "always created; an existing damaged or empty one is otherwise refused)")
    s.add_argument("--reuse-port", action="store_true",
                   help="share the port with other controller processes (SO_REUSEPORT); only for "
                        "processes that share one database (PostgreSQL, or one SQLite file)")
    s.add_argument("--max-connections", type=int,
                   help="at most this many connections (default: as many as the file limit allows)")
    s.set_defaults(func=_serve)

    def api_cmd(parser: Any, name: str, helptext: str, fn: Any) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = parser.add_parser(name, help=helptext)
        c.add_argument("--url", default=os.environ.get("EDGEOPS_CONTROLLER_URL", "http://127.0.0.1:8080"))
        c.add_argument("--token", default=os.environ.get("EDGEOPS_CONTROLLER_TOKEN", ""))
        c.add_argument("--ca-cert", default=os.environ.get("EDGEOPS_CONTROLLER_CA"),
                       help="CA of an HTTPS controller's certificate")
        c.set_defaults(func=fn)
        return c

    dev = cs.add_parser("device", help="devices").add_subparsers(dest="a", metavar="ACTION", required=True)
    api_cmd(dev, "list", "list devices", lambda a: _call(a, "GET", "/devices"))
    d = api_cmd(dev, "add", "register a device; prints its TargetToken", lambda a: _call(
        a, "POST", "/devices", {"id": a.id, "site": a.site, "tags": a.tag, "token": a.device_token}))
    d.add_argument("id")
    d.add_argument("--site", default="")
    d.add_argument("--tag", action="append", default=[])
    d.add_argument("--device-token", help="use this TargetToken instead of a generated one")
    t = api_cmd(dev, "tag", "add tags to a device",
                lambda a: _call(a, "POST", f"/devices/{a.id}/tags", {"tags": a.tags}))
    t.add_argument("id")
    t.add_argument("tags", nargs="+")
    rv = api_cmd(dev, "revoke", "revoke a device's identity: its certificates are refused (mTLS)",
                 lambda a: _call(a, "POST", f"/devices/{a.id}/revoke"))
    rv.add_argument("id")

    grp = cs.add_parser("group", help="groups").add_subparsers(dest="a", metavar="ACTION", required=True)
    api_cmd(grp, "list", "list groups", lambda a: _call(a, "GET", "/groups"))
    g = api_cmd(grp, "add", "add devices to a group (created on first use)",
                lambda a: _call(a, "POST", "/groups", {"name": a.name, "devices": a.devices}))
    g.add_argument("name")
    g.add_argument("devices", nargs="+")

    bun = cs.add_parser("bundle", help="bundles").add_subparsers(dest="a", metavar="ACTION", required=True)
    api_cmd(bun, "list", "list bundles", lambda a: _call(a, "GET", "/bundles"))
    u = api_cmd(bun, "upload", "upload a signed bundle (the controller verifies it)", _upload)
    u.add_argument("path", type=Path)

    dep = api_cmd(cs, "deploy", "deploy a bundle at once (one wave, no gate)", lambda a: _call(
        a, "POST", "/deployments", {"bundle": a.bundle, "device": a.device, "group": a.group,
                                    "percent": a.percent}))
    dep.add_argument("bundle", type=int)
    dep.add_argument("--device")
    dep.add_argument("--group")
    dep.add_argument("--percent", type=float)

    ro = cs.add_parser("rollout", help="gated rollouts").add_subparsers(dest="a", metavar="ACTION",
                                                                       required=True)
    c = api_cmd(ro, "create", "canary wave, then growing waves behind a health gate", _rollout_create)
    c.add_argument("bundle", type=int)
    c.add_argument("--group")
    c.add_argument("--percent", type=float)
    c.add_argument("--canary-percent", type=float, default=5.0)
    c.add_argument("--success-threshold", type=float, default=0.95)
    c.add_argument("--error-threshold", type=float, default=0.2)
    c.add_argument("--window", type=float, default=3600.0, help="seconds a wave may take")
    c.add_argument("--require-commit", action="store_true",
                   help="count only successes reported after a committed trial boot (edgeops agents), "
                        "not those reported once the image is written (rauc-hawkbit-updater)")
    st = api_cmd(ro, "status", "show a rollout (or all)",
                 lambda a: _call(a, "GET", f"/rollouts/{a.id}" if a.id else "/rollouts"))
    st.add_argument("id", nargs="?", type=int)
    for verb in ("pause", "resume", "cancel"):
        v = api_cmd(ro, verb, f"{verb} a rollout",
                    lambda a, verb=verb: _call(a, "POST", f"/rollouts/{a.id}/{verb}"))
        v.add_argument("id", type=int)
    h = api_cmd(ro, "halt", "halt one rollout, or with no id every rollout (fleet-wide)",
                lambda a: _call(a, "POST", f"/rollouts/{a.id}/halt" if a.id else "/halt"))
    h.add_argument("id", nargs="?", type=int)


def _call(a: argparse.Namespace, method: str, path: str, body: Any = None, data: Any = None) -> int:
    import requests

    url = f"{a.url.rstrip('/')}/api/v1{path}"
    try:
        r = requests.request(method, url, json=body if data is None else None, data=data, timeout=120,
                             headers={"Authorization": f"Bearer {a.token}"},
                             verify=getattr(a, "ca_cert", None) or True)
    except requests.RequestException as exc:
        raise TransportError(f"controller at {a.url} unreachable: {exc}") from None
    if r.status_code >= 400:
        try:
            msg = r.json().get("message", r.text)
        except ValueError:
            msg = r.text
        raise UsageError(f"controller refused {method} {path}: HTTP {r.status_code}: {msg}",
                         hint="see docs/fleet-controller.md")
    print(json.dumps(r.json(), indent=2, sort_keys=True))
    return 0


def _upload(a: argparse.Namespace) -> int:
    try:
        f = open(a.path, "rb")  # noqa: SIM115 (closed below; open errors need their own message)
    except OSError as exc:
        raise UsageError(f"cannot open {a.path}: {exc.strerror}") from None
    with f:
        return _call(a, "POST", f"/bundles?filename={a.path.name}", data=f)


def _rollout_create(a: argparse.Namespace) -> int:
    policy = {"canary_percent": a.canary_percent, "success_threshold": a.success_threshold,
              "error_threshold": a.error_threshold, "window": a.window,
              "require_commit": a.require_commit}
    return _call(a, "POST", "/rollouts", {"bundle": a.bundle, "group": a.group, "percent": a.percent,
                                          "policy": policy})


def _serve(a: argparse.Namespace) -> int:
    from agent.controller import operator_token, serve
    from agent.controller.app import build_app
    from agent.controller.connections import raise_file_limit
    from agent.controller.db import open_database
    from agent.controller.fleet import Fleet
    from agent.controller.http import GUARD, TENANT_NAME, TENANT_RULE, Settings

    host, _, port = a.listen.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--listen {a.listen!r} is not HOST:PORT")
    if a.max_connections is not None and a.max_connections < 2:
        raise UsageError("--max-connections must be at least 2")
    if not TENANT_NAME.match(a.tenant):
        raise UsageError(f"--tenant {a.tenant[:64]!r}: {TENANT_RULE}")
    ca, ctx = _tls(a)  # before the database: a usage error should leave nothing behind
    os.umask(0o077)  # the database, its -wal/-shm and every file beside them: this user's only
    db = open_database(a.db, init=a.init)
    data = a.data or (Path(a.db).resolve().parent / "controller-data" if "://" not in a.db else None)
    if data is None:
        raise UsageError("with a PostgreSQL --db, give --data: a directory all controller processes share")
    fleet = Fleet(db, data, keyring_pem=a.keyring.read_bytes() if a.keyring else None)
    if a.token:
        digest, said = "", "operator token from --token / $EDGEOPS_CONTROLLER_TOKEN"
    else:
        stored = operator_token.load_or_create(db, fleet.data_dir)
        digest, said = stored.digest, stored.said
    settings = Settings(api_token=a.token or "", api_token_sha256=digest, tenant=a.tenant,
                        poll_sleep=a.poll_sleep, parent=a.parent, device_ca=ca, ssl_context=ctx,
                        cert_lifetime=a.cert_lifetime, max_connections=a.max_connections)
    raise_file_limit()  # before build_app: the connection cap is derived from the file limit
    app = build_app(fleet, settings)
    mode = "; devices need client certificates (mTLS)" if ca is not None else ""

    def started(site: serve.GuardedSite) -> None:
        guard = app[GUARD]
        print(f"edgeops controller on {site.name} (db {a.db}){mode}; at most "
              f"{guard.max_connections} connections ({guard.max_unauthenticated} not yet "
              f"authenticated); {said}", file=sys.stderr, flush=True)

    try:
        serve.run(app, host, int(port), reuse_port=a.reuse_port, started=started)
    except OSError as exc:
        hint = ("another process holds this port: stop it or choose another --listen; "
                "controllers that share one database may all take it with --reuse-port")
        raise TransportError(f"cannot listen on {a.listen}: {exc.strerror or exc}", hint=hint) from None
    return 0


def _tls(a: argparse.Namespace) -> tuple[Any, Any]:
    """(DeviceCA or None, SSLContext or None) from --tls-cert/--tls-key/--device-ca."""
    import ssl

    if bool(a.tls_cert) != bool(a.tls_key):
        raise UsageError("give --tls-cert and --tls-key together")
    if a.device_ca is not None and a.tls_cert is None:
        raise UsageError("--device-ca (mTLS) needs HTTPS: give --tls-cert and --tls-key")
    if a.device_ca is not None and a.parent:
        raise UsageError("a regional controller (--parent) speaks for its devices with their "
                         "TargetTokens: it cannot require device certificates (--device-ca)")
    if not 300 <= a.cert_lifetime <= 30 * 86400:
        raise UsageError("--cert-lifetime must be 300 to 2592000 seconds")
    if a.tls_cert is None:
        return None, None
    for f in (a.tls_cert, a.tls_key):
        if not f.is_file():
            raise UsageError(f"{f}: no such file")
    try:
        if a.device_ca is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(a.tls_cert, a.tls_key)
            return None, ctx
        from agent.controller.ca import DeviceCA

        if not (a.device_ca / "root.crt").is_file() or not (a.device_ca / "root.key").is_file():
            raise UsageError(f"{a.device_ca} is not a device CA (no root.crt/root.key)",
                             hint="create one with 'edgeops keys init-root DIR'")
        ca = DeviceCA(a.device_ca)
        ca.ensure_crl()  # revocation is always checked at the handshake, even before the first
        return ca, ca.server_context(a.tls_cert, a.tls_key, require_client_cert=False)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"cannot load the TLS certificate, key or device CA: {exc}") from None
