"""The sans-IO SMTP server state machine: bytes in, events out, replies in, bytes out.

Entry points: :class:`ServerConnection` (``receive_data``, ``next_event``, ``send``,
``close_reply``, ``tls_established``) and :class:`ProtocolConfig`.
No sockets, asyncio, ssl or logging here. RFC 5321 (commands, states, limits,
§4.5.2 dot-stuffing, §4.5.3 limits), RFC 1869/1870/2034/2920/3207/4954/6152/6531.
"""

from __future__ import annotations

import binascii
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LocalProtocolError
from ..reply import R, Reply
from .events import (
    NEED_DATA,
    AuthCredentials,
    AutoReply,
    BdatStart,
    Data,
    DataComplete,
    Etrn,
    Event,
    Expn,
    Helo,
    MailFrom,
    MessageChunk,
    Quit,
    RcptTo,
    Rset,
    StartTls,
    UnknownCommand,
    Vrfy,
    _Sentinel,
)
from .grammar import (
    PathSyntaxError,
    parse_params,
    parse_path,
    sloppy_path,
    valid_helo_argument,
)
from .states import (
    CREDENTIALS,
    END_OF_DATA,
    GREETING,
    SASL,
    TLS_HANDSHAKE,
    TRANSITIONS,
    UNKNOWN,
    State,
    rule,
)

MAX_AUTH_LINE = 12288  # octets, RFC 4954 §4 (AUTH command line and SASL responses)
MAX_PATH_COMMAND = 2048  # MAIL/RCPT with ESMTP parameters (RFC 1869 §4.1.2 lets extensions grow it)
OVERLONG_LINE_BOUND = 64 * 1024
"""Octets an over-long command line may run past its limit before the session is closed.

A command line (or SASL response) longer than its limit is answered once with
``500 5.5.2 Line too long`` (``500 5.5.6`` in an AUTH exchange, RFC 4954 §6) and
discarded up to its CRLF; when no CRLF has come within this many octets past the
limit, the core answers ``421 4.5.0`` and closes. Memory stays bounded by the
limit plus one received chunk whatever the client sends.
"""
_COMPACT_AT = 16384

_AUTH_PLAIN = "PLAIN"
_AUTH_LOGIN = "LOGIN"
_CHALLENGE_USERNAME = Reply(334, None, "VXNlcm5hbWU6")  # base64("Username:")
_CHALLENGE_PASSWORD = Reply(334, None, "UGFzc3dvcmQ6")  # base64("Password:")
_CHALLENGE_EMPTY = Reply(334, None, "")

# RFC 5321 §2.3.8: only CRLF ends a line, so a bare LF or CR is part of the line it is in.
_BARE_LF_COMMAND = Reply(500, "5.5.2", "Bare <LF> in command line; only <CRLF> ends a line")
_BARE_CR_COMMAND = Reply(500, "5.5.2", "Bare <CR> in command line; only <CRLF> ends a line")
_BARE_SASL = Reply(501, "5.5.2", "Bare <CR> or <LF> in SASL response; only <CRLF> ends a line")
# RFC 4954 §6: "500 5.5.6 Authentication Exchange line is too long".
_AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
# RFC 3463 X.5.0 "Other or undefined protocol status": the client broke the command
# framing itself (no CRLF within the bound); the subject is protocol, not security.
_LINE_NEVER_ENDS = Reply(421, "4.5.0", "Line too long and not ended; closing connection")
_TOO_MANY_UNKNOWN = Reply(421, "4.7.0", "Too many unrecognized commands, closing connection")
_HTTP = Reply(421, "4.7.0", "This is an SMTP server, not a web proxy; closing connection")
# RFC 5321 §4.5.3.1.10 allows 452 for too many recipients; ZMailer's max-error-recipients.
_NULL_SENDER_RCPTS = Reply(452, "4.5.3", "Too many recipients for a message from <>")
_PARAM_UNKNOWN = Reply(555, "5.5.4", "MAIL or RCPT parameter not recognized or not implemented")
_BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
_BAD_BODY = Reply(501, "5.5.4", "Bad BODY parameter")
_NO_PARAMS_HELO = Reply(555, "5.5.4", "ESMTP parameters not allowed after HELO")
_SMTPUTF8_ARG = Reply(501, "5.5.4", "SMTPUTF8 takes no value")
_NOT_UTF8 = Reply(501, "5.5.4", "Invalid UTF-8 in command arguments")
_SMTPUTF8_RCPT = Reply(553, "5.6.7", "Non-ASCII recipient requires MAIL FROM with SMTPUTF8")
_HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO/EHLO domain")
_NO_ARGS = Reply(501, "5.5.4", "Syntax error: no arguments allowed")
_MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
_RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address> [parameters]")
_VRFY_SYNTAX = Reply(501, "5.5.4", "Syntax: VRFY address")
_AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
_AUTH_NOT_AVAILABLE = Reply(502, "5.5.1", "AUTH not available")
_TLS_NOT_ADVERTISED = Reply(502, "5.5.1", "STARTTLS not available")
_LMTP_USE_LHLO = Reply(500, "5.5.1", "This is an LMTP server: use LHLO")
_BINARY_NEEDS_BDAT = Reply(503, "5.5.1", "BODY=BINARYMIME requires BDAT, not DATA")
_BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT size [LAST]")
_BDAT_AFTER_FAILURE = Reply(503, "5.5.1", "Earlier BDAT failed; send RSET")
_BAD_BY_PARAM = Reply(501, "5.5.4", "Invalid BY parameter (RFC 2852)")
_EXPN_SYNTAX = Reply(501, "5.5.4", "Syntax: EXPN list")
_BY_PARAM = re.compile(r"-?[0-9]{1,9};[RNrn][Tt]?")
_BAD_DSN_PARAM = Reply(501, "5.5.4", "Invalid DSN parameter (RFC 3461)")
_ETRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ETRN domain | @domain | #queue")
_ETRN_NODE = re.compile(
    r"#[A-Za-z0-9._\-]{1,64}"  # a queue name
    r"|@?[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"  # [@]domain: RFC 1985 §3
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*"
)
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
# Commands whose handlers look at their arguments or at a disabled extension before
# they consult the state table (DATA with an argument is 501 in every state); every
# other verb is checked against the table before its handler runs.
_ARGUMENTS_FIRST = frozenset({"DATA", "BDAT", "ETRN", "STARTTLS", "AUTH"})

_HELP_DEFAULT = (
    "smtpgate: an ESMTP server\n"
    "Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY STARTTLS AUTH\n"
    "See RFC 5321"
)

_BARE_RE = re.compile(rb"\r\n|\r|\n")
# A bare CR (not followed by LF) and a bare LF (not preceded by CR). Each search starts
# with a literal, which the regex engine scans for quickly: the two together cost half
# of counting CR, LF and CRLF (the exact count is needed only when one is there).
_BARE_CR = re.compile(rb"\r(?!\n)")
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


@dataclass(frozen=True, slots=True)
class ProtocolConfig:
    """Settings of the protocol core (a projection of the server configuration).

    Attributes:
        hostname: smtpgate's host name, used in HELO/EHLO replies.
        max_message_size: bytes after dot-unstuffing; advertised in SIZE (RFC 1870).
        max_recipients: recipients per transaction; the excess gets 452 4.5.3.
        max_line_length: octets per message text line including CRLF (RFC 5321
            §4.5.3.1.6); 0 disables the check.
        message_chunk_size: octets of message text the core holds before it hands
            them to the driver as a :class:`MessageChunk` (at least 16); a message
            shorter than this comes whole in :class:`DataComplete`.
        max_command_line: octets per command line including CRLF (§4.5.3.1.4);
            MAIL/RCPT may use up to 2048 (parameters), AUTH lines and SASL
            responses up to 12288 (RFC 4954 §4). Only CRLF ends a line (§2.3.8).
            A longer line is answered once (500 5.5.2, or 500 5.5.6 in AUTH) as
            soon as it exceeds the limit, then discarded up to its CRLF; without
            a CRLF within :data:`OVERLONG_LINE_BOUND` octets past the limit the
            session gets ``421 4.5.0`` and is closed.
        max_errors: error replies caused by the client (4xx and 5xx) per session
            before ``421 4.7.0`` and close (Postfix ``smtpd_hard_error_limit``).
            Not counted: ``421`` replies, replies whose enhanced status code has
            subject 3 (mail system, ``4.3.0``, ``452 4.3.1`` ...) or 4 (network
            and routing, ``451 4.4.1`` ...), which are the server's own failures
            (RFC 3463 §3.4, §3.5), and ``452 4.5.3`` (too many recipients) up to
            ``recipient_overshoot_limit`` per transaction.
        recipient_overshoot_limit: ``452 4.5.3`` replies per transaction that do
            not count toward ``max_errors`` (Postfix ``smtpd_recipient_overshoot_limit``);
            each further one counts.
        max_unknown_commands: unrecognized commands per session before ``421``.
        unknown_events: hand unrecognized commands to the driver as
            :class:`UnknownCommand` events (the driver may let a plugin answer
            them) instead of answering ``500 5.5.1`` itself. They then count
            toward ``max_unknown_commands`` only when the reply sent is a 5xx.
        data_start_events: hand the first BDAT of a transaction to the driver as a
            :class:`BdatStart` event before its chunk is read, so the driver's
            ``data_start`` decision applies to CHUNKING as it does to DATA.
        max_error_recipients: recipients accepted on a transaction whose
            reverse-path is ``<>`` (ZMailer ``max-error-recipients``); each further
            RCPT gets ``452 4.5.3 Too many recipients for a message from <>``,
            counted like any ``452 4.5.3`` (see ``recipient_overshoot_limit``).
            0: no limit besides ``max_recipients``.
        normalize_bare_line_endings: rewrite bare CR/LF in message data to CRLF
            instead of rejecting the message with 550 5.6.11.
        smtputf8 / eightbitmime / pipelining / enhanced_status_codes: advertise
            (and honour) those extensions.
        tls_available: STARTTLS can be offered (a certificate is configured).
        tls_active: the connection is already TLS (implicit TLS listener).
        auth_mechanisms: SASL mechanisms offered (subset of PLAIN, LOGIN); empty
            disables AUTH.
        auth_require_tls: offer and accept AUTH only under TLS.
        dsn: advertise DSN and accept RET/ENVID (MAIL) and NOTIFY/ORCPT (RCPT), RFC 3461.
        etrn: advertise ETRN and turn ETRN commands into events (RFC 1985).
        chunking: advertise CHUNKING and accept BDAT (RFC 3030).
        binarymime: advertise BINARYMIME and accept BODY=BINARYMIME (needs chunking).
        deliverby: advertise DELIVERBY and accept the BY parameter (RFC 2852).
        lmtp: speak LMTP (RFC 2033): LHLO instead of HELO/EHLO, one reply per
            recipient after the message (see :meth:`ServerConnection.send_lmtp`).
        ehlo: accept EHLO (False: EHLO is an unknown command; ZMailer NoEHLO).
        expn: turn EXPN into :class:`Expn` events (False: 502).
        require_auth: submission mode: MAIL before a successful AUTH gets 530 5.7.0.
        help_text: text of the 214 reply to HELP (lines separated by ``\\n``).
    """

    hostname: str = "localhost"
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 100
    max_line_length: int = 1000
    message_chunk_size: int = 256 * 1024
    max_command_line: int = 512
    max_errors: int = 10
    recipient_overshoot_limit: int = 1000
    max_unknown_commands: int = 5
    unknown_events: bool = False
    data_start_events: bool = False
    max_error_recipients: int = 0
    normalize_bare_line_endings: bool = False
    smtputf8: bool = True
    eightbitmime: bool = True
    pipelining: bool = True
    enhanced_status_codes: bool = True
    tls_available: bool = False
    tls_active: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    auth_require_tls: bool = True
    dsn: bool = False
    etrn: bool = False
    chunking: bool = False
    binarymime: bool = False
    deliverby: bool = False
    lmtp: bool = False
    ehlo: bool = True
    expn: bool = False
    require_auth: bool = False
    help_text: str = _HELP_DEFAULT


class _Overlong(enum.Enum):
    """Results of the line reader besides a line: the line exceeds its limit, or
    it has not ended within OVERLONG_LINE_BOUND octets past it."""

    TOO_LONG = "TOO_LONG"
    NEVER_ENDS = "NEVER_ENDS"


_LINE_TOO_LONG = _Overlong.TOO_LONG
_LINE_NEVER_ENDS_MARK = _Overlong.NEVER_ENDS
_LONG_VERBS = (b"AUTH ", b"MAIL ", b"RCPT ")


_LINE_WINDOW = 1 << 20  # bytes of message text split into lines at a time


def _line_longer_than(data: bytes, longest: int, pos: int = 0) -> bool:
    """True when a CRLF-separated line of ``data`` is longer than ``longest`` octets
    (CRLF not counted). The text is split a window (about 1 MiB, cut at a CRLF) at a
    time, so a 50 MB message costs a bounded amount of memory, not a list of every line.

    A quick test comes first: a line over ``longest`` is a run of at least ``longest + 2``
    octets without LF (its text and its CR), and such a run covers a whole block of a grid
    of ``(longest + 1) // 2``-octet blocks; when every block holds an LF (one memchr each),
    no line is too long and nothing is split. (LF ends every line here: the bare CR/LF
    check or normalisation has run.)
    """
    n = len(data)
    block = (longest + 1) // 2
    if block >= 64:
        find = data.find
        k = pos
        while k + block <= n and find(b"\n", k, k + block) >= 0:
            k += block
        if k + block > n:
            return False
    while pos < n:
        stop = pos + _LINE_WINDOW
        if stop >= n:
            stop = n
        else:
            cut = data.rfind(b"\r\n", pos, stop)
            if cut < 0:  # one line fills the window: measure it alone
                end = data.find(b"\r\n", pos)
                end = n if end < 0 else end
                if end - pos > longest:
                    return True
                pos = end + 2
                continue
            stop = cut
        if max(map(len, data[pos:stop].split(b"\r\n"))) > longest:
            return True
        pos = stop + 2
    return False


class _TextCheck:
    """The checks of one message's text, fed in pieces (DATA or BDAT): size, bare CR/LF
    (RFC 5321 §2.3.8, 550 5.6.11, or rewritten to CRLF when normalising) and text line
    length (§4.5.3.1.6, 500 5.5.2). The verdict does not depend on how the text was cut,
    as long as no piece but the last ends with a CR (the readers hold a trailing CR back).

    A size over the limit wins over a content problem (a message both too big and with a
    bare LF gets 552 5.3.4), so sizes are counted to the end; the text of a message with a
    problem is dropped as it comes (memory stays bounded).
    """

    __slots__ = ("bare", "binary", "line", "long_line", "max_size", "longest", "normalize",
                 "size")

    def __init__(self, config: ProtocolConfig, binary: bool) -> None:
        self.binary = binary
        self.max_size = config.max_message_size
        self.longest = config.max_line_length - 2 if config.max_line_length else 0
        self.normalize = config.normalize_bare_line_endings
        self.bare = False  # a bare CR or LF was seen (and is not being normalised)
        self.long_line = False  # a text line over the limit was seen
        self.size = 0  # octets after unstuffing (and normalising)
        self.line = 0  # octets of the current, unfinished line

    def feed(self, data: bytes) -> bytes:
        """Check one piece; returns it (normalised when configured), or ``b""`` once the
        message is known to be refused (the checks that decide between verdicts go on)."""
        n = len(data)
        if self.binary:  # BINARYMIME (RFC 3030 §3): byte-exact, no line checks
            self.size += n
            return b"" if self.size > self.max_size else data
        if self.size > self.max_size:
            self.size += n
            return b""
        # A piece never ends with a CR unless it is the last (see the class text), so a
        # CR at its end is bare, and an LF at its start follows a byte that is not a CR.
        bare = 0
        if _BARE_CR.search(data) is not None or _BARE_LF.search(data) is not None:
            # how many (CRLF cannot overlap itself): a bare CR or LF each becomes a CRLF
            crlf = data.count(b"\r\n")
            bare = data.count(b"\r") - crlf + data.count(b"\n") - crlf
        if bare:
            if not self.normalize:
                self.bare = True
                self.size += n
                return b""
            self.size += n + bare  # each bare CR or LF becomes a CRLF
            if self.long_line or self.size > self.max_size:
                return b""
            data = _BARE_RE.sub(b"\r\n", data)
        else:
            self.size += n
            if self.bare or self.long_line or self.size > self.max_size:
                return b""
        longest = self.longest
        if longest:
            # Measured after unstuffing (the transparency dot does not count) and after
            # normalisation (bare-LF lines count as lines when they are normalised).
            first = data.find(b"\r\n")
            if first < 0:
                self.line += len(data)
                if self.line > longest:
                    self.long_line = True
                    return b""
            else:
                if self.line + first > longest or (
                    len(data) - first > longest + 2
                    and _line_longer_than(data, longest, first + 2)
                ):
                    self.long_line = True
                    return b""
                self.line = len(data) - data.rfind(b"\r\n") - 2
        return data

    def verdict(self) -> Reply | None:
        """The reply refusing the message, or ``None`` when it passed every check:
        too big wins over a bare CR/LF, which wins over a long line."""
        if self.size > self.max_size:
            return R.TOO_BIG
        if self.bare:
            return R.BARE_LF
        if self.long_line:
            return R.TEXT_LINE_TOO_LONG
        return None


class ServerConnection:
    """One SMTP session's protocol state, server side, with no I/O.

    Usage (the driver's loop)::

        conn = ServerConnection(config)
        out = conn.send(Reply(220, None, "mx.example.org ESMTP"))
        while not conn.closed:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await read())   # b"" means the peer closed
                continue
            reply = decide(event)          # hooks, policy, delivery ...
            write(conn.send(reply))

    Exactly one ``send`` follows each event (PIPELINING: the driver may batch the
    returned bytes until ``next_event`` returns ``NEED_DATA``). The reply sent
    decides the transition, as the table :data:`~smtpgate.protocol.states.TRANSITIONS`
    says (e.g. 354 to ``Data`` enters the DATA state, 2xx to ``MailFrom`` starts
    a transaction). Protocol errors never raise: they come out as
    :class:`AutoReply` events carrying the reply to send.

    Attributes (read-only for the driver):
        errors: replies counted as the client's errors so far (see
            ``ProtocolConfig.max_errors``).
        unknown_commands: unrecognized commands so far (with ``unknown_events``:
            those answered with a 5xx).
        state: the :class:`State`; ``helo_name``, ``esmtp``, ``tls_active``,
            ``authenticated`` describe the session.
    """

    # No per-instance __dict__: one of these lives as long as its connection (issue 13,
    # idle connection memory).
    __slots__ = (
        "allow_sloppy_paths", "authenticated", "config", "errors", "esmtp", "helo_name",
        "peer_closed", "state", "tls_active", "unknown_commands", "_bdat_buf", "_bdat_failed",
        "_bdat_size", "_check", "_demitted",
        "_body_binary", "_buf", "_chunk_active", "_chunk_error", "_chunk_last", "_chunk_left",
        "_chunk_size", "_dbuf", "_discard_count", "_discard_label", "_discard_limit",
        "_discarding", "_dscan", "_dsize", "_dtoo_big", "_input", "_mail_utf8", "_null_sender",
        "_pending", "_pos", "_rcpt_attempts", "_rcpt_count", "_rcpt_overshoot", "_sasl_mech",
        "_sasl_user", "_scanned",
    )

    def __init__(self, config: ProtocolConfig | None = None) -> None:
        self.config = config or ProtocolConfig()
        self.state = State.GREETING
        self.helo_name: str | None = None
        self.esmtp = False
        self.tls_active = self.config.tls_active
        self.authenticated = False
        self.peer_closed = False
        self.errors = 0
        self.unknown_commands = 0
        # ZMailer "S" style (per HELO rule): accept MAIL FROM:user@domain without brackets.
        self.allow_sloppy_paths = False
        self._pending: Event | None = None
        # The input (verb or pseudo-input of the state table) the pending event
        # answers; its rule decides the state after the reply.
        self._input: str | None = None
        self._buf = bytearray()
        self._pos = 0
        self._scanned = 0  # bytes after _pos searched for CRLF without finding one
        # An over-long line being discarded up to its CRLF (see OVERLONG_LINE_BOUND).
        self._discarding = False
        self._discard_count = 0  # octets of that line dropped so far
        self._discard_limit = 0  # the limit it exceeded
        self._discard_label = ""  # what the logs call it
        # transaction
        self._mail_utf8 = False
        self._body_binary = False
        self._rcpt_count = 0
        self._rcpt_attempts = 0
        self._rcpt_overshoot = 0  # 452 4.5.3 replies in this transaction
        self._null_sender = False  # the transaction's reverse-path is <>
        # DATA reader
        self._dbuf = bytearray()
        self._dscan = 0
        self._dsize = 0  # stuffed dots counted so far (see _next_data_event)
        self._dtoo_big = False
        # BDAT reader (RFC 3030)
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_active = False
        self._chunk_error: Reply | None = None
        self._bdat_buf = bytearray()
        self._bdat_size = 0  # octets of the transaction's chunks so far
        self._bdat_failed = False
        # DATA and BDAT: the checks of the message being read
        self._check: _TextCheck | None = None
        self._demitted = 0  # octets of DATA text handed out as MessageChunk events
        # SASL
        self._sasl_mech = ""
        self._sasl_user: str | None = None

    # ------------------------------------------------------------------ input

    @property
    def closed(self) -> bool:
        """True once the session must be closed (after 221, 421, or the peer left)."""
        return self.state is State.CLOSED

    @property
    def in_data(self) -> bool:
        """True while message text is being read (the driver applies the data timeout)."""
        return (self.state is State.DATA or self._chunk_active) and self._pending is None

    @property
    def in_transaction(self) -> bool:
        """True between an accepted MAIL and the reply to the end of data or RSET."""
        return self.state in (State.MAIL, State.RCPT, State.DATA, State.BDAT)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events or handed out (commands, DATA
        text, BDAT chunks), for flow control: a driver stops reading above a bound."""
        return len(self._buf) - self._pos + len(self._dbuf) + len(self._bdat_buf)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes received from the client; ``b""`` means the client closed.

        Bytes received while a STARTTLS handshake is pending are discarded
        (CVE-2011-0411: nothing sent in plaintext may survive into the TLS session).
        """
        if not data:
            self.peer_closed = True
            return
        if self.state is State.TLS_PENDING or self.state is State.CLOSED:
            return
        if self.state is State.DATA and self._pending is None:
            self._dbuf += data
        else:
            self._buf += data

    def next_event(self) -> Event | _Sentinel:
        """Return the next event, or :data:`NEED_DATA` when more bytes are needed.

        Raises:
            LocalProtocolError: if the previous event has not been answered with
                :meth:`send` yet.
        """
        if self._pending is not None:
            raise LocalProtocolError(R.TEMP_ERROR, "previous event not answered")
        state = self.state
        if state is State.DATA:
            self._input = END_OF_DATA
            return self._pend(self._next_data_event())
        if state is State.CLOSED or state is State.TLS_PENDING or state is State.GREETING:
            return NEED_DATA
        if self._chunk_active:
            return self._pend(self._next_chunk_event())
        if not self._buf and not self._discarding:
            return NEED_DATA  # every command so far answered: nothing to parse
        line = self._next_line()
        if line is None:
            return NEED_DATA
        self._input = SASL if state is State.AUTH else None
        if line is _LINE_TOO_LONG:
            if state is State.AUTH:
                # An overlong SASL response ends the exchange (the SASL rule's
                # ``otherwise``); else the next command would be taken as SASL data.
                self._sasl_user = None
            if self._discard_label == "AUTH":
                return self._auto(_AUTH_LINE_TOO_LONG, "AUTH", step=state is State.AUTH)
            return self._auto(R.LINE_TOO_LONG, self._discard_label)
        if line is _LINE_NEVER_ENDS_MARK:
            return self._auto(_LINE_NEVER_ENDS, self._discard_label)
        assert isinstance(line, bytes)
        if state is State.AUTH:
            return self._pend(self._sasl_response(line))
        ev = self._command(line)
        if ev is not NEED_DATA and type(ev) is not MessageChunk:  # BDAT may read on
            self._pending = ev
        return ev

    def _pend(self, event: Event | _Sentinel) -> Event | _Sentinel:
        if event is not NEED_DATA and type(event) is not MessageChunk:
            self._pending = event
        return event

    def _auto(self, reply: Reply, command: str, *, step: bool = False) -> AutoReply:
        """Answer the current line with ``reply`` decided by the core.

        ``step``: the reply takes the command a step further (a BDAT chunk accepted,
        a SASL challenge, the end of a SASL exchange), so the state table's rule for
        the input applies when it is sent. Otherwise it is a refusal or an answer
        (NOOP, HELP) that changes no state whatever the driver sends.
        """
        if not step:
            self._input = None
        # ``command`` is for logs: escape control characters (CR, ESC, ...) so a
        # client cannot forge or garble log lines through it.
        ev = AutoReply(reply, _loggable(command))
        self._pending = ev
        return ev

    def _line_limit(self) -> int | None:
        """The length limit (octets including CRLF) of the line starting at ``_pos``.

        ``None`` while too few bytes have arrived to tell (fewer than 5 that could
        still begin ``AUTH ``, ``MAIL `` or ``RCPT ``). RFC 5321 §4.5.3.1.4,
        RFC 1869 §4.1.2 (parameters), RFC 4954 §4 (12288 for AUTH and SASL lines).
        """
        cfg = self.config
        if self.state is State.AUTH:
            return max(cfg.max_command_line, MAX_AUTH_LINE)
        head = bytes(self._buf[self._pos : self._pos + 5]).upper()
        if head == b"AUTH ":
            return max(cfg.max_command_line, MAX_AUTH_LINE)
        if head in (b"MAIL ", b"RCPT "):
            return max(cfg.max_command_line, MAX_PATH_COMMAND)
        if len(head) < 5 and any(v.startswith(head) for v in _LONG_VERBS):
            return None
        return cfg.max_command_line

    def _next_line(self) -> bytes | _Overlong | None:
        """The next command line (ending with CRLF), an over-long marker, or None.

        Only CRLF ends a line (RFC 5321 §2.3.8): a bare LF or CR stays inside the
        line and is refused by :meth:`_command`. The verdict does not depend on
        how the bytes were chunked: a line is too long as soon as the octets seen
        prove it (a trailing CR may be the start of its CRLF).
        """
        if self._discarding:
            return self._discard()
        buf = self._buf
        pos = self._pos
        end = buf.find(b"\r\n", pos + self._scanned)
        if end < 0:
            n = len(buf) - pos
            if not n:
                if pos:
                    del buf[:]
                    self._pos = 0
                self._scanned = 0
                return None
            # The line will be at least ``low`` octets plus CRLF long.
            low = n - 1 if buf[-1] == 0x0D else n
            self._scanned = n - 1
            limit = self._line_limit()
            if limit is not None and low + 2 > limit:
                return self._start_discard(limit)
            return None
        if end + 2 - pos > self.config.max_command_line:  # else within every limit
            limit = self._line_limit()
            assert limit is not None  # a complete line tells its verb
            if end + 2 - pos > limit:
                return self._start_discard(limit)
        line = bytes(buf[pos : end + 2])
        self._consume_to(end + 2)
        return line

    def _start_discard(self, limit: int) -> _Overlong:
        """Begin discarding the over-long line at ``_pos`` (nothing consumed yet)."""
        self._discarding = True
        self._discard_count = 0
        self._discard_limit = limit
        head = bytes(self._buf[self._pos : self._pos + 5]).upper()
        if self.state is State.AUTH or head == b"AUTH ":
            self._discard_label = "AUTH"  # never log SASL data
        else:
            # The first octets are line content whatever the chunking (the line
            # is at least ``limit - 1`` octets before its CRLF).
            take = max(0, min(40, limit - 1))
            self._discard_label = _printable(bytes(self._buf[self._pos : self._pos + take]))
        return _LINE_TOO_LONG

    def _discard(self) -> bytes | _Overlong | None:
        """Drop the over-long line up to its CRLF, keeping at most one byte (a CR).

        Returns the next line once the CRLF has come, None while waiting, or the
        NEVER_ENDS marker when the line runs more than OVERLONG_LINE_BOUND octets
        past its limit.
        """
        buf = self._buf
        pos = self._pos
        bound = self._discard_limit + OVERLONG_LINE_BOUND
        end = buf.find(b"\r\n", pos + self._scanned)
        if end >= 0:
            length = self._discard_count + (end - pos) + 2
            self._consume_to(end + 2)
            self._discarding = False
            if length > bound:
                return self._never_ends()
            return self._next_line()
        n = len(buf) - pos
        keep = 1 if n and buf[-1] == 0x0D else 0
        if self._discard_count + n - keep + 2 > bound:
            return self._never_ends()
        self._discard_count += n - keep
        del buf[: len(buf) - keep]
        self._pos = 0
        self._scanned = 0
        return None

    def _never_ends(self) -> _Overlong:
        self._discarding = False
        del self._buf[:]
        self._pos = 0
        self._scanned = 0
        return _LINE_NEVER_ENDS_MARK

    def _consume_to(self, pos: int) -> None:
        """Mark the command buffer consumed up to ``pos``; compact it when that pays
        (everything consumed, or more than _COMPACT_AT bytes), keeping scans O(n)."""
        buf = self._buf
        if pos >= len(buf):
            del buf[:]
            pos = 0
        elif pos > _COMPACT_AT:
            del buf[:pos]
            pos = 0
        self._pos = pos
        self._scanned = 0

    # --------------------------------------------------------------- commands

    def _command(self, raw: bytes) -> Event | _Sentinel:
        """One complete command line (ending with CRLF, within its length limit).

        A bare LF or CR inside it makes the whole line one refused command
        (RFC 5321 §2.3.8), answered once with 500 5.5.2.
        """
        body = raw[:-2]
        if b"\n" in body:
            return self._auto(_BARE_LF_COMMAND, _label(body))
        if b"\r" in body:
            return self._auto(_BARE_CR_COMMAND, _label(body))
        if b"\x00" in body:
            return self._auto(R.BAD_BYTES, _label(body))
        try:
            text = body.decode("ascii")
            utf8 = False
        except UnicodeDecodeError:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                return self._auto(_NOT_UTF8, _printable(body))
            utf8 = True
        verb, _, arg = text.partition(" ")
        verb_u = verb.upper()
        handler = _DISPATCH.get(verb_u)
        if handler is None:
            if verb_u in ("GET", "POST", "CONNECT", "HEAD", "PUT") or verb_u.startswith("HTTP/"):
                return self._auto(_HTTP, _printable(body))
            return self._unknown(verb, text, body)
        self._input = verb_u
        r = TRANSITIONS[(self.state, verb_u)]
        if r.first and r.refusal is not None:
            return self._auto(r.refusal, verb_u)
        if utf8 and verb_u not in ("MAIL", "RCPT"):
            return self._auto(_NOT_UTF8 if verb.isascii() else R.BAD_BYTES, _printable(body))
        if verb_u not in _ARGUMENTS_FIRST:
            problem = r.refusal  # self._refusal(verb_u), with the rule at hand
            if r.refusal_after_refused_rcpt is not None and self._rcpt_attempts:
                problem = r.refusal_after_refused_rcpt
            if problem is not None:
                label = f"{verb_u} {arg[:200]}" if verb_u in ("MAIL", "RCPT") else verb_u
                return self._auto(problem, label)
        return handler(self, arg, utf8)

    def _refusal(self, verb: str) -> Reply | None:
        """The state table's refusal of ``verb`` in the current state, or None if allowed."""
        r = TRANSITIONS[(self.state, verb)]
        if r.refusal_after_refused_rcpt is not None and self._rcpt_attempts:
            return r.refusal_after_refused_rcpt
        return r.refusal

    def _unknown(self, verb: str, text: str, body: bytes) -> Event:
        """A command line whose verb is not known (RFC 5321 §4.2.4: 500).

        A verb that is not ASCII is refused as invalid characters. Otherwise, with
        ``unknown_events``, the driver gets an :class:`UnknownCommand` (counted in
        :meth:`send` when answered with a 5xx); without it, the core answers
        ``500 5.5.1`` and counts it at once.
        """
        self._input = UNKNOWN
        refusal = self._refusal(UNKNOWN)
        if refusal is not None:
            return self._auto(refusal, _printable(body))
        if verb.isascii() and self.config.unknown_events:
            ev = UnknownCommand(verb.upper(), text, R.UNKNOWN_COMMAND, _loggable(_printable(body)))
            self._pending = ev
            return ev
        self.unknown_commands += 1
        if not verb.isascii():
            return self._auto(R.BAD_BYTES, _printable(body))
        return self._auto(R.UNKNOWN_COMMAND, _printable(body))

    def _cmd_helo(self, arg: str, utf8: bool) -> Event:
        if self.config.lmtp:
            return self._auto(_LMTP_USE_LHLO, "HELO")
        return self._helo(arg, esmtp=False, verb="HELO")

    def _cmd_ehlo(self, arg: str, utf8: bool) -> Event:
        if self.config.lmtp:
            return self._auto(_LMTP_USE_LHLO, "EHLO")
        if not self.config.ehlo:
            self.unknown_commands += 1
            return self._auto(R.UNKNOWN_COMMAND, "EHLO")
        return self._helo(arg, esmtp=True, verb="EHLO")

    def _cmd_lhlo(self, arg: str, utf8: bool) -> Event:
        """LHLO (RFC 2033 §4.1): the LMTP greeting, EHLO's counterpart."""
        if not self.config.lmtp:
            self.unknown_commands += 1
            return self._auto(R.UNKNOWN_COMMAND, "LHLO")
        return self._helo(arg, esmtp=True, verb="LHLO")

    def _helo(self, arg: str, *, esmtp: bool, verb: str) -> Event:
        name = arg.strip(" ")
        if not valid_helo_argument(name):
            return self._auto(_HELO_SYNTAX, f"{verb} {name[:64]}")
        return Helo(name, esmtp)

    def _cmd_mail(self, arg: str, utf8: bool) -> Event:
        if arg[:5].upper() != "FROM:":
            return self._auto(_MAIL_SYNTAX, "MAIL " + arg[:200])
        if self.config.require_auth and not self.authenticated:
            return self._auto(R.AUTH_REQUIRED, "MAIL " + arg[:200])
        cfg = self.config
        path_arg = arg[5:]
        if self.allow_sloppy_paths:
            path_arg = sloppy_path(path_arg) or path_arg
        try:
            address, ptext = parse_path(path_arg, reverse=True, smtputf8_allowed=cfg.smtputf8)
            params = parse_params(ptext, utf8=cfg.smtputf8) if ptext else {}
        except PathSyntaxError as exc:
            return self._auto(exc.reply, "MAIL " + arg[:200])
        if params:
            if not self.esmtp:
                return self._auto(_NO_PARAMS_HELO, "MAIL " + arg[:200])
            problem = self._check_mail_params(params)
            if problem is not None:
                return self._auto(problem, "MAIL " + arg[:200])
        if not address.isascii() and "SMTPUTF8" not in params:
            return self._auto(R.SMTPUTF8_REQUIRED, "MAIL " + arg[:200])
        return MailFrom(address, params)

    def _check_mail_params(self, params: dict[str, str | None]) -> Reply | None:
        cfg = self.config
        for kw, val in params.items():
            if kw == "SIZE":
                # isascii(): str.isdigit() is also true for "²" and other Unicode
                # digits (UTF-8 is allowed in MAIL parameters), which int() rejects.
                if val is None or not (val.isascii() and val.isdigit()) or len(val) > 20:
                    return _BAD_SIZE
                if int(val) > cfg.max_message_size:
                    return R.TOO_BIG
            elif kw == "BODY":
                body = (val or "").upper()
                if (
                    body == "7BIT"
                    or body == "8BITMIME" and cfg.eightbitmime
                    or body == "BINARYMIME" and cfg.binarymime and cfg.chunking
                ):
                    params["BODY"] = body
                else:
                    return _BAD_BODY if body not in ("8BITMIME", "BINARYMIME") else _PARAM_UNKNOWN
            elif kw == "SMTPUTF8":
                if not cfg.smtputf8:
                    return _PARAM_UNKNOWN
                if val is not None:
                    return _SMTPUTF8_ARG
            elif kw == "AUTH":
                # RFC 4954 §5: accepted when AUTH is offered; the value is xtext.
                if not self._auth_offered() or val is None:
                    return _PARAM_UNKNOWN
            elif kw == "BY" and cfg.deliverby:
                # RFC 2852 §4: BY=<by-time>;<by-mode>[T], by-time = [-]1*9DIGIT, mode R|N
                if val is None or not _BY_PARAM.fullmatch(val):
                    return _BAD_BY_PARAM
            elif kw == "RET" and cfg.dsn:
                # RFC 3461 §4.3: RET=FULL / RET=HDRS
                if val is None or val.upper() not in ("FULL", "HDRS"):
                    return _BAD_DSN_PARAM
                params["RET"] = val.upper()
            elif kw == "ENVID" and cfg.dsn:
                # RFC 3461 §4.4: xtext, at most 100 characters
                if val is None or len(val) > 100 or not _xtext_ok(val):
                    return _BAD_DSN_PARAM
            else:
                return _PARAM_UNKNOWN
        return None

    def _check_rcpt_params(self, params: dict[str, str | None]) -> Reply | None:
        if not self.config.dsn:
            return _PARAM_UNKNOWN
        for kw, val in params.items():
            if kw == "NOTIFY":
                # RFC 3461 §4.1: NEVER, or a comma list of SUCCESS, FAILURE, DELAY
                items = (val or "").upper().split(",")
                if not val or (("NEVER" in items) and len(items) > 1) or not set(items) <= {
                    "NEVER", "SUCCESS", "FAILURE", "DELAY"
                }:
                    return _BAD_DSN_PARAM
                params["NOTIFY"] = ",".join(items)
            elif kw == "ORCPT":
                # RFC 3461 §4.2: addr-type ";" xtext
                if val is None or ";" not in val or not _xtext_ok(val.split(";", 1)[1]):
                    return _BAD_DSN_PARAM
            else:
                return _PARAM_UNKNOWN
        return None

    def _cmd_rcpt(self, arg: str, utf8: bool) -> Event:
        if arg[:3].upper() != "TO:":
            cmd = "RCPT " + arg[:200]
            return self._auto(_RCPT_SYNTAX, cmd)
        self._rcpt_attempts += 1
        if self._rcpt_count >= self.config.max_recipients:
            return self._auto(R.TOO_MANY_RECIPIENTS, "RCPT " + arg[:200])
        limit = self.config.max_error_recipients
        if limit and self._null_sender and self._rcpt_count >= limit:
            return self._auto(_NULL_SENDER_RCPTS, "RCPT " + arg[:200])
        try:
            address, ptext = parse_path(
                arg[3:],
                reverse=False,
                smtputf8_allowed=self.config.smtputf8,
                allow_postmaster=True,
            )
            params = parse_params(ptext, utf8=self._mail_utf8) if ptext else {}
        except PathSyntaxError as exc:
            return self._auto(exc.reply, "RCPT " + arg[:200])
        if not address.isascii() and not self._mail_utf8:
            return self._auto(_SMTPUTF8_RCPT, "RCPT " + arg[:200])
        if params:
            problem = self._check_rcpt_params(params)
            if problem is not None:
                return self._auto(problem, "RCPT " + arg[:200])
        return RcptTo(address, params)

    def _cmd_data(self, arg: str, utf8: bool) -> Event:
        if arg.strip(" "):
            return self._auto(_NO_ARGS, "DATA")
        refusal = self._refusal("DATA")
        if refusal is not None:
            return self._auto(refusal, "DATA")
        if self._body_binary:
            return self._auto(_BINARY_NEEDS_BDAT, "DATA")
        return Data()

    def _cmd_rset(self, arg: str, utf8: bool) -> Event:
        if arg.strip(" "):
            return self._auto(_NO_ARGS, "RSET")
        return Rset()

    def _cmd_noop(self, arg: str, utf8: bool) -> Event:
        return self._auto(R.NOOP, "NOOP")

    def _cmd_quit(self, arg: str, utf8: bool) -> Event:
        if arg.strip(" "):
            return self._auto(_NO_ARGS, "QUIT")
        return Quit()

    def _cmd_help(self, arg: str, utf8: bool) -> Event:
        return self._auto(Reply(214, "2.0.0", self.config.help_text), "HELP")

    def _cmd_vrfy(self, arg: str, utf8: bool) -> Event:
        if not arg.strip(" "):
            return self._auto(_VRFY_SYNTAX, "VRFY")
        return Vrfy(arg.strip(" "))

    def _cmd_not_implemented(self, arg: str, utf8: bool) -> Event:
        return self._auto(R.NOT_IMPLEMENTED, "")

    def _cmd_expn(self, arg: str, utf8: bool) -> Event:
        if not self.config.expn:
            return self._auto(R.NOT_IMPLEMENTED, "EXPN")
        if not arg.strip(" "):
            return self._auto(_EXPN_SYNTAX, "EXPN")
        return Expn(arg.strip(" "))

    def _cmd_bdat(self, arg: str, utf8: bool) -> Event | _Sentinel:
        """BDAT size [LAST] (RFC 3030 §2): the chunk's bytes follow the command line.

        The chunk is always consumed, even when it is refused, so that pipelined
        commands after it stay in step.
        """
        parts = arg.split()
        if (
            not 1 <= len(parts) <= 2
            or not (parts[0].isascii() and parts[0].isdigit())
            or len(parts[0]) > 12
            or (len(parts) == 2 and parts[1].upper() != "LAST")
        ):
            return self._auto(_BDAT_SYNTAX, "BDAT " + arg[:40])
        size = int(parts[0])
        last = len(parts) == 2
        err: Reply | None = None
        cfg = self.config
        if not cfg.chunking:
            err = R.NOT_IMPLEMENTED
        elif (refusal := self._refusal("BDAT")) is not None:
            err = refusal
        elif self._bdat_failed:
            err = _BDAT_AFTER_FAILURE
        elif self._bdat_size + size > cfg.max_message_size:
            err = R.TOO_BIG
            self._bdat_failed = True
            self._bdat_buf = bytearray()
        self._chunk_active = True
        self._chunk_left = size
        self._chunk_size = size
        self._chunk_last = last
        self._chunk_error = err
        if err is None and cfg.data_start_events and self.state is State.RCPT:
            return BdatStart(size, last)  # the driver decides before the chunk is read
        return self._next_chunk_event()

    def _next_chunk_event(self) -> Event | _Sentinel:
        buf = self._buf
        pos = self._pos
        take = min(len(buf) - pos, self._chunk_left)
        if take:
            if self._chunk_error is None:
                if self._check is None:
                    self._check = _TextCheck(self.config, binary=self._body_binary)
                self._bdat_buf += buf[pos : pos + take]
                self._bdat_size += take
            self._chunk_left -= take
            self._consume_to(pos + take)
        if self._chunk_left:
            if len(self._bdat_buf) >= self.config.message_chunk_size:
                data = self._bdat_piece(final=False)
                if data:
                    return MessageChunk(data)
            return NEED_DATA
        self._chunk_active = False
        err = self._chunk_error
        size = self._chunk_size
        if err is not None:
            return self._auto(err, f"BDAT {size}")
        if not self._chunk_last:
            if len(self._bdat_buf) >= self.config.message_chunk_size:
                # Hand the text out first; the chunk is answered on the next call.
                self._chunk_active = True
                data = self._bdat_piece(final=False)
                if data:
                    return MessageChunk(data)
                self._chunk_active = False
            # The 250 enters (or keeps) the BDAT state: the table's BDAT rule.
            accepted = Reply(250, "2.0.0", f"{size} octets received")
            return self._auto(accepted, f"BDAT {size}", step=True)
        if self._check is None:  # BDAT 0 LAST as the only chunk
            self._check = _TextCheck(self.config, binary=self._body_binary)
        data = self._bdat_piece(final=True)
        check = self._check
        self._check = None
        self._bdat_size = 0
        self._input = END_OF_DATA
        problem = check.verdict()
        if problem is not None:
            return DataComplete(b"", problem)
        return DataComplete(data)

    # ------------------------------------------------------------------- ETRN

    def _cmd_etrn(self, arg: str, utf8: bool) -> Event:
        """ETRN node (RFC 1985): ``domain``, ``@domain`` (subdomains too) or ``#queue``."""
        if not self.config.etrn:
            return self._auto(R.NOT_IMPLEMENTED, "ETRN")
        refusal = self._refusal("ETRN")
        if refusal is not None:
            return self._auto(refusal, "ETRN")
        node = arg.strip(" ")
        if not node or not _ETRN_NODE.fullmatch(node):
            return self._auto(_ETRN_SYNTAX, "ETRN " + node[:64])
        return Etrn(node)

    def _cmd_starttls(self, arg: str, utf8: bool) -> Event:
        if arg.strip(" "):
            return self._auto(_NO_ARGS, "STARTTLS")
        if self.tls_active:
            return self._auto(R.ALREADY_TLS, "STARTTLS")
        if not self.config.tls_available:
            return self._auto(_TLS_NOT_ADVERTISED, "STARTTLS")
        refusal = self._refusal("STARTTLS")
        if refusal is not None:
            return self._auto(refusal, "STARTTLS")
        return StartTls()

    # ------------------------------------------------------------------- AUTH

    def _auth_offered(self) -> bool:
        cfg = self.config
        return bool(cfg.auth_mechanisms) and (self.tls_active or not cfg.auth_require_tls)

    def _cmd_auth(self, arg: str, utf8: bool) -> Event:
        cfg = self.config
        if not cfg.auth_mechanisms:
            return self._auto(_AUTH_NOT_AVAILABLE, "AUTH")
        # Before HELO/EHLO (state INIT) neither of these holds, so the table's
        # "Send HELO/EHLO first" still comes first there.
        if self.helo_name is not None and not self.esmtp:
            return self._auto(R.BAD_SEQUENCE, "AUTH")
        if self.authenticated:
            return self._auto(R.ALREADY_AUTH, "AUTH")
        refusal = self._refusal("AUTH")
        if refusal is not None:
            return self._auto(refusal, "AUTH")
        if not self._auth_offered():
            return self._auto(R.AUTH_ENCRYPTION_REQUIRED, "AUTH")
        parts = arg.split()
        if not parts or len(parts) > 2:
            return self._auto(_AUTH_SYNTAX, "AUTH")
        mech = parts[0].upper()
        if mech not in cfg.auth_mechanisms:
            return self._auto(R.AUTH_MECH_UNKNOWN, "AUTH " + mech[:20])
        initial = parts[1] if len(parts) == 2 else None
        self._sasl_mech = mech
        self._sasl_user = None
        if initial is None:
            # The 334 enters the AUTH state (the table's AUTH rule).
            challenge = _CHALLENGE_EMPTY if mech == _AUTH_PLAIN else _CHALLENGE_USERNAME
            return self._auto(challenge, "AUTH " + mech, step=True)
        return self._sasl_step(initial.encode("ascii"), "AUTH " + mech)

    def _sasl_response(self, raw: bytes) -> Event:
        """One SASL response line (RFC 4954 §4); a bare CR/LF in it ends the exchange."""
        body = raw[:-2]
        if b"\n" in body or b"\r" in body:
            self._sasl_user = None
            return self._auto(_BARE_SASL, "AUTH " + self._sasl_mech, step=True)
        return self._sasl_step(body, "AUTH " + self._sasl_mech)

    def _sasl_step(self, response: bytes, cmd: str) -> Event:
        """One client SASL response (RFC 4954 §4): ``*`` cancels, else base64.

        A 334 reply (the LOGIN password challenge) keeps or enters the AUTH
        state; any other reply ends the exchange (the table's AUTH and SASL rules).
        """
        if response == b"*":
            return self._auto(R.AUTH_CANCELLED, cmd, step=True)
        if response == b"=":
            decoded = b""
        else:
            try:
                decoded = binascii.a2b_base64(response, strict_mode=True)
            except (binascii.Error, ValueError):
                return self._auto(R.AUTH_BAD_BASE64, cmd, step=True)
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            return self._auto(R.AUTH_BAD_BASE64, cmd, step=True)
        if self._sasl_mech == _AUTH_PLAIN:
            # RFC 4616: [authzid] NUL authcid NUL passwd
            fields = text.split("\x00")
            if len(fields) != 3 or not fields[1]:
                return self._auto(R.AUTH_BAD_BASE64, cmd, step=True)
            self._input = CREDENTIALS
            return AuthCredentials(_AUTH_PLAIN, fields[1], fields[2], fields[0])
        # LOGIN: username, then password
        if self._sasl_user is None:
            if not text or "\x00" in text:
                return self._auto(R.AUTH_BAD_BASE64, cmd, step=True)
            self._sasl_user = text
            return self._auto(_CHALLENGE_PASSWORD, cmd, step=True)
        user = self._sasl_user
        self._sasl_user = None
        self._input = CREDENTIALS
        return AuthCredentials(_AUTH_LOGIN, user, text)

    # ------------------------------------------------------------------- DATA

    def _start_data(self) -> None:
        # The sentinel CRLF lets the first line be matched like every other line.
        self._dbuf = bytearray(b"\r\n")
        self._dbuf += self._buf[self._pos :]
        del self._buf[:]
        self._pos = 0
        self._scanned = 0
        self._dscan = 0
        self._dsize = 0  # stuffed dots counted so far (see _next_data_event)
        self._dtoo_big = False
        self._demitted = 0
        self._check = _TextCheck(self.config, binary=False)

    def _next_data_event(self) -> Event | _Sentinel:
        # One pass over the text: every "\r\n." is either the end of data (followed by
        # CRLF, RFC 5321 §4.1.1.4) or a stuffed dot (§4.5.2), counted in ``_dsize``.
        # ``_dscan``: every "\r\n." starting before it is classified (the pattern cannot
        # overlap itself); one found less than 5 bytes from the end waits for more.
        # The buffer's first two bytes are a sentinel, never message text: a CRLF (the
        # start, or the end of the last line handed out as a MessageChunk) or two NULs
        # (a piece was cut inside a line).
        buf = self._dbuf
        n = len(buf)
        find = buf.find
        pos = self._dscan
        idx = -1
        while True:
            i = find(b"\r\n.", pos)
            if i < 0:
                pos = max(pos, n - 2)  # a "\r\n." may still start in the last 2 bytes
                break
            if i + 5 > n:
                pos = i
                break
            if buf[i + 3] == 0x0D and buf[i + 4] == 0x0A:
                idx = i
                break
            self._dsize += 1
            pos = i + 3
        if idx < 0:
            self._dscan = pos
            if not self._dtoo_big and n > 6:
                # Stop keeping the text once it is certainly too big, so memory stays
                # bounded by the size limit (plus stuffed dots and one chunk). The
                # verdict must not depend on how the bytes were chunked, so it uses a
                # lower bound of the size after unstuffing: what was handed out, plus
                # n - 4 - (stuffed dots seen) (the last 4 bytes may begin the end of
                # data; the sentinel and the CRLF before the final dot cancel out),
                # less 2 more for safety. ``_dsize`` counts exactly the "\r\n."
                # starting before n - 4 (those classified), whatever the chunking.
                if self._demitted + n - 6 - self._dsize > self.config.max_message_size:
                    self._dtoo_big = True
            if self._dtoo_big:
                if n > 4:
                    del buf[:-4]
                    self._dscan = 0
                return NEED_DATA
            if n >= self.config.message_chunk_size:
                return self._data_piece(pos)
            return NEED_DATA
        self._buf = buf[idx + 5 :]  # pipelined bytes after the end of data (a copy)
        self._pos = 0
        self._scanned = 0
        self._dbuf = bytearray()
        check = self._check
        self._check = None
        assert check is not None
        if self._dtoo_big:
            return DataComplete(b"", R.TOO_BIG)
        end = idx + 2
        if not self._dsize:
            # No stuffed dot (the usual case): one copy, without the sentinel.
            with memoryview(buf) as view:
                data = bytes(view[2:end])
        else:  # RFC 5321 §4.5.2: drop the transparency dots
            data = bytes(buf[:end]).replace(b"\r\n.", b"\r\n")[2:]
        data = check.feed(data)
        problem = check.verdict()
        if problem is not None:
            return DataComplete(b"", problem)
        return DataComplete(data)

    def _data_piece(self, pos: int) -> Event | _Sentinel:
        """Hand out the text before ``pos`` (every "\r\n." before it is classified) as a
        :class:`MessageChunk`, keeping the rest; cut after a CRLF when there is one."""
        buf = self._dbuf
        k = buf.rfind(b"\r\n", 2, pos)
        if k >= 0:
            # Cut at a CRLF: it ends the piece and stays as the new sentinel, so a
            # "\r\n." across the cut is still seen. No "\r\n." starts before k and
            # ends after it (buf[k] is a CR).
            end = keep = k + 2
            sentinel = b""
        else:
            # One long line: cut where no "\r\n." can straddle (not after a CR or LF);
            # the new sentinel is not a CRLF, so no end of data is seen at the cut.
            end = pos - 2
            while end > 2 and buf[end - 1] in b"\r\n":
                end -= 1
            if end <= 2:
                return NEED_DATA
            keep = end
            sentinel = b"\x00\x00"
        if self._dsize:  # RFC 5321 §4.5.2: drop the transparency dots
            piece = bytes(buf[:end]).replace(b"\r\n.", b"\r\n")[2:]
        else:
            with memoryview(buf) as view:
                piece = bytes(view[2:end])
        if sentinel:
            del buf[:keep]
            buf[:0] = sentinel
        else:
            del buf[: keep - 2]  # the CRLF that ends the piece becomes the sentinel
        self._dscan = 0
        self._dsize = 0
        self._demitted += len(piece)
        check = self._check
        assert check is not None
        data = check.feed(piece)
        if not data:
            return NEED_DATA if len(buf) < self.config.message_chunk_size else \
                self._next_data_event()
        return MessageChunk(data)

    def _bdat_piece(self, final: bool) -> bytes:
        """The BDAT text gathered so far, checked; a trailing CR is held back unless
        ``final`` (it may begin a CRLF split across chunks)."""
        buf = self._bdat_buf
        check = self._check
        assert check is not None
        if final or check.binary or not buf or buf[-1] != 0x0D:
            data = bytes(buf)
            self._bdat_buf = bytearray()
        else:
            data = bytes(buf[:-1])
            self._bdat_buf = bytearray(b"\r")
        return check.feed(data)

    # ----------------------------------------------------------------- output

    def send(self, reply: Reply) -> bytes:
        """Answer the pending event (or send the greeting) and return the wire bytes.

        The reply decides the state transition. A ``421`` closes the session.
        Every reply counting as the client's error (see ``ProtocolConfig.max_errors``:
        4xx and 5xx except 421, X.3.*, X.4.* and the recipient overshoot allowance)
        increments :attr:`errors`; at ``max_errors``, or after too many unknown
        commands, ``421 4.7.0`` is appended and the session is closed (check
        :attr:`closed`).

        Raises:
            LocalProtocolError: when no event awaits a reply (use
                :meth:`close_reply` for an unsolicited 421).
        """
        enh = self.config.enhanced_status_codes
        code = reply.code
        out = reply.to_bytes(enh)
        if self.state is State.GREETING:
            self._transition(GREETING, code)
            return out
        ev = self._pending
        if ev is None:
            raise LocalProtocolError(R.TEMP_ERROR, "no event awaiting a reply")
        self._pending = None
        if type(ev) is BdatStart:
            # Nothing goes out yet: the chunk is read first, then answered (RFC 3030 §2).
            if code >= 400:
                self._chunk_error = reply
                self._bdat_failed = True
                self._bdat_buf = bytearray()
            return b""
        inp, self._input = self._input, None
        if code == 421:  # RFC 5321 §3.8 (as _transition)
            self.state = State.CLOSED
            succeeded = False
        else:
            succeeded = self._apply(inp, code)
        # What a reply does besides the state change (the state is the table's).
        t = type(ev)
        if t is RcptTo:
            if succeeded:
                self._rcpt_count += 1
        elif t is MailFrom:
            if succeeded:
                assert isinstance(ev, MailFrom)
                self._mail_utf8 = "SMTPUTF8" in ev.params
                self._body_binary = ev.params.get("BODY") == "BINARYMIME"
                self._null_sender = ev.address == ""
                self._rcpt_count = 0
                self._rcpt_attempts = 0
                self._rcpt_overshoot = 0
        elif t is DataComplete:
            self._reset_transaction()
        elif t is Data:
            if succeeded:
                self._start_data()
        elif t is Helo:
            if succeeded:
                assert isinstance(ev, Helo)
                self.helo_name = ev.name
                self.esmtp = ev.esmtp
                self._reset_transaction()
        elif t is Rset:
            if succeeded:
                self._reset_transaction()
        elif t is StartTls:
            if succeeded:
                del self._buf[:]  # CVE-2011-0411: drop anything pipelined in plaintext
                self._pos = 0
                self._scanned = 0
        elif t is AuthCredentials:
            if code == 235:
                self.authenticated = True
        elif t is AutoReply:
            assert isinstance(ev, AutoReply)
            if ev.reply is R.UNKNOWN_COMMAND or ev.reply is R.BAD_BYTES:
                if self.unknown_commands > self.config.max_unknown_commands:
                    self.state = State.CLOSED
                    return out + _TOO_MANY_UNKNOWN.to_bytes(enh)
        elif t is UnknownCommand:
            # Counted only when refused: a plugin that answers it with 2xx (or a
            # transient 4xx) implements it, the client did nothing unknown.
            if code >= 500:
                self.unknown_commands += 1
                if self.unknown_commands > self.config.max_unknown_commands:
                    self.state = State.CLOSED
                    return out + _TOO_MANY_UNKNOWN.to_bytes(enh)
        if code == 421:
            self.state = State.CLOSED
            return out
        if self._counts_as_error(reply):
            self.errors += 1
            if self.errors >= self.config.max_errors:
                self.state = State.CLOSED
                out += R.TOO_MANY_ERRORS.to_bytes(enh)
        return out

    def _transition(self, inp: str | None, code: int) -> bool:
        """Apply the state table's rule for ``inp`` answered with ``code``.

        A ``421`` closes the session whatever the input (RFC 5321 §3.8). Returns
        True when the rule counts ``code`` as success (its ``then`` state applies).
        """
        if code == 421:
            self.state = State.CLOSED
            return False
        return self._apply(inp, code)

    def _apply(self, inp: str | None, code: int) -> bool:
        """The table part of :meth:`_transition` (no 421 rule: LMTP per-recipient replies)."""
        r = TRANSITIONS.get((self.state, inp)) if inp is not None else None
        if r is None or r.refusal is not None:
            return False
        if r.success_low <= code < r.success_high:  # r.on.matches(code)
            if r.then is not None:
                self.state = r.then
            return True
        if r.otherwise is not None:
            self.state = r.otherwise
        return False

    def _counts_as_error(self, reply: Reply) -> bool:
        """Whether ``reply`` counts toward ``max_errors`` (Postfix ``smtpd_hard_error_limit``).

        4xx and 5xx replies count when the client caused them. The server's own
        failures do not: enhanced status subject 3 (mail system, RFC 3463 §3.5)
        and 4 (network and routing, §3.4), and 421 (handled by the caller). Too
        many recipients (``4.5.3``, RFC 5321 §4.5.3.1.10) counts only past
        ``recipient_overshoot_limit`` replies in one transaction (Postfix
        ``smtpd_recipient_overshoot_limit``).
        """
        if reply.code < 400:
            return False
        enhanced = reply.enhanced
        if enhanced is None:
            return True
        subject = enhanced.split(".", 2)[1] if enhanced.count(".") == 2 else ""
        if subject in ("3", "4"):
            return False
        if enhanced == "4.5.3":
            self._rcpt_overshoot += 1
            return self._rcpt_overshoot > self.config.recipient_overshoot_limit
        return True

    @property
    def lmtp_reply_count(self) -> int:
        """How many replies the end of an LMTP message needs: one per accepted recipient."""
        return self._rcpt_count

    def send_lmtp(self, replies: list[Reply]) -> bytes:
        """Answer an LMTP end of data with one reply per accepted recipient (RFC 2033 §4.2).

        Raises:
            LocalProtocolError: not in LMTP mode, no message pending, or the number of
                replies differs from the number of accepted recipients.
        """
        ev = self._pending
        if not self.config.lmtp or not isinstance(ev, DataComplete):
            raise LocalProtocolError(R.TEMP_ERROR, "no LMTP end of data awaiting replies")
        if len(replies) != self._rcpt_count:
            raise LocalProtocolError(
                R.TEMP_ERROR, f"{len(replies)} replies for {self._rcpt_count} recipients"
            )
        enh = self.config.enhanced_status_codes
        out = b"".join(r.to_bytes(enh) for r in replies)
        self._pending = None
        self._input = None
        self._apply(END_OF_DATA, replies[0].code if replies else 250)
        self._reset_transaction()
        return out

    def close_reply(self, reply: Reply) -> bytes:
        """Render an unsolicited reply (a 421 on timeout or shutdown) and close the session."""
        self._pending = None
        self._input = None
        self.state = State.CLOSED
        return reply.to_bytes(self.config.enhanced_status_codes)

    def tls_established(self) -> None:
        """Call after the STARTTLS handshake: state resets to before HELO (RFC 3207 §4.2)."""
        r = rule(self.state, TLS_HANDSHAKE)
        if r is None or r.then is None:
            raise LocalProtocolError(R.TEMP_ERROR, "no STARTTLS handshake pending")
        self.tls_active = True
        self.state = r.then
        self.helo_name = None
        self.esmtp = False
        self.authenticated = False
        del self._buf[:]
        self._pos = 0
        self._scanned = 0
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        """Forget the transaction's data (the state is the table's business)."""
        self._rcpt_count = 0
        self._rcpt_attempts = 0
        self._rcpt_overshoot = 0
        self._null_sender = False
        self._mail_utf8 = False
        self._body_binary = False
        self._bdat_buf = bytearray()
        self._bdat_size = 0
        self._bdat_failed = False
        self._check = None

    # ---------------------------------------------------------------- replies

    def ehlo_keywords(self) -> list[str]:
        """The EHLO keywords currently offered (RFC 1869 §4.3), in order."""
        cfg = self.config
        kws: list[str] = []
        if cfg.pipelining:
            kws.append("PIPELINING")
        kws.append(f"SIZE {cfg.max_message_size}")
        if cfg.eightbitmime:
            kws.append("8BITMIME")
        if cfg.smtputf8:
            kws.append("SMTPUTF8")
        if cfg.enhanced_status_codes:
            kws.append("ENHANCEDSTATUSCODES")
        if cfg.tls_available and not self.tls_active:
            kws.append("STARTTLS")
        if self._auth_offered() and not self.authenticated:
            kws.append("AUTH " + " ".join(cfg.auth_mechanisms))
        if cfg.chunking:
            kws.append("CHUNKING")
            if cfg.binarymime:
                kws.append("BINARYMIME")
        if cfg.deliverby:
            kws.append("DELIVERBY")
        if cfg.dsn:
            kws.append("DSN")
        if cfg.etrn:
            kws.append("ETRN")
        kws.append("HELP")
        return kws

    def helo_reply(self, event: Helo) -> Reply:
        """The positive reply to HELO (one line) or EHLO (greeting plus keywords)."""
        first = f"{self.config.hostname} Hello {event.name}"
        if not event.esmtp:
            return Reply(250, None, first)
        return Reply(250, None, "\n".join([first, *self.ehlo_keywords()]))


# Command verb -> handler, one table for all connections (not a dict of bound methods
# per connection: that was about 1.7 KiB of every idle session).
_DISPATCH: dict[str, Callable[[ServerConnection, str, bool], Event | _Sentinel]] = {
    "HELO": ServerConnection._cmd_helo,
    "EHLO": ServerConnection._cmd_ehlo,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "RSET": ServerConnection._cmd_rset,
    "NOOP": ServerConnection._cmd_noop,
    "QUIT": ServerConnection._cmd_quit,
    "HELP": ServerConnection._cmd_help,
    "VRFY": ServerConnection._cmd_vrfy,
    "EXPN": ServerConnection._cmd_expn,
    "TURN": ServerConnection._cmd_not_implemented,
    "SEND": ServerConnection._cmd_not_implemented,
    "SOML": ServerConnection._cmd_not_implemented,
    "SAML": ServerConnection._cmd_not_implemented,
    "ETRN": ServerConnection._cmd_etrn,
    "BDAT": ServerConnection._cmd_bdat,
    "LHLO": ServerConnection._cmd_lhlo,
    "STARTTLS": ServerConnection._cmd_starttls,
    "AUTH": ServerConnection._cmd_auth,
}


def _xtext_ok(value: str) -> bool:
    """RFC 3461 §4: xtext = *( xchar / hexchar ), hexchar = "+" 2HEXDIG (upper case)."""
    return _XTEXT.fullmatch(value) is not None


def _label(body: bytes) -> str:
    """How the logs name a refused command line: ``AUTH`` for AUTH lines (no SASL data)."""
    if body[:5].upper() == b"AUTH ":
        return "AUTH"
    return _printable(body)


def _printable(data: bytes) -> str:
    """A bounded rendering of a command line (``_auto`` escapes control characters)."""
    return data[:200].decode("ascii", "backslashreplace")


def _loggable(text: str) -> str:
    """``text`` with non-printable characters (C0 controls, DEL, U+2028 ...) as escapes."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
