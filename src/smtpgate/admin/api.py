"""The admin JSON API under ``/api/`` (docs/operations.md, "Admin API").

Entry points: :func:`add_routes` (wired in by :func:`smtpgate.admin.server.make_app`) and
the snapshot helpers the web page renders from, with the same shapes as the JSON:
:func:`info_snapshot`, :func:`sessions_snapshot`, :func:`queue_snapshot`,
:func:`plugins_snapshot`, :func:`relay_snapshot`.

Routes (all JSON; errors are ``{"error": "..."}`` with a 4xx/5xx status):

* ``GET /api/info``: version, uptime, listeners, configuration file.
* ``GET /api/sessions``; ``DELETE /api/sessions/{id}``: end a session with
  ``421 4.3.2`` (RFC 5321 §3.8; nssmtpd ``ns_smtpd sessions``).
* ``GET /api/queue``, ``GET /api/queue/{id}``, ``POST /api/queue/{id}/hold|release|
  flush|bounce``, ``DELETE /api/queue/{id}``, ``POST /api/queue/flush``: the spool, changed
  exactly as ``smtpgate queue ...`` changes it (under the spool lock, then a rescan
  request through the spool's flush file, which the delivery process watches).
* ``GET /api/relay``; ``POST /api/relay/domains`` ``{"domain"}``, ``DELETE
  /api/relay/domains/{domain}``; ``POST /api/relay/networks`` ``{"network"}``, ``DELETE
  /api/relay/networks/{network}``: nssmtpd ``ns_smtpd relay|local add|del|get``.
* ``GET /api/plugins``: the plugin chain, stage by stage in run order.
* ``POST /api/reload``: :meth:`smtpgate.app.Smtpgate.reload_file`.
* ``GET /api/openapi.json``: :func:`smtpgate.admin.openapi.document`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from email.parser import BytesHeaderParser
from typing import TYPE_CHECKING, Any, TypeAlias

from aiohttp import web

from .. import __version__
from ..errors import ConfigError, QueueError
from ..hooks import Stage
from ..queue.actions import QUEUE_ACTIONS, envelope_change
from ..queue.delivery import QueueDelivery
from ..queue.manager import request_flush
from ..queue.store import QueueEntry, QueueStore
from .server import GATE

if TYPE_CHECKING:
    from ..app import Smtpgate
    from ..server.session import Session

log = logging.getLogger("smtpgate.admin")

JSONValue: TypeAlias = (
    "None | bool | int | float | str | list[JSONValue] | dict[str, JSONValue]"
)
"""A value :func:`json.dumps` accepts."""

#: Queue actions of ``POST /api/queue/{id}/{action}`` (as ``smtpgate queue ACTION ID``).
#: Spool state -> the API's state (``incoming``: committed, waiting for its first attempt).
_STATES = {"incoming": "active", "deferred": "deferred", "hold": "hold"}


class ApiError(Exception):
    """A request the API refuses: answered ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> web.Response:
    """``{"error": message}`` with HTTP ``status``."""
    return web.json_response({"error": message}, status=status)


# ------------------------------------------------------------------ snapshots


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def info_snapshot(gate: Smtpgate) -> dict[str, JSONValue]:
    """Server facts for ``GET /api/info``.

    Returns:
        ``{"version", "uptime" (seconds since start, float), "started" (epoch seconds),
        "config_file" (path or null), "delivery_mode", "listeners": [{"address",
        "protocol" ("smtp"|"lmtp"), "tls" ("none"|"starttls"|"implicit")}],
        "admin": "host:port"}``.
    """
    listeners: list[JSONValue] = []
    server = gate.server
    if server is not None:
        bound = server.bound_addresses
        specs = server.listeners
        for i, (host, port, ctx) in enumerate(specs):
            if len(bound) == len(specs):
                host, port = bound[i]
            tls = ("implicit" if ctx.implicit_tls
                   else "starttls" if ctx.protocol.tls_available else "none")
            listeners.append({"address": _hostport(host, port),
                              "protocol": "lmtp" if ctx.protocol.lmtp else "smtp",
                              "tls": tls})
    admin = gate.admin.address if gate.admin is not None else ("", 0)
    started = gate.started
    return {
        "version": __version__,
        "uptime": round(time.time() - started, 3) if started else 0.0,
        "started": started,
        "config_file": gate.config_file,
        "delivery_mode": gate.delivery_mode,
        "listeners": listeners,
        "admin": _hostport(*admin) if admin[0] else "",
    }


def _live_sessions(gate: Smtpgate) -> list[Session]:
    server = gate.server
    if server is None:
        return []
    return sorted((s for s in server.sessions if s.info is not None
                   and s.task is not None and not s.task.done()),
                  key=lambda s: s.info.start_time if s.info else 0.0)


def sessions_snapshot(gate: Smtpgate) -> list[dict[str, JSONValue]]:
    """The live SMTP sessions, oldest first, for ``GET /api/sessions``.

    Returns:
        One ``{"id", "client", "client_port", "helo" (or null), "tls" (protocol version
        or null), "auth_user" (or null), "state" (the protocol state: "init", "ready",
        "mail", "rcpt", "data", ...), "bytes_in", "bytes_out" (bytes, after TLS),
        "age" (seconds), "listener" ("host:port" the client connected to)}`` per session.
    """
    now = time.time()
    out: list[dict[str, JSONValue]] = []
    for s in _live_sessions(gate):
        info = s.info
        assert info is not None
        out.append({
            "id": info.session_id,
            "client": info.peer_ip,
            "client_port": info.peer_port,
            "helo": info.helo_name,
            "tls": info.tls_version,
            "auth_user": info.auth_user,
            "state": s.conn.state.value.lower(),
            "bytes_in": s.bytes_in,
            "bytes_out": s.bytes_out,
            "age": round(now - info.start_time, 3),
            "listener": _hostport(info.local_ip, info.local_port),
        })
    return out


async def live_sessions(gate: Smtpgate) -> list[dict[str, JSONValue]]:
    """The live SMTP sessions: this process's (:func:`sessions_snapshot`), or with
    ``server.workers > 1`` every worker's, asked through the supervisor's pipes (each
    item then has ``"worker"``, the worker's number)."""
    if gate.workers is not None:
        found: list[dict[str, JSONValue]] = await gate.workers.sessions()
        return found
    return sessions_snapshot(gate)


def queue_store(gate: Smtpgate) -> QueueStore | None:
    """The spool of a server in queue mode, else ``None``."""
    delivery = gate.delivery
    return delivery.store if isinstance(delivery, QueueDelivery) else None


def entry_view(entry: QueueEntry) -> dict[str, JSONValue]:
    """One queued message as the API shows it.

    Returns:
        ``{"id", "sender" (reverse-path, "" for the null sender), "recipients" (the
        addresses still pending), "size" (bytes), "arrival" (epoch seconds), "state"
        ("active"|"deferred"|"hold"), "next_attempt" (epoch seconds), "attempts",
        "last_reply"}``.
    """
    recipients: list[JSONValue] = [r.address for r in entry.pending]
    return {
        "id": entry.id,
        "sender": entry.mail_from,
        "recipients": recipients,
        "size": entry.size,
        "arrival": entry.created,
        "state": _STATES.get(entry.state, entry.state),
        "next_attempt": entry.next_attempt,
        "attempts": entry.attempts,
        "last_reply": entry.last_reply,
    }


def queue_snapshot(gate: Smtpgate) -> dict[str, JSONValue]:
    """The queue for ``GET /api/queue``, oldest first (reads the spool: blocking file I/O,
    run it in a thread from the event loop).

    Returns:
        ``{"messages": [entry_view, ...], "total": n}``; empty when the server is not
        in queue mode. An unreadable envelope is skipped with a warning, never moved.
    """
    store = queue_store(gate)
    if store is None:
        return {"messages": [], "total": 0}
    entries = sorted(store.entries(repair=False), key=lambda e: e.created)
    messages: list[JSONValue] = [entry_view(e) for e in entries]
    return {"messages": messages, "total": len(entries)}


def queue_message(gate: Smtpgate, qid: str) -> dict[str, JSONValue]:
    """One queued message in detail for ``GET /api/queue/{id}`` (blocking file I/O).

    Returns:
        :func:`entry_view` plus ``"mail_params"``, ``"bounce"`` (a bounce was
        requested), ``"client"`` (ip, helo, auth user, session id), ``"recipients_detail"``
        (every recipient with its state, attempts, last reply and remote MTA) and
        ``"headers"`` (``[name, value]`` pairs of the message's header).

    Raises:
        ApiError: 409 not in queue mode, 404 no such message, 500 unreadable message.
    """
    store = _require_store(gate)
    try:
        entry = store.find(qid)
        message = store.read_message(entry.id, entry)
    except KeyError:
        raise ApiError(404, f"no such message: {qid}") from None
    except QueueError as exc:
        raise ApiError(500, f"message {qid}: {exc}") from None
    view = entry_view(entry)
    mail_params: dict[str, JSONValue] = dict(entry.mail_params)
    client: dict[str, JSONValue] = dict(entry.client)
    detail: list[JSONValue] = [
        {"address": r.address, "state": r.state, "attempts": r.attempts,
         "last_reply": r.last_reply, "remote_mta": r.remote_mta}
        for r in entry.recipients
    ]
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 4]
    parsed = BytesHeaderParser().parsebytes(head)
    headers: list[JSONValue] = [[name, str(value)] for name, value in parsed.items()]
    view.update({"mail_params": mail_params, "bounce": entry.bounce, "client": client,
                 "recipients_detail": detail, "headers": headers})
    return view


def _require_store(gate: Smtpgate) -> QueueStore:
    store = queue_store(gate)
    if store is None:
        raise ApiError(409, f"no queue: the delivery mode is {gate.delivery_mode!r}, "
                            "not 'queue'")
    return store


def queue_action(gate: Smtpgate, qid: str, what: str) -> dict[str, JSONValue]:
    """Apply ``hold``/``release``/``flush``/``bounce``/``delete`` to one message, as
    ``smtpgate queue WHAT ID`` does: under the spool lock, then the delivery (in this
    process or the delivery process) is asked to rescan the spool (blocking file I/O).

    Returns:
        ``{"deleted": id}`` for ``delete``; else ``{"id", "action", "message":
        entry_view}`` (the message as saved).

    Raises:
        ApiError: 409 not in queue mode, 404 no such message, 400 unknown action,
            500 the spool cannot be written.
    """
    store = _require_store(gate)
    if what not in (*QUEUE_ACTIONS, "delete"):
        raise ApiError(400, f"unknown queue action {what!r} (one of "
                            f"{', '.join((*QUEUE_ACTIONS, 'delete'))})")
    try:
        if what == "delete":
            with store.locked():
                store.remove(store.find(qid))
            result: dict[str, JSONValue] = {"deleted": qid}
        else:
            entry = store.update(qid, envelope_change(what))
            result = {"id": qid, "action": what, "message": entry_view(entry)}
    except KeyError:
        raise ApiError(404, f"no such message: {qid}") from None
    except QueueError as exc:
        raise ApiError(500, f"message {qid}: {exc}") from None
    log.info("admin: queue %s %s", what, qid)
    _request_rescan(store)
    return result


def queue_flush_all(gate: Smtpgate) -> dict[str, JSONValue]:
    """``smtpgate queue flush`` without an ID: every deferred or waiting message is due
    now (messages on hold stay held). Blocking file I/O.

    Returns:
        ``{"flushed": [ids], "total": n}``.

    Raises:
        ApiError: 409 not in queue mode, 500 the spool cannot be written.
    """
    store = _require_store(gate)
    flushed: list[JSONValue] = []
    for e in list(store.entries(("deferred", "incoming"), repair=False)):
        try:
            store.update(e.id, envelope_change("flush"))
        except KeyError:
            continue  # delivered or deleted meanwhile
        except QueueError as exc:
            raise ApiError(500, f"message {e.id}: {exc}") from None
        flushed.append(e.id)
    log.info("admin: queue flush (%d message(s))", len(flushed))
    _request_rescan(store)
    return {"flushed": flushed, "total": len(flushed)}


def _request_rescan(store: QueueStore) -> None:
    try:
        request_flush(store.path)
    except OSError as exc:  # the change is saved; the next periodic rescan finds it
        log.warning("admin: cannot request a queue rescan: %s", exc)


def plugins_snapshot(gate: Smtpgate) -> list[dict[str, JSONValue]]:
    """The plugin chain for ``GET /api/plugins``: stage by stage in the order a session
    meets them, each stage's hooks in run order.

    Returns:
        One ``{"stage", "position" (1-based within the stage), "name" (the plugin, or
        the hook's name for a hook registered in code), "plugin" ("" for code), "hook"
        (module:function), "priority" (-100..100, lower runs first), "timeout" (seconds),
        "on_error" ("tempfail"|"accept"), "blocking"}`` per hook.
    """
    hooks = gate.hooks
    out: list[dict[str, JSONValue]] = []
    for stage in Stage:
        for pos, h in enumerate(hooks.hooks(stage), 1):
            out.append({
                "stage": stage.value,
                "position": pos,
                "name": h.plugin or h.name,
                "plugin": h.plugin,
                "hook": h.name,
                "priority": h.priority,
                "timeout": hooks.timeout if h.timeout is None else h.timeout,
                "on_error": h.on_error,
                "blocking": h.blocking,
            })
    return out


def relay_snapshot(gate: Smtpgate) -> dict[str, JSONValue]:
    """``{"relay_domains": [...], "local_networks": [...]}`` in force (normalised:
    A-label domains, CIDR networks); empty lists when relay control is off."""
    relay = gate.relay
    domains: list[JSONValue] = list(relay.relay_get()) if relay else []
    networks: list[JSONValue] = list(relay.local_get()) if relay else []
    return {"relay_domains": domains, "local_networks": networks}


# --------------------------------------------------------------------- routes


def _gate(request: web.Request) -> Smtpgate:
    return request.app[GATE]


async def _json_body(request: web.Request, key: str) -> str:
    """The string ``key`` of a JSON object body.

    Raises:
        ApiError: 400 when the body is not a JSON object with ``key`` as a string.
    """
    try:
        body: Any = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, f'the body must be a JSON object like {{"{key}": "..."}}') from None
    if not isinstance(body, dict) or not isinstance(body.get(key), str):
        raise ApiError(400, f'the body must be a JSON object like {{"{key}": "..."}}')
    return str(body[key])


def _api(handler: Any) -> Any:
    """Turn :class:`ApiError` raised by ``handler`` into its JSON error response."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        return response

    wrapped.__name__ = getattr(handler, "__name__", "handler")
    wrapped.__doc__ = handler.__doc__
    return wrapped


async def get_info(request: web.Request) -> web.Response:
    """``GET /api/info``: :func:`info_snapshot`."""
    return web.json_response(info_snapshot(_gate(request)))


async def get_sessions(request: web.Request) -> web.Response:
    """``GET /api/sessions``: :func:`live_sessions`."""
    return web.json_response(await live_sessions(_gate(request)))


async def delete_session(request: web.Request) -> web.Response:
    """``DELETE /api/sessions/{id}``: send ``421 4.3.2`` and close; 404 when no live
    session has that id. Answers once the session has ended (at most 5 s)."""
    sid = request.match_info["id"]
    gate = _gate(request)
    if gate.workers is not None:
        if await gate.workers.kill(sid):
            log.info("admin: session %s killed", sid)
            return web.json_response({"killed": sid})
        raise ApiError(404, f"no such session: {sid}")
    for s in _live_sessions(gate):
        if s.info is not None and s.info.session_id == sid:
            task = s.task
            if not s.kill():
                break
            log.info("admin: session %s (client %s) killed", sid, s.info.peer_ip)
            if task is not None:
                await asyncio.wait({task}, timeout=5.0)
            return web.json_response({"killed": sid})
    raise ApiError(404, f"no such session: {sid}")


async def get_queue(request: web.Request) -> web.Response:
    """``GET /api/queue``: :func:`queue_snapshot`."""
    return web.json_response(await asyncio.to_thread(queue_snapshot, _gate(request)))


async def get_queue_message(request: web.Request) -> web.Response:
    """``GET /api/queue/{id}``: :func:`queue_message`."""
    gate, qid = _gate(request), request.match_info["id"]
    return web.json_response(await asyncio.to_thread(queue_message, gate, qid))


def _post_queue_action(what: str) -> Any:
    async def post_queue_action(request: web.Request) -> web.Response:
        """``POST /api/queue/{id}/hold|release|flush|bounce``: :func:`queue_action`."""
        gate, qid = _gate(request), request.match_info["id"]
        return web.json_response(await asyncio.to_thread(queue_action, gate, qid, what))

    return post_queue_action


async def delete_queue_message(request: web.Request) -> web.Response:
    """``DELETE /api/queue/{id}``: :func:`queue_action` ``delete`` (no bounce)."""
    gate, qid = _gate(request), request.match_info["id"]
    return web.json_response(await asyncio.to_thread(queue_action, gate, qid, "delete"))


async def post_queue_flush(request: web.Request) -> web.Response:
    """``POST /api/queue/flush``: :func:`queue_flush_all`."""
    return web.json_response(await asyncio.to_thread(queue_flush_all, _gate(request)))


def _relay(gate: Smtpgate) -> Any:
    if gate.relay is None:
        raise ApiError(409, "relay control is off (the relay plugin is disabled)")
    return gate.relay


async def get_relay(request: web.Request) -> web.Response:
    """``GET /api/relay``: :func:`relay_snapshot`."""
    return web.json_response(relay_snapshot(_gate(request)))


async def post_relay_domain(request: web.Request) -> web.Response:
    """``POST /api/relay/domains`` ``{"domain": "example.com"}`` (or ``".example.com"``
    for its subdomains): nssmtpd ``relay add``. 422 for an invalid domain. Until the
    next reload, which sets the lists from the configuration again."""
    gate = _gate(request)
    domain = await _json_body(request, "domain")
    try:
        _relay(gate).relay_add(domain)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    return _relay_changed(gate, "relay_add", domain, "relay domain %s added")


async def delete_relay_domain(request: web.Request) -> web.Response:
    """``DELETE /api/relay/domains/{domain}``: nssmtpd ``relay del``; 404 if absent."""
    gate = _gate(request)
    domain = request.match_info["domain"]
    if not _relay(gate).relay_delete(domain):
        raise ApiError(404, f"not a relay domain: {domain}")
    return _relay_changed(gate, "relay_delete", domain, "relay domain %s removed")


async def post_relay_network(request: web.Request) -> web.Response:
    """``POST /api/relay/networks`` ``{"network": "192.0.2.0/24"}``: nssmtpd ``local
    add`` (clients there may relay anywhere). 422 for an invalid network."""
    gate = _gate(request)
    network = await _json_body(request, "network")
    try:
        _relay(gate).local_add(network)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    return _relay_changed(gate, "local_add", network, "local network %s added")


async def delete_relay_network(request: web.Request) -> web.Response:
    """``DELETE /api/relay/networks/{network}`` (the slash URL-encoded as ``%2F``, or
    not): nssmtpd ``local del``; 404 if absent."""
    gate = _gate(request)
    network = request.match_info["network"]
    if not _relay(gate).local_delete(network):
        raise ApiError(404, f"not a local network: {network}")
    return _relay_changed(gate, "local_delete", network, "local network %s removed")


def _relay_changed(gate: Smtpgate, operation: str, value: str, what: str) -> web.Response:
    """The relay lists were changed here by ``operation`` (a
    :class:`~smtpgate.policy.relay.RelayPolicy` method name) with ``value``: make the
    same change in every worker, log ``what % value``, answer with the lists."""
    if gate.workers is not None:
        gate.workers.relay_change(operation, value)
    log.info("admin: " + what, value)
    return web.json_response(relay_snapshot(gate))


async def get_plugins(request: web.Request) -> web.Response:
    """``GET /api/plugins``: :func:`plugins_snapshot`."""
    return web.json_response(plugins_snapshot(_gate(request)))


async def post_reload(request: web.Request) -> web.Response:
    """``POST /api/reload``: re-read, validate and apply the configuration file.

    200 ``{"reloaded": true, "restart_needed": [...]}``; 422 ``{"reloaded": false,
    "error"}`` for an invalid configuration, 409 when the server was not started from a
    file; the running configuration is kept then (and the error logged).
    """
    gate = _gate(request)
    if gate.config_file is None and gate.config_loader is None:
        return web.json_response(
            {"reloaded": False,
             "error": f"no configuration file to reload (started from {gate.config.source})"},
            status=409)
    try:
        restart = await gate.reload_file()
    except (ConfigError, OSError, ValueError) as exc:
        return web.json_response({"reloaded": False, "error": str(exc)}, status=422)
    if gate.workers is not None:
        gate.workers.reload(gate.config)  # each worker re-reads the file, as on SIGHUP
    needed: list[JSONValue] = list(restart)
    return web.json_response({"reloaded": True, "restart_needed": needed})


async def get_openapi(request: web.Request) -> web.Response:
    """``GET /api/openapi.json``: the OpenAPI 3.1 description of every route served."""
    from .openapi import document

    return web.json_response(document(request.app))


def add_routes(app: web.Application) -> None:
    """Add the ``/api/`` routes above to the admin application ``app``."""
    r = app.router
    r.add_get("/api/info", _api(get_info))
    r.add_get("/api/sessions", _api(get_sessions))
    r.add_delete("/api/sessions/{id}", _api(delete_session))
    r.add_get("/api/queue", _api(get_queue))
    r.add_post("/api/queue/flush", _api(post_queue_flush))
    r.add_get("/api/queue/{id}", _api(get_queue_message))
    r.add_delete("/api/queue/{id}", _api(delete_queue_message))
    for what in QUEUE_ACTIONS:
        r.add_post(f"/api/queue/{{id}}/{what}", _api(_post_queue_action(what)))
    r.add_get("/api/relay", _api(get_relay))
    r.add_post("/api/relay/domains", _api(post_relay_domain))
    r.add_delete("/api/relay/domains/{domain}", _api(delete_relay_domain))
    r.add_post("/api/relay/networks", _api(post_relay_network))
    r.add_delete("/api/relay/networks/{network:.+}", _api(delete_relay_network))
    r.add_get("/api/plugins", _api(get_plugins))
    r.add_post("/api/reload", _api(post_reload))
    r.add_get("/api/openapi.json", _api(get_openapi))
