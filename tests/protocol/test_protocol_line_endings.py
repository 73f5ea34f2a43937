"""Command-line framing: only CRLF ends a line (RFC 5321 §2.3.8), and an over-long
line is answered once, then discarded or the session closed (issue 8, findings 3 and 13).

Tables of bytes in → replies out; every row is also fed one byte at a time (the
verdict must not depend on how the client's bytes were chunked).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpgate.protocol import (
    AuthCredentials,
    AutoReply,
    Data,
    DataComplete,
    ProtocolConfig,
    RcptTo,
    State,
)
from smtpgate.protocol.connection import MAX_AUTH_LINE, OVERLONG_LINE_BOUND

from .helpers import EHLO, TX, Dialogue, b64, codes, internal_buffer_size, parse_replies

AUTH_CFG = ProtocolConfig(auth_mechanisms=("PLAIN", "LOGIN"), tls_active=True)
BDAT_CFG = ProtocolConfig(chunking=True)
HUGE_ERRORS = ProtocolConfig(max_errors=1_000_000, max_unknown_commands=1_000_000)

# ------------------------------------------------------------ bare LF / CR

# (config, bytes in, reply codes out). The prefix's replies are included.
BARE_CASES: list[tuple[str, ProtocolConfig, bytes, list[str]]] = [
    ("noop-lf-noop", ProtocolConfig(), b"NOOP\nNOOP\r\n", ["500 5.5.2"]),
    ("noop-cr-noop", ProtocolConfig(), b"NOOP\rNOOP\r\n", ["500 5.5.2"]),
    ("lf-only-line", ProtocolConfig(), b"\n\r\n", ["500 5.5.2"]),
    ("lf-lf-crlf", ProtocolConfig(), b"NOOP\n\n\r\nNOOP\r\n", ["500 5.5.2", "250 2.0.0"]),
    ("cr-before-crlf", ProtocolConfig(), b"NOOP\r\r\nNOOP\r\n", ["500 5.5.2", "250 2.0.0"]),
    ("quit-lf-is-not-quit", ProtocolConfig(), b"QUIT\nNOOP\r\n", ["500 5.5.2"]),
    (
        "rcpt-lf-data",
        ProtocolConfig(),
        TX + b"RCPT TO:<a@b>\nDATA\r\n",
        ["250", "250 2.1.0", "250 2.1.5", "500 5.5.2"],
    ),
    (
        "pipelined-mail-lf-rcpt",
        ProtocolConfig(),
        EHLO + b"MAIL FROM:<a@b>\nRCPT TO:<c@d>\r\nNOOP\r\nMAIL FROM:<a@b>\r\n",
        ["250", "500 5.5.2", "250 2.0.0", "250 2.1.0"],
    ),
    (
        "pipelined-transaction-with-one-bad-line",
        ProtocolConfig(),
        TX + b"RCPT TO:<x@y>\nRCPT TO:<z@y>\r\nDATA\r\nhi\r\n.\r\n",
        ["250", "250 2.1.0", "250 2.1.5", "500 5.5.2", "354", "250 2.0.0"],
    ),
    (
        "ehlo-lf-then-nothing-more",
        ProtocolConfig(),
        b"EHLO x\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\nDATA\n",
        [],  # no CRLF: not a line yet
    ),
    (
        "bdat-command-lf",
        BDAT_CFG,
        TX + b"BDAT 4 LAST\nNOOP\r\nBDAT 4 LAST\r\nabcd",
        ["250", "250 2.1.0", "250 2.1.5", "500 5.5.2", "250 2.0.0"],
    ),
    (
        "auth-initial-response-lf",
        AUTH_CFG,
        EHLO + f"AUTH PLAIN {b64(chr(0) + 'u' + chr(0) + 'secret')}\nNOOP\r\n".encode(),
        ["250", "500 5.5.2"],
    ),
    (
        "sasl-continuation-lf",
        AUTH_CFG,
        EHLO + f"AUTH LOGIN\r\n{b64('u')}\n{b64('secret')}\r\nNOOP\r\n".encode(),
        ["250", "334", "501 5.5.2", "250 2.0.0"],
    ),
    (
        "sasl-continuation-cr",
        AUTH_CFG,
        EHLO + f"AUTH LOGIN\r\n{b64('u')}\r{b64('secret')}\r\nNOOP\r\n".encode(),
        ["250", "334", "501 5.5.2", "250 2.0.0"],
    ),
    # DATA keeps its own rules: bare LF in the text is refused after the end of data.
    (
        "data-rules-unchanged",
        ProtocolConfig(),
        TX + b"DATA\r\na\nb\r\n.\r\nNOOP\r\n",
        ["250", "250 2.1.0", "250 2.1.5", "354", "550 5.6.11", "250 2.0.0"],
    ),
    (
        "data-rules-normalize",
        ProtocolConfig(normalize_bare_line_endings=True),
        TX + b"DATA\r\na\nb\r\n.\r\nNOOP\r\n",
        ["250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "250 2.0.0"],
    ),
]


@pytest.mark.parametrize(
    ("cfg", "wire", "expected"),
    [c[1:] for c in BARE_CASES],
    ids=[c[0] for c in BARE_CASES],
)
@pytest.mark.parametrize("chunks", [None, 1])
def test_only_crlf_ends_a_command_line(
    cfg: ProtocolConfig, wire: bytes, expected: list[str], chunks: int | None
) -> None:
    d = Dialogue(cfg)
    assert d.codes(wire, chunks=chunks) == expected
    assert not d.conn.closed


def test_rcpt_lf_data_does_not_run_data() -> None:
    """``RCPT TO:<a@b><LF>DATA<CRLF>`` is one (refused) command: no RCPT, no DATA."""
    d = Dialogue()
    d.feed(TX + b"RCPT TO:<a@b>\nDATA\r\n")
    assert d.of_type(Data) == []
    assert [e.address for e in d.of_type(RcptTo)] == ["b@example.net"]
    refused = d.events[-1]
    assert isinstance(refused, AutoReply) and "Bare <LF>" in refused.reply.text
    assert refused.command == "RCPT TO:<a@b>\\nDATA"  # escaped for the log
    assert d.conn.state is State.RCPT  # the transaction is untouched
    assert d.codes(b"DATA\r\nx\r\n.\r\n") == ["354", "250 2.0.0"]


def test_bare_lf_in_sasl_response_ends_the_exchange() -> None:
    d = Dialogue(AUTH_CFG)
    d.feed(EHLO + f"AUTH LOGIN\r\n{b64('u')}\n{b64('secret')}\r\n".encode())
    assert d.of_type(AuthCredentials) == []
    assert d.conn.state is State.READY and not d.conn.authenticated


def test_bare_lf_auth_line_is_logged_without_credentials() -> None:
    d = Dialogue(AUTH_CFG)
    d.feed(EHLO + f"AUTH PLAIN {b64(chr(0) + 'u' + chr(0) + 'secret')}\nX\r\n".encode())
    refused = d.events[-1]
    assert isinstance(refused, AutoReply) and refused.command == "AUTH"


COMMANDS = [
    b"EHLO x\r\n",
    b"NOOP\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"RCPT TO:<c@d>\r\n",
    b"RSET\r\n",
    b"HELP\r\n",
    b"VRFY x\r\n",
    b"QUIT\r\n",
    b"FOO\r\n",
    b"AUTH PLAIN\r\n",
    b"AHUAc2VjcmV0\r\n",
]


@settings(
    max_examples=int(os.environ.get("SMTPGATE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    commands=st.lists(st.sampled_from(COMMANDS), min_size=1, max_size=25),
    where=st.integers(min_value=0),
    bare=st.sampled_from([b"\n", b"\r"]),
    chunk=st.sampled_from([None, 1, 3]),
)
def test_inserted_bare_lf_never_yields_more_replies_than_crlfs(
    commands: list[bytes], where: int, bare: bytes, chunk: int | None
) -> None:
    """A bare LF (or CR) inserted anywhere into a pipelined command buffer never
    makes the core answer more than once per CRLF in that buffer."""
    wire = b"".join(commands)
    at = where % (len(wire) + 1)
    wire = wire[:at] + bare + wire[at:]
    d = Dialogue(ProtocolConfig(auth_mechanisms=("PLAIN",), tls_active=True,
                                max_errors=1_000_000, max_unknown_commands=1_000_000))
    d.feed(wire, chunks=chunk)
    assert len(parse_replies(bytes(d.wire))) <= wire.count(b"\r\n")


# -------------------------------------------------------- over-long lines

LIMIT = 512
CLOSE_AT = LIMIT + OVERLONG_LINE_BOUND  # longest line length (with CRLF) not closed on


@pytest.mark.parametrize("chunks", [None, 1000, 7])
def test_overlong_line_answered_before_its_end(chunks: int | None) -> None:
    """The 500 comes as soon as the line is longer than its limit, CRLF or not."""
    d = Dialogue()
    assert d.codes(b"NOOP " + b"x" * 600, chunks=chunks) == ["500 5.5.2"]
    assert d.codes(b"x" * 10_000, chunks=chunks) == []  # discarded, no second reply
    assert d.codes(b"\r\nNOOP\r\n", chunks=chunks) == ["250 2.0.0"]
    assert not d.conn.closed


@pytest.mark.parametrize(
    ("prefix", "partial", "last", "expected"),
    [
        # 510 octets without CRLF: the line may still be 512 long with CRLF: wait.
        (b"", b"NOOP " + b"x" * 505, b"", []),
        # 511 octets, not ending in CR: it will be at least 513 long.
        (b"", b"NOOP " + b"x" * 505, b"x", ["500 5.5.2"]),
        # 511 octets ending in CR: its LF would make exactly 512: wait.
        (b"", b"NOOP " + b"x" * 505, b"\r", []),
        # MAIL: 2048 (RFC 1869 §4.1.2), AUTH: 12288 (RFC 4954 §4).
        (EHLO, b"MAIL FROM:<a@b> " + b" " * 2030, b"", ["250"]),
        (EHLO, b"MAIL FROM:<a@b> " + b" " * 2030, b" ", ["250", "500 5.5.2"]),
        (EHLO, b"AUTH PLAIN " + b"A" * (MAX_AUTH_LINE - 13), b"", ["250"]),
        (EHLO, b"AUTH PLAIN " + b"A" * (MAX_AUTH_LINE - 13), b"A", ["250", "500 5.5.6"]),
        (EHLO, b"auth plain " + b"A" * (MAX_AUTH_LINE - 13), b"A", ["250", "500 5.5.6"]),
    ],
)
def test_overlong_verdict_is_exact(
    prefix: bytes, partial: bytes, last: bytes, expected: list[str]
) -> None:
    cfg = AUTH_CFG if b"AUTH" in partial.upper() else ProtocolConfig()
    d = Dialogue(cfg)
    d.feed(prefix)
    assert codes(bytes(d.wire)) + d.codes(partial + last) == expected


def test_limit_counts_the_crlf_exactly() -> None:
    """Whatever the chunking, 512 octets with CRLF pass and 513 do not."""
    for n, expected in ((512, ["250 2.0.0"]), (513, ["500 5.5.2"])):
        line = b"NOOP " + b"x" * (n - 7) + b"\r\n"
        for chunks in (None, 1, 511, 512):
            d = Dialogue()
            assert d.codes(line, chunks=chunks) == expected, (n, chunks)


@pytest.mark.parametrize("chunks", [None, 65_536, 4096, 7])
def test_line_without_crlf_within_bound_closes(chunks: int | None) -> None:
    """No CRLF within OVERLONG_LINE_BOUND octets past the limit: 421 4.5.0 and close."""
    d = Dialogue()
    data = b"NOOP " + b"x" * (CLOSE_AT - 5 - 1)  # CLOSE_AT - 1 octets: CRLF can no longer fit
    out = d.codes(data, chunks=chunks)
    assert out == ["500 5.5.2", "421 4.5.0"]
    assert d.conn.closed
    close = d.events[-1]
    assert isinstance(close, AutoReply) and close.reply.code == 421
    assert internal_buffer_size(d.conn) == 0


@pytest.mark.parametrize("chunks", [None, 4096, 7])
def test_line_ending_just_within_bound_is_survived(chunks: int | None) -> None:
    d = Dialogue()
    data = b"NOOP " + b"x" * (CLOSE_AT - 5 - 2) + b"\r\n"  # CLOSE_AT octets with CRLF
    assert d.codes(data + b"NOOP\r\n", chunks=chunks) == ["500 5.5.2", "250 2.0.0"]
    assert not d.conn.closed


@pytest.mark.parametrize("chunk_size", [1 << 20, 65_536, 1000])
def test_100mb_without_crlf_is_answered_and_closed_with_bounded_memory(chunk_size: int) -> None:
    """Finding 13: 100 MB without CRLF used to be consumed silently. Now: one 500,
    then 421 once the bound is passed; the core never holds more than the limit
    plus one received chunk."""
    d = Dialogue()
    d.feed(EHLO)
    chunk = b"y" * chunk_size
    fed = 0
    while not d.conn.closed and fed < 100 * 1024 * 1024:
        d.conn.receive_data(chunk)
        fed += chunk_size
        d.drain()
        assert internal_buffer_size(d.conn) <= LIMIT + chunk_size
    assert codes(bytes(d.wire)) == ["250", "500 5.5.2", "421 4.5.0"]
    assert fed < CLOSE_AT + chunk_size  # closed as soon as the bound was passed


def test_overlong_sasl_response_closes_past_the_bound() -> None:
    d = Dialogue(AUTH_CFG)
    d.feed(EHLO + b"AUTH LOGIN\r\n")
    out = d.codes(b"A" * (MAX_AUTH_LINE + OVERLONG_LINE_BOUND), chunks=4096)
    assert out == ["500 5.5.6", "421 4.5.0"]
    assert d.conn.closed
    assert all(e.command == "AUTH" for e in d.events[2:] if isinstance(e, AutoReply))


def test_overlong_sasl_response_within_bound_ends_exchange_only() -> None:
    d = Dialogue(AUTH_CFG)
    d.feed(EHLO + b"AUTH LOGIN\r\n")
    assert d.codes(b"A" * 20_000) == ["500 5.5.6"]
    assert d.conn.state is State.READY
    assert d.codes(b"\r\nNOOP\r\n") == ["250 2.0.0"]


def test_overlong_bdat_command_line() -> None:
    """A BDAT line over the limit is refused without taking a chunk."""
    d = Dialogue(BDAT_CFG)
    d.feed(TX)
    assert d.codes(b"BDAT 4 LAST" + b" " * 600) == ["500 5.5.2"]
    assert d.codes(b"\r\nBDAT 4 LAST\r\nabcd") == ["250 2.0.0"]
    (done,) = d.of_type(DataComplete)
    assert done.data == b"abcd"


def test_overlong_bdat_command_line_closes_past_the_bound() -> None:
    d = Dialogue(BDAT_CFG)
    d.feed(TX)
    assert d.codes(b"BDAT 4 LAST" + b" " * CLOSE_AT, chunks=8192) == ["500 5.5.2", "421 4.5.0"]
    assert d.conn.closed


def test_overlong_line_counts_as_an_error() -> None:
    d = Dialogue(ProtocolConfig(max_errors=2))
    out = d.codes(b"NOOP " + b"x" * 600 + b"\r\nFOO\r\nNOOP\r\n")
    assert out == ["500 5.5.2", "500 5.5.1", "421 4.7.0"]
    assert d.conn.errors == 2 and d.conn.closed


def test_overlong_line_memory_before_the_limit_is_bounded() -> None:
    """Trickled bytes of a line under its limit stay bounded and are scanned once."""
    d = Dialogue(HUGE_ERRORS)
    for _ in range(LIMIT - 3):
        d.conn.receive_data(b"z")
        d.drain()
    assert d.conn.buffered == LIMIT - 3 and bytes(d.wire) == b""
    assert d.codes(b"\r\n") == ["500 5.5.1"]  # unknown command, not too long
