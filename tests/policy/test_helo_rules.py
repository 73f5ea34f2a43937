"""Tests for the ZMailer-style HELO-glob table (smtpgate.policy.helo_rules)."""

from __future__ import annotations

import fnmatch
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.errors import ConfigError
from smtpgate.policy.helo_rules import (
    BAD_HELO,
    DEFAULT_REFUSE_TEXT,
    FLAG_MEANINGS,
    HeloPolicy,
    HeloRule,
    HeloRules,
    check_helo_syntax,
    glob_to_regex,
    parse_zmailer_table,
    strict_address_ok,
)

# The HELO table of the sample smtpserver.conf in ZMailer's smtpserver(8) man page.
MAN_PAGE_TABLE = """\
#
# HELO/EHLO-pattern style-flags
# [max loadavg]
#
PARAM help  This mail-server is at Yoyodyne Propulsion Inc.
localhost 999 ftveR
some.host.domain 999 !NO EMAIL ACCEPTED FROM YOUR MACHINE
# If the host presents itself as: HELO [1.2.3.4] be lenient to
# it.. The syntax below is due to these patterns being SH-GLOB
# style patterns where the brackets are special characters.
\\[*\\] 999 ve
# Per default demant strict syntactic adherence
* 999 veR
"""


def _matches(pattern: str, name: str) -> bool:
    return re.match(glob_to_regex(pattern), name, re.IGNORECASE) is not None


# ------------------------------------------------------------------ glob patterns


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("*", "", True),
        ("*", "anything.example", True),
        ("*.example.com", "mx.example.com", True),
        ("*.example.com", "a.b.example.com", True),  # '*' crosses dots
        ("*.example.com", "example.com", False),
        ("*.example.com", "mx.example.com.evil", False),  # whole-string match
        ("mx?.example.com", "mx1.example.com", True),
        ("mx?.example.com", "mx.example.com", False),
        ("mx?.example.com", "mx12.example.com", False),
        ("LocalHost", "localhost", True),  # case-insensitive both ways
        ("localhost", "LOCALHOST", True),
        ("mx[0-9].example", "mx7.example", True),
        ("mx[0-9].example", "mxa.example", False),
        ("mx[!0-9].example", "mxa.example", True),
        ("mx[!0-9].example", "mx7.example", False),
        ("mx[ab-].x", "mx-.x", True),  # trailing '-' is literal
        ("mx[z-a].x", "mxq.x", False),  # reversed range matches nothing
        ("[]]x", "]x", True),  # leading ']' is a member
        ("[!]]x", "ax", True),
        ("[!]]x", "]x", False),
        ("[abc", "[abc", True),  # unclosed '[' is literal
        ("[abc", "a", False),
        ("\\[*\\]", "[192.0.2.1]", True),  # the man page's address-literal rule
        ("\\[*\\]", "[IPv6:2001:db8::1]", True),
        ("\\[*\\]", "192.0.2.1", False),
        ("[*]", "*", True),  # without escapes the brackets form a class
        ("[*]", "[192.0.2.1]", False),
        ("a\\*b", "a*b", True),
        ("a\\*b", "axb", False),
        ("a\\?", "a?", True),
        ("a\\?", "ab", False),
        ("trailing\\", "trailing\\", True),
        ("[a\\]]x", "]x", True),  # escaped ']' inside a class
        ("a.b", "axb", False),  # '.' is literal
        ("a+b", "a+b", True),  # regex metacharacters are literal
        ("(x)|y", "(x)|y", True),
        ("(x)|y", "y", False),
        ("**", "abc", True),
        ("a*b*c", "aXXbYYc", True),
        ("a*b*c", "aXXbYY", False),
    ],
)
def test_glob_table(pattern: str, name: str, expected: bool) -> None:
    assert _matches(pattern, name) is expected


_GLOB_ALPHABET = "ab.*?[]!"


@given(
    pattern=st.text(alphabet=_GLOB_ALPHABET, max_size=10),
    name=st.text(alphabet="ab.[]!*?", max_size=10),
)
def test_glob_agrees_with_fnmatch_without_escapes(pattern: str, name: str) -> None:
    # fnmatch is the reference for everything except backslash escapes (which it lacks)
    # and ranges (kept out of the alphabet: fnmatch's handling of '-' chains differs).
    assert _matches(pattern, name) == fnmatch.fnmatchcase(name.lower(), pattern.lower())


@given(st.text(max_size=30))
def test_glob_compiles_for_any_pattern(pattern: str) -> None:
    re.compile(glob_to_regex(pattern))
    # An escaped copy of any text matches itself literally.
    escaped = "".join("\\" + ch for ch in pattern)
    assert _matches(escaped, pattern)


# ------------------------------------------------------------------ the table


def test_man_page_sample_table() -> None:
    entries = parse_zmailer_table(MAN_PAGE_TABLE)
    assert entries == [
        {"pattern": "localhost", "flags": "ftveR"},
        {
            "pattern": "some.host.domain",
            "flags": "",
            "refuse": "NO EMAIL ACCEPTED FROM YOUR MACHINE",
        },
        {"pattern": "\\[*\\]", "flags": "ve"},
        {"pattern": "*", "flags": "veR"},
    ]
    rules = HeloRules.from_config(entries)
    assert len(rules) == 4

    local = rules.match("localhost", "127.0.0.1")
    assert (local.index, local.flags) == (0, "ftveR")
    assert local.verify_sender and local.verify_recipient and local.strict_addresses
    assert local.verify_vrfy and local.verify_expn
    assert not local.sloppy_mail_from and not local.check_helo and not local.refused

    bad = rules.match("SOME.HOST.DOMAIN", "192.0.2.9")
    assert bad.refused and bad.index == 1
    assert bad.refuse_reply is not None
    assert bad.refuse_reply.to_bytes() == b"550 5.7.1 NO EMAIL ACCEPTED FROM YOUR MACHINE\r\n"

    literal = rules.match("[192.0.2.9]", "192.0.2.9")
    assert (literal.index, literal.flags) == (2, "ve")
    assert not literal.strict_addresses

    other = rules.match("mail.example.org", "198.51.100.7")
    assert (other.index, other.flags, other.pattern) == (3, "veR", "*")
    assert other.strict_addresses and not other.verify_sender


def test_first_match_wins_and_default_policy() -> None:
    rules = HeloRules.from_config(
        [
            {"pattern": "*.example.com", "flags": "t"},
            {"pattern": "mx.example.com", "flags": "f"},  # shadowed by the rule above
            {"pattern": "*.example.net", "flags": "hS", "max_load_average": 8},
        ]
    )
    assert rules.match("mx.example.com").flags == "t"
    net = rules.match("  relay.example.net  ", "203.0.113.5")  # blanks around are ignored
    assert net.flags == "hS" and net.check_helo and net.sloppy_mail_from
    assert net.max_load_average == 8.0
    none = rules.match("host.example.org", "203.0.113.5")
    assert none is rules.default
    assert (none.flags, none.pattern, none.index, none.refuse_text) == ("ve", None, None, None)
    assert none.max_load_average is None and none.refuse_reply is None


def test_default_flags_and_empty_table() -> None:
    rules = HeloRules.from_config(None, default_flags="ftR")
    assert len(rules) == 0
    p = rules.match("anything")
    assert p.verify_sender and p.verify_recipient and p.strict_addresses
    assert not p.verify_vrfy
    assert HeloRules.from_config([]).match("x").flags == "ve"
    with pytest.raises(ConfigError) as exc:
        HeloRules.from_config([], default_flags="fz")
    assert exc.value.problems == [
        "default_flags: unknown style flag(s) 'z' (known: ftveRShD and '-')"
    ]
    with pytest.raises(ConfigError):
        HeloRules([], default_flags="q")


def test_zmailer_bang_flags_in_config() -> None:
    rules = HeloRules.from_config(
        [
            {"pattern": "spammer.example", "flags": "!Go away"},
            {"pattern": "quiet.example", "flags": "!"},
            {"pattern": "dash.example", "flags": "-"},
        ]
    )
    assert rules.rules[0] == HeloRule("spammer.example", "", "Go away", None)
    assert rules.match("quiet.example").refuse_text == DEFAULT_REFUSE_TEXT
    dash = rules.match("dash.example")
    assert dash.flags == "-" and not dash.refused
    assert not any(
        [dash.verify_sender, dash.verify_recipient, dash.strict_addresses, dash.check_helo]
    )


def test_from_config_reports_every_problem_by_key() -> None:
    with pytest.raises(ConfigError) as exc:
        HeloRules.from_config(
            [
                {"pattern": "ok.example", "flags": "ft"},
                {"flags": "f"},
                {"pattern": "a b", "flags": "fx?"},
                {"pattern": "c", "refuse": "", "max_load_average": -1},
                {"pattern": "d", "refuse": "no", "flags": "f"},
                {"pattern": "e", "max_load_average": True, "colour": "red"},
                "not a table",
                {"pattern": "f", "refuse": "line\nbreak"},
                {"pattern": "g", "flags": "!x", "refuse": "y"},
                {"pattern": "h", "max_load_average": float("nan"), "flags": 5},
                {"pattern": "", "refuse": "x" * 401},
            ]
        )
    assert exc.value.problems == [
        "helo_rule[1].pattern: required",
        "helo_rule[2].pattern: must be printable and contain no whitespace",
        "helo_rule[2].flags: unknown style flag(s) '?x' (known: ftveRShD and '-')",
        "helo_rule[3].refuse: expected a non-empty reply text, got ''",
        "helo_rule[3].max_load_average: must be a positive number, got -1",
        "helo_rule[4].flags: must be empty when refuse is set",
        "helo_rule[5].colour: unknown key (expected one of pattern, flags, refuse, "
        "max_load_average)",
        "helo_rule[5].max_load_average: expected a number, got True",
        "helo_rule[6]: expected a table with pattern/flags/refuse/max_load_average",
        "helo_rule[7].refuse: must be printable text on one line, at most 400 characters",
        "helo_rule[8].flags: '!message' and refuse are both set; use refuse",
        "helo_rule[9].flags: expected a string of style flags, got 5",
        "helo_rule[9].max_load_average: must be a positive number, got nan",
        "helo_rule[10].pattern: expected a non-empty glob string, got ''",
        "helo_rule[10].refuse: must be printable text on one line, at most 400 characters",
    ]


def test_from_config_rejects_non_list() -> None:
    for bad in ("*", {"pattern": "*"}, 5):
        with pytest.raises(ConfigError) as exc:
            HeloRules.from_config(bad)  # type: ignore[arg-type]
        assert exc.value.problems == ["helo_rule: expected an array of tables ([[helo_rule]])"]


def test_every_documented_flag_has_a_policy_meaning() -> None:
    props = {
        "f": "verify_sender",
        "t": "verify_recipient",
        "v": "verify_vrfy",
        "e": "verify_expn",
        "R": "strict_addresses",
        "S": "sloppy_mail_from",
        "h": "check_helo",
    }
    assert set(FLAG_MEANINGS) == set(props) | {"D", "-"}
    for flag, prop in props.items():
        on = HeloPolicy(flags=flag)
        assert getattr(on, prop) is True
        others = [p for f, p in props.items() if f != flag]
        assert not any(getattr(on, p) for p in others), flag
    HeloRules.from_config([{"pattern": "*", "flags": "ftveRShD-"}])  # all accepted


# ------------------------------------------------------------------ HELO syntax


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("mx.example.com", True),
        ("MX1.Example.COM", True),
        ("a.b", True),
        ("xn--bcher-kva.example", True),
        ("host-1.example", True),
        ("1host.example", True),  # RFC 1123 §2.1 allows a leading digit
        ("a" * 63 + ".example", True),
        ("a" * 64 + ".example", False),  # label too long
        (".".join(["a" * 63] * 4), False),  # 255 octets
        (".".join(["a" * 63] * 3 + ["a" * 61]), True),  # 253 octets
        ("localhost", False),  # not fully qualified
        ("example.", False),
        ("mx.example.com.", False),  # no root dot in SMTP (RFC 5321 §4.1.2)
        (".example.com", False),
        ("mx..example.com", False),
        ("-mx.example.com", False),
        ("mx-.example.com", False),
        ("mx_1.example.com", False),
        ("mx example.com", False),
        ("mx.example.com ", False),
        ("bücher.example", False),  # U-labels are not LDH
        ("192.0.2.1", False),  # a bare dotted quad must be bracketed
        ("mx.123", False),  # all-numeric top label
        ("mx.c0m", True),
        ("[192.0.2.1]", True),
        ("[255.255.255.255]", True),
        ("[256.0.0.1]", False),
        ("[192.0.2]", False),
        ("[192.0.2.01]", False),  # leading zeros are ambiguous
        ("[ 192.0.2.1]", False),
        ("[IPv6:2001:db8::1]", True),
        ("[ipv6:2001:DB8::1]", True),
        ("[IPv6:::ffff:192.0.2.1]", True),
        ("[IPv6:fe80::1%eth0]", False),  # no zone index
        ("[IPv6:2001:db8::g]", False),
        ("[2001:db8::1]", False),  # IPv6 needs the tag
        ("[IPv6:192.0.2.1]", False),
        ("[example.com]", False),
        ("[]", False),
        ("[", False),
        ("", False),
    ],
)
def test_check_helo_syntax_table(name: str, ok: bool) -> None:
    assert check_helo_syntax(name) is ok


@given(st.text(max_size=300))
def test_check_helo_syntax_never_raises(name: str) -> None:
    assert check_helo_syntax(name) in (True, False)


@given(st.text(alphabet="[]:.0123456789abcdefIPv6%-", max_size=60))
def test_check_helo_syntax_never_raises_on_literal_like_input(name: str) -> None:
    assert check_helo_syntax(name) in (True, False)
    assert check_helo_syntax("[" + name + "]") in (True, False)


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_top = st.from_regex(r"[a-z]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(st.lists(_label, min_size=1, max_size=5), _top)
def test_generated_fqdns_pass(labels: list[str], top: str) -> None:
    name = ".".join([*labels, top])
    assert check_helo_syntax(name)
    assert check_helo_syntax(name.upper())
    assert not check_helo_syntax(name + ".")


@given(st.ip_addresses(v=4))
def test_ipv4_literals_pass(addr: object) -> None:
    assert check_helo_syntax(f"[{addr}]")
    assert not check_helo_syntax(str(addr))


@given(st.ip_addresses(v=6))
def test_ipv6_literals_pass(addr: object) -> None:
    assert check_helo_syntax(f"[IPv6:{addr}]")
    assert not check_helo_syntax(f"[{addr}]")


def test_bad_helo_reply() -> None:
    assert BAD_HELO.to_bytes().startswith(b"501 5.5.4 Invalid HELO/EHLO argument")


# ------------------------------------------------------------------ R and S flags


@pytest.mark.parametrize(
    ("address", "recipient", "ok"),
    [
        ("user@example.com", False, True),
        ("user@example.com", True, True),
        ("user@[192.0.2.1]", True, True),
        ("user@[IPv6:2001:db8::1]", False, True),
        ('"john doe"@example.com', True, True),
        ("a@b@example.com", True, True),  # rightmost '@' separates the domain
        ("", False, True),  # null reverse-path stays legal
        ("", True, False),
        ("postmaster", True, True),  # RFC 5321 §4.1.1.3
        ("PostMaster", True, True),
        ("postmaster", False, False),
        ("user", True, False),
        ("user", False, False),
        ("user@localhost", True, False),  # not local@remote
        ("user@", False, False),
        ("@example.com", False, False),
        ("user@example.com.", True, False),
        ("user@192.0.2.1", True, False),
    ],
)
def test_strict_address_ok(address: str, recipient: bool, ok: bool) -> None:
    assert strict_address_ok(address, recipient=recipient) is ok


# ------------------------------------------------------------------ ZMailer table parser


def test_parse_zmailer_table_details() -> None:
    text = (
        "PARAM maxsize 1000\n"
        "  indented comment line\n"
        "\tTabbed too\n"
        "\n"
        "Mixed.CASE.example\t5\tft\n"
        "low.example 1 t\n"  # ZMailer raises limits below 2 to 2
        "never.example 999 f\n"
        "noload.example fR \n"
        "bare.example\n"
        "bang.example 10 !\n"
    )
    assert parse_zmailer_table(text) == [
        {"pattern": "mixed.case.example", "max_load_average": 5.0, "flags": "ft"},
        {"pattern": "low.example", "max_load_average": 2.0, "flags": "t"},
        {"pattern": "never.example", "flags": "f"},
        {"pattern": "noload.example", "flags": "fR"},
        {"pattern": "bare.example", "flags": ""},
        {
            "pattern": "bang.example",
            "max_load_average": 10.0,
            "flags": "",
            "refuse": DEFAULT_REFUSE_TEXT,
        },
    ]
    rules = HeloRules.from_config(parse_zmailer_table(text))
    assert rules.match("MIXED.case.EXAMPLE").max_load_average == 5.0
    assert rules.match("bang.example").refuse_reply is not None
