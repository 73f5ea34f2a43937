"""A message longer than every scanner's max_size is not loaded into memory for them: it
stays in its file, and each scanner's result says "skipped" (nothing is sent)."""

from __future__ import annotations

import smtplib
import socket
from typing import Any


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_long_message_over_every_max_size_stays_in_its_file(run_app) -> None:
    port = _closed_port()  # nothing listens: a scanner asked would fail, not skip
    app = run_app({
        "server": {"message_buffer_size": 4096},
        "scanner": [{"type": "clamav", "address": f"127.0.0.1:{port}", "max_size": 10000,
                     "on_error": "tempfail"},
                    {"type": "spamassassin", "address": f"127.0.0.1:{port}",
                     "max_size": 20000, "on_error": "tempfail"}],
    }, deliver=lambda e, m: None)
    seen: list[Any] = []

    def data(session: Any, tx: Any) -> None:
        seen.append((isinstance(tx.source(), bytes),
                     [(r.scanner, r.verdict) for r in tx.scan_results]))

    app.hooks.register("data", data)
    body = b"x" * 70 + b"\r\n"
    msg = b"Subject: long\r\n\r\n" + body * 2000  # 144 KB
    with smtplib.SMTP("127.0.0.1", app.port, timeout=30) as c:
        assert c.sendmail("a@example.org", ["b@example.net"], msg) == {}
    [(in_memory, results)] = seen
    assert not in_memory
    assert sorted(results) == [("clamav", "skipped"), ("spamassassin", "skipped")]
