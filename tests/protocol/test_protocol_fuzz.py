"""Property tests (hypothesis): chunking invariance (RFC 2920 pipelining), no
exceptions on hostile input, and end-of-data framing against a reference model
(no smuggled second message, CVE-2023-51764 family)."""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpgate.protocol import (
    NEED_DATA,
    Data,
    DataComplete,
    Event,
    ProtocolConfig,
    ServerConnection,
    StartTls,
)
from smtpgate.reply import R, Reply

from .helpers import EHLO, TX, Dialogue, Policy, parse_replies

# SMTPGATE_FUZZ_EXAMPLES=20000 runs a deeper search (kept small by default: the
# whole directory must run in seconds). No example database is written.
SETTINGS = settings(
    max_examples=int(os.environ.get("SMTPGATE_FUZZ_EXAMPLES", "400")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FRAGMENTS = [
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"MAIL FROM:<a@b> SIZE=10\r\n",
    b"MAIL FROM:<> BODY=8BITMIME SMTPUTF8\r\n",
    b"RCPT TO:<c@d>\r\n",
    b"RCPT TO:<Postmaster>\r\n",
    b"DATA\r\n",
    b"DATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"HELP\r\n",
    b"VRFY x\r\n",
    b"EXPN x\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n",
    b"dXNlcg==\r\n",
    b"c2VjcmV0\r\n",
    b"*\r\n",
    b"=\r\n",
    b"STARTTLS\r\n",
    b"QUIT\r\n",
    b".\r\n",
    b"..\r\n",
    b".x\r\n",
    b"\r\n.\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"..",
    b"\n.\n",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\x00",
    b"\xff",
    "ü".encode(),
    b" ",
    b"x" * 30,
    b"y" * 600,
    b"GET / HTTP/1.1\r\n",
    b"MAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\nDATA\r\n",
    b"hello world\r\n",
]

fragments = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=12)), max_size=40
).map(b"".join)

configs = st.builds(
    ProtocolConfig,
    max_message_size=st.sampled_from([40, 300, 100_000]),
    max_line_length=st.sampled_from([0, 24, 1000]),
    max_recipients=st.sampled_from([1, 3, 100]),
    max_errors=st.sampled_from([3, 10, 10_000]),
    max_unknown_commands=st.sampled_from([2, 10_000]),
    max_command_line=st.sampled_from([512, 64]),
    normalize_bare_line_endings=st.booleans(),
    smtputf8=st.booleans(),
    eightbitmime=st.booleans(),
    enhanced_status_codes=st.booleans(),
    tls_available=st.booleans(),
    tls_active=st.booleans(),
    auth_mechanisms=st.sampled_from([(), ("PLAIN",), ("PLAIN", "LOGIN")]),
    auth_require_tls=st.booleans(),
)

PREFIXES = [
    b"",
    EHLO,
    b"HELO x\r\n",
    TX,
    TX + b"DATA\r\n",
    EHLO + b"AUTH LOGIN\r\n",
    EHLO + b"AUTH PLAIN\r\n",
    TX + b"DATA\r\nabc\r\n.",
]
greetings = st.sampled_from(
    [Reply(220, None, "hi"), Reply(220, None, "hi"), Reply(554, "5.7.1", "no")]
)


def cut_points(draw_size: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(min_value=1, max_value=max(1, draw_size)), max_size=20)


def refuse_tls(conn: ServerConnection, ev: Event) -> Reply:
    # Chunking cannot be invisible across a TLS handshake (bytes after STARTTLS are
    # dropped when they share a packet with it); refuse TLS in invariance tests.
    return R.TLS_NOT_AVAILABLE


def outcome(d: Dialogue) -> tuple[bytes, list[Event], str, bool]:
    return bytes(d.wire), d.events, d.conn.state.name, d.conn.authenticated


# ------------------------------------------------------------- invariance


@SETTINGS
@given(
    cfg=configs,
    greeting=greetings,
    prefix=st.sampled_from(PREFIXES),
    body=fragments,
    data=st.data(),
)
def test_chunking_does_not_change_anything(
    cfg: ProtocolConfig, greeting: Reply, prefix: bytes, body: bytes, data: st.DataObject
) -> None:
    """Whole packet, byte by byte, or cut at random points: same replies and events."""
    wire = prefix + body
    overrides: dict[type, Policy] = {StartTls: refuse_tls}
    whole = Dialogue(cfg, greeting, overrides)
    whole.feed(wire)
    single = Dialogue(cfg, greeting, overrides)
    single.feed(wire, chunks=1)
    cuts = data.draw(cut_points(len(wire)), label="cuts")
    random = Dialogue(cfg, greeting, overrides)
    random.feed(wire, chunks=cuts)
    assert outcome(single) == outcome(whole)
    assert outcome(random) == outcome(whole)


# ---------------------------------------------------------- never raises


@SETTINGS
@given(
    cfg=configs,
    greeting=greetings,
    prefix=st.sampled_from(PREFIXES),
    body=st.one_of(fragments, st.binary(max_size=400)),
    data=st.data(),
)
def test_hostile_input_never_raises_and_every_event_gets_one_valid_reply(
    cfg: ProtocolConfig, greeting: Reply, prefix: bytes, body: bytes, data: st.DataObject
) -> None:
    d = Dialogue(cfg, greeting)
    wire = prefix + body
    d.feed(wire, chunks=data.draw(cut_points(len(wire)), label="cuts"))
    replies = parse_replies(bytes(d.wire))  # asserts well-formed reply lines and codes
    extra = len(replies) - len(d.events)
    # One reply per event, plus at most one 421 appended when an error limit closes.
    assert extra in (0, 1)
    if extra:
        assert replies[-1][0] == 421 and d.conn.closed
    for code, lines in replies:
        assert 200 <= code <= 599
        if cfg.enhanced_status_codes is False:
            assert not any(re.match(r"[245]\.\d+\.\d+ ", line) for line in lines)
    if d.conn.closed:
        assert d.conn.next_event() is NEED_DATA


# ------------------------------------------------- end-of-data reference model

TERM = b"\r\n.\r\n"
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


def reference_message(wire: bytes, cfg: ProtocolConfig) -> DataComplete:
    """What the DataComplete for message text ``wire`` (before the final ".CRLF") must be."""
    lines = wire.split(b"\r\n")
    data = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    if len(data) > cfg.max_message_size:
        return DataComplete(b"", R.TOO_BIG)
    if BARE.search(data):
        if not cfg.normalize_bare_line_endings:
            return DataComplete(b"", R.BARE_LF)
        data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
        if len(data) > cfg.max_message_size:
            return DataComplete(b"", R.TOO_BIG)
    limit = cfg.max_line_length
    if limit and any(len(line) + 2 > limit for line in data.split(b"\r\n")):
        return DataComplete(b"", R.TEXT_LINE_TOO_LONG)
    return DataComplete(data)


data_configs = st.builds(
    ProtocolConfig,
    max_message_size=st.sampled_from([30, 200, 100_000]),
    max_line_length=st.sampled_from([0, 10, 1000]),
    normalize_bare_line_endings=st.booleans(),
    max_errors=st.just(1_000_000),
    max_unknown_commands=st.just(1_000_000),
)


DATA_FRAGMENTS = [
    b"\r\n.\r\n",
    b"\r\n.\r\n",
    b".\r\n",
    b"..\r\n",
    b"\r\n",
    b"\r\n",
    b"text",
    b"." * 12,
    b"\n.\n",
    b"\r\n.\n",
    b"\n.\r\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r",
    b"\n",
    b".",
    b"x" * 25,
    b"MAIL FROM:<e@x>\r\nRCPT TO:<v@x>\r\nDATA\r\n",
    b"DATA\r\n",
    b"RCPT TO:<v@x>\r\n",
    b"QUIT\r\n",
    b"RSET\r\n",
    b"\x00\xff",
]
data_fragments = st.lists(
    st.one_of(st.sampled_from(DATA_FRAGMENTS), st.sampled_from(FRAGMENTS)), max_size=40
).map(b"".join)


@SETTINGS
@given(cfg=data_configs, body=data_fragments)
def test_end_of_data_matches_reference(cfg: ProtocolConfig, body: bytes) -> None:
    """Fed byte by byte, each DataComplete fires exactly at the first CRLF.CRLF after
    its 354, carries the reference data/problem, and no other message exists."""
    wire = TX + b"DATA\r\n" + body
    overrides: dict[type, Policy] = {StartTls: refuse_tls}
    d = Dialogue(cfg, overrides=overrides)
    timeline: list[tuple[int, Event]] = []
    for i in range(len(wire)):
        before = len(d.events)
        d.feed(wire[i : i + 1])
        timeline.extend((i + 1, ev) for ev in d.events[before:])
        if d.conn.closed:
            break
    starts = [pos for pos, ev in timeline if isinstance(ev, Data)]  # all answered 354
    done = [(pos, ev) for pos, ev in timeline if isinstance(ev, DataComplete)]
    expected = []
    for k in starts:
        t = wire.find(TERM, k - 2)
        if t >= 0:
            expected.append((t + 5, reference_message(wire[k : t + 2], cfg)))
    assert done == expected
    # Nothing but the DataComplete happens between a 354 and the end of data.
    for i, (_, ev) in enumerate(timeline):
        if isinstance(ev, Data) and i + 1 < len(timeline):
            assert isinstance(timeline[i + 1][1], DataComplete)


smuggle_bodies = (
    st.lists(
        st.sampled_from(
            [
                b"\n.\n",
                b"\r\n.\n",
                b"\n.\r\n",
                b"\r.\r",
                b"\r\n.\r",
                b"text",
                b"\r\n",
                b".",
                b"\r",
                b"\n",
                b"MAIL FROM:<evil@x>\r\n",
                b"DATA\r\n",
                b"QUIT\r\n",
            ]
        ),
        max_size=30,
    )
    .map(b"".join)
    .filter(lambda b: TERM not in b"\r\n" + b + b"\r\n")
)


@SETTINGS
@given(body=smuggle_bodies, normalize=st.booleans(), data=st.data())
def test_no_smuggled_second_message(body: bytes, normalize: bool, data: st.DataObject) -> None:
    """A message built from smuggling fragments, ended by one real CRLF.CRLF, is ONE
    message whatever the chunking, and nothing in it becomes a command."""
    cfg = ProtocolConfig(normalize_bare_line_endings=normalize)
    wire = TX + b"DATA\r\n" + body + b"\r\n.\r\n"
    d = Dialogue(cfg)
    d.feed(wire, chunks=data.draw(cut_points(len(wire)), label="cuts"))
    kinds = [type(e).__name__ for e in d.events]
    assert kinds == ["Helo", "MailFrom", "RcptTo", "Data", "DataComplete"]
    (done,) = d.of_type(DataComplete)
    assert done == reference_message(body + b"\r\n", cfg)
    if BARE.search(body):
        assert done.problem == (None if normalize else R.BARE_LF)
