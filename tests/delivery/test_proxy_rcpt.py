"""Proxy mode per recipient (issue 8, finding 15), as Postfix's ``smtpd_proxy_filter``.

The upstream transaction opens at MAIL, each RCPT is forwarded as the client sends it and
the upstream's reply is the client's; only accepted recipients are in the upstream
transaction; the end-of-data reply is the upstream's; RSET, a new MAIL and the end of the
session abort the upstream transaction. Real aiosmtpd upstreams on loopback.
"""

from __future__ import annotations

import smtplib
from typing import Any

from smtpgate.hooks import Transaction

from .conftest import CaptureHandler, StartUpstream, Upstream, free_port

MSG = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: proxy\r\n\r\nbody\r\n"


def proxy_cfg(port: int) -> dict[str, Any]:
    return {"relay": {"url": f"smtp://127.0.0.1:{port}", "timeout": 5},
            "delivery": {"mode": "proxy"}}


def refusing(*addresses: str) -> CaptureHandler:
    return CaptureHandler(refuse_rcpt={a: f"550 5.1.1 <{a}>: Recipient address rejected"
                                       for a in addresses})


def test_upstream_refusing_one_of_two_recipients(run_app, raw, start_upstream: StartUpstream
                                                 ) -> None:
    up = start_upstream(handler=refusing("bounce-me@example.net"))
    app = run_app(proxy_cfg(up.port))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<sender@client.test>") == b"250 2.1.0 OK"
    assert up.handler.commands == ["MAIL sender@client.test"]  # opened at MAIL
    assert c.cmd("RCPT TO:<bounce-me@example.net>") == (
        b"550 5.1.1 <bounce-me@example.net>: Recipient address rejected")
    assert c.cmd("RCPT TO:<ok7@example.net>") == b"250 2.1.5 OK"
    assert up.handler.commands[-1] == "RCPT ok7@example.net"  # forwarded before DATA
    assert c.cmd("DATA").startswith(b"354")
    c.send(MSG + b".\r\n")
    assert c.read_reply() == b"250 2.0.0 Ok: queued as CAPTURE1"  # the upstream's reply
    [msg] = up.handler.messages
    assert msg.rcpt_tos == ["ok7@example.net"]
    assert msg.mail_from == "sender@client.test"
    assert msg.content.endswith(MSG) and msg.content.startswith(b"Received: ")


def test_smtplib_client_sees_per_recipient_replies(run_app, start_upstream: StartUpstream
                                                   ) -> None:
    up = start_upstream(handler=refusing("bounce-me@example.net"))
    app = run_app(proxy_cfg(up.port))
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        refused = s.sendmail("sender@client.test", ["bounce-me@example.net", "ok7@example.net"],
                             MSG)
    assert refused == {"bounce-me@example.net": (
        550, b"5.1.1 <bounce-me@example.net>: Recipient address rejected")}
    assert [m.rcpt_tos for m in up.handler.messages] == [["ok7@example.net"]]


def test_temporary_refusal_and_all_refused(run_app, raw, start_upstream: StartUpstream) -> None:
    handler = CaptureHandler(refuse_rcpt={"busy@example.net": "450 4.2.1 Mailbox busy"})
    up = start_upstream(handler=handler)
    app = run_app(proxy_cfg(up.port))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<s@client.test>")
    assert c.cmd("RCPT TO:<busy@example.net>") == b"450 4.2.1 Mailbox busy"
    assert c.cmd("DATA").startswith(b"554")  # no valid recipients: nothing reaches DATA
    assert up.handler.messages == []


def test_rset_new_mail_and_quit_abort_upstream(run_app, raw, upstream: Upstream) -> None:
    app = run_app(proxy_cfg(upstream.port))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<first@client.test>")
    c.cmd("RCPT TO:<x@example.net>")
    before = upstream.handler.rset_count
    assert c.cmd("RSET").startswith(b"250")
    assert upstream.handler.rset_count == before + 1
    c.cmd("MAIL FROM:<second@client.test>")
    c.cmd("RCPT TO:<y@example.net>")
    c.cmd("DATA")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"250")
    [msg] = upstream.handler.messages
    assert (msg.mail_from, msg.rcpt_tos) == ("second@client.test", ["y@example.net"])
    c.cmd("MAIL FROM:<third@client.test>")
    c.cmd("RCPT TO:<z@example.net>")
    rsets = upstream.handler.rset_count
    assert c.cmd("QUIT").startswith(b"221")
    assert c.closed_by_peer()
    # the session's end aborted the open upstream transaction (RSET) ...
    app_wait = 0
    while upstream.handler.rset_count == rsets and app_wait < 200:
        import time

        time.sleep(0.02)
        app_wait += 1
    assert upstream.handler.rset_count == rsets + 1
    assert len(upstream.handler.messages) == 1  # ... and nothing more was sent


def test_upstream_unreachable_at_mail(run_app, raw) -> None:
    port = free_port()
    app = run_app(proxy_cfg(port))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<s@client.test>") == (
        f"451 4.4.1 Connection to 127.0.0.1:{port} failed: connection refused".encode())
    assert c.cmd("RCPT TO:<x@example.net>").startswith(b"503")


def test_upstream_refuses_sender(run_app, raw, start_upstream: StartUpstream) -> None:
    up = start_upstream(handler=CaptureHandler(refuse_mail="553 5.7.1 Sender not welcome"))
    app = run_app(proxy_cfg(up.port))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<s@client.test>") == b"553 5.7.1 Sender not welcome"


def test_data_hook_removing_a_recipient_replays_the_envelope(
    run_app, raw, upstream: Upstream
) -> None:
    app = run_app(proxy_cfg(upstream.port))

    @app.hook("data")
    def drop(session: Any, tx: Transaction) -> None:
        tx.delete_recipient("drop@example.net")

    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<s@client.test>")
    c.cmd("RCPT TO:<keep@example.net>")
    c.cmd("RCPT TO:<drop@example.net>")
    c.cmd("DATA")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"250 2.0.0")
    [msg] = upstream.handler.messages
    assert msg.rcpt_tos == ["keep@example.net"]
    assert upstream.handler.commands == [
        "MAIL s@client.test", "RCPT keep@example.net", "RCPT drop@example.net",
        "MAIL s@client.test", "RCPT keep@example.net",  # after RSET
    ]


def test_data_hook_adding_a_recipient_sends_it(run_app, raw, start_upstream: StartUpstream
                                               ) -> None:
    up = start_upstream(handler=refusing("refused-archive@example.net"))
    app = run_app(proxy_cfg(up.port))
    archive = ["archive@example.net"]

    @app.hook("data")
    def add(session: Any, tx: Transaction) -> None:
        tx.add_recipient(archive[0])

    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<s@client.test>")
    c.cmd("RCPT TO:<b@example.net>")
    c.cmd("DATA")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"250 2.0.0")
    [msg] = up.handler.messages
    assert msg.rcpt_tos == ["b@example.net", "archive@example.net"]

    # A hook-added recipient the upstream refuses refuses the message (nothing sent):
    archive[0] = "refused-archive@example.net"
    c.cmd("MAIL FROM:<s@client.test>")
    c.cmd("RCPT TO:<b@example.net>")
    c.cmd("DATA")
    c.send(MSG + b".\r\n")
    assert c.read_reply() == (b"550 5.1.1 Upstream refused <refused-archive@example.net>: "
                              b"<refused-archive@example.net>: Recipient address rejected")
    assert len(up.handler.messages) == 1


def test_data_refused_upstream_is_the_reply(run_app, raw, start_upstream: StartUpstream) -> None:
    up = start_upstream(handler=CaptureHandler(data_reply="554 5.7.1 Spam rejected"))
    app = run_app(proxy_cfg(up.port))
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<s@client.test>")
    c.cmd("RCPT TO:<b@example.net>")
    c.cmd("DATA")
    c.send(MSG + b".\r\n")
    assert c.read_reply() == b"554 5.7.1 Spam rejected"


def test_dsn_not_offered_in_proxy_mode(run_app, upstream: Upstream) -> None:
    """No queue to send a "relayed" DSN from: DSN is not advertised, so the client's MTA
    keeps that duty (finding 16, RFC 3461 §5.2.2)."""
    app = run_app(proxy_cfg(upstream.port))
    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo()
        assert not s.has_extn("dsn")
