"""``max_errors`` counts 4xx and 5xx replies caused by the client (Postfix
``smtpd_hard_error_limit``), not the server's own failures (issue 8, finding 14).

Not counted: 421, enhanced status subject 3 (mail system) and 4 (network and
routing) (RFC 3463 §3.4, §3.5), and ``452 4.5.3`` up to
``recipient_overshoot_limit`` per transaction.
"""

from __future__ import annotations

import pytest

from smtpgate.protocol import (
    AuthCredentials,
    DataComplete,
    Helo,
    MailFrom,
    ProtocolConfig,
    RcptTo,
)
from smtpgate.reply import R, Reply

from .helpers import EHLO, TX, Dialogue, codes

AUTH_CFG = dict(auth_mechanisms=("PLAIN",), tls_active=True)


def rcpts(n: int, start: int = 0) -> bytes:
    return b"".join(f"RCPT TO:<r{i}@example.net>\r\n".encode() for i in range(start, start + n))


@pytest.mark.parametrize(
    "reply",
    [
        Reply(450, "4.7.1", "Greylisted, try again later"),
        Reply(454, "4.7.1", "Relay access temporarily denied"),
        Reply(450, "4.1.1", "Recipient address verification pending"),
        Reply(451, "4.7.1", "Sender rate limit"),
        Reply(550, "5.7.1", "Relaying denied"),
        Reply(450, None, "No enhanced code"),
    ],
    ids=str,
)
def test_4xx_and_5xx_caused_by_the_client_count(reply: Reply) -> None:
    d = Dialogue(ProtocolConfig(max_errors=3), overrides={RcptTo: lambda c, e: reply})
    out = d.codes(EHLO + b"MAIL FROM:<a@b>\r\n" + rcpts(5))
    code = f"{reply.code} {reply.enhanced}" if reply.enhanced else str(reply.code)
    assert out == ["250", "250 2.1.0", code, code, code, "421 4.7.0"]
    assert d.conn.closed and d.conn.errors == 3


def test_many_454_close_the_session() -> None:
    """The reported session: 454 replies (e.g. to AUTH) never disconnected it."""
    d = Dialogue(
        ProtocolConfig(max_errors=10, **AUTH_CFG),  # type: ignore[arg-type]
        overrides={AuthCredentials: lambda c, e: R.AUTH_RATE},
    )
    line = b"AUTH PLAIN AHUAc2VjcmV0\r\n"
    out = d.codes(EHLO + line * 50)
    assert out == ["250"] + ["454 4.7.0"] * 10 + ["421 4.7.0"]
    assert d.conn.closed


@pytest.mark.parametrize(
    "reply",
    [
        R.TEMP_ERROR,  # 451 4.3.0
        R.HOOK_ERROR,  # 451 4.3.0
        Reply(452, "4.3.1", "Insufficient system storage"),
        Reply(451, "4.4.1", "Upstream unreachable"),
        Reply(451, "4.4.3", "Directory server failure"),
        Reply(554, "5.3.0", "Mail system failure"),
        Reply(552, "5.3.4", "Message too big for system"),
    ],
    ids=str,
)
def test_server_failures_do_not_count(reply: Reply) -> None:
    d = Dialogue(ProtocolConfig(max_errors=2), overrides={RcptTo: lambda c, e: reply})
    out = d.codes(EHLO + b"MAIL FROM:<a@b>\r\n" + rcpts(20) + b"NOOP\r\n")
    assert out[-1] == "250 2.0.0" and len(out) == 23
    assert not d.conn.closed and d.conn.errors == 0


def test_x3_at_end_of_data_does_not_count_but_rejections_do() -> None:
    d = Dialogue(
        ProtocolConfig(max_errors=2),
        overrides={DataComplete: lambda c, e: Reply(451, "4.3.0", "Scanner unavailable")},
    )
    msg = b"DATA\r\nhi\r\n.\r\n"
    again = b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n" + msg
    assert d.codes(TX + msg + again + again + b"NOOP\r\n")[-1] == "250 2.0.0"
    assert d.conn.errors == 0
    d.overrides[DataComplete] = lambda c, e: Reply(550, "5.7.1", "Spam")
    assert codes(d.feed(again + again)) == ["250 2.1.0", "250 2.1.5", "354", "550 5.7.1"] * 2 + [
        "421 4.7.0"
    ]
    assert d.conn.closed


def test_421_replies_do_not_count() -> None:
    """A 421 closes the session by itself; it is not added to the error count."""
    d = Dialogue(ProtocolConfig(max_errors=1), overrides={Helo: lambda c, e: R.SHUTDOWN})
    assert d.codes(EHLO + b"NOOP\r\n") == ["421 4.3.2"]
    assert d.conn.errors == 0


def test_recipients_over_the_limit_count_past_the_overshoot_allowance() -> None:
    """Postfix smtpd_recipient_overshoot_limit: the first N 452 4.5.3 are free."""
    cfg = ProtocolConfig(max_errors=3, max_recipients=2, recipient_overshoot_limit=5)
    d = Dialogue(cfg)
    out = d.codes(EHLO + b"MAIL FROM:<a@b>\r\n" + rcpts(2 + 5 + 2))
    assert out == ["250", "250 2.1.0"] + ["250 2.1.5"] * 2 + ["452 4.5.3"] * 7
    assert d.conn.errors == 2 and not d.conn.closed
    assert d.codes(rcpts(1, 100)) == ["452 4.5.3", "421 4.7.0"]
    assert d.conn.closed


def test_overshoot_allowance_is_per_transaction() -> None:
    cfg = ProtocolConfig(max_errors=2, max_recipients=1, recipient_overshoot_limit=3)
    d = Dialogue(cfg)
    tx = b"MAIL FROM:<a@b>\r\n" + rcpts(1 + 3) + b"RSET\r\n"
    out = d.codes(EHLO + tx * 5 + b"NOOP\r\n")
    assert out[-1] == "250 2.0.0" and d.conn.errors == 0


def test_overshoot_limit_zero_counts_every_452() -> None:
    cfg = ProtocolConfig(max_errors=3, max_recipients=1, recipient_overshoot_limit=0)
    d = Dialogue(cfg)
    out = d.codes(EHLO + b"MAIL FROM:<a@b>\r\n" + rcpts(10))
    assert out == ["250", "250 2.1.0", "250 2.1.5"] + ["452 4.5.3"] * 3 + ["421 4.7.0"]


def test_driver_452_4_5_3_uses_the_same_allowance() -> None:
    """The driver's own 452 4.5.3 (e.g. too many recipients for a message from <>)
    is the same overshoot: free up to the allowance."""
    too_many = Reply(452, "4.5.3", "Too many recipients for a message from <>")
    cfg = ProtocolConfig(max_errors=2, recipient_overshoot_limit=4)
    d = Dialogue(cfg, overrides={RcptTo: lambda c, e: too_many})
    out = d.codes(EHLO + b"MAIL FROM:<>\r\n" + rcpts(7))
    assert out == ["250", "250 2.1.0"] + ["452 4.5.3"] * 6 + ["421 4.7.0"]


def test_reported_session_452_and_454_is_closed() -> None:
    """Finding 14 as reported: 9,900 x 452 and 195 x 454 without a disconnect.
    With the defaults (max_errors 10, overshoot 1000) both kinds count."""
    refusal = Reply(454, "4.7.1", "Try again later")
    d = Dialogue(
        ProtocolConfig(),
        overrides={RcptTo: lambda c, e: refusal if e.address.startswith("t") else R.RCPT_OK},
    )
    d.feed(EHLO + b"MAIL FROM:<a@b>\r\n")
    out = codes(d.feed(rcpts(100 + 1000)))
    assert out.count("452 4.5.3") == 1000 and d.conn.errors == 0  # the allowance
    out = codes(d.feed(rcpts(9, 5000)))
    assert out == ["452 4.5.3"] * 9 and d.conn.errors == 9 and not d.conn.closed
    out = codes(d.feed(b"RSET\r\nMAIL FROM:<a@b>\r\n" + b"RCPT TO:<t@x>\r\n" * 195))
    assert out == ["250 2.0.0", "250 2.1.0", "454 4.7.1", "421 4.7.0"]
    assert d.conn.closed


def test_errors_attribute_counts_exactly_the_counted_replies() -> None:
    """The ``errors`` attribute the driver's tarpit reads counts exactly the counted replies."""
    d = Dialogue(
        ProtocolConfig(max_errors=100),
        overrides={MailFrom: lambda c, e: Reply(451, "4.7.1", "Later")},
    )
    d.feed(EHLO + b"MAIL FROM:<a@b>\r\n" * 3 + b"VRFY\r\nFOO\r\n")
    assert d.conn.errors == 5
