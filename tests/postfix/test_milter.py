"""A real Postfix calls smtpgate's milter listener (``smtpd_milters``): the site plugin's
decisions and changes reach Postfix's SMTP client and what Postfix delivers."""

from __future__ import annotations

import smtplib

import pytest

from smtpgate.testing import CaptureUpstream

MSG = (b"From: ann@example.org\r\nTo: bob@example.com\r\nSubject: {subject}\r\n"
       b"\r\nHello through Postfix.\r\n")


def _milter_gate(smtpgate_server, site_plugin: str, loop_kind: str = "uvloop"):  # type: ignore[no-untyped-def]
    return smtpgate_server({"server": {"use_uvloop": loop_kind == "uvloop"},
                            "listener": [{"address": "127.0.0.1:0", "protocol": "milter"}],
                            "plugin": [{"module": site_plugin}]})


def test_plugin_rejection_reaches_postfix_client(smtpgate_server, site_plugin, postfix,  # type: ignore[no-untyped-def]
                                                  capture_upstream: CaptureUpstream) -> None:
    gate = _milter_gate(smtpgate_server, site_plugin)
    pf = postfix(relay_port=capture_upstream.port,
                 smtpd_milters=f"inet:127.0.0.1:{gate.port}",
                 milter_default_action="tempfail")
    with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
        client.ehlo("client.test")
        assert client.mail("spam@bad.example") == (
            550, b"5.7.1 Go away, says the site plugin")
        client.rset()
        client.mail("ann@example.org")
        assert client.rcpt("blocked@example.com") == (550, b"5.7.1 Blocked by the site plugin")
    line = pf.wait_log("milter-reject: MAIL from")
    print(line)  # shown with -s: the Postfix log line of a rejection made by the plugin
    assert "550 5.7.1 Go away, says the site plugin" in line
    assert capture_upstream.messages == []


def test_header_added_changed_and_recipient_removed(smtpgate_server, site_plugin, postfix,  # type: ignore[no-untyped-def]
                                                    capture_upstream: CaptureUpstream,
                                                    loop_kind: str) -> None:
    gate = _milter_gate(smtpgate_server, site_plugin, loop_kind)
    pf = postfix(relay_port=capture_upstream.port,
                 smtpd_milters=f"inet:127.0.0.1:{gate.port}",
                 milter_default_action="tempfail")
    with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
        client.sendmail("ann@example.org", ["bob@example.com", "drop@example.com"],
                        MSG.replace(b"{subject}", b"change me"))
    (relayed,) = capture_upstream.wait(1, timeout=30)
    assert relayed.recipients == ("bob@example.com",)
    assert relayed.header("X-Site-Check") == "passed client=127.0.0.1"
    assert relayed.header("Subject") == "changed by smtpgate"
    assert relayed.data.endswith(b"\r\n\r\nHello through Postfix.\r\n")
    # Postfix logged the milter's changes it applied
    assert "drop@example.com" not in pf.wait_log("status=sent")


@pytest.mark.parametrize(("action", "expected"), [("tempfail", 451), ("accept", 250)])
def test_smtpgate_down_applies_milter_default_action(postfix, capture_upstream,  # type: ignore[no-untyped-def]
                                                     action: str, expected: int) -> None:
    from ..private_postfix import free_port

    pf = postfix(relay_port=capture_upstream.port,
                 smtpd_milters=f"inet:127.0.0.1:{free_port()}",  # nobody listens there
                 milter_default_action=action)
    with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
        client.ehlo("client.test")
        code, _ = client.mail("ann@example.org")
        if code == 250:
            client.rcpt("bob@example.com")
            code, _ = client.data(MSG.replace(b"{subject}", b"no milter"))
    assert code == expected
    if expected == 250:
        (relayed,) = capture_upstream.wait(1, timeout=30)
        assert relayed.header("X-Site-Check") is None
