"""The verdict on a new connection (ZMailer-style limits: accept, refuse with 421, or drop).

Entry points: :class:`Admission`, :class:`AdmissionKind`; the limits themselves are
applied by :meth:`smtpgate.server.listener.SmtpServer.admit`. RFC 5321 §3.1 / §4.3.2
(421 at connection opening).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..reply import Reply

__all__ = ["Admission", "AdmissionKind"]


class AdmissionKind(enum.Enum):
    """What to do with a new connection."""

    ACCEPT = "accept"
    """Serve the session."""
    REFUSE = "refuse"
    """Send :attr:`Admission.reply` instead of the greeting, then close."""
    DROP = "drop"
    """Close at once without a word (far over the limit)."""


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict on one new connection.

    Attributes:
        kind: accept, refuse with a reply, or drop silently.
        reply: the reply for :attr:`AdmissionKind.REFUSE`, else None.
        total: connections open including this one (when counted).
        same_ip: connections open from this client's address, including this one.
    """

    kind: AdmissionKind
    reply: Reply | None
    total: int
    same_ip: int

    @property
    def accepted(self) -> bool:
        """True for :attr:`AdmissionKind.ACCEPT`."""
        return self.kind is AdmissionKind.ACCEPT

    @property
    def holds_slot(self) -> bool:
        """True when the connection was counted; the caller must ``release`` it once closed.

        Refused connections hold a slot while they print the reply and close, as
        ZMailer's children did: that is what lets a flood reach the drop threshold.
        """
        return self.kind is not AdmissionKind.DROP
