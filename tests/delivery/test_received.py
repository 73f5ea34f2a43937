"""Received: header: exact format, protocol keywords, folding, sanitisation."""

from __future__ import annotations

import email.policy
from email.parser import BytesParser
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.delivery import build_received, protocol_keyword
from smtpgate.envelope import Envelope, Recipient, SessionInfo

NOW = 1795306266.0  # Sun, 22 Nov 2026 00:11:06 +0000


def session(**kw: object) -> SessionInfo:
    base: dict[str, object] = {
        "session_id": "s1",
        "peer_ip": "192.0.2.1",
        "peer_port": 40000,
        "hostname": "mx.example.org",
        "helo_name": "helo.name",
        "esmtp": True,
    }
    base.update(kw)
    return SessionInfo(**base)  # type: ignore[arg-type]


def envelope(*rcpts: str, **params: str | None) -> Envelope:
    return Envelope("a@example.org", dict(params), [Recipient(r) for r in rcpts])


def test_example_from_the_brief() -> None:
    s = session(tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384")
    h = build_received(s, envelope("rcpt@example.com"), queue_id="1A2B3C", now=NOW)
    assert h == (
        b"Received: from helo.name (unknown [192.0.2.1])\r\n"
        b"\tby mx.example.org (smtpgate) with ESMTPS id 1A2B3C\r\n"
        b"\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
        b"\tfor <rcpt@example.com>; Sun, 22 Nov 2026 00:11:06 +0000\r\n"
    )


def test_no_for_clause_with_two_recipients_and_no_tls_line() -> None:
    s = session(tls_version="TLSv1.3", tls_cipher="X")
    h = build_received(
        s, envelope("a@x.example", "b@x.example"), queue_id="Q1", include_tls=False, now=NOW
    )
    assert h == (
        b"Received: from helo.name (unknown [192.0.2.1])\r\n"
        b"\tby mx.example.org (smtpgate) with ESMTPS id Q1;\r\n"
        b"\tSun, 22 Nov 2026 00:11:06 +0000\r\n"
    )
    assert b"for <" not in h


@pytest.mark.parametrize(
    ("kw", "params", "lmtp", "keyword"),
    [
        ({"esmtp": False}, {}, False, "SMTP"),
        ({"esmtp": False, "tls_version": "TLSv1.2"}, {}, False, "SMTP"),
        ({}, {}, False, "ESMTP"),
        ({"tls_version": "TLSv1.3"}, {}, False, "ESMTPS"),
        ({"auth_user": "bob"}, {}, False, "ESMTPA"),
        ({"tls_version": "TLSv1.3", "auth_user": "bob"}, {}, False, "ESMTPSA"),
        ({}, {"SMTPUTF8": None}, False, "UTF8SMTP"),
        ({"tls_version": "TLSv1.3"}, {"SMTPUTF8": None}, False, "UTF8SMTPS"),
        ({"auth_user": "bob"}, {"SMTPUTF8": None}, False, "UTF8SMTPA"),
        ({"tls_version": "TLSv1.3", "auth_user": "b"}, {"SMTPUTF8": None}, False, "UTF8SMTPSA"),
        ({}, {}, True, "LMTP"),
        ({"tls_version": "TLSv1.3"}, {}, True, "LMTPS"),
        ({"auth_user": "bob"}, {}, True, "LMTPA"),
        ({"tls_version": "TLSv1.3", "auth_user": "bob"}, {}, True, "LMTPSA"),
        ({}, {"SMTPUTF8": None}, True, "UTF8LMTP"),
    ],
)
def test_protocol_keyword(
    kw: dict[str, object], params: dict[str, str | None], lmtp: bool, keyword: str
) -> None:
    s = session(**kw)
    e = envelope("r@example.com", **params)
    assert protocol_keyword(s, e, lmtp=lmtp) == keyword
    h = build_received(s, e, queue_id="Q", lmtp=lmtp, now=NOW)
    assert f" with {keyword} id Q".encode() in h


@pytest.mark.parametrize(
    ("ip", "literal"),
    [
        ("2001:db8::1", b"(unknown [IPv6:2001:db8::1])"),
        ("2001:0DB8:0:0:0:0:0:1", b"(unknown [IPv6:2001:db8::1])"),
        ("::ffff:192.0.2.7", b"(unknown [192.0.2.7])"),
        ("fe80::1%eth0", b"(unknown [IPv6:fe80::1])"),
        ("", b"(unknown)"),
        ("not-an-ip", b"(unknown)"),
    ],
)
def test_peer_address_literal(ip: str, literal: bytes) -> None:
    h = build_received(session(peer_ip=ip), envelope("r@x.example"), queue_id="Q", now=NOW)
    assert h.startswith(b"Received: from helo.name " + literal + b"\r\n")


def test_auth_user_only_when_asked() -> None:
    s = session(auth_user="bob@example.org", tls_version="TLSv1.3")
    e = envelope("r@x.example")
    assert b"bob" not in build_received(s, e, queue_id="Q", now=NOW)
    h = build_received(s, e, queue_id="Q", include_auth=True, now=NOW)
    assert b"\t(Authenticated sender: bob@example.org)\r\n" in h


def test_no_helo() -> None:
    h = build_received(session(helo_name=None), envelope("r@x.example"), queue_id="Q", now=NOW)
    assert h.startswith(b"Received: from unknown (unknown [192.0.2.1])\r\n")


def test_date_is_rfc5322_utc() -> None:
    h = build_received(session(), envelope("r@x.example"), queue_id="Q", now=NOW)
    date = h.rstrip(b"\r\n").rsplit(b"; ", 1)[1].decode()
    assert date.endswith("+0000")
    assert parsedate_to_datetime(date).timestamp() == NOW


def test_injection_attempts_are_neutralised() -> None:
    s = session(
        helo_name="evil\r\nX-Injected: yes\r\n",
        auth_user="bob)\r\nX-Auth: 1 (",
        tls_version="TLSv1.3\r\nX-Tls: 1",
        tls_cipher="c)\nX-C: 1",
    )
    e = envelope("r@x.example>\r\nX-Rcpt: 1")
    h = build_received(s, e, queue_id="Q\r\nX-Id: 1", include_auth=True, now=NOW)
    lines = h.split(b"\r\n")
    assert lines[-1] == b""
    assert lines[0].startswith(b"Received: ")
    assert all(line.startswith(b"\t") for line in lines[1:-1])
    assert b"\n" not in h.replace(b"\r\n", b"")
    assert b"\r" not in h.replace(b"\r\n", b"")
    msg = BytesParser(policy=email.policy.default).parsebytes(h + b"\r\nbody\r\n")
    assert msg.keys() == ["Received"]


def test_long_values_are_bounded_and_folded() -> None:
    s = session(helo_name="h" * 1000)
    e = envelope("r" * 300 + "@example.com")
    h = build_received(s, e, queue_id="Q", now=NOW)
    assert len(h) < 1200
    assert b"h" * 256 not in h


def test_folding_keeps_lines_short() -> None:
    s = session(
        helo_name="a-rather-long-helo-name.subdomain.example.org",
        hostname="mx1.mail-cluster.example.net",
        tls_version="TLSv1.3",
        tls_cipher="TLS_CHACHA20_POLY1305_SHA256",
        peer_ip="2001:db8:1234:5678:9abc:def0:1234:5678",
    )
    e = envelope("someone.with.a.long.name@department.example.com")
    h = build_received(s, e, queue_id="ABCDEF0123456789", now=NOW)
    for line in h.split(b"\r\n")[:-1]:
        assert len(line) <= 78, line


@given(
    helo=st.text(max_size=300),
    user=st.text(max_size=100),
    rcpt=st.text(max_size=100),
    ip=st.one_of(st.ip_addresses().map(str), st.text(max_size=40)),
)
def test_always_one_well_formed_header(helo: str, user: str, rcpt: str, ip: str) -> None:
    s = session(helo_name=helo or None, auth_user=user or None, peer_ip=ip)
    h = build_received(s, envelope(rcpt), queue_id="Q1", include_auth=True, now=NOW)
    assert h.endswith(b"\r\n") and h.startswith(b"Received: from ")
    body = h[:-2]
    assert b"\n" not in body.replace(b"\r\n\t", b"")
    assert b"\r" not in body.replace(b"\r\n\t", b"")
    assert not any(0 < b < 32 and b != 9 for b in body.replace(b"\r\n", b""))
    msg = BytesParser(policy=email.policy.default).parsebytes(h + b"\r\nbody\r\n")
    assert msg.keys() == ["Received"]
    assert h.rstrip(b"\r\n").endswith(b"+0000")
