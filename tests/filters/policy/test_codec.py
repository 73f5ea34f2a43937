"""The policy protocol codec (smtpgate.plugins.policy_codec), sans I/O: tables of
actions and records, a hypothesis round trip, and the address notations."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.plugins.policy import decide, parse_policy_address
from smtpgate.plugins.policy_codec import (
    Action,
    ActionKind,
    AttributeReader,
    PolicyProtocolError,
    encode_attributes,
    encode_request,
    encode_response,
    parse_action,
    response_action,
)
from smtpgate.reply import Reply


@pytest.mark.parametrize("text,expected", [
    ("OK", Action(ActionKind.OK, raw="OK")),
    ("permit", Action(ActionKind.OK, raw="permit")),
    ("20240101", Action(ActionKind.OK, raw="20240101")),
    ("450", Action(ActionKind.OK, raw="450")),  # all digits: OK, as Postfix reads it
    ("dunno", Action(ActionKind.DUNNO, raw="dunno")),
    ("REJECT", Action(ActionKind.REJECT, raw="REJECT")),
    ("REJECT  go away ", Action(ActionKind.REJECT, "go away", raw="REJECT  go away ")),
    ("reject 5.7.26 no", Action(ActionKind.REJECT, "no", 0, "5.7.26", "reject 5.7.26 no")),
    ("DEFER later", Action(ActionKind.DEFER, "later", raw="DEFER later")),
    ("DEFER_IF_PERMIT 4.7.24 x", Action(ActionKind.DEFER_IF_PERMIT, "x", 0, "4.7.24",
                                        "DEFER_IF_PERMIT 4.7.24 x")),
    ("defer_if_reject t", Action(ActionKind.DEFER_IF_REJECT, "t", raw="defer_if_reject t")),
    ("550 5.7.23 SPF fail", Action(ActionKind.CODE, "SPF fail", 550, "5.7.23",
                                   "550 5.7.23 SPF fail")),
    ("451 try", Action(ActionKind.CODE, "try", 451, None, "451 try")),
    ("PREPEND X-A: b  c", Action(ActionKind.PREPEND, "X-A: b  c", raw="PREPEND X-A: b  c")),
    ("PREPEND", Action(ActionKind.UNKNOWN, "PREPEND", raw="PREPEND")),
    ("HOLD", Action(ActionKind.HOLD, raw="HOLD")),
    ("discard why", Action(ActionKind.DISCARD, "why", raw="discard why")),
    ("FILTER smtp:[::1]:25", Action(ActionKind.FILTER, "smtp:[::1]:25",
                                    raw="FILTER smtp:[::1]:25")),
    ("REDIRECT a@b", Action(ActionKind.REDIRECT, "a@b", raw="REDIRECT a@b")),
    ("WARN w", Action(ActionKind.WARN, "w", raw="WARN w")),
    ("INFO i", Action(ActionKind.INFO, "i", raw="INFO i")),
    ("250 fine", Action(ActionKind.UNKNOWN, "250 fine", raw="250 fine")),
    ("", Action(ActionKind.UNKNOWN, raw="")),
    ("frobnicate", Action(ActionKind.UNKNOWN, "frobnicate", raw="frobnicate")),
])
def test_parse_action(text: str, expected: Action) -> None:
    assert parse_action(text) == expected


@pytest.mark.parametrize("action,stage,reply", [
    ("REJECT", "rcpt", Reply(550, "5.7.1", "<x@y>: Recipient address rejected: Access denied")),
    ("REJECT", "connect", Reply(554, "5.7.1", "<x@y>: Client host rejected: Access denied")),
    ("DEFER", "data", Reply(451, "4.7.1",
                            "<x@y>: End-of-data rejected: Service temporarily unavailable")),
    ("450 4.2.0 grey", "connect", Reply(421, "4.2.0", "<x@y>: Client host rejected: grey")),
    ("550 4.1.1 t", "mail", Reply(550, "5.1.1", "<x@y>: Sender address rejected: t")),
])
def test_decide_replies_carry_enhanced_codes(action: str, stage: str, reply: Reply) -> None:
    d = decide(parse_action(action), stage, "x@y", "tempfail", False)
    assert d.result.reply == reply


def test_reader_records_and_errors() -> None:
    r = AttributeReader()
    assert r.feed(b"action=OK\n") == []
    assert r.pending
    assert r.feed(b"\nactio") == [[("action", "OK")]]
    assert r.feed(b"n=DUNNO\r\nx=a=b\r\n\r\n") == [[("action", "DUNNO"), ("x", "a=b")]]
    assert not r.pending
    with pytest.raises(PolicyProtocolError):
        AttributeReader().feed(b"no equals sign\n\n")
    with pytest.raises(PolicyProtocolError):
        AttributeReader().feed(b"a=" + b"x" * 9000)
    with pytest.raises(PolicyProtocolError):
        response_action([("other", "1")])
    assert response_action([("action", "a"), ("action", "b")]) == "b"


def test_encoders() -> None:
    assert encode_request({"protocol_state": "RCPT"}) == (
        b"request=smtpd_access_policy\nprotocol_state=RCPT\n\n")
    assert encode_response("DUNNO") == b"action=DUNNO\n\n"
    for bad in ([("", "x")], [("a=b", "x")], [("a", "x\ny")], [("a", "x\0")]):
        with pytest.raises(PolicyProtocolError):
            encode_attributes(bad)
    with pytest.raises(PolicyProtocolError):
        encode_response(" ")


names = st.text(st.characters(blacklist_characters="=\n\x00", blacklist_categories=("Cs",)),
                min_size=1, max_size=30)
values = st.text(st.characters(blacklist_characters="\n\x00", blacklist_categories=("Cs",)),
                 max_size=200).filter(lambda v: not v.endswith("\r"))


@given(st.lists(st.lists(st.tuples(names, values), min_size=1, max_size=10),
                min_size=1, max_size=5),
       st.integers(min_value=1, max_value=64))
def test_round_trip_in_any_chunking(records: list[list[tuple[str, str]]], chunk: int) -> None:
    """What one side encodes, the other reads back, however the bytes are split."""
    wire = b"".join(encode_attributes(r) for r in records)
    reader = AttributeReader()
    got: list[list[tuple[str, str]]] = []
    for i in range(0, len(wire), chunk):
        got.extend(reader.feed(wire[i:i + chunk]))
    assert got == records and not reader.pending


@given(st.text(max_size=100))
def test_parse_action_never_raises(text: str) -> None:
    action = parse_action(text)
    assert isinstance(action.kind, ActionKind)
    decision = decide(action, "rcpt", "x@y", "tempfail", True)
    reply = decision.result.reply
    assert reply is None or reply.enhanced is not None


@pytest.mark.parametrize("address,parsed", [
    ("127.0.0.1:10023", ("127.0.0.1", 10023)),
    ("inet:127.0.0.1:10023", ("127.0.0.1", 10023)),
    ("[::1]:10023", ("::1", 10023)),
    ("inet:[::1]:10023", ("::1", 10023)),
    ("localhost:10023", ("localhost", 10023)),
    ("unix:/run/policy.sock", "/run/policy.sock"),
])
def test_addresses(address: str, parsed: object) -> None:
    assert parse_policy_address(address) == parsed


@pytest.mark.parametrize("address", ["127.0.0.1", "::1:10023", "unix:relative", "h:0",
                                     "h:70000", "[::1]10023", ":25"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        parse_policy_address(address)
