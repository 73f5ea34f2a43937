"""The milter server without Postfix: negotiation, protocol errors, the diff of the
plugins' changes into modification actions, and a round trip through smtpgate's own
milter client (the MTA side of the shared codec)."""

from __future__ import annotations

import asyncio
import smtplib
from typing import Any

import pytest

from smtpgate.config import config_from_mapping
from smtpgate.hooks import HookRunner, reject
from smtpgate.milter import codec
from smtpgate.milter.changes import EnvelopeState, modifications
from smtpgate.milter.server import MilterConversation

MSG = b"Received: a\r\nReceived: b\r\nSubject: s\r\nFrom: x@y\r\n\r\nbody\r\n"
ENV = EnvelopeState("a@example.org", {}, (("b@example.com", {}),))


def test_header_changes_become_the_right_actions() -> None:
    after = (b"X-First: 1\r\nReceived: a\r\nSubject: t\r\nFrom: x@y\r\nX-Last: 2\r\n"
             b"\r\nbody\r\n")
    assert modifications(MSG, after, ENV, ENV, leadspc=False) == [
        codec.ChangeHeader(1, "Subject", "t"),
        codec.ChangeHeader(2, "Received", ""),
        codec.InsertHeader(0, "X-First", "1"),
        codec.AddHeader("X-Last", "2"),
    ]


def test_leading_space_kept_with_leadspc_and_body_and_envelope() -> None:
    after = MSG.replace(b"Subject: s", b"Subject:  two spaces").replace(b"body", b"new")
    env_after = EnvelopeState("c@example.org", {"BODY": "8BITMIME"},
                              (("d@example.com", {"NOTIFY": "NEVER"}),))
    assert modifications(MSG, after, ENV, env_after, leadspc=True) == [
        codec.ChangeFrom("<c@example.org>", "BODY=8BITMIME"),
        codec.DelRcpt("<b@example.com>"),
        codec.AddRcptPar("<d@example.com>", "NOTIFY=NEVER"),
        codec.ChangeHeader(1, "Subject", "  two spaces"),
        codec.ReplaceBody(b"new\r\n"),
    ]


def test_a_change_the_mta_did_not_allow_is_an_error() -> None:
    after = MSG.replace(b"body", b"other")
    with pytest.raises(PermissionError, match="SMFIF_CHGBODY"):
        modifications(MSG, after, ENV, ENV, actions=codec.SMFIF.ADDHDRS)


def _conversation(**hooks: Any) -> MilterConversation:
    runner = HookRunner()
    for stage, func in hooks.items():
        runner.register(stage, func)
    cfg = config_from_mapping({"server": {"max_message_size": 1000}})
    return MilterConversation(runner, cfg, ("127.0.0.1", 1))


def test_negotiation_asks_only_for_what_the_chain_needs() -> None:
    conv = _conversation(rcpt=lambda s, t, r: None)
    offer = codec.OptNeg(6, codec.ACTIONS_ALL,
                         codec.PROTOCOL_NOSEND_MASK | codec.PROTOCOL_NOREPLY_MASK
                         | codec.SMFIP.HDR_LEADSPC)
    (answer,) = asyncio.run(conv.handle(offer))
    assert isinstance(answer, codec.OptNeg)
    p = answer.protocol
    for flag in (codec.SMFIP.NODATA, codec.SMFIP.NOHDRS, codec.SMFIP.NOBODY,
                 codec.SMFIP.NOEOH, codec.SMFIP.NOUNKNOWN, codec.SMFIP.NR_CONN,
                 codec.SMFIP.NR_HELO, codec.SMFIP.NR_MAIL, codec.SMFIP.HDR_LEADSPC):
        assert p & flag, hex(flag)
    for flag in (codec.SMFIP.NOCONNECT, codec.SMFIP.NOHELO, codec.SMFIP.NOMAIL,
                 codec.SMFIP.NORCPT, codec.SMFIP.NR_RCPT):
        assert not p & flag, hex(flag)
    assert answer.actions & codec.SMFIF.ADDHDRS and answer.macros  # SETSYMLIST offered


def test_commands_out_of_order_and_old_versions_are_protocol_errors() -> None:
    conv = _conversation()
    with pytest.raises(codec.MilterProtocolError, match="before CONNECT"):
        asyncio.run(conv.handle(codec.Mail(("<a@b>",))))
    with pytest.raises(codec.MilterProtocolError, match="version 2"):
        asyncio.run(conv.handle(codec.OptNeg(2, 0, 0)))


def test_rcpt_refusal_and_oversized_message() -> None:
    conv = _conversation(
        rcpt=lambda s, t, r: reject("No such user here", code=550, enhanced="5.1.1")
        if r.address.startswith("x") else None,
        data=lambda s, t: None)

    async def run() -> list[list[codec.Response]]:
        out = [await conv.handle(codec.OptNeg(6, codec.ACTIONS_ALL, 0))]
        for cmd in (codec.Connect("client.test", "4", 4000, "192.0.2.1"),
                    codec.Helo("client.test"), codec.Mail(("<a@example.org>",)),
                    codec.Rcpt(("<xyz@example.com>",)), codec.Rcpt(("<b@example.com>",)),
                    codec.Header("Subject", "big"), codec.Body(b"x" * 2000),
                    codec.EndOfMessage()):
            out.append(await conv.handle(cmd))
        return out

    replies = asyncio.run(run())
    assert replies[4] == [codec.ReplyCode("550 5.1.1 No such user here")]
    assert replies[5] == [codec.Continue()]
    assert replies[-1] == [codec.ReplyCode(
        "552 5.3.4 Message size exceeds fixed maximum message size")]
    assert conv.session is not None and conv.session.helo_name == "client.test"


def test_round_trip_through_smtpgates_own_milter_client(smtpgate_server, capture_upstream,  # type: ignore[no-untyped-def]
                                                         site_plugin: str) -> None:
    milter = smtpgate_server({"listener": [{"address": "127.0.0.1:0", "protocol": "milter"}],
                              "plugin": [{"module": site_plugin}]})
    front = smtpgate_server({"delivery": {"mode": "proxy"},
                             "plugin": [{"use": "milter",
                                         "socket": f"inet:127.0.0.1:{milter.port}"}]},
                            relay_to=capture_upstream)
    with smtplib.SMTP(*front.address) as client:
        client.ehlo("client.test")
        assert client.mail("spam@bad.example") == (550, b"5.7.1 Go away, says the site plugin")
        client.rset()
        client.sendmail("ann@example.org", ["bob@example.com", "drop@example.com"],
                        b"Subject: change me\r\n\r\nhello\r\n")
    (relayed,) = capture_upstream.wait(1)
    assert relayed.recipients == ("bob@example.com",)
    assert relayed.header("Subject") == "changed by smtpgate"
    assert relayed.header("X-Site-Check") == "passed client=127.0.0.1"

