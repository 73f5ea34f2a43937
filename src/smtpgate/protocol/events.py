"""Events produced by the sans-IO protocol core, one per client command or message.

Entry points: the event classes below and the :data:`NEED_DATA` sentinel, returned by
:meth:`smtpgate.protocol.ServerConnection.next_event`. RFC 5321 §4.1 (commands).
Events are immutable values; do not subclass them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..reply import Reply


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Sentinel.NEED_DATA
"""Returned by ``next_event()`` when more bytes must be received first."""


@dataclass(frozen=True, slots=True)
class Helo:
    """HELO (``esmtp=False``) or EHLO (``esmtp=True``) with the client's domain argument."""

    name: str
    esmtp: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM (RFC 5321 §4.1.1.2): reverse-path (``""`` for ``<>``) and ESMTP parameters."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RcptTo:
    """RCPT TO (RFC 5321 §4.1.1.3): forward-path and ESMTP parameters."""

    address: str
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Data:
    """The DATA command; answer 354 to receive the message, or an error reply."""


@dataclass(frozen=True, slots=True)
class BdatStart:
    """The first BDAT of a transaction, before its chunk is read (RFC 3030 §2; only with
    ``ProtocolConfig.data_start_events``): the driver decides whether the message may
    start, as for DATA. Answer with ``354`` (or any 2xx/3xx) to go on: the core then reads
    the chunk and answers it itself; a 4xx/5xx reply refuses the transaction's chunks:
    the core still reads (and discards) this chunk, then sends that reply, and answers
    later chunks ``503 5.5.1`` until RSET. :meth:`ServerConnection.send` returns no
    bytes for this event.

    Attributes:
        size: octets in the chunk that follows.
        last: the chunk carries ``LAST``.
    """

    size: int
    last: bool


@dataclass(frozen=True, slots=True)
class MessageChunk:
    """A piece of a long message's text, handed out while the message is still being
    read (DATA or BDAT), so the driver can write it to a file instead of holding it.

    Not answered: call ``next_event()`` again. The message is the concatenation of
    every ``MessageChunk.data`` of the transaction's DATA (or BDAT chunks) and the
    final :attr:`DataComplete.data`. Pieces come once the core holds
    ``ProtocolConfig.message_chunk_size`` octets; each is dot-unstuffed and has passed
    the message checks so far. When the :class:`DataComplete` carries a ``problem``,
    the pieces handed out must be discarded.

    Attributes:
        data: message octets (never empty).
    """

    data: bytes


@dataclass(frozen=True, slots=True)
class DataComplete:
    """The message ended with ``<CRLF>.<CRLF>``.

    Attributes:
        data: message bytes after dot-unstuffing (CRLF line endings; bare CR/LF
            normalised only when the core was configured to), without the final
            ``.<CRLF>``; for a long message only what follows the
            :class:`MessageChunk` pieces already handed out. Empty whenever
            ``problem`` is set (a refused message is discarded while it is read, so
            memory stays bounded).
        problem: when set, the core found the message unacceptable (too big:
            552 5.3.4; bare CR/LF: 550 5.6.11; text line too long: 500 5.5.2)
            and the driver must send this reply and deliver nothing.
    """

    data: bytes
    problem: Reply | None = None


@dataclass(frozen=True, slots=True)
class Rset:
    """RSET: abort the transaction (RFC 5321 §4.1.1.5)."""


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT: answer 221 and close (RFC 5321 §4.1.1.10)."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS (RFC 3207): answer 220, then start the TLS handshake."""


@dataclass(frozen=True, slots=True)
class AuthCredentials:
    """A complete SASL PLAIN or LOGIN exchange (RFC 4954, RFC 4616).

    The driver checks the credentials and answers 235 2.7.0, 535 5.7.8 or 454 4.7.0.
    The password never appears in ``repr``.
    """

    mechanism: str
    username: str
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class Vrfy:
    """VRFY with its argument (RFC 5321 §4.1.1.6)."""

    argument: str


@dataclass(frozen=True, slots=True)
class Expn:
    """EXPN with its argument (RFC 5321 §4.1.1.7); only when EXPN is enabled."""

    argument: str


@dataclass(frozen=True, slots=True)
class Etrn:
    """ETRN (RFC 1985): start delivery of queued mail for ``node``.

    ``node`` is ``domain``, ``@domain`` (the domain and its subdomains) or ``#queue``.
    Answer 250 2.0.0 (started), 458 4.0.0 (cannot) or 459 4.7.1 (not allowed).
    """

    node: str


@dataclass(frozen=True, slots=True)
class AutoReply:
    """The core decided the reply itself: a protocol error, NOOP, HELP, a SASL challenge.

    The driver sends ``reply`` as it is (it may notify its error hook first).
    ``command`` is the offending or answered command line, for logs (AUTH data is
    never included).
    """

    reply: Reply
    command: str = ""


@dataclass(frozen=True, slots=True)
class UnknownCommand:
    """A command whose verb the core does not know (only with ``ProtocolConfig.unknown_events``).

    The driver may let a plugin answer it; otherwise it sends ``reply``. The core
    counts it toward ``max_unknown_commands`` only when the reply sent is a 5xx
    (RFC 5321 §4.2.4: 500 for an unrecognised command).

    Attributes:
        verb: the first word of the line, upper-cased (``"XCLIENT"``).
        line: the whole command line without its CRLF, as received (ASCII, or
            UTF-8 when not ASCII), not escaped: never log it as it is.
        reply: what the core would answer (``500 5.5.1 Command unrecognized``).
        command: a log-safe rendering of the line (control characters escaped, at
            most 200 octets), like :attr:`AutoReply.command`.
    """

    verb: str
    line: str
    reply: Reply
    command: str = ""


Event = (
    Helo | MailFrom | RcptTo | Data | BdatStart | MessageChunk | DataComplete | Rset | Quit
    | StartTls
    | AuthCredentials
    | Vrfy | Expn | Etrn | AutoReply | UnknownCommand
)
