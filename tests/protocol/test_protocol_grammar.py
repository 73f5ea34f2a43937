"""MAIL/RCPT argument grammar (RFC 5321 §4.1.2, §4.1.3, §4.5.3.1; RFC 6531 §3.3)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.protocol import MailFrom, RcptTo
from smtpgate.protocol.grammar import PathSyntaxError, parse_params, parse_path, sloppy_path

from .helpers import EHLO, Dialogue

L64 = "l" * 64
# (argument, accepted as MAIL, accepted as RCPT) -> expected mailbox or None (501)
VALID: list[tuple[str, str]] = [
    ("<a@example.org>", "a@example.org"),
    (" <a@example.org>", "a@example.org"),  # a space after the colon is tolerated
    ("<first.last+tag@sub.example.org>", "first.last+tag@sub.example.org"),
    ("<!#$%&'*+-/=?^_`{|}~@x.y>", "!#$%&'*+-/=?^_`{|}~@x.y"),
    ('<"john doe"@example.org>', '"john doe"@example.org'),
    ('<"a>b"@example.org>', '"a>b"@example.org'),
    ('<"a\\"b"@example.org>', '"a\\"b"@example.org'),
    ('<"<@>"@example.org>', '"<@>"@example.org'),
    ("<@a.example,@b.example:u@d.example>", "u@d.example"),
    ("<@relay.example:u@d.example>", "u@d.example"),
    ("<u@[192.0.2.1]>", "u@[192.0.2.1]"),
    ("<u@[IPv6:::1]>", "u@[IPv6:::1]"),
    ("<u@[IPv6:2001:db8::25]>", "u@[IPv6:2001:db8::25]"),
    ("<u@[IPv6:::ffff:192.0.2.1]>", "u@[IPv6:::ffff:192.0.2.1]"),
    ("<u@[x-tag:some-data]>", "u@[x-tag:some-data]"),
    (f"<{L64}@example.org>", f"{L64}@example.org"),
    ('<"' + "q" * 62 + '"@example.org>', '"' + "q" * 62 + '"@example.org'),
    ("<u@" + ("a" * 63 + ".") * 3 + "a" * 60 + ">", "u@" + ("a" * 63 + ".") * 3 + "a" * 60),
    ("<U@EXAMPLE.ORG>", "U@EXAMPLE.ORG"),
    ("<u@x>  ", "u@x"),
]
INVALID: list[str] = [
    "a@example.org",  # missing brackets
    "<a@example.org",
    "a@example.org>",
    "<a@example.org>x",  # trailing garbage
    "<a@example.org>>",
    "<<a@example.org>>",
    "<a>",
    "<@example.org>",
    "<a@>",
    "<a@@b>",
    "<a b@example.org>",
    "<a..b@example.org>",
    "<.a@example.org>",
    "<a.@example.org>",
    "<a@-example.org>",
    "<a@example-.org>",
    "<a@example..org>",
    "<a@example.org.>",
    "<a@exa_mple.org>",
    "<a@[192.0.2]>",
    "<a@[300.0.2.1]>",
    "<a@[IPv6:zzz]>",
    "<a@[IPv6:1:2]>",
    "<a@[IPv6:fe80::1%eth0]>",
    "<a@[192.0.2.1>",
    "<@a,b:u@d>",
    '<"unterminated@example.org>',
    '<"a"b@example.org>',
    "<a\tb@example.org>",
    f"<{L64}l@example.org>",  # local part 65 octets
    '<"' + "q" * 63 + '"@example.org>',  # quoted local part 65 octets
    "<u@" + ("a" * 63 + ".") * 3 + "a" * 61 + ">",  # path 257 octets with brackets
    "<Postmaster@>",
    "",
    "<",
]


@pytest.mark.parametrize(("arg", "mailbox"), VALID, ids=[v[0][:40] for v in VALID])
@pytest.mark.parametrize("reverse", [True, False])
def test_valid_paths(arg: str, mailbox: str, reverse: bool) -> None:
    got, params = parse_path(arg, reverse=reverse, smtputf8_allowed=False)
    assert got == mailbox
    assert params == ""


@pytest.mark.parametrize("arg", INVALID, ids=[v[:40] for v in INVALID])
@pytest.mark.parametrize("reverse", [True, False])
def test_invalid_paths(arg: str, reverse: bool) -> None:
    with pytest.raises(PathSyntaxError) as info:
        parse_path(arg, reverse=reverse, smtputf8_allowed=True, allow_postmaster=not reverse)
    assert info.value.reply.code == 501
    assert info.value.reply.enhanced == ("5.1.7" if reverse else "5.1.3")


def test_path_length_boundary() -> None:
    domain = ("a" * 63 + ".") * 3 + "a" * 60
    ok = f"u@{domain}"
    assert len(ok) + 2 == 256
    assert parse_path(f"<{ok}>", reverse=False, smtputf8_allowed=False)[0] == ok


def test_null_path_only_for_mail() -> None:
    assert parse_path("<>", reverse=True, smtputf8_allowed=False) == ("", "")
    assert parse_path("<> SIZE=5", reverse=True, smtputf8_allowed=False) == ("", "SIZE=5")
    with pytest.raises(PathSyntaxError):
        parse_path("<>", reverse=False, smtputf8_allowed=False)


@pytest.mark.parametrize("pm", ["<Postmaster>", "<postmaster>", "<POSTMASTER>"])
def test_postmaster_without_domain_rcpt_only(pm: str) -> None:
    assert (
        parse_path(pm, reverse=False, smtputf8_allowed=False, allow_postmaster=True)[0] == pm[1:-1]
    )
    with pytest.raises(PathSyntaxError):
        parse_path(pm, reverse=True, smtputf8_allowed=False)
    d = Dialogue()
    out = d.codes(EHLO + f"MAIL FROM:{pm}\r\nMAIL FROM:<a@b>\r\nRCPT TO:{pm}\r\n".encode())
    assert out == ["250", "501 5.1.7", "250 2.1.0", "250 2.1.5"]
    assert d.of_type(RcptTo) == [RcptTo(pm[1:-1], {})]


def test_utf8_paths() -> None:
    assert parse_path("<δοκιμή@παράδειγμα.δοκιμή>", reverse=True, smtputf8_allowed=True)[0] == (
        "δοκιμή@παράδειγμα.δοκιμή"
    )
    assert parse_path('<"ü x"@b>', reverse=True, smtputf8_allowed=True)[0] == '"ü x"@b'
    with pytest.raises(PathSyntaxError) as info:
        parse_path("<ü@b>", reverse=True, smtputf8_allowed=False)
    assert (info.value.reply.code, info.value.reply.enhanced) == (553, "5.6.7")
    with pytest.raises(PathSyntaxError) as info:
        parse_path("<" + "ü" * 33 + "@b>", reverse=True, smtputf8_allowed=True)
    assert info.value.reply.code == 501  # 66 octets: the limit counts octets, not characters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("SIZE=10", {"SIZE": "10"}),
        ("size=10  body=8BITMIME", {"SIZE": "10", "BODY": "8BITMIME"}),
        ("SMTPUTF8", {"SMTPUTF8": None}),
        ("AUTH=<>", {"AUTH": "<>"}),
        ("X-FOO=a+20b", {"X-FOO": "a+20b"}),
    ],
)
def test_parse_params(text: str, expected: dict[str, str | None]) -> None:
    assert parse_params(text) == expected


@pytest.mark.parametrize("text", ["=1", "-X=1", "SIZE=", "SIZE=a=b", "SIZE=1 SIZE=2", "A=ü", "A_B"])
def test_parse_params_errors(text: str) -> None:
    with pytest.raises(PathSyntaxError) as info:
        parse_params(text)
    assert (info.value.reply.code, info.value.reply.enhanced) == (501, "5.5.4")


def test_grammar_through_the_connection() -> None:
    d = Dialogue()
    out = d.codes(
        EHLO
        + b'MAIL FROM:<"a > b"@example.org> SIZE=10\r\n'
        + b"RCPT TO:<@hop1,@hop2:u@[192.0.2.1]>\r\n"
        + b"RCPT TO:<u@[IPv6:::1]>\r\n"
        + b"RCPT TO:<"
        + b"l" * 65
        + b"@example.org>\r\n"
        + b"RCPT TO:<u@example.org>garbage\r\n"
    )
    assert out == ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "501 5.1.3", "501 5.1.3"]
    assert d.of_type(MailFrom) == [MailFrom('"a > b"@example.org', {"SIZE": "10"})]
    assert d.of_type(RcptTo) == [RcptTo("u@[192.0.2.1]", {}), RcptTo("u@[IPv6:::1]", {})]


# ------------------------------------------------- sloppy MAIL FROM (ZMailer "S" flag)


@pytest.mark.parametrize(
    ("argument", "rewritten"),
    [
        ("user@domain", "<user@domain>"),
        ("user@domain SIZE=100 BODY=8BITMIME", "<user@domain> SIZE=100 BODY=8BITMIME"),
        (" user@domain", "<user@domain>"),  # blanks after the colon (ZMailer skips them)
        ("\tuser@domain\t SIZE=1", "<user@domain> SIZE=1"),
        ('"john doe"@example.com SIZE=5', '<"john doe"@example.com> SIZE=5'),
        ('"a\\" b"@example.com', '<"a\\" b"@example.com>'),
        ("user", "<user>"),  # judged later by the parser
        ("<user@domain>", None),
        ("  <user@domain> SIZE=1", None),
        ("", None),
        ("   ", None),
        ("user@domain>", None),
        ("us<er@domain", None),
    ],
)
def test_sloppy_path(argument: str, rewritten: str | None) -> None:
    assert sloppy_path(argument) == rewritten


@given(st.text(max_size=80))
def test_sloppy_path_never_raises_and_brackets(argument: str) -> None:
    out = sloppy_path(argument)
    if out is not None:
        assert out.startswith("<") and ">" in out
        assert out.count("<") == 1


def test_core_uses_sloppy_path_only_when_allowed() -> None:
    line = b'MAIL FROM:"john doe"@example.com SIZE=5\r\n'
    d = Dialogue()
    assert d.codes(EHLO + line) == ["250", "501 5.1.7"]
    d = Dialogue()
    d.conn.allow_sloppy_paths = True
    assert d.codes(EHLO + line + b"RSET\r\nMAIL FROM:\tu@example.com\r\n") == [
        "250", "250 2.1.0", "250 2.0.0", "250 2.1.0",
    ]
    assert d.of_type(MailFrom) == [
        MailFrom('"john doe"@example.com', {"SIZE": "5"}),
        MailFrom("u@example.com", {}),
    ]
    # A bracket in the bare token is left for the parser to refuse.
    assert d.codes(b"RSET\r\nMAIL FROM:u@example.com>\r\n") == ["250 2.0.0", "501 5.1.7"]
