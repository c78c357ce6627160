"""The operators' web dashboard at ``/``: login, the fleet at a glance, a device, a rollout, and buttons.

Server-rendered HTML (``dashboard_html``, inline SVG plots from ``dashboard_svg``) over
read-only queries (``dashboard_views``); a small script (``web/dashboard.js``) refreshes the
page and asks before destructive buttons. Every asset is served from this package
(``/ui/static/``): no CDN, no build step. Routes:

* ``GET /login``, ``POST /login`` (form field ``token``: the operator token) → a session
  cookie (``dashboard_auth``); ``POST /logout``;
* ``GET /`` (filters ``?tag= &site= &version= &state= &page= &per=``), ``GET /devices/{id}``,
  ``GET /rollouts/{rid}``;
* ``POST /ui/rollouts`` (start a canary rollout: ``bundle``, ``group``, ``canary_percent``,
  ``error_threshold``), ``POST /ui/rollouts/{rid}/{pause|resume|halt}`` (resume: optional
  ``choice`` and ``threshold``).

A request without a valid session is sent to the login page (303); a POST whose CSRF token
is missing or wrong gets 403. Malformed input is a 4xx page naming the parameter, never a
5xx. Each handler makes its database calls in one function run off the event loop
(``_db``: the controller's database thread, ``dbexec``), so polls keep flowing while a page
of 10,000 devices is read.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, quote

from aiohttp import web

from agent.controller import dashboard_auth as auth
from agent.controller import dashboard_html as page
from agent.controller import dashboard_views as views
from agent.controller import dbexec, rollout, tokens
from agent.controller.errors import BadRequest, ControllerError, NotFound
from agent.controller.fleet import Fleet
from agent.controller.http import FLEET, SETTINGS, authenticated, read_body
from agent.core import logs

KEY = web.AppKey("dashboard_key", bytes)  # the session signing key (dashboard_auth.session_key)
SESSION = web.RequestKey("dashboard_session", auth.Session)
FORM = web.RequestKey("dashboard_form", dict)  # a POST's fields, CSRF checked
STATIC = {"dashboard.css": "text/css; charset=utf-8",
          "dashboard.js": "text/javascript; charset=utf-8"}
VERBS = ("pause", "resume", "halt")
RESUME_CHOICES = ("retry", "skip", "raise-threshold")  # ops' resume API (issue 13, item 2)
MAX_FORM_FIELDS = 20
# Pages are markup and our own files only: no inline script, nothing from elsewhere.
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                      "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                                      "frame-ancestors 'none'; base-uri 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
           "X-Frame-Options": "DENY", "Cache-Control": "no-store"}
T = TypeVar("T")
log = logs.get("edgeops.controller")


def add_routes(app: web.Application) -> None:
    """The dashboard's routes, on a central controller. A regional one (``Settings.parent``)
    serves none: its database mirrors the parent's documents, not the fleet, and rollouts are
    started and steered on the parent."""
    if app[SETTINGS].parent:
        return
    app[KEY] = auth.session_key(app[FLEET].data_dir, app[SETTINGS].api_token_sha256)
    r = app.router
    r.add_get("/", guarded(fleet_page))
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", guarded(logout, post=True))
    r.add_get("/devices/{id}", guarded(device_page))
    r.add_get("/rollouts/{rid}", guarded(rollout_page))
    r.add_post("/ui/rollouts", guarded(start_rollout, post=True))
    r.add_post("/ui/rollouts/{rid}/{verb}", guarded(rollout_verb, post=True))
    r.add_get("/ui/static/{name}", static)


async def _db(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """The one place a dashboard handler touches the database: on the controller's database
    thread, as every route does (a full queue is a 429, as for the API)."""
    return await dbexec.call(request.app, fn, *args)


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8",
                        headers=HEADERS)


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **HEADERS})


def _csrf(request: web.Request) -> str | None:
    s = request.get(SESSION)
    return auth.csrf_token(request.app[KEY], s) if s is not None else None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(handler: Handler, *, post: bool = False) -> Handler:
    """A handler behind the session (else 303 to /login) and, for a POST, the CSRF token (else
    403); its ``ControllerError``s become an HTML page with their status."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        key, now = request.app[KEY], request.app[FLEET].clock()
        session = auth.check(key, request.cookies.get(auth.COOKIE), now)
        if session is None:
            here = request.rel_url.path_qs if not post else "/"
            return _redirect("/login?" + "next=" + quote(here, safe=""))
        request[SESSION] = session
        authenticated(request)
        try:
            if post:
                if not _same_origin(request):
                    return _html(page.error_page(403, "this form was sent from another site", _csrf(request)),
                                 403)
                form = await _form(request)
                if not auth.csrf_ok(key, session, form.get("csrf")):
                    return _html(page.error_page(403, "the form's CSRF token is missing or wrong: "
                                                 "reload the page and try again", _csrf(request)), 403)
                request[FORM] = form
            return await handler(request)
        except ControllerError as exc:
            status = exc.status if 400 <= exc.status < 500 else 500
            return _html(page.error_page(status, str(exc), _csrf(request)), status)

    return wrapped


def _same_origin(request: web.Request) -> bool:
    """A browser's ``Origin`` on a POST names this server (OWASP: verify the origin with standard
    headers), on top of the CSRF token; a client that sends none (curl, old browsers) relies on
    the token alone."""
    # Referrer-Policy is same-origin, not no-referrer: under no-referrer a browser sends
    # "Origin: null" with a form POST (Fetch standard, "serialize a request origin").
    origin = request.headers.get("Origin")
    return origin is None or origin == f"{request.scheme}://{request.host}"


async def _form(request: web.Request) -> dict[str, str]:
    """An urlencoded form body (bounded by ``client_max_size`` and ``MAX_FORM_FIELDS``)."""
    if request.content_type not in ("application/x-www-form-urlencoded", ""):
        raise BadRequest("a dashboard form is sent as application/x-www-form-urlencoded")
    raw = await read_body(request)
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS,
                          strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest(f"the form is not UTF-8 urlencoded (or has more than {MAX_FORM_FIELDS} "
                         "fields)") from None
    return dict(pairs)


# --- login ------------------------------------------------------------------------------------
def _next(raw: str | None) -> str:
    """Where to go after login: a path on this server only (no //host, no scheme)."""
    if raw and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw and len(raw) <= 2000 \
            and raw.isprintable():
        return raw
    return "/"


async def login_form(request: web.Request) -> web.Response:
    return _html(page.login_page(next_path=_next(request.query.get("next"))))


async def login(request: web.Request) -> web.Response:
    try:
        form = await _form(request)
    except BadRequest as exc:
        return _html(page.login_page(str(exc)), 400)
    token = form.get("token", "").strip()
    if not tokens.matches(token, request.app[SETTINGS].api_token_sha256):
        log.warning("dashboard: a login from %s with a wrong token", request.remote)
        return _html(page.login_page("That is not the operator token.", _next(form.get("next"))), 401)
    log.info("dashboard: operator logged in from %s", request.remote)
    resp = _redirect(_next(form.get("next")))
    resp.set_cookie(auth.COOKIE, auth.issue(request.app[KEY], request.app[FLEET].clock()),
                    max_age=auth.SESSION_LIFETIME, path="/", httponly=True, samesite="Strict",
                    secure=request.secure)
    return resp


async def logout(request: web.Request) -> web.Response:
    resp = _redirect("/login")
    resp.del_cookie(auth.COOKIE, path="/")
    return resp


# --- pages ------------------------------------------------------------------------------------
async def fleet_page(request: web.Request) -> web.Response:
    filters = views.Filters.parse(request.query)
    data = await _db(request, views.fleet_page, request.app[FLEET], filters)
    return _html(page.fleet(data, _csrf(request) or ""))


async def device_page(request: web.Request) -> web.Response:
    data = await _db(request, views.device_page, request.app[FLEET], request.match_info["id"])
    return _html(page.device(data, _csrf(request) or ""))


def _rid(request: web.Request) -> int:
    raw = request.match_info["rid"]
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise NotFound(f"no rollout {raw[:40]!r} (rollout ids are numbers)")
    return int(raw)


async def rollout_page(request: web.Request) -> web.Response:
    data = await _db(request, views.rollout_view, request.app[FLEET], _rid(request))
    return _html(page.rollout_page(data, _csrf(request) or ""))


# --- actions ----------------------------------------------------------------------------------
def _number(form: dict[str, str], key: str, default: float) -> float:
    raw = form.get(key, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{key} must be a number") from None
    if not math.isfinite(value):
        raise BadRequest(f"{key} must be a finite number")
    return value


async def start_rollout(request: web.Request) -> web.Response:
    form = request[FORM]
    raw = form.get("bundle", "")
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise BadRequest("choose a bundle")
    policy = rollout.Policy(canary_percent=_number(form, "canary_percent", 5.0),
                            error_threshold=_number(form, "error_threshold", 0.2))
    group = form.get("group") or None
    rid = await _db(request, _start, request.app[FLEET], int(raw), group, policy)
    log.info("dashboard: rollout %d of bundle %s to %s started (canary %g %%, pause at %g failed)",
             rid, raw, f"group {group}" if group else "all devices", policy.canary_percent,
             policy.error_threshold)
    return _redirect("/")


WHO = "operator via dashboard"  # who acted, for a rollout's history (where the fleet keeps one)


# --- the Fleet calls of the buttons, in one place ---------------------------------------------
def _start(fleet: Fleet, bundle: int, group: str | None, policy: rollout.Policy) -> int:
    # select_targets leaves out other boards and devices already on the version (issue 13 item 1)
    targets, skipped = fleet.select_targets(bundle, group=group, everyone=group is None)
    return fleet.create_rollout(bundle, targets, policy, who=WHO, skipped=skipped)


async def rollout_verb(request: web.Request) -> web.Response:
    rid, verb, form = _rid(request), request.match_info["verb"], request[FORM]
    if verb not in VERBS:
        raise NotFound(f"no rollout action {verb[:20]!r} (one of {', '.join(VERBS)})")
    choice = form.get("choice", "")
    if choice and (verb != "resume" or choice not in RESUME_CHOICES):
        raise BadRequest(f"choice must be one of {', '.join(RESUME_CHOICES)} (resume only)")
    threshold = _number(form, "threshold", math.nan) if choice == "raise-threshold" else None
    if threshold is not None and not 0 < threshold <= 1:
        raise BadRequest("threshold must be a share of the wave, in (0, 1]")
    await _db(request, _apply, request.app[FLEET], rid, verb, choice, threshold)
    log.info("dashboard: rollout %d %s by the operator%s", rid, {"pause": "paused", "resume": "resumed",
             "halt": "halted"}[verb], f" ({choice})" if choice else "")
    return _redirect("/")


def _apply(fleet: Fleet, rid: int, verb: str, choice: str, threshold: float | None) -> None:
    if verb == "resume":  # with the operator's choice about the failed devices (issue 13 item 2)
        fleet.resume_rollout(rid, cast(rollout.Choice, choice) if choice else None, threshold, who=WHO)
    else:
        fleet.set_rollout_state(rid, verb, who=WHO)


# --- assets -----------------------------------------------------------------------------------
async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise NotFound(f"no asset {name[:64]!r}")
    body = (resources.files("agent.controller") / "web" / name).read_bytes()
    return web.Response(body=body, headers={"Content-Type": STATIC[name], "Cache-Control": "max-age=300",
                                            "X-Content-Type-Options": "nosniff"})
