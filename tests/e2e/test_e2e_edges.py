"""Hand-made messages for the traps the corpus lacks or has only once, end to end.

Entry points: ``test_edge_*``. The corpus has no dot-only line and no bare CR, and no line
at exactly 998/999 octets; these cases cover them through the same smtplib -> smtpgate ->
aiosmtpd path, plus the aiosmtpd line-limit quirk. RFC 5321 §4.5.2, §4.5.3.1.6.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from smtpgate.app import Smtpgate

from .e2e_support import (
    MAX_TEXT,
    CaptureUpstream,
    RawClient,
    assert_one_received_then,
    capture_upstream,
    client_wire_message,
    mail_options_for,
    running_gate,
    smtplib_send,
)


@pytest.fixture(scope="module")
def gate(upstream: CaptureUpstream) -> Iterator[Smtpgate]:
    """smtpgate with default limits relaying to the capture."""
    with running_gate(relay_url=upstream.url) as app:
        yield app


def _line(n: int, first: bytes = b"x") -> bytes:
    return first + b"y" * (n - len(first))


ACCEPTED = {
    "dot-only-line": b"Subject: dots\r\n\r\nbefore\r\n.\r\nafter\r\n",
    "dot-lines-LF": b"Subject: dots\n\n.\n..\n...\n. \n.x\n",
    "starts-with-dot": b".no header, starts with a dot\r\nmore\r\n",
    "only-a-dot": b".",
    "last-line-dot-no-newline": b"Subject: dots\r\n\r\nx\r\n.",
    "empty-message": b"",
    "no-final-newline": b"Subject: x\r\n\r\nno newline at end",
    "NUL-bytes": b"Subject: nul\x00here\r\n\r\nbody\x00\x00with NULs\r\n\x00\r\n",
    "bare-CR": b"Subject: cr\r\rbody\rline two\r\n",
    "8bit-header-smtputf8": "Subject: Grüße\r\nFrom: <jörg@example.org>\r\n\r\nü\r\n".encode(),
    "line-998": b"Subject: x\r\n\r\n" + _line(MAX_TEXT) + b"\r\n",
    "dot-line-998": b"Subject: x\r\n\r\n" + _line(MAX_TEXT, b".") + b"\r\n",
    "header-line-998": b"X-Long: " + _line(MAX_TEXT - 8) + b"\r\n\r\nbody\r\n",
}
REFUSED_LONG = {
    "line-999": b"Subject: x\r\n\r\n" + _line(MAX_TEXT + 1) + b"\r\n",
    "dot-line-999": b"Subject: x\r\n\r\n" + _line(MAX_TEXT + 1, b".") + b"\r\n",
    "last-line-999-no-newline": b"Subject: x\r\n\r\n" + _line(MAX_TEXT + 1),
}


@pytest.mark.parametrize("raw", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_edge_accepted(raw: bytes, gate: Smtpgate, upstream: CaptureUpstream) -> None:
    """Delivered byte-identical to what smtplib sent (after dot-unstuffing)."""
    msg = client_wire_message(raw)
    opts = mail_options_for(msg)
    upstream.handler.take()
    assert smtplib_send(gate.port, msg, opts) == (250, b"")
    got = upstream.handler.take()
    assert len(got) == 1
    assert_one_received_then(got[0].content, msg)


@pytest.mark.parametrize("raw", list(REFUSED_LONG.values()), ids=list(REFUSED_LONG))
def test_edge_line_over_1000_octets(raw: bytes, gate: Smtpgate, upstream: CaptureUpstream) -> None:
    """999 octets + CRLF is over the limit: 500 5.5.2, nothing delivered."""
    upstream.handler.take()
    code, text = smtplib_send(gate.port, client_wire_message(raw), [])
    assert (code, text[:5]) == (500, b"5.5.2"), (code, text)
    assert upstream.handler.take() == []


@pytest.mark.parametrize("policy", ["reject", "normalize"])
def test_edge_raw_bare_cr(policy: str, upstream: CaptureUpstream) -> None:
    """A bare CR sent raw: 550 5.6.11 under reject, rewritten to CRLF under normalize."""
    raw = b"Subject: cr\r\n\r\nbody\rline two\r\n"
    with running_gate(relay_url=upstream.url, bare_line_endings=policy) as app:
        upstream.handler.take()
        with RawClient(app.port) as c:
            c.envelope()
            c.send(raw + b".\r\n")
            code, text = c.reply()
            assert c.cmd("QUIT")[0] == 221
    got = upstream.handler.take()
    if policy == "reject":
        assert (code, text[:6]) == (550, "5.6.11")
        assert got == []
    else:
        assert code == 250, (code, text)
        assert len(got) == 1
        assert_one_received_then(got[0].content, raw.replace(b"\rline", b"\r\nline"))


def test_edge_stock_aiosmtpd_refuses_long_lines() -> None:
    """Documents an aiosmtpd 1.4.6 quirk: its DATA line limit is 1001 octets
    (``SMTP.line_length_limit``), so with ``max_line_length = 0`` a message smtpgate
    accepts is refused upstream; smtpgate passes the 5xx on and nothing is delivered.
    The corpus tests therefore use a capture with the limit raised."""
    raw = b"Subject: long\r\n\r\n" + _line(2000) + b"\r\n"
    with (
        capture_upstream(stock=True) as stock,
        running_gate(relay_url=stock.url, max_line_length=0) as app,
    ):
        code, text = smtplib_send(app.port, raw, [])
        assert code == 500, (code, text)
        assert b"Line too long" in text
        assert stock.handler.take() == []
