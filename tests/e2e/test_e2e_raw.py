"""The corpus sent RAW, with its original bare-LF line endings, over a socket.

Entry points: ``test_raw_*``. Only CRLF ends a line on the wire, so only ``CRLF.`` is
dot-stuffed and the message ends with ``CRLF.CRLF``. Under ``bare_line_endings =
"reject"`` a message with a bare LF/CR is refused with 550 5.6.11; under ``"normalize"``
it arrives as one message rewritten to CRLF. RFC 5321 §2.3.8, §4.1.1.4, §4.5.2.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from smtpgate.app import Smtpgate

from .e2e_support import (
    MAX_TEXT,
    ROW_IDS,
    ROWS,
    CaptureUpstream,
    RawClient,
    assert_one_received_then,
    longest_line,
    mail_options_for,
    read_message,
    requires_corpus,
    running_gate,
)

pytestmark = requires_corpus

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_ANY_EOL = re.compile(rb"\r\n|\r|\n")


def raw_wire(raw: bytes) -> tuple[bytes, bytes]:
    """(message as the server must see it, bytes to write after DATA's 354).

    The file's bytes go out unchanged except that ``.`` at the start of a CRLF-line is
    doubled, and ``CRLF.CRLF`` is appended (only ``.CRLF`` when the file already ends
    in CRLF). The message is the file plus that CRLF.
    """
    message = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return message, stuffed + b".\r\n"


def has_bare(message: bytes) -> bool:
    """True when the message has an LF or CR that is not part of a CRLF pair."""
    return _BARE.search(message) is not None


def send_raw(port: int, wire: bytes, opts: list[str]) -> tuple[int, str]:
    """One transaction with ``wire`` written in one go after 354; returns the final reply."""
    with RawClient(port) as c:
        c.envelope(opts="".join(" " + o for o in opts))
        c.send(wire)
        reply = c.reply()
        # The next reply must be QUIT's: one message, one reply.
        assert c.cmd("QUIT")[0] == 221
    return reply


@pytest.fixture(scope="module")
def gate_reject(upstream: CaptureUpstream) -> Iterator[Smtpgate]:
    """smtpgate with the default ``bare_line_endings = "reject"``."""
    with running_gate(relay_url=upstream.url) as app:
        yield app


@pytest.fixture(scope="module")
def gate_normalize(upstream: CaptureUpstream) -> Iterator[Smtpgate]:
    """smtpgate with ``bare_line_endings = "normalize"``."""
    with running_gate(relay_url=upstream.url, bare_line_endings="normalize") as app:
        yield app


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_raw_reject_policy(
    row: dict[str, str], gate_reject: Smtpgate, upstream: CaptureUpstream
) -> None:
    """Default policy: bare LF/CR -> 550 5.6.11, nothing delivered; pure CRLF files arrive."""
    message, wire = raw_wire(read_message(row))
    normalized = _ANY_EOL.sub(b"\r\n", message)
    upstream.handler.take()
    code, text = send_raw(gate_reject.port, wire, mail_options_for(normalized))
    got = upstream.handler.take()
    too_long = longest_line(normalized) > MAX_TEXT
    if has_bare(message):
        assert row["line_endings"] != "CRLF"
        if too_long:
            # Both reasons apply; either refusal is correct.
            assert (code, text[:6]) in ((550, "5.6.11"), (500, "5.5.2 ")), (code, text)
        else:
            assert (code, text[:6]) == (550, "5.6.11"), (code, text)
        assert got == []
    elif too_long:
        assert (code, text[:5]) == (500, "5.5.2"), (code, text)
        assert got == []
    else:
        assert code == 250, (code, text)
        assert len(got) == 1
        assert_one_received_then(got[0].content, message)


@pytest.mark.parametrize("row", ROWS, ids=ROW_IDS)
def test_raw_normalize_policy(
    row: dict[str, str], gate_normalize: Smtpgate, upstream: CaptureUpstream
) -> None:
    """``normalize``: one message per file, every bare LF/CR rewritten to CRLF; a line
    over 1000 octets (counted after normalising) still gets 500 5.5.2."""
    message, wire = raw_wire(read_message(row))
    normalized = _ANY_EOL.sub(b"\r\n", message)
    upstream.handler.take()
    code, text = send_raw(gate_normalize.port, wire, mail_options_for(normalized))
    got = upstream.handler.take()
    if longest_line(normalized) > MAX_TEXT:
        assert (code, text[:5]) == (500, "5.5.2"), (code, text)
        assert got == []
        return
    assert code == 250, (code, text)
    assert len(got) == 1, f"one file became {len(got)} upstream messages"
    assert_one_received_then(got[0].content, normalized)
