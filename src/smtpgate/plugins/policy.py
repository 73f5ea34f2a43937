"""Shipped plugin ``policy``: a Postfix SMTP access policy delegation client
(Postfix ``check_policy_service``), for postgrey, postfix-policyd-spf-python,
policyd-rate-limit and any other policy server.

Entry points: :func:`register` (``[[plugin]] use = "policy"``), :class:`PolicyClient`
(the connection pool), :func:`parse_policy_address`, :func:`build_attributes` and
:func:`decide` (an action to a verdict). The wire format is in
:mod:`smtpgate.plugins.policy_codec` (sans I/O).

At the configured ``stage`` (connect, helo, mail, rcpt, data_start or data: Postfix's
``protocol_state`` CONNECT, HELO/EHLO, MAIL, RCPT, DATA, END-OF-MESSAGE) the plugin
sends the attributes Postfix sends and turns the server's action into a verdict;
docs/filters/policy.md has the whole action table. Connections are pooled (one
request at a time on each, many sessions in parallel), reused for up to ``max_ttl``
seconds / ``request_limit`` requests, dropped after ``max_idle`` seconds, and a failed
request is tried again on a fresh connection (``try_limit``). When the server cannot
be reached, times out or breaks the protocol, ``default_action`` applies
(``tempfail``: ``451 4.3.5 Server configuration problem``, as Postfix's
``smtpd_policy_service_default_action``). Every reply carries an RFC 3463 code.
SMTPD_POLICY_README (protocol), access(5) (actions), RFC 5321 §4.2, RFC 3463.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..reply import Reply
from ..results import Results
from . import Option, PluginRegistry, nonnegative, positive
from .policy_codec import (
    Action,
    ActionKind,
    AttributeReader,
    PolicyProtocolError,
    encode_request,
    parse_action,
    response_action,
    sanitize_value,
)

log = logging.getLogger("smtpgate.plugins.policy")

__all__ = [
    "OPTIONS",
    "PROTOCOL_STATES",
    "PolicyClient",
    "PolicyUnavailable",
    "build_attributes",
    "decide",
    "parse_policy_address",
    "register",
]

PRIORITY = 0
"""After relay control (-90): by default an ``OK`` cannot skip the relay check."""

STAGES = ("connect", "helo", "mail", "rcpt", "data_start", "data")
PROTOCOL_STATES: dict[str, str] = {
    "connect": "CONNECT", "helo": "EHLO", "mail": "MAIL", "rcpt": "RCPT",
    "data_start": "DATA", "data": "END-OF-MESSAGE",
}
"""Stage → Postfix ``protocol_state`` (helo: ``EHLO`` or ``HELO``, see
:func:`build_attributes`)."""

# Priorities of the plugin's helper hooks.
_EARLY = -100   # discard / redirect / prepend before the other message checks
_LATE = 100     # DEFER_IF_PERMIT at the end of the stage's chain; HOLD after the checks
_NOTE = "smtpgate.policy"


# ----------------------------------------------------------------------------- options


def parse_policy_address(address: str) -> tuple[str, int] | str:
    """Parse a policy server address.

    Accepted: ``127.0.0.1:10023``, ``inet:127.0.0.1:10023``, ``[::1]:10023``,
    ``inet:[::1]:10023``, ``localhost:10023``, ``unix:/path`` (Postfix's notations).

    Returns:
        ``(host, port)`` for TCP, the socket path for a Unix socket.

    Raises:
        ValueError: anything else (no port, port out of range, empty path).
    """
    if address.startswith("unix:"):
        path = address[5:]
        if not path.startswith("/"):
            raise ValueError(f"unix: needs an absolute socket path, got {address!r}")
        return path
    rest = address[5:] if address.startswith("inet:") else address
    if rest.startswith("["):
        host, sep, tail = rest[1:].partition("]")
        if not sep or not tail.startswith(":"):
            raise ValueError(f"malformed address {address!r}")
        port_s = tail[1:]
    else:
        host, sep, port_s = rest.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"address {address!r} needs host:port, [v6]:port or unix:/path")
    if not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError(f"malformed address {address!r}")
    return host, int(port_s)


def _check_address(value: str) -> str | None:
    try:
        parse_policy_address(value)
    except ValueError as exc:
        return str(exc)
    return None


def _choice(*allowed: str) -> Any:
    def check(value: str) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(allowed)}"
    return check


def _one_line(value: str) -> str | None:
    return None if "\n" not in value and "\x00" not in value else "must be one line"


OPTIONS: dict[str, Option] = {
    "address": Option(str, check=_check_address,
                      help="policy server: host:port, inet:host:port, [v6]:port, unix:/path"),
    "stage": Option(str, default="rcpt", check=_choice(*STAGES),
                    help="connect | helo | mail | rcpt | data_start | data"),
    "default_action": Option(str, default="tempfail",
                             check=_choice("tempfail", "accept", "reject"),
                             help="when the server fails: tempfail | accept | reject"),
    "max_idle": Option(float, default=300.0, check=positive,
                       help="seconds an idle connection is kept"),
    "max_ttl": Option(float, default=1000.0, check=positive,
                      help="seconds a connection is used for at most"),
    "request_limit": Option(int, default=0, check=nonnegative,
                            help="requests per connection (0: no limit)"),
    "try_limit": Option(int, default=2, check=positive,
                        help="attempts per request (Postfix smtpd_policy_service_try_limit)"),
    "retry_delay": Option(float, default=1.0, check=nonnegative,
                          help="seconds between attempts"),
    "max_connections": Option(int, default=20, check=positive,
                              help="connections to the server at most (the pool)"),
    "policy_context": Option(str, default="", check=_one_line,
                             help="sent as policy_context (Postfix 3.1)"),
    "quarantine": Option(str, default="",
                         help="Maildir for messages the server puts on HOLD"),
    "relay_decider": Option(bool, default=False,
                            help="this policy server decides relaying: its OK may skip "
                                 "relay control"),
}


# ----------------------------------------------------------------------------- client


class PolicyUnavailable(Exception):
    """The policy server could not answer (connection, timeout or protocol failure)."""


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    born: float
    used: float
    requests: int = 0
    parser: AttributeReader = field(default_factory=AttributeReader)

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # pragma: no cover - closing a broken transport
            pass


class _Pool:
    """The connections of one event loop: the idle ones and a bound on all of them."""

    def __init__(self, size: int) -> None:
        self.idle: collections.deque[_Conn] = collections.deque()
        self.slots = asyncio.Semaphore(size)


class PolicyClient:
    """A pool of connections to one policy server.

    Each connection carries one request at a time; a session takes an idle connection
    or opens a new one (at most ``max_connections``, further requests wait), so
    sessions are not serialised. A connection is closed after ``max_idle`` seconds
    unused, ``max_ttl`` seconds of age or ``request_limit`` requests. A request that
    fails (refused, reset, closed, timed out, malformed reply) closes its connection
    and is tried again on a new one, up to ``try_limit`` attempts ``retry_delay``
    seconds apart (Postfix's policy client settings). One pool per event loop.

    Args:
        address: as :func:`parse_policy_address` returns it.
        timeout: seconds per attempt (connect + request + reply).
        max_idle, max_ttl: seconds.
        request_limit: requests per connection, 0 for no limit.
        try_limit: attempts per request, >= 1.
        retry_delay: seconds between attempts.
        max_connections: size of the pool.
    """

    def __init__(self, address: tuple[str, int] | str, *, timeout: float = 100.0,
                 max_idle: float = 300.0, max_ttl: float = 1000.0, request_limit: int = 0,
                 try_limit: int = 2, retry_delay: float = 1.0,
                 max_connections: int = 20) -> None:
        self.address = address
        self.timeout = timeout
        self.max_idle = max_idle
        self.max_ttl = max_ttl
        self.request_limit = request_limit
        self.try_limit = max(1, try_limit)
        self.retry_delay = retry_delay
        self.max_connections = max_connections
        self.connects = 0
        """Connections opened so far (all loops; for tests and logs)."""
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pool] = (
            weakref.WeakKeyDictionary())

    @property
    def label(self) -> str:
        """The address as text (``127.0.0.1:10023``, ``unix:/path``)."""
        a = self.address
        if isinstance(a, str):
            return f"unix:{a}"
        return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"

    def _pool(self) -> _Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = self._pools[loop] = _Pool(self.max_connections)
        return pool

    async def request(self, attributes: Mapping[str, str]) -> str:
        """Send one request; return the server's action text.

        Raises:
            PolicyUnavailable: every attempt failed (the last error is the cause).
            PolicyProtocolError: ``attributes`` cannot be encoded (a bug of the caller).
        """
        data = encode_request(attributes)
        last: BaseException | None = None
        for attempt in range(self.try_limit):
            if attempt:
                await asyncio.sleep(self.retry_delay)
            try:
                return await self._attempt(data)
            except (OSError, TimeoutError, EOFError, PolicyProtocolError,
                    asyncio.IncompleteReadError) as exc:
                last = exc
                log.warning("policy server %s: attempt %d/%d failed: %s", self.label,
                            attempt + 1, self.try_limit, _describe(exc))
        raise PolicyUnavailable(_describe(last)) from last

    async def _attempt(self, data: bytes) -> str:
        pool = self._pool()
        async with asyncio.timeout(self.timeout):
            conn = await self._acquire(pool)
            ok = False
            try:
                conn.writer.write(data)
                await conn.writer.drain()
                action = await self._read_reply(conn)
                ok = True
                return action
            finally:
                self._release(pool, conn, ok)

    async def _read_reply(self, conn: _Conn) -> str:
        while True:
            chunk = await conn.reader.read(65536)
            if not chunk:
                raise EOFError("the server closed the connection without replying")
            records = conn.parser.feed(chunk)
            if records:
                if len(records) > 1 or conn.parser.pending:
                    raise PolicyProtocolError("more than one reply to one request")
                return response_action(records[0])

    async def _acquire(self, pool: _Pool) -> _Conn:
        await pool.slots.acquire()
        now = time.monotonic()
        while pool.idle:
            conn = pool.idle.pop()  # the most recently used one
            if (now - conn.used > self.max_idle or now - conn.born > self.max_ttl
                    or conn.reader.at_eof() or conn.writer.is_closing()):
                conn.close()
                continue
            return conn
        try:
            return await self._open()
        except BaseException:
            pool.slots.release()
            raise

    async def _open(self) -> _Conn:
        address = self.address
        if isinstance(address, str):
            reader, writer = await asyncio.open_unix_connection(address)
        else:
            reader, writer = await asyncio.open_connection(address[0], address[1])
        self.connects += 1
        now = time.monotonic()
        return _Conn(reader, writer, now, now)

    def _release(self, pool: _Pool, conn: _Conn, ok: bool) -> None:
        conn.requests += 1
        conn.used = time.monotonic()
        if ok and not (self.request_limit and conn.requests >= self.request_limit):
            pool.idle.append(conn)
        else:
            conn.close()
        pool.slots.release()

    def close(self) -> None:
        """Close the idle connections of every loop (busy ones close when released)."""
        for pool in list(self._pools.values()):
            while pool.idle:
                pool.idle.pop().close()


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no attempt made"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ----------------------------------------------------------------------------- attributes


def _tx_instance(session: SessionInfo, tx: Transaction | None) -> str:
    return tx.id if tx is not None else f"{session.session_id}.0"


def _xtext_decode(value: str) -> str:
    return re.sub(r"\+([0-9A-Fa-f]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _cn(subject: str) -> str:
    for part in subject.split(","):
        key, _, val = part.strip().partition("=")
        if key in ("commonName", "CN"):
            return val
    return subject


def build_attributes(stage: str, session: SessionInfo, tx: Transaction | None = None,
                     recipient: Recipient | None = None, helo_name: str | None = None,
                     policy_context: str = "") -> dict[str, str]:
    """The request Postfix's smtpd sends at ``stage`` (SMTPD_POLICY_README, "Protocol
    description"), from what smtpgate knows.

    Unknown values are sent empty (``client_name``/``reverse_client_name``:
    ``unknown``, ``size``/``encryption_keysize``/``recipient_count``: ``0``), as Postfix
    does. ``instance`` is the transaction id (the same for every request of one
    transaction; ``SESSION.0`` before MAIL). ``recipient`` is the recipient at RCPT, and at
    DATA/END-OF-MESSAGE only when there is exactly one. ``size`` is MAIL's SIZE, at
    END-OF-MESSAGE the message size. At the helo stage ``protocol_state`` is ``EHLO``
    (``HELO`` when the session already spoke HELO): the helo hook is not told which
    command it is.

    Returns:
        Attribute name → value, in Postfix's order, every value one line.
    """
    esmtp = session.esmtp if session.helo_name is not None else True
    state = PROTOCOL_STATES[stage]
    if stage == "helo":
        state = "EHLO" if esmtp else "HELO"
    helo = helo_name if helo_name is not None else (session.helo_name or "")
    sender = rcpt = queue_id = size = ""
    count = 0
    sasl_sender = ""
    if tx is not None:
        sender = tx.mail_from
        queue_id = tx.id
        size = tx.mail_params.get("SIZE") or ""
        auth = tx.mail_params.get("AUTH")
        if auth and auth != "<>":
            sasl_sender = _xtext_decode(auth)
        if stage in ("data_start", "data"):
            count = len(tx.recipients)
            if count == 1:
                rcpt = tx.recipients[0].address
            if stage == "data":
                size = str(tx.size)
    if recipient is not None:
        rcpt = recipient.address
    peer_cert = str(session.notes.get("tls_peer") or "")
    attrs = {
        "request": "smtpd_access_policy",
        "protocol_state": state,
        "protocol_name": "ESMTP" if esmtp else "SMTP",
        "client_address": session.peer_ip,
        "client_name": session.peer_hostname or "unknown",
        "client_port": str(session.peer_port),
        "reverse_client_name": session.peer_hostname or "unknown",
        "server_address": session.local_ip,
        "server_port": str(session.local_port),
        "helo_name": helo,
        "sender": sender,
        "recipient": rcpt,
        "recipient_count": str(count),
        "queue_id": queue_id,
        "instance": _tx_instance(session, tx),
        "size": size or "0",
        "etrn_domain": "",
        "stress": "",
        "sasl_method": str(session.notes.get(f"{_NOTE}.sasl_method") or "")
        if session.auth_user else "",
        "sasl_username": session.auth_user or "",
        "sasl_sender": sasl_sender,
        "ccert_subject": _cn(peer_cert) if peer_cert else "",
        "ccert_issuer": "",
        "ccert_fingerprint": "",
        "ccert_pubkey_fingerprint": "",
        "encryption_protocol": session.tls_version or "",
        "encryption_cipher": session.tls_cipher or "",
        "encryption_keysize": "0",
        "policy_context": policy_context,
    }
    return {k: sanitize_value(v) for k, v in attrs.items()}


# ----------------------------------------------------------------------------- decisions

_CLASS = {  # Postfix's reply classes per stage
    "connect": "Client host rejected", "helo": "Helo command rejected",
    "mail": "Sender address rejected", "rcpt": "Recipient address rejected",
    "data_start": "Data command rejected", "data": "End-of-data rejected",
}
_REJECT_CODE = {"connect": 554, "data_start": 554, "data": 550}
_DEFER_CODE = {"connect": 421, "data_start": 451, "data": 451}


def _reply_name(stage: str, session: SessionInfo, tx: Transaction | None,
                recipient: Recipient | None, helo_name: str | None) -> str:
    if stage == "connect":
        return f"{session.peer_hostname or 'unknown'}[{session.peer_ip}]"
    if stage == "helo":
        return helo_name or ""
    if stage == "mail":
        return tx.mail_from if tx is not None else ""
    if stage == "rcpt":
        return recipient.address if recipient is not None else ""
    return "DATA" if stage == "data_start" else "END-OF-MESSAGE"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the plugin does with one action.

    Attributes:
        result: the verdict for this hook.
        finding: the word recorded in ``results`` (``dunno``, ``reject``, ...).
        defer_if_permit: a 4xx reply to send at the end of the stage's chain, if
            nothing rejected before.
        prepend: a header line to add to the message.
        hold, discard: put the message in quarantine / drop it.
        redirect: the address replacing every recipient.
    """

    result: HookResult
    finding: str
    defer_if_permit: Reply | None = None
    prepend: str | None = None
    hold: bool = False
    discard: bool = False
    redirect: str | None = None


_CONT = HookResult(Verdict.CONT)
_HEADER_LINE = re.compile(r"([\x21-\x39\x3b-\x7e]+):[ \t]?(.*)", re.S)


def _reply(code: int, enhanced: str | None, text: str, default_detail: str) -> Reply:
    cls = str(code)[0]
    if enhanced is None:
        enhanced = f"{cls}.7.1"
    elif enhanced[0] != cls:  # a class that contradicts the code: keep the detail
        enhanced = cls + enhanced[1:]
    return Reply(code, enhanced, (text or default_detail).replace("\r", " "))


def _denial(code: int, reply: Reply) -> HookResult:
    if code in (421, 521):
        verdict = Verdict.DENYSOFT_DISCONNECT if code == 421 else Verdict.DENY_DISCONNECT
    else:
        verdict = Verdict.DENYSOFT if code < 500 else Verdict.DENY
    return HookResult(verdict, reply, reason="policy server")


def failure_result(stage: str, default_action: str) -> HookResult:
    """The verdict when the server fails: ``tempfail`` → ``451 4.3.5 Server
    configuration problem`` (421 at connect), ``reject`` → ``550 5.3.5`` (554 at
    connect and DATA), ``accept`` → CONT (no opinion)."""
    if default_action == "accept":
        return _CONT
    if default_action == "reject":
        code = _REJECT_CODE.get(stage, 550)
        return _denial(code, Reply(code, "5.3.5", "Server configuration problem"))
    code = 421 if stage == "connect" else 451
    return _denial(code, Reply(code, "4.3.5", "Server configuration problem"))


def decide(action: Action, stage: str, reply_name: str, default_action: str,
           can_hold: bool) -> Decision:
    """Map a parsed action to what the plugin does at ``stage`` (see
    docs/filters/policy.md for the table and the reasons).

    Args:
        action: from :func:`~smtpgate.plugins.policy_codec.parse_action`.
        stage: one of :data:`STAGES`.
        reply_name: what the reply names (``<bob@example.com>: Recipient address
            rejected: ...``), as Postfix words its replies.
        default_action: for an action smtpgate cannot perform.
        can_hold: a ``quarantine`` Maildir is configured (HOLD possible).

    Never raises.
    """
    kind = action.kind
    cls = _CLASS[stage]
    prefix = f"<{reply_name}>: {cls}: "
    if kind is ActionKind.OK:
        return Decision(HookResult(Verdict.OK), "ok")
    if kind is ActionKind.DUNNO:
        return Decision(_CONT, "dunno")
    if kind is ActionKind.REJECT:
        code = _REJECT_CODE.get(stage, 550)
        reply = _reply(code, action.enhanced, prefix + (action.text or "Access denied"), "")
        return Decision(_denial(code, reply), "reject")
    if kind is ActionKind.DEFER:
        code = _DEFER_CODE.get(stage, 450)
        reply = _reply(code, action.enhanced,
                       prefix + (action.text or "Service temporarily unavailable"), "")
        return Decision(_denial(code, reply), "defer")
    if kind is ActionKind.CODE:
        code = action.code
        if stage == "connect" and 400 <= code < 500:
            code = 421  # RFC 5321 §3.1: the only 4xx greeting
        reply = _reply(code, action.enhanced, prefix + action.text, "")
        return Decision(_denial(code, reply), "reject" if code >= 500 else "defer")
    if kind is ActionKind.DEFER_IF_PERMIT:
        code = _DEFER_CODE.get(stage, 450)
        reply = _reply(code, action.enhanced,
                       prefix + (action.text or "Service temporarily unavailable"), "")
        return Decision(_CONT, "defer_if_permit", defer_if_permit=reply)
    if kind is ActionKind.DEFER_IF_REJECT:
        return Decision(_CONT, "defer_if_reject")
    if kind is ActionKind.PREPEND:
        if not _HEADER_LINE.fullmatch(action.text.rstrip()):
            log.warning("policy server answered PREPEND with a malformed header %r: "
                        "ignored (DUNNO)", action.text[:200])
            return Decision(_CONT, "prepend_invalid")
        return Decision(_CONT, "prepend", prepend=action.text.rstrip())
    if kind is ActionKind.DISCARD:
        return Decision(HookResult(Verdict.OK), "discard", discard=True)
    if kind is ActionKind.HOLD:
        if not can_hold:
            log.warning("policy server answered HOLD but no quarantine Maildir is "
                        "configured: default_action %s applies", default_action)
            return Decision(failure_result(stage, default_action), "hold_unavailable")
        return Decision(_CONT, "hold", hold=True)
    if kind is ActionKind.REDIRECT:
        return Decision(_CONT, "redirect", redirect=action.text.strip().strip("<>"))
    if kind in (ActionKind.FILTER, ActionKind.BCC, ActionKind.DELAY):
        log.warning("policy server answered %s, which smtpgate does not perform: "
                    "ignored (DUNNO)", action.raw[:200])
        return Decision(_CONT, kind.value + "_unsupported")
    if kind is ActionKind.WARN:
        log.warning("policy server: WARN %s", action.text[:500])
        return Decision(_CONT, "warn")
    if kind is ActionKind.INFO:
        log.info("policy server: INFO %s", action.text[:500])
        return Decision(_CONT, "info")
    log.warning("policy server answered an unknown action %r: default_action %s applies",
                action.raw[:200], default_action)
    return Decision(failure_result(stage, default_action), "unknown")


# ----------------------------------------------------------------------------- the plugin


def _relay_settings(registry: PluginRegistry) -> tuple[bool, int]:
    """(relay control enabled, its priority)."""
    enabled, priority = True, -90
    for table in registry.config.plugins:
        if table.use == "relay":
            enabled = table.enabled
            if table.priority_set:
                priority = table.priority
    return enabled, priority


def register(registry: PluginRegistry, options: dict[str, Any]) -> None:
    """Register the policy hook at ``stage`` and the helper hooks that carry out
    DEFER_IF_PERMIT, PREPEND, HOLD, DISCARD and REDIRECT.

    At ``rcpt`` the plugin counts as deciding relaying (for the loader's open-relay
    guard) only with ``relay_decider = true``.
    """
    stage: str = options["stage"]
    default_action: str = options["default_action"]
    relay_decider: bool = options["relay_decider"]
    quarantine: str = options["quarantine"]
    context: str = options["policy_context"]
    name = registry.name
    # The table's common ``timeout`` key is the request timeout (Postfix
    # smtpd_policy_service_timeout, default 100 s); the hook's own limit covers every try.
    timeout = registry.timeout if registry.timeout is not None else 100.0
    client = PolicyClient(
        parse_policy_address(options["address"]), timeout=timeout,
        max_idle=options["max_idle"], max_ttl=options["max_ttl"],
        request_limit=options["request_limit"], try_limit=options["try_limit"],
        retry_delay=options["retry_delay"], max_connections=options["max_connections"])
    registry.provide(f"policy:{name}", client)

    relay_on, relay_priority = _relay_settings(registry)
    # Postgrey or policyd-spf answer DUNNO/OK for anyone: such a server never makes up
    # for disabled relay control unless the administrator says it decides relaying.
    registry.decides_relay = relay_decider or stage != "rcpt"
    # An OK must not skip relay control unless the server is trusted to decide relaying.
    # (Equal priorities: relay control, a built-in, is registered first and runs first.)
    ok_may_skip_relay = relay_decider or stage != "rcpt" or not relay_on or \
        registry.priority >= relay_priority
    session_wide = stage in ("connect", "helo")
    hook_timeout = timeout * options["try_limit"] + \
        options["retry_delay"] * (options["try_limit"] - 1) + 5.0

    def state_of(session: SessionInfo, tx: Transaction | None) -> dict[str, Any]:
        """Per-transaction (or per-session for connect/helo) state of this plugin."""
        notes = session.notes if (session_wide or tx is None) else tx.notes
        key = f"{_NOTE}:{name}"
        st = notes.get(key)
        if st is None:
            st = notes[key] = {"prepend": [], "defer": None, "hold": False,
                               "discard": False, "redirect": None}
        return st

    def results_of(session: SessionInfo, tx: Transaction | None) -> Results:
        return tx.results if tx is not None else session.results

    async def ask(session: SessionInfo, tx: Transaction | None,
                  recipient: Recipient | None = None,
                  helo_name: str | None = None) -> HookResult:
        attrs = build_attributes(stage, session, tx, recipient, helo_name, context)
        results = results_of(session, tx)
        details: dict[str, Any] = {"stage": stage}
        if recipient is not None:
            details["rcpt"] = recipient.address
        try:
            raw_action = await client.request(attrs)
        except PolicyUnavailable as exc:
            log.error("policy server %s failed (session %s): %s; default_action %s",
                      client.label, session.session_id, exc, default_action)
            results.add(name, "error", **details, error=str(exc)[:200],
                        default_action=default_action)
            return failure_result(stage, default_action)
        action = parse_action(raw_action)
        reply_name = _reply_name(stage, session, tx, recipient, helo_name)
        decision = decide(action, stage, reply_name, default_action, bool(quarantine))
        log.info("policy server %s session=%s stage=%s action=%r -> %s", client.label,
                 session.session_id, stage, raw_action[:200], decision.finding)
        results.add(name, decision.finding, **details, action=raw_action[:200])
        st = state_of(session, tx)
        if decision.defer_if_permit is not None:
            st["defer"] = decision.defer_if_permit
        if decision.prepend is not None:
            if stage == "data" and tx is not None:
                _prepend(tx, decision.prepend)
            else:
                st["prepend"].append(decision.prepend)
        if decision.hold:
            st["hold"] = True
        if decision.redirect:
            st["redirect"] = decision.redirect
            if stage == "data" and tx is not None:
                _redirect(tx, decision.redirect)
        if decision.discard:
            st["discard"] = True
            if stage == "data" and tx is not None:
                return _discard(tx)
        result = decision.result
        if result.verdict is Verdict.OK and not ok_may_skip_relay:
            log.info("policy server answered OK at rcpt before relay control: treated as "
                     "DUNNO (set relay_decider = true to let it decide relaying)")
            return _CONT
        return result

    # -- the policy hook at the configured stage

    if stage == "connect":
        async def connect(session: SessionInfo) -> HookResult:
            return await ask(session, None)
        registry.on("connect", connect, timeout=hook_timeout)
    elif stage == "helo":
        async def helo(session: SessionInfo, helo_name: str) -> HookResult:
            return await ask(session, None, helo_name=helo_name)
        registry.on("helo", helo, timeout=hook_timeout)
    elif stage == "rcpt":
        async def rcpt(session: SessionInfo, tx: Transaction, recipient: Recipient
                       ) -> HookResult:
            st = state_of(session, tx)
            st["defer"] = None  # DEFER_IF_PERMIT is per RCPT command
            return await ask(session, tx, recipient)
        registry.on("rcpt", rcpt, timeout=hook_timeout)
    else:
        async def check(session: SessionInfo, tx: Transaction) -> HookResult:
            if stage != "mail":
                st = state_of(session, tx)
                st["defer"] = None
            return await ask(session, tx)
        check.__name__ = stage
        registry.on(stage, check, timeout=hook_timeout)

    # -- DEFER_IF_PERMIT: at the end of the same stage's chain

    def defer_if_permit(session: SessionInfo, *args: Any) -> HookResult | None:
        tx = args[0] if args and isinstance(args[0], Transaction) else None
        st = state_of(session, tx)
        reply: Reply | None = st["defer"]
        if reply is None:
            return None
        st["defer"] = None
        return _denial(reply.code, reply)

    registry.on(stage, defer_if_permit, priority=_LATE)

    # -- the message: DISCARD, REDIRECT and PREPEND first, HOLD after the other checks

    def message_first(session: SessionInfo, tx: Transaction) -> HookResult | None:
        st = state_of(session, tx)
        if st["discard"]:
            return _discard(tx)
        if st["redirect"]:
            _redirect(tx, st["redirect"])
        for line in st["prepend"]:
            _prepend(tx, line)
        if not session_wide:
            st["prepend"] = []
        return None

    def hold(session: SessionInfo, tx: Transaction) -> HookResult | None:
        st = state_of(session, tx)
        if not st["hold"] or not quarantine:
            return None
        return HookResult(Verdict.QUARANTINE, Reply(250, "2.0.0", "Message accepted"),
                          quarantine=quarantine, reason="policy server HOLD")

    if stage != "data":  # at END-OF-MESSAGE the policy hook applies them itself
        registry.on("headers", message_first, priority=_EARLY)
    registry.on("data", hold, priority=_LATE)

    def auth(session: SessionInfo, mechanism: str, username: str, success: bool) -> None:
        """Remember the SASL mechanism for ``sasl_method`` (SessionInfo has only the user)."""
        if success:
            session.notes[f"{_NOTE}.sasl_method"] = mechanism

    registry.on("auth", auth, priority=_LATE)


def _prepend(tx: Transaction, line: str) -> None:
    header, _, value = line.partition(":")
    try:
        tx.add_header(header.strip(), value.strip(), prepend=True)
    except (ValueError, RuntimeError) as exc:
        log.warning("policy PREPEND %r not added: %s", line[:200], exc)


def _redirect(tx: Transaction, address: str) -> None:
    """Postfix REDIRECT: the message goes to ``address`` instead of its recipients."""
    if [r.address for r in tx.recipients] == [address]:
        return
    try:
        tx.add_recipient(address)
    except (ValueError, TypeError) as exc:
        log.warning("policy REDIRECT to %r not done: %s", address[:200], exc)
        return
    while len(tx.recipients) > 1:
        tx.delete_recipient(0)


def _discard(tx: Transaction) -> HookResult:
    while tx.recipients:
        tx.delete_recipient(0)
    tx.set_reply(Reply(250, "2.0.0", "Message accepted"))
    return HookResult(Verdict.OK)
