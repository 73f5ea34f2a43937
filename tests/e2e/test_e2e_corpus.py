"""Every corpus message through smtpgate (relay mode) to an aiosmtpd capture, sent by smtplib.

Entry points: the ``test_corpus_*`` tests. A message must reach the capture byte-identical
to what the client sent, after exactly one prepended Received header; messages a correct
server refuses get the right reply and deliver nothing. RFC 5321 §4.5.2 (dot-stuffing),
§4.5.3.1.6 (1000-octet lines), RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 6531 (SMTPUTF8).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from smtpgate.app import Smtpgate

from .e2e_support import (
    MAX_TEXT,
    RECIPIENT,
    ROW_IDS,
    ROWS,
    SENDER,
    CaptureUpstream,
    RawClient,
    assert_one_received_then,
    client_wire_message,
    longest_line,
    mail_options_for,
    notes,
    read_message,
    requires_corpus,
    running_gate,
    smtplib_send,
)

pytestmark = requires_corpus

FIVE_MIB = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def gate(upstream: CaptureUpstream) -> Iterator[Smtpgate]:
    """One long-running smtpgate with default limits, relaying to the capture."""
    with running_gate(relay_url=upstream.url) as app:
        yield app


@pytest.fixture(scope="module")
def gate_unlimited(upstream: CaptureUpstream) -> Iterator[Smtpgate]:
    """smtpgate with ``max_line_length = 0`` (no text line limit), relaying to the capture.

    With the smallest ``message_buffer_size`` every message over 1 KiB is handed out by
    the protocol core in pieces, written to a temporary file as it arrives, and sent
    upstream from that file: the streaming path, checked byte for byte on the corpus."""
    with running_gate(relay_url=upstream.url, max_line_length=0,
                      message_buffer_size=1024) as app:
        yield app


def _check_delivered(upstream: CaptureUpstream, msg: bytes, opts: list[str]) -> None:
    got = upstream.handler.take()
    assert len(got) == 1, f"expected one upstream message, got {len(got)}"
    cap = got[0]
    assert cap.mail_from == SENDER
    assert cap.rcpt_tos == [RECIPIENT]
    if "SMTPUTF8" in opts:
        assert "SMTPUTF8" in cap.mail_options
    assert_one_received_then(cap.content, msg)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_corpus_default_limits(
    row: dict[str, str], gate: Smtpgate, upstream: CaptureUpstream
) -> None:
    """Default limits: byte-identical delivery, or 500 5.5.2 for lines over 1000 octets."""
    raw = read_message(row)
    msg = client_wire_message(raw)
    opts = mail_options_for(msg)
    upstream.handler.take()
    code, text = smtplib_send(gate.port, msg, opts)
    if longest_line(msg) > MAX_TEXT:
        # Measured, not taken from the notes column (the notes agree for this corpus).
        assert notes(row) & {"long-line", "very-long-line", "long-header-line"}
        assert (code, text[:5]) == (500, b"5.5.2"), (code, text)
        assert upstream.handler.take() == []
        return
    assert (code, text) == (250, b""), (code, text)
    _check_delivered(upstream, msg, opts)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_corpus_no_line_limit(
    row: dict[str, str], gate_unlimited: Smtpgate, upstream: CaptureUpstream
) -> None:
    """``max_line_length = 0``: every message, long lines too, arrives byte-identical."""
    msg = client_wire_message(read_message(row))
    opts = mail_options_for(msg)
    upstream.handler.take()
    code, text = smtplib_send(gate_unlimited.port, msg, opts)
    assert (code, text) == (250, b""), (code, text)
    _check_delivered(upstream, msg, opts)


def test_corpus_has_the_traps_it_claims() -> None:
    """The features this suite relies on are present (a shrunken corpus must not pass silently)."""
    msgs = {r["file"]: client_wire_message(read_message(r)) for r in ROWS}
    assert sum(longest_line(m) > MAX_TEXT for m in msgs.values()) >= 3
    assert sum("SMTPUTF8" in mail_options_for(m) for m in msgs.values()) >= 10
    assert any(b"\x00" in m for m in msgs.values())
    assert sum(b"\r\n." in m for m in msgs.values()) >= 10
    assert any(len(m) > FIVE_MIB for m in msgs.values())


# ------------------------------------------------------------------------- size limit


@pytest.fixture(scope="module")
def gate_5mib(upstream: CaptureUpstream) -> Iterator[Smtpgate]:
    """smtpgate with ``max_message_size = 5 MiB``."""
    with running_gate(relay_url=upstream.url, max_message_size=FIVE_MIB) as app:
        yield app


SIZE_ROWS = [r for r in ROWS if notes(r) & {"large", "huge"}]


@pytest.mark.parametrize("row", SIZE_ROWS, ids=[r["file"] for r in SIZE_ROWS])
def test_corpus_size_limit_smtplib(
    row: dict[str, str], gate_5mib: Smtpgate, upstream: CaptureUpstream
) -> None:
    """smtplib sends SIZE=: over 5 MiB is refused at MAIL with 552 5.3.4, smaller arrives."""
    msg = client_wire_message(read_message(row))
    opts = mail_options_for(msg)
    upstream.handler.take()
    code, text = smtplib_send(gate_5mib.port, msg, opts)
    if len(msg) > FIVE_MIB:
        assert (code, text[:5]) == (552, b"5.3.4"), (code, text)
        assert upstream.handler.take() == []
    else:
        assert (code, text) == (250, b""), (code, text)
        _check_delivered(upstream, msg, opts)


HUGE_ROWS = [r for r in ROWS if "huge" in notes(r)]


@pytest.mark.parametrize("row", HUGE_ROWS, ids=[r["file"] for r in HUGE_ROWS])
def test_corpus_size_limit_at_end_of_data(
    row: dict[str, str], gate_5mib: Smtpgate, upstream: CaptureUpstream
) -> None:
    """No SIZE= parameter: the whole text is read, then 552 5.3.4; nothing delivered;
    the session stays usable for the next transaction."""
    msg = client_wire_message(read_message(row))
    assert len(msg) > FIVE_MIB
    upstream.handler.take()
    stuffed = msg.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    with RawClient(gate_5mib.port) as c:
        c.envelope()
        c.send(stuffed + b".\r\n")
        code, text = c.reply()
        assert (code, text[:5]) == (552, "5.3.4"), (code, text)
        assert upstream.handler.take() == []
        small = b"Subject: after the big one\r\n\r\nsmall\r\n"
        c.envelope()
        c.send(small + b".\r\n")
        code, text = c.reply()
        assert code == 250, (code, text)
        assert c.cmd("QUIT")[0] == 221
    _check_delivered(upstream, small, [])


@pytest.mark.parametrize("extra", [0, 1], ids=["exactly-5MiB", "5MiB-plus-1"])
def test_size_limit_boundary(extra: int, gate_5mib: Smtpgate, upstream: CaptureUpstream) -> None:
    """A message of exactly max_message_size octets (as sent, without the Received header
    smtpgate adds) is accepted; one octet more is refused with 552 5.3.4."""
    head = b"Subject: boundary\r\n\r\n"
    line = b"y" * 998 + b"\r\n"
    body = line * ((FIVE_MIB - len(head)) // len(line))
    pad = FIVE_MIB - len(head) - len(body) + extra
    msg = head + body + b"z" * (pad - 2) + b"\r\n"
    assert len(msg) == FIVE_MIB + extra
    upstream.handler.take()
    code, text = smtplib_send(gate_5mib.port, msg, [])
    if extra:
        assert (code, text[:5]) == (552, b"5.3.4"), (code, text)
        assert upstream.handler.take() == []
    else:
        assert (code, text) == (250, b""), (code, text)
        _check_delivered(upstream, msg, [])
