"""Assemble the controller's aiohttp application: middleware, shared state, routes, background work.

A central controller serves DDI from its own fleet (``ddi_routes``); a regional one (with
``Settings.parent``) serves the same paths from a mirror of its parent (``regional``). Both
serve the operator API (``api_routes``). The pieces share only ``http``, never each other.
"""

from __future__ import annotations

import collections

from aiohttp import web

from agent.controller import api_routes, dashboard, dbexec, ddi_routes, tasks, telemetry_relay
from agent.controller.attestation import Attestations, Enrolled
from agent.controller.ca import DeviceCA
from agent.controller.connections import ConnectionGuard, file_limit
from agent.controller.fleet import Fleet
from agent.controller.http import (
    ATTEST,
    FLEET,
    GUARD,
    POLL_TIMES,
    REQUESTS,
    SEEN,
    SETTINGS,
    SHAPER,
    WAITERS,
    PollTimes,
    Settings,
    auth_mw,
    connection_mw,
    errors_mw,
    mtls_mw,
    tenant_mw,
)
from agent.controller.regional import Regional
from agent.controller.shaping import PollShaper
from agent.errors import IdentityError


def build_app(fleet: Fleet, settings: Settings) -> web.Application:
    if settings.device_ca is not None and settings.parent:
        raise ValueError("a regional controller forwards TargetTokens upstream: no --device-ca")
    # errors_mw outside mtls_mw and auth_mw: their refusals get the same JSON error body.
    app = web.Application(middlewares=[connection_mw, errors_mw, tenant_mw, mtls_mw, auth_mw],
                          client_max_size=1 << 20)
    app[GUARD] = ConnectionGuard.for_file_limit(file_limit(), settings.max_connections)
    app[FLEET] = fleet
    app[SETTINGS] = settings
    app[SEEN] = {}
    app[WAITERS] = {}
    app[REQUESTS] = collections.Counter()
    app[POLL_TIMES] = PollTimes()
    app[dbexec.DBEXEC] = dbexec.for_database(fleet.db, limit=settings.db_queue,
                                             retry_after=settings.retry_after)
    app[SHAPER] = PollShaper(settings.poll_sleep)
    app[ATTEST] = Attestations(fleet.db, pcr=settings.attest_pcr, clock=fleet.clock,
                               enrolled=_enrolled_ak(settings.device_ca))
    app.cleanup_ctx.append(dbexec.lifecycle)  # first in, last out: after tasks' final flush
    app.cleanup_ctx.append(tasks.lifecycle)
    app.router.add_get("/_empty", empty)
    if settings.parent:
        Regional(fleet, settings).install(app)
    else:
        ddi_routes.add_routes(app)
    api_routes.add_routes(app)
    dashboard.add_routes(app)
    telemetry_relay.install(app, fleet, settings)  # only with DATA/telemetry-relay.toml
    return app


def _enrolled_ak(ca: DeviceCA | None) -> Enrolled | None:
    """Where a device CA enrols devices, a quote must verify under the AK it enrolled."""
    if ca is None:
        return None

    def enrolled(device_id: str) -> tuple[bytes, str] | None:
        try:
            e = ca.enrolment(device_id)
        except IdentityError:  # not enrolled (yet): its first quote binds the key
            return None
        return e.ak_public_pem.encode(), e.kind
    return enrolled


async def empty(request: web.Request) -> web.Response:
    """The benchmark's baseline: the cheapest response this stack (these middlewares) can give."""
    return web.Response(body=b"")
