"""The ``ratelimit`` plugin: the limit reached gives 421/450 and resets after the window;
memory and SQLite stores; exceptions; warn mode."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path
from typing import Any

import pytest

BASE = {"relay": {"relay_domains": ["example.net"], "local_networks": []},
        "server": {"limit_exceptions": []}}


def cfg(**options: Any) -> dict[str, Any]:
    return {**BASE, "plugin": [{"use": "ratelimit", "window": 1, **options}]}


def mail(port: int, sender: str = "ann@example.org") -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        return c.mail(sender)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_messages_per_client_and_reset(run_app, tmp_path: Path, store: str) -> None:
    spec = str(tmp_path / "rl.sqlite") if store == "sqlite" else "memory"
    app = run_app(cfg(messages_per_client=2, store=spec))
    assert mail(app.port)[0] == 250
    assert mail(app.port)[0] == 250
    code, text = mail(app.port)
    assert (code, text[:5]) == (451, b"4.7.1") and b"127.0.0.1" in text
    time.sleep(1.1)  # the window passes (the configured window, not a timing assertion)
    assert mail(app.port)[0] == 250


def test_connections_per_client_421_and_close(run_app) -> None:
    app = run_app(cfg(connections_per_client=1))
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        assert c.noop()[0] == 250
    with pytest.raises(smtplib.SMTPConnectError) as info:
        smtplib.SMTP("127.0.0.1", app.port, timeout=30)
    assert info.value.smtp_code == 421 and info.value.smtp_error.startswith(b"4.7.0")


def test_recipients_per_client(run_app) -> None:
    app = run_app(cfg(recipients_per_client=2))
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail("ann@example.org")
        assert [c.rcpt(f"r{i}@example.net")[0] for i in range(3)] == [250, 250, 451]


def test_messages_per_sender(run_app) -> None:
    app = run_app(cfg(messages_per_sender=1))
    assert mail(app.port, "a@example.org")[0] == 250
    assert mail(app.port, "a@example.org")[0] == 451
    assert mail(app.port, "b@example.org")[0] == 250


def test_exceptions_and_warn_mode(run_app) -> None:
    app = run_app({**cfg(messages_per_client=1), "server": {"limit_exceptions": ["127.0.0.1"]}})
    assert [mail(app.port)[0] for _ in range(3)] == [250, 250, 250]
    warn = run_app(cfg(messages_per_client=1, mode="warn"))
    assert [mail(warn.port)[0] for _ in range(3)] == [250, 250, 250]


def test_redis_store_shared_by_two_instances(run_app, redis_url: str) -> None:
    a = run_app(cfg(messages_per_client=2, store=redis_url))
    b = run_app(cfg(messages_per_client=2, store=redis_url))
    assert [mail(a.port)[0], mail(b.port)[0], mail(a.port)[0]] == [250, 250, 451]
