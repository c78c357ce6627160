"""What every controller route shares: settings, app keys, middleware and request helpers.

The DDI routes (``ddi_routes``), the regional mirror (``regional``) and the operator API
(``api_routes``) all build on this module and on nothing of each other, so ``app`` can wire
any of them without an import cycle. Middleware, outermost first (``app.build_app``):

* ``connection_mw`` marks the request's connection busy for ``connections.ConnectionGuard``
  (a busy connection is never the one shed to make room);
* ``errors_mw`` maps every error to one HTTP status and a JSON body ``{error, message, hint}``;
* ``tenant_mw`` answers 404 for a DDI path whose ``{tenant}`` is not this controller's (the
  comparison ignores case, as hawkBit clients differ: SWUpdate's examples send ``default``);
  links in answers always carry the configured spelling, never the path's;
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
import bisect
import collections
import json
import math
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.controller import tokens
from agent.controller.attestation import Attestations
from agent.controller.ca import DeviceCA
from agent.controller.connections import ConnectionGuard
from agent.controller.dbexec import DEFAULT_LIMIT, DEFAULT_RETRY_AFTER
from agent.controller.errors import (
    BadRequest,
    ControllerError,
    NotFound,
    Overloaded,
    RequestTimeout,
    Unauthorized,
)
from agent.controller.fleet import Fleet
from agent.controller.retention import FEEDBACK_RETENTION
from agent.controller.shaping import PollShaper
from agent.core import logs
from agent.core.config import DEFAULT_PCR
from agent.core.identity import CERT_LIFETIME
from agent.errors import CertificateRequired, EdgeopsError, IdentityError, TrustError

log = logs.get("edgeops.controller")
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
    db_queue: int = DEFAULT_LIMIT  # database calls waiting or running before 429 (dbexec)
    retry_after: int = DEFAULT_RETRY_AFTER  # seconds, the lower end of a 429's Retry-After
    attest_pcr: int = DEFAULT_PCR  # the PCR quotes must cover: the devices' [tpm] pcr

    def __post_init__(self) -> None:
        if self.api_token and not self.api_token_sha256:
            self.api_token_sha256 = tokens.digest(self.api_token)
        if not TENANT_NAME.match(self.tenant):
            raise ValueError(f"tenant {self.tenant[:64]!r}: {TENANT_RULE}")


TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TENANT_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass
class PollTimes:
    """How long this process took to answer base polls (not held long-polls), from the handler's
    start to its answer: a Prometheus histogram's cumulative-to-be buckets, for /metrics."""

    bounds: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                 2.5, 5.0, 10.0)
    counts: list[int] = field(default_factory=lambda: [0] * 14)  # per bucket, the last is +Inf
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


PEER = web.RequestKey("device", str)  # the device a checked client certificate names
FLEET = web.AppKey("fleet", Fleet)
SETTINGS = web.AppKey("settings", Settings)
SEEN = web.AppKey("seen", dict)  # controllerId -> last poll time, flushed in batches by ``tasks``
WAITERS = web.AppKey("waiters", dict)  # controllerId -> asyncio.Event that wakes a held long-poll
REQUESTS = web.AppKey("requests", collections.Counter)  # DDI requests by kind, for /metrics
GUARD = web.AppKey("guard", ConnectionGuard)  # counts connections; ``serve`` wires it to the socket
SHAPER = web.AppKey("shaper", PollShaper)  # config.polling.sleep per device (``shaping``)
POLL_TIMES = web.AppKey("poll_times", PollTimes)  # base-poll answer times, for /metrics
ATTEST = web.AppKey("attest", Attestations)  # nonces and quotes (``attestation``)


def sleep_text(seconds: int) -> str:
    """hawkBit's ``config.polling.sleep``: ``HH:MM:SS``."""
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def base_url(request: web.Request) -> str:
    """This controller as the client reached it: links in DDI documents point back here."""
    return f"{request.scheme}://{request.host}"


def ddi_root(request: web.Request) -> str:
    """The DDI root of the requesting device, for links: the configured tenant (``tenant_mw``
    checked the path's), and the controllerId the request was authenticated for."""
    return (f"{base_url(request)}/{request.app[SETTINGS].tenant}/controller/v1/"
            f"{request.match_info['cid']}")


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
    """The request body as a JSON object, or ``BadRequest``: not JSON, not an object, nested
    deeper than ``MAX_DEPTH``, or holding a number that is not finite (NaN, 1e400)."""
    return parse_json(await read_body(request))


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        # json.loads recurses per nesting level: 100,000 '[' raise RecursionError. ValueError
        # also covers an integer of more digits than int() accepts.
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("request body is not JSON (or nested deeper than "
                         f"{MAX_DEPTH} levels, or with a number out of range)") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if _depth(body) > MAX_DEPTH:
        raise BadRequest(f"request body is nested deeper than {MAX_DEPTH} levels")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def _depth(doc: Any) -> int:
    """Nesting depth, without recursion."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        node, d = todo.pop()
        deepest = max(deepest, d)
        if d > MAX_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        todo.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


# --- typed fields: every malformed input is a 4xx, never a TypeError deeper down ---------------
MAX_DEPTH = 32  # nesting levels of a JSON body
MAX_ID = (1 << 63) - 1  # the largest id either database stores (BIGINT)


def path_id(request: web.Request, key: str, what: str) -> int:
    """A numeric id in the path; anything else names nothing here (404)."""
    raw = request.match_info[key]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise NotFound(f"no {what} {raw[:40]!r} ({what} ids are numbers)")
    return int(raw)


def query_id(request: web.Request, key: str) -> int | None:
    raw = request.query.get(key)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise BadRequest(f"?{key}= must be a number")
    return int(raw)


def body_id(body: dict[str, Any], key: str) -> int:
    """An id in a JSON body: an integer (or a string of digits) from 1 to ``MAX_ID``."""
    v = body.get(key)
    if isinstance(v, str) and v.isascii() and v.isdigit() and len(v) <= 18:
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_ID:
        raise BadRequest(f"'{key}' must be an id (a positive integer)")
    return v


def opt_text(body: dict[str, Any], key: str, *, limit: int = 256) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > limit:
        raise BadRequest(f"'{key}' must be a string of at most {limit} characters")
    return v


def text(body: dict[str, Any], key: str, default: str = "", *, limit: int = 256) -> str:
    v = opt_text(body, key, limit=limit)
    return default if v is None else v


def texts(body: dict[str, Any], key: str, *, limit: int = 10_000) -> list[str]:
    v = body.get(key, [])
    if not isinstance(v, list) or len(v) > limit or not all(isinstance(x, str) for x in v):
        raise BadRequest(f"'{key}' must be a list of strings")
    return v


def opt_number(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise BadRequest(f"'{key}' must be a number")
    return float(v)


def opt_object(body: dict[str, Any], key: str) -> dict[str, Any]:
    v = body.get(key, {})
    if not isinstance(v, dict):
        raise BadRequest(f"'{key}' must be an object")
    return v


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
    if isinstance(exc, Overloaded):
        resp.headers["Retry-After"] = str(exc.retry_after)  # RFC 9110 10.2.3: delay-seconds
    return resp


@web.middleware
async def tenant_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    tenant = request.match_info.get("tenant")
    if tenant is not None and tenant.casefold() != request.app[SETTINGS].tenant.casefold():
        raise NotFound(f"no tenant {tenant[:64]!r} on this controller")
    return await handler(request)


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
