"""ESMTP extensions: EHLO keywords (RFC 1869), SIZE (1870), 8BITMIME (6152),
SMTPUTF8 (6531), ENHANCEDSTATUSCODES (2034), PIPELINING (2920)."""

from __future__ import annotations

import pytest

from smtpgate.protocol import AutoReply, DataComplete, MailFrom, ProtocolConfig, RcptTo
from smtpgate.reply import R

from .helpers import EHLO, TX, Dialogue, parse_replies

BASE = ["PIPELINING", "SIZE 10485760", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]


def ehlo_lines(cfg: ProtocolConfig, prefix: bytes = b"") -> list[str]:
    d = Dialogue(cfg)
    d.feed(prefix)
    replies = parse_replies(d.feed(EHLO))
    assert len(replies) == 1 and replies[0][0] == 250
    return replies[0][1][1:]


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        (ProtocolConfig(), [*BASE, "HELP"]),
        (ProtocolConfig(max_message_size=1000), ["PIPELINING", "SIZE 1000", *BASE[2:], "HELP"]),
        (ProtocolConfig(tls_available=True), [*BASE, "STARTTLS", "HELP"]),
        (ProtocolConfig(tls_available=True, tls_active=True), [*BASE, "HELP"]),
        # AUTH requires TLS by default: not offered in plaintext.
        (ProtocolConfig(auth_mechanisms=("PLAIN", "LOGIN")), [*BASE, "HELP"]),
        (
            ProtocolConfig(auth_mechanisms=("PLAIN", "LOGIN"), tls_available=True),
            [*BASE, "STARTTLS", "HELP"],
        ),
        (
            ProtocolConfig(auth_mechanisms=("PLAIN", "LOGIN"), auth_require_tls=False),
            [*BASE, "AUTH PLAIN LOGIN", "HELP"],
        ),
        (
            ProtocolConfig(auth_mechanisms=("LOGIN",), tls_active=True),
            [*BASE, "AUTH LOGIN", "HELP"],
        ),
        (
            ProtocolConfig(
                pipelining=False, eightbitmime=False, smtputf8=False, enhanced_status_codes=False
            ),
            ["SIZE 10485760", "HELP"],
        ),
    ],
)
def test_ehlo_keywords(cfg: ProtocolConfig, expected: list[str]) -> None:
    assert ehlo_lines(cfg) == expected


def test_starttls_and_auth_keywords_after_tls_handshake() -> None:
    cfg = ProtocolConfig(tls_available=True, auth_mechanisms=("PLAIN",))
    assert ehlo_lines(cfg, b"EHLO x\r\nSTARTTLS\r\n") == [*BASE, "AUTH PLAIN", "HELP"]


def test_auth_keyword_gone_after_authentication() -> None:
    cfg = ProtocolConfig(auth_mechanisms=("PLAIN",), tls_active=True)
    d = Dialogue(cfg)
    d.feed(EHLO + b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n")  # \0user\0secret
    assert d.conn.authenticated
    lines = parse_replies(d.feed(EHLO))[0][1]
    assert not any(line.startswith("AUTH") for line in lines)


# -------------------------------------------------------------------- PIPELINING


def test_pipelined_batch_replies_in_order() -> None:
    batch = (
        b"EHLO c.example\r\nMAIL FROM:<a@example.org> SIZE=100\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:bad\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    d = Dialogue()
    assert d.codes(batch) == ["250", "250 2.1.0", "250 2.1.5", "501 5.1.3", "250 2.1.5", "354"]
    assert d.codes(b"Subject: hi\r\n\r\nbody\r\n.\r\nMAIL FROM:<x@y>\r\nRSET\r\nQUIT\r\n") == [
        "250 2.0.0",
        "250 2.1.0",
        "250 2.0.0",
        "221 2.0.0",
    ]
    assert [type(e).__name__ for e in d.events] == [
        "Helo",
        "MailFrom",
        "RcptTo",
        "AutoReply",
        "RcptTo",
        "Data",
        "DataComplete",
        "MailFrom",
        "Rset",
        "Quit",
    ]


def test_whole_session_in_one_packet() -> None:
    d = Dialogue()
    wire = TX + b"DATA\r\nhello\r\n.\r\nQUIT\r\n"
    assert d.codes(wire) == ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
    assert d.of_type(DataComplete) == [DataComplete(b"hello\r\n")]


# ------------------------------------------------------------------------ SIZE


def test_declared_size_over_limit() -> None:
    d = Dialogue(ProtocolConfig(max_message_size=5000))
    assert d.codes(EHLO + b"MAIL FROM:<a@b> SIZE=5001\r\nMAIL FROM:<a@b> SIZE=5000\r\n") == [
        "250",
        "552 5.3.4",
        "250 2.1.0",
    ]


@pytest.mark.parametrize("value", ["", "-1", "1e3", "0x10", "١٢", "²", "1" * 21, "+5"])
def test_bad_size_values(value: str) -> None:
    d = Dialogue()
    line = f"MAIL FROM:<a@b> SIZE={value}\r\n".encode()
    out = d.codes(EHLO + line)
    assert out[1] in ("501 5.5.4",), out  # never an exception, never accepted


def test_unicode_digit_size_is_rejected_not_crash() -> None:
    """Regression: str.isdigit() is true for "²" and int("²") raised ValueError."""
    d = Dialogue()
    assert d.codes(EHLO + "MAIL FROM:<a@b> SIZE=²\r\n".encode()) == ["250", "501 5.5.4"]


# ------------------------------------------------------------------- 8BITMIME


def test_8bitmime_not_offered() -> None:
    d = Dialogue(ProtocolConfig(eightbitmime=False))
    assert d.codes(EHLO + b"MAIL FROM:<a@b> BODY=8BITMIME\r\nMAIL FROM:<a@b> BODY=7BIT\r\n") == [
        "250",
        "555 5.5.4",
        "250 2.1.0",
    ]


# -------------------------------------------------------------------- SMTPUTF8

UTF8_ADDR = "jörg@exämple.org"


def test_utf8_sender_requires_smtputf8_param() -> None:
    d = Dialogue()
    out = d.codes(EHLO + f"MAIL FROM:<{UTF8_ADDR}>\r\n".encode())
    assert out == ["250", "553 5.6.7"]
    assert not d.of_type(MailFrom)


def test_utf8_sender_and_recipient_with_smtputf8() -> None:
    d = Dialogue()
    out = d.codes(
        EHLO + f"MAIL FROM:<{UTF8_ADDR}> SMTPUTF8\r\nRCPT TO:<用户@例子.广告>\r\n".encode()
    )
    assert out == ["250", "250 2.1.0", "250 2.1.5"]
    assert d.of_type(MailFrom) == [MailFrom(UTF8_ADDR, {"SMTPUTF8": None})]
    assert d.of_type(RcptTo) == [RcptTo("用户@例子.广告", {})]


def test_utf8_recipient_without_smtputf8_mail() -> None:
    d = Dialogue()
    out = d.codes(EHLO + f"MAIL FROM:<a@b>\r\nRCPT TO:<{UTF8_ADDR}>\r\n".encode())
    assert out == ["250", "250 2.1.0", "553 5.6.7"]
    assert not d.of_type(RcptTo)


def test_smtputf8_flag_is_per_transaction() -> None:
    d = Dialogue()
    d.feed(EHLO + b"MAIL FROM:<a@b> SMTPUTF8\r\nRSET\r\nMAIL FROM:<a@b>\r\n")
    assert d.codes(f"RCPT TO:<{UTF8_ADDR}>\r\n".encode()) == ["553 5.6.7"]


def test_smtputf8_disabled() -> None:
    d = Dialogue(ProtocolConfig(smtputf8=False))
    out = d.codes(
        EHLO
        + b"MAIL FROM:<a@b> SMTPUTF8\r\n"
        + f"MAIL FROM:<{UTF8_ADDR}>\r\n".encode()
        + b"MAIL FROM:<a@b>\r\n"
        + f"RCPT TO:<{UTF8_ADDR}>\r\n".encode()
    )
    assert out == ["250", "555 5.5.4", "553 5.6.7", "250 2.1.0", "553 5.6.7"]


def test_utf8_in_other_commands_is_rejected() -> None:
    d = Dialogue()
    out = d.codes("EHLO exämple\r\nVRFY jörg\r\nNOOP ü\r\nFÖÖ\r\n".encode())
    assert out == ["501 5.5.4", "501 5.5.4", "501 5.5.4", "500 5.5.2"]


# ---------------------------------------------------------- AUTH= MAIL parameter


def test_mail_auth_param_only_when_auth_offered() -> None:
    line = b"MAIL FROM:<a@b> AUTH=<>\r\n"
    assert Dialogue().codes(EHLO + line) == ["250", "555 5.5.4"]
    on = ProtocolConfig(auth_mechanisms=("PLAIN",), auth_require_tls=False)
    d = Dialogue(on)
    assert d.codes(EHLO + line) == ["250", "250 2.1.0"]
    assert d.of_type(MailFrom) == [MailFrom("a@b", {"AUTH": "<>"})]
    # offered only under TLS and TLS not active: not offered, not accepted
    off = ProtocolConfig(auth_mechanisms=("PLAIN",), auth_require_tls=True)
    assert Dialogue(off).codes(EHLO + line) == ["250", "555 5.5.4"]
    assert Dialogue(on).codes(EHLO + b"MAIL FROM:<a@b> AUTH\r\n") == ["250", "555 5.5.4"]


# ---------------------------------------------------------------- error replies


def test_auto_reply_uses_canonical_replies() -> None:
    d = Dialogue()
    d.feed(b"XYZZY\r\nMAIL FROM:<a@b>\r\n")
    assert d.events == [AutoReply(R.UNKNOWN_COMMAND, "XYZZY"), d.events[1]]
    assert isinstance(d.events[1], AutoReply) and d.events[1].reply == R.HELO_FIRST
