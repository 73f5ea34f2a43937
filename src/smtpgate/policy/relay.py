"""Relay control: which recipients a client may send to (no open relay).

Entry point: :class:`RelayPolicy` — relay domains, local networks and the
authenticated-user rule, with nssmtpd's run-time ``relay``/``local`` API.
RFCs: 5321 §3.6 (relaying), §4.1.3 (address literals), §4.5.1 (postmaster), 5891 (IDNA).
"""

from __future__ import annotations

import ipaddress
import logging
import re
import unicodedata
from collections.abc import Iterable

from ..net import parse_client_ip

__all__ = ["RelayPolicy", "normalize_domain"]

logger = logging.getLogger("smtpgate.policy.relay")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Label separators IDNA treats as '.' (RFC 3490 §3.1): ideographic, full-width, half-width.
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
# An entry's A-label: letters, digits, '-', '_' (seen in real-world names), 1..63 octets.
_LABEL_RE = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
# Sender-specified routing in a local part (Postfix allow_untrusted_routing).
_ROUTING_CHARS = frozenset("%!@")


def _a_label(label: str) -> str:
    """One label → lower-case, NFC, Punycode A-label if non-ASCII (RFC 5891 §4)."""
    label = unicodedata.normalize("NFC", label.lower())
    if label.isascii():
        return label
    try:
        return "xn--" + label.encode("punycode").decode("ascii")
    except UnicodeError:  # pragma: no cover - punycode encodes any code point
        return label


def _parse_literal(text: str) -> str | None:
    """``[192.0.2.1]`` / ``[IPv6:2001:db8::1]`` → canonical form; None if invalid."""
    inner = text[1:-1].strip()
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        return None


def normalize_domain(domain: str) -> str:
    """Canonical comparison form of a domain or address literal (never raises).

    Lower-cases, drops one trailing root dot, maps IDNA dot variants to ``.``,
    and turns non-ASCII labels into Punycode A-labels after NFC normalisation.
    IDNA2003 nameprep mapping is deliberately NOT applied, so ``faß.de`` and
    ``fass.de`` stay distinct (IDNA2008, RFC 5891), and a Unicode domain equals
    its ``xn--`` form. Address literals (RFC 5321 §4.1.3) are canonicalised
    through :mod:`ipaddress` when valid, else lower-cased.

    Args:
        domain: a domain (``"Bücher.Example."``), a domain with a leading dot,
            or an address literal (``"[192.0.2.1]"``).

    Returns:
        The normalised text (``"xn--bcher-kva.example"``).
    """
    text = domain.strip()
    if text.startswith("[") and text.endswith("]"):
        return _parse_literal(text) or text.lower()
    text = text.translate(_DOTS)
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    return ".".join(_a_label(label) for label in text.split("."))


def _domain_entry(entry: str) -> str:
    """Validate and normalise one relay-domain entry; raises ValueError."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"empty relay domain entry: {entry!r}")
    text = entry.strip()
    if text.startswith("[") and text.endswith("]"):
        literal = _parse_literal(text)
        if literal is None:  # general address literals (RFC 5321 §4.1.3) are not supported
            raise ValueError(f"invalid address literal in relay domains: {entry!r}")
        return literal
    if text.startswith("*."):
        raise ValueError(f"wildcards are not supported, use {text[1:]!r}: {entry!r}")
    lead = text.startswith(".")
    norm = normalize_domain(text[1:] if lead else text)
    labels = norm.split(".")
    if len(norm) > 253 or not all(_LABEL_RE.match(label) for label in labels):
        raise ValueError(f"invalid relay domain: {entry!r}")
    return "." + norm if lead else norm


def _network_entry(entry: str) -> IPNetwork:
    """Parse one local-network entry (CIDR or single address); raises ValueError.

    IPv4-mapped IPv6 networks (``::ffff:127.0.0.0/104``) become IPv4 networks,
    since mapped client addresses are checked as IPv4.
    """
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"empty local network entry: {entry!r}")
    text = entry.strip()
    if text.startswith("["):  # Postfix style: [::1]/128 or [::1]
        close = text.find("]")
        if close < 0:
            raise ValueError(f"invalid local network: {entry!r}")
        text = text[1:close] + text[close + 1 :]
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"invalid local network: {entry!r}") from None
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def _net_text(net: IPNetwork) -> str:
    """Entry text: a bare address for a host network, CIDR otherwise."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


class RelayPolicy:
    """Decides whether a recipient may be accepted from a client (RFC 5321 §3.6).

    Mirrors nssmtpd's ``relaydomains``/``localdomains`` settings and their
    run-time ``ns_smtpd relay|local add|check|clear|del|get|set`` API.

    Relay domains (recipient domains accepted from anyone), Postfix-like:
    ``example.com`` matches exactly ``example.com``; ``.example.com`` matches
    its subdomains (``a.example.com``, ``b.a.example.com``) but not
    ``example.com`` itself — list both to accept both. Matching is
    case-insensitive, Unicode and ``xn--`` forms are equal (see
    :func:`normalize_domain`), and address literals (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``) match literally after canonicalisation.

    Local networks (clients that may relay anywhere, Postfix ``mynetworks``):
    CIDRs or single addresses, IPv4 and IPv6; an IPv4-mapped IPv6 client
    (``::ffff:127.0.0.1``) is checked as IPv4.

    Checks run for every RCPT, so lookups use precomputed sets: domains are
    O(labels), networks O(distinct prefix lengths). Tables are rebuilt and
    swapped in on every change.

    Args:
        relay_domains: initial relay-domain entries.
        local_networks: initial local-network entries.
        allow_untrusted_routing: when False (default, as Postfix), a recipient
            whose local part contains ``%``, ``!`` or ``@`` (sender-specified
            routing such as ``user%elsewhere@relay.example``) is NOT accepted
            on the strength of its relay domain, nor as a domain-less local
            recipient; local or authenticated clients may still send it.

    Raises:
        ValueError: on an invalid entry.
    """

    def __init__(
        self,
        relay_domains: Iterable[str] = (),
        local_networks: Iterable[str] = ("127.0.0.0/8", "::1"),
        *,
        allow_untrusted_routing: bool = False,
    ) -> None:
        self.allow_untrusted_routing = allow_untrusted_routing
        self._domains: list[str] = []
        self._exact: frozenset[str] = frozenset()
        self._parents: frozenset[str] = frozenset()
        self._nets: list[IPNetwork] = []
        self._v4: tuple[tuple[int, frozenset[int]], ...] = ()
        self._v6: tuple[tuple[int, frozenset[int]], ...] = ()
        self.relay_set(relay_domains)
        self.local_set(local_networks)

    def __repr__(self) -> str:
        return f"RelayPolicy(relay_domains={self._domains!r}, local_networks={self.local_get()!r})"

    # ----------------------------------------------------------- relay domains

    def _rebuild_domains(self, entries: list[str]) -> None:
        exact = frozenset(e for e in entries if not e.startswith("."))
        parents = frozenset(e[1:] for e in entries if e.startswith("."))
        self._domains, self._exact, self._parents = entries, exact, parents

    def relay_add(self, domain: str) -> None:
        """Add a relay domain (nssmtpd ``relay add``); a duplicate is ignored.

        Args:
            domain: ``"example.com"`` (exact) or ``".example.com"`` (subdomains).

        Raises:
            ValueError: on an empty or invalid entry.
        """
        entry = _domain_entry(domain)
        if entry not in self._domains:
            self._rebuild_domains([*self._domains, entry])

    def relay_delete(self, domain: str) -> bool:
        """Remove a relay domain (nssmtpd ``relay del``).

        Args:
            domain: the entry as added (compared after normalisation).

        Returns:
            True if it was present.
        """
        try:
            entry = _domain_entry(domain)
        except ValueError:
            return False
        if entry not in self._domains:
            return False
        self._rebuild_domains([e for e in self._domains if e != entry])
        return True

    def relay_clear(self) -> None:
        """Remove every relay domain (nssmtpd ``relay clear``)."""
        self._rebuild_domains([])

    def relay_get(self) -> list[str]:
        """The relay-domain entries in normalised form, in insertion order (``relay get``)."""
        return list(self._domains)

    def relay_set(self, domains: Iterable[str]) -> None:
        """Replace all relay domains (nssmtpd ``relay set``); all-or-nothing.

        Args:
            domains: the new entries (a single string is rejected, pass a list).

        Raises:
            ValueError: on any invalid entry (the old table stays in force).
            TypeError: when ``domains`` is a string.
        """
        if isinstance(domains, str):
            raise TypeError("relay_set() takes an iterable of domains, not a string")
        entries: list[str] = []
        for d in domains:
            entry = _domain_entry(d)
            if entry not in entries:
                entries.append(entry)
        self._rebuild_domains(entries)

    def _domain_matches(self, norm: str) -> bool:
        if norm in self._exact:
            return True
        if self._parents and not norm.startswith("["):
            dot = norm.find(".")
            while dot >= 0:
                if norm[dot + 1 :] in self._parents:
                    return True
                dot = norm.find(".", dot + 1)
        return False

    def relay_check(self, address_or_domain: str) -> bool:
        """Is the domain a relay domain? (nssmtpd ``relay check``; never raises).

        Args:
            address_or_domain: ``"user@Example.COM"`` (the part after the last
                ``@`` is used), ``"<user@example.com>"`` or ``"example.com"``.

        Returns:
            True if the domain matches an entry.
        """
        text = address_or_domain.strip()
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1]
        at = text.rfind("@")
        domain = text[at + 1 :] if at >= 0 else text
        if not domain.strip():
            return False
        return self._domain_matches(normalize_domain(domain))

    # ---------------------------------------------------------- local networks

    def _rebuild_networks(self, nets: list[IPNetwork]) -> None:
        def index(version: int) -> tuple[tuple[int, frozenset[int]], ...]:
            by_len: dict[int, set[int]] = {}
            for n in nets:
                if n.version == version:
                    shift = n.max_prefixlen - n.prefixlen
                    by_len.setdefault(shift, set()).add(int(n.network_address) >> shift)
            # Longest prefixes (smallest shift) first: typical host entries hit early.
            return tuple((s, frozenset(v)) for s, v in sorted(by_len.items()))

        self._nets, self._v4, self._v6 = nets, index(4), index(6)

    def local_add(self, net: str) -> None:
        """Add a local network (nssmtpd ``local add``); a duplicate is ignored.

        Args:
            net: ``"192.0.2.0/24"``, ``"2001:db8::/32"``, ``"192.0.2.7"``,
                ``"::1"`` or ``"[::1]/128"``. Host bits are masked off.

        Raises:
            ValueError: on an empty or invalid entry.
        """
        parsed = _network_entry(net)
        if parsed not in self._nets:
            self._rebuild_networks([*self._nets, parsed])

    def local_delete(self, net: str) -> bool:
        """Remove a local network (nssmtpd ``local del``).

        Returns:
            True if it was present (compared after parsing, so ``"::1"`` and
            ``"::1/128"`` are the same entry).
        """
        try:
            parsed = _network_entry(net)
        except ValueError:
            return False
        if parsed not in self._nets:
            return False
        self._rebuild_networks([n for n in self._nets if n != parsed])
        return True

    def local_clear(self) -> None:
        """Remove every local network (nssmtpd ``local clear``)."""
        self._rebuild_networks([])

    def local_get(self) -> list[str]:
        """The local networks, normalised, in insertion order (``local get``)."""
        return [_net_text(n) for n in self._nets]

    def local_set(self, nets: Iterable[str]) -> None:
        """Replace all local networks (nssmtpd ``local set``); all-or-nothing.

        Raises:
            ValueError: on any invalid entry (the old table stays in force).
            TypeError: when ``nets`` is a string.
        """
        if isinstance(nets, str):
            raise TypeError("local_set() takes an iterable of networks, not a string")
        parsed: list[IPNetwork] = []
        for n in nets:
            p = _network_entry(n)
            if p not in parsed:
                parsed.append(p)
        self._rebuild_networks(parsed)

    def local_check(self, ip: str) -> bool:
        """Is the client address in a local network? (nssmtpd ``local check``; never raises).

        Args:
            ip: the client address (``"192.0.2.7"``, ``"::ffff:127.0.0.1"``,
                ``"[::1]"``, ``"fe80::1%eth0"``); anything unparsable is not local.
        """
        addr = parse_client_ip(ip)
        if addr is None:
            return False
        value = int(addr)
        for shift, prefixes in self._v4 if addr.version == 4 else self._v6:
            if value >> shift in prefixes:
                return True
        return False

    # ------------------------------------------------------------------ verdict

    def may_relay(self, client_ip: str, auth_user: str | None, rcpt_address: str) -> bool:
        """May this client send to this recipient? (RFC 5321 §3.6; never raises).

        True when any holds: the recipient's domain is a relay domain (from
        anyone); the recipient has no domain (``postmaster``, RFC 5321 §4.5.1;
        delivered locally); the client is in a local network; the client has
        authenticated (non-empty ``auth_user``). With no relay domains and no
        local networks, unauthenticated clients are denied every recipient
        that has a domain. See ``allow_untrusted_routing`` for ``%``/``!``.

        Args:
            client_ip: the client address as text.
            auth_user: the authenticated identity, ``None`` (or ``""``) if none.
            rcpt_address: the forward-path without angle brackets.

        Returns:
            True to accept the recipient, False to answer ``R.RELAY_DENIED``.
        """
        if auth_user:
            return True
        if self.local_check(client_ip):
            return True
        at = rcpt_address.rfind("@")
        local_part = rcpt_address[:at] if at >= 0 else rcpt_address
        if not self.allow_untrusted_routing and not _ROUTING_CHARS.isdisjoint(local_part):
            return False
        if at < 0:
            return bool(rcpt_address.strip())
        return self.relay_check(rcpt_address[at + 1 :])
