"""SMTP replies: a reply code, an RFC 3463 enhanced status code and text.

Entry points: :class:`Reply` (value type, renders itself to wire bytes) and the
canonical replies in :data:`R` used across the protocol core and the server.
RFCs: 5321 §4.2 (reply lines, multi-line replies), 2034/3463 (enhanced codes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_ENHANCED_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply (RFC 5321 §4.2).

    Attributes:
        code: three-digit reply code, 200..599.
        enhanced: RFC 3463 enhanced status code such as ``"5.1.1"``, or ``None``
            for replies that carry none (the 220 greeting, the 334 SASL challenge,
            the 354 DATA go-ahead).
        text: reply text; a string with ``"\\n"`` separating lines renders as a
            multi-line reply. Must not contain CR.

    Raises:
        ValueError: on an out-of-range code, a malformed enhanced code, an
            enhanced code whose class digit differs from the reply class, or CR
            in the text.
    """

    code: int
    enhanced: str | None
    text: str
    # The wire bytes with and without the enhanced code, rendered on first use (a reply
    # is immutable; the canonical replies are sent over and over).
    _wire: bytes | None = field(default=None, init=False, repr=False, compare=False)
    _wire_plain: bytes | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code out of range: {self.code}")
        if self.enhanced is not None:
            if not _ENHANCED_RE.match(self.enhanced):
                raise ValueError(f"malformed enhanced status code: {self.enhanced!r}")
            if self.enhanced[0] != str(self.code)[0]:
                raise ValueError(f"enhanced code {self.enhanced} does not match {self.code}")
        if "\r" in self.text:
            raise ValueError("reply text must not contain CR")

    @property
    def is_positive(self) -> bool:
        """True for 2xx and 3xx replies."""
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        """True for 4xx replies (temporary failure: the client should retry)."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """True for 5xx replies (permanent failure)."""
        return self.code >= 500

    def lines(self, enhanced_codes: bool = True) -> list[str]:
        """The reply's text lines, each prefixed with the enhanced code when enabled."""
        prefix = f"{self.enhanced} " if (enhanced_codes and self.enhanced) else ""
        return [prefix + line for line in (self.text.split("\n") or [""])]

    def to_bytes(self, enhanced_codes: bool = True, multiline: bool = True) -> bytes:
        """Render as wire bytes, CRLF-terminated (RFC 5321 §4.2.1); cached in the reply
        (the multi-line forms)."""
        if not multiline:
            return self._render(enhanced_codes, False)
        if enhanced_codes:
            wire = self._wire
            if wire is None:
                wire = self._render(True, True)
                object.__setattr__(self, "_wire", wire)  # frozen: a cache, not state
            return wire
        wire = self._wire_plain
        if wire is None:
            wire = self._render(False, True)
            object.__setattr__(self, "_wire_plain", wire)
        return wire

    def _render(self, enhanced_codes: bool = True, multiline: bool = True) -> bytes:
        """Render as wire bytes, CRLF-terminated (RFC 5321 §4.2.1).

        Args:
            enhanced_codes: prefix each line with the enhanced status code
                (RFC 2034: only when ENHANCEDSTATUSCODES is advertised; the
                server always advertises it unless disabled).
            multiline: render several text lines as ``code-text`` continuation
                lines; when false, only the first line is sent.
        """
        lines = self.lines(enhanced_codes)
        if not multiline:
            lines = lines[:1]
        code = str(self.code)
        out = [f"{code}-{line}\r\n" for line in lines[:-1]]
        out.append(f"{code} {lines[-1]}\r\n")
        return "".join(out).encode("utf-8", "replace")

    def with_text(self, text: str) -> Reply:
        """A copy with other text and the same codes."""
        return Reply(self.code, self.enhanced, text)

    def __str__(self) -> str:
        return self.to_bytes().decode("utf-8", "replace").rstrip("\r\n").replace("\r\n", " / ")


class R:
    """Canonical replies (one place for every fixed reply the server sends)."""

    OK = Reply(250, "2.0.0", "OK")
    SENDER_OK = Reply(250, "2.1.0", "Sender OK")
    RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
    RESET = Reply(250, "2.0.0", "Reset OK")
    NOOP = Reply(250, "2.0.0", "OK")
    QUEUED = Reply(250, "2.0.0", "Message accepted")
    DATA_GO = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
    VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
    BYE = Reply(221, "2.0.0", "Bye")
    STARTTLS_GO = Reply(220, "2.0.0", "Ready to start TLS")
    AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
    SHUTDOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
    TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
    TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
    TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
    TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address")
    TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
    HOOK_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
    TEMP_ERROR = Reply(451, "4.3.0", "Temporary local problem, try again later")
    AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")
    AUTH_RATE = Reply(454, "4.7.0", "Too many failed authentication attempts, try again later")
    TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
    UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
    LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
    BAD_BYTES = Reply(500, "5.5.2", "Invalid characters in command")
    SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
    BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
    BAD_RCPT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
    AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
    AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
    NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
    BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
    HELO_FIRST = Reply(503, "5.5.1", "Send HELO/EHLO first")
    NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
    NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
    NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
    ALREADY_TLS = Reply(503, "5.5.1", "TLS already active")
    ALREADY_AUTH = Reply(503, "5.5.1", "Already authenticated")
    AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
    PARAM_NOT_IMPLEMENTED = Reply(504, "5.5.4", "Parameter not implemented")
    AUTH_MECH_UNKNOWN = Reply(504, "5.5.4", "Unrecognized authentication mechanism")
    AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
    TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
    AUTH_ENCRYPTION_REQUIRED = Reply(
        538, "5.7.11", "Encryption required for requested authentication mechanism"
    )
    AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
    RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
    BARE_LF = Reply(550, "5.6.11", "Bare CR or LF in message data not allowed (use CRLF)")
    TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
    TEXT_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long in message data")
    SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
    NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
    ACCESS_DENIED = Reply(554, "5.7.1", "Access denied")
