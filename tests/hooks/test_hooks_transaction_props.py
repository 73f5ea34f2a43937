"""Property tests: header add/set/remove round trips and no header injection."""

from __future__ import annotations

from email import message_from_bytes
from email import policy as email_policy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpgate.envelope import Envelope
from smtpgate.hooks import Transaction

from .hooks_corpus import corpus_bytes

BASES = [
    "zbateson__data_emails_m0001.eml",  # CRLF, 8-bit headers, folded fields
    "rspamd__functional_messages_rcvd7.eml",  # duplicates, no separator, no final EOL
    "mailpit__plain-text.eml",  # DKIM-signed, CRLF
    "spamassassin__spam_002.eml",  # mbox From line
]

# Field names: RFC 5322 ftext, prefixed so they never collide with the corpus fields.
names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
    min_size=1,
    max_size=20,
).map(lambda s: "X-P-" + s)
# Values: printable ASCII words separated by single or multiple spaces/tabs.
words = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)
values = st.lists(st.tuples(st.sampled_from([" ", "  ", "\t", " \t"]), words), max_size=40).map(
    lambda parts: "".join(sep + w for sep, w in parts).strip(" \t")
)


def fresh(base: str) -> tuple[Transaction, bytes]:
    raw = corpus_bytes(base)
    txn = Transaction(Envelope("a@example.org"), "T1")
    txn.message = raw
    return txn, raw


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("base", BASES)
@SETTINGS
@given(name=names, value=values, prepend=st.booleans())
def test_add_then_remove_round_trip(base: str, name: str, value: str, prepend: bool) -> None:
    txn, raw = fresh(base)
    ends_with_eol = raw.endswith(b"\n")
    body = txn.body
    txn.add_header(name, value, prepend=prepend)
    assert txn.get_header(name) == value
    assert txn.get_headers(name.upper()) == [(name, value)]
    assert txn.body == body or not txn.body  # the body never changes
    assert all(len(line) <= 998 for line in txn.raw.split(b"\r\n"))
    parsed = message_from_bytes(txn.raw, policy=email_policy.compat32)
    assert parsed.get_all(name) is not None and len(parsed.get_all(name) or []) == 1
    assert txn.remove_header(name) == 1
    assert txn.get_header(name) is None
    if prepend or ends_with_eol:
        assert txn.raw == raw  # byte-identical again
    else:
        assert txn.raw == raw + b"\r\n"  # only the missing final line end was added


@SETTINGS
@given(entries=st.lists(st.tuples(names, values), min_size=1, max_size=8))
def test_many_adds_keep_order_and_count(entries: list[tuple[str, str]]) -> None:
    txn, raw = fresh(BASES[0])
    for name, value in entries:
        txn.add_header(name, value)
    added = txn.get_headers()[-len(entries) :]
    assert added == entries
    for name in {n.lower() for n, _ in entries}:
        expected = sum(1 for n, _ in entries if n.lower() == name)
        assert txn.remove_header(name) == expected
    assert txn.raw == raw


@SETTINGS
@given(name=names, first=values, second=values)
def test_set_header_leaves_exactly_one(name: str, first: str, second: str) -> None:
    txn, raw = fresh(BASES[2])
    txn.add_header(name, first)
    txn.add_header(name, first, prepend=True)
    txn.set_header(name.lower(), second)
    assert txn.get_headers(name) == [(name.lower(), second)]
    txn.remove_header(name)
    assert txn.raw == raw


@SETTINGS
@given(
    value=st.lists(
        st.sampled_from(["a", " ", "\t", "\r", "\n", ":", "B", "c", "\r\n", "\r\n "]),
        max_size=30,
    ).map("".join)
)
def test_no_value_can_inject_a_field(value: str) -> None:
    txn, raw = fresh(BASES[0])
    before = message_from_bytes(raw, policy=email_policy.compat32)
    try:
        txn.add_header("X-Probe", value)
    except ValueError:
        assert txn.raw == raw and not txn.modified
        return
    after = message_from_bytes(txn.raw, policy=email_policy.compat32)
    assert list(after.keys()) == [*before.keys(), "X-Probe"]
    assert after.get_payload() == before.get_payload()
    assert len(txn.get_headers()) == len(before.keys()) + 1
