"""Hook verdicts: the closed vocabulary a hook answers with, and the default reply table.

Entry points: :class:`Verdict`, :class:`HookResult`, :class:`Stage`, :func:`default_reply`,
the helpers :func:`accept`, :func:`cont`, :func:`reject`, :func:`tempfail`, :func:`drop`
and the exceptions :class:`Reject`, :class:`TempFail`, :class:`Disconnect`.
RFC 5321 §4.2 (reply codes), §3.8 (421 closes the channel); RFC 3463 (enhanced codes).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum

from ..errors import SmtpgateError
from ..reply import Reply

__all__ = [
    "NOTIFY_STAGES",
    "Disconnect",
    "HookResult",
    "HookVerdictException",
    "Reject",
    "Stage",
    "TempFail",
    "Verdict",
    "accept",
    "cont",
    "default_reply",
    "drop",
    "reject",
    "tempfail",
]


class Verdict(Enum):
    """What a hook decided (Haraka's vocabulary).

    Members:
        CONT: no opinion; the next hook in the chain runs.
        OK: accept; the chain stops and the command succeeds.
        DENY: permanent rejection (5xx); the chain stops.
        DENYSOFT: temporary rejection (4xx); the chain stops.
        DENY_DISCONNECT: 5xx, then the server closes the connection.
        DENYSOFT_DISCONNECT: 4xx (normally 421), then the server closes the connection.
        QUARANTINE: data stage only: the message is stored in the quarantine Maildir
            named by :attr:`HookResult.quarantine` instead of being delivered, and the
            result's reply (2xx: pretend delivery; 5xx: refuse) is sent.
    """

    CONT = "CONT"
    OK = "OK"
    DENY = "DENY"
    DENYSOFT = "DENYSOFT"
    DENY_DISCONNECT = "DENY_DISCONNECT"
    DENYSOFT_DISCONNECT = "DENYSOFT_DISCONNECT"
    QUARANTINE = "QUARANTINE"

    @property
    def is_denial(self) -> bool:
        """True for the four rejecting verdicts."""
        return self not in (Verdict.CONT, Verdict.OK, Verdict.QUARANTINE)

    @property
    def is_permanent(self) -> bool:
        """True for DENY and DENY_DISCONNECT (5xx)."""
        return self in (Verdict.DENY, Verdict.DENY_DISCONNECT)

    @property
    def is_transient(self) -> bool:
        """True for DENYSOFT and DENYSOFT_DISCONNECT (4xx)."""
        return self in (Verdict.DENYSOFT, Verdict.DENYSOFT_DISCONNECT)


@dataclass(frozen=True, slots=True)
class HookResult:
    """A verdict with an optional reply to send instead of the stage's default one.

    Attributes:
        verdict: the decision.
        reply: the reply to send; ``None`` means the default for the stage and
            verdict (see :func:`default_reply`) or, for OK, the server's usual reply.
        quarantine: QUARANTINE only: the Maildir directory the message is stored in.
        reason: a short text for the transaction log line (``"spamassassin spam"``).

    Raises:
        ValueError: when the reply class does not fit the verdict: CONT carries no
            reply, OK needs 2xx/3xx, DENY/DENY_DISCONNECT need 5xx,
            DENYSOFT/DENYSOFT_DISCONNECT need 4xx; QUARANTINE needs a directory and a
            2xx or 5xx reply.
    """

    verdict: Verdict
    reply: Reply | None = None
    quarantine: str | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        reply = self.reply
        verdict = self.verdict
        if verdict is Verdict.QUARANTINE:
            if not self.quarantine or reply is None or reply.is_transient:
                raise ValueError("a QUARANTINE result needs a directory and a 2xx/5xx reply")
            return
        if reply is None:
            return
        if verdict is Verdict.CONT:
            raise ValueError("a CONT result carries no reply")
        if verdict is Verdict.OK and not reply.is_positive:
            raise ValueError(f"an OK result needs a 2xx/3xx reply, got {reply.code}")
        if verdict.is_permanent and not reply.is_permanent:
            raise ValueError(f"a {verdict.name} result needs a 5xx reply, got {reply.code}")
        if verdict.is_transient and not reply.is_transient:
            raise ValueError(f"a {verdict.name} result needs a 4xx reply, got {reply.code}")

    @property
    def disconnect(self) -> bool:
        """True when the server must close the connection after replying."""
        return self.verdict in (Verdict.DENY_DISCONNECT, Verdict.DENYSOFT_DISCONNECT)


CONT_RESULT = HookResult(Verdict.CONT)
"""The shared "no opinion" result (results are immutable, so one instance serves)."""


class Stage(StrEnum):
    """The points in an SMTP session where hooks run (a ``str`` enum: ``Stage.RCPT == "rcpt"``).

    Members (values are the lower-case names used in configuration):
        CONNECT: after the TCP (and PROXY/TLS-on-connect) set-up, before the greeting.
        HELO: after HELO/EHLO/LHLO.
        MAIL: after MAIL FROM was parsed.
        RCPT: after each RCPT TO was parsed.
        DATA: after the message was received completely (end of data).
        QUIT: when the session ends (QUIT or a dropped connection); verdicts ignored.
        ERROR: an error reply is about to be sent; verdicts ignored (nssmtpd
            ``errorproc``; the tarpit delays it here).
        AUTH: after an AUTH exchange, successful or not; a denial refuses it.
        DATA_START: at DATA (before ``354``) or the first BDAT of a transaction
            (before its chunk is read).
        HEADERS: at the end of the header block, with the parsed headers.
        RSET: after RSET; verdicts ignored.
        UNKNOWN: an unrecognised command; an OK with a reply answers it.
        VRFY: VRFY or EXPN (when enabled), with the address; a denial refuses it.
        QUEUE: the message is accepted, before it is handed to delivery; an OK with a
            reply means the plugin took the message (delivery is skipped).
        DELIVERED: notification per recipient with the outcome of delivery (queue
            mode: in the delivery process); verdicts ignored.
    """

    # In the order a session meets them (``smtpgate plugins`` lists them so).
    CONNECT = "connect"
    HELO = "helo"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA_START = "data_start"
    HEADERS = "headers"
    DATA = "data"
    QUEUE = "queue"
    DELIVERED = "delivered"
    VRFY = "vrfy"
    UNKNOWN = "unknown"
    RSET = "rset"
    ERROR = "error"
    QUIT = "quit"


NOTIFY_STAGES = frozenset({Stage.QUIT, Stage.ERROR, Stage.RSET, Stage.DELIVERED})
"""Stages whose hooks all run and whose verdicts are ignored."""


# What is being refused at each stage, for the default texts.
_DENY: dict[Stage, Reply] = {
    Stage.CONNECT: Reply(554, "5.7.1", "Access denied"),
    Stage.HELO: Reply(550, "5.7.1", "HELO rejected"),
    Stage.MAIL: Reply(550, "5.7.1", "Sender rejected"),
    Stage.RCPT: Reply(550, "5.7.1", "Recipient rejected"),
    Stage.DATA: Reply(550, "5.7.1", "Message rejected"),
    Stage.AUTH: Reply(535, "5.7.8", "Authentication credentials invalid"),
    Stage.DATA_START: Reply(554, "5.7.1", "Transaction rejected"),
    Stage.HEADERS: Reply(550, "5.7.1", "Message rejected"),
    Stage.UNKNOWN: Reply(500, "5.5.1", "Command unrecognized"),
    Stage.VRFY: Reply(550, "5.1.1", "Address rejected"),
    Stage.QUEUE: Reply(550, "5.7.1", "Message rejected"),
}
_DENYSOFT: dict[Stage, Reply] = {
    # RFC 5321 §3.1: the only 4xx greeting is 421, which closes the channel (§3.8).
    Stage.CONNECT: Reply(421, "4.7.0", "Service temporarily unavailable, closing connection"),
    Stage.HELO: Reply(450, "4.7.1", "HELO temporarily rejected"),
    Stage.MAIL: Reply(450, "4.7.1", "Sender temporarily rejected"),
    Stage.RCPT: Reply(450, "4.7.1", "Recipient temporarily rejected"),
    Stage.DATA: Reply(451, "4.7.1", "Message temporarily rejected"),
    Stage.AUTH: Reply(454, "4.7.0", "Temporary authentication failure"),
    Stage.DATA_START: Reply(451, "4.7.1", "Transaction temporarily rejected"),
    Stage.HEADERS: Reply(451, "4.7.1", "Message temporarily rejected"),
    Stage.UNKNOWN: Reply(451, "4.7.1", "Command temporarily refused"),
    Stage.VRFY: Reply(450, "4.7.1", "Address temporarily rejected"),
    Stage.QUEUE: Reply(451, "4.3.0", "Message not queued, try again later"),
}
_DEFAULTS: dict[tuple[Stage, Verdict], Reply] = {}
for _stage, _reply in _DENY.items():
    _DEFAULTS[(_stage, Verdict.DENY)] = _reply
    _DEFAULTS[(_stage, Verdict.DENY_DISCONNECT)] = _reply
for _stage, _reply in _DENYSOFT.items():
    _DEFAULTS[(_stage, Verdict.DENYSOFT)] = _reply
    _DEFAULTS[(_stage, Verdict.DENYSOFT_DISCONNECT)] = (
        _reply if _reply.code == 421 else Reply(421, "4.7.0", f"{_reply.text}, closing connection")
    )
del _stage, _reply


def default_reply(stage: Stage | str, verdict: Verdict) -> Reply | None:
    """The reply the server sends for ``verdict`` at ``stage`` when the hook gave none.

    Examples: DENY at RCPT → ``550 5.7.1 Recipient rejected``; DENYSOFT at DATA →
    ``451 4.7.1 Message temporarily rejected``; DENY at CONNECT → ``554 5.7.1 Access
    denied`` (RFC 5321 §3.1); DENYSOFT at CONNECT and every DENYSOFT_DISCONNECT →
    421 (RFC 5321 §3.8, the server then closes the connection).

    Args:
        stage: a :class:`Stage` or its value (``"rcpt"``).
        verdict: the decision.

    Returns:
        The default reply, or ``None`` for CONT and OK (the server's usual reply
        applies) and for the QUIT and ERROR stages (nothing is sent).

    Raises:
        ValueError: ``stage`` is not a stage name.
    """
    return _DEFAULTS.get((Stage(stage), verdict))


def accept(text: str | None = None) -> HookResult:
    """Accept and stop the chain (OK).

    Args:
        text: reply text for a ``250 2.0.0`` reply; ``None`` keeps the server's
            usual positive reply for the stage (e.g. ``250 2.1.5 Recipient OK``).
    """
    return HookResult(Verdict.OK, None if text is None else Reply(250, "2.0.0", text))


def cont() -> HookResult:
    """No opinion: let the next hook decide (CONT)."""
    return CONT_RESULT


def reject(
    text: str = "Rejected by policy",
    code: int = 550,
    enhanced: str = "5.7.1",
    disconnect: bool = False,
) -> HookResult:
    """Reject permanently (DENY, or DENY_DISCONNECT with ``disconnect=True``).

    Args:
        text: reply text (``"\\n"`` separates lines of a multi-line reply).
        code: a 5xx reply code (RFC 5321 §4.2.3).
        enhanced: RFC 3463 enhanced status code of class 5.

    Raises:
        ValueError: ``code`` is not 5xx, or the enhanced code is malformed or of
            another class.
    """
    if not 500 <= code <= 599:
        raise ValueError(f"reject() needs a 5xx code, got {code}")
    verdict = Verdict.DENY_DISCONNECT if disconnect else Verdict.DENY
    return HookResult(verdict, Reply(code, enhanced, text))


def tempfail(
    text: str = "Temporarily rejected, try again later",
    code: int = 451,
    enhanced: str = "4.7.1",
    disconnect: bool = False,
) -> HookResult:
    """Reject temporarily (DENYSOFT, or DENYSOFT_DISCONNECT with ``disconnect=True``).

    Args:
        text: reply text.
        code: a 4xx reply code (RFC 5321 §4.2.3); 421 implies closing (§3.8), so
            pass ``disconnect=True`` with it or use :func:`drop`.
        enhanced: RFC 3463 enhanced status code of class 4.

    Raises:
        ValueError: ``code`` is not 4xx, or the enhanced code is malformed or of
            another class.
    """
    if not 400 <= code <= 499:
        raise ValueError(f"tempfail() needs a 4xx code, got {code}")
    verdict = Verdict.DENYSOFT_DISCONNECT if disconnect else Verdict.DENYSOFT
    return HookResult(verdict, Reply(code, enhanced, text))


def drop(
    text: str = "Closing connection",
    code: int = 421,
    enhanced: str = "4.7.0",
) -> HookResult:
    """Reply and close the connection.

    A 4xx code gives DENYSOFT_DISCONNECT, a 5xx code (e.g. 554) DENY_DISCONNECT.

    Args:
        text: reply text.
        code: 421 by default (RFC 5321 §3.8), or any 4xx/5xx code.
        enhanced: RFC 3463 enhanced status code matching the code's class.

    Raises:
        ValueError: ``code`` is not 4xx/5xx, or the enhanced code does not match.
    """
    if 400 <= code <= 499:
        return HookResult(Verdict.DENYSOFT_DISCONNECT, Reply(code, enhanced, text))
    if 500 <= code <= 599:
        return HookResult(Verdict.DENY_DISCONNECT, Reply(code, enhanced, text))
    raise ValueError(f"drop() needs a 4xx or 5xx code, got {code}")


class HookVerdictException(SmtpgateError):
    """Raised by a hook instead of returning a verdict (tcllib smtpd style).

    Attributes:
        result: the :class:`HookResult` the runner uses.
    """

    def __init__(self, result: HookResult) -> None:
        self.result = result
        super().__init__(str(result.reply) if result.reply else result.verdict.name)


class Reject(HookVerdictException):
    """Raise to reject permanently; same arguments and errors as :func:`reject`."""

    def __init__(self, text: str, code: int = 550, enhanced: str = "5.7.1") -> None:
        super().__init__(reject(text, code, enhanced))


class TempFail(HookVerdictException):
    """Raise to reject temporarily; same arguments and errors as :func:`tempfail`."""

    def __init__(self, text: str, code: int = 451, enhanced: str = "4.7.1") -> None:
        super().__init__(tempfail(text, code, enhanced))


class Disconnect(HookVerdictException):
    """Raise to reply and close the connection; same arguments and errors as :func:`drop`."""

    def __init__(self, text: str, code: int = 421, enhanced: str = "4.7.0") -> None:
        super().__init__(drop(text, code, enhanced))
