"""smtpgate hooks: user code called at each SMTP stage, answering with a verdict.

Entry points: :class:`HookRunner` (register and run chains), :class:`Transaction` (the
nssmtpd-style message API) and the verdict helpers.
RFC 5321 §3.3/§4.2 (stages and replies), RFC 5322 (header edits), RFC 3463 (enhanced codes).

Writing a hook
==============

A hook is a plain ``def`` or an ``async def``. Register it for a :class:`Stage`, either in
code (``runner.register("rcpt", check_rcpt, priority=-10)``) or in the configuration::

    [hooks]
    rcpt = ["mysite.hooks:check_rcpt"]
    data = "mysite.hooks:tag_message"

Hooks of a stage run by ascending priority (-100..100), then registration order; the first
result other than CONT decides. A hook may return:

* ``None`` or ``True`` → CONT (no opinion, the next hook runs);
* ``False`` → DENY with the stage's default reply (e.g. ``550 5.7.1 Recipient rejected``);
* a :class:`HookResult`, best built with :func:`accept`, :func:`cont`, :func:`reject`,
  :func:`tempfail` or :func:`drop`;
* a :class:`~smtpgate.reply.Reply`: 2xx/3xx → OK, 4xx → DENYSOFT (421 also disconnects),
  5xx → DENY.

Instead of returning, a hook may raise :class:`Reject`, :class:`TempFail` or
:class:`Disconnect` (tcllib smtpd's "throw an error to reject"). Any other exception, an
unsupported return value or a timeout (``HookRunner(timeout=30.0)`` seconds per call) gives
DENYSOFT ``451 4.3.0`` and a log record on ``smtpgate.hooks`` — never an accept. Plain sync
hooks run on the event loop and must be quick; register slow ones with ``blocking=True``
to run them in a worker thread.

Signatures, one example each (``SessionInfo``, ``Recipient`` from :mod:`smtpgate.envelope`)
-------------------------------------------------------------------------------------------

``connect(session: SessionInfo)`` — before the greeting::

    def connect(session):
        if session.peer_ip.startswith("192.0.2."):
            return reject("Go away", code=554)

``helo(session: SessionInfo, helo_name: str)`` — after HELO/EHLO/LHLO::

    def helo(session, helo_name):
        if helo_name == session.hostname:
            raise Reject("You are not me")

``mail(session: SessionInfo, transaction: Transaction)`` — ``transaction.mail_from`` and
``transaction.mail_params`` are set::

    async def mail(session, transaction):
        if transaction.mail_from.endswith("@spam.example"):
            return tempfail("Sender temporarily refused")

``rcpt(session: SessionInfo, transaction: Transaction, recipient: Recipient)`` — the
recipient is not yet in ``transaction.recipients``; on CONT/OK the server appends it::

    def rcpt(session, transaction, recipient):
        if recipient.domain not in {"example.com", "example.net"}:
            return False                       # 550 5.7.1 Recipient rejected
        recipient.flags.add("local")

``data(session: SessionInfo, transaction: Transaction)`` — the message is complete; the
hook may change the envelope and the message::

    async def data(session, transaction):
        if b"viagra" in transaction.body.lower():
            return reject("Message looks like spam", code=554, enhanced="5.7.1")
        transaction.add_header("X-Scanned", "smtpgate")
        transaction.set_flag(0, "scanned")

``quit(session: SessionInfo)`` — at the end of every session, also when the client
disconnects without QUIT; the verdict is ignored::

    def quit(session):
        stats[session.peer_ip] += 1

``error(session: SessionInfo, reply: Reply, command: str)`` — notification that an error
reply was sent (nssmtpd ``errorproc``); the verdict is ignored::

    def error(session, reply, command):
        audit_log.info("%s %s -> %s", session.session_id, command, reply.code)
"""

from __future__ import annotations

from .loader import load_callable
from .runner import HookRunner, RegisteredHook
from .transaction import Transaction
from .verdict import (
    Disconnect,
    HookResult,
    HookVerdictException,
    Reject,
    Stage,
    TempFail,
    Verdict,
    accept,
    cont,
    default_reply,
    drop,
    reject,
    tempfail,
)

__all__ = [
    "Disconnect",
    "HookResult",
    "HookRunner",
    "HookVerdictException",
    "RegisteredHook",
    "Reject",
    "Stage",
    "TempFail",
    "Transaction",
    "Verdict",
    "accept",
    "cont",
    "default_reply",
    "drop",
    "load_callable",
    "reject",
    "tempfail",
]
