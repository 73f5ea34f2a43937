"""Direct delivery to a domain's mail exchangers, found in the DNS.

Entry points: :func:`resolve_destinations` -> :class:`Destination` list,
:class:`MxDelivery` (per-recipient results, one destination domain per call). RFC 5321 §5.1
(MX order, implicit MX, address literals §4.1.3), RFC 7505 (null MX), RFC 3207, RFC 3463.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdtypes.mxbase
import dns.resolver

from ..envelope import Envelope, SessionInfo
from ..errors import ConfigError, DeliveryError, PermanentDeliveryError, TemporaryDeliveryError
from ..message import Message
from ..reply import Reply
from .outbound import (
    NETWORK_ERRORS,
    AuthFailed,
    Connector,
    RecipientResults,
    TlsPolicyError,
    close_connection,
    connection_failure,
    deliver_per_recipient,
    describe_error,
)

__all__ = [
    "Destination",
    "MxDelivery",
    "resolve_destinations",
]

log = logging.getLogger("smtpgate.delivery.mx")

AddressPreference = Literal["ipv6", "ipv4"]

_HELO_NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:[]")


@dataclass(frozen=True, slots=True)
class Destination:
    """One host to try for a domain, in the order to try it.

    Attributes:
        host: the MX target (lower case, A-labels, no trailing dot), the domain
            itself for an implicit MX, or the IP address of an address literal.
        preference: the MX preference (0 for implicit MX and address literals).
        addresses: the host's IP addresses as text, in the order to connect
            (by default IPv6 first, then IPv4, each family in DNS order).
    """

    host: str
    preference: int
    addresses: tuple[str, ...]


def _system_resolver() -> dns.asyncresolver.Resolver:
    from ..dns import shared_resolver

    return shared_resolver()


def _address_literal(domain: str) -> str | None:
    """The IP address of an RFC 5321 §4.1.3 address literal, ``None`` for a domain name.

    Raises:
        PermanentDeliveryError: 550 5.1.2 for a malformed or unsupported literal.
    """
    if not domain.startswith("["):
        return None
    bad = PermanentDeliveryError(
        Reply(550, "5.1.2", f"Bad destination address literal {domain[:100]}")
    )
    if not domain.endswith("]"):
        raise bad
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return str(ipaddress.IPv6Address(inner[5:]))
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        raise bad from None


def _temp(domain: str, what: str) -> TemporaryDeliveryError:
    return TemporaryDeliveryError(
        Reply(451, "4.4.3", f"DNS lookup for {domain} failed: {what}; will retry")
    )


async def _lookup(
    resolver: dns.asyncresolver.Resolver, name: dns.name.Name, rdtype: str
) -> tuple[list[str], bool]:
    """Addresses of ``name`` (type A or AAAA): ``(addresses, temporary_failure)``."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return [], False
    except dns.exception.DNSException as exc:
        log.info("DNS %s lookup for %s failed: %s", rdtype, name, type(exc).__name__)
        return [], True
    return [rdata.to_text() for rdata in answer], False


async def _host_addresses(
    resolver: dns.asyncresolver.Resolver, host: dns.name.Name, preference: AddressPreference
) -> tuple[tuple[str, ...], bool]:
    (v6, temp6), (v4, temp4) = await asyncio.gather(
        _lookup(resolver, host, "AAAA"), _lookup(resolver, host, "A")
    )
    ordered = v6 + v4 if preference == "ipv6" else v4 + v6
    return tuple(dict.fromkeys(ordered)), temp6 or temp4


async def resolve_destinations(
    domain: str,
    resolver: dns.asyncresolver.Resolver | None = None,
    *,
    address_preference: AddressPreference = "ipv6",
    rng: random.Random | None = None,
) -> list[Destination]:
    """Find the hosts to deliver mail for ``domain`` to, in the order to try them.

    RFC 5321 §5.1: MX records sorted by preference, ascending, hosts of equal
    preference in random order; no MX record (NODATA) means an implicit MX: the
    domain itself at preference 0. Each host's A and AAAA records are looked up;
    hosts without addresses are left out. An address literal (``[192.0.2.1]``,
    ``[IPv6:2001:db8::1]``, RFC 5321 §4.1.3) bypasses the DNS. A single MX
    whose target is the root (``.``) is a null MX (RFC 7505 §3; any preference
    is accepted); ``.`` targets among other MX records are ignored.

    Args:
        domain: the destination domain (U-labels are IDNA-encoded), or an
            address literal in brackets.
        resolver: the resolver to use; ``None`` uses the system configuration.
        address_preference: ``"ipv6"`` (RFC 6724 default policy) or ``"ipv4"``
            first among each host's addresses.
        rng: random source for shuffling equal preferences (tests pass a seeded one).

    Returns:
        A non-empty list of :class:`Destination`.

    Raises:
        PermanentDeliveryError: 550 5.1.2 the domain does not exist (NXDOMAIN)
            or is not a valid domain name, or it has neither MX nor address
            records; 556 5.1.10 null MX (RFC 7505 §4.2); 550 5.4.4 none of its
            MX hosts has an address (RFC 5321 §5.1: "MUST be reported as an error").
        TemporaryDeliveryError: 451 4.4.3 a DNS timeout, SERVFAIL or other
            resolver failure decided the outcome (RFC 3463 X.4.3).
    """
    literal = _address_literal(domain)
    if literal is not None:
        return [Destination(literal, 0, (literal,))]
    shown = domain[:255]
    try:
        name = dns.name.from_text(domain.rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError, ValueError):
        raise PermanentDeliveryError(
            Reply(550, "5.1.2", f"Bad destination domain {shown!r}")
        ) from None
    if len(name.labels) < 2:  # the root alone
        raise PermanentDeliveryError(Reply(550, "5.1.2", f"Bad destination domain {shown!r}"))
    resolver = resolver or _system_resolver()
    rng = rng or random.SystemRandom()

    implicit = False
    exchanges: list[tuple[int, dns.name.Name]] = []
    try:
        answer = await resolver.resolve(name, "MX", search=False)
    except dns.resolver.NXDOMAIN:
        raise PermanentDeliveryError(
            Reply(550, "5.1.2", f"Domain {shown} does not exist (DNS NXDOMAIN)")
        ) from None
    except dns.resolver.NoAnswer:
        implicit = True
    except dns.resolver.NoNameservers:
        raise _temp(shown, "no name server answered (SERVFAIL or REFUSED)") from None
    except dns.exception.Timeout:
        raise _temp(shown, "timed out") from None
    except dns.exception.DNSException as exc:
        raise _temp(shown, type(exc).__name__) from None
    else:
        for rdata in answer:
            if isinstance(rdata, dns.rdtypes.mxbase.MXBase):
                exchanges.append((int(rdata.preference), rdata.exchange))
        if not exchanges:
            implicit = True
        elif all(target == dns.name.root for _, target in exchanges):
            raise PermanentDeliveryError(
                Reply(556, "5.1.10", f"Domain {shown} does not accept mail (null MX, RFC 7505)")
            )

    if implicit:
        exchanges = [(0, name)]
    else:
        exchanges = [(p, t) for p, t in exchanges if t != dns.name.root]
        rng.shuffle(exchanges)
        exchanges.sort(key=lambda item: item[0])  # stable: shuffled within a preference
        seen: set[dns.name.Name] = set()
        unique: list[tuple[int, dns.name.Name]] = []
        for pref, target in exchanges:  # a host listed twice keeps its best preference
            if target not in seen:
                seen.add(target)
                unique.append((pref, target))
        exchanges = unique

    looked_up = await asyncio.gather(
        *(_host_addresses(resolver, target, address_preference) for _, target in exchanges)
    )
    destinations: list[Destination] = []
    temporary = False
    for (pref, target), (addresses, temp) in zip(exchanges, looked_up, strict=True):
        temporary = temporary or temp
        if addresses:
            host = target.to_text(omit_final_dot=True).lower()
            destinations.append(Destination(host, pref, addresses))
    if destinations:
        return destinations
    if temporary:
        raise _temp(shown, "address lookup of its mail hosts failed")
    if implicit:
        raise PermanentDeliveryError(
            Reply(550, "5.1.2", f"Domain {shown} has no MX and no address records")
        )
    raise PermanentDeliveryError(
        Reply(550, "5.4.4", f"None of the MX hosts of {shown} has an address")
    )


class MxDelivery:
    """Deliver to the mail exchangers of one destination domain per call (no relay).

    For each call, the domain's MX hosts are resolved (:func:`resolve_destinations`)
    and tried in order, each host's addresses in order: the next address (or
    host) is tried when the connection is refused or times out, the greeting or
    EHLO is not 2xx (4xx or 5xx, like Postfix ``smtp_skip_[45]xx_greeting``),
    TLS fails twice (opportunistic STARTTLS, RFC 3207, falls back to plaintext
    once), or the server says 421 or drops the connection before it answers
    MAIL. The first host that answers MAIL decides the transaction: its replies
    are returned per recipient, as :meth:`UpstreamDelivery.deliver_recipients
    <smtpgate.delivery.upstream.UpstreamDelivery.deliver_recipients>` does.
    When no host answers, every recipient gets the last ``451 4.4.1``.

    Each call opens its own connections and closes them (QUIT) at the end; no
    connection is kept. Concurrency per destination is the caller's business:
    the queue must cap parallel calls per domain (and per MX host), as Postfix
    does with ``default_destination_concurrency_limit``; this class has no
    per-destination state and any number of calls may run at once.

    Args:
        helo_name: our EHLO name; should be our FQDN with matching reverse DNS.
        port: the SMTP port to connect to (RFC 5321 §4.5.4.2: 25).
        ports: per-host port overrides, keyed by :attr:`Destination.host` (MX target
            name, or IP of an address literal); for tests and special routing.
        resolver: the DNS resolver (:func:`smtpgate.dns.shared_resolver` for ``[dns]``);
            ``None`` = the system's.
        timeout: connect and per-command timeout, seconds (RFC 5321 §4.5.3.2
            suggests minutes; 300 by default).
        tls: ``"may"`` (opportunistic STARTTLS, certificates not verified) or ``"none"``.
        max_attempts: most connection attempts (addresses) per call.
        local_hosts: our own host names and addresses: an MX naming one of them
            and every MX of equal or lower preference are dropped (RFC 5321 §5.1);
            nothing left gives ``554 5.4.6`` (mail loops back to us).
        address_preference: ``"ipv6"`` or ``"ipv4"`` first.
        rng: random source for equal-preference MX order.

    Raises:
        ConfigError: invalid ``helo_name``, ``port``, ``tls`` or ``max_attempts``.
    """

    def __init__(
        self,
        *,
        helo_name: str = "localhost",
        port: int = 25,
        ports: Mapping[str, int] | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
        timeout: float = 300.0,
        tls: Literal["may", "none"] = "may",
        max_attempts: int = 5,
        local_hosts: Collection[str] = (),
        address_preference: AddressPreference = "ipv6",
        rng: random.Random | None = None,
    ) -> None:
        if not helo_name or len(helo_name) > 255 or not set(helo_name) <= _HELO_NAME_OK:
            raise ConfigError(f"helo_name {helo_name[:80]!r}: not a valid host name")
        bad_ports = [p for p in (port, *(ports or {}).values()) if not 0 < p < 65536]
        if bad_ports:
            raise ConfigError(f"MX delivery port {bad_ports[0]}: must be 1..65535")
        if tls not in ("may", "none"):
            raise ConfigError(f"MX delivery tls {tls!r}: must be 'may' or 'none'")
        if max_attempts < 1:
            raise ConfigError("MX delivery max_attempts must be at least 1")
        self.port = port
        self.ports = {k.lower().rstrip("."): v for k, v in (ports or {}).items()}
        self.resolver = resolver
        self.timeout = timeout
        self.tls: Literal["may", "none"] = tls
        self.max_attempts = max_attempts
        self.local_hosts = frozenset(h.lower().rstrip(".") for h in local_hosts)
        self.address_preference: AddressPreference = address_preference
        self.rng = rng
        self._connector = Connector(helo_name=helo_name, timeout=timeout)

    def __repr__(self) -> str:
        return f"MxDelivery(port={self.port!r}, tls={self.tls!r})"

    @property
    def connections_opened(self) -> int:
        """TCP connections opened so far (metrics and tests)."""
        return self._connector.connections_opened

    def _drop_local(self, domain: str, dests: list[Destination]) -> list[Destination]:
        """RFC 5321 §5.1: discard our own MX and every MX not more preferred than it."""
        if not self.local_hosts:
            return dests
        for dest in dests:
            if dest.host in self.local_hosts or self.local_hosts.intersection(dest.addresses):
                kept = [d for d in dests if d.preference < dest.preference]
                if not kept:
                    raise PermanentDeliveryError(
                        Reply(554, "5.4.6", f"Mail for {domain} loops back to myself")
                    )
                return kept
        return dests

    @staticmethod
    def _domain_of(envelope: Envelope) -> str:
        domains = {r.domain for r in envelope.rcpt_to}
        if len(domains) != 1 or "" in domains:
            raise ValueError(
                "MxDelivery needs recipients of one domain (or pass domain=...): "
                + ", ".join(sorted(domains))[:200]
            )
        return domains.pop()

    async def deliver_recipients(
        self,
        envelope: Envelope,
        message: Message,
        session: SessionInfo | None = None,
        *,
        domain: str | None = None,
    ) -> RecipientResults:
        """Deliver one message to every recipient of ``envelope`` via ``domain``'s MX hosts.

        Args:
            envelope: reverse-path, MAIL parameters and recipients (all routed
                through ``domain``; parameters passed on as in the relay path).
            message: the complete message: CRLF line endings, not dot-stuffed,
                trace header already prepended; bytes, or a
                :class:`~smtpgate.message.MessageFile` sent from its file in pieces.
            session: the SMTP session, for logging.
            domain: the destination domain or address literal; default: the one
                domain all recipients share.

        Returns:
            :class:`RecipientResults` with a reply for every recipient:
            the answering host's replies (``remote_mta`` = its MX name), or a
            local reply for all of them: the DNS failure (``451 4.4.3``, also for
            a missing system resolver configuration,
            ``550 5.1.2``, ``556 5.1.10``, ``550 5.4.4``, ``554 5.4.6``) or the
            last connection failure (``451 4.4.1``).

        Raises:
            ValueError: ``domain`` omitted and the recipients' domains differ.
        """
        target = (domain or self._domain_of(envelope)).lower()
        sid = session.session_id if session else "-"
        results = RecipientResults()
        if not envelope.rcpt_to:
            return results
        try:
            dests = await resolve_destinations(
                target,
                self.resolver,
                address_preference=self.address_preference,
                rng=self.rng,
            )
            dests = self._drop_local(target, dests)
        except DeliveryError as exc:
            log.info("session=%s mx %s: %s", sid, target, exc.reply)
            results.fill(envelope, exc.reply)
            return results
        except ConfigError as exc:  # no usable system resolver configuration
            log.error("mx %s: %s", target, exc)
            results.fill(envelope, Reply(451, "4.4.3", "No DNS resolver available; will retry"))
            return results

        last = Reply(451, "4.4.1", f"No mail host for {target} could be reached")
        attempts = 0
        for dest in dests:
            port = self.ports.get(dest.host, self.port)
            literal = dest.host in dest.addresses
            for address in dest.addresses:
                if attempts >= self.max_attempts:
                    break
                attempts += 1
                shown = f"[{address}]" if ":" in address else address
                label = f"{dest.host}[{address}]:{port}" if not literal else f"{shown}:{port}"
                try:
                    conn = await self._connector.open(
                        address,
                        port,
                        tls=self.tls,
                        verify=False,
                        server_hostname=None if literal else dest.host,
                        label=label,
                    )
                except TlsPolicyError as exc:
                    last = exc.reply()
                    log.error("session=%s mx %s: %s", sid, target, last.text)
                    continue
                except (*NETWORK_ERRORS, AuthFailed) as exc:
                    last = connection_failure(label, describe_error(exc))
                    log.info("session=%s mx %s: %s", sid, target, last.text)
                    continue
                try:
                    results = await deliver_per_recipient(
                        conn,
                        envelope,
                        message,
                        remote_mta=dest.host,
                        rset_timeout=min(self.timeout, 10.0),
                    )
                except TemporaryDeliveryError as exc:
                    last = exc.reply
                    log.info("session=%s mx %s: %s", sid, target, last.text)
                    continue
                finally:
                    await close_connection(conn, polite=conn.clean, timeout=min(self.timeout, 5.0))
                log.info(
                    "session=%s mx %s via %s: from=%r size=%d: %s",
                    sid,
                    target,
                    label,
                    envelope.mail_from,
                    len(message),
                    ", ".join(f"<{a}> {r.code} {r.enhanced}" for a, r in results.items()),
                )
                return results
        results.fill(envelope, last)
        log.info("session=%s mx %s: no host answered: %s", sid, target, last)
        return results

    async def aclose(self) -> None:
        """Nothing is pooled; present so the queue can treat deliveries alike."""
