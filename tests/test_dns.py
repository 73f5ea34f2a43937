"""``[dns]``: one resolver configuration and one cache for everything that looks names up."""

from __future__ import annotations

from pathlib import Path

import dns.resolver

from smtpgate.config import config_from_mapping
from smtpgate.dns import shared_resolver
from smtpgate.queue.outbound import MxOutbound
from smtpgate.queue.runner import build_manager


def test_shared_resolver_is_one_per_configuration() -> None:
    cfg = config_from_mapping({"dns": {"nameservers": ["127.0.0.1", "127.0.0.2:5300",
                                                       "[::1]:5301"], "port": 5353,
                                       "timeout": 0.5, "lifetime": 1, "cache_size": 10}})
    a = shared_resolver(cfg.dns)
    assert a is shared_resolver(cfg.dns)
    assert [(ns.address, ns.port) for ns in a.nameservers] == [
        ("127.0.0.1", 5353), ("127.0.0.2", 5300), ("::1", 5301)]
    assert (a.timeout, a.lifetime) == (0.5, 1.0)
    assert isinstance(a.cache, dns.resolver.LRUCache)
    other = config_from_mapping({"dns": {"nameservers": ["127.0.0.2"], "cache_size": 0}})
    b = shared_resolver(other.dns)
    assert b is not a and b.cache is None


def test_mx_delivery_uses_the_dns_section(tmp_path: Path) -> None:
    cfg = config_from_mapping({
        "relay": {"url": "mx:"}, "queue": {"path": str(tmp_path / "spool")},
        "dns": {"nameservers": ["127.0.0.1"], "port": 5354},
    })
    manager = build_manager(cfg)
    assert isinstance(manager.outbound, MxOutbound)
    assert manager.outbound.mx.resolver is shared_resolver(cfg.dns)
    assert [ns.port for ns in manager.outbound.mx.resolver.nameservers] == [5354]


def test_sync_resolver_has_the_same_servers_and_cache() -> None:
    from smtpgate.dns import sync_resolver

    cfg = config_from_mapping({"dns": {"nameservers": ["127.0.0.3:5300"], "timeout": 0.5}})
    sync = sync_resolver(cfg.dns)
    shared = shared_resolver(cfg.dns)
    assert [(ns.address, ns.port) for ns in sync.nameservers] == [("127.0.0.3", 5300)]
    assert sync.cache is shared.cache and sync.timeout == 0.5
