"""RFC 5321 commands, the state machine and fixed replies of the protocol core."""

from __future__ import annotations

import pytest

from smtpgate.errors import LocalProtocolError
from smtpgate.protocol import (
    NEED_DATA,
    AutoReply,
    Helo,
    MailFrom,
    ProtocolConfig,
    Quit,
    RcptTo,
    Rset,
    ServerConnection,
    State,
    Vrfy,
)
from smtpgate.reply import R, Reply

from .helpers import EHLO, TX, Dialogue, codes, parse_replies

# (name, input bytes, expected reply codes, after the greeting, default config)
TABLE: list[tuple[str, bytes, list[str]]] = [
    ("helo", b"HELO client.example\r\n", ["250"]),
    ("ehlo", EHLO, ["250"]),
    (
        "lowercase verbs",
        b"ehlo x\r\nmail from:<a@b>\r\nrcpt to:<c@d>\r\n",
        ["250", "250 2.1.0", "250 2.1.5"],
    ),
    ("helo without name", b"HELO\r\n", ["501 5.5.4"]),
    ("ehlo with two words", b"EHLO a b\r\n", ["501 5.5.4"]),
    ("noop", b"NOOP\r\n", ["250 2.0.0"]),
    ("noop with argument", b"NOOP whatever\r\n", ["250 2.0.0"]),
    ("help", b"HELP\r\n", ["214 2.0.0"]),
    ("help with topic", b"HELP MAIL\r\n", ["214 2.0.0"]),
    ("rset before helo", b"RSET\r\n", ["250 2.0.0"]),
    ("rset with argument", b"RSET x\r\n", ["501 5.5.4"]),
    ("quit", b"QUIT\r\n", ["221 2.0.0"]),
    ("quit with argument", b"QUIT now\r\n", ["501 5.5.4"]),
    ("vrfy", b"VRFY bob\r\n", ["252 2.5.0"]),
    ("vrfy without argument", b"VRFY\r\n", ["501 5.5.4"]),
    ("vrfy spaces only", b"VRFY   \r\n", ["501 5.5.4"]),
    ("expn", b"EXPN staff\r\n", ["502 5.5.1"]),
    ("turn", b"TURN\r\n", ["502 5.5.1"]),
    ("bdat (no CHUNKING): the chunk is consumed, then 502", EHLO + b"BDAT 10 LAST\r\n0123456789NOOP\r\n", ["250", "502 5.5.1", "250 2.0.0"]),
    ("unknown", b"FOO bar\r\n", ["500 5.5.1"]),
    ("empty line", b"\r\n", ["500 5.5.1"]),
    ("verb with leading space", b" NOOP\r\n", ["500 5.5.1"]),
    ("mail before ehlo", b"MAIL FROM:<a@b>\r\n", ["503 5.5.1"]),
    ("rcpt before mail", EHLO + b"RCPT TO:<a@b>\r\n", ["250", "503 5.5.1"]),
    ("rcpt before helo", b"RCPT TO:<a@b>\r\n", ["503 5.5.1"]),
    ("data before mail", EHLO + b"DATA\r\n", ["250", "503 5.5.1"]),
    ("data before helo", b"DATA\r\n", ["503 5.5.1"]),
    ("data before rcpt", EHLO + b"MAIL FROM:<a@b>\r\nDATA\r\n", ["250", "250 2.1.0", "503 5.5.1"]),
    ("data with argument", TX + b"DATA now\r\n", ["250", "250 2.1.0", "250 2.1.5", "501 5.5.4"]),
    (
        "nested mail",
        EHLO + b"MAIL FROM:<a@b>\r\nMAIL FROM:<c@d>\r\n",
        ["250", "250 2.1.0", "503 5.5.1"],
    ),
    (
        "nested mail after rcpt",
        TX + b"MAIL FROM:<c@d>\r\n",
        ["250", "250 2.1.0", "250 2.1.5", "503 5.5.1"],
    ),
    ("mail syntax", EHLO + b"MAIL <a@b>\r\n", ["250", "501 5.5.4"]),
    ("mail without colon", EHLO + b"MAIL FROM <a@b>\r\n", ["250", "501 5.5.4"]),
    ("rcpt syntax", EHLO + b"MAIL FROM:<a@b>\r\nRCPT <c@d>\r\n", ["250", "250 2.1.0", "501 5.5.4"]),
    ("bad sender", EHLO + b"MAIL FROM:a@b\r\n", ["250", "501 5.1.7"]),
    (
        "bad recipient",
        EHLO + b"MAIL FROM:<a@b>\r\nRCPT TO:c@d\r\n",
        ["250", "250 2.1.0", "501 5.1.3"],
    ),
    (
        "null recipient",
        EHLO + b"MAIL FROM:<a@b>\r\nRCPT TO:<>\r\n",
        ["250", "250 2.1.0", "501 5.1.3"],
    ),
    ("params after helo", b"HELO x\r\nMAIL FROM:<a@b> SIZE=10\r\n", ["250", "555 5.5.4"]),
    ("unknown mail param", EHLO + b"MAIL FROM:<a@b> FOO=1\r\n", ["250", "555 5.5.4"]),
    (
        "unknown rcpt param",
        EHLO + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d> NOTIFY=NEVER\r\n",
        ["250", "250 2.1.0", "555 5.5.4"],
    ),
    ("malformed param", EHLO + b"MAIL FROM:<a@b> =x\r\n", ["250", "501 5.5.4"]),
    ("duplicate param", EHLO + b"MAIL FROM:<a@b> SIZE=1 size=2\r\n", ["250", "501 5.5.4"]),
    ("size ok", EHLO + b"MAIL FROM:<a@b> SIZE=1000\r\n", ["250", "250 2.1.0"]),
    ("size without value", EHLO + b"MAIL FROM:<a@b> SIZE\r\n", ["250", "501 5.5.4"]),
    ("size not a number", EHLO + b"MAIL FROM:<a@b> SIZE=12k\r\n", ["250", "501 5.5.4"]),
    ("size too big", EHLO + b"MAIL FROM:<a@b> SIZE=10485761\r\n", ["250", "552 5.3.4"]),
    ("size at limit", EHLO + b"MAIL FROM:<a@b> SIZE=10485760\r\n", ["250", "250 2.1.0"]),
    ("body 8bitmime", EHLO + b"MAIL FROM:<a@b> BODY=8BITMIME\r\n", ["250", "250 2.1.0"]),
    ("body 7bit", EHLO + b"MAIL FROM:<a@b> BODY=7bit\r\n", ["250", "250 2.1.0"]),
    ("body binarymime", EHLO + b"MAIL FROM:<a@b> BODY=BINARYMIME\r\n", ["250", "555 5.5.4"]),
    ("body bad", EHLO + b"MAIL FROM:<a@b> BODY=9BIT\r\n", ["250", "501 5.5.4"]),
    ("body without value", EHLO + b"MAIL FROM:<a@b> BODY\r\n", ["250", "501 5.5.4"]),
    ("smtputf8 param", EHLO + b"MAIL FROM:<a@b> SMTPUTF8\r\n", ["250", "250 2.1.0"]),
    ("smtputf8 with value", EHLO + b"MAIL FROM:<a@b> SMTPUTF8=yes\r\n", ["250", "501 5.5.4"]),
    ("auth param, auth not offered", EHLO + b"MAIL FROM:<a@b> AUTH=<>\r\n", ["250", "555 5.5.4"]),
    (
        "rset in transaction",
        TX + b"RSET\r\nRCPT TO:<c@d>\r\n",
        ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1"],
    ),
    (
        "rset then new mail",
        TX + b"RSET\r\nMAIL FROM:<c@d>\r\n",
        ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "250 2.1.0"],
    ),
    (
        "ehlo resets transaction",
        TX + EHLO + b"RCPT TO:<c@d>\r\n",
        ["250", "250 2.1.0", "250 2.1.5", "250", "503 5.5.1"],
    ),
    ("helo twice", b"HELO a\r\nHELO b\r\n", ["250", "250"]),
    (
        "multiple recipients",
        TX + b"RCPT TO:<c@d>\r\nRCPT TO:<Postmaster>\r\n",
        ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.1.5"],
    ),
    ("starttls unavailable", EHLO + b"STARTTLS\r\n", ["250", "502 5.5.1"]),
    ("auth unavailable", EHLO + b"AUTH PLAIN\r\n", ["250", "502 5.5.1"]),
]


@pytest.mark.parametrize(("data", "expected"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE])
def test_command_table(data: bytes, expected: list[str]) -> None:
    d = Dialogue()
    assert d.codes(data) == expected
    # Pipelined in one packet and fed byte by byte: identical replies.
    d2 = Dialogue()
    assert d2.codes(data, chunks=1) == expected
    assert d2.events == d.events


def test_greeting_bytes_and_initial_state() -> None:
    conn = ServerConnection()
    assert conn.state is State.GREETING
    conn.receive_data(b"EHLO early\r\n")
    assert conn.next_event() is NEED_DATA  # nothing happens before the greeting
    assert conn.send(Reply(220, None, "mx ESMTP")) == b"220 mx ESMTP\r\n"
    assert conn.state.name == "INIT"
    ev = conn.next_event()
    assert ev == Helo("early", True)


def test_events_carry_arguments() -> None:
    d = Dialogue()
    d.feed(
        b"EHLO [192.0.2.1]\r\nMAIL FROM:<a@b> SIZE=99 BODY=8bitmime\r\n"
        b"RCPT TO:<c@d>\r\nVRFY  bob smith \r\nRSET\r\nQUIT\r\n"
    )
    assert d.events[:3] == [
        Helo("[192.0.2.1]", True),
        MailFrom("a@b", {"SIZE": "99", "BODY": "8BITMIME"}),
        RcptTo("c@d", {}),
    ]
    assert d.events[3] == Vrfy("bob smith")
    assert d.events[4:] == [Rset(), Quit()]
    assert d.conn.closed


def test_helo_gives_one_line_ehlo_multiline() -> None:
    d = Dialogue(ProtocolConfig(hostname="mx.test"))
    helo = parse_replies(d.feed(b"HELO c.example\r\n"))
    assert helo == [(250, ["mx.test Hello c.example"])]
    assert d.conn.esmtp is False
    ehlo = parse_replies(d.feed(b"EHLO c.example\r\n"))
    assert ehlo[0][1][0] == "mx.test Hello c.example"
    assert len(ehlo[0][1]) > 1
    assert d.conn.esmtp is True and d.conn.helo_name == "c.example"


def test_negative_helo_reply_keeps_state() -> None:
    d = Dialogue(overrides={Helo: lambda c, e: Reply(550, "5.7.1", "go away")})
    assert d.codes(b"EHLO x\r\nMAIL FROM:<a@b>\r\n") == ["550 5.7.1", "503 5.5.1"]
    assert d.conn.state is State.INIT


def test_rejected_mail_and_rcpt_do_not_advance() -> None:
    d = Dialogue(overrides={MailFrom: lambda c, e: Reply(550, "5.7.1", "no")})
    assert d.codes(EHLO + b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n") == [
        "250",
        "550 5.7.1",
        "503 5.5.1",
    ]
    d = Dialogue(overrides={RcptTo: lambda c, e: Reply(550, "5.1.1", "unknown user")})
    assert d.codes(TX + b"DATA\r\n") == ["250", "250 2.1.0", "550 5.1.1", "554 5.5.1"]
    assert d.conn.state is State.MAIL


def test_help_text_is_multiline_214() -> None:
    d = Dialogue(ProtocolConfig(help_text="line one\nline two"))
    wire = d.feed(b"HELP\r\n")
    assert wire == b"214-2.0.0 line one\r\n214 2.0.0 line two\r\n"


def test_quit_closes_and_later_bytes_are_ignored() -> None:
    d = Dialogue()
    assert d.codes(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0"]
    assert d.conn.closed
    d.conn.receive_data(b"NOOP\r\n")
    assert d.conn.next_event() is NEED_DATA


def test_quit_mid_transaction() -> None:
    d = Dialogue()
    assert d.codes(TX + b"QUIT\r\n")[-1] == "221 2.0.0"
    assert d.conn.closed


def test_peer_close_is_flagged() -> None:
    d = Dialogue()
    d.feed(EHLO)
    d.conn.receive_data(b"")
    assert d.conn.peer_closed
    assert d.conn.next_event() is NEED_DATA


def test_greeting_554_allows_only_quit_noop_help() -> None:
    d = Dialogue(greeting=Reply(554, "5.7.1", "no service"))
    assert d.conn.state is State.REJECTED
    assert (
        d.codes(
            b"EHLO x\r\nHELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@b>\r\nDATA\r\n"
            b"VRFY x\r\nRSET\r\nSTARTTLS\r\nAUTH PLAIN\r\n"
        )
        == ["503 5.5.1"] * 9
    )
    assert d.codes(b"NOOP\r\nHELP\r\nQUIT\r\n") == ["250 2.0.0", "214 2.0.0", "221 2.0.0"]
    assert d.conn.closed
    # AUTH is answered 503 even when AUTH is configured and TLS is active.
    cfg = ProtocolConfig(auth_mechanisms=("PLAIN",), tls_active=True)
    d = Dialogue(cfg, greeting=Reply(554, "5.7.1", "no service"))
    assert d.codes(b"AUTH PLAIN\r\n") == ["503 5.5.1"]


def test_greeting_421_closes() -> None:
    d = Dialogue(greeting=Reply(421, "4.3.2", "busy"))
    assert d.conn.closed
    assert d.codes(b"EHLO x\r\n") == []


def test_close_reply_renders_and_closes() -> None:
    d = Dialogue()
    d.feed(TX)
    assert d.conn.close_reply(R.TIMEOUT) == b"421 4.4.2 Timeout exceeded, closing connection\r\n"
    assert d.conn.closed
    assert d.conn.next_event() is NEED_DATA


def test_close_reply_with_pending_event() -> None:
    conn = ServerConnection()
    conn.send(Reply(220, None, "x"))
    conn.receive_data(b"EHLO x\r\n")
    assert isinstance(conn.next_event(), Helo)
    assert conn.close_reply(R.SHUTDOWN).startswith(b"421 4.3.2 ")
    assert conn.closed


def test_driver_misuse_raises_local_protocol_error() -> None:
    conn = ServerConnection()
    conn.send(Reply(220, None, "x"))
    with pytest.raises(LocalProtocolError):
        conn.send(Reply(250, None, "nothing asked"))
    conn.receive_data(b"NOOP\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), AutoReply)
    with pytest.raises(LocalProtocolError):
        conn.next_event()  # previous event not answered
    with pytest.raises(LocalProtocolError):
        conn.tls_established()  # no STARTTLS pending


def test_auto_reply_command_is_logged_without_control_bytes() -> None:
    d = Dialogue()
    d.feed(b"FOO \x01bar\r\n")
    ev = d.events[0]
    assert isinstance(ev, AutoReply)
    assert ev.reply is R.UNKNOWN_COMMAND
    assert "\x01" not in ev.command


def test_state_properties() -> None:
    d = Dialogue()
    assert not d.conn.in_transaction
    d.feed(TX)
    assert d.conn.in_transaction and d.conn.state is State.RCPT
    d.feed(b"DATA\r\n")
    assert d.conn.in_data and d.conn.state is State.DATA
    d.feed(b"hi\r\n.\r\n")
    assert not d.conn.in_transaction and d.conn.state is State.READY


def test_enhanced_status_codes_can_be_disabled() -> None:
    d = Dialogue(ProtocolConfig(enhanced_status_codes=False))
    wire = d.feed(EHLO + b"MAIL FROM:<a@b>\r\nFOO\r\n")
    assert codes(wire) == ["250", "250", "500"]
    assert b"5.5.1" not in wire and b"2.1.0" not in wire
    assert b"ENHANCEDSTATUSCODES" not in wire


def test_enhanced_codes_on_every_line_of_multiline_reply() -> None:
    d = Dialogue()
    wire = d.feed(b"HELP\r\n")
    lines = wire.split(b"\r\n")[:-1]
    assert len(lines) == 3
    assert all(line[4:10] == b"2.0.0 " for line in lines)
