"""ZMailer-style connection limits and the ``max-error-recipients`` rule.

Entry points: :class:`ConnectionLimiter` (``admit`` / ``release``), :class:`Admission`,
:class:`ErrorRecipientLimit`. RFCs: 5321 §3.1 / §4.3.2 (421 at connection opening),
§4.5.3.1.10 (recipient limits), §4.5.5 (the null reverse-path of notifications),
3463 (enhanced codes).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..reply import R, Reply

__all__ = [
    "TOO_MANY_ERROR_RECIPIENTS",
    "Admission",
    "AdmissionKind",
    "ConnectionLimiter",
    "ErrorRecipientLimit",
    "client_key",
]

logger = logging.getLogger("smtpgate.policy.limits")

#: RCPT reply past ``max_error_recipients`` on a message from ``<>``.
TOO_MANY_ERROR_RECIPIENTS = Reply(
    550, "5.7.1", "Too many recipients for a message with an empty reverse-path"
)


def _positive_int(value: Any, key: str, problems: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{key}: expected an integer >= 1, got {value!r}")
        return 1
    return value


def client_key(ip: str) -> str:
    """The per-IP counting key: canonical address text, IPv4-mapped IPv6 as IPv4.

    ``"::ffff:192.0.2.1"`` and ``"192.0.2.1"`` are the same client; ``"[2001:DB8::1]"``
    becomes ``"2001:db8::1"``. Text that is not an address (a Unix-socket peer) is
    used as it is.
    """
    text = ip.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


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


class ConnectionLimiter:
    """``MaxParallelConnections`` and ``MaxSameIpSource`` with ZMailer's escalation.

    ZMailer smtpserver(8): at the per-IP limit the server "tells the remote end:
    450 Too many simultaneous connections... (and then closes the connection)",
    and "when the limit is exceeded by factor of four, the server just closes the
    connection without telling anything"; past the total limit it prints the
    message, and past the total limit plus 100 it closes silently.

    Counting includes the new connection (as ZMailer's ``childsameip()``), so with
    ``max_per_ip = 10`` ten sessions are served and the eleventh is refused. The
    reply is ``421 4.7.0`` (:data:`R.TOO_MANY_CONNECTIONS` /
    :data:`R.TOO_MANY_FROM_IP`) rather than ZMailer's 450: RFC 5321 §4.3.2 allows
    only 220, 421 and 554 when a connection opens.

    Checks run in ZMailer's order: per-IP drop, total drop, total refusal, per-IP
    refusal. The limiter is not thread-safe; use it from the event loop thread.

    Args:
        max_total: ``server.max_connections`` (ZMailer ``MaxParallelConnections``).
        max_per_ip: ``server.max_connections_per_ip`` (ZMailer ``MaxSameIpSource``).
        total_drop_margin: connections over ``max_total`` that still get a reply
            (ZMailer: 100).
        per_ip_drop_factor: multiple of ``max_per_ip`` past which connections are
            dropped silently (ZMailer: 4).

    Raises:
        ConfigError: when a limit is not an integer >= 1 (naming the config key).
    """

    def __init__(
        self,
        max_total: int,
        max_per_ip: int,
        *,
        total_drop_margin: int = 100,
        per_ip_drop_factor: int = 4,
    ) -> None:
        problems: list[str] = []
        self.max_total = _positive_int(max_total, "server.max_connections", problems)
        self.max_per_ip = _positive_int(max_per_ip, "server.max_connections_per_ip", problems)
        if (
            isinstance(total_drop_margin, bool)
            or not isinstance(total_drop_margin, int)
            or total_drop_margin < 0
        ):
            problems.append(
                f"total_drop_margin: expected an integer >= 0, got {total_drop_margin!r}"
            )
        self.total_drop_margin = total_drop_margin
        self.per_ip_drop_factor = _positive_int(per_ip_drop_factor, "per_ip_drop_factor", problems)
        if problems:
            raise ConfigError(problems)
        self._total = 0
        self._per_ip: Counter[str] = Counter()

    @property
    def active(self) -> int:
        """Connections currently holding a slot."""
        return self._total

    def active_from(self, ip: str) -> int:
        """Connections currently holding a slot for ``ip``."""
        return self._per_ip.get(client_key(ip), 0)

    def admit(self, ip: str) -> Admission:
        """Judge a new connection from ``ip`` and count it unless it is dropped.

        Args:
            ip: the client address (after PROXY protocol), any textual form.

        Returns:
            The :class:`Admission`. When ``holds_slot`` is True the caller must call
            :meth:`release` with the same ``ip`` exactly once after the connection closes.
        """
        key = client_key(ip)
        same = self._per_ip[key] + 1
        total = self._total + 1
        if same > self.per_ip_drop_factor * self.max_per_ip:
            logger.info("dropping connection from %s: %d open from it", key, same - 1)
            return Admission(AdmissionKind.DROP, None, total - 1, same - 1)
        if total > self.max_total + self.total_drop_margin:
            logger.info("dropping connection from %s: %d open in total", key, total - 1)
            return Admission(AdmissionKind.DROP, None, total - 1, same - 1)
        self._total = total
        self._per_ip[key] = same
        if total > self.max_total:
            logger.info("refusing %s: %d connections (max %d)", key, total, self.max_total)
            return Admission(AdmissionKind.REFUSE, R.TOO_MANY_CONNECTIONS, total, same)
        if same > self.max_per_ip:
            logger.info("refusing %s: %d from it (max %d)", key, same, self.max_per_ip)
            return Admission(AdmissionKind.REFUSE, R.TOO_MANY_FROM_IP, total, same)
        return Admission(AdmissionKind.ACCEPT, None, total, same)

    def release(self, ip: str) -> None:
        """Give back the slot of a closed connection that :meth:`admit` counted.

        A release without a matching admission is logged and ignored (counts never
        go negative), so cleanup paths may call it without raising.
        """
        key = client_key(ip)
        if self._per_ip.get(key, 0) <= 0 or self._total <= 0:
            logger.warning("release(%s) without a matching admission; ignored", key)
            return
        self._per_ip[key] -= 1
        if self._per_ip[key] == 0:
            del self._per_ip[key]
        self._total -= 1


class ErrorRecipientLimit:
    """``max-error-recipients``: how many recipients a message from ``<>`` may have.

    ZMailer smtpserver(8): "how many recipients can be on a message whose source
    address is MAIL FROM:<>. That is, is an error message. (Sometimes SPAMs are
    tried to inject in that form...)". A real notification has one recipient
    (RFC 5321 §4.5.5, RFC 3461 §6). Past the limit smtpgate refuses each further
    RCPT with ``550 5.7.1``; ZMailer answered ``552 5.7.1`` and then also refused the
    whole message at DATA. smtpgate uses 550 because RFC 5321 §4.5.3.1.10 tells
    clients to treat 552 after RCPT as temporary, which would invite retries.

    Args:
        limit: recipients allowed on a ``<>`` message (``server.max_error_recipients``,
            ZMailer default 3), >= 1; None disables the rule.

    Raises:
        ConfigError: when ``limit`` is not None or an integer >= 1.
    """

    __slots__ = ("limit",)

    def __init__(self, limit: int | None) -> None:
        if limit is not None:
            problems: list[str] = []
            _positive_int(limit, "server.max_error_recipients", problems)
            if problems:
                raise ConfigError(problems)
        self.limit = limit

    def rcpt_reply(self, mail_from: str, accepted: int) -> Reply | None:
        """Judge one more RCPT TO.

        Args:
            mail_from: the transaction's reverse-path (``""`` for ``<>``, as in
                :class:`smtpgate.envelope.Envelope`).
            accepted: recipients already accepted in this transaction.

        Returns:
            :data:`TOO_MANY_ERROR_RECIPIENTS` when ``mail_from`` is null and
            ``accepted`` already reached the limit; None to proceed.
        """
        if self.limit is None or mail_from != "" or accepted < self.limit:
            return None
        return TOO_MANY_ERROR_RECIPIENTS
