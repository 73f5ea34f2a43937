"""The DATA phase: dot-unstuffing and the end of data (RFC 5321 §4.1.1.4, §4.5.2),
SIZE while reading (RFC 1870), and SMTP smuggling (CVE-2023-51764 family)."""

from __future__ import annotations

import pytest

from smtpgate.protocol import (
    Data,
    DataComplete,
    MailFrom,
    ProtocolConfig,
    RcptTo,
    State,
)
from smtpgate.reply import R, Reply

from .helpers import TX, Dialogue, internal_buffer_size

OPEN = TX + b"DATA\r\n"


def deliver(
    wire: bytes, cfg: ProtocolConfig | None = None, chunks: int | None = None
) -> tuple[Dialogue, list[str]]:
    d = Dialogue(cfg or ProtocolConfig())
    out = d.codes(OPEN + wire, chunks=chunks)
    return d, out


def completes(d: Dialogue) -> list[DataComplete]:
    return [e for e in d.events if isinstance(e, DataComplete)]


@pytest.mark.parametrize(
    ("wire", "data"),
    [
        (b"hello\r\n.\r\n", b"hello\r\n"),
        (b".\r\n", b""),  # empty message
        (b"..x\r\n.\r\n", b".x\r\n"),  # dot-unstuffing
        (b"..\r\n.\r\n", b".\r\n"),  # a line "." sent as ".."
        (b"...\r\n.\r\n", b"..\r\n"),
        (b".first\r\nsecond\r\n.\r\n", b"first\r\nsecond\r\n"),  # first line starts with dot
        (b"..first\r\n.\r\n", b".first\r\n"),
        (b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a. b\r\n x.\r\n.\r\n", b"a. b\r\n x.\r\n"),  # dots not at line start untouched
        (b"\r\n\r\n.\r\n", b"\r\n\r\n"),
        (b"a\r\n.\r\n", b"a\r\n"),
        (b"\x00\xff\x80 8bit\r\n.\r\n", b"\x00\xff\x80 8bit\r\n"),
    ],
)
def test_message_data(wire: bytes, data: bytes) -> None:
    for chunks in (None, 1, 3):
        d, out = deliver(wire, chunks=chunks)
        assert out[-2:] == ["354", "250 2.0.0"]
        assert completes(d) == [DataComplete(data)]
        assert d.conn.state is State.READY


TAIL = b"body\r\n.\r\nNOOP\r\n"


@pytest.mark.parametrize("offset", range(1, len(TAIL)))
def test_terminator_split_at_every_offset(offset: int) -> None:
    d = Dialogue()
    d.feed(OPEN + b"line\r\n")
    d.feed(TAIL[:offset])
    # The end of data is reached only once its last byte (TAIL[8]) has arrived.
    assert len(completes(d)) == (1 if offset >= 9 else 0)
    d.feed(TAIL[offset:])
    assert completes(d) == [DataComplete(b"line\r\nbody\r\n")]
    assert d.wire.endswith(b"250 2.0.0 OK\r\n")


@pytest.mark.parametrize("offset", range(0, 6))
def test_terminator_split_right_after_354(offset: int) -> None:
    """The CRLF of "DATA" is the start of the end-of-data sequence for an empty message."""
    d = Dialogue()
    d.feed(OPEN)
    rest = b".\r\nQUIT\r\n"
    d.feed(rest[:offset])
    d.feed(rest[offset:])
    assert completes(d) == [DataComplete(b"")]
    assert d.conn.closed


def test_data_pipelined_with_354_in_same_packet() -> None:
    """Message text that arrives in the same packet as DATA (before 354 is sent)."""
    d = Dialogue()
    out = d.codes(OPEN + b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
    assert out[-3:] == ["354", "250 2.0.0", "221 2.0.0"]
    assert completes(d) == [DataComplete(b"Subject: x\r\n\r\nhi\r\n")]


def test_commands_after_final_dot_are_processed() -> None:
    d, out = deliver(
        b"one\r\n.\r\nMAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\ntwo\r\n.\r\nQUIT\r\n"
    )
    assert out[3:] == [
        "354",
        "250 2.0.0",
        "250 2.1.0",
        "250 2.1.5",
        "354",
        "250 2.0.0",
        "221 2.0.0",
    ]
    assert completes(d) == [DataComplete(b"one\r\n"), DataComplete(b"two\r\n")]
    assert d.of_type(MailFrom)[-1] == MailFrom("x@y", {})


def test_commands_inside_data_are_data() -> None:
    d, out = deliver(b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nQUIT\r\n.\r\n")
    assert out[-1] == "250 2.0.0"
    assert len(d.of_type(MailFrom)) == 1 and len(d.of_type(RcptTo)) == 1
    assert not d.conn.closed


def test_negative_reply_to_data_leaves_transaction() -> None:
    d = Dialogue(overrides={Data: lambda c, e: Reply(451, "4.3.0", "later")})
    out = d.codes(OPEN + b"RCPT TO:<c@d>\r\n")
    assert out[-2:] == ["451 4.3.0", "250 2.1.5"]
    assert d.conn.state is State.RCPT


def test_negative_reply_to_data_complete_resets_transaction() -> None:
    d = Dialogue(overrides={DataComplete: lambda c, e: Reply(554, "5.7.1", "spam")})
    out = d.codes(OPEN + b"x\r\n.\r\nRCPT TO:<c@d>\r\n")
    assert out[-2:] == ["554 5.7.1", "503 5.5.1"]
    assert d.conn.state is State.READY


# --------------------------------------------------------------------- SIZE


def test_oversize_message_problem_and_empty_data() -> None:
    cfg = ProtocolConfig(max_message_size=1000)
    for chunks in (None, 64):
        d, out = deliver(b"x" * 998 + b"\r\n" + b"y\r\n.\r\nNOOP\r\n", cfg, chunks=chunks)
        assert out[-2:] == ["552 5.3.4", "250 2.0.0"]
        assert completes(d) == [DataComplete(b"", R.TOO_BIG)]
    # exactly at the limit (after unstuffing) is fine
    d, out = deliver(b"." * 999 + b"\r\n.\r\n", cfg)  # 1001 wire, 998 + CRLF data
    assert completes(d) == [DataComplete(b"." * 998 + b"\r\n")]
    d, out = deliver(b"." * 1000 + b"\r\n.\r\n", cfg)
    assert completes(d) == [DataComplete(b"", R.TOO_BIG)]


def test_memory_stays_bounded_for_10x_oversize() -> None:
    limit = 100_000
    d = Dialogue(ProtocolConfig(max_message_size=limit, max_line_length=0))
    d.feed(OPEN)
    chunk = (b"x" * 98 + b"\r\n") * 40  # 4000 bytes
    peak = 0
    for _ in range(10 * limit // len(chunk)):
        d.feed(chunk)
        peak = max(peak, internal_buffer_size(d.conn))
    assert peak <= limit * 1.2
    d.feed(b".\r\n")
    assert completes(d) == [DataComplete(b"", R.TOO_BIG)]
    assert internal_buffer_size(d.conn) == 0
    assert d.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_oversize_terminator_found_while_discarding_at_every_offset() -> None:
    cfg = ProtocolConfig(max_message_size=100, max_line_length=0)
    body = b"z" * 1000 + b"\r\n.\r\nNOOP\r\n"
    for cut in range(990, len(body)):
        d = Dialogue(cfg)
        d.feed(OPEN)
        d.feed(body[:cut], chunks=50)
        d.feed(body[cut:])
        assert completes(d) == [DataComplete(b"", R.TOO_BIG)], cut
        assert d.wire.endswith(b"250 2.0.0 OK\r\n")


def test_oversize_verdict_does_not_depend_on_chunking() -> None:
    """Regression: with lines "..", the wire is 4/3 of the data.  Fed in small
    pieces, the reader gave up at ~1.125 x the limit (wire) and answered 552;
    fed in one piece, the same message was accepted (data <= limit)."""
    cfg = ProtocolConfig(max_message_size=30_000, max_line_length=0)
    wire = b"..\r\n" * 10_000 + b".\r\n"  # 40000 wire octets, 30000 data octets
    verdicts = set()
    for chunks in (None, 1, 100, 4096):
        d, _ = deliver(wire, cfg, chunks=chunks)
        (done,) = completes(d)
        verdicts.add(done)
    assert verdicts == {DataComplete(b".\r\n" * 10_000)}


# ------------------------------------------------------------------ smuggling

SMUGGLE = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r"]
SMUGGLED_TX = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"


@pytest.mark.parametrize("seq", SMUGGLE, ids=[repr(s) for s in SMUGGLE])
@pytest.mark.parametrize("chunks", [None, 1])
def test_smuggling_rejected_by_default(seq: bytes, chunks: int | None) -> None:
    wire = (
        b"Subject: a\r\n\r\nhello" + seq + SMUGGLED_TX + b"Subject: b\r\n\r\nevil\r\n.\r\nQUIT\r\n"
    )
    d, out = deliver(wire, chunks=chunks)
    assert completes(d) == [DataComplete(b"", R.BARE_LF)]
    assert out[-2:] == ["550 5.6.11", "221 2.0.0"]
    assert len(d.of_type(MailFrom)) == 1  # only the real one
    assert len(d.of_type(Data)) == 1


@pytest.mark.parametrize("seq", SMUGGLE, ids=[repr(s) for s in SMUGGLE])
@pytest.mark.parametrize("chunks", [None, 1])
def test_smuggling_normalized_stays_one_message(seq: bytes, chunks: int | None) -> None:
    cfg = ProtocolConfig(normalize_bare_line_endings=True)
    wire = b"hello" + seq + SMUGGLED_TX + b"evil\r\n.\r\nQUIT\r\n"
    d, out = deliver(wire, cfg, chunks=chunks)
    (done,) = completes(d)
    assert done.problem is None
    assert out[-2:] == ["250 2.0.0", "221 2.0.0"]
    assert b"\n" not in done.data.replace(b"\r\n", b"")
    assert b"\r" not in done.data.replace(b"\r\n", b"")
    assert done.data.endswith(SMUGGLED_TX + b"evil\r\n")
    assert len(d.of_type(MailFrom)) == 1 and len(d.of_type(Data)) == 1


def test_normalized_data_exact() -> None:
    cfg = ProtocolConfig(normalize_bare_line_endings=True)
    d, _ = deliver(b"a\nb\rc\r\n\n.\nd\r\n.\r\n", cfg)
    assert completes(d) == [DataComplete(b"a\r\nb\r\nc\r\n\r\n.\r\nd\r\n")]


def test_normalized_bare_lf_lines_count_as_lines() -> None:
    """Regression: with normalisation on, a message using bare LF line ends was
    measured as one long line and refused with 500 5.5.2."""
    cfg = ProtocolConfig(normalize_bare_line_endings=True)
    d, out = deliver(b"a line of text\n" * 200 + b"\r\n.\r\n", cfg)
    assert out[-1] == "250 2.0.0"
    assert completes(d)[0].data == b"a line of text\r\n" * 200 + b"\r\n"


def test_only_crlf_dot_crlf_ends_data() -> None:
    d, out = deliver(b"a\r\n. \r\n.x\r\n\r\n.\r\r\n.\r\n")
    assert out[-1] == "550 5.6.11"  # the "\r\r\n" is a bare CR; still ONE message
    assert len(completes(d)) == 1
    d, out = deliver(b"a\r\n. \r\n.x\r\n .\r\n.\r\n")
    assert completes(d) == [DataComplete(b"a\r\n \r\nx\r\n .\r\n")]


@pytest.mark.parametrize("chunks", [None, 1, 7, 64])
def test_size_limit_is_exact_for_any_chunking(chunks: int | None) -> None:
    """The streaming give-up point is a lower bound: a message of exactly the limit
    (after unstuffing) passes, one more octet is 552, however the bytes arrive."""
    cfg = ProtocolConfig(max_message_size=1000, max_line_length=0)
    exact = b".x\r\n" * 250  # 1000 octets of data, 1250 on the wire once stuffed
    stuffed = exact.replace(b".x", b"..x")
    d, out = deliver(stuffed + b".\r\n", cfg, chunks=chunks)
    assert completes(d) == [DataComplete(exact)]
    d, out = deliver(stuffed[:-2] + b"y\r\n.\r\n", cfg, chunks=chunks)  # 1001 octets
    assert completes(d) == [DataComplete(b"", R.TOO_BIG)]
