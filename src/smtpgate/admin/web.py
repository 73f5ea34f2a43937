"""Admin routes: the web page (docs/operations.md "Web page").

Plain server-rendered HTML (templates in ``admin/templates``, CSS and a little JavaScript
in ``admin/static``; no build step, nothing loaded from another site). Actions (kill a
session, hold/release/flush/delete a queued message, train, relay, delete mail) are
buttons whose JavaScript calls the JSON API (:mod:`.api`, :mod:`.messages`).

Pages: ``/`` dashboard (rates from ``/metrics``, counts, queue by state, sessions),
``/sessions``, ``/queue``, ``/messages`` (captured and quarantined mail, searchable),
``/messages/{id}`` (headers, text part, sanitised HTML preview, raw download, train as
spam/ham), ``/messages/{id}/preview`` (the preview document itself, for a sandboxed
``<iframe>``: served with ``Content-Security-Policy: default-src 'none'; img-src data:
cid:; style-src 'unsafe-inline'``), ``/login`` (sets the ``smtpgate_token`` cookie when
``[admin] token_file`` is set), ``/logout``, ``/static/app.css``, ``/static/app.js``.
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from ..delivery.capture import MessageFilter, StoredMessage
from .messages import (
    capture_delivery,
    list_messages,
    load_message,
    message_detail,
    quarantine_folders,
)
from .server import GATE, TOKEN, TOKEN_COOKIE

log = logging.getLogger("smtpgate.admin")

#: Content-Security-Policy of the pages: only this listener's own script, styles and frames.
PAGE_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; connect-src 'self'; frame-src 'self'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'self'; object-src 'none'")
#: Content-Security-Policy of the HTML preview: no script, no remote anything.
PREVIEW_CSP = ("default-src 'none'; img-src data: cid:; style-src 'unsafe-inline'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'self'; sandbox")
#: Messages per page of the mail list.
PAGE_SIZE = 100

_NAV = (("/", "Dashboard"), ("/sessions", "Sessions"), ("/queue", "Queue"),
        ("/messages", "Mail"))
_STATIC_TYPES = {"app.css": "text/css", "app.js": "text/javascript"}


def _asset(folder: str, name: str) -> str:
    return (resources.files("smtpgate.admin") / folder / name).read_text(encoding="utf-8")


def e(value: object) -> str:
    """HTML-escape ``value`` (quotes too); ``None`` shows as an empty string."""
    return "" if value is None else html.escape(str(value), quote=True)


def when(epoch: float | None) -> str:
    """Epoch seconds as ``YYYY-MM-DD HH:MM:SS`` UTC, ``""`` for none."""
    if not epoch:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


def duration(seconds: float | None) -> str:
    """Seconds as ``1h 02m``, ``3m 04s`` or ``5.0s``."""
    s = float(seconds or 0)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m {sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h {m:02d}m"
    return f"{h // 24}d {h % 24:02d}h"


def size(n: object) -> str:
    """A byte count for people: ``512 B``, ``1.5 kB``, ``2.0 MB``."""
    v = float(n) if isinstance(n, int | float) else 0.0
    for unit in ("B", "kB", "MB"):
        if v < 1000 or unit == "MB":
            return f"{v:.0f} {unit}" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1000
    return f"{v:.1f} GB"


def button(label: str, url: str, *, method: str = "POST", body: Any = None,
           reload: bool = False, show: str = "", confirm: str = "", go: str = "",
           danger: bool = False, ident: str = "") -> str:
    """A button that calls the JSON API from app.js (``data-*`` attributes)."""
    attrs = [f'data-url="{e(url)}"', f'data-method="{e(method)}"']
    if body is not None:
        attrs.append(f'data-body="{e(json.dumps(body))}"')
    if reload:
        attrs.append("data-reload")
    if show:
        attrs.append(f'data-show="{e(show)}"')
    if confirm:
        attrs.append(f'data-confirm="{e(confirm)}"')
    if go:
        attrs.append(f'data-go="{e(go)}"')
    if ident:
        attrs.append(f'id="{e(ident)}"')
    cls = ' class="danger"' if danger else ""
    return f'<button type="button"{cls} {" ".join(attrs)}>{e(label)}</button>'


def table(headers: Iterable[str], rows: Iterable[str], *, ident: str = "",
          empty: str = "nothing") -> str:
    """An HTML table; ``rows`` are complete ``<tr>`` elements."""
    body = "".join(rows)
    heads = "".join(f'<th class="num">{e(h[1:])}</th>' if h.startswith("#") else
                    f"<th>{e(h)}</th>" for h in headers)
    if not body:
        count = heads.count("<th")
        body = f'<tr class="empty"><td colspan="{count}" class="muted">{e(empty)}</td></tr>'
    idattr = f' id="{e(ident)}"' if ident else ""
    return f"<table{idattr}><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table>"


def page(request: web.Request, title: str, body: str, *, status: int = 200) -> web.Response:
    """A complete page in the layout, with the page CSP."""
    current = ' class="current"'
    nav = "".join(
        f'<a href="{href}"{current if _current(request.path, href) else ""}>{label}</a>'
        for href, label in _NAV)
    if request.app[TOKEN]:
        nav += '<a href="/logout">Log out</a>'
    text = Template(_asset("templates", "layout.html")).substitute(
        title=e(title), nav=nav, body=body)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers=_page_headers())


def _current(path: str, href: str) -> bool:
    return path == href if href == "/" else path.startswith(href)


def _page_headers() -> dict[str, str]:
    return {"Content-Security-Policy": PAGE_CSP, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
            "Cache-Control": "no-store"}


# ------------------------------------------------------------------ snapshots


def _snapshots() -> Any:
    """The server-side helpers of :mod:`.api` (built alongside this page)."""
    from . import api

    return api


def metric_totals() -> dict[str, float]:
    """Sample sums from ``/metrics`` by sample name (``smtpgate_transactions_total``, ...)
    and ``name{outcome="x"}`` for the ``outcome`` label; ``{}`` when unreadable."""
    from prometheus_client.parser import text_string_to_metric_families

    from ..metrics import exposition

    totals: dict[str, float] = {}
    try:
        body, _ = exposition()
        for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
            for sample in family.samples:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
                outcome = sample.labels.get("outcome")
                if outcome:
                    key = f'{sample.name}{{outcome="{outcome}"}}'
                    totals[key] = totals.get(key, 0.0) + sample.value
    except (OSError, ValueError) as exc:
        log.warning("admin page: cannot read the metrics: %s", exc)
    return totals


def _session_rows(sessions: list[dict[str, Any]]) -> list[str]:
    rows = []
    for s in sessions:
        sid = str(s.get("id", ""))
        kill = button("Kill", f"/api/sessions/{quote(sid, safe='')}", method="DELETE",
                      reload=True, confirm=f"Close session {sid}?", danger=True)
        rows.append(
            f'<tr data-id="{e(sid)}" data-client-port="{e(s.get("client_port"))}">'
            f"<td>{e(sid)}</td><td>{e(s.get('client'))}</td>"
            f'<td class="num">{e(s.get("client_port"))}</td><td>{e(s.get("helo"))}</td>'
            f"<td>{e(s.get('tls') or '')}</td><td>{e(s.get('auth_user') or '')}</td>"
            f"<td>{e(s.get('state'))}</td>"
            f'<td class="num">{e(size(s.get("bytes_in")))}</td>'
            f'<td class="num">{e(size(s.get("bytes_out")))}</td>'
            f'<td class="num">{e(duration(s.get("age")))}</td><td>{e(s.get("listener"))}</td>'
            f"<td>{kill}</td>"
            "</tr>")
    return rows


_SESSION_HEADERS = ("Session", "Client", "#Port", "HELO", "TLS", "User", "State", "#In",
                    "#Out", "#Age", "Listener", "")


def _queue_rows(messages: list[dict[str, Any]]) -> list[str]:
    rows = []
    for m in messages:
        qid = str(m.get("id", ""))
        url = f"/api/queue/{quote(qid, safe='')}"
        state = str(m.get("state", ""))
        toggle = (button("Release", f"{url}/release", reload=True) if state == "hold"
                  else button("Hold", f"{url}/hold", reload=True))
        recipients = ", ".join(str(r) for r in m.get("recipients") or [])
        rows.append(
            f'<tr data-id="{e(qid)}"><td>{e(qid)}</td><td>{e(m.get("sender") or "<>")}</td>'
            f"<td>{e(recipients)}</td>"
            f'<td class="num">{e(size(m.get("size")))}</td><td>{e(when(m.get("arrival")))}</td>'
            f'<td class="state state-{e(state)}">{e(state)}</td>'
            f'<td class="num">{e(m.get("attempts"))}</td>'
            f"<td>{e(when(m.get('next_attempt')))}</td><td>{e(m.get('last_reply') or '')}</td>"
            f'<td class="actions">{toggle}{button("Flush", f"{url}/flush", reload=True)}'
            f'{button("Bounce", f"{url}/bounce", reload=True, confirm=f"Bounce {qid}?")}'
            f'{button("Delete", url, method="DELETE", reload=True, confirm=f"Delete {qid}?", danger=True)}'  # noqa: E501
            "</td></tr>")
    return rows


_QUEUE_HEADERS = ("Queue id", "Sender", "Recipients", "#Size", "Arrival", "State",
                  "#Attempts", "Next attempt", "Last reply", "")


def _mail_rows(messages: Iterable[StoredMessage]) -> list[str]:
    rows = []
    for m in messages:
        link = f"/messages/{quote(m.id, safe='')}"
        rows.append(
            f'<tr data-id="{e(m.id)}"><td>{e(when(m.received))}</td><td>{e(m.source)}</td>'
            f"<td>{e(m.sender or '<>')}</td><td>{e(', '.join(m.recipients))}</td>"
            f'<td><a href="{e(link)}">{e(m.subject or "(no subject)")}</a></td>'
            f'<td class="num">{e(size(m.size))}</td></tr>')
    return rows


_MAIL_HEADERS = ("Received (UTC)", "Source", "From", "To", "Subject", "#Size")


# ------------------------------------------------------------------ pages


async def dashboard(request: web.Request) -> web.Response:
    """``GET /``: server facts, rates and counts, queue by state, sessions, recent mail."""
    gate = request.app[GATE]
    api = _snapshots()
    info: dict[str, Any] = api.info_snapshot(gate)
    sessions: list[dict[str, Any]] = await api.live_sessions(gate)
    queue: dict[str, Any] = await asyncio.to_thread(api.queue_snapshot, gate)
    totals = await asyncio.to_thread(metric_totals)
    states: dict[str, int] = {}
    for m in queue.get("messages") or []:
        states[str(m.get("state"))] = states.get(str(m.get("state")), 0) + 1
    mail_total = 0
    recent: list[StoredMessage] = []
    try:
        recent, mail_total = await list_messages(request.app, MessageFilter(), limit=10)
    except (sqlite3.Error, OSError) as exc:
        log.warning("admin page: capture database: %s", exc)

    def card(label: str, value: str, ident: str = "", rate: str = "") -> str:
        idattr = f' id="{ident}"' if ident else ""
        rateattr = f' data-rate="{rate}"' if rate else ""
        return (f'<div class="card"><div class="value"{idattr}{rateattr}>{value}</div>'
                f'<div class="label">{e(label)}</div></div>')

    def total(name: str) -> str:
        v = totals.get(name)
        return "–" if v is None else f"{v:.0f}"

    outcomes = sorted(k for k in totals if k.startswith("smtpgate_transactions_total{"))
    outcome_text = ", ".join(f"{k.split(chr(34))[1]} {totals[k]:.0f}" for k in outcomes)
    cards = "".join([
        card("open sessions", e(len(sessions)), "open-sessions"),
        card("sessions / min", "…", rate="smtpgate_sessions_total"),
        card("transactions / min", "…", rate="smtpgate_transactions_total"),
        card("transactions (total)", e(total("smtpgate_transactions_total"))),
        card("queued messages", e(queue.get("total", 0)), "queue-total"),
        card("captured + quarantined", e(mail_total), "mail-count"),
    ])
    listeners = ", ".join(f"{l_['address']} ({l_['protocol']}, TLS {l_['tls']})"
                          for l_ in info.get("listeners") or [])
    facts = (
        f'<p class="muted">smtpgate {e(info.get("version"))} · up {e(duration(info.get("uptime")))}'
        f' · delivery mode <strong id="delivery-mode">{e(info.get("delivery_mode"))}</strong>'
        f" · listeners {e(listeners or 'none')}"
        f" · configuration {e(info.get('config_file') or '(built in)')}</p>")
    queue_states = ", ".join(f"{e(k)} {v}" for k, v in sorted(states.items())) or "empty"
    body = (
        f'<div class="cards">{cards}</div>{facts}'
        f'<p>Transactions by outcome: <span id="outcomes">{e(outcome_text or "none yet")}</span>'
        f' · Queue: <a href="/queue">{queue_states}</a></p>'
        f'<h2>Sessions</h2>{table(_SESSION_HEADERS, _session_rows(sessions), ident="sessions", empty="no open sessions")}'  # noqa: E501
        f'<h2>Recent mail</h2>{table(_MAIL_HEADERS, _mail_rows(recent), ident="mail", empty="no captured or quarantined mail")}')  # noqa: E501
    return page(request, "Dashboard", body)


async def sessions_page(request: web.Request) -> web.Response:
    """``GET /sessions``: the live SMTP sessions, each with a Kill button."""
    sessions = await _snapshots().live_sessions(request.app[GATE])
    body = table(_SESSION_HEADERS, _session_rows(sessions), ident="sessions",
                 empty="no open sessions")
    return page(request, "Sessions", body)


async def queue_page(request: web.Request) -> web.Response:
    """``GET /queue``: queued messages with hold/release/flush/bounce/delete buttons."""
    gate = request.app[GATE]
    queue: dict[str, Any] = await asyncio.to_thread(_snapshots().queue_snapshot, gate)
    note = ("" if gate.delivery_mode == "queue" else
            f'<p class="muted">Delivery mode is {e(gate.delivery_mode)}: there is no queue.</p>')
    body = (f"{note}<div class=\"actions\">"
            f"{button('Flush all', '/api/queue/flush', reload=True)}</div>"
            f"{table(_QUEUE_HEADERS, _queue_rows(list(queue.get('messages') or [])), ident='queue', empty='the queue is empty')}"  # noqa: E501
            f'<p class="muted">{e(queue.get("total", 0))} message(s)</p>')
    return page(request, "Queue", body)


async def messages_page(request: web.Request) -> web.Response:
    """``GET /messages``: captured and quarantined mail, searchable (to, from, subject,
    free text, source), newest first."""
    q = request.query
    flt = MessageFilter(to=q.get("to", ""), sender=q.get("from", ""),
                        subject=q.get("subject", ""), text=q.get("q", ""))
    source = q.get("source", "") if q.get("source", "") in ("capture", "quarantine") else ""
    try:
        offset = max(0, int(q.get("offset", "0") or 0))
    except ValueError:
        offset = 0
    gate = request.app[GATE]
    try:
        found, total = await list_messages(request.app, flt, limit=PAGE_SIZE, offset=offset,
                                           source=source)
    except (sqlite3.Error, OSError) as exc:
        return page(request, "Mail", f'<p class="error">Capture database: {e(exc)}</p>',
                    status=500)

    def field(name: str, label: str) -> str:
        return (f'<label>{e(label)}<input name="{name}" value="{e(q.get(name, ""))}">'
                "</label>")

    options = "".join(f'<option value="{v}"{" selected" if v == source else ""}>{label}</option>'
                      for v, label in (("", "all"), ("capture", "captured"),
                                       ("quarantine", "quarantined")))
    form = (f'<form class="search" method="get" action="/messages">{field("to", "To")}'
            f'{field("from", "From")}{field("subject", "Subject")}{field("q", "Text")}'
            f'<label>Source<select name="source">{options}</select></label>'
            '<button id="search" type="submit">Search</button>'
            '<a class="button" href="/messages">Clear</a></form>')
    mode = []
    if capture_delivery(gate) is None:
        mode.append("Capture mode is off ([delivery] mode = \"capture\" turns it on).")
    if not quarantine_folders(request.app):
        mode.append("No scanner quarantine is configured.")
    notes = f'<p class="muted">{e(" ".join(mode))}</p>' if mode else ""
    actions = ""
    if capture_delivery(gate) is not None:
        actions = ('<div class="actions">' + button(
            "Delete all captured", "/api/messages", method="DELETE", reload=True,
            confirm="Delete every captured message?", danger=True) + "</div>")
    pager = ""
    if total > offset + PAGE_SIZE or offset:
        params = {k: v for k, v in q.items() if k != "offset"}
        if offset:
            prev = urlencode({**params, "offset": max(0, offset - PAGE_SIZE)})
            pager += f'<a class="button" href="/messages?{e(prev)}">Newer</a> '
        if total > offset + PAGE_SIZE:
            nxt = urlencode({**params, "offset": offset + PAGE_SIZE})
            pager += f'<a class="button" href="/messages?{e(nxt)}">Older</a>'
    body = (f"{form}{notes}{actions}"
            f"{table(_MAIL_HEADERS, _mail_rows(found), ident='mail', empty='no messages')}"
            f'<p class="muted"><span id="mail-total">{total}</span> message(s) {pager}</p>')
    return page(request, "Mail", body)


async def message_page(request: web.Request) -> web.Response:
    """``GET /messages/{id}``: one message: summary, headers, text part, sanitised HTML
    preview in a sandboxed frame, attachments, raw download and actions."""
    msg_id = request.match_info["id"]
    try:
        found = await load_message(request.app, msg_id)
    except (sqlite3.Error, OSError) as exc:
        return page(request, "Message", f'<p class="error">Capture database: {e(exc)}</p>',
                    status=500)
    if found is None:
        return page(request, "Message", '<p class="error">No such message.</p>', status=404)
    summary, raw = found
    detail = await asyncio.to_thread(message_detail, summary, raw)
    api_url = f"/api/messages/{quote(summary.id, safe='')}"
    page_url = f"/messages/{quote(summary.id, safe='')}"
    facts = table(("Field", "Value"), [
        f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in (
            ("Received", e(when(summary.received)) + " UTC"),
            ("Source", e(summary.source)),
            ("Envelope sender", e(summary.sender or "<>")),
            ("Envelope recipients", e(", ".join(summary.recipients))),
            ("Subject", f'<span id="subject">{e(summary.subject)}</span>'),
            ("Size", e(size(summary.size))),
        )])
    actions = [f'<a class="button" id="raw" href="{e(api_url)}/raw" download>Download raw</a>',
               button("Train as spam", f"{api_url}/train", body={"as": "spam"},
                      show="#train-result", ident="train-spam"),
               button("Train as ham", f"{api_url}/train", body={"as": "ham"},
                      show="#train-result", ident="train-ham")]
    if summary.source == "capture":
        actions.append(button("Relay", f"{api_url}/relay", show="#train-result",
                              confirm="Send this message to the relay upstream?",
                              ident="relay"))
        actions.append(button("Delete", api_url, method="DELETE", go="/messages",
                              confirm="Delete this message?", danger=True, ident="delete"))
    headers = table(("Header", "Value"), [
        f"<tr><td>{e(name)}</td><td>{e(value)}</td></tr>" for name, value in detail["headers"]],
        ident="headers")
    preview = '<p class="muted">No HTML part.</p>'
    if detail["html"] is not None:
        blocked = int(detail["remote_images_blocked"])
        note = (f'<p class="muted" id="blocked">{blocked} remote image(s) blocked.</p>'
                if blocked else "")
        preview = (f"{note}<iframe class=\"preview\" id=\"preview\" sandbox "
                   f'referrerpolicy="no-referrer" title="HTML preview" '
                   f'src="{e(page_url)}/preview"></iframe>')
    text = (f'<pre class="text" id="text">{e(detail["text"])}</pre>' if detail["text"]
            is not None else '<p class="muted">No text part.</p>')
    attachments = ""
    if detail["attachments"]:
        attachments = "<h2>Attachments</h2>" + table(("File", "Type", "#Size"), [
            f"<tr><td>{e(a['filename'])}</td><td>{e(a['content_type'])}</td>"
            f'<td class="num">{e(size(a["size"]))}</td></tr>' for a in detail["attachments"]])
    body = (f"{facts}<div class=\"actions\">{''.join(actions)}"
            '<span class="result" id="train-result" role="status" hidden></span></div>'
            f"<h2>HTML preview</h2>{preview}<h2>Text</h2>{text}{attachments}"
            f"<h2>Headers</h2><details open><summary>{len(detail['headers'])} header fields"
            f"</summary>{headers}</details>")
    return page(request, summary.subject or "(no subject)", body)


async def preview(request: web.Request) -> web.Response:
    """``GET /messages/{id}/preview``: the sanitised HTML part as a document of its own,
    for the page's ``<iframe sandbox>``; strict CSP (no script, no remote content)."""
    try:
        found = await load_message(request.app, request.match_info["id"])
    except (sqlite3.Error, OSError):
        found = None
    if found is None:
        safe = "<p>No such message.</p>"
    else:
        detail = await asyncio.to_thread(message_detail, *found)
        safe = detail["html"] if detail["html"] is not None else "<p>No HTML part.</p>"
    doc = ('<!doctype html><html><head><meta charset="utf-8"><base target="_blank">'
           "<style>body{font-family:sans-serif;margin:.8em}"
           "img:not([src]){outline:1px dashed #999;min-width:1em;min-height:1em}</style>"
           f"</head><body>{safe}</body></html>")
    return web.Response(text=doc, content_type="text/html", charset="utf-8", headers={
        "Content-Security-Policy": PREVIEW_CSP, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"})


async def static(request: web.Request) -> web.Response:
    """``GET /static/{name}``: the page's CSS and JavaScript (shipped with the package)."""
    name = request.match_info["name"]
    if name not in _STATIC_TYPES:
        raise web.HTTPNotFound()
    return web.Response(text=_asset("static", name), content_type=_STATIC_TYPES[name],
                        charset="utf-8", headers={"X-Content-Type-Options": "nosniff",
                                                  "Cache-Control": "no-cache"})


def _login_form(error: str = "", status: int = 200) -> web.Response:
    text = Template(_asset("templates", "login.html")).substitute(
        css=_asset("static", "app.css"),
        error=f'<p class="notice error" id="login-error">{e(error)}</p>' if error else "")
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers=_page_headers())


async def login_page(request: web.Request) -> web.Response:
    """``GET /login``: the token form (straight to the dashboard when no token is set)."""
    if not request.app[TOKEN]:
        raise web.HTTPSeeOther("/")
    return _login_form()


async def login(request: web.Request) -> web.Response:
    """``POST /login`` (form field ``token``): on a match, set the ``smtpgate_token``
    cookie (HttpOnly, SameSite=Strict) and go to the dashboard; else 401 and the form."""
    token = request.app[TOKEN]
    if not token:
        raise web.HTTPSeeOther("/")
    form: Mapping[str, Any] = await request.post()
    given = str(form.get("token", "")).strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        log.warning("admin login from %s: wrong token", request.remote)
        return _login_form("Wrong token.", status=401)
    response = web.HTTPSeeOther("/")
    response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict", path="/",
                        secure=request.secure)
    raise response


async def logout(request: web.Request) -> web.Response:
    """``GET /logout``: forget the cookie, back to the login form."""
    response = web.HTTPSeeOther("/login")
    response.del_cookie(TOKEN_COOKIE, path="/")
    raise response


def add_routes(app: web.Application) -> None:
    """Add the page routes (see the module docstring) to ``app``."""
    r = app.router
    r.add_get("/", dashboard)
    r.add_get("/sessions", sessions_page)
    r.add_get("/queue", queue_page)
    r.add_get("/messages", messages_page)
    r.add_get("/messages/{id}", message_page)
    r.add_get("/messages/{id}/preview", preview)
    r.add_get("/static/{name}", static)
    r.add_get("/login", login_page)
    r.add_post("/login", login)
    r.add_get("/logout", logout)

