"""The hawkBit DDI v1 routes a central controller serves its devices.

DDI resources (shapes from Eclipse hawkBit's DDI API, https://eclipse.dev/hawkbit/apis/ddi_api/
and the OpenAPI document https://eclipse.dev/hawkbit/rest-api/ddi/; example documents in
eclipse/hawkbit ``hawkbit-ddi-api`` ``DdiDeploymentBase``/``DdiControllerBase``):

    GET  /{tenant}/controller/v1/{controllerId}                                  base poll
    GET  /{tenant}/controller/v1/{controllerId}/deploymentBase/{actionId}
    POST /{tenant}/controller/v1/{controllerId}/deploymentBase/{actionId}/feedback
    GET  /{tenant}/controller/v1/{controllerId}/cancelAction/{actionId}
    POST /{tenant}/controller/v1/{controllerId}/cancelAction/{actionId}/feedback
    PUT  /{tenant}/controller/v1/{controllerId}/configData
    GET  /{tenant}/controller/v1/{controllerId}/softwaremodules/{moduleId}/artifacts/{fileName}

    POST /{tenant}/controller/v1/{controllerId}/identity/renew                  (edgeops: mTLS)
    POST /{tenant}/controller/v1/{controllerId}/attestation/challenge           (edgeops: quotes)
    POST /{tenant}/controller/v1/{controllerId}/attestation/quote

Authentication (TargetToken, or a client certificate under mTLS) is described in ``http``.
A regional controller serves the same paths from its mirror instead (``regional``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from typing import Any

from aiohttp import web

from agent.controller.bundles import BundleInfo
from agent.controller.dbexec import call, read, write
from agent.controller.errors import BadRequest, NotFound
from agent.controller.fleet import Fleet, PollInfo
from agent.controller.http import (
    ATTEST,
    DDI,
    FLEET,
    PEER,
    POLL_TIMES,
    REQUESTS,
    SEEN,
    SETTINGS,
    SHAPER,
    WAITERS,
    authenticated,
    ddi_root,
    path_id,
    read_json,
    sleep_text,
    target_token,
    text,
)
from agent.core import evidence, logs
from agent.core.identity import RENEW_PATH, CertTimes
from agent.errors import CertificateRequired, WrongDevice

log = logs.get("edgeops.controller")

MAX_WAIT = 300  # seconds a long-poll may be held
RECHECK = 5.0  # seconds between database re-checks while holding (another process may assign work)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(DDI, ddi_base)
    r.add_get(DDI + "/deploymentBase/{aid}", ddi_deployment)
    r.add_post(DDI + "/deploymentBase/{aid}/feedback", ddi_feedback)
    r.add_get(DDI + "/cancelAction/{aid}", ddi_cancel)
    r.add_post(DDI + "/cancelAction/{aid}/feedback", ddi_feedback)
    r.add_put(DDI + "/configData", ddi_config)
    r.add_get(DDI + "/softwaremodules/{mid}/artifacts/{fn}", ddi_artifact)
    r.add_post(DDI + "/" + RENEW_PATH, ddi_identity_renew)
    r.add_post(DDI + "/" + evidence.CHALLENGE_PATH, ddi_attest_challenge)
    r.add_post(DDI + "/" + evidence.QUOTE_PATH, ddi_attest_quote)


# --- the base poll ----------------------------------------------------------------------------
async def ddi_base(request: web.Request) -> web.StreamResponse:
    """The base poll. Supports ETag/If-None-Match (304) and, for the edgeops agent's push
    channel, RFC 7240 ``Prefer: wait=N``: an unchanged poll is held until this device's
    links change or N seconds pass. hawkBit clients that send neither get a plain answer."""
    request.app[REQUESTS]["poll"] += 1
    request.app[SHAPER].seen(request.app[FLEET].clock())  # once per poll, not per re-check
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    body, etag = await _base_doc(request)
    wait = min(_prefer_wait(request.headers.get("Prefer", "")), MAX_WAIT)
    if request.headers.get("If-None-Match") != etag or wait <= 0:  # answered now: timed
        request.app[POLL_TIMES].observe(loop.time() - t0)
    if request.headers.get("If-None-Match") != etag:
        return web.json_response(body, headers={"ETag": etag})
    if wait > 0:
        deadline = loop.time() + wait
        event = request.app[WAITERS].setdefault(request.match_info["cid"], asyncio.Event())
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, RECHECK))
            event.clear()
            body, etag = await _base_doc(request)
            if request.headers.get("If-None-Match") != etag:
                return web.json_response(body, headers={"ETag": etag})
    return web.Response(status=304, headers={"ETag": etag})


def _prefer_wait(prefer: str) -> float:
    for part in prefer.split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                return max(0.0, float(value))
            except ValueError:
                return 0.0
    return 0.0


async def _base_doc(request: web.Request) -> tuple[dict[str, Any], str]:
    fleet = request.app[FLEET]
    cid = request.match_info["cid"]
    info = await _poll(request, cid)
    now = fleet.clock()
    request.app[SEEN][cid] = now
    shaper = request.app[SHAPER]
    root = ddi_root(request)
    links: dict[str, Any] = {}
    if info.action_id is not None:
        # hawkBit adds a changing query parameter so caches never serve a stale action.
        c = hashlib.sha256(f"{info.action_id}:{info.action_status}".encode()).hexdigest()[:10]
        if info.action_status == "canceling":
            links["cancelAction"] = {"href": f"{root}/cancelAction/{info.action_id}"}
        else:
            links["deploymentBase"] = {"href": f"{root}/deploymentBase/{info.action_id}?c={c}"}
    if info.wants_config:
        links["configData"] = {"href": f"{root}/configData"}
    body: dict[str, Any] = {"config": {"polling": {"sleep": sleep_text(shaper.sleep_for(cid, now))}}}
    if links:
        body["_links"] = links
    tag = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return body, f'"{tag}"'


# --- who is asking ----------------------------------------------------------------------------
def _certified(request: web.Request, cid: str) -> None:
    """A DDI request under mTLS: a (checked) client certificate naming this controllerId."""
    device = request.get(PEER)
    if device is None:
        raise CertificateRequired(f"'{cid}' must present its device certificate (mutual TLS); "
                                  "this controller does not accept TargetTokens on DDI routes")
    if device != cid:
        raise WrongDevice(f"the client certificate is for '{device}', not for '{cid}'")


async def _poll(request: web.Request, cid: str) -> PollInfo:
    fleet, ca = request.app[FLEET], request.app[SETTINGS].device_ca
    if ca is None:
        info = await read(request.app, fleet.poll, cid, target_token(request))
    else:
        _certified(request, cid)
        info = await read(request.app, fleet.poll_certified, cid)
    authenticated(request)
    return info


async def _ddi_auth(request: web.Request) -> tuple[Fleet, str, int]:
    fleet, ca = request.app[FLEET], request.app[SETTINGS].device_ca
    cid = request.match_info["cid"]
    if ca is None:
        await read(request.app, fleet.authenticate, cid, target_token(request))
    else:
        _certified(request, cid)
        await read(request.app, fleet.require_device, cid)
    authenticated(request)
    aid = path_id(request, "aid", "action") if "aid" in request.match_info else 0
    return fleet, cid, aid


# --- actions ----------------------------------------------------------------------------------
def deployment_doc(root: str, aid: int, bundle: BundleInfo, handling: str = "attempt") -> dict[str, Any]:
    href = f"{root}/softwaremodules/{bundle.id}/artifacts/{bundle.filename}"
    artifact = {"filename": bundle.filename, "size": bundle.size,
                "hashes": {"sha1": bundle.sha1, "md5": bundle.md5, "sha256": bundle.sha256},
                "_links": {"download": {"href": href}, "download-http": {"href": href}}}
    chunk = {"part": "os", "version": bundle.version, "name": f"edgeops {bundle.compatible}",
             "artifacts": [artifact]}
    return {"id": str(aid), "deployment": {"download": handling, "update": handling, "chunks": [chunk]}}


async def ddi_deployment(request: web.Request) -> web.Response:
    request.app[REQUESTS]["deployment"] += 1
    fleet, cid, aid = await _ddi_auth(request)
    status, bundle = await read(request.app, fleet.action, cid, aid)
    if status not in ("open", "running"):
        raise NotFound(f"action {aid} is {status}")
    root = ddi_root(request)
    return web.json_response(deployment_doc(root, aid, bundle))


async def ddi_feedback(request: web.Request) -> web.Response:
    request.app[REQUESTS]["feedback"] += 1
    fleet, cid, aid = await _ddi_auth(request)
    # Group-committed (dbexec.write): the 200 goes out only after the batch holding this
    # report has committed, so an acknowledged report is never lost (docs/scale.md).
    await write(request.app, fleet.feedback, cid, aid, await read_json(request),
                cancel=request.path.split("/")[-3] == "cancelAction",
                key=request.headers.get("Idempotency-Key"))
    return web.Response(status=200)


async def ddi_cancel(request: web.Request) -> web.Response:
    fleet, cid, aid = await _ddi_auth(request)
    status, _ = await read(request.app, fleet.action, cid, aid)
    if status != "canceling":
        raise NotFound(f"action {aid} is not being canceled")
    return web.json_response({"id": str(aid), "cancelAction": {"stopId": str(aid)}})


async def ddi_config(request: web.Request) -> web.Response:
    request.app[REQUESTS]["configData"] += 1
    fleet, cid, _ = await _ddi_auth(request)
    body = await read_json(request)
    data = body.get("data")
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise BadRequest("configData needs 'data': an object of strings")
    await write(request.app, fleet.set_attributes, cid, data, text(body, "mode", "merge"))
    return web.Response(status=200)


async def ddi_artifact(request: web.Request) -> web.StreamResponse:
    request.app[REQUESTS]["artifact"] += 1
    fleet, cid, _ = await _ddi_auth(request)
    # hawkBit answers 404 unless the artifact belongs to an action assigned to this device
    mid = path_id(request, "mid", "software module")
    bundle = await read(request.app, fleet.assigned_bundle, cid, mid)
    if bundle.filename != request.match_info["fn"]:
        raise NotFound(f"module {bundle.id} has no artifact {request.match_info['fn']!r}")
    # FileResponse answers Range requests with 206 and If-Range/ETag; bundles are signed, so
    # any cache in between may keep them.
    return web.FileResponse(fleet.artifact_path(bundle), headers={"Cache-Control": "public, max-age=86400"})


# --- edgeops: device certificates ------------------------------------------------------------
async def ddi_identity_renew(request: web.Request) -> web.Response:
    """Issue a short-lived client certificate for a CSR. Authenticated by the device's current
    certificate (mTLS) or, without one, by its enrolment token (the TargetToken): the first issue,
    or after an outage outlived the certificate. The token path also enrols an unknown device
    (binds the controllerId to the CSR's key, once); either way the certificate is only ever for
    the enrolled key of an unrevoked device."""
    fleet, s = request.app[FLEET], request.app[SETTINGS]
    ca = s.device_ca
    if ca is None:
        raise NotFound("this controller issues no device certificates (start it with --device-ca)")
    cid = request.match_info["cid"]
    body = await read_json(request)
    csr = body.get("csr")
    if not isinstance(csr, str):
        raise BadRequest("identity/renew needs 'csr': a PEM certificate signing request")
    enrol: tuple[bytes, str] | None = None
    if request.get(PEER) is not None:
        _certified(request, cid)
        await read(request.app, fleet.require_device, cid)
    else:
        await read(request.app, fleet.authenticate, cid, target_token(request))
        authenticated(request)
        ak, kind = body.get("ak_public_pem", ""), body.get("kind", "")
        if isinstance(ak, str) and ak and kind in ("tpm", "keystore"):
            enrol = (ak.encode(), str(kind))
    # File writes, fsync and a lock shared with other controller processes: off the event loop.
    try:
        pem = await asyncio.to_thread(ca.issue_csr, cid, csr.encode(), now=fleet.clock(),
                                      lifetime=s.cert_lifetime, enrol=enrol)
    except (ValueError, TypeError) as exc:  # e.g. an enrolment key that does not parse
        raise BadRequest(f"identity/renew: {type(exc).__name__}: {exc}"[:300]) from None
    from cryptography import x509

    times = CertTimes.of(x509.load_pem_x509_certificate(pem))
    log.info("issued a device certificate to %s until %d", cid, times.not_after)
    return web.json_response({"certificate": pem.decode(), "not_before": times.not_before,
                              "not_after": times.not_after})


# --- edgeops: remote attestation (agent.core.evidence) ---------------------------------------
async def ddi_attest_challenge(request: web.Request) -> web.Response:
    """A fresh nonce for this device's next quote (it replaces any earlier one), and the PCR
    this controller judges quotes by."""
    _, cid, _ = await _ddi_auth(request)
    nonce = await call(request.app, request.app[ATTEST].challenge, cid)
    return web.json_response({"nonce": nonce.hex(), "pcrs": [request.app[SETTINGS].attest_pcr],
                              "expires_in": evidence.NONCE_LIFETIME})


async def ddi_attest_quote(request: web.Request) -> web.Response:
    """Judge a quote against the nonce issued (consumed either way) and the device's bound AK:
    200 with the device's attestation record, or 422 ``QuoteRefused`` saying why."""
    _, cid, _ = await _ddi_auth(request)
    answer = await call(request.app, request.app[ATTEST].answer, cid, await read_json(request))
    if answer.refused is not None:
        log.warning("attestation of %s refused: %s", cid, answer.refused)
        raise answer.refused
    log.info("attestation of %s verified: boot slot %s, %d event(s)", cid,
             answer.record["boot_slot"], len(answer.record["events"]))
    return web.json_response(answer.record)
