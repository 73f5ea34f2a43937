"""smtpgate's plugin chain served to an MTA as a milter (``[[listener]] protocol = "milter"``).

Entry points: :class:`MilterServer` (the listener) and :class:`MilterConversation` (one
MTA connection, sans-IO apart from running the chain: commands in, responses out).
Postfix ``smtpd_milters = inet:HOST:PORT`` or Sendmail ``INPUT_MAIL_FILTER`` call it; the
chain is the one ``smtpgate serve`` builds from the same configuration, so a site's
plugins decide for the MTA (docs/postfix.md).

Protocol: milter version 6 (Sendmail ``libmilter/mfdef.h``, Postfix MILTER_README), with
the codec shared with smtpgate's milter client (:mod:`smtpgate.milter.codec`).

- Option negotiation asks only for what the chain needs: CONNECT, HELO, MAIL and RCPT are
  always received (later stages read the client address, HELO name and envelope), with
  ``SMFIP_NR_*`` (no reply) where no plugin has a hook at that stage; DATA, the header and
  body events and UNKNOWN are declined (``SMFIP_NO*``) when no plugin needs them, so the
  MTA does not send them. Header values keep their leading space (``SMFIP_HDR_LEADSPC``)
  when the MTA offers it.
- Macros fill :class:`~smtpgate.envelope.SessionInfo` and the transaction: ``j`` (host
  name), ``{client_name}``/``{client_ptr}`` (``peer_hostname``), ``{tls_version}``,
  ``{cipher}``, ``{auth_authen}`` (``auth_user``), ``i`` (queue id: ``transaction.id``),
  ``{daemon_name}``/``{daemon_addr}``/``{daemon_port}``; every macro is in
  ``session.notes["milter_macros"]``.
- Each stage's chain verdict becomes the milter response: CONT and OK → continue (OK in
  smtpgate ends only that stage's chain); DENY/DENYSOFT → ``SMFIR_REPLYCODE`` with the
  plugin's reply (or the stage's default), which the MTA sends to its client;
  ``*_DISCONNECT`` → a ``421`` reply (the MTA closes); QUARANTINE with a 2xx reply →
  ``SMFIR_QUARANTINE`` (Postfix's hold queue), with a 5xx reply → that reply; a ``queue``
  plugin that takes the message → ``SMFIR_DISCARD`` (the MTA must not deliver it too).
- At end of message the plugins' changes (headers added, changed, removed; recipients
  added and removed; sender changed; body replaced) are sent as modification actions
  (:func:`smtpgate.milter.changes.modifications`) before the final response.

Not run here: the ``delivered`` stage (the MTA delivers) and smtpgate's delivery; the
``auth`` stage (the MTA authenticates; the result arrives as ``{auth_authen}``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..config import Config
from ..envelope import Envelope, Recipient, SessionInfo
from ..hooks import HookResult, HookRunner, Stage, Transaction, Verdict, default_reply
from ..reply import Reply
from ..server.stream_listener import StreamListener
from . import codec
from .changes import EnvelopeState, modifications
from .message import parse_esmtp_args

__all__ = ["ChainSource", "MilterConversation", "MilterServer"]

log = logging.getLogger("smtpgate.milter.server")

_ids = itertools.count(1)
_ID_PREFIX = f"M{os.getpid() & 0xFFFF:04X}{int(time.time()) & 0xFFFFFF:06X}"

#: Actions smtpgate may ask for (every modification; SETSYMLIST only when offered).
_WANTED_ACTIONS = (codec.SMFIF.ADDHDRS | codec.SMFIF.CHGHDRS | codec.SMFIF.CHGBODY
                   | codec.SMFIF.ADDRCPT | codec.SMFIF.ADDRCPT_PAR | codec.SMFIF.DELRCPT
                   | codec.SMFIF.CHGFROM | codec.SMFIF.QUARANTINE)

#: Macros asked for per stage when the MTA lets the milter choose (SMFIF_SETSYMLIST).
_MACROS: dict[int, tuple[str, ...]] = {
    codec.SMFIM.CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "{daemon_port}",
                          "{client_name}", "{client_ptr}"),
    codec.SMFIM.HELO: ("{tls_version}", "{cipher}", "{cert_subject}"),
    codec.SMFIM.ENVFROM: ("i", "{auth_type}", "{auth_authen}"),
    codec.SMFIM.ENVRCPT: ("{rcpt_addr}",),
    codec.SMFIM.EOM: ("i",),
}

_DISCONNECT_REPLY = Reply(421, "4.7.0", "Closing connection")


class ChainSource(Protocol):
    """What the milter server needs of the running server: its configuration and its
    plugin chain (read at each new MTA connection, so a reload applies to new ones)."""

    config: Config
    hooks: HookRunner


def _bare(address: str) -> str:
    a = address.strip()
    return a[1:-1] if a.startswith("<") and a.endswith(">") else a


def _reply_text(reply: Reply) -> str:
    """A reply as SMFIR_REPLYCODE carries it: lines joined by CRLF, no final CRLF."""
    return reply.to_bytes().decode("utf-8", "replace").rstrip("\r\n")


@dataclass(slots=True)
class _Message:
    """The transaction being received from the MTA."""

    tx: Transaction
    headers: list[bytes] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    too_big: bool = False


class MilterConversation:
    """One MTA connection: decoded commands in (:meth:`handle`), responses out.

    Args:
        hooks: the plugin chain to run.
        config: the configuration (host name, ``server.max_message_size`` in bytes).
        peer: the MTA's ``(ip, port)``, for logs.

    Attributes:
        session: the SMTP session the MTA is reporting on (``None`` before CONNECT).
        closed: the MTA said QUIT.
    """

    def __init__(self, hooks: HookRunner, config: Config, peer: tuple[str, int]) -> None:
        self.hooks = hooks
        self.config = config
        self.peer = peer
        self.session: SessionInfo | None = None
        self.closed = False
        self.macros: dict[str, str] = {}
        self.actions = 0
        self.protocol = 0
        self._message: _Message | None = None
        self._noreply: set[bytes] = set()

    # ------------------------------------------------------------------ negotiation

    def _negotiate(self, offer: codec.OptNeg) -> codec.OptNeg:
        if offer.version < 6:
            raise codec.MilterProtocolError(f"milter protocol version {offer.version}: "
                                            "smtpgate needs version 6")
        has = self.hooks.has
        message = has(Stage.HEADERS) or has(Stage.DATA) or has(Stage.QUEUE)
        wanted = 0
        if not has(Stage.DATA_START):
            wanted |= codec.SMFIP.NODATA
        if not message:
            wanted |= codec.SMFIP.NOHDRS | codec.SMFIP.NOEOH | codec.SMFIP.NOBODY
        if not has(Stage.UNKNOWN):
            wanted |= codec.SMFIP.NOUNKNOWN
        no_reply = {Stage.CONNECT: (codec.SMFIP.NR_CONN, codec.Connect.CMD),
                    Stage.HELO: (codec.SMFIP.NR_HELO, codec.Helo.CMD),
                    Stage.MAIL: (codec.SMFIP.NR_MAIL, codec.Mail.CMD),
                    Stage.RCPT: (codec.SMFIP.NR_RCPT, codec.Rcpt.CMD)}
        for stage, (flag, cmd) in no_reply.items():
            if not has(stage) and offer.protocol & flag:
                wanted |= flag
                self._noreply.add(cmd)
        for flag, cmd in ((codec.SMFIP.NR_HDR, codec.Header.CMD),
                          (codec.SMFIP.NR_EOH, codec.EndOfHeaders.CMD),
                          (codec.SMFIP.NR_BODY, codec.Body.CMD)):
            if offer.protocol & flag:  # nothing is decided before end of message
                wanted |= flag
                self._noreply.add(cmd)
        wanted |= codec.SMFIP.HDR_LEADSPC
        self.protocol = wanted & offer.protocol
        # A NO* flag the MTA did not offer means it will send the event anyway.
        self.actions = _WANTED_ACTIONS & offer.actions
        macros: dict[int, tuple[str, ...]] = {}
        if offer.actions & codec.SMFIF.SETSYMLIST:
            self.actions |= codec.SMFIF.SETSYMLIST
            macros = dict(_MACROS)
        return codec.OptNeg(6, self.actions, self.protocol, macros)

    # ------------------------------------------------------------------ the chain

    def _respond(self, stage: Stage, result: HookResult) -> list[codec.Response]:
        verdict = result.verdict
        if verdict in (Verdict.CONT, Verdict.OK):
            return [codec.Continue()]
        reply = result.reply or default_reply(stage, verdict)
        if verdict in (Verdict.DENY_DISCONNECT, Verdict.DENYSOFT_DISCONNECT):
            if reply is None or reply.code != 421:
                reply = Reply(421, reply.enhanced if reply and reply.enhanced
                              and reply.enhanced.startswith("4.") else "4.7.0",
                              reply.text if reply else _DISCONNECT_REPLY.text)
        if verdict is Verdict.QUARANTINE:
            if reply is not None and reply.code < 400:
                return [codec.Quarantine(result.reason or reply.text or "quarantined"),
                        codec.Continue()]
        if reply is None:
            return [codec.TempFail() if verdict is Verdict.DENYSOFT else codec.Reject()]
        return [codec.ReplyCode(_reply_text(reply))]

    def _log(self, stage: Stage, result: HookResult) -> None:
        if result.verdict.is_denial and self.session is not None:
            tx = self._message.tx if self._message else None
            log.info("milter reject stage=%s client=%s helo=%s from=<%s> queue_id=%s "
                     "reply=%r", stage.value, self.session.peer_ip,
                     self.session.helo_name or "", tx.mail_from if tx else "",
                     tx.id if tx else "", str(result.reply or ""))

    async def _run(self, stage: Stage, *args: object) -> list[codec.Response]:
        result = await self.hooks.run(stage, *args)
        self._log(stage, result)
        return self._respond(stage, result)

    def _apply_macros(self) -> None:
        s, m = self.session, self.macros
        if s is None:
            return
        s.notes["milter_macros"] = dict(m)
        if m.get("j"):
            s.hostname = m["j"]
        name = m.get("{client_name}") or m.get("{client_ptr}")
        if name and name != "unknown" and not name.startswith("["):
            s.peer_hostname = name
        if m.get("{tls_version}"):
            s.tls_version = m["{tls_version}"]
        if m.get("{cipher}"):
            s.tls_cipher = m["{cipher}"]
        if m.get("{auth_authen}"):
            s.auth_user = m["{auth_authen}"]
        if m.get("{daemon_addr}"):
            s.local_ip = m["{daemon_addr}"]
        port = m.get("{daemon_port}", "")
        if port.isdigit():
            s.local_port = int(port)
        if self._message is not None and m.get("i"):
            self._message.tx.id = m["i"]

    # ------------------------------------------------------------------ commands

    async def handle(self, command: codec.Command) -> list[codec.Response]:
        """Process one command from the MTA; return the responses to send (none for
        the commands that take no reply, and for those negotiated as ``NR``).

        Raises:
            MilterProtocolError: a command out of order (e.g. MAIL before CONNECT) or an
                unsupported protocol version; the connection should be closed.
        """
        if isinstance(command, codec.OptNeg):
            return [self._negotiate(command)]
        if isinstance(command, codec.Macro):
            self.macros.update(command.macros)
            self._apply_macros()
            return []
        responses = await self._dispatch(command)
        if type(command).CMD in self._noreply:
            return []
        return responses

    async def _dispatch(self, command: codec.Command) -> list[codec.Response]:
        if isinstance(command, codec.Connect):
            return await self._connect(command)
        if isinstance(command, (codec.Quit, codec.QuitNewConnection)):
            await self._end()
            if isinstance(command, codec.Quit):
                self.closed = True
            return []
        session = self.session
        if session is None:
            raise codec.MilterProtocolError(f"{type(command).__name__} before CONNECT")
        if isinstance(command, codec.Helo):
            result = await self.hooks.run(Stage.HELO, session, command.name)
            self._log(Stage.HELO, result)
            if not result.verdict.is_denial:
                session.helo_name = command.name
                session.esmtp = True
            return self._respond(Stage.HELO, result)
        if isinstance(command, codec.Mail):
            return await self._mail(session, command)
        if isinstance(command, codec.Abort):
            if self._message is not None:
                self._message.tx.close()
                self._message = None
                await self.hooks.run(Stage.RSET, session)
            return []
        if isinstance(command, codec.Unknown):
            verb = command.line.split(" ", 1)[0].upper()
            return await self._run(Stage.UNKNOWN, session, verb, command.line)
        message = self._message
        if message is None:
            raise codec.MilterProtocolError(f"{type(command).__name__} outside a transaction")
        if isinstance(command, codec.Rcpt):
            return await self._rcpt(session, message, command)
        if isinstance(command, codec.Data):
            return await self._run(Stage.DATA_START, session, message.tx)
        if isinstance(command, codec.Header):
            name = command.name
            sep = ":" if self.protocol & codec.SMFIP.HDR_LEADSPC else ": "
            field_text = f"{name}{sep}{command.value}".replace("\r\n", "\n")
            message.headers.append(field_text.replace("\n", "\r\n").encode(
                "utf-8", "surrogateescape") + b"\r\n")
            self._check_size(message, len(message.headers[-1]))
            return [codec.Continue()]
        if isinstance(command, codec.EndOfHeaders):
            return [codec.Continue()]
        if isinstance(command, codec.Body):
            self._add_body(message, command.chunk)
            return [codec.Continue()]
        if isinstance(command, codec.EndOfMessage):
            self._add_body(message, command.chunk)
            self._message = None
            try:
                return await self._end_of_message(session, message)
            finally:
                message.tx.close()
        raise codec.MilterProtocolError(f"unexpected command {type(command).__name__}")

    async def _connect(self, command: codec.Connect) -> list[codec.Response]:
        if self.session is not None:
            await self._end()
        ip = command.address if command.family in ("4", "6") else "127.0.0.1"
        self.session = SessionInfo(
            session_id=f"{_ID_PREFIX}{next(_ids):06X}", peer_ip=ip, peer_port=command.port,
            hostname=self.config.server.hostname)
        if command.hostname and not command.hostname.startswith("[") \
                and command.hostname != "unknown":
            self.session.peer_hostname = command.hostname
        self._apply_macros()
        return await self._run(Stage.CONNECT, self.session)

    async def _mail(self, session: SessionInfo, command: codec.Mail) -> list[codec.Response]:
        if self._message is not None:  # a new transaction without ABORT: drop the old one
            self._message.tx.close()
        envelope = Envelope(mail_from=_bare(command.args[0]),
                            mail_params=parse_esmtp_args(" ".join(command.args[1:])))
        tx = Transaction(envelope, self.macros.get("i") or f"{session.session_id}.T")
        self._message = _Message(tx)
        result = await self.hooks.run(Stage.MAIL, session, tx)
        self._log(Stage.MAIL, result)
        if result.verdict.is_denial:
            self._message = None
        return self._respond(Stage.MAIL, result)

    async def _rcpt(self, session: SessionInfo, message: _Message, command: codec.Rcpt
                    ) -> list[codec.Response]:
        recipient = Recipient(_bare(command.args[0]),
                              parse_esmtp_args(" ".join(command.args[1:])))
        result = await self.hooks.run(Stage.RCPT, session, message.tx, recipient)
        self._log(Stage.RCPT, result)
        if not result.verdict.is_denial:
            message.tx.envelope.rcpt_to.append(recipient)
        return self._respond(Stage.RCPT, result)

    def _check_size(self, message: _Message, added: int) -> None:
        limit = self.config.server.max_message_size
        if sum(map(len, message.headers)) + len(message.body) + added > limit:
            message.too_big = True

    def _add_body(self, message: _Message, chunk: bytes) -> None:
        if message.too_big or not chunk:
            return
        self._check_size(message, len(chunk))
        if message.too_big:
            message.body.clear()
        else:
            message.body += chunk

    async def _end_of_message(self, session: SessionInfo, message: _Message
                              ) -> list[codec.Response]:
        tx = message.tx
        has = self.hooks.has
        if not (has(Stage.HEADERS) or has(Stage.DATA) or has(Stage.QUEUE)):
            return [codec.Accept()]
        if message.too_big:
            reply = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            return [codec.ReplyCode(_reply_text(reply))]
        raw = b"".join(message.headers) + b"\r\n" + bytes(message.body)
        tx.message = raw
        before = self._state(tx)
        for stage in (Stage.HEADERS, Stage.DATA):
            result = await self.hooks.run(stage, session, tx)
            self._log(stage, result)
            if result.verdict.is_denial or result.verdict is Verdict.QUARANTINE:
                if result.verdict is Verdict.QUARANTINE:
                    return self._with_changes(tx, raw, before, self._respond(stage, result))
                return self._respond(stage, result)
            if result.verdict is Verdict.OK and stage is Stage.DATA:
                break
        queue = await self.hooks.run(Stage.QUEUE, session, tx)
        self._log(Stage.QUEUE, queue)
        if queue.verdict.is_denial:
            return self._respond(Stage.QUEUE, queue)
        if queue.verdict is Verdict.OK and queue.reply is not None:
            log.info("milter discard queue_id=%s: a queue plugin took the message (%s)",
                     tx.id, queue.reply)
            return [codec.Discard()]
        return self._with_changes(tx, raw, before, [codec.Accept()])

    @staticmethod
    def _state(tx: Transaction) -> EnvelopeState:
        return EnvelopeState(tx.mail_from, dict(tx.mail_params),
                             tuple((r.address, dict(r.params)) for r in tx.recipients))

    def _with_changes(self, tx: Transaction, raw: bytes, before: EnvelopeState,
                      final: list[codec.Response]) -> list[codec.Response]:
        try:
            changes = modifications(
                raw, tx.raw, before, self._state(tx),
                leadspc=bool(self.protocol & codec.SMFIP.HDR_LEADSPC), actions=self.actions)
        except PermissionError as exc:
            log.warning("milter queue_id=%s: the plugins changed the message but %s: "
                        "answering 451 4.3.0", tx.id, exc)
            reply = Reply(451, "4.3.0", "Message changes not possible, try again later")
            return [codec.ReplyCode(_reply_text(reply))]
        return [*changes, *final]

    async def _end(self) -> None:
        """The SMTP session is over (QUIT, a new CONNECT, or the MTA went away)."""
        session, self.session = self.session, None
        if self._message is not None:
            self._message.tx.close()
            self._message = None
        self.macros = {}
        if session is not None:
            await self.hooks.run(Stage.QUIT, session)

    async def aclose(self) -> None:
        """The connection ended: run the ``quit`` stage for a session still open."""
        await self._end()


class MilterServer(StreamListener):
    """A milter listener: one :class:`MilterConversation` per MTA connection.

    Args:
        source: the running server (its ``config`` and ``hooks``, read per connection).
        host / port: where to listen (port 0: any free port).
        reuse_port: bind with ``SO_REUSEPORT`` (``server.workers > 1``).
        timeout: seconds the MTA may stay silent within a conversation before the
            connection is closed (``server.command_timeout``).
    """

    def __init__(self, source: ChainSource, host: str, port: int, *,
                 reuse_port: bool = False, timeout: float = 300.0) -> None:
        super().__init__("milter", host, port, self._converse, reuse_port=reuse_port)
        self.source = source
        self.timeout = timeout

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                        ) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        conv = MilterConversation(self.source.hooks, self.source.config,
                                  (str(peer[0]), int(peer[1])))
        decoder = codec.FrameDecoder()
        try:
            while not conv.closed:
                data = await asyncio.wait_for(reader.read(65536), self.timeout)
                if not data:
                    break
                out: list[bytes] = []
                for frame in decoder.feed(data):
                    for response in await conv.handle(codec.decode_command(frame)):
                        out.append(codec.encode(response))
                    if conv.closed:
                        break
                if out:
                    writer.write(b"".join(out))
                    await writer.drain()
        except codec.MilterProtocolError as exc:
            log.warning("milter connection from %s: %s: closing", conv.peer[0], exc)
        except TimeoutError:
            log.info("milter connection from %s: silent for %gs: closing", conv.peer[0],
                     self.timeout)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                await conv.aclose()
            except Exception:
                log.exception("milter connection from %s: quit stage failed", conv.peer[0])
