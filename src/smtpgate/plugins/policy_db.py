"""Shipped plugin ``policy-db``: ZMailer's ``smtp-policy`` database as a TOML file: domains,
addresses and networks with ZMailer's attributes, looked up by the most specific key.

Entry point: :func:`register`. The file (``file = "policy.toml"``, relative to the
configuration file; read at start and at every reload, SIGHUP) holds one table per key:

    ["192.0.2.0/24"]              # a network (ZMailer writes [192.0.2.0]/24; both work)
    fulltrustnet = true
    ["example.org"]               # a domain and its subdomains (".example.org": only those)
    relaytarget = true
    ["spammer@example.com"]       # an address
    rejectsource = true

A client address is looked up among the networks (the longest prefix wins); a sender or
recipient among the addresses, then its domain, then each parent domain (the first key
found wins: the most specific). Attributes (ZMailer's names, docs/zmailer.md maps them):

- client: ``fulltrustnet`` (any sender, any recipient: relaying allowed), ``relaycustomer``
  (may relay, like ``[relay] local_networks``), ``trustrecipient`` (any recipient once the
  sender passed), ``rejectnet`` (refused: ``554 5.7.1`` at connect), ``freeze``;
- sender: ``rejectsource`` (``553 5.7.1`` at MAIL), ``senderokwithdns`` (the sender's
  domain must have an MX or an address record: ``553 5.1.8``, or ``450 4.4.3`` when the
  DNS fails), ``freeze``;
- recipient: ``relaytarget`` (we take mail for it), ``acceptifmx`` (we take mail for it
  when its MX points at this host: ``[server] hostname`` or ``local_hosts``),
  ``rejectrecipient`` (``550 5.7.1``), ``freeze``.

``freeze`` keeps the message in ``quarantine_path`` (ZMailer's freezer) with 250. A
recipient this plugin accepts (``fulltrustnet``, ``relaycustomer``, ``trustrecipient``,
``relaytarget``, ``acceptifmx``) gets OK, which ends the rcpt chain before relay control:
this plugin decides relaying, so it runs before it (priority -95).
"""

from __future__ import annotations

import ipaddress
import logging
import tomllib
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.resolver

from ..dns import shared_resolver
from ..envelope import Recipient, SessionInfo
from ..hooks import HookResult, Transaction, Verdict
from ..reply import Reply
from . import Option, OptionError, PluginRegistry, one_of

log = logging.getLogger("smtpgate.plugins.policy_db")

PRIORITY = -95
OPTIONS: dict[str, Option] = {
    "file": Option(str, help="the policy file (TOML; relative to the config file)"),
    "quarantine_path": Option(str, default="", help="Maildir of frozen messages"),
    "local_hosts": Option(list, default=[], items=str,
                          help="more names of this host, for acceptifmx"),
    "mode": Option(str, default="enforce",
                   check=one_of("enforce", "warn"),
                   help="warn: record and log the refusals, refuse (and freeze) nothing"),
}

ATTRIBUTES = frozenset({
    "fulltrustnet", "relaycustomer", "trustrecipient", "rejectnet", "freeze",
    "rejectsource", "senderokwithdns", "relaytarget", "acceptifmx", "rejectrecipient",
})
_NOTE = "policy-db:client"


@dataclass(slots=True)
class PolicyDb:
    """The parsed file: networks (longest prefix first) and names (addresses, domains)."""

    networks: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, dict[str, bool]]] = \
        field(default_factory=list)
    names: dict[str, dict[str, bool]] = field(default_factory=dict)

    def client(self, ip: str) -> dict[str, bool]:
        """The attributes of the most specific network holding ``ip`` (empty: none)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return {}
        for net, attrs in self.networks:
            if addr.version == net.version and addr in net:
                return attrs
        return {}

    def address(self, address: str) -> dict[str, bool]:
        """The attributes of ``address``, else of its domain, else of the nearest parent
        domain listed (``.domain`` keys match subdomains only)."""
        addr = address.strip("<>").lower()
        if addr in self.names:
            return self.names[addr]
        domain = addr.rpartition("@")[2]
        if domain in self.names:
            return self.names[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = ".".join(labels[i:])
            for key in (f".{parent}", parent):
                if key in self.names:
                    return self.names[key]
        return {}


def load_policy(path: str) -> PolicyDb:
    """Read and check the policy file.

    Raises:
        OptionError: the file cannot be read, is not TOML, or has an unknown key form,
            attribute or value.
    """
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise OptionError("file", f"cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise OptionError("file", f"{path}: {exc}") from None
    db = PolicyDb()
    problems: list[str] = []
    for key, attrs in data.items():
        if not isinstance(attrs, dict):
            problems.append(f"{key!r}: must be a table of attributes")
            continue
        bad = [a for a, v in attrs.items() if a not in ATTRIBUTES or not isinstance(v, bool)]
        if bad:
            problems.append(f"{key!r}: unknown attribute or not true/false: {', '.join(bad)}")
            continue
        text = key.strip()
        if text.startswith("["):  # ZMailer's [192.0.2.0]/24
            text = text[1:].replace("]", "", 1)
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            if not text or " " in text:
                problems.append(f"{key!r}: not a network, domain or address")
                continue
            db.names[text.lower().rstrip(".")] = dict(attrs)
            continue
        db.networks.append((net, dict(attrs)))
    if problems:
        raise OptionError("file", f"{path}: " + "; ".join(problems))
    db.networks.sort(key=lambda item: -item[0].prefixlen)
    return db


def register(registry: PluginRegistry, options: dict[str, Any]) -> None:
    """Read the file; register the connect, mail, rcpt and data hooks.

    Raises:
        OptionError: as :func:`load_policy`; ``freeze`` used without ``quarantine_path``.
    """
    name = registry.name
    path = registry.path(options["file"])
    db = load_policy(path)
    quarantine: str = options["quarantine_path"]
    uses_freeze = any(a.get("freeze") for _, a in db.networks) or \
        any(a.get("freeze") for a in db.names.values())
    if uses_freeze and not quarantine:
        raise OptionError("quarantine_path", "needed: the policy file uses freeze")
    resolver = shared_resolver(registry.config.dns)
    ours = {registry.config.server.hostname.lower().rstrip(".")} | {
        str(h).lower().rstrip(".") for h in options["local_hosts"]}

    warn = options["mode"] == "warn"

    def refuse(result: HookResult) -> HookResult | None:
        """The refusal, or in warn mode nothing (logged)."""
        if warn:
            log.warning("policy-db would refuse: %s (warn only)", result.reply)
            return None
        return result

    def connect(session: SessionInfo) -> HookResult | None:
        attrs = db.client(session.peer_ip)
        session.notes[_NOTE] = attrs
        if attrs.get("rejectnet") and not attrs.get("fulltrustnet"):
            session.results.add(name, "rejectnet", client=session.peer_ip)
            return refuse(HookResult(Verdict.DENY_DISCONNECT,
                                     Reply(554, "5.7.1", "Access denied by local policy"),
                                     reason="policy-db rejectnet"))
        return None

    def client_attrs(session: SessionInfo) -> dict[str, bool]:
        attrs = session.notes.get(_NOTE)
        return attrs if isinstance(attrs, dict) else db.client(session.peer_ip)

    async def domain_exists(domain: str) -> bool | None:
        """True/False, ``None`` when the DNS failed."""
        for rdtype in ("MX", "A", "AAAA"):
            try:
                await resolver.resolve(domain, rdtype, search=False)
                return True
            except dns.resolver.NXDOMAIN:
                return False
            except dns.resolver.NoAnswer:
                continue
            except dns.exception.DNSException:
                return None
        return False

    async def mail(session: SessionInfo, tx: Transaction) -> HookResult | None:
        client = client_attrs(session)
        if client.get("fulltrustnet"):
            return None
        attrs = db.address(tx.mail_from) if tx.mail_from else {}
        if attrs.get("rejectsource"):
            tx.results.add(name, "rejectsource", sender=tx.mail_from)
            return refuse(HookResult(Verdict.DENY, Reply(
                553, "5.7.1", "Sender address rejected by local policy")))
        if attrs.get("senderokwithdns") and tx.mail_from:
            domain = tx.mail_from.rpartition("@")[2]
            exists = await domain_exists(domain)
            if exists is None:
                return refuse(HookResult(Verdict.DENYSOFT, Reply(
                    450, "4.4.3", f"Cannot check the sender domain {domain} in the DNS")))
            if not exists:
                tx.results.add(name, "senderokwithdns", sender=tx.mail_from, exists=False)
                return refuse(HookResult(Verdict.DENY, Reply(
                    553, "5.1.8", f"Sender domain {domain} does not exist")))
        if attrs.get("freeze") or client.get("freeze"):
            tx.notes["policy-db:freeze"] = True
        return None

    async def mx_points_here(domain: str) -> bool:
        try:
            answer = await resolver.resolve(domain, "MX", search=False)
        except dns.exception.DNSException:
            return False
        return any(str(r.exchange).lower().rstrip(".") in ours for r in answer)

    async def rcpt(session: SessionInfo, tx: Transaction, recipient: Recipient
                   ) -> HookResult | None:
        client = client_attrs(session)
        attrs = db.address(recipient.address)
        if attrs.get("rejectrecipient") and not client.get("fulltrustnet"):
            tx.results.add(name, "rejectrecipient", recipient=recipient.address)
            return refuse(HookResult(Verdict.DENY, Reply(
                550, "5.7.1", "Recipient address rejected by local policy")))
        if attrs.get("freeze"):
            tx.notes["policy-db:freeze"] = True
        why = next((a for a in ("fulltrustnet", "relaycustomer", "trustrecipient")
                    if client.get(a)), None)
        if why is None and attrs.get("relaytarget"):
            why = "relaytarget"
        if why is None and attrs.get("acceptifmx") and \
                await mx_points_here(recipient.address.rpartition("@")[2]):
            why = "acceptifmx"
        if why is None:
            return None  # no opinion: relay control decides
        tx.results.add(name, "accept", reason=why)
        return HookResult(Verdict.OK)

    def data(session: SessionInfo, tx: Transaction) -> HookResult | None:
        if not tx.notes.get("policy-db:freeze"):
            return None
        tx.results.add(name, "freeze")
        return refuse(HookResult(Verdict.QUARANTINE, Reply(250, "2.0.0", "Message accepted"),
                                 reason="policy-db freeze", quarantine=quarantine))

    registry.on("connect", connect)
    registry.on("mail", mail)
    registry.on("rcpt", rcpt)
    registry.on("data", data)
