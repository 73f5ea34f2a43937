"""In-process deliveries: drop the message, or hand it to a Python callable.

Entry points: :class:`DiscardDelivery` (Postfix ``discard``) and :class:`CallableDelivery`.
Replies per RFC 5321 §4.2 with RFC 3463 enhanced status codes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TypeAlias

from ..envelope import Envelope, SessionInfo
from ..errors import DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from ..message import Message, MessageFile
from ..reply import Reply

__all__ = ["CallableDelivery", "DeliveryFunc", "DiscardDelivery", "raise_for_reply"]

log = logging.getLogger("smtpgate.delivery.local")

#: ``func(envelope, message)`` returning ``None`` (accepted), a :class:`Reply`,
#: or an awaitable of either.
DeliveryFunc: TypeAlias = Callable[[Envelope, bytes], "Reply | None | Awaitable[Reply | None]"]

DISCARDED = Reply(250, "2.0.0", "Message accepted and discarded")
ACCEPTED = Reply(250, "2.0.0", "Message accepted")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")


def raise_for_reply(reply: Reply) -> Reply:
    """Return a 2xx reply; raise the matching DeliveryError for 4xx/5xx.

    Args:
        reply: a final reply to a transaction.

    Returns:
        ``reply`` itself when it is 2xx.

    Raises:
        TemporaryDeliveryError: ``reply`` is 4xx.
        PermanentDeliveryError: ``reply`` is 5xx.
        ValueError: ``reply`` is 3xx (not a final reply).
    """
    if 200 <= reply.code < 300:
        return reply
    if reply.is_transient:
        raise TemporaryDeliveryError(reply)
    if reply.is_permanent:
        raise PermanentDeliveryError(reply)
    raise ValueError(f"not a final reply: {reply.code}")


class DiscardDelivery:
    """Accept every message and store nothing (Postfix ``discard(8)``)."""

    def __repr__(self) -> str:
        return "DiscardDelivery()"

    async def deliver(
        self, envelope: Envelope, message: Message, session: SessionInfo | None = None
    ) -> Reply:
        """Drop the message.

        Args:
            envelope: the transaction (logged only).
            message: the message (ignored; a long one is never read).
            session: the SMTP session, for logging.

        Returns:
            ``250 2.0.0 Message accepted and discarded``.
        """
        log.info(
            "session=%s discarded %d bytes from=%r rcpts=%d",
            session.session_id if session else "-",
            len(message),
            envelope.mail_from,
            len(envelope.rcpt_to),
        )
        return DISCARDED

    async def aclose(self) -> None:
        """Nothing to release."""


class CallableDelivery:
    """Hand each transaction to a Python function.

    ``func(envelope, message)`` may be sync or async. It returns ``None``
    (accepted: 250 2.0.0) or a :class:`Reply` (2xx is returned to the client,
    4xx/5xx become a DeliveryError). A :class:`DeliveryError` raised by ``func``
    passes through unchanged; any other exception is logged with its traceback
    and becomes 451 4.3.0. A sync ``func`` runs on the event loop: keep it short.

    Args:
        func: the delivery function, see :data:`DeliveryFunc`.
    """

    def __init__(self, func: DeliveryFunc) -> None:
        self.func = func

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", repr(self.func))
        return f"CallableDelivery({name})"

    async def deliver(
        self, envelope: Envelope, message: Message, session: SessionInfo | None = None
    ) -> Reply:
        """Call ``func(envelope, message_bytes)`` and turn its result into a reply.

        Args:
            envelope: the transaction.
            message: the complete message (CRLF, not dot-stuffed); a
                :class:`~smtpgate.message.MessageFile` is read into memory (off the
                event loop) first: ``func`` always gets bytes.
            session: the SMTP session, for logging.

        Returns:
            A 2xx reply.

        Raises:
            TemporaryDeliveryError: ``func`` returned a 4xx reply or failed
                unexpectedly (451 4.3.0).
            PermanentDeliveryError: ``func`` returned a 5xx reply.
            DeliveryError: raised by ``func`` itself (passed through).
        """
        try:
            if isinstance(message, MessageFile):
                message = await asyncio.to_thread(message.read)
            result = self.func(envelope, message)
            if inspect.isawaitable(result):
                result = await result
        except DeliveryError:
            raise
        except Exception as exc:
            log.exception(
                "session=%s delivery function %r failed",
                session.session_id if session else "-",
                self,
            )
            raise TemporaryDeliveryError(LOCAL_ERROR, f"delivery function failed: {exc}") from exc
        if result is None:
            return ACCEPTED
        if not isinstance(result, Reply):
            log.error("delivery function %r returned %r, not None or a Reply", self, type(result))
            raise TemporaryDeliveryError(LOCAL_ERROR, "delivery function returned a non-Reply")
        if 300 <= result.code < 400:
            log.error("delivery function %r returned a %d reply", self, result.code)
            raise TemporaryDeliveryError(LOCAL_ERROR, "delivery function returned a 3xx reply")
        return raise_for_reply(result)

    async def aclose(self) -> None:
        """Nothing to release."""
