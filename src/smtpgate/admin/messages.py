"""Admin routes: captured and quarantined mail under ``/api/messages`` (docs/operations.md
"Capture mode").

Captured messages live in the capture database (``[delivery] mode = "capture"``,
:class:`~smtpgate.delivery.capture.CaptureDelivery`); quarantined ones in the Maildirs of
``[[scanner]] quarantine_path`` (read-only here). Both are listed together, newest first,
with ``source`` saying which.

Routes (JSON, errors as ``{"error": ...}`` with a 4xx/5xx status):

- ``GET /api/messages?to=&from=&subject=&q=&limit=&offset=&source=``
- ``GET /api/messages/wait?to=&from=&subject=&q=&timeout=&since=`` (long poll; 408 on timeout)
- ``GET /api/messages/{id}``, ``GET /api/messages/{id}/raw`` (``message/rfc822``)
- ``DELETE /api/messages/{id}``, ``DELETE /api/messages``
- ``POST /api/messages/{id}/relay`` (optional ``{"to": [...]}``)
- ``POST /api/messages/{id}/train`` ``{"as": "spam"|"ham"}``

The helpers (:func:`list_messages`, :func:`load_message`, :func:`message_detail`,
:func:`sanitize_html`, :func:`train_message`, :func:`relay_message`) serve the web page too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import sqlite3
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, cast

import nh3
from aiohttp import web

from ..delivery.capture import (
    CaptureDelivery,
    MessageFilter,
    QuarantineFolder,
    StoredMessage,
    parse_message,
    text_parts,
)
from ..delivery.url import redact_relay_url
from ..errors import ConfigError, DeliveryError, ScannerError
from ..reply import Reply
from .server import GATE

if TYPE_CHECKING:
    from ..app import Smtpgate

log = logging.getLogger("smtpgate.admin")

#: Default and largest ``timeout`` of the wait endpoint, seconds.
WAIT_DEFAULT = 30.0
WAIT_MAX = 3600.0
#: Default and largest page size of the list.
LIST_DEFAULT = 50
LIST_MAX = 1000
#: Inline images (``cid:``) larger than this are not embedded in the preview (bytes).
INLINE_IMAGE_MAX = 1 << 20

#: CSS properties kept in ``style`` attributes of the preview (none of them takes a URL).
_STYLE_PROPERTIES = frozenset({
    "color", "background-color", "font", "font-family", "font-size", "font-style",
    "font-weight", "text-align", "text-decoration", "text-transform", "line-height",
    "letter-spacing", "white-space", "vertical-align", "width", "height", "max-width",
    "min-width", "margin", "margin-top", "margin-bottom", "margin-left", "margin-right",
    "padding", "padding-top", "padding-bottom", "padding-left", "padding-right", "border",
    "border-top", "border-bottom", "border-left", "border-right", "border-color",
    "border-style", "border-width", "border-collapse", "border-spacing", "border-radius",
    "display", "direction",
})
#: Attributes kept besides nh3's defaults (presentational, no URLs).
_EXTRA_ATTRIBUTES = {"*": {"style", "align", "valign", "width", "height", "bgcolor", "color",
                           "dir", "lang", "title"},
                     "font": {"color", "face", "size"},
                     "table": {"border", "cellpadding", "cellspacing"}}
_LINK_SCHEMES = ("http://", "https://", "mailto:")


@dataclass(slots=True)
class _Folders:
    """The quarantine folders of the running configuration (rebuilt when it changes)."""

    paths: tuple[str, ...] = ()
    folders: list[QuarantineFolder] = field(default_factory=list)


QUARANTINE: web.AppKey[_Folders] = web.AppKey("quarantine", _Folders)


class NoTrainer(Exception):
    """No configured scanner can be trained (``[[scanner]]`` of type spamassassin/rspamd)."""


class RelayUnavailable(Exception):
    """No upstream to relay to (``[capture] relay_url`` and ``relay.url`` unset or unusable)."""


def capture_delivery(gate: Smtpgate) -> CaptureDelivery | None:
    """The running :class:`CaptureDelivery`, ``None`` when not in capture mode."""
    delivery = gate.delivery
    return delivery if isinstance(delivery, CaptureDelivery) else None


def quarantine_folders(app: web.Application) -> list[QuarantineFolder]:
    """The configured scanners' quarantine Maildirs (``[[scanner]] quarantine_path``), in
    configuration order, duplicates once; follows a reloaded configuration."""
    holder = app[QUARANTINE]
    paths = tuple(dict.fromkeys(s.quarantine_path for s in app[GATE].config.scanners
                                if s.quarantine_path))
    if paths != holder.paths:
        holder.paths = paths
        holder.folders = [QuarantineFolder(p, i) for i, p in enumerate(paths)]
    return holder.folders


async def list_messages(app: web.Application, flt: MessageFilter, *, limit: int = LIST_DEFAULT,
                        offset: int = 0, source: str = "") -> tuple[list[StoredMessage], int]:
    """Captured and quarantined messages matching ``flt``, newest first.

    Args:
        app: the admin application.
        flt: search terms.
        limit: page size; offset: matches skipped first.
        source: ``"capture"`` or ``"quarantine"`` for only one kind, ``""`` for both.

    Returns:
        ``(page, total matches)``.

    Raises:
        sqlite3.Error / OSError: the capture database cannot be read.
    """
    delivery = capture_delivery(app[GATE])
    captured: list[StoredMessage] = []
    total = 0
    if delivery is not None and source in ("", "capture"):
        captured, total = await asyncio.to_thread(delivery.store.search, flt,
                                                  limit=limit + offset, offset=0)
    quarantined: list[StoredMessage] = []
    if source in ("", "quarantine"):
        for folder in quarantine_folders(app):
            quarantined += await asyncio.to_thread(folder.search, flt)
    merged = sorted(captured + quarantined, key=lambda m: m.received, reverse=True)
    return merged[offset:offset + limit], total + len(quarantined)


async def load_message(app: web.Application, msg_id: str) -> tuple[StoredMessage, bytes] | None:
    """One message's summary and bytes by id (captured or quarantined), ``None`` if unknown.

    Raises:
        sqlite3.Error / OSError: the capture database cannot be read.
    """
    if msg_id.startswith("q"):
        for folder in quarantine_folders(app):
            found = await asyncio.to_thread(folder.get, msg_id)
            if found is not None:
                return found
        return None
    delivery = capture_delivery(app[GATE])
    if delivery is None:
        return None
    return await asyncio.to_thread(delivery.store.get, msg_id)


def _inline_images(msg: EmailMessage) -> dict[str, str]:
    """``Content-ID`` (without angle brackets) → ``data:`` URI of the image parts."""
    out: dict[str, str] = {}
    for part in msg.walk():
        cid = str(part.get("Content-ID", "")).strip().strip("<>")
        if not cid or part.get_content_maintype() != "image":
            continue
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes) and len(payload) <= INLINE_IMAGE_MAX:
            out[cid] = (f"data:{part.get_content_type()};base64,"
                        + base64.b64encode(payload).decode("ascii"))
    return out


def sanitize_html(html: str, inline_images: dict[str, str] | None = None) -> tuple[str, int]:
    """Make a message's HTML safe to preview (with nh3, the ammonia sanitiser).

    Scripts, event-handler attributes, ``<style>``, forms, frames and every other element
    or attribute outside a formatting safelist are removed; ``style`` keeps only CSS
    properties that take no URL; links keep only ``http``/``https``/``mailto`` targets;
    an image keeps its ``src`` only when it is a ``data:`` URI or a ``cid:`` reference to
    one of the message's own parts (replaced by its ``data:`` URI): remote images are
    dropped (blocked), so nothing remote is loaded. The page serves the result in a
    sandboxed frame under a strict Content-Security-Policy as well (defence in depth).

    Args:
        html: the decoded ``text/html`` part.
        inline_images: ``Content-ID`` → ``data:`` URI (see the message's image parts).

    Returns:
        ``(sanitised HTML, number of remote images blocked)``.
    """
    images = inline_images or {}
    blocked = 0

    def keep(tag: str, attr: str, value: str) -> str | None:
        nonlocal blocked
        if tag == "img" and attr == "src":
            v = value.strip()
            if v.lower().startswith("cid:"):
                return images.get(v[4:].strip("<>"))
            if v.lower().startswith("data:image/"):
                return v
            blocked += 1
            return None
        if attr == "href":
            return value if value.strip().lower().startswith(_LINK_SCHEMES) else None
        return value

    attributes: dict[str, set[str]] = {k: set(v) for k, v in nh3.ALLOWED_ATTRIBUTES.items()}
    for tag, names in _EXTRA_ATTRIBUTES.items():
        attributes.setdefault(tag, set()).update(names)
    cleaned = nh3.clean(
        html,
        tags=set(nh3.ALLOWED_TAGS) | {"font"},
        clean_content_tags={"script", "style", "title", "head", "noscript", "template"},
        attributes=attributes,
        attribute_filter=keep,
        url_schemes={"http", "https", "mailto", "data", "cid"},
        filter_style_properties=set(_STYLE_PROPERTIES),
        link_rel="noopener noreferrer nofollow",
    )
    return cleaned, blocked


def message_detail(summary: StoredMessage, raw: bytes) -> dict[str, Any]:
    """The JSON object of ``GET /api/messages/{id}``: the summary, plus ``headers``
    (``[[name, decoded value], ...]`` in order), ``text`` (first text/plain part or
    ``null``), ``html`` (first text/html part, sanitised by :func:`sanitize_html`, or
    ``null``), ``remote_images_blocked``, ``attachments``
    (``[{"filename", "content_type", "size"}]``) and ``message_id``."""
    msg = parse_message(raw)
    headers: list[list[str]] = []
    for name, value in msg.items():
        try:
            headers.append([name, str(value)])
        except (ValueError, TypeError, IndexError, AttributeError):
            headers.append([name, ""])
    text, html = text_parts(msg)
    blocked = 0
    safe: str | None = None
    if html is not None:
        safe, blocked = sanitize_html(html, _inline_images(msg))
    attachments = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        disposition = part.get_content_disposition()
        if disposition != "attachment" and not part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        attachments.append({"filename": part.get_filename() or "",
                            "content_type": part.get_content_type(),
                            "size": len(payload) if isinstance(payload, bytes) else 0})
    return {**summary.summary(), "headers": headers, "text": text, "html": safe,
            "remote_images_blocked": blocked, "attachments": attachments,
            "message_id": str(msg.get("Message-ID", "") or "")}


async def train_message(gate: Smtpgate, raw: bytes, spam: bool) -> list[str]:
    """Train the configured spam scanners with one message (``ScannerSet.train_spam``).

    Returns:
        Each trainable scanner's answer, ``"<type>: <answer>"`` (e.g. spamd's
        ``"spamassassin: DidSet: local"``).

    Raises:
        NoTrainer: no configured scanner learns (spamassassin, rspamd).
        ScannerError: a scanner failed or refused.
    """
    scanners = gate.scanners
    if scanners is None or not any(c.config.kind == "spam" and hasattr(c.client, "learn")
                                   for c in scanners.scanners):
        raise NoTrainer("no trainable spam scanner is configured ([[scanner]] of type "
                        "spamassassin or rspamd)")
    return await scanners.train_spam(spam, raw)


def relay_target(gate: Smtpgate) -> str:
    """The relay URL for "relay this message": ``[capture] relay_url``, else ``relay.url``.

    Raises:
        RelayUnavailable: neither is set to an SMTP upstream (``""``, ``mx:``).
    """
    cfg = gate.config
    url = cfg.capture.relay_url or cfg.relay.url
    if not url or url == "mx:":
        raise RelayUnavailable("no upstream to relay to: set [capture] relay_url "
                               "(or relay.url) to an smtp:// URL")
    return url


async def relay_message(gate: Smtpgate, summary: StoredMessage, raw: bytes,
                        recipients: list[str] | None = None) -> Reply:
    """Send a stored message to the relay upstream (:func:`relay_target`) with the
    project's outbound client (:func:`smtpgate.delivery.send_message`; RFC 5321).

    Args:
        recipients: envelope recipients; default the message's own.

    Returns:
        The upstream's 2xx acceptance.

    Raises:
        RelayUnavailable: no upstream configured.
        TemporaryDeliveryError / PermanentDeliveryError: the upstream refused or was
            unreachable.
        ConfigError: the relay URL is invalid.
    """
    from ..delivery.send import send_message

    url = relay_target(gate)
    cfg = gate.config
    return await send_message(summary.sender, recipients or summary.recipients, raw,
                              relay_url=url, timeout=cfg.relay.timeout,
                              helo_name=cfg.server.hostname,
                              cafile=cfg.relay.cafile or None)


# ------------------------------------------------------------------ handlers


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


def _http(cls: type[web.HTTPError], text: str) -> web.HTTPError:
    """An HTTP error exception whose body is ``{"error": text}``."""
    return cls(text=json.dumps({"error": text}), content_type="application/json")


def _filter(request: web.Request) -> MessageFilter:
    q = request.query
    return MessageFilter(to=q.get("to", ""), sender=q.get("from", ""),
                         subject=q.get("subject", ""), text=q.get("q", ""))


def _number(request: web.Request, name: str, default: float, low: float,
            high: float) -> float:
    raw = request.query.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _http(web.HTTPBadRequest, f"{name}: not a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise _http(web.HTTPBadRequest, f"{name}: must be from {low:g} to {high:g}")
    return value


async def _list(request: web.Request) -> web.Response:
    limit = int(_number(request, "limit", LIST_DEFAULT, 0, LIST_MAX))
    offset = int(_number(request, "offset", 0, 0, 1e12))
    source = request.query.get("source", "")
    if source not in ("", "capture", "quarantine"):
        return _error(400, "source: capture or quarantine")
    try:
        page, total = await list_messages(request.app, _filter(request), limit=limit,
                                          offset=offset, source=source)
    except (sqlite3.Error, OSError) as exc:
        return _error(500, f"capture database: {exc}")
    return web.json_response({"messages": [m.summary() for m in page], "total": total})


async def _wait(request: web.Request) -> web.Response:
    delivery = capture_delivery(request.app[GATE])
    if delivery is None:
        return _error(409, 'capture mode is off ([delivery] mode = "capture")')
    timeout = _number(request, "timeout", WAIT_DEFAULT, 0, WAIT_MAX)
    since = request.query.get("since")
    since_value = _number(request, "since", 0, 0, 1e12) if since else None
    try:
        found = await delivery.wait(_filter(request), timeout=timeout, since=since_value)
    except (sqlite3.Error, OSError) as exc:
        return _error(500, f"capture database: {exc}")
    if found is None and delivery.closing:
        return _error(503, "the server is shutting down")
    if found is None:
        return _error(408, f"no matching message within {timeout:g} s")
    return web.json_response(found.summary())


async def _found(request: web.Request) -> tuple[StoredMessage, bytes]:
    try:
        found = await load_message(request.app, request.match_info["id"])
    except (sqlite3.Error, OSError) as exc:
        raise _http(web.HTTPInternalServerError, f"capture database: {exc}") from None
    if found is None:
        raise _http(web.HTTPNotFound, "no such message")
    return found


async def _show(request: web.Request) -> web.Response:
    summary, raw = await _found(request)
    detail = await asyncio.to_thread(message_detail, summary, raw)
    return web.json_response(detail)


async def _raw(request: web.Request) -> web.Response:
    summary, raw = await _found(request)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in summary.id)
    return web.Response(body=raw, headers={
        "Content-Type": "message/rfc822",
        "Content-Disposition": f'attachment; filename="{name}.eml"',
        "X-Content-Type-Options": "nosniff"})


async def _delete(request: web.Request) -> web.Response:
    msg_id = request.match_info["id"]
    if msg_id.startswith("q"):
        return _error(409, "quarantined messages are read-only here")
    delivery = capture_delivery(request.app[GATE])
    if delivery is None:
        return _error(404, "no such message")
    try:
        deleted = await asyncio.to_thread(delivery.store.delete, msg_id)
    except (sqlite3.Error, OSError) as exc:
        return _error(500, f"capture database: {exc}")
    if not deleted:
        return _error(404, "no such message")
    return web.json_response({"deleted": msg_id})


async def _delete_all(request: web.Request) -> web.Response:
    delivery = capture_delivery(request.app[GATE])
    if delivery is None:
        return web.json_response({"deleted": 0})
    try:
        count = await asyncio.to_thread(delivery.store.clear)
    except (sqlite3.Error, OSError) as exc:
        return _error(500, f"capture database: {exc}")
    return web.json_response({"deleted": count})


async def _json_body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise _http(web.HTTPBadRequest, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise _http(web.HTTPBadRequest, "the body must be a JSON object")
    return cast(dict[str, Any], body)


async def _relay(request: web.Request) -> web.Response:
    body = await _json_body(request)
    to = body.get("to")
    if to is not None and (not isinstance(to, list) or not to
                           or not all(isinstance(a, str) and a for a in to)):
        return _error(400, "to: a non-empty list of addresses")
    summary, raw = await _found(request)
    if summary.source != "capture":
        return _error(409, "only captured messages can be relayed")
    try:
        reply = await relay_message(request.app[GATE], summary, raw, to)
    except RelayUnavailable as exc:
        return _error(409, str(exc))
    except ConfigError as exc:
        return _error(409, "; ".join(exc.problems))
    except DeliveryError as exc:
        return web.json_response({"error": str(exc.reply), "reply": str(exc.reply)},
                                 status=502)
    log.info("captured message %s relayed to %s: %s", summary.id,
             redact_relay_url(relay_target(request.app[GATE])), reply)
    return web.json_response({"relayed": summary.id, "reply": str(reply)})


async def _train(request: web.Request) -> web.Response:
    body = await _json_body(request)
    kind = body.get("as")
    if kind not in ("spam", "ham"):
        return _error(400, 'as: "spam" or "ham"')
    summary, raw = await _found(request)
    try:
        answers = await train_message(request.app[GATE], raw, kind == "spam")
    except NoTrainer as exc:
        return _error(409, str(exc))
    except (ScannerError, OSError, TimeoutError) as exc:
        return _error(502, f"training failed: {exc}")
    log.info("message %s trained as %s: %s", summary.id, kind, "; ".join(answers))
    return web.json_response({"trained": summary.id, "as": kind, "answers": answers})


async def _release_waiters(app: web.Application) -> None:
    """On shutdown: end the long polls at once (503) instead of holding the stop up."""
    delivery = capture_delivery(app[GATE])
    if delivery is not None:
        await delivery.release_waiters()


def add_routes(app: web.Application) -> None:
    """Add the ``/api/messages`` routes (see the module docstring) to ``app``."""
    app[QUARANTINE] = _Folders()
    app.on_shutdown.append(_release_waiters)
    r = app.router
    r.add_get("/api/messages", _list)
    r.add_delete("/api/messages", _delete_all)
    r.add_get("/api/messages/wait", _wait)
    r.add_get("/api/messages/{id}", _show)
    r.add_get("/api/messages/{id}/raw", _raw)
    r.add_delete("/api/messages/{id}", _delete)
    r.add_post("/api/messages/{id}/relay", _relay)
    r.add_post("/api/messages/{id}/train", _train)
