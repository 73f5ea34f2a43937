"""Tests of the example plugin sender_blocklist.py, written as a site would write them
for its own plugin, with the fixtures smtpgate's pytest plugin provides (docs/testing.md).

Run from this directory: ``pytest test_sender_blocklist.py``.
"""

from __future__ import annotations

import smtplib

import pytest

from smtpgate.errors import ConfigError
from smtpgate.hooks import Verdict
from smtpgate.testing import PluginHarness, make_session, make_transaction

PLUGIN = {"module": "sender_blocklist", "blocked_senders": ["spam@bad.example"],
          "blocked_domains": ["junk.example"],
          "reply_text": "Mail from <{sender}> is not accepted here"}


@pytest.fixture(autouse=True)
def _plugin_on_path(monkeypatch, request):
    # sender_blocklist.py sits next to this file
    monkeypatch.syspath_prepend(str(request.path.parent))


# -- the hooks alone, no sockets ----------------------------------------------------------

def test_listed_sender_is_refused_at_mail():
    chain = PluginHarness({"plugin": [PLUGIN]})
    result = chain.run("mail", make_session(), make_transaction("spam@bad.example"))
    assert result.verdict is Verdict.DENY
    assert str(result.reply) == "550 5.7.1 Mail from <spam@bad.example> is not accepted here"


def test_other_senders_pass_and_get_the_header():
    chain = PluginHarness({"plugin": [PLUGIN]})
    tx = make_transaction("ann@example.org", ["bob@example.com"],
                          b"From: ann@example.org\r\nSubject: hi\r\n\r\nbody\r\n")
    assert chain.run("mail", make_session(), tx).verdict is Verdict.CONT
    assert chain.run("data", make_session(), tx).verdict is Verdict.CONT
    assert tx.get_header("X-Sender-Blocklist") == "sender_blocklist=pass (from=ann@example.org)"


def test_bad_option_names_the_key():
    with pytest.raises(ConfigError) as info:
        PluginHarness({"plugin": [{"module": "sender_blocklist", "blocked_senders": ["x"]}]})
    assert info.value.problems == [
        "plugin[0].blocked_senders: must be e-mail addresses (local@domain), got 'x'"]


# -- the whole server, over SMTP ------------------------------------------------------------

def test_refused_over_smtp_and_accepted_mail_relayed(smtpgate_server, capture_upstream):
    server = smtpgate_server({"plugin": [PLUGIN], "delivery": {"mode": "proxy"}},
                             relay_to=capture_upstream)
    with smtplib.SMTP(*server.address) as client:
        client.ehlo("client.test")
        assert client.mail("spam@junk.example") == (
            550, b"5.7.1 Mail from <spam@junk.example> is not accepted here")
        client.rset()
        client.sendmail("ann@example.org", ["bob@example.com"],
                        b"From: ann@example.org\r\nSubject: hi\r\n\r\nbody\r\n")
    (relayed,) = capture_upstream.wait(1)
    assert relayed.sender == "ann@example.org"
    assert relayed.recipients == ("bob@example.com",)
    assert relayed.header("X-Sender-Blocklist") == "sender_blocklist=pass (from=ann@example.org)"
    assert relayed.data.endswith(b"\r\n\r\nbody\r\n")
