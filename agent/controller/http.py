"""What every controller route shares: settings, app keys, middleware and request helpers.

The DDI routes (``ddi_routes``), the regional mirror (``regional``) and the operator API
(``api_routes``) all build on this module and on nothing of each other, so ``app`` can wire
any of them without an import cycle. Middleware, outermost first (``app.build_app``):

* ``connection_mw`` marks the request's connection busy for ``connections.ConnectionGuard``
  (a busy connection is never the one shed to make room);
* ``errors_mw`` maps every error to one HTTP status and a JSON body ``{error, message, hint}``;
* ``mtls_mw`` checks a client certificate, when one is presented, against the device CA;
* ``auth_mw`` demands the operator's bearer token on ``/api/``.

Devices authenticate with ``Authorization: TargetToken <token>`` (hawkBit's target security
token) or, when the controller runs with a device CA (``Settings.device_ca``), with a client
certificate from that CA naming the controllerId (mutual TLS; the token is then not accepted
on DDI routes, except as the enrolment token of ``identity/renew``). Operators use
``Authorization: Bearer <token>`` on /api/v1. Whichever way a request authenticates, its
connection is then counted among the authenticated ones (``authenticated``), which have
headroom that a flood of anonymous sockets cannot take.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agent.controller import tokens
from agent.controller.connections import ConnectionGuard
from agent.controller.errors import BadRequest, ControllerError, RequestTimeout, Unauthorized
from agent.controller.fleet import FEEDBACK_RETENTION, Fleet
from agent.device.identity import CERT_LIFETIME, CertificateRequired, DeviceCA, IdentityError
from agent.errors import EdgeopsError, TrustError

log = logging.getLogger("edgeops.controller")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
DDI = "/{tenant}/controller/v1/{cid}"  # the root of every hawkBit DDI v1 route


@dataclass
class Settings:
    api_token: str  # the operator's bearer token; "" when only its digest is known
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
    # Slow and idle clients (aiohttp's keep-alive timer also bounds the wait for a request's
    # headers, from the connection's start or the previous response on).
    idle_timeout: float = 15.0  # seconds a connection may sit idle, or take to send its headers
    body_timeout: float = 30.0  # seconds a request body may take (each read, for uploads)
    max_connections: int | None = None  # None: as many as RLIMIT_NOFILE allows (connections)
    api_token_sha256: str = ""  # what auth_mw compares against (tokens.digest of api_token)
    feedback_retention: float = FEEDBACK_RETENTION  # seconds a closed action keeps all its reports

    def __post_init__(self) -> None:
        if self.api_token and not self.api_token_sha256:
            self.api_token_sha256 = tokens.digest(self.api_token)


PEER = web.RequestKey("device", str)  # the device a checked client certificate names
FLEET = web.AppKey("fleet", Fleet)
SETTINGS = web.AppKey("settings", Settings)
SEEN = web.AppKey("seen", dict)  # controllerId -> last poll time, flushed in batches by ``tasks``
WAITERS = web.AppKey("waiters", dict)  # controllerId -> asyncio.Event that wakes a held long-poll
REQUESTS = web.AppKey("requests", collections.Counter)  # DDI requests by kind, for /metrics
GUARD = web.AppKey("guard", ConnectionGuard)  # counts connections; ``serve`` wires it to the socket


def sleep_text(seconds: int) -> str:
    """hawkBit's ``config.polling.sleep``: ``HH:MM:SS``."""
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def base_url(request: web.Request) -> str:
    """This controller as the client reached it: links in DDI documents point back here."""
    return f"{request.scheme}://{request.host}"


def target_token(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme != "TargetToken" or not token:
        raise Unauthorized("missing 'Authorization: TargetToken <token>'")
    return token.strip()


def authenticated(request: web.Request) -> None:
    """This request proved who sent it: its connection joins the authenticated ones."""
    request.app[GUARD].authenticated(request.protocol)


async def read_body(request: web.Request) -> bytes:
    """The whole body (at most ``client_max_size``), within ``Settings.body_timeout``: a client
    that announces more than it sends (a lying Content-Length) gets 408, not a held handler."""
    try:
        async with asyncio.timeout(request.app[SETTINGS].body_timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within "
                             f"{request.app[SETTINGS].body_timeout:g} s") from None


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or ``BadRequest``."""
    raw = await read_body(request)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


# --- middleware -----------------------------------------------------------------------------
@web.middleware
async def connection_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = request.app[GUARD]
    guard.begin(request.protocol)
    try:
        return await handler(request)
    finally:
        guard.end(request.protocol)


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
    resp = web.json_response({"error": type(exc).__name__, "message": str(exc), "hint": exc.hint},
                             status=status)
    if status == RequestTimeout.status:
        resp.force_close()  # the rest of that body is not worth waiting for
    return resp


@web.middleware
async def auth_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        expected = request.app[SETTINGS].api_token_sha256
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not tokens.matches(token.strip(), expected):
            raise Unauthorized("missing or wrong 'Authorization: Bearer <token>'")
        authenticated(request)
    return await handler(request)


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
            authenticated(request)
    return await handler(request)


def _peer_der(request: web.Request) -> bytes | None:
    sslobj = request.transport.get_extra_info("ssl_object") if request.transport else None
    if sslobj is None:
        return None
    der: bytes | None = sslobj.getpeercert(binary_form=True)
    return der
