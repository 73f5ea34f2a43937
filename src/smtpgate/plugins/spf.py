"""Shipped plugin ``spf``: Sender Policy Framework checks (RFC 7208) with pyspf.

Entry point: :func:`register` (``[[plugin]] use = "spf"``). Checks the HELO identity
(RFC 7208 §2.3) and the MAIL FROM identity (§2.4; for the null reverse-path ``<>`` the
MAIL FROM identity is ``postmaster@HELO``, so the HELO check stands for it), records the
results in ``transaction.results`` (``spf`` for the identity DMARC uses, ``spf_helo`` for
the HELO identity), applies a configurable action per result (RFC 7372 codes:
``550 5.7.23`` for a fail, ``451 4.7.24`` for a temperror by default) and prepends a
``Received-SPF`` header (§9.1) at the ``data`` stage.

pyspf evaluates the record in a worker thread (:func:`asyncio.to_thread`); its DNS
lookups (``spf.DNSLookup``) go through a synchronous dnspython resolver built from
``[dns]`` (:func:`smtpgate.dns.sync_resolver`, sharing the cache of the other
lookups) and never through ``/etc/resolv.conf`` when nameservers are configured. The
replacement is installed once (:func:`install_lookup`) and only affects threads
running :func:`check_spf`; other users of pyspf in the process keep its own lookup.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.name
import dns.resolver
import spf

from ..dns import sync_resolver
from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, reject, tempfail
from ..results import Detail
from . import Option, OptionError, PluginRegistry, positive

__all__ = [
    "ACTIONS", "RESULTS", "SpfOutcome", "check_spf", "install_lookup", "received_spf",
    "register", "reply_for",
]

log = logging.getLogger("smtpgate.plugins.spf")

PRIORITY = -40

RESULTS: tuple[str, ...] = (
    "pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
"""The RFC 7208 §2.6 results, in the words recorded in ``transaction.results``."""

ACTIONS: tuple[str, ...] = ("reject", "tempfail", "tag")
"""What a result may do: refuse (5xx), refuse temporarily (4xx), or only record and tag."""

_DEFAULT_ACTIONS = {"fail": "reject", "temperror": "tempfail"}


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}, " \
                                              f"got {value!r}"
    return check


OPTIONS: dict[str, Option] = {
    "mode": Option(str, default="enforce", check=_one_of("enforce", "warn"),
                   help="enforce: apply the actions; warn: record and log only"),
    "stage": Option(str, default="mail", check=_one_of("mail", "rcpt"),
                    help="when the MAIL FROM identity is checked: at MAIL or at the "
                         "first RCPT"),
    "helo_stage": Option(str, default="mail", check=_one_of("helo", "mail"),
                         help="when the HELO identity is checked: at HELO/EHLO or with "
                              "the MAIL FROM check"),
    "check_helo": Option(bool, default=True,
                         help="check the HELO identity of every transaction (the null "
                              "sender's is always checked)"),
    "header": Option(bool, default=True, help="prepend Received-SPF at the data stage"),
    "max_time": Option(float, default=20.0, check=positive,
                       help="seconds for all DNS lookups of one check (RFC 7208 §4.6.4)"),
    **{result: Option(str, default=_DEFAULT_ACTIONS.get(result, "tag"),
                      check=_one_of(*ACTIONS),
                      help=f"action for an SPF {result}: reject | tempfail | tag")
       for result in RESULTS},
}

# ---------------------------------------------------------------------------------------
# DNS for pyspf


_local = threading.local()
_original_lookup: Callable[..., Any] | None = None
_install_lock = threading.Lock()


def lookup(resolver: dns.resolver.Resolver, name: str, qtype: str,
           timeout: float | None = None) -> list[tuple[tuple[str, str], Any]]:
    """One DNS query in pyspf's ``DNSLookup`` format: ``[((name, qtype), value), ...]``.

    Values: A/AAAA the address text, MX ``(preference, exchange)``, PTR the target
    name, TXT/SPF the tuple of character strings (bytes). CNAMEs are followed by the
    resolver. NXDOMAIN, no data or an invalid name give ``[]``.

    Args:
        resolver: the synchronous resolver.
        name: the domain name (absolute; no search list is applied).
        qtype: ``A``, ``AAAA``, ``MX``, ``PTR``, ``TXT`` or ``SPF``.
        timeout: pyspf's remaining time in seconds; the query's lifetime is the smaller
            of it and the resolver's.

    Raises:
        spf.TempError: timeout, SERVFAIL or any other DNS failure (RFC 7208 §5: the
            check gives temperror).
    """
    lifetime = resolver.lifetime
    if timeout is not None and 0 < timeout < lifetime:
        lifetime = timeout
    try:
        qname = dns.name.from_text(name)
        answer = resolver.resolve(qname, qtype, raise_on_no_answer=False,
                                  lifetime=lifetime, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.name.LabelTooLong, dns.name.EmptyLabel, dns.name.NameTooLong,
            dns.name.IDNAException, UnicodeError):
        return []  # not a name that can be looked up: nothing there
    except dns.exception.Timeout as exc:
        raise spf.TempError(f"DNS timeout: {name} {qtype}: {exc}") from None
    except dns.resolver.NoNameservers:
        raise spf.TempError(f"DNS error: {name} {qtype}: no server answered "
                            "(SERVFAIL or refused)") from None
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS error: {name} {qtype}: {type(exc).__name__}") from None
    if answer.rrset is None:
        return []
    out: list[tuple[tuple[str, str], Any]] = []
    key = (name, qtype)
    for rdata in answer.rrset:
        if qtype in ("A", "AAAA"):
            out.append((key, rdata.address))
        elif qtype == "MX":
            out.append((key, (rdata.preference, rdata.exchange.to_text(True))))
        elif qtype == "PTR":
            out.append((key, rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append((key, tuple(rdata.strings)))
    return out


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: float | None = None,
              *args: Any, **kwargs: Any) -> Any:
    """``spf.DNSLookup`` while this plugin is loaded: the configured resolver in threads
    running :func:`check_spf`, pyspf's own lookup elsewhere."""
    resolver: dns.resolver.Resolver | None = getattr(_local, "resolver", None)
    if resolver is None:
        assert _original_lookup is not None
        return _original_lookup(name, qtype, strict, timeout, *args, **kwargs)
    return lookup(resolver, name, qtype, timeout)


def install_lookup() -> None:
    """Replace ``spf.DNSLookup`` by the dispatcher (idempotent)."""
    global _original_lookup
    with _install_lock:
        if _original_lookup is None:
            _original_lookup = spf.DNSLookup
            spf.DNSLookup = _dispatch


@contextmanager
def _using(resolver: dns.resolver.Resolver) -> Iterator[None]:
    install_lookup()
    _local.resolver = resolver
    try:
        yield
    finally:
        _local.resolver = None


# ---------------------------------------------------------------------------------------
# The check


class _Query(spf.query):  # type: ignore[misc]  # pyspf has no type information
    """pyspf's query, with RFC 7208 §5.5's rule for the ``ptr`` mechanism and the ``%{p}``
    macro: a DNS error in the forward lookup of one PTR name skips that name ("the search
    continues") instead of making the whole check a temperror, as pyspf does with a
    real resolver (e.g. a SERVFAIL for a CNAME loop)."""

    def validated_ptrs(self) -> list[str]:
        if self.strict > 1:
            return list(super().validated_ptrs())
        limit = spf.MAX_PTR if self.strict else spf.MAX_PTR * 4
        names: list[str] = []
        for name in self.dns_ptr(self.i)[:limit]:
            try:
                addresses = self.dns_a(name, self.A)
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                names.append(name)
        return names


@dataclass(slots=True)
class SpfOutcome:
    """The result of one SPF check of one identity.

    Attributes:
        result: one of :data:`RESULTS`.
        identity: ``"mailfrom"`` or ``"helo"``.
        domain: the domain whose record was evaluated (the sender's domain, or the HELO
            name).
        client_ip: the client's address.
        helo: the HELO/EHLO name.
        sender: the envelope sender checked (``postmaster@HELO`` for the helo identity).
        explanation: for a fail, the explanation: the record's ``exp=`` text when it has
            one (RFC 7208 §6.2), else pyspf's default; empty otherwise.
        from_record: whether ``explanation`` came from the domain's ``exp=``.
        mechanism: the mechanism that matched (``"-all"``, ``"ip4:192.0.2.0/24"``...).
        problem: for permerror/temperror, what went wrong.
        comment: the Received-SPF comment text (without the receiver).
    """

    result: str
    identity: str
    domain: str
    client_ip: str
    helo: str
    sender: str
    explanation: str = ""
    from_record: bool = False
    mechanism: str = ""
    problem: str = ""
    comment: str = ""
    extra: dict[str, Detail] = field(default_factory=dict)

    def details(self) -> dict[str, Detail]:
        """The details recorded in ``transaction.results`` (for DMARC and the logs)."""
        out: dict[str, Detail] = {"identity": self.identity, "domain": self.domain,
                                  "client_ip": self.client_ip}
        if self.result == "fail" and self.explanation:
            out["explanation"] = self.explanation
        if self.problem:
            out["problem"] = self.problem
        if self.mechanism:
            out["mechanism"] = self.mechanism
        out.update(self.extra)
        return out


_LEGACY = {"unknown": "permerror", "error": "temperror"}
_DEFAULT_EXPLANATION = spf.EXPLANATIONS.get("fail", "")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_FQDN = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)+"
                   r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?\Z")


def _clean(text: str, limit: int = 300) -> str:
    """One printable ASCII line (explanations are attacker-controlled DNS text)."""
    return _UNPRINTABLE.sub(" ", text).strip()[:limit]


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def _one_line(text: str) -> str:
    """``text`` without control characters (an SMTPUTF8 address keeps its UTF-8)."""
    return _CONTROL.sub(" ", text).strip()


def _a_label(domain: str) -> str:
    """``domain`` in ASCII (IDNA A-labels, RFC 5890); ``""`` when it cannot be one."""
    domain = domain.rstrip(".")
    if domain.isascii():
        return domain
    try:
        return dns.name.from_unicode(domain).to_text(omit_final_dot=True)
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return ""


def check_spf(resolver: dns.resolver.Resolver, client_ip: str, sender: str, helo: str,
              *, max_time: float = 20.0) -> SpfOutcome:
    """Evaluate SPF for one identity (blocking: run it in a thread).

    Args:
        resolver: the synchronous resolver all of pyspf's lookups go through.
        client_ip: the SMTP client's address (IPv4 or IPv6; IPv4-mapped IPv6 is
            checked as IPv4, as pyspf does).
        sender: the MAIL FROM address; ``""`` checks the HELO identity (RFC 7208 §2.3,
            ``postmaster@HELO``), as for the null reverse-path (§2.4).
        helo: the HELO/EHLO name.
        max_time: seconds allowed for all DNS lookups of the check (RFC 7208 §4.6.4);
            past it the result is temperror.

    Returns:
        The :class:`SpfOutcome`. A HELO name that is not a fully qualified domain name
        (an address literal, a single label) gives ``none`` without any lookup
        (RFC 7208 §2.3, §4.3); so does a sender domain that is not one.
    """
    identity = "mailfrom" if sender else "helo"
    ascii_helo = _a_label(helo) or helo
    local, at, sender_domain = sender.rpartition("@")
    domain = _a_label(sender_domain) if sender and at else ascii_helo
    if sender and at and domain:
        sender = f"{local}@{domain}"  # RFC 8616 §4: SPF works on A-labels
    checked = sender or (f"postmaster@{helo}" if helo else "")

    def outcome_of(result: str) -> SpfOutcome:
        return SpfOutcome(result, identity, domain.lower().rstrip("."), client_ip, helo,
                          checked)

    if not domain or not _FQDN.match(domain) or domain.startswith("["):
        outcome = outcome_of("none")
        outcome.comment = (f"{client_ip} is neither permitted nor denied: no valid "
                           f"domain to check")
        return outcome
    with _using(resolver):
        try:
            query = _Query(i=client_ip, s=sender, h=ascii_helo, strict=True,
                           querytime=max_time)
            result, _code, text = query.check()
        except spf.TempError as exc:  # pragma: no cover - pyspf catches these itself
            outcome = outcome_of("temperror")
            outcome.problem = _clean(str(exc))
            return outcome
    result = _LEGACY.get(result, result)
    if result not in RESULTS:  # "ambiguous" only exists with strict=2
        result = "permerror"
    outcome = outcome_of(result)
    outcome.mechanism = _clean(str(getattr(query, "mechanism", "") or ""))
    if result == "fail":
        outcome.explanation = _clean(text)
        outcome.from_record = bool(text) and text != _DEFAULT_EXPLANATION
    elif result in ("permerror", "temperror"):
        outcome.problem = _clean(text)
    try:
        if result == "permerror" and not hasattr(query, "prob"):
            query.prob = outcome.problem
        outcome.comment = _clean(query.get_header_comment(result), 500)
    except Exception:  # noqa: BLE001 - the comment is cosmetic
        outcome.comment = f"SPF {result} for {domain}"
    return outcome


def reply_for(outcome: SpfOutcome, action: str) -> HookResult | None:
    """The refusal ``action`` gives for ``outcome`` (RFC 7372 enhanced codes).

    ``reject``: ``550 5.7.23`` (``5.7.24`` for permerror/temperror), ``tempfail``:
    ``451 4.7.24`` for temperror/permerror, ``451 4.7.23`` otherwise; ``tag``: ``None``.
    A fail's reply carries the explanation (the record's ``exp=`` text when it has one).
    """
    if action == "tag":
        return None
    error = outcome.result in ("temperror", "permerror")
    who = f"{outcome.identity} {outcome.sender or outcome.helo}"
    if outcome.result == "fail":
        if outcome.from_record:
            text = f"SPF fail: {outcome.explanation}"
        else:
            text = (f"SPF fail: {outcome.domain} does not designate {outcome.client_ip} "
                    f"as permitted sender")
    elif outcome.result == "temperror":
        text = f"SPF temporary error checking {outcome.domain}, try again later"
    elif outcome.result == "permerror":
        text = f"SPF permanent error in the record of {outcome.domain}: {outcome.problem}"
    else:
        text = f"SPF {outcome.result} for {who} from {outcome.client_ip}"
    text = _clean(text, 450)  # an SMTPUTF8 sender's address must not reach a reply raw
    if action == "reject":
        return reject(text, code=550, enhanced="5.7.24" if error else "5.7.23")
    return tempfail(text, code=451, enhanced="4.7.24" if error else "4.7.23")


def received_spf(outcome: SpfOutcome, receiver: str) -> str:
    """The value of a ``Received-SPF`` header field for ``outcome`` (RFC 7208 §9.1):
    ``result (receiver: comment) client-ip=...; envelope-from=...; helo=...;
    [problem=...;] receiver=...; [mechanism=...;] identity=...``."""
    parts = [f"{outcome.result} ({_clean(receiver)}: {outcome.comment})",
             f"client-ip={outcome.client_ip};"]
    if outcome.sender:
        parts.append(f"envelope-from={spf.quote_value(_one_line(outcome.sender))};")
    if outcome.helo:
        parts.append(f"helo={spf.quote_value(_one_line(outcome.helo))};")
    if outcome.problem:
        parts.append(f"problem={spf.quote_value(outcome.problem)};")
    parts.append(f"receiver={spf.quote_value(_clean(receiver))};")
    if outcome.mechanism:
        parts.append(f"mechanism={spf.quote_value(outcome.mechanism)};")
    parts.append(f"identity={outcome.identity}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------
# The plugin

_HELO_NOTE = "spf.helo"       # session.notes: (helo name, SpfOutcome) of a helo-stage check
_TX_NOTE = "spf.outcomes"     # transaction.notes: list of SpfOutcome, in check order
_VERDICT_NOTE = "spf.verdict"  # transaction.notes: the check's answer (HookResult or None)


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the SPF hooks (``helo`` and/or ``mail``/``rcpt``, and ``data``).

    Raises:
        OptionError: ``pass`` given another action than ``tag`` (the other options are
            checked by :data:`OPTIONS`).
        ConfigError: the ``[dns]`` nameservers cannot be used.
    """
    mode, stage, helo_stage = options["mode"], options["stage"], options["helo_stage"]
    check_helo, header, max_time = (options["check_helo"], options["header"],
                                    options["max_time"])
    assert isinstance(mode, str) and isinstance(stage, str) and isinstance(helo_stage, str)
    assert isinstance(check_helo, bool) and isinstance(header, bool)
    assert isinstance(max_time, float)
    actions: dict[str, str] = {}
    for result in RESULTS:
        value = options[result]
        assert isinstance(value, str)
        actions[result] = value
    if actions["pass"] != "tag":
        raise OptionError("pass", "a pass cannot be refused: use tag")
    warn = mode == "warn"
    name = registry.name
    resolver = sync_resolver(registry.config.dns)
    install_lookup()
    networks = registry.config.relay.networks
    registry.decides_relay = False
    timeout = registry.timeout if registry.timeout is not None else 2 * max_time + 5.0

    def exempt(session: SessionInfo) -> str | None:
        if session.auth_user:
            return "authenticated"
        try:
            ip = ipaddress.ip_address(session.peer_ip)
        except ValueError:
            return "no-client-ip"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in net for net in networks):
            return "local-network"
        return None

    async def run(session: SessionInfo, sender: str, helo: str) -> SpfOutcome:
        try:
            return await asyncio.to_thread(check_spf, resolver, session.peer_ip, sender,
                                           helo, max_time=max_time)
        except Exception as exc:  # noqa: BLE001 - pyspf bugs must not crash the session
            log.warning("spf check failed: client=%s sender=<%s> helo=%s: %s: %s",
                        session.peer_ip, sender, helo, type(exc).__name__, exc)
            return SpfOutcome("temperror", "mailfrom" if sender else "helo",
                              (sender.rpartition("@")[2] if sender else helo),
                              session.peer_ip, helo, sender or f"postmaster@{helo}",
                              problem=f"internal error: {type(exc).__name__}")

    def enforce(session: SessionInfo, outcome: SpfOutcome, where: str) -> HookResult | None:
        action = actions[outcome.result]
        refusal = reply_for(outcome, action)
        if refusal is None:
            return None
        verdict = refusal.reply
        what = f"{verdict.code} {verdict.enhanced}" if verdict is not None else action
        if warn:
            log.warning("spf warn: would refuse (%s) at %s: client=%s identity=%s "
                        "domain=%s result=%s", what, where, session.peer_ip,
                        outcome.identity, outcome.domain, outcome.result)
            outcome.extra["warn"] = f"would {action}"
            return None
        log.info("spf %s: refused (%s) at %s: client=%s identity=%s domain=%s",
                 outcome.result, what, where, session.peer_ip, outcome.identity,
                 outcome.domain)
        return refusal

    def record(transaction: Transaction, outcome: SpfOutcome, key: str) -> None:
        transaction.results.add(key, outcome.result, **outcome.details())
        outcomes: list[SpfOutcome] = transaction.notes.setdefault(_TX_NOTE, [])
        outcomes.append(outcome)

    async def helo_hook(session: SessionInfo, helo_name: str) -> HookResult | None:
        session.notes.pop(_HELO_NOTE, None)
        if exempt(session):
            return None
        outcome = await run(session, "", helo_name)
        refusal = enforce(session, outcome, "helo")
        if refusal is None:
            session.notes[_HELO_NOTE] = (helo_name, outcome)
        return refusal

    async def check(session: SessionInfo, transaction: Transaction, where: str) -> (
            HookResult | None):
        if _VERDICT_NOTE in transaction.notes:
            # rcpt stage: checked at the first recipient; the same answer for the others
            verdict: HookResult | None = transaction.notes[_VERDICT_NOTE]
            return verdict
        verdict = await evaluate(session, transaction, where)
        transaction.notes[_VERDICT_NOTE] = verdict
        return verdict

    async def evaluate(session: SessionInfo, transaction: Transaction, where: str) -> (
            HookResult | None):
        reason = exempt(session)
        if reason is not None:
            transaction.results.add(name, "skipped", reason=reason)
            transaction.notes[_TX_NOTE] = []
            return None
        sender = transaction.mail_from
        helo = session.helo_name or ""
        helo_outcome: SpfOutcome | None = None
        if check_helo or not sender:
            noted = session.notes.get(_HELO_NOTE)
            if helo_stage == "helo" and noted is not None and noted[0] == helo:
                helo_outcome = dataclasses.replace(noted[1], extra=dict(noted[1].extra))
            else:
                helo_outcome = await run(session, "", helo)
                refusal = enforce(session, helo_outcome, where)
                if refusal is not None:
                    record(transaction, helo_outcome, name if not sender else f"{name}_helo")
                    if sender:  # RFC 7208 §2.3: conclusive on HELO, MAIL FROM not needed
                        transaction.results.add(name, helo_outcome.result,
                                                **helo_outcome.details())
                    return refusal
        if not sender:
            assert helo_outcome is not None
            record(transaction, helo_outcome, name)
            return None
        if helo_outcome is not None:
            record(transaction, helo_outcome, f"{name}_helo")
        outcome = await run(session, sender, helo)
        refusal = enforce(session, outcome, where)
        record(transaction, outcome, name)
        return refusal

    async def mail(session: SessionInfo, transaction: Transaction) -> HookResult | None:
        return await check(session, transaction, "mail")

    async def rcpt(session: SessionInfo, transaction: Transaction,
                   recipient: Recipient) -> (
            HookResult | None):
        return await check(session, transaction, "rcpt")

    def data(session: SessionInfo, transaction: Transaction) -> None:
        outcomes: list[SpfOutcome] = transaction.notes.get(_TX_NOTE) or []
        # RFC 7208 §9.1: one field per identity checked, prepended (trace fields).
        for outcome in outcomes:
            try:
                transaction.add_header("Received-SPF",
                                       received_spf(outcome, session.hostname), prepend=True)
            except ValueError as exc:  # an unfoldable value: keep the message, log it
                log.warning("spf: Received-SPF not added id=%s: %s", transaction.id, exc)

    if helo_stage == "helo":
        registry.on("helo", helo_hook, timeout=timeout)
    registry.on(stage, mail if stage == "mail" else rcpt, timeout=timeout)
    if header:
        registry.on("data", data)
