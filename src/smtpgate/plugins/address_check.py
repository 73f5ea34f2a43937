"""Built-in plugin ``address_check``: the ``[hooks] address_check`` callables, asked about
an address by VRFY/EXPN (when enabled) and, when the session's HELO rule has flag ``f``
or ``t``, about the sender at MAIL and each recipient at RCPT (ZMailer's router check).

Entry point: :func:`register`. Each callable gets ``(session, address, kind)`` with kind
``"mail"``, ``"rcpt"``, ``"vrfy"`` or ``"expn"`` and returns None/True (fine), False
(``550 5.1.1``), a :class:`~smtpgate.reply.Reply` or a :class:`~smtpgate.hooks.HookResult`.
An exception is logged and gives ``451 4.3.0``. VRFY/EXPN of an address every check
accepts gets ``250 2.1.5 <address>`` (RFC 5321 §3.5.3).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, Verdict, load_callable
from ..reply import Reply
from . import Option, PluginRegistry
from .helo_rules import policy_of

log = logging.getLogger("smtpgate.plugins.address_check")

PRIORITY = -70
OPTIONS: dict[str, Option] = {}

CHECK_FAILED = Reply(451, "4.3.0", "Address verification failed, try again later")


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Load the callables; register the mail, rcpt and vrfy hooks."""
    registry.decides_relay = False  # it only refuses: never lets a recipient relay
    checks: list[Callable[..., Any]] = [
        load_callable(spec, "hooks.address_check")
        for spec in registry.config.hooks.address_check
    ]

    async def check(session: SessionInfo, address: str, kind: str) -> HookResult | None:
        for func in checks:
            try:
                result = func(session, address, kind)
                if inspect.isawaitable(result):
                    result = await result
            except Exception:
                log.exception("address_check failed for %r", address)
                return HookResult(Verdict.DENYSOFT, CHECK_FAILED)
            refused = Reply(550, "5.1.1", f"<{address}>: address rejected")
            if result is False:
                return HookResult(Verdict.DENY, refused)
            if isinstance(result, Reply) and result.code >= 400:
                return HookResult(Verdict.DENYSOFT if result.is_transient else Verdict.DENY,
                                  result)
            if isinstance(result, HookResult) and result.verdict.is_denial:
                return result if result.reply else HookResult(result.verdict, refused)
        return None

    async def mail(session: SessionInfo, transaction: Transaction) -> HookResult | None:
        policy = policy_of(session)
        sender = transaction.envelope.mail_from
        if policy is not None and policy.verify_sender and sender:
            return await check(session, sender, "mail")
        return None

    async def rcpt(session: SessionInfo, transaction: Transaction,
                   recipient: Recipient) -> HookResult | None:
        policy = policy_of(session)
        if policy is not None and policy.verify_recipient:
            return await check(session, recipient.address, "rcpt")
        return None

    async def vrfy(session: SessionInfo, address: str, kind: str) -> HookResult:
        refusal = await check(session, address, kind)
        if refusal is not None:
            return refusal
        return HookResult(Verdict.OK, Reply(250, "2.1.5", f"<{address}>"))

    registry.on("mail", mail)
    registry.on("rcpt", rcpt)
    registry.on("vrfy", vrfy)
