"""Bounces and queue listings say what happened (issue 8, finding 8).

The diagnostic and ``Remote-MTA`` name the host that answered, and only when one did; an
administrator's bounce says it was returned by the administrator; connection failures and
TLS requirements say what failed, in the DSN and in ``smtpgate queue list|show``.
"""

from __future__ import annotations

import email
import json
import smtplib
import subprocess
import sys
from email.message import Message
from pathlib import Path

from smtpgate.queue.store import QueueStore

from .test_queue_e2e import MSG, free_port, queue_cfg, start_upstream, wait_for

SMTPGATE = [sys.executable, "-m", "smtpgate"]


def queue_cmd(spool: Path, *args: str) -> str:
    out = subprocess.run([*SMTPGATE, "queue", *args, "--spool", str(spool)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def send(port: int, rcpts: list[str]) -> str:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo()
        s.mail("sender@example.org")
        for r in rcpts:
            s.rcpt(r)
        code, text = s.data(MSG)
    assert code == 250, text
    return text.split()[-1].decode()


def dsns(spool: Path) -> list[bytes]:
    store = QueueStore(spool)
    return [store.read_message(e.id) for e in store.entries() if e.mail_from == ""]


def status_part(dsn: bytes) -> str:
    msg = email.message_from_bytes(dsn)
    part = next(p for p in msg.walk() if p.get_content_type() == "message/delivery-status")
    return part.as_string()


def human_part(dsn: bytes) -> str:
    msg = email.message_from_bytes(dsn)
    part: Message = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload.decode()


def test_admin_bounce_of_never_connected_message(run_app, tmp_path: Path) -> None:
    """Nothing listens on the relay port: no host ever answered, so no Remote-MTA and no
    "<host> said"; the list/show/DSN texts say the connection was refused."""
    spool = tmp_path / "spool"
    port = free_port()
    app = run_app(queue_cfg(spool, port, min_backoff=3600, max_backoff=3600))
    qid = send(app.port, ["rcpt@example.com"])
    assert wait_for(lambda: (spool / "deferred" / f"{qid}.json").exists())
    failure = f"451 4.4.1 Connection to 127.0.0.1:{port} failed: connection refused"

    listing = queue_cmd(spool, "list")
    assert failure in listing, listing
    shown = queue_cmd(spool, "show", qid)
    envelope = json.loads(shown.split("\n\n", 1)[0])
    assert envelope["last_reply"] == failure
    assert envelope["recipients"][0]["last_reply"] == failure
    assert envelope["recipients"][0]["remote_mta"] == ""

    queue_cmd(spool, "bounce", qid)
    assert wait_for(lambda: len(dsns(spool)) == 1, timeout=20)
    assert wait_for(lambda: not (spool / "messages" / qid).exists())
    [dsn] = dsns(spool)
    status = status_part(dsn)
    assert "Remote-MTA" not in status, status
    assert "Action: failed" in status and "Status: 5.0.0" in status
    assert ("Diagnostic-Code: X-Smtpgate; 550 5.0.0 Returned to sender by the mail "
            f"administrator; last reply: {failure}") in status.replace("\n ", " "), status
    human = human_part(dsn)
    assert "127.0.0.1 said" not in human and "localhost said" not in human, human
    assert "<rcpt@example.com>: 550 5.0.0 Returned to sender by the mail administrator" in human


def test_refused_recipient_names_the_host_that_answered(run_app, tmp_path: Path) -> None:
    """A 550 from the relay: the DSN names it (Remote-MTA, smtp; diagnostic, "said")."""
    spool = tmp_path / "spool"
    port = free_port()
    ctl, handler = start_upstream(port)
    handler.reject.add("bad@example.com")
    try:
        app = run_app(queue_cfg(spool, port))
        send(app.port, ["good@example.com", "bad@example.com"])
        assert wait_for(lambda: any(m[0] in ("", "<>") for m in handler.messages))
        bounce = next(m for m in handler.messages if m[0] in ("", "<>"))
        status = status_part(bounce[2])
        assert "Remote-MTA: dns; 127.0.0.1" in status
        assert "Diagnostic-Code: smtp; 550 5.1.1 No such user here" in status
        assert "Final-Recipient: rfc822; bad@example.com" in status
        assert "good@example.com" not in status
        assert "<bad@example.com>: 127.0.0.1 said: 550 5.1.1 No such user here" in \
            human_part(bounce[2])
    finally:
        ctl.stop()


def test_admin_bounce_after_remote_deferral_keeps_who_said_what(run_app, tmp_path: Path) -> None:
    """The relay deferred (451) and then the administrator bounced: the DSN says the
    administrator returned it (no Remote-MTA) and which host gave the last reply."""
    spool = tmp_path / "spool"
    port = free_port()
    ctl, handler = start_upstream(port)

    async def defer(server, session, envelope, address, rcpt_options):  # type: ignore[no-untyped-def]
        return "451 4.3.0 Mailbox busy, try later"

    handler.handle_RCPT = defer  # type: ignore[method-assign]
    try:
        app = run_app(queue_cfg(spool, port, min_backoff=3600, max_backoff=3600))
        qid = send(app.port, ["busy@example.com"])
        assert wait_for(lambda: (spool / "deferred" / f"{qid}.json").exists())
        envelope = json.loads(queue_cmd(spool, "show", qid).split("\n\n", 1)[0])
        assert envelope["recipients"][0]["remote_mta"] == "127.0.0.1"
        assert envelope["last_reply"] == "451 4.3.0 Mailbox busy, try later"
        queue_cmd(spool, "bounce", qid)
        assert wait_for(lambda: len(dsns(spool)) == 1 or any(
            m[0] in ("", "<>") for m in handler.messages), timeout=20)
    finally:
        ctl.stop()
    found = dsns(spool) or [m[2] for m in handler.messages if m[0] in ("", "<>")]
    status = status_part(found[0]).replace("\n ", " ")
    assert "Remote-MTA" not in status, status
    assert ("Diagnostic-Code: X-Smtpgate; 550 5.0.0 Returned to sender by the mail "
            "administrator; last reply from 127.0.0.1: 451 4.3.0 Mailbox busy, try later"
            ) in status, status


def test_starttls_required_not_offered_is_reported_as_such(run_app, tmp_path: Path) -> None:
    """``smtp+starttls://`` to a relay without STARTTLS: the queue entry says so
    (was ``451 4.4.1 Upstream unreachable``); nothing is sent in plaintext."""
    spool = tmp_path / "spool"
    port = free_port()
    ctl, handler = start_upstream(port)
    try:
        cfg = queue_cfg(spool, port, min_backoff=3600, max_backoff=3600)
        cfg["relay"]["url"] = f"smtp+starttls://127.0.0.1:{port}"
        app = run_app(cfg)
        qid = send(app.port, ["rcpt@example.com"])
        assert wait_for(lambda: (spool / "deferred" / f"{qid}.json").exists())
        listing = queue_cmd(spool, "list")
        expected = f"451 4.7.4 TLS is required, but was not offered by host 127.0.0.1:{port}"
        assert expected in listing, listing
        envelope = json.loads(queue_cmd(spool, "show", qid).split("\n\n", 1)[0])
        assert envelope["recipients"][0]["remote_mta"] == ""
        assert handler.messages == []
    finally:
        ctl.stop()


def test_expired_never_connected_message_names_no_host(run_app, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    port = free_port()
    app = run_app(queue_cfg(spool, port, max_lifetime=0.5, min_backoff=0.2, max_backoff=0.2))
    send(app.port, ["never@example.com"])
    assert wait_for(lambda: len(dsns(spool)) == 1, timeout=20)
    status = status_part(dsns(spool)[0]).replace("\n ", " ")
    assert "Remote-MTA" not in status, status
    assert "Status: 4.4.7" in status
    assert (f"450 4.4.7 Delivery time expired; last reply: 451 4.4.1 Connection to "
            f"127.0.0.1:{port} failed: connection refused") in status, status
