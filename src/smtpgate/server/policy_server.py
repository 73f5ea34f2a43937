"""smtpgate's plugin chain served to Postfix as a policy server
(``[[listener]] protocol = "policy"``; Postfix ``check_policy_service inet:HOST:PORT``).

Entry points: :class:`PolicyServer` (the listener) and :func:`decide` (one request →
one action, no I/O but the chain). Protocol: Postfix SMTPD_POLICY_README, "Protocol
description", with the codec shared with smtpgate's policy client
(:mod:`smtpgate.plugins.policy_codec`); one connection carries many requests.

Each request is mapped into a fresh :class:`~smtpgate.envelope.SessionInfo` (client
address and name, HELO name, TLS, SASL user) and :class:`~smtpgate.hooks.Transaction`
(sender, and the recipient at RCPT), and the chain of its ``protocol_state`` runs:

==================  ==========================================
protocol_state      stage run
==================  ==========================================
CONNECT             ``connect(session)``
EHLO / HELO         ``helo(session, helo_name)``
MAIL                ``mail(session, transaction)``
RCPT                ``rcpt(session, transaction, recipient)``
DATA                ``data_start(session, transaction)``
VRFY                ``vrfy(session, address, "vrfy")``
END-OF-MESSAGE,     none (the policy protocol carries no message): ``DUNNO``
ETRN, other
==================  ==========================================

The verdict is answered as an access(5) action: CONT → ``DUNNO``; OK → ``OK``; DENY and
DENYSOFT → the plugin's reply as ``NNN X.Y.Z text`` (Postfix sends that code, enhanced
code and text to its client); the ``_DISCONNECT`` variants → ``421 4.7.0 text`` (Postfix
replies and disconnects). A header a plugin adds (``transaction.add_header``; the
transaction has an empty header block for this) is answered as ``PREPEND name: value``
when the chain did not refuse: the first one only, as Postfix takes one action per reply.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Mapping

from ..envelope import Envelope, Recipient, SessionInfo
from ..hooks import HookResult, HookRunner, Stage, Transaction, Verdict, default_reply
from ..milter.server import ChainSource
from ..plugins.policy_codec import (
    AttributeReader,
    PolicyProtocolError,
    encode_response,
    sanitize_value,
)
from ..reply import Reply
from .stream_listener import StreamListener

__all__ = ["PolicyServer", "decide"]

log = logging.getLogger("smtpgate.policy.server")

_ids = itertools.count(1)
_ID_PREFIX = f"P{os.getpid() & 0xFFFF:04X}{int(time.time()) & 0xFFFFFF:06X}"

_STAGES: dict[str, Stage] = {
    "CONNECT": Stage.CONNECT, "EHLO": Stage.HELO, "HELO": Stage.HELO, "MAIL": Stage.MAIL,
    "RCPT": Stage.RCPT, "DATA": Stage.DATA_START, "VRFY": Stage.VRFY,
}


def _session(req: Mapping[str, str], hostname: str) -> SessionInfo:
    port = req.get("client_port", "")
    session = SessionInfo(
        session_id=f"{_ID_PREFIX}{next(_ids):06X}", peer_ip=req.get("client_address", ""),
        peer_port=int(port) if port.isdigit() else 0, hostname=hostname,
        helo_name=req.get("helo_name") or None,
        esmtp=req.get("protocol_name", "").upper() in ("ESMTP", "ESMTPS", "ESMTPA",
                                                      "ESMTPSA"),
        tls_version=req.get("encryption_protocol") or None,
        tls_cipher=req.get("encryption_cipher") or None,
        auth_user=req.get("sasl_username") or None)
    name = req.get("client_name", "")
    if name and name != "unknown":
        session.peer_hostname = name
    server_address = req.get("server_address", "")
    if server_address:
        session.local_ip = server_address
    server_port = req.get("server_port", "")
    if server_port.isdigit():
        session.local_port = int(server_port)
    session.notes["policy_request"] = dict(req)
    return session


def _transaction(req: Mapping[str, str], session: SessionInfo) -> Transaction:
    params: dict[str, str | None] = {}
    if req.get("size", "0") not in ("", "0"):
        params["SIZE"] = req["size"]
    tx = Transaction(Envelope(mail_from=req.get("sender", ""), mail_params=params),
                     req.get("queue_id") or f"{session.session_id}.T")
    tx.message = b"\r\n"  # an empty header block: a plugin's add_header becomes PREPEND
    return tx


def _action(stage: Stage, result: HookResult) -> str:
    verdict = result.verdict
    if verdict is Verdict.OK:
        return "OK"
    reply = result.reply or default_reply(stage, verdict)
    if reply is None:
        return "DEFER" if verdict is Verdict.DENYSOFT else "REJECT"
    if verdict in (Verdict.DENY_DISCONNECT, Verdict.DENYSOFT_DISCONNECT):
        reply = Reply(421, "4.7.0", reply.text)
    text = sanitize_value(" ".join(reply.text.split("\n")))
    return f"{reply.code} {reply.enhanced} {text}" if reply.enhanced else f"{reply.code} {text}"


async def decide(hooks: HookRunner, request: Mapping[str, str], hostname: str) -> str:
    """Run the chain for one policy request; return its ``action``.

    Args:
        hooks: the plugin chain.
        request: the request's attributes (``protocol_state``, ``client_address``, ...).
        hostname: smtpgate's own host name (``session.hostname``).

    Returns:
        An access(5) action: ``DUNNO``, ``OK``, ``NNN X.Y.Z text`` or ``PREPEND header``.
    """
    state = request.get("protocol_state", "").upper()
    stage = _STAGES.get(state)
    if stage is None:
        return "DUNNO"
    session = _session(request, hostname)
    tx = _transaction(request, session)
    args: tuple[object, ...]
    if stage is Stage.CONNECT:
        args = (session,)
    elif stage is Stage.HELO:
        args = (session, request.get("helo_name", ""))
    elif stage is Stage.VRFY:
        args = (session, request.get("recipient", ""), "vrfy")
    elif stage is Stage.RCPT:
        args = (session, tx, Recipient(request.get("recipient", "")))
    else:
        args = (session, tx)
    try:
        result = await hooks.run(stage, *args)
    finally:
        added = tx.get_headers()
        tx.close()
    if result.verdict.is_denial:
        action = _action(stage, result)
        log.info("policy reject stage=%s client=%s helo=%s from=<%s> to=<%s> queue_id=%s "
                 "action=%r", stage.value, session.peer_ip, session.helo_name or "",
                 tx.mail_from, request.get("recipient", ""), tx.id, action)
        return action
    if added:
        name, value = added[0]
        return sanitize_value(f"PREPEND {name}: {value}")
    return "OK" if result.verdict is Verdict.OK else "DUNNO"


class PolicyServer(StreamListener):
    """A Postfix policy delegation listener.

    Args:
        source: the running server (its ``config`` and ``hooks``, read per request, so a
            reload applies to the next request).
        host / port: where to listen (port 0: any free port).
        reuse_port: bind with ``SO_REUSEPORT`` (``server.workers > 1``).
        timeout: seconds a connection may stay idle between requests (Postfix keeps
            them open for ``smtpd_policy_service_max_idle``, 300 s).
    """

    def __init__(self, source: ChainSource, host: str, port: int, *,
                 reuse_port: bool = False, timeout: float = 300.0) -> None:
        super().__init__("policy", host, port, self._requests, reuse_port=reuse_port)
        self.source = source
        self.timeout = timeout

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                        ) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        parser = AttributeReader()
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), self.timeout)
                if not data:
                    break
                for record in parser.feed(data):
                    request = dict(record)
                    try:
                        action = await decide(self.source.hooks, request,
                                              self.source.config.server.hostname)
                    except Exception:
                        log.exception("policy request from %s failed", peer[0])
                        action = "451 4.3.0 Local error in processing, try again later"
                    writer.write(encode_response(action))
                await writer.drain()
        except PolicyProtocolError as exc:
            log.warning("policy connection from %s: %s: closing", peer[0], exc)
        except (TimeoutError, ConnectionError):
            pass  # idle or gone: Postfix reconnects when it needs to
