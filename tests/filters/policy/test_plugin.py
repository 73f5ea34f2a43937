"""The policy plugin (``[[plugin]] use = "policy"``) against the test policy server
(tests/filters/policy/server.py) over loopback sockets, under both event loops: the
attributes sent at each stage, every action, connection reuse and the pool, failures
and ``default_action``, the relay guard."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smtpgate.app import Smtpgate
from smtpgate.errors import ConfigError
from tests.support import Capture, RawClient

from .conftest import free_port
from .server import PolicyServer

MSG = b"From: ann@example.org\r\nTo: bob@example.com\r\nSubject: hi\r\n\r\nbody\r\n"
POSTFIX_ATTRIBUTES = [  # SMTPD_POLICY_README, in Postfix's order where it has one
    "request", "protocol_state", "protocol_name", "client_address", "client_name",
    "client_port", "reverse_client_name", "server_address", "server_port", "helo_name",
    "sender", "recipient", "recipient_count", "queue_id", "instance", "size", "etrn_domain",
    "stress", "sasl_method", "sasl_username", "sasl_sender", "ccert_subject", "ccert_issuer",
    "ccert_fingerprint", "ccert_pubkey_fingerprint", "encryption_protocol",
    "encryption_cipher", "encryption_keysize", "policy_context",
]

Respond = Callable[[dict[str, str]], "str | None"]


def answer(action: str | None) -> Respond:
    return lambda attrs: action


def table(server: PolicyServer | str, **options: Any) -> dict[str, Any]:
    address = server if isinstance(server, str) else server.address
    return {"use": "policy", "address": address, "timeout": 10, "retry_delay": 0.05,
            **options}


def session(c: RawClient, rcpts: list[str], message: bytes | None = MSG,
            sender: str = "ann@example.org", mail_args: str = "") -> list[bytes]:
    """EHLO (if not done), MAIL, RCPTs, DATA: every reply after EHLO."""
    replies = [c.cmd(f"MAIL FROM:<{sender}>{mail_args}")]
    for r in rcpts:
        replies.append(c.cmd(f"RCPT TO:<{r}>"))
    if message is not None:
        data = c.cmd("DATA")
        replies.append(data)
        if data.startswith(b"354"):
            c.send(message + b".\r\n")
            replies.append(c.read_reply())
    return replies


# ------------------------------------------------------------------ attributes


def test_attributes_at_rcpt_and_instance(run_app, raw, capture: Capture, policy_server) -> None:
    server = policy_server(answer("DUNNO"))
    app = run_app({"plugin": [table(server, policy_context="site-a")]}, deliver=capture)
    c = raw(app.port)
    assert c.cmd("EHLO client.test").startswith(b"250")
    replies = session(c, ["bob@example.com", "carol@example.com"],
                      mail_args=" SIZE=1234")
    assert replies[:3] == [b"250 2.1.0 Sender OK", b"250 2.1.5 Recipient OK",
                           b"250 2.1.5 Recipient OK"]
    assert replies[-1].startswith(b"250 ")
    session(c, ["dave@example.com"], message=None)
    reqs = server.requests
    assert len(reqs) == 3
    first = reqs[0]
    assert [k for k, _ in first.pairs] == POSTFIX_ATTRIBUTES
    a = first.attrs
    assert a["request"] == "smtpd_access_policy"
    assert a["protocol_state"] == "RCPT"
    assert a["protocol_name"] == "ESMTP"
    assert a["client_address"] == "127.0.0.1"
    assert a["client_name"] == "unknown" and a["reverse_client_name"] == "unknown"
    assert a["server_address"] == "127.0.0.1" and a["server_port"] == str(app.port)
    assert a["helo_name"] == "client.test"
    assert a["sender"] == "ann@example.org"
    assert a["recipient"] == "bob@example.com"
    assert a["recipient_count"] == "0"  # non-zero only at DATA / END-OF-MESSAGE
    assert a["size"] == "1234"
    assert a["policy_context"] == "site-a"
    assert a["queue_id"] and a["instance"] == a["queue_id"]
    assert a["sasl_username"] == "" and a["encryption_protocol"] == ""
    assert reqs[1].attrs["recipient"] == "carol@example.com"
    # the same instance for every request of one transaction, a new one for the next
    assert reqs[1].attrs["instance"] == a["instance"]
    assert reqs[2].attrs["instance"] != a["instance"]
    # one connection carried every request
    assert server.connections == 1 and {r.conn for r in reqs} == {1}
    assert len(capture.messages) == 1


@pytest.mark.parametrize("stage,state", [
    ("connect", "CONNECT"), ("helo", "EHLO"), ("mail", "MAIL"), ("rcpt", "RCPT"),
    ("data_start", "DATA"), ("data", "END-OF-MESSAGE"),
])
def test_stage_maps_to_protocol_state(run_app, raw, capture: Capture, policy_server,
                                      stage: str, state: str) -> None:
    server = policy_server(answer("DUNNO"))
    app = run_app({"plugin": [table(server, stage=stage)]}, deliver=capture)
    c = raw(app.port)
    assert c.cmd("EHLO client.test").startswith(b"250")
    replies = session(c, ["bob@example.com"])
    assert replies[-1].startswith(b"250 "), replies
    assert server.states() == [state]
    a = server.requests[0].attrs
    if stage in ("data_start", "data"):
        assert a["recipient_count"] == "1" and a["recipient"] == "bob@example.com"
    if stage == "data":
        assert a["size"] == str(len(MSG))
    if stage in ("connect", "helo"):
        assert a["sender"] == "" and a["queue_id"] == ""
        assert a["helo_name"] == ("" if stage == "connect" else "client.test")


# ------------------------------------------------------------------ actions at RCPT

RCPT = b"<bob@example.com>: Recipient address rejected: "


@pytest.mark.parametrize("action,reply,finding", [
    ("OK", b"250 2.1.5 Recipient OK", "ok"),
    ("ok", b"250 2.1.5 Recipient OK", "ok"),
    ("DUNNO", b"250 2.1.5 Recipient OK", "dunno"),
    ("1234567", b"250 2.1.5 Recipient OK", "ok"),
    ("REJECT", b"550 5.7.1 " + RCPT + b"Access denied", "reject"),
    ("REJECT go away", b"550 5.7.1 " + RCPT + b"go away", "reject"),
    ("reject 5.7.26 DMARC says no", b"550 5.7.26 " + RCPT + b"DMARC says no", "reject"),
    ("DEFER", b"450 4.7.1 " + RCPT + b"Service temporarily unavailable", "defer"),
    ("DEFER try later", b"450 4.7.1 " + RCPT + b"try later", "defer"),
    ("DEFER_IF_PERMIT Greylisted", b"450 4.7.1 " + RCPT + b"Greylisted", "defer_if_permit"),
    ("defer_if_permit 4.7.24 SPF temperror",
     b"450 4.7.24 " + RCPT + b"SPF temperror", "defer_if_permit"),
    ("DEFER_IF_REJECT maybe", b"250 2.1.5 Recipient OK", "defer_if_reject"),
    ("451 4.2.0 try later", b"451 4.2.0 " + RCPT + b"try later", "defer"),
    ("554 no", b"554 5.7.1 " + RCPT + b"no", "reject"),
    ("550 4.1.1 wrong class", b"550 5.1.1 " + RCPT + b"wrong class", "reject"),
    ("WARN look at this", b"250 2.1.5 Recipient OK", "warn"),
    ("INFO noted", b"250 2.1.5 Recipient OK", "info"),
    ("FILTER smtp:[127.0.0.1]:10025", b"250 2.1.5 Recipient OK", "filter_unsupported"),
    ("BCC archive@example.com", b"250 2.1.5 Recipient OK", "bcc_unsupported"),
    ("PREPEND no-colon-here", b"250 2.1.5 Recipient OK", "prepend_invalid"),
    ("BOGUS action", b"451 4.3.5 Server configuration problem", "unknown"),
    ("", b"451 4.3.5 Server configuration problem", "unknown"),
    ("HOLD", b"451 4.3.5 Server configuration problem", "hold_unavailable"),
])
def test_action_at_rcpt(run_app, raw, policy_server, caplog: pytest.LogCaptureFixture,
                        action: str, reply: bytes, finding: str) -> None:
    caplog.set_level(logging.INFO, logger="smtpgate")
    server = policy_server(answer(action))
    app = run_app({"plugin": [table(server)]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<ann@example.org>") == b"250 2.1.0 Sender OK"
    assert c.cmd("RCPT TO:<bob@example.com>") == reply
    c.cmd("QUIT")
    records = [r.getMessage() for r in caplog.records if r.name == "smtpgate.plugins.policy"]
    assert any(f"-> {finding}" in m for m in records), records
    if finding == "unknown":
        assert any("unknown action" in m for m in records)


def test_421_closes_the_connection(run_app, raw, policy_server) -> None:
    server = policy_server(answer("421 4.7.0 go away now"))
    app = run_app({"plugin": [table(server)]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == b"421 4.7.0 " + RCPT + b"go away now"
    assert c.closed_by_peer()


def test_finding_in_transaction_results(run_app, raw, capture: Capture, policy_server,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="smtpgate.session")
    server = policy_server(answer("DUNNO"))
    app = run_app({"plugin": [table(server, name="grey"), {"use": "results_header"}]},
                  deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert session(c, ["bob@example.com"])[-1].startswith(b"250 ")
    message = capture.messages[0][1].replace(b"\r\n ", b" ")
    assert (b"X-Smtpgate-Results: mx.test; grey=dunno (stage=rcpt rcpt=bob@example.com "
            b"action=DUNNO)") in message
    lines = [r.getMessage() for r in caplog.records if "outcome=delivered" in r.getMessage()]
    assert lines and "grey=dunno (stage=rcpt rcpt=bob@example.com action=DUNNO)" in lines[0]


def test_defer_if_permit_loses_to_a_later_rejection(run_app, raw, policy_server) -> None:
    """DEFER_IF_PERMIT is enforced at the end of the rcpt chain: a later hook's
    rejection wins (Postfix: defer_if_permit applies only if the request is permitted)."""
    server = policy_server(answer("DEFER_IF_PERMIT Greylisted"))
    probe = {"module": "tests.plugins.probe", "stages": ["rcpt"],
             "answers": {"rcpt": "550 5.1.1 no such user"},
             "when": {"rcpt": "nobody@"}, "priorities": {"rcpt": 50}}
    app = run_app({"plugin": [table(server), probe]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<nobody@example.com>") == b"550 5.1.1 no such user"
    assert c.cmd("RCPT TO:<bob@example.com>") == b"450 4.7.1 " + RCPT + b"Greylisted"


def test_reject_at_each_stage_names_what_it_refuses(run_app, raw, policy_server) -> None:
    server = policy_server(answer("REJECT policy says no"))
    app = run_app({"plugin": [table(server, stage="mail")]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("MAIL FROM:<ann@example.org>") == (
        b"550 5.7.1 <ann@example.org>: Sender address rejected: policy says no")


def test_connect_stage_defer_is_421(run_app, policy_server) -> None:
    server = policy_server(answer("DEFER busy"))
    app = run_app({"plugin": [table(server, stage="connect")]})
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as s:
        data = s.recv(4096)
    assert data == b"421 4.7.1 <unknown[127.0.0.1]>: Client host rejected: busy\r\n"


def test_data_stage_reject(run_app, raw, capture: Capture, policy_server) -> None:
    server = policy_server(answer("REJECT 5.7.0 content refused"))
    app = run_app({"plugin": [table(server, stage="data")]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert session(c, ["bob@example.com"])[-1] == (
        b"550 5.7.0 <END-OF-MESSAGE>: End-of-data rejected: content refused")
    assert capture.messages == []


# ------------------------------------------------------------------ message actions


@pytest.mark.parametrize("stage", ["rcpt", "data"])
def test_prepend_adds_the_header(run_app, raw, capture: Capture, policy_server,
                                 stage: str) -> None:
    server = policy_server(answer("PREPEND X-Greylist: delayed 1 seconds by test"))
    app = run_app({"plugin": [table(server, stage=stage)]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert session(c, ["bob@example.com"])[-1].startswith(b"250 ")
    body = Capture.strip_received(capture.messages[0][1])
    assert body == b"X-Greylist: delayed 1 seconds by test\r\n" + MSG
    # the next message of the session gets it only if the server says so again
    server.respond = answer("DUNNO")
    assert session(c, ["bob@example.com"])[-1].startswith(b"250 ")
    assert Capture.strip_received(capture.messages[1][1]) == MSG


@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
def test_discard_accepts_and_drops(run_app, raw, capture: Capture, policy_server,
                                   stage: str) -> None:
    server = policy_server(answer("DISCARD spam trap"))
    app = run_app({"plugin": [table(server, stage=stage)]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    replies = session(c, ["bob@example.com"])
    assert replies[0] == b"250 2.1.0 Sender OK"
    assert replies[1] == b"250 2.1.5 Recipient OK"
    assert replies[-1] == b"250 2.0.0 Message accepted"
    assert capture.messages == []


@pytest.mark.parametrize("stage", ["rcpt", "data"])
def test_hold_quarantines(run_app, raw, capture: Capture, policy_server, tmp_path: Path,
                          stage: str) -> None:
    server = policy_server(answer("HOLD review"))
    q = tmp_path / "held"
    app = run_app({"plugin": [table(server, stage=stage, quarantine=str(q))]},
                  deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert session(c, ["bob@example.com"])[-1] == b"250 2.0.0 Message accepted"
    assert capture.messages == []
    held = list((q / "new").iterdir())
    assert len(held) == 1 and held[0].read_bytes().endswith(MSG)


def test_redirect_replaces_the_recipients(run_app, raw, capture: Capture,
                                          policy_server) -> None:
    server = policy_server(lambda a: "REDIRECT abuse@example.com"
                           if a["recipient"] == "bob@example.com" else "DUNNO")
    app = run_app({"plugin": [table(server)]}, deliver=capture)
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert session(c, ["bob@example.com", "carol@example.com"])[-1].startswith(b"250 ")
    assert capture.messages[0][0].recipients == ["abuse@example.com"]


# ------------------------------------------------------------------ connections


def test_connection_reused_across_sessions(run_app, raw, policy_server) -> None:
    server = policy_server(answer("DUNNO"))
    app = run_app({"plugin": [table(server)]})
    for _ in range(3):
        c = raw(app.port)
        c.cmd("EHLO client.test")
        session(c, ["bob@example.com", "carol@example.com"], message=None)
        c.cmd("QUIT")
    assert len(server.requests) == 6
    assert server.connections == 1


def test_sessions_are_not_serialised(run_app, raw, policy_server) -> None:
    """Two sessions' requests are in the server at the same time: the server answers
    only once both have arrived (a barrier), which a serialising client never reaches."""
    barrier = threading.Barrier(2, timeout=8)

    def respond(attrs: dict[str, str]) -> str:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return "REJECT serialised"
        return "DUNNO"

    server = policy_server(respond)
    app = run_app({"plugin": [table(server)]})
    clients = [raw(app.port) for _ in range(2)]
    for c in clients:
        c.cmd("EHLO client.test")
        c.cmd("MAIL FROM:<ann@example.org>")
    for c in clients:
        c.send(b"RCPT TO:<bob@example.com>\r\n")
    assert [c.read_reply() for c in clients] == [b"250 2.1.5 Recipient OK"] * 2
    assert server.connections == 2


def test_reconnect_after_the_server_closed(run_app, raw, policy_server) -> None:
    """The server drops the connection instead of answering once: the request is tried
    again on a new connection (try_limit 2)."""
    calls = {"n": 0}

    def respond(attrs: dict[str, str]) -> str | None:
        calls["n"] += 1
        return None if calls["n"] == 2 else "DUNNO"

    server = policy_server(respond)
    app = run_app({"plugin": [table(server)]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("RCPT TO:<carol@example.com>") == b"250 2.1.5 Recipient OK"
    assert c.cmd("RCPT TO:<dave@example.com>") == b"250 2.1.5 Recipient OK"
    assert calls["n"] == 4 and server.connections == 2


def test_unix_socket(run_app, raw, policy_server, tmp_path: Path) -> None:
    server = policy_server(answer("REJECT via unix"), unix_path=str(tmp_path / "policy.sock"))
    app = run_app({"plugin": [table(server)]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == b"550 5.7.1 " + RCPT + b"via unix"


def test_inet_prefix_notation(run_app, raw, policy_server) -> None:
    server = policy_server(answer("REJECT via inet"))
    app = run_app({"plugin": [table(f"inet:{server.address}")]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == b"550 5.7.1 " + RCPT + b"via inet"


# ------------------------------------------------------------------ failures


@pytest.mark.parametrize("default_action,reply", [
    ("tempfail", b"451 4.3.5 Server configuration problem"),
    ("accept", b"250 2.1.5 Recipient OK"),
    ("reject", b"550 5.3.5 Server configuration problem"),
])
def test_default_action_when_server_down(run_app, raw, default_action: str,
                                         reply: bytes) -> None:
    app = run_app({"plugin": [table(f"127.0.0.1:{free_port()}",
                                    default_action=default_action)]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == reply


def test_default_action_when_server_never_answers(run_app, raw, policy_server) -> None:
    server = policy_server(answer(None))  # closes every connection without replying
    app = run_app({"plugin": [table(server, try_limit=3)]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == b"451 4.3.5 Server configuration problem"
    assert len(server.requests) == 3 and server.connections == 3


def test_default_action_on_timeout(run_app, raw, policy_server) -> None:
    stop = threading.Event()

    def respond(attrs: dict[str, str]) -> str:
        stop.wait(20)
        return "DUNNO"

    server = policy_server(respond)
    app = run_app({"plugin": [table(server, timeout=0.5, try_limit=1,
                                    default_action="reject")]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    try:
        assert c.cmd("RCPT TO:<bob@example.com>") == b"550 5.3.5 Server configuration problem"
    finally:
        stop.set()


def test_malformed_reply_is_a_failure(run_app, raw, policy_server) -> None:
    server = policy_server(answer("\0garbage without equals\n\n"))
    app = run_app({"plugin": [table(server, try_limit=1)]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<bob@example.com>") == b"451 4.3.5 Server configuration problem"


# ------------------------------------------------------------------ relay control


def test_policy_alone_is_not_relay_control(tmp_path: Path) -> None:
    cfg = {"server": {"listen": ["127.0.0.1:0"]}, "maildir": {"path": str(tmp_path)},
           "plugin": [{"use": "relay", "enabled": False},
                      table("127.0.0.1:10023")]}
    with pytest.raises(ConfigError) as info:
        Smtpgate(cfg)
    assert any("relay control is disabled and no other plugin decides at rcpt" in p
               for p in info.value.problems), info.value.problems
    cfg["plugin"][1]["relay_decider"] = True
    Smtpgate(cfg)  # builds


@pytest.mark.parametrize("relay_decider,reply", [
    (False, b"550 5.7.1 Relaying denied"),
    (True, b"250 2.1.5 Recipient OK"),
])
def test_ok_before_relay_control(run_app, raw, policy_server, relay_decider: bool,
                                 reply: bytes) -> None:
    """A policy hook moved before relay control (priority -95): its OK skips relay
    control only with relay_decider = true."""
    server = policy_server(answer("OK"))
    app = run_app({"relay": {"relay_domains": ["example.com"], "local_networks": []},
                   "plugin": [table(server, priority=-95, relay_decider=relay_decider)]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    c.cmd("MAIL FROM:<ann@example.org>")
    assert c.cmd("RCPT TO:<someone@elsewhere.example>") == reply


def test_bad_options(tmp_path: Path) -> None:
    base = {"server": {"listen": ["127.0.0.1:0"]}, "maildir": {"path": str(tmp_path)}}
    with pytest.raises(ConfigError) as info:
        Smtpgate({**base, "plugin": [table("localhost", stage="queue")]})
    problems = " | ".join(info.value.problems)
    assert "plugin[0].address" in problems or "plugin[0].stage" in problems
    with pytest.raises(ConfigError) as info:
        Smtpgate({**base, "plugin": [table("127.0.0.1:10023", stage="queue")]})
    assert info.value.problems == [
        "plugin[0].stage: must be one of connect, helo, mail, rcpt, data_start, data"]
