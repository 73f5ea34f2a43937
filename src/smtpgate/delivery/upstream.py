"""Relay to one upstream SMTP server, with a pool of idle connections.

Entry point: :class:`UpstreamDelivery`: ``open_transaction`` (proxy mode: MAIL, each RCPT and
the data forwarded as the client sends them, :class:`UpstreamTransaction`), ``deliver`` (one
atomic transaction, e.g. ``smtpgate send``) and ``deliver_recipients`` (per-recipient replies,
queue mode), built on :mod:`.outbound`. RFC 5321 §3.3, RFC 3207, 8314,
4954/4616, 1870 SIZE, 6152 8BITMIME, 6531 SMTPUTF8, 3461 DSN, 8689 REQUIRETLS.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiosmtplib

from ..envelope import Envelope, Recipient, SessionInfo
from ..errors import (
    ConfigError,
    DeliveryError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
)
from ..message import Message
from ..reply import Reply
from .outbound import (
    BAD_ADDRESS,
    BAD_RECIPIENT,
    BAD_SENDER,
    BINARY_UNSUPPORTED,
    NETWORK_ERRORS,
    REQUIRETLS_UNAVAILABLE,
    SMTPUTF8_UNSUPPORTED,
    AuthFailed,
    Connector,
    OutboundConnection,
    RecipientResults,
    StaleConnection,
    TlsPolicyError,
    close_connection,
    connection_failure,
    deliver_per_recipient,
    describe_error,
    mail_options,
    remote_reply,
    reset,
    send_data,
    send_envelope,
    send_mail,
    send_rcpt,
    split_enhanced,
)
from .url import RelayUrl, parse_relay_url

__all__ = [
    "BINARY_UNSUPPORTED",
    "REQUIRETLS_UNAVAILABLE",
    "SMTPUTF8_UNSUPPORTED",
    "RecipientResults",
    "UpstreamDelivery",
    "UpstreamTransaction",
    "client_reply",
    "upstream_reply",
]

log = logging.getLogger("smtpgate.delivery.upstream")

#: Our credentials for the upstream were refused: our configuration problem.
UPSTREAM_AUTH_FAILED = Reply(451, "4.7.0", "Upstream authentication failed, try again later")
SHUTTING_DOWN = Reply(451, "4.3.2", "Delivery is shutting down, try again later")
NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")

_HELO_NAME = re.compile(r"^[A-Za-z0-9.\-_:\[\]]{1,255}$")
_NETWORK_ERRORS = NETWORK_ERRORS
_Conn = OutboundConnection


def upstream_reply(code: int, message: str, what: str) -> Reply:
    """Turn an upstream failure reply into the reply for our client.

    The upstream's enhanced status code (RFC 3463) is taken from the start of its
    text when present and of the same class, else ``4.0.0`` / ``5.0.0``. A 421
    becomes 451 (the client's session is not closing); anything outside 4xx/5xx
    becomes 451 4.0.0.

    Args:
        code: the upstream reply code.
        message: the upstream reply text (aiosmtplib joins lines with ``\\n``).
        what: our prefix, e.g. ``"Upstream refused <a@b>"``.

    Returns:
        ``Reply(code, enhanced, "<what>: <code> <enhanced> <upstream text>")``.
    """
    enhanced, text = split_enhanced(message)
    shown = f"{code} {enhanced} {text}" if enhanced else f"{code} {text}"
    if not 400 <= code < 600:
        out_code, cls = 451, "4"
    else:
        out_code, cls = (451 if code == 421 else code), str(code)[0]
    if enhanced is None or enhanced[0] != cls:
        enhanced = f"{cls}.0.0"
    return Reply(out_code, enhanced, f"{what}: {shown.strip()}")


def client_reply(code: int, message: str) -> Reply:
    """The upstream's reply, passed to our client as it is (proxy mode, RFC 5321 §4.2).

    The code and the RFC 3463 enhanced code are the upstream's (``X.0.0`` of the same
    class when it gave none). A 421 becomes 451 (the upstream is closing, not our
    session with the client); a code outside 2xx/4xx/5xx becomes ``451 4.0.0``.

    Args:
        code: the upstream reply code.
        message: the upstream reply text (lines joined with ``\\n``).

    Returns:
        The :class:`Reply` for the client.
    """
    reply = remote_reply(code, message)
    if reply.code == 421:
        return Reply(451, reply.enhanced, reply.text)
    return reply


def _error(reply: Reply, detail: str = "") -> DeliveryError:
    cls = TemporaryDeliveryError if reply.is_transient else PermanentDeliveryError
    return cls(reply, detail) if detail else cls(reply)


def _raise_upstream(code: int, message: str, what: str) -> DeliveryError:
    reply = upstream_reply(code, message, what)
    cls = TemporaryDeliveryError if reply.is_transient else PermanentDeliveryError
    return cls(reply)


class UpstreamDelivery:
    """Relay each transaction to one upstream SMTP server.

    ``open_transaction`` is the proxy-mode path used by the SMTP session: the
    upstream transaction follows the client's (see :class:`UpstreamTransaction`).
    ``deliver`` (one whole transaction at once) returns only after the upstream
    accepted the message (its 250 to DATA); if the upstream refuses any
    recipient, the transaction is reset (RSET) and nothing is sent to anyone.
    ESMTP parameters are passed on when the upstream advertises the matching
    extension. An 8-bit body is sent as
    is to an upstream without 8BITMIME (like Postfix). ``deliver_recipients``
    (the queue path) reports one reply per recipient instead.

    Idle connections (already through STARTTLS and AUTH) are kept in a small
    pool. Each connection carries one transaction at a time; a connection idle
    for ``probe_after`` seconds is probed with RSET before reuse, and a pooled
    connection found dead at MAIL is replaced by a fresh one (nothing was sent).

    Args:
        url: the relay URL (:class:`RelayUrl` or its text), not ``discard:``.
        timeout: per-command and connect timeout, seconds.
        helo_name: our EHLO name.
        cafile: PEM CA bundle used instead of the system CAs to verify the
            upstream certificate (``smtp+starttls``, ``smtps``, ``plain``).
        pool_size: most idle connections kept (0 disables reuse).
        idle_timeout: close an idle connection after this many seconds.
        probe_after: RSET-probe a connection idle at least this long, seconds.
        max_age: do not reuse a connection older than this, seconds.
        max_uses: do not reuse a connection after this many transactions.

    Raises:
        ConfigError: bad URL, ``discard:``, or an invalid ``helo_name``.
    """

    def __init__(
        self,
        url: RelayUrl | str,
        *,
        timeout: float = 60.0,
        helo_name: str = "localhost",
        cafile: str | None = None,
        pool_size: int = 32,
        idle_timeout: float = 30.0,
        probe_after: float = 5.0,
        max_age: float = 300.0,
        max_uses: int = 100,
    ) -> None:
        self.url = parse_relay_url(url) if isinstance(url, str) else url
        if self.url.is_discard:
            raise ConfigError("relay URL 'discard:' has no upstream; use DiscardDelivery")
        if not _HELO_NAME.match(helo_name):
            raise ConfigError(f"helo_name {helo_name[:80]!r}: not a valid host name")
        self.timeout = timeout
        self.helo_name = helo_name
        self.cafile = cafile
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self.probe_after = probe_after
        self.max_age = max_age
        self.max_uses = max_uses
        self._idle: list[_Conn] = []
        self._busy: set[_Conn] = set()
        self._closed = False
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._connector = Connector(helo_name=helo_name, timeout=timeout, cafile=cafile)

    def __repr__(self) -> str:
        return f"UpstreamDelivery({self.url.redacted()!r})"

    # -- connection set-up --------------------------------------------------------

    @property
    def connections_opened(self) -> int:
        """TCP connections opened so far (metrics and tests)."""
        return self._connector.connections_opened

    async def _open(self) -> _Conn:
        """Connect, EHLO, STARTTLS per policy, AUTH. Raises network errors / AuthFailed."""
        url = self.url
        return await self._connector.open(
            url.host,
            url.port,
            tls=url.tls,
            verify=url.verify,
            username=url.username,
            password=url.password,
            auth_mechanism=url.auth_mechanism,
            label=url.host_port,
        )

    async def _connect(self) -> _Conn:
        """Open a fresh connection, mapping every failure to a DeliveryError."""
        try:
            return await self._open()
        except AuthFailed as exc:
            log.error(
                "AUTHENTICATION TO UPSTREAM %s FAILED as user %r: %s -- check the relay "
                "credentials",
                self.url.host_port,
                self.url.username,
                exc,
            )
            raise TemporaryDeliveryError(UPSTREAM_AUTH_FAILED, "upstream AUTH failed") from None
        except TlsPolicyError as exc:
            log.error(
                "UPSTREAM %s DOES NOT SATISFY THE RELAY URL'S TLS REQUIREMENT (%s): %s -- "
                "check the relay URL and the upstream's TLS set-up",
                self.url.host_port,
                self.url.scheme,
                exc.detail,
            )
            raise TemporaryDeliveryError(exc.reply(), "upstream TLS requirement") from None
        except _NETWORK_ERRORS as exc:
            reply = connection_failure(self.url.host_port, describe_error(exc))
            log.warning("upstream %s unreachable: %s", self.url.host_port, reply.text)
            raise TemporaryDeliveryError(reply, "upstream unreachable") from None

    # -- pool -------------------------------------------------------------------

    def _reusable(self, conn: _Conn, now: float) -> bool:
        return (
            conn.clean
            and conn.smtp.is_connected
            and now - conn.last_used < self.idle_timeout
            and now - conn.created < self.max_age
            and conn.uses < self.max_uses
        )

    async def _acquire(self, *, fresh: bool = False) -> tuple[_Conn, bool]:
        """A connection for one transaction: (connection, taken from the pool)."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            now = time.monotonic()
            if not self._reusable(conn, now):
                self._spawn_close(conn)
                continue
            if now - conn.last_used >= self.probe_after:
                try:
                    await conn.smtp.rset(timeout=min(self.timeout, 10.0))
                except _NETWORK_ERRORS:
                    self._spawn_close(conn, polite=False)
                    continue
            return conn, True
        return await self._connect(), False

    def _release(self, conn: _Conn) -> None:
        now = time.monotonic()
        conn.last_used = now
        if not self._closed and len(self._idle) < self.pool_size and self._reusable(conn, now):
            self._idle.append(conn)
            if self._reaper is None or self._reaper.done():
                self._reaper = asyncio.get_running_loop().create_task(self._reap())
        else:
            self._spawn_close(conn)

    async def _close(self, conn: _Conn, polite: bool = True) -> None:
        await close_connection(conn, polite=polite, timeout=min(self.timeout, 5.0))

    def _spawn_close(self, conn: _Conn, polite: bool = True) -> None:
        if not conn.smtp.is_connected:
            conn.smtp.close()
            return
        task = asyncio.get_running_loop().create_task(
            self._close(conn, polite=polite and conn.clean)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reap(self) -> None:
        """Close idle connections once they pass ``idle_timeout``."""
        while self._idle and not self._closed:
            now = time.monotonic()
            expired = [c for c in self._idle if now - c.last_used >= self.idle_timeout]
            for conn in expired:
                self._idle.remove(conn)
                self._spawn_close(conn)
            if self._idle:
                oldest = min(c.last_used for c in self._idle)
                await asyncio.sleep(max(0.05, oldest + self.idle_timeout - now))

    @property
    def idle_connections(self) -> int:
        """Connections currently idle in the pool."""
        return len(self._idle)

    async def aclose(self) -> None:
        """Close every pooled connection (QUIT) and stop the pool.

        Connections in use finish their transaction and are closed on release;
        ``deliver`` calls after ``aclose`` raise TemporaryDeliveryError 451 4.3.2.
        """
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            try:
                await self._reaper
            except asyncio.CancelledError:
                pass
            self._reaper = None
        idle, self._idle = self._idle, []
        await asyncio.gather(*(self._close(c) for c in idle), return_exceptions=True)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- one transaction -----------------------------------------------------------

    async def _rset(self, conn: _Conn) -> None:
        """End an open transaction upstream; a failed RSET makes the connection unusable."""
        await reset(conn, min(self.timeout, 10.0))

    async def _transaction(
        self, conn: _Conn, envelope: Envelope, message: Message, reused: bool
    ) -> Reply:
        """The atomic proxy transaction: all recipients accepted and the data, or nothing."""
        replies = await send_envelope(conn, envelope, message, reused=reused)
        if not replies.mail_ok:
            await self._rset(conn)
            raise _raise_upstream(
                replies.mail.code,
                replies.mail.message,
                f"Upstream refused sender <{envelope.mail_from}>",
            )
        if replies.failure is not None:
            raise replies.failure
        refusals = replies.refusals
        if refusals:
            await self._rset(conn)
            temp = [r for r in refusals if 400 <= r[1].code < 500]
            rcpt, resp = (temp or refusals)[0]
            more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
            log.warning(
                "upstream %s refused %d recipient(s); transaction reset, nothing delivered",
                self.url.host_port,
                len(refusals),
            )
            err = _raise_upstream(resp.code, resp.message, f"Upstream refused <{rcpt.address}>")
            if more:
                err.reply = err.reply.with_text(err.reply.text + more)
            raise err
        try:
            resp = await send_data(conn, message)
        except aiosmtplib.SMTPDataError as exc:
            await self._rset(conn)
            raise _raise_upstream(exc.code, exc.message, "Upstream rejected the message") from None
        conn.clean = True
        return Reply(250, "2.0.0", f"Message accepted upstream: {split_enhanced(resp.message)[1]}")

    # -- public --------------------------------------------------------------------

    @staticmethod
    def _check_envelope(envelope: Envelope) -> None:
        if not envelope.rcpt_to:
            raise PermanentDeliveryError(NO_RECIPIENTS)
        if BAD_ADDRESS.search(envelope.mail_from):
            raise PermanentDeliveryError(BAD_SENDER)
        for rcpt in envelope.rcpt_to:
            if not rcpt.address or BAD_ADDRESS.search(rcpt.address):
                raise PermanentDeliveryError(BAD_RECIPIENT)

    async def deliver(
        self, envelope: Envelope, message: Message, session: SessionInfo | None = None
    ) -> Reply:
        """Relay one transaction upstream and return once it is accepted there.

        Args:
            envelope: reverse-path, MAIL parameters and recipients with their parameters.
            message: the complete message: CRLF line endings, not dot-stuffed
                (dot-stuffed on the wire), trace header already prepended; bytes, or a
                :class:`~smtpgate.message.MessageFile` sent from its file in pieces.
            session: the client's session (its id is logged).

        Returns:
            ``250 2.0.0 Message accepted upstream: <upstream text>``.

        Raises:
            TemporaryDeliveryError: upstream unreachable / TLS failure / connection
                lost (451 4.4.1), our AUTH refused (451 4.7.0), a 4xx from the
                upstream (its code and enhanced code), or after :meth:`aclose`.
            PermanentDeliveryError: a 5xx from the upstream (sender, any
                recipient, or the data), or the message needs SMTPUTF8 /
                REQUIRETLS / binary transport the upstream lacks.
        """
        if self._closed:
            raise TemporaryDeliveryError(SHUTTING_DOWN)
        self._check_envelope(envelope)
        sid = session.session_id if session else "-"
        fresh = False
        while True:
            conn, reused = await self._acquire(fresh=fresh)
            self._busy.add(conn)
            try:
                reply = await self._transaction(conn, envelope, message, reused)
            except StaleConnection:
                log.info(
                    "upstream %s: pooled connection was closed; reconnecting", self.url.host_port
                )
                conn.clean = False
                fresh = True
                continue
            except DeliveryError as exc:
                log.info(
                    "session=%s upstream %s: from=%r rcpts=%d size=%d failed: %s",
                    sid,
                    self.url.host_port,
                    envelope.mail_from,
                    len(envelope.rcpt_to),
                    len(message),
                    exc.reply,
                )
                raise
            except (*_NETWORK_ERRORS, UnicodeEncodeError, ValueError) as exc:
                conn.clean = False
                reply = connection_failure(self.url.host_port, describe_error(exc))
                log.warning("session=%s upstream %s: transaction failed: %s", sid,
                            self.url.host_port, reply.text)
                raise TemporaryDeliveryError(reply, "upstream connection failed") from None
            except BaseException:
                conn.clean = False
                raise
            finally:
                self._busy.discard(conn)
                self._release(conn)
            log.info(
                "session=%s upstream %s: from=%r rcpts=%d size=%d accepted: %s",
                sid,
                self.url.host_port,
                envelope.mail_from,
                len(envelope.rcpt_to),
                len(message),
                reply,
            )
            return reply

    async def deliver_recipients(
        self, envelope: Envelope, message: Message, session: SessionInfo | None = None
    ) -> RecipientResults:
        """Relay one transaction and report each recipient's outcome (for the queue).

        Unlike :meth:`deliver`, partial acceptance is normal: the queue retries per
        recipient. Each forward-path maps to the reply the upstream gave it: its
        RCPT refusal, or the DATA reply (sent when at least one RCPT was
        accepted). A refused MAIL gives every recipient that reply. Connection
        failures (refused, timeout, TLS failure, 421, connection lost) give every
        recipient still without a final reply ``451 4.4.1``; our AUTH being
        refused gives ``451 4.7.0``; after :meth:`aclose` every recipient gets
        ``451 4.3.2``. ESMTP parameters are passed as in :meth:`deliver` (DSN
        NOTIFY/ORCPT/RET/ENVID only when the upstream advertises DSN). Pooled
        connections are shared with :meth:`deliver`.

        Args:
            envelope: reverse-path, MAIL parameters and recipients.
            message: the complete message: CRLF line endings, not dot-stuffed,
                trace header already prepended; bytes, or a
                :class:`~smtpgate.message.MessageFile` sent from its file in
                bounded memory.
            session: the SMTP session, for logging.

        Returns:
            :class:`RecipientResults`: a reply for every recipient (empty for an
            envelope without recipients); ``remote_mta`` is the upstream host.
            Never raises for 4xx/5xx outcomes.
        """
        sid = session.session_id if session else "-"
        results = RecipientResults(remote_mta=self.url.host)
        if self._closed:
            results.fill(envelope, SHUTTING_DOWN)
            return results
        if not envelope.rcpt_to:
            return results
        fresh = False
        while True:
            try:
                conn, reused = await self._acquire(fresh=fresh)
            except DeliveryError as exc:
                results.fill(envelope, exc.reply)
                break
            self._busy.add(conn)
            try:
                results = await deliver_per_recipient(
                    conn,
                    envelope,
                    message,
                    reused=reused,
                    remote_mta=self.url.host,
                    rset_timeout=min(self.timeout, 10.0),
                )
            except StaleConnection:
                log.info(
                    "upstream %s: pooled connection was closed; reconnecting", self.url.host_port
                )
                conn.clean = False
                fresh = True
                continue
            except TemporaryDeliveryError as exc:
                conn.clean = False
                results.fill(envelope, exc.reply)
            except BaseException:
                conn.clean = False
                raise
            finally:
                self._busy.discard(conn)
                self._release(conn)
            break
        log.info(
            "session=%s upstream %s: from=%r size=%d per-recipient: %s",
            sid,
            self.url.host_port,
            envelope.mail_from,
            len(message),
            ", ".join(f"<{a}> {r.code} {r.enhanced}" for a, r in results.items()),
        )
        return results

    async def open_transaction(
        self, envelope: Envelope, session: SessionInfo | None = None
    ) -> UpstreamTransaction:
        """Open an upstream transaction at the client's MAIL (proxy mode, per recipient).

        Like Postfix's ``smtpd_proxy_filter``: MAIL is sent now, each RCPT is sent by
        :meth:`UpstreamTransaction.rcpt` as the client gives it, so the upstream's
        verdict on each recipient is the client's reply; :meth:`UpstreamTransaction.data`
        sends the message and returns the upstream's end-of-data reply;
        :meth:`UpstreamTransaction.abort` ends it (RSET) on RSET, a new MAIL or the end
        of the session. The connection is held until then.

        Args:
            envelope: reverse-path and MAIL parameters (recipients, if any, are ignored).
                SIZE passed upstream is the client's SIZE parameter.
            session: the client's session (its id is logged).

        Returns:
            The open :class:`UpstreamTransaction` (the upstream said 2xx to MAIL).

        Raises:
            TemporaryDeliveryError: the upstream cannot be reached (``451 4.4.1``
                saying what failed), does not satisfy the URL's TLS requirement
                (``451 4.7.4``/``4.7.5``), refused our AUTH (``451 4.7.0``), answered
                MAIL with 4xx (its reply; 421 as 451), or after :meth:`aclose`.
            PermanentDeliveryError: the upstream refused MAIL with 5xx (its reply),
                or lacks SMTPUTF8/REQUIRETLS the transaction needs (553 5.6.7,
                550 5.7.30), or the reverse-path is malformed (501 5.1.7).
        """
        if self._closed:
            raise TemporaryDeliveryError(SHUTTING_DOWN)
        if BAD_ADDRESS.search(envelope.mail_from):
            raise PermanentDeliveryError(BAD_SENDER)
        sid = session.session_id if session else "-"
        head = Envelope(envelope.mail_from, dict(envelope.mail_params))
        fresh = False
        while True:
            conn, reused = await self._acquire(fresh=fresh)
            self._busy.add(conn)
            try:
                resp, use_utf8 = await send_mail(conn, head, None, reused=reused)
            except StaleConnection:
                log.info(
                    "upstream %s: pooled connection was closed; reconnecting", self.url.host_port
                )
                conn.clean = False
                self._busy.discard(conn)
                self._release(conn)
                fresh = True
                continue
            except PermanentDeliveryError:
                conn.clean = True  # nothing was sent
                self._busy.discard(conn)
                self._release(conn)
                raise
            except (*_NETWORK_ERRORS, UnicodeEncodeError, ValueError) as exc:
                conn.clean = False
                self._busy.discard(conn)
                self._release(conn)
                reply = connection_failure(self.url.host_port, describe_error(exc))
                log.warning("session=%s upstream %s: MAIL failed: %s", sid, self.url.host_port,
                            reply.text)
                raise TemporaryDeliveryError(reply, "upstream connection failed") from None
            except BaseException:
                conn.clean = False
                self._busy.discard(conn)
                self._release(conn)
                raise
            if not 200 <= resp.code < 300:
                if resp.code == 421 or not conn.smtp.is_connected:
                    conn.clean = False
                else:
                    await self._rset(conn)
                self._busy.discard(conn)
                self._release(conn)
                reply = client_reply(resp.code, resp.message)
                log.info("session=%s upstream %s: MAIL from=<%s> refused: %s", sid,
                         self.url.host_port, envelope.mail_from, reply)
                raise _error(reply, "upstream refused MAIL")
            return UpstreamTransaction(self, conn, head, use_utf8, client_reply(
                resp.code, resp.message), sid)

    def _finish_transaction(self, conn: _Conn) -> None:
        self._busy.discard(conn)
        self._release(conn)

    async def __aenter__(self) -> UpstreamDelivery:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class UpstreamTransaction:
    """One upstream transaction driven by a client's session (proxy mode, per recipient).

    Made by :meth:`UpstreamDelivery.open_transaction` after the upstream accepted MAIL.
    The session forwards each RCPT with :meth:`rcpt` (the reply is the client's
    reply), then the message with :meth:`data`, or ends the transaction with
    :meth:`abort`. Only recipients the upstream accepted are in the upstream
    transaction. Not safe for concurrent use (one session drives it).

    Attributes:
        mail_reply: the upstream's reply to MAIL (2xx), for the client.
        accepted: recipients the upstream accepted, in order.
        done: :meth:`data` finished or :meth:`abort` was called; the connection
            went back to the pool (or was closed).
    """

    def __init__(
        self,
        owner: UpstreamDelivery,
        conn: OutboundConnection,
        envelope: Envelope,
        use_smtputf8: bool,
        mail_reply: Reply,
        session_id: str,
    ) -> None:
        self._owner = owner
        self._conn = conn
        self._envelope = envelope  # reverse-path and parameters as sent at MAIL
        self._utf8 = use_smtputf8
        self._sid = session_id
        self._broken: Reply | None = None
        self.mail_reply = mail_reply
        self.accepted: list[Recipient] = []
        self.done = False

    def __repr__(self) -> str:
        return (f"UpstreamTransaction({self._label}, from=<{self._envelope.mail_from}>, "
                f"accepted={len(self.accepted)}, done={self.done})")

    @property
    def _label(self) -> str:
        return self._owner.url.host_port

    def _lost(self, exc: BaseException) -> Reply:
        self._conn.clean = False
        self._broken = connection_failure(self._label, describe_error(exc))
        log.warning("session=%s upstream %s: %s", self._sid, self._label, self._broken.text)
        return self._broken

    async def rcpt(self, rcpt: Recipient) -> Reply:
        """Forward one RCPT; the upstream's reply is the client's (RFC 5321 §4.1.1.3).

        NOTIFY/ORCPT (RFC 3461) and RRVS are passed only when the upstream offers them.

        Args:
            rcpt: the recipient as the client gave it (after relay control and hooks).

        Returns:
            The upstream's reply with its enhanced code (2xx: the recipient is now in
            the upstream transaction); ``451 4.4.1`` saying what failed when the
            connection was lost (then also for every later RCPT); ``553 5.6.7`` for a
            non-ASCII address when the upstream lacks SMTPUTF8; ``501 5.1.3`` for a
            malformed address. Never raises for network errors.
        """
        if self.done:
            return Reply(451, "4.3.0", "Upstream transaction already ended")
        if self._broken is not None:
            return self._broken
        if not rcpt.address or BAD_ADDRESS.search(rcpt.address):
            return BAD_RECIPIENT
        if not self._utf8 and not rcpt.address.isascii():
            return SMTPUTF8_UNSUPPORTED
        try:
            resp = await send_rcpt(self._conn, rcpt, self._utf8)
        except _NETWORK_ERRORS as exc:
            return self._lost(exc)
        reply = client_reply(resp.code, resp.message)
        if resp.code == 421 or not self._conn.smtp.is_connected:
            self._conn.clean = False
            self._broken = Reply(451, "4.4.1", f"Upstream {self._label} closed the transaction: "
                                 f"{resp.code} {split_enhanced(resp.message)[1]}".strip())
            return self._broken
        if reply.is_positive:
            self.accepted.append(rcpt)
        return reply

    async def _replay(self, envelope: Envelope, message: Message) -> None:
        """RSET and send the envelope again (a data hook removed recipients or changed
        the sender). Raises DeliveryError when anything is refused (after RSET)."""
        conn = self._conn
        await reset(conn, min(self._owner.timeout, 10.0))
        if not conn.clean:
            raise TemporaryDeliveryError(connection_failure(self._label, "RSET failed"))
        self.accepted = []
        try:
            resp, self._utf8 = await send_mail(conn, envelope, message)
        except PermanentDeliveryError:
            conn.clean = True
            raise
        except _NETWORK_ERRORS as exc:
            raise TemporaryDeliveryError(self._lost(exc)) from None
        if not 200 <= resp.code < 300:
            await reset(conn, min(self._owner.timeout, 10.0))
            raise _error(upstream_reply(resp.code, resp.message,
                                        f"Upstream refused sender <{envelope.mail_from}>"))
        self._envelope = Envelope(envelope.mail_from, dict(envelope.mail_params))
        await self._add(envelope.rcpt_to)

    async def _add(self, rcpts: list[Recipient]) -> None:
        """RCPT for recipients not yet in the upstream transaction; any refusal refuses the
        message (after RSET): the client was told 250 for them, or a hook added them."""
        for rcpt in rcpts:
            reply = await self.rcpt(rcpt)
            if reply.is_positive:
                continue
            if self._broken is None:
                await reset(self._conn, min(self._owner.timeout, 10.0))
            raise _error(reply.with_text(f"Upstream refused <{rcpt.address}>: {reply.text}"))

    async def data(self, envelope: Envelope, message: Message) -> Reply:
        """Send the message; the upstream's end-of-data reply is the client's.

        ``envelope`` is the transaction as it stands at end of data. When a data hook
        changed it since RCPT: added recipients are sent as further RCPTs; removed
        recipients (or a changed reverse-path/parameters) make the transaction start
        again upstream (RSET, MAIL, RCPT for each remaining recipient), since an RCPT
        cannot be withdrawn. A refusal at that point refuses the whole message with the
        upstream's reply (nothing was accepted upstream). The transaction is
        :attr:`done` afterwards, whatever the outcome.

        Args:
            envelope: the final envelope (at least one recipient).
            message: the complete message: CRLF line endings, not dot-stuffed,
                trace header already prepended; bytes, or a
                :class:`~smtpgate.message.MessageFile` sent from its file in pieces.

        Returns:
            The upstream's 2xx reply to the data (its code, enhanced code and text).

        Raises:
            TemporaryDeliveryError: the upstream's 4xx (421 as 451), the connection
                failed (``451 4.4.1`` saying what failed), or an RCPT refused earlier
                left no recipient.
            PermanentDeliveryError: the upstream's 5xx; the message needs SMTPUTF8
                (553 5.6.7) or binary transport (554 5.6.3) the upstream lacks.
        """
        if self.done:
            raise TemporaryDeliveryError(Reply(451, "4.3.0", "Upstream transaction already ended"))
        conn = self._conn
        try:
            if self._broken is not None:
                raise TemporaryDeliveryError(self._broken)
            try:
                _, use_utf8 = mail_options(conn, envelope, message)
            except PermanentDeliveryError:
                await reset(conn, min(self._owner.timeout, 10.0))
                raise
            keys = [(r.address, r.params) for r in envelope.rcpt_to]
            sent = [(r.address, r.params) for r in self.accepted]
            same_head = (envelope.mail_from == self._envelope.mail_from
                         and envelope.mail_params == self._envelope.mail_params
                         and use_utf8 == self._utf8)
            if not same_head or any(k not in keys for k in sent):
                log.info("session=%s upstream %s: envelope changed after RCPT; "
                         "replaying it upstream", self._sid, self._label)
                await self._replay(envelope, message)
            else:
                await self._add([r for r in envelope.rcpt_to
                                 if (r.address, r.params) not in sent])
            if not self.accepted:
                await reset(conn, min(self._owner.timeout, 10.0))
                raise PermanentDeliveryError(NO_RECIPIENTS)
            try:
                resp = await send_data(conn, message)
            except aiosmtplib.SMTPDataError as exc:
                if exc.code == 421 or not conn.smtp.is_connected:
                    conn.clean = False
                else:
                    await reset(conn, min(self._owner.timeout, 10.0))
                raise _error(client_reply(exc.code, exc.message)) from None
            except (*_NETWORK_ERRORS, UnicodeEncodeError, ValueError) as exc:
                raise TemporaryDeliveryError(self._lost(exc)) from None
            conn.clean = True
            reply = client_reply(resp.code, resp.message)
            log.info("session=%s upstream %s: from=<%s> rcpts=%d size=%d accepted: %s",
                     self._sid, self._label, envelope.mail_from, len(self.accepted),
                     len(message), reply)
            return reply
        finally:
            self.done = True
            self._owner._finish_transaction(conn)

    async def abort(self) -> None:
        """End the transaction without sending data: RSET upstream (RFC 5321 §4.1.1.5),
        then return the connection to the pool. Idempotent; never raises."""
        if self.done:
            return
        self.done = True
        conn = self._conn
        try:
            if self._broken is None and conn.smtp.is_connected:
                await reset(conn, min(self._owner.timeout, 10.0))
            else:
                conn.clean = False
        except BaseException:
            conn.clean = False
            raise
        finally:
            self._owner._finish_transaction(conn)
