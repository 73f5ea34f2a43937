"""Delivery: where an accepted transaction goes (upstream relay, Maildir, discard, callable,
capture database).

Entry points: :class:`Delivery` (protocol), :func:`make_delivery`, :func:`parse_relay_url`,
:func:`build_received`, :func:`send_message`. RFC 5321 §6.1: success only once accepted/stored.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..envelope import Envelope, SessionInfo
from ..errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from ..message import Message
from ..reply import Reply
from .capture import CaptureDelivery, CaptureStore
from .local import CallableDelivery, DeliveryFunc, DiscardDelivery
from .maildir import MaildirDelivery
from .received import build_received, protocol_keyword
from .send import send_message
from .upstream import UpstreamDelivery, UpstreamTransaction
from .url import RelayUrl, parse_relay_url

__all__ = [
    "CallableDelivery",
    "CaptureDelivery",
    "CaptureStore",
    "Delivery",
    "DeliveryError",
    "DeliveryFunc",
    "DiscardDelivery",
    "MaildirDelivery",
    "PermanentDeliveryError",
    "RelayUrl",
    "TemporaryDeliveryError",
    "UpstreamDelivery",
    "UpstreamTransaction",
    "build_received",
    "make_delivery",
    "parse_relay_url",
    "protocol_keyword",
    "send_message",
]


@runtime_checkable
class Delivery(Protocol):
    """Something that takes responsibility for one accepted transaction."""

    async def deliver(
        self, envelope: Envelope, message: Message, session: SessionInfo | None = None
    ) -> Reply:
        """Deliver one message.

        Args:
            envelope: reverse-path, MAIL parameters and recipients.
            message: the complete message as it should be delivered: CRLF line
                endings, not dot-stuffed, the Received header already prepended;
                bytes, or (a long message) a :class:`~smtpgate.message.MessageFile`
                valid until ``deliver`` returns.
            session: the client's SMTP session, when there is one.

        Returns:
            The 2xx reply to give the SMTP client. Never returned unless the
            message was accepted upstream or durably stored.

        Raises:
            TemporaryDeliveryError: a 4xx-class failure (the client should retry).
            PermanentDeliveryError: a 5xx-class failure.
        """
        ...

    async def aclose(self) -> None:
        """Release connections and other resources."""
        ...

    # Optional (proxy mode): ``async def open_transaction(envelope, session) ->
    # UpstreamTransaction``. When a delivery has it, the SMTP session opens the transaction
    # at MAIL, forwards each RCPT (the reply is the client's) and ends it with ``data`` or
    # ``abort`` instead of calling ``deliver`` (see :class:`UpstreamTransaction`).


def make_delivery(
    url: str | None,
    *,
    maildir_path: str = "./smtpgate-mail",
    timeout: float = 60.0,
    helo_name: str = "localhost",
    cafile: str | None = None,
) -> Delivery:
    """Build the delivery for a relay URL.

    Args:
        url: ``None`` for Maildir delivery into ``maildir_path``, ``"discard:"``
            to accept and drop, else an upstream relay URL (``smtp://``,
            ``smtp+starttls://``, ``smtps://``, ``plain://``).
        maildir_path: the Maildir directory used when ``url`` is ``None``.
        timeout: upstream connect and per-command timeout, seconds.
        helo_name: our EHLO name towards the upstream.
        cafile: CA bundle (PEM) to verify the upstream's certificate instead of
            the system CAs.

    Returns:
        A :class:`MaildirDelivery`, :class:`DiscardDelivery` or :class:`UpstreamDelivery`.

    Raises:
        ConfigError: the URL or ``helo_name`` is invalid (password never shown).
    """
    if url is None:
        return MaildirDelivery(maildir_path)
    relay = parse_relay_url(url)
    if relay.is_discard:
        return DiscardDelivery()
    return UpstreamDelivery(relay, timeout=timeout, helo_name=helo_name, cafile=cafile)
