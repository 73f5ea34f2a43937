"""Delivery status notifications: the bounce, delay and success reports the queue sends back.

Entry points: :func:`build_dsn` (a multipart/report message, built with the stdlib ``email``
package), :class:`RecipientStatus`, :func:`should_notify`, :func:`xtext_decode`.
RFCs 3464 (DSN format), 3461 §4 (NOTIFY/RET/ENVID/ORCPT), 6522 (multipart/report), 3834.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage, Message, MIMEPart
from email.parser import BytesParser
from email.utils import format_datetime, make_msgid
from typing import Literal

from ..reply import Reply

__all__ = [
    "DsnKind",
    "RecipientStatus",
    "build_dsn",
    "original_recipient",
    "should_notify",
    "xtext_decode",
]

DsnKind = Literal["failure", "delay", "success", "relayed"]

#: RFC 3464 §2.3.3 Action per kind of report.
_ACTIONS: dict[str, str] = {
    "failure": "failed",
    "delay": "delayed",
    "success": "delivered",
    "relayed": "relayed",
}
#: RFC 3461 §4.1 NOTIFY keyword per kind of report.
_NOTIFY_KEYWORD: dict[str, str] = {
    "failure": "FAILURE",
    "delay": "DELAY",
    "success": "SUCCESS",
    "relayed": "SUCCESS",
}
_SUBJECTS: dict[str, str] = {
    "failure": "Undelivered Mail Returned to Sender",
    "delay": "Delayed Mail (still being retried)",
    "success": "Successful Mail Delivery Report",
    "relayed": "Successful Mail Delivery Report",
}
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_HOST = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.\-_]{0,252})$|^\[[0-9A-Fa-f:.IPv]+\]$")


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """What happened to one recipient, for its per-recipient DSN block (RFC 3464 §2.3).

    Attributes:
        address: the forward-path (becomes ``Final-Recipient: rfc822; <address>``).
        reply: the last reply for it: from ``remote_mta``, or made up locally.
            ``Status`` is its enhanced code (or ``X.0.0`` from the reply class).
        params: its RCPT parameters (``NOTIFY``, ``ORCPT``; keys upper case).
            ``ORCPT`` becomes ``Original-Recipient`` (xtext-decoded).
        remote_mta: host name of the MTA that gave ``reply`` (``Remote-MTA``,
            and ``Diagnostic-Code: smtp; ...``); ``None`` when the reply is
            ours (then ``Diagnostic-Code: X-Smtpgate; ...``).
        last_attempt: time of the last delivery attempt, seconds since the epoch
            (``Last-Attempt-Date``), or ``None``.
        will_retry_until: for delay reports, when the queue gives up, seconds
            since the epoch (``Will-Retry-Until``), or ``None``.
    """

    address: str
    reply: Reply
    params: Mapping[str, str | None] = field(default_factory=dict)
    remote_mta: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 §4 xtext (``+XX`` hex escapes), as in ORCPT and ENVID values.

    Args:
        text: the xtext value, e.g. ``"rfc822;a+2Bb@example.com"``.

    Returns:
        The decoded text (``"rfc822;a+b@example.com"``); malformed escapes stay as they are.
    """
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), text)


def _ascii_field(text: str) -> str:
    """A delivery-status field value: one line, ASCII; other characters as ``\\x{HEX}``
    (the RFC 6533 §3 embedded-unicode-char form)."""
    text = _CONTROL.sub(" ", text).strip()
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in text)


def _address_field(address: str) -> str:
    """``rfc822; <address>``, or ``utf-8; <escaped>`` for an internationalized one (RFC 6533)."""
    kind = "rfc822" if address.isascii() else "utf-8"
    return f"{kind}; {_ascii_field(address)}"


def original_recipient(params: Mapping[str, str | None]) -> str | None:
    """The ``Original-Recipient`` field value from a recipient's ORCPT parameter.

    RFC 3461 §4.2: ``ORCPT=addr-type;xtext``; RFC 3464 §2.3.1 carries it in the
    DSN with the address decoded.

    Args:
        params: the RCPT parameters (key ``ORCPT``, any case).

    Returns:
        ``"rfc822;b@example.com"``, or ``None`` when there is no usable ORCPT.
    """
    raw = next((v for k, v in params.items() if k.upper() == "ORCPT"), None)
    if not raw or ";" not in raw:
        return None
    addr_type, _, value = raw.partition(";")
    if not addr_type.strip() or not value:
        return None
    return f"{_ascii_field(addr_type)};{_ascii_field(xtext_decode(value))}"


def should_notify(
    recipient_params: Mapping[str, str | None], kind: DsnKind, *, default_delay: bool = True
) -> bool:
    """Whether the sender asked for (or, by default, gets) this kind of DSN for a recipient.

    RFC 3461 §4.1: ``NOTIFY=NEVER`` means no DSN at all; ``NOTIFY=SUCCESS,FAILURE,DELAY``
    (any subset) asks for exactly those kinds. Without NOTIFY the MTA behaves
    as for ``NOTIFY=FAILURE,DELAY``, delay reports at its discretion: failure
    yes, success no, delay as ``default_delay`` says. A null reverse-path never
    gets a DSN: check that separately (:func:`build_dsn` refuses it).

    Args:
        recipient_params: the RCPT parameters (key ``NOTIFY``, any case; value
            comma-separated keywords, any case).
        kind: ``"failure"``, ``"delay"`` or ``"success"``.
        default_delay: send delay reports when NOTIFY was not given.

    Returns:
        True when a DSN of ``kind`` should be sent for this recipient.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in _NOTIFY_KEYWORD:
        raise ValueError(f"unknown DSN kind {kind!r}")
    raw = next((v for k, v in recipient_params.items() if k.upper() == "NOTIFY"), None)
    if raw is None or not raw.strip():
        return kind == "failure" or (kind == "delay" and default_delay)
    keywords = {item.strip().upper() for item in raw.split(",") if item.strip()}
    if "NEVER" in keywords:
        return False
    return _NOTIFY_KEYWORD[kind] in keywords


def _date(when: float) -> str:
    return format_datetime(datetime.fromtimestamp(when, UTC))


def _reply_text(reply: Reply) -> str:
    status = reply.enhanced or f"{reply.code // 100}.0.0"
    return _ascii_field(f"{reply.code} {status} {' '.join(reply.text.splitlines())}")


def _human_text(
    *,
    reporting_mta: str,
    kind: DsnKind,
    recipients: Sequence[RecipientStatus],
    headers_only: bool,
) -> str:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    attached = "Its headers are attached below." if headers_only else "It is attached below."
    if kind == "failure":
        lines += [
            "Your message could not be delivered to one or more recipients.",
            f"{attached} The mail system said:",
        ]
    elif kind == "delay":
        until = [r.will_retry_until for r in recipients if r.will_retry_until is not None]
        lines += [
            "THIS IS A WARNING ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE.",
            "",
            "Your message could not be delivered yet to one or more recipients.",
            "Delivery will be retried"
            + (f" until {_date(max(until))}." if until else ".")
            + f" {attached}",
            "The mail system said:",
        ]
    elif kind == "relayed":
        lines += [
            "Your message was successfully relayed to the destinations listed below,",
            "as you asked. The next mail system does not support delivery status",
            "notifications: you will receive no notice of delivery from it, but you may",
            f"still receive notices of delivery errors from other systems. {attached}",
        ]
    else:
        lines += [
            "Your message was delivered to the recipients listed below,",
            f"as you asked. {attached}",
        ]
    lines.append("")
    for status in recipients:
        who = f"<{status.address}>"
        said = f"{status.remote_mta} said: " if status.remote_mta else ""
        lines.append(f"{who}: {said}{_reply_text(status.reply)}")
    lines.append("")
    return "\r\n".join(lines)


def build_dsn(
    *,
    reporting_mta: str,
    original_envelope_id: str | None,
    mail_from: str,
    arrival_date: float,
    recipients: Sequence[RecipientStatus],
    original_message: bytes,
    ret: str = "FULL",
    kind: DsnKind = "failure",
    message_id_domain: str,
    now: float | None = None,
    max_full_size: int | None = None,
) -> bytes:
    """Build an RFC 3464 delivery status notification for the sender of a message.

    The result is a complete message (CRLF line endings) of type
    ``multipart/report; report-type=delivery-status`` (RFC 6522): a
    human-readable ``text/plain`` part, a ``message/delivery-status`` part
    (per-message fields, then one block per recipient) and the original message
    as ``message/rfc822`` (RET=FULL) or its header section as
    ``text/rfc822-headers`` (RET=HDRS). Its header: ``From: Mail Delivery System
    <MAILER-DAEMON@reporting_mta>``, ``To:`` the original reverse-path,
    ``Auto-Submitted: auto-replied`` (RFC 3834 §5). The caller sends it with the
    null reverse-path (``MAIL FROM:<>``, RFC 5321 §4.5.5) to ``mail_from``;
    with ``BODY=8BITMIME`` when the result is not ASCII (an 8-bit original
    returned in full), and with ``SMTPUTF8`` as well when ``mail_from`` is not
    ASCII (its ``To:`` header is then UTF-8, RFC 6532). Callers filter
    ``recipients`` with :func:`should_notify` first.

    Args:
        reporting_mta: our host name (``Reporting-MTA: dns; <name>``, From domain).
        original_envelope_id: the ENVID parameter of the original MAIL (xtext,
            decoded here, RFC 3461 §4.4), or ``None``.
        mail_from: the original reverse-path; must not be empty.
        arrival_date: when we accepted the original message, seconds since the epoch.
        recipients: one :class:`RecipientStatus` per recipient to report (at least one).
        original_message: the original message bytes (CRLF).
        ret: ``"FULL"`` (return the whole message) or ``"HDRS"`` (headers only),
            any case: the original's RET parameter (RFC 3461 §4.3), FULL if none.
        kind: ``"failure"`` (Action: failed), ``"delay"`` (delayed),
            ``"success"`` (delivered) or ``"relayed"`` (relayed: passed to a next hop
            that does not offer DSN, RFC 3461 §5.2.2; asked for by ``NOTIFY=SUCCESS``).
        message_id_domain: the domain of the DSN's own Message-ID.
        now: the DSN's Date, seconds since the epoch (default: now).
        max_full_size: return only the headers when the original is larger than
            this many bytes (``None``: no limit).

    Returns:
        The DSN as bytes.

    Raises:
        ValueError: ``mail_from`` is the null reverse-path (never bounce a
            bounce: RFC 3461 §6.2, RFC 5321 §4.5.5), no recipients, unknown
            ``kind`` or ``ret``, or a malformed ``reporting_mta`` /
            ``message_id_domain`` / ``mail_from`` (CR or LF).
    """
    if not mail_from:
        raise ValueError("no DSN for the null reverse-path <> (would loop)")
    if not recipients:
        raise ValueError("a DSN needs at least one recipient")
    if kind not in _ACTIONS:
        raise ValueError(f"unknown DSN kind {kind!r}")
    ret_mode = (ret or "FULL").upper()
    if ret_mode not in ("FULL", "HDRS"):
        raise ValueError(f"RET must be FULL or HDRS, not {ret!r}")
    for what, host in (("reporting_mta", reporting_mta), ("message_id_domain", message_id_domain)):
        if not _HOST.match(host):
            raise ValueError(f"{what} {host[:80]!r} is not a host name")
    if max_full_size is not None and len(original_message) > max_full_size:
        ret_mode = "HDRS"
    headers_only = ret_mode == "HDRS"
    created = time.time() if now is None else now

    # refold_source="none": the returned message's own header lines are kept byte for byte.
    pol = email_policy.SMTP.clone(refold_source="none", utf8=not mail_from.isascii())

    report = EmailMessage(policy=pol)
    report["From"] = Address("Mail Delivery System", "MAILER-DAEMON", reporting_mta)
    report["To"] = mail_from
    report["Subject"] = _SUBJECTS[kind]
    report["Date"] = _date(created)
    report["Message-ID"] = make_msgid(domain=message_id_domain)
    report["Auto-Submitted"] = "auto-replied"
    report["MIME-Version"] = "1.0"
    report["Content-Type"] = "multipart/report"
    report.set_param("report-type", "delivery-status")

    notice = MIMEPart(policy=pol)
    body = _human_text(
        reporting_mta=reporting_mta, kind=kind, recipients=recipients, headers_only=headers_only
    )
    notice.set_content(body, cte="7bit" if body.isascii() else "quoted-printable")
    notice["Content-Description"] = "Notification"

    status = MIMEPart(policy=pol)
    status["Content-Description"] = "Delivery report"
    status["Content-Type"] = "message/delivery-status"
    # Each block is a header-only Message (compat32 keeps the values as given);
    # the generator writes the blocks separated by blank lines.
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {reporting_mta}"
    if original_envelope_id:
        per_message["Original-Envelope-Id"] = _ascii_field(xtext_decode(original_envelope_id))
    per_message["Arrival-Date"] = _date(arrival_date)
    blocks: list[Message | str] = [per_message]
    for rcpt in recipients:
        block = Message()
        orcpt = original_recipient(rcpt.params)
        if orcpt is not None:
            block["Original-Recipient"] = orcpt
        block["Final-Recipient"] = _address_field(rcpt.address)
        block["Action"] = _ACTIONS[kind]
        block["Status"] = rcpt.reply.enhanced or f"{rcpt.reply.code // 100}.0.0"
        if rcpt.remote_mta:
            block["Remote-MTA"] = f"dns; {_ascii_field(rcpt.remote_mta)}"
            block["Diagnostic-Code"] = f"smtp; {_reply_text(rcpt.reply)}"
        else:
            block["Diagnostic-Code"] = f"X-Smtpgate; {_reply_text(rcpt.reply)}"
        if rcpt.last_attempt is not None:
            block["Last-Attempt-Date"] = _date(rcpt.last_attempt)
        if kind == "delay" and rcpt.will_retry_until is not None:
            block["Will-Retry-Until"] = _date(rcpt.will_retry_until)
        blocks.append(block)
    status.set_payload(blocks)

    returned = MIMEPart(policy=pol)
    if headers_only:
        head = original_message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
        returned.set_content(
            head.decode("utf-8", "replace"),
            subtype="rfc822-headers",
            cte="7bit" if head.isascii() else "8bit",
        )
        returned["Content-Description"] = "Undelivered Message Headers"
    else:
        original = BytesParser(policy=pol).parsebytes(original_message)
        returned.set_content(original, cte="7bit" if original_message.isascii() else "8bit")
        returned["Content-Description"] = "Undelivered Message"
    report.set_payload([notice, status, returned])
    return report.as_bytes()
