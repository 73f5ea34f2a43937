"""The envelope of a mail transaction and the facts about its SMTP session.

Entry points: :class:`Envelope`, :class:`Recipient`, :class:`SessionInfo`.
RFC 5321 §2.3.1 (envelope), §3.3 (MAIL/RCPT), RFC 1869 (ESMTP parameters).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .results import Results


@dataclass(slots=True)
class Recipient:
    """One forward-path of a transaction (RFC 5321 §4.1.1.3).

    Attributes:
        address: the mailbox without angle brackets (``"user@example.com"``;
            ``"postmaster"`` is allowed without a domain).
        params: ESMTP RCPT parameters, keys upper-cased, value ``None`` for a
            keyword without ``=value`` (e.g. ``{"NOTIFY": "FAILURE", "ORCPT": "rfc822;a@b"}``).
        flags: free-form per-recipient flags set by hooks (nssmtpd ``setflag``).
        data: free-form per-recipient data set by hooks (nssmtpd ``setrcptdata``).
    """

    address: str
    params: dict[str, str | None] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    data: Any = None

    @property
    def domain(self) -> str:
        """The lower-cased domain part, ``""`` when there is none."""
        at = self.address.rfind("@")
        return self.address[at + 1 :].lower() if at >= 0 else ""


@dataclass(slots=True)
class Envelope:
    """Reverse-path, MAIL parameters and forward-paths of one transaction.

    Attributes:
        mail_from: the reverse-path without angle brackets; ``""`` is the null
            reverse-path ``<>`` (RFC 5321 §4.5.5).
        mail_params: ESMTP MAIL parameters, keys upper-cased
            (``{"SIZE": "1234", "BODY": "8BITMIME", "SMTPUTF8": None}``).
        rcpt_to: accepted recipients, in the order given.
    """

    mail_from: str
    mail_params: dict[str, str | None] = field(default_factory=dict)
    rcpt_to: list[Recipient] = field(default_factory=list)

    @property
    def smtputf8(self) -> bool:
        """True when the client asked for SMTPUTF8 (RFC 6531 §3.4)."""
        return "SMTPUTF8" in self.mail_params

    @property
    def body_type(self) -> str:
        """The BODY parameter (RFC 6152): ``"7BIT"`` (default), ``"8BITMIME"``, ``"BINARYMIME"``."""
        return (self.mail_params.get("BODY") or "7BIT").upper()

    @property
    def recipients(self) -> list[str]:
        """The forward-path addresses as plain strings."""
        return [r.address for r in self.rcpt_to]


MAX_DECISIONS = 512
"""Decisions a session keeps; older ones are dropped (half of them at a time)."""


class Decision(NamedTuple):
    """One hook call of the decision record (what ``smtpgate explain`` prints).

    Attributes:
        stage: the stage (``"rcpt"``).
        plugin: the plugin that registered the hook (its hook name for a hook registered
            in code).
        hook: the hook's name (``"module:function"``).
        verdict: the verdict name (``"CONT"``, ``"DENY"``...).
        reply: the reply the verdict carries, ``""`` for none.
        seconds: how long the call took.
        findings: the ``results`` findings the call added (``Finding.text()`` each).
        transaction: the transaction id, ``""`` for a session stage.
    """

    stage: str
    plugin: str
    hook: str
    verdict: str
    reply: str
    seconds: float
    findings: tuple[str, ...]
    transaction: str


@dataclass(slots=True)
class SessionInfo:
    """What is known about one SMTP session (one client connection).

    Attributes:
        session_id: short unique id used in logs and Received headers.
        peer_ip / peer_port: the client's address (after PROXY protocol, if any).
        local_ip / local_port: the address the client connected to.
        peer_hostname: the client's verified reverse-DNS name, ``None`` when unknown
            (smtpgate does no reverse lookups yet; a connect hook may set it).
        hostname: smtpgate's own host name (banner, Received).
        helo_name: the argument of the last HELO/EHLO/LHLO, ``None`` before one.
        esmtp: True after EHLO (or LHLO), False after HELO.
        tls_version / tls_cipher: set once TLS is active (e.g. ``"TLSv1.3"``).
        auth_user: the authenticated identity (RFC 4954), ``None`` if none.
        start_time: session start, seconds since the epoch.
        notes: free-form per-session state for hooks.
        results: connection-level findings of the plugins (see :class:`Results`).
        errors: error replies the client caused so far (what ``max_errors`` counts);
            kept up to date by the server before each ``error`` stage.
        allow_sloppy_paths: accept MAIL FROM paths without angle brackets or with
            spaces (ZMailer's sloppy mode); a plugin sets it at ``helo`` (HELO rule flag
            ``s``), the protocol core applies it from then on.
        decisions: the decision record (docs/explain.md): one :class:`Decision` per hook
            call, in order, kept by the hook runner (the last
            :data:`MAX_DECISIONS` of the session).
        dry_run: the session is a dry run (``smtpgate explain``): nothing is delivered,
            and plugins that keep counts or state (greylisting, rate limits) must not
            count it.
    """

    session_id: str
    peer_ip: str
    peer_port: int
    local_ip: str = ""
    local_port: int = 0
    peer_hostname: str | None = None
    hostname: str = "localhost"
    helo_name: str | None = None
    esmtp: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    auth_user: str | None = None
    start_time: float = field(default_factory=time.time)
    notes: dict[str, Any] = field(default_factory=dict)
    results: Results = field(default_factory=Results)
    errors: int = 0
    allow_sloppy_paths: bool = False
    decisions: list[Decision] = field(default_factory=list)
    dry_run: bool = False

    @property
    def tls(self) -> bool:
        """True once TLS is active on the session."""
        return self.tls_version is not None
