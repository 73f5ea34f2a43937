"""The Received: trace header smtpgate prepends to every message it accepts.

Entry point: :func:`build_received`. RFC 5321 §4.4, RFC 5322 §3.6.7/§3.3, protocol keywords
per RFC 3848 and RFC 6531 §3.7.3 (ESMTPSA, UTF8SMTPS, LMTPA, ...). No DNS lookups.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime

from ..envelope import Envelope, SessionInfo

__all__ = ["build_received", "protocol_keyword"]

#: Fold lines at this many characters where a space allows it (RFC 5322 §2.1.1).
FOLD_WIDTH = 78
#: Longest HELO name / user name / address copied into the header, in characters.
MAX_FIELD = 255

_UNSAFE_TOKEN = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
_UNSAFE_COMMENT = re.compile(r"[\x00-\x20\x7f()\\]")
_UNSAFE_ADDR = re.compile(r"[\x00-\x1f\x7f<>\\]")
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


def _clip(text: str, limit: int = MAX_FIELD) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.lru_cache(maxsize=4096)
def _token(text: str) -> str:
    """A client-supplied name as one header token: printable ASCII, no specials (cached:
    the same HELO names and our host name come back at every message)."""
    return _clip(_UNSAFE_TOKEN.sub("?", text)) or "unknown"


def _comment_text(text: str) -> str:
    """Text safe inside a ``(comment)``: no controls, spaces, parentheses or backslash."""
    return _clip(_UNSAFE_COMMENT.sub("?", text))


def _addr(text: str) -> str:
    """An envelope address safe inside ``<...>`` (UTF-8 is kept: RFC 6532)."""
    return _clip(_UNSAFE_ADDR.sub("?", text).replace(" ", "?"))


@functools.lru_cache(maxsize=4096)
def _ip_literal(ip: str) -> str | None:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3), ``None`` if not an IP.

    Cached: the same client addresses come back again and again.
    """
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return f"[{addr.ipv4_mapped}]"
        return f"[IPv6:{addr.compressed}]"
    return f"[{addr}]"


@functools.lru_cache(maxsize=8)
def _stamp(second: int) -> str:
    """RFC 5322 date-time for a whole second (cached: many headers share a second)."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


def protocol_keyword(
    session: SessionInfo, envelope: Envelope | None = None, *, lmtp: bool = False
) -> str:
    """The ``with`` keyword for a session (RFC 3848 and RFC 6531 §3.7.3 registries).

    Args:
        session: the SMTP session (``esmtp``, ``tls``, ``auth_user`` are used).
        envelope: the transaction; ``SMTPUTF8`` in its MAIL parameters selects
            the ``UTF8SMTP`` / ``UTF8LMTP`` family.
        lmtp: the message came in over LMTP (RFC 2033).

    Returns:
        One of SMTP, ESMTP[S][A], UTF8SMTP[S][A], LMTP[S][A], UTF8LMTP[S][A].
        A HELO session (no ESMTP) is always ``SMTP``: no keyword is registered
        for HELO with TLS.
    """
    utf8 = envelope is not None and envelope.smtputf8
    if lmtp:
        base = "UTF8LMTP" if utf8 else "LMTP"
    elif utf8:
        base = "UTF8SMTP"
    elif session.esmtp:
        base = "ESMTP"
    else:
        return "SMTP"
    return base + ("S" if session.tls else "") + ("A" if session.auth_user else "")


def _fold(words: list[str], first: bool, width: int = FOLD_WIDTH) -> list[str]:
    """Join ``words`` with spaces into lines of at most ``width`` characters where
    possible; every line but the header's first begins with a TAB (RFC 5322 §3.2.2
    FWS). A word (the date, for one) is never split."""
    out: list[str] = []
    current = words[0] if first else "\t" + words[0]
    for word in words[1:]:
        if len(current) + 1 + len(word) <= width:
            current += " " + word
        else:
            out.append(current)
            current = "\t" + word
    out.append(current)
    return out


def build_received(
    session: SessionInfo,
    envelope: Envelope,
    *,
    queue_id: str,
    include_tls: bool = True,
    include_auth: bool = False,
    lmtp: bool = False,
    now: float | None = None,
    tls_peer: str | None = None,
) -> bytes:
    """Build one ``Received:`` header field (RFC 5321 §4.4), CRLF-terminated and folded.

    Example (folded with a TAB before each continuation line)::

        Received: from helo.name (unknown [192.0.2.1])
        \\tby mx.example.org (smtpgate) with ESMTPS id 1A2B3C
        \\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)
        \\tfor <rcpt@example.com>; Sun, 22 Nov 2026 00:11:06 +0000

    The reverse-DNS name is always ``unknown`` (no DNS lookups here). Values the
    client controls (HELO name, addresses, user name) are sanitised: control
    characters, CR and LF never reach the header, specials are replaced by
    ``?`` and each value is cut to :data:`MAX_FIELD` characters.

    Args:
        session: the SMTP session (peer address, HELO name, TLS, auth user, our host name).
        envelope: the transaction; ``for <addr>`` is added only when it has
            exactly one recipient, and SMTPUTF8 selects the UTF8SMTP keyword.
        queue_id: the id shown after ``id`` (letters, digits, ``.``, ``_``, ``-``).
        include_tls: add the ``(using <version> with cipher <cipher>)`` comment
            when TLS is active.
        include_auth: add ``(Authenticated sender: <user>)`` when authenticated.
        lmtp: the message came in over LMTP (keyword LMTP...).
        now: the time to stamp, seconds since the epoch (default: now).
        tls_peer: the verified TLS client certificate's subject, added as
            ``(client certificate: <subject>)`` when given (ZMailer rcvd-tls-peer).

    Returns:
        The header as UTF-8 bytes ending in CRLF.
    """
    lines = [_from_lines(session.helo_name, session.peer_ip,
                         session.auth_user if include_auth else None)]
    keyword = protocol_keyword(session, envelope, lmtp=lmtp)
    if queue_id.isascii() and queue_id.isalnum() and len(queue_id) <= 64:
        qid = queue_id  # smtpgate's own ids: nothing to remove
    else:
        qid = _UNSAFE_ID.sub("", queue_id)[:64] or "unknown"
    groups: list[list[str]] = [
        [f"by {_token(session.hostname)}", "(smtpgate)", f"with {keyword}", f"id {qid}"]]
    if include_tls and session.tls_version:
        tls = [f"(using {_comment_text(session.tls_version)}"]
        if session.tls_cipher:
            tls += ["with", f"cipher {_comment_text(session.tls_cipher)}"]
        tls[-1] += ")"
        groups.append(tls)
    if tls_peer:
        groups.append(["(client", f"certificate: {_comment_text(tls_peer)})"])
    stamp = _stamp(int(time.time() if now is None else now))
    if len(envelope.rcpt_to) == 1:
        groups.append([f"for <{_addr(envelope.rcpt_to[0].address)}>;", stamp])
    else:
        groups[-1][-1] += ";"
        groups[-1].append(stamp)
    for words in groups:
        lines.extend(_fold(words, first=False))
    lines.append("")
    return "\r\n".join(lines).encode("utf-8", "replace")


@functools.lru_cache(maxsize=1024)
def _from_lines(helo_name: str | None, peer_ip: str, auth_user: str | None) -> str:
    """The header's first logical line, ``Received: from HELO (unknown [IP])``, and the
    ``(Authenticated sender: USER)`` comment when ``auth_user`` is given, folded and
    without the final CRLF (cached: they are the same for every message of a session)."""
    helo = _token(helo_name) if helo_name else "unknown"
    literal = _ip_literal(peer_ip)
    from_comment = f"(unknown {literal})" if literal else "(unknown)"
    lines = _fold([f"Received: from {helo}", *from_comment.split(" ")], first=True)
    if auth_user:
        lines += _fold(["(Authenticated", f"sender: {_comment_text(auth_user)})"], first=False)
    return "\r\n".join(lines)
