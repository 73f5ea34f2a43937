"""Test driver for the sans-IO protocol core: bytes in, replies and events out.

Entry points: :class:`Dialogue` (plays the driver contract of
:class:`smtpgate.protocol.ServerConnection` with a fixed default policy),
:func:`parse_replies`, :func:`codes`, :func:`b64`. Used by tests/protocol only.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from smtpgate.protocol import (
    NEED_DATA,
    AuthCredentials,
    AutoReply,
    Data,
    DataComplete,
    Etrn,
    Event,
    Expn,
    Helo,
    MailFrom,
    MessageChunk,
    ProtocolConfig,
    Quit,
    RcptTo,
    Rset,
    ServerConnection,
    StartTls,
    State,
    UnknownCommand,
    Vrfy,
)
from smtpgate.reply import Reply

GREETING = Reply(220, None, "test.example ESMTP")
EHLO = b"EHLO client.example\r\n"
TX = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"

# One reply line: code, separator, text (RFC 5321 §4.2).
_LINE_RE = re.compile(rb"^([2-5][0-9][0-9])([ -])([^\r\n]*)$")
_ENH_RE = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?: |$)")

Policy = Callable[[ServerConnection, Any], Reply]
E = TypeVar("E")


def default_reply(conn: ServerConnection, ev: Event) -> Reply:
    """The default policy of :class:`Dialogue` (what a permissive server would answer)."""
    if isinstance(ev, Helo):
        return conn.helo_reply(ev)
    if isinstance(ev, MailFrom):
        return Reply(250, "2.1.0", "Sender OK")
    if isinstance(ev, RcptTo):
        return Reply(250, "2.1.5", "Recipient OK")
    if isinstance(ev, Data):
        return Reply(354, None, "Go ahead")
    if isinstance(ev, DataComplete):
        return ev.problem or Reply(250, "2.0.0", "Queued")
    if isinstance(ev, Rset):
        return Reply(250, "2.0.0", "Reset")
    if isinstance(ev, Quit):
        return Reply(221, "2.0.0", "Bye")
    if isinstance(ev, StartTls):
        return Reply(220, "2.0.0", "Ready to start TLS")
    if isinstance(ev, AuthCredentials):
        if ev.password == "secret":
            return Reply(235, "2.7.0", "Authenticated")
        return Reply(535, "5.7.8", "Bad credentials")
    if isinstance(ev, Vrfy):
        return Reply(252, "2.5.0", "Cannot VRFY")
    if isinstance(ev, Expn):
        return Reply(250, "2.1.5", f"<{ev.argument}@example.org>")
    if isinstance(ev, Etrn):
        return Reply(250, "2.0.0", "Queue run started")
    if isinstance(ev, UnknownCommand):
        return ev.reply
    assert isinstance(ev, AutoReply), ev
    return ev.reply


@dataclass
class Dialogue:
    """Plays the driver loop of ``ServerConnection`` with a fixed policy.

    Attributes:
        conn: the connection under test (greeting already sent).
        events: every event seen so far, in order.
        wire: every reply byte sent so far (greeting excluded).
        overrides: per event type, a function giving the reply instead of the
            default policy.
        auto_tls: after a 220 to ``StartTls``, call ``tls_established()`` at once.
    """

    config: ProtocolConfig = field(default_factory=ProtocolConfig)
    greeting: Reply = GREETING
    overrides: dict[type, Policy] = field(default_factory=dict)
    auto_tls: bool = True
    conn: ServerConnection = field(init=False)
    events: list[Event] = field(init=False, default_factory=list)
    wire: bytearray = field(init=False, default_factory=bytearray)
    greeting_bytes: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        self.conn = ServerConnection(self.config)
        self.greeting_bytes = self.conn.send(self.greeting)

    def drain(self) -> bytes:
        """Answer events until the core needs data; return the reply bytes."""
        out = bytearray()
        conn = self.conn
        while not conn.closed:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            assert not isinstance(ev, type(NEED_DATA))
            self.events.append(ev)
            if isinstance(ev, MessageChunk):  # a piece of a long message: not answered
                continue
            policy = self.overrides.get(type(ev), default_reply)
            reply = policy(conn, ev)
            out += conn.send(reply)
            if isinstance(ev, StartTls) and self.auto_tls and conn.state is State.TLS_PENDING:
                conn.tls_established()
        self.wire += out
        return bytes(out)

    def feed(self, data: bytes, chunks: Iterable[int] | int | None = None) -> bytes:
        """Feed ``data`` (whole, in ``chunks``-sized pieces, or cut at the given
        offsets) and return the reply bytes it produced."""
        pieces: list[bytes]
        if chunks is None:
            pieces = [data]
        elif isinstance(chunks, int):
            pieces = [data[i : i + chunks] for i in range(0, len(data), chunks)]
        else:
            cuts = sorted({c for c in chunks if 0 < c < len(data)})
            bounds = [0, *cuts, len(data)]
            pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        out = bytearray()
        for piece in pieces:
            if not piece or self.conn.closed:
                continue
            self.conn.receive_data(piece)
            out += self.drain()
        return bytes(out)

    def codes(self, data: bytes, chunks: Iterable[int] | int | None = None) -> list[str]:
        """Feed ``data`` and return the codes of the replies it produced."""
        return codes(self.feed(data, chunks))

    def messages(self) -> list[tuple[bytes, Reply | None]]:
        """Each message read so far: its text (the MessageChunk pieces joined with the
        DataComplete's data) and the DataComplete's problem."""
        out: list[tuple[bytes, Reply | None]] = []
        pieces: list[bytes] = []
        for ev in self.events:
            if isinstance(ev, MessageChunk):
                pieces.append(ev.data)
            elif isinstance(ev, DataComplete):
                out.append((b"".join(pieces) + ev.data, ev.problem))
                pieces = []
        return out

    def of_type(self, cls: type[E]) -> list[E]:
        """The events seen so far of one type."""
        return [e for e in self.events if isinstance(e, cls)]


def parse_replies(wire: bytes) -> list[tuple[int, list[str]]]:
    """Split reply bytes into replies: ``[(code, [text line, ...]), ...]``.

    Raises:
        AssertionError: on anything that is not a well-formed reply sequence
            (bad code, missing CRLF, continuation code mismatch, dangling lines).
    """
    assert wire == b"" or wire.endswith(b"\r\n"), wire[-40:]
    out: list[tuple[int, list[str]]] = []
    current: list[str] = []
    current_code: int | None = None
    for raw in wire.split(b"\r\n")[:-1]:
        m = _LINE_RE.match(raw)
        assert m is not None, f"malformed reply line {raw!r}"
        code = int(m.group(1))
        assert current_code is None or current_code == code, (current_code, code)
        current_code = code
        current.append(m.group(3).decode("utf-8"))
        if m.group(2) == b" ":
            out.append((code, current))
            current, current_code = [], None
    assert not current, f"unterminated multi-line reply {current!r}"
    return out


def codes(wire: bytes) -> list[str]:
    """Reply codes of ``wire`` as ``"250 2.1.0"`` (or ``"354"`` without an enhanced code)."""
    result = []
    for code, lines in parse_replies(wire):
        m = _ENH_RE.match(lines[0])
        result.append(f"{code} {m.group(1)}" if m else str(code))
    return result


def b64(text: str | bytes) -> str:
    """Base64 of ``text`` (UTF-8), as an ASCII string."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return base64.b64encode(raw).decode("ascii")


def internal_buffer_size(conn: ServerConnection) -> int:
    """White-box: bytes the core holds in its command and data buffers."""
    return len(conn._buf) + len(conn._dbuf) + len(conn._bdat_buf)  # noqa: SLF001
