"""The ``greylist`` plugin: first attempt 451 4.7.1, a retry before the delay 451, after it
250, then the client whitelisted; two smtpgate processes sharing the SQLite file; Redis as
the store against a real redis-server."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from smtpgate.plugins.greylist import client_network
from tests.policy_auth.support import free_port

BASE = {"relay": {"relay_domains": ["example.net"], "local_networks": []}}


def cfg(store: str, **options: Any) -> dict[str, Any]:
    return {**BASE, "plugin": [{"use": "greylist", "store": store, "delay": 1,
                                "auto_whitelist": 1, **options}]}


def rcpt(port: int, sender: str, to: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
        c.ehlo("client.test")
        c.mail(sender)
        return c.rcpt(to)


def test_client_network() -> None:
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3::9") == "2001:db8:1:2::/64"
    assert client_network("::ffff:192.0.2.9") == "192.0.2.0/24"


def test_greylist_then_pass_then_whitelisted(run_app, tmp_path: Path) -> None:
    app = run_app(cfg(str(tmp_path / "g.sqlite")))
    code, text = rcpt(app.port, "ann@example.org", "bob@example.net")
    assert (code, text[:5]) == (451, b"4.7.1") and b"Greylisted" in text
    code, text = rcpt(app.port, "ann@example.org", "bob@example.net")
    assert (code, text[:5]) == (451, b"4.7.1")  # too early
    time.sleep(1.2)  # the configured delay (not a timing assertion)
    assert rcpt(app.port, "ann@example.org", "bob@example.net")[0] == 250
    assert rcpt(app.port, "ann@example.org", "bob@example.net")[0] == 250  # still accepted
    # auto_whitelist = 1: the client network passed once, so new triplets pass at once
    assert rcpt(app.port, "zoe@example.com", "carl@example.net")[0] == 250


def test_exempt_recipients_and_warn_mode(run_app, tmp_path: Path) -> None:
    app = run_app(cfg(str(tmp_path / "g.sqlite")))
    assert rcpt(app.port, "ann@example.org", "postmaster@example.net")[0] == 250
    warn = run_app(cfg(str(tmp_path / "w.sqlite"), mode="warn"))
    assert rcpt(warn.port, "ann@example.org", "bob@example.net")[0] == 250


def test_two_processes_share_the_sqlite_file(run_app, tmp_path: Path) -> None:
    store = tmp_path / "shared.sqlite"
    app = run_app(cfg(str(store)))
    assert rcpt(app.port, "ann@example.org", "bob@example.net")[0] == 451
    port = free_port()
    conf = tmp_path / "other.toml"
    conf.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\nhostname = "mx2.test"\n'
                    f'[maildir]\npath = "{tmp_path / "mail2"}"\n'
                    '[relay]\nrelay_domains = ["example.net"]\nlocal_networks = []\n'
                    f'[[plugin]]\nuse = "greylist"\nstore = "{store}"\ndelay = 1\n')
    proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no server"
                time.sleep(0.1)
        assert rcpt(port, "ann@example.org", "bob@example.net")[0] == 451  # seen by A
        time.sleep(1.2)
        assert rcpt(port, "ann@example.org", "bob@example.net")[0] == 250  # B accepts
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_redis_store(run_app, redis_url: str) -> None:
    app = run_app(cfg(redis_url))
    assert rcpt(app.port, "ann@example.org", "bob@example.net")[0] == 451
    other = run_app(cfg(redis_url))  # a second instance sharing the store
    assert rcpt(other.port, "ann@example.org", "bob@example.net")[0] == 451
    time.sleep(1.2)
    assert rcpt(other.port, "ann@example.org", "bob@example.net")[0] == 250
    assert rcpt(app.port, "zoe@example.com", "carl@example.net")[0] == 250  # whitelisted


def test_store_failure_lets_mail_through(run_app) -> None:
    app = run_app(cfg(f"redis://127.0.0.1:{free_port()}/0"))
    assert rcpt(app.port, "ann@example.org", "bob@example.net")[0] == 250
