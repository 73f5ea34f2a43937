"""The Postfix SMTP access policy delegation protocol, sans I/O, for both directions.

Entry points: :func:`encode_attributes` / :class:`AttributeReader` (the ``name=value``
records both sides exchange), :func:`encode_request` and :func:`encode_response` (a
client's request, a server's ``action=...`` reply), :func:`response_action` (the action
of a reply record) and :func:`parse_action` / :class:`Action` (what an action means).
No sockets here: the policy client (:mod:`smtpgate.plugins.policy`) and a future policy
server (issue 14) feed bytes in and write the bytes these functions return.

Protocol (Postfix SMTPD_POLICY_README, "Protocol description"): a request is a sequence
of ``name=value`` lines ended by LF, terminated by an empty line; the reply is one
``action=...`` attribute, also terminated by an empty line; one connection carries
many requests. Names may not contain ``=``, NUL or LF; values may not contain NUL or LF.
The actions are those of Postfix's access(5) table.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_LINE",
    "Action",
    "ActionKind",
    "AttributeReader",
    "PolicyProtocolError",
    "encode_attributes",
    "encode_request",
    "encode_response",
    "parse_action",
    "response_action",
    "sanitize_value",
]

MAX_LINE = 8192
"""Longest attribute line (bytes, without LF) a reader accepts."""
MAX_ATTRIBUTES = 1024
"""Most attributes one record may carry."""

Record = list[tuple[str, str]]
"""One request or reply: its ``(name, value)`` pairs in wire order (names may repeat)."""


class PolicyProtocolError(ValueError):
    """A peer broke the policy protocol (an over-long line, a line without ``=``, a
    reply without ``action``) or a value cannot be sent (LF or NUL in it)."""


_BAD_NAME = re.compile(r"[=\x00\n]")
_BAD_VALUE = re.compile(r"[\x00\n]")


def sanitize_value(value: str) -> str:
    """``value`` made sendable: CR, LF and NUL become spaces (the client sends what SMTP
    clients typed, which the protocol core already keeps free of them; this is a guard)."""
    return value.replace("\r", " ").replace("\n", " ").replace("\x00", " ")


def encode_attributes(attributes: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """One record on the wire: ``name=value\\n`` lines and the terminating empty line.

    Args:
        attributes: a mapping or ``(name, value)`` pairs (repeated names allowed), str.

    Returns:
        UTF-8 bytes ending with ``b"\\n\\n"``.

    Raises:
        PolicyProtocolError: an empty name, a name with ``=``, NUL or LF, or a value
            with NUL or LF (SMTPD_POLICY_README: such attributes cannot be sent).
    """
    pairs = attributes.items() if isinstance(attributes, Mapping) else attributes
    out: list[str] = []
    for name, value in pairs:
        if not name or _BAD_NAME.search(name):
            raise PolicyProtocolError(f"invalid attribute name {name!r}")
        if _BAD_VALUE.search(value):
            raise PolicyProtocolError(f"invalid value for attribute {name!r}: NUL or LF")
        out.append(f"{name}={value}\n")
    out.append("\n")
    return "".join(out).encode("utf-8", "surrogateescape")


def encode_request(attributes: Mapping[str, str] | Iterable[tuple[str, str]]) -> bytes:
    """A client's request: ``request=smtpd_access_policy`` first unless present, then
    ``attributes`` (see :func:`encode_attributes`; same errors)."""
    pairs = list(attributes.items() if isinstance(attributes, Mapping) else attributes)
    if not any(name == "request" for name, _ in pairs):
        pairs.insert(0, ("request", "smtpd_access_policy"))
    return encode_attributes(pairs)


def encode_response(action: str) -> bytes:
    """A server's reply: ``action=ACTION\\n\\n``.

    Raises:
        PolicyProtocolError: ``action`` is empty or contains NUL or LF.
    """
    if not action.strip():
        raise PolicyProtocolError("empty action")
    return encode_attributes([("action", action)])


class AttributeReader:
    """Incremental parser of records (requests or replies), for either side.

    Feed it the bytes as they arrive; it returns each complete record. Lines may end
    in LF or CRLF; a line without ``=`` or longer than :data:`MAX_LINE` is a protocol
    error (the peer must then be disconnected, as Postfix does). Values are decoded as
    UTF-8 with invalid bytes kept as surrogate escapes.

    Raises (from :meth:`feed`):
        PolicyProtocolError: a malformed line, an over-long line, too many attributes.
    """

    __slots__ = ("_buf", "_current")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._current: Record = []

    @property
    def pending(self) -> bool:
        """True when a record has started but is not complete yet."""
        return bool(self._buf) or bool(self._current)

    def feed(self, data: bytes) -> list[Record]:
        """Add ``data``; return the records it completed (possibly none)."""
        self._buf += data
        records: list[Record] = []
        start = 0
        buf = self._buf
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                if len(buf) - start > MAX_LINE:
                    raise PolicyProtocolError(f"attribute line longer than {MAX_LINE} bytes")
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > MAX_LINE:
                raise PolicyProtocolError(f"attribute line longer than {MAX_LINE} bytes")
            if not line:
                records.append(self._current)
                self._current = []
                continue
            name, eq, value = line.partition(b"=")
            if not eq or not name:
                raise PolicyProtocolError(f"malformed attribute line {line[:80]!r}")
            if len(self._current) >= MAX_ATTRIBUTES:
                raise PolicyProtocolError(f"more than {MAX_ATTRIBUTES} attributes")
            self._current.append((name.decode("utf-8", "surrogateescape"),
                                  value.decode("utf-8", "surrogateescape")))
        del buf[:start]
        return records


def response_action(record: Record) -> str:
    """The ``action`` of a reply record (the last one if repeated; other attributes
    are ignored, as Postfix does).

    Raises:
        PolicyProtocolError: the record has no ``action`` attribute.
    """
    action: str | None = None
    for name, value in record:
        if name == "action":
            action = value
    if action is None:
        raise PolicyProtocolError("reply without an action attribute")
    return action


class ActionKind(Enum):
    """What a policy server's action asks for (Postfix access(5) actions).

    Members:
        OK: accept (also an all-digit action and ``permit``).
        DUNNO: no opinion.
        REJECT: ``REJECT [text]`` (and ``reject``).
        DEFER: ``DEFER [text]`` (and ``defer``).
        DEFER_IF_PERMIT / DEFER_IF_REJECT: conditional deferrals.
        CODE: ``4NN text`` or ``5NN text`` (``code``, ``enhanced`` set).
        PREPEND: ``PREPEND header: value`` (``text`` is the header line).
        HOLD, DISCARD: keep the message on hold / accept and drop it.
        FILTER, REDIRECT, BCC: route the message (``text`` is the argument).
        WARN, INFO: log ``text``.
        DELAY: ``DELAY time`` (Postfix builds with DELAY_ACTION only).
        UNKNOWN: anything else (``text`` is the whole action).
    """

    OK = "ok"
    DUNNO = "dunno"
    REJECT = "reject"
    DEFER = "defer"
    DEFER_IF_PERMIT = "defer_if_permit"
    DEFER_IF_REJECT = "defer_if_reject"
    CODE = "code"
    PREPEND = "prepend"
    HOLD = "hold"
    DISCARD = "discard"
    FILTER = "filter"
    REDIRECT = "redirect"
    BCC = "bcc"
    WARN = "warn"
    INFO = "info"
    DELAY = "delay"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Action:
    """One parsed action.

    Attributes:
        kind: the :class:`ActionKind`.
        text: the action's argument (reply text, header line, address...), ``""`` if none.
        code: for CODE: the reply code (400..599); 0 otherwise.
        enhanced: an RFC 3463 code the server gave at the start of the text
            (``"5.7.1"``), ``None`` if it gave none. For CODE, REJECT, DEFER and the
            DEFER_IF_* actions it is removed from :attr:`text`.
        raw: the action as received.
    """

    kind: ActionKind
    text: str = ""
    code: int = 0
    enhanced: str | None = None
    raw: str = ""


_WORDS: dict[str, ActionKind] = {
    "ok": ActionKind.OK, "permit": ActionKind.OK, "dunno": ActionKind.DUNNO,
    "reject": ActionKind.REJECT, "defer": ActionKind.DEFER,
    "defer_if_permit": ActionKind.DEFER_IF_PERMIT,
    "defer_if_reject": ActionKind.DEFER_IF_REJECT, "prepend": ActionKind.PREPEND,
    "hold": ActionKind.HOLD, "discard": ActionKind.DISCARD, "filter": ActionKind.FILTER,
    "redirect": ActionKind.REDIRECT, "bcc": ActionKind.BCC, "warn": ActionKind.WARN,
    "info": ActionKind.INFO, "delay": ActionKind.DELAY,
}
_TEXT_KINDS = frozenset({ActionKind.REJECT, ActionKind.DEFER, ActionKind.DEFER_IF_PERMIT,
                         ActionKind.DEFER_IF_REJECT, ActionKind.CODE})
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")
_CODE = re.compile(r"([45]\d\d)(?:\s+|$)")


def parse_action(action: str) -> Action:
    """Parse a policy server's action (case-insensitive verbs, as Postfix reads them).

    ``OK``, ``DUNNO``, ``REJECT [text]``, ``DEFER [text]``, ``DEFER_IF_PERMIT text``,
    ``DEFER_IF_REJECT text``, ``4NN text``, ``5NN text`` (an enhanced code at the start
    of the text is split off into :attr:`Action.enhanced`), ``PREPEND header: value``,
    ``HOLD [text]``, ``DISCARD [text]``, ``FILTER transport:dest``, ``REDIRECT addr``,
    ``BCC addr``, ``WARN text``, ``INFO text``, ``DELAY time``, an all-digit action
    (OK, Postfix's time-stamp convention). Anything else, and a verb that needs an
    argument without one (``PREPEND``, ``FILTER``, ``REDIRECT``, ``BCC``), is UNKNOWN.

    Never raises.
    """
    raw = action
    stripped = action.strip()
    verb, _, rest = stripped.partition(" ")
    rest = rest.strip()
    if not stripped:
        return Action(ActionKind.UNKNOWN, raw=raw)
    if stripped.isdigit() and stripped.isascii():
        return Action(ActionKind.OK, raw=raw)
    code_match = _CODE.match(stripped)
    if code_match and len(verb) == 3:
        text = stripped[code_match.end():]
        enhanced, text = _split_enhanced(text)
        return Action(ActionKind.CODE, text, int(code_match.group(1)), enhanced, raw)
    kind = _WORDS.get(verb.lower())
    if kind is None:
        return Action(ActionKind.UNKNOWN, stripped, raw=raw)
    if kind in (ActionKind.PREPEND, ActionKind.FILTER, ActionKind.REDIRECT,
                ActionKind.BCC) and not rest:
        return Action(ActionKind.UNKNOWN, stripped, raw=raw)
    if kind is ActionKind.PREPEND:
        rest = action.lstrip().partition(" ")[2].lstrip()  # keep the header's own spacing
    if kind in _TEXT_KINDS:
        enhanced, rest = _split_enhanced(rest)
        return Action(kind, rest, 0, enhanced, raw)
    return Action(kind, rest, raw=raw)


def _split_enhanced(text: str) -> tuple[str | None, str]:
    m = _ENHANCED.match(text)
    if not m:
        return None, text
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}", text[m.end():]
