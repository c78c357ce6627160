"""The operators' REST API under /api/v1: devices, groups, bundles, deployments, rollouts, metrics.

Every route needs ``Authorization: Bearer <token>`` (``http.auth_mw``); request shapes are
in docs/fleet-controller.md. Handlers parse and answer; the work is ``Fleet``'s.
"""

from __future__ import annotations

import asyncio
import copy
import re
from typing import Any

from aiohttp import web

from agent.controller import rollout
from agent.controller.dbexec import DBEXEC, call
from agent.controller.errors import BadRequest, NotFound, RequestTimeout
from agent.controller.http import (
    ATTEST,
    FLEET,
    POLL_TIMES,
    REQUESTS,
    SETTINGS,
    body_id,
    opt_number,
    opt_object,
    opt_text,
    parse_json,
    path_id,
    query_id,
    read_body,
    read_json,
    text,
    texts,
)

API = "/api/v1"
_FILENAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(API + "/devices", api_devices)
    r.add_post(API + "/devices", api_add_device)
    r.add_post(API + "/devices/{id}/tags", api_tag_device)
    r.add_post(API + "/devices/{id}/revoke", api_revoke_device)
    r.add_get(API + "/devices/{id}/attestation", api_attestation)
    r.add_delete(API + "/devices/{id}/attestation", api_forget_attestation)
    r.add_get(API + "/groups", api_groups)
    r.add_post(API + "/groups", api_add_group)
    r.add_get(API + "/bundles", api_bundles)
    r.add_post(API + "/bundles", api_upload)
    r.add_post(API + "/deployments", api_deploy)
    r.add_get(API + "/rollouts", api_rollouts)
    r.add_post(API + "/rollouts", api_create_rollout)
    r.add_get(API + "/rollouts/{rid}", api_rollout)
    r.add_post(API + "/rollouts/{rid}/{verb}", api_rollout_verb)
    r.add_post(API + "/halt", api_halt_all)
    r.add_get(API + "/actions", api_actions)
    r.add_get(API + "/metrics", api_metrics)


# --- devices and groups -----------------------------------------------------------------------
async def api_devices(request: web.Request) -> web.Response:
    return web.json_response({"devices": await call(request.app, request.app[FLEET].devices)})


async def api_add_device(request: web.Request) -> web.Response:
    b = await read_json(request)
    did = text(b, "id")
    token = await call(request.app, request.app[FLEET].add_device, did,
                       token=opt_text(b, "token", limit=1024), site=text(b, "site"),
                       tags=texts(b, "tags", limit=100))
    return web.json_response({"id": did, "token": token}, status=201)


async def api_tag_device(request: web.Request) -> web.Response:
    tags = texts(await read_json(request), "tags", limit=100)
    return web.json_response({"tags": await call(request.app, request.app[FLEET].tag_device,
                                                 request.match_info["id"], tags)})


async def api_revoke_device(request: web.Request) -> web.Response:
    """Revoke a device: its TargetToken stops working at once, and where the controller has a
    device CA, no new certificate and its certificates refused from the next request on
    (``http.mtls_mw`` reads the registry and the CRL; the TLS layer leaves both to it)."""
    s = request.app[SETTINGS]
    did = request.match_info["id"]
    if s.device_ca is not None:
        await asyncio.to_thread(s.device_ca.revoke, did)
    await call(request.app, request.app[FLEET].revoke_token, did)
    return web.json_response({"id": did, "revoked": True, "token": "revoked",
                              "certificates": "revoked" if s.device_ca is not None else "none"})


async def api_attestation(request: web.Request) -> web.Response:
    """The device's last attestation: bound key, verdict, booted slot, the verified event log."""
    did = request.match_info["id"]
    record = await call(request.app, request.app[ATTEST].record, did)
    if record is None:
        raise NotFound(f"device {did!r} has no attestation on record (unknown, or it has not "
                       "quoted yet)")
    return web.json_response(record)


async def api_forget_attestation(request: web.Request) -> web.Response:
    """Forget the device's bound attestation key (after its TPM was replaced): its next quote
    binds one again."""
    did = request.match_info["id"]
    await call(request.app, request.app[ATTEST].forget, did)
    return web.json_response({"id": did, "attestation": "forgotten"})


async def api_groups(request: web.Request) -> web.Response:
    return web.json_response({"groups": await call(request.app, request.app[FLEET].groups)})


async def api_add_group(request: web.Request) -> web.Response:
    b = await read_json(request)
    await call(request.app, request.app[FLEET].add_to_group, text(b, "name"), texts(b, "devices"))
    return web.json_response({"groups": await call(request.app, request.app[FLEET].groups)},
                             status=201)


# --- bundles ----------------------------------------------------------------------------------
async def api_bundles(request: web.Request) -> web.Response:
    found = await call(request.app, request.app[FLEET].bundles)
    return web.json_response({"bundles": [b.to_dict() for b in found]})


async def api_upload(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    filename = request.query.get("filename", "bundle.edgeops")
    if not _FILENAME.match(filename):
        raise BadRequest("filename must be a plain file name: 1-128 letters, digits, '.', '_', '-', "
                         "not starting with '.'")
    reader = _StreamFile(request.content, asyncio.get_running_loop(),
                         request.app[SETTINGS].body_timeout)
    # Verification reads the whole bundle; run it off the event loop so polls keep flowing.
    info = await asyncio.to_thread(fleet.upload_bundle, reader, filename)  # type: ignore[arg-type]
    return web.json_response(info.to_dict(), status=201)


class _StreamFile:
    """A blocking read() over the request body, for a worker thread. Each read must bring data
    within ``timeout`` seconds: an upload that stalls is dropped (408), not held open."""

    def __init__(self, content: Any, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._content, self._loop, self._timeout = content, loop, timeout

    def read(self, n: int = -1) -> bytes:
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(self._content.read(n), self._timeout), self._loop)
        try:
            data: bytes = fut.result()
        except TimeoutError:
            raise RequestTimeout(f"the upload stalled for {self._timeout:g} s") from None
        return data


# --- deployments and rollouts -----------------------------------------------------------------
async def api_deploy(request: web.Request) -> web.Response:
    """One device, a group, a percentage of the fleet, or ``"all": true``; one wave, no gate
    (see /rollouts). Devices of another board, or already on the version (unless
    ``"force": true``), are left out and listed under ``skipped``."""
    b = await read_json(request)
    fleet = request.app[FLEET]
    bundle = body_id(b, "bundle")
    device, group, percent = opt_text(b, "device"), opt_text(b, "group"), opt_number(b, "percent")
    everyone, force, name, who = _flag(b, "all"), _flag(b, "force"), text(b, "name"), _who(request)

    def deploy() -> dict[str, Any]:  # one trip to the database thread (controller.dbexec)
        targets, skipped = fleet.select_targets(bundle, device=device, group=group, percent=percent,
                                                everyone=everyone, force=force)
        rid = fleet.create_rollout(bundle, targets, rollout.Policy(canary_percent=100),
                                   name=name, who=who, skipped=skipped)
        return {**fleet.rollout_status(rid), "skipped": skipped}

    return web.json_response(await call(request.app, deploy), status=201)


async def api_create_rollout(request: web.Request) -> web.Response:
    b = await read_json(request)
    fleet = request.app[FLEET]
    policy = rollout.Policy.from_dict(opt_object(b, "policy"))
    bundle = body_id(b, "bundle")
    group, percent = opt_text(b, "group"), opt_number(b, "percent")
    everyone, force, name, who = _flag(b, "all"), _flag(b, "force"), text(b, "name"), _who(request)

    def create() -> dict[str, Any]:  # one trip to the database thread (controller.dbexec)
        targets, skipped = fleet.select_targets(bundle, group=group, percent=percent,
                                                everyone=everyone, force=force)
        rid = fleet.create_rollout(bundle, targets, policy, name=name, who=who, skipped=skipped)
        return {**fleet.rollout_status(rid), "skipped": skipped}

    return web.json_response(await call(request.app, create), status=201)


def _flag(body: dict[str, Any], key: str) -> bool:
    v = body.get(key, False)
    if not isinstance(v, bool):
        raise BadRequest(f"'{key}' must be true or false")
    return v


_WHO = re.compile(r"^[A-Za-z0-9@._:+-]{1,64}$")


def _who(request: web.Request) -> str:
    """Who acted, for a rollout's history: "operator", or "operator:NAME" when the client
    names its user in ``X-Edgeops-Operator`` (the CLI sends the login name). The name is the
    client's word, not a second credential: every operator shares the one bearer token."""
    name = request.headers.get("X-Edgeops-Operator", "")
    return f"operator:{name}" if _WHO.match(name) else "operator"


def _rid(request: web.Request) -> int:
    return path_id(request, "rid", "rollout")


async def api_rollouts(request: web.Request) -> web.Response:
    return web.json_response({"rollouts": await call(request.app, request.app[FLEET].rollouts)})


async def api_rollout(request: web.Request) -> web.Response:
    fleet, rid = request.app[FLEET], _rid(request)

    def show() -> dict[str, Any]:
        return {**fleet.rollout_status(rid), "history": fleet.rollout_history(rid)}

    return web.json_response(await call(request.app, show))


async def api_rollout_verb(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    verb = request.match_info["verb"]
    if verb != "resume":
        return web.json_response(await call(request.app, fleet.set_rollout_state, _rid(request), verb,
                                            who=_who(request)))
    # {"choice": "retry" | "skip" | "raise-threshold", "threshold": 0..1}, or no body at all
    raw = await read_body(request)
    b = parse_json(raw) if raw.strip() else {}
    unknown = set(b) - {"choice", "threshold"}
    if unknown:
        raise BadRequest(f"resume takes only 'choice' and 'threshold', not {sorted(unknown)}")
    choice = opt_text(b, "choice")
    if choice is not None and choice not in rollout.CHOICES:
        raise BadRequest(f"choice {choice[:40]!r} is not one of {', '.join(rollout.CHOICES)}")
    return web.json_response(await call(request.app, fleet.resume_rollout, _rid(request), choice,
                                        opt_number(b, "threshold"), who=_who(request)))


async def api_halt_all(request: web.Request) -> web.Response:
    return web.json_response({"halted": await call(request.app, request.app[FLEET].halt_all)})


async def api_actions(request: web.Request) -> web.Response:
    return web.json_response({"actions": await call(
        request.app, request.app[FLEET].actions, device=request.query.get("device"),
        rollout_id=query_id(request, "rollout"))})


# --- metrics ----------------------------------------------------------------------------------
async def api_metrics(request: web.Request) -> web.Response:
    from agent.controller import metrics  # prometheus_client is loaded at the first scrape

    ex = request.app[DBEXEC]
    db = {"commits": ex.commits, "grouped": ex.grouped, "refused": ex.refused}
    body = await call(request.app, metrics.render, request.app[FLEET],  # a few COUNTs
                      request.app[REQUESTS].copy(), copy.deepcopy(request.app[POLL_TIMES]), db)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})
