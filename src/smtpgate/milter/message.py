"""The message as a milter sees it, and a milter's modification actions applied to a
:class:`~smtpgate.hooks.Transaction`.

Entry points: :func:`header_fields` (the header fields to send, folding kept),
:func:`apply_modifications` (every ``SMFIR_*`` modification, all or nothing).

Header values are sent with their continuation lines joined by ``"\\n"`` (as Sendmail and
Postfix send them) and, unless the milter negotiated ``SMFIP_HDR_LEADSPC``, without the
one space after the colon. A value a milter adds gets a space after the colon unless it
starts with white space (Postfix's rule). Header changes splice the raw message bytes
(RFC 5322 §2.2), so every byte outside the changed fields stays as it was: this keeps
signatures a milter computed (DKIM with ``simple`` canonicalisation) valid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..hooks import Transaction
from . import codec

__all__ = ["AppliedChanges", "HeaderField", "apply_modifications", "header_fields",
           "parse_esmtp_args"]

_FIELD_START = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_NAME = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")
_BAD_VALUE = re.compile(r"[\x00\r]|\n(?![ \t])")
_BARE_LF = re.compile(rb"(?<!\r)\n")


@dataclass(frozen=True, slots=True)
class HeaderField:
    """One header field of the raw message.

    Attributes:
        name: the field name as written.
        start: offset of its first byte in the message.
        end: offset after its last line's line end.
        value: the raw bytes after the colon, without the final line end.
    """

    name: str
    start: int
    end: int
    value: bytes

    def milter_value(self, leading_space: bool) -> str:
        """The value as SMFIC_HEADER carries it: folds as ``"\\n"``; unless
        ``leading_space`` (``SMFIP_HDR_LEADSPC``), one space (not a tab) after the colon is
        left out, as Sendmail and Postfix do."""
        v = self.value.replace(b"\r\n", b"\n").decode("utf-8", "surrogateescape")
        return v if leading_space or not v.startswith(" ") else v[1:]


def header_fields(raw: bytes, header_end: int) -> list[HeaderField]:
    """The header fields of ``raw[:header_end]`` in order (lines that are not fields, such
    as an mbox ``From`` line, are skipped; RFC 5322 §2.2.3 continuation lines belong to
    the field before them)."""
    fields: list[HeaderField] = []
    pos = 0
    current: list[object] | None = None  # [name, start, colon, end]
    while pos < header_end:
        nl = raw.find(b"\n", pos, header_end)
        line_end = header_end if nl < 0 else nl + 1
        if raw[pos] in b" \t":
            if current is not None:
                current[3] = line_end
        else:
            if current is not None:
                fields.append(_field(raw, current))
            m = _FIELD_START.match(raw, pos, line_end)
            current = [m.group(1).decode("ascii"), pos, m.end(), line_end] if m else None
        pos = line_end
    if current is not None:
        fields.append(_field(raw, current))
    return fields


def _field(raw: bytes, c: list[object]) -> HeaderField:
    name, start, colon, end = c
    assert isinstance(name, str) and isinstance(start, int)
    assert isinstance(colon, int) and isinstance(end, int)
    value = raw[colon:end]
    if value.endswith(b"\r\n"):
        value = value[:-2]
    elif value.endswith(b"\n"):
        value = value[:-1]
    return HeaderField(name, start, end, value)


def parse_esmtp_args(args: str | None) -> dict[str, str | None]:
    """``"SIZE=10 BODY=8BITMIME SMTPUTF8"`` → ``{"SIZE": "10", "BODY": "8BITMIME",
    "SMTPUTF8": None}`` (keys upper-cased, RFC 5321 §4.1.2 esmtp-param)."""
    out: dict[str, str | None] = {}
    for word in (args or "").split():
        key, eq, value = word.partition("=")
        out[key.upper()] = value if eq else None
    return out


def _bare(address: str) -> str:
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    return a


@dataclass(slots=True)
class AppliedChanges:
    """What :func:`apply_modifications` did.

    Attributes:
        changes: one short line per action (``"add_header DKIM-Signature"``).
        quarantine: the reason of an SMFIR_QUARANTINE, ``None`` without one.
    """

    changes: list[str] = field(default_factory=list)
    quarantine: str | None = None


class _Editor:
    """Header and body edits on the message bytes, applied by :func:`apply_modifications`."""

    def __init__(self, raw: bytes, header_end: int, body_start: int, leadspc: bool) -> None:
        self.raw = raw
        self.header_end = header_end
        self.body_start = body_start
        self.leadspc = leadspc
        self.eol = b"\n" if raw[:header_end].count(b"\r\n") < raw[:header_end].count(b"\n") \
            else b"\r\n"

    def fields(self) -> list[HeaderField]:
        return header_fields(self.raw, self.header_end)

    def format(self, name: str, value: str) -> bytes:
        if not _NAME.match(name):
            raise ValueError(f"invalid header field name {name!r}")
        text = value.replace("\r\n", "\n")
        if _BAD_VALUE.search(text):
            raise ValueError(f"bare CR, NUL or unfolded line break in the value of {name}")
        if text and text[0] not in " \t":  # as Postfix: "name: value"
            text = " " + text
        data = text.encode("utf-8", "surrogateescape").replace(b"\n", self.eol)
        return name.encode("ascii") + b":" + data + self.eol

    def splice(self, start: int, end: int, data: bytes) -> None:
        self.raw = self.raw[:start] + data + self.raw[end:]
        delta = len(data) - (end - start)
        self.header_end += delta
        self.body_start += delta

    def append(self, name: str, value: str) -> None:
        pos = self.header_end
        before = b"" if pos == 0 or self.raw[:pos].endswith(b"\n") else self.eol
        self.splice(pos, pos, before + self.format(name, value))

    def insert(self, index: int, name: str, value: str) -> None:
        fields = self.fields()
        if index < len(fields):
            pos = fields[index].start
            self.splice(pos, pos, self.format(name, value))
        else:
            self.append(name, value)

    def change(self, index: int, name: str, value: str) -> bool:
        matches = [f for f in self.fields() if f.name.lower() == name.lower()]
        n = max(index, 1)
        if n > len(matches):
            if value:
                self.append(name, value)
                return True
            return False
        f = matches[n - 1]
        self.splice(f.start, f.end, self.format(f.name, value) if value else b"")
        return True


def apply_modifications(
    tx: Transaction, mods: list[codec.Response], *, leading_space: bool = False
) -> AppliedChanges:
    """Apply a milter's end-of-message modification actions to ``tx``, in order, all or
    nothing: on any error the message, sender and recipients are restored.

    Args:
        tx: the transaction, after the end of data.
        mods: AddHeader, InsertHeader, ChangeHeader, ChangeFrom, AddRcpt, AddRcptPar,
            DelRcpt, ReplaceBody, Quarantine.
        leading_space: ``SMFIP_HDR_LEADSPC`` was negotiated (recorded; as in Postfix a
            space is added after the colon whenever the value does not start with white
            space, either way).

    Returns:
        What was done (:class:`AppliedChanges`).

    Raises:
        ValueError: an invalid header name or value, an invalid address (nothing applied).
    """
    raw = tx.raw
    old_from = tx.mail_from
    old_params = dict(tx.mail_params)
    old_rcpts = list(tx.recipients)
    body = tx.body
    body_start = len(raw) - len(body)
    header_end = len(tx.header_bytes)
    ed = _Editor(raw, header_end, body_start, leading_space)
    out = AppliedChanges()
    new_body: list[bytes] | None = None
    try:
        for m in mods:
            if isinstance(m, codec.AddHeader):
                ed.append(m.name, m.value)
                out.changes.append(f"add_header {m.name}")
            elif isinstance(m, codec.InsertHeader):
                ed.insert(m.index, m.name, m.value)
                out.changes.append(f"insert_header {m.index} {m.name}")
            elif isinstance(m, codec.ChangeHeader):
                if ed.change(m.index, m.name, m.value):
                    verb = "change_header" if m.value else "delete_header"
                    out.changes.append(f"{verb} {m.index} {m.name}")
            elif isinstance(m, codec.ChangeFrom):
                tx.mail_from = _bare(m.address)
                if m.args is not None:
                    tx.mail_params.clear()
                    tx.mail_params.update(parse_esmtp_args(m.args))
                out.changes.append(f"change_from <{tx.mail_from}>")
            elif isinstance(m, codec.AddRcpt | codec.AddRcptPar):
                args = m.args if isinstance(m, codec.AddRcptPar) else None
                r = tx.add_recipient(_bare(m.address), params=parse_esmtp_args(args))
                out.changes.append(f"add_rcpt <{r.address}>")
            elif isinstance(m, codec.DelRcpt):
                address = _bare(m.address)
                removed = 0
                while True:
                    try:
                        tx.delete_recipient(address)
                    except KeyError:
                        break
                    removed += 1
                if removed:
                    out.changes.append(f"delete_rcpt <{address}>")
            elif isinstance(m, codec.ReplaceBody):
                if new_body is None:
                    new_body = []
                new_body.append(m.chunk)
            elif isinstance(m, codec.Quarantine):
                out.quarantine = m.reason
                out.changes.append("quarantine")
        if new_body is not None:
            data = b"".join(new_body)
            if ed.eol == b"\r\n":
                data = _BARE_LF.sub(b"\r\n", data)
            head = ed.raw[: ed.body_start]
            if ed.body_start == ed.header_end:  # no empty line yet
                if head and not head.endswith(b"\n"):
                    head += ed.eol
                head += ed.eol
            ed.raw = head + data
            out.changes.append("replace_body")
        if ed.raw != raw:
            tx.set_raw(ed.raw)
    except Exception:
        tx.mail_from = old_from
        tx.mail_params.clear()
        tx.mail_params.update(old_params)
        tx.recipients[:] = old_rcpts
        raise
    return out
