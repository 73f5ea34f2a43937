"""The milter client against a milter written here with smtpgate's codec (server side):
every modification action, every response, option negotiation (NO*/NR_*/SKIP), macros,
connection reuse, several milters in order, default_action. Server-level: both loops."""

from __future__ import annotations

import smtplib
import threading
from pathlib import Path
from typing import Any

import pytest

from smtpgate.milter import codec
from smtpgate.milter.codec import SMFIP

from ...support import Capture
from .conftest import Findings
from .scripted_milter import MilterConn

MSG = (b"From: Ann <ann@client.test>\r\n"
       b"To: bob@example.com\r\n"
       b"Subject: hello\r\n"
       b"X-Dup: one\r\n"
       b"X-Dup: two\r\n"
       b"X-Folded: first\r\n\tsecond\r\n"
       b"\r\n"
       b"body line 1\r\nbody line 2\r\n")


def milter_cfg(socket: str, **extra: Any) -> dict[str, Any]:
    return {"use": "milter", "socket": socket, **extra}


def send(app: Any, msg: bytes = MSG, rcpts: list[str] | None = None,
         sender: str = "ann@client.test") -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", app.port, timeout=20) as c:
        return c.sendmail(sender, rcpts or ["bob@example.com"], msg)


def refused(app: Any, msg: bytes = MSG, rcpts: list[str] | None = None) -> tuple[int, bytes]:
    try:
        send(app, msg, rcpts)
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = next(iter(exc.recipients.values()))
        return code, text
    raise AssertionError("not refused")


# ------------------------------------------------------------------- modifications


def test_every_modification_action_applied(run_app, milters, capture: Capture,
                                           findings: Findings) -> None:
    def script(conn: MilterConn, cmd: Any) -> list[Any] | None:
        if isinstance(cmd, codec.EndOfMessage):
            return [
                codec.AddHeader("X-Added", "added value"),
                codec.InsertHeader(0, "X-First", "at the top"),
                codec.ChangeHeader(1, "Subject", "changed"),
                codec.ChangeHeader(2, "X-Dup", ""),  # delete the second X-Dup
                codec.ChangeHeader(1, "X-Folded", "new\n\tfolded"),
                codec.ChangeFrom("<new-sender@client.test>", "BODY=8BITMIME"),
                codec.AddRcpt("<added@example.com>"),
                codec.AddRcptPar("<par@example.com>", "NOTIFY=NEVER"),
                codec.DelRcpt("<bob@example.com>"),
                codec.ReplaceBody(b"new body\r\n"),
                codec.ReplaceBody(b"second chunk\n"),
                codec.Progress(),
                codec.Continue(),
            ]
        return None

    m = milters(script)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    findings.install(app)
    assert send(app) == {}
    env, message = capture.messages[0]
    assert env.mail_from == "new-sender@client.test"
    assert env.mail_params == {"BODY": "8BITMIME"}
    assert [(r.address, r.params) for r in env.rcpt_to] == [
        ("added@example.com", {}), ("par@example.com", {"NOTIFY": "NEVER"})]
    assert Capture.strip_received(message) == (
        b"X-First: at the top\r\n"
        b"From: Ann <ann@client.test>\r\n"
        b"To: bob@example.com\r\n"
        b"Subject: changed\r\n"
        b"X-Dup: one\r\n"
        b"X-Folded: new\r\n\tfolded\r\n"
        b"X-Added: added value\r\n"
        b"\r\n"
        b"new body\r\nsecond chunk\r\n")
    result, details = findings.tx[0]["milter"]
    assert result == "continue"
    assert details["changes"] == [
        "add_header X-Added", "insert_header 0 X-First", "change_header 1 Subject",
        "delete_header 2 X-Dup", "change_header 1 X-Folded", "change_from <new-sender@client.test>",
        "add_rcpt <added@example.com>", "add_rcpt <par@example.com>",
        "delete_rcpt <bob@example.com>", "replace_body"]


def test_events_macros_and_header_values(run_app, milters, capture: Capture) -> None:
    m = milters()
    app = run_app({"plugin": [milter_cfg(m.socket, daemon_name="mx-in")]}, deliver=capture)
    send(app, rcpts=["bob@example.com", "carol@example.net"])
    m.settle()
    conn = m.conns[0]
    assert conn.offered is not None and conn.offered.version == 6
    assert conn.offered.actions == codec.ACTIONS_ALL
    assert conn.kinds == ["OptNeg", "Connect", "Helo", "Mail", "Rcpt", "Rcpt", "Data",
                          "Header", "Header", "Header", "Header", "Header", "Header",
                          "EndOfHeaders", "Body", "EndOfMessage", "Quit"]
    connect = conn.of(codec.Connect)[0]
    assert (connect.family, connect.address) == ("4", "127.0.0.1")
    assert connect.hostname == "[127.0.0.1]"
    c = conn.macros["C"]
    assert c["j"] == "mx.test" and c["{daemon_name}"] == "mx-in"
    assert c["{if_addr}"] == "127.0.0.1" and c["{if_name}"] == "mx.test"
    assert c["_"] == "unknown [127.0.0.1]"
    assert conn.of(codec.Mail)[0].args[0] == "<ann@client.test>"
    assert conn.macros["M"]["{mail_addr}"] == "ann@client.test"
    assert conn.macros["M"]["i"] == conn.macros["E"]["i"] != ""
    assert conn.macros["R"]["{rcpt_addr}"] == "carol@example.net"
    assert conn.macros["R"]["{rcpt_host}"] == "example.net"
    headers = [(h.name, h.value) for h in conn.of(codec.Header)]
    assert headers[0] == ("From", "Ann <ann@client.test>")
    assert headers[-1] == ("X-Folded", "first\n\tsecond")
    assert conn.of(codec.Body)[0].chunk == b"body line 1\r\nbody line 2\r\n"


def test_big_body_in_chunks_and_skip(run_app, milters, capture: Capture) -> None:
    def script(conn: MilterConn, cmd: Any) -> list[Any] | None:
        if isinstance(cmd, codec.Body) and len(conn.of(codec.Body)) == 2:
            return [codec.Skip()]
        return None

    m = milters(script, protocol=SMFIP.SKIP)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    body = b"".join(b"%07d %s\r\n" % (i, b"x" * 70) for i in range(3000))  # ~240 KB
    send(app, b"Subject: big\r\n\r\n" + body)
    m.settle()
    chunks = [b.chunk for b in m.conns[0].of(codec.Body)]
    assert [len(c) for c in chunks] == [65535, 65535]  # skipped after the second
    assert b"".join(chunks) == body[:131070]
    assert m.conns[0].kinds[-2:] == ["EndOfMessage", "Quit"]
    assert Capture.strip_received(capture.messages[0][1]).endswith(body)


# ------------------------------------------------------------------------ responses


@pytest.mark.parametrize(
    ("stage", "answer", "code", "text"),
    [
        (codec.Mail, codec.Reject(), 550, b"5.7.1 Command rejected"),
        (codec.Mail, codec.TempFail(), 451, b"4.7.1 Service unavailable - try again later"),
        (codec.Rcpt, codec.ReplyCode("553 5.1.3 Bad recipient"), 553, b"5.1.3 Bad recipient"),
        (codec.Rcpt, codec.ReplyCode("450 greylisted, 100%% sure"), 450,
         b"4.7.1 greylisted, 100% sure"),
        (codec.Data, codec.Reject(), 550, b"5.7.1 Command rejected"),
        (codec.Header, codec.TempFail(), 451, b"4.7.1 Service unavailable - try again later"),
        (codec.EndOfHeaders, codec.ReplyCode("554 5.7.0 No thanks"), 554, b"5.7.0 No thanks"),
        (codec.Body, codec.Reject(), 550, b"5.7.1 Command rejected"),
        (codec.EndOfMessage, codec.ReplyCode("550-5.7.1 line one\r\n550 5.7.1 line two"),
         550, b"5.7.1 line one\n5.7.1 line two"),
    ],
)
def test_refusals_at_each_stage(run_app, milters, capture: Capture, findings: Findings,
                                stage: type, answer: Any, code: int, text: bytes) -> None:
    def script(conn: MilterConn, cmd: Any) -> list[Any] | None:
        if isinstance(cmd, stage):
            return [codec.Progress(), answer]
        return None

    m = milters(script)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    assert refused(app) == (code, text)
    assert capture.messages == []


def test_discard_at_end_of_message(run_app, milters, capture: Capture) -> None:
    m = milters(lambda conn, cmd: [codec.AddHeader("X-No", "x"), codec.Discard()]
                if isinstance(cmd, codec.EndOfMessage) else None)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=20) as c:
        c.ehlo("client.test")
        c.mail("ann@client.test")
        c.rcpt("bob@example.com")
        code, text = c.data(MSG)
    assert (code, text) == (250, b"2.0.0 Message accepted")
    assert capture.messages == []


def test_discard_at_rcpt_stops_the_events(run_app, milters, capture: Capture) -> None:
    m = milters(lambda conn, cmd: [codec.Discard()] if isinstance(cmd, codec.Rcpt) else None)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    assert send(app, rcpts=["bob@example.com", "carol@example.com"]) == {}
    assert capture.messages == []
    m.settle()
    assert m.conns[0].kinds == ["OptNeg", "Connect", "Helo", "Mail", "Rcpt", "Quit"]


def test_accept_at_mail_skips_the_rest_of_the_message(run_app, milters,
                                                      capture: Capture) -> None:
    m = milters(lambda conn, cmd: [codec.Accept()] if isinstance(cmd, codec.Mail) else None)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=20) as c:
        c.sendmail("ann@client.test", ["bob@example.com"], MSG)
        c.sendmail("ann@client.test", ["bob@example.com"], MSG)
    assert len(capture.messages) == 2
    m.settle()
    # one connection for the session; ABORT before the second MAIL (no end of message)
    assert len(m.conns) == 1
    assert m.conns[0].kinds == ["OptNeg", "Connect", "Helo", "Mail", "Abort", "Mail", "Quit"]


def test_connection_reused_across_messages(run_app, milters, capture: Capture) -> None:
    def script(conn: MilterConn, cmd: Any) -> list[Any] | None:
        if isinstance(cmd, codec.Rcpt) and cmd.args[0] == "<nobody@example.com>":
            return [codec.Reject()]
        return None

    m = milters(script)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    with smtplib.SMTP("127.0.0.1", app.port, timeout=20) as c:
        c.sendmail("ann@client.test", ["bob@example.com"], MSG)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            c.sendmail("ann@client.test", ["nobody@example.com"], MSG)
        c.sendmail("ann@client.test", ["bob@example.com"], MSG)
    m.settle()
    assert len(m.conns) == 1
    kinds = [k for k in m.conns[0].kinds if k not in ("Header",)]
    assert kinds == ["OptNeg", "Connect", "Helo",
                     "Mail", "Rcpt", "Data", "EndOfHeaders", "Body", "EndOfMessage",
                     "Mail", "Rcpt", "Abort",  # smtplib's RSET after the refused RCPT
                     "Mail", "Rcpt", "Data", "EndOfHeaders", "Body", "EndOfMessage", "Quit"]
    assert len(capture.messages) == 2


def test_reject_at_connect_and_helo(run_app, milters, raw) -> None:
    m = milters(lambda conn, cmd: [codec.ReplyCode("554 5.7.1 Not you")]
                if isinstance(cmd, codec.Connect) else None)
    app = run_app({"plugin": [milter_cfg(m.socket)]})
    c = raw(app.port)
    assert c.greeting == b"554 5.7.1 Not you"
    m2 = milters(lambda conn, cmd: [codec.Reject()] if isinstance(cmd, codec.Helo) else None)
    app2 = run_app({"plugin": [milter_cfg(m2.socket)]})
    c2 = raw(app2.port)
    assert c2.cmd("EHLO client.test") == b"550 5.7.1 Command rejected"


def test_tempfail_at_connect_closes(run_app, milters, raw) -> None:
    m = milters(lambda conn, cmd: [codec.TempFail()] if isinstance(cmd, codec.Connect) else None)
    app = run_app({"plugin": [milter_cfg(m.socket)]})
    c = raw(app.port)
    assert c.greeting == b"421 4.7.1 Service unavailable - try again later"
    assert c.closed_by_peer()


def test_unknown_command(run_app, milters, raw) -> None:
    m = milters(lambda conn, cmd: [codec.ReplyCode("502 5.5.2 No XFOO here")]
                if isinstance(cmd, codec.Unknown) else None)
    app = run_app({"plugin": [milter_cfg(m.socket)]})
    c = raw(app.port)
    c.cmd("EHLO client.test")
    assert c.cmd("XFOO bar") == b"502 5.5.2 No XFOO here"
    assert m.conns[0].of(codec.Unknown)[0].line == "XFOO bar"


def test_quarantine(run_app, milters, capture: Capture, tmp_path: Path, caplog) -> None:
    m = milters(lambda conn, cmd: [codec.AddHeader("X-Held", "yes"),
                                   codec.Quarantine("looks odd"), codec.Continue()]
                if isinstance(cmd, codec.EndOfMessage) else None)
    qdir = tmp_path / "quarantine"
    app = run_app({"plugin": [milter_cfg(m.socket, quarantine_path=str(qdir))]},
                  deliver=capture)
    caplog.set_level("INFO", logger="smtpgate.session")
    assert send(app) == {}
    assert capture.messages == []
    stored = list((qdir / "new").iterdir())
    assert len(stored) == 1 and b"X-Held: yes\r\n" in stored[0].read_bytes()
    lines = [r.getMessage() for r in caplog.records if "results=" in r.getMessage()]
    assert any("milter=quarantine (stage=eom changes=add_header X-Held,quarantine "
               "reason=looks odd)" in ln for ln in lines), lines


def test_quarantine_without_a_path_defers(run_app, milters, capture: Capture) -> None:
    m = milters(lambda conn, cmd: [codec.Quarantine("odd"), codec.Continue()]
                if isinstance(cmd, codec.EndOfMessage) else None)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    assert refused(app) == (451, b"4.7.1 Message held for review - try again later")
    assert capture.messages == []


# ---------------------------------------------------------------- negotiation


def test_no_flags_honoured(run_app, milters, capture: Capture) -> None:
    flags = (SMFIP.NOCONNECT | SMFIP.NOHELO | SMFIP.NOMAIL | SMFIP.NORCPT | SMFIP.NODATA
             | SMFIP.NOHDRS | SMFIP.NOEOH | SMFIP.NOBODY | SMFIP.NOUNKNOWN)
    m = milters(protocol=flags)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    send(app)
    m.settle()
    assert m.conns[0].kinds == ["OptNeg", "EndOfMessage", "Quit"]
    assert set(m.conns[0].macros) == {"E"}  # no macros for events not sent
    assert len(capture.messages) == 1


def test_no_reply_flags_honoured(run_app, milters, capture: Capture) -> None:
    flags = (SMFIP.NR_CONN | SMFIP.NR_HELO | SMFIP.NR_MAIL | SMFIP.NR_RCPT | SMFIP.NR_DATA
             | SMFIP.NR_HDR | SMFIP.NR_EOH | SMFIP.NR_BODY | SMFIP.NR_UNKN)
    m = milters(protocol=flags)  # the scripted milter then never answers those events
    app = run_app({"plugin": [milter_cfg(m.socket, command_timeout=30)]}, deliver=capture)
    send(app)
    send(app)
    m.settle()
    assert len(capture.messages) == 2
    assert m.conns[0].kinds[-4:] == ["EndOfHeaders", "Body", "EndOfMessage", "Quit"]


def test_macro_lists_asked_by_the_milter(run_app, milters) -> None:
    m = milters(actions=codec.ACTIONS_ALL,
                macros={codec.SMFIM.CONNECT: ("j", "{client_addr}"),
                        codec.SMFIM.ENVFROM: ("{mail_addr}", "{daemon_name}"),
                        codec.SMFIM.EOM: ("i",)})
    app = run_app({"plugin": [milter_cfg(m.socket)]})
    send(app)
    conn = m.conns[0]
    assert conn.macros["C"] == {"j": "mx.test", "{client_addr}": "127.0.0.1"}
    assert conn.macros["M"] == {"{mail_addr}": "ann@client.test", "{daemon_name}": "smtpgate"}
    assert set(conn.macros["E"]) == {"i"}
    assert "R" in conn.macros  # Postfix's defaults where the milter named none


def test_unrequested_modification_is_a_protocol_error(run_app, milters,
                                                     capture: Capture) -> None:
    m = milters(lambda conn, cmd: [codec.AddHeader("X-Sneaky", "1"), codec.Continue()]
                if isinstance(cmd, codec.Rcpt) else None)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    assert refused(app) == (451, b"4.3.5 Server configuration problem - try again later")


# ---------------------------------------------------------------- several milters


def test_several_milters_in_order_see_each_others_changes(run_app, milters,
                                                          capture: Capture) -> None:
    first = milters(lambda conn, cmd: [codec.AddHeader("X-One", "1"),
                                       codec.ChangeHeader(1, "Subject", "by one"),
                                       codec.Continue()]
                    if isinstance(cmd, codec.EndOfMessage) else None)
    second = milters(lambda conn, cmd: [codec.AddHeader("X-Two", "2"), codec.Continue()]
                     if isinstance(cmd, codec.EndOfMessage) else None, tcp=True)
    app = run_app({"plugin": [milter_cfg(first.socket, name="one"),
                              milter_cfg(second.socket, name="two")]}, deliver=capture)
    send(app)
    seen = [(h.name, h.value) for h in second.conns[0].of(codec.Header)]
    assert ("X-One", "1") in seen and ("Subject", "by one") in seen
    msg = Capture.strip_received(capture.messages[0][1])
    assert b"Subject: by one\r\n" in msg
    assert b"X-One: 1\r\nX-Two: 2\r\n\r\n" in msg


def test_sessions_are_not_serialised(run_app, milters, capture: Capture) -> None:
    """Session A's MAIL is held by the milter until session B's MAIL reached it: a client
    that served one session at a time would never get B's MAIL there."""
    b_arrived = threading.Event()
    a_saw_b: list[bool] = []

    def script(conn: MilterConn, cmd: Any) -> list[Any] | None:
        if isinstance(cmd, codec.Mail):
            if cmd.args[0] == "<a@client.test>":
                a_saw_b.append(b_arrived.wait(20))
            else:
                b_arrived.set()
        return None

    m = milters(script)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    t = threading.Thread(target=send, args=(app, MSG, None, "a@client.test"))
    t.start()
    send(app, MSG, None, "b@client.test")
    t.join(30)
    assert a_saw_b == [True]
    assert len(capture.messages) == 2


# ---------------------------------------------------------------- default_action


@pytest.mark.parametrize(("action", "expect"), [
    ("tempfail", (451, b"4.3.5 Server configuration problem - try again later")),
    ("reject", (550, b"5.5.0 Service unavailable")),
    ("accept", None),
])
def test_milter_down(run_app, capture: Capture, tmp_path: Path, findings: Findings,
                     action: str, expect: Any) -> None:
    app = run_app({"plugin": [milter_cfg(f"unix:{tmp_path}/nothing.sock",
                                         default_action=action)]}, deliver=capture)
    findings.install(app)
    if expect is None:
        assert send(app) == {}
        assert len(capture.messages) == 1
        assert findings.tx[0]["milter"][0] == "error"
    else:
        assert refused(app) == expect
        assert capture.messages == []


@pytest.mark.parametrize("action", ["tempfail", "accept"])
def test_milter_goes_away_mid_message(run_app, milters, capture: Capture, action: str) -> None:
    """The milter sends two modifications, then its connection drops before the final
    answer: nothing of them is applied; tempfail refuses, accept delivers the original."""
    def script(conn: MilterConn, cmd: Any) -> list[Any] | None:
        if isinstance(cmd, codec.EndOfMessage):
            return [codec.AddHeader("X-Half", "1"), codec.ReplaceBody(b"half\r\n"), "close"]
        return None

    m = milters(script)
    app = run_app({"plugin": [milter_cfg(m.socket, default_action=action)]}, deliver=capture)
    if action == "tempfail":
        assert refused(app) == (451, b"4.3.5 Server configuration problem - try again later")
        assert capture.messages == []
    else:
        assert send(app) == {}
        assert Capture.strip_received(capture.messages[0][1]) == MSG


def test_milter_gone_during_body(run_app, milters, capture: Capture) -> None:
    m = milters(lambda conn, cmd: ["close"] if isinstance(cmd, codec.Body) else None)
    app = run_app({"plugin": [milter_cfg(m.socket)]}, deliver=capture)
    assert refused(app)[0] == 451
    assert capture.messages == []


def test_milter_timeout(run_app, milters, capture: Capture) -> None:
    release = threading.Event()

    def script(conn: MilterConn, cmd: Any) -> list[Any] | None:
        if isinstance(cmd, codec.Mail):
            release.wait(30)
        return None

    m = milters(script)
    app = run_app({"plugin": [milter_cfg(m.socket, command_timeout=0.5)]}, deliver=capture)
    try:
        assert refused(app) == (451, b"4.3.5 Server configuration problem - try again later")
    finally:
        release.set()


def test_broken_protocol(run_app, milters, capture: Capture) -> None:
    m = milters(lambda conn, cmd: [codec.ReplyCode("250 ok")]
                if isinstance(cmd, codec.Rcpt) else None)
    app = run_app({"plugin": [milter_cfg(m.socket, default_action="reject")]},
                  deliver=capture)
    assert refused(app) == (550, b"5.5.0 Service unavailable")


@pytest.mark.parametrize("notation", ["inet:{port}@127.0.0.1", "inet:127.0.0.1:{port}"])
def test_tcp_notations(run_app, milters, capture: Capture, notation: str) -> None:
    m = milters(lambda conn, cmd: [codec.AddHeader("X-Tcp", "yes"), codec.Continue()]
                if isinstance(cmd, codec.EndOfMessage) else None, tcp=True)
    port = m.socket.split(":")[1].split("@")[0]
    app = run_app({"plugin": [milter_cfg(notation.format(port=port))]}, deliver=capture)
    send(app)
    assert b"X-Tcp: yes\r\n" in capture.messages[0][1]
