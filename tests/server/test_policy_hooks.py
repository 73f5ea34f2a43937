"""Relay control and hooks, end to end over loopback."""

from __future__ import annotations

import asyncio
import smtplib
import sys
import textwrap
from pathlib import Path

import pytest

from smtpgate.hooks import Transaction, drop, reject, tempfail
from smtpgate.reply import Reply
from tests.support import Capture

MSG = b"From: a@example.org\r\nSubject: hooks\r\n\r\nbody\r\n"


def test_relay_denied_from_non_local_network(run_app, raw, capture) -> None:
    app = run_app(
        {"relay": {"local_networks": ["10.0.0.0/8"], "relay_domains": ["example.com"]}},
        deliver=capture,
    )
    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<b@example.com>").startswith(b"250")
    assert c.cmd("RCPT TO:<b@elsewhere.org>") == b"550 5.7.1 Relaying denied"
    # run-time change through the API (nssmtpd ns_smtpd relay add / local add)
    app.relay.relay_add("elsewhere.org")
    assert c.cmd("RCPT TO:<b@elsewhere.org>").startswith(b"250")
    assert c.cmd("RCPT TO:<x@third.net>").startswith(b"550 5.7.1")
    app.relay.local_add("127.0.0.1")
    assert c.cmd("RCPT TO:<x@third.net>").startswith(b"250")
    app.relay.local_clear()
    app.relay.relay_clear()
    assert c.cmd("RCPT TO:<y@example.com>").startswith(b"550 5.7.1")


def test_rcpt_hook_custom_reply_and_async(run_app, raw, capture) -> None:
    app = run_app(deliver=capture)

    @app.hook("rcpt")
    async def only_alice(session, tx: Transaction, rcpt):
        await asyncio.sleep(0)
        if rcpt.address.split("@")[0] != "alice":
            return reject("No such user here", code=550, enhanced="5.1.1")
        rcpt.flags.add("checked")
        return None

    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == b"550 5.1.1 No such user here"
    assert c.cmd("RCPT TO:<alice@example.com>").startswith(b"250")
    c.cmd("DATA")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"250")
    env, _ = capture.messages[0]
    assert env.recipients == ["alice@example.com"]
    assert env.rcpt_to[0].flags == {"checked"}


def test_data_hook_edits_message_and_envelope(run_app, capture) -> None:
    app = run_app(deliver=capture)

    @app.hook("data")
    def edit(session, tx: Transaction):
        assert tx.get_header("subject") == "hooks"
        tx.add_header("X-Checked", "yes")
        tx.add_recipient("archive@example.com")
        tx.mail_from = "bounces@example.org"
        tx.set_reply(Reply(250, "2.0.0", "Thanks, checked"))

    with smtplib.SMTP("127.0.0.1", app.port) as s:
        s.ehlo()
        s.mail("a@example.org")
        s.rcpt("b@example.com")
        code, text = s.data(MSG)
        assert (code, text) == (250, b"2.0.0 Thanks, checked")
    env, message = capture.messages[0]
    assert env.mail_from == "bounces@example.org"
    assert env.recipients == ["b@example.com", "archive@example.com"]
    body = Capture.strip_received(message)
    assert b"X-Checked: yes\r\n" in body
    assert body.endswith(b"\r\n\r\nbody\r\n")


def test_hook_exception_is_451_never_250(run_app, raw, capture, caplog) -> None:
    app = run_app(deliver=capture)

    @app.hook("data")
    def broken(session, tx):
        raise RuntimeError("boom")

    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@example.org>")
    c.cmd("RCPT TO:<b@example.com>")
    c.cmd("DATA")
    c.send(MSG + b".\r\n")
    assert c.read_reply().startswith(b"451 4.3.0")
    assert capture.messages == []
    assert "boom" in caplog.text


def test_connect_hook_reject_then_only_quit(run_app, raw) -> None:
    app = run_app()
    app.hooks.register("connect", lambda session: reject("Go away", code=554, enhanced="5.7.1"))
    c = raw(app.port)
    assert c.greeting == b"554 5.7.1 Go away"
    assert c.cmd("EHLO c.test").startswith(b"503")
    assert c.cmd("MAIL FROM:<a@b.c>").startswith(b"503")
    assert c.cmd("QUIT").startswith(b"221")


def test_mail_hook_tempfail_and_drop(run_app, raw) -> None:
    app = run_app()

    @app.hook("mail")
    def policy(session, tx):
        if tx.mail_from.startswith("slow"):
            return tempfail("Try later", code=450, enhanced="4.7.1")
        if tx.mail_from.startswith("evil"):
            return drop("Bye now")
        return None

    c = raw(app.port)
    c.cmd("EHLO c.test")
    assert c.cmd("MAIL FROM:<slow@example.org>") == b"450 4.7.1 Try later"
    assert c.cmd("MAIL FROM:<evil@example.org>") == b"421 4.7.0 Bye now"
    assert c.closed_by_peer()


def test_helo_and_quit_and_error_hooks(run_app, raw) -> None:
    app = run_app()
    events: list[str] = []
    app.hooks.register("helo", lambda s, name: events.append(f"helo {name}"))
    app.hooks.register("quit", lambda s: events.append("quit"))
    app.hooks.register("error", lambda s, reply, cmd: events.append(f"error {reply.code}"))
    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("BOGUS")
    c.cmd("QUIT")
    assert c.closed_by_peer()
    for _ in range(50):
        if "quit" in events:
            break
        import time

        time.sleep(0.02)
    assert events == ["helo c.test", "error 500", "quit"]


def test_hooks_from_config_module(run_app, raw, tmp_path: Path, monkeypatch) -> None:
    mod = tmp_path / "site_hooks_mod.py"
    mod.write_text(textwrap.dedent("""
        from smtpgate.hooks import reject
        def check_rcpt(session, transaction, recipient):
            if recipient.address.startswith("spamtrap@"):
                return reject("Spamtrap", code=550, enhanced="5.7.1")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = run_app({"hooks": {"rcpt": "site_hooks_mod:check_rcpt"}})
    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<spamtrap@example.com>") == b"550 5.7.1 Spamtrap"
    assert c.cmd("RCPT TO:<ok@example.com>").startswith(b"250")
    sys.modules.pop("site_hooks_mod", None)


def test_hook_config_import_error_names_key(run_app) -> None:
    from smtpgate.errors import ConfigError

    with pytest.raises(ConfigError, match="hooks.rcpt"):
        run_app({"hooks": {"rcpt": "no_such_module_xyz:check"}})


def test_hook_timeout_is_tempfail(run_app, raw) -> None:
    app = run_app({"hooks": {"timeout": 0.2}})

    @app.hook("rcpt")
    async def slow(session, tx, rcpt):
        await asyncio.sleep(5)

    c = raw(app.port)
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@example.org>")
    assert c.cmd("RCPT TO:<b@example.com>").startswith(b"451 4.3.0")
