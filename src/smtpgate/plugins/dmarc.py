"""Shipped plugin ``dmarc`` (RFC 7489): is the From domain aligned with an SPF or DKIM
pass, and what does its owner want done when it is not.

Entry point: :func:`register`. Runs at the ``data`` stage (priority -30), after the ``spf``
plugin (its ``spf`` finding: result, ``identity`` and ``domain``) and the ``dkim`` plugin's
verification (its ``dkim`` finding: ``pass_domains``) recorded theirs in
``transaction.results``. The DMARC record is looked up at ``_dmarc.FROM-DOMAIN``, then at
the organisational domain (the Public Suffix List, package ``publicsuffixlist``), through
the ``[dns]`` resolvers. Tags used: ``p``, ``sp``, ``pct``, ``adkim``, ``aspf`` (§6.3).
Aggregate and failure reports (``rua``/``ruf``) are not sent.
Finding: ``dmarc`` = ``pass``, ``fail``, ``none`` (no record), ``temperror`` or
``permerror`` (no single From domain, a malformed record), with the policy, the
disposition and the header From domain.
"""

from __future__ import annotations

import logging
import random
from email.utils import getaddresses
from typing import Any

import dns.exception
import dns.resolver
from publicsuffixlist import PublicSuffixList

from ..dns import shared_resolver
from ..envelope import SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..reply import Reply
from . import Option, OptionError, PluginRegistry, one_of

log = logging.getLogger("smtpgate.plugins.dmarc")

PRIORITY = -30
_ACTIONS = ("reject", "quarantine", "tag")
OPTIONS: dict[str, Option] = {
    "on_reject": Option(str, default="reject",
                        check=lambda v: None if v in _ACTIONS else "reject|quarantine|tag",
                        help="what a failing message whose domain says p=reject gets"),
    "on_quarantine": Option(str, default="tag",
                            check=lambda v: None if v in _ACTIONS else
                            "reject|quarantine|tag",
                            help="what a failing message whose domain says p=quarantine "
                                 "gets (quarantine needs quarantine_path)"),
    "quarantine_path": Option(str, default="", help="Maildir for quarantined messages"),
    "mode": Option(str, default="enforce",
                   check=one_of("enforce", "warn"),
                   help="warn: record and log what would be done, refuse nothing"),
    "spf_result": Option(str, default="spf", help="the finding of the SPF plugin"),
    "dkim_result": Option(str, default="dkim", help="the finding of the DKIM plugin"),
}

REJECTED = Reply(550, "5.7.1", "Message rejected by the DMARC policy of {domain}")
_PSL: PublicSuffixList | None = None


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the registrable domain (one label below the public suffix); the
    domain itself when it is a public suffix or unknown."""
    global _PSL
    if _PSL is None:
        _PSL = PublicSuffixList()
    return _PSL.privatesuffix(domain) or domain


def a_label(domain: str) -> str:
    """The domain in A-label (ASCII) form, as SPF records it (RFC 8616 §4); lower case."""
    domain = domain.lower().rstrip(".")
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def aligned(a: str, b: str, strict: bool) -> bool:
    """RFC 7489 §3.1: identical domains (strict), or the same organisational domain;
    compared in A-label form."""
    a, b = a_label(a), a_label(b)
    if strict or not a or not b:
        return a == b and bool(a)
    return organizational_domain(a) == organizational_domain(b)


def parse_record(text: str) -> dict[str, str] | None:
    """The tags of a DMARC record (``v=DMARC1`` first), ``None`` when it is not one."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            tags.setdefault(key.strip().lower(), value.strip())
    if tags.get("v") != "DMARC1" or not text.strip().startswith("v"):
        return None
    return tags


def header_from_domain(tx: Transaction) -> str | None:
    """The single From domain (RFC 7489 §6.6.1), ``None`` when there is not exactly one.

    The addresses are parsed with :func:`email.utils.getaddresses` (a domain with hyphens
    or several labels is kept whole)."""
    values = [v for _, v in tx.get_headers("From")]
    if len(values) != 1:
        return None
    domains = {addr.rpartition("@")[2].strip().lower().rstrip(".")
               for _, addr in getaddresses(values) if "@" in addr}
    if len(domains) != 1:
        return None
    domain = a_label(domains.pop())
    return domain or None


def register(registry: PluginRegistry, options: dict[str, Any]) -> None:
    """Register the data hook.

    Raises:
        OptionError: an action ``quarantine`` without ``quarantine_path``.
    """
    resolver = shared_resolver(registry.config.dns)
    name = registry.name
    registry.decides_relay = False
    quarantine_path: str = options["quarantine_path"]
    if "quarantine" in (options["on_reject"], options["on_quarantine"]) and not \
            quarantine_path:
        raise OptionError("quarantine_path", "needed when an action is quarantine")
    warn = options["mode"] == "warn"
    spf_name: str = options["spf_result"]
    dkim_name: str = options["dkim_result"]

    async def lookup(domain: str) -> tuple[str, dict[str, str] | None]:
        """("found"|"none"|"temperror"|"permerror", tags)."""
        try:
            answer = await resolver.resolve(f"_dmarc.{domain}", "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return "none", None
        except (dns.exception.Timeout, dns.resolver.NoNameservers):
            return "temperror", None
        except dns.exception.DNSException:
            return "permerror", None
        records = [parse_record(b"".join(r.strings).decode("utf-8", "replace"))
                   for r in answer]
        found = [r for r in records if r is not None]
        if len(found) != 1:  # §6.6.3: none, or several: no policy
            return "none", None
        return "found", found[0]

    async def data(session: SessionInfo, tx: Transaction) -> HookResult | None:
        domain = header_from_domain(tx)
        if domain is None:
            tx.results.add(name, "permerror", reason="not exactly one From domain")
            return None
        org = organizational_domain(domain)
        state, tags = await lookup(domain)
        policy_domain = domain
        if state == "none" and org != domain:
            state, tags = await lookup(org)
            policy_domain = org
        if state != "found" or tags is None:
            tx.results.add(name, state, header_from=domain)
            return None
        spf = tx.results.get(spf_name)
        dkim = tx.results.get(dkim_name)
        spf_ok = bool(spf and spf.result == "pass" and aligned(
            str(spf.details.get("domain") or ""), domain, tags.get("aspf") == "s"))
        passed = dkim.details.get("pass_domains") if dkim else None
        dkim_domains = list(passed) if isinstance(passed, list | tuple) else []
        dkim_ok = any(aligned(d, domain, tags.get("adkim") == "s") for d in dkim_domains)
        policy = tags.get("p", "none").lower()
        if policy_domain != domain and "sp" in tags:  # §6.3: sp for subdomains
            policy = tags["sp"].lower()
        if policy not in ("none", "quarantine", "reject"):
            policy = "none"
        result = "pass" if spf_ok or dkim_ok else "fail"
        disposition = "none"
        if result == "fail" and policy != "none":
            try:
                pct = max(0, min(100, int(tags.get("pct", "100"))))
            except ValueError:
                pct = 100
            if random.randrange(100) < pct:
                disposition = policy
            else:  # §6.6.4: not sampled: the next less strict policy
                disposition = "quarantine" if policy == "reject" else "none"
        action = {"reject": options["on_reject"], "quarantine": options["on_quarantine"]
                  }.get(disposition, "tag")
        tx.results.add(name, result, header_from=domain, policy=policy,
                       disposition=disposition, action=action if disposition != "none"
                       else "none", spf_aligned=spf_ok, dkim_aligned=dkim_ok)
        if disposition == "none" or action == "tag":
            return None
        log.info("transaction %s: DMARC %s for %s (p=%s): %s%s", tx.id, result, domain,
                 policy, action, " (warn only)" if warn else "")
        if warn:
            return None
        if action == "reject":
            reply = Reply(550, "5.7.1", REJECTED.text.format(domain=domain))
            return HookResult(Verdict.DENY, reply, reason="dmarc")
        return HookResult(Verdict.QUARANTINE, Reply(250, "2.0.0", "Message accepted"),
                          reason="dmarc", quarantine=quarantine_path)

    registry.on("data", data)
