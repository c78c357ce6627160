"""The controller's telemetry relay: devices' remote write and OTLP in, buffered, forwarded upstream.

Installed when the data directory holds ``telemetry-relay.toml`` (``core.telemetry_policy.
parse_relay``; docs/telemetry.md). A device whose [telemetry] points at

    POST /{tenant}/controller/v1/{cid}/telemetry/write       (remote write 1.0: protobuf, snappy)
    POST /{tenant}/controller/v1/{cid}/telemetry/v1/traces   (OTLP/HTTP: protobuf, gzip)

authenticated as on DDI (its TargetToken, as ``Bearer`` or ``TargetToken``, or its client
certificate under mTLS; a regional controller checks the token its parent vouched for), gets
a 200 once its data is in this controller's own SQLite buffer (``DATA/telemetry-relay.db``,
the device buffer's code and rules: budget, downsampling, eviction, counters). A forwarding
loop drains it upstream through remote write and OTLP with the same retries, so a regional
controller carries its site's telemetry through a WAN cut and forwards it when the link
returns, as it does for feedback. Each series gets ``edgeops_device=<cid>`` (the device
cannot claim another's); a series whose scope is ``regional`` or ``local`` — by the device's
rule or by the relay's own — is counted (``kept-on-site``) and never forwarded; so is a
trace whose resource says ``edgeops.scope=regional`` (a device's ``traces = "regional"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.adapters.telemetry_buffer import Point, TelemetryBuffer
from agent.controller.errors import BadRequest, Unauthorized
from agent.controller.fleet import Fleet
from agent.controller.http import DDI, PEER, Settings, authenticated, read_body
from agent.core import logs
from agent.core import telemetry_policy as tp
from agent.core.config import toml_doc
from agent.errors import ConfigError, EdgeopsError

log = logs.get("edgeops.controller.telemetry")
CONFIG = "telemetry-relay.toml"
DEVICE_LABEL = "edgeops_device"
MAX_SERIES = 10_000  # per request


def install(app: web.Application, fleet: Fleet, settings: Settings) -> None:
    """Add the relay's routes when ``DATA/telemetry-relay.toml`` exists (else nothing)."""
    path = fleet.data_dir / CONFIG
    if not path.exists():
        return
    try:
        relay_settings = tp.parse_relay(toml_doc(path.read_text(), path), str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    Relay(fleet, settings, relay_settings).install(app)


class Relay:
    def __init__(self, fleet: Fleet, settings: Settings, rs: tp.RelaySettings) -> None:
        self.fleet, self.settings, self.rs = fleet, settings, rs
        self.path = fleet.data_dir / "telemetry-relay.db"
        self.budget = tp.Budget(rs.budget_bytes)
        self.buffer = TelemetryBuffer(self.path, self.budget)  # the event loop's connection
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="telemetry-relay")
        self.wake = asyncio.Event()
        self._shipper: Any = None

    def install(self, app: web.Application) -> None:
        app.router.add_post(DDI + "/telemetry/write", self.write)
        app.router.add_post(DDI + "/telemetry/v1/traces", self.traces)
        app.router.add_get("/_telemetry", self.status)
        app.cleanup_ctx.append(self._lifecycle)

    # --- who is asking --------------------------------------------------------------------------
    def _check(self, request: web.Request, cid: str) -> None:
        if self.settings.device_ca is not None:
            if request.get(PEER) != cid:
                raise Unauthorized(f"telemetry for '{cid}' needs that device's client certificate")
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme not in ("Bearer", "TargetToken") or not token:
            raise Unauthorized("missing 'Authorization: Bearer <the device's TargetToken>'")
        if self.settings.parent:  # regional: the token the parent vouched for
            rows = self.fleet.db.query("SELECT auth FROM mirror_auth WHERE device_id = ?", [cid])
            if not rows or not secrets.compare_digest(str(rows[0][0]).encode(),
                                                      f"TargetToken {token}".encode()):
                raise Unauthorized("unknown controller id or wrong TargetToken")
        else:
            self.fleet.authenticate(cid, token)
        authenticated(request)

    # --- device-facing ----------------------------------------------------------------------------
    async def write(self, request: web.Request) -> web.Response:
        from agent.adapters.remote_write import BadWrite, decode

        cid = request.match_info["cid"]
        self._check(request, cid)
        try:
            series = decode(await read_body(request))
        except (BadWrite, EdgeopsError) as exc:
            raise BadRequest(f"not a remote-write body: {exc}") from None
        if len(series) > MAX_SERIES:
            raise BadRequest(f"at most {MAX_SERIES} series in one request")
        points: list[Point] = []
        kept = 0
        for labels, samples in series:
            d = tp.decide({**dict(labels), DEVICE_LABEL: cid}, self.rs.rules)
            if d.scope != "upstream":
                kept += len(samples)
                continue
            points.extend(Point(d.labels, int(t), float(v)) for t, v in samples)
        now = time.time()
        if kept:
            self.buffer.count("kept-on-site", kept)
        if points:
            self.buffer.add(points, int(now * 1000))
            self.wake.set()
        return web.Response(status=200)

    async def traces(self, request: web.Request) -> web.Response:
        from agent.adapters.otlp import BadExport, decode

        cid = request.match_info["cid"]
        self._check(request, cid)
        try:
            # aiohttp already inflates a "Content-Encoding: gzip" body (within client_max_size)
            body = await read_body(request)
            req = decode(body, gzipped=body[:2] == b"\x1f\x8b")
        except (BadExport, EdgeopsError) as exc:
            raise BadRequest(f"not an OTLP trace export: {exc}") from None
        spans, kept = [], 0
        for rs in req.resource_spans:
            res = {a.key: a.value.string_value for a in rs.resource.attributes}
            if res.get("edgeops.scope", "upstream") != "upstream":
                kept += sum(len(ss.spans) for ss in rs.scope_spans)
                continue
            for ss in rs.scope_spans:
                for s in ss.spans:
                    if len(s.trace_id) != 16 or len(s.span_id) != 8:
                        raise BadRequest("a span without a 16-byte trace id and an 8-byte span id")
                    attrs = {a.key: a.value.string_value for a in s.attributes}
                    attrs[DEVICE_LABEL] = cid
                    spans.append(tp.Span(s.trace_id.hex(), s.span_id.hex(),
                                         s.parent_span_id.hex() or None, s.name[:200],
                                         s.start_time_unix_nano, s.end_time_unix_nano, attrs,
                                         s.status.code != 2))
        if kept:
            self.buffer.count("spans-kept-on-site", kept)
        if spans:
            self.buffer.add_spans(spans)
            self.wake.set()
        return web.Response(status=200)

    async def status(self, request: web.Request) -> web.Response:
        st = self.buffer.status()
        return web.json_response({"samples": st.samples, "max_samples": st.max_samples,
                                  "spans_pending": st.spans_pending, "last_send": st.last_send,
                                  "dropped": st.dropped})

    # --- upstream ---------------------------------------------------------------------------------
    def _ship(self) -> Any:
        """One forwarding pass, in the relay's own thread (its own SQLite connection)."""
        if self._shipper is None:
            from agent.adapters.otlp import OtlpTraces
            from agent.adapters.remote_write import RemoteWrite
            from agent.adapters.telemetry_ship import Shipper

            token = None
            if self.rs.credentials_file:
                token = (self.fleet.data_dir / self.rs.credentials_file).read_text().strip() or None
            rw, ot = self.rs.remote_write_url, self.rs.otlp_url
            self._shipper = Shipper(TelemetryBuffer(self.path, self.budget),
                                    RemoteWrite(rw, token=token) if rw else None,
                                    OtlpTraces(ot, token=token) if ot else None,
                                    {"service.name": "edgeops-relay"},
                                    bytes_per_second=self.rs.bytes_per_second)
        return self._shipper.flush()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                report = await loop.run_in_executor(self.pool, self._ship)
                wait = self.rs.interval if report.retry_in is None else min(report.retry_in,
                                                                            self.rs.interval)
            except Exception:
                log.exception("telemetry relay pass failed")
                wait = self.rs.interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(wait, 0.05))
            self.wake.clear()

    async def _lifecycle(self, app: web.Application) -> Any:
        task = asyncio.create_task(self._loop())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        def close() -> None:
            if self._shipper is not None:
                self._shipper.buffer.close()

        await asyncio.get_running_loop().run_in_executor(self.pool, close)
        self.pool.shutdown()
        self.buffer.close()


def relay_path(data_dir: Path) -> Path:
    return data_dir / CONFIG
