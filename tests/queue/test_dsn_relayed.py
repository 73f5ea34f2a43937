"""NOTIFY=SUCCESS through a next hop without DSN: a "relayed" DSN (issue 8, finding 16).

RFC 3461 §5.2.2: a DSN-conforming MTA that relays a message to one that does not offer
DSN issues a "relayed" DSN (RFC 3464 ``Action: relayed``) for recipients that asked for
NOTIFY=SUCCESS. A next hop that offers DSN gets NOTIFY passed on and reports itself.
"""

from __future__ import annotations

import email
import smtplib
from pathlib import Path

from tests.delivery.conftest import CaptureController, CaptureHandler, free_port

from .test_queue_e2e import MSG, queue_cfg, spool_empty, start_upstream, wait_for


def send_with_notify(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.ehlo()
        assert s.has_extn("dsn")
        s.mail("sender@example.org", ["ENVID=relay+2Dtest"])
        s.rcpt("tell-me@example.com", ["NOTIFY=SUCCESS,FAILURE",
                                        "ORCPT=rfc822;tell-me@example.com"])
        s.rcpt("quiet@example.com", ["NOTIFY=FAILURE"])
        s.rcpt("default@example.com")
        code, text = s.data(MSG)
    assert code == 250, text


def test_relayed_dsn_for_notify_success_via_relay_without_dsn(run_app, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    port = free_port()
    ctl, handler = start_upstream(port)  # aiosmtpd: no DSN in its EHLO reply
    try:
        app = run_app(queue_cfg(spool, port))
        send_with_notify(app.port)
        assert wait_for(lambda: any(m[0] in ("", "<>") for m in handler.messages), timeout=20)
        assert wait_for(lambda: spool_empty(spool))
    finally:
        ctl.stop()
    original = [m for m in handler.messages if m[0] == "sender@example.org"]
    assert len(original) == 1
    assert sorted(original[0][1]) == ["default@example.com", "quiet@example.com",
                                      "tell-me@example.com"]
    notices = [m for m in handler.messages if m[0] in ("", "<>")]
    assert len(notices) == 1, notices
    _, rcpts, content = notices[0]
    assert rcpts == ["sender@example.org"]
    dsn = email.message_from_bytes(content)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn["Subject"] == "Successful Mail Delivery Report"
    status = next(p for p in dsn.walk()
                  if p.get_content_type() == "message/delivery-status").as_string()
    assert "Action: relayed" in status and "Status: 2.0.0" in status
    assert "Final-Recipient: rfc822; tell-me@example.com" in status
    assert "Original-Recipient: rfc822;tell-me@example.com" in status
    assert "Original-Envelope-Id: relay-test" in status
    assert "Remote-MTA: dns; 127.0.0.1" in status
    assert "Diagnostic-Code: smtp; 250 2.0.0 OK queued upstream" in status
    assert "quiet@example.com" not in status and "default@example.com" not in status


def test_no_relayed_dsn_when_the_relay_offers_dsn(run_app, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    port = free_port()
    handler = CaptureHandler()
    ctl = CaptureController(handler, dsn=True, port=port)
    ctl.start()
    try:
        app = run_app(queue_cfg(spool, port))
        send_with_notify(app.port)
        assert wait_for(lambda: len(handler.messages) >= 1, timeout=20)
        assert wait_for(lambda: spool_empty(spool))
    finally:
        ctl.stop()
    assert [m.mail_from for m in handler.messages] == ["sender@example.org"]
    [msg] = handler.messages
    assert "NOTIFY=SUCCESS,FAILURE" in msg.rcpt_options  # passed on: the relay reports
