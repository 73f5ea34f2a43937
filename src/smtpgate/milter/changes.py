"""What the plugins changed in a transaction, as milter modification actions (the
inverse of :func:`smtpgate.milter.message.apply_modifications`).

Entry point: :func:`modifications`: a message and envelope before and after the chain ran
→ the ``SMFIR_*`` actions an MTA applies at end of message (Sendmail ``libmilter``
``smfi_addheader``/``smfi_insheader``/``smfi_chgheader``/``smfi_chgfrom``/
``smfi_addrcpt_par``/``smfi_delrcpt``/``smfi_replacebody``; Postfix MILTER_README).

Header fields are compared as a sequence (difflib): a field that changed in place is a
``CHGHEADER`` of that field; removed fields are ``CHGHEADER`` with an empty value (the
protocol's deletion), sent from the last occurrence of a name to the first so that the
indexes of those still to come do not move; new fields are ``ADDHEADER`` when they follow
every old field and ``INSHEADER`` at their final position otherwise, sent in order, after
the deletions. Values are sent the way the MTA sends them: continuation lines joined by
``"\\n"`` and, unless ``SMFIP_HDR_LEADSPC`` was negotiated, without the space after the
colon.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import codec
from .message import header_fields

__all__ = ["EnvelopeState", "header_end", "modifications", "recipients_state"]


@dataclass(frozen=True, slots=True)
class EnvelopeState:
    """The envelope at one moment: reverse-path and ESMTP MAIL parameters, and the
    forward-paths with their parameters, in order."""

    mail_from: str
    mail_params: Mapping[str, str | None]
    recipients: tuple[tuple[str, Mapping[str, str | None]], ...]


def header_end(raw: bytes) -> tuple[int, int]:
    """``(end of the header block, start of the body)`` of a message: the offsets before
    and after the empty line that separates them (RFC 5322 §2.1); a message without a
    body ends its header block at its end."""
    if raw.startswith((b"\r\n", b"\n")):
        return 0, 2 if raw.startswith(b"\r\n") else 1
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            half = len(sep) // 2
            return i + half, i + len(sep)
    return len(raw), len(raw)


def _fields(raw: bytes, leadspc: bool) -> list[tuple[str, str]]:
    end, _ = header_end(raw)
    out: list[tuple[str, str]] = []
    for f in header_fields(raw, end):
        value = f.value.decode("utf-8", "surrogateescape").replace("\r\n", "\n")
        if not leadspc and value.startswith(" "):
            value = value[1:]
        out.append((f.name, value))
    return out


def _params(params: Mapping[str, str | None]) -> str | None:
    if not params:
        return None
    return " ".join(k if v is None else f"{k}={v}" for k, v in params.items())


def _header_actions(old: list[tuple[str, str]], new: list[tuple[str, str]]
                    ) -> list[codec.Response]:
    key = [(n.lower(), v) for n, v in old]
    matcher = difflib.SequenceMatcher(a=key, b=[(n.lower(), v) for n, v in new],
                                      autojunk=False)
    changes: list[codec.Response] = []
    deleted: list[int] = []  # indexes into old
    inserted: list[int] = []  # indexes into new
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        # pair the fields of the same name in order: those are changed in place
        next_j = j1
        for i in range(i1, i2):
            name = old[i][0]
            match = next((j for j in range(next_j, j2)
                          if new[j][0].lower() == name.lower()), None)
            if match is None:
                deleted.append(i)
                continue
            inserted.extend(range(next_j, match))
            nth = sum(1 for n, _ in old[: i + 1] if n.lower() == name.lower())
            changes.append(codec.ChangeHeader(nth, name, new[match][1]))
            next_j = match + 1
        inserted.extend(range(next_j, j2))
    deletions: list[codec.Response] = []
    for i in sorted(deleted, reverse=True):
        name = old[i][0]
        nth = sum(1 for n, _ in old[: i + 1] if n.lower() == name.lower())
        deletions.append(codec.ChangeHeader(nth, name, ""))
    additions: list[codec.Response] = []
    inserted_set = set(inserted)
    for j in sorted(inserted):
        name, value = new[j]
        if all(k in inserted_set for k in range(j, len(new))):
            additions.append(codec.AddHeader(name, value))  # no old field follows it
        else:
            additions.append(codec.InsertHeader(j, name, value))
    return changes + deletions + additions


def modifications(
    before: bytes, after: bytes, envelope_before: EnvelopeState, envelope_after: EnvelopeState,
    *, leadspc: bool = False, actions: int = codec.ACTIONS_ALL,
) -> list[codec.Response]:
    """The milter actions that turn ``before`` into ``after``.

    Args:
        before / after: the message (CRLF lines) as the MTA sent it and as the chain left it.
        envelope_before / envelope_after: the envelope likewise.
        leadspc: ``SMFIP_HDR_LEADSPC`` was negotiated (values keep their leading space).
        actions: the ``SMFIF_*`` actions the MTA allowed in OPTNEG.

    Returns:
        The actions, in the order to send them (envelope first, then headers, then the
        body as ``REPLBODY`` chunks of at most :data:`~smtpgate.milter.codec.MAX_BODY_CHUNK`
        bytes).

    Raises:
        PermissionError: a change the MTA did not allow (naming the ``SMFIF_*`` action);
            the message must then not be accepted unchanged silently.
    """
    out: list[codec.Response] = []

    def need(flag: int, what: str) -> None:
        if not actions & flag:
            raise PermissionError(f"the MTA did not allow {what} in option negotiation")

    eb, ea = envelope_before, envelope_after
    if eb.mail_from != ea.mail_from or dict(eb.mail_params) != dict(ea.mail_params):
        need(codec.SMFIF.CHGFROM, "SMFIF_CHGFROM")
        out.append(codec.ChangeFrom(f"<{ea.mail_from}>", _params(ea.mail_params)))
    old_rcpts = [(a.lower(), dict(p)) for a, p in eb.recipients]
    remaining = list(old_rcpts)
    added: list[tuple[str, Mapping[str, str | None]]] = []
    for address, params in ea.recipients:
        entry = (address.lower(), dict(params))
        if entry in remaining:
            remaining.remove(entry)
        else:
            added.append((address, params))
    for (address, _), orig in zip(eb.recipients, old_rcpts, strict=True):
        if orig in remaining:
            remaining.remove(orig)
            need(codec.SMFIF.DELRCPT, "SMFIF_DELRCPT")
            out.append(codec.DelRcpt(f"<{address}>"))
    for address, params in added:
        if params:
            need(codec.SMFIF.ADDRCPT_PAR, "SMFIF_ADDRCPT_PAR")
            out.append(codec.AddRcptPar(f"<{address}>", _params(params)))
        else:
            need(codec.SMFIF.ADDRCPT, "SMFIF_ADDRCPT")
            out.append(codec.AddRcpt(f"<{address}>"))
    if before == after:
        return out
    headers = _header_actions(_fields(before, leadspc), _fields(after, leadspc))
    for action in headers:
        if isinstance(action, codec.ChangeHeader):
            need(codec.SMFIF.CHGHDRS, "SMFIF_CHGHDRS")
        else:
            need(codec.SMFIF.ADDHDRS, "SMFIF_ADDHDRS")
    out.extend(headers)
    body_before = before[header_end(before)[1]:]
    body_after = after[header_end(after)[1]:]
    if body_before != body_after:
        need(codec.SMFIF.CHGBODY, "SMFIF_CHGBODY")
        for i in range(0, max(len(body_after), 1), codec.MAX_BODY_CHUNK):
            out.append(codec.ReplaceBody(body_after[i:i + codec.MAX_BODY_CHUNK]))
    return out


def recipients_state(recipients: Sequence[tuple[str, Mapping[str, str | None]]]
                     ) -> tuple[tuple[str, Mapping[str, str | None]], ...]:
    """Recipients as :class:`EnvelopeState` holds them (parameters copied)."""
    return tuple((a, dict(p)) for a, p in recipients)
