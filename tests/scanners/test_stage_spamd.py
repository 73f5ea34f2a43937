"""The scanner stage end to end: smtpgate with a real spamd in the data phase."""

from __future__ import annotations

import asyncio
import smtplib
import socket
from pathlib import Path

from smtpgate.hooks import accept
from tests.support import CORPUS  # noqa: E402


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def send(port: int, message: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo("client.test")
        s.mail("sender@example.org")
        s.rcpt("rcpt@example.com")
        return s.data(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def headers_of(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


def test_gtube_rejected(run_app, capture, spamd_server) -> None:
    app = run_app({"scanner": [{"type": "spamassassin", "address": spamd_server,
                                "reject_text": "Spam go away"}]}, deliver=capture)
    gtube = crlf((CORPUS / "rspamd__functional_messages_gtube.eml").read_bytes())
    code, text = send(app.port, gtube)
    assert (code, text) == (550, b"5.7.1 Spam go away")
    assert capture.messages == []


def test_clean_message_tagged_and_delivered(run_app, capture, spamd_server) -> None:
    app = run_app({"scanner": [{"type": "spamassassin", "address": spamd_server}]},
                  deliver=capture)
    original = crlf((CORPUS / "debian-sa__sample-nonspam.eml").read_bytes())
    code, _ = send(app.port, original)
    assert code == 250
    message = capture.messages[0][1]
    head = headers_of(message)
    assert b"X-Spam-Flag: NO" in head
    assert b"X-Spam-Status: No, score=" in head
    assert b"X-Smtpgate-Scan: mx.test; spamassassin=clean (score=" in head
    # Delivered unchanged except for the added header fields.
    assert message.endswith(original.split(b"\r\n\r\n", 1)[1])
    for line in original.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        assert line in head


def test_tag_with_subject_prefix_below_reject(run_app, capture, spamd_server) -> None:
    app = run_app({"scanner": [{"type": "spamassassin", "address": spamd_server,
                                "tag_score": 0.0, "reject_score": 0,
                                "subject_prefix": "[SPAM] "}]}, deliver=capture)
    code, _ = send(app.port, b"Subject: hello\r\n\r\nhi\r\n")
    assert code == 250
    head = headers_of(capture.messages[0][1])
    assert b"Subject: [SPAM] hello" in head and b"X-Spam-Flag: YES" in head


def test_quarantine_accepts_and_stores(run_app, capture, spamd_server, tmp_path: Path) -> None:
    q = tmp_path / "quarantine"
    app = run_app({"scanner": [{"type": "spamassassin", "address": spamd_server,
                                "reject_score": 0, "quarantine_score": 100,
                                "quarantine_path": str(q)}]}, deliver=capture)
    gtube = crlf((CORPUS / "rspamd__functional_messages_gtube.eml").read_bytes())
    code, _ = send(app.port, gtube)
    assert code == 250
    assert capture.messages == []
    stored = list((q / "new").iterdir())
    assert len(stored) == 1 and b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE" in stored[0].read_bytes()


def test_hook_can_override_scanner(run_app, capture, spamd_server) -> None:
    app = run_app({"scanner": [{"type": "spamassassin", "address": spamd_server}]},
                  deliver=capture)
    seen = []

    @app.hook("data")
    def whitelist(session, tx):
        seen.append([(r.scanner, r.verdict, r.score) for r in tx.scan_results])
        if tx.mail_from == "sender@example.org":
            return accept()
        return None

    gtube = crlf((CORPUS / "rspamd__functional_messages_gtube.eml").read_bytes())
    code, _ = send(app.port, gtube)
    assert code == 250
    assert seen[0][0][:2] == ("spamassassin", "spam") and seen[0][0][2] >= 1000
    assert len(capture.messages) == 1


def test_scanner_down_tempfail_by_default(run_app, capture) -> None:
    app = run_app({"scanner": [{"type": "spamassassin", "address": f"127.0.0.1:{free_port()}",
                                "timeout": 2}]}, deliver=capture)
    code, text = send(app.port, b"Subject: x\r\n\r\nbody\r\n")
    # X.3.0: the mail system's own failure, not counted against the client (max_errors)
    assert (code, text[:5]) == (451, b"4.3.0")
    assert capture.messages == []


def test_scanner_down_accept_policy_adds_header(run_app, capture) -> None:
    app = run_app({"scanner": [{"type": "spamassassin", "address": f"127.0.0.1:{free_port()}",
                                "timeout": 2, "on_error": "accept"}]}, deliver=capture)
    code, _ = send(app.port, b"Subject: x\r\n\r\nbody\r\n")
    assert code == 250
    assert b"spamassassin=error (not scanned)" in headers_of(capture.messages[0][1])


def test_hanging_scanner_timeout_honoured(run_app, capture) -> None:
    import threading
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    conns = []
    stop = threading.Event()

    def accept_forever() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept_forever, daemon=True)
    t.start()
    try:
        app = run_app({"scanner": [{"type": "spamassassin",
                                    "address": f"127.0.0.1:{srv.getsockname()[1]}",
                                    "timeout": 1}]}, deliver=capture)
        t0 = time.monotonic()
        code, _ = send(app.port, b"Subject: x\r\n\r\nbody\r\n")
        elapsed = time.monotonic() - t0
        assert code == 451
        assert 0.8 < elapsed < 5
    finally:
        stop.set()
        t.join()
        srv.close()
        for c in conns:
            c.close()


def test_max_size_skips_with_header(run_app, capture, spamd_server) -> None:
    app = run_app({"scanner": [{"type": "spamassassin", "address": spamd_server,
                                "max_size": 100}]}, deliver=capture)
    code, _ = send(app.port, b"Subject: big\r\n\r\n" + b"x" * 500 + b"\r\n")
    assert code == 250
    assert b"spamassassin=skipped (message too large)" in headers_of(capture.messages[0][1])


def test_api_check_and_train(run_app, spamd_server) -> None:
    app = run_app({"scanner": [{"type": "spamassassin", "address": spamd_server}]})
    gtube = crlf((CORPUS / "rspamd__functional_messages_gtube.eml").read_bytes())
    results = asyncio.run(app.scanners.check_spam(gtube))
    assert results[0].verdict == "spam"
    versions = asyncio.run(app.scanners.spam_version())
    assert versions[0].startswith("spamassassin: SpamAssassin")
    answers = asyncio.run(app.scanners.train_spam(True, b"Subject: train\r\n\r\nunique 41\r\n"))
    assert answers[0] in ("spamassassin: DidSet: local", "spamassassin: unchanged")
