"""A real Postfix asks smtpgate's policy listener (``check_policy_service``): the site
plugin's refusal comes back at RCPT with its text, DUNNO lets mail through, and the
shipped greylisting plugin defers a first attempt and accepts the retry."""

from __future__ import annotations

import smtplib
import time
from pathlib import Path

from smtpgate.testing import CaptureUpstream

from ..private_postfix import StartPostfix

MSG = b"From: ann@example.org\r\nSubject: policy\r\n\r\nHello.\r\n"


def _restrictions(port: int) -> str:
    return (f"check_policy_service inet:127.0.0.1:{port}, permit_mynetworks, "
            "reject_unauth_destination")


def test_plugin_refusal_at_rcpt_and_dunno(smtpgate_server, site_plugin, postfix: StartPostfix,  # type: ignore[no-untyped-def]
                                          capture_upstream: CaptureUpstream,
                                          loop_kind: str) -> None:
    gate = smtpgate_server({"server": {"use_uvloop": loop_kind == "uvloop"},
                            "listener": [{"address": "127.0.0.1:0", "protocol": "policy"}],
                            "plugin": [{"module": site_plugin}]})
    pf = postfix(relay_port=capture_upstream.port,
                 smtpd_recipient_restrictions=_restrictions(gate.port))
    with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
        client.ehlo("client.test")
        client.mail("ann@example.org")
        # Postfix puts the address and its own words before the plugin's text
        assert client.rcpt("blocked@example.com") == (
            550, b"5.7.1 <blocked@example.com>: Recipient address rejected: "
                 b"Blocked by the site plugin")
        assert client.rcpt("bob@example.com")[0] == 250  # the plugin answered DUNNO
        assert client.data(MSG)[0] == 250
    (relayed,) = capture_upstream.wait(1, timeout=30)
    assert relayed.recipients == ("bob@example.com",)
    line = pf.wait_log("NOQUEUE: reject: RCPT from")
    assert ("550 5.7.1 <blocked@example.com>: Recipient address rejected: Blocked by the "
            "site plugin") in line


def test_greylisting_defers_then_accepts(smtpgate_server, postfix: StartPostfix,  # type: ignore[no-untyped-def]
                                         capture_upstream: CaptureUpstream,
                                         tmp_path: Path) -> None:
    gate = smtpgate_server({
        "listener": [{"address": "127.0.0.1:0", "protocol": "policy"}],
        # Postfix does relay control; the test client is on loopback, which smtpgate's
        # default local_networks exempt from greylisting: make it an outside client.
        "relay": {"local_networks": ["192.0.2.0/24"]},
        "plugin": [{"use": "relay", "enabled": False, "allow_open_relay": True},
                   {"use": "greylist", "delay": 1.0,
                    "store": str(tmp_path / "greylist.sqlite")}]})
    pf = postfix(relay_port=capture_upstream.port,
                 smtpd_recipient_restrictions=_restrictions(gate.port))
    with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
        client.ehlo("client.test")
        client.mail("ann@example.org")
        code, text = client.rcpt("bob@example.com")
        assert (code, text[:6]) == (451, b"4.7.1 "), text
    time.sleep(1.5)  # the greylisting delay (1 s) must pass before the retry counts
    with smtplib.SMTP("127.0.0.1", pf.smtp_port) as client:
        client.ehlo("client.test")
        client.mail("ann@example.org")
        assert client.rcpt("bob@example.com")[0] == 250
        assert client.data(MSG)[0] == 250
    (relayed,) = capture_upstream.wait(1, timeout=30)
    assert relayed.recipients == ("bob@example.com",)
