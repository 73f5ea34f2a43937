"""Fixtures for the SPF tests: the loopback DNS server of tests/delivery/dns_server.py run
in its own thread (the server-level tests talk SMTP with blocking clients), serving the
test zone below, and a synchronous resolver pointed at it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import dns.resolver
import pytest

from smtpgate.config import DnsConfig
from smtpgate.dns import sync_resolver

from ...delivery.dns_server import DnsServer, Records


def _txt(*strings: str) -> str:
    """TXT rdata text of ``strings`` (RFC 1035 §5.1 quoting)."""
    return " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"' for s in strings)


#: Client 127.0.0.1 (the server-level tests' own address) and the documentation
#: addresses 192.0.2.0/24, 198.51.100.0/24, 2001:db8::/32 (unit-level checks).
ZONE: dict[tuple[str, str], list[str]] = {
    # results
    ("pass.test", "TXT"): [_txt("v=spf1 ip4:127.0.0.1 ip4:192.0.2.0/24 -all")],
    ("fail.test", "TXT"): [_txt("v=spf1 ip4:192.0.2.1 -all exp=exp.fail.test")],
    ("exp.fail.test", "TXT"): [_txt("Host %{i} may not send for %{d}; see ",
                                    "https://www.%{d}/spf")],
    ("failnoexp.test", "TXT"): [_txt("v=spf1 ip4:192.0.2.1 -all")],
    ("soft.test", "TXT"): [_txt("v=spf1 ip4:192.0.2.1 ~all")],
    ("neutral.test", "TXT"): [_txt("v=spf1 ip4:192.0.2.1 ?all")],
    ("nospf.test", "TXT"): [_txt("some other text")],
    ("nospf.test", "A"): ["192.0.2.9"],
    # HELO names
    ("client.test", "TXT"): [_txt("v=spf1 ip4:127.0.0.1 -all")],
    ("badhelo.test", "TXT"): [_txt("v=spf1 -all exp=exp.badhelo.test")],
    ("exp.badhelo.test", "TXT"): [_txt("HELO %{h} is not ours")],
    # mechanisms
    ("a.test", "TXT"): [_txt("v=spf1 a a:other.a.test/24 -all")],
    ("a.test", "A"): ["127.0.0.1"],
    ("a.test", "AAAA"): ["2001:db8::a"],
    ("other.a.test", "A"): ["198.51.100.7"],
    ("mx.spf.test", "TXT"): [_txt("v=spf1 mx -all")],
    ("mx.spf.test", "MX"): ["10 mail.mx.spf.test.", "20 mail2.mx.spf.test."],
    ("mail.mx.spf.test", "A"): ["127.0.0.1"],
    ("mail2.mx.spf.test", "AAAA"): ["2001:db8::25"],
    ("ip6.test", "TXT"): [_txt("v=spf1 ip6:2001:db8:1::/48 -all")],
    ("include.test", "TXT"): [_txt("v=spf1 include:neutral.test include:pass.test -all")],
    ("redirect.test", "TXT"): [_txt("v=spf1 ip4:198.51.100.1 redirect=fail.test")],
    ("exists.test", "TXT"): [_txt("v=spf1 exists:%{ir}.allow.exists.test -all")],
    ("1.2.0.192.allow.exists.test", "A"): ["127.0.0.2"],
    ("ptr.test", "TXT"): [_txt("v=spf1 ptr -all")],
    ("5.2.0.192.in-addr.arpa", "PTR"): ["host.ptr.test."],
    ("host.ptr.test", "A"): ["192.0.2.5"],
    ("6.2.0.192.in-addr.arpa", "PTR"): ["liar.ptr.test."],
    ("liar.ptr.test", "A"): ["192.0.2.99"],  # forward lookup does not confirm
    ("xn--bcher-kva.test", "TXT"): [_txt("v=spf1 ip4:192.0.2.1 -all")],
    ("split.test", "TXT"): [_txt("v=spf1 ip4:192.0.2.1", " ip4:192.0.2.2 -all")],
    # errors
    ("limit.test", "TXT"): [_txt("v=spf1 " + " ".join(f"include:l{n}.test" for n in range(11))
                                 + " -all")],
    **{(f"l{n}.test", "TXT"): [_txt("v=spf1 ip4:198.51.100.200 ?all")] for n in range(11)},
    ("tenlookups.test", "TXT"): [_txt("v=spf1 " + " ".join(f"include:l{n}.test"
                                                            for n in range(10)) + " -all")],
    ("void.test", "TXT"): [_txt("v=spf1 a:nx1.test a:nx2.test a:nx3.test -all")],
    ("malformed.test", "TXT"): [_txt("v=spf1 ip4:192.0.2.300 -all")],
    ("unknownmech.test", "TXT"): [_txt("v=spf1 foo:bar -all")],
    ("two.test", "TXT"): [_txt("v=spf1 -all"), _txt("v=spf1 +all")],
    ("tempinc.test", "TXT"): [_txt("v=spf1 include:servfail.test -all")],
    ("slow.test", "TXT"): [_txt("v=spf1 a:drop.test -all")],
}
SERVFAIL = ["servfail.test"]
DROP = ["drop.test", "timeout.test"]


class ThreadedDns:
    """A :class:`DnsServer` (``server``, or one built from ``records`` and ``kwargs``)
    running in a thread with its own event loop.

    Attributes:
        server: the DNS server (``queries`` lists what it was asked).
        port: its UDP port on 127.0.0.1.
    """

    def __init__(self, records: Records, *, server: DnsServer | None = None,
                 **kwargs: Any) -> None:
        self.server = server if server is not None else DnsServer(records, **kwargs)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.port = self.server.port

    def close(self) -> None:
        """Stop the server and its thread."""
        self.loop.call_soon_threadsafe(self.server.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def spf_dns() -> Iterator[ThreadedDns]:
    """The SPF test zone on a loopback port."""
    dns_server = ThreadedDns(ZONE, servfail=SERVFAIL, drop=DROP)
    yield dns_server
    dns_server.close()


def dns_config(port: int, **kwargs: Any) -> DnsConfig:
    """A ``[dns]`` section naming only the loopback server (short timeouts)."""
    return DnsConfig(nameservers=(f"127.0.0.1:{port}",), timeout=kwargs.pop("timeout", 0.5),
                     lifetime=kwargs.pop("lifetime", 1.0), cache_size=0, **kwargs)


@pytest.fixture
def resolver(spf_dns: ThreadedDns) -> dns.resolver.Resolver:
    """The plugin's synchronous resolver for the test zone."""
    return sync_resolver(dns_config(spf_dns.port))
