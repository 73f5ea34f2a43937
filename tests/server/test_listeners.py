"""Per-listener settings and the rest of the ESMTP surface, over real sockets."""

from __future__ import annotations

import shutil
import smtplib
import ssl
import subprocess
import time

import pytest

from tests.support import Capture

MSG = b"Subject: listener\r\n\r\nbody\r\n.dot\r\n"


def test_lmtp_listener_per_recipient_replies(run_app, capture) -> None:
    app = run_app({"server": {"listen": ["127.0.0.1:0"]},
                   "listener": [{"address": "127.0.0.1:0", "protocol": "lmtp", "tls": "none"}]},
                  deliver=capture)
    lmtp_port = app.addresses[1][1]
    with smtplib.LMTP("127.0.0.1", lmtp_port) as s:
        code, _ = s.ehlo()  # smtplib.LMTP sends LHLO
        assert code == 250
        s.mail("a@example.org")
        s.rcpt("one@example.com")
        s.rcpt("two@example.com")
        s.putcmd("data")
        assert s.getreply()[0] == 354
        s.send(MSG + b".\r\n")
        first = s.getreply()
        second = s.getreply()
        assert first[0] == 250 and second[0] == 250
    received = capture.messages[0][1].split(b"\r\n\r\n")[0]
    assert b" with LMTP " in received
    # EHLO on the LMTP listener is refused; LHLO on the SMTP listener is unknown
    with smtplib.SMTP("127.0.0.1", lmtp_port) as s:
        assert s.ehlo()[0] == 500
    with smtplib.LMTP("127.0.0.1", app.addresses[0][1]) as s:
        assert s.ehlo()[0] == 500


def test_implicit_tls_listener(run_app, capture, cert_files, client_tls) -> None:
    app = run_app({"tls": {"certificate": cert_files["chain"], "key": cert_files["key"]},
                   "listener": [{"address": "127.0.0.1:0", "tls": "implicit"}]},
                  deliver=capture)
    port = app.addresses[1][1]
    with smtplib.SMTP_SSL("127.0.0.1", port, context=client_tls) as s:
        s.ehlo("c.test")
        assert not s.has_extn("starttls")
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        s.sendmail("a@example.org", ["b@example.com"], MSG)
    assert b"with ESMTPS" in capture.messages[0][1].split(b"\r\n\r\n")[0]
    if shutil.which("openssl"):
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet",
             "-CAfile", cert_files["ca"], "-verify_return_error", "-servername", "mx.test"],
            input=b"EHLO openssl.test\r\nQUIT\r\n", capture_output=True, timeout=30,
        )
        assert b"220 mx.test" in out.stdout and b"250-mx.test Hello openssl.test" in out.stdout
        assert b"221 2.0.0" in out.stdout


def test_plaintext_client_on_implicit_tls_listener_is_dropped(run_app, raw, cert_files) -> None:
    app = run_app({"tls": {"certificate": cert_files["chain"], "key": cert_files["key"]},
                   "listener": [{"address": "127.0.0.1:0", "tls": "implicit"}]})
    import socket

    s = socket.create_connection(("127.0.0.1", app.addresses[1][1]), timeout=10)
    s.sendall(b"EHLO plain\r\n")
    data = s.recv(100)
    assert not data.startswith(b"220")
    s.close()


def test_submission_listener_requires_auth(run_app, raw, cert_files, client_tls) -> None:
    import tempfile

    from smtpgate.auth.users import add_user

    users = tempfile.NamedTemporaryFile(delete=False, suffix=".txt").name
    add_user(users, "alice", "pw-alice")
    app = run_app({"tls": {"certificate": cert_files["chain"], "key": cert_files["key"]},
                   "auth": {"users_file": users},
                   "listener": [{"address": "127.0.0.1:0", "tls": "starttls",
                                 "require_auth": True}]}, deliver=lambda e, m: None)
    with smtplib.SMTP("127.0.0.1", app.addresses[1][1]) as s:
        s.ehlo()
        code, text = s.mail("a@example.org")
        assert (code, text[:5]) == (530, b"5.7.0")
        s.starttls(context=client_tls)
        s.ehlo()
        s.login("alice", "pw-alice")
        assert s.mail("a@example.org")[0] == 250


def test_greeting_template_help_and_disabled_extensions(run_app, raw) -> None:
    app = run_app({"server": {"greeting": "%H ESMTP smtpgate %V ready at %T",
                              "help_text": "Call the postmaster\nOr read the docs",
                              "disable_extensions": ["PIPELINING", "8BITMIME", "CHUNKING"]}})
    c = raw(app.port)
    assert c.greeting.startswith(b"220 mx.test ESMTP smtpgate 0.1.0 ready at ")
    ehlo = c.cmd("EHLO c.test")
    assert b"PIPELINING" not in ehlo and b"8BITMIME" not in ehlo and b"CHUNKING" not in ehlo
    assert b"SMTPUTF8" in ehlo
    assert c.cmd("HELP") == b"214-2.0.0 Call the postmaster\r\n214 2.0.0 Or read the docs"
    assert c.cmd("MAIL FROM:<a@b.example> BODY=8BITMIME").startswith(b"555 5.5.4")


def test_no_multiline_replies(run_app, raw) -> None:
    app = run_app({"server": {"multiline_replies": False, "help_text": "line one\nline two"}})
    c = raw(app.port)
    assert c.cmd("HELP") == b"214 2.0.0 line one"
    assert c.cmd("EHLO c.test").startswith(b"250-mx.test")  # EHLO stays multi-line


async def vrfy_check(session, address, kind):
    """An ``[hooks] address_check`` callable (the address_check plugin runs it)."""
    from smtpgate.reply import Reply

    if address.startswith("nobody"):
        return Reply(550, "5.1.1", "No such user")
    return None


def test_noehlo_and_vrfy_expn_switches(run_app, raw) -> None:
    app = run_app({"server": {"disable_extensions": ["EHLO"], "vrfy": True, "expn": True},
                   "hooks": {"address_check": ["tests.server.test_listeners:vrfy_check"]}})
    c = raw(app.port)
    assert c.cmd("EHLO c.test").startswith(b"500")
    assert c.cmd("HELO c.test").startswith(b"250")
    assert c.cmd("VRFY alice@example.com") == b"250 2.1.5 <alice@example.com>"
    assert c.cmd("VRFY nobody@example.com") == b"550 5.1.1 No such user"
    assert c.cmd("EXPN staff@example.com") == b"250 2.1.5 <staff@example.com>"


def test_max_error_recipients(run_app, raw) -> None:
    app = run_app({"server": {"max_error_recipients": 2}})
    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<>")
    assert c.cmd("RCPT TO:<a@example.com>").startswith(b"250")
    assert c.cmd("RCPT TO:<b@example.com>").startswith(b"250")
    assert c.cmd("RCPT TO:<c@example.com>") == b"452 4.5.3 Too many recipients for a message from <>"


def test_bdat_end_to_end_byte_exact(run_app, raw, capture) -> None:
    app = run_app(deliver=capture)
    c = raw(app.port)
    ehlo = c.cmd("EHLO c.test")
    assert b"250-CHUNKING" in ehlo and b"250-BINARYMIME" in ehlo
    c.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME")
    c.cmd("RCPT TO:<b@example.com>")
    part1 = b"Subject: bdat\r\n\r\n.not stuffed\r\n\x00\xff"
    part2 = b"binary\ntail"
    c.send(b"BDAT %d\r\n" % len(part1) + part1 + b"BDAT %d LAST\r\n" % len(part2) + part2)
    assert c.read_reply().startswith(b"250 2.0.0")
    assert c.read_reply().startswith(b"250 2.0.0")
    assert Capture.strip_received(capture.messages[0][1]) == part1 + part2


def test_load_average_limit(run_app, raw, tmp_path) -> None:
    """[server] max_load_average adds the load_average plugin; its loadavg_file option
    (a file in /proc/loadavg format) stands in for the kernel's figure."""
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("9.00 1.00 1.00 1/100 12345\n")
    app = run_app({"server": {"max_load_average": 4.0},
                   "plugin": [{"use": "load_average", "loadavg_file": str(loadavg)}]})
    c = raw(app.port)
    assert c.greeting == b"421 4.3.2 System overloaded, try again later"
    loadavg.write_text("1.00 1.00 1.00 1/100 12345\n")
    time.sleep(1.1)  # the reading is cached for a second
    assert raw(app.port).greeting.startswith(b"220")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_tls_min_version_on_implicit_listener(run_app, cert_files, ca) -> None:
    app = run_app({"tls": {"certificate": cert_files["chain"], "key": cert_files["key"]},
                   "listener": [{"address": "127.0.0.1:0", "tls": "implicit"}]})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, OSError)):
        smtplib.SMTP_SSL("127.0.0.1", app.addresses[1][1], context=ctx, timeout=5)


def test_deliverby_passed_upstream_and_no_dsn_in_proxy_mode(run_app, tmp_path) -> None:
    """Proxy mode does not offer DSN (issue 8, finding 16): it has no queue to send a
    "relayed" DSN from, so the client's MTA keeps the DSN duty (RFC 3461 §5.2.2)."""
    import socket

    from smtpgate.queue.store import QueueStore

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    spool = tmp_path / "upstream-spool"
    upstream = run_app({"relay": {"url": f"smtp://127.0.0.1:{dead}"},
                        "delivery": {"mode": "queue"},
                        "queue": {"path": str(spool), "min_backoff": 3600}})
    front = run_app({"relay": {"url": f"smtp://127.0.0.1:{upstream.port}"},
                     "delivery": {"mode": "proxy"}})
    with smtplib.SMTP("127.0.0.1", front.port) as s:
        s.ehlo()
        assert not s.has_extn("dsn") and s.has_extn("deliverby")
        s.mail("a@example.org", ["BY=600;R"])
        s.rcpt("b@example.com")
        code, text = s.data(MSG)
    assert code == 250 and b"Queued as" in text
    (entry,) = list(QueueStore(spool).entries())
    assert entry.mail_params["BY"] == "600;R"
