"""The hook signature of every stage, declared once (``typing.Protocol``).

Entry point: :data:`SIGNATURES` (stage → protocol). A hook may be ``def`` or ``async def``
and returns ``None`` (CONT), a verdict helper's result, a
:class:`~smtpgate.hooks.HookResult`, ``True``/``False`` or a
:class:`~smtpgate.reply.Reply` (see :func:`smtpgate.hooks.runner.normalise_result`).
``SessionInfo`` and ``Recipient`` come from :mod:`smtpgate.envelope`, ``Transaction`` from
:mod:`smtpgate.hooks`. RFC 5321 §3 (the stages of a session), §4.2 (replies).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Stage, Transaction
from ..reply import Reply

__all__ = ["SIGNATURES", "HookReturn"]

HookReturn = HookResult | Reply | bool | None
"""What a hook returns (or an awaitable of it, for ``async def``)."""


class ConnectHook(Protocol):
    """``connect(session)``: before the greeting; a denial refuses the connection (554/421)."""

    def __call__(self, session: SessionInfo, /) -> HookReturn | Awaitable[HookReturn]: ...


class HeloHook(Protocol):
    """``helo(session, helo_name)``: after HELO/EHLO/LHLO, before ``session.helo_name`` is set."""

    def __call__(self, session: SessionInfo, helo_name: str, /) -> (
        HookReturn | Awaitable[HookReturn]): ...


class AuthHook(Protocol):
    """``auth(session, mechanism, username, success)``: after an AUTH exchange (RFC 4954);
    a denial refuses it even when the credentials were right."""

    def __call__(self, session: SessionInfo, mechanism: str, username: str, success: bool,
                 /) -> HookReturn | Awaitable[HookReturn]: ...


class TransactionHook(Protocol):
    """``mail``, ``data_start``, ``headers``, ``data`` and ``queue``:
    ``hook(session, transaction)``.

    mail: MAIL FROM parsed (``transaction.mail_from``, ``mail_params``).
    data_start: DATA received, before ``354``.
    headers: the message is complete; its header block is parsed (``get_header``...).
    data: the message is complete; the hook may change the envelope and the message.
    queue: accepted, before delivery; an OK with a reply means the hook took the message.
    """

    def __call__(self, session: SessionInfo, transaction: Transaction, /) -> (
        HookReturn | Awaitable[HookReturn]): ...


class RcptHook(Protocol):
    """``rcpt(session, transaction, recipient)``: each RCPT TO, before it is added."""

    def __call__(self, session: SessionInfo, transaction: Transaction, recipient: Recipient,
                 /) -> HookReturn | Awaitable[HookReturn]: ...


class VrfyHook(Protocol):
    """``vrfy(session, address, kind)``: VRFY (``kind="vrfy"``) or EXPN (``"expn"``) when
    enabled; an OK with a reply answers it, no opinion gives ``252 2.5.0``."""

    def __call__(self, session: SessionInfo, address: str, kind: str, /) -> (
        HookReturn | Awaitable[HookReturn]): ...


class UnknownHook(Protocol):
    """``unknown(session, verb, line)``: an unrecognised command; an OK with a reply
    answers it, else ``500 5.5.1``."""

    def __call__(self, session: SessionInfo, verb: str, line: str, /) -> (
        HookReturn | Awaitable[HookReturn]): ...


class SessionNoticeHook(Protocol):
    """``quit(session)`` and ``rset(session)``: notifications; the verdict is ignored."""

    def __call__(self, session: SessionInfo, /) -> HookReturn | Awaitable[HookReturn]: ...


class ErrorHook(Protocol):
    """``error(session, reply, command)``: an error reply is about to be sent; ignored verdict."""

    def __call__(self, session: SessionInfo, reply: Reply, command: str, /) -> (
        HookReturn | Awaitable[HookReturn]): ...


class DeliveredHook(Protocol):
    """``delivered(session, transaction, recipient, reply)``: per recipient, the outcome of
    delivery (the next hop's reply, or the queue's); the verdict is ignored. In queue mode
    it runs in the delivery process, with ``session`` rebuilt from the queue entry."""

    def __call__(self, session: SessionInfo, transaction: Transaction, recipient: Recipient,
                 reply: Reply, /) -> HookReturn | Awaitable[HookReturn]: ...


SIGNATURES: dict[Stage, type] = {
    Stage.CONNECT: ConnectHook,
    Stage.HELO: HeloHook,
    Stage.AUTH: AuthHook,
    Stage.MAIL: TransactionHook,
    Stage.RCPT: RcptHook,
    Stage.DATA_START: TransactionHook,
    Stage.HEADERS: TransactionHook,
    Stage.DATA: TransactionHook,
    Stage.QUEUE: TransactionHook,
    Stage.VRFY: VrfyHook,
    Stage.UNKNOWN: UnknownHook,
    Stage.RSET: SessionNoticeHook,
    Stage.QUIT: SessionNoticeHook,
    Stage.ERROR: ErrorHook,
    Stage.DELIVERED: DeliveredHook,
}
"""The protocol each stage's hooks follow."""
