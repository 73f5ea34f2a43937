"""Shipped plugin ``milter``: a Sendmail/Postfix milter (protocol version 6) on the chain,
as Postfix's ``smtpd_milters`` (``[[plugin]] use = "milter"``, docs/filters/milter.md).

Entry point: :func:`register`. One milter connection per SMTP session, opened at
``connect`` and reused for every transaction of the session (``SMFIC_ABORT`` between an
unfinished transaction and the next one, ``SMFIC_QUIT`` at the end). Each stage sends its
event with the stage's macros (Postfix's defaults, or the list the milter asked for); the
content goes at ``data``: the header fields, end of headers, the body in chunks of at most
65535 bytes and the end of message, whose modification actions are applied to the
transaction all together once the milter's final answer arrived (never half of them).

Several ``[[plugin]]`` tables with ``use = "milter"`` and different ``name``s run in table
order; each sees the changes the previous ones made. A milter that is down, times out or
breaks the protocol gets ``default_action`` (``tempfail``: ``451 4.3.5``; ``reject``:
``550 5.5.0``; ``accept``: the milter is left out for the rest of the session).
Findings go to ``transaction.results`` (``session.results`` at connect/HELO) under the
plugin's name. RFC 5321 (stages), RFC 3463 (every reply carries an enhanced code).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..milter import codec
from ..milter.client import MilterClient, MilterError, parse_socket
from ..milter.codec import SMFIP
from ..milter.message import apply_modifications, header_fields
from ..reply import Reply
from . import Option, PluginRegistry, positive

__all__ = ["DEFAULT_MACROS", "OPTIONS", "PRIORITY", "parse_reply", "register"]

log = logging.getLogger("smtpgate.milter")

PRIORITY = 0

#: Postfix's default macros per stage (milter_*_macros), plus {if_name}/{if_addr} and the
#: client's address at connect.
DEFAULT_MACROS: dict[str, tuple[str, ...]] = {
    "C": ("j", "_", "{daemon_name}", "{daemon_addr}", "{daemon_port}", "{if_name}",
          "{if_addr}", "{client_addr}", "{client_port}", "{client_name}", "{client_ptr}", "v"),
    "H": ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    "M": ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}",
          "{mail_mailer}"),
    "R": ("i", "{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    "T": ("i",),
    "N": ("i",),
    "E": ("i",),
    "U": (),
}

_ACTIONS = ("tempfail", "accept", "reject")


def _choice(value: str) -> str | None:
    return None if value in _ACTIONS else f"must be one of {', '.join(_ACTIONS)}"


def _socket_ok(value: str) -> str | None:
    try:
        parse_socket(value)
    except ValueError as exc:
        return str(exc)
    return None


OPTIONS: dict[str, Option] = {
    "socket": Option(str, check=_socket_ok,
                     help="inet:PORT@HOST, inet:HOST:PORT, inet6:PORT@HOST or unix:/path"),
    "default_action": Option(str, default="tempfail", check=_choice,
                             help="when the milter is down, times out or breaks the protocol"),
    "connect_timeout": Option(float, default=30.0, check=positive,
                              help="seconds to connect and negotiate"),
    "command_timeout": Option(float, default=30.0, check=positive,
                              help="seconds to wait for a reply to a command"),
    "content_timeout": Option(float, default=300.0, check=positive,
                              help="seconds to wait for a reply to a body chunk / end of data"),
    "daemon_name": Option(str, default="smtpgate", help="the {daemon_name} macro"),
    "quarantine_path": Option(str, default="",
                              help="Maildir for messages a milter quarantines (else 451)"),
    "macros": Option(dict, default={},
                     help="per stage (connect, helo, mail, rcpt, data, eoh, eom, unknown): "
                          "list of macro names to send instead of Postfix's defaults"),
}

_STAGE_KEYS = {"connect": "C", "helo": "H", "mail": "M", "rcpt": "R", "data": "T",
               "eoh": "N", "eom": "E", "unknown": "U"}
_REPLY_LINE = re.compile(r"^([245]\d\d)([ -]?)(.*)$")
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


def parse_reply(text: str) -> Reply:
    """An SMFIR_REPLYCODE text (``"550 5.7.1 Go away"``, multi-line with CRLF between
    ``550-...`` lines; libmilter's ``%%`` for ``%``) as a :class:`Reply`; a missing or
    mismatched enhanced code becomes ``X.7.1`` of the reply's class (RFC 3463).

    Raises:
        ValueError: not a 4xx/5xx reply.
    """
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln]
    if not lines:
        raise ValueError("empty reply")
    code: int | None = None
    enhanced: str | None = None
    out: list[str] = []
    for ln in lines:
        m = _REPLY_LINE.match(ln)
        if m is None or (code is not None and int(m.group(1)) != code):
            raise ValueError(f"malformed reply line {ln!r}")
        code = int(m.group(1))
        rest = m.group(3)
        e = _ENHANCED.match(rest)
        if e:
            if enhanced is None and e.group(1) == str(code)[0]:
                enhanced = f"{e.group(1)}.{e.group(2)}.{e.group(3)}"
            rest = rest[e.end():]
        out.append(rest.replace("%%", "%"))
    assert code is not None
    if code < 400:
        raise ValueError(f"reply code {code} is not 4xx/5xx")
    return Reply(code, enhanced or f"{str(code)[0]}.7.1", "\n".join(out) or "Command rejected")


def _result_for(reply: Reply, reason: str) -> HookResult:
    if reply.code == 421:
        return HookResult(Verdict.DENYSOFT_DISCONNECT, reply, reason=reason)
    verdict = Verdict.DENYSOFT if reply.is_transient else Verdict.DENY
    return HookResult(verdict, reply, reason=reason)


_REJECT = Reply(550, "5.7.1", "Command rejected")
_TEMPFAIL = Reply(451, "4.7.1", "Service unavailable - try again later")
_SHUTDOWN = Reply(421, "4.7.0", "Server closing connection")
_DEFAULT_REPLY = {
    "tempfail": Reply(451, "4.3.5", "Server configuration problem - try again later"),
    "reject": Reply(550, "5.5.0", "Service unavailable"),
}


@dataclass(slots=True)
class _Conn:
    """Per-session state of one milter (in ``session.notes``)."""

    client: MilterClient | None = None
    opened: bool = False
    failed: str = ""  # why the milter is out of use ("" while fine)
    done: bool = False  # accepted the session, or closed: send nothing more
    session_reply: HookResult | None = None  # rejected at connect/HELO: refuse MAIL
    discard_all: bool = False
    in_tx: bool = False  # MAIL sent, end of message not answered
    auth_type: str = ""


@dataclass(slots=True)
class _Tx:
    """Per-transaction state of one milter (in ``transaction.notes``)."""

    accepted: bool = False
    discard: bool = False
    events: list[str] = field(default_factory=list)


class _Milter:
    """One configured milter: the hooks of one ``[[plugin]]`` table."""

    def __init__(self, registry: PluginRegistry, options: dict[str, Any]) -> None:
        self.name = registry.name
        self.key = f"milter:{registry.name}"
        self.address = parse_socket(options["socket"])
        self.default_action: str = options["default_action"]
        self.connect_timeout: float = options["connect_timeout"]
        self.command_timeout: float = options["command_timeout"]
        self.content_timeout: float = options["content_timeout"]
        self.daemon_name: str = options["daemon_name"]
        self.quarantine_path: str = options["quarantine_path"]
        self.macro_names = dict(DEFAULT_MACROS)
        for key, names in options["macros"].items():
            self.macro_names[_STAGE_KEYS[key]] = tuple(names)

    # ------------------------------------------------------------------ state

    def conn(self, session: SessionInfo) -> _Conn:
        c = session.notes.get(self.key)
        if not isinstance(c, _Conn):
            c = _Conn()
            session.notes[self.key] = c
        return c

    def txstate(self, tx: Transaction) -> _Tx:
        t = tx.notes.get(self.key)
        if not isinstance(t, _Tx):
            t = _Tx()
            tx.notes[self.key] = t
        return t

    def macros(self, stage: str, session: SessionInfo, tx: Transaction | None = None,
               rcpt: Recipient | None = None) -> dict[str, str]:
        """Every macro value known at this point; the client picks the stage's list."""
        c = self.conn(session)
        client_name = session.peer_hostname or "unknown"
        v: dict[str, str] = {
            "j": session.hostname,
            "_": f"{client_name} [{session.peer_ip}]",
            "{daemon_name}": self.daemon_name,
            "{daemon_addr}": session.local_ip,
            "{daemon_port}": str(session.local_port) if session.local_port else "",
            "{if_name}": session.hostname,
            "{if_addr}": session.local_ip,
            "{client_addr}": session.peer_ip,
            "{client_port}": str(session.peer_port) if session.peer_port else "",
            "{client_name}": client_name,
            "{client_ptr}": client_name,
            "v": f"smtpgate {__version__}",
            "{tls_version}": session.tls_version or "",
            "{cipher}": session.tls_cipher or "",
            "{auth_type}": c.auth_type if session.auth_user else "",
            "{auth_authen}": session.auth_user or "",
        }
        if tx is not None:
            sender = tx.mail_from
            v["i"] = tx.id
            v["{mail_addr}"] = sender
            v["{mail_host}"] = sender.rpartition("@")[2] if "@" in sender else ""
            v["{mail_mailer}"] = "smtp" if sender else "local"
        if rcpt is not None:
            v["{rcpt_addr}"] = rcpt.address
            v["{rcpt_host}"] = rcpt.domain
            v["{rcpt_mailer}"] = "smtp"
        client = c.client
        if client is not None and client.macro_lists:
            return v  # the milter chose its macros (SMFIF_SETSYMLIST): the client filters
        return {k: v[k] for k in self.macro_names.get(stage, ()) if k in v}

    # ------------------------------------------------------------------- helpers

    def fail(self, c: _Conn, why: str, results: Any) -> HookResult | None:
        """The milter is unusable: log, record, close; the default action's verdict."""
        if not c.failed:
            log.warning("milter %s (%s): %s; default_action=%s", self.name, self.address,
                        why, self.default_action)
        c.failed = why or "failed"
        if c.client is not None:
            c.client.close()
        results.add(self.name, "error", action=self.default_action, error=why)
        return self.default_result()

    def default_result(self) -> HookResult | None:
        reply = _DEFAULT_REPLY.get(self.default_action)
        if reply is None:
            return None
        return _result_for(reply, f"milter {self.name} unavailable")

    async def ensure(self, session: SessionInfo) -> _Conn:
        """Open the connection and send the connect event once per session."""
        c = self.conn(session)
        if c.opened:
            return c
        c.opened = True
        client = MilterClient(self.address, connect_timeout=self.connect_timeout,
                              command_timeout=self.command_timeout,
                              content_timeout=self.content_timeout)
        c.client = client
        try:
            await client.open()
            family, address, port = "4", session.peer_ip, session.peer_port
            if ":" in address:
                family = "6"
            elif not address:
                family, port = "U", 0
            hostname = session.peer_hostname or f"[{session.peer_ip}]"
            resp = await client.event(
                codec.Connect(hostname, family, port, address),
                macros=self.macros("C", session), nosend=SMFIP.NOCONNECT,
                noreply=SMFIP.NR_CONN)
        except MilterError as exc:
            self.fail(c, str(exc), session.results)
            return c
        except asyncio.CancelledError:
            client.close()
            raise
        await self.session_response(c, resp, "connect", session)
        return c

    async def session_response(self, c: _Conn, resp: codec.Response | None, stage: str,
                               session: SessionInfo) -> HookResult | None:
        """A response at connect/HELO: accept ends the milter's part in the session;
        reject/tempfail/reply refuse this command and every later MAIL (the milter
        connection is closed: libmilter ends its session there)."""
        if resp is None or isinstance(resp, codec.Continue | codec.Skip):
            return None
        result = self.verdict(resp, stage, session.results)
        if isinstance(resp, codec.Discard):
            c.discard_all = True
            return None
        c.done = True
        if c.client is not None:
            await c.client.quit()
        if result is not None:
            c.session_reply = result
        return result

    def verdict(self, resp: codec.Response, stage: str, results: Any) -> HookResult | None:
        """Map a final response to the chain's verdict and record the finding."""
        reason = f"milter {self.name} {stage}"
        if isinstance(resp, codec.Continue | codec.Skip):
            return None
        if isinstance(resp, codec.Accept):
            results.add(self.name, "accept", stage=stage)
            return None
        if isinstance(resp, codec.Discard):
            results.add(self.name, "discard", stage=stage)
            return None
        if isinstance(resp, codec.Reject):
            reply = _REJECT
        elif isinstance(resp, codec.TempFail):
            reply = _TEMPFAIL
        elif isinstance(resp, codec.ConnFail | codec.Shutdown):
            reply = _SHUTDOWN
        elif isinstance(resp, codec.ReplyCode):
            reply = parse_reply(resp.text)  # ValueError: the caller's protocol error
        else:
            raise ValueError(f"unexpected {type(resp).__name__}")
        word = {codec.Reject: "reject", codec.TempFail: "tempfail", codec.ReplyCode: "reply"
                }.get(type(resp), "shutdown")
        results.add(self.name, word, stage=stage, reply=f"{reply.code} {reply.enhanced} "
                    f"{reply.text.splitlines()[0] if reply.text else ''}".rstrip())
        return _result_for(reply, reason)

    async def guarded(self, c: _Conn, results: Any,
                      work: Callable[[MilterClient], Awaitable[HookResult | None]]
                      ) -> HookResult | None:
        """Run ``work`` on the live client; milter trouble gives the default action."""
        if c.failed:
            return self.default_result()
        client = c.client
        if c.done or client is None or not client.connected:
            return None
        try:
            return await work(client)
        except MilterError as exc:
            return self.fail(c, str(exc), results)
        except ValueError as exc:  # a malformed reply, an invalid modification
            return self.fail(c, f"protocol error: {exc}", results)
        except asyncio.CancelledError:
            client.close()
            c.failed = "cancelled"
            raise

    # -------------------------------------------------------------------- hooks

    async def connect(self, session: SessionInfo) -> HookResult | None:
        c = await self.ensure(session)
        if c.failed:
            return None  # the default action applies from MAIL on (as Postfix)
        return c.session_reply

    async def helo(self, session: SessionInfo, helo_name: str) -> HookResult | None:
        c = await self.ensure(session)
        if c.failed:
            return None

        async def work(client: MilterClient) -> HookResult | None:
            resp = await client.event(codec.Helo(helo_name), macros=self.macros("H", session),
                                      nosend=SMFIP.NOHELO, noreply=SMFIP.NR_HELO)
            return await self.session_response(c, resp, "helo", session)

        return await self.guarded(c, session.results, work)

    def auth(self, session: SessionInfo, mechanism: str, username: str,
             success: bool) -> None:
        if success:
            self.conn(session).auth_type = mechanism

    async def mail(self, session: SessionInfo, tx: Transaction) -> HookResult | None:
        c = await self.ensure(session)
        if c.failed:
            tx.results.add(self.name, "error", action=self.default_action, error=c.failed)
            return self.default_result()
        if c.session_reply is not None:
            return c.session_reply
        t = self.txstate(tx)
        if c.discard_all:
            t.discard = True

        async def work(client: MilterClient) -> HookResult | None:
            if c.in_tx:
                await client.abort()
            c.in_tx = True
            args = [f"<{tx.mail_from}>"] + [
                k if v is None else f"{k}={v}" for k, v in tx.mail_params.items()]
            resp = await client.event(codec.Mail(tuple(args)),
                                      macros=self.macros("M", session, tx),
                                      nosend=SMFIP.NOMAIL, noreply=SMFIP.NR_MAIL)
            return self.tx_response(t, resp, "mail", tx)

        return await self.guarded(c, tx.results, work)

    def tx_response(self, t: _Tx, resp: codec.Response | None, stage: str,
                    tx: Transaction) -> HookResult | None:
        if resp is None:
            return None
        if isinstance(resp, codec.Accept):
            t.accepted = True
        elif isinstance(resp, codec.Discard):
            t.discard = True
        return self.verdict(resp, stage, tx.results)

    def skip_tx(self, c: _Conn, t: _Tx) -> bool:
        return (t.accepted or t.discard) and not c.failed

    async def rcpt(self, session: SessionInfo, tx: Transaction,
                   recipient: Recipient) -> HookResult | None:
        c = self.conn(session)
        t = self.txstate(tx)
        if self.skip_tx(c, t):
            return None

        async def work(client: MilterClient) -> HookResult | None:
            args = [f"<{recipient.address}>"] + [
                k if v is None else f"{k}={v}" for k, v in recipient.params.items()]
            resp = await client.event(codec.Rcpt(tuple(args)),
                                      macros=self.macros("R", session, tx, recipient),
                                      nosend=SMFIP.NORCPT, noreply=SMFIP.NR_RCPT)
            return self.tx_response(t, resp, "rcpt", tx)

        return await self.guarded(c, tx.results, work)

    async def data_start(self, session: SessionInfo, tx: Transaction) -> HookResult | None:
        c = self.conn(session)
        t = self.txstate(tx)
        if self.skip_tx(c, t):
            return None

        async def work(client: MilterClient) -> HookResult | None:
            resp = await client.event(codec.Data(), macros=self.macros("T", session, tx),
                                      nosend=SMFIP.NODATA, noreply=SMFIP.NR_DATA)
            return self.tx_response(t, resp, "data", tx)

        return await self.guarded(c, tx.results, work)

    async def data(self, session: SessionInfo, tx: Transaction) -> HookResult | None:
        c = self.conn(session)
        t = self.txstate(tx)
        if t.discard and not c.failed:
            self.discard(tx)
            return None
        if (t.accepted and not c.failed) or not tx.recipients:
            return None

        async def work(client: MilterClient) -> HookResult | None:
            async with asyncio.timeout(self.content_timeout * 3):
                return await self.content(client, c, t, session, tx)

        try:
            return await self.guarded(c, tx.results, work)
        except TimeoutError:
            return self.fail(c, "content phase timed out", tx.results)

    async def content(self, client: MilterClient, c: _Conn, t: _Tx, session: SessionInfo,
                      tx: Transaction) -> HookResult | None:
        leadspc = bool(client.protocol & SMFIP.HDR_LEADSPC)
        raw = tx.raw
        fields = header_fields(raw, len(tx.header_bytes))
        resp = await client.headers([(f.name, f.milter_value(leadspc)) for f in fields])
        if resp is None:
            resp = await client.event(codec.EndOfHeaders(), macros=self.macros("N", session, tx),
                                      nosend=SMFIP.NOEOH, noreply=SMFIP.NR_EOH)
        if resp is None or isinstance(resp, codec.Continue):
            resp = await client.body(tx.body)
        if resp is not None and not isinstance(resp, codec.Continue):
            return self.end(t, resp, tx, [])  # decided before the end of message
        eom = await client.end_of_message(self.macros("E", session, tx))
        c.in_tx = False
        return self.end(t, eom.final, tx, eom.modifications, leadspc)

    def end(self, t: _Tx, final: codec.Response, tx: Transaction,
            mods: list[codec.Response], leadspc: bool = False) -> HookResult | None:
        """The message's outcome: modifications applied only when it goes on."""
        if isinstance(final, codec.Discard):
            t.discard = True
            self.verdict(final, "eom", tx.results)
            self.discard(tx)
            return None
        if not isinstance(final, codec.Continue | codec.Accept):
            return self.verdict(final, "eom", tx.results)
        applied = apply_modifications(tx, mods, leading_space=leadspc)
        details: dict[str, Any] = {"stage": "eom"}
        if applied.changes:
            details["changes"] = applied.changes
        if applied.quarantine is not None:
            details["reason"] = applied.quarantine
            tx.results.add(self.name, "quarantine", **details)
            reason = f"milter {self.name} quarantine: {applied.quarantine}"
            if not self.quarantine_path:
                return HookResult(Verdict.DENYSOFT, Reply(
                    451, "4.7.1", "Message held for review - try again later"), reason=reason)
            return HookResult(Verdict.QUARANTINE, Reply(250, "2.0.0", "Message accepted"),
                              quarantine=self.quarantine_path, reason=reason)
        word = "accept" if isinstance(final, codec.Accept) else "continue"
        tx.results.add(self.name, word, **details)
        return None

    def discard(self, tx: Transaction) -> None:
        """SMFIR_DISCARD: accept the message, deliver it to nobody."""
        if self.name not in tx.results:
            tx.results.add(self.name, "discard", stage="eom")
        tx.recipients.clear()
        tx.set_reply(Reply(250, "2.0.0", "Message accepted"))

    async def unknown(self, session: SessionInfo, verb: str, line: str) -> HookResult | None:
        c = self.conn(session)

        async def work(client: MilterClient) -> HookResult | None:
            resp = await client.event(codec.Unknown(line), nosend=SMFIP.NOUNKNOWN,
                                      noreply=SMFIP.NR_UNKN)
            if resp is None or isinstance(resp, codec.Accept | codec.Discard):
                return None
            return self.verdict(resp, "unknown", session.results)

        if c.failed:
            return None
        return await self.guarded(c, session.results, work)

    async def rset(self, session: SessionInfo) -> None:
        c = self.conn(session)
        if c.in_tx and c.client is not None and c.client.connected and not c.failed:
            try:
                await c.client.abort()
                c.in_tx = False
            except MilterError as exc:
                self.fail(c, str(exc), session.results)

    async def quit(self, session: SessionInfo) -> None:
        c = self.conn(session)
        if c.client is not None:
            await c.client.quit()
        c.done = True


def register(registry: PluginRegistry, options: dict[str, Any]) -> None:
    """Register the milter's hooks on every stage it takes part in.

    Raises:
        OptionError: (through the options' checks) a malformed ``socket``, an unknown
            ``default_action``, a timeout that is not positive, an unknown stage in
            ``macros``.
    """
    from . import OptionError

    for key, names in options["macros"].items():
        if key not in _STAGE_KEYS:
            raise OptionError(f"macros.{key}", f"unknown stage (known: {', '.join(_STAGE_KEYS)})")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise OptionError(f"macros.{key}", "must be an array of macro names")
    m = _Milter(registry, options)
    base = registry.timeout or 0.0
    envelope_timeout = max(base, m.connect_timeout + 2 * m.command_timeout + 5)
    content_timeout = max(base, m.content_timeout * 3 + m.command_timeout + 5)
    registry.on("connect", m.connect, timeout=envelope_timeout)
    registry.on("helo", m.helo, timeout=envelope_timeout)
    registry.on("auth", m.auth)
    registry.on("mail", m.mail, timeout=envelope_timeout)
    registry.on("rcpt", m.rcpt, timeout=envelope_timeout)
    registry.on("data_start", m.data_start, timeout=envelope_timeout)
    registry.on("data", m.data, timeout=content_timeout)
    registry.on("unknown", m.unknown, timeout=envelope_timeout)
    registry.on("rset", m.rset, timeout=envelope_timeout)
    registry.on("quit", m.quit, timeout=envelope_timeout)
