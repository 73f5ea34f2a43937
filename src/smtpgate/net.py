"""Client addresses: one parser and one canonical text for every place that compares them.

Entry points: :func:`parse_client_ip` (text → address), :func:`client_key` (canonical
text: per-IP connection counting, logs, relay control). RFC 4291 §2.5.5.2 (IPv4-mapped
IPv6 addresses), RFC 5321 §4.1.3 (``[IPv6:...]`` address literals).
"""

from __future__ import annotations

import functools
import ipaddress

__all__ = ["IPAddress", "client_key", "parse_client_ip"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=8192)
def parse_client_ip(text: str) -> IPAddress | None:
    """Parse a client address as sockets, PROXY headers and address literals give it
    (cached: relay control asks for the same client's address at every RCPT; the
    address objects are immutable).

    Accepts ``"192.0.2.1"``, ``"2001:db8::1"``, ``"[2001:DB8::1]"``, ``"[IPv6:...]"``;
    an IPv4-mapped IPv6 address (``"::ffff:192.0.2.1"``) becomes the IPv4 address and a
    zone index (``fe80::1%eth0``) is dropped.

    Returns:
        The address, or ``None`` for text that is not one (a Unix-socket peer).
    """
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            return ipaddress.IPv6Address(int(addr))
    return addr


def client_key(ip: str) -> str:
    """Canonical text of a client address (:func:`parse_client_ip`); text that is not
    an address is returned as it is. ``"::ffff:192.0.2.1"`` → ``"192.0.2.1"``,
    ``"[2001:DB8::1]"`` → ``"2001:db8::1"``."""
    addr = parse_client_ip(ip)
    return ip if addr is None else str(addr)
