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
import dns.nameserver
import dns.resolver

from .config import DnsConfig
from .errors import ConfigError

__all__ = ["make_resolver", "shared_resolver", "sync_resolver"]


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
        nameservers: the recursive resolvers to ask: ``IP``, ``IPv4:PORT`` or
            ``[IPv6]:PORT``; ``None`` or empty reads the system configuration
            (``/etc/resolv.conf``).
        port: the UDP/TCP port of a nameserver given without one.
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
            resolver.port = port
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            servers = [_split(ns, port) for ns in nameservers]
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, p) for ip, p in servers]
            resolver.port = port
    except (dns.resolver.NoResolverConfiguration, ValueError, OSError) as exc:
        raise ConfigError(f"DNS resolver: {exc}") from None
    resolver.timeout = timeout
    resolver.lifetime = lifetime
    if cache_size:
        resolver.cache = dns.resolver.LRUCache(cache_size)
    return resolver


def _split(server: str, default_port: int) -> tuple[str, int]:
    """``IP``, ``IPv4:PORT`` or ``[IPv6]:PORT`` -> (IP, port). Raises ValueError."""
    host, port = server, default_port
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        if rest:
            port = int(rest.removeprefix(":"))
    elif server.count(":") == 1:
        host, _, text = server.partition(":")
        port = int(text)
    return str(ipaddress.ip_address(host)), port


def sync_resolver(config: DnsConfig | None = None) -> dns.resolver.Resolver:
    """The blocking resolver with the ``[dns]`` settings (one per configuration), for
    libraries that look names up themselves in worker threads (pyspf, dkimpy); it shares
    the answer cache of :func:`shared_resolver` (dnspython's LRU cache is thread-safe).
    Only without configured nameservers is ``/etc/resolv.conf`` read.

    Raises:
        ConfigError: as :func:`make_resolver`.
    """
    cfg = config or DnsConfig()
    shared = shared_resolver(cfg)
    with _lock:
        resolver = _sync.get(cfg)
        if resolver is not None:
            return resolver
        try:
            resolver = dns.resolver.Resolver(configure=not cfg.nameservers)
        except (dns.resolver.NoResolverConfiguration, OSError) as exc:
            raise ConfigError(f"DNS resolver: {exc}") from None
        if cfg.nameservers:
            resolver.nameservers = list(shared.nameservers)
        resolver.port = cfg.port
        resolver.timeout = cfg.timeout
        resolver.lifetime = cfg.lifetime
        resolver.cache = shared.cache
        _sync[cfg] = resolver
        return resolver


_shared: dict[DnsConfig, dns.asyncresolver.Resolver] = {}
_sync: dict[DnsConfig, dns.resolver.Resolver] = {}
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
