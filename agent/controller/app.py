"""The controller's HTTP face (aiohttp): hawkBit DDI v1 for devices, /api/v1 for operators.

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

Devices authenticate with ``Authorization: TargetToken <token>`` (hawkBit's target
security token) or, when the controller runs with a device CA (``Settings.device_ca``), with a
client certificate from that CA naming the controllerId (mutual TLS; the token is then not
accepted on DDI routes, except as the enrolment token of ``identity/renew``). Operators use
``Authorization: Bearer <token>`` on /api/v1.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.controller import rollout
from agent.controller.ca import DeviceCA
from agent.controller.errors import BadRequest, ControllerError, NotFound, Unauthorized
from agent.controller.fleet import BundleInfo, Fleet, PollInfo
from agent.core.identity import CERT_LIFETIME, RENEW_PATH, CertTimes
from agent.errors import CertificateRequired, EdgeopsError, IdentityError, TrustError, WrongDevice

log = logging.getLogger("edgeops.controller")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DDI = "/{tenant}/controller/v1/{cid}"


@dataclass
class Settings:
    api_token: str
    tenant: str = "DEFAULT"
    poll_sleep: int = 30  # seconds, sent as config.polling.sleep "HH:MM:SS"
    tick_interval: float = 5.0  # seconds between health-gate checks (feedback also triggers one)
    flush_interval: float = 2.0  # seconds between batched last-seen writes
    parent: str | None = None  # regional mode: the parent controller's base URL
    parent_interval: float = 10.0  # seconds between regional mirror passes
    # mTLS: DDI routes need a client certificate from this CA naming the controllerId
    device_ca: DeviceCA | None = None
    ssl_context: ssl.SSLContext | None = None  # HTTPS (from DeviceCA.server_context when mTLS)
    cert_lifetime: int = CERT_LIFETIME  # seconds, for certificates issued by identity/renew


PEER = web.RequestKey("device", str)  # the device a checked client certificate names
FLEET = web.AppKey("fleet", Fleet)
SETTINGS = web.AppKey("settings", Settings)
SEEN = web.AppKey("seen", dict)
WAITERS = web.AppKey("waiters", dict)
REQUESTS = web.AppKey("requests", collections.Counter)  # DDI requests by kind, for /metrics


def sleep_text(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def target_token(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme != "TargetToken" or not token:
        raise Unauthorized("missing 'Authorization: TargetToken <token>'")
    return token.strip()


# --- errors ---------------------------------------------------------------------------------
@web.middleware
async def errors_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ControllerError as exc:
        return _error(exc.status, exc)
    except IdentityError as exc:  # mTLS: no, expired, revoked or someone else's certificate
        return _error(401 if isinstance(exc, CertificateRequired) else 403, exc)
    except TrustError as exc:  # an uploaded bundle that devices would refuse
        return _error(422, exc)
    except EdgeopsError as exc:
        return _error(400, exc)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as exc:
        if not request.path.startswith("/api/v1/"):
            raise
        # A field of the wrong type or shape ({"bundle": "x"}, ?rollout=abc) is the caller's
        # mistake: say which, instead of a 500.
        log.info("bad request to %s: %r", request.path, exc)
        return _error(400, BadRequest(f"malformed request: {type(exc).__name__}: {exc}"[:300]))


def _error(status: int, exc: EdgeopsError) -> web.Response:
    return web.json_response({"error": type(exc).__name__, "message": str(exc), "hint": exc.hint},
                             status=status)


@web.middleware
async def auth_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        expected = request.app[SETTINGS].api_token
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not _same(token.strip(), expected):
            raise Unauthorized("missing or wrong 'Authorization: Bearer <token>'")
    return await handler(request)


def _same(a: str, b: str) -> bool:
    import secrets

    return bool(a) and secrets.compare_digest(a.encode(), b.encode())


# --- DDI ------------------------------------------------------------------------------------
MAX_WAIT = 300  # seconds a long-poll may be held
RECHECK = 5.0  # seconds between database re-checks while holding (another process may assign work)


async def ddi_base(request: web.Request) -> web.StreamResponse:
    """The base poll. Supports ETag/If-None-Match (304) and, for the edgeops agent's push
    channel, RFC 7240 ``Prefer: wait=N``: an unchanged poll is held until this device's
    links change or N seconds pass. hawkBit clients that send neither get a plain answer."""
    request.app[REQUESTS]["poll"] += 1
    body, etag = _base_doc(request)
    if request.headers.get("If-None-Match") != etag:
        return web.json_response(body, headers={"ETag": etag})
    wait = min(_prefer_wait(request.headers.get("Prefer", "")), MAX_WAIT)
    if wait > 0:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        event = request.app[WAITERS].setdefault(request.match_info["cid"], asyncio.Event())
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, RECHECK))
            event.clear()
            body, etag = _base_doc(request)
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


def _peer_der(request: web.Request) -> bytes | None:
    sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
    if sslobj is None:
        return None
    der: bytes | None = sslobj.getpeercert(binary_form=True)
    return der


@web.middleware
async def mtls_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With a device CA, every request that carries a client certificate is checked here, whatever
    the route: OpenSSL verified its chain and purpose at the handshake; ``check_peer`` adds the
    dates (by this controller's clock, per request, so a keep-alive connection cannot outlive its
    certificate), the CRL, the registry (revoked device, a serial the CA lists). Refusals are
    403 with the reason."""
    ca = request.app[SETTINGS].device_ca
    if ca is not None:
        der = _peer_der(request)
        if der is not None:
            request[PEER] = ca.check_peer(der, now=request.app[FLEET].clock())
    return await handler(request)


def _certified(request: web.Request, cid: str) -> None:
    """A DDI request under mTLS: a (checked) client certificate naming this controllerId."""
    device = request.get(PEER)
    if device is None:
        raise CertificateRequired(f"'{cid}' must present its device certificate (mutual TLS); "
                                  "this controller does not accept TargetTokens on DDI routes")
    if device != cid:
        raise WrongDevice(f"the client certificate is for '{device}', not for '{cid}'")


def _poll(request: web.Request, cid: str) -> PollInfo:
    fleet, ca = request.app[FLEET], request.app[SETTINGS].device_ca
    if ca is None:
        return fleet.poll(cid, target_token(request))
    _certified(request, cid)
    return fleet.poll_certified(cid)


def _base_doc(request: web.Request) -> tuple[dict[str, Any], str]:
    fleet, s = request.app[FLEET], request.app[SETTINGS]
    cid = request.match_info["cid"]
    info = _poll(request, cid)
    request.app[SEEN][cid] = fleet.clock()
    root = f"{base_url(request)}/{request.match_info['tenant']}/controller/v1/{cid}"
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
    body: dict[str, Any] = {"config": {"polling": {"sleep": sleep_text(s.poll_sleep)}}}
    if links:
        body["_links"] = links
    tag = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return body, f'"{tag}"'


def _ddi_auth(request: web.Request) -> tuple[Fleet, str, int]:
    fleet, ca = request.app[FLEET], request.app[SETTINGS].device_ca
    cid = request.match_info["cid"]
    if ca is None:
        fleet.authenticate(cid, target_token(request))
    else:
        _certified(request, cid)
        fleet.require_device(cid)
    try:
        aid = int(request.match_info.get("aid", "0"))
    except ValueError:
        raise NotFound("action ids are numbers") from None
    return fleet, cid, aid


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
    fleet, cid, aid = _ddi_auth(request)
    status, bundle = fleet.action(cid, aid)
    if status not in ("open", "running"):
        raise NotFound(f"action {aid} is {status}")
    root = f"{base_url(request)}/{request.match_info['tenant']}/controller/v1/{cid}"
    return web.json_response(deployment_doc(root, aid, bundle))


async def ddi_feedback(request: web.Request) -> web.Response:
    request.app[REQUESTS]["feedback"] += 1
    fleet, cid, aid = _ddi_auth(request)
    fleet.feedback(cid, aid, await _json(request), cancel=request.path.split("/")[-3] == "cancelAction",
                   key=request.headers.get("Idempotency-Key"))
    return web.Response(status=200)


async def ddi_cancel(request: web.Request) -> web.Response:
    fleet, cid, aid = _ddi_auth(request)
    status, _ = fleet.action(cid, aid)
    if status != "canceling":
        raise NotFound(f"action {aid} is not being canceled")
    return web.json_response({"id": str(aid), "cancelAction": {"stopId": str(aid)}})


async def ddi_config(request: web.Request) -> web.Response:
    request.app[REQUESTS]["configData"] += 1
    fleet, cid, _ = _ddi_auth(request)
    body = await _json(request)
    data = body.get("data")
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise BadRequest("configData needs 'data': an object of strings")
    fleet.set_attributes(cid, data, str(body.get("mode", "merge")))
    return web.Response(status=200)


async def ddi_artifact(request: web.Request) -> web.StreamResponse:
    request.app[REQUESTS]["artifact"] += 1
    fleet, _cid, _ = _ddi_auth(request)
    try:
        bundle = fleet.bundle(int(request.match_info["mid"]))
    except ValueError:
        raise NotFound("software module ids are numbers") from None
    if bundle.filename != request.match_info["fn"]:
        raise NotFound(f"module {bundle.id} has no artifact {request.match_info['fn']!r}")
    # FileResponse answers Range requests with 206 and If-Range/ETag; bundles are signed, so
    # any cache in between may keep them.
    return web.FileResponse(fleet.artifact_path(bundle), headers={"Cache-Control": "public, max-age=86400"})


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
    body = await _json(request)
    csr = body.get("csr")
    if not isinstance(csr, str):
        raise BadRequest("identity/renew needs 'csr': a PEM certificate signing request")
    enrol: tuple[bytes, str] | None = None
    if request.get(PEER) is not None:
        _certified(request, cid)
        fleet.require_device(cid)
    else:
        fleet.authenticate(cid, target_token(request))
        ak, kind = body.get("ak_public_pem", ""), body.get("kind", "")
        if isinstance(ak, str) and ak and kind in ("tpm", "keystore"):
            enrol = (ak.encode(), str(kind))
    # File writes, fsync and a lock shared with other controller processes: off the event loop.
    pem = await asyncio.to_thread(ca.issue_csr, cid, csr.encode(), now=fleet.clock(),
                                  lifetime=s.cert_lifetime, enrol=enrol)
    from cryptography import x509

    times = CertTimes.of(x509.load_pem_x509_certificate(pem))
    log.info("issued a device certificate to %s until %d", cid, times.not_after)
    return web.json_response({"certificate": pem.decode(), "not_before": times.not_before,
                              "not_after": times.not_after})


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


# --- management API -------------------------------------------------------------------------
async def api_devices(request: web.Request) -> web.Response:
    return web.json_response({"devices": request.app[FLEET].devices()})


async def api_add_device(request: web.Request) -> web.Response:
    b = await _json(request)
    token = request.app[FLEET].add_device(str(b.get("id", "")), token=b.get("token"),
                                          site=str(b.get("site", "")), tags=list(b.get("tags", [])))
    return web.json_response({"id": b["id"], "token": token}, status=201)


async def api_tag_device(request: web.Request) -> web.Response:
    tags = (await _json(request)).get("tags", [])
    return web.json_response({"tags": request.app[FLEET].tag_device(request.match_info["id"], list(tags))})


async def api_revoke_device(request: web.Request) -> web.Response:
    """Revoke a device's identity: no new certificate, and its certificates refused from the next
    request on (``mtls_mw`` reads the registry and the CRL; the TLS layer leaves both to it)."""
    s = request.app[SETTINGS]
    if s.device_ca is None:
        raise NotFound("this controller has no device CA (start it with --device-ca)")
    did = request.match_info["id"]
    await asyncio.to_thread(s.device_ca.revoke, did)
    return web.json_response({"id": did, "revoked": True})


async def api_groups(request: web.Request) -> web.Response:
    return web.json_response({"groups": request.app[FLEET].groups()})


async def api_add_group(request: web.Request) -> web.Response:
    b = await _json(request)
    request.app[FLEET].add_to_group(str(b.get("name", "")), list(b.get("devices", [])))
    return web.json_response({"groups": request.app[FLEET].groups()}, status=201)


async def api_bundles(request: web.Request) -> web.Response:
    return web.json_response({"bundles": [b.to_dict() for b in request.app[FLEET].bundles()]})


async def api_upload(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    filename = request.query.get("filename", "bundle.edgeops")
    if "/" in filename or filename.startswith("."):
        raise BadRequest("filename must be a plain file name")
    reader = _StreamFile(request.content, asyncio.get_running_loop())
    # Verification reads the whole bundle; run it off the event loop so polls keep flowing.
    info = await asyncio.to_thread(fleet.upload_bundle, reader, filename)  # type: ignore[arg-type]
    return web.json_response(info.to_dict(), status=201)


class _StreamFile:
    """A blocking read() over the request body, for a worker thread."""

    def __init__(self, content: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._content, self._loop = content, loop

    def read(self, n: int = -1) -> bytes:
        fut = asyncio.run_coroutine_threadsafe(self._content.read(n), self._loop)
        data: bytes = fut.result()
        return data


async def api_deploy(request: web.Request) -> web.Response:
    """One device, a group, or a percentage of the fleet; one wave, no gate (see /rollouts)."""
    b = await _json(request)
    fleet = request.app[FLEET]
    targets = fleet.resolve_targets(device=b.get("device"), group=b.get("group"),
                                    percent=_opt_float(b.get("percent")))
    rid = fleet.create_rollout(int(b.get("bundle", 0)), targets, rollout.Policy(canary_percent=100),
                               name=str(b.get("name", "")))
    return web.json_response(fleet.rollout_status(rid), status=201)


async def api_create_rollout(request: web.Request) -> web.Response:
    b = await _json(request)
    fleet = request.app[FLEET]
    targets = fleet.resolve_targets(group=b.get("group"), percent=_opt_float(b.get("percent")))
    policy = rollout.Policy.from_dict(b.get("policy", {}))
    rid = fleet.create_rollout(int(b.get("bundle", 0)), targets, policy, name=str(b.get("name", "")))
    return web.json_response(fleet.rollout_status(rid), status=201)


def _opt_float(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        raise BadRequest("percent must be a number") from None


def _rid(request: web.Request) -> int:
    try:
        return int(request.match_info["rid"])
    except ValueError:
        raise NotFound("rollout ids are numbers") from None


async def api_rollouts(request: web.Request) -> web.Response:
    return web.json_response({"rollouts": request.app[FLEET].rollouts()})


async def api_rollout(request: web.Request) -> web.Response:
    return web.json_response(request.app[FLEET].rollout_status(_rid(request)))


async def api_rollout_verb(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    return web.json_response(fleet.set_rollout_state(_rid(request), request.match_info["verb"]))


async def api_halt_all(request: web.Request) -> web.Response:
    return web.json_response({"halted": request.app[FLEET].halt_all()})


async def api_actions(request: web.Request) -> web.Response:
    rid = request.query.get("rollout")
    return web.json_response({"actions": request.app[FLEET].actions(
        device=request.query.get("device"), rollout_id=int(rid) if rid else None)})


async def empty(request: web.Request) -> web.Response:
    """The benchmark's baseline: the cheapest response this stack can give."""
    return web.Response(body=b"")


# --- background work ------------------------------------------------------------------------
async def _background(app: web.Application) -> AsyncIterator[None]:
    s = app[SETTINGS]
    loop = asyncio.get_running_loop()
    waiters: dict[str, asyncio.Event] = app[WAITERS]

    def wake(ids: list[str]) -> None:
        for d in ids:
            if d in waiters:
                waiters[d].set()

    def listener(ids: list[str]) -> None:  # may be called from a worker thread
        loop.call_soon_threadsafe(wake, ids)

    app[FLEET].listeners.append(listener)
    tasks = [asyncio.create_task(_every(s.flush_interval, lambda: _flush(app))),
             asyncio.create_task(_every(s.tick_interval, app[FLEET].tick))]
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    app[FLEET].listeners.remove(listener)
    _flush(app)


def _flush(app: web.Application) -> None:
    seen: dict[str, float] = app[SEEN]
    if seen:
        batch = dict(seen)
        seen.clear()
        app[FLEET].touch(batch)


async def _every(interval: float, fn: Callable[[], None]) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            fn()
        except Exception:  # a failing periodic job must not stop the server
            log.exception("periodic job failed")


def build_app(fleet: Fleet, settings: Settings) -> web.Application:
    if settings.device_ca is not None and settings.parent:
        raise ValueError("a regional controller forwards TargetTokens upstream: no --device-ca")
    app = web.Application(middlewares=[errors_mw, mtls_mw, auth_mw], client_max_size=1 << 20)
    app[FLEET] = fleet
    app[SETTINGS] = settings
    app[SEEN] = {}
    app[WAITERS] = {}
    app[REQUESTS] = collections.Counter()
    app.cleanup_ctx.append(_background)
    app.router.add_get("/_empty", empty)
    if settings.parent:
        from agent.controller.regional import Regional

        Regional(fleet, settings).install(app)
    else:
        _ddi_routes(app)
    _api_routes(app)
    return app


def _ddi_routes(app: web.Application) -> None:
    r = app.router
    r.add_get(DDI, ddi_base)
    r.add_get(DDI + "/deploymentBase/{aid}", ddi_deployment)
    r.add_post(DDI + "/deploymentBase/{aid}/feedback", ddi_feedback)
    r.add_get(DDI + "/cancelAction/{aid}", ddi_cancel)
    r.add_post(DDI + "/cancelAction/{aid}/feedback", ddi_feedback)
    r.add_put(DDI + "/configData", ddi_config)
    r.add_get(DDI + "/softwaremodules/{mid}/artifacts/{fn}", ddi_artifact)
    r.add_post(DDI + "/" + RENEW_PATH, ddi_identity_renew)


async def api_metrics(request: web.Request) -> web.Response:
    from agent.controller import metrics

    body = metrics.render(request.app[FLEET], request.app[REQUESTS])  # a few COUNTs: as cheap as a poll
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def _api_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/devices", api_devices)
    r.add_post("/api/v1/devices", api_add_device)
    r.add_post("/api/v1/devices/{id}/tags", api_tag_device)
    r.add_post("/api/v1/devices/{id}/revoke", api_revoke_device)
    r.add_get("/api/v1/groups", api_groups)
    r.add_post("/api/v1/groups", api_add_group)
    r.add_get("/api/v1/bundles", api_bundles)
    r.add_post("/api/v1/bundles", api_upload)
    r.add_post("/api/v1/deployments", api_deploy)
    r.add_get("/api/v1/rollouts", api_rollouts)
    r.add_post("/api/v1/rollouts", api_create_rollout)
    r.add_get("/api/v1/rollouts/{rid}", api_rollout)
    r.add_post("/api/v1/rollouts/{rid}/{verb}", api_rollout_verb)
    r.add_post("/api/v1/halt", api_halt_all)
    r.add_get("/api/v1/actions", api_actions)
    r.add_get("/api/v1/metrics", api_metrics)


# --- running ---------------------------------------------------------------------------------
@dataclass
class Running:
    url: str
    thread: threading.Thread
    stop: Callable[[], None]


def serve_in_thread(fleet: Fleet, settings: Settings, host: str = "127.0.0.1", port: int = 0) -> Running:
    """Start the server on its own loop in a thread (tests, demo). ``stop()`` shuts it down cleanly."""
    ready: dict[str, Any] = {}
    started = threading.Event()

    def main() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(build_app(fleet, settings), access_log=None)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, host, port, ssl_context=settings.ssl_context)
        loop.run_until_complete(site.start())
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        scheme = "https" if settings.ssl_context is not None else "http"
        ready["url"] = f"{scheme}://{host}:{sock.getsockname()[1]}"
        ready["loop"] = loop
        started.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    t = threading.Thread(target=main, daemon=True, name="controller")
    t.start()
    if not started.wait(10):
        raise RuntimeError("controller did not start")
    loop: asyncio.AbstractEventLoop = ready["loop"]

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)

    return Running(ready["url"], t, stop)

