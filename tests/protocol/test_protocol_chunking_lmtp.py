"""BDAT/CHUNKING/BINARYMIME (RFC 3030), LMTP (RFC 2033), DELIVERBY (RFC 2852), EXPN, NoEHLO."""

from __future__ import annotations

import pytest

from smtpgate.errors import LocalProtocolError
from smtpgate.protocol import (
    NEED_DATA,
    AutoReply,
    DataComplete,
    Expn,
    Helo,
    ProtocolConfig,
    ServerConnection,
)
from smtpgate.reply import Reply

from .helpers import Dialogue, codes

CHUNKING = ProtocolConfig(hostname="mx", chunking=True, binarymime=True)
EHLO = b"EHLO c\r\n"
TX = EHLO + b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"


def test_ehlo_advertises_chunking_binarymime_deliverby() -> None:
    d = Dialogue(ProtocolConfig(hostname="mx", chunking=True, binarymime=True, deliverby=True))
    wire = d.feed(EHLO)
    assert b"250-CHUNKING\r\n" in wire and b"250-BINARYMIME\r\n" in wire
    assert b"250-DELIVERBY\r\n" in wire


def test_bdat_chunks_byte_exact() -> None:
    body1 = b"Subject: x\r\n\r\n.leading dot stays\r\n"
    body2 = b"\x00binary\xff\nbare LF\r\n.\r\n"
    d = Dialogue(CHUNKING)
    wire = d.feed(TX + b"BDAT %d\r\n" % len(body1) + body1 + b"BDAT %d LAST\r\n" % len(body2)
                  + body2 + b"QUIT\r\n")
    assert codes(wire) == ["250", "250 2.1.0", "250 2.1.5", "250 2.0.0", "550 5.6.11",
                                "221 2.0.0"]
    # the same in BINARYMIME: taken byte-exact
    d = Dialogue(CHUNKING)
    d.feed(EHLO + b"MAIL FROM:<a@b.c> BODY=BINARYMIME\r\nRCPT TO:<d@e.f>\r\n")
    d.feed(b"BDAT %d\r\n" % len(body1) + body1 + b"BDAT %d LAST\r\n" % len(body2) + body2)
    msgs = d.of_type(DataComplete)
    assert len(msgs) == 1 and msgs[0].problem is None and msgs[0].data == body1 + body2


@pytest.mark.parametrize("chunks", [None, 1, 3, 7])
def test_bdat_zero_last_and_split_feeding(chunks: int | None) -> None:
    d = Dialogue(CHUNKING)
    wire = d.feed(TX + b"BDAT 5\r\nhello" + b"BDAT 0 LAST\r\nNOOP\r\n", chunks=chunks)
    assert codes(wire)[-3:] == ["250 2.0.0", "250 2.0.0", "250 2.0.0"]
    assert [m.data for m in d.of_type(DataComplete)] == [b"hello"]


def test_bdat_size_limit_across_chunks_and_consumed() -> None:
    d = Dialogue(ProtocolConfig(hostname="mx", chunking=True, max_message_size=10))
    wire = d.feed(TX + b"BDAT 6\r\n123456BDAT 6\r\n789012BDAT 1 LAST\r\nXRSET\r\nNOOP\r\n")
    assert codes(wire)[3:] == ["250 2.0.0", "552 5.3.4", "503 5.5.1", "250 2.0.0",
                                    "250 2.0.0"]
    assert d.of_type(DataComplete) == []


def test_data_after_bdat_and_binarymime_with_data() -> None:
    d = Dialogue(CHUNKING)
    assert codes(d.feed(TX + b"BDAT 2\r\nabDATA\r\n"))[-1] == "503 5.5.1"
    d = Dialogue(CHUNKING)
    wire = d.feed(EHLO + b"MAIL FROM:<a@b.c> BODY=BINARYMIME\r\nRCPT TO:<d@e.f>\r\nDATA\r\n")
    assert codes(wire)[-1] == "503 5.5.1"


def test_binarymime_refused_without_chunking() -> None:
    d = Dialogue(ProtocolConfig(hostname="mx"))
    assert codes(d.feed(EHLO + b"MAIL FROM:<a@b.c> BODY=BINARYMIME\r\n"))[-1] == "555 5.5.4"


def test_bdat_before_rcpt_consumes_chunk() -> None:
    d = Dialogue(CHUNKING)
    wire = d.feed(EHLO + b"MAIL FROM:<a@b.c>\r\nBDAT 4 LAST\r\nQUITNOOP\r\n")
    assert codes(wire)[-2:] == ["503 5.5.1", "250 2.0.0"]


def test_deliverby_param() -> None:
    d = Dialogue(ProtocolConfig(hostname="mx", deliverby=True))
    wire = d.feed(EHLO + b"MAIL FROM:<a@b.c> BY=120;R\r\nRSET\r\nMAIL FROM:<a@b.c> BY=x\r\n")
    assert codes(wire)[1:] == ["250 2.1.0", "250 2.0.0", "501 5.5.4"]


def test_lmtp_lhlo_and_per_recipient_replies() -> None:
    conn = ServerConnection(ProtocolConfig(hostname="mx", lmtp=True))
    conn.send(Reply(220, None, "mx LMTP"))
    conn.receive_data(b"EHLO c\r\nLHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\n"
                      b"RCPT TO:<bad@y.z>\r\nRCPT TO:<w@y.z>\r\nDATA\r\nhi\r\n.\r\n")
    out = b""
    ev = conn.next_event()
    assert isinstance(ev, AutoReply) and ev.reply.code == 500
    out += conn.send(ev.reply)
    ev = conn.next_event()
    assert isinstance(ev, Helo)
    out += conn.send(conn.helo_reply(ev))
    for reply in (Reply(250, "2.1.0", "ok"), Reply(250, "2.1.5", "ok"),
                  Reply(550, "5.1.1", "no"), Reply(250, "2.1.5", "ok"), Reply(354, None, "go")):
        conn.next_event()
        out += conn.send(reply)
    ev = conn.next_event()
    assert isinstance(ev, DataComplete) and ev.data == b"hi\r\n"
    assert conn.lmtp_reply_count == 2
    with pytest.raises(LocalProtocolError):
        conn.send_lmtp([Reply(250, "2.0.0", "one")])
    out = conn.send_lmtp([Reply(250, "2.0.0", "x ok"), Reply(452, "4.2.2", "w full")])
    assert out == b"250 2.0.0 x ok\r\n452 4.2.2 w full\r\n"
    assert conn.next_event() is NEED_DATA


def test_lhlo_unknown_in_smtp_and_noehlo() -> None:
    d = Dialogue(ProtocolConfig(hostname="mx"))
    assert codes(d.feed(b"LHLO c\r\n")) == ["500 5.5.1"]
    d = Dialogue(ProtocolConfig(hostname="mx", ehlo=False))
    assert codes(d.feed(b"EHLO c\r\nHELO c\r\n")) == ["500 5.5.1", "250"]


def test_expn_switch() -> None:
    d = Dialogue(ProtocolConfig(hostname="mx"))
    assert codes(d.feed(b"EXPN staff\r\n")) == ["502 5.5.1"]
    conn = ServerConnection(ProtocolConfig(hostname="mx", expn=True))
    conn.send(Reply(220, None, "mx"))
    conn.receive_data(b"EXPN staff\r\n")
    assert conn.next_event() == Expn("staff")
