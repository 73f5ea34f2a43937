"""Example smtpgate plugin: a site's own relay policy, replacing the built-in ``relay``
plugin (docs/plugins.md, "Replacing a built-in").

Enable it and remove the built-in::

    [[plugin]]
    use = "relay"
    enabled = false

    [[plugin]]
    module = "site_relay"
    domains = ["example.com"]              # recipient domains we accept mail for
    trusted_networks = ["192.0.2.0/24"]    # clients that may send anywhere

At ``rcpt``: a recipient in one of ``domains`` (or a subdomain), a client in
``trusted_networks`` or an authenticated client continues (CONT: the later checks
decide); anything else gets ``554 5.7.1`` and ``reply_text``. Its test is
tests/plugins/test_builtins.py.
"""

from __future__ import annotations

import ipaddress

from smtpgate.envelope import Recipient, SessionInfo
from smtpgate.hooks import HookResult, Transaction, reject
from smtpgate.plugins import REQUIRED, Option, PluginRegistry

PRIORITY = -90  # where the built-in relay control runs


def _check_networks(values: list[str]) -> str | None:
    """``None`` when every entry is an address or CIDR network, else why not."""
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            return f"must be addresses or networks (CIDR), got {value!r}"
    return None


OPTIONS: dict[str, Option] = {
    "domains": Option(list, default=REQUIRED, items=str,
                      check=lambda v: None if v else "must list at least one domain",
                      help="recipient domains accepted from anyone (and their subdomains)"),
    "trusted_networks": Option(list, default=[], items=str, check=_check_networks,
                               help="clients that may send to any domain"),
    "reply_text": Option(str, default="Relaying denied by site policy",
                         help="text of the 554 5.7.1 reply"),
}


def register(registry: PluginRegistry, options: dict[str, object]) -> None:
    """Register the rcpt hook.

    Args:
        registry: where the hook goes.
        options: the validated options (see :data:`OPTIONS`).
    """
    domains_opt, networks_opt, text = (options["domains"], options["trusted_networks"],
                                       options["reply_text"])
    assert isinstance(domains_opt, list) and isinstance(networks_opt, list)
    assert isinstance(text, str)
    domains = tuple(d.lower().strip(".") for d in domains_opt)
    networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks_opt)
    denied = reject(text, code=554, enhanced="5.7.1")

    def trusted(ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in networks)

    def rcpt(session: SessionInfo, transaction: Transaction,
             recipient: Recipient) -> HookResult | None:
        domain = recipient.domain
        if any(domain == d or domain.endswith("." + d) for d in domains):
            return None
        if session.auth_user or trusted(session.peer_ip):
            return None
        return denied

    registry.on("rcpt", rcpt)
