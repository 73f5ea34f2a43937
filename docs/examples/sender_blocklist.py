"""Example smtpgate plugin: refuse mail from listed senders (the example of docs/plugins.md).

Put this file on ``sys.path`` (e.g. ``PYTHONPATH=/etc/smtpgate/plugins``) and enable it::

    [[plugin]]
    module = "sender_blocklist"
    blocked_senders = ["spam@bad.example"]
    blocked_domains = ["junk.example"]
    reply_text = "Mail from <{sender}> is not accepted here"

What it does:

* ``mail`` stage: a listed envelope sender (``MAIL FROM``), or one in a listed domain, is
  refused with ``550 5.7.1`` and ``reply_text`` (``{sender}`` is replaced by the address).
* ``data`` stage: the ``From:`` header field is checked against the same lists; the finding
  is recorded in ``transaction.results`` under the plugin's name (``pass`` or ``fail``,
  with the address checked), a listed ``From:`` is refused like a listed sender, and an
  accepted message gets a header (``header``, default ``X-Sender-Blocklist``) showing the
  finding, e.g. ``X-Sender-Blocklist: sender_blocklist=pass (from=ann@example.org)``.

Its test is tests/plugins/test_example_plugin.py.
"""

from __future__ import annotations

import re
from email.utils import parseaddr

from smtpgate.envelope import SessionInfo
from smtpgate.hooks import HookResult, Transaction, reject
from smtpgate.plugins import Option, OptionError, PluginRegistry

PRIORITY = -10
"""Default priority of the hooks (-100..100, lower runs first); ``priority`` in the
``[[plugin]]`` table overrides it."""

_ADDRESS = re.compile(r"[^@\s<>]+@[^@\s<>]+")
_DOMAIN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_FIELD_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 §3.6.8: printable ASCII except ':'


def _check_addresses(values: list[str]) -> str | None:
    """``None`` when every entry looks like ``local@domain``, else why not."""
    for value in values:
        if not _ADDRESS.fullmatch(value):
            return f"must be e-mail addresses (local@domain), got {value!r}"
    return None


def _check_domains(values: list[str]) -> str | None:
    """``None`` when every entry is a domain name, else why not."""
    for value in values:
        if not _DOMAIN.fullmatch(value):
            return f"must be domain names, got {value!r}"
    return None


def _check_text(text: str) -> str | None:
    """``None`` when ``text`` is a one-line reply text whose only placeholder is
    ``{sender}``, else why not."""
    if "\r" in text or "\n" in text or not text.strip():
        return "must be one non-empty line"
    try:
        text.format(sender="a@b.example")
    except (KeyError, IndexError, ValueError) as exc:
        return f"may only use the placeholder {{sender}} ({type(exc).__name__}: {exc})"
    return None


OPTIONS: dict[str, Option] = {
    "blocked_senders": Option(list, default=[], items=str, check=_check_addresses,
                              help="envelope senders / From: addresses to refuse"),
    "blocked_domains": Option(list, default=[], items=str, check=_check_domains,
                              help="domains whose senders are refused"),
    "reply_text": Option(str, default="Sender <{sender}> is blocked here", check=_check_text,
                         help="text of the 550 5.7.1 reply; {sender} is the address"),
    "header": Option(str, default="X-Sender-Blocklist",
                     check=lambda v: None if _FIELD_NAME.fullmatch(v) else
                     f"must be a header field name, got {v!r}",
                     help="header field added to accepted messages"),
}
"""The options of the ``[[plugin]]`` table; smtpgate validates them before
:func:`register` runs and names a bad one as ``plugin[N].KEY``."""


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the mail and data hooks.

    Args:
        registry: where the hooks go (``registry.name`` is the plugin's display name).
        options: the validated options (see :data:`OPTIONS`), defaults filled in.

    Raises:
        OptionError: neither ``blocked_senders`` nor ``blocked_domains`` lists anything
            (reported as ``plugin[N].blocked_senders: ...``).
    """
    senders_opt, domains_opt = options["blocked_senders"], options["blocked_domains"]
    text, header = options["reply_text"], options["header"]
    assert isinstance(senders_opt, list) and isinstance(domains_opt, list)
    assert isinstance(text, str) and isinstance(header, str)
    senders = frozenset(s.lower() for s in senders_opt)
    domains = frozenset(d.lower() for d in domains_opt)
    if not senders and not domains:
        raise OptionError("blocked_senders", "nothing to block: list senders here or "
                                             "domains in blocked_domains")
    name = registry.name

    def listed(address: str) -> bool:
        address = address.lower()
        return address in senders or address.rpartition("@")[2] in domains

    def refusal(address: str) -> HookResult:
        return reject(text.format(sender=address), code=550, enhanced="5.7.1")

    def mail(session: SessionInfo, transaction: Transaction) -> HookResult | None:
        sender = transaction.mail_from
        return refusal(sender) if sender and listed(sender) else None

    def data(session: SessionInfo, transaction: Transaction) -> HookResult | None:
        author = parseaddr(transaction.get_header("From") or "")[1]
        if author and listed(author):
            transaction.results.add(name, "fail", **{"from": author})
            return refusal(author)
        finding = transaction.results.add(name, "pass", **{"from": author or "-"})
        transaction.add_header(header, finding.text())
        return None

    registry.on("mail", mail)
    registry.on("data", data)
