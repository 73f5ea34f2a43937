"""Shipped plugin ``dkim`` (RFC 6376, RFC 8463 Ed25519, RFC 8301): verify every DKIM
signature of incoming mail; sign mail from authenticated users and local networks with the
key of its From domain.

Entry point: :func:`register`. Both run at the ``data`` stage, through dkimpy in a worker
thread, its DNS lookups through the ``[dns]`` resolvers (:func:`smtpgate.dns.sync_resolver`):
verification early (priority -40, before other plugins add headers), signing late
(priority 95, after them, so the signature covers the message as delivered). Findings:
``transaction.results`` ``dkim`` (``pass`` when a signature verified, else ``fail``,
``temperror``, ``permerror`` or ``none``) with one ``domain:selector=result`` entry per
signature and the domains that passed (DMARC reads them), and ``dkim-sign`` when signed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from email.utils import getaddresses
from typing import Any

import dkim
import dns.exception
import dns.resolver

from ..dkimkeys import SigningKey, load_key
from ..dns import sync_resolver
from ..envelope import SessionInfo
from ..errors import ConfigError
from ..hooks import Transaction
from . import Option, OptionError, PluginRegistry

log = logging.getLogger("smtpgate.plugins.dkim")

PRIORITY = -40
OPTIONS: dict[str, Option] = {
    "verify": Option(bool, default=True, help="verify the signatures of incoming mail"),
    "sign_domains": Option(list, default=[], items=str,
                           help="From domains whose mail is signed"),
    "key_dir": Option(str, default="",
                      help="KEY_DIR/DOMAIN/SELECTOR.key (relative to the config file)"),
    "selector": Option(str, default="", help="selector of the signing keys"),
    "canonicalization": Option(str, default="relaxed/relaxed",
                               help="header/body canonicalization for signing"),
}


class _Lookups:
    """A dkimpy ``dnsfunc`` over the ``[dns]`` resolvers that remembers how the last key
    lookup went (dkimpy answers ``False`` alike for a bad signature, a missing key and a
    DNS timeout; RFC 8601 §2.7.1 tells them apart: fail, permerror, temperror)."""

    def __init__(self, resolver: dns.resolver.Resolver | None) -> None:
        self.resolver = resolver
        self.last = "ok"

    def __call__(self, name: bytes, timeout: float = 5) -> bytes | None:
        self.last = "ok"
        if self.resolver is None:
            self.last = "missing"
            return None
        try:
            answer = self.resolver.resolve(name.decode("ascii", "replace"), "TXT",
                                           search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            self.last = "missing"
            return None
        except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
            self.last = "timeout"
            raise dkim.DnsTimeoutError(str(exc)) from None
        for rdata in answer:
            return b"".join(rdata.strings)
        self.last = "missing"
        return None


def _text(value: object) -> str:
    """dkimpy's ``domain``/``selector``: bytes, str or None depending on how far it got."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value if isinstance(value, str) else ""


def _verify(message: bytes, count: int,
            resolver: dns.resolver.Resolver | None) -> list[tuple[str, str, str]]:
    """``(domain, selector, result)`` per signature (blocking; dkimpy). Results as RFC 8601
    §2.7.1 names them: pass, fail (the signature does not match, or expired), temperror
    (the key lookup timed out), permerror (no key, a malformed signature or key)."""
    out: list[tuple[str, str, str]] = []
    lookups = _Lookups(resolver)
    for idx in range(count):
        try:
            d = dkim.DKIM(message, minkey=1024)
        except Exception:  # dkimpy cannot even parse it (bad input is normal input)
            log.info("dkim: message not parseable by dkimpy", exc_info=True)
            return [("", "", "permerror")] * count
        try:
            ok = d.verify(idx=idx, dnsfunc=lookups)
            if ok:
                result = "pass"
            elif lookups.last == "timeout":
                result = "temperror"
            elif lookups.last == "missing":
                result = "permerror"
            else:
                result = "fail"
        except dkim.ValidationError as exc:
            text = str(exc)
            result = "fail" if "body hash mismatch" in text or "expired" in text \
                else "permerror"
        except dkim.DKIMException:
            result = "permerror"
        except Exception:  # a dkimpy bug on odd input must not fail the transaction
            log.info("dkim: verifying signature %d raised", idx, exc_info=True)
            result = "permerror"
        out.append((_text(d.domain).lower(), _text(d.selector), result))
    return out


def _overall(results: list[tuple[str, str, str]]) -> str:
    """RFC 8601 §2.7.1: pass if any signature passed, else the most telling failure."""
    kinds = {r for _, _, r in results}
    for word in ("pass", "fail", "temperror", "permerror"):
        if word in kinds:
            return word
    return "none"


def register(registry: PluginRegistry, options: dict[str, Any]) -> None:
    """Register the verifying and the signing hook (``data`` stage).

    Raises:
        OptionError: ``sign_domains`` without ``key_dir``/``selector``, or a key missing.
    """
    resolver = sync_resolver(registry.config.dns)
    name = registry.name
    registry.decides_relay = False
    sign_domains = [str(d).lower().rstrip(".") for d in options["sign_domains"]]
    keys: dict[str, SigningKey] = {}
    key_dir = registry.path(options["key_dir"])
    if sign_domains:
        if not options["key_dir"] or not options["selector"]:
            raise OptionError("sign_domains", "signing needs key_dir and selector")
        for domain in sign_domains:
            try:
                keys[domain] = load_key(key_dir, domain, options["selector"])
            except ConfigError as exc:
                raise OptionError("key_dir", "; ".join(exc.problems)) from None
    canon = options["canonicalization"].split("/")
    if len(canon) == 1:
        canon.append("simple")
    if len(canon) != 2 or not all(c in ("relaxed", "simple") for c in canon):
        raise OptionError("canonicalization", "must be relaxed|simple[/relaxed|simple]")
    canonicalize = (canon[0].encode(), canon[1].encode())
    local = [ipaddress.ip_network(n, strict=False)
             for n in registry.config.relay.local_networks]

    async def verify(session: SessionInfo, tx: Transaction) -> None:
        count = len(tx.get_headers("DKIM-Signature"))
        if not count:
            tx.results.add(name, "none")
            return
        results = await asyncio.to_thread(_verify, tx.raw, count, resolver)
        overall = _overall(results)
        tx.results.add(
            name, overall,
            signatures=[f"{d}:{s}={r}" for d, s, r in results],
            pass_domains=sorted({d for d, _, r in results if r == "pass"}),
        )
        log.info("transaction %s: dkim=%s %s", tx.id, overall,
                 " ".join(f"d={d} s={s} {r}" for d, s, r in results))

    def may_sign(session: SessionInfo) -> bool:
        if session.auth_user:
            return True
        try:
            ip = ipaddress.ip_address(session.peer_ip)
        except ValueError:
            return False
        return any(ip in net for net in local)

    async def sign(session: SessionInfo, tx: Transaction) -> None:
        if not may_sign(session):
            return
        addresses = getaddresses([v for _, v in tx.get_headers("From")])
        domains = {a.rpartition("@")[2].lower().rstrip(".") for _, a in addresses if "@" in a}
        if len(domains) != 1:
            return  # no From, or several From domains: nobody to sign as
        key = keys.get(domains.pop())
        if key is None:
            return
        try:
            header = await asyncio.to_thread(
                dkim.sign, tx.raw, key.selector.encode(), key.domain.encode(), key.private,
                canonicalize=canonicalize, signature_algorithm=key.algorithm)
        except Exception as exc:  # malformed message: delivered unsigned, and said so
            log.warning("transaction %s: DKIM signing as %s failed: %s", tx.id, key.domain,
                        exc)
            tx.results.add(f"{name}-sign", "error", domain=key.domain, reason=str(exc)[:200])
            return
        field, _, value = header.decode("ascii").partition(":")
        tx.add_header(field, value.strip(" \t").rstrip("\r\n"), prepend=True)
        tx.results.add(f"{name}-sign", "signed", domain=key.domain, selector=key.selector,
                       algorithm=key.algorithm.decode())

    if options["verify"]:
        registry.on("data", verify)
    if keys:
        registry.on("data", sign, priority=95)
