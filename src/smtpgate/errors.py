"""smtpgate's exception tree: one root, errors split by blame and by retry class.

Entry points: :class:`SmtpgateError` and its children. Errors that should become
an SMTP reply carry it in ``reply``.
"""

from __future__ import annotations

from .reply import Reply


class SmtpgateError(Exception):
    """Root of every exception smtpgate raises on purpose."""


class ConfigError(SmtpgateError):
    """The configuration is invalid.

    Attributes:
        problems: every problem found, each naming the key (``"server.listen: ..."``).
    """

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class ProtocolError(SmtpgateError):
    """A protocol violation; carries the reply to send (h11's error_status_hint).

    The peer's violations are never raised: the protocol core answers them with an
    ``AutoReply`` event. Only :class:`LocalProtocolError` (the driver's misuse) is.
    """

    def __init__(self, reply: Reply, detail: str = "") -> None:
        self.reply = reply
        super().__init__(detail or str(reply))


class LocalProtocolError(ProtocolError):
    """smtpgate itself (or a hook) tried something the protocol forbids."""


class DeliveryError(SmtpgateError):
    """Delivery failed; ``reply`` is what the client (or the queue) should see."""

    def __init__(self, reply: Reply, detail: str = "") -> None:
        self.reply = reply
        super().__init__(detail or str(reply))


class TemporaryDeliveryError(DeliveryError):
    """A 4xx-class failure: retry later (upstream down, 4xx reply, timeout)."""


class PermanentDeliveryError(DeliveryError):
    """A 5xx-class failure: do not retry."""


class ScannerError(SmtpgateError):
    """A content scanner failed (unreachable, timed out, protocol error)."""


class ScannerUnavailable(ScannerError):
    """The scanner could not be reached (connection refused, socket missing, closed early)."""


class ScannerTimeout(ScannerError):
    """The scanner did not answer within its timeout."""


class QueueError(SmtpgateError):
    """The durable queue could not store or read a message."""


class AuthError(SmtpgateError):
    """The authentication back end failed (not: the credentials were wrong)."""
