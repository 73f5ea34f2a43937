"""``max_error_recipients``: the core refuses recipients beyond the limit on a message
from ``<>`` (ZMailer ``max-error-recipients``) with ``452 4.5.3``, counted like every
``452 4.5.3`` (RFC 5321 §4.5.3.1.10; Postfix ``smtpd_recipient_overshoot_limit``)."""

from __future__ import annotations

from smtpgate.protocol import AutoReply, ProtocolConfig, RcptTo, State
from smtpgate.reply import Reply

from .helpers import Dialogue, codes

NULL = b"EHLO c.example\r\nMAIL FROM:<>\r\n"
TOO_MANY = b"452 4.5.3 Too many recipients for a message from <>\r\n"


def rcpts(n: int, start: int = 0) -> bytes:
    return b"".join(f"RCPT TO:<r{i}@example.net>\r\n".encode() for i in range(start, start + n))


def test_recipients_beyond_the_limit_get_452_from_the_core() -> None:
    d = Dialogue(ProtocolConfig(max_error_recipients=2))
    wire = d.feed(NULL + rcpts(3))
    assert codes(wire) == ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3"]
    assert wire.endswith(TOO_MANY)
    # The driver never saw the third recipient: the core answered it.
    assert len(d.of_type(RcptTo)) == 2
    assert isinstance(d.events[-1], AutoReply)
    # The transaction goes on with the accepted recipients (RFC 5321 §4.5.3.1.10).
    assert d.codes(b"DATA\r\nhi\r\n.\r\n") == ["354", "250 2.0.0"]


def test_no_limit_by_default_or_for_other_senders() -> None:
    d = Dialogue(ProtocolConfig())
    assert d.codes(NULL + rcpts(5))[-1] == "250 2.1.5"
    d = Dialogue(ProtocolConfig(max_error_recipients=1))
    out = d.codes(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n" + rcpts(4))
    assert out[2:] == ["250 2.1.5"] * 4


def test_only_accepted_recipients_count() -> None:
    refuse_first = {RcptTo: lambda c, e: (Reply(550, "5.1.1", "no such user")
                                          if e.address == "r0@example.net"
                                          else Reply(250, "2.1.5", "ok"))}
    d = Dialogue(ProtocolConfig(max_error_recipients=2), overrides=refuse_first)
    assert d.codes(NULL + rcpts(4)) == [
        "250", "250 2.1.0", "550 5.1.1", "250 2.1.5", "250 2.1.5", "452 4.5.3",
    ]


def test_limit_is_per_transaction_and_per_sender() -> None:
    d = Dialogue(ProtocolConfig(max_error_recipients=1))
    assert d.codes(NULL + rcpts(2)) == ["250", "250 2.1.0", "250 2.1.5", "452 4.5.3"]
    # RSET, then a message with a sender: no limit.
    assert d.codes(b"RSET\r\nMAIL FROM:<a@b.example>\r\n" + rcpts(2))[-1] == "250 2.1.5"
    # After that message, another from <> starts a fresh count.
    d.feed(b"DATA\r\nx\r\n.\r\n")
    assert d.codes(b"MAIL FROM:<>\r\n" + rcpts(2)) == ["250 2.1.0", "250 2.1.5", "452 4.5.3"]
    assert d.conn.state is State.RCPT


def test_counts_within_the_overshoot_allowance() -> None:
    cfg = ProtocolConfig(max_error_recipients=1, recipient_overshoot_limit=1, max_errors=2)
    d = Dialogue(cfg)
    out = d.codes(NULL + rcpts(4))
    # 452 #1 is within the allowance; #2 and #3 count, and #3 reaches max_errors.
    assert out == ["250", "250 2.1.0", "250 2.1.5", "452 4.5.3", "452 4.5.3", "452 4.5.3",
                   "421 4.7.0"]
    assert d.conn.closed and d.conn.errors == 2
    d = Dialogue(ProtocolConfig(max_error_recipients=1, max_errors=2))
    assert d.codes(NULL + rcpts(50) + b"NOOP\r\n")[-1] == "250 2.0.0"
    assert d.conn.errors == 0


def test_max_recipients_is_checked_first() -> None:
    d = Dialogue(ProtocolConfig(max_recipients=1, max_error_recipients=3))
    wire = d.feed(NULL + rcpts(2))
    assert wire.endswith(b"452 4.5.3 Too many recipients\r\n")
