"""The one DNS resolver of a running smtpgate: MX delivery and the plugins (DNSBL, SPF ...)
all look names up through it, with one configuration (``[dns]``) and one cache.

Entry points: :func:`make_resolver` (a new :class:`dns.asyncresolver.Resolver`),
:func:`shared_resolver` (the process-wide one for a configuration). dnspython's asyncio
stub resolver (RFC 1035 queries over UDP, TCP on truncation); its LRU cache honours each
answer's TTL (RFC 2181 §8).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Sequence

import dns.asyncresolver
import dns.resolver

from .config import DnsConfig
from .errors import ConfigError

__all__ = ["make_resolver", "shared_resolver"]


def make_resolver(
    nameservers: Sequence[str] | None = None,
    *,
    port: int = 53,
    timeout: float = 5.0,
    lifetime: float = 15.0,
    cache_size: int = 0,
) -> dns.asyncresolver.Resolver:
    """Build dnspython's asyncio stub resolver.

    Args:
        nameservers: IP addresses of the recursive resolvers to ask; ``None`` or empty
            reads the system configuration (``/etc/resolv.conf``).
        port: UDP/TCP port of ``nameservers`` (tests point it at a loopback server).
        timeout: seconds to wait for one server's answer.
        lifetime: seconds in total for one query, retries included.
        cache_size: answers kept in an LRU cache (TTL honoured); 0: no cache.

    Returns:
        A :class:`dns.asyncresolver.Resolver`.

    Raises:
        ConfigError: no system resolver configuration, or a bad nameserver address.
    """
    try:
        if not nameservers:
            resolver = dns.asyncresolver.Resolver()
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [str(ipaddress.ip_address(ns)) for ns in nameservers]
    except (dns.resolver.NoResolverConfiguration, ValueError, OSError) as exc:
        raise ConfigError(f"DNS resolver: {exc}") from None
    resolver.port = port
    resolver.timeout = timeout
    resolver.lifetime = lifetime
    if cache_size:
        resolver.cache = dns.resolver.LRUCache(cache_size)
    return resolver


_shared: dict[DnsConfig, dns.asyncresolver.Resolver] = {}
_lock = threading.Lock()


def shared_resolver(config: DnsConfig | None = None) -> dns.asyncresolver.Resolver:
    """The resolver (and cache) shared by everything in this process that uses the same
    ``[dns]`` settings; built at the first call.

    Args:
        config: the ``[dns]`` section; ``None``: the defaults (system resolvers).

    Raises:
        ConfigError: as :func:`make_resolver`.
    """
    cfg = config or DnsConfig()
    with _lock:
        resolver = _shared.get(cfg)
        if resolver is None:
            resolver = _shared[cfg] = make_resolver(
                cfg.nameservers, port=cfg.port, timeout=cfg.timeout, lifetime=cfg.lifetime,
                cache_size=cfg.cache_size)
        return resolver
