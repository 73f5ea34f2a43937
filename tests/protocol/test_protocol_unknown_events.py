"""Unrecognised commands as :class:`UnknownCommand` events (``unknown_events``), so a
plugin at the ``unknown`` stage may answer them (issue 9); the default mode still
answers ``500 5.5.1`` in the core. RFC 5321 §4.2.4."""

from __future__ import annotations

import pytest

from smtpgate.protocol import (
    AutoReply,
    ProtocolConfig,
    State,
    UnknownCommand,
)
from smtpgate.reply import R, Reply

from .helpers import Dialogue, codes

EVENTS = ProtocolConfig(unknown_events=True, max_unknown_commands=2)
LEGACY = ProtocolConfig(max_unknown_commands=2)


def _answer(reply: Reply) -> dict[type, object]:
    return {UnknownCommand: lambda c, e: reply}


def test_default_mode_answers_in_the_core() -> None:
    d = Dialogue(LEGACY)
    assert d.codes(b"XCLIENT NAME=x\r\n") == ["500 5.5.1"]
    assert d.events == [AutoReply(R.UNKNOWN_COMMAND, "XCLIENT NAME=x")]
    assert d.conn.unknown_commands == 1


def test_event_carries_verb_line_and_default_reply() -> None:
    d = Dialogue(EVENTS)
    d.feed(b"xclient NAME=spike.example ADDR=192.0.2.7\r\n")
    assert d.events == [
        UnknownCommand(
            "XCLIENT",
            "xclient NAME=spike.example ADDR=192.0.2.7",
            R.UNKNOWN_COMMAND,
            "xclient NAME=spike.example ADDR=192.0.2.7",
        )
    ]


def test_line_is_decoded_like_commands_and_command_is_log_safe() -> None:
    d = Dialogue(EVENTS)
    d.feed("XFOO \u00fc\x01bar\r\n".encode())
    ev = d.events[0]
    assert isinstance(ev, UnknownCommand)
    assert ev.line == "XFOO \u00fc\x01bar"  # UTF-8 decoded, as received
    assert "\x01" not in ev.command and ev.command.startswith("XFOO ")


def test_default_reply_sent_is_counted_and_closes_like_before() -> None:
    data = b"FOO\r\nBAR\r\nNOOP\r\nBAZ\r\nNOOP\r\n"
    legacy = Dialogue(LEGACY)
    events = Dialogue(EVENTS)  # the driver sends the event's default reply
    assert events.feed(data) == legacy.feed(data)
    assert codes(events.wire) == ["500 5.5.1", "500 5.5.1", "250 2.0.0", "500 5.5.1", "421 4.7.0"]
    assert events.conn.closed and events.conn.unknown_commands == 3
    assert events.conn.errors == legacy.conn.errors == 2


def test_plugin_answer_2xx_is_not_counted() -> None:
    d = Dialogue(EVENTS, overrides=_answer(Reply(250, "2.0.0", "XCLIENT done")))
    assert d.codes(b"XCLIENT NAME=x\r\n" * 6 + b"NOOP\r\n") == ["250 2.0.0"] * 7
    assert not d.conn.closed
    assert d.conn.unknown_commands == 0 and d.conn.errors == 0


def test_plugin_answer_4xx_is_not_an_unknown_command() -> None:
    # A plugin that timed out answers 451 4.3.0 (mail system: not the client's error).
    d = Dialogue(EVENTS, overrides=_answer(Reply(451, "4.3.0", "Local error")))
    assert d.codes(b"XFOO\r\n" * 4 + b"NOOP\r\n") == ["451 4.3.0"] * 4 + ["250 2.0.0"]
    assert d.conn.unknown_commands == 0 and d.conn.errors == 0


def test_any_5xx_answer_is_counted() -> None:
    d = Dialogue(EVENTS, overrides=_answer(Reply(550, "5.7.1", "Not for you")))
    assert d.codes(b"XFOO\r\n" * 4) == ["550 5.7.1"] * 3 + ["421 4.7.0"]
    assert d.conn.closed and d.conn.unknown_commands == 3


def test_plugin_421_closes() -> None:
    d = Dialogue(EVENTS, overrides=_answer(Reply(421, "4.7.0", "Go away")))
    assert d.codes(b"XFOO\r\nNOOP\r\n") == ["421 4.7.0"]
    assert d.conn.closed


def test_answered_unknown_command_keeps_the_transaction() -> None:
    d = Dialogue(EVENTS, overrides=_answer(Reply(250, "2.0.0", "ok")))
    out = d.codes(b"EHLO c\r\nMAIL FROM:<a@b>\r\nXFOO\r\nRCPT TO:<c@d>\r\nXBAR\r\nDATA\r\n")
    assert out == ["250", "250 2.1.0", "250 2.0.0", "250 2.1.5", "250 2.0.0", "354"]
    assert d.conn.state is State.DATA


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"\xc3\xbcXFOO\r\n", R.BAD_BYTES),  # a verb that is not ASCII is not a command
        (b"GET / HTTP/1.1\r\n", Reply(421, "4.7.0", "This is an SMTP server, not a web proxy; closing connection")),
    ],
)
def test_not_commands_stay_core_replies(line: bytes, reply: Reply) -> None:
    d = Dialogue(EVENTS)
    d.feed(line)
    assert len(d.events) == 1 and isinstance(d.events[0], AutoReply)
    assert d.events[0].reply == reply


def test_disabled_known_commands_stay_core_replies() -> None:
    # EHLO switched off (ZMailer NoEHLO) and LHLO on an SMTP listener are answered
    # by the core: a plugin answering 250 would not change the session's state.
    d = Dialogue(ProtocolConfig(unknown_events=True, ehlo=False))
    assert d.codes(b"EHLO c\r\nLHLO c\r\n") == ["500 5.5.1", "500 5.5.1"]
    assert all(isinstance(e, AutoReply) for e in d.events)
    assert d.conn.unknown_commands == 2


def test_rejected_session_still_sees_unknown_commands() -> None:
    d = Dialogue(EVENTS, greeting=Reply(554, "5.7.1", "no service"))
    assert d.codes(b"XFOO\r\nMAIL FROM:<a@b>\r\n") == ["500 5.5.1", "503 5.5.1"]
    assert isinstance(d.events[0], UnknownCommand)


def test_pipelined_and_byte_by_byte_give_the_same_events() -> None:
    data = b"EHLO c\r\nXONE a\r\nNOOP\r\nXTWO b c\r\nQUIT\r\n"
    whole = Dialogue(EVENTS)
    split = Dialogue(EVENTS)
    assert whole.feed(data) == split.feed(data, chunks=1)
    assert whole.events == split.events
    assert [e.verb for e in whole.events if isinstance(e, UnknownCommand)] == ["XONE", "XTWO"]
