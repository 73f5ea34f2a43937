"""smtpgate's pytest plugin (smtpgate.testing): registered through its entry point, its
fixtures and helpers work as docs/testing.md says, and the documented example test file
passes when run the way a user runs it."""

from __future__ import annotations

import shutil
import smtplib
from pathlib import Path

import pytest

from smtpgate.hooks import Verdict
from smtpgate.testing import CaptureUpstream, PluginHarness, make_session, make_transaction

pytest_plugins = ["pytester"]

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def test_entry_point_registers_the_plugin(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("smtpgate")
    assert plugin is not None and plugin.__name__ == "smtpgate.testing"


def test_documented_example_passes_as_a_user_runs_it(pytester: pytest.Pytester) -> None:
    for name in ("sender_blocklist.py", "test_sender_blocklist.py"):
        shutil.copy(EXAMPLES / name, pytester.path / name)
    # a fresh pytest process: only the entry point can provide the fixtures there
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider",
                                           "test_sender_blocklist.py")
    result.assert_outcomes(passed=4)


def test_capture_upstream_records_and_refuses(capture_upstream: CaptureUpstream) -> None:
    capture_upstream.refuse("nobody@example.com")
    capture_upstream.refuse("later@example.com", "450 4.2.1 Try later")
    with smtplib.SMTP("127.0.0.1", capture_upstream.port) as client:
        client.ehlo("relay.test")
        client.mail("a@example.org", ["BODY=8BITMIME"])
        assert client.rcpt("nobody@example.com") == (550, b"5.1.1 No such user")
        assert client.rcpt("later@example.com") == (450, b"4.2.1 Try later")
        assert client.rcpt("bob@example.com")[0] == 250
        assert client.data(b"Subject: x\r\n\r\n.leading dot\r\nbody\r\n")[0] == 250
    (msg,) = capture_upstream.wait(1, timeout=5)
    assert (msg.sender, msg.recipients, msg.helo) == ("a@example.org", ("bob@example.com",),
                                                      "relay.test")
    assert msg.data == b"Subject: x\r\n\r\n.leading dot\r\nbody\r\n"
    assert msg.mail_params == {"BODY": "8BITMIME"}
    with pytest.raises(TimeoutError, match="1 of 2 message"):
        capture_upstream.wait(2, timeout=0.2)


def test_server_fixture_relays_in_queue_mode(smtpgate_server, capture_upstream) -> None:  # type: ignore[no-untyped-def]
    server = smtpgate_server({"queue": {"min_free_space": 0, "scan_interval": 0.1}},
                             relay_to=capture_upstream)
    assert server.app.delivery_mode == "queue"
    with smtplib.SMTP(*server.address) as client:
        client.sendmail("a@example.org", ["b@example.com", "c@example.com"],
                        b"Subject: queued\r\n\r\nhello\r\n")
    (msg,) = capture_upstream.wait(1)
    assert msg.recipients == ("b@example.com", "c@example.com")
    assert msg.data.endswith(b"Subject: queued\r\n\r\nhello\r\n")
    assert msg.data.startswith(b"Received: from ")  # the relaying smtpgate's trace header


def test_harness_runs_the_chain_a_configuration_builds() -> None:
    chain = PluginHarness({"relay": {"relay_domains": ["example.com"]}})
    assert "relay" in chain.chain("rcpt")
    outside = make_session("192.0.2.7")
    tx = make_transaction("a@example.org")
    assert chain.run("rcpt", outside, tx, "bob@example.com").verdict is not Verdict.DENY
    denied = chain.run("rcpt", outside, tx, "bob@elsewhere.example")
    assert denied.verdict is Verdict.DENY
    assert str(denied.reply) == "550 5.7.1 Relaying denied"
    inside = make_session("127.0.0.1")
    assert chain.run("rcpt", inside, tx, "bob@elsewhere.example").verdict is not Verdict.DENY


def test_make_transaction_takes_lf_messages() -> None:
    tx = make_transaction("a@example.org", ["b@example.com"], b"Subject: s\n\nbody\n")
    assert tx.raw == b"Subject: s\r\n\r\nbody\r\n"
    assert tx.get_header("subject") == "s"
    assert [r.address for r in tx.recipients] == ["b@example.com"]
