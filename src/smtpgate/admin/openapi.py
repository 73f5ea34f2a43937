"""The OpenAPI 3.1 description of the admin listener, served at ``GET /api/openapi.json``.

Entry point: :func:`document`. :data:`OPERATIONS` describes every route of the contract in
docs/operations.md (the JSON API of :mod:`.api`, captured mail of :mod:`.messages`,
``/metrics``); :func:`document` keeps the operations the running application serves and
adds a plain entry for any served route not described here (the HTML page), so the
document lists exactly the routes ``app.router`` answers.
"""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from .. import __version__

Schema = dict[str, Any]


def _obj(props: dict[str, Schema], required: list[str] | None = None) -> Schema:
    schema: Schema = {"type": "object", "properties": props}
    if required is not None:
        schema["required"] = required
    return schema


_S: Schema = {"type": "string"}
_SN: Schema = {"type": ["string", "null"]}
_I: Schema = {"type": "integer"}
_N: Schema = {"type": "number"}
_B: Schema = {"type": "boolean"}


def _arr(items: Schema) -> Schema:
    return {"type": "array", "items": items}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Schema] = {
    "Error": _obj({"error": _S}, ["error"]),
    "Info": _obj({
        "version": _S, "uptime": {**_N, "description": "seconds since start"},
        "started": {**_N, "description": "epoch seconds"}, "config_file": _SN,
        "delivery_mode": {"type": "string", "enum": ["queue", "proxy", "local", "capture"]},
        "listeners": _arr(_obj({"address": _S,
                                "protocol": {"type": "string", "enum": ["smtp", "lmtp"]},
                                "tls": {"type": "string",
                                        "enum": ["none", "starttls", "implicit"]}})),
        "admin": {**_S, "description": "host:port of this listener"},
    }, ["version", "uptime", "started", "config_file", "delivery_mode", "listeners",
        "admin"]),
    "Session": _obj({
        "id": _S, "client": _S, "client_port": _I, "helo": _SN,
        "tls": {**_SN, "description": "TLS version, null without TLS"},
        "auth_user": _SN, "state": {**_S, "description": "protocol state (init, ready, "
                                    "mail, rcpt, data, bdat, auth, ...)"},
        "bytes_in": _I, "bytes_out": _I, "age": {**_N, "description": "seconds"},
        "listener": {**_S, "description": "host:port the client connected to"},
    }, ["id", "client", "client_port", "helo", "tls", "auth_user", "state", "bytes_in",
        "bytes_out", "age", "listener"]),
    "QueuedMessage": _obj({
        "id": _S, "sender": _S, "recipients": _arr(_S), "size": _I,
        "arrival": {**_N, "description": "epoch seconds"},
        "state": {"type": "string", "enum": ["active", "deferred", "hold"]},
        "next_attempt": {**_N, "description": "epoch seconds"}, "attempts": _I,
        "last_reply": _S,
    }, ["id", "sender", "recipients", "size", "arrival", "state", "next_attempt",
        "attempts", "last_reply"]),
    "Queue": _obj({"messages": _arr(_ref("QueuedMessage")), "total": _I},
                  ["messages", "total"]),
    "QueuedMessageDetail": {"allOf": [_ref("QueuedMessage"), _obj({
        "mail_params": {"type": "object"}, "bounce": _B, "client": {"type": "object"},
        "recipients_detail": _arr(_obj({"address": _S, "state": _S, "attempts": _I,
                                        "last_reply": _S, "remote_mta": _S})),
        "headers": _arr(_arr(_S)),
    })]},
    "QueueAction": _obj({"id": _S, "action": _S, "message": _ref("QueuedMessage")}),
    "Relay": _obj({"relay_domains": _arr(_S), "local_networks": _arr(_S)},
                  ["relay_domains", "local_networks"]),
    "PluginHook": _obj({
        "stage": _S, "position": _I, "name": _S, "plugin": _S, "hook": _S,
        "priority": _I, "timeout": _N, "on_error": {"type": "string",
                                                     "enum": ["tempfail", "accept"]},
        "blocking": _B,
    }, ["stage", "position", "name", "plugin", "hook", "priority"]),
    "Reload": _obj({"reloaded": _B, "restart_needed": _arr(_S), "error": _S},
                   ["reloaded"]),
    "CapturedMessage": _obj({
        "id": _S, "received": _N, "sender": _S, "recipients": _arr(_S), "subject": _S,
        "size": _I, "source": {"type": "string", "enum": ["capture", "quarantine"]},
    }),
    "CapturedList": _obj({"messages": _arr(_ref("CapturedMessage")), "total": _I}),
    "CapturedMessageDetail": {"allOf": [_ref("CapturedMessage"), _obj({
        "headers": {}, "text": _SN, "html": {**_SN, "description": "sanitised"},
        "attachments": _arr({"type": "object"}),
    })]},
}


def _json(schema: Schema, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERR = _json(_ref("Error"), "error")


def _op(summary: str, ok: dict[str, Any], *, errors: tuple[int, ...] = (),
        params: tuple[str, ...] = (), query: tuple[str, ...] = (),
        body: Schema | None = None, status: str = "200",
        security: bool = True) -> dict[str, Any]:
    responses: dict[str, Any] = {status: ok}
    for code in sorted({*errors, *((401,) if security else ())}):
        responses[str(code)] = _ERR
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    parameters = [{"name": p, "in": "path", "required": True, "schema": _S} for p in params]
    parameters += [{"name": q, "in": "query", "required": False, "schema": _S} for q in query]
    if parameters:
        op["parameters"] = parameters
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": body}}}
    if not security:
        op["security"] = []
    return op


def _queue_action(what: str, text: str) -> dict[str, Any]:
    return _op(text, _json(_ref("QueueAction")), errors=(404, 409, 500), params=("id",))


#: ``{path: {method: operation}}`` for every route of the contract (docs/operations.md).
OPERATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "/metrics": {"get": _op(
        "Prometheus metrics (text exposition format); no token needed",
        {"description": "OK", "content": {"text/plain": {"schema": _S}}}, security=False)},
    "/api/info": {"get": _op("Server facts: version, uptime, listeners, configuration file",
                             _json(_ref("Info")))},
    "/api/sessions": {"get": _op("Live SMTP sessions, oldest first",
                                 _json(_arr(_ref("Session"))))},
    "/api/sessions/{id}": {"delete": _op(
        "End a session: the client gets 421 4.3.2 and the connection is closed",
        _json(_obj({"killed": _S})), errors=(404,), params=("id",))},
    "/api/queue": {"get": _op("Queued messages (queue mode), oldest first",
                              _json(_ref("Queue")))},
    "/api/queue/flush": {"post": _op(
        "Make every deferred message due now (smtpgate queue flush)",
        _json(_obj({"flushed": _arr(_S), "total": _I})), errors=(409, 500))},
    "/api/queue/{id}": {
        "get": _op("One queued message: envelope, per-recipient state, headers",
                   _json(_ref("QueuedMessageDetail")), errors=(404, 409, 500),
                   params=("id",)),
        "delete": _op("Delete a queued message (no bounce)", _json(_obj({"deleted": _S})),
                      errors=(404, 409, 500), params=("id",)),
    },
    "/api/queue/{id}/hold": {"post": _queue_action("hold", "Put a message on hold")},
    "/api/queue/{id}/release": {"post": _queue_action("release", "Release a held message")},
    "/api/queue/{id}/flush": {"post": _queue_action("flush", "Deliver a message now")},
    "/api/queue/{id}/bounce": {"post": _queue_action(
        "bounce", "Return a message to its sender at once (a DSN)")},
    "/api/relay": {"get": _op("Relay domains and local networks in force",
                              _json(_ref("Relay")))},
    "/api/relay/domains": {"post": _op(
        "Add a relay domain (nssmtpd relay add); .example.com covers subdomains",
        _json(_ref("Relay")), errors=(400, 409, 422), body=_obj({"domain": _S}, ["domain"]))},
    "/api/relay/domains/{domain}": {"delete": _op(
        "Remove a relay domain (nssmtpd relay del)", _json(_ref("Relay")),
        errors=(404, 409), params=("domain",))},
    "/api/relay/networks": {"post": _op(
        "Add a local network (nssmtpd local add): its clients may relay",
        _json(_ref("Relay")), errors=(400, 409, 422),
        body=_obj({"network": _S}, ["network"]))},
    "/api/relay/networks/{network}": {"delete": _op(
        "Remove a local network (nssmtpd local del); URL-encode the slash as %2F",
        _json(_ref("Relay")), errors=(404, 409), params=("network",))},
    "/api/plugins": {"get": _op("The plugin chain: each stage's hooks in run order",
                                _json(_arr(_ref("PluginHook"))))},
    "/api/reload": {"post": _op(
        "Re-read, validate and apply the configuration file (as SIGHUP)",
        _json(_ref("Reload")), errors=(409, 422))},
    "/api/openapi.json": {"get": _op("This document", _json({"type": "object"}))},
    "/api/messages": {
        "get": _op("Captured and quarantined messages, newest first, filtered",
                   _json(_ref("CapturedList")),
                   query=("to", "from", "subject", "q", "source", "limit", "offset")),
        "delete": _op("Delete every captured message", _json({"type": "object"})),
    },
    "/api/messages/wait": {"get": _op(
        "Long poll: the first matching message (already there after since, or arriving)",
        _json(_ref("CapturedMessage")), errors=(408, 503),
        query=("to", "from", "subject", "since", "timeout"))},
    "/api/messages/{id}": {
        "get": _op("One captured message: headers, text, sanitised HTML, attachments",
                   _json(_ref("CapturedMessageDetail")), errors=(404,), params=("id",)),
        "delete": _op("Delete one captured message", _json({"type": "object"}),
                      errors=(404,), params=("id",)),
    },
    "/api/messages/{id}/raw": {"get": _op(
        "The raw message (message/rfc822 download)",
        {"description": "OK", "content": {"message/rfc822": {"schema": _S}}},
        errors=(404,), params=("id",))},
    "/api/messages/{id}/relay": {"post": {
        **_op("Relay a captured message to the configured upstream (to its recipients, or "
              "to those given)", _json({"type": "object"}), errors=(400, 404, 409, 502),
              params=("id",)),
        "requestBody": {"required": False, "content": {"application/json": {
            "schema": _obj({"to": _arr(_S)})}}}}},
    "/api/messages/{id}/train": {"post": _op(
        "Train the configured scanners with this message as spam or ham",
        _json({"type": "object"}), errors=(400, 404, 409, 502), params=("id",),
        body=_obj({"as": {"type": "string", "enum": ["spam", "ham"]}}, ["as"]))},
}

_METHODS = ("get", "put", "post", "delete", "patch", "options")


def served_operations(app: web.Application) -> set[tuple[str, str]]:
    """``(path, method)`` of every route ``app`` serves (paths in OpenAPI form,
    ``{name}`` without any regular expression; lower-case methods; HEAD left out)."""
    out: set[tuple[str, str]] = set()
    for route in app.router.routes():
        method = route.method.lower()
        if method not in _METHODS or route.resource is None:
            continue
        out.add((route.resource.canonical, method))
    return out


def document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document for the routes ``app`` serves.

    Described operations come from :data:`OPERATIONS`; a served route without a
    description (the HTML page's) gets a plain ``text/html`` entry with
    ``x-smtpgate-page: true``. Every operation but ``/metrics`` needs the bearer token
    when ``[admin] token_file`` is set.
    """
    paths: dict[str, dict[str, Any]] = {}
    for path, method in sorted(served_operations(app)):
        op = OPERATIONS.get(path, {}).get(method)
        if op is None:
            op = {"summary": f"{method.upper()} {path} (web page)",
                  "x-smtpgate-page": True,
                  "responses": {"200": {"description": "OK",
                                        "content": {"text/html": {"schema": _S}}}}}
        paths.setdefault(path, {})[method] = copy.deepcopy(op)
        params = [p for p in path.split("/") if p.startswith("{")]
        if params and "parameters" not in paths[path][method]:
            paths[path][method]["parameters"] = [
                {"name": p.strip("{}"), "in": "path", "required": True, "schema": _S}
                for p in params]
    return {
        "openapi": "3.1.0",
        "info": {"title": "smtpgate admin API", "version": __version__,
                 "description": "The admin listener of smtpgate (docs/operations.md). "
                                "Errors are JSON {\"error\": \"...\"}."},
        "paths": paths,
        "components": {
            "schemas": copy.deepcopy(SCHEMAS),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the token of [admin] "
                                                          "token_file"}},
        },
        "security": [{"bearer": []}],
    }
