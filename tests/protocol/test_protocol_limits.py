"""Limits and hostile input: line lengths (RFC 5321 §4.5.3.1), recipients, error
counts, NUL / 8-bit / bare LF in commands, HTTP requests."""

from __future__ import annotations

import pytest

from smtpgate.protocol import (
    AuthCredentials,
    AutoReply,
    DataComplete,
    MailFrom,
    ProtocolConfig,
    RcptTo,
    State,
)
from smtpgate.reply import R

from .helpers import EHLO, TX, Dialogue, b64, codes


def line_of(prefix: bytes, total: int) -> bytes:
    """``prefix`` padded with "x" to ``total`` octets including CRLF."""
    return prefix + b"x" * (total - len(prefix) - 2) + b"\r\n"


# ------------------------------------------------------------ command lines


@pytest.mark.parametrize(("size", "expected"), [(512, "250 2.0.0"), (513, "500 5.5.2")])
def test_command_line_512(size: int, expected: str) -> None:
    d = Dialogue()
    assert d.codes(line_of(b"NOOP ", size) + b"NOOP\r\n") == [expected, "250 2.0.0"]


def test_command_line_limit_configurable() -> None:
    d = Dialogue(ProtocolConfig(max_command_line=1000))
    assert d.codes(line_of(b"NOOP ", 1000) + line_of(b"NOOP ", 1001)) == [
        "250 2.0.0",
        "500 5.5.2",
    ]


def mail_line(total: int) -> bytes:
    # Extra spaces between parameters are allowed and let the line grow.
    head, tail = b"MAIL FROM:<a@example.org>", b"SIZE=10\r\n"
    return head + b" " * (total - len(head) - len(tail)) + tail


@pytest.mark.parametrize(("size", "expected"), [(2048, "250 2.1.0"), (2049, "500 5.5.2")])
def test_mail_line_2048(size: int, expected: str) -> None:
    line = mail_line(size)
    assert len(line) == size
    d = Dialogue()
    assert d.codes(EHLO + line) == ["250", expected]


@pytest.mark.parametrize(("size", "expected"), [(2048, "555 5.5.4"), (2049, "500 5.5.2")])
def test_rcpt_line_2048(size: int, expected: str) -> None:
    head, tail = b"RCPT TO:<b@example.org>", b"X=1\r\n"
    line = head + b" " * (size - len(head) - len(tail)) + tail
    d = Dialogue()
    assert d.codes(EHLO + b"MAIL FROM:<a@b>\r\n" + line) == ["250", "250 2.1.0", expected]


AUTH_CFG = ProtocolConfig(auth_mechanisms=("PLAIN", "LOGIN"), tls_active=True)


def auth_plain_line(total: int) -> bytes:
    # base64 grows 4/3: find the password length giving exactly ``total`` octets.
    for n in range(total, 0, -1):
        line = f"AUTH PLAIN {b64(chr(0) + 'user' + chr(0) + 'p' * n)}\r\n".encode()
        if len(line) <= total:
            return line
    raise AssertionError


@pytest.mark.parametrize(("size", "expected"), [(12288, "535 5.7.8"), (12300, "500 5.5.6")])
def test_auth_line_12288(size: int, expected: str) -> None:
    line = auth_plain_line(size)
    assert size - 4 <= len(line) <= size
    d = Dialogue(AUTH_CFG)
    assert d.codes(EHLO + line + b"NOOP\r\n") == ["250", expected, "250 2.0.0"]
    if expected.startswith("535"):
        ev = d.of_type(AuthCredentials)[0]
        assert isinstance(ev, AuthCredentials) and len(ev.password) > 9000


def test_auth_line_limit_exact() -> None:
    d = Dialogue(AUTH_CFG)
    ok = (
        b"AUTH PLAIN " + b"A" * (12288 - 13) + b"\r\n"
    )  # 12288 octets: invalid base64, not too long
    bad = b"AUTH PLAIN " + b"A" * (12289 - 13) + b"\r\n"
    assert (len(ok), len(bad)) == (12288, 12289)
    # RFC 4954 §6: 500 5.5.6 "Authentication Exchange line is too long".
    assert d.codes(EHLO + ok + bad) == ["250", "501 5.5.2", "500 5.5.6"]
    replies = [e for e in d.events[1:] if isinstance(e, AutoReply)]
    assert replies[0].reply == R.AUTH_BAD_BASE64
    assert replies[1].command == "AUTH"  # no SASL data in the log label


def test_overlong_sasl_response_aborts_the_exchange() -> None:
    """Regression: a too-long SASL response left the core in the AUTH state, so
    the next command line was taken as a SASL response."""
    d = Dialogue(AUTH_CFG)
    out = d.codes(EHLO + b"AUTH LOGIN\r\n" + b"A" * 20000 + b"\r\nNOOP\r\n")
    assert out == ["250", "334", "500 5.5.6", "250 2.0.0"]
    assert d.conn.state is State.READY


@pytest.mark.parametrize("chunk", [None, 1000, 65536, 7])
def test_60k_line_without_newline_gives_one_error(chunk: int | None) -> None:
    """The reply comes as soon as the line exceeds its limit (2048 for MAIL), before
    its CRLF; the rest of the line is discarded and the session goes on."""
    d = Dialogue()
    d.feed(EHLO)
    big = b"MAIL FROM:<" + b"a" * 60_000
    out = d.codes(big, chunks=chunk)
    assert out == ["500 5.5.2"]
    assert d.conn.buffered <= 2048 + (chunk or len(big))
    assert d.codes(b"aaaa>\r\nNOOP\r\nMAIL FROM:<a@b>\r\n") == ["250 2.0.0", "250 2.1.0"]
    assert not d.conn.closed
    assert d.of_type(MailFrom) == [MailFrom("a@b", {})]


def test_discarded_long_line_memory_is_bounded() -> None:
    d = Dialogue()
    fed = 0
    while not d.conn.closed:
        d.conn.receive_data(b"x" * 5000)
        fed += 5000
        d.drain()
        assert d.conn.buffered <= 512 + 5000
    assert codes(bytes(d.wire)) == ["500 5.5.2", "421 4.5.0"]
    assert 512 + 65536 <= fed < 512 + 65536 + 5000


# ---------------------------------------------------------- text line length


def message_with_line(n: int) -> bytes:
    return b"DATA\r\n" + line_of(b"", n) + b".\r\n"


@pytest.mark.parametrize(
    ("limit", "size", "expected"),
    [
        (1000, 1000, "250 2.0.0"),
        (1000, 1001, "500 5.5.2"),
        (80, 80, "250 2.0.0"),
        (80, 81, "500 5.5.2"),
        (0, 100_000, "250 2.0.0"),
    ],
)
def test_text_line_length(limit: int, size: int, expected: str) -> None:
    d = Dialogue(ProtocolConfig(max_line_length=limit))
    out = d.codes(TX + message_with_line(size))
    assert out[-1] == expected
    (done,) = d.of_type(DataComplete)
    if expected.startswith("500"):
        assert done.problem == R.TEXT_LINE_TOO_LONG and done.data == b""
    else:
        assert done.problem is None and len(done.data) == size


def test_text_line_limit_does_not_count_the_stuffed_dot() -> None:
    """RFC 5321 §4.5.3.1.6: the 1000 octets do not count the dot added for transparency.

    Regression: the core measured wire lines, so a legal 1000-octet line starting
    with "." (1001 octets once stuffed) was refused."""
    d = Dialogue()
    line = b"." + b"x" * 997 + b"\r\n"  # 1000 octets in the message
    out = d.codes(TX + b"DATA\r\n." + line + b".\r\n")
    assert out[-1] == "250 2.0.0"
    assert d.events[-1] == DataComplete(line)


# ------------------------------------------------------------- recipients


def test_max_recipients() -> None:
    d = Dialogue(ProtocolConfig(max_recipients=3))
    rcpts = b"".join(f"RCPT TO:<r{i}@example.net>\r\n".encode() for i in range(5))
    out = d.codes(EHLO + b"MAIL FROM:<a@b>\r\n" + rcpts + b"DATA\r\n")
    assert out == ["250", "250 2.1.0"] + ["250 2.1.5"] * 3 + ["452 4.5.3"] * 2 + ["354"]
    assert len(d.of_type(RcptTo)) == 3
    # The count is per transaction.
    d.feed(b"x\r\n.\r\nMAIL FROM:<a@b>\r\n")
    assert d.codes(rcpts[:60]) == ["250 2.1.5", "250 2.1.5"]


def test_rejected_recipients_do_not_count() -> None:
    d = Dialogue(
        ProtocolConfig(max_recipients=2),
        overrides={RcptTo: lambda c, e: R.RELAY_DENIED if e.address.startswith("x") else R.RCPT_OK},
    )
    out = d.codes(
        EHLO
        + b"MAIL FROM:<a@b>\r\n"
        + b"RCPT TO:<x1@b>\r\nRCPT TO:<x2@b>\r\nRCPT TO:<r1@b>\r\nRCPT TO:<r2@b>\r\nRCPT TO:<r3@b>\r\n"
    )
    assert out == [
        "250",
        "250 2.1.0",
        "550 5.7.1",
        "550 5.7.1",
        "250 2.1.5",
        "250 2.1.5",
        "452 4.5.3",
    ]


# --------------------------------------------------------------- error counts


def test_max_errors_closes_after_third_5xx() -> None:
    d = Dialogue(ProtocolConfig(max_errors=3))
    wire = d.feed(b"MAIL FROM:<a@b>\r\nVRFY\r\nRCPT TO:<a@b>\r\nNOOP\r\n")
    assert codes(wire) == ["503 5.5.1", "501 5.5.4", "503 5.5.1", "421 4.7.0"]
    assert d.conn.closed


def test_max_errors_counts_driver_5xx_too() -> None:
    d = Dialogue(
        ProtocolConfig(max_errors=2),
        overrides={MailFrom: lambda c, e: R.ACCESS_DENIED},
    )
    assert d.codes(EHLO + b"MAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nNOOP\r\n") == [
        "250",
        "554 5.7.1",
        "554 5.7.1",
        "421 4.7.0",
    ]


def test_recipient_overshoot_within_allowance_does_not_count() -> None:
    d = Dialogue(ProtocolConfig(max_errors=2, max_recipients=1))
    out = d.codes(TX + b"RCPT TO:<c@d>\r\n" * 5 + b"NOOP\r\n")
    assert out[-1] == "250 2.0.0" and not d.conn.closed


def test_max_unknown_commands() -> None:
    d = Dialogue(ProtocolConfig(max_unknown_commands=2))
    wire = d.feed(b"FOO\r\nBAR\r\nNOOP\r\nBAZ\r\nNOOP\r\n")
    assert codes(wire) == ["500 5.5.1", "500 5.5.1", "250 2.0.0", "500 5.5.1", "421 4.7.0"]
    assert d.conn.closed


def test_too_big_messages_do_not_count_as_errors() -> None:
    """552 5.3.4 has subject 3 (mail system, RFC 3463 §3.5): not the client's error."""
    d = Dialogue(ProtocolConfig(max_errors=2, max_message_size=10))
    msg = b"DATA\r\n" + b"x" * 50 + b"\r\n.\r\n"
    out = d.codes(TX + msg + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n" + msg + b"NOOP\r\n")
    assert out[-1] == "250 2.0.0"
    assert out.count("552 5.3.4") == 2


# ------------------------------------------------------------- hostile bytes


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"NOOP\x00\r\n", "500 5.5.2"),
        (b"\x00\r\n", "500 5.5.2"),
        (b"MAIL FROM:<a\x00@b>\r\n", "500 5.5.2"),
        (b"NO\rOP\r\n", "500 5.5.2"),
        (b"NOOP\r\r\n", "500 5.5.2"),
        (b"\xff\xfe\r\n", "501 5.5.4"),  # not UTF-8
        (b"MAIL FROM:<\xe9@b>\r\n", "501 5.5.4"),  # Latin-1, not UTF-8
        ("ÉHLO x\r\n".encode(), "500 5.5.2"),
        ("HELO ü\r\n".encode(), "501 5.5.4"),
        (b"EHLO x\n\r\n", "500 5.5.2"),  # bare LF: part of the line (RFC 5321 §2.3.8)
        (b"QUIT\n\r\n", "500 5.5.2"),
        (b"\n\r\n", "500 5.5.2"),
        (b"EHLO \x1b[31mx\r\n", "501 5.5.4"),
    ],
)
def test_bad_bytes_in_commands(line: bytes, expected: str) -> None:
    d = Dialogue()
    assert d.codes(line + b"NOOP\r\n") == [expected, "250 2.0.0"]
    assert not d.conn.closed


def test_bare_lf_command_lines_are_not_executed() -> None:
    d = Dialogue()
    assert d.codes(b"EHLO x\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\n") == []  # no CRLF yet
    assert d.codes(b"\r\n") == ["500 5.5.2"]  # one line, one reply
    assert all(isinstance(e, AutoReply) for e in d.events)


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET / HTTP/1.1\r\n",
        b"POST /x HTTP/1.0\r\n",
        b"CONNECT mx:25 HTTP/1.1\r\n",
        b"get /\r\n",
        b"HEAD / HTTP/1.1\r\n",
    ],
)
def test_http_requests_close_the_session(request_line: bytes) -> None:
    d = Dialogue()
    out = d.codes(request_line + b"Host: x\r\n\r\n")
    assert out == ["421 4.7.0"]
    assert d.conn.closed


def test_http_after_ehlo() -> None:
    d = Dialogue()
    assert d.codes(EHLO + b"POST / HTTP/1.1\r\nNOOP\r\n") == ["250", "421 4.7.0"]
