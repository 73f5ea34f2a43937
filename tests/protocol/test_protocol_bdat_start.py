"""The first BDAT of a transaction as a :class:`BdatStart` event (``data_start_events``):
the driver's decision applies to CHUNKING as to DATA; a refusal is sent after the chunk
was read (RFC 3030 §2) and later chunks get 503 until RSET. Bytes in, replies out."""

from __future__ import annotations

import pytest

from smtpgate.protocol import BdatStart, DataComplete, ProtocolConfig
from smtpgate.reply import Reply

from .helpers import TX, Dialogue

EVENTS = ProtocolConfig(chunking=True, data_start_events=True)
REFUSED = Reply(554, "5.7.1", "Transaction rejected")


def go(conn: object, ev: object) -> Reply:
    return Reply(354, None, "Go ahead")


def refuse(conn: object, ev: object) -> Reply:
    return REFUSED


@pytest.mark.parametrize("chunks", [None, 1, 7])
def test_go_ahead_reads_the_chunks(chunks: int | None) -> None:
    d = Dialogue(EVENTS, overrides={BdatStart: go})
    wire = TX + b"BDAT 5\r\nhello" + b"BDAT 6 LAST\r\n world"
    assert [c[:3] for c in d.codes(wire, chunks)] == ["250", "250", "250", "250", "250"]
    starts = d.of_type(BdatStart)
    assert starts == [BdatStart(5, False)]  # only the first chunk of the transaction
    assert d.of_type(DataComplete)[0].data == b"hello world"


@pytest.mark.parametrize("chunks", [None, 1, 3])
def test_refusal_after_the_chunk_then_503_until_rset(chunks: int | None) -> None:
    d = Dialogue(EVENTS, overrides={BdatStart: refuse})
    wire = (TX + b"BDAT 5\r\nhello" + b"BDAT 3 LAST\r\nabc" + b"RSET\r\n"
            + b"MAIL FROM:<a@example.org>\r\n")
    replies = [c[:3] for c in d.codes(wire, chunks)]
    # EHLO, MAIL, RCPT, the refused chunk (its bytes consumed, not taken as commands),
    # 503 for the next chunk, RSET, MAIL
    assert replies == ["250", "250", "250", "554", "503", "250", "250"]
    assert d.of_type(DataComplete) == []
    assert b"554 5.7.1 Transaction rejected" in bytes(d.wire)


def test_without_the_flag_no_event() -> None:
    d = Dialogue(ProtocolConfig(chunking=True))
    assert [c[:3] for c in d.codes(TX + b"BDAT 3 LAST\r\nabc")] == ["250", "250", "250", "250"]
    assert d.of_type(BdatStart) == []
