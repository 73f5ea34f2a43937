"""ZMailer-style HELO rules and the address-check hook, end to end."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def checker_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "addrcheck_mod.py").write_text(textwrap.dedent("""
        from smtpgate.reply import Reply
        SEEN = []
        def check(session, address, kind):
            SEEN.append((kind, address))
            if address.startswith("unknown@"):
                return Reply(550, "5.1.1", "No such mailbox")
            return None
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "addrcheck_mod:check"
    sys.modules.pop("addrcheck_mod", None)


def test_helo_rule_flags(run_app, raw, checker_module) -> None:
    app = run_app({
        "hooks": {"address_check": checker_module},
        "helo_rule": [
            {"pattern": "*.bad.example", "flags": "!Go away, spammer"},
            {"pattern": "strict.example", "flags": "ftRh"},
            {"pattern": "wince*", "flags": "S"},
        ],
    }, deliver=lambda e, m: None)
    c = raw(app.port)
    assert c.cmd("EHLO mx.bad.example").startswith(b"550")
    assert b"Go away, spammer" in c.cmd("EHLO host.bad.example")
    c2 = raw(app.port)
    assert c2.cmd("EHLO strict.example").startswith(b"250")
    assert c2.cmd("MAIL FROM:<unknown@example.org>") == b"550 5.1.1 No such mailbox"
    assert c2.cmd("MAIL FROM:<ok@example.org>").startswith(b"250")
    assert c2.cmd("RCPT TO:<unknown@example.com>") == b"550 5.1.1 No such mailbox"
    assert c2.cmd("RCPT TO:<fine@example.com>").startswith(b"250")
    import addrcheck_mod  # type: ignore[import-not-found]

    assert ("mail", "ok@example.org") in addrcheck_mod.SEEN
    assert ("rcpt", "fine@example.com") in addrcheck_mod.SEEN
    c3 = raw(app.port)
    c3.cmd("EHLO wince-device")
    assert c3.cmd("MAIL FROM:user@example.org").startswith(b"250")
    c4 = raw(app.port)
    c4.cmd("EHLO other.example")
    assert c4.cmd("MAIL FROM:user@example.org").startswith(b"501")


def test_helo_syntax_flag(run_app, raw) -> None:
    app = run_app({"helo_rule": [{"pattern": "*", "flags": "h"}]})
    c = raw(app.port)
    assert c.cmd("EHLO localhost").startswith(b"501")
    assert c.cmd("EHLO [127.0.0.1]").startswith(b"250")
    assert c.cmd("EHLO mail.example.org").startswith(b"250")


def test_tarpit_delays_error_replies(run_app, raw) -> None:
    import time

    app = run_app({"server": {"tarpit_initial": 0.2, "tarpit_exponent": 1.0,
                              "tarpit_max": 0.5, "max_errors": 50}})
    c = raw(app.port)
    t0 = time.monotonic()
    assert c.cmd("BOGUS").startswith(b"500")
    t1 = time.monotonic()
    assert c.cmd("BOGUS").startswith(b"500")
    t2 = time.monotonic()
    assert c.cmd("NOOP").startswith(b"250")
    t3 = time.monotonic()
    assert 0.15 < t1 - t0 < 1.0 and 0.35 < t2 - t1 < 1.5 and t3 - t2 < 0.15


def test_connection_flood_escalates_to_silent_close(run_app, raw) -> None:
    import socket

    # limit_exceptions = []: 127.0.0.1 (a local network) is otherwise exempt
    app = run_app({"server": {"max_connections_per_ip": 1, "limit_exceptions": []}})
    socks = []
    greetings = []
    for _ in range(6):
        s = socket.create_connection(("127.0.0.1", app.port), timeout=5)
        socks.append(s)
        try:
            greetings.append(s.recv(200))
        except OSError:
            greetings.append(b"")
    assert greetings[0].startswith(b"220")
    assert greetings[1].startswith(b"421 4.7.0")
    assert b"" in greetings[4:]  # past 4x the limit: closed without a word
    for s in socks:
        s.close()
