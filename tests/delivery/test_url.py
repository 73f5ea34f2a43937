"""Relay URL parsing: schemes, defaults, percent-encoding, IPv6, errors, redaction."""

from __future__ import annotations

import dataclasses
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.delivery import RelayUrl, parse_relay_url
from smtpgate.errors import ConfigError

SECRET = "Hunter2-xyzzy"


@pytest.mark.parametrize(
    ("url", "expected", "tls"),
    [
        ("smtp://mail.example.com", ("smtp", "mail.example.com", 25, None, None, False), "may"),
        (
            "SMTP://Mail.Example.COM:2525/",
            ("smtp", "mail.example.com", 2525, None, None, False),
            "may",
        ),
        (
            "smtp+starttls://relay.example",
            ("smtp+starttls", "relay.example", 587, None, None, True),
            "required",
        ),
        (
            "smtp+starttls://relay.example?verify=no",
            ("smtp+starttls", "relay.example", 587, None, None, False),
            "required",
        ),
        ("smtps://relay.example", ("smtps", "relay.example", 465, None, None, True), "implicit"),
        (
            "smtps://u:p@relay.example:1465",
            ("smtps", "relay.example", 1465, "u", "p", True),
            "implicit",
        ),
        (
            "plain://user:pw@relay.example",
            ("plain", "relay.example", 587, "user", "pw", True),
            "required",
        ),
        (
            "plain://us%40er:p%40ss%3Aw%2Fd@10.0.0.1:25",
            ("plain", "10.0.0.1", 25, "us@er", "p@ss:w/d", True),
            "required",
        ),
        (
            "plain://user:p@ss@relay.example",
            ("plain", "relay.example", 587, "user", "p@ss", True),
            "required",
        ),
        (
            "plain://user:%C3%A9t%C3%A9@h",
            ("plain", "h", 587, "user", "\u00e9t\u00e9", True),
            "required",
        ),
        ("smtp://[::1]:2525", ("smtp", "::1", 2525, None, None, False), "may"),
        ("smtps://[2001:DB8::1]", ("smtps", "2001:db8::1", 465, None, None, True), "implicit"),
        ("  smtp://127.0.0.1:25  ", ("smtp", "127.0.0.1", 25, None, None, False), "may"),
        ("discard:", ("discard", "", 0, None, None, False), "none"),
        ("discard://", ("discard", "", 0, None, None, False), "none"),
    ],
)
def test_valid(url: str, expected: tuple[object, ...], tls: str) -> None:
    r = parse_relay_url(url)
    assert (r.scheme, r.host, r.port, r.username, r.password, r.verify) == expected
    assert r.tls == tls


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "empty"),
        ("ftp://host", "unsupported scheme"),
        ("lmtp://host", "unsupported scheme"),
        ("smtp:host", "expected smtp://host"),
        ("smtp://", "missing host"),
        ("smtp://host:0", "port"),
        ("smtp://host:65536", "port"),
        ("smtp://host:x25", "port"),
        ("smtp://host/path", "path"),
        ("smtp://host#frag", "fragment"),
        ("smtp://::1:25", "brackets"),
        ("smtp://[::1", "unterminated"),
        ("smtp://[not:v6]:25", "invalid IPv6"),
        ("smtp://[::1]x", "after the IPv6"),
        ("smtp://bad_host!:25", "invalid host"),
        ("smtp://-bad.example", "invalid host"),
        ("smtp://host?verify=no", "verify= needs required TLS"),
        ("smtps://host?foo=1", "unknown query parameter"),
        ("smtps://host?verify=maybe", "verify must be yes or no"),
        ("discard:host", "discard: takes no host"),
        ("plain://relay.example", "plain:// needs credentials"),
        (f"smtp://user:{SECRET}@host", "credentials are only sent over TLS"),
        (f"plain://user:{SECRET}/x@host", "percent-encode"),
        (f"plain://user:{SECRET}?x@host", "percent-encode"),
        (f"plain://user:{SECRET}#x@host", "percent-encode"),
        (f"plain://:{SECRET}@host", "empty user name"),
        ("plain://user@host", "without password"),
        (f"plain://user:{SECRET} x@host", "whitespace"),
        (f"plain://user:{SECRET}%FF@host", "not UTF-8"),
        (f"plain://user:{SECRET}@host:99999", "port"),
        (f"plain:user:{SECRET}@host", "expected plain://"),
    ],
)
def test_invalid(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_relay_url(url)
    text = str(ei.value)
    assert problem in text
    assert SECRET not in text
    assert all(SECRET not in p for p in ei.value.problems)


def test_password_never_shown() -> None:
    r = parse_relay_url(f"plain://bob:{quote(SECRET)}@relay.example:2587")
    assert r.password == SECRET
    for shown in (repr(r), str(r), r.redacted(), f"{r}", f"{r!r}"):
        assert SECRET not in shown
        assert "***" in shown
    assert str(r) == "plain://bob:***@relay.example:2587"
    assert r.redacted() == str(r)
    assert "password='***'" in repr(r)


def test_redacted_forms() -> None:
    assert str(parse_relay_url("smtp://[::1]:2525")) == "smtp://[::1]:2525"
    assert str(parse_relay_url("smtps://h?verify=no")) == "smtps://h:465?verify=no"
    assert str(parse_relay_url("discard:")) == "discard:"
    assert parse_relay_url("smtp://[::1]:2525").host_port == "[::1]:2525"
    assert parse_relay_url("plain://u:p@h").auth_mechanism == "PLAIN"
    assert parse_relay_url("smtps://u:p@h").auth_mechanism is None


def test_frozen() -> None:
    r = parse_relay_url("smtp://h")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.port = 1  # type: ignore[misc]


@given(
    user=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20),
    password=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=30),
)
def test_round_trip_any_credentials(user: str, password: str) -> None:
    url = f"plain://{quote(user, safe='')}:{quote(password, safe='')}@relay.example"
    r = parse_relay_url(url)
    assert (r.username, r.password) == (user, password)
    other = dataclasses.replace(r, password="something-else")
    # The password does not influence any rendering.
    assert repr(r) == repr(other)
    assert str(r) == str(other)
    assert r.redacted() == other.redacted()
    # The redacted form parses back to the same URL except for the password.
    back = parse_relay_url(r.redacted())
    assert (back.username, back.host, back.port) == (user, "relay.example", 587)


def test_relayurl_constructed_directly() -> None:
    r = RelayUrl("smtps", "2001:db8::5", 465, "u", "pw")
    assert r.host_port == "[2001:db8::5]:465"
    assert "pw" not in repr(r).replace("password", "")
