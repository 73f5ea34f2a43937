"""The state table (``smtpgate.protocol.states``) walked over the wire: every known
command in every command state gets the expected reply and leaves the expected state,
and every refusal on the wire is the table's (issue 9, "A thin driver")."""

from __future__ import annotations

import pytest

from smtpgate.protocol import (
    TRANSITIONS,
    AuthCredentials,
    AutoReply,
    Data,
    Helo,
    MailFrom,
    ProtocolConfig,
    RcptTo,
    Rule,
    State,
)
from smtpgate.protocol.states import (
    COMMAND_STATES,
    CREDENTIALS,
    END_OF_DATA,
    GREETING,
    SASL,
    TLS_HANDSHAKE,
    UNKNOWN,
    VERBS,
    Success,
    rule,
)
from smtpgate.reply import R, Reply

from .helpers import Dialogue, b64, codes, parse_replies

CFG = ProtocolConfig(
    hostname="mx.test",
    chunking=True,
    etrn=True,
    expn=True,
    tls_available=True,
    auth_mechanisms=("PLAIN", "LOGIN"),
    auth_require_tls=False,
)

# How each command state is reached from a fresh session (greeting 220, or 554).
SETUP: dict[State, bytes] = {
    State.REJECTED: b"",
    State.INIT: b"",
    State.READY: b"EHLO c.example\r\n",
    State.MAIL: b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\n",
    State.RCPT: b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n",
    State.BDAT: (
        b"EHLO c.example\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nBDAT 3\r\nabc"
    ),
}

# One well-formed line per input (a verb, or an unknown one).
LINES: dict[str, bytes] = {
    "HELO": b"HELO c.example\r\n",
    "EHLO": b"EHLO c.example\r\n",
    "LHLO": b"LHLO c.example\r\n",
    "MAIL": b"MAIL FROM:<x@y.example>\r\n",
    "RCPT": b"RCPT TO:<z@y.example>\r\n",
    "DATA": b"DATA\r\n",
    "BDAT": b"BDAT 3 LAST\r\nxyz",
    "RSET": b"RSET\r\n",
    "NOOP": b"NOOP\r\n",
    "HELP": b"HELP\r\n",
    "QUIT": b"QUIT\r\n",
    "VRFY": b"VRFY bob\r\n",
    "EXPN": b"EXPN staff\r\n",
    "TURN": b"TURN\r\n",
    "SEND": b"SEND FROM:<a@b.example>\r\n",
    "SOML": b"SOML FROM:<a@b.example>\r\n",
    "SAML": b"SAML FROM:<a@b.example>\r\n",
    "ETRN": b"ETRN example.com\r\n",
    "STARTTLS": b"STARTTLS\r\n",
    "AUTH": b"AUTH PLAIN\r\n",
    UNKNOWN: b"XYZZY frob\r\n",
}

REJ, INI, RDY, MAI, RCP, BDT = (
    State.REJECTED, State.INIT, State.READY, State.MAIL, State.RCPT, State.BDAT,
)
COLUMNS = (REJ, INI, RDY, MAI, RCP, BDT)
_503 = "503 5.5.1"

# Expected (reply code, state afterwards) per input, in the column order
# REJECTED, INIT, READY, MAIL, RCPT, BDAT. Written by hand from RFC 5321 §4.1.4,
# RFC 3030, RFC 3207, RFC 4954 and the core's documented replies, not from the table.
EXPECTED: dict[str, tuple[tuple[str, State], ...]] = {
    "HELO": ((_503, REJ), ("250", RDY), ("250", RDY), ("250", RDY), ("250", RDY), ("250", RDY)),
    "EHLO": ((_503, REJ), ("250", RDY), ("250", RDY), ("250", RDY), ("250", RDY), ("250", RDY)),
    # LHLO is unknown to an SMTP (not LMTP) server.
    "LHLO": ((_503, REJ), ("500 5.5.1", INI), ("500 5.5.1", RDY), ("500 5.5.1", MAI),
             ("500 5.5.1", RCP), ("500 5.5.1", BDT)),
    "MAIL": ((_503, REJ), (_503, INI), ("250 2.1.0", MAI), (_503, MAI), (_503, RCP), (_503, BDT)),
    "RCPT": ((_503, REJ), (_503, INI), (_503, RDY), ("250 2.1.5", RCP), ("250 2.1.5", RCP),
             (_503, BDT)),
    "DATA": ((_503, REJ), (_503, INI), (_503, RDY), (_503, MAI), ("354", State.DATA), (_503, BDT)),
    "BDAT": ((_503, REJ), (_503, INI), (_503, RDY), (_503, MAI), ("250 2.0.0", RDY),
             ("250 2.0.0", RDY)),
    "RSET": ((_503, REJ), ("250 2.0.0", INI), ("250 2.0.0", RDY), ("250 2.0.0", RDY),
             ("250 2.0.0", RDY), ("250 2.0.0", RDY)),
    "NOOP": tuple(("250 2.0.0", s) for s in COLUMNS),
    "HELP": tuple(("214 2.0.0", s) for s in COLUMNS),
    "QUIT": tuple(("221 2.0.0", State.CLOSED) for s in COLUMNS),
    "VRFY": ((_503, REJ),) + tuple(("252 2.5.0", s) for s in COLUMNS[1:]),
    "EXPN": ((_503, REJ),) + tuple(("250 2.1.5", s) for s in COLUMNS[1:]),
    "TURN": ((_503, REJ),) + tuple(("502 5.5.1", s) for s in COLUMNS[1:]),
    "SEND": ((_503, REJ),) + tuple(("502 5.5.1", s) for s in COLUMNS[1:]),
    "SOML": ((_503, REJ),) + tuple(("502 5.5.1", s) for s in COLUMNS[1:]),
    "SAML": ((_503, REJ),) + tuple(("502 5.5.1", s) for s in COLUMNS[1:]),
    "ETRN": ((_503, REJ), (_503, INI), ("250 2.0.0", RDY), (_503, MAI), (_503, RCP), (_503, BDT)),
    "STARTTLS": ((_503, REJ), (_503, INI), ("220 2.0.0", State.TLS_PENDING), (_503, MAI),
                 (_503, RCP), (_503, BDT)),
    "AUTH": ((_503, REJ), (_503, INI), ("334", State.AUTH), (_503, MAI), (_503, RCP),
             (_503, BDT)),
    UNKNOWN: tuple(("500 5.5.1", s) for s in COLUMNS),
}


def _dialogue(state: State) -> Dialogue:
    greeting = Reply(554, "5.7.1", "no service") if state is REJ else Reply(220, None, "mx")
    d = Dialogue(CFG, greeting=greeting, auto_tls=False)
    d.feed(SETUP[state])
    assert d.conn.state is state
    return d


CASES = [(verb, state) for verb in EXPECTED for state in COLUMNS]


@pytest.mark.parametrize(("verb", "state"), CASES, ids=[f"{s.name}-{v}" for v, s in CASES])
def test_every_command_in_every_state(verb: str, state: State) -> None:
    d = _dialogue(state)
    wire = d.feed(LINES[verb])
    code, after = EXPECTED[verb][COLUMNS.index(state)]
    assert codes(wire)[:1] == [code]
    assert d.conn.state is after
    # A refusal on the wire is exactly the table's refusal for (state, verb).
    r = TRANSITIONS[(state, verb)]
    if not r.allowed:
        assert r.refusal is not None
        expected = r.refusal.to_bytes(True)
        assert wire[: len(expected)] == expected


def test_table_covers_every_command_in_every_command_state() -> None:
    assert set(LINES) == VERBS | {UNKNOWN}  # the walk above misses no verb
    for state in COMMAND_STATES:
        for verb in VERBS | {UNKNOWN}:
            assert isinstance(rule(state, verb), Rule), (state, verb)
    # No command is read in the other states: their lines are data, SASL or nothing.
    for state in set(State) - set(COMMAND_STATES):
        assert all(rule(state, verb) is None for verb in VERBS | {UNKNOWN}), state
    # Every refusal carries an RFC 3463 enhanced status code.
    for (state, inp), r in TRANSITIONS.items():
        if r.refusal is not None:
            assert r.refusal.code >= 500 and r.refusal.enhanced, (state, inp)


def test_pseudo_inputs_occur_only_where_documented() -> None:
    where = {
        inp: {state for (state, i) in TRANSITIONS if i == inp}
        for inp in (GREETING, END_OF_DATA, SASL, CREDENTIALS, TLS_HANDSHAKE)
    }
    assert where == {
        GREETING: {State.GREETING},
        END_OF_DATA: {State.DATA, State.BDAT, State.RCPT},
        SASL: {State.AUTH},
        CREDENTIALS: {State.AUTH, State.READY},
        TLS_HANDSHAKE: {State.TLS_PENDING},
    }


def test_rejected_session_allows_only_quit_noop_help_and_refuses_first() -> None:
    allowed = {v for v in VERBS | {UNKNOWN} if TRANSITIONS[(State.REJECTED, v)].allowed}
    assert allowed == {"QUIT", "NOOP", "HELP", UNKNOWN}
    assert all(
        TRANSITIONS[(State.REJECTED, v)].first for v in VERBS - {"QUIT", "NOOP", "HELP"}
    )
    # "first": refused before the arguments are looked at (DATA with an argument
    # and a non-UTF-8-clean VRFY are 503 here, 501 elsewhere).
    d = Dialogue(greeting=Reply(554, "5.7.1", "no"))
    assert d.codes(b"DATA now\r\nVRFY \xc3\xbc\r\n") == [_503, _503]
    d = Dialogue()
    assert d.codes(b"DATA now\r\nVRFY \xc3\xbc\r\n") == ["501 5.5.4", "501 5.5.4"]


@pytest.mark.parametrize(
    ("code", "state"),
    [(220, State.INIT), (554, State.REJECTED), (421, State.CLOSED), (250, State.REJECTED)],
)
def test_greeting_rule(code: int, state: State) -> None:
    d = Dialogue(greeting=Reply(code, None, "hello"))
    assert d.conn.state is state


def test_success_codes() -> None:
    assert Success.POSITIVE.matches(250) and Success.POSITIVE.matches(221)
    assert not Success.POSITIVE.matches(354) and not Success.POSITIVE.matches(421)
    assert Success.CODE_354.matches(354) and not Success.CODE_354.matches(250)
    assert Success.CODE_220.matches(220) and not Success.CODE_220.matches(250)
    assert Success.CODE_334.matches(334) and not Success.CODE_334.matches(235)
    assert all(Success.ANY.matches(c) for c in (221, 250, 354, 421, 550))


@pytest.mark.parametrize(
    ("event", "reply", "state"),
    [
        # The reply decides: only the table's success code moves the session on.
        (Helo, Reply(550, "5.7.1", "no"), State.INIT),
        (Helo, Reply(250, None, "hi"), State.READY),
    ],
)
def test_reply_decides_the_helo_transition(event: type, reply: Reply, state: State) -> None:
    d = Dialogue(overrides={event: lambda c, e: reply})
    d.feed(b"EHLO c.example\r\n")
    assert d.conn.state is state


def test_transaction_transitions_follow_the_reply() -> None:
    # MAIL refused: still READY; MAIL accepted: MAIL; RCPT refused: still MAIL;
    # DATA answered 250 instead of 354: no DATA state.
    d = Dialogue(overrides={MailFrom: lambda c, e: Reply(451, "4.7.1", "later")})
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\n")
    assert d.conn.state is State.READY
    d = Dialogue(
        ProtocolConfig(chunking=True),
        overrides={RcptTo: lambda c, e: Reply(550, "5.1.1", "no such user")},
    )
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert d.conn.state is State.MAIL
    # After a refused RCPT, DATA and BDAT get the table's alternative refusal.
    assert d.codes(b"DATA\r\nBDAT 1 LAST\r\nx") == ["554 5.5.1", "554 5.5.1"]
    assert TRANSITIONS[(State.MAIL, "DATA")].refusal_after_refused_rcpt is R.NO_VALID_RECIPIENTS
    d = Dialogue(overrides={Data: lambda c, e: Reply(451, "4.3.0", "not now")})
    d.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    assert d.conn.state is State.RCPT and not d.conn.in_data


def test_core_refusal_never_moves_the_state_whatever_the_driver_sends() -> None:
    """A refused command stays refused even if a (buggy) driver answers it with 250."""
    d = Dialogue(CFG, overrides={AutoReply: lambda c, e: Reply(250, "2.0.0", "sure")})
    d.feed(b"MAIL FROM:<a@b>\r\nDATA\r\nSTARTTLS\r\nAUTH PLAIN\r\nRCPT TO:<a@b>\r\n")
    assert [type(e) for e in d.events] == [AutoReply] * 5
    assert d.conn.state is State.INIT


def test_sasl_rules() -> None:
    d = Dialogue(CFG)
    assert d.codes(b"EHLO c\r\nAUTH LOGIN\r\n") == ["250", "334"]
    assert d.conn.state is State.AUTH
    assert d.codes(b"dXNlcg==\r\n") == ["334"]  # LOGIN: the password challenge
    assert d.conn.state is State.AUTH
    assert d.codes(b"c2VjcmV0\r\n") == ["235 2.7.0"]  # CREDENTIALS: the exchange ends
    assert d.conn.state is State.READY and d.conn.authenticated
    # A bad SASL response ends the exchange (the SASL rule's "otherwise").
    d = Dialogue(CFG)
    assert d.codes(b"EHLO c\r\nAUTH PLAIN\r\n!!\r\nNOOP\r\n") == [
        "250", "334", "501 5.5.2", "250 2.0.0",
    ]
    assert d.conn.state is State.READY


def test_credentials_end_the_exchange_whatever_the_verdict() -> None:
    # Even a driver answering the credentials with 334 cannot keep the exchange open.
    d = Dialogue(CFG, overrides={AuthCredentials: lambda c, e: Reply(334, None, "")})
    d.feed(b"EHLO c\r\nAUTH PLAIN\r\n" + b64("\0u\0secret").encode() + b"\r\n")
    assert d.conn.state is State.READY
    assert d.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_tls_handshake_rule() -> None:
    d = Dialogue(CFG, auto_tls=False)
    d.feed(b"EHLO c\r\nSTARTTLS\r\n")
    assert d.conn.state is State.TLS_PENDING
    d.conn.tls_established()
    assert d.conn.state is State.INIT and d.conn.helo_name is None
    assert TRANSITIONS[(State.TLS_PENDING, TLS_HANDSHAKE)].then is State.INIT


def test_lmtp_end_of_data_follows_the_table() -> None:
    d = Dialogue(ProtocolConfig(lmtp=True))
    d.feed(b"LHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n")
    d.conn.receive_data(b"hi\r\n.\r\n")
    ev = d.conn.next_event()
    assert ev.__class__.__name__ == "DataComplete"
    out = d.conn.send_lmtp([Reply(250, "2.0.0", "ok"), Reply(421, "4.3.2", "full")])
    assert [c for c, _ in parse_replies(out)] == [250, 421]
    # Per-recipient replies, even a 421, do not close the session (RFC 2033 §4.2).
    assert d.conn.state is State.READY
