"""Shipped plugin ``dnsbl``: DNS blocklists of client addresses (DNSBL) and of domain
names (RHSBL), with weights, return codes, a score threshold and ZMailer's early or late
rejection (smtpserver's ``_rbl0`` / ``_rbl1``).

Entry points: :func:`register` (``[[plugin]] use = "dnsbl"``), :func:`parse_zone` (one
entry of ``zones``), :func:`ip_query_name` and :func:`domain_query_name` (the names
looked up, RFC 5782 §2.1, §2.3, §2.4 with IPv6 nibbles), :class:`Zone` (what a zone
lists and which answers count), :func:`assess` (hits to a score and a result word).

Each zone is asked for the client address (``lookup = "ip"``, the default), the sender's
domain (``"sender"``) and/or the HELO name (``"helo"``); an ``A`` answer that matches the
zone's ``codes`` (addresses, ranges, CIDRs) or ``mask`` (bitmask, SURBL-style) adds the
zone's ``weight`` to the score; at ``threshold`` the client is refused with ``554 5.7.1``
and, when the zone publishes one, its ``TXT`` record as the reason. ``reject_at =
"connect"`` refuses at the greeting (the session then only allows QUIT, RFC 5321 §3.1),
``"rcpt"`` at each RCPT but the exempt recipients (postmaster, abuse: RFC 5321 §4.5.1,
RFC 2142). A temporary DNS failure never refuses: it is recorded (``temperror``) and the
session goes on. ``mode = "warn"`` logs and records what would be refused and refuses
nothing. Every lookup goes through :func:`smtpgate.dns.shared_resolver` (``[dns]``),
all of one check at once (``asyncio.gather``). docs/policy.md is the guide.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from ..dns import shared_resolver
from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, reject
from ..results import Detail, Results
from . import Option, OptionError, PluginRegistry

log = logging.getLogger("smtpgate.plugins.dnsbl")

__all__ = [
    "LOOKUPS",
    "OPTIONS",
    "Assessment",
    "Hit",
    "Zone",
    "assess",
    "domain_query_name",
    "ip_query_name",
    "parse_zone",
    "register",
]

PRIORITY = -60
"""After relay control (-90), HELO rules (-80) and the address check (-70): a recipient
relay control refuses costs no lookup; before greylisting and the content checks."""

LOOKUPS = ("ip", "sender", "helo")
"""What a zone may be asked about: the client address, the MAIL FROM domain, the HELO name."""

_DEFAULT_CODES = (ipaddress.IPv4Network("127.0.0.0/8"),)
# 127.255.255.0/24 are the error codes of Spamhaus and others ("query refused",
# "open resolver"): never a listing unless a zone's codes name them.
_ERROR_CODES = ipaddress.IPv4Network("127.255.255.0/24")
_ZONE_KEYS = ("zone", "weight", "codes", "mask", "lookup")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_TXT_MAX = 200


@dataclass(frozen=True, slots=True)
class Zone:
    """One blocklist zone of the ``zones`` option.

    Attributes:
        name: the zone, lower case, no trailing dot (``"zen.spamhaus.org"``).
        weight: added to the score when the zone lists the subject (may be negative:
            an allowlist zone lowers the score).
        codes: the answers (127.0.0.0/8 addresses) that count as a listing; empty with
            :attr:`mask` set: only the mask decides.
        mask: a bitmask: an answer counts when ``int(answer) & mask`` is not 0
            (multi.surbl.org-style zones); ``None``: no mask.
        lookup: what the zone is asked about: any of :data:`LOOKUPS`.
        default_codes: True when the zone gave neither ``codes`` nor ``mask``: any
            127.0.0.0/8 answer but the 127.255.255.0/24 error codes counts.
    """

    name: str
    weight: float = 1.0
    codes: tuple[ipaddress.IPv4Network, ...] = _DEFAULT_CODES
    mask: int | None = None
    lookup: tuple[str, ...] = ("ip",)
    default_codes: bool = field(default=True, compare=False)

    def counts(self, answer: ipaddress.IPv4Address) -> bool:
        """True when the ``A`` answer ``answer`` is a listing by this zone's rules.

        Without explicit ``codes``/``mask``, any 127.0.0.0/8 answer counts except the
        127.255.255.0/24 error codes (RFC 5782 §2.1 lists in 127.0.0.0/8).
        """
        if self.default_codes:
            return answer in _DEFAULT_CODES[0] and answer not in _ERROR_CODES
        if any(answer in net for net in self.codes):
            return True
        return self.mask is not None and answer in _DEFAULT_CODES[0] and bool(
            int(answer) & self.mask)


def _parse_code(text: str) -> list[ipaddress.IPv4Network]:
    """``127.0.0.2``, ``127.0.0.0/24``, ``127.0.0.2-127.0.0.11`` or ``127.0.0.2-11``.

    Raises:
        ValueError: anything else, or outside 127.0.0.0/8.
    """
    if "-" in text:
        first_text, _, last_text = text.partition("-")
        first = ipaddress.IPv4Address(first_text.strip())
        last_text = last_text.strip()
        if last_text.isdigit():
            last = ipaddress.IPv4Address(int(first) & ~0xFF | int(last_text))
            if int(last_text) > 255:
                raise ValueError(text)
        else:
            last = ipaddress.IPv4Address(last_text)
        if last < first:
            raise ValueError(text)
        nets = list(ipaddress.summarize_address_range(first, last))
    else:
        nets = [ipaddress.IPv4Network(text.strip(), strict=False)]
    if not all(n.subnet_of(_DEFAULT_CODES[0]) for n in nets):
        raise ValueError(text)
    return nets


def _zone_name(text: str) -> str:
    name = text.strip().lower().rstrip(".")
    labels = name.split(".")
    if len(name) > 200 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        raise ValueError(name)
    return name


def parse_zone(item: object, key: str = "zones[0]") -> Zone:
    """One entry of ``zones``: a zone name, or a table ``{zone, weight, codes, mask,
    lookup}`` (see docs/policy.md).

    Args:
        item: the TOML value.
        key: the option path used in errors (``"zones[2]"``).

    Returns:
        The :class:`Zone`.

    Raises:
        OptionError: a bad zone name, an unknown key, a weight that is not a number,
            a code outside 127.0.0.0/8, a mask outside 1..2**32-1, an unknown lookup.
    """
    if isinstance(item, str):
        item = {"zone": item}
    if not isinstance(item, Mapping):
        raise OptionError(key, f"must be a zone name or a table, got {item!r}")
    for k in item:
        if k not in _ZONE_KEYS:
            raise OptionError(f"{key}.{k}", f"unknown key (known: {', '.join(_ZONE_KEYS)})")
    raw = item.get("zone")
    if not isinstance(raw, str):
        raise OptionError(f"{key}.zone", "required: the zone's domain name")
    try:
        name = _zone_name(raw)
    except ValueError:
        raise OptionError(f"{key}.zone", f"must be a domain name, got {raw!r}") from None
    weight = item.get("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool):
        raise OptionError(f"{key}.weight", f"must be a number, got {weight!r}")
    codes_raw = item.get("codes")
    codes: list[ipaddress.IPv4Network] = []
    if codes_raw is not None:
        if isinstance(codes_raw, str):
            codes_raw = [codes_raw]
        if not isinstance(codes_raw, list) or not codes_raw:
            raise OptionError(f"{key}.codes", f"must be a list of addresses, got {codes_raw!r}")
        for i, code in enumerate(codes_raw):
            try:
                if not isinstance(code, str):
                    raise ValueError(code)
                parsed = _parse_code(code)
            except ValueError:
                raise OptionError(
                    f"{key}.codes[{i}]", "must be a 127.0.0.0/8 address, range "
                    f"(127.0.0.2-127.0.0.11 or 127.0.0.2-11) or CIDR, got {code!r}") from None
            codes.extend(parsed)
    mask = item.get("mask")
    if mask is not None and (not isinstance(mask, int) or isinstance(mask, bool)
                             or not 0 < mask < 2**32):
        raise OptionError(f"{key}.mask", f"must be an integer 1..4294967295, got {mask!r}")
    lookup_raw = item.get("lookup", "ip")
    lookup_list = [lookup_raw] if isinstance(lookup_raw, str) else lookup_raw
    if (not isinstance(lookup_list, list) or not lookup_list
            or not all(isinstance(x, str) and x in LOOKUPS for x in lookup_list)):
        raise OptionError(f"{key}.lookup",
                          f"must be one or more of {', '.join(LOOKUPS)}, got {lookup_raw!r}")
    lookup = tuple(x for x in LOOKUPS if x in lookup_list)
    explicit = codes_raw is not None or mask is not None
    return Zone(name, float(weight), tuple(codes) if explicit else _DEFAULT_CODES,
                mask, lookup, default_codes=not explicit)


def ip_query_name(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
                  zone: str) -> str:
    """The DNSBL name of a client address (RFC 5782 §2.1, §2.4).

    IPv4: the octets reversed (``192.0.2.99`` → ``99.2.0.192.ZONE``); IPv6: the 32
    nibbles reversed, dot-separated (``2001:db8::1`` → ``1.0.0.0.…8.b.d.0.1.0.0.2.ZONE``);
    an IPv4-mapped IPv6 address (``::ffff:192.0.2.99``, a dual-stack listener) is
    looked up as the IPv4 address.

    Raises:
        ValueError: ``address`` is not an IP address.
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        prefix = ".".join(reversed(str(ip).split(".")))
    else:
        prefix = ".".join(reversed(ip.exploded.replace(":", "")))
    return f"{prefix}.{zone}"


def domain_query_name(domain: str, zone: str) -> str | None:
    """The RHSBL name of ``domain`` (RFC 5782 §2.3): ``DOMAIN.ZONE``, lower case; an
    internationalised name in its A-label form. ``None`` when there is nothing to look
    up: an empty domain, an address literal (``[192.0.2.1]``), a name that is not a
    valid host name or would make the query name longer than 253 characters."""
    domain = domain.strip().rstrip(".").lower()
    if not domain or domain.startswith("["):
        return None
    try:
        domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    labels = domain.split(".")
    if not all(_LABEL.match(x) for x in labels):
        return None
    qname = f"{domain}.{zone}"
    return qname if len(qname) <= 253 else None


@dataclass(frozen=True, slots=True)
class Hit:
    """The answer of one zone about one subject.

    Attributes:
        zone: the zone asked.
        kind: ``"ip"``, ``"sender"`` or ``"helo"``.
        subject: the client address or the domain.
        qname: the name looked up.
        status: ``"listed"`` (an answer counts), ``"clean"`` (NXDOMAIN, no ``A`` record,
            or only answers that do not count), ``"temperror"`` (timeout, SERVFAIL...).
        answers: the ``A`` answers that count (``"127.0.0.2"``).
    """

    zone: Zone
    kind: str
    subject: str
    qname: str
    status: str
    answers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Assessment:
    """What the hits add up to.

    Attributes:
        result: ``"listed"`` (score at or over the threshold), ``"temperror"`` (under it
            and a lookup failed), ``"clean"``.
        score: the sum of the weights of the zones that list a subject (each zone once).
        hits: the listings, the heaviest first.
        errors: the lookups that failed.
    """

    result: str
    score: float
    hits: tuple[Hit, ...]
    errors: tuple[Hit, ...]

    def codes(self) -> list[str]:
        """The counted answers as ``zone=answer``, each once."""
        return list(dict.fromkeys(f"{h.zone.name}={a}" for h in self.hits for a in h.answers))

    def details(self, threshold: float) -> dict[str, Detail]:
        """The finding's details: ``score``, ``threshold``, ``zones`` (listing zones),
        ``codes`` (``zone=answer``), ``temperror`` (zones that failed)."""
        out: dict[str, Detail] = {"score": self.score, "threshold": threshold}
        if self.hits:
            out["zones"] = list(dict.fromkeys(h.zone.name for h in self.hits))
            out["codes"] = self.codes()
        if self.errors:
            out["temperror"] = list(dict.fromkeys(h.zone.name for h in self.errors))
        return out


def assess(hits: Iterable[Hit], threshold: float) -> Assessment:
    """Add the weights of the listing zones (each zone once, however many subjects it
    lists) and compare with ``threshold``."""
    listed = [h for h in hits if h.status == "listed"]
    errors = [h for h in hits if h.status == "temperror"]
    weights = {h.zone.name: h.zone.weight for h in listed}
    score = round(sum(weights.values()), 6)
    listed.sort(key=lambda h: -h.zone.weight)
    if listed and score >= threshold:
        result = "listed"
    elif errors:
        result = "temperror"
    else:
        result = "clean"
    return Assessment(result, score, tuple(listed), tuple(errors))


async def _lookup_a(resolver: dns.asyncresolver.Resolver, qname: str,
                    limit: float) -> tuple[str, list[ipaddress.IPv4Address]]:
    """``("clean"|"found"|"temperror", addresses)`` for ``qname``'s ``A`` records."""
    try:
        async with asyncio.timeout(limit):
            answer = await resolver.resolve(qname, "A", search=False,
                                            raise_on_no_answer=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return "clean", []
    except (dns.exception.DNSException, TimeoutError, OSError) as exc:
        log.info("dnsbl lookup %s failed: %s", qname, type(exc).__name__)
        return "temperror", []
    if answer.rrset is None:
        return "clean", []
    out = []
    for rdata in answer.rrset:
        try:
            out.append(ipaddress.IPv4Address(rdata.to_text()))
        except ValueError:
            continue
    return "found", out


async def _lookup_txt(resolver: dns.asyncresolver.Resolver, qname: str,
                      limit: float) -> str:
    """The zone's reason for a listing (the ``TXT`` strings joined), printable ASCII
    only, at most 200 characters; ``""`` when there is none or the lookup fails."""
    try:
        async with asyncio.timeout(limit):
            answer = await resolver.resolve(qname, "TXT", search=False,
                                            raise_on_no_answer=False)
    except (dns.exception.DNSException, TimeoutError, OSError):
        return ""
    if answer.rrset is None:
        return ""
    for rdata in answer.rrset:
        strings = getattr(rdata, "strings", ())
        text = b"".join(strings).decode("utf-8", "replace")
        text = " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())
        if text:
            return text[:_TXT_MAX]
    return ""


@dataclass(slots=True)
class _Memo:
    """One session's answers (``session.notes``): each name is asked once a session."""

    hits: dict[tuple[str, str], Hit] = field(default_factory=dict)   # (zone, qname)
    txt: dict[str, str] = field(default_factory=dict)                 # qname -> reason


def _networks(values: Sequence[str], key: str) -> tuple[
        ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for i, value in enumerate(values):
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise OptionError(f"{key}[{i}]", f"must be an address or CIDR, got {value!r}"
                              ) from None
    return tuple(out)


def _check_zones(value: list[object]) -> str | None:
    return None if value else "must name at least one zone"


OPTIONS: dict[str, Option] = {
    "zones": Option(list, check=_check_zones,
                    help="zones: names, or tables {zone, weight, codes, mask, lookup}"),
    "threshold": Option(float, default=1.0,
                        check=lambda v: None if v > 0 else f"must be > 0, got {v!r}",
                        help="score at which the client is refused"),
    "reject_at": Option(str, default="rcpt",
                        check=lambda v: None if v in ("connect", "rcpt") else
                        f"must be \"connect\" or \"rcpt\", got {v!r}",
                        help="refuse at the greeting (connect) or at each RCPT (rcpt)"),
    "mode": Option(str, default="enforce",
                   check=lambda v: None if v in ("enforce", "warn") else
                   f"must be \"enforce\" or \"warn\", got {v!r}",
                   help="warn: record and log what would be refused, refuse nothing"),
    "exempt_networks": Option(list, default=[], items=str,
                              help="clients never looked up (besides [relay] local_networks)"),
    "exempt_recipients": Option(list, default=["postmaster", "abuse"], items=str,
                                help="local parts (any domain) or addresses let through "
                                     "under reject_at = \"rcpt\""),
    "reject_code": Option(int, default=554,
                          check=lambda v: None if 500 <= v <= 599 else
                          f"must be a 5xx reply code, got {v!r}",
                          help="reply code of a refusal (with 5.7.1)"),
}

_SUBJECTS = {"ip": "Client host [{}]", "sender": "Sender domain {}", "helo": "Helo name {}"}


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Check ``options``, register the ``connect`` hook (``reject_at = "connect"``) and
    the ``rcpt`` hook.

    Raises:
        OptionError: a bad zone (see :func:`parse_zone`), a bad exempt network, an
            exempt recipient that is empty.
    """
    zones_opt = options["zones"]
    assert isinstance(zones_opt, list)
    zones = [parse_zone(item, f"zones[{i}]") for i, item in enumerate(zones_opt)]
    seen: set[str] = set()
    for i, zone in enumerate(zones):
        if zone.name in seen:
            raise OptionError(f"zones[{i}]", f"{zone.name} is listed twice")
        seen.add(zone.name)
    threshold = options["threshold"]
    reject_at, mode, code = options["reject_at"], options["mode"], options["reject_code"]
    assert isinstance(threshold, float) and isinstance(reject_at, str)
    assert isinstance(mode, str) and isinstance(code, int)
    exempt_opt, rcpts_opt = options["exempt_networks"], options["exempt_recipients"]
    assert isinstance(exempt_opt, list) and isinstance(rcpts_opt, list)
    exempt_nets = _networks(exempt_opt, "exempt_networks") + registry.config.relay.networks
    exempt_rcpts: set[str] = set()
    for i, r in enumerate(rcpts_opt):
        r = r.strip().lower().strip("<>")
        if not r or r.startswith("@") or r.endswith("@"):
            raise OptionError(f"exempt_recipients[{i}]",
                              f"must be a local part or an address, got {rcpts_opt[i]!r}")
        exempt_rcpts.add(r)
    dns_cfg = registry.config.dns
    resolver = shared_resolver(dns_cfg)
    limit = dns_cfg.lifetime + 1.0
    name = registry.name
    memo_key = f"smtpgate.dnsbl:{name}"
    warn = mode == "warn"
    ip_zones = [z for z in zones if "ip" in z.lookup]
    early = reject_at == "connect"

    def exempt_client(session: SessionInfo) -> str | None:
        try:
            ip = ipaddress.ip_address(session.peer_ip)
        except ValueError:
            return None
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return "network" if any(ip in net for net in exempt_nets) else None

    def memo(session: SessionInfo) -> _Memo:
        found = session.notes.get(memo_key)
        if not isinstance(found, _Memo):
            found = session.notes[memo_key] = _Memo()
        return found

    async def ask(session: SessionInfo, checks: list[tuple[Zone, str, str, str]]) -> list[Hit]:
        """Every check at once; answers are kept for the session (one query each)."""
        known = memo(session).hits
        todo = list({(c[0].name, c[3]): c for c in checks
                     if (c[0].name, c[3]) not in known}.values())

        async def one(zone: Zone, kind: str, subject: str, qname: str) -> Hit:
            status, addresses = await _lookup_a(resolver, qname, limit)
            counted = tuple(str(a) for a in addresses if zone.counts(a))
            if status == "found":
                status = "listed" if counted else "clean"
            return Hit(zone, kind, subject, qname, status, counted)

        for hit in await asyncio.gather(*(one(*c) for c in todo)):
            known[(hit.zone.name, hit.qname)] = hit
        return [known[(c[0].name, c[3])] for c in checks]

    def ip_checks(session: SessionInfo) -> list[tuple[Zone, str, str, str]]:
        try:
            ip = ipaddress.ip_address(session.peer_ip)
        except ValueError:
            return []
        return [(z, "ip", str(ip), ip_query_name(ip, z.name)) for z in ip_zones]

    def domain_checks(kind: str, domain: str) -> list[tuple[Zone, str, str, str]]:
        out = []
        for z in zones:
            if kind in z.lookup:
                qname = domain_query_name(domain, z.name)
                if qname is not None:  # the subject in its checked A-label form
                    out.append((z, kind, qname[: -len(z.name) - 1], qname))
        return out

    async def refusal(session: SessionInfo, verdict: Assessment, stage: str) -> (
            HookResult | None):
        top = verdict.hits[0]
        reasons = memo(session).txt
        txt = reasons.get(top.qname)
        if txt is None:
            txt = reasons[top.qname] = await _lookup_txt(resolver, top.qname, limit)
        text = (f"Service unavailable; {_SUBJECTS[top.kind].format(top.subject)} "
                f"blocked using {top.zone.name}" + (f"; {txt}" if txt else ""))
        codes = ",".join(verdict.codes())
        if warn:
            log.warning("dnsbl %s: would refuse session=%s client=%s at %s: score %g >= %g "
                        "(%s): %s", name, session.session_id, session.peer_ip, stage,
                        verdict.score, threshold, codes, text)
            return None
        log.info("dnsbl %s: refused session=%s client=%s at %s: score %g >= %g (%s)",
                 name, session.session_id, session.peer_ip, stage, verdict.score,
                 threshold, codes)
        return reject(text, code=code, enhanced="5.7.1")

    def record(results: Results, verdict: Assessment) -> None:
        details = verdict.details(threshold)
        if warn:
            details["mode"] = "warn"
        results.add(name, verdict.result, **details)

    async def connect(session: SessionInfo) -> HookResult | None:
        why = exempt_client(session)
        if why is not None:
            session.results.add(name, "exempt", reason=why)
            return None
        verdict = assess(await ask(session, ip_checks(session)), threshold)
        record(session.results, verdict)
        if verdict.result == "listed":
            return await refusal(session, verdict, "connect")
        return None

    async def rcpt(session: SessionInfo, transaction: Transaction,
                   recipient: Recipient) -> HookResult | None:
        state = transaction.notes.get(memo_key)
        if state is None:
            why = "authenticated" if session.auth_user else exempt_client(session)
            if why is not None:
                transaction.results.add(name, "exempt", reason=why)
                state = transaction.notes[memo_key] = False
            else:
                checks = ip_checks(session)
                sender = transaction.mail_from
                if sender and "@" in sender:
                    checks += domain_checks("sender", sender.rpartition("@")[2])
                if session.helo_name:
                    checks += domain_checks("helo", session.helo_name)
                hits = await ask(session, checks)
                if ip_zones and not early:
                    record(session.results, assess([h for h in hits if h.kind == "ip"],
                                                   threshold))
                state = assess(hits, threshold)
                record(transaction.results, state)
                transaction.notes[memo_key] = state
        if not isinstance(state, Assessment) or state.result != "listed":
            return None
        address = recipient.address.lower()
        local = address.rpartition("@")[0] if "@" in address else address
        if address in exempt_rcpts or local in exempt_rcpts:
            return None
        return await refusal(session, state, "rcpt")

    registry.decides_relay = False
    timeout = registry.timeout
    if timeout is None:
        timeout = max(registry.config.hooks.timeout, 2 * limit + 5.0)
    if early:
        registry.on("connect", connect, timeout=timeout)
    registry.on("rcpt", rcpt, timeout=timeout)
