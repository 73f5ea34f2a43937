"""The milter codec (sans-IO, both directions): round-trip tables, exact wire bytes,
malformed frames, a hypothesis property; socket notations and reply parsing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.milter import codec
from smtpgate.milter.client import MilterAddress, parse_socket
from smtpgate.plugins.milter import parse_reply
from smtpgate.reply import Reply

COMMANDS = [
    codec.OptNeg(6, 0x1FF, 0x1FFFFF),
    codec.Macro("C", {"j": "mx.test", "{daemon_name}": "smtpgate"}),
    codec.Connect("client.test", "4", 25, "192.0.2.1"),
    codec.Connect("[::1]", "6", 1025, "::1"),
    codec.Connect("local", "L", 0, "/run/sock"),
    codec.Connect("unknown", "U"),
    codec.Helo("client.test"),
    codec.Mail(("<a@b.test>", "SIZE=10", "BODY=8BITMIME")),
    codec.Rcpt(("<c@d.test>", "NOTIFY=NEVER")),
    codec.Data(),
    codec.Header("Subject", "caf\udce9 line\n\tfolded"),
    codec.EndOfHeaders(),
    codec.Body(b"x" * 65535),
    codec.EndOfMessage(),
    codec.EndOfMessage(b"tail"),
    codec.Abort(),
    codec.Quit(),
    codec.QuitNewConnection(),
    codec.Unknown("XFOO bar"),
]
RESPONSES = [
    codec.OptNeg(6, 0x1, 0x10, {codec.SMFIM.CONNECT: ("j", "{client_addr}"),
                                codec.SMFIM.EOM: ("i",)}),
    codec.Continue(), codec.Accept(), codec.Reject(), codec.TempFail(), codec.Discard(),
    codec.Skip(), codec.Progress(), codec.ConnFail(), codec.Shutdown(),
    codec.ReplyCode("550 5.7.1 no"),
    codec.AddHeader("X-A", "v"), codec.InsertHeader(3, "X-B", " v"),
    codec.ChangeHeader(1, "Subject", ""), codec.ChangeFrom("<a@b>"),
    codec.ChangeFrom("<a@b>", "SIZE=1"), codec.AddRcpt("<r@x>"),
    codec.AddRcptPar("<r@x>", "NOTIFY=NEVER"), codec.AddRcptPar("<r@x>"),
    codec.DelRcpt("<r@x>"), codec.ReplaceBody(b"\0binary\xff"), codec.Quarantine("why"),
]


def roundtrip(message, decode):
    frames = codec.FrameDecoder().feed(codec.encode(message))
    assert len(frames) == 1
    return decode(frames[0])


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_commands_round_trip(command) -> None:
    assert roundtrip(command, codec.decode_command) == command


@pytest.mark.parametrize("response", RESPONSES, ids=lambda c: type(c).__name__)
def test_responses_round_trip(response) -> None:
    assert roundtrip(response, codec.decode_response) == response


@pytest.mark.parametrize(("message", "wire"), [
    (codec.OptNeg(6, 0x1FF, 0x3), b"\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\0\0\x03"),
    (codec.Connect("h", "4", 25, "1.2.3.4"), b"\0\0\0\x0eCh\x004\x00\x191.2.3.4\0"),
    (codec.Macro("M", {"i": "Q1"}), b"\0\0\0\x07DMi\0Q1\0"),
    (codec.Header("To", "x"), b"\0\0\0\x06LTo\0x\0"),
    (codec.ChangeHeader(2, "X", ""), b"\0\0\0\x08m\0\0\0\x02X\0\0"),
    (codec.Continue(), b"\0\0\0\x01c"),
])
def test_exact_wire_bytes(message, wire: bytes) -> None:
    assert codec.encode(message) == wire


def test_frames_split_anywhere() -> None:
    data = b"".join(codec.encode(m) for m in RESPONSES)
    dec = codec.FrameDecoder()
    frames = []
    for i in range(len(data)):
        frames += dec.feed(data[i:i + 1])
    assert [codec.decode_response(f) for f in frames] == RESPONSES
    assert dec.pending == 0


@pytest.mark.parametrize(("frame", "message"), [
    (codec.Frame(b"Z", b""), "unknown"),
    (codec.Frame(b"h", b"X\0v"), "not NUL-terminated"),
    (codec.Frame(b"m", b"\0\0"), "truncated"),
    (codec.Frame(b"O", b"\0\0\0\x06"), "shorter than 12"),
    (codec.Frame(b"h", b"X\0"), "expected 2"),
])
def test_malformed_responses(frame: codec.Frame, message: str) -> None:
    with pytest.raises(codec.MilterProtocolError, match=message):
        codec.decode_response(frame)


def test_bad_lengths_and_values() -> None:
    with pytest.raises(codec.MilterProtocolError):
        codec.FrameDecoder().feed(b"\0\0\0\0")
    with pytest.raises(codec.MilterProtocolError):
        codec.FrameDecoder(max_frame=10).feed(struct.pack("!I", 11) + b"B")
    with pytest.raises(ValueError):
        codec.encode(codec.Header("X", "a\0b"))
    with pytest.raises(ValueError):
        codec.encode(codec.Body(b"x" * 65536))


_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=40)
_u32 = st.integers(0, 2**32 - 1)
_any = st.one_of(
    st.builds(codec.Header, _text, _text),
    st.builds(codec.Mail, st.lists(_text, min_size=1, max_size=4).map(tuple)),
    st.builds(codec.Rcpt, st.lists(_text, min_size=1, max_size=4).map(tuple)),
    st.builds(codec.Connect, _text, st.sampled_from("46L"), st.integers(0, 65535), _text),
    st.builds(codec.Macro, st.sampled_from("CHMRTNE"), st.dictionaries(_text, _text,
                                                                       max_size=5)),
    st.builds(codec.Body, st.binary(max_size=300)),
    st.builds(codec.OptNeg, _u32, _u32, _u32),
    st.builds(codec.InsertHeader, _u32, _text, _text),
    st.builds(codec.ChangeHeader, _u32, _text, _text),
    st.builds(codec.AddRcptPar, _text, st.none() | _text),
    st.builds(codec.ChangeFrom, _text, st.none() | _text),
    st.builds(codec.ReplyCode, _text),
    st.builds(codec.ReplaceBody, st.binary(max_size=300)),
)


@given(st.lists(_any, max_size=8), st.integers(1, 50))
def test_property_any_sequence_round_trips(messages, step: int) -> None:
    """Any sequence of commands/responses, fed in pieces of any size, decodes back."""
    data = b"".join(codec.encode(m) for m in messages)
    dec = codec.FrameDecoder()
    frames = []
    for i in range(0, len(data), step):
        frames += dec.feed(data[i:i + step])
    out = []
    for f, m in zip(frames, messages, strict=True):
        is_response = isinstance(m, codec.InsertHeader | codec.ChangeHeader | codec.AddRcptPar
                                 | codec.ChangeFrom | codec.ReplyCode | codec.ReplaceBody)
        out.append((codec.decode_response if is_response else codec.decode_command)(f))
    assert out == messages


@pytest.mark.parametrize(("spec", "address"), [
    ("inet:8891@127.0.0.1", MilterAddress("inet", "127.0.0.1", 8891)),
    ("inet:127.0.0.1:8891", MilterAddress("inet", "127.0.0.1", 8891)),
    ("inet:8891", MilterAddress("inet", "127.0.0.1", 8891)),
    ("inet6:8891@::1", MilterAddress("inet6", "::1", 8891)),
    ("inet6:[::1]:8891", MilterAddress("inet6", "::1", 8891)),
    ("inet:[::1]:8891", MilterAddress("inet6", "::1", 8891)),
    ("unix:/run/m.sock", MilterAddress("unix", path="/run/m.sock")),
    ("local:/run/m.sock", MilterAddress("unix", path="/run/m.sock")),
    ("/run/m.sock", MilterAddress("unix", path="/run/m.sock")),
])
def test_socket_notations(spec: str, address: MilterAddress) -> None:
    assert parse_socket(spec) == address


@pytest.mark.parametrize("spec", ["inet:x@h", "inet:99999@h", "tcp:1@h", "unix:", "inet:@h",
                                  "8891"])
def test_bad_socket_notations(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_socket(spec)


@pytest.mark.parametrize(("text", "reply"), [
    ("550 5.7.1 Go away", Reply(550, "5.7.1", "Go away")),
    ("451 try later", Reply(451, "4.7.1", "try later")),
    ("554 4.7.1 class mismatch", Reply(554, "5.7.1", "class mismatch")),
    ("550-5.7.1 one\r\n550 5.7.1 two", Reply(550, "5.7.1", "one\ntwo")),
    ("421 4.3.2 bye 100%%", Reply(421, "4.3.2", "bye 100%")),
])
def test_reply_code_parsing(text: str, reply: Reply) -> None:
    assert parse_reply(text) == reply


@pytest.mark.parametrize("text", ["250 ok", "hello", "", "550-a\r\n551 b"])
def test_reply_code_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_reply(text)
