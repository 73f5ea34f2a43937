"""Next hops for the queue: one relay for everything, or MX delivery per recipient domain;
and the DSN factory the manager uses for bounces and delay notices.

Entry points: :class:`RelayOutbound`, :class:`MxOutbound`, :func:`dsn_factory`.
RFC 5321 §5.1 (MX), RFC 3461/3464 (DSN).
"""

from __future__ import annotations

import re
import time

from ..delivery.dsn import RecipientStatus, build_dsn, should_notify
from ..delivery.mx import MxDelivery
from ..delivery.outbound import RecipientResults
from ..delivery.upstream import UpstreamDelivery
from ..envelope import Envelope
from ..message import Message
from ..reply import Reply
from .manager import DsnFactory, Outcome
from .schedule import RetrySchedule
from .store import QueuedRecipient, QueueEntry

_REPLY_RE = re.compile(r"^([245]\d\d) (?:([245]\.\d{1,3}\.\d{1,3}) )?(.*)$", re.S)


def parse_reply_text(text: str) -> Reply:
    """Turn a stored ``"550 5.1.1 text"`` back into a :class:`Reply` (lenient)."""
    m = _REPLY_RE.match(text.strip())
    if not m:
        return Reply(451, "4.0.0", text[:200] or "No reply recorded")
    code = int(m.group(1))
    enhanced = m.group(2)
    if enhanced is not None and enhanced[0] != m.group(1)[0]:
        enhanced = None
    return Reply(code, enhanced, (m.group(3) or "").replace("\r", " "))


def _results(results: RecipientResults) -> dict[str, Outcome]:
    """The manager's view: the remote MTA only for replies it gave (never for a reply
    smtpgate made up, e.g. a connection failure), and "relayed" for recipients accepted
    by a next hop without DSN (RFC 3461 §5.2.2)."""
    out: dict[str, Outcome] = {}
    for addr, reply in results.items():
        remote = results.remote_mta or "" if results.is_remote(addr) else ""
        relayed = bool(remote) and reply.is_positive and results.next_hop_dsn is False
        out[addr] = Outcome(reply, remote, relayed)
    return out


class RelayOutbound:
    """Every recipient goes to one relay URL (``smtp://``, ``smtps://``, ``plain://`` ...).

    Args:
        relay: the :class:`~smtpgate.delivery.upstream.UpstreamDelivery` for the URL.
    """

    def __init__(self, relay: UpstreamDelivery) -> None:
        self.relay = relay

    def destination(self, address: str) -> str:
        """Always ``"relay"``: one destination, one concurrency limit."""
        return "relay"

    async def send(
        self, destination: str, envelope: Envelope, message: Message
    ) -> dict[str, Outcome]:
        """Per-recipient outcome from the relay (connection failures are 4xx for all);
        a :class:`~smtpgate.message.MessageFile` is streamed from its file."""
        results = await self.relay.deliver_recipients(envelope, message)
        return _results(results)

    async def aclose(self) -> None:
        """Close the relay's pooled connections."""
        await self.relay.aclose()


class MxOutbound:
    """Recipients are grouped by domain and delivered to that domain's MX hosts.

    Args:
        mx: the :class:`~smtpgate.delivery.mx.MxDelivery` (port, resolver, TLS policy).
    """

    def __init__(self, mx: MxDelivery) -> None:
        self.mx = mx

    def destination(self, address: str) -> str:
        """The recipient's domain, lower-cased (address literals as written)."""
        at = address.rfind("@")
        return address[at + 1 :].lower() if at >= 0 else ""

    async def send(
        self, destination: str, envelope: Envelope, message: Message
    ) -> dict[str, Outcome]:
        """Per-recipient outcome from the domain's MX hosts (a
        :class:`~smtpgate.message.MessageFile` is streamed from its file)."""
        if not destination:
            return {r.address: Outcome(Reply(550, "5.1.2", "Recipient has no domain"), "")
                    for r in envelope.rcpt_to}
        results = await self.mx.deliver_recipients(envelope, message, domain=destination)
        return _results(results)

    async def aclose(self) -> None:
        """Nothing pooled."""
        await self.mx.aclose()


def dsn_factory(hostname: str, schedule: RetrySchedule) -> DsnFactory:
    """Build the manager's DSN callback (RFC 3464; honours NOTIFY, RET, ENVID, ORCPT).

    Kinds: ``"failure"``, ``"delay"``, and ``"relayed"`` for recipients accepted by a next
    hop that does not offer DSN (RFC 3461 §5.2.2, sent when NOTIFY has SUCCESS). Recipients
    accepted by a DSN-capable next hop get no success DSN from us: NOTIFY was passed on, and
    that hop reports delivery itself.
    """

    def make(entry: QueueEntry, message: bytes, rcpts: list[QueuedRecipient],
             kind: str) -> bytes | None:
        if kind == "success" or not entry.mail_from:
            return None
        wanted = [r for r in rcpts if should_notify(r.params, kind)]  # type: ignore[arg-type]
        if not wanted:
            return None
        now = time.time()
        statuses = [
            RecipientStatus(
                address=r.address,
                reply=parse_reply_text(r.last_reply),
                params=r.params,
                remote_mta=r.remote_mta or None,
                last_attempt=now,
                will_retry_until=(entry.created + schedule.max_lifetime
                                  if kind == "delay" else None),
            )
            for r in wanted
        ]
        return build_dsn(
            reporting_mta=hostname,
            original_envelope_id=entry.mail_params.get("ENVID"),
            mail_from=entry.mail_from,
            arrival_date=entry.created,
            recipients=statuses,
            original_message=message,
            ret=(entry.mail_params.get("RET") or "FULL").upper(),
            kind=kind,  # type: ignore[arg-type]
            message_id_domain=hostname,
        )

    return make
