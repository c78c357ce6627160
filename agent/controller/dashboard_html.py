"""The dashboard's pages as HTML: records from ``dashboard_views`` in, one escaped string out (pure).

Every value that came from a device, an operator or the database passes through ``e``
(``html.escape`` with quotes) before it reaches the page, attributes included; links are
built with ``urllib.parse.urlencode``/``quote``. Forms work without JavaScript (the script,
``web/dashboard.js``, only refreshes the page and asks before a destructive button), and
every POST form carries the session's CSRF token (``dashboard_auth``). Element ids are
stable: the browser tests and an operator's own scripts find things by them.
"""

from __future__ import annotations

import time
from html import escape
from urllib.parse import quote, urlencode

from agent.controller import dashboard_svg
from agent.controller.dashboard_views import STATES, DevicePage, DeviceRow, FleetPage, RolloutView

STATIC = "/ui/static"
REFRESH = ' data-refresh="5"'  # seconds between the script's refreshes


def e(value: object) -> str:
    return escape(str(value), quote=True)


def iso(t: float | None) -> str:
    return "never" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0, int(now - t))
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s // n} {unit} ago"
    return f"{s} s ago"


def layout(title: str, body: str, csrf: str | None = None, *, refresh: bool = False) -> str:
    nav = ""
    if csrf is not None:
        nav = (f'<nav><a href="/">Fleet</a><form method="post" action="/logout" class="inline">'
               f'<input type="hidden" name="csrf" value="{e(csrf)}"><button id="logout">Log out</button>'
               "</form></nav>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)} · edgeops</title>"
            f'<link rel="stylesheet" href="{STATIC}/dashboard.css">'
            f'<script src="{STATIC}/dashboard.js" defer></script></head>'
            f'<body{REFRESH if refresh else ""}><header><h1>edgeops</h1>{nav}</header>'
            f'<main id="main">{body}</main></body></html>')


def login_page(message: str = "", next_path: str = "/") -> str:
    note = f'<p class="error" id="login-error">{e(message)}</p>' if message else ""
    return layout("Log in", f'<section class="login"><h2>Operator login</h2>{note}'
                  '<form method="post" action="/login">'
                  f'<input type="hidden" name="next" value="{e(next_path)}">'
                  '<label>Operator token <input type="password" name="token" id="token" '
                  'autocomplete="current-password" required autofocus></label>'
                  '<button id="login">Log in</button></form>'
                  '<p class="muted">The token is in &lt;data&gt;/operator.token on the controller host.</p>'
                  "</section>")


def error_page(status: int, message: str, csrf: str | None) -> str:
    return layout(f"Error {status}", f'<section><h2>{status}</h2><p class="error" id="error">{e(message)}</p>'
                  '<p><a href="/">Back to the fleet</a></p></section>', csrf)


def _link(path: str, params: dict[str, str]) -> str:
    return path + ("?" + urlencode(params) if params else "")


def _counts_table(title: str, key: str, rows: list[tuple[str, int]], table_id: str) -> str:
    body = "".join(f'<tr><td><a href="{e(_link("/", {key: v}))}">{e(v or "(unknown)")}</a></td>'
                   f'<td class="num">{n}</td></tr>' for v, n in rows[:20])
    more = f'<tr><td colspan="2" class="muted">… {len(rows) - 20} more</td></tr>' if len(rows) > 20 else ""
    return (f'<div class="card"><h3>{e(title)}</h3><table id="{table_id}"><tbody>{body}{more}</tbody>'
            "</table></div>")


def rollout_section(r: RolloutView, csrf: str) -> str:
    waves = []
    for w in r.waves:
        ok, bad = w.counts.get("success", 0), w.counts.get("failure", 0)
        mark = " current" if w.wave == r.current_wave and r.status in ("running", "paused") else ""
        waves.append(f'<li class="wave{mark}" id="wave-{w.wave}"><span>wave {w.wave}</span>'
                     f'<progress max="{max(w.size, 1)}" value="{w.done}"></progress>'
                     f'<span class="num">{w.done}/{w.size} done · {ok} ok · {bad} failed</span></li>')
    failing = "".join(f'<tr><td><a href="/devices/{e(quote(d, safe=""))}">{e(d)}</a></td><td>{w}</td>'
                      f"<td>{e(reason)}</td></tr>" for d, w, reason in r.failing)
    failing_html = (f'<h4>Failing devices</h4><table id="failing"><thead><tr><th>device</th><th>wave</th>'
                    f"<th>reason</th></tr></thead><tbody>{failing}</tbody></table>" if failing else "")
    plot = dashboard_svg.success_by_wave([(w.wave, w.size, w.counts.get("success", 0),
                                           w.counts.get("failure", 0)) for w in r.waves])
    return (f'<section class="card" id="rollout" data-rollout="{r.id}"><h2>Rollout '
            f'<a href="/rollouts/{r.id}">#{r.id} {e(r.name)}</a>'
            f'{"" if r.name == r.version else f" (version {e(r.version)})"}</h2>'
            f'<p>status <b class="status {e(r.status)}" id="rollout-status">{e(r.status)}</b> '
            f'<span id="rollout-reason" class="muted">{e(r.reason)}</span></p>'
            f'<ol class="waves">{"".join(waves)}</ol>{_verbs(r, csrf)}{failing_html}'
            f"<h4>Success rate by wave</h4>{plot}</section>")


def _verbs(r: RolloutView, csrf: str) -> str:
    hidden = f'<input type="hidden" name="csrf" value="{e(csrf)}">'
    out = []
    if r.status == "running":
        out.append(f'<form method="post" action="/ui/rollouts/{r.id}/pause" class="inline">{hidden}'
                   '<button id="pause">Pause</button></form>')
    if r.status == "paused":
        # The choices (retry the failed devices, skip them, raise the threshold) are ops' resume
        # API (issue 13 item 2); a plain resume works on every controller.
        out.append(f'<form method="post" action="/ui/rollouts/{r.id}/resume" class="inline">{hidden}'
                   '<select name="choice" id="resume-choice"><option value="">resume</option>'
                   '<option value="retry">retry the failed devices</option>'
                   '<option value="skip">skip them and go on</option>'
                   '<option value="raise-threshold">raise the error threshold to</option></select>'
                   '<input name="threshold" id="resume-threshold" size="4" placeholder="0.5">'
                   '<button id="resume">Resume</button></form>')
    if r.status in ("running", "paused"):
        out.append(f'<form method="post" action="/ui/rollouts/{r.id}/halt" class="inline confirm" '
                   f'data-confirm="Halt rollout #{r.id}? Open actions are canceled.">{hidden}'
                   '<button id="halt" class="danger">Halt</button></form>')
    return f'<div class="verbs">{"".join(out)}</div>' if out else ""


def _start_form(page: FleetPage, csrf: str) -> str:
    if not page.bundles:
        return ('<section class="card"><h2>Start a canary rollout</h2><p class="muted">No bundle uploaded '
                "yet (edgeops controller upload BUNDLE).</p></section>")
    bundles = "".join(f'<option value="{i}">#{i} {e(v)}</option>' for i, v in page.bundles)
    groups = "".join(f'<option value="{e(g)}">group {e(g)}</option>' for g in page.groups)
    return (f'<section class="card"><h2>Start a canary rollout</h2>'
            f'<form method="post" action="/ui/rollouts" id="start-form" class="confirm" '
            f'data-confirm="Start this rollout?"><input type="hidden" name="csrf" value="{e(csrf)}">'
            f'<label>bundle <select name="bundle" id="start-bundle">{bundles}</select></label> '
            f'<label>to <select name="group" id="start-group"><option value="">all devices</option>'
            f"{groups}</select></label> "
            '<label>canary % <input name="canary_percent" id="start-canary" value="5" size="4"></label> '
            '<label>pause at failed share <input name="error_threshold" id="start-threshold" value="0.2" '
            'size="4"></label> <button id="start">Start</button></form></section>')


def _device_table(rows: list[DeviceRow], now: float) -> str:
    body = []
    for d in rows:
        state = "online" if d.online else ("never" if d.last_seen is None else "offline")
        action = f'<span class="status {e(d.action)}">{e(d.action)}</span>' if d.action else ""
        body.append(f'<tr><td><a href="/devices/{e(quote(d.id, safe=""))}">{e(d.id)}</a></td>'
                    f"<td>{e(d.site)}</td><td>{e(d.version or '(unknown)')}</td>"
                    f'<td>{e(", ".join(d.tags))}</td><td class="{state}" title="{e(iso(d.last_seen))}">'
                    f"{state if d.last_seen is None else state + ' · ' + e(ago(d.last_seen, now))}</td>"
                    f"<td>{action}</td>"
                    f'<td class="detail">{e(d.detail if d.action == "failure" else "")}</td></tr>')
    return ('<table id="devices"><thead><tr><th>device</th><th>site</th><th>version</th><th>tags</th>'
            "<th>last seen</th><th>last action</th><th>failure reason</th></tr></thead>"
            f'<tbody>{"".join(body)}</tbody></table>')


def _filters(page: FleetPage) -> str:
    f = page.filters
    states = "".join(f'<option value="{s}"{" selected" if s == f.state else ""}>{s}</option>' for s in STATES)
    return ('<form method="get" action="/" id="filters" class="filters">'
            f'<label>tag <input name="tag" value="{e(f.tag)}" size="10"></label> '
            f'<label>site <input name="site" value="{e(f.site)}" size="10"></label> '
            f'<label>version <input name="version" value="{e(f.version)}" size="8"></label> '
            f'<label>state <select name="state"><option value="">any</option>{states}</select></label> '
            '<button id="filter">Filter</button> <a href="/">clear</a></form>')


def _pager(page: FleetPage) -> str:
    f = page.filters
    pages = max(1, -(-page.matched // f.per))
    prev = (f'<a id="prev" href="{e(_link("/", f.query(page=f.page - 1)))}">← previous</a>'
            if f.page > 1 else "")
    nxt = (f'<a id="next" href="{e(_link("/", f.query(page=f.page + 1)))}">next →</a>'
           if f.page < pages else "")
    return (f'<p class="pager">{prev} <span id="page-info">page {f.page} of {pages} · '
            f"{page.matched} matching devices</span> {nxt}</p>")


def fleet(page: FleetPage, csrf: str) -> str:
    s = page.summary
    cards = ('<section class="cards" id="summary">'
             f'<a class="card big" href="/"><b id="total">{s.total}</b> devices</a>'
             f'<a class="card big online" href="/?state=online"><b id="online">{s.online}</b> online</a>'
             f'<a class="card big offline" href="/?state=offline"><b id="offline">{s.offline}</b> offline</a>'
             f'<a class="card big" href="/?state=never"><b id="never">{s.never}</b> never seen</a>'
             f'<a class="card big failing" href="/?state=failing">failing now</a></section>')
    counts = (f'<section class="cards">{_counts_table("By version", "version", s.by_version, "by-version")}'
              f'{_counts_table("By site", "site", s.by_site, "by-site")}'
              f'<div class="card wide"><h3>Versions over time</h3>'
              f"{dashboard_svg.versions_over_time(page.history)}</div></section>")
    rollout = rollout_section(page.rollout, csrf) if page.rollout else ""
    recent = "".join(f'<li><a href="/rollouts/{i}">#{i} {e(n)}</a> <span class="status {e(st)}">{e(st)}'
                     "</span></li>" for i, n, st in page.rollouts)
    recent_html = (f'<section class="card"><h3>Recent rollouts</h3><ul>{recent}</ul></section>'
                   if recent else "")
    table = (f'<section class="card"><h2>Devices</h2>{_filters(page)}{_pager(page)}'
             f"{_device_table(page.devices, page.now)}{_pager(page)}</section>")
    return layout("Fleet", cards + counts + rollout + _start_form(page, csrf) + recent_html + table, csrf,
                  refresh=True)


def rollout_page(r: RolloutView, csrf: str) -> str:
    policy = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in sorted(r.policy.items()))
    events = "".join(f"<tr><td>{e(ev.get('at', ''))}</td><td>{e(ev.get('who', ''))}</td>"
                     f"<td>{e(ev.get('event', ''))}</td><td>{e(ev.get('detail', ''))}</td></tr>"
                     for ev in r.history)
    history = ('<section class="card"><h3>History</h3><table id="rollout-history"><thead><tr><th>at</th>'
               f"<th>who</th><th>event</th><th>detail</th></tr></thead><tbody>{events}</tbody></table>"
               "</section>" if events else "")
    return layout(f"Rollout {r.id}", rollout_section(r, csrf) + history +
                  f'<section class="card"><h3>Policy</h3><table id="policy">{policy}</table></section>',
                  csrf, refresh=True)


def _rollout_link(rid: int | None) -> str:
    return "" if rid is None else f'<a href="/rollouts/{rid}">#{rid}</a>'


def _attestation(p: DevicePage) -> str:
    if p.attestation is None:
        return '<p id="attestation">attestation: none on record</p>'
    result, kind, checked, slot, detail = p.attestation
    what = f"{kind} quote, boot slot {slot}" if slot else f"{kind} quote"
    why = f": {e(detail)}" if result == "refused" and detail else ""
    return (f'<p id="attestation">attestation <span class="status {e(result)}">{e(result)}</span>'
            f" ({e(what)}, {e(ago(checked, p.now))}){why}</p>")


def device(p: DevicePage, csrf: str) -> str:
    d = p.device
    attrs = "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in sorted(p.attributes.items()))
    actions = "".join(
        f'<tr><td>{i}</td><td>{_rollout_link(r)}</td>'
        f'<td>{e(v)}</td><td><span class="status {e(st)}">{e(st)}</span></td><td>{e(iso(u))}</td>'
        f'<td class="detail">{e(det)}</td></tr>' for i, r, v, st, det, u in p.actions)
    state = "online" if d.online else ("never seen" if d.last_seen is None else "offline")
    return layout(f"Device {d.id}", (
        f'<section class="card"><h2 id="device-id">{e(d.id)}</h2>'
        f"<p>site <b>{e(d.site or '(none)')}</b> · version <b>{e(d.version or '(unknown)')}</b> · "
        f'<span class="{state.split()[0]}">{state}</span> (last seen {e(iso(d.last_seen))}, '
        f"{e(ago(d.last_seen, p.now))}) · tags {e(', '.join(d.tags) or '(none)')} · "
        f"groups {e(', '.join(p.groups) or '(none)')}</p>{_attestation(p)}</section>"
        f'<section class="card"><h3>Action history</h3><table id="history"><thead><tr><th>action</th>'
        f"<th>rollout</th><th>version</th><th>status</th><th>updated</th><th>detail</th></tr></thead>"
        f"<tbody>{actions}</tbody></table></section>"
        f'<section class="card"><h3>Attributes</h3><table id="attributes">{attrs}</table></section>'), csrf)
