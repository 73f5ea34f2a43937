"""Sans-IO codec of the Sendmail milter wire protocol, version 6, in both directions.

Entry points: :func:`encode` (any command or response to wire bytes), :class:`FrameDecoder`
(bytes in, :class:`Frame` out), :func:`decode_command` (a frame the MTA sent, as the milter
reads it) and :func:`decode_response` (a frame the milter sent, as the MTA reads it). The
same classes serve the MTA side (smtpgate's milter client, :mod:`smtpgate.milter.client`)
and a milter server: "one codec for both directions". Nothing here does I/O.

The protocol has no RFC; it is defined by Sendmail's ``libmilter/mfdef.h`` and documented
by Postfix's MILTER_README. Framing: a 4-byte big-endian length (covering the command
byte and the data), one command byte, the data. Strings are NUL-terminated. Text is
decoded as UTF-8 with ``surrogateescape`` so 8-bit header bytes survive a round trip.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "ACTIONS_ALL",
    "MAX_BODY_CHUNK",
    "MAX_FRAME",
    "MODIFICATIONS",
    "PROTOCOL_NOREPLY_MASK",
    "PROTOCOL_NOSEND_MASK",
    "SMFIF",
    "SMFIP",
    "SMFIM",
    "Abort",
    "Accept",
    "AddHeader",
    "AddRcpt",
    "AddRcptPar",
    "Body",
    "ChangeFrom",
    "ChangeHeader",
    "Command",
    "ConnFail",
    "Connect",
    "Continue",
    "Data",
    "DelRcpt",
    "Discard",
    "EndOfHeaders",
    "EndOfMessage",
    "Frame",
    "FrameDecoder",
    "Header",
    "Helo",
    "InsertHeader",
    "Macro",
    "Mail",
    "MilterProtocolError",
    "OptNeg",
    "Progress",
    "Quarantine",
    "Quit",
    "QuitNewConnection",
    "Rcpt",
    "Reject",
    "ReplaceBody",
    "ReplyCode",
    "Response",
    "Shutdown",
    "Skip",
    "TempFail",
    "Unknown",
    "decode_command",
    "decode_response",
    "encode",
]

#: Largest body chunk in one SMFIC_BODY (libmilter's MILTER_CHUNK_SIZE), bytes.
MAX_BODY_CHUNK: Final = 65535
#: Largest frame :class:`FrameDecoder` accepts by default (libmilter refuses more), bytes.
MAX_FRAME: Final = 1024 * 1024 * 64


class SMFIF:
    """Actions (modifications) a milter may ask for in OPTNEG (``SMFIF_*``)."""

    ADDHDRS: Final = 0x001
    CHGBODY: Final = 0x002
    ADDRCPT: Final = 0x004
    DELRCPT: Final = 0x008
    CHGHDRS: Final = 0x010
    QUARANTINE: Final = 0x020
    CHGFROM: Final = 0x040
    ADDRCPT_PAR: Final = 0x080
    SETSYMLIST: Final = 0x100


#: Every action of protocol version 6.
ACTIONS_ALL: Final = 0x1FF


class SMFIP:
    """Protocol flags of OPTNEG (``SMFIP_*``): what not to send, what not to wait for."""

    NOCONNECT: Final = 0x000001
    NOHELO: Final = 0x000002
    NOMAIL: Final = 0x000004
    NORCPT: Final = 0x000008
    NOBODY: Final = 0x000010
    NOHDRS: Final = 0x000020
    NOEOH: Final = 0x000040
    NR_HDR: Final = 0x000080
    NOUNKNOWN: Final = 0x000100
    NODATA: Final = 0x000200
    SKIP: Final = 0x000400
    RCPT_REJ: Final = 0x000800
    NR_CONN: Final = 0x001000
    NR_HELO: Final = 0x002000
    NR_MAIL: Final = 0x004000
    NR_RCPT: Final = 0x008000
    NR_DATA: Final = 0x010000
    NR_UNKN: Final = 0x020000
    NR_EOH: Final = 0x040000
    NR_BODY: Final = 0x080000
    HDR_LEADSPC: Final = 0x100000


#: The "do not send this event" flags.
PROTOCOL_NOSEND_MASK: Final = (
    SMFIP.NOCONNECT | SMFIP.NOHELO | SMFIP.NOMAIL | SMFIP.NORCPT | SMFIP.NOBODY
    | SMFIP.NOHDRS | SMFIP.NOEOH | SMFIP.NOUNKNOWN | SMFIP.NODATA
)
#: The "no reply to this event" flags.
PROTOCOL_NOREPLY_MASK: Final = (
    SMFIP.NR_CONN | SMFIP.NR_HELO | SMFIP.NR_MAIL | SMFIP.NR_RCPT | SMFIP.NR_DATA
    | SMFIP.NR_UNKN | SMFIP.NR_HDR | SMFIP.NR_EOH | SMFIP.NR_BODY
)


class SMFIM:
    """Macro stages of the OPTNEG symbol lists (``SMFIM_*``)."""

    CONNECT: Final = 0
    HELO: Final = 1
    ENVFROM: Final = 2
    ENVRCPT: Final = 3
    DATA: Final = 4
    EOM: Final = 5
    EOH: Final = 6


class MilterProtocolError(ValueError):
    """A frame that does not follow the milter protocol (bad length, unknown command,
    missing NUL terminator, truncated integer)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One undecoded packet: the command byte and its data.

    Attributes:
        cmd: the command (or response) letter, one byte (``b"O"``, ``b"c"``...).
        data: everything after the command byte.
    """

    cmd: bytes
    data: bytes


def _s(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape") + b"\0"


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _strings(data: bytes, what: str) -> list[str]:
    """NUL-terminated strings; the data must end with a NUL."""
    if not data:
        return []
    if not data.endswith(b"\0"):
        raise MilterProtocolError(f"{what}: string not NUL-terminated")
    return [_text(p) for p in data[:-1].split(b"\0")]


def _exact(data: bytes, n: int, what: str) -> list[str]:
    parts = _strings(data, what)
    if len(parts) != n:
        raise MilterProtocolError(f"{what}: expected {n} string(s), got {len(parts)}")
    return parts


def _u32(data: bytes, what: str) -> tuple[int, bytes]:
    if len(data) < 4:
        raise MilterProtocolError(f"{what}: truncated 32-bit integer")
    return struct.unpack("!I", data[:4])[0], data[4:]


def _check_str(value: str, what: str) -> None:
    if "\0" in value:
        raise ValueError(f"{what} must not contain NUL")


# ------------------------------------------------------------------ commands (MTA → milter)


@dataclass(frozen=True, slots=True)
class OptNeg:
    """``SMFIC_OPTNEG`` (``O``), sent by the MTA and answered in kind by the milter.

    Attributes:
        version: protocol version (6).
        actions: ``SMFIF_*`` bits: offered (MTA) or asked for (milter).
        protocol: ``SMFIP_*`` bits: offered (MTA) or asked for (milter).
        macros: milter only: per ``SMFIM_*`` stage, the macro names it wants
            (``SMFIF_SETSYMLIST``); names as written (``"j"``, ``"{auth_authen}"``).
    """

    version: int = 6
    actions: int = ACTIONS_ALL
    protocol: int = 0
    macros: dict[int, tuple[str, ...]] = field(default_factory=dict)

    CMD = b"O"

    def encode_data(self) -> bytes:
        out = struct.pack("!III", self.version, self.actions, self.protocol)
        for stage, names in sorted(self.macros.items()):
            text = " ".join(names)
            _check_str(text, "macro list")
            out += struct.pack("!I", stage) + _s(text)
        return out

    @classmethod
    def decode_data(cls, data: bytes) -> OptNeg:
        if len(data) < 12:
            raise MilterProtocolError("OPTNEG: shorter than 12 bytes")
        version, actions, protocol = struct.unpack("!III", data[:12])
        rest = data[12:]
        macros: dict[int, tuple[str, ...]] = {}
        while rest:
            stage, rest = _u32(rest, "OPTNEG macro list")
            end = rest.find(b"\0")
            if end < 0:
                raise MilterProtocolError("OPTNEG macro list: not NUL-terminated")
            macros[stage] = tuple(_text(rest[:end]).split())
            rest = rest[end + 1 :]
        return cls(version, actions, protocol, macros)


@dataclass(frozen=True, slots=True)
class Macro:
    """``SMFIC_MACRO`` (``D``): macro values for the command that follows.

    Attributes:
        stage: the letter of the command they belong to (``"C"``, ``"H"``, ``"M"``,
            ``"R"``, ``"T"``, ``"N"``, ``"E"``, ``"U"``...).
        macros: name → value, names as written (``"j"``, ``"{daemon_name}"``).
    """

    stage: str
    macros: dict[str, str] = field(default_factory=dict)

    CMD = b"D"

    def encode_data(self) -> bytes:
        if len(self.stage) != 1 or not self.stage.isascii():
            raise ValueError(f"macro stage must be one ASCII letter, got {self.stage!r}")
        out = self.stage.encode("ascii")
        for name, value in self.macros.items():
            _check_str(name, "macro name")
            _check_str(value, "macro value")
            out += _s(name) + _s(value)
        return out

    @classmethod
    def decode_data(cls, data: bytes) -> Macro:
        if not data:
            raise MilterProtocolError("MACRO: no stage")
        stage = chr(data[0])
        parts = _strings(data[1:], "MACRO")
        if len(parts) % 2:
            raise MilterProtocolError("MACRO: a name without a value")
        return cls(stage, dict(zip(parts[::2], parts[1::2], strict=True)))


@dataclass(frozen=True, slots=True)
class Connect:
    """``SMFIC_CONNECT`` (``C``): the SMTP client.

    Attributes:
        hostname: the client's host name (``"[192.0.2.1]"`` when unknown, as Postfix).
        family: ``"4"`` (IPv4), ``"6"`` (IPv6), ``"L"`` (Unix socket), ``"U"`` (unknown).
        port: the client's port (0 for ``L``/``U``).
        address: the client's address (path for ``L``; empty for ``U``).
    """

    hostname: str
    family: str = "4"
    port: int = 0
    address: str = ""

    CMD = b"C"

    def encode_data(self) -> bytes:
        _check_str(self.hostname, "hostname")
        if self.family not in ("4", "6", "L", "U"):
            raise ValueError(f"unknown address family {self.family!r}")
        out = _s(self.hostname) + self.family.encode("ascii")
        if self.family == "U":
            return out
        _check_str(self.address, "address")
        return out + struct.pack("!H", self.port) + _s(self.address)

    @classmethod
    def decode_data(cls, data: bytes) -> Connect:
        end = data.find(b"\0")
        if end < 0 or end + 1 >= len(data):
            raise MilterProtocolError("CONNECT: truncated")
        hostname = _text(data[:end])
        family = chr(data[end + 1])
        rest = data[end + 2 :]
        if family == "U":
            return cls(hostname, family)
        if len(rest) < 2:
            raise MilterProtocolError("CONNECT: truncated port")
        (port,) = struct.unpack("!H", rest[:2])
        (address,) = _exact(rest[2:], 1, "CONNECT")
        return cls(hostname, family, port, address)


@dataclass(frozen=True, slots=True)
class Helo:
    """``SMFIC_HELO`` (``H``): the HELO/EHLO argument."""

    name: str
    CMD = b"H"

    def encode_data(self) -> bytes:
        _check_str(self.name, "HELO name")
        return _s(self.name)

    @classmethod
    def decode_data(cls, data: bytes) -> Helo:
        return cls(*_exact(data, 1, "HELO"))


@dataclass(frozen=True, slots=True)
class Mail:
    """``SMFIC_MAIL`` (``M``): ``["<sender>", "SIZE=123", ...]`` (ESMTP parameters follow)."""

    args: tuple[str, ...]
    CMD = b"M"

    def encode_data(self) -> bytes:
        if not self.args:
            raise ValueError("MAIL needs the sender")
        for a in self.args:
            _check_str(a, "MAIL argument")
        return b"".join(_s(a) for a in self.args)

    @classmethod
    def decode_data(cls, data: bytes) -> Mail:
        args = _strings(data, "MAIL")
        if not args:
            raise MilterProtocolError("MAIL: no sender")
        return cls(tuple(args))


@dataclass(frozen=True, slots=True)
class Rcpt:
    """``SMFIC_RCPT`` (``R``): ``["<recipient>", "NOTIFY=NEVER", ...]``."""

    args: tuple[str, ...]
    CMD = b"R"

    def encode_data(self) -> bytes:
        if not self.args:
            raise ValueError("RCPT needs the recipient")
        for a in self.args:
            _check_str(a, "RCPT argument")
        return b"".join(_s(a) for a in self.args)

    @classmethod
    def decode_data(cls, data: bytes) -> Rcpt:
        args = _strings(data, "RCPT")
        if not args:
            raise MilterProtocolError("RCPT: no recipient")
        return cls(tuple(args))


@dataclass(frozen=True, slots=True)
class Header:
    """``SMFIC_HEADER`` (``L``): one header field (value without the colon; continuation
    lines joined by ``"\\n"`` as Sendmail and Postfix send them)."""

    name: str
    value: str
    CMD = b"L"

    def encode_data(self) -> bytes:
        _check_str(self.name, "header name")
        _check_str(self.value, "header value")
        return _s(self.name) + _s(self.value)

    @classmethod
    def decode_data(cls, data: bytes) -> Header:
        name, value = _exact(data, 2, "HEADER")
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class Body:
    """``SMFIC_BODY`` (``B``): one body chunk (at most :data:`MAX_BODY_CHUNK` bytes)."""

    chunk: bytes
    CMD = b"B"

    def encode_data(self) -> bytes:
        if len(self.chunk) > MAX_BODY_CHUNK:
            raise ValueError(f"body chunk over {MAX_BODY_CHUNK} bytes")
        return bytes(self.chunk)

    @classmethod
    def decode_data(cls, data: bytes) -> Body:
        return cls(data)


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """``SMFIC_BODYEOB`` (``E``): end of the message, optionally with a last chunk."""

    chunk: bytes = b""
    CMD = b"E"

    def encode_data(self) -> bytes:
        if len(self.chunk) > MAX_BODY_CHUNK:
            raise ValueError(f"body chunk over {MAX_BODY_CHUNK} bytes")
        return bytes(self.chunk)

    @classmethod
    def decode_data(cls, data: bytes) -> EndOfMessage:
        return cls(data)


@dataclass(frozen=True, slots=True)
class Unknown:
    """``SMFIC_UNKNOWN`` (``U``): an SMTP command the MTA does not know (the whole line)."""

    line: str
    CMD = b"U"

    def encode_data(self) -> bytes:
        _check_str(self.line, "command line")
        return _s(self.line)

    @classmethod
    def decode_data(cls, data: bytes) -> Unknown:
        return cls(*_exact(data, 1, "UNKNOWN"))


@dataclass(frozen=True, slots=True)
class _Empty:
    """A command or response without data."""

    CMD = b"?"

    def encode_data(self) -> bytes:
        return b""

    @classmethod
    def decode_data(cls, data: bytes) -> _Empty:
        return cls()


@dataclass(frozen=True, slots=True)
class Data(_Empty):
    """``SMFIC_DATA`` (``T``): the client sent DATA."""

    CMD = b"T"


@dataclass(frozen=True, slots=True)
class EndOfHeaders(_Empty):
    """``SMFIC_EOH`` (``N``): the header block is complete."""

    CMD = b"N"


@dataclass(frozen=True, slots=True)
class Abort(_Empty):
    """``SMFIC_ABORT`` (``A``): forget the current transaction (no reply)."""

    CMD = b"A"


@dataclass(frozen=True, slots=True)
class Quit(_Empty):
    """``SMFIC_QUIT`` (``Q``): close the milter session (no reply)."""

    CMD = b"Q"


@dataclass(frozen=True, slots=True)
class QuitNewConnection(_Empty):
    """``SMFIC_QUIT_NC`` (``K``): end this SMTP session, a new one follows on the same
    socket (no reply)."""

    CMD = b"K"


Command = (
    OptNeg | Macro | Connect | Helo | Mail | Rcpt | Header | Body | EndOfMessage | Unknown
    | Data | EndOfHeaders | Abort | Quit | QuitNewConnection
)
"""Anything the MTA sends."""

_COMMANDS: dict[bytes, Callable[[bytes], Any]] = {
    c.CMD: c.decode_data
    for c in (OptNeg, Macro, Connect, Helo, Mail, Rcpt, Header, Body, EndOfMessage, Unknown,
              Data, EndOfHeaders, Abort, Quit, QuitNewConnection)
}

# ---------------------------------------------------------------- responses (milter → MTA)


@dataclass(frozen=True, slots=True)
class Continue(_Empty):
    """``SMFIR_CONTINUE`` (``c``): go on."""

    CMD = b"c"


@dataclass(frozen=True, slots=True)
class Accept(_Empty):
    """``SMFIR_ACCEPT`` (``a``): accept; send this milter nothing more for the message
    (or, at connect/HELO, for the session)."""

    CMD = b"a"


@dataclass(frozen=True, slots=True)
class Reject(_Empty):
    """``SMFIR_REJECT`` (``r``): reject the command (5xx)."""

    CMD = b"r"


@dataclass(frozen=True, slots=True)
class TempFail(_Empty):
    """``SMFIR_TEMPFAIL`` (``t``): reject the command temporarily (4xx)."""

    CMD = b"t"


@dataclass(frozen=True, slots=True)
class Discard(_Empty):
    """``SMFIR_DISCARD`` (``d``): accept the message and throw it away."""

    CMD = b"d"


@dataclass(frozen=True, slots=True)
class Skip(_Empty):
    """``SMFIR_SKIP`` (``s``): send no more body chunks (only with ``SMFIP_SKIP``)."""

    CMD = b"s"


@dataclass(frozen=True, slots=True)
class Progress(_Empty):
    """``SMFIR_PROGRESS`` (``p``): still working; the final response follows."""

    CMD = b"p"


@dataclass(frozen=True, slots=True)
class ConnFail(_Empty):
    """``SMFIR_CONN_FAIL`` (``f``): make the SMTP connection fail."""

    CMD = b"f"


@dataclass(frozen=True, slots=True)
class Shutdown(_Empty):
    """``SMFIR_SHUTDOWN`` (``4``): 421, close the SMTP connection."""

    CMD = b"4"


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """``SMFIR_REPLYCODE`` (``y``): a complete SMTP reply, e.g. ``"550 5.7.1 Go away"``
    (multi-line replies use ``"\\r\\n"`` between lines, each with its code)."""

    text: str
    CMD = b"y"

    def encode_data(self) -> bytes:
        _check_str(self.text, "reply")
        return _s(self.text)

    @classmethod
    def decode_data(cls, data: bytes) -> ReplyCode:
        return cls(*_exact(data, 1, "REPLYCODE"))


@dataclass(frozen=True, slots=True)
class AddHeader:
    """``SMFIR_ADDHEADER`` (``h``): append a header field."""

    name: str
    value: str
    CMD = b"h"

    def encode_data(self) -> bytes:
        _check_str(self.name, "header name")
        _check_str(self.value, "header value")
        return _s(self.name) + _s(self.value)

    @classmethod
    def decode_data(cls, data: bytes) -> AddHeader:
        name, value = _exact(data, 2, "ADDHEADER")
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class InsertHeader:
    """``SMFIR_INSHEADER`` (``i``): insert a header field at ``index`` (0 = first)."""

    index: int
    name: str
    value: str
    CMD = b"i"

    def encode_data(self) -> bytes:
        _check_str(self.name, "header name")
        _check_str(self.value, "header value")
        return struct.pack("!I", self.index) + _s(self.name) + _s(self.value)

    @classmethod
    def decode_data(cls, data: bytes) -> InsertHeader:
        index, rest = _u32(data, "INSHEADER")
        name, value = _exact(rest, 2, "INSHEADER")
        return cls(index, name, value)


@dataclass(frozen=True, slots=True)
class ChangeHeader:
    """``SMFIR_CHGHEADER`` (``m``): change the ``index``-th (1-based) field called
    ``name``; an empty value deletes it."""

    index: int
    name: str
    value: str
    CMD = b"m"

    def encode_data(self) -> bytes:
        _check_str(self.name, "header name")
        _check_str(self.value, "header value")
        return struct.pack("!I", self.index) + _s(self.name) + _s(self.value)

    @classmethod
    def decode_data(cls, data: bytes) -> ChangeHeader:
        index, rest = _u32(data, "CHGHEADER")
        name, value = _exact(rest, 2, "CHGHEADER")
        return cls(index, name, value)


@dataclass(frozen=True, slots=True)
class ChangeFrom:
    """``SMFIR_CHGFROM`` (``e``): new sender, optionally with ESMTP parameters
    (``"SIZE=10 BODY=8BITMIME"``)."""

    address: str
    args: str | None = None
    CMD = b"e"

    def encode_data(self) -> bytes:
        _check_str(self.address, "sender")
        out = _s(self.address)
        if self.args is not None:
            _check_str(self.args, "sender arguments")
            out += _s(self.args)
        return out

    @classmethod
    def decode_data(cls, data: bytes) -> ChangeFrom:
        parts = _strings(data, "CHGFROM")
        if len(parts) not in (1, 2):
            raise MilterProtocolError("CHGFROM: expected 1 or 2 strings")
        return cls(parts[0], parts[1] if len(parts) == 2 else None)


@dataclass(frozen=True, slots=True)
class AddRcpt:
    """``SMFIR_ADDRCPT`` (``+``): add a recipient."""

    address: str
    CMD = b"+"

    def encode_data(self) -> bytes:
        _check_str(self.address, "recipient")
        return _s(self.address)

    @classmethod
    def decode_data(cls, data: bytes) -> AddRcpt:
        return cls(*_exact(data, 1, "ADDRCPT"))


@dataclass(frozen=True, slots=True)
class AddRcptPar:
    """``SMFIR_ADDRCPT_PAR`` (``2``): add a recipient with ESMTP parameters."""

    address: str
    args: str | None = None
    CMD = b"2"

    def encode_data(self) -> bytes:
        _check_str(self.address, "recipient")
        out = _s(self.address)
        if self.args is not None:
            _check_str(self.args, "recipient arguments")
            out += _s(self.args)
        return out

    @classmethod
    def decode_data(cls, data: bytes) -> AddRcptPar:
        parts = _strings(data, "ADDRCPT_PAR")
        if len(parts) not in (1, 2):
            raise MilterProtocolError("ADDRCPT_PAR: expected 1 or 2 strings")
        return cls(parts[0], parts[1] if len(parts) == 2 else None)


@dataclass(frozen=True, slots=True)
class DelRcpt:
    """``SMFIR_DELRCPT`` (``-``): remove a recipient."""

    address: str
    CMD = b"-"

    def encode_data(self) -> bytes:
        _check_str(self.address, "recipient")
        return _s(self.address)

    @classmethod
    def decode_data(cls, data: bytes) -> DelRcpt:
        return cls(*_exact(data, 1, "DELRCPT"))


@dataclass(frozen=True, slots=True)
class ReplaceBody:
    """``SMFIR_REPLBODY`` (``b``): one chunk of the new body (chunks concatenate)."""

    chunk: bytes
    CMD = b"b"

    def encode_data(self) -> bytes:
        return bytes(self.chunk)

    @classmethod
    def decode_data(cls, data: bytes) -> ReplaceBody:
        return cls(data)


@dataclass(frozen=True, slots=True)
class Quarantine:
    """``SMFIR_QUARANTINE`` (``q``): hold the message, with a reason."""

    reason: str
    CMD = b"q"

    def encode_data(self) -> bytes:
        _check_str(self.reason, "reason")
        return _s(self.reason)

    @classmethod
    def decode_data(cls, data: bytes) -> Quarantine:
        return cls(*_exact(data, 1, "QUARANTINE"))


Response = (
    OptNeg | Continue | Accept | Reject | TempFail | Discard | Skip | Progress | ConnFail
    | Shutdown | ReplyCode | AddHeader | InsertHeader | ChangeHeader | ChangeFrom | AddRcpt
    | AddRcptPar | DelRcpt | ReplaceBody | Quarantine
)
"""Anything a milter sends."""

_RESPONSES: dict[bytes, Callable[[bytes], Any]] = {
    c.CMD: c.decode_data
    for c in (OptNeg, Continue, Accept, Reject, TempFail, Discard, Skip, Progress, ConnFail,
              Shutdown, ReplyCode, AddHeader, InsertHeader, ChangeHeader, ChangeFrom, AddRcpt,
              AddRcptPar, DelRcpt, ReplaceBody, Quarantine)
}

#: Responses that modify the message, valid only at end of message.
MODIFICATIONS: Final = (AddHeader, InsertHeader, ChangeHeader, ChangeFrom, AddRcpt,
                        AddRcptPar, DelRcpt, ReplaceBody, Quarantine)


# ----------------------------------------------------------------------------- wire


def encode(message: Command | Response) -> bytes:
    """The wire bytes of one command or response: length, letter, data.

    Raises:
        ValueError: a string holding NUL, a body chunk over 65535 bytes, an unknown
            address family (nothing that cannot be framed is ever sent).
    """
    data = message.encode_data()
    return struct.pack("!I", len(data) + 1) + message.CMD + data


class FrameDecoder:
    """Splits a byte stream into :class:`Frame` objects (sans-IO).

    Args:
        max_frame: the largest length field accepted, bytes.

    Usage: ``frames = decoder.feed(chunk)``; the decoder keeps partial frames.
    """

    __slots__ = ("_buf", "_max")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a complete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return the frames they complete, in order.

        Raises:
            MilterProtocolError: a zero length, or one over ``max_frame``.
        """
        self._buf += data
        out: list[Frame] = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack_from("!I", self._buf)
            if length == 0 or length > self._max:
                raise MilterProtocolError(f"frame length {length} out of range")
            if len(self._buf) < 4 + length:
                break
            out.append(Frame(bytes(self._buf[4:5]), bytes(self._buf[5 : 4 + length])))
            del self._buf[: 4 + length]
        return out


def decode_command(frame: Frame) -> Command:
    """Decode a frame the MTA sent (milter side).

    Raises:
        MilterProtocolError: an unknown command letter or malformed data.
    """
    decode = _COMMANDS.get(frame.cmd)
    if decode is None:
        raise MilterProtocolError(f"unknown command {frame.cmd!r}")
    result: Command = decode(frame.data)
    return result


def decode_response(frame: Frame) -> Response:
    """Decode a frame a milter sent (MTA side).

    Raises:
        MilterProtocolError: an unknown response letter or malformed data.
    """
    decode = _RESPONSES.get(frame.cmd)
    if decode is None:
        raise MilterProtocolError(f"unknown response {frame.cmd!r}")
    result: Response = decode(frame.data)
    return result
