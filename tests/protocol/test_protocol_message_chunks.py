"""Long messages are handed out in pieces (``MessageChunk``) while they are read.

Whatever the piece size and however the client's bytes were cut, the pieces joined with the
final ``DataComplete`` give exactly the text a whole read gives, with the same verdict
(552 5.3.4 too big, 550 5.6.11 bare CR/LF, 500 5.5.2 line too long), and the core's
buffers stay bounded by about one piece.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpgate.protocol import DataComplete, MessageChunk, ProtocolConfig

from .helpers import TX, Dialogue, codes, internal_buffer_size

WHOLE = 1 << 30  # a piece size no test message reaches: the message comes whole


def _config(chunk: int, **kw: object) -> ProtocolConfig:
    return ProtocolConfig(hostname="mx", chunking=True, binarymime=True,
                          message_chunk_size=chunk, **kw)  # type: ignore[arg-type]


def _kept(messages: list[tuple[bytes, object]]) -> list[tuple[bytes, object]]:
    """What a driver keeps: nothing of a refused message (its pieces are discarded)."""
    return [(text if problem is None else b"", problem) for text, problem in messages]


def _stuff(text: bytes) -> bytes:
    body = text.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body


def _run_data(text: bytes, chunk: int, cuts: list[int], **kw: object
              ) -> tuple[list[tuple[bytes, object]], list[str], Dialogue]:
    d = Dialogue(_config(chunk, **kw))
    d.feed(TX + b"DATA\r\n")
    wire = _stuff(text)
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    out = d.feed(wire + b".\r\nQUIT\r\n", cuts)
    return d.messages(), codes(out), d


def _run_bdat(text: bytes, chunk: int, sizes: list[int], binary: bool = False, **kw: object
              ) -> tuple[list[tuple[bytes, object]], list[str], Dialogue]:
    d = Dialogue(_config(chunk, **kw))
    mail = b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n" if binary else \
        b"MAIL FROM:<a@example.org>\r\n"
    d.feed(b"EHLO client.example\r\n" + mail + b"RCPT TO:<b@example.net>\r\n")
    wire = bytearray()
    pos = 0
    bounds = [s for s in sizes if s > 0] or [len(text)]
    while pos < len(text) or not wire:
        size = min(bounds[len(wire) % len(bounds)], len(text) - pos)
        last = pos + size >= len(text)
        wire += b"BDAT %d%s\r\n" % (size, b" LAST" if last else b"") + text[pos : pos + size]
        pos += size
        if last:
            break
    out = d.feed(bytes(wire) + b"QUIT\r\n", 997)
    return d.messages(), codes(out), d


lines = st.lists(
    st.one_of(
        st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        st.sampled_from([b".", b"..", b".x", b"", b"\r", b"\n", b"a\rb", b"x" * 120]),
    ),
    max_size=40,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(lines=lines, chunk=st.integers(16, 200), cuts=st.lists(st.integers(0, 5000), max_size=8),
       normalize=st.booleans(), max_size=st.sampled_from([60, 500, 10_000]),
       max_line=st.sampled_from([0, 64, 1000]))
def test_data_pieces_equal_whole_read(lines: list[bytes], chunk: int, cuts: list[int],
                                      normalize: bool, max_size: int, max_line: int) -> None:
    text = b"\r\n".join(lines) + b"\r\n"
    kw = {"normalize_bare_line_endings": normalize, "max_message_size": max_size,
          "max_line_length": max_line}
    whole, whole_codes, _ = _run_data(text, WHOLE, [], **kw)
    pieces, piece_codes, d = _run_data(text, chunk, cuts, **kw)
    assert _kept(pieces) == _kept(whole)
    assert piece_codes == whole_codes
    assert len(d.of_type(DataComplete)) == 1


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(text=st.binary(max_size=3000), chunk=st.integers(16, 300),
       sizes=st.lists(st.integers(1, 700), min_size=1, max_size=5), binary=st.booleans(),
       normalize=st.booleans(), max_line=st.sampled_from([0, 80, 1000]))
def test_bdat_pieces_equal_whole_read(text: bytes, chunk: int, sizes: list[int], binary: bool,
                                      normalize: bool, max_line: int) -> None:
    kw = {"normalize_bare_line_endings": normalize, "max_line_length": max_line}
    whole, whole_codes, _ = _run_bdat(text, WHOLE, sizes, binary, **kw)
    pieces, piece_codes, _ = _run_bdat(text, chunk, sizes, binary, **kw)
    assert _kept(pieces) == _kept(whole)
    assert piece_codes == whole_codes


def test_long_message_comes_in_pieces_with_bounded_buffers() -> None:
    line = b"0123456789" * 7 + b"\r\n"  # 72 octets
    text = line * 40_000  # 2.9 MB
    d = Dialogue(_config(64 * 1024, max_message_size=10 * 1024 * 1024))
    d.feed(TX + b"DATA\r\n")
    peak = 0
    for i in range(0, len(text), 32 * 1024):
        d.feed(text[i : i + 32 * 1024])
        peak = max(peak, internal_buffer_size(d.conn))
    out = d.feed(b".\r\n")
    assert codes(out) == ["250 2.0.0"]
    chunks = d.of_type(MessageChunk)
    assert len(chunks) > 10
    assert all(c.data.endswith(b"\r\n") for c in chunks)  # cut after a CRLF
    assert d.messages() == [(text, None)]
    assert peak < 3 * 64 * 1024


def test_long_line_without_crlf_is_cut_inside_the_line() -> None:
    text = b"x" * 5000 + b"\r\n.\r\n..y\r\n"
    d = Dialogue(_config(256, max_line_length=0))
    d.feed(TX + b"DATA\r\n")
    d.feed(_stuff(text) + b".\r\n", 100)
    assert d.messages() == [(text, None)]
    assert len(d.of_type(MessageChunk)) > 5


@pytest.mark.parametrize("kind", ["bare_lf", "long_line", "too_big"])
def test_refused_long_message_ends_with_the_verdict_and_no_more_pieces(kind: str) -> None:
    line = b"y" * 70 + b"\r\n"
    bad = {"bare_lf": b"oops\n", "long_line": b"z" * 2000 + b"\r\n", "too_big": b""}[kind]
    text = line * 2000 + bad + line * 2000
    limit = 400_000 if kind != "too_big" else 150_000
    d = Dialogue(_config(4096, max_message_size=limit))
    d.feed(TX + b"DATA\r\n")
    out = d.feed(text + b".\r\n", 3000)
    expected = {"bare_lf": "550 5.6.11", "long_line": "500 5.5.2", "too_big": "552 5.3.4"}[kind]
    assert codes(out) == [expected]
    [(_, problem)] = d.messages()
    assert problem is not None
    handed = sum(len(c.data) for c in d.of_type(MessageChunk))
    fault = limit if kind == "too_big" else 2000 * len(line)
    assert handed <= fault + 4096  # nothing after the fault is handed out


def test_too_big_wins_over_bare_lf_in_pieces() -> None:
    text = b"bare\nline\r\n" + b"x" * 70 + b"\r\n" * 3000
    whole, whole_codes, _ = _run_data(text, WHOLE, [], max_message_size=5000)
    pieces, piece_codes, _ = _run_data(text, 64, [7, 300], max_message_size=5000)
    assert whole_codes == piece_codes == ["552 5.3.4", "221 2.0.0"]
    assert _kept(whole) == _kept(pieces)


@pytest.mark.parametrize("bdat", [False, True])
def test_buffered_counts_message_text_for_flow_control(bdat: bool) -> None:
    """A driver pauses reading above a bound of ``buffered()``: message text waiting to be
    handed out counts, so a fast client cannot fill memory during DATA or BDAT."""
    d = Dialogue(_config(64 * 1024, max_message_size=50 * 1024 * 1024))
    d.feed(TX + (b"" if bdat else b"DATA\r\n"))
    text = b"x" * 70 + b"\r\n"
    wire = text * 30_000  # 2.1 MB
    if bdat:
        wire = b"BDAT %d LAST\r\n" % len(wire) + wire
        d.conn.receive_data(wire[:20])  # the command line
        d.drain()
        wire = wire[20:]
    d.conn.receive_data(wire)
    assert d.conn.buffered >= len(wire) - 100
    d.drain()  # pieces handed out: the backlog is gone
    assert d.conn.buffered < 64 * 1024 + 100
