"""edgeops controller: run the fleet controller, and manage the fleet through its REST API.

    edgeops controller serve [--db URL] [--listen 127.0.0.1:PORT] [--parent URL] [--keyring ROOT.crt]
                             [--tls-cert F --tls-key F [--device-ca DIR [--cert-lifetime S]]]
                             [--init] [--reuse-port] [--max-connections N]
    edgeops controller device list|add|tag|revoke|attestation    edgeops controller group list|add
    edgeops controller bundle list|upload
    edgeops controller deploy BUNDLE (--device D | --group G | --percent P | --all) [--force]
    edgeops controller rollout create|status [--watch]|pause|resume|halt|cancel
    edgeops controller actions [--device D] [--rollout R]

Management commands talk HTTP to a running controller (--url, $EDGEOPS_CONTROLLER_URL) with
the operator token (--token, $EDGEOPS_CONTROLLER_TOKEN); an HTTPS controller with a private CA
needs --ca-cert ($EDGEOPS_CONTROLLER_CA). They print tables for people, and the controller's
JSON with --json (for scripts; the tables are drawn by ``controller_views``). Heavy imports
stay inside handlers. Long because it declares every management command with a sentence per
option and an example (about 440 lines); split, one parser would live in two files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cli import controller_views as views
from agent.cli.common import command
from agent.errors import TransportError, UsageError

ENV_HELP = ("The management commands reach the controller at --url (default "
            "$EDGEOPS_CONTROLLER_URL, else http://127.0.0.1:8080) with the operator token --token "
            "(default $EDGEOPS_CONTROLLER_TOKEN; 'controller serve' prints where it keeps a "
            "generated one); an HTTPS controller with a private CA needs --ca-cert "
            "($EDGEOPS_CONTROLLER_CA).")
Render = Callable[[Any], None]


def _parser(parent: Any, name: str, helptext: str, example: str) -> argparse.ArgumentParser:
    return command(parent, name, helptext, example, notes=ENV_HELP, formatter_class=_Formatter)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the example's line breaks; wraps the prose paragraph of the epilog itself."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        prose, _, rest = text.partition("\n\n")
        return textwrap.fill(prose, width, initial_indent=indent,
                             subsequent_indent=indent) + ("\n\n" + rest if rest else "")


def register(sub: Any) -> None:
    p = command(sub, "controller", "the fleet controller (hawkBit DDI server) and its API",
                "export EDGEOPS_CONTROLLER_URL=http://127.0.0.1:8080 EDGEOPS_CONTROLLER_TOKEN=...\n"
                "edgeops controller rollout status",
                description="The fleet controller (a hawkBit DDI server) and the commands that "
                            "manage a fleet through its REST API.",
                notes=ENV_HELP, formatter_class=_Formatter)
    cs = p.add_subparsers(dest="controller_command", metavar="ACTION", required=True)

    s = _parser(cs, "serve", "run the controller",
                "edgeops controller serve --db /var/lib/edgeops/controller.db --keyring pki/root/root.crt")
    s.add_argument("--db", default="controller.db",
                   help="the database: a SQLite path or a postgresql:// URL (default controller.db)")
    s.add_argument("--data", type=Path,
                   help="artifact directory (default: controller-data beside the SQLite file)")
    s.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default 127.0.0.1:8080)")
    s.add_argument("--parent",
                   help="regional mode: serve devices on behalf of the parent controller at this URL")
    s.add_argument("--keyring", type=Path,
                   help="the fleet's root certificates (PEM): uploaded bundles are verified against them")
    s.add_argument("--tenant", default="DEFAULT",
                   help="the hawkBit tenant in DDI paths (default DEFAULT; compared without case)")
    s.add_argument("--poll-sleep", type=int, default=30,
                   help="seconds devices wait between polls (default 30)")
    s.add_argument("--token", default=os.environ.get("EDGEOPS_CONTROLLER_TOKEN"),
                   help="operator bearer token (default: generated once, kept in the database)")
    s.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    s.add_argument("--tls-key", type=Path, help="the private key of --tls-cert (PEM)")
    s.add_argument("--device-ca", type=Path,
                   help="device CA directory (root.crt, root.key, devices.json, revoked.crl): "
                        "devices must use client certificates from it (mTLS); needs --tls-cert")
    s.add_argument("--cert-lifetime", type=int, default=24 * 3600,
                   help="seconds a device certificate issued by identity/renew lives (default 86400)")
    s.add_argument("--attest-pcr", type=int, default=15,
                   help="the PCR device quotes must cover: the devices' [tpm] pcr (default 15)")
    s.add_argument("--init", action="store_true",
                   help="make a new database in an existing empty --db file (a missing file is "
                        "always created; an existing damaged or empty one is otherwise refused)")
    s.add_argument("--reuse-port", action="store_true",
                   help="share the port with other controller processes (SO_REUSEPORT); only for "
                        "processes that share one database (PostgreSQL, or one SQLite file)")
    s.add_argument("--max-connections", type=int,
                   help="at most this many connections (default: as many as the file limit allows)")
    s.set_defaults(func=_serve)

    def api_cmd(parser: Any, name: str, helptext: str, fn: Callable[[argparse.Namespace], int],
                example: str) -> argparse.ArgumentParser:
        c = _parser(parser, name, helptext, example)
        c.add_argument("--url", default=os.environ.get("EDGEOPS_CONTROLLER_URL", "http://127.0.0.1:8080"),
                       help="the controller's URL (default $EDGEOPS_CONTROLLER_URL, else "
                            "http://127.0.0.1:8080)")
        c.add_argument("--token", default=os.environ.get("EDGEOPS_CONTROLLER_TOKEN", ""),
                       help="the operator token (default $EDGEOPS_CONTROLLER_TOKEN)")
        c.add_argument("--ca-cert", default=os.environ.get("EDGEOPS_CONTROLLER_CA"),
                       help="the CA of an HTTPS controller's certificate (default $EDGEOPS_CONTROLLER_CA)")
        c.add_argument("--json", action="store_true",
                       help="print the controller's JSON answer instead of a table (for scripts)")
        c.set_defaults(func=fn)
        return c

    dev = _parser(cs, "device", "list, register, tag or revoke devices",
                  "edgeops controller device list").add_subparsers(dest="a", metavar="ACTION",
                                                                   required=True)
    api_cmd(dev, "list", "list devices with their version, site and last contact",
            lambda a: _call(a, "GET", "/devices", render=views.devices_table),
            "edgeops controller device list")
    d = api_cmd(dev, "add", "register a device; prints its TargetToken (shown only once)", lambda a: _call(
        a, "POST", "/devices", {"id": a.id, "site": a.site, "tags": a.tag, "token": a.device_token},
        render=lambda r: print(f"registered {r['id']}; its TargetToken (shown only this once): "
                               f"{r['token']}")),
        "edgeops controller device add store-17 --site north --tag kiosk")
    d.add_argument("id", help="the device's controllerId (1-128 letters, digits, '-', '_', '.', ':')")
    d.add_argument("--site", default="", help="the device's site (rollout waves spread across sites)")
    d.add_argument("--tag", action="append", default=[], help="a tag (repeat for more)")
    d.add_argument("--device-token", help="use this TargetToken instead of a generated one")
    t = api_cmd(dev, "tag", "add tags to a device",
                lambda a: _call(a, "POST", f"/devices/{a.id}/tags", {"tags": a.tags},
                                render=lambda r: print(f"{a.id}: tags {', '.join(r['tags'])}")),
                "edgeops controller device tag store-17 kiosk beta")
    t.add_argument("id", help="the device")
    t.add_argument("tags", nargs="+", help="tags to add")
    rv = api_cmd(dev, "revoke", "revoke a device: its TargetToken stops working; with a device CA, its "
                 "certificates are refused too",
                 lambda a: _call(a, "POST", f"/devices/{a.id}/revoke",
                                 render=lambda r: print(f"{a.id}: revoked")),
                 "edgeops controller device revoke store-17")
    rv.add_argument("id", help="the device")
    at = api_cmd(dev, "attestation", "the device's last TPM quote: verified or refused, booted slot, "
                 "event log; --forget drops its bound attestation key (after a TPM replacement)",
                 lambda a: _call(a, "DELETE" if a.forget else "GET", f"/devices/{a.id}/attestation",
                                 render=(lambda r: print(f"{a.id}: attestation key forgotten"))
                                 if a.forget else views.attestation_text),
                 "edgeops controller device attestation store-17")
    at.add_argument("id", help="the device")
    at.add_argument("--forget", action="store_true",
                    help="forget the bound attestation key: the device's next quote binds one")

    grp = _parser(cs, "group", "list groups or add devices to one",
                  "edgeops controller group list").add_subparsers(dest="a", metavar="ACTION",
                                                                  required=True)
    api_cmd(grp, "list", "list groups and their devices",
            lambda a: _call(a, "GET", "/groups", render=views.groups_table), "edgeops controller group list")
    g = api_cmd(grp, "add", "add devices to a group (created on first use)",
                lambda a: _call(a, "POST", "/groups", {"name": a.name, "devices": a.devices},
                                render=lambda r: print(f"group {a.name}: "
                                                       f"{len(r['groups'][a.name])} devices")),
                "edgeops controller group add stores store-17 store-18")
    g.add_argument("name", help="the group")
    g.add_argument("devices", nargs="+", help="devices to add")

    bun = _parser(cs, "bundle", "list or upload bundles",
                  "edgeops controller bundle list").add_subparsers(dest="a", metavar="ACTION",
                                                                   required=True)
    api_cmd(bun, "list", "list uploaded bundles",
            lambda a: _call(a, "GET", "/bundles", render=views.bundles_table),
            "edgeops controller bundle list")
    u = api_cmd(bun, "upload", "upload a signed bundle (the controller verifies it)", _upload,
                "edgeops controller bundle upload build/v2.edgeops")
    u.add_argument("path", type=Path, help="the bundle file")

    dep = api_cmd(cs, "deploy", "deploy a bundle at once to the devices named (one wave, no gate)",
                  _deploy, "edgeops controller deploy 3 --group stores")
    dep.add_argument("bundle", type=int, help="the bundle's id ('controller bundle list')")
    _target_options(dep, device=True)

    ro = command(cs, "rollout", "gated rollouts: create, watch, pause, resume, halt, cancel",
                 "edgeops controller rollout status 7 --watch",
                 description="Gated rollouts: a canary wave, then growing waves behind a health "
                             "gate.", notes=ENV_HELP, formatter_class=_Formatter).add_subparsers(
        dest="a", metavar="ACTION", required=True)
    c = api_cmd(ro, "create", "create a rollout: a canary wave, then growing waves behind a health gate",
                _rollout_create, "edgeops controller rollout create 3 --group stores --canary-percent 5")
    c.add_argument("bundle", type=int, help="the bundle's id ('controller bundle list')")
    _target_options(c, device=False)
    c.add_argument("--canary-percent", type=float, default=5.0,
                   help="the first wave's share of the targets, in percent (default 5)")
    c.add_argument("--success-threshold", type=float, default=0.95,
                   help="the fraction of a wave that must succeed before the next starts (default 0.95)")
    c.add_argument("--error-threshold", type=float, default=0.2,
                   help="the fraction of a wave failing that pauses the rollout (default 0.2)")
    c.add_argument("--window", type=float, default=3600.0,
                   help="seconds a wave may take to pass the gate before the rollout pauses (default 3600)")
    c.add_argument("--require-commit", action="store_true",
                   help="count only successes reported after a committed trial boot (edgeops agents), "
                        "not those reported once the image is written (rauc-hawkbit-updater)")
    st = api_cmd(ro, "status", "show one rollout with its waves and history, or list them all",
                 _rollout_status, "edgeops controller rollout status 7 --watch")
    st.add_argument("id", nargs="?", type=int, help="the rollout (default: list every rollout)")
    st.add_argument("--watch", action="store_true",
                    help="show it again whenever it changes, until it is no longer running (Ctrl-C stops)")
    st.add_argument("--interval", type=float, default=2.0,
                    help="seconds between looks with --watch (default 2)")
    for verb, what in (("pause", "pause a running rollout (no new wave starts)"),
                       ("cancel", "cancel a rollout: its open actions are canceled")):
        v = api_cmd(ro, verb, what, _verb(verb), f"edgeops controller rollout {verb} 7")
        v.add_argument("id", type=int, help="the rollout")
    r = api_cmd(ro, "resume", "resume a paused rollout; after a failure pause, say what to do "
                              "with the failed devices", _rollout_resume,
                "edgeops controller rollout resume 7 --retry-failed")
    r.add_argument("id", type=int, help="the rollout")
    how = r.add_mutually_exclusive_group()
    how.add_argument("--retry-failed", action="store_true",
                     help="give the wave's failed devices the bundle again")
    how.add_argument("--skip-failed", action="store_true",
                     help="leave the failed devices out of this rollout and go on")
    how.add_argument("--threshold", type=float, metavar="X",
                     help="raise the error threshold to X (a fraction, above the current one)")
    h = api_cmd(ro, "halt", "halt one rollout, or with no id every rollout (fleet-wide)",
                lambda a: _call(a, "POST", f"/rollouts/{a.id}/halt" if a.id else "/halt",
                                render=views.rollout_line if a.id else
                                lambda r: print(f"halted rollouts: {r['halted'] or 'none'}")),
                "edgeops controller rollout halt 7")
    h.add_argument("id", nargs="?", type=int, help="the rollout (default: every running or paused one)")

    ac = api_cmd(cs, "actions", "list deployment actions with their state and the device's reason",
                 lambda a: _call(a, "GET", "/actions" + _query(device=a.device, rollout=a.rollout),
                                 render=views.actions_table),
                 "edgeops controller actions --rollout 7")
    ac.add_argument("--device", help="only this device's actions")
    ac.add_argument("--rollout", type=int, help="only this rollout's actions")


def _verb(verb: str) -> Callable[[argparse.Namespace], int]:
    return lambda a: _call(a, "POST", f"/rollouts/{a.id}/{verb}", render=views.rollout_line)


def _target_options(p: argparse.ArgumentParser, *, device: bool) -> None:
    if device:
        p.add_argument("--device", help="one device")
    p.add_argument("--group", help="the devices of this group")
    p.add_argument("--percent", type=float,
                   help="this percentage of the fleet (or of --group), chosen evenly across sites")
    p.add_argument("--all", action="store_true", dest="everyone",
                   help="every registered device (never the default: say it)")
    p.add_argument("--force", action="store_true",
                   help="also devices already running the bundle's version (they reinstall and reboot)")


def _targets(a: argparse.Namespace) -> dict[str, Any]:
    device = getattr(a, "device", None)
    if device is None and a.group is None and a.percent is None and not a.everyone:
        raise UsageError("name the target devices: --device, --group, --percent, or --all for the "
                         "whole fleet")
    body: dict[str, Any] = {"group": a.group, "percent": a.percent, "all": a.everyone, "force": a.force}
    if device is not None:
        body["device"] = device
    return body


def _query(**params: Any) -> str:
    from urllib.parse import urlencode

    given = {k: v for k, v in params.items() if v is not None}
    return "?" + urlencode(given) if given else ""


def _call(a: argparse.Namespace, method: str, path: str, body: Any = None, data: Any = None, *,
          render: Render | None = None) -> int:
    answer = _request(a, method, path, body, data)
    if a.json or render is None:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        render(answer)
    return 0


def _request(a: argparse.Namespace, method: str, path: str, body: Any = None, data: Any = None) -> Any:
    import getpass

    import requests

    url = f"{a.url.rstrip('/')}/api/v1{path}"
    headers = {"Authorization": f"Bearer {a.token}"}
    with contextlib.suppress(KeyError, OSError):  # for the rollout's history: who did it
        headers["X-Edgeops-Operator"] = getpass.getuser()
    try:
        r = requests.request(method, url, json=body if data is None else None, data=data, timeout=120,
                             headers=headers, verify=getattr(a, "ca_cert", None) or True)
    except requests.RequestException as exc:
        raise TransportError(f"controller at {a.url} unreachable: {exc}") from None
    if r.status_code >= 400:
        try:
            doc = r.json()
            msg, hint = doc.get("message", r.text), doc.get("hint") or None
        except ValueError:
            msg, hint = r.text[:300], None
        if r.status_code == 401:
            hint = "give the operator token: --token or $EDGEOPS_CONTROLLER_TOKEN"
        raise UsageError(f"controller refused {method} {path}: HTTP {r.status_code}: {msg}",
                         hint=hint or "see docs/fleet-controller.md")
    return r.json()


def _upload(a: argparse.Namespace) -> int:
    try:
        f = open(a.path, "rb")  # noqa: SIM115 (closed below; open errors need their own message)
    except OSError as exc:
        raise UsageError(f"cannot open {a.path}: {exc.strerror}") from None
    with f:
        return _call(a, "POST", f"/bundles?filename={a.path.name}", data=f, render=lambda b: print(
            f"bundle {b['id']}: {b['version']} for {b['compatible']}, {b['size']} bytes, "
            f"signed by {b['signer']}"))


def _deploy(a: argparse.Namespace) -> int:
    return _call(a, "POST", "/deployments", {"bundle": a.bundle, **_targets(a)}, render=views.created)


def _rollout_create(a: argparse.Namespace) -> int:
    policy = {"canary_percent": a.canary_percent, "success_threshold": a.success_threshold,
              "error_threshold": a.error_threshold, "window": a.window,
              "require_commit": a.require_commit}
    return _call(a, "POST", "/rollouts", {"bundle": a.bundle, **_targets(a), "policy": policy},
                 render=views.created)


def _rollout_resume(a: argparse.Namespace) -> int:
    body: dict[str, Any] | None = None
    if a.retry_failed:
        body = {"choice": "retry"}
    elif a.skip_failed:
        body = {"choice": "skip"}
    elif a.threshold is not None:
        body = {"choice": "raise-threshold", "threshold": a.threshold}
    return _call(a, "POST", f"/rollouts/{a.id}/resume", body, render=views.rollout_line)


def _rollout_status(a: argparse.Namespace) -> int:
    if a.id is None:
        if a.watch:
            raise UsageError("--watch follows one rollout: give its id")
        return _call(a, "GET", "/rollouts", render=views.rollouts_table)
    if not a.watch:
        return _call(a, "GET", f"/rollouts/{a.id}", render=views.rollout_detail)
    if not 0.2 <= a.interval <= 3600:
        raise UsageError("--interval must be from 0.2 to 3600 seconds")
    shown = None
    while True:
        st = _request(a, "GET", f"/rollouts/{a.id}")
        view = json.dumps(st, sort_keys=True) if a.json else views.rollout_text(st)
        if view != shown:
            if not a.json:
                print(f"--- {views.iso(time.time())}")
            print(view, flush=True)
            shown = view
        if st["status"] != "running":
            return 0
        time.sleep(a.interval)


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
                        cert_lifetime=a.cert_lifetime, max_connections=a.max_connections,
                        attest_pcr=a.attest_pcr)
    raise_file_limit()  # before build_app: the connection cap is derived from the file limit
    from agent.core import logs

    # Each rollout transition and each failed action is one line on stderr, whatever -v says.
    logs.get("edgeops.controller.rollouts").setLevel(logs.INFO)
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
    if not 0 <= a.attest_pcr <= 23 or a.attest_pcr == 16:
        raise UsageError("--attest-pcr must be a PCR the device cannot reset: 0-15 or 17-23")
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
