"""A tiny authoritative DNS server for tests: UDP on a free loopback port, answers from a dict.

Entry point: :class:`DnsServer` (async context manager). Built on dnspython's message API
(``dns.message.from_wire`` / ``make_response``). RFC 1035 §4.1 messages, RFC 2308 negative answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

#: ``(owner name, type) -> rdata texts``, e.g. ``("example.test", "MX"): ["10 mx1.example.test."]``.
#: Names are case-insensitive, with or without the trailing dot.
Records = Mapping[tuple[str, str], Sequence[str]]


def _key(name: str) -> str:
    return name.lower().rstrip(".")


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return
        response = self.server.answer(query)
        if response is not None and self.transport is not None:
            self.transport.sendto(response.to_wire(), addr)


class DnsServer:
    """Answers A/AAAA/MX/... queries for the names in ``records``, authoritatively.

    A name present with the asked type gets its records; a name present with
    other types only gets NOERROR without answers (NODATA); any other name
    gets NXDOMAIN. Both negative answers carry the zone's SOA (RFC 2308 §2).

    Args:
        records: the zone data, see :data:`Records`.
        servfail: names answered with SERVFAIL (any type).
        drop: names never answered (the client times out).
        zone: the zone apex for the SOA record of negative answers.
        host: loopback address to listen on.

    Attributes:
        port: the UDP port, once started.
        queries: every ``(name, type)`` asked, in order.
    """

    def __init__(
        self,
        records: Records,
        *,
        servfail: Iterable[str] = (),
        drop: Iterable[str] = (),
        zone: str = "test",
        host: str = "127.0.0.1",
    ) -> None:
        self.records = {(_key(n), t.upper()): list(v) for (n, t), v in records.items()}
        self.names = {n for n, _ in self.records}
        self.servfail = {_key(n) for n in servfail}
        self.drop = {_key(n) for n in drop}
        self.zone = _key(zone)
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self._transport: asyncio.DatagramTransport | None = None

    def answer(self, query: dns.message.Message) -> dns.message.Message | None:
        """The response to ``query``, or ``None`` to stay silent."""
        if not query.question:
            return None
        question = query.question[0]
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.drop:
            return None
        response = dns.message.make_response(query)
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        response.flags |= dns.flags.AA
        rdatas = self.records.get((name, rdtype))
        if rdatas:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 300, dns.rdataclass.IN, rdtype, rdatas)
            )
            return response
        if name not in self.names:
            response.set_rcode(dns.rcode.NXDOMAIN)
        response.authority.append(
            dns.rrset.from_text(
                dns.name.from_text(self.zone),
                300,
                dns.rdataclass.IN,
                "SOA",
                f"ns.{self.zone}. hostmaster.{self.zone}. 1 3600 600 86400 60",
            )
        )
        return response

    async def start(self) -> int:
        """Bind to a free UDP port on ``host``; return the port."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), local_addr=(self.host, 0)
        )
        self._transport = transport
        self.port = int(transport.get_extra_info("sockname")[1])
        return self.port

    def stop(self) -> None:
        """Close the socket."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    async def __aenter__(self) -> DnsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
