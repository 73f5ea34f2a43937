"""Outbound SMTP client sessions shared by the relay (upstream.py) and MX (mx.py) deliveries.

Entry points: :class:`Connector` (connect, EHLO/HELO, STARTTLS, AUTH), :func:`send_envelope`
(MAIL + RCPT), :func:`deliver_per_recipient` (one transaction, one reply per recipient) and
:class:`RecipientResults`. RFC 5321 §3.3/§4.1.1/§4.2.5/§6.1, RFC 3207, 8314, 4954, 1870, 6152,
6531, 3461, 8689.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiosmtplib
import aiosmtplib.protocol

from ..envelope import Envelope, Recipient
from ..errors import PermanentDeliveryError, TemporaryDeliveryError
from ..message import DATA_CHUNK, Message, MessageFile
from ..reply import Reply
from .url import TlsMode

__all__ = [
    "BAD_ADDRESS",
    "BAD_RECIPIENT",
    "BAD_SENDER",
    "BINARY_UNSUPPORTED",
    "NETWORK_ERRORS",
    "REQUIRETLS_UNAVAILABLE",
    "SMTPUTF8_UNSUPPORTED",
    "AuthFailed",
    "Connector",
    "EnvelopeReplies",
    "OutboundConnection",
    "RecipientResults",
    "StaleConnection",
    "TlsPolicyError",
    "close_connection",
    "connection_failure",
    "deliver_per_recipient",
    "describe_error",
    "mail_options",
    "rcpt_options",
    "remote_reply",
    "reset",
    "send_data",
    "send_envelope",
    "send_mail",
    "send_rcpt",
    "split_enhanced",
    "DataEncoder",
]

log = logging.getLogger("smtpgate.delivery.outbound")

SMTPUTF8_UNSUPPORTED = Reply(
    553, "5.6.7", "Upstream does not support SMTPUTF8; message needs it (RFC 6531)"
)
BINARY_UNSUPPORTED = Reply(
    554, "5.6.3", "Binary content cannot be relayed (upstream BDAT/BINARYMIME not supported)"
)
REQUIRETLS_UNAVAILABLE = Reply(550, "5.7.30", "REQUIRETLS support required")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")

#: Any network-level failure: refused, timed out, TLS failed, connection lost, bad greeting.
NETWORK_ERRORS = (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError)

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
# RFC 5321 §4.1.2 esmtp-value (plus UTF-8 under SMTPUTF8, RFC 6531 §3.3).
_ESMTP_VALUE = re.compile(r"^[\x21-\x3c\x3e-\x7e\u0080-\U0010ffff]+$")
BAD_ADDRESS = re.compile(r"[\x00-\x1f\x7f<>]")
_NOT_DATA_SAFE = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")
_LINE_ENDINGS = re.compile(rb"(?:\r\n|\n|\r(?!\n))")

class DataEncoder:
    """The DATA encoding of a message given in pieces (RFC 5321 §4.5.2, §2.3.8).

    The output is byte for byte what aiosmtplib sends for the whole message: bare CR
    and bare LF become CRLF, a line starting with ``.`` gets another ``.``, and the
    end of data is ``CRLF.CRLF`` (a CRLF added when the message does not end with
    one). Piece boundaries may fall anywhere, including between CR and LF.
    """

    def __init__(self) -> None:
        self._cr = False  # a CR held back from the end of the last piece
        self._bol = True  # the next output byte starts a line
        self._ends_nl = False  # something was output and it ended with CRLF

    def feed(self, piece: bytes) -> bytes:
        """Encode the next piece; returns the bytes to send (maybe empty)."""
        if self._cr:
            piece = b"\r" + piece
            self._cr = False
        if piece.endswith(b"\r"):
            piece = piece[:-1]
            self._cr = True
        if not piece:
            return b""
        n = piece.count(b"\r\n")
        if piece.count(b"\r") != n or piece.count(b"\n") != n:
            piece = _LINE_ENDINGS.sub(b"\r\n", piece)
        piece = piece.replace(b"\n.", b"\n..")
        if self._bol and piece[:1] == b".":
            piece = b"." + piece
        self._bol = self._ends_nl = piece.endswith(b"\n")
        return piece

    def end(self) -> bytes:
        """The rest: a held-back CR as CRLF, a final CRLF when missing, and ``.CRLF``."""
        if self._cr:
            self._cr = False
            return b"\r\n.\r\n"
        return b".\r\n" if self._ends_nl else b"\r\n.\r\n"


class _PipeliningProtocol(aiosmtplib.protocol.SMTPProtocol):
    """aiosmtplib's protocol, able to take several replies at once (RFC 2920).

    aiosmtplib parses one reply per command and drops what arrives while a parsed
    reply waits to be picked up. While ``pipelining`` is set (during one pipelined
    exchange, under the command lock) everything received is kept in the buffer and
    :meth:`next_response` returns the replies in order. Otherwise it behaves exactly
    as aiosmtplib's own class. Connections get this class in :meth:`Connector.open`.
    """

    pipelining = False

    def data_received(self, data: bytes) -> None:
        if not self.pipelining:
            super().data_received(data)
            return
        waiter = self._response_waiter
        if waiter is None:
            return
        self._buffer.extend(data)
        if len(self._buffer) > _PIPELINE_BUFFER:
            del self._buffer[:]
            if not waiter.done():
                self._set_response_exception(waiter, aiosmtplib.SMTPResponseException(
                    500, "Response too long"))
            return
        if waiter.done():
            return  # the reply before is still to be picked up: keep this one buffered
        try:
            response = self._read_response_from_buffer()
        except Exception as exc:
            self._set_response_exception(waiter, exc)
        else:
            if response is not None:
                waiter.set_result(response)

    async def next_response(self, timeout: float | None) -> aiosmtplib.SMTPResponse:
        """The next reply of a pipelined group: one already buffered, else the next
        to arrive (at most ``timeout`` seconds).

        Raises:
            aiosmtplib.SMTPServerDisconnected / SMTPTimeoutError / SMTPResponseException:
                the connection was lost, the reply did not come, or it is malformed.
        """
        waiter = self._response_waiter
        if waiter is None or not waiter.done():
            response = self._read_response_from_buffer()
            if response is not None:
                return response
        return await self.read_response(timeout=timeout)


#: Most recipients sent in one pipelined group (their replies are buffered together).
PIPELINE_MAX_RCPTS = 100
_PIPELINE_BUFFER = 256 * 1024


def _enable_pipelining(smtp: aiosmtplib.SMTP) -> None:
    """Give a freshly connected client's protocol the pipelining reader (same object,
    subclass; the transport is told again so it looks its methods up anew)."""
    proto = smtp.protocol
    transport = smtp.transport
    if type(proto) is aiosmtplib.protocol.SMTPProtocol and transport is not None:
        proto.__class__ = _PipeliningProtocol
        transport.set_protocol(proto)


async def _pieces(message: Message) -> AsyncIterator[bytes]:
    if isinstance(message, MessageFile):
        it = message.chunks()
        while True:
            chunk = await asyncio.to_thread(next, it, None)
            if chunk is None:
                return
            yield chunk
    else:
        view = memoryview(message)
        for i in range(0, len(message), DATA_CHUNK):
            yield bytes(view[i : i + DATA_CHUNK])


async def _write_message(
    proto: aiosmtplib.protocol.SMTPProtocol, message: Message, timeout: float | None
) -> None:
    """Write the message's DATA encoding and the end of data (after a 354): a short
    message in one write, a longer one piece by piece, each piece waiting (at most
    ``timeout`` seconds) until the socket buffer has drained.

    Raises:
        aiosmtplib.SMTPTimeoutError: a piece did not drain in time.
        aiosmtplib.SMTPServerDisconnected / OSError / ValueError: see :func:`send_data`.
    """
    encoder = DataEncoder()
    if isinstance(message, bytes) and len(message) <= DATA_CHUNK:
        proto.write(encoder.feed(message) + encoder.end())
        return
    async for piece in _pieces(message):
        out = encoder.feed(piece)
        del piece
        if out:
            proto.write(out)
            del out
            try:
                async with asyncio.timeout(timeout):
                    await proto._drain_helper()
            except TimeoutError:
                raise aiosmtplib.SMTPTimeoutError("Timed out writing the message") from None
    proto.write(encoder.end())


async def send_data(
    conn: OutboundConnection, message: Message, timeout: float | None = None
) -> aiosmtplib.SMTPResponse:
    """Send DATA and the message in bounded memory (RFC 5321 §4.1.1.4, §4.5.2).

    A message up to :data:`DATA_CHUNK` bytes given as bytes goes through aiosmtplib's
    ``data()``. Anything larger (or a :class:`MessageFile`) is encoded by
    :class:`DataEncoder` piece by piece and written with flow control (each piece
    waits until the socket buffer has drained), so at most about two pieces are in
    memory, whatever the message size. The bytes on the wire are the same either way.

    Args:
        conn: the connection, after at least one accepted RCPT.
        message: the message, CRLF line endings, not dot-stuffed.
        timeout: seconds for each reply and for each piece to drain; ``None`` uses
            the connection's timeout.

    Returns:
        The server's 250 reply to the end of data.

    Raises:
        aiosmtplib.SMTPDataError: the server refused DATA or the message (its code).
        aiosmtplib.SMTPServerDisconnected / SMTPTimeoutError / OSError: the connection
            failed or stalled (the connection is then closed).
        ValueError: the message file became shorter than its size.
    """
    smtp = conn.smtp
    if isinstance(message, bytes) and len(message) <= DATA_CHUNK:
        return await smtp.data(message, timeout=timeout)
    proto = smtp.protocol
    if proto is None or proto._command_lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if timeout is None:
        timeout = smtp.timeout
    try:
        async with proto._command_lock:
            proto._response_pending = True
            proto.write(b"DATA\r\n")
            start = await proto.read_response(timeout=timeout)
            if start.code != 354:
                raise aiosmtplib.SMTPDataError(start.code, start.message)
            proto._response_pending = True  # as aiosmtplib: a reply may come early
            await _write_message(proto, message, timeout)
            resp = await proto.read_response(timeout=timeout)
            if resp.code != 250:
                raise aiosmtplib.SMTPDataError(resp.code, resp.message)
            return resp
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError,
            ValueError):
        smtp.close()
        raise

# ESMTP parameter -> the EHLO keyword (lower case) the server must advertise.
_MAIL_PARAM_EXT: dict[str, str] = {
    "RET": "dsn",
    "ENVID": "dsn",
    "MT-PRIORITY": "mt-priority",
    "HOLDFOR": "futurerelease",
    "HOLDUNTIL": "futurerelease",
    "BY": "deliverby",
}
_RCPT_PARAM_EXT: dict[str, str] = {"NOTIFY": "dsn", "ORCPT": "dsn", "RRVS": "rrvs"}


# -- replies -----------------------------------------------------------------------


def split_enhanced(message: str) -> tuple[str | None, str]:
    """Split a server's reply text into its RFC 3463 enhanced code and the plain text.

    Args:
        message: reply text as aiosmtplib gives it (lines joined with ``"\\n"``).

    Returns:
        ``(enhanced, text)``: the first line's enhanced code (``"5.1.1"``) or
        ``None``, and the text of all lines with the codes removed, joined by
        spaces, control characters replaced by ``?``, at most 300 characters.
    """
    enhanced: str | None = None
    texts: list[str] = []
    for raw in message.split("\n"):
        line = raw.strip()
        m = _ENHANCED.match(line)
        if m:
            if enhanced is None:
                enhanced = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            line = line[m.end() :]
        if line:
            texts.append(line)
    return enhanced, _UNPRINTABLE.sub("?", " ".join(texts))[:300]


def remote_reply(code: int, message: str) -> Reply:
    """The reply a remote SMTP server gave, as a :class:`Reply` (RFC 5321 §4.2, RFC 3463).

    The code is kept; the enhanced code is taken from the text when it is of the
    same class, else ``X.0.0``. A code outside 2xx/4xx/5xx (a broken server)
    becomes ``451 4.0.0`` with the original code in the text.

    Args:
        code: the reply code.
        message: the reply text (lines joined with ``"\\n"``).

    Returns:
        ``Reply(code, enhanced, text)`` with the enhanced code removed from the text.
    """
    enhanced, text = split_enhanced(message)
    if not (200 <= code < 300 or 400 <= code < 600):
        # X.4.0: the next hop misbehaved; not the client's error (not counted by max_errors)
        return Reply(451, "4.4.0", f"Unexpected reply from remote server: {code} {text}".strip())
    cls = str(code)[0]
    if enhanced is None or enhanced[0] != cls:
        enhanced = f"{cls}.0.0"
    return Reply(code, enhanced, text or "(no text)")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (at most 8, no cycles)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def describe_error(exc: BaseException) -> str:
    """A short, single-line description of what failed, for replies, logs and DSNs.

    Connection-level failures are named plainly: ``connection refused``,
    ``connection timed out``, ``timed out waiting for the server``, ``connection
    closed by the server``, ``host name not found``, ``TLS certificate not verified:
    <reason>``; a server reply (greeting, EHLO, STARTTLS) is shown as
    ``<code> <enhanced> <text>``.

    Args:
        exc: the exception (aiosmtplib, OSError, timeout, :class:`TlsPolicyError`).
            Never contains credentials: only connection-level errors are passed here.

    Returns:
        Text of at most 200 characters without control characters.
    """
    chain = _chain(exc)
    shown: str | None = None
    if isinstance(exc, TlsPolicyError):
        shown = exc.detail
    elif isinstance(exc, aiosmtplib.SMTPResponseException):
        enhanced, text = split_enhanced(exc.message)
        shown = f"{exc.code} {enhanced} {text}" if enhanced else f"{exc.code} {text}"
    else:
        for item in chain:
            if isinstance(item, ssl.SSLCertVerificationError):
                shown = f"TLS certificate not verified: {item.verify_message or item}"
            elif isinstance(item, ConnectionRefusedError) or (
                isinstance(item, OSError) and item.errno == errno.ECONNREFUSED
            ):
                shown = "connection refused"
            elif isinstance(item, aiosmtplib.SMTPConnectTimeoutError):
                shown = "connection timed out"
            elif isinstance(item, (asyncio.TimeoutError, aiosmtplib.SMTPTimeoutError)):
                shown = "timed out waiting for the server"
            elif isinstance(item, socket.gaierror):
                shown = f"host name not found ({item.strerror or item})"
            elif isinstance(item, ssl.SSLError):
                shown = f"TLS handshake failed: {item.reason or item}"
            elif isinstance(item, (aiosmtplib.SMTPServerDisconnected, ConnectionResetError,
                                   BrokenPipeError, EOFError)):
                detail = str(item)
                shown = "connection closed by the server" + (f" ({detail})" if detail else "")
            if shown is not None:
                break
        if shown is None:
            shown = str(exc) or type(exc).__name__
    return _UNPRINTABLE.sub("?", shown.replace("\n", " "))[:200]


class TlsPolicyError(aiosmtplib.SMTPException):
    """The server cannot satisfy the TLS the relay URL requires (RFC 3207, RFC 8314).

    Raised by :meth:`Connector.open` for ``tls="required"`` when STARTTLS is not
    offered, refused, or its handshake fails (certificate not verified), and for
    ``tls="implicit"`` when the handshake fails. A security/configuration problem,
    not an unreachable host: see :meth:`reply`.

    Args:
        label: the peer, e.g. ``"relay.example.com:587"``.
        detail: what happened, e.g. ``"TLS is required, but was not offered by host ..."``.
        enhanced: RFC 3463 code: ``4.7.4`` (security feature not supported/offered)
            or ``4.7.5`` (cryptographic failure: certificate not verified, handshake).
    """

    def __init__(self, label: str, detail: str, enhanced: str) -> None:
        super().__init__(detail)
        self.label = label
        self.detail = _UNPRINTABLE.sub("?", detail)[:200]
        self.enhanced = enhanced

    def reply(self) -> Reply:
        """``451 4.7.4`` / ``451 4.7.5`` with the detail: a temporary failure.

        Deferred rather than bounced (as Postfix does with "TLS is required, but was
        not offered by host"): the cause is a setting on one side or the other (or an
        expired certificate) that an administrator can fix without losing the mail.
        """
        return Reply(451, self.enhanced, self.detail)


def connection_failure(label: str, detail: str) -> Reply:
    """``451 4.4.1`` for a connection-level failure (RFC 3463 X.4.1 "no answer from host").

    Args:
        label: the peer, e.g. ``"mx1.example.com[192.0.2.1]:25"``.
        detail: what happened (from :func:`describe_error`).

    Returns:
        ``Reply(451, "4.4.1", "Connection to <label> failed: <detail>")``.
    """
    return Reply(451, "4.4.1", _UNPRINTABLE.sub("?", f"Connection to {label} failed: {detail}"))


class RecipientResults(dict[str, Reply]):
    """The outcome of one delivery attempt, per recipient: forward-path -> final reply.

    Replies are final *for this attempt*: 2xx delivered, 4xx retry later, 5xx
    failed. Keys are the forward-paths as given in the envelope (a forward-path
    listed twice keeps the reply to its last RCPT).

    Attributes:
        remote_mta: host name of the MTA that answered the transaction (for the
            DSN ``Remote-MTA`` field, RFC 3464 §2.3.5), ``None`` when none did.
        synthesized: forward-paths whose reply smtpgate made up itself
            (connection failures, local checks) rather than received from
            ``remote_mta``; the DSN shows those without ``Remote-MTA``.
        next_hop_dsn: whether the MTA that took the transaction advertised DSN
            (RFC 3461); ``False`` means recipients it accepted were *relayed* to a
            non-DSN host and a ``NOTIFY=SUCCESS`` recipient is owed a "relayed"
            DSN (RFC 3461 §5.2.2); ``None`` when no MTA took the transaction.
    """

    def __init__(self, *, remote_mta: str | None = None) -> None:
        super().__init__()
        self.remote_mta = remote_mta
        self.synthesized: set[str] = set()
        self.next_hop_dsn: bool | None = None

    def __repr__(self) -> str:
        items = ", ".join(f"{k!r}: {v}" for k, v in self.items())
        return f"RecipientResults({{{items}}}, remote_mta={self.remote_mta!r})"

    def set_remote(self, address: str, reply: Reply) -> None:
        """Record the reply ``remote_mta`` gave for ``address``."""
        self[address] = reply
        self.synthesized.discard(address)

    def set_local(self, address: str, reply: Reply) -> None:
        """Record a reply smtpgate made up for ``address`` (not from the remote MTA)."""
        self[address] = reply
        self.synthesized.add(address)

    def fill(self, envelope: Envelope, reply: Reply) -> None:
        """Give every recipient of ``envelope`` without a reply yet the local ``reply``."""
        for rcpt in envelope.rcpt_to:
            if rcpt.address not in self:
                self.set_local(rcpt.address, reply)

    def is_remote(self, address: str) -> bool:
        """True when the reply for ``address`` came from ``remote_mta``."""
        return address in self and address not in self.synthesized and self.remote_mta is not None

    @property
    def delivered(self) -> list[str]:
        """Forward-paths the remote accepted (2xx)."""
        return [a for a, r in self.items() if 200 <= r.code < 300]

    @property
    def deferred(self) -> list[str]:
        """Forward-paths to retry later (4xx)."""
        return [a for a, r in self.items() if r.is_transient]

    @property
    def failed(self) -> list[str]:
        """Forward-paths that failed permanently (5xx)."""
        return [a for a, r in self.items() if r.is_permanent]


# -- connections -------------------------------------------------------------------


def _handshake_failure(label: str, exc: BaseException) -> TlsPolicyError:
    """The :class:`TlsPolicyError` (``4.7.5``) for a failed TLS handshake with ``label``."""
    for item in _chain(exc):
        if isinstance(item, ssl.SSLCertVerificationError):
            why = _UNPRINTABLE.sub("?", str(item.verify_message or item))
            return TlsPolicyError(
                label,
                f"TLS is required, but the certificate of host {label} was not verified: {why}",
                "4.7.5",
            )
    return TlsPolicyError(
        label,
        f"TLS is required, but the TLS handshake with host {label} failed: "
        f"{describe_error(exc)}",
        "4.7.5",
    )


class AuthFailed(Exception):
    """Our AUTH to the server failed (the detail is the server's text, never credentials)."""


class StaleConnection(Exception):
    """A pooled connection turned out dead at MAIL, before anything was accepted."""


@dataclass(eq=False)
class OutboundConnection:
    """One open SMTP client connection, greeted and through STARTTLS/AUTH per policy.

    Attributes:
        smtp: the aiosmtplib client.
        created / last_used: ``time.monotonic()`` seconds.
        label: the peer for logs and replies, e.g. ``"mx1.example.com[192.0.2.1]:25"``.
        authenticated: AUTH succeeded (RFC 4954).
        tls: the session is encrypted (STARTTLS or implicit TLS).
        uses: transactions started on it.
        clean: no transaction is open on the server (safe to reuse or QUIT).
        extensions: EHLO keywords (lower case) -> parameters, as last advertised.
    """

    smtp: aiosmtplib.SMTP
    created: float
    last_used: float
    label: str = ""
    authenticated: bool = False
    tls: bool = False
    uses: int = 0
    clean: bool = True
    extensions: dict[str, str] = field(default_factory=dict)


class Connector:
    """Opens SMTP client connections: connect, greeting, EHLO (HELO fallback), STARTTLS, AUTH.

    Shared by :class:`~.upstream.UpstreamDelivery` (one configured relay) and
    :class:`~.mx.MxDelivery` (MX hosts). Holds the TLS contexts (built once, in a
    worker thread) but no credentials: those are passed per :meth:`open` call.

    Args:
        helo_name: our EHLO name (RFC 5321 §4.1.1.1).
        timeout: connect and per-command timeout, seconds.
        cafile: PEM CA bundle used instead of the system CAs when verifying.
    """

    def __init__(self, *, helo_name: str, timeout: float, cafile: str | None = None) -> None:
        self.helo_name = helo_name
        self.timeout = timeout
        self.cafile = cafile
        self._contexts: dict[bool, ssl.SSLContext] = {}
        self._context_lock = asyncio.Lock()
        #: TCP connections opened so far (metrics and tests).
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"Connector(helo_name={self.helo_name!r}, timeout={self.timeout!r})"

    def _build_context(self, verify: bool) -> ssl.SSLContext:
        if verify:
            return ssl.create_default_context(cafile=self.cafile)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx

    async def tls_context(self, verify: bool) -> ssl.SSLContext:
        """The client TLS context: verifying (chain and host name) or not (opportunistic).

        Args:
            verify: verify the server certificate against ``cafile`` or the system CAs.

        Returns:
            A cached :class:`ssl.SSLContext`.
        """
        ctx = self._contexts.get(verify)
        if ctx is None:
            async with self._context_lock:  # build once, not once per concurrent caller
                ctx = self._contexts.get(verify)
                if ctx is None:
                    ctx = await asyncio.to_thread(self._build_context, verify)
                    self._contexts[verify] = ctx
        return ctx

    @staticmethod
    async def _ehlo(smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo()

    async def open(
        self,
        host: str,
        port: int,
        *,
        tls: TlsMode,
        verify: bool = True,
        server_hostname: str | None = None,
        username: str | None = None,
        password: str | None = None,
        auth_mechanism: str | None = None,
        label: str | None = None,
    ) -> OutboundConnection:
        """Connect and get the session ready for MAIL.

        TLS policy ``"may"`` is opportunistic (RFC 3207 §4.1; never verified): a
        STARTTLS refusal continues in plaintext, a failed handshake reconnects in
        plaintext. ``"required"`` fails unless STARTTLS succeeds; ``"implicit"``
        is TLS from the first byte (RFC 8314 §3.3). AUTH (RFC 4954) runs when a
        user name and password are given: ``auth_mechanism="PLAIN"`` forces
        RFC 4616 PLAIN, else the client picks among those advertised.

        Args:
            host: IP address or host name to connect to.
            port: TCP port.
            tls: ``"none"``, ``"may"``, ``"required"`` or ``"implicit"``.
            verify: verify the certificate (ignored for ``"may"``).
            server_hostname: name for SNI and certificate checks (default ``host``).
            username / password: AUTH credentials, or ``None``.
            auth_mechanism: ``"PLAIN"`` or ``None``.
            label: the peer as shown in logs (default ``host:port``).

        Returns:
            The ready :class:`OutboundConnection`.

        Raises:
            aiosmtplib.SMTPException / OSError / asyncio.TimeoutError: connection
                refused or timed out, non-220 greeting (``SMTPConnectResponseError``,
                e.g. 421/554), EHLO and HELO refused, connection lost.
            TlsPolicyError: ``tls="required"`` and STARTTLS not offered, refused
                or its handshake failed (certificate not verified); ``tls="implicit"``
                and the handshake failed. A subclass of ``aiosmtplib.SMTPException``.
            AuthFailed: the server refused our AUTH or does not offer AUTH.
        """
        shown = label or (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        return await self._open(
            host,
            port,
            tls,
            verify and tls != "may",
            server_hostname,
            username,
            password,
            auth_mechanism,
            shown,
            plaintext=False,
        )

    async def _open(
        self,
        host: str,
        port: int,
        mode: TlsMode,
        verify: bool,
        server_hostname: str | None,
        username: str | None,
        password: str | None,
        auth_mechanism: str | None,
        label: str,
        *,
        plaintext: bool,
    ) -> OutboundConnection:
        ctx = await self.tls_context(verify) if mode != "none" else None
        smtp = aiosmtplib.SMTP(
            hostname=host,
            port=port,
            local_hostname=self.helo_name,
            timeout=self.timeout,
            use_tls=mode == "implicit",
            start_tls=False,
            tls_context=ctx,
        )
        self.connections_opened += 1
        try:
            try:
                await smtp.connect()
            except NETWORK_ERRORS as exc:
                if mode == "implicit" and any(isinstance(e, ssl.SSLError) for e in _chain(exc)):
                    raise _handshake_failure(label, exc) from exc
                raise
            _enable_pipelining(smtp)
            await self._ehlo(smtp)
            tls = mode == "implicit"
            if mode in ("may", "required") and not plaintext:
                if smtp.supports_extension("starttls"):
                    try:
                        await smtp.starttls(tls_context=ctx, server_hostname=server_hostname)
                    except aiosmtplib.SMTPResponseException as exc:
                        if mode == "required" and smtp.is_connected:
                            raise TlsPolicyError(
                                label,
                                f"TLS is required, but host {label} refused STARTTLS: "
                                f"{describe_error(exc)}",
                                "4.7.4",
                            ) from exc
                        if mode == "required" or not smtp.is_connected:
                            raise
                        log.info(
                            "%s refused STARTTLS (%s); continuing in plaintext", label, exc.code
                        )
                    except NETWORK_ERRORS as exc:
                        if mode == "required":
                            if any(isinstance(e, ssl.SSLError) for e in _chain(exc)):
                                raise _handshake_failure(label, exc) from exc
                            raise
                        log.info(
                            "%s: STARTTLS failed (%s); retrying in plaintext",
                            label,
                            describe_error(exc),
                        )
                        smtp.close()
                        return await self._open(
                            host,
                            port,
                            mode,
                            verify,
                            server_hostname,
                            username,
                            password,
                            auth_mechanism,
                            label,
                            plaintext=True,
                        )
                    else:
                        tls = True
                        await self._ehlo(smtp)
                elif mode == "required":
                    raise TlsPolicyError(
                        label, f"TLS is required, but was not offered by host {label}", "4.7.4"
                    )
            authenticated = False
            if username is not None and password is not None:
                await self._auth(smtp, username, password, auth_mechanism)
                authenticated = True
        except BaseException:
            smtp.close()
            raise
        now = time.monotonic()
        return OutboundConnection(
            smtp,
            now,
            now,
            label=label,
            authenticated=authenticated,
            tls=tls,
            extensions=dict(smtp.esmtp_extensions),
        )

    @staticmethod
    async def _auth(
        smtp: aiosmtplib.SMTP, username: str, password: str, mechanism: str | None
    ) -> None:
        if not smtp.supports_extension("auth"):
            raise AuthFailed("server does not advertise AUTH")
        try:
            if mechanism == "PLAIN":
                await smtp.auth_plain(username, password)
            else:
                await smtp.login(username, password)
        except aiosmtplib.SMTPResponseException as exc:
            enhanced, text = split_enhanced(exc.message)
            raise AuthFailed(f"{exc.code} {text}") from None
        except aiosmtplib.SMTPServerDisconnected:
            raise
        except aiosmtplib.SMTPException as exc:
            raise AuthFailed(str(exc)) from None


async def close_connection(conn: OutboundConnection, *, polite: bool, timeout: float) -> None:
    """Close a connection: QUIT first when ``polite`` and still connected (RFC 5321 §4.1.1.10).

    Args:
        conn: the connection.
        polite: send QUIT and wait for its reply (at most ``timeout`` seconds).
        timeout: seconds to wait for the QUIT reply.

    Never raises for network errors.
    """
    smtp = conn.smtp
    try:
        if polite and smtp.is_connected:
            await asyncio.wait_for(smtp.quit(), timeout=timeout)
    except (*NETWORK_ERRORS, asyncio.CancelledError):
        pass
    finally:
        smtp.close()


async def reset(conn: OutboundConnection, timeout: float) -> None:
    """End an open transaction with RSET (RFC 5321 §4.1.1.5); a failed RSET marks it unclean."""
    if not conn.smtp.is_connected:
        conn.clean = False
        return
    try:
        await conn.smtp.rset(timeout=timeout)
        conn.clean = True
    except NETWORK_ERRORS:
        conn.clean = False


# -- the envelope --------------------------------------------------------------------


def _param(key: str, value: str | None) -> str | None:
    if value is None:
        return key
    if not _ESMTP_VALUE.match(value):
        log.warning("dropping ESMTP parameter %s with an invalid value", key)
        return None
    return f"{key}={value}"


def mail_options(
    conn: OutboundConnection, envelope: Envelope, message: Message | None
) -> tuple[list[str], bool]:
    """MAIL FROM parameters for this server, and whether the transaction uses SMTPUTF8.

    SIZE (RFC 1870) is our size; BODY (RFC 6152) when the client gave one and the
    server has 8BITMIME (BINARYMIME is sent as 8BITMIME when the data is
    line-safe); SMTPUTF8 (RFC 6531) when needed or requested and offered;
    REQUIRETLS (RFC 8689) only over TLS to a server offering it; RET/ENVID (RFC
    3461) and others only when their extension is advertised; AUTH= only when
    we authenticated (RFC 4954 §5).

    Args:
        conn: the connection (its EHLO extensions, TLS and AUTH state).
        envelope: the transaction.
        message: the message bytes (for SIZE and the header check), or ``None``
            when MAIL is sent before the data exists (proxy mode): SIZE is then the
            client's own SIZE parameter, the header and binary checks are left to
            the caller at end of data (call again with the message).

    Returns:
        ``(parameters, use_smtputf8)``.

    Raises:
        PermanentDeliveryError: the message needs SMTPUTF8 (553 5.6.7), binary
            transport (554 5.6.3) or REQUIRETLS (550 5.7.30) the server lacks.
    """
    ext = conn.extensions
    params = envelope.mail_params
    addresses = [envelope.mail_from, *envelope.recipients]
    needs_utf8 = not all(a.isascii() for a in addresses)
    if not needs_utf8 and envelope.smtputf8 and message is not None:
        if isinstance(message, MessageFile):
            needs_utf8 = not message.header_isascii()
        else:
            end = message.find(b"\r\n\r\n")
            needs_utf8 = not (message[:end] if end >= 0 else message).isascii()
    if needs_utf8 and "smtputf8" not in ext:
        raise PermanentDeliveryError(SMTPUTF8_UNSUPPORTED)
    use_utf8 = needs_utf8 or (envelope.smtputf8 and "smtputf8" in ext)
    opts: list[str] = []
    if "size" in ext:
        if message is not None:
            opts.append(f"SIZE={len(message)}")
        elif (params.get("SIZE") or "").isdigit():
            opts.append(f"SIZE={params['SIZE']}")
    body = envelope.body_type
    if body == "BINARYMIME":
        if message is not None and (
            message.search(_NOT_DATA_SAFE) if isinstance(message, MessageFile)
            else _NOT_DATA_SAFE.search(message)
        ):
            raise PermanentDeliveryError(BINARY_UNSUPPORTED)
        body = "8BITMIME"
    if "BODY" in params and "8bitmime" in ext and body in ("7BIT", "8BITMIME"):
        opts.append(f"BODY={body}")
    if use_utf8:
        opts.append("SMTPUTF8")
    if "REQUIRETLS" in params:
        if not (conn.tls and "requiretls" in ext):
            raise PermanentDeliveryError(REQUIRETLS_UNAVAILABLE)
        opts.append("REQUIRETLS")
    for key, value in params.items():
        if key in ("SIZE", "BODY", "SMTPUTF8", "REQUIRETLS"):
            continue
        needed = _MAIL_PARAM_EXT.get(key)
        if key == "AUTH":
            needed = "auth" if conn.authenticated else None
        if needed is None or needed not in ext:
            log.debug("not passing MAIL parameter %s to %s", key, conn.label)
            continue
        item = _param(key, value)
        if item is not None:
            opts.append(item)
    return opts, use_utf8


def rcpt_options(conn: OutboundConnection, rcpt: Recipient) -> list[str]:
    """RCPT TO parameters for this server: NOTIFY/ORCPT (RFC 3461) only when it has DSN,
    RRVS (RFC 7293) only when it has RRVS; others are dropped."""
    opts = []
    for key, value in rcpt.params.items():
        needed = _RCPT_PARAM_EXT.get(key)
        if needed is None or needed not in conn.extensions:
            continue
        item = _param(key, value)
        if item is not None:
            opts.append(item)
    return opts


@dataclass
class EnvelopeReplies:
    """The server's replies to MAIL and each RCPT (RFC 5321 §3.3).

    Attributes:
        mail: the reply to MAIL FROM.
        rcpts: ``(recipient, reply)`` in envelope order; empty when MAIL was
            refused, shorter than the envelope when the server said 421 or the
            connection failed (see ``failure``).
        failure: the network error that ended the RCPT loop, or ``None``.
    """

    mail: aiosmtplib.SMTPResponse
    rcpts: list[tuple[Recipient, aiosmtplib.SMTPResponse]] = field(default_factory=list)
    failure: Exception | None = None

    @property
    def mail_ok(self) -> bool:
        """True when MAIL got a 2xx."""
        return 200 <= self.mail.code < 300

    @property
    def accepted(self) -> list[Recipient]:
        """Recipients the server accepted (2xx to RCPT)."""
        return [r for r, resp in self.rcpts if 200 <= resp.code < 300]

    @property
    def refusals(self) -> list[tuple[Recipient, aiosmtplib.SMTPResponse]]:
        """Recipients refused, with the reply."""
        return [(r, resp) for r, resp in self.rcpts if not 200 <= resp.code < 300]


async def send_envelope(
    conn: OutboundConnection, envelope: Envelope, message: Message, *, reused: bool = False
) -> EnvelopeReplies:
    """Send MAIL FROM and one RCPT TO per recipient, with the parameters this server takes.

    The RCPT loop stops at a 421 (the server is closing, RFC 5321 §3.8) or when
    the connection is lost (``failure``). ``conn.clean`` is false afterwards: the
    caller sends DATA or RSET.

    Args:
        conn: a ready connection.
        envelope: the transaction (addresses already checked for CR/LF/<>).
        message: the message (for SIZE and the SMTPUTF8 check).
        reused: the connection came from a pool; a disconnect at MAIL then raises
            :class:`StaleConnection` (nothing was sent; retry on a fresh one).

    Returns:
        The :class:`EnvelopeReplies`.

    Raises:
        PermanentDeliveryError: see :func:`mail_options` (nothing was sent).
        StaleConnection: see ``reused``.
        aiosmtplib.SMTPException / OSError / asyncio.TimeoutError: the
            connection failed at MAIL.
    """
    smtp = conn.smtp
    resp, use_utf8 = await send_mail(conn, envelope, message, reused=reused)
    result = EnvelopeReplies(resp)
    if not result.mail_ok:
        return result
    for rcpt in envelope.rcpt_to:
        try:
            resp = await send_rcpt(conn, rcpt, use_utf8)
        except NETWORK_ERRORS as exc:
            result.failure = exc
            break
        result.rcpts.append((rcpt, resp))
        if resp.code == 421 or not smtp.is_connected:
            break
    return result


async def send_mail(
    conn: OutboundConnection, envelope: Envelope, message: Message | None, *,
    reused: bool = False,
) -> tuple[aiosmtplib.SMTPResponse, bool]:
    """Send MAIL FROM with the parameters this server takes (RFC 5321 §4.1.1.2).

    ``conn.clean`` is false afterwards (a transaction may be open).

    Args:
        conn: a ready connection.
        envelope: the transaction (its recipients are used only for the SMTPUTF8 check).
        message: the message, or ``None`` before the data exists (see :func:`mail_options`).
        reused: the connection came from a pool; a disconnect raises :class:`StaleConnection`.

    Returns:
        ``(reply, use_smtputf8)``: the server's reply and whether SMTPUTF8 was sent
        (addresses are then sent as UTF-8).

    Raises:
        PermanentDeliveryError: see :func:`mail_options` (nothing was sent).
        StaleConnection: see ``reused``.
        aiosmtplib.SMTPException / OSError / asyncio.TimeoutError: the connection failed.
    """
    opts, use_utf8 = mail_options(conn, envelope, message)
    enc = "utf-8" if use_utf8 else "ascii"
    conn.uses += 1
    conn.clean = False
    try:
        resp = await conn.smtp.execute_command(
            b"MAIL",
            b"FROM:<" + envelope.mail_from.encode(enc) + b">",
            *(o.encode(enc) for o in opts),
        )
    except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
        if reused:
            raise StaleConnection() from exc
        raise
    return resp, use_utf8


async def send_rcpt(
    conn: OutboundConnection, rcpt: Recipient, use_smtputf8: bool
) -> aiosmtplib.SMTPResponse:
    """Send one RCPT TO with the parameters this server takes (RFC 5321 §4.1.1.3).

    Args:
        conn: the connection, after a 2xx to MAIL.
        rcpt: the recipient (address already checked for CR/LF/<>, ASCII unless
            ``use_smtputf8``).
        use_smtputf8: SMTPUTF8 was given at MAIL (addresses are sent as UTF-8).

    Returns:
        The server's reply.

    Raises:
        UnicodeEncodeError: a non-ASCII address without SMTPUTF8.
        aiosmtplib.SMTPException / OSError / asyncio.TimeoutError: the connection failed.
    """
    enc = "utf-8" if use_smtputf8 else "ascii"
    return await conn.smtp.execute_command(
        b"RCPT",
        b"TO:<" + rcpt.address.encode(enc) + b">",
        *(o.encode(enc) for o in rcpt_options(conn, rcpt)),
    )


async def deliver_per_recipient(
    conn: OutboundConnection,
    envelope: Envelope,
    message: Message,
    *,
    reused: bool = False,
    remote_mta: str | None = None,
    rset_timeout: float = 10.0,
) -> RecipientResults:
    """Run one transaction and report each recipient's outcome (RFC 5321 §3.3, §6.1).

    Unlike the atomic proxy path, partial acceptance is normal: refused
    recipients get the server's RCPT reply, and the message is sent when at least
    one recipient was accepted; every accepted recipient gets the end-of-data reply.
    When the server offers PIPELINING (RFC 2920) and there are at most
    :data:`PIPELINE_MAX_RCPTS` recipients, MAIL, every RCPT and DATA go out in one
    write and their replies are read in order (see :func:`_pipelined_exchange`);
    otherwise each command waits for its reply. The outcomes are the same either way. A
    refused MAIL gives every recipient that reply. A 421 or a lost connection
    after MAIL was answered gives every recipient still without a final reply
    ``451 4.4.1`` (accepted recipients included: if the connection died after
    the final dot, the message may arrive twice, RFC 5321 §6.1 / RFC 1047).

    Args:
        conn: a ready connection (not shared while this runs).
        envelope: the transaction; recipients with a malformed address get
            ``501 5.1.3`` locally, a malformed reverse-path gives everyone ``501 5.1.7``.
        message: the complete message, CRLF line endings, not dot-stuffed: bytes, or a
            :class:`MessageFile` streamed from disk by :func:`send_data`.
        reused: the connection came from a pool (see :func:`send_envelope`).
        remote_mta: the server's host name, stored in the results.
        rset_timeout: seconds to wait for RSET after a refusal.

    Returns:
        :class:`RecipientResults` with a reply for every recipient of ``envelope``.

    Raises:
        StaleConnection: a pooled connection was dead at MAIL (nothing sent).
        TemporaryDeliveryError: ``451 4.4.1`` when the connection failed, or the
            server said 421, before it answered MAIL: nothing was decided for
            any recipient, so the caller may try another connection or host.
    """
    results = RecipientResults(remote_mta=remote_mta)
    results.next_hop_dsn = "dsn" in conn.extensions
    if BAD_ADDRESS.search(envelope.mail_from):
        results.fill(envelope, BAD_SENDER)
        return results
    good: list[Recipient] = []
    for rcpt in envelope.rcpt_to:
        if rcpt.address and not BAD_ADDRESS.search(rcpt.address):
            good.append(rcpt)
        else:
            results.set_local(rcpt.address, BAD_RECIPIENT)
    if not good:
        return results
    work = Envelope(envelope.mail_from, envelope.mail_params, good)
    if (
        "pipelining" in conn.extensions
        and len(good) <= PIPELINE_MAX_RCPTS
        and isinstance(conn.smtp.protocol, _PipeliningProtocol)
    ):
        return await _deliver_pipelined(conn, work, message, results, reused, rset_timeout)
    try:
        replies = await send_envelope(conn, work, message, reused=reused)
    except PermanentDeliveryError as exc:
        conn.clean = True  # nothing was sent
        results.fill(work, exc.reply)
        return results
    except NETWORK_ERRORS as exc:
        conn.clean = False
        raise TemporaryDeliveryError(
            connection_failure(conn.label, describe_error(exc)), "connection failed at MAIL"
        ) from None
    if replies.mail.code == 421:
        conn.clean = False
        raise TemporaryDeliveryError(
            connection_failure(conn.label, describe_error(_as_exc(replies.mail))),
            "421 at MAIL",
        )
    if not replies.mail_ok:
        await reset(conn, rset_timeout)
        results.fill(work, remote_reply(replies.mail.code, replies.mail.message))
        return results
    closing: Reply | None = None
    for rcpt, resp in replies.rcpts:
        if 200 <= resp.code < 300:
            continue
        if resp.code == 421:
            closing = connection_failure(conn.label, describe_error(_as_exc(resp)))
            break
        results.set_remote(rcpt.address, remote_reply(resp.code, resp.message))
    if replies.failure is not None:
        closing = connection_failure(conn.label, describe_error(replies.failure))
    accepted = replies.accepted
    if closing is not None:
        conn.clean = False
        results.fill(work, closing)
        return results
    if not accepted:
        await reset(conn, rset_timeout)
        return results
    try:
        resp = await send_data(conn, message)
    except aiosmtplib.SMTPDataError as exc:
        if exc.code == 421 or not conn.smtp.is_connected:
            conn.clean = False
            results.fill(work, connection_failure(conn.label, describe_error(exc)))
            return results
        await reset(conn, rset_timeout)
        reply = remote_reply(exc.code, exc.message)
        for rcpt in accepted:
            results.set_remote(rcpt.address, reply)
        return results
    except NETWORK_ERRORS as exc:
        conn.clean = False
        results.fill(work, connection_failure(conn.label, describe_error(exc)))
        return results
    conn.clean = True
    reply = remote_reply(resp.code, resp.message)
    for rcpt in accepted:
        results.set_remote(rcpt.address, reply)
    return results


@dataclass
class _Exchange:
    """The replies of one pipelined transaction (see :func:`_pipelined_exchange`)."""

    mail: aiosmtplib.SMTPResponse
    rcpts: list[tuple[Recipient, aiosmtplib.SMTPResponse]] = field(default_factory=list)
    data: aiosmtplib.SMTPResponse | None = None  # the reply to DATA
    final: aiosmtplib.SMTPResponse | None = None  # the reply to the end of data
    failure: Exception | None = None  # the network error that ended the exchange


async def _pipelined_exchange(
    conn: OutboundConnection, work: Envelope, message: Message, opts: list[str],
    use_utf8: bool, reused: bool,
) -> _Exchange:
    """MAIL, RCPT per recipient and DATA in one write (RFC 2920 §3.1), then their replies
    in order; after a 354 the message when MAIL and at least one RCPT were accepted,
    else only the end of data (``.``), and the reply to it. Holds the command lock.

    Raises:
        StaleConnection: ``reused`` and the connection was found closed before MAIL
            was answered (nothing was accepted).
        aiosmtplib.SMTPException / OSError / asyncio.TimeoutError: the connection failed
            before MAIL was answered (later failures are in ``failure``; the connection
            is then closed).
        ValueError: the message file became shorter than its size (connection closed).
    """
    smtp = conn.smtp
    proto = smtp.protocol
    lock = proto._command_lock if proto is not None else None
    if not isinstance(proto, _PipeliningProtocol) or lock is None:
        lost = aiosmtplib.SMTPServerDisconnected("Server not connected")
        if reused:
            raise StaleConnection() from lost
        raise lost
    enc = "utf-8" if use_utf8 else "ascii"
    lines = [b" ".join([b"MAIL FROM:<" + work.mail_from.encode(enc) + b">",
                        *(o.encode(enc) for o in opts)])]
    for rcpt in work.rcpt_to:
        lines.append(b" ".join([b"RCPT TO:<" + rcpt.address.encode(enc) + b">",
                                *(o.encode(enc) for o in rcpt_options(conn, rcpt))]))
    lines.append(b"DATA\r\n")
    timeout = smtp.timeout
    async with lock:
        proto.pipelining = True
        proto._response_pending = True
        try:
            try:
                proto.write(b"\r\n".join(lines))
                ex = _Exchange(await proto.next_response(timeout))
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                if reused:
                    raise StaleConnection() from exc
                raise
            try:
                for rcpt in work.rcpt_to:
                    ex.rcpts.append((rcpt, await proto.next_response(timeout)))
                ex.data = await proto.next_response(timeout)
                if ex.data.code == 354:
                    if 200 <= ex.mail.code < 300 and any(
                        200 <= r.code < 300 for _, r in ex.rcpts
                    ):
                        await _write_message(proto, message, timeout)
                    else:  # nothing to send it to: end the data at once
                        proto.write(b".\r\n")
                    ex.final = await proto.next_response(timeout)
            except NETWORK_ERRORS as exc:
                ex.failure = exc
                smtp.close()
            except ValueError:
                smtp.close()
                raise
            return ex
        finally:
            proto.pipelining = False
            proto._response_pending = False


async def _deliver_pipelined(
    conn: OutboundConnection, work: Envelope, message: Message, results: RecipientResults,
    reused: bool, rset_timeout: float,
) -> RecipientResults:
    """:func:`deliver_per_recipient` over :func:`_pipelined_exchange` (same outcomes)."""
    try:
        opts, use_utf8 = mail_options(conn, work, message)
    except PermanentDeliveryError as exc:
        conn.clean = True  # nothing was sent
        results.fill(work, exc.reply)
        return results
    conn.uses += 1
    conn.clean = False
    try:
        ex = await _pipelined_exchange(conn, work, message, opts, use_utf8, reused)
    except NETWORK_ERRORS as exc:
        raise TemporaryDeliveryError(
            connection_failure(conn.label, describe_error(exc)), "connection failed at MAIL"
        ) from None
    if ex.mail.code == 421:
        raise TemporaryDeliveryError(
            connection_failure(conn.label, describe_error(_as_exc(ex.mail))), "421 at MAIL"
        )
    if not 200 <= ex.mail.code < 300:
        results.fill(work, remote_reply(ex.mail.code, ex.mail.message))
        if ex.failure is None:
            await reset(conn, rset_timeout)
        return results
    closing: Reply | None = None
    accepted: list[Recipient] = []
    for rcpt, resp in ex.rcpts:
        if 200 <= resp.code < 300:
            accepted.append(rcpt)
        elif resp.code == 421:
            closing = connection_failure(conn.label, describe_error(_as_exc(resp)))
            break
        else:
            results.set_remote(rcpt.address, remote_reply(resp.code, resp.message))
    if closing is None and ex.failure is not None:
        closing = connection_failure(conn.label, describe_error(ex.failure))
    if closing is not None:
        conn.clean = False
        results.fill(work, closing)
        return results
    data = ex.data
    assert data is not None  # no failure: every reply was read
    if not accepted:
        await reset(conn, rset_timeout)
        return results
    end = ex.final if data.code == 354 else data
    assert end is not None
    if end.code != 250:
        if end.code == 421 or not conn.smtp.is_connected:
            conn.clean = False
            results.fill(work, connection_failure(conn.label, describe_error(_as_exc(end))))
            return results
        await reset(conn, rset_timeout)
        reply = remote_reply(end.code, end.message)
        for rcpt in accepted:
            results.set_remote(rcpt.address, reply)
        return results
    conn.clean = True
    reply = remote_reply(end.code, end.message)
    for rcpt in accepted:
        results.set_remote(rcpt.address, reply)
    return results


def _as_exc(resp: aiosmtplib.SMTPResponse) -> aiosmtplib.SMTPResponseException:
    return aiosmtplib.SMTPResponseException(resp.code, resp.message)
