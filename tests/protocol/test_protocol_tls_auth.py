"""STARTTLS (RFC 3207, CVE-2011-0411) and AUTH (RFC 4954, PLAIN RFC 4616, LOGIN)."""

from __future__ import annotations

import pytest

from smtpgate.protocol import (
    AuthCredentials,
    MailFrom,
    ProtocolConfig,
    StartTls,
    State,
)
from smtpgate.reply import R, Reply

from .helpers import EHLO, Dialogue, b64, parse_replies

TLS = ProtocolConfig(tls_available=True)

# ------------------------------------------------------------------- STARTTLS


def test_starttls_then_fresh_session() -> None:
    d = Dialogue(TLS)
    assert d.codes(EHLO + b"STARTTLS\r\n") == ["250", "220 2.0.0"]
    assert d.conn.tls_active and d.conn.state is State.INIT and d.conn.helo_name is None
    # State was reset: MAIL without a new EHLO is a bad sequence.
    assert d.codes(b"MAIL FROM:<a@b>\r\n") == ["503 5.5.1"]
    assert d.codes(EHLO + b"MAIL FROM:<a@b>\r\n") == ["250", "250 2.1.0"]
    assert d.codes(b"RSET\r\nSTARTTLS\r\n") == ["250 2.0.0", "503 5.5.1"]


@pytest.mark.parametrize("chunks", [None, 5])
def test_plaintext_pipelined_after_starttls_is_discarded(chunks: int | None) -> None:
    """CVE-2011-0411: commands injected after STARTTLS must not run inside TLS."""
    d = Dialogue(TLS, auto_tls=False)
    d.feed(EHLO)
    d.feed(b"STARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<v@x>\r\n", chunks=chunks)
    assert d.conn.state is State.TLS_PENDING
    assert [type(e) for e in d.events[1:]] == [StartTls]
    d.conn.receive_data(b"NOOP\r\n")  # plaintext bytes during the handshake: dropped
    d.conn.tls_established()
    assert d.codes(EHLO + b"MAIL FROM:<good@x>\r\n") == ["250", "250 2.1.0"]
    assert d.of_type(MailFrom) == [MailFrom("good@x", {})]


def test_injected_commands_same_packet_default_driver() -> None:
    d = Dialogue(TLS)
    d.feed(b"EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\n")
    assert not d.of_type(MailFrom)
    assert d.conn.tls_active


@pytest.mark.parametrize(
    ("cfg", "wire", "expected"),
    [
        (TLS, b"STARTTLS\r\n", ["503 5.5.1"]),  # before EHLO
        (TLS, EHLO + b"STARTTLS now\r\n", ["250", "501 5.5.4"]),
        (ProtocolConfig(), EHLO + b"STARTTLS\r\n", ["250", "502 5.5.1"]),
        (
            ProtocolConfig(tls_available=True, tls_active=True),
            EHLO + b"STARTTLS\r\n",
            ["250", "503 5.5.1"],
        ),
        (TLS, EHLO + b"MAIL FROM:<a@b>\r\nSTARTTLS\r\n", ["250", "250 2.1.0", "503 5.5.1"]),
        (TLS, b"HELO x\r\nSTARTTLS\r\n", ["250", "220 2.0.0"]),
    ],
)
def test_starttls_errors(cfg: ProtocolConfig, wire: bytes, expected: list[str]) -> None:
    assert Dialogue(cfg).codes(wire) == expected


def test_second_starttls_after_tls() -> None:
    d = Dialogue(TLS)
    assert d.codes(EHLO + b"STARTTLS\r\n") == ["250", "220 2.0.0"]
    assert d.codes(EHLO + b"STARTTLS\r\n") == ["250", "503 5.5.1"]
    lines = parse_replies(bytes(d.wire))[2][1]
    assert "STARTTLS" not in lines


def test_refused_starttls_keeps_session() -> None:
    d = Dialogue(TLS, overrides={StartTls: lambda c, e: R.TLS_NOT_AVAILABLE})
    assert d.codes(EHLO + b"STARTTLS\r\nMAIL FROM:<a@b>\r\n") == ["250", "454 4.7.0", "250 2.1.0"]
    assert not d.conn.tls_active


# ----------------------------------------------------------------------- AUTH

AUTH = ProtocolConfig(auth_mechanisms=("PLAIN", "LOGIN"), tls_active=True)
PLAIN_OK = b64("\0user\0secret")
PLAIN_BAD = b64("\0user\0wrong")


def creds(d: Dialogue) -> list[AuthCredentials]:
    return [e for e in d.events if isinstance(e, AuthCredentials)]


def test_plain_with_initial_response() -> None:
    d = Dialogue(AUTH)
    assert d.codes(EHLO + f"AUTH PLAIN {PLAIN_OK}\r\n".encode()) == ["250", "235 2.7.0"]
    assert creds(d) == [AuthCredentials("PLAIN", "user", "secret", "")]
    assert d.conn.authenticated


def test_plain_with_authzid() -> None:
    d = Dialogue(AUTH)
    d.feed(EHLO + f"AUTH plain {b64('admin' + chr(0) + 'user' + chr(0) + 'secret')}\r\n".encode())
    assert creds(d) == [AuthCredentials("PLAIN", "user", "secret", "admin")]


def test_plain_with_empty_challenge() -> None:
    d = Dialogue(AUTH)
    wire = d.feed(EHLO + b"AUTH PLAIN\r\n")
    assert wire.endswith(b"334 \r\n")
    assert d.conn.state is State.AUTH
    assert d.codes(f"{PLAIN_BAD}\r\n".encode()) == ["535 5.7.8"]
    assert creds(d) == [AuthCredentials("PLAIN", "user", "wrong", "")]
    assert not d.conn.authenticated and d.conn.state.name == "READY"


def test_login_two_challenges() -> None:
    d = Dialogue(AUTH)
    wire = d.feed(EHLO + b"AUTH LOGIN\r\n")
    assert wire.endswith(b"334 VXNlcm5hbWU6\r\n")
    assert d.feed(f"{b64('user')}\r\n".encode()) == b"334 UGFzc3dvcmQ6\r\n"
    assert d.codes(f"{b64('secret')}\r\n".encode()) == ["235 2.7.0"]
    assert creds(d) == [AuthCredentials("LOGIN", "user", "secret")]


def test_login_with_initial_response_pipelined() -> None:
    d = Dialogue(AUTH)
    out = d.codes(
        EHLO + f"AUTH LOGIN {b64('user')}\r\n{b64('secret')}\r\nMAIL FROM:<a@b>\r\n".encode()
    )
    assert out == ["250", "334", "235 2.7.0", "250 2.1.0"]


def test_login_empty_password_is_passed_on() -> None:
    d = Dialogue(AUTH)
    assert d.codes(EHLO + f"AUTH LOGIN {b64('user')}\r\n\r\n".encode()) == [
        "250",
        "334",
        "535 5.7.8",
    ]
    assert creds(d) == [AuthCredentials("LOGIN", "user", "")]


def test_equals_is_the_empty_initial_response() -> None:
    """RFC 4954 §4: "=" is an empty initial response, not (invalid) base64."""
    d = Dialogue(AUTH)
    # Empty PLAIN message is malformed (no NULs): 501, and the exchange is over.
    assert d.codes(EHLO + b"AUTH PLAIN =\r\n") == ["250", "501 5.5.2"]
    assert d.conn.state is State.READY
    # LOGIN: an empty password given as "=" reaches the driver.
    assert d.codes(f"AUTH LOGIN {b64('u')}\r\n=\r\n".encode()) == ["334", "535 5.7.8"]
    assert creds(d) == [AuthCredentials("LOGIN", "u", "")]


@pytest.mark.parametrize("mech", [b"PLAIN", b"LOGIN"])
def test_cancel(mech: bytes) -> None:
    d = Dialogue(AUTH)
    assert d.codes(EHLO + b"AUTH " + mech + b"\r\n*\r\nNOOP\r\n") == [
        "250",
        "334",
        "501 5.7.0",
        "250 2.0.0",
    ]
    d = Dialogue(AUTH)
    assert d.codes(EHLO + b"AUTH LOGIN " + b64("u").encode() + b"\r\n*\r\n") == [
        "250",
        "334",
        "501 5.7.0",
    ]
    assert not creds(d)


@pytest.mark.parametrize(
    "response",
    [
        b"not base64!",
        b"AHUAcHc",
        b"AHUAcHc==",
        b"AHUA cHc=",
        b"=AHUAcHc",
        b"////",
        b64(b"\xff\xfe\x00a\x00b").encode(),
        b64("no-nuls").encode(),
        b64("\0\0pw").encode(),
        b64("a\0b\0c\0d").encode(),
    ],
)
def test_malformed_plain(response: bytes) -> None:
    d = Dialogue(AUTH)
    assert d.codes(EHLO + b"AUTH PLAIN\r\n" + response + b"\r\n") == ["250", "334", "501 5.5.2"]
    assert not creds(d) and d.conn.state is State.READY
    if b" " not in response:
        d = Dialogue(AUTH)
        assert d.codes(EHLO + b"AUTH PLAIN " + response + b"\r\n") == ["250", "501 5.5.2"]
        assert not creds(d) and d.conn.state is State.READY


@pytest.mark.parametrize(
    ("cfg", "wire", "expected"),
    [
        (AUTH, EHLO + b"AUTH CRAM-MD5\r\n", ["250", "504 5.5.4"]),
        (AUTH, EHLO + b"AUTH\r\n", ["250", "501 5.5.4"]),
        (AUTH, EHLO + b"AUTH PLAIN a b\r\n", ["250", "501 5.5.4"]),
        (AUTH, b"AUTH PLAIN\r\n", ["503 5.5.1"]),  # before EHLO
        (AUTH, b"HELO x\r\nAUTH PLAIN\r\n", ["250", "503 5.5.1"]),  # HELO: no ESMTP
        (AUTH, EHLO + b"MAIL FROM:<a@b>\r\nAUTH PLAIN\r\n", ["250", "250 2.1.0", "503 5.5.1"]),
        (
            ProtocolConfig(auth_mechanisms=("PLAIN",)),
            EHLO + b"AUTH PLAIN\r\n",
            ["250", "538 5.7.11"],
        ),
        (
            ProtocolConfig(auth_mechanisms=("PLAIN",), auth_require_tls=False),
            EHLO + b"AUTH PLAIN\r\n",
            ["250", "334"],
        ),
        (
            ProtocolConfig(auth_mechanisms=("LOGIN",), tls_active=True),
            EHLO + b"AUTH PLAIN\r\n",
            ["250", "504 5.5.4"],
        ),
        (ProtocolConfig(), EHLO + b"AUTH PLAIN\r\n", ["250", "502 5.5.1"]),
    ],
)
def test_auth_errors(cfg: ProtocolConfig, wire: bytes, expected: list[str]) -> None:
    assert Dialogue(cfg).codes(wire) == expected


def test_second_auth_after_success() -> None:
    d = Dialogue(AUTH)
    out = d.codes(EHLO + f"AUTH PLAIN {PLAIN_OK}\r\nAUTH PLAIN {PLAIN_OK}\r\n".encode())
    assert out == ["250", "235 2.7.0", "503 5.5.1"]


def test_retry_after_failure() -> None:
    d = Dialogue(AUTH)
    out = d.codes(EHLO + f"AUTH PLAIN {PLAIN_BAD}\r\nAUTH PLAIN {PLAIN_OK}\r\n".encode())
    assert out == ["250", "535 5.7.8", "235 2.7.0"]


def test_auth_after_starttls() -> None:
    cfg = ProtocolConfig(auth_mechanisms=("PLAIN",), tls_available=True)
    d = Dialogue(cfg)
    out = d.codes(EHLO + f"AUTH PLAIN {PLAIN_OK}\r\nSTARTTLS\r\n".encode())
    assert out == ["250", "538 5.7.11", "220 2.0.0"]
    assert d.codes(EHLO + f"AUTH PLAIN {PLAIN_OK}\r\n".encode()) == ["250", "235 2.7.0"]


def test_authentication_is_forgotten_after_starttls() -> None:
    cfg = ProtocolConfig(auth_mechanisms=("PLAIN",), tls_available=True, auth_require_tls=False)
    d = Dialogue(cfg)
    d.feed(EHLO + f"AUTH PLAIN {PLAIN_OK}\r\n".encode())
    assert d.conn.authenticated
    d.feed(b"STARTTLS\r\n")
    assert not d.conn.authenticated


def test_password_never_in_repr_or_auto_reply() -> None:
    ev = AuthCredentials("PLAIN", "user", "hunter2-secret", "")
    assert "hunter2" not in repr(ev) and "hunter2" not in str(ev)
    d = Dialogue(AUTH)
    d.feed(EHLO + f"AUTH PLAIN {b64(chr(0) + 'u' + chr(0) + 'hunter2')}\r\n".encode())
    d.feed(b"AUTH LOGIN\r\n" + b64("u").encode() + b"\r\n" + b64("hunter2").encode() + b"\r\n")
    d.feed(b"AUTH PLAIN\r\n" + b"!!hunter2!!\r\n")
    for ev2 in d.events:
        assert "hunter2" not in repr(ev2)
        assert b64("hunter2")[:6] not in repr(ev2)
    assert b"hunter2" not in d.wire


def test_temporary_auth_failure_reply() -> None:
    d = Dialogue(AUTH, overrides={AuthCredentials: lambda c, e: R.AUTH_TEMP})
    assert d.codes(EHLO + f"AUTH PLAIN {PLAIN_OK}\r\nNOOP\r\n".encode()) == [
        "250",
        "454 4.7.0",
        "250 2.0.0",
    ]
    assert not d.conn.authenticated


def test_bare_lf_sasl_response() -> None:
    d = Dialogue(AUTH)
    # Only CRLF ends the SASL response: the bare LF and "NOOP" are part of it
    # (RFC 5321 §2.3.8), so it is refused once and NOOP is not run.
    assert d.codes(EHLO + b"AUTH PLAIN\r\n" + PLAIN_OK.encode() + b"\nNOOP\r\n") == [
        "250",
        "334",
        "501 5.5.2",
    ]
    assert not creds(d)
    assert d.codes(b"NOOP\r\n") == ["250 2.0.0"]  # the exchange is over


def test_sasl_challenge_replies_have_no_enhanced_code() -> None:
    d = Dialogue(AUTH, greeting=Reply(220, None, "hi"))
    wire = d.feed(EHLO + b"AUTH LOGIN\r\n")
    assert wire.endswith(b"\r\n334 VXNlcm5hbWU6\r\n")
