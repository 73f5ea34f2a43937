"""Fixtures for the DNSBL/RHSBL plugin tests: the suite's DNS server (tests/delivery/
dns_server.py) serving test blocklist zones on a loopback port, run in its own thread
(the SMTP clients of the tests block), and smtpgate with a PROXY listener so that a test
can present any client address, IPv4 or IPv6."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from smtpgate.app import Smtpgate

from ...delivery.dns_server import DnsServer
from ...support import RawClient

LISTED_TXT = "Listed by zen.test, see http://zen.test/q?192.0.2.10"

#: The test zones. zen.test: IP zone (IPv4 and IPv6, RFC 5782 §2.1, §2.4); a.test and
#: b.test: weighted zones; multi.test: a bitmask zone; dbl.test: an RHSBL (§2.3).
RECORDS: dict[tuple[str, str], list[str]] = {
    ("10.2.0.192.zen.test", "A"): ["127.0.0.2"],
    ("10.2.0.192.zen.test", "TXT"): [f'"{LISTED_TXT}"'],
    ("11.2.0.192.zen.test", "A"): ["127.0.0.4"],                  # no TXT
    ("12.2.0.192.zen.test", "A"): ["127.255.255.254"],            # an error code
    ("13.2.0.192.zen.test", "A"): ["127.0.0.20"],
    # 2001:db8::10 (RFC 5782 §2.4 nibbles)
    ("0.1.0.0." + "0.0.0.0." * 5 + "8.b.d.0.1.0.0.2.zen.test", "A"): ["127.0.0.2"],
    ("0.1.0.0." + "0.0.0.0." * 5 + "8.b.d.0.1.0.0.2.zen.test", "TXT"): [
        '"IPv6 client listed" " (2001:db8::10)"'],
    # ::1
    ("1." + "0." * 31 + "zen.test", "A"): ["127.0.0.3"],
    ("20.2.0.192.a.test", "A"): ["127.0.0.2"],
    ("20.2.0.192.b.test", "A"): ["127.0.0.2"],
    ("21.2.0.192.b.test", "A"): ["127.0.0.2"],
    ("30.2.0.192.multi.test", "A"): ["127.0.0.8"],
    ("31.2.0.192.multi.test", "A"): ["127.0.0.4"],
    ("32.2.0.192.multi.test", "A"): ["127.0.0.12"],
    ("bad.example.dbl.test", "A"): ["127.0.1.2"],
    ("bad.example.dbl.test", "TXT"): ['"bad.example is a spam domain"'],
    ("badhelo.example.dbl.test", "A"): ["127.0.1.2"],
}
SERVFAIL = ["40.2.0.192.zen.test"]
_CLIENTS: list[RawClient] = []
DROP = ["41.2.0.192.zen.test"]


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """The DNS server, answering from its own event loop in a thread."""
    server = DnsServer(RECORDS, servfail=SERVFAIL, drop=DROP)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield server
    loop.call_soon_threadsafe(server.stop)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def gate(run_app: Callable[..., Smtpgate], dns_server: DnsServer, close_clients: None,
         ) -> Callable[..., Smtpgate]:
    """``gate(zones=[...], reject_at=..., ..., cfg={...})``: smtpgate with the dnsbl plugin
    (the keywords are its options), ``[dns]`` pointing at the test DNS server, relay
    domain ``example.com``, local networks 10.99.0.0/16 only (not loopback), and a PROXY
    listener (its last address) trusting 127.0.0.1."""

    def start(cfg: dict[str, Any] | None = None, dns: dict[str, Any] | None = None,
              **plugin: Any) -> Smtpgate:
        base: dict[str, Any] = {
            "relay": {"local_networks": ["10.99.0.0/16"], "relay_domains": ["example.com"]},
            "dns": {"nameservers": [f"127.0.0.1:{dns_server.port}"], "cache_size": 0,
                    **(dns or {})},
            "listener": [{"address": "127.0.0.1:0", "tls": "none", "proxy_protocol": True,
                          "trusted_proxies": ["127.0.0.1"]}],
            "plugin": [{"use": "dnsbl", **plugin}],
        }
        base.update(cfg or {})
        return run_app(base)

    return start


def proxied(app: Smtpgate, client_ip: str) -> RawClient:
    """A line-level client on the PROXY listener presenting ``client_ip`` (v1 header);
    ``.greeting`` is smtpgate's greeting."""
    family = "TCP6" if ":" in client_ip else "TCP4"
    dest = "::1" if family == "TCP6" else "127.0.0.1"
    port = app.addresses[-1][1]
    client = RawClient.__new__(RawClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    client.buf = b""
    client.sock.sendall(f"PROXY {family} {client_ip} {dest} 40000 25\r\n".encode())
    _CLIENTS.append(client)
    client.greeting = client.read_reply()
    return client


@pytest.fixture
def close_clients(run_app: Callable[..., Smtpgate]) -> Iterator[None]:
    """Closes the :func:`proxied` clients of a test before its servers stop."""
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()
