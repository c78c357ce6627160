"""A regional controller: serves its devices DDI from a mirror of its parent.

It speaks DDI upstream on behalf of each device it has seen, with that device's
own ``TargetToken`` (so the parent, or a real hawkBit, authorises every device
itself). While the WAN is up a sync loop mirrors each device's base resource,
its deployment and cancel documents, and the artifacts they list (checked
against their declared size and SHA-256). Devices are always answered from the
mirror, so a WAN outage changes nothing they can see; their feedback and
configData go into a durable outbox that is forwarded upstream, in order, when
the parent answers again. Links are rewritten to point at this controller, so
devices cannot tell it from the central one.

A device first seen while the parent is down is refused (503): nothing can
vouch for its token yet. Afterwards its token must match the one the parent
accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from agent.adapters.fsutil import atomic_file
from agent.controller.dbexec import call
from agent.controller.errors import ControllerError, NotFound, TooLarge, Unauthorized
from agent.controller.fleet import Fleet
from agent.controller.http import (
    DDI,
    Settings,
    authenticated,
    base_url,
    parse_json,
    read_body,
    sleep_text,
)
from agent.core import logs

log = logs.get("edgeops.controller.regional")
TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=5)
MAX_DOC = 1 << 20  # a DDI document from the parent; artifacts are streamed, not read whole
MAX_QUEUED = 200  # reports one device may have waiting for the parent
MAX_QUEUED_BODY = 64 << 10  # bytes of one queued report
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")


class ParentDown(ControllerError):
    status = 503
    hint = "the regional controller cannot reach its parent; retry later"


class BadParentAnswer(ControllerError):
    status = 502
    hint = "the parent sent a document this controller cannot use; check the parent's logs"


class Regional:
    def __init__(self, fleet: Fleet, settings: Settings) -> None:
        assert settings.parent
        self.fleet, self.db = fleet, fleet.db
        self.parent = settings.parent.rstrip("/")
        self.settings = settings
        self.cache = fleet.data_dir / "mirror"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.session: aiohttp.ClientSession | None = None
        self.wan_up = False
        self.wake = asyncio.Event()
        self.app: web.Application | None = None

    # --- wiring ----------------------------------------------------------------------------
    def install(self, app: web.Application) -> None:
        self.app = app
        r = app.router
        r.add_get(DDI, self.base)
        r.add_get(DDI + "/deploymentBase/{aid}", self.doc)
        r.add_get(DDI + "/cancelAction/{aid}", self.doc)
        r.add_post(DDI + "/deploymentBase/{aid}/feedback", self.queue)
        r.add_post(DDI + "/cancelAction/{aid}/feedback", self.queue)
        r.add_put(DDI + "/configData", self.queue)
        r.add_get(DDI + "/softwaremodules/{mid}/artifacts/{fn}", self.artifact)
        r.add_get("/_regional", self.status)
        app.cleanup_ctx.append(self._lifecycle)

    async def _lifecycle(self, app: web.Application) -> Any:
        self.session = aiohttp.ClientSession(timeout=TIMEOUT)
        task = asyncio.create_task(self._loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.session.close()

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception:
                log.exception("regional sync failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.settings.parent_interval)
            self.wake.clear()

    # --- the mirror in the database ---------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: Any, bounded: bool = False) -> T:
        """Database work on the executor (``dbexec``): bounded for a device's request, not for
        the mirror's own passes, which a busy controller must not postpone."""
        assert self.app is not None
        return await call(self.app, fn, *args, bounded=bounded)

    def _get(self, device: str, path: str) -> str | None:
        rows = self.db.query("SELECT body FROM mirror_docs WHERE device_id = ? AND path = ?", [device, path])
        return str(rows[0][0]) if rows else None

    def _put(self, device: str, path: str, body: str) -> None:
        self.db.execute("INSERT INTO mirror_docs (device_id, path, body, fetched) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (device_id, path) DO UPDATE SET body = excluded.body, "
                        "fetched = excluded.fetched", [device, path, body, self.fleet.clock()])

    def _auth_of(self, device: str) -> str | None:
        rows = self.db.query("SELECT auth FROM mirror_auth WHERE device_id = ?", [device])
        return str(rows[0][0]) if rows else None

    async def _check_device(self, request: web.Request, cid: str) -> str:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith(("TargetToken ", "GatewayToken ")):
            raise Unauthorized("missing 'Authorization: TargetToken <token>'")
        known = await self._run(self._auth_of, cid, bounded=True)
        if known is not None and secrets.compare_digest(known.encode(), auth.encode()):
            authenticated(request)
            return auth
        # Unknown device or a new token: only the parent can vouch for it.
        await self._mirror_device(cid, auth)
        await self._run(self.db.execute, "INSERT INTO mirror_auth (device_id, auth) VALUES (?, ?) "
                        "ON CONFLICT (device_id) DO UPDATE SET auth = excluded.auth", [cid, auth])
        authenticated(request)
        return auth

    # --- device-facing handlers ---------------------------------------------------------------
    def _localise(self, body: str, request: web.Request) -> str:
        # The parent's links name the tenant this controller speaks upstream with (the path's
        # tenant was checked against it by http.tenant_mw, and is never copied into links).
        tenant = self.settings.tenant
        return body.replace(self.parent + f"/{tenant}/", base_url(request) + f"/{tenant}/")

    async def base(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        await self._check_device(request, cid)
        body = await self._run(self._get, cid, "base", bounded=True)
        if body is None:
            doc: dict[str, Any] = {"config": {"polling": {"sleep": sleep_text(self.settings.poll_sleep)}}}
        else:
            doc = json.loads(self._localise(body, request))
            links = doc.get("_links", {})
            dep = links.get("deploymentBase", {}).get("href", "")
            aid = dep.rsplit("/", 1)[-1].split("?")[0] if dep else None
            if aid and await self._run(self._get, cid, f"closed/{aid}", bounded=True) is not None:
                del links["deploymentBase"]  # reported done here; upstream will agree once told
        return web.json_response(doc)

    async def doc(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        await self._check_device(request, cid)
        kind = request.path.split("/")[-2]
        body = await self._run(self._get, cid, f"{kind}/{request.match_info['aid']}", bounded=True)
        if body is None:
            raise NotFound(f"{kind} {request.match_info['aid']} is not mirrored here")
        return web.json_response(text=self._localise(body, request))

    async def queue(self, request: web.Request) -> web.Response:
        cid = request.match_info["cid"]
        await self._check_device(request, cid)
        raw = await read_body(request)
        if len(raw) > MAX_QUEUED_BODY:
            raise TooLarge(f"a report waiting for the parent may have at most {MAX_QUEUED_BODY} bytes")
        doc = parse_json(raw)  # forwarded as it came, but only a well-formed JSON object
        body = raw.decode()
        tail = request.path.split("/controller/v1/", 1)[1].split("/", 1)[1]
        closes = request.match_info["aid"] if request.method == "POST" and _finishes(doc) else None
        await self._run(self._enqueue, cid, tail, request.method, body, closes, bounded=True)
        self.wake.set()
        return web.Response(status=200)

    def _enqueue(self, cid: str, tail: str, method: str, body: str, closes: str | None) -> None:
        with self.db.tx():
            # the outbox is bounded per device: while the WAN is down, a device's own queue
            # holds the rest (503 means "retry later" to a DDI client)
            if self.db.query("SELECT COUNT(*) FROM outbox WHERE device_id = ?", [cid])[0][0] >= MAX_QUEUED:
                raise ParentDown(f"{MAX_QUEUED} reports from {cid!r} are already waiting for the parent")
            self.db.insert("INSERT INTO outbox (device_id, path, method, body, created) "
                           "VALUES (?, ?, ?, ?, ?)", [cid, tail, method, body, self.fleet.clock()])
            if closes is not None:
                self._put(cid, "closed/" + closes, "1")

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        cid = request.match_info["cid"]
        await self._check_device(request, cid)
        mid, fn = request.match_info["mid"], request.match_info["fn"]
        if not await self._run(self._offered, cid, f"/softwaremodules/{mid}/artifacts/{fn}", bounded=True):
            raise NotFound(f"no software module {mid[:40]!r} is assigned to {cid!r} here")
        sha = await self._run(self._get, "*", f"artifact/{mid}/{fn}", bounded=True)
        if sha is None or not (self.cache / sha).exists():
            raise NotFound("artifact is not mirrored here yet")
        return web.FileResponse(self.cache / sha)

    def _offered(self, cid: str, tail: str) -> bool:
        """The parent offered this device a deployment that lists this artifact (the parent
        decided what is assigned to whom; the mirror keeps each device's documents apart)."""
        rows = self.db.query("SELECT body FROM mirror_docs WHERE device_id = ? AND path LIKE "
                             "'deploymentBase/%'", [cid])
        for (body,) in rows:
            try:
                chunks = json.loads(body)["deployment"]["chunks"]
                hrefs = [a["_links"]["download"]["href"] for c in chunks for a in c["artifacts"]]
            except (ValueError, KeyError, TypeError):
                continue
            if any(isinstance(h, str) and h.split("?", 1)[0].endswith(tail) for h in hrefs):
                return True
        return False

    async def status(self, request: web.Request) -> web.Response:
        pending = (await self._run(self.db.query, "SELECT COUNT(*) FROM outbox", bounded=True))[0][0]
        return web.json_response({"parent": self.parent, "wan_up": self.wan_up, "outbox": pending})

    # --- upstream -----------------------------------------------------------------------------
    async def sync_once(self) -> None:
        await self.flush_outbox()
        for cid, auth in await self._run(self.db.query, "SELECT device_id, auth FROM mirror_auth "
                                         "ORDER BY device_id"):
            try:
                await self._mirror_device(cid, auth)
            except ParentDown:
                return
            except Unauthorized as exc:
                # the parent no longer vouches for this token (revoked, deleted device): stop
                # accepting it here too; the device is served again once the parent says so
                await self._run(self.db.execute, "DELETE FROM mirror_auth WHERE device_id = ? AND auth = ?",
                                [cid, auth])
                log.warning("mirroring %s: %s; its token is no longer accepted here", cid, exc)
            except ControllerError as exc:
                log.warning("mirroring %s: %s", cid, exc)

    async def _fetch(self, url: str, auth: str) -> tuple[int, bytes]:
        assert self.session is not None
        try:
            async with self.session.get(url, headers={"Authorization": auth}) as r:
                parts, size = [], 0
                async for block in r.content.iter_chunked(1 << 16):  # read(n) may return less
                    size += len(block)
                    if size > MAX_DOC:
                        raise BadParentAnswer(f"{url}: answer larger than {MAX_DOC} bytes")
                    parts.append(block)
                self.wan_up = True
                return r.status, b"".join(parts)
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.wan_up = False
            raise ParentDown(f"parent {self.parent} unreachable: {exc}") from None

    async def _mirror_device(self, cid: str, auth: str) -> None:
        try:
            await self._mirror_device_docs(cid, auth)
        except (KeyError, IndexError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            # json.JSONDecodeError is a ValueError: one device's odd document must not stop the rest
            raise BadParentAnswer(f"parent's documents for {cid!r} do not parse: "
                                  f"{type(exc).__name__}: {exc}") from None

    async def _mirror_device_docs(self, cid: str, auth: str) -> None:
        tenant = self.settings.tenant
        root = f"{self.parent}/{tenant}/controller/v1/{cid}"
        status, data = await self._fetch(root, auth)
        if status in (401, 403, 404):
            raise Unauthorized(f"the parent refused controller {cid!r} ({status})")
        _check_status(status, f"controller {cid!r}")
        doc = json.loads(data)
        for name in ("deploymentBase", "cancelAction"):
            href = doc.get("_links", {}).get(name, {}).get("href")
            if href:
                await self._mirror_doc(cid, auth, name, href)
        await self._run(self._put, cid, "base", data.decode())

    async def _mirror_doc(self, cid: str, auth: str, kind: str, href: str) -> None:
        aid = href.rsplit("/", 1)[-1].split("?")[0]
        if await self._run(self._get, cid, f"{kind}/{aid}") is not None:
            return  # documents of one action do not change
        status, data = await self._fetch(href, auth)
        _check_status(status, href)
        if kind == "deploymentBase":
            for chunk in json.loads(data).get("deployment", {}).get("chunks", []):
                for art in chunk.get("artifacts", []):
                    await self._mirror_artifact(art, auth)
        await self._run(self._put, cid, f"{kind}/{aid}", data.decode())

    async def _mirror_artifact(self, art: dict[str, Any], auth: str) -> None:
        href = art["_links"]["download"]["href"]
        mid, fn = href.split("/softwaremodules/", 1)[1].split("/artifacts/", 1)
        sha = str(art["hashes"]["sha256"]).lower()
        if not _SHA256.match(sha):  # it names a file in the cache: nothing but 64 hex digits
            raise BadParentAnswer(f"artifact {fn!r} has no valid sha256")
        final = self.cache / sha
        if not final.exists():
            await self._download(href, auth, sha, int(art["size"]))
        await self._run(self._put, "*", f"artifact/{mid}/{fn}", sha)

    async def _download(self, href: str, auth: str, sha: str, size: int) -> None:
        """Stream an artifact into the cache as ``<sha256>``; on any failure the cache is unchanged."""
        assert self.session is not None
        # Credentials only go to the parent itself, never to a third-party host a link names.
        headers = {"Authorization": auth} if href.startswith(self.parent + "/") else {}
        try:
            async with self.session.get(href, headers=headers) as r:
                _check_status(r.status, f"artifact {href}")
                # atomic_file removes its temporary file when the block raises (a short or
                # corrupt download, a broken connection), so a bad artifact never gets its name.
                with atomic_file(self.cache / sha) as f:
                    h, n = hashlib.sha256(), 0
                    async for block in r.content.iter_chunked(1 << 16):
                        n += len(block)
                        if n > size:
                            raise BadParentAnswer(f"artifact {href} is longer than its declared "
                                                  f"{size} bytes")
                        h.update(block)
                        f.write(block)
                    if n != size or h.hexdigest() != sha:
                        raise BadParentAnswer(f"artifact {href} does not match its declared size "
                                              "and SHA-256")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ParentDown(f"artifact {href}: {exc}") from None

    async def flush_outbox(self) -> int:
        """Forward queued device reports in order; stop at the first that the parent cannot take."""
        assert self.session is not None
        sent = 0
        rows = await self._run(self.db.query, "SELECT o.id, o.device_id, o.path, o.method, o.body, "
                               "a.auth FROM outbox o JOIN mirror_auth a ON a.device_id = o.device_id "
                               "ORDER BY o.id")
        for oid, cid, path, method, body, auth in rows:
            url = f"{self.parent}/{self.settings.tenant}/controller/v1/{cid}/{path}"
            try:
                async with self.session.request(method, url, data=body, headers={
                        "Authorization": auth, "Content-Type": "application/json"}) as r:
                    await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                self.wan_up = False
                return sent
            self.wan_up = True
            if status >= 500:
                return sent
            if status >= 400:  # the parent will never take it: keep the queue moving
                log.warning("parent refused %s %s: HTTP %s", method, url, status)
            await self._run(self.db.execute, "DELETE FROM outbox WHERE id = ?", [oid])
            sent += 1
        return sent


def _check_status(status: int, what: str) -> None:
    """A 5xx means the parent is in trouble (stop this pass, retry later); any other non-200
    is about this one document, and must not stop the other devices' mirroring."""
    if status >= 500:
        raise ParentDown(f"parent answered {status} for {what}")
    if status != 200:
        raise BadParentAnswer(f"parent answered {status} for {what}")


def _finishes(doc: dict[str, Any]) -> bool:
    status = doc.get("status", {})
    return isinstance(status, dict) and status.get("execution") in ("closed", "canceled")
