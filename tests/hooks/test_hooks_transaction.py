"""Transaction: the nssmtpd message API on real corpus messages."""

from __future__ import annotations

import re
import stat
from collections.abc import Callable
from email import message_from_bytes
from email import policy as email_policy
from email.errors import MisplacedEnvelopeHeaderDefect, MissingHeaderBodySeparatorDefect
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

from smtpgate.envelope import Envelope
from smtpgate.hooks import Transaction
from smtpgate.reply import Reply

from .hooks_corpus import corpus_bytes, corpus_rows, to_crlf

MakeTxn = Callable[..., Transaction]

RCVD7 = "rspamd__functional_messages_rcvd7.eml"  # 7 folded Received, no separator, no final EOL
NO_BODY = "spamassassin__nice_no_body.eml"  # CRLF, no body separator
NO_HEADER = "mime4j__testmsgs_malformedHeader-noheader.eml"  # no header at all
MBOX = "spamassassin__spam_002.eml"  # starts with an mbox "From " line
LATIN1 = "zbateson__data_emails_m0001.eml"  # raw ISO-8859-1 in To:, folded Subject
M0027 = "phpmmp__mails_m0027.eml"  # LF, no separator, no final newline


# ------------------------------------------------------------------ no message yet


def test_message_api_before_data(make_txn: MakeTxn) -> None:
    txn = make_txn()
    assert txn.message is None and txn.size == 0 and not txn.modified
    for action in (
        lambda: txn.raw,
        lambda: txn.body,
        lambda: txn.header_bytes,
        lambda: txn.get_header("Subject"),
        lambda: txn.get_headers(),
        lambda: txn.add_header("X-A", "1"),
        lambda: txn.email,
        lambda: txn.set_raw(b"x"),
        lambda: txn.dump("/nonexistent/never-written"),
    ):
        with pytest.raises(RuntimeError, match="no message yet"):
            action()


# ------------------------------------------------------------------ header reads


def test_duplicate_and_folded_headers(make_txn: MakeTxn) -> None:
    txn = make_txn(corpus_bytes(RCVD7))
    received = txn.get_headers("received")
    assert len(received) == 7
    assert all(name == "Received" for name, _ in received)
    assert received[0][1] == (
        "from mx7.mail.testler.ru ([] verified)  by mail2006.testler.ru "
        "(testlerMail 6.1 SMTP 6.1a7)  with ESMTP id 60578244 for test@test.com; "
        "Mon, 27 Apr 2020 19:45:05 +0300"
    )
    assert received[-1][1].startswith("from mxback10q.mail.test.net")
    assert txn.get_header("RECEIVED") == received[0][1]  # first occurrence
    assert txn.get_header("To") == "<test@test.ru>, \t<test@test.com>"
    assert txn.get_header("Content-Transfer-Encoding") == "quoted-printable"  # last, no EOL
    assert txn.get_header("X-Not-There") is None
    names = [n for n, _ in txn.get_headers()]
    assert names[0] == "Return-Path" and names[-1] == "Content-Transfer-Encoding"
    assert not txn.modified  # reading never modifies


def test_latin1_header_decoding_round_trips(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(LATIN1)
    txn = make_txn(raw)
    to = txn.get_header("To")
    assert to is not None and to.startswith('"J') and "\udcfc" in to  # raw 0xFC kept
    assert txn.get_header("Subject") == "Die Hasen und   die Fr\udcf6sche (Microsoft Outlook 00)"
    txn.set_header("To", to)  # writing the value back gives the same bytes
    assert txn.raw == raw and not txn.modified


def test_mbox_from_line_is_not_a_header(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(MBOX)
    txn = make_txn(raw)
    names = [n for n, _ in txn.get_headers()]
    assert names[0] == "Return-Path" and "From " not in names
    txn.add_header("X-Top", "first", prepend=True)
    first_line_end = raw.index(b"\r\n") + 2
    assert txn.raw == raw[:first_line_end] + b"X-Top: first\r\n" + raw[first_line_end:]
    assert txn.get_headers()[0] == ("X-Top", "first")
    assert txn.email["X-Top"] == "first"


SMALL_ROWS = [r for r in corpus_rows() if int(r["size_bytes"]) < 400_000]


@pytest.mark.parametrize("row", SMALL_ROWS, ids=[r["file"] for r in SMALL_ROWS])
def test_headers_match_the_email_package(row: dict[str, str], make_txn: MakeTxn) -> None:
    """Every corpus message: our field list equals what the stdlib parser finds."""
    raw = corpus_bytes(row["file"])
    ref = message_from_bytes(raw, policy=email_policy.compat32)
    if any(
        isinstance(d, MissingHeaderBodySeparatorDefect | MisplacedEnvelopeHeaderDefect)
        for d in ref.defects
    ):
        pytest.skip("the stdlib parser ends the header block early on this message")
    txn = make_txn(raw)
    ours = txn.get_headers()
    theirs = list(ref.raw_items())
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (_, mine), (_, ref_value) in zip(ours, theirs, strict=True):
        ref_bytes = re.sub(r"\r?\n(?=[ \t])", "", ref_value).strip(" \t\r\n")
        assert mine.encode("utf-8", "surrogateescape") == ref_bytes.encode(
            "ascii", "surrogateescape"
        )
    assert txn.header_bytes + b"\r\n" + txn.body == raw or b"\r\n\r\n" not in raw


# ------------------------------------------------------------------ header edits


def test_add_header_appends_and_keeps_bytes(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(LATIN1)
    txn = make_txn(raw)
    head, body = txn.header_bytes, txn.body
    txn.add_header("X-Scanned", "smtpgate 1.0")
    assert txn.raw == head + b"X-Scanned: smtpgate 1.0\r\n\r\n" + body
    assert txn.body == body and txn.modified and txn.size == len(raw) + 25
    txn.add_header("Received", "from a by b; Mon, 1 Jan 2024 00:00:00 +0000", prepend=True)
    assert txn.raw.startswith(b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" + head)


def test_set_header_replaces_first_and_removes_others(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(RCVD7)
    txn = make_txn(raw)
    txn.set_header("received", "from smtpgate by here")
    assert txn.get_headers("Received") == [("received", "from smtpgate by here")]
    lines = raw.split(b"\r\n")
    # every line that is not part of a Received field is kept, in order
    kept: list[bytes] = []
    in_received = False
    for line in lines:
        if line.startswith(b"Received:"):
            in_received = True
            continue
        if in_received and line[:1] in (b" ", b"\t"):
            continue
        in_received = False
        kept.append(line)
    expected = [lines[0], b"received: from smtpgate by here", *kept[1:]]
    assert txn.raw.split(b"\r\n") == expected


def test_set_header_in_place_keeps_everything_else(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(LATIN1)
    txn = make_txn(raw)
    start = raw.index(b"Subject:")
    end = raw.index(b"Date:")
    txn.set_header("Subject", "Replaced")
    assert txn.raw == raw[:start] + b"Subject: Replaced\r\n" + raw[end:]
    txn.set_header("X-New", "appended")  # absent: appended at the end of the header block
    assert txn.get_headers()[-1] == ("X-New", "appended")


def test_remove_header(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(RCVD7)
    txn = make_txn(raw)
    assert txn.remove_header("X-Absent") == 0 and not txn.modified
    assert txn.remove_header("RECEIVED") == 7
    assert txn.get_headers("Received") == []
    assert txn.raw.startswith(b"Return-Path: <test@test.ru>\r\nFrom: test@test.ru\r\n")
    assert txn.raw.endswith(b"Content-Transfer-Encoding: quoted-printable")
    assert len(txn.raw) == len(raw) - sum(
        len(m.group(0)) for m in re.finditer(rb"Received:.*\r\n(?:[ \t].*\r\n)*", raw)
    )


def test_no_body_separator(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(NO_BODY)
    txn = make_txn(raw)
    assert txn.header_bytes == raw and txn.body == b""
    assert txn.get_header("Subject") == "This message has no body! (EOM)"
    txn.add_header("X-A", "1")
    assert txn.raw == raw + b"X-A: 1\r\n"
    txn.set_body(b"Now it has one.\r\n")
    assert txn.raw == raw + b"X-A: 1\r\n\r\nNow it has one.\r\n"
    assert txn.body == b"Now it has one.\r\n"
    assert txn.email.get_content().rstrip() == "Now it has one."


def test_no_final_newline_lf_message(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(M0027, crlf=False)
    assert not raw.endswith(b"\n") and b"\r\n" not in raw
    txn = make_txn(raw)
    assert txn.get_header("Content-Description") == "1234 / 1234"
    txn.add_header("X-A", "1")  # LF message: new lines use LF too
    assert txn.raw == raw + b"\nX-A: 1\n"
    assert txn.remove_header("X-A") == 1
    assert txn.raw == raw + b"\n"


def test_headerless_message_gets_a_header_block(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(NO_HEADER)
    txn = make_txn(raw)
    assert txn.get_headers() == []
    txn.add_header("X-A", "1")
    assert txn.raw == b"X-A: 1\r\n\r\n" + raw
    assert txn.body == raw and txn.email["X-A"] == "1"


def test_long_values_are_folded(make_txn: MakeTxn) -> None:
    txn = make_txn(corpus_bytes(NO_BODY))
    value = " ".join(f"word{i}" for i in range(60))
    txn.add_header("X-Long", value)
    field = txn.raw[txn.raw.index(b"X-Long:") :]
    lines = field.split(b"\r\n")[:-1]
    assert len(lines) > 3
    assert all(len(line) <= 78 for line in lines)
    assert all(line[:1] == b" " for line in lines[1:])
    assert txn.get_header("x-long") == value
    with pytest.raises(ValueError, match="998"):
        txn.add_header("X-Huge", "a" * 1200)


def test_non_ascii_values(make_txn: MakeTxn) -> None:
    txn = make_txn(corpus_bytes(NO_BODY))
    txn.add_header("X-Greeting", "Grüße aus Köln")
    assert txn.raw.isascii()  # RFC 2047 without SMTPUTF8
    assert txn.email["X-Greeting"] == "Grüße aus Köln"
    txn8 = make_txn(corpus_bytes(NO_BODY), smtputf8=True)
    txn8.add_header("X-Greeting", "Grüße aus Köln")
    assert "X-Greeting: Grüße aus Köln\r\n".encode() in txn8.raw  # RFC 6532
    assert txn8.get_header("X-Greeting") == "Grüße aus Köln"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-A", "ok\r\nBcc: victim@example.com"),
        ("X-A", "ok\nBcc: victim@example.com"),
        ("X-A", "ok\rBcc: victim@example.com"),
        ("X-A", "ok\r\n\r\nbody injection"),
        ("X-A", "ok\r\n"),
        ("X-A", "ok\r\n \r\n more"),
        ("X-A", "nul\x00byte"),
        ("X-A", "esc\x1b"),
        ("X-A\r\nBcc", "x"),
        ("Bad Name", "x"),
        ("Bad:Name", "x"),
        ("", "x"),
        ("Ünïcode", "x"),
    ],
)
def test_injection_attempts_are_rejected(make_txn: MakeTxn, name: str, value: str) -> None:
    raw = corpus_bytes(LATIN1)
    txn = make_txn(raw)
    with pytest.raises(ValueError):
        txn.add_header(name, value)
    with pytest.raises(ValueError):
        txn.add_header(name, value, prepend=True)
    with pytest.raises(ValueError):
        txn.set_header(name, value)
    assert txn.raw == raw and not txn.modified


def test_properly_folded_value_is_accepted(make_txn: MakeTxn) -> None:
    txn = make_txn(corpus_bytes(NO_BODY))
    txn.add_header("X-Folded", "part one\r\n\tpart two")
    assert b"X-Folded: part one\r\n\tpart two\r\n" in txn.raw
    assert txn.get_header("X-Folded") == "part one\tpart two"


def test_body_and_set_body_keep_headers(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(LATIN1)
    txn = make_txn(raw)
    sep = raw.index(b"\r\n\r\n")
    assert txn.header_bytes == raw[: sep + 2]
    assert txn.body == raw[sep + 4 :]
    txn.set_body(b"replaced\r\n")
    assert txn.raw == raw[: sep + 4] + b"replaced\r\n"


def test_set_raw_and_modified(make_txn: MakeTxn) -> None:
    raw = corpus_bytes(NO_BODY)
    txn = make_txn(raw)
    txn.set_raw(raw)  # identical bytes: not a modification
    assert not txn.modified
    txn.set_raw(b"Subject: new\r\n\r\nbody\r\n")
    assert txn.modified and txn.get_header("subject") == "new" and txn.size == 22
    txn.message = raw  # the server loading a message resets the flag
    assert not txn.modified and txn.get_header("subject") == "This message has no body! (EOM)"


# ------------------------------------------------------------------ email view


def test_email_is_lazy_cached_and_invalidated(
    make_txn: MakeTxn, monkeypatch: pytest.MonkeyPatch
) -> None:
    parses: list[int] = []

    class CountingParser(BytesParser):
        def parsebytes(self, text: bytes | bytearray, headersonly: bool = False) -> Any:
            parses.append(len(text))
            return super().parsebytes(text, headersonly)

    monkeypatch.setattr("smtpgate.hooks.transaction.BytesParser", CountingParser)
    txn = make_txn(corpus_bytes(RCVD7))
    txn.get_headers()
    txn.add_header("X-A", "1")
    assert parses == []  # header work never parses the message
    first = txn.email
    assert txn.email is first and len(parses) == 1
    assert first["Subject"] == "Fwd: 123"
    txn.set_header("Subject", "Changed")
    second = txn.email
    assert second is not first and second["Subject"] == "Changed"
    assert len(parses) == 2


def test_set_email_round_trip(make_txn: MakeTxn) -> None:
    txn = make_txn(corpus_bytes("mailpit__plain-text.eml"))
    msg = txn.email
    msg["X-Via-Email"] = "yes"
    del msg["Subject"]
    msg["Subject"] = "Rewritten"
    txn.set_email(msg)
    assert txn.modified
    assert b"X-Via-Email: yes\r\n" in txn.raw
    assert not re.search(rb"(?<!\r)\n", txn.raw)  # CRLF only
    assert txn.get_header("Subject") == "Rewritten"
    assert txn.email["X-Via-Email"] == "yes"


# ------------------------------------------------------------------ misc


def test_dump_writes_the_bytes(make_txn: MakeTxn, tmp_path: Path) -> None:
    raw = corpus_bytes(LATIN1)
    txn = make_txn(raw)
    txn.add_header("X-Dumped", "yes")
    target = tmp_path / "msg.eml"
    txn.dump(target)
    assert target.read_bytes() == txn.raw
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    txn.set_body(b"short\r\n")
    txn.dump(str(target))  # overwrites (truncates)
    assert target.read_bytes() == txn.raw


def test_set_reply(make_txn: MakeTxn) -> None:
    txn = make_txn()
    assert txn.reply is None
    txn.set_reply("Queued as 1234")
    assert txn.reply == Reply(250, "2.0.0", "Queued as 1234")
    txn.set_reply("Spam", code=554, enhanced="5.7.1")
    assert str(txn.reply) == "554 5.7.1 Spam"
    txn.set_reply(Reply(451, "4.3.0", "Later"))
    assert txn.reply == Reply(451, "4.3.0", "Later")
    with pytest.raises(ValueError):
        txn.set_reply("bad", code=250, enhanced="5.0.0")
    with pytest.raises(ValueError):
        txn.set_reply("cr\rinjection")


# ------------------------------------------------------------------ envelope


def test_sender_api() -> None:
    env = Envelope("a@example.org", {"SIZE": "100"})
    txn = Transaction(env, "T9")
    assert txn.id == "T9" and txn.envelope is env and txn.notes == {}
    assert txn.mail_from == "a@example.org" and txn.mail_params == {"SIZE": "100"}
    txn.mail_from = "<b@example.net>"
    assert env.mail_from == "b@example.net"
    txn.mail_from = ""  # null reverse-path
    assert env.mail_from == ""
    for bad in ("a@b>\r\nRCPT TO:<c@d", "x\x00@y", "a@b c"):
        with pytest.raises(ValueError):
            txn.mail_from = bad
    txn.mail_params["BODY"] = "8BITMIME"
    assert env.body_type == "8BITMIME"
    assert txn.sender_data is None
    txn.sender_data = {"score": 1.5}
    assert txn.sender_data == {"score": 1.5}


def test_recipient_api() -> None:
    env = Envelope("a@example.org")
    txn = Transaction(env, "T1")
    r1 = txn.add_recipient("User@Example.COM", flags=["local"], data=7)
    r2 = txn.add_recipient("<other@example.net>", params={"NOTIFY": "NEVER"})
    assert txn.recipients is env.rcpt_to and env.recipients == [
        "User@Example.COM",
        "other@example.net",
    ]
    assert txn.get_recipient("User@example.com") is r1  # domain case-insensitive
    assert txn.get_recipient("<User@EXAMPLE.com>") is r1
    with pytest.raises(KeyError):
        txn.get_recipient("user@example.com")  # the local part is case-sensitive
    assert txn.get_recipient(1) is r2 and txn.get_recipient(-1) is r2
    with pytest.raises(IndexError):
        txn.get_recipient(2)
    with pytest.raises(KeyError):
        txn.get_recipient("nobody@example.com")
    assert r2.params == {"NOTIFY": "NEVER"}

    txn.set_flag(0, "scanned")
    txn.set_flag("other@EXAMPLE.net", "quarantine")
    assert txn.get_flags(0) == {"local", "scanned"}
    flags = txn.get_flags(1)
    flags.add("not-stored")  # a copy
    assert txn.get_flags(1) == {"quarantine"}
    txn.unset_flag(0, "local")
    txn.unset_flag(0, "never-set")
    assert txn.get_flags("User@example.com") == {"scanned"}

    assert txn.get_recipient_data(0) == 7 and txn.get_recipient_data(1) is None
    txn.set_recipient_data(1, {"mailbox": "x"})
    assert txn.get_recipient_data("other@example.net") == {"mailbox": "x"}

    removed = txn.delete_recipient("USER@example.com".replace("USER", "User"))
    assert removed is r1 and txn.recipients == [r2]
    assert txn.delete_recipient(0) is r2 and txn.recipients == []
    with pytest.raises(IndexError):
        txn.delete_recipient(0)
    for bad in ("", "a@b>\r\nDATA", "x\n@y", "<>"):
        with pytest.raises(ValueError):
            txn.add_recipient(bad)
    assert txn.recipients == []


def test_to_crlf_helper() -> None:
    assert to_crlf(b"a\nb\r\nc") == b"a\r\nb\r\nc"
