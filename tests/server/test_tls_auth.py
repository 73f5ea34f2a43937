"""STARTTLS (RFC 3207) and AUTH (RFC 4954) against real clients with trustme certificates."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
from pathlib import Path

import pytest

from smtpgate.auth.users import add_user
from smtpgate.errors import ConfigError

MSG = b"Subject: tls\r\n\r\nbody\r\n"


def tls_cfg(cert_files: dict[str, str], separate_key: bool = True) -> dict:
    if separate_key:
        return {"tls": {"certificate": cert_files["chain"], "key": cert_files["key"]}}
    return {"tls": {"certificate": cert_files["both"]}}


@pytest.mark.parametrize("separate_key", [True, False])
def test_starttls_smtplib(run_app, cert_files, client_tls, capture, separate_key) -> None:
    app = run_app(tls_cfg(cert_files, separate_key), deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo("c.test")
        assert s.has_extn("starttls")
        code, _ = s.starttls(context=client_tls)
        assert code == 220
        s.ehlo("c.test")
        assert not s.has_extn("starttls")
        code, text = s.docmd("STARTTLS")
        assert code == 503
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        s.sendmail("a@example.org", ["b@example.com"], MSG)
    received = capture.messages[0][1].split(b"\r\n\r\n")[0]
    assert b"with ESMTPS" in received
    assert b"(using TLSv1." in received


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls12_minimum(run_app, cert_files, ca) -> None:
    app = run_app(tls_cfg(cert_files))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo()
        with pytest.raises((ssl.SSLError, OSError, smtplib.SMTPServerDisconnected)):
            s.starttls(context=ctx)


def test_plaintext_injection_after_starttls_discarded(run_app, raw, cert_files, client_tls,
                                                      capture) -> None:
    """CVE-2011-0411: commands pipelined after STARTTLS in plaintext must be dropped."""
    app = run_app(tls_cfg(cert_files), deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
    assert c.read_reply().startswith(b"220 2.0.0")
    assert c.buf == b""
    tls = client_tls.wrap_socket(c.sock, server_hostname="mx.test")
    c.sock = tls
    # The injected MAIL must not have been executed: the first reply we get is to our NOOP,
    # and MAIL without a new EHLO is a bad sequence (state was reset by the handshake).
    assert c.cmd("NOOP") == b"250 2.0.0 OK"
    assert c.cmd("MAIL FROM:<a@example.org>").startswith(b"503 5.5.1")
    assert c.cmd("EHLO c.test").startswith(b"250-mx.test")


def test_starttls_before_ehlo_and_handshake_garbage(run_app, raw, cert_files) -> None:
    app = run_app(tls_cfg(cert_files))
    c = raw(app.port)
    assert c.cmd("STARTTLS").startswith(b"503 5.5.1")
    c.cmd("EHLO c.test")
    assert c.cmd("STARTTLS").startswith(b"220")
    c.send(b"this is not a TLS client hello\r\n" * 10)
    assert c.closed_by_peer()
    # the server survives
    c2 = raw(app.port)
    assert c2.cmd("EHLO c.test").startswith(b"250")


def test_bad_certificate_is_config_error(run_app, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="tls.certificate"):
        run_app({"tls": {"certificate": str(bad)}})


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    path = tmp_path / "users.txt"
    add_user(path, "alice", "s3cret!")
    return str(path)


def test_auth_not_offered_before_tls(run_app, raw, cert_files, users_file, client_tls) -> None:
    app = run_app({**tls_cfg(cert_files), "auth": {"users_file": users_file}})
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo("c.test")
        assert not s.has_extn("auth")
        code, text = s.docmd("AUTH", "PLAIN " + base64.b64encode(b"\0alice\0s3cret!").decode())
        assert code == 538
        s.starttls(context=client_tls)
        s.ehlo("c.test")
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        code, text = s.login("alice", "s3cret!")
        assert code == 235


def test_auth_plain_login_and_relay(run_app, users_file, capture) -> None:
    cfg = {
        "auth": {"users_file": users_file, "require_tls": False},
        "relay": {"local_networks": [], "relay_domains": []},
        "server": {"received_auth": True},
    }
    app = run_app(cfg, deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo("c.test")
        # Not authenticated and not local: relaying is denied.
        s.mail("a@example.org")
        code, text = s.rcpt("b@example.com")
        assert (code, text[:5]) == (550, b"5.7.1")
        s.rset()
        s.user, s.password = "alice", "s3cret!"
        code, _ = s.auth("LOGIN", s.auth_login)
        assert code == 235
        code, text = s.docmd("AUTH", "PLAIN AGFsaWNlAHMzY3JldCE=")
        assert code == 503
        s.sendmail("a@example.org", ["b@example.com"], MSG)
    received = capture.messages[0][1].split(b"\r\n\r\n")[0]
    assert b"ESMTPA" in received
    assert b"alice" in received


@pytest.mark.parametrize(
    "exchange, expected",
    [
        ([b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong")], b"535 5.7.8"),
        ([b"AUTH PLAIN", b"*"], b"501 5.7.0"),
        ([b"AUTH PLAIN", b"!!notbase64"], b"501 5.5.2"),
        ([b"AUTH LOGIN", base64.b64encode(b"alice"), b"*"], b"501 5.7.0"),
        ([b"AUTH CRAM-MD5"], b"504 5.5.4"),
        ([b"AUTH PLAIN " + base64.b64encode(b"bob\0alice\0s3cret!")], b"535 5.7.8"),
        ([b"AUTH PLAIN", base64.b64encode(b"\0alice\0s3cret!")], b"235 2.7.0"),
    ],
)
def test_auth_exchanges(run_app, raw, users_file, exchange, expected) -> None:
    app = run_app({"auth": {"users_file": users_file, "require_tls": False}})
    c = raw(app.port)
    c.cmd("EHLO c.test")
    reply = b""
    for step in exchange:
        reply = c.cmd(step)
    assert reply.startswith(expected), reply


def test_auth_failures_rate_limited(run_app, raw, users_file) -> None:
    app = run_app({"auth": {"users_file": users_file, "require_tls": False, "max_failures": 2}})
    c = raw(app.port)
    c.cmd("EHLO c.test")
    bad = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0nope")
    good = b"AUTH PLAIN " + base64.b64encode(b"\0alice\0s3cret!")
    assert c.cmd(bad).startswith(b"535 5.7.8")
    assert c.cmd(bad).startswith(b"535 5.7.8")
    assert c.cmd(good).startswith(b"454 4.7.0")


def test_auth_callable_authenticator(run_app, raw) -> None:
    seen = []

    def check(username: str, password: str) -> bool:
        seen.append(username)
        return password == "pw"

    app = run_app({"auth": {"require_tls": False}}, authenticator=check)
    c = raw(app.port)
    c.cmd("EHLO c.test")
    assert c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\0carol\0pw")).startswith(b"235")
    assert seen == ["carol"]


def test_tls_connection_survives_abrupt_close(run_app, cert_files, client_tls) -> None:
    app = run_app(tls_cfg(cert_files))
    sock = socket.create_connection(("127.0.0.1", app.port))
    sock.recv(1024)
    sock.sendall(b"EHLO c\r\nSTARTTLS\r\n")
    sock.close()
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        assert s.ehlo()[0] == 250
